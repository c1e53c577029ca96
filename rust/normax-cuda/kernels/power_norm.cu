// PowerNorm (Shen et al. 2020, MaskPowerNorm) over `tokens` rows of `channels` (channels last), the
// passes of normax-core's power_norm_forward/backward. Each token's channels form `groups` groups of
// cg = channels / groups; a group's scale is s = 1/sqrt(mean(x^2 over the group) + eps) and u = x * s.
// Row kernels see the (token, group) pairs as rows of cg elements (row r = token * groups + group,
// so its elements start at r * cg); column kernels walk 32 channels x a block of tokens and write
// per-block partial column sums that power_sum_parts adds in a fixed order (deterministic).
// Per-channel inputs (scale, shift, weight, zscale, ema, dscale) are float32.

#define NX_PN_MAX_ROWS_PER_BLOCK 8

__device__ __forceinline__ i64 pn_row() { return (i64)blockIdx.x * blockDim.y + threadIdx.y; }

template <class T, int V>
__device__ __forceinline__ float pn_sum_squares(const T* row, i64 cg, bool active, float* raw) {
    float acc = 0.0f;
    if (active)
        for (i64 i = (i64)threadIdx.x * V; i < cg; i += (i64)blockDim.x * V) {
            float v[V];
            load<T, V>(row + i, v);
#pragma unroll
            for (int j = 0; j < V; ++j) acc = fmaf(v[j], v[j], acc);
        }
    return row_reduce(acc, raw, Add());
}

// s[r] of every (token, group) row.
template <class T, int V>
__device__ void power_scale(const T* x, float* s, i64 rows, i64 cg, float eps) {
    __shared__ float raw[NX_PN_MAX_ROWS_PER_BLOCK * 32];
    i64 r = pn_row();
    bool active = r < rows;
    float ss = pn_sum_squares<T, V>(x + r * cg, cg, active, raw);
    if (active && threadIdx.x == 0) s[r] = 1.0f / sqrtf(ss / (float)cg + eps);
}

// One block of tokens, 32 channels: u = x * s; with `part`, the sums of u^2 over the tokens that
// `pad` (1.0 = padding, null: none) does not mark, at part[blockIdx.y * channels + c]; with `y`,
// y = u * scale + shift. Padded tokens are skipped, not multiplied by 0 (a NaN there stays out).
template <class T>
__device__ void power_forward(const T* x, const float* s, const float* pad, i64 tokens, i64 channels,
                              i64 cg, i64 per_part, const float* scale, const float* shift, T* y,
                              float* part) {
    __shared__ float acc_s[8][33];
    i64 c = (i64)blockIdx.x * 32 + threadIdx.x;
    i64 t0 = (i64)blockIdx.y * per_part;
    i64 t1 = min(tokens, t0 + per_part);
    i64 groups = channels / cg;
    float acc = 0.0f;
    if (c < channels) {
        i64 g = c / cg;
        float sc = y ? scale[c] : 0.0f, sh = y ? shift[c] : 0.0f;
        for (i64 t = t0 + threadIdx.y; t < t1; t += blockDim.y) {
            float u = to_f32(x[t * channels + c]) * s[t * groups + g];
            if (part && !(pad && pad[t] != 0.0f)) acc = fmaf(u, u, acc);
            if (y) y[t * channels + c] = from_f32<T>(fmaf(u, sc, sh));
        }
    }
    if (part == nullptr) return;  // uniform across the block
    acc_s[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < channels) {
        for (int k = 1; k < blockDim.y; ++k) acc += acc_s[k][threadIdx.x];
        part[blockIdx.y * channels + c] = acc;
    }
}

// V per-channel floats from channel c (ones for null): float4 loads where V > 1, beside the rows'
// 16-byte packs (the host then saw every per-channel array aligned, and cg a multiple of V).
template <int V>
__device__ __forceinline__ void pn_channels(const float* p, i64 c, float (&out)[V]) {
    if (p == nullptr) {
#pragma unroll
        for (int j = 0; j < V; ++j) out[j] = 1.0f;
    } else if constexpr (V == 1) {
        out[0] = p[c];
    } else {
#pragma unroll
        for (int k = 0; k < V; k += 4) {
            float4 f = *reinterpret_cast<const float4*>(p + c + k);
            out[k] = f.x, out[k + 1] = f.y, out[k + 2] = f.z, out[k + 3] = f.w;
        }
    }
}

// du = (dy * weight - ema * u * zscale) * dscale of V channels from c, with u = x * s.
template <int V>
__device__ __forceinline__ void pn_du(const float (&v)[V], const float (&d)[V], float s, i64 c, const float* weight,
                                      const float* zscale, const float* ema, const float* dscale, float (&u)[V],
                                      float (&du)[V]) {
    float w[V], zs[V], e[V], ds[V];
    pn_channels<V>(weight, c, w);
    pn_channels<V>(zscale, c, zs);
    pn_channels<V>(ema, c, e);
    pn_channels<V>(dscale, c, ds);
#pragma unroll
    for (int j = 0; j < V; ++j) {
        u[j] = v[j] * s;
        du[j] = (d[j] * w[j] - e[j] * (u[j] * zs[j])) * ds[j];
    }
}

// dx of every (token, group) row, and its s (for power_param_part). With g = dy * weight,
// z = u * zscale, g_hat = g - ema * z, du = g_hat * dscale:
//   dx = s * (du - u * mean over the group of du * u)
template <class T, int V>
__device__ void power_backward(const T* dy, const T* x, const float* weight, const float* zscale,
                               const float* ema, const float* dscale, T* dx, float* s_out, i64 rows,
                               i64 cg, int groups, float eps) {
    __shared__ float raw[NX_PN_MAX_ROWS_PER_BLOCK * 32];
    i64 r = pn_row();
    bool active = r < rows;
    const T* xr = x + r * cg;
    const T* dr = dy + r * cg;
    i64 c0 = active ? (r % groups) * cg : 0;  // the channel of the row's first element
    float ss = pn_sum_squares<T, V>(xr, cg, active, raw);
    float s = 1.0f / sqrtf(ss / (float)cg + eps);
    float sdu = 0.0f;
    if (active)
        for (i64 i = (i64)threadIdx.x * V; i < cg; i += (i64)blockDim.x * V) {
            float v[V], d[V], u[V], du[V];
            load<T, V>(xr + i, v);
            load<T, V>(dr + i, d);
            pn_du<V>(v, d, s, c0 + i, weight, zscale, ema, dscale, u, du);
#pragma unroll
            for (int j = 0; j < V; ++j) sdu = fmaf(du[j], u[j], sdu);
        }
    sdu = row_reduce(sdu, raw, Add());
    if (!active) return;
    if (threadIdx.x == 0) s_out[r] = s;
    float su = -sdu / (float)cg * s;
    T* out = dx + r * cg;
    for (i64 i = (i64)threadIdx.x * V; i < cg; i += (i64)blockDim.x * V) {
        float v[V], d[V], u[V], du[V];
        load<T, V>(xr + i, v);
        load<T, V>(dr + i, d);
        pn_du<V>(v, d, s, c0 + i, weight, zscale, ema, dscale, u, du);
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] = fmaf(u[j], su, du[j] * s);
        store<T, V>(out + i, v);
    }
}

// Partial column sums over a block of tokens of g_hat * z, dy * z and dy (all tokens, padded ones
// too), at part[blockIdx.y * 3 * channels + k * channels + c] for k = 0, 1, 2.
template <class T>
__device__ void power_param_part(const T* dy, const T* x, const float* s, const float* weight,
                                 const float* zscale, const float* ema, i64 tokens, i64 channels, i64 cg,
                                 i64 per_part, float* part) {
    __shared__ float acc_s[3][8][33];
    i64 c = (i64)blockIdx.x * 32 + threadIdx.x;
    i64 t0 = (i64)blockIdx.y * per_part;
    i64 t1 = min(tokens, t0 + per_part);
    i64 groups = channels / cg;
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f;
    if (c < channels) {
        i64 g = c / cg;
        float w = weight ? weight[c] : 1.0f, zs = zscale[c], e = ema[c];
        for (i64 t = t0 + threadIdx.y; t < t1; t += blockDim.y) {
            float d = to_f32(dy[t * channels + c]);
            float z = to_f32(x[t * channels + c]) * s[t * groups + g] * zs;
            float gh = d * w - e * z;
            a0 = fmaf(gh, z, a0);
            a1 = fmaf(d, z, a1);
            a2 += d;
        }
    }
    acc_s[0][threadIdx.y][threadIdx.x] = a0;
    acc_s[1][threadIdx.y][threadIdx.x] = a1;
    acc_s[2][threadIdx.y][threadIdx.x] = a2;
    __syncthreads();
    if (threadIdx.y == 0 && c < channels) {
        for (int k = 1; k < blockDim.y; ++k) {
            a0 += acc_s[0][k][threadIdx.x];
            a1 += acc_s[1][k][threadIdx.x];
            a2 += acc_s[2][k][threadIdx.x];
        }
        float* p = part + (i64)blockIdx.y * 3 * channels;
        p[c] = a0;
        p[channels + c] = a1;
        p[2 * channels + c] = a2;
    }
}

// out[c] = sum over p of part[p * cols + c], p in order.
extern "C" __global__ void power_sum_parts(const float* part, int parts, i64 cols, float* out) {
    i64 c = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float s = 0.0f;
    for (int p = 0; p < parts; ++p) s += part[(i64)p * cols + c];
    out[c] = s;
}

// A boolean pad mask (one byte per token, nonzero = padding: XLA's PRED) as the float32 mask the
// passes read.
extern "C" __global__ void power_widen_mask(const unsigned char* mask, i64 n, float* out) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = mask[i] ? 1.0f : 0.0f;
}

#define NX_POWER_ROWS(name, T, V)                                                                         \
    extern "C" __global__ void __launch_bounds__(1024) power_scale_##name##_v##V(                         \
        const T* x, float* s, i64 rows, i64 cg, float eps) {                                              \
        power_scale<T, V>(x, s, rows, cg, eps);                                                           \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(1024) power_backward_##name##_v##V(                      \
        const T* dy, const T* x, const float* weight, const float* zscale, const float* ema,              \
        const float* dscale, T* dx, float* s_out, i64 rows, i64 cg, int groups, float eps) {              \
        power_backward<T, V>(dy, x, weight, zscale, ema, dscale, dx, s_out, rows, cg, groups, eps);       \
    }

#define NX_POWER_TYPE(name, T, V)                                                                         \
    NX_POWER_ROWS(name, T, 1)                                                                             \
    NX_POWER_ROWS(name, T, V)                                                                             \
    extern "C" __global__ void power_forward_##name(const T* x, const float* s, const float* pad,         \
                                                    i64 tokens, i64 channels, i64 cg, i64 per_part,       \
                                                    const float* scale, const float* shift, T* y,         \
                                                    float* part) {                                        \
        power_forward<T>(x, s, pad, tokens, channels, cg, per_part, scale, shift, y, part);               \
    }                                                                                                     \
    extern "C" __global__ void power_param_part_##name(const T* dy, const T* x, const float* s,           \
                                                       const float* weight, const float* zscale,          \
                                                       const float* ema, i64 tokens, i64 channels,        \
                                                       i64 cg, i64 per_part, float* part) {               \
        power_param_part<T>(dy, x, s, weight, zscale, ema, tokens, channels, cg, per_part, part);         \
    }

NX_TYPES(NX_POWER_TYPE)

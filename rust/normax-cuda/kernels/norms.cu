// rms_norm, crms_norm and layer_norm over rows: the forward; the backward as one persistent kernel
// writing dx and float32 partial column sums of the weight and bias gradients (one partial row per
// row slot), and one kernel adding those partials in a fixed order into dweight/dbias.
// kind 0: rms_norm, 1: crms_norm (d = cols + 1 and the implicit last entry -sum(x)), 2: layer_norm.
// Parameters are float32 (kernels `norm_forward_<dtype>_*`) or x's own 16-bit dtype
// (`norm_forward_wx_<dtype>_*`), read in that dtype with 16-byte loads like the rows.

#define NORM_MAX_ROWS 4  // rows per block at most: the shared scratch holds 32 slots for each
#define NORM_FLT_MAX __int_as_float(0x7f7fffff)

// ---- N values at p: common.cuh's 16-byte loads and stores (packed conversions) where N fills
// whole 16-byte vectors (p then 16-byte aligned), else one element at a time.

template <class T, int N>
__device__ __forceinline__ void norm_load(const T* p, float (&out)[N]) {
    if constexpr (N % (16 / sizeof(T)) == 0) {
        load<T, N>(p, out);
    } else {
#pragma unroll
        for (int j = 0; j < N; ++j) out[j] = to_f32(p[j]);
    }
}

template <class T, int N>
__device__ __forceinline__ void norm_store(T* p, const float (&in)[N]) {
    if constexpr (N % (16 / sizeof(T)) == 0) {
        store<T, N>(p, in);
    } else {
#pragma unroll
        for (int j = 0; j < N; ++j) p[j] = from_f32<T>(in[j]);
    }
}

// ---- Statistics, and the rows whose squares leave float32 (as normax-core's norms).

struct NormStats {
    float mean, rstd;
};

__device__ __forceinline__ float norm_rstd(float ms, float eps) { return 1.0f / sqrtf(ms + eps); }

// (mean, rstd) from the row's sum and sum of squares (RMS kinds).
__device__ __forceinline__ NormStats norm_rms_stats(float2 s, i64 cols, int kind, float eps) {
    float ms = kind == 1 ? (s.y + s.x * s.x) / (float)(cols + 1) : s.y / (float)cols;
    return {0.0f, norm_rstd(ms, eps)};
}

// A row to redo scaled: a statistic that overflowed (or NaN), or an rstd past 2^51, where the
// mean square is below 2^-102 and the squares summed were subnormal.
__device__ __forceinline__ bool norm_extreme(NormStats s) {
    return !(fabsf(s.mean) < NX_INF && s.rstd > 0.0f && s.rstd <= 2251799813685248.0f);
}

// max |x| that keeps NaN (fmaxf drops it): a row holding NaN is not scaled.
struct NormMaxAbs {
    __device__ float operator()(float a, float b) const { return (a != a || a > b) ? a : b; }
};

// 2^n for n in [-126, 127].
__device__ __forceinline__ float norm_pow2(int n) { return __int_as_float((n + 127) << 23); }

// v * 2^n for n in [-252, 254]: two exact power-of-two factors.
__device__ __forceinline__ float norm_ldexp(float v, int n) {
    return v * norm_pow2(n / 2) * norm_pow2(n - n / 2);
}

// The power of two 2^shift that brings the row's largest |x| into [1, 2); 0 for a row of zeros or
// one holding inf or NaN (nothing to scale).
__device__ __forceinline__ int norm_shift(float most) {
    if (!(most > 0.0f && most < NX_INF)) return 0;
    if (most < 1.17549435e-38f)  // subnormal: exponent of most * 2^64
        return 127 + 64 - (__float_as_int(most * 18446744073709551616.0f) >> 23);
    return 127 - (__float_as_int(most) >> 23);
}

// The scaled row's eps, eps 4^shift, from root_eps = sqrt(eps) (float32 even where eps is not):
// inf where it overflows; then (or where the mean square is 0) only eps counts, and the scaled
// row's rstd is 1 / (sqrt(eps) 2^shift), with none of that overflow.
__device__ __forceinline__ float norm_scaled_eps(float root_eps, int shift) {
    float r = norm_ldexp(root_eps, shift);
    return r * r;
}
__device__ __forceinline__ float norm_scaled_rstd(float rstd, float root_eps, int shift) {
    float ek = norm_scaled_eps(root_eps, shift);
    return (ek < NX_INF && rstd < NX_INF) ? rstd : 1.0f / norm_ldexp(root_eps, shift);
}

// The row's own rstd from the scaled row's: rstd' 2^shift, a finite one clamped to FLT_MAX.
__device__ __forceinline__ float norm_unscaled_rstd(float rstd, int shift) {
    float r = norm_ldexp(rstd, shift);
    return (r == NX_INF && rstd < NX_INF) ? NORM_FLT_MAX : r;
}

__device__ __forceinline__ i64 norm_row() { return (i64)blockIdx.x * blockDim.y + threadIdx.y; }

// y = (x - mean) * rstd * weight + bias for V values at column i.
template <class T, class W, int V>
__device__ __forceinline__ void norm_write(T* out, const W* weight, const W* bias, i64 i, float (&v)[V],
                                           NormStats st) {
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = (v[j] - st.mean) * st.rstd;
    if (weight) {
        float w[V];
        norm_load<W, V>(weight + i, w);
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] *= w[j];
    }
    if (bias) {
        float b[V];
        norm_load<W, V>(bias + i, b);
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] += b[j];
    }
    norm_store<T, V>(out + i, v);
}

// ---- Forward, rows held in registers: P packs of V values per thread (one read of memory).

template <int V, int P>
__device__ __forceinline__ NormStats packs_stats(const float (&v)[P][V], i64 cols, i64 base, i64 stride,
                                                 int kind, float eps, float4* raw) {
    float sum = 0.0f, sq = 0.0f;
#pragma unroll
    for (int p = 0; p < P; ++p)
#pragma unroll
        for (int j = 0; j < V; ++j) {
            sum += v[p][j];
            sq = fmaf(v[p][j], v[p][j], sq);
        }
    float2 s = row_reduce(make_float2(sum, sq), reinterpret_cast<float2*>(raw), Add());
    if (kind != 2) return norm_rms_stats(s, cols, kind, eps);
    // Layer norm: the centered second moment from the registers, never E[x^2] - mean^2.
    float mean = s.x / (float)cols, c = 0.0f;
#pragma unroll
    for (int p = 0; p < P; ++p)
        if (base + p * stride < cols)
#pragma unroll
            for (int j = 0; j < V; ++j) {
                float d = v[p][j] - mean;
                c = fmaf(d, d, c);
            }
    c = row_reduce(c, reinterpret_cast<float*>(raw), Add());
    return {mean, norm_rstd(c / (float)cols, eps)};
}

template <class T, class W, int V, int P>
__device__ void norm_forward_packs(const T* x, const W* weight, const W* bias, T* y, float* mean_out,
                                   float* rstd_out, i64 rows, i64 cols, float eps, float root_eps, int kind) {
    __shared__ float4 raw[NORM_MAX_ROWS * 32];
    i64 r = norm_row();
    bool active = r < rows;
    const T* row = x + r * cols;
    i64 base = (i64)threadIdx.x * V, stride = (i64)blockDim.x * V;
    float v[P][V];
#pragma unroll
    for (int p = 0; p < P; ++p) {
        if (active && base + p * stride < cols) {
            norm_load<T, V>(row + base + p * stride, v[p]);
        } else {
#pragma unroll
            for (int j = 0; j < V; ++j) v[p][j] = 0.0f;
        }
    }
    NormStats st = packs_stats<V, P>(v, cols, base, stride, kind, eps, raw);
    int shift = 0;
    bool extreme = active && norm_extreme(st);
    // Rare, and block-uniform (the reductions synchronize the block): every row of the block
    // redoes its statistics, the extreme ones from the row scaled by 2^shift (exact), eps by 4^shift.
    if (__syncthreads_or(extreme)) {
        float most = 0.0f;
#pragma unroll
        for (int p = 0; p < P; ++p)
#pragma unroll
            for (int j = 0; j < V; ++j) most = NormMaxAbs()(fabsf(v[p][j]), most);
        most = row_reduce(most, reinterpret_cast<float*>(raw), NormMaxAbs());
        shift = extreme ? norm_shift(most) : 0;
#pragma unroll
        for (int p = 0; p < P; ++p)
#pragma unroll
            for (int j = 0; j < V; ++j) v[p][j] = norm_ldexp(v[p][j], shift);
        st = packs_stats<V, P>(v, cols, base, stride, kind, norm_scaled_eps(root_eps, shift), raw);
        if (shift != 0) st.rstd = norm_scaled_rstd(st.rstd, root_eps, shift);
    }
    if (!active) return;
    if (threadIdx.x == 0) {
        if (mean_out) mean_out[r] = norm_ldexp(st.mean, -shift);
        if (rstd_out) rstd_out[r] = norm_unscaled_rstd(st.rstd, shift);
    }
    if (y == nullptr) return;
    T* out = y + r * cols;
#pragma unroll
    for (int p = 0; p < P; ++p)
        if (base + p * stride < cols) norm_write<T, W, V>(out, weight, bias, base + p * stride, v[p], st);
}

// ---- Forward, any row (V = 1 for unaligned rows, or rows past the packs' reach): the row is read
// for the statistics and again (from L2) for the output.

// The statistics of the row scaled by 2^shift (0: as it is).
template <class T, int V>
__device__ __forceinline__ NormStats loop_stats(const T* row, i64 cols, bool active, int kind, float eps,
                                                int shift, float4* raw) {
    float2 acc = make_float2(0.0f, 0.0f);
    if (active)
        for (i64 i = (i64)threadIdx.x * V; i < cols; i += (i64)blockDim.x * V) {
            float v[V];
            norm_load<T, V>(row + i, v);
#pragma unroll
            for (int j = 0; j < V; ++j) {
                float s = norm_ldexp(v[j], shift);
                acc.x += s;
                acc.y = fmaf(s, s, acc.y);
            }
        }
    float2 s = row_reduce(acc, reinterpret_cast<float2*>(raw), Add());
    if (kind != 2) return norm_rms_stats(s, cols, kind, eps);
    float mean = s.x / (float)cols, c = 0.0f;
    if (active)
        for (i64 i = (i64)threadIdx.x * V; i < cols; i += (i64)blockDim.x * V) {
            float v[V];
            norm_load<T, V>(row + i, v);
#pragma unroll
            for (int j = 0; j < V; ++j) {
                float d = norm_ldexp(v[j], shift) - mean;
                c = fmaf(d, d, c);
            }
        }
    c = row_reduce(c, reinterpret_cast<float*>(raw), Add());
    return {mean, norm_rstd(c / (float)cols, eps)};
}

template <class T, class W, int V>
__device__ void norm_forward_loop(const T* x, const W* weight, const W* bias, T* y, float* mean_out,
                                  float* rstd_out, i64 rows, i64 cols, float eps, float root_eps, int kind) {
    __shared__ float4 raw[NORM_MAX_ROWS * 32];
    i64 r = norm_row();
    bool active = r < rows;
    const T* row = x + r * cols;
    NormStats st = loop_stats<T, V>(row, cols, active, kind, eps, 0, raw);
    int shift = 0;
    bool extreme = active && norm_extreme(st);
    if (__syncthreads_or(extreme)) {  // block-uniform, as in norm_forward_packs
        float most = 0.0f;
        if (active)
            for (i64 i = (i64)threadIdx.x * V; i < cols; i += (i64)blockDim.x * V) {
                float v[V];
                norm_load<T, V>(row + i, v);
#pragma unroll
                for (int j = 0; j < V; ++j) most = NormMaxAbs()(fabsf(v[j]), most);
            }
        most = row_reduce(most, reinterpret_cast<float*>(raw), NormMaxAbs());
        shift = extreme ? norm_shift(most) : 0;
        st = loop_stats<T, V>(row, cols, active, kind, norm_scaled_eps(root_eps, shift), shift, raw);
        if (shift != 0) st.rstd = norm_scaled_rstd(st.rstd, root_eps, shift);
    }
    if (!active) return;
    if (threadIdx.x == 0) {
        if (mean_out) mean_out[r] = norm_ldexp(st.mean, -shift);
        if (rstd_out) rstd_out[r] = norm_unscaled_rstd(st.rstd, shift);
    }
    if (y == nullptr) return;
    T* out = y + r * cols;
    for (i64 i = (i64)threadIdx.x * V; i < cols; i += (i64)blockDim.x * V) {
        float v[V];
        norm_load<T, V>(row + i, v);
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] = norm_ldexp(v[j], shift);
        norm_write<T, W, V>(out, weight, bias, i, v, st);
    }
}

// ---- Backward: a persistent grid; each block takes every gridDim.x-th group of blockDim.y rows.
// dx from the saved float32 statistics, at any magnitude of x (xhat = (x - mean) * rstd stays
// about 1) but rows whose rstd the forward clamped to FLT_MAX (|x| ~1e-38 with eps ~0): their dx
// follows from that rstd. With g = dy * weight and xhat = (x - mean) * rstd:
//   rms:   dx = rstd * (g - xhat * sum(g xhat) / d)                       (d = cols)
//   crms:  dx = rstd * g - (x + sum(x)) * rstd^3 * sum(g x) / d           (d = cols + 1)
//   layer: dx = rstd * (g - sum(g) / d - xhat * sum(g xhat) / d)
// The row sums take the whole row; dx, dy * xhat and dy of the block's column tile (blockIdx.y)
// follow from a second read (from L1/L2), each thread owning P packs of V columns, whose partial
// dweight/dbias sums stay in registers over the block's rows and are written once at the end to
// its row slot's partial row: part_w/part_b[slot * cols + c] (null: not wanted).
template <class T, class W, int V, int P>
__device__ void norm_backward_packs(const T* dy, const T* x, const W* weight, const float* mean,
                                    const float* rstd, T* dx, float* part_w, float* part_b, i64 rows,
                                    i64 cols, i64 tile, int kind) {
    __shared__ float4 raw[NORM_MAX_ROWS * 32];
    i64 groups = (rows + blockDim.y - 1) / blockDim.y;
    i64 base = tile * blockIdx.y + (i64)threadIdx.x * V, stride = (i64)blockDim.x * V;
    i64 end = min(cols, tile * (blockIdx.y + 1));
    float d = kind == 1 ? (float)(cols + 1) : (float)cols;
    float dw[P][V], db[P][V];
#pragma unroll
    for (int p = 0; p < P; ++p)
#pragma unroll
        for (int j = 0; j < V; ++j) dw[p][j] = db[p][j] = 0.0f;
    for (i64 group = blockIdx.x; group < groups; group += gridDim.x) {  // block-uniform
        i64 r = group * blockDim.y + threadIdx.y;
        bool active = r < rows;
        float mu = active && mean ? mean[r] : 0.0f;
        float rs = active ? rstd[r] : 0.0f;
        const T* xr = x + r * cols;
        const T* dr = dy + r * cols;
        float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);  // sum g, sum g xhat, sum x
        if (active)
            for (i64 i = (i64)threadIdx.x * V; i < cols; i += stride) {
                float v[V], g[V];
                norm_load<T, V>(xr + i, v);
                norm_load<T, V>(dr + i, g);
                if (weight) {
                    float w[V];
                    norm_load<W, V>(weight + i, w);
#pragma unroll
                    for (int j = 0; j < V; ++j) g[j] *= w[j];
                }
#pragma unroll
                for (int j = 0; j < V; ++j) {
                    acc.x += g[j];
                    acc.y = fmaf(g[j], (v[j] - mu) * rs, acc.y);
                    acc.z += v[j];
                }
            }
        acc = row_reduce(acc, raw, Add());
        if (!active) continue;
        float mean_g = kind == 2 ? acc.x / d : 0.0f;
        float proj = acc.y / d;
        T* out = dx + r * cols;
#pragma unroll
        for (int p = 0; p < P; ++p) {
            i64 i = base + p * stride;
            if (i >= end) continue;
            float v[V], dd[V], w[V];
            norm_load<T, V>(xr + i, v);
            norm_load<T, V>(dr + i, dd);
            if (weight) norm_load<W, V>(weight + i, w);
#pragma unroll
            for (int j = 0; j < V; ++j) {
                float g = weight ? dd[j] * w[j] : dd[j];
                float xhat = (v[j] - mu) * rs;
                dw[p][j] = fmaf(dd[j], xhat, dw[p][j]);
                db[p][j] += dd[j];
                // crms: the implicit entry -sum(x) adds sum(x) to x in the projection term.
                float along = kind == 1 ? (v[j] + acc.z) * rs : xhat;
                v[j] = rs * (g - mean_g - along * proj);
            }
            norm_store<T, V>(out + i, v);
        }
    }
    i64 slot = norm_row();
#pragma unroll
    for (int p = 0; p < P; ++p) {
        i64 i = base + p * stride;
        if (i >= end) continue;
        if (part_w) norm_store<float, V>(part_w + slot * cols + i, dw[p]);
        if (part_b) norm_store<float, V>(part_b + slot * cols + i, db[p]);
    }
}

// dweight[c] (dbias[c]) = the sum of the `slots` partial rows at part_w (part_b), added in a fixed
// order whatever the launch: deterministic. A block takes 32 columns: each thread 4 of them (one
// 16-byte load per partial row where V > 1) over every 32nd slot, the 32 sums of a column then
// added in order; then 16-byte stores of the block's results (V = 16 / sizeof(O)) or scalars.
template <class O, int V>
__device__ void norm_param_reduce(const float* part_w, const float* part_b, int slots, i64 cols,
                                  O* dweight, O* dbias) {
    __shared__ float4 acc_s[2][32][8];
    __shared__ float2 total[32];
    int quad = threadIdx.x & 7, k = (threadIdx.x >> 3) + 4 * threadIdx.y;
    i64 c0 = (i64)blockIdx.x * 32, c = c0 + 4 * quad;
    float w[4] = {0.0f, 0.0f, 0.0f, 0.0f}, b[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int p = k; p < slots; p += 32) {
        float v[4];
        if (V > 1) {  // cols % 4 == 0: the quad is whole or past the end
            if (c < cols) {
                if (part_w) norm_load<float, 4>(part_w + p * cols + c, v);
#pragma unroll
                for (int j = 0; j < 4; ++j) w[j] += part_w ? v[j] : 0.0f;
                if (part_b) norm_load<float, 4>(part_b + p * cols + c, v);
#pragma unroll
                for (int j = 0; j < 4; ++j) b[j] += part_b ? v[j] : 0.0f;
            }
        } else {
#pragma unroll
            for (int j = 0; j < 4; ++j)
                if (c + j < cols) {
                    if (part_w) w[j] += part_w[p * cols + c + j];
                    if (part_b) b[j] += part_b[p * cols + c + j];
                }
        }
    }
    acc_s[0][k][quad] = make_float4(w[0], w[1], w[2], w[3]);
    acc_s[1][k][quad] = make_float4(b[0], b[1], b[2], b[3]);
    __syncthreads();
    if (threadIdx.y == 0) {  // column c0 + tx: the 32 sums of its quad's lane, in order
        int q = threadIdx.x >> 2, lane = threadIdx.x & 3;
        float2 t = make_float2(0.0f, 0.0f);
        for (int j = 0; j < 32; ++j) {
            float4 a = acc_s[0][j][q], e = acc_s[1][j][q];
            t.x += lane == 0 ? a.x : lane == 1 ? a.y : lane == 2 ? a.z : a.w;
            t.y += lane == 0 ? e.x : lane == 1 ? e.y : lane == 2 ? e.z : e.w;
        }
        total[threadIdx.x] = t;
    }
    __syncthreads();
    if (threadIdx.y != 0 || threadIdx.x * V >= 32) return;
    i64 i = c0 + threadIdx.x * V;
    if (i >= cols) return;
    float ow[V], ob[V];
#pragma unroll
    for (int j = 0; j < V; ++j) ow[j] = total[threadIdx.x * V + j].x, ob[j] = total[threadIdx.x * V + j].y;
    if (dweight) norm_store<O, V>(dweight + i, ow);
    if (dbias) norm_store<O, V>(dbias + i, ob);
}

// ---- The instantiations: `tag` is empty (float32 parameters) or _wx (parameters of x's dtype).

#define NORM_FWD_PACKS(tag, name, T, W, V, P)                                                             \
    extern "C" __global__ void __launch_bounds__(1024) norm_forward##tag##_##name##_p##P(                 \
        const T* x, const W* weight, const W* bias, T* y, float* mean, float* rstd, i64 rows, i64 cols,   \
        float eps, float root_eps, int kind) {                                                                           \
        norm_forward_packs<T, W, V, P>(x, weight, bias, y, mean, rstd, rows, cols, eps, root_eps, kind);            \
    }

#define NORM_FWD_LOOP(tag, name, T, W, V)                                                                 \
    extern "C" __global__ void __launch_bounds__(1024) norm_forward##tag##_##name##_v##V(                 \
        const T* x, const W* weight, const W* bias, T* y, float* mean, float* rstd, i64 rows, i64 cols,   \
        float eps, float root_eps, int kind) {                                                                           \
        norm_forward_loop<T, W, V>(x, weight, bias, y, mean, rstd, rows, cols, eps, root_eps, kind);                \
    }

// Kernel suffix `p<P>`: 16-byte packs; `v1`: scalars, 2 per thread.
#define NORM_BWD(tag, name, T, W, V, P, suffix)                                                           \
    extern "C" __global__ void __launch_bounds__(1024) norm_backward##tag##_##name##_##suffix(            \
        const T* dy, const T* x, const W* weight, const float* mean, const float* rstd, T* dx,            \
        float* part_w, float* part_b, i64 rows, i64 cols, i64 tile, int kind) {                           \
        norm_backward_packs<T, W, V, P>(dy, x, weight, mean, rstd, dx, part_w, part_b, rows, cols, tile,  \
                                        kind);                                                            \
    }

// Every variant but float32's largest packs (below): at most 16 values of row per thread forward,
// 8 backward (whose partial sums of dweight and dbias take twice as many registers again): more
// spill past 64 registers.
#define NORM_FAMILY(tag, name, T, W, V)                                                                   \
    NORM_FWD_LOOP(tag, name, T, W, 1)                                                                     \
    NORM_FWD_LOOP(tag, name, T, W, V)                                                                     \
    NORM_FWD_PACKS(tag, name, T, W, V, 1)                                                                 \
    NORM_FWD_PACKS(tag, name, T, W, V, 2)                                                                 \
    NORM_BWD(tag, name, T, W, V, 1, p1)                                                                   \
    NORM_BWD(tag, name, T, W, 1, 2, v1)

#define NORM_REDUCE(name, O, V)                                                                           \
    extern "C" __global__ void __launch_bounds__(256) norm_param_reduce_##name##_v##V(                    \
        const float* part_w, const float* part_b, int slots, i64 cols, O* dweight, O* dbias) {            \
        norm_param_reduce<O, V>(part_w, part_b, slots, cols, dweight, dbias);                             \
    }

#define NORM_TYPE(name, T, V)                                                                             \
    NORM_FAMILY(, name, T, float, V)                                                                      \
    NORM_REDUCE(name, T, 1)                                                                               \
    NORM_REDUCE(name, T, V)

NX_TYPES(NORM_TYPE)
// float32 rows: packs of 4, so up to 4 forward (16 values) and 2 backward (8).
NORM_FWD_PACKS(, f32, float, float, 4, 4)
NORM_BWD(, f32, float, float, 4, 2, p2)
// 16-bit rows with 16-bit parameters.
NORM_FAMILY(_wx, f16, f16, f16, 8)
NORM_FAMILY(_wx, bf16, bf16, bf16, 8)

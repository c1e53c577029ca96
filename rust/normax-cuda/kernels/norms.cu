// rms_norm, crms_norm and layer_norm over rows, forward and backward, and the column sums of the
// weight and bias gradients. One block (or warp) per row; weight and bias are float32.
// kind 0: rms_norm, 1: crms_norm (d = cols + 1 and the implicit last entry -sum(x)), 2: layer_norm.

#define NX_MAX_ROWS_PER_BLOCK 8

template <class T, int V>
__device__ __forceinline__ float2 row_sums(const T* row, i64 cols, bool active, float shift, float4* raw) {
    float2 acc = make_float2(0.0f, 0.0f);
    if (active)
        for (i64 i = (i64)threadIdx.x * V; i < cols; i += (i64)blockDim.x * V) {
            float v[V];
            load<T, V>(row + i, v);
#pragma unroll
            for (int j = 0; j < V; ++j) {
                float d = v[j] - shift;
                acc.x += d;
                acc.y = fmaf(d, d, acc.y);
            }
        }
    return row_reduce(acc, reinterpret_cast<float2*>(raw), Add());
}

// (mean, rstd) of a row; mean 0 for the RMS kinds. Layer norm takes the centered second moment
// in a second read of the row (cached in L2), never E[x^2] - mean^2.
template <class T, int V>
__device__ __forceinline__ float2 row_stats(const T* row, i64 cols, bool active, int kind, float eps,
                                            float4* raw) {
    float2 s = row_sums<T, V>(row, cols, active, 0.0f, raw);
    if (kind == 2) {
        float mean = s.x / (float)cols;
        float2 c = row_sums<T, V>(row, cols, active, mean, raw);
        return make_float2(mean, 1.0f / sqrtf(c.y / (float)cols + eps));
    }
    float ms = kind == 1 ? (s.y + s.x * s.x) / (float)(cols + 1) : s.y / (float)cols;
    return make_float2(0.0f, 1.0f / sqrtf(ms + eps));
}

__device__ __forceinline__ i64 norm_row() { return (i64)blockIdx.x * blockDim.y + threadIdx.y; }

// y (may be null: statistics only) = (x - mean) * rstd * weight + bias; mean/rstd out per row.
template <class T, int V>
__device__ void norm_forward(const T* x, const float* weight, const float* bias, T* y, float* mean_out,
                             float* rstd_out, i64 rows, i64 cols, float eps, int kind) {
    __shared__ float4 raw[NX_MAX_ROWS_PER_BLOCK * 32];
    i64 r = norm_row();
    bool active = r < rows;
    const T* row = x + r * cols;
    float2 st = row_stats<T, V>(row, cols, active, kind, eps, raw);
    if (!active) return;
    if (threadIdx.x == 0) {
        if (mean_out) mean_out[r] = st.x;
        if (rstd_out) rstd_out[r] = st.y;
    }
    if (y == nullptr) return;
    T* out = y + r * cols;
    for (i64 i = (i64)threadIdx.x * V; i < cols; i += (i64)blockDim.x * V) {
        float v[V];
        load<T, V>(row + i, v);
#pragma unroll
        for (int j = 0; j < V; ++j) {
            float h = (v[j] - st.x) * st.y;
            if (weight) h *= weight[i + j];
            if (bias) h += bias[i + j];
            v[j] = h;
        }
        store<T, V>(out + i, v);
    }
}

// dx from the saved statistics. With g = dy * weight and xhat = (x - mean) * rstd:
//   rms:   dx = rstd * (g - xhat * sum(g xhat) / d)                       (d = cols)
//   crms:  dx = rstd * g - (x + sum(x)) * rstd^3 * sum(g x) / d           (d = cols + 1)
//   layer: dx = rstd * (g - sum(g) / d - xhat * sum(g xhat) / d)
template <class T, int V>
__device__ void norm_backward(const T* dy, const T* x, const float* weight, const float* mean,
                              const float* rstd, T* dx, i64 rows, i64 cols, int kind) {
    __shared__ float4 raw[NX_MAX_ROWS_PER_BLOCK * 32];
    i64 r = norm_row();
    bool active = r < rows;
    float mu = active && mean ? mean[r] : 0.0f;
    float rs = active ? rstd[r] : 0.0f;
    const T* xr = x + r * cols;
    const T* dr = dy + r * cols;
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);  // sum g, sum g xhat, sum x
    if (active)
        for (i64 i = (i64)threadIdx.x * V; i < cols; i += (i64)blockDim.x * V) {
            float v[V], d[V];
            load<T, V>(xr + i, v);
            load<T, V>(dr + i, d);
#pragma unroll
            for (int j = 0; j < V; ++j) {
                float g = weight ? d[j] * weight[i + j] : d[j];
                acc.x += g;
                acc.y = fmaf(g, (v[j] - mu) * rs, acc.y);
                acc.z += v[j];
            }
        }
    acc = row_reduce(acc, raw, Add());
    if (!active) return;
    float d = kind == 1 ? (float)(cols + 1) : (float)cols;
    float mean_g = kind == 2 ? acc.x / d : 0.0f;
    float proj = acc.y / d;
    T* out = dx + r * cols;
    for (i64 i = (i64)threadIdx.x * V; i < cols; i += (i64)blockDim.x * V) {
        float v[V], dd[V];
        load<T, V>(xr + i, v);
        load<T, V>(dr + i, dd);
#pragma unroll
        for (int j = 0; j < V; ++j) {
            float g = weight ? dd[j] * weight[i + j] : dd[j];
            float xhat = (v[j] - mu) * rs;
            // crms: the implicit entry -sum(x) adds sum(x) to x in the projection term.
            float along = kind == 1 ? (v[j] + acc.z) * rs : xhat;
            v[j] = rs * (g - mean_g - along * proj);
        }
        store<T, V>(out + i, v);
    }
}

// Partial column sums of dy * xhat (dweight) and dy (dbias) over a block of rows, deterministic:
// part[p * cols + c] for row block p; sum_parts adds them in a fixed order.
template <class T>
__device__ void norm_param_part(const T* dy, const T* x, const float* mean, const float* rstd, i64 rows,
                                i64 cols, i64 rows_per_part, float* part_w, float* part_b) {
    __shared__ float2 acc_s[8][33];
    i64 c = (i64)blockIdx.x * 32 + threadIdx.x;
    i64 r0 = (i64)blockIdx.y * rows_per_part;
    i64 r1 = min(rows, r0 + rows_per_part);
    float2 acc = make_float2(0.0f, 0.0f);
    if (c < cols)
        for (i64 r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
            float d = to_f32(dy[r * cols + c]);
            float xhat = (to_f32(x[r * cols + c]) - (mean ? mean[r] : 0.0f)) * rstd[r];
            acc.x = fmaf(d, xhat, acc.x);
            acc.y += d;
        }
    acc_s[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        for (int k = 1; k < blockDim.y; ++k) {
            acc.x += acc_s[k][threadIdx.x].x;
            acc.y += acc_s[k][threadIdx.x].y;
        }
        part_w[blockIdx.y * cols + c] = acc.x;
        if (part_b) part_b[blockIdx.y * cols + c] = acc.y;
    }
}

extern "C" __global__ void sum_parts(const float* part, int parts, i64 cols, float* out) {
    i64 c = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float s = 0.0f;
    for (int p = 0; p < parts; ++p) s += part[p * cols + c];
    out[c] = s;
}

#define NX_NORM(name, T, V)                                                                               \
    extern "C" __global__ void __launch_bounds__(512) norm_forward_##name##_v##V(                        \
        const T* x, const float* weight, const float* bias, T* y, float* mean, float* rstd, i64 rows,     \
        i64 cols, float eps, int kind) {                                                                  \
        norm_forward<T, V>(x, weight, bias, y, mean, rstd, rows, cols, eps, kind);                        \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(512) norm_backward_##name##_v##V(                       \
        const T* dy, const T* x, const float* weight, const float* mean, const float* rstd, T* dx,        \
        i64 rows, i64 cols, int kind) {                                                                   \
        norm_backward<T, V>(dy, x, weight, mean, rstd, dx, rows, cols, kind);                             \
    }

// Rows that fit in registers (at most P packs of V per thread, aligned): one read of memory, the
// centered second moment from the registers.
template <class T, int V, int P>
__device__ void norm_forward_cached(const T* x, const float* weight, const float* bias, T* y,
                                    float* mean_out, float* rstd_out, i64 rows, i64 cols, float eps,
                                    int kind) {
    __shared__ float4 raw[NX_MAX_ROWS_PER_BLOCK * 32];
    i64 r = norm_row();
    bool active = r < rows;
    const T* row = x + r * cols;
    float v[P][V];
    float sum = 0.0f, sq = 0.0f;
#pragma unroll
    for (int p = 0; p < P; ++p) {
        i64 i = ((i64)p * blockDim.x + threadIdx.x) * V;
        if (active && i < cols) {
            load<T, V>(row + i, v[p]);
#pragma unroll
            for (int j = 0; j < V; ++j) {
                sum += v[p][j];
                sq = fmaf(v[p][j], v[p][j], sq);
            }
        }
    }
    float2 s = row_reduce(make_float2(sum, sq), reinterpret_cast<float2*>(raw), Add());
    float mean = 0.0f, ms;
    if (kind == 2) {
        mean = s.x / (float)cols;
        float c = 0.0f;
#pragma unroll
        for (int p = 0; p < P; ++p) {
            i64 i = ((i64)p * blockDim.x + threadIdx.x) * V;
            if (active && i < cols) {
#pragma unroll
                for (int j = 0; j < V; ++j) {
                    float d = v[p][j] - mean;
                    c = fmaf(d, d, c);
                }
            }
        }
        ms = row_reduce(c, reinterpret_cast<float*>(raw), Add()) / (float)cols;
    } else {
        ms = kind == 1 ? (s.y + s.x * s.x) / (float)(cols + 1) : s.y / (float)cols;
    }
    float rstd = 1.0f / sqrtf(ms + eps);
    if (!active) return;
    if (threadIdx.x == 0) {
        if (mean_out) mean_out[r] = mean;
        if (rstd_out) rstd_out[r] = rstd;
    }
    if (y == nullptr) return;
    T* out = y + r * cols;
#pragma unroll
    for (int p = 0; p < P; ++p) {
        i64 i = ((i64)p * blockDim.x + threadIdx.x) * V;
        if (i < cols) {
#pragma unroll
            for (int j = 0; j < V; ++j) {
                float h = (v[p][j] - mean) * rstd;
                if (weight) h *= weight[i + j];
                if (bias) h += bias[i + j];
                v[p][j] = h;
            }
            store<T, V>(out + i, v[p]);
        }
    }
}

#define NX_NORM_CACHED(name, T, V, P)                                                                     \
    extern "C" __global__ void __launch_bounds__(512) norm_forward_cached_##name##_p##P(                  \
        const T* x, const float* weight, const float* bias, T* y, float* mean, float* rstd, i64 rows,     \
        i64 cols, float eps, int kind) {                                                                  \
        norm_forward_cached<T, V, P>(x, weight, bias, y, mean, rstd, rows, cols, eps, kind);              \
    }

#define NX_NORM_TYPE(name, T, V)                                                                          \
    NX_NORM(name, T, 1)                                                                                   \
    NX_NORM(name, T, V)                                                                                   \
    extern "C" __global__ void norm_param_part_##name(const T* dy, const T* x, const float* mean,          \
                                                      const float* rstd, i64 rows, i64 cols,              \
                                                      i64 rows_per_part, float* part_w, float* part_b) {  \
        norm_param_part<T>(dy, x, mean, rstd, rows, cols, rows_per_part, part_w, part_b);                 \
    }                                                                                                     \
    NX_NORM_CACHED(name, T, V, 1)                                                                         \
    NX_NORM_CACHED(name, T, V, 2)                                                                         \
    NX_NORM_CACHED(name, T, V, 4)                                                                         \
    NX_NORM_CACHED(name, T, V, 8)


NX_TYPES(NX_NORM_TYPE)
// 16 packs of 4 floats: 64 registers of row per thread, the most without spilling.
NX_NORM_CACHED(f32, float, 4, 16)

// softmax, log_softmax, logsumexp and the two backwards over rows. A row is read by one block (or
// one warp when short); very long rows with few of them are split in chunks over several blocks:
// a statistics kernel writes each chunk's partial result and the writing kernel combines the
// row's partials before its own chunk (the two-pass algorithm, split across blocks).

#define NX_MAX_ROWS_PER_BLOCK 8

template <class T, int V>
__device__ __forceinline__ float2 chunk_max_sum(const T* x, i64 cols, const RowSlot& s, float4* raw) {
    float2 st = make_float2(-NX_INF, 0.0f);
    if (s.active) {
        const T* row = x + s.row * cols;
#pragma unroll 2
        for (i64 i = s.begin + (i64)threadIdx.x * V; i < s.end; i += (i64)blockDim.x * V) {
            float v[V];
            load<T, V>(row + i, v);
            max_sum_add<V>(st, v);
        }
    }
    return row_reduce(st, reinterpret_cast<float2*>(raw), MaxSum());
}

// The row's (max, sum): computed here when the row is one chunk, else combined from `part`.
template <class T, int V>
__device__ __forceinline__ float2 row_max_sum(const T* x, i64 cols, int chunks, const RowSlot& s,
                                              const float2* part, float4* raw) {
    if (part == nullptr) return chunk_max_sum<T, V>(x, cols, s, raw);
    float2 st = make_float2(-NX_INF, 0.0f);
    if (s.active)
        for (int c = 0; c < chunks; ++c) st = MaxSum()(st, part[s.row * chunks + c]);
    return st;
}

template <class T, int V>
__device__ void max_sum_part(const T* x, i64 rows, i64 cols, i64 chunk, int chunks, float2* part) {
    __shared__ float4 raw[NX_MAX_ROWS_PER_BLOCK * 32];
    RowSlot s = row_slot(rows, cols, chunk, chunks);
    float2 st = chunk_max_sum<T, V>(x, cols, s, raw);
    if (s.active && threadIdx.x == 0) part[s.row * chunks + s.piece] = st;
}

// mode 0: softmax, 1: log_softmax. A row whose max is +-inf is all NaN, as on the CPU.
template <class T, int V>
__device__ void softmax_rows(const T* x, T* y, i64 rows, i64 cols, i64 chunk, int chunks,
                             const float2* part, int mode) {
    __shared__ float4 raw[NX_MAX_ROWS_PER_BLOCK * 32];
    RowSlot s = row_slot(rows, cols, chunk, chunks);
    float2 st = row_max_sum<T, V>(x, cols, chunks, s, part, raw);
    if (!s.active) return;
    float m = st.x;
    float nan = __int_as_float(0x7fc00000);
    float scale = isinf(m) ? nan : (mode == 0 ? 1.0f / st.y : logf(st.y));
    const T* xr = x + s.row * cols;
    T* yr = y + s.row * cols;
#pragma unroll 2
    for (i64 i = s.begin + (i64)threadIdx.x * V; i < s.end; i += (i64)blockDim.x * V) {
        float v[V];
        load<T, V>(xr + i, v);
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] = mode == 0 ? fast_exp(v[j] - m) * scale : (v[j] - m) - scale;
        store<T, V>(yr + i, v);
    }
}

// The row's lse into out and, where `sign` is not null, the sign of its sum of exponentials: 1, or
// 0 for an all -inf row (lse -inf), NaN for NaN (the CPU's logsumexp without b).
template <class T>
__device__ void logsumexp_rows(const float2* part, int chunks, i64 rows, T* out, T* sign) {
    i64 r = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    float2 st = make_float2(-NX_INF, 0.0f);
    for (int c = 0; c < chunks; ++c) st = MaxSum()(st, part[r * chunks + c]);
    float lse = st.x + logf(st.y);
    out[r] = from_f32<T>(lse);
    if (sign) sign[r] = from_f32<T>(lse != lse ? lse : lse == -NX_INF ? 0.0f : 1.0f);
}

// Backward. mode 0 (softmax): dx = y (dy - sum(dy y)); mode 1 (log_softmax): dx = dy - exp(y) sum(dy).
template <class T, int V>
__device__ __forceinline__ float chunk_dot(const T* y, const T* dy, i64 cols, const RowSlot& s, int mode,
                                           float4* raw) {
    float acc = 0.0f;
    if (s.active) {
        const T* yr = y + s.row * cols;
        const T* dr = dy + s.row * cols;
#pragma unroll 2
        for (i64 i = s.begin + (i64)threadIdx.x * V; i < s.end; i += (i64)blockDim.x * V) {
            float a[V], d[V];
            load<T, V>(dr + i, d);
            if (mode == 0) {
                load<T, V>(yr + i, a);
#pragma unroll
                for (int j = 0; j < V; ++j) acc = fmaf(a[j], d[j], acc);
            } else {
#pragma unroll
                for (int j = 0; j < V; ++j) acc += d[j];
            }
        }
    }
    return row_reduce(acc, reinterpret_cast<float*>(raw), Add());
}

template <class T, int V>
__device__ void dot_part(const T* y, const T* dy, i64 rows, i64 cols, i64 chunk, int chunks, int mode,
                         float* part) {
    __shared__ float4 raw[NX_MAX_ROWS_PER_BLOCK * 32];
    RowSlot s = row_slot(rows, cols, chunk, chunks);
    float acc = chunk_dot<T, V>(y, dy, cols, s, mode, raw);
    if (s.active && threadIdx.x == 0) part[s.row * chunks + s.piece] = acc;
}

template <class T, int V>
__device__ void softmax_backward_rows(const T* y, const T* dy, T* dx, i64 rows, i64 cols, i64 chunk,
                                      int chunks, const float* part, int mode) {
    __shared__ float4 raw[NX_MAX_ROWS_PER_BLOCK * 32];
    RowSlot s = row_slot(rows, cols, chunk, chunks);
    float dot;
    if (part == nullptr) {
        dot = chunk_dot<T, V>(y, dy, cols, s, mode, raw);
    } else {
        dot = 0.0f;
        if (s.active)
            for (int c = 0; c < chunks; ++c) dot += part[s.row * chunks + c];
    }
    if (!s.active) return;
    const T* yr = y + s.row * cols;
    const T* dr = dy + s.row * cols;
    T* xr = dx + s.row * cols;
#pragma unroll 2
    for (i64 i = s.begin + (i64)threadIdx.x * V; i < s.end; i += (i64)blockDim.x * V) {
        float a[V], d[V];
        load<T, V>(yr + i, a);
        load<T, V>(dr + i, d);
#pragma unroll
        for (int j = 0; j < V; ++j) a[j] = mode == 0 ? a[j] * (d[j] - dot) : d[j] - fast_exp(a[j]) * dot;
        store<T, V>(xr + i, a);
    }
}

#define NX_SOFTMAX(name, T, V)                                                                              \
    extern "C" __global__ void NX_ROW_BOUNDS max_sum_part_##name##_v##V(                                    \
        const T* x, i64 rows, i64 cols, i64 chunk, int chunks, float2* part) {                              \
        max_sum_part<T, V>(x, rows, cols, chunk, chunks, part);                                             \
    }                                                                                                       \
    extern "C" __global__ void NX_ROW_BOUNDS softmax_##name##_v##V(                                         \
        const T* x, T* y, i64 rows, i64 cols, i64 chunk, int chunks, const float2* part, int mode) {        \
        softmax_rows<T, V>(x, y, rows, cols, chunk, chunks, part, mode);                                    \
    }                                                                                                       \
    extern "C" __global__ void NX_ROW_BOUNDS dot_part_##name##_v##V(                                        \
        const T* y, const T* dy, i64 rows, i64 cols, i64 chunk, int chunks, int mode, float* part) {        \
        dot_part<T, V>(y, dy, rows, cols, chunk, chunks, mode, part);                                       \
    }                                                                                                       \
    extern "C" __global__ void NX_ROW_BOUNDS softmax_backward_##name##_v##V(                                \
        const T* y, const T* dy, T* dx, i64 rows, i64 cols, i64 chunk, int chunks, const float* part,       \
        int mode) {                                                                                         \
        softmax_backward_rows<T, V>(y, dy, dx, rows, cols, chunk, chunks, part, mode);                      \
    }

// Rows that fit in registers (at most P packs of V per thread, aligned): one read of memory.
// The max first, then exp once per element (kept), its sum, then the scale: special values come
// out as in softmax_rows (a +-inf max makes x - max NaN somewhere, so the whole row is NaN).
template <class T, int V, int P>
__device__ void softmax_cached_rows(const T* x, T* y, i64 rows, i64 cols, int mode) {
    __shared__ float4 raw[NX_MAX_ROWS_PER_BLOCK * 32];
    RowSlot s = row_slot(rows, cols, cols, 1);
    const T* xr = x + s.row * cols;
    float v[P][V];
    float m = -NX_INF;
#pragma unroll
    for (int p = 0; p < P; ++p) {
        i64 i = ((i64)p * blockDim.x + threadIdx.x) * V;
        if (s.active && i < cols) {
            load<T, V>(xr + i, v[p]);
#pragma unroll
            for (int j = 0; j < V; ++j) m = fmaxf(m, v[p][j]);
        }
    }
    m = row_reduce(m, reinterpret_cast<float*>(raw), Max());
    float sum = 0.0f;
#pragma unroll
    for (int p = 0; p < P; ++p) {
        i64 i = ((i64)p * blockDim.x + threadIdx.x) * V;
        if (s.active && i < cols) {
#pragma unroll
            for (int j = 0; j < V; ++j) {
                float e = fast_exp(v[p][j] - m);
                sum += e;
                if (mode == 0) v[p][j] = e;
                else v[p][j] -= m;
            }
        }
    }
    sum = row_reduce(sum, reinterpret_cast<float*>(raw), Add());
    if (!s.active) return;
    float scale = mode == 0 ? 1.0f / sum : logf(sum);
    T* yr = y + s.row * cols;
#pragma unroll
    for (int p = 0; p < P; ++p) {
        i64 i = ((i64)p * blockDim.x + threadIdx.x) * V;
        if (i < cols) {
#pragma unroll
            for (int j = 0; j < V; ++j) v[p][j] = mode == 0 ? v[p][j] * scale : v[p][j] - scale;
            store<T, V>(yr + i, v[p]);
        }
    }
}

// The backward of rows that fit in registers twice (y and dy: at most P packs of V each per
// thread, aligned): y and dy are read once, their dot product reduced, dx written from the
// registers. Each thread reads its elements before writing them, so dx may alias y or dy.
template <class T, int V, int P>
__device__ void softmax_backward_cached_rows(const T* y, const T* dy, T* dx, i64 rows, i64 cols, int mode) {
    __shared__ float4 raw[NX_MAX_ROWS_PER_BLOCK * 32];
    RowSlot s = row_slot(rows, cols, cols, 1);
    const T* yr = y + s.row * cols;
    const T* dr = dy + s.row * cols;
    float a[P][V], d[P][V];
    float acc = 0.0f;
#pragma unroll
    for (int p = 0; p < P; ++p) {
        i64 i = ((i64)p * blockDim.x + threadIdx.x) * V;
        if (s.active && i < cols) {
            load<T, V>(yr + i, a[p]);
            load<T, V>(dr + i, d[p]);
#pragma unroll
            for (int j = 0; j < V; ++j) acc = mode == 0 ? fmaf(a[p][j], d[p][j], acc) : acc + d[p][j];
        }
    }
    float dot = row_reduce(acc, reinterpret_cast<float*>(raw), Add());
    if (!s.active) return;
    T* xr = dx + s.row * cols;
#pragma unroll
    for (int p = 0; p < P; ++p) {
        i64 i = ((i64)p * blockDim.x + threadIdx.x) * V;
        if (i < cols) {
#pragma unroll
            for (int j = 0; j < V; ++j)
                a[p][j] = mode == 0 ? a[p][j] * (d[p][j] - dot) : d[p][j] - fast_exp(a[p][j]) * dot;
            store<T, V>(xr + i, a[p]);
        }
    }
}

#define NX_SOFTMAX_BACKWARD_CACHED(name, T, V, P)                                                           \
    extern "C" __global__ void NX_ROW_BOUNDS softmax_backward_cached_##name##_p##P(                         \
        const T* y, const T* dy, T* dx, i64 rows, i64 cols, int mode) {                                     \
        softmax_backward_cached_rows<T, V, P>(y, dy, dx, rows, cols, mode);                                 \
    }

#define NX_SOFTMAX_CACHED(name, T, V, P)                                                                    \
    extern "C" __global__ void NX_ROW_BOUNDS softmax_cached_##name##_p##P(                                  \
        const T* x, T* y, i64 rows, i64 cols, int mode) {                                                   \
        softmax_cached_rows<T, V, P>(x, y, rows, cols, mode);                                               \
    }

#define NX_SOFTMAX_TYPE(name, T, V)                                                                     \
    NX_SOFTMAX(name, T, 1)                                                                              \
    NX_SOFTMAX(name, T, V)                                                                              \
    extern "C" __global__ void logsumexp_##name(const float2* part, int chunks, i64 rows, T* out,       \
                                                T* sign) {                                              \
        logsumexp_rows<T>(part, chunks, rows, out, sign);                                               \
    }                                                                                                   \
    NX_SOFTMAX_CACHED(name, T, V, 1)                                                                    \
    NX_SOFTMAX_CACHED(name, T, V, 2)                                                                    \
    NX_SOFTMAX_CACHED(name, T, V, 4)                                                                    \
    NX_SOFTMAX_BACKWARD_CACHED(name, T, V, 1)                                                           \
    NX_SOFTMAX_BACKWARD_CACHED(name, T, V, 2)


NX_TYPES(NX_SOFTMAX_TYPE)
// 8 packs of 4 floats: 32 floats of row per thread, as 4 packs of 8 16-bit values (launch.rs's
// MAX_CACHED_FLOATS: more would not fit 64 registers); the backward holds two such rows.
NX_SOFTMAX_CACHED(f32, float, 4, 8)
NX_SOFTMAX_BACKWARD_CACHED(f32, float, 4, 4)

// StableMax and log-StableMax over rows (Prieto et al. 2025): s(x) = x + 1 for x >= 0,
// 1 / (1 - x) below, normalized. One block row per row (s needs no running max, so there is
// nothing to split into chunks): the sums, then the write. As on the CPU, log-StableMax keeps the
// sum of the elements below the max apart, so log y_max = -log1p(rest / s(max)) stays relatively
// accurate when one element dominates; a row with NaN or +inf, or only -inf, is all NaN.

#define NX_MAX_ROWS_PER_BLOCK 8

// NaN falls to the second branch and stays NaN.
__device__ __forceinline__ float stable_s(float v) { return v >= 0.0f ? v + 1.0f : 1.0f / (1.0f - v); }
__device__ __forceinline__ float log_stable_s(float v) { return copysignf(log1pf(fabsf(v)), v); }

// mode 0: stablemax, 1: log_stablemax.
template <class T, int V>
__device__ void stablemax_rows(const T* x, T* y, i64 rows, i64 cols, int mode) {
    __shared__ float4 raw[NX_MAX_ROWS_PER_BLOCK * 32];
    RowSlot s = row_slot(rows, cols, cols, 1);
    const T* xr = x + s.row * cols;
    float m = -NX_INF;
    if (mode == 1) {
        if (s.active)
#pragma unroll 2
            for (i64 i = (i64)threadIdx.x * V; i < cols; i += (i64)blockDim.x * V) {
                float v[V];
                load<T, V>(xr + i, v);
#pragma unroll
                for (int j = 0; j < V; ++j) m = fmaxf(m, v[j]);
            }
        m = row_reduce(m, reinterpret_cast<float*>(raw), Max());
    }
    float2 acc = make_float2(0.0f, 0.0f);  // (sum of s, sum of s below the max)
    if (s.active)
#pragma unroll 2
        for (i64 i = (i64)threadIdx.x * V; i < cols; i += (i64)blockDim.x * V) {
            float v[V];
            load<T, V>(xr + i, v);
#pragma unroll
            for (int j = 0; j < V; ++j) {
                float e = stable_s(v[j]);
                acc.x += e;
                if (v[j] < m) acc.y += e;
            }
        }
    acc = row_reduce(acc, reinterpret_cast<float2*>(raw), Add());
    if (!s.active) return;
    float nan = __int_as_float(0x7fc00000);
    bool ok = acc.x > 0.0f && acc.x < NX_INF;  // false for NaN too
    float total = ok ? acc.x : nan;
    float log_total = logf(total);
    float s_max = stable_s(m);
    float ties = fmaxf(rintf((acc.x - acc.y) / s_max), 1.0f);
    float top = 0.0f - log1pf((acc.y + (ties - 1.0f) * s_max) / s_max);  // +0 for a lone element
    T* yr = y + s.row * cols;
#pragma unroll 2
    for (i64 i = (i64)threadIdx.x * V; i < cols; i += (i64)blockDim.x * V) {
        float v[V];
        load<T, V>(xr + i, v);
#pragma unroll
        for (int j = 0; j < V; ++j) {
            if (mode == 0) v[j] = stable_s(v[j]) / total;  // a division: 1/total may be subnormal
            else v[j] = !ok ? nan : (v[j] == m ? top : log_stable_s(v[j]) - log_total);
        }
        store<T, V>(yr + i, v);
    }
}

#define NX_STABLEMAX(name, T, V)                                                                          \
    extern "C" __global__ void NX_ROW_BOUNDS stablemax_##name##_v##V(                                     \
        const T* x, T* y, i64 rows, i64 cols, int mode) {                                                 \
        stablemax_rows<T, V>(x, y, rows, cols, mode);                                                     \
    }

#define NX_STABLEMAX_TYPE(name, T, V) \
    NX_STABLEMAX(name, T, 1)          \
    NX_STABLEMAX(name, T, V)

NX_TYPES(NX_STABLEMAX_TYPE)

// Log-probabilities of class-index targets and the entropy of softmax(x / T), per row, and their
// gradient (normax-core's logprobs.rs holds the math). z = x * inv_t.
//
// Forward, one read of each row: per thread the running max m, s = sum exp(z - m), o = the same
// sum without the target, d = sum exp(z - m) (m - z) (every term >= 0) and z_y; then
//   lse = m + log s,  logprob = z_y - lse (or -log1p(o / e_y) where the target is within ln 2 of
//   the max: Softmax Collapse, see cross_entropy.cu),  entropy = log s + d / s.
// Backward, one read of each row, nothing reduced: from the saved float32 lse, logprob, entropy,
//   dx_c = inv_t [g_logp (onehot_c - p_c) - g_H p_c (z_c - lse + H)],
// the target's 1 - p_y as -expm1(logprob), relatively accurate where p_y rounds to 1. Either
// incoming gradient may be null (its terms skipped). Ignored rows: 0 outputs, 0 gradient.

#define NX_MAX_ROWS_PER_BLOCK 8

struct LpArgs {
    const i64* target;
    i64 ignore_index;
    float inv_t;
};

struct LpStats {
    float m, s, o, d, zy;
};

// d of a sum at max m moved to the max m2 >= m (each term e (m - z) becomes k e (m2 - z)).
__device__ __forceinline__ float lp_ent_rescale(float m, float s, float d, float m2) {
    if (m == m2) return d;
    float k = fast_exp(m - m2);
    return k == 0.0f ? 0.0f : k * (d + s * (m2 - m));
}

struct LpMerge {
    __device__ LpStats operator()(LpStats a, LpStats b) const {
        LpStats r;
        r.m = fmaxf(a.m, b.m);
        float ka = rescale(a.m, r.m), kb = rescale(b.m, r.m);
        r.s = a.s * ka + b.s * kb;
        r.o = a.o * ka + b.o * kb;
        r.d = lp_ent_rescale(a.m, a.s, a.d, r.m) + lp_ent_rescale(b.m, b.s, b.d, r.m);
        r.zy = a.zy + b.zy;  // one thread holds the target, the others 0
        return r;
    }
};
__device__ __forceinline__ LpStats shfl_xor(LpStats v, int o) {
    return {shfl_xor(v.m, o), shfl_xor(v.s, o), shfl_xor(v.o, o), shfl_xor(v.d, o), shfl_xor(v.zy, o)};
}

template <class T, int V>
__device__ void logprobs_forward_rows(const T* x, i64 rows, i64 cols, LpArgs a, float* logp, float* ent,
                                      float* lse) {
    __shared__ LpStats scratch[NX_MAX_ROWS_PER_BLOCK * 32];
    RowSlot sl = row_slot(rows, cols, cols, 1);
    i64 y = sl.active ? a.target[sl.row] : a.ignore_index;
    bool kept = y != a.ignore_index && y >= 0 && y < cols;
    LpStats st = {-NX_INF, 0.0f, 0.0f, 0.0f, 0.0f};
    if (sl.active && kept) {
        const T* row = x + sl.row * cols;
        for (i64 i = (i64)threadIdx.x * V; i < cols; i += (i64)blockDim.x * V) {
            float v[V];
            load<T, V>(row + i, v);
            float m = st.m;
#pragma unroll
            for (int j = 0; j < V; ++j) m = fmaxf(m, v[j] *= a.inv_t);
            float k = rescale(st.m, m);
            st.d = lp_ent_rescale(st.m, st.s, st.d, m);
            st.s *= k;
            st.o *= k;
            st.m = m;
#pragma unroll
            for (int j = 0; j < V; ++j) {
                float e = v[j] == m ? 1.0f : fast_exp(v[j] - m);
                st.s += e;
                if (i + j == y)
                    st.zy = v[j];
                else
                    st.o += e;
                if (e > 0.0f && v[j] != m) st.d = fmaf(e, m - v[j], st.d);  // e = 0: 0, also for -inf
            }
        }
    }
    st = row_reduce(st, scratch, LpMerge());
    if (!sl.active || threadIdx.x != 0) return;
    if (!kept) {
        // ignore_index: zeros. Out of range and not ignore_index: NaN (the host raises first).
        float fill = y == a.ignore_index ? 0.0f : __int_as_float(0x7fc00000);
        logp[sl.row] = fill, ent[sl.row] = fill, lse[sl.row] = fill;
        return;
    }
    float l = st.m + logf(st.s);
    float e_y = st.zy == st.m ? 1.0f : fast_exp(st.zy - st.m);
    bool near = e_y >= 0.5f && st.m < NX_INF;  // a +inf max keeps the NaN
    logp[sl.row] = near ? -log1pf(st.o / e_y) : st.zy - l;
    ent[sl.row] = logf(st.s) + st.d / st.s;
    lse[sl.row] = l;
}

template <class T, int V>
__device__ void logprobs_backward_rows(const T* x, i64 rows, i64 cols, i64 chunk, int chunks, LpArgs a,
                                       const float* lse, const float* logp, const float* ent, const T* g_logp,
                                       const T* g_ent, T* dx) {
    RowSlot sl = row_slot(rows, cols, chunk, chunks);
    if (!sl.active) return;
    i64 y = a.target[sl.row];
    bool kept = y != a.ignore_index && y >= 0 && y < cols;
    float gl = kept && g_logp ? to_f32(g_logp[sl.row]) * a.inv_t : 0.0f;
    float gh = kept && g_ent ? to_f32(g_ent[sl.row]) * a.inv_t : 0.0f;
    float l = kept ? lse[sl.row] : 0.0f;
    float lh = kept ? ent[sl.row] - l : 0.0f;  // z - lse + H = z + lh
    float q = kept ? -expm1f(logp[sl.row]) : 0.0f;  // 1 - p_y
    const T* row = x + sl.row * cols;
    T* drow = dx + sl.row * cols;
    for (i64 i = sl.begin + (i64)threadIdx.x * V; i < sl.end; i += (i64)blockDim.x * V) {
        float v[V];
        load<T, V>(row + i, v);
#pragma unroll
        for (int j = 0; j < V; ++j) {
            float z = v[j] * a.inv_t;
            float p = kept ? fast_exp(z - l) : 0.0f;
            float g = i + j == y ? gl * q : -gl * p;
            if (p > 0.0f) g -= gh * p * (z + lh);  // p = 0 adds 0 (z may be -inf)
            v[j] = g;
        }
        store<T, V>(drow + i, v);
    }
}

#define NX_LP(name, T, V)                                                                                 \
    extern "C" __global__ void __launch_bounds__(512) logprobs_forward_##name##_v##V(                    \
        const T* x, i64 rows, i64 cols, LpArgs a, float* logp, float* ent, float* lse) {                  \
        logprobs_forward_rows<T, V>(x, rows, cols, a, logp, ent, lse);                                    \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(512) logprobs_backward_##name##_v##V(                   \
        const T* x, i64 rows, i64 cols, i64 chunk, int chunks, LpArgs a, const float* lse,                \
        const float* logp, const float* ent, const T* g_logp, const T* g_ent, T* dx) {                    \
        logprobs_backward_rows<T, V>(x, rows, cols, chunk, chunks, a, lse, logp, ent, g_logp, g_ent, dx); \
    }

#define NX_LP_TYPE(name, T, V) NX_LP(name, T, 1) NX_LP(name, T, V)

NX_TYPES(NX_LP_TYPE)

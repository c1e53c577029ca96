// Cross-entropy loss and gradient over rows of logits, torch's definitions (see normax-core's
// cross_entropy.rs for the formulas). With lse the row's log-sum-exp of the (softcapped) logits:
//   loss = (1 - eps) * target_term + eps / C * (sum_c w_c * lse - sum_c w_c x_c) + z * lse^2
//   grad_c = (p_c * A - w_c * (b + ct * t_c)) * (1 - (x_c / cap)^2 with a softcap)
// where x is the logits times 1 / temperature (before the softcap; the gradient carries the 1 / T
// in its row scale), and a token weight multiplies the row's loss and scale.
// Pass 1 gathers per row (chunk): max and sum of exp, sum_c w_c x_c, and for probability targets
// sum_c w_c t_c and sum_c w_c t_c x_c; pass 2 finishes the loss and writes the gradient.
//
// Softmax Collapse: a hard target's lse - x_y is log1p(oth / e_y) and its 1 - p_y is
// oth / (e_y + oth), with oth the sum of the other classes' exp(x - max) (pass 1 adds it beside the
// sum, from the same exponentials) and e_y = exp(x_y - max): where p_y rounds to 1 (a margin above
// ~17) the loss and the target's gradient stay relatively accurate instead of becoming 0.

#define NX_MAX_ROWS_PER_BLOCK 8

struct CeArgs {
    const i64* target;   // class indices, or null for probability targets
    const void* probs;   // probability targets (the logits' dtype), or null
    const float* weight; // class weights, or null for ones
    i64 ignore_index;
    float eps, z, cap;  // cap 0: no softcap
    float inv_t;        // 1 / temperature
    const float* token_weight;  // per row, or null for ones
    // The *_stats kernels' per-row outputs (0 for ignored rows): the lse and the entropy of the
    // distribution used, and 1 where the first argmax of the logits as given is the target.
    float* stat_lse;
    float* stat_entropy;
    float* stat_correct;
};

// The row statistics of pass 1: the (max, sum) pair and sums that simply add: sum_c w_c x_c and
// sum_c w_c (smoothing), sum_c w_c t_c and sum_c w_c t_c x_c (probability targets).
// x_y, the hard target's (capped) logit, is gathered here too (zero elsewhere, so it adds): pass 2
// may be writing the gradient over the logits.
struct CeStats {
    float2 ms;
    float wx, w, wt, wtx, xy;
    float oth;  // sum of exp(x - ms.x) over the classes other than a hard target's
};
struct CeMerge {
    __device__ CeStats operator()(CeStats a, CeStats b) const {
        CeStats r;
        r.ms = MaxSum()(a.ms, b.ms);
        r.wx = a.wx + b.wx;
        r.w = a.w + b.w;
        r.wt = a.wt + b.wt;
        r.wtx = a.wtx + b.wtx;
        r.xy = a.xy + b.xy;
        r.oth = a.oth * rescale(a.ms.x, r.ms.x) + b.oth * rescale(b.ms.x, r.ms.x);
        return r;
    }
};
__device__ __forceinline__ CeStats shfl_xor(CeStats v, int o) {
    CeStats r;
    r.ms = shfl_xor(v.ms, o);
    r.wx = shfl_xor(v.wx, o);
    r.w = shfl_xor(v.w, o);
    r.wt = shfl_xor(v.wt, o);
    r.wtx = shfl_xor(v.wtx, o);
    r.xy = shfl_xor(v.xy, o);
    r.oth = shfl_xor(v.oth, o);
    return r;
}

__device__ __forceinline__ float capped(float x, float cap) { return cap > 0.0f ? cap * tanhf(x / cap) : x; }
// The logit the loss sees: tempered, then capped.
__device__ __forceinline__ float ce_z(float x, const CeArgs& a) { return capped(x * a.inv_t, a.cap); }

// The statistics of return_stats, gathered beside CeStats by the *_stats kernels only: their own
// (max, sum) pair m, s and d = sum_c e_c (m - z_c) with e_c = exp(z_c - m), so the entropy
// sum_c p_c (lse - z_c) = log s + d / s adds only terms >= 0; the first maximum of the raw logits
// (xm at xi) and, for probability targets, of the target row (tm at ti). Class indices are int
// here (the host refuses stats past 2^31 - 1 classes): 2 registers fewer, no spill at 64.
struct CeExtra {
    float m, s, d, xm, tm;
    int xi, ti;
};
// Whether (a at ia) comes before (b at ib) as np.argmax picks: the first NaN, else the largest,
// ties to the lower index.
__device__ __forceinline__ bool ce_first_max(float a, int ia, float b, int ib) {
    bool an = a != a, bn = b != b;
    if (an || bn) return an && (!bn || ia < ib);
    return a > b || (a == b && ia < ib);
}
// d of a sum at max m (s the sum) moved to the max m2 >= m: each term e (m - z) becomes
// k e (m2 - z), k = exp(m - m2).
__device__ __forceinline__ float ce_ent_rescale(float m, float s, float d, float m2) {
    if (m == m2) return d;
    float k = fast_exp(m - m2);
    return k == 0.0f ? 0.0f : k * (d + s * (m2 - m));
}
struct CeExtraMerge {
    __device__ CeExtra operator()(CeExtra a, CeExtra b) const {
        CeExtra r;
        r.m = fmaxf(a.m, b.m);
        r.s = a.s * rescale(a.m, r.m) + b.s * rescale(b.m, r.m);
        r.d = ce_ent_rescale(a.m, a.s, a.d, r.m) + ce_ent_rescale(b.m, b.s, b.d, r.m);
        bool ax = ce_first_max(a.xm, a.xi, b.xm, b.xi), at = ce_first_max(a.tm, a.ti, b.tm, b.ti);
        r.xm = ax ? a.xm : b.xm;
        r.xi = ax ? a.xi : b.xi;
        r.tm = at ? a.tm : b.tm;
        r.ti = at ? a.ti : b.ti;
        return r;
    }
};
__device__ __forceinline__ int shfl_xor(int v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
__device__ __forceinline__ CeExtra shfl_xor(CeExtra v, int o) {
    return {shfl_xor(v.m, o),  shfl_xor(v.s, o),  shfl_xor(v.d, o), shfl_xor(v.xm, o),
            shfl_xor(v.tm, o), shfl_xor(v.xi, o), shfl_xor(v.ti, o)};
}
__device__ __forceinline__ CeExtra ce_extra_empty() {
    return {-NX_INF, 0.0f, 0.0f, -NX_INF, -NX_INF, 0x7fffffff, 0x7fffffff};
}
// Folds a pack of target probabilities into their first argmax (tm at ti); i the index of t[0].
template <int V>
__device__ __forceinline__ void ce_target_argmax(CeExtra& e, const float (&t)[V], int i) {
#pragma unroll
    for (int j = 0; j < V; ++j)
        if (ce_first_max(t[j], i + j, e.tm, e.ti)) e.tm = t[j], e.ti = i + j;
}

// Class weights at [i, i + V) (ones for null): float4 loads where V > 1, beside the logits' 16-byte
// packs (the host then saw the weights aligned as the rows are).
template <int V>
__device__ __forceinline__ void ce_weights(const float* w, i64 i, float (&out)[V]) {
    if (w == nullptr) {
#pragma unroll
        for (int j = 0; j < V; ++j) out[j] = 1.0f;
        return;
    }
    if constexpr (V == 1) {
        out[0] = w[i];
    } else {
#pragma unroll
        for (int k = 0; k < V; k += 4) {
            float4 f = *reinterpret_cast<const float4*>(w + i + k);
            out[k] = f.x, out[k + 1] = f.y, out[k + 2] = f.z, out[k + 3] = f.w;
        }
    }
}

// max_sum_add that also keeps `oth`, the sum without element y (i the index of v[0]), and with
// ENT the entropy sum d = sum e (m - v) (CeExtra): the same exponentials, one more add each.
template <int V, bool ENT = false>
__device__ __forceinline__ void max_sum_oth_add(float2& st, float& oth, const float (&v)[V], i64 i, i64 y,
                                                float& d) {
    float m = st.x;
#pragma unroll
    for (int j = 0; j < V; ++j) m = fmaxf(m, v[j]);
    float k = rescale(st.x, m);
    if constexpr (ENT) d = ce_ent_rescale(st.x, st.y, d, m);
    float s = st.y * k, o = oth * k;
#pragma unroll
    for (int j = 0; j < V; ++j) {
        float e = v[j] == m ? 1.0f : fast_exp(v[j] - m);
        s += e;
        if (i + j != y) o += e;
        if (ENT && e > 0.0f && v[j] != m) d = fmaf(e, m - v[j], d);  // e = 0: 0, also for v = -inf
    }
    st = make_float2(m, s);
    oth = o;
}

// The column index type of the statistics pass: int for the stats kernels (whole rows below 2^31
// classes: a register pair fewer, which keeps their 16-bit forms within 64 registers), else i64.
template <bool NARROW> struct CeCol { typedef i64 type; };
template <> struct CeCol<true> { typedef int type; };

template <class T, int V, bool STATS = false>
__device__ __forceinline__ CeStats ce_chunk_stats(const T* x, i64 cols, const CeArgs& a, const RowSlot& s,
                                                  CeStats* scratch, CeExtra& ex) {
    CeStats st = {make_float2(-NX_INF, 0.0f), 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    bool smooth = a.eps > 0.0f;
    if (s.active) {
        const T* row = x + s.row * cols;
        const T* prow = a.probs ? static_cast<const T*>(a.probs) + s.row * cols : nullptr;
        typedef typename CeCol<STATS>::type Col;
        Col y = a.target ? (Col)a.target[s.row] : -1;
        if (STATS && a.target && (y < 0 || y != a.target[s.row])) y = -1;  // outside int: no class here
        for (Col i = (Col)s.begin + (Col)threadIdx.x * V; i < (Col)s.end; i += (Col)blockDim.x * V) {
            float v[V];
            load<T, V>(row + i, v);
#pragma unroll
            for (int j = 0; j < V; ++j) {
                if (STATS && ce_first_max(v[j], (int)i + j, ex.xm, ex.xi)) ex.xm = v[j], ex.xi = (int)i + j;
                v[j] = ce_z(v[j], a);
            }
            // The entropy sum rides on the (max, sum) fold (the same exponentials); CeExtra's m and
            // s are the row's ms, copied in before the merge.
            max_sum_oth_add<V, STATS>(st.ms, st.oth, v, i, y, ex.d);
#pragma unroll
            for (int j = 0; j < V; ++j)
                if (i + j == y) st.xy = v[j];
            if (smooth || prow) {
                float t[V], w[V];
                if (prow) load<T, V>(prow + i, t);
                if (STATS && prow) ce_target_argmax<V>(ex, t, (int)i);
                ce_weights<V>(a.weight, i, w);
#pragma unroll
                for (int j = 0; j < V; ++j) {
                    if (smooth) {
                        st.wx = fmaf(w[j], v[j], st.wx);
                        st.w += w[j];
                    }
                    if (prow) {
                        st.wt = fmaf(w[j], t[j], st.wt);
                        st.wtx = fmaf(w[j] * t[j], v[j], st.wtx);
                    }
                }
            }
        }
    }
    if constexpr (STATS) {
        __shared__ CeExtra ex_scratch[NX_MAX_ROWS_PER_BLOCK * 32];
        ex.m = st.ms.x, ex.s = st.ms.y;
        ex = row_reduce(ex, ex_scratch, CeExtraMerge());
    }
    return row_reduce(st, scratch, CeMerge());
}

template <class T, int V>
__device__ void ce_part(const T* x, i64 rows, i64 cols, i64 chunk, int chunks, CeArgs a, CeStats* part) {
    __shared__ CeStats scratch[NX_MAX_ROWS_PER_BLOCK * 32];
    RowSlot s = row_slot(rows, cols, chunk, chunks);
    CeExtra unused;
    CeStats st = ce_chunk_stats<T, V>(x, cols, a, s, scratch, unused);
    if (s.active && threadIdx.x == 0) part[s.row * chunks + s.piece] = st;
}

// What a row's loss and gradient need besides its statistics.
struct CeRow {
    i64 y;         // the class index, -1 for probability targets
    bool ignored;  // ignore_index, or out of range (never read)
    bool bad;      // out of range and not ignore_index: a NaN loss and gradient, as jnp's fill
    float lse, x_y, w_y;
    float d, q;    // a hard target's lse - x_y and 1 - p_y, relatively accurate (see the top)
};

__device__ __forceinline__ CeRow ce_row(const CeArgs& a, const CeStats& st, i64 row, i64 cols) {
    CeRow r;
    r.y = a.target ? a.target[row] : -1;
    r.bad = a.target && r.y != a.ignore_index && (r.y < 0 || r.y >= cols);
    r.ignored = a.target && (r.y == a.ignore_index || r.bad);
    r.lse = st.ms.x + logf(st.ms.y);
    bool hard = a.target && !r.ignored;
    r.x_y = hard ? st.xy : 0.0f;
    r.w_y = hard ? (a.weight ? a.weight[r.y] : 1.0f) : 0.0f;
    // Beside a max within ln 2 of the target the log1p forms; else lse - x_y > ln 2 and
    // p_y < 1/2 carry no cancellation.
    float e_y = r.x_y == st.ms.x ? 1.0f : fast_exp(r.x_y - st.ms.x);
    bool near = hard && e_y >= 0.5f && st.ms.x < NX_INF;  // a +inf max keeps the NaN loss
    r.d = near ? log1pf(st.oth / e_y) : r.lse - r.x_y;
    r.q = near ? st.oth / (e_y + st.oth) : 1.0f - fast_exp(r.x_y - r.lse);
    return r;
}

__device__ __forceinline__ float ce_loss(const CeArgs& a, const CeStats& st, const CeRow& r, i64 cols) {
    if (r.ignored) return r.bad ? __int_as_float(0x7fc00000) : 0.0f;
    float target_term = a.target ? r.w_y * r.d : st.wt * r.lse - st.wtx;
    float loss = (1.0f - a.eps) * target_term;
    if (a.eps > 0.0f) loss += a.eps / (float)cols * (st.w * r.lse - st.wx);
    if (a.z > 0.0f) loss += a.z * r.lse * r.lse;
    return loss;
}

// grad_c = (p_c * A - w_c * (B + Ct * t_c)) * cap'(x_c), the row's scale folded into A, B, Ct.
// A hard target's own entry is (R - A * (1 - p_y)) * cap'(x_y): R = A - w_y (B + Ct), formed
// without the cancelling w_y Ct terms.
struct CeCoef {
    float a, b, t, res;
};

__device__ __forceinline__ CeCoef ce_coef(const CeArgs& a, const CeStats& st, const CeRow& r, float scale,
                                          i64 cols) {
    float sc = r.ignored ? 0.0f : scale;
    float c_over = a.eps / (float)cols;
    float coef_a = (1.0f - a.eps) * (a.target ? r.w_y : st.wt);
    if (a.eps > 0.0f) coef_a += c_over * st.w;
    float zl = a.z > 0.0f ? 2.0f * a.z * r.lse : 0.0f;
    coef_a += zl;
    float res = (a.eps > 0.0f ? c_over * (st.w - r.w_y) : 0.0f) + zl;
    return {coef_a * sc, sc * c_over, sc * (1.0f - a.eps), sc * res};
}

// The gradient of one class from its capped logit xc, target probability tc and weight w; `is_y`
// for a hard target's own class.
__device__ __forceinline__ float ce_grad(const CeArgs& a, const CeRow& r, const CeCoef& k, float xc, float tc,
                                         float w, bool is_y) {
    if (r.ignored) return r.bad ? __int_as_float(0x7fc00000) : 0.0f;
    float g = is_y ? k.res - k.a * r.q : fast_exp(xc - r.lse) * k.a - w * (k.b + k.t * tc);
    if (a.cap > 0.0f) {
        float u = xc / a.cap;
        g *= 1.0f - u * u;
    }
    return g;
}

// Pass 2. Writes loss_rows[row] (from the first chunk's block) and, when grad is not null, the
// gradient of this chunk scaled by gscale[row * gscale_stride]. Ignored rows: loss 0, gradient 0.
// A row's stats outputs (the *_stats kernels), from its row and its extra statistics.
__device__ __forceinline__ void ce_write_stats(const CeArgs& a, const CeRow& r, const CeExtra& e, i64 row) {
    bool kept = !r.ignored;  // probability targets: every row
    a.stat_lse[row] = kept ? r.lse : 0.0f;
    a.stat_entropy[row] = kept ? logf(e.s) + e.d / e.s : 0.0f;
    a.stat_correct[row] = kept && e.xi == (r.y >= 0 ? r.y : (i64)e.ti) ? 1.0f : 0.0f;
}

// The row's loss times its token weight (ignored rows keep their 0 or NaN).
__device__ __forceinline__ float ce_token_weight(const CeArgs& a, i64 row) {
    return a.token_weight ? a.token_weight[row] : 1.0f;
}

// Pass 2 (STATS: also the stats outputs; whole rows only, part is null).
template <class T, int V, bool STATS = false>
__device__ void ce_rows(const T* x, i64 rows, i64 cols, i64 chunk, int chunks, CeArgs a, const CeStats* part,
                        float* loss_rows, T* grad, const float* gscale, i64 gscale_stride) {
    __shared__ CeStats scratch[NX_MAX_ROWS_PER_BLOCK * 32];
    RowSlot s = row_slot(rows, cols, chunk, chunks);
    CeStats st;
    CeExtra ex = ce_extra_empty();
    if (part == nullptr) {
        st = ce_chunk_stats<T, V, STATS>(x, cols, a, s, scratch, ex);
    } else {
        st = {make_float2(-NX_INF, 0.0f), 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        if (s.active)
            for (int c = 0; c < chunks; ++c) st = CeMerge()(st, part[s.row * chunks + c]);
    }
    if (!s.active) return;
    CeRow r = ce_row(a, st, s.row, cols);
    float tw = r.ignored ? 1.0f : ce_token_weight(a, s.row);
    if (s.piece == 0 && threadIdx.x == 0) {
        loss_rows[s.row] = ce_loss(a, st, r, cols) * tw;
        if constexpr (STATS) ce_write_stats(a, r, ex, s.row);
    }
    if (grad == nullptr) return;
    CeCoef k = ce_coef(a, st, r, r.ignored ? 0.0f : gscale[s.row * gscale_stride] * tw * a.inv_t, cols);
    const T* row = x + s.row * cols;
    T* grow = grad + s.row * cols;
    const T* prow = a.probs ? static_cast<const T*>(a.probs) + s.row * cols : nullptr;
    // A class's own weight enters its gradient only through smoothing or a probability target.
    const float* weight = a.eps > 0.0f || prow ? a.weight : nullptr;
    for (i64 i = s.begin + (i64)threadIdx.x * V; i < s.end; i += (i64)blockDim.x * V) {
        float v[V], t[V], w[V];
        load<T, V>(row + i, v);
        if (prow) load<T, V>(prow + i, t);
        ce_weights<V>(weight, i, w);
#pragma unroll
        for (int j = 0; j < V; ++j) {
            bool is_y = i + j == r.y;
            float tc = prow ? t[j] : (is_y ? 1.0f : 0.0f);
            v[j] = ce_grad(a, r, k, ce_z(v[j], a), tc, w[j], is_y);
        }
        store<T, V>(grow + i, v);
    }
}

// Class-index targets whose rows fit in registers (at most P packs of V per thread, aligned; the
// host keeps P * V <= 16, room for a pack of weights beside them within 64 registers): one read
// of the logits. The max first, then one exp per element for the sum; the gradient
// from the registers.
template <class T, int V, int P, bool STATS = false>
__device__ void ce_cached_rows(const T* x, i64 rows, i64 cols, CeArgs a, float* loss_rows, T* grad,
                               const float* gscale, i64 gscale_stride) {
    __shared__ CeStats scratch[NX_MAX_ROWS_PER_BLOCK * 32];
    RowSlot s = row_slot(rows, cols, cols, 1);
    const T* row = x + s.row * cols;
    i64 y = s.active ? a.target[s.row] : -1;
    bool smooth = a.eps > 0.0f;
    float v[P][V];
    float m = -NX_INF;
    CeExtra ex = ce_extra_empty();
#pragma unroll
    for (int p = 0; p < P; ++p) {
        i64 i = ((i64)p * blockDim.x + threadIdx.x) * V;
        if (s.active && i < cols) {
            load<T, V>(row + i, v[p]);
#pragma unroll
            for (int j = 0; j < V; ++j) {
                // The raw logits' first argmax as they are read (in index order per thread).
                if (STATS && ce_first_max(v[p][j], (int)i + j, ex.xm, ex.xi)) ex.xm = v[p][j], ex.xi = (int)i + j;
                v[p][j] = ce_z(v[p][j], a);
                m = fmaxf(m, v[p][j]);
            }
        }
    }
    m = row_reduce(m, reinterpret_cast<float*>(scratch), Max());
    if constexpr (STATS) ex.m = m;  // every thread sums at the row's max: the merges add
    // Every thread of the row holds the same max, so the (max, sum) pairs merge by adding.
    CeStats st = {make_float2(m, 0.0f), 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int p = 0; p < P; ++p) {
        i64 i = ((i64)p * blockDim.x + threadIdx.x) * V;
        if (s.active && i < cols) {
            float w[V];
            if (smooth) ce_weights<V>(a.weight, i, w);
#pragma unroll
            for (int j = 0; j < V; ++j) {
                float e = fast_exp(v[p][j] - m);
                st.ms.y += e;
                if (i + j != y) st.oth += e;
                if constexpr (STATS) {
                    ex.s += e;
                    if (e > 0.0f && v[p][j] != m) ex.d = fmaf(e, m - v[p][j], ex.d);
                }
                if (smooth) {
                    st.wx = fmaf(w[j], v[p][j], st.wx);
                    st.w += w[j];
                }
                if (i + j == y) st.xy = v[p][j];
            }
        }
    }
    st = row_reduce(st, scratch, CeMerge());
    if constexpr (STATS) {
        __shared__ CeExtra ex_scratch[NX_MAX_ROWS_PER_BLOCK * 32];
        ex = row_reduce(ex, ex_scratch, CeExtraMerge());
    }
    if (!s.active) return;
    CeRow r = ce_row(a, st, s.row, cols);
    float tw = r.ignored ? 1.0f : ce_token_weight(a, s.row);
    if (threadIdx.x == 0) {
        loss_rows[s.row] = ce_loss(a, st, r, cols) * tw;
        if constexpr (STATS) ce_write_stats(a, r, ex, s.row);
    }
    if (grad == nullptr) return;
    CeCoef k = ce_coef(a, st, r, r.ignored ? 0.0f : gscale[s.row * gscale_stride] * tw * a.inv_t, cols);
    T* grow = grad + s.row * cols;
    // A class's own weight enters its gradient only through smoothing.
    const float* weight = smooth ? a.weight : nullptr;
#pragma unroll
    for (int p = 0; p < P; ++p) {
        i64 i = ((i64)p * blockDim.x + threadIdx.x) * V;
        if (i < cols) {
            float w[V];
            ce_weights<V>(weight, i, w);
#pragma unroll
            for (int j = 0; j < V; ++j)
                v[p][j] = ce_grad(a, r, k, v[p][j], i + j == r.y ? 1.0f : 0.0f, w[j], i + j == r.y);
            store<T, V>(grow + i, v[p]);
        }
    }
}

#define NX_CE_CACHED(name, T, V, P)                                                                       \
    extern "C" __global__ void NX_ROW_BOUNDS ce_cached_##name##_p##P(                                     \
        const T* x, i64 rows, i64 cols, CeArgs a, float* loss_rows, T* grad, const float* gscale,        \
        i64 gscale_stride) {                                                                              \
        ce_cached_rows<T, V, P>(x, rows, cols, a, loss_rows, grad, gscale, gscale_stride);                \
    }

// The stats variant holds half the row of the plain one (at most 8 floats per thread) beside its
// extra statistics: 16 spilled past 64 registers.
#define NX_CE_CACHED_STATS(name, T, V, P)                                                                 \
    extern "C" __global__ void NX_ROW_BOUNDS ce_cached_stats_##name##_p##P(                               \
        const T* x, i64 rows, i64 cols, CeArgs a, float* loss_rows, T* grad, const float* gscale,        \
        i64 gscale_stride) {                                                                              \
        ce_cached_rows<T, V, P, true>(x, rows, cols, a, loss_rows, grad, gscale, gscale_stride);          \
    }

#define NX_CE(name, T, V)                                                                                 \
    extern "C" __global__ void __launch_bounds__(512) ce_part_##name##_v##V(                             \
        const T* x, i64 rows, i64 cols, i64 chunk, int chunks, CeArgs a, CeStats* part) {                 \
        ce_part<T, V>(x, rows, cols, chunk, chunks, a, part);                                             \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(512) cross_entropy_##name##_v##V(                       \
        const T* x, i64 rows, i64 cols, i64 chunk, int chunks, CeArgs a, const CeStats* part,             \
        float* loss_rows, T* grad, const float* gscale, i64 gscale_stride) {                              \
        ce_rows<T, V>(x, rows, cols, chunk, chunks, a, part, loss_rows, grad, gscale, gscale_stride);     \
    }                                                                                                     \
    extern "C" __global__ void NX_ROW_BOUNDS cross_entropy_stats_##name##_v##V(                          \
        const T* x, i64 rows, i64 cols, i64 chunk, int chunks, CeArgs a, const CeStats* part,             \
        float* loss_rows, T* grad, const float* gscale, i64 gscale_stride) {                              \
        ce_rows<T, V, true>(x, rows, cols, chunk, chunks, a, part, loss_rows, grad, gscale, gscale_stride); \
    }

// The packs the host asks for: at most 16 floats of row per thread.
#define NX_CE_TYPE(name, T, V)                                                                            \
    NX_CE(name, T, 1)                                                                                     \
    NX_CE(name, T, V)                                                                                     \
    NX_CE_CACHED(name, T, V, 1)                                                                           \
    NX_CE_CACHED(name, T, V, 2)                                                                           \
    NX_CE_CACHED_STATS(name, T, V, 1)

NX_TYPES(NX_CE_TYPE)
NX_CE_CACHED(f32, float, 4, 4)
NX_CE_CACHED_STATS(f32, float, 4, 2)

// ---------------------------------------------------------------------------------------------
// Vocabulary-parallel cross-entropy (normax-core's cross_entropy/vocab_parallel.rs holds the format
// and the math):
// a rank holds classes [start, start + cols) of every row. The statistics kernel packs per row
// `fields` floats (3, or 5 with label smoothing): the shard's log-sum-exp as hi + lo (TwoSum of
// max and log of the scaled sum: exact, combinable in any order), the capped target logit if the
// target lives here (else 0), and the smoothing sum sum_c w_c (lse_k - x_c) as hi + lo. The host
// gathers every rank's rows and combines them (normax-core's vocab_parallel_combine); the backward
// kernel writes the shard's gradient from each row's global log-sum-exp with no communication.

struct VocabParallelArgs {
    const i64* target;    // global class ids
    const float* weight;  // the whole vocabulary's class weights (indexed by global class), or null
    i64 ignore_index;
    i64 start;            // the shard's first class
    i64 classes;          // the whole vocabulary (backward only; 0 in the statistics kernel)
    float eps, z, cap;    // cap 0: no softcap
    float w_sum;          // sum of the whole vocabulary's weights (backward only)
};

// A shard row's running statistics: the max, the sum of exp(x - max) split into the count of
// elements equal to the max (`ones`, exact) and the rest (so log1p keeps a dominant max's
// log-sum-exp relatively accurate), the capped target logit, and for label smoothing W = sum w_c
// and D = sum w_c (max - x_c), every term >= 0 (no cancellation; D grows by W * dmax as the max
// rises).
struct ShardStats {
    float m, ones, rest, w, d, xy;
};

__device__ __forceinline__ void shard_rescale(ShardStats& s, float m) {
    if (s.m == m) return;
    // A max below the new one: its ties become ordinary terms (exp(-inf) = 0 for an empty state).
    float k = fast_exp(s.m - m);
    s.rest = (s.rest + s.ones) * k;
    s.ones = 0.0f;
    // +inf where the old max was -inf: those classes' terms w_c (max - x_c) are infinite.
    if (s.w > 0.0f) s.d += s.w * (m - s.m);
    s.m = m;
}

struct ShardMerge {
    __device__ ShardStats operator()(ShardStats a, ShardStats b) const {
        float m = fmaxf(a.m, b.m);
        shard_rescale(a, m);
        shard_rescale(b, m);
        return {m, a.ones + b.ones, a.rest + b.rest, a.w + b.w, a.d + b.d, a.xy + b.xy};
    }
};
__device__ __forceinline__ ShardStats shfl_xor(ShardStats v, int o) {
    return {shfl_xor(v.m, o), shfl_xor(v.ones, o), shfl_xor(v.rest, o),
            shfl_xor(v.w, o), shfl_xor(v.d, o),    shfl_xor(v.xy, o)};
}

// hi + lo = a + b exactly, hi the float nearest (Knuth's TwoSum).
__device__ __forceinline__ float2 two_sum(float a, float b) {
    float s = a + b;
    float bb = s - a;
    float err = (a - (s - bb)) + (b - bb);
    return make_float2(s, err);
}

template <class T, int V>
__device__ void vocab_parallel_stats_rows(const T* x, i64 rows, i64 cols, VocabParallelArgs a,
                                          float* packed) {
    __shared__ ShardStats scratch[NX_MAX_ROWS_PER_BLOCK * 32];
    RowSlot s = row_slot(rows, cols, cols, 1);
    ShardStats st = {-NX_INF, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    bool smooth = a.eps > 0.0f;
    i64 y = s.active ? a.target[s.row] : a.ignore_index;
    bool ignored = y == a.ignore_index;
    i64 local = y - a.start;  // the target's column here, if in [0, cols)
    if (s.active && !ignored) {
        const T* row = x + s.row * cols;
        for (i64 i = s.begin + (i64)threadIdx.x * V; i < s.end; i += (i64)blockDim.x * V) {
            float v[V];
            load<T, V>(row + i, v);
            float m = st.m;
#pragma unroll
            for (int j = 0; j < V; ++j) {
                v[j] = capped(v[j], a.cap);
                m = fmaxf(m, v[j]);
            }
            shard_rescale(st, m);
            float ws[V];
            if (smooth) ce_weights<V>(a.weight ? a.weight + a.start : nullptr, i, ws);
#pragma unroll
            for (int j = 0; j < V; ++j) {
                if (i + j == local) st.xy = v[j];
                float w = smooth ? ws[j] : 0.0f;
                if (v[j] == -NX_INF) {
                    // exp adds nothing; its smoothing term w (lse - x) is +inf, NaN for w = 0, as
                    // on the CPU, whatever the running max (a tie with a max of -inf included).
                    if (smooth) st.d += w * NX_INF;
                    continue;
                }
                if (v[j] == m)
                    st.ones += 1.0f;
                else
                    st.rest += fast_exp(v[j] - m);  // NaN for a NaN element: the row's result
                if (smooth) {
                    if (v[j] != m) st.d = fmaf(w, m - v[j], st.d);
                    st.w += w;
                }
            }
        }
    }
    st = row_reduce(st, scratch, ShardMerge());
    if (!s.active || threadIdx.x != 0) return;
    int fields = smooth ? 5 : 3;
    float* out = packed + s.row * fields;
    for (int f = 0; f < fields; ++f) out[f] = 0.0f;
    if (ignored) return;
    out[2] = st.xy;
    if (st.rest != st.rest || st.m == NX_INF) {  // NaN or +inf somewhere: a NaN row
        out[0] = __int_as_float(0x7fc00000);
        return;
    }
    if (st.m == -NX_INF) {  // every class -inf, or none here: adds nothing to the sum
        out[0] = -NX_INF;
        if (smooth && cols > 0) out[3] = NX_INF;
        return;
    }
    // lse_k - max, >= 0: log(ones) + log1p(rest / ones).
    float rel = logf(st.ones) + log1pf(st.rest / st.ones);
    float2 l = two_sum(st.m, rel);
    out[0] = l.x;
    out[1] = l.y;
    if (smooth) {
        float2 sm = two_sum(st.w * rel, st.d);  // sum_c w_c (lse_k - x_c) = W (lse_k - max) + D
        if (!(sm.x - sm.x == 0.0f)) sm.y = 0.0f;  // lo 0 where hi is not finite, as the CPU's split
        out[3] = sm.x;
        out[4] = sm.y;
    }
}

// The shard's gradient: grad_c = (p_c * A - w_c * B) * cap'(x_c) with p_c = exp(x_c - lse) of the
// row's global lse (hi, lo: `lse[2 row]`, `lse[2 row + 1]`), and at a target living here
// A * expm1(-(lse - x_y)) + B (W - w_y) + Z (the cancelling terms left out, as the CPU's
// target_grad). Rows may be split across blocks (no reduction here).
template <class T, int V>
__device__ void vocab_parallel_backward_rows(const T* x, i64 rows, i64 cols, i64 chunk, int chunks,
                                             VocabParallelArgs a, const float* lse, T* grad,
                                             const float* gscale, i64 gscale_stride) {
    RowSlot s = row_slot(rows, cols, chunk, chunks);
    if (!s.active) return;
    i64 y = a.target[s.row];
    // Out of range never reaches here (the host combine raised IndexError); treated as ignored so
    // memory safety does not depend on it.
    bool ignored = y == a.ignore_index || y < 0 || y >= a.classes;
    float hi = lse[2 * s.row], lo = lse[2 * s.row + 1];
    float l = hi + lo;
    T* grow = grad + s.row * cols;
    const T* row = x + s.row * cols;
    if (ignored || !(l - l == 0.0f)) {  // ignored: 0; a non-finite lse: NaN, as the CPU
        float fill = ignored ? 0.0f : __int_as_float(0x7fc00000);
        for (i64 i = s.begin + (i64)threadIdx.x * V; i < s.end; i += (i64)blockDim.x * V) {
            float v[V];
#pragma unroll
            for (int j = 0; j < V; ++j) v[j] = fill;
            store<T, V>(grow + i, v);
        }
        return;
    }
    float sc = gscale[s.row * gscale_stride];
    float w_y = a.weight ? a.weight[y] : 1.0f;
    float c_over = a.eps / (float)a.classes;
    float zl = a.z > 0.0f ? 2.0f * a.z * l : 0.0f;
    float coef_a = (1.0f - a.eps) * w_y + zl;
    if (a.eps > 0.0f) coef_a += c_over * a.w_sum;
    coef_a *= sc;
    float coef_b = sc * c_over;
    float res = (a.eps > 0.0f ? coef_b * (a.w_sum - w_y) : 0.0f) + sc * zl;
    i64 local = y - a.start;
    // A class's own weight enters its gradient only through smoothing (coef_b is 0 without).
    const float* weight = a.eps > 0.0f && a.weight ? a.weight + a.start : nullptr;
    for (i64 i = s.begin + (i64)threadIdx.x * V; i < s.end; i += (i64)blockDim.x * V) {
        float v[V], ws[V];
        load<T, V>(row + i, v);
        ce_weights<V>(weight, i, ws);
#pragma unroll
        for (int j = 0; j < V; ++j) {
            float xc = capped(v[j], a.cap);
            float w = ws[j];
            float g = i + j == local ? coef_a * expm1f(-((hi - xc) + lo)) + res
                                     : fast_exp((xc - hi) - lo) * coef_a - w * coef_b;
            if (a.cap > 0.0f) {
                float u = xc / a.cap;
                g *= 1.0f - u * u;
            }
            v[j] = g;
        }
        store<T, V>(grow + i, v);
    }
}

#define NX_VOCAB_PARALLEL(name, T, V)                                                                     \
    extern "C" __global__ void __launch_bounds__(512) ce_vocab_parallel_stats_##name##_v##V(              \
        const T* x, i64 rows, i64 cols, VocabParallelArgs a, float* packed) {                             \
        vocab_parallel_stats_rows<T, V>(x, rows, cols, a, packed);                                        \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(512) ce_vocab_parallel_backward_##name##_v##V(           \
        const T* x, i64 rows, i64 cols, i64 chunk, int chunks, VocabParallelArgs a, const float* lse,     \
        T* grad, const float* gscale, i64 gscale_stride) {                                                \
        vocab_parallel_backward_rows<T, V>(x, rows, cols, chunk, chunks, a, lse, grad, gscale,            \
                                           gscale_stride);                                                \
    }

#define NX_VOCAB_PARALLEL_TYPE(name, T, V) NX_VOCAB_PARALLEL(name, T, 1) NX_VOCAB_PARALLEL(name, T, V)

NX_TYPES(NX_VOCAB_PARALLEL_TYPE)

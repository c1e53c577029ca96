// Class-index targets in two kernels (the entries cross_entropy_forward / _backward of
// cross_entropy_classes.rs), compiled in the cross_entropy module after cross_entropy.cu (CeArgs,
// NX_MAX_ROWS_PER_BLOCK). The forward reads each row once: it checks the class id on the device,
// writes the row's float32 lse (saved for the backward) and either the per-row loss ("none") or
// its block's partial sums, which the last block to finish adds in block order into the loss and
// the mean's denominator (deterministic: the grid depends on the shape only). The backward
// streams each row once from the saved lse, writing the gradient (over the logits when asked).
//
// Layout: blockDim.x threads per row, ~16 values each (CE_VALUES: the row's length decides the
// threads, whatever the dtype), blockDim.y rows per block. Each thread reads a tile of
// CE_VALUES / V packs of V values (16 bytes; 4 scalar loads where V = 1), all its loads issued
// before any is used. Rows longer than 16 * 1024 keep one row per block of 1024 threads and loop
// over tiles: a row is never split across blocks, so the forward needs no second pass and the
// backward's collapse-safe target entry (below) only its own block's sum; with 32 rows of 128256
// that is 32 blocks of 1024 threads (64 KiB of float32 loads in flight per SM, 32 KiB of 16-bit
// ones). Columns are int: the host refuses rows within one tile of 2^31 classes.
//
// Statistics: per thread the running max m, o = sum of exp(x - m) over the classes other than
// the target, and x_y (the capped target logit, 0 elsewhere: it adds); with label smoothing also
// sum w_c x_c and W = sum w_c. lse = m + log(o + e_y), e_y = exp(x_y - m); where the target is
// within ln 2 of the max, lse - x_y = log1p(o / e_y) (Softmax Collapse: see cross_entropy.cu).
// Without smoothing a class weight needs no per-element work (w_y is read once per row).
//
// Gradient: with A = s ((1 - eps) w_y + eps W / C + 2 z lse), b = s eps / C and s the row's
// grad_loss (divided by the saved denominator for "mean"):
//   grad_c = (p_c A - w_c b) * cap'(x_c), p_c = exp(x_c - lse);
//   grad_y = (s (eps (W - w_y) / C + 2 z lse) - A (1 - p_y)) * cap'(x_y),
// where 1 - p_y is -expm1(x_y - lse), or, once p_y > 1/2, the row's sum of the other p_c (added
// up by the same pass and reduced per row; the target's owner rewrites its entry afterwards):
// the float32 lse cannot carry 1 - p_y once p_y rounds to 1.

#define CE_VALUES 16

// V values of T as one access: a uint4 of raw bits for V > 1 (LDG.E.128 / STG.E.128), else T.
template <class T, int V> struct CeRaw { uint4 u; };
template <class T> struct CeRaw<T, 1> { T u; };

template <class T, int V>
__device__ __forceinline__ CeRaw<T, V> ce_fetch(const T* p) {
    if constexpr (V == 1) {
        return {*p};
    } else {
        return {*reinterpret_cast<const uint4*>(p)};
    }
}

template <class T, int V>
__device__ __forceinline__ void ce_unpack(const CeRaw<T, V>& r, float (&v)[V]) {
    if constexpr (V == 1) {
        v[0] = to_f32(r.u);
    } else {
        unsigned w[4] = {r.u.x, r.u.y, r.u.z, r.u.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            if constexpr (sizeof(T) == 4) {
                v[k] = __uint_as_float(w[k]);
            } else {
                float2 f = unpack2(T{}, w[k]);  // common.cuh
                v[2 * k] = f.x;
                v[2 * k + 1] = f.y;
            }
        }
    }
}

// One thread's tile: CE_VALUES / V packs; pack p of tile t of thread x starts at column
// ((t * P + p) * blockDim.x + x) * V (each pack load of a warp covers 32 consecutive packs).
template <class T, int V>
struct CeTile {
    // 16-byte packs: ~16 values per thread; scalar loads (the unaligned fallback): 4, not to spill.
    static constexpr int P = V == 1 ? 4 : CE_VALUES / V;
    CeRaw<T, V> raw[P];

    __device__ __forceinline__ static int at(int t, int p) {
        return ((t * P + p) * (int)blockDim.x + (int)threadIdx.x) * V;
    }
    __device__ __forceinline__ void fetch(const T* row, int cols, int t) {
#pragma unroll
        for (int p = 0; p < P; ++p)
            if (at(t, p) < cols) raw[p] = ce_fetch<T, V>(row + at(t, p));
    }
    // Tiles per thread of a row of `cols` (the last one may be partly outside the row).
    __device__ __forceinline__ static int tiles(int cols) {
        int per_tile = P * V * (int)blockDim.x;
        return (cols + per_tile - 1) / per_tile;
    }
};


template <bool SMOOTH> struct CeAcc;
template <> struct CeAcc<false> {
    float m, o, xy;
};
template <> struct CeAcc<true> {
    float m, o, xy, wx, w;
};

template <bool SMOOTH>
__device__ __forceinline__ CeAcc<SMOOTH> ce_acc_merge(CeAcc<SMOOTH> a, const CeAcc<SMOOTH>& b) {
    float m = fmaxf(a.m, b.m);
    a.o = a.o * rescale(a.m, m) + b.o * rescale(b.m, m);
    a.m = m;
    a.xy += b.xy;
    if constexpr (SMOOTH) {
        a.wx += b.wx;
        a.w += b.w;
    }
    return a;
}
struct CeAccMerge {
    template <bool S>
    __device__ CeAcc<S> operator()(CeAcc<S> a, CeAcc<S> b) const {
        return ce_acc_merge<S>(a, b);
    }
};
__device__ __forceinline__ CeAcc<false> shfl_xor(CeAcc<false> v, int o) {
    return {shfl_xor(v.m, o), shfl_xor(v.o, o), shfl_xor(v.xy, o)};
}
__device__ __forceinline__ CeAcc<true> shfl_xor(CeAcc<true> v, int o) {
    return {shfl_xor(v.m, o), shfl_xor(v.o, o), shfl_xor(v.xy, o), shfl_xor(v.wx, o), shfl_xor(v.w, o)};
}

// The softcap cap * tanh(x / cap), with 1 / cap computed once per kernel (cap > 0).
__device__ __forceinline__ float ce_capped(float x, float cap, float inv_cap) {
    return cap * tanhf(x * inv_cap);
}

// Folds one tile (values capped, packs outside the row skipped) into the thread's statistics;
// `y` the target's column (-1 for an ignored row): its value is kept apart, not summed.
template <class T, int V, bool SMOOTH>
__device__ __forceinline__ void ce_fold(CeAcc<SMOOTH>& acc, const CeTile<T, V>& tile, int t, int cols, int y,
                                        const CeArgs& a, float inv_cap) {
    constexpr int P = CeTile<T, V>::P;
    float v[P][V];
#pragma unroll
    for (int p = 0; p < P; ++p)
        if (CeTile<T, V>::at(t, p) < cols) ce_unpack<T, V>(tile.raw[p], v[p]);
    if (a.cap > 0.0f) {  // the same for every thread: one branch per tile
#pragma unroll
        for (int p = 0; p < P; ++p)
#pragma unroll
            for (int j = 0; j < V; ++j) v[p][j] = ce_capped(v[p][j], a.cap, inv_cap);
    }
    float m = acc.m;
#pragma unroll
    for (int p = 0; p < P; ++p)
        if (CeTile<T, V>::at(t, p) < cols)
#pragma unroll
            for (int j = 0; j < V; ++j) m = fmaxf(m, v[p][j]);
    acc.o *= rescale(acc.m, m);
    acc.m = m;
#pragma unroll
    for (int p = 0; p < P; ++p) {
        int i = CeTile<T, V>::at(t, p);
        if (i < cols) {
            int dy = y - i;  // the target's place in this pack, if in [0, V)
            float w[V];
            if constexpr (SMOOTH) ce_weights<V>(a.weight, i, w);
#pragma unroll
            for (int j = 0; j < V; ++j) {
                float e = v[p][j] == m ? 1.0f : fast_exp(v[p][j] - m);
                if (dy == j)
                    acc.xy = v[p][j];
                else
                    acc.o += e;
                if constexpr (SMOOTH) {
                    acc.wx = fmaf(w[j], v[p][j], acc.wx);
                    acc.w += w[j];
                }
            }
        }
    }
}

// Sums (a, b) over the whole block in a fixed order (warp trees, then the warps in order);
// thread 0 gets the result.
__device__ __forceinline__ float2 ce_block_sum(float2 v, float2* scratch) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = Add()(v, shfl_xor(v, o));
    int tid = threadIdx.y * blockDim.x + threadIdx.x, warps = (blockDim.x * blockDim.y + 31) >> 5;
    __syncthreads();
    if ((tid & 31) == 0) scratch[tid >> 5] = v;
    __syncthreads();
    if (tid == 0)
        for (int w = 1; w < warps; ++w) v = Add()(v, scratch[w]);
    return v;
}

// A bad class id stops the kernel as torch's device assertions do: a message, then a trap
// (the stream fails with an illegal instruction; nothing is read back on the host).
__device__ __noinline__ void ce_bad_class(i64 y, i64 row, int cols, i64 ignore_index) {
    printf("normax cross_entropy: target class index %lld at row %lld is out of range [0, %d) and is "
           "not ignore_index (%lld)\n",
           y, row, cols, ignore_index);
    __trap();
}

enum CeReduction { CE_NONE = 0, CE_MEAN = 1, CE_SUM = 2 };

template <class T, int V, bool SMOOTH>
__device__ void ce_forward_rows(const T* x, i64 rows, int cols, CeArgs a, int reduction, T* loss, float* lse,
                                float* ws) {
    __shared__ CeAcc<SMOOTH> scratch[NX_MAX_ROWS_PER_BLOCK * 32];
    __shared__ float2 part[32];
    __shared__ bool last;
    i64 row = (i64)blockIdx.x * blockDim.y + threadIdx.y;
    bool active = row < rows;
    i64 y = active ? a.target[row] : a.ignore_index;
    bool kept = active && y != a.ignore_index;
    if (kept && (y < 0 || y >= cols) && threadIdx.x == 0) ce_bad_class(y, row, cols, a.ignore_index);
    CeAcc<SMOOTH> acc;
    acc.m = -NX_INF;
    acc.o = 0.0f;
    acc.xy = 0.0f;
    if constexpr (SMOOTH) acc.wx = acc.w = 0.0f;
    if (active) {
        const T* xr = x + row * cols;
        int yk = kept ? (int)y : -1;  // an ignored row's lse sums every class
        int tiles = CeTile<T, V>::tiles(cols);
        float inv_cap = a.cap > 0.0f ? 1.0f / a.cap : 0.0f;
        for (int t = 0; t < tiles; ++t) {
            CeTile<T, V> tile;
            tile.fetch(xr, cols, t);
            ce_fold<T, V, SMOOTH>(acc, tile, t, cols, yk, a, inv_cap);
        }
    }
    acc = row_reduce(acc, scratch, CeAccMerge());
    float row_loss = 0.0f, row_weight = 0.0f;
    if (active && threadIdx.x == 0) {
        float e_y = kept ? (acc.xy == acc.m ? 1.0f : fast_exp(acc.xy - acc.m)) : 0.0f;
        float l = acc.m + logf(acc.o + e_y);
        lse[row] = l;
        if (kept) {
            // Beside a max within ln 2 of the target the log1p form; else lse - x_y > ln 2.
            bool near = e_y >= 0.5f && acc.m < NX_INF;  // a +inf max keeps the NaN loss
            float d = near ? log1pf(acc.o / e_y) : l - acc.xy;
            row_weight = a.weight ? a.weight[y] : 1.0f;
            row_loss = (1.0f - a.eps) * row_weight * d;
            if constexpr (SMOOTH) row_loss += a.eps / (float)cols * (acc.w * l - acc.wx);
            if (a.z > 0.0f) row_loss += a.z * l * l;
        }
        if (reduction == CE_NONE) loss[row] = from_f32<T>(row_loss);
    }
    if (reduction == CE_NONE) return;
    // The block's partial sums (rows in order), then the last block to finish adds them all.
    float2 mine = ce_block_sum(make_float2(row_loss, row_weight), part);
    unsigned* counter = reinterpret_cast<unsigned*>(ws + 2 * rows + 1);
    if (threadIdx.x == 0 && threadIdx.y == 0) {
        if (rows > 0) {  // no rows: one block, nothing to store
            ws[blockIdx.x] = mine.x;
            ws[rows + blockIdx.x] = mine.y;
        }
        __threadfence();  // the partials visible before the count says so
        last = atomicAdd(counter, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    const volatile float* parts = ws;  // written by other blocks: not through this SM's L1
    int tid = threadIdx.y * blockDim.x + threadIdx.x, nt = blockDim.x * blockDim.y;
    int blocks = rows > 0 ? (int)gridDim.x : 0;
    float2 sum = make_float2(0.0f, 0.0f);
    for (int b = tid; b < blocks; b += nt) {
        sum.x += parts[b];
        sum.y += parts[rows + b];
    }
    sum = ce_block_sum(sum, part);
    if (tid == 0) {
        ws[2 * rows] = sum.y;  // the mean's denominator, for the backward
        loss[0] = from_f32<T>(reduction == CE_MEAN ? sum.x / sum.y : sum.x);
    }
}

// The gradient of one class c != y from its capped logit and weight.
template <bool SMOOTH>
__device__ __forceinline__ float ce_other_grad(float xc, float w, float l, float coef_a, float coef_b,
                                               float& others) {
    float e = fast_exp(xc - l);
    others += e;
    float g = e * coef_a;
    if constexpr (SMOOTH) g -= w * coef_b;
    return g;
}

template <class T, int V, bool SMOOTH>
__device__ void ce_backward_rows(const T* x, i64 rows, int cols, CeArgs a, const float* lse, const float* denom,
                                 const T* grad_loss, i64 grad_stride, T* dx) {
    __shared__ float scratch[NX_MAX_ROWS_PER_BLOCK * 32];
    constexpr int P = CeTile<T, V>::P;
    // The weights' sum, once per block (rows are a grid-stride loop for this).
    float w_sum = (float)cols;
    if (SMOOTH && a.weight) {
        float s = 0.0f;
        for (int i = threadIdx.x * V; i < cols; i += blockDim.x * V) {
            float w[V];
            ce_weights<V>(a.weight, i, w);
#pragma unroll
            for (int j = 0; j < V; ++j) s += w[j];
        }
        w_sum = row_reduce(s, scratch, Add());
    }
    float c_over = a.eps / (float)cols;
    float inv_cap = a.cap > 0.0f ? 1.0f / a.cap : 0.0f;
    i64 groups = (rows + blockDim.y - 1) / blockDim.y;
    for (i64 g = blockIdx.x; g < groups; g += gridDim.x) {
        i64 row = g * blockDim.y + threadIdx.y;
        bool active = row < rows;
        i64 y = active ? a.target[row] : -1;
        // Out of range never gets here (the forward traps); treated as ignored all the same.
        bool ignored = !active || y == a.ignore_index || y < 0 || y >= cols;
        const T* xr = x + row * cols;
        T* dr = dx + row * cols;
        int tiles = active ? CeTile<T, V>::tiles(cols) : 0;
        float others = 0.0f;  // this thread's sum of p_c over c != y
        float own_x = 0.0f, own_a = 0.0f, own_res = 0.0f;
        bool own = false;  // this thread holds the target
        if (ignored) {
            float zero[V];
#pragma unroll
            for (int j = 0; j < V; ++j) zero[j] = 0.0f;
            for (int t = 0; t < tiles; ++t)
#pragma unroll
                for (int p = 0; p < P; ++p)
                    if (CeTile<T, V>::at(t, p) < cols) store<T, V>(dr + CeTile<T, V>::at(t, p), zero);
        } else {
            float l = lse[row];
            float s = to_f32(grad_loss[row * grad_stride]);
            if (denom) s /= *denom;
            float w_y = a.weight ? a.weight[y] : 1.0f;
            float zl = a.z > 0.0f ? 2.0f * a.z * l : 0.0f;
            float coef_a = (1.0f - a.eps) * w_y + zl;
            float res = zl;
            if constexpr (SMOOTH) {
                coef_a += c_over * w_sum;
                res += c_over * (w_sum - w_y);
            }
            own_a = coef_a *= s;
            own_res = res *= s;
            float coef_b = s * c_over;
            for (int t = 0; t < tiles; ++t) {
                CeTile<T, V> tile;
                tile.fetch(xr, cols, t);
#pragma unroll
                for (int p = 0; p < P; ++p) {
                    int i = CeTile<T, V>::at(t, p);
                    if (i >= cols) continue;
                    float v[V], w[V];
                    ce_unpack<T, V>(tile.raw[p], v);
                    if constexpr (SMOOTH) ce_weights<V>(a.weight, i, w);
                    if (a.cap > 0.0f) {
#pragma unroll
                        for (int j = 0; j < V; ++j) v[j] = ce_capped(v[j], a.cap, inv_cap);
                    }
                    int dy = (int)y - i;
#pragma unroll
                    for (int j = 0; j < V; ++j) {
                        float xc = v[j];
                        float g;
                        if (dy == j) {
                            own = true;
                            own_x = xc;
                            g = res + coef_a * expm1f(xc - l);  // 1 - p_y = -expm1(x_y - lse)
                        } else {
                            g = ce_other_grad<SMOOTH>(xc, SMOOTH ? w[j] : 1.0f, l, coef_a, coef_b, others);
                        }
                        if (a.cap > 0.0f) {
                            float u = xc * inv_cap;
                            g *= 1.0f - u * u;
                        }
                        v[j] = g;
                    }
                    store<T, V>(dr + i, v);
                }
            }
            // p_y > 1/2: 1 - p_y is the other classes' probability (rewritten below).
            own = own && own_x - l >= -NX_LN2 && l < NX_INF;
        }
        others = row_reduce(others, scratch, Add());
        if (own) {
            float g = own_res - own_a * others;
            if (a.cap > 0.0f) {
                float u = own_x * inv_cap;
                g *= 1.0f - u * u;
            }
            dr[y] = from_f32<T>(g);
        }
    }
}

#define NX_CE_TWO(name, T, V, S, suffix)                                                                  \
    extern "C" __global__ void __launch_bounds__(1024) ce_forward##suffix##_##name##_v##V(                \
        const T* x, i64 rows, int cols, CeArgs a, int reduction, T* loss, float* lse, float* ws) {        \
        ce_forward_rows<T, V, S>(x, rows, cols, a, reduction, loss, lse, ws);                             \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(1024) ce_backward##suffix##_##name##_v##V(               \
        const T* x, i64 rows, int cols, CeArgs a, const float* lse, const float* denom,                   \
        const T* grad_loss, i64 grad_stride, T* dx) {                                                     \
        ce_backward_rows<T, V, S>(x, rows, cols, a, lse, denom, grad_loss, grad_stride, dx);              \
    }

#define NX_CE_TWO_TYPE(name, T, V)                                                                        \
    NX_CE_TWO(name, T, 1, false, )                                                                        \
    NX_CE_TWO(name, T, V, false, )                                                                        \
    NX_CE_TWO(name, T, 1, true, _smooth)                                                                  \
    NX_CE_TWO(name, T, V, true, _smooth)

NX_TYPES(NX_CE_TWO_TYPE)

// int32 class ids (JAX's integers without x64) widened to the int64 ids the kernels read.
extern "C" __global__ void widen_ids(const int* ids, i64 n, i64* out) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = ids[i];
}

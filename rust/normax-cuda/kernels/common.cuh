// Shared by every normax CUDA module. Compiled by NVRTC with no system headers, so the 16-bit
// types are plain bit containers converted with PTX instructions (cuda_fp16.h is not needed).
// Every kernel reads and writes rows of `cols` contiguous elements; accumulation is float32.

typedef long long i64;
struct f16 { unsigned short bits; };
struct bf16 { unsigned short bits; };

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(f16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}
__device__ __forceinline__ float to_f32(bf16 v) { return __uint_as_float(((unsigned)v.bits) << 16); }

template <class T> __device__ __forceinline__ T from_f32(float f);
template <> __device__ __forceinline__ float from_f32<float>(float f) { return f; }
template <> __device__ __forceinline__ f16 from_f32<f16>(float f) {
    f16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
    return h;
}
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float f) {
    bf16 h;
#if __CUDA_ARCH__ >= 800
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
#else
    // No bf16 conversion instruction before Ampere: round to nearest even on the bits, NaN kept.
    unsigned u = __float_as_uint(f);
    h.bits = (u & 0x7fffffffu) > 0x7f800000u ? (unsigned short)((u >> 16) | 0x40u)
                                             : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
    return h;
}

#define NX_LOG2E 1.4426950408889634f
#define NX_LN2 0.6931471805599453f
#define NX_INF __int_as_float(0x7f800000)

// exp through the SFU: 2^(x log2 e). Callers pass differences (x - max), never raw logits, so the
// product's rounding stays small where the result is not.
__device__ __forceinline__ float fast_exp(float d) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d * NX_LOG2E));
    return r;
}

// V elements loaded or stored at once: 16 bytes when the host saw aligned rows, else 1.
template <class T, int V> struct alignas(sizeof(T) * V) Pack { T v[V]; };

template <class T, int V>
__device__ __forceinline__ void load(const T* p, float (&out)[V]) {
    Pack<T, V> k = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = to_f32(k.v[j]);
}

template <class T, int V>
__device__ __forceinline__ void store(T* p, const float (&in)[V]) {
    Pack<T, V> k;
#pragma unroll
    for (int j = 0; j < V; ++j) k.v[j] = from_f32<T>(in[j]);
    *reinterpret_cast<Pack<T, V>*>(p) = k;
}

// The thread layout of every row kernel: blockDim.x threads share a row (a warp or the whole
// block), blockDim.y rows per block; a row may be split in `chunks` pieces, one block each.
struct RowSlot {
    i64 row;
    int piece;       // which of the row's chunks
    i64 begin, end;  // this block's element range of the row
    bool active;
};

__device__ __forceinline__ RowSlot row_slot(i64 rows, i64 cols, i64 chunk, int chunks) {
    RowSlot s;
    i64 group = blockIdx.x / chunks;
    s.piece = blockIdx.x % chunks;
    s.row = group * blockDim.y + threadIdx.y;
    s.begin = s.piece * chunk;
    s.end = min(cols, s.begin + chunk);
    s.active = s.row < rows;
    return s;
}

__device__ __forceinline__ float shfl_xor(float v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
__device__ __forceinline__ float2 shfl_xor(float2 v, int o) {
    return make_float2(__shfl_xor_sync(0xffffffffu, v.x, o), __shfl_xor_sync(0xffffffffu, v.y, o));
}
__device__ __forceinline__ float4 shfl_xor(float4 v, int o) {
    return make_float4(__shfl_xor_sync(0xffffffffu, v.x, o), __shfl_xor_sync(0xffffffffu, v.y, o),
                       __shfl_xor_sync(0xffffffffu, v.z, o), __shfl_xor_sync(0xffffffffu, v.w, o));
}

// Reductions across the blockDim.x threads of one row. Shared scratch: 32 slots per row.
template <class Op, class S>
__device__ __forceinline__ S row_reduce(S v, S* scratch, Op op) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = op(v, shfl_xor(v, o));
    if (blockDim.x <= 32) return v;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    S* mine = scratch + threadIdx.y * 32;
    __syncthreads();  // the scratch may still be read from a previous reduction
    if (lane == 0) mine[warp] = v;
    __syncthreads();
    v = mine[0];
    for (int w = 1; w < warps; ++w) v = op(v, mine[w]);
    return v;
}

struct Max {
    __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct Add {
    __device__ float operator()(float a, float b) const { return a + b; }
    __device__ float2 operator()(float2 a, float2 b) const { return make_float2(a.x + b.x, a.y + b.y); }
    __device__ float4 operator()(float4 a, float4 b) const {
        return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
    }
};

// (max, sum of exp(x - max)) pairs: the online softmax statistics (Milakov & Gimelshein).
// Equal maxima (both +-inf included) scale by exactly 1, so inf - inf never appears here; a NaN
// input makes the sum NaN and stays.
__device__ __forceinline__ float rescale(float m_old, float m_new) {
    return m_old == m_new ? 1.0f : fast_exp(m_old - m_new);
}
struct MaxSum {
    __device__ float2 operator()(float2 a, float2 b) const {
        float m = fmaxf(a.x, b.x);
        return make_float2(m, a.y * rescale(a.x, m) + b.y * rescale(b.x, m));
    }
};
// Folds V values into the running (max, sum): one rescale per pack, not per element.
template <int V>
__device__ __forceinline__ void max_sum_add(float2& st, const float (&v)[V]) {
    float m = st.x;
#pragma unroll
    for (int j = 0; j < V; ++j) m = fmaxf(m, v[j]);
    float s = st.y * rescale(st.x, m);
#pragma unroll
    for (int j = 0; j < V; ++j) s += v[j] == m ? 1.0f : fast_exp(v[j] - m);
    st = make_float2(m, s);
}

// Kernel names are `<op>_<dtype>_v<V>`: each template below is instantiated for every dtype, with
// V = 1 (any alignment) and V = 16 bytes' worth.
#define NX_TYPES(M) M(f32, float, 4) M(f16, f16, 8) M(bf16, bf16, 8)

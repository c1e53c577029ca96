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

// Two 16-bit values in one 32-bit word, element 0 in the low half (its lower address).
// Packing converts both at once (`cvt.rn.{f16,bf16}x2.f32` takes the high half first); before
// Ampere there is no packed form, so each half is converted alone.
__device__ __forceinline__ float2 unpack2(f16, unsigned w) {
    float lo, hi;
    asm("{.reg .b16 l, h;\n\tmov.b32 {l, h}, %2;\n\tcvt.f32.f16 %0, l;\n\tcvt.f32.f16 %1, h;}"
        : "=f"(lo), "=f"(hi)
        : "r"(w));
    return make_float2(lo, hi);
}
__device__ __forceinline__ float2 unpack2(bf16, unsigned w) {
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}
__device__ __forceinline__ unsigned pack2(f16, float lo, float hi) {
    unsigned w;
#if __CUDA_ARCH__ >= 800
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(hi), "f"(lo));
#else
    w = (unsigned)from_f32<f16>(lo).bits | ((unsigned)from_f32<f16>(hi).bits << 16);
#endif
    return w;
}
__device__ __forceinline__ unsigned pack2(bf16, float lo, float hi) {
    unsigned w;
#if __CUDA_ARCH__ >= 800
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(hi), "f"(lo));
#else
    w = (unsigned)from_f32<bf16>(lo).bits | ((unsigned)from_f32<bf16>(hi).bits << 16);
#endif
    return w;
}

// N 32-bit words moved in the widest accesses their alignment allows: 16 bytes (LDG/STG.E.128)
// when N is a multiple of 4 (p is then 16-byte aligned), else 8 or 4. The stores are spelled in
// PTX (st.global: p must be global memory, as every row buffer is; not shared memory): NVVM
// splits a uint4 assignment into 4-byte stores.
template <int N> __device__ __forceinline__ void load_words(const void* p, unsigned (&w)[N]) {
    if constexpr (N % 4 == 0) {
#pragma unroll
        for (int c = 0; c < N; c += 4) {
            uint4 u = reinterpret_cast<const uint4*>(p)[c / 4];
            w[c] = u.x, w[c + 1] = u.y, w[c + 2] = u.z, w[c + 3] = u.w;
        }
    } else if constexpr (N % 2 == 0) {
#pragma unroll
        for (int c = 0; c < N; c += 2) {
            uint2 u = reinterpret_cast<const uint2*>(p)[c / 2];
            w[c] = u.x, w[c + 1] = u.y;
        }
    } else {
#pragma unroll
        for (int c = 0; c < N; ++c) w[c] = reinterpret_cast<const unsigned*>(p)[c];
    }
}
template <int N> __device__ __forceinline__ void store_words(void* p, const unsigned (&w)[N]) {
    if constexpr (N % 4 == 0) {
#pragma unroll
        for (int c = 0; c < N; c += 4)
            asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};"
                         :
                         : "l"(reinterpret_cast<uint4*>(p) + c / 4), "r"(w[c]), "r"(w[c + 1]), "r"(w[c + 2]),
                           "r"(w[c + 3])
                         : "memory");
    } else if constexpr (N % 2 == 0) {
#pragma unroll
        for (int c = 0; c < N; c += 2)
            asm volatile("st.global.v2.b32 [%0], {%1, %2};"
                         :
                         : "l"(reinterpret_cast<uint2*>(p) + c / 2), "r"(w[c]), "r"(w[c + 1])
                         : "memory");
    } else {
#pragma unroll
        for (int c = 0; c < N; ++c) reinterpret_cast<unsigned*>(p)[c] = w[c];
    }
}

// V elements of a row in global memory loaded or stored at once: 16 bytes when the host saw
// aligned rows (p then aligned to V elements), else 1. Whole words move as one vector access and
// 16-bit pairs convert together: a struct copy would be split into 2-byte stores.
template <class T, int V>
__device__ __forceinline__ void load(const T* p, float (&out)[V]) {
    constexpr int bytes = (int)sizeof(T) * V;
    if constexpr (bytes % 4 != 0) {
#pragma unroll
        for (int j = 0; j < V; ++j) out[j] = to_f32(p[j]);
    } else {
        unsigned w[bytes / 4];
        load_words<bytes / 4>(p, w);
#pragma unroll
        for (int k = 0; k < bytes / 4; ++k) {
            if constexpr (sizeof(T) == 4) {
                out[k] = __uint_as_float(w[k]);
            } else {
                float2 f = unpack2(T{}, w[k]);
                out[2 * k] = f.x, out[2 * k + 1] = f.y;
            }
        }
    }
}

template <class T, int V>
__device__ __forceinline__ void store(T* p, const float (&in)[V]) {
    constexpr int bytes = (int)sizeof(T) * V;
    if constexpr (bytes % 4 != 0) {
#pragma unroll
        for (int j = 0; j < V; ++j) p[j] = from_f32<T>(in[j]);
    } else {
        unsigned w[bytes / 4];
#pragma unroll
        for (int k = 0; k < bytes / 4; ++k) {
            if constexpr (sizeof(T) == 4) w[k] = __float_as_uint(in[k]);
            else w[k] = pack2(T{}, in[2 * k], in[2 * k + 1]);
        }
        store_words<bytes / 4>(p, w);
    }
}

// The bounds of a row kernel: up to 512 threads per block (launch.rs's MAX_THREADS) and two such
// blocks resident per SM, which caps a thread at 64 registers (a spill shows in the SASS test).
#define NX_ROW_BOUNDS __launch_bounds__(512, 2)

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

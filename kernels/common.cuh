// tandem CUDA kernels: helpers shared by every module. The CUDA backend prepends
// this text to each kernels/<module>.cu and compiles the result with NVRTC,
// which has no CUDA headers here; the CPU emulator (kernels/emu/) compiles the
// same text with g++ after its shim. Hence: no #include, and only the device
// features docs/architecture.md lists (no intrinsics, no atomics, the full-mask
// xor shuffle (and __shfl_sync in the mma fallback below, for pre-Ampere only),
// and one tensor-core instruction: mma_bf16_16816 below, for quant.cu's mmq_*
// kernels, which run batches of 9..64 rows against packed quantised weights;
// the emulator has a warp-collective model of it).

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

#define WARP 32

// NVRTC defines no INFINITY without math.h; the emulator's <cmath> does. A
// bit cast is a constant expression for both compilers (unlike 1.0f/0.0f,
// which is a division by zero, or __int_as_float, which g++ lacks).
#ifndef INFINITY
#define INFINITY (__builtin_bit_cast(float, 0x7f800000u))
#endif

// Reinterpreting bits: __builtin_bit_cast is well defined in both compilers,
// where the CUDA-only __float_as_uint would not build under the emulator.
__device__ __forceinline__ float u32_as_f32(u32 u) { return __builtin_bit_cast(float, u); }
__device__ __forceinline__ u32 f32_as_u32(float f) { return __builtin_bit_cast(u32, f); }

// bf16 is the top half of an f32.
__device__ __forceinline__ float bf16_to_f32(u16 h) { return u32_as_f32((u32)h << 16); }

// Round to nearest, ties to even (as the `half` crate's bf16::from_f32); a NaN
// stays a NaN (quiet bit set) instead of rounding into an infinity.
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = f32_as_u32(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

// IEEE half -> f32 by integer arithmetic (no __half2float), as the `half` crate
// converts: subnormals exact, infinities kept, NaNs quieted.
__device__ __forceinline__ float f16_to_f32(u16 h) {
    const u32 sign = (u32)(h & 0x8000u) << 16;
    const u32 exp = (h >> 10) & 0x1fu;
    const u32 man = h & 0x3ffu;
    if (exp == 0x1fu) {
        return u32_as_f32(sign | 0x7f800000u | (man != 0 ? 0x00400000u : 0u) | (man << 13));
    }
    if (exp == 0) {
        // man * 2^-24 is exact in f32 (at most 10 significant bits).
        return u32_as_f32(sign | f32_as_u32((float)man * 5.9604644775390625e-8f));
    }
    return u32_as_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

// Little-endian loads from byte buffers whose offsets need not be aligned.
__device__ __forceinline__ u16 read_u16_le(const u8* p) { return (u16)(p[0] | ((u16)p[1] << 8)); }
__device__ __forceinline__ float read_f16_le(const u8* p) { return f16_to_f32(read_u16_le(p)); }

// Butterfly reductions: every lane ends with the result. Every lane of the warp
// must call these (the emulator treats each shuffle as a warp barrier).
__device__ __forceinline__ float warp_sum(float v) {
    for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
    return v;
}

// ---- tensor cores ----

// Two bf16 (rounded as f32_to_bf16) in one 32-bit register, `lo` in the low
// half: the element order of an mma fragment register ("low to high").
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    return (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16);
}

// D += A·B for one warp: mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32,
// A 16x16 (row-major), B 16x8 (column-major), both bf16; D 16x8 f32. Every lane
// of the warp must call it, with the same (converged) control flow: the
// emulator treats it as a warp barrier, like a shuffle.
//
// Fragment layout, from the PTX ISA, section "Matrix Fragments for
// mma.m16n8k16 with floating point type" (Figures 79, 81 and 83; 9.7.14.5.8 /
// 9.7.15.5.8 depending on the ISA version), for .bf16 A/B and .f32 C/D. With
// g = lane >> 2 (groupID) and t = lane & 3 (threadID_in_group), and each
// register holding its two bf16 elements low half first (lower index low):
//   a[0] = A[g    ][2t, 2t+1]      a[1] = A[g + 8][2t, 2t+1]
//   a[2] = A[g    ][2t+8, 2t+9]    a[3] = A[g + 8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]          b[1] = B[2t+8, 2t+9][g]
//   d[0], d[1] = D[g][2t], D[g][2t+1]    d[2], d[3] = D[g+8][2t], D[g+8][2t+1]
// (The same mapping as llama.cpp's ggml-cuda/mma.cuh get_i/get_j for its
// tile<16,8,nv_bfloat162> A, tile<8,8,nv_bfloat162> B and tile<16,8,float> C,
// and as MLIR's NVGPU m16n8k16 Lhs/Rhs/Res index tables.)
//
// Tensor cores need sm_80 (bf16); for older devices, where the backend never
// launches an mmq kernel but the module must still compile, a slow shuffle
// version computes the same sums.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
#ifdef __CUDACC_RTC__
#if __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    // Lane 4g'+j holds A rows g', g'+8 at k = 2j, 2j+1, 2j+8, 2j+9 and column
    // n = g' of B at the same k: fetch this lane's rows and columns from them.
    const int lane = (int)threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int j = 0; j < 4; ++j) {
        u32 ar[4];
        for (int r = 0; r < 4; ++r) ar[r] = __shfl_sync(0xffffffffu, a[r], 4 * g + j);
        for (int c = 0; c < 2; ++c) {
            const u32 b0 = __shfl_sync(0xffffffffu, b[0], 4 * (2 * t + c) + j);
            const u32 b1 = __shfl_sync(0xffffffffu, b[1], 4 * (2 * t + c) + j);
            for (int h = 0; h < 2; ++h) {  // h: row g, then g + 8
                const u32 lo = ar[h], hi = ar[h + 2];
                s[2 * h + c] += u32_as_f32(lo << 16) * u32_as_f32(b0 << 16) +
                                u32_as_f32(lo & 0xffff0000u) * u32_as_f32(b0 & 0xffff0000u) +
                                u32_as_f32(hi << 16) * u32_as_f32(b1 << 16) +
                                u32_as_f32(hi & 0xffff0000u) * u32_as_f32(b1 & 0xffff0000u);
            }
        }
    }
    for (int i = 0; i < 4; ++i) d[i] += s[i];
#endif
#else
    emu::mma_bf16_16816(d, a, b);
#endif
}

// Block-wide reductions returning the result to every thread. `scratch` is a
// __shared__ array of at least THREADS/32 floats declared by the kernel; every
// thread of the block must call. The leading barrier lets a kernel call these
// back to back with one scratch: no warp overwrites a partial that a slower
// warp of the previous call has yet to read.
template <int THREADS>
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    static_assert(THREADS % WARP == 0 && THREADS >= WARP && THREADS <= 1024, "whole warps");
    v = warp_sum(v);
    if constexpr (THREADS == WARP) return v;
    const int lane = (int)threadIdx.x % WARP, warp = (int)threadIdx.x / WARP;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return warp_sum(lane < THREADS / WARP ? scratch[lane] : 0.0f);
}
template <int THREADS>
__device__ __forceinline__ float block_max(float v, float* scratch) {
    static_assert(THREADS % WARP == 0 && THREADS >= WARP && THREADS <= 1024, "whole warps");
    v = warp_max(v);
    if constexpr (THREADS == WARP) return v;
    const int lane = (int)threadIdx.x % WARP, warp = (int)threadIdx.x / WARP;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return warp_max(lane < THREADS / WARP ? scratch[lane] : -INFINITY);
}

// This block's index among all blocks of the grid, and how many there are:
// element-wise kernels stride by the whole grid, so they are correct for
// whatever grid shape the launcher computes.
__device__ __forceinline__ long long grid_block_index() {
    return (long long)blockIdx.x + (long long)gridDim.x * ((long long)blockIdx.y + (long long)gridDim.y * blockIdx.z);
}
__device__ __forceinline__ long long grid_block_count() {
    return (long long)gridDim.x * gridDim.y * gridDim.z;
}

// GGUF weight kernels: gemv against quantised rows (batches of up to 8 rows),
// mmq on tensor cores against quantised rows (9..64 rows), and dequantisation
// to bf16 (for the prefill GEMM) or to f32 rows (embedding lookup).
//
// Weights are row-major [rows(out), cols(in)], each row a whole number of ggml
// blocks, rows `row_bytes` apart. Reference: src/quant/ggml.rs `dequantize`; the
// dequant kernels reproduce its f32 values bit for bit.
//
// Alignment: `w` must be 4-byte aligned (cudaMalloc and GGUF's 32-byte tensor
// alignment give more). Every block size and every field offset used below is
// even, so all u16 loads are then 2-aligned; f32 weights are read as floats.
//
// One decoder per kind serves all four entry points, so they cannot drift apart:
// a kind splits each block into LPB "slices" of 8 values, one slice per thread
// (or lane): NRUN runs of RUN consecutive values, RSTRIDE apart, starting at
// element base(li) of the block; each run has one scale dl (and, for K kinds,
// one min ml). A value is dl*q (- ml). Lanes of a warp take neighbouring slices,
// so reads of activations and writes of outputs hit few cache lines per load.

// A product that is never fused into an FMA: the reference rounds d*q before it
// subtracts dmin*m, and NVRTC contracts a*b - c by default (--fmad=true). The
// emulator's g++ -std=c++20 does not contract, so a plain product is the same.
__device__ __forceinline__ float q_mul(float a, float b) {
#ifdef __CUDACC_RTC__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

// Loops over a slice's 8 values must unroll so its arrays stay in registers;
// g++ (the emulator) knows no `#pragma unroll` and would warn under -Wall.
#ifdef __CUDACC_RTC__
#define Q_UNROLL _Pragma("unroll")
#define Q_UNROLL4 _Pragma("unroll 4")
#else
#define Q_UNROLL
#define Q_UNROLL4
#endif

// Offsets are even (see the header), so one aligned u16 load replaces two byte
// loads; little endian on both the GPU and the emulator's host.
__device__ __forceinline__ u32 q_ld16(const u8* p) { return *(const u16*)p; }
__device__ __forceinline__ u32 q_ld32(const u8* p) { return q_ld16(p) | (q_ld16(p + 2) << 16); }
__device__ __forceinline__ float q_f16(const u8* p) { return f16_to_f32((u16)q_ld16(p)); }
__device__ __forceinline__ int q_i8(u32 b) { return (int)((b & 0xffu) ^ 0x80u) - 0x80; }

// ggml-quants.c get_scale_min_k4 (as src/quant/ggml.rs).
__device__ __forceinline__ void q_scale_min_k4(int j, const u8* s, int& sc, int& m) {
    if (j < 4) {
        sc = s[j] & 63;
        m = s[j + 4] & 63;
    } else {
        sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// ---- quantised kinds ----

// 18 bytes: f16 d, 16 bytes of nibbles (value l low, value l+16 high).
// Slice li (0..3): bytes 4li..4li+3 -> values 4li+k and 16+4li+k.
struct KQ4_0 {
    static constexpr bool PLAIN = false, HAS_MIN = false;
    static constexpr int QK = 32, BYTES = 18, LPB = 4, RUN = 4, NRUN = 2, RSTRIDE = 16;
    __device__ static __forceinline__ int base(int li) { return 4 * li; }
    __device__ static __forceinline__ void decode(const u8* b, int li, float (&q)[8], float (&dl)[NRUN], float (&)[NRUN]) {
        const float d = q_f16(b);
        const u32 qs = q_ld32(b + 2 + 4 * li);
        Q_UNROLL
        for (int k = 0; k < 4; ++k) {
            q[k] = (float)((int)((qs >> (8 * k)) & 0xF) - 8);
            q[4 + k] = (float)((int)((qs >> (8 * k + 4)) & 0xF) - 8);
        }
        dl[0] = d;
        dl[1] = d;
    }
};

// 22 bytes: f16 d, u32 qh (bit j = 5th bit of value j), 16 bytes of nibbles.
struct KQ5_0 {
    static constexpr bool PLAIN = false, HAS_MIN = false;
    static constexpr int QK = 32, BYTES = 22, LPB = 4, RUN = 4, NRUN = 2, RSTRIDE = 16;
    __device__ static __forceinline__ int base(int li) { return 4 * li; }
    __device__ static __forceinline__ void decode(const u8* b, int li, float (&q)[8], float (&dl)[NRUN], float (&)[NRUN]) {
        const float d = q_f16(b);
        const u32 h = q_ld32(b + 2) >> (4 * li);
        const u32 qs = q_ld32(b + 6 + 4 * li);
        Q_UNROLL
        for (int k = 0; k < 4; ++k) {
            const u32 lo = ((qs >> (8 * k)) & 0xF) | (((h >> k) & 1) << 4);
            const u32 hi = ((qs >> (8 * k + 4)) & 0xF) | (((h >> (k + 16)) & 1) << 4);
            q[k] = (float)((int)lo - 16);
            q[4 + k] = (float)((int)hi - 16);
        }
        dl[0] = d;
        dl[1] = d;
    }
};

// 34 bytes: f16 d, 32 signed bytes.
struct KQ8_0 {
    static constexpr bool PLAIN = false, HAS_MIN = false;
    static constexpr int QK = 32, BYTES = 34, LPB = 4, RUN = 4, NRUN = 2, RSTRIDE = 16;
    __device__ static __forceinline__ int base(int li) { return 4 * li; }
    __device__ static __forceinline__ void decode(const u8* b, int li, float (&q)[8], float (&dl)[NRUN], float (&)[NRUN]) {
        const float d = q_f16(b);
        const u32 lo = q_ld32(b + 2 + 4 * li);
        const u32 hi = q_ld32(b + 18 + 4 * li);
        Q_UNROLL
        for (int k = 0; k < 4; ++k) {
            q[k] = (float)q_i8(lo >> (8 * k));
            q[4 + k] = (float)q_i8(hi >> (8 * k));
        }
        dl[0] = d;
        dl[1] = d;
    }
};

// Q4_K (144 bytes: d, dmin, scales[12], qs[128]) and Q5_K (176 bytes: d, dmin,
// scales[12], qh[32], qs[128]). Chunk c (64 values) uses qs[32c..32c+32]: low
// nibbles are sub-block 2c, high nibbles sub-block 2c+1; Q5_K adds bit 2c / 2c+1
// of qh[l] as the 5th bit. Slice li: c = li/8, bytes 4j..4j+3 with j = li%8.
template <bool Q5>
struct KQxK {
    static constexpr bool PLAIN = false, HAS_MIN = true;
    static constexpr int QK = 256, BYTES = Q5 ? 176 : 144, LPB = 32, RUN = 4, NRUN = 2, RSTRIDE = 32;
    __device__ static __forceinline__ int base(int li) { return 64 * (li >> 3) + 4 * (li & 7); }
    __device__ static __forceinline__ void decode(const u8* b, int li, float (&q)[8], float (&dl)[NRUN], float (&ml)[NRUN]) {
        const int c = li >> 3, j = li & 7;
        const float d = q_f16(b), dmin = q_f16(b + 2);
        Q_UNROLL
        for (int t = 0; t < 2; ++t) {
            int sc, m;
            q_scale_min_k4(2 * c + t, b + 4, sc, m);
            dl[t] = q_mul(d, (float)sc);
            ml[t] = q_mul(dmin, (float)m);
        }
        const u32 qs = q_ld32(b + (Q5 ? 48 : 16) + 32 * c + 4 * j);
        const u32 qh = Q5 ? q_ld32(b + 16 + 4 * j) >> (2 * c) : 0u;
        Q_UNROLL
        for (int k = 0; k < 4; ++k) {
            q[k] = (float)(((qs >> (8 * k)) & 0xF) | (((qh >> (8 * k)) & 1) << 4));
            q[4 + k] = (float)(((qs >> (8 * k + 4)) & 0xF) | (((qh >> (8 * k + 1)) & 1) << 4));
        }
    }
};
typedef KQxK<false> KQ4K;
typedef KQxK<true> KQ5K;

// 210 bytes: ql[128], qh[64], i8 scales[16], f16 d. Half h (128 values) uses
// ql[64h..], qh[32h..], scales[8h..]; position l < 32 of the half gives values
// l, l+32, l+64, l+96 from ql[l], ql[l+32] and the 2-bit pairs of qh[l], with
// scale index l/16 + 0, 2, 4, 6. Slice li: h = li/16, l = 2(li%16) + {0,1}; run t
// is the values l+32t.
struct KQ6K {
    static constexpr bool PLAIN = false, HAS_MIN = false;
    static constexpr int QK = 256, BYTES = 210, LPB = 32, RUN = 2, NRUN = 4, RSTRIDE = 32;
    __device__ static __forceinline__ int base(int li) { return 128 * (li >> 4) + 2 * (li & 15); }
    __device__ static __forceinline__ void decode(const u8* b, int li, float (&q)[8], float (&dl)[NRUN], float (&)[NRUN]) {
        const int h = li >> 4, m = li & 15;
        const float d = q_f16(b + 208);
        const u32 qa = q_ld16(b + 64 * h + 2 * m);
        const u32 qb = q_ld16(b + 64 * h + 32 + 2 * m);
        const u32 qh = q_ld16(b + 128 + 32 * h + 2 * m);
        Q_UNROLL
        for (int k = 0; k < 2; ++k) {
            const u32 a = qa >> (8 * k), bb = qb >> (8 * k), hh = qh >> (8 * k);
            q[k] = (float)((int)((a & 0xF) | ((hh & 3) << 4)) - 32);
            q[2 + k] = (float)((int)((bb & 0xF) | (((hh >> 2) & 3) << 4)) - 32);
            q[4 + k] = (float)((int)(((a >> 4) & 0xF) | (((hh >> 4) & 3) << 4)) - 32);
            q[6 + k] = (float)((int)(((bb >> 4) & 0xF) | (((hh >> 6) & 3) << 4)) - 32);
        }
        const u8* sc = b + 192 + 8 * h + (m >> 3);
        Q_UNROLL
        for (int t = 0; t < 4; ++t) dl[t] = q_mul(d, (float)q_i8(sc[2 * t]));
    }
};

// bitsandbytes 4-bit (tandem layout, quant/bnb.rs): 36 bytes = f32 absmax, then
// 32 bytes; byte j holds value 2j in its high nibble and 2j+1 in its low one.
// Value = code[nibble] * absmax. Slice li (0..7): bytes 4li..4li+3 -> values 8li..8li+7.
__constant__ float BNB_NF4[16] = {-0x1.0000000000000p+0f, -0x1.6473620000000p-1f, -0x1.0cd6600000000p-1f, -0x1.9465400000000p-2f, -0x1.23449a0000000p-2f, -0x1.7a6a7e0000000p-3f, -0x1.74f0e20000000p-4f, 0.0f, 0x1.45f5fe0000000p-4f, 0x1.4995c60000000p-3f, 0x1.f809ba0000000p-3f, 0x1.5a06740000000p-2f, 0x1.c349700000000p-2f, 0x1.200f560000000p-1f, 0x1.7227660000000p-1f, 0x1.0000000000000p+0f};
__constant__ float BNB_FP4[16] = {0.0f, 0x1.5555560000000p-8f, 0x1.5555560000000p-1f, 0x1.0000000000000p+0f, 0x1.5555560000000p-2f, 0x1.0000000000000p-1f, 0x1.5555560000000p-3f, 0x1.0000000000000p-2f, 0.0f, -0x1.5555560000000p-8f, -0x1.5555560000000p-1f, -0x1.0000000000000p+0f, -0x1.5555560000000p-2f, -0x1.0000000000000p-1f, -0x1.5555560000000p-3f, -0x1.0000000000000p-2f};
template <bool FP4>
struct KBnb4 {
    static constexpr bool PLAIN = false, HAS_MIN = false;
    static constexpr int QK = 64, BYTES = 36, LPB = 8, RUN = 8, NRUN = 1, RSTRIDE = 0;
    __device__ static __forceinline__ int base(int li) { return 8 * li; }
    __device__ static __forceinline__ float code(u32 i) { return FP4 ? BNB_FP4[i] : BNB_NF4[i]; }
    __device__ static __forceinline__ void decode(const u8* b, int li, float (&q)[8], float (&dl)[NRUN], float (&)[NRUN]) {
        const u32 qs = q_ld32(b + 4 + 4 * li);
        Q_UNROLL
        for (int k = 0; k < 4; ++k) {
            q[2 * k] = code((qs >> (8 * k + 4)) & 0xF);
            q[2 * k + 1] = code((qs >> (8 * k)) & 0xF);
        }
        dl[0] = __uint_as_float(q_ld32(b));
    }
};
using KNF4 = KBnb4<false>;
using KFP4 = KBnb4<true>;

// Group-wise int4 (GPTQ/AWQ asymmetric, quant/ggml.rs Int4G*): one block per
// group of G = 32, 64 or 128 inputs, 4 + G/2 bytes = f16 d, u8 zero z, a pad
// byte, then G/32 Q4_0-style sub-blocks of 16 bytes. Value = d * (q - z), the
// difference exact in f32 before the one rounded product, as the reference
// (folding z into a per-run min would round twice). Slice li: sub-block li/4,
// bytes 4(li%4).. of it, i.e. bytes 4 + 4li of the block.
template <int G>
struct KInt4G {
    static constexpr bool PLAIN = false, HAS_MIN = false;
    static constexpr int QK = G, BYTES = 4 + G / 2, LPB = G / 8, RUN = 4, NRUN = 2, RSTRIDE = 16;
    __device__ static __forceinline__ int base(int li) { return 32 * (li >> 2) + 4 * (li & 3); }
    __device__ static __forceinline__ void decode(const u8* b, int li, float (&q)[8], float (&dl)[NRUN], float (&)[NRUN]) {
        const float d = q_f16(b);
        const int z = (int)b[2];
        const u32 qs = q_ld32(b + 4 + 4 * li);
        Q_UNROLL
        for (int k = 0; k < 4; ++k) {
            q[k] = (float)((int)((qs >> (8 * k)) & 0xF) - z);
            q[4 + k] = (float)((int)((qs >> (8 * k + 4)) & 0xF) - z);
        }
        dl[0] = d;
        dl[1] = d;
    }
};
using KInt4G128 = KInt4G<128>;
using KInt4G64 = KInt4G<64>;
using KInt4G32 = KInt4G<32>;

// ---- plain kinds: element k of a row ----

struct KF32 {
    static constexpr bool PLAIN = true;
    __device__ static __forceinline__ float ld(const u8* row, int k) { return ((const float*)row)[k]; }
};
struct KF16 {
    static constexpr bool PLAIN = true;
    __device__ static __forceinline__ float ld(const u8* row, int k) { return f16_to_f32(((const u16*)row)[k]); }
};
struct KBF16 {
    static constexpr bool PLAIN = true;
    __device__ static __forceinline__ float ld(const u8* row, int k) { return bf16_to_f32(((const u16*)row)[k]); }
};

// Value k of run t of a decoded slice, exactly as src/quant/ggml.rs computes it:
// (dl*q) - ml, each op rounded (dequant_row and mmq both store this).
template <class K>
__device__ __forceinline__ float q_val(const float (&q)[8], const float (&dl)[K::NRUN], const float (&ml)[K::NRUN], int t,
                                       int k) {
    float v = q_mul(dl[t], q[t * K::RUN + k]);
    if constexpr (K::HAS_MIN) v = v - ml[t];
    return v;
}

// ---- gemv ----

// Adds this lane's share of W[row] · x[b] to acc[b] for b < NB; x rows are
// `cols` apart. Quantised kinds: lane handles slice lane%LPB of blocks
// lane/LPB, lane/LPB + 32/LPB, ...; the scale is applied once per run (and the
// min once per run via the sum of x), not per value.
template <class K, int NB>
__device__ __forceinline__ void gemv_lane(const u8* __restrict__ row, const float* __restrict__ x, int cols, float (&acc)[NB]) {
    const int lane = (int)threadIdx.x & 31;
    if constexpr (K::PLAIN) {
        Q_UNROLL4
        for (int k = lane; k < cols; k += 32) {
            const float wv = K::ld(row, k);
            Q_UNROLL
            for (int b = 0; b < NB; ++b) acc[b] += x[(long long)b * cols + k] * wv;
        }
    } else {
        const int li = lane % K::LPB, nblk = cols / K::QK;
        for (int blk = lane / K::LPB; blk < nblk; blk += 32 / K::LPB) {
            float q[8], dl[K::NRUN], ml[K::NRUN];
            K::decode(row + (long long)blk * K::BYTES, li, q, dl, ml);
            const float* xs = x + (long long)blk * K::QK + K::base(li);
            Q_UNROLL
            for (int b = 0; b < NB; ++b) {
                const float* xb = xs + (long long)b * cols;
                float s = 0.0f;
                Q_UNROLL
                for (int t = 0; t < K::NRUN; ++t) {
                    float sq = 0.0f, sx = 0.0f;
                    Q_UNROLL
                    for (int k = 0; k < K::RUN; ++k) {
                        const float xv = xb[t * K::RSTRIDE + k];
                        sq += xv * q[t * K::RUN + k];
                        if constexpr (K::HAS_MIN) sx += xv;
                    }
                    s += dl[t] * sq;
                    if constexpr (K::HAS_MIN) s -= ml[t] * sx;
                }
                acc[b] += s;
            }
        }
    }
}

// NB activation rows at once: every lane reaches the warp_sum (the emulator
// treats a shuffle as a warp barrier), a row past `rows` just adds nothing.
template <class K, int NB>
__device__ __forceinline__ void gemv_rows(const u8* __restrict__ w, const float* __restrict__ x, const float* __restrict__ bias,
                                          float* __restrict__ out, int rows, int cols, int row_bytes, int r) {
    const bool valid = r < rows && threadIdx.x < 128;
    float acc[NB];
    Q_UNROLL
    for (int b = 0; b < NB; ++b) acc[b] = 0.0f;
    if (valid) gemv_lane<K, NB>(w + (long long)r * row_bytes, x, cols, acc);
    Q_UNROLL
    for (int b = 0; b < NB; ++b) {
        float v = warp_sum(acc[b]);
        if (valid && (threadIdx.x & 31) == 0) {
            if (bias != nullptr) v += bias[r];
            out[(long long)b * rows + r] = v;
        }
    }
}

// One warp per output row, 4 rows per block. A batch over 8 is done in chunks of
// 8 (rereading the weights) rather than refused.
template <class K>
__device__ __forceinline__ void gemv(const u8* __restrict__ w, const float* __restrict__ x, const float* __restrict__ bias,
                                     float* __restrict__ out, int rows, int cols, int row_bytes, int batch) {
    const int r = (int)blockIdx.x * 4 + (int)(threadIdx.x >> 5);
    for (int b0 = 0; b0 < batch; b0 += 8) {
        const float* xc = x + (long long)b0 * cols;
        float* oc = out + (long long)b0 * rows;
        switch (batch - b0 < 8 ? batch - b0 : 8) {
            case 1: gemv_rows<K, 1>(w, xc, bias, oc, rows, cols, row_bytes, r); break;
            case 2: gemv_rows<K, 2>(w, xc, bias, oc, rows, cols, row_bytes, r); break;
            case 3: gemv_rows<K, 3>(w, xc, bias, oc, rows, cols, row_bytes, r); break;
            case 4: gemv_rows<K, 4>(w, xc, bias, oc, rows, cols, row_bytes, r); break;
            case 5: gemv_rows<K, 5>(w, xc, bias, oc, rows, cols, row_bytes, r); break;
            case 6: gemv_rows<K, 6>(w, xc, bias, oc, rows, cols, row_bytes, r); break;
            case 7: gemv_rows<K, 7>(w, xc, bias, oc, rows, cols, row_bytes, r); break;
            default: gemv_rows<K, 8>(w, xc, bias, oc, rows, cols, row_bytes, r); break;
        }
    }
}

// ---- mmq: small-batch GEMM on tensor cores ----

// out[b, r] = Σ_k bf16(x[b, k]) · bf16(W[r, k]) (+ bias[r]) with the weight
// decoded from its packed rows into shared memory a K-chunk at a time: the
// weight values are dequant_bf16's bit for bit and the activations
// f32_to_bf16_kernel's, so this equals the dequant + cuBLAS path up to the
// order of the f32 sums, without a bf16 copy of the weight in global memory.
//
// Tile: 64 weight rows x 64 activation rows. Warp w owns weight rows
// [16w, 16w+16) of the tile (mma A, 16x16 per k-step) against up to 8 n-tiles
// of 8 activation rows (mma B); its 8x4 accumulators stay in registers. Per
// K-chunk of MMQ_KC = 128 values (16 slices of 8 per row, so every kind's chunk
// is whole blocks, or whole 128-value halves of a 256-block): each thread
// decodes 8 slices (16 consecutive threads cover one row's chunk, 8 rows per
// pass), the block loads the 64 x 128 activations as pairs (64 consecutive
// threads per row), a barrier, then each warp runs 8 k-steps x (n-tiles with a
// live row) mma's, and a barrier before the tiles are overwritten. Rows are
// MMQ_LDW = 68 words apart: the fragment loads (lanes g*68 + t words) hit 32
// distinct banks. Weight rows past `rows` and activation rows past `batch` are
// zeros in the tiles and never stored; k-steps past `cols` (a last chunk
// shorter than 128) are skipped.
#define MMQ_ROWS 64
#define MMQ_BATCH 64
#define MMQ_KC 128
#define MMQ_LDW (MMQ_KC / 2 + 4)

// Two consecutive f32 as one 8-byte load (x must be 8-byte aligned; every
// offset used is even).
__device__ __forceinline__ void mmq_ld2(const float* p, float& lo, float& hi) {
    const unsigned long long v = *(const unsigned long long*)p;
    lo = u32_as_f32((u32)v);
    hi = u32_as_f32((u32)(v >> 32));
}

template <class K>
__device__ __forceinline__ void mmq(const u8* __restrict__ w, const float* __restrict__ x, const float* __restrict__ bias,
                                    float* __restrict__ out, int rows, int cols, int row_bytes, int batch) {
    static_assert(!K::PLAIN && MMQ_KC * K::LPB % K::QK == 0 && (K::QK <= MMQ_KC || K::QK % MMQ_KC == 0), "chunking");
    static_assert(K::RUN % 2 == 0 && K::RSTRIDE % 2 == 0, "runs of bf16 pairs");
    __shared__ u32 s_w[MMQ_ROWS * MMQ_LDW];   // bf16 pairs: weight row, k
    __shared__ u32 s_x[MMQ_BATCH * MMQ_LDW];  // bf16 pairs: activation row, k
    const int tid = (int)threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int r0 = (int)blockIdx.x * MMQ_ROWS;
    const int s = tid & 15, rr = tid >> 4;  // decode: slice s of the chunk, rows rr + 8i
    for (int b0 = (int)blockIdx.y * MMQ_BATCH; b0 < batch; b0 += (int)gridDim.y * MMQ_BATCH) {
        const int nb = batch - b0 < MMQ_BATCH ? batch - b0 : MMQ_BATCH;
        const int ntiles = (nb + 7) / 8;
        float acc[8][4];
        Q_UNROLL
        for (int n = 0; n < 8; ++n) {
            Q_UNROLL
            for (int i = 0; i < 4; ++i) acc[n][i] = 0.0f;
        }
        for (int k0 = 0; k0 < cols; k0 += MMQ_KC) {
            const int kn = cols - k0 < MMQ_KC ? cols - k0 : MMQ_KC;  // a multiple of 32
            if (s < kn / 8) {
                const int gs = k0 / 8 + s, blk = gs / K::LPB, li = gs % K::LPB;
                u32* dst = s_w + rr * MMQ_LDW + (blk * K::QK + K::base(li) - k0) / 2;
                const u8* src = w + (long long)(r0 + rr) * row_bytes + (long long)blk * K::BYTES;
                Q_UNROLL
                for (int i = 0; i < MMQ_ROWS / 8; ++i) {
                    float q[8], dl[K::NRUN], ml[K::NRUN];
                    if (r0 + rr + 8 * i < rows) {
                        K::decode(src + (long long)(8 * i) * row_bytes, li, q, dl, ml);
                    } else {
                        Q_UNROLL
                        for (int k = 0; k < 8; ++k) q[k] = 0.0f;
                        Q_UNROLL
                        for (int k = 0; k < K::NRUN; ++k) dl[k] = ml[k] = 0.0f;
                    }
                    Q_UNROLL
                    for (int tr = 0; tr < K::NRUN; ++tr) {
                        Q_UNROLL
                        for (int k = 0; k < K::RUN; k += 2) {
                            dst[8 * i * MMQ_LDW + (tr * K::RSTRIDE + k) / 2] =
                                pack_bf16x2(q_val<K>(q, dl, ml, tr, k), q_val<K>(q, dl, ml, tr, k + 1));
                        }
                    }
                }
            }
            Q_UNROLL4
            for (int i = 0; i < MMQ_BATCH * MMQ_KC / 2 / 128; ++i) {
                const int p = tid + 128 * i, row = p / (MMQ_KC / 2), pc = p % (MMQ_KC / 2);
                float lo = 0.0f, hi = 0.0f;
                if (row < nb && 2 * pc < kn) mmq_ld2(x + (long long)(b0 + row) * cols + k0 + 2 * pc, lo, hi);
                s_x[row * MMQ_LDW + pc] = pack_bf16x2(lo, hi);
            }
            __syncthreads();
            const u32* sa = s_w + (warp * 16 + g) * MMQ_LDW + t;
            const u32* sb = s_x + g * MMQ_LDW + t;
            Q_UNROLL
            for (int ks = 0; ks < MMQ_KC / 16; ++ks) {
                if (ks * 16 < kn) {
                    const u32 a[4] = {sa[8 * ks], sa[8 * MMQ_LDW + 8 * ks], sa[8 * ks + 4], sa[8 * MMQ_LDW + 8 * ks + 4]};
                    Q_UNROLL
                    for (int n = 0; n < 8; ++n) {
                        if (n < ntiles) {
                            const u32 bf[2] = {sb[8 * n * MMQ_LDW + 8 * ks], sb[8 * n * MMQ_LDW + 8 * ks + 4]};
                            mma_bf16_16816(acc[n], a, bf);
                        }
                    }
                }
            }
            __syncthreads();
        }
        Q_UNROLL
        for (int n = 0; n < 8; ++n) {
            Q_UNROLL
            for (int i = 0; i < 4; ++i) {
                const int r = r0 + warp * 16 + g + (i >= 2 ? 8 : 0), b = b0 + 8 * n + 2 * t + (i & 1);
                if (r < rows && b < batch) {
                    float v = acc[n][i];
                    if (bias != nullptr) v += bias[r];
                    out[(long long)b * rows + r] = v;
                }
            }
        }
    }
}

// ---- dequantisation ----

__device__ __forceinline__ void q_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void q_store(u16* p, float v) { *p = f32_to_bf16(v); }

// The block's threads stride over the row: elements for plain kinds, slices for
// quantised ones. Values are exactly ggml.rs's: (dl*q) - ml, each op rounded.
template <class K, class T>
__device__ __forceinline__ void dequant_row(const u8* __restrict__ row, int cols, T* __restrict__ out) {
    const int tid = (int)threadIdx.x, nt = (int)blockDim.x;
    if constexpr (K::PLAIN) {
        for (int k = tid; k < cols; k += nt) q_store(out + k, K::ld(row, k));
    } else {
        const int nslices = cols / K::QK * K::LPB;
        for (int s = tid; s < nslices; s += nt) {
            const int blk = s / K::LPB, li = s % K::LPB;
            float q[8], dl[K::NRUN], ml[K::NRUN];
            K::decode(row + (long long)blk * K::BYTES, li, q, dl, ml);
            T* o = out + (long long)blk * K::QK + K::base(li);
            Q_UNROLL
            for (int t = 0; t < K::NRUN; ++t) {
                Q_UNROLL
                for (int k = 0; k < K::RUN; ++k) q_store(o + t * K::RSTRIDE + k, q_val<K>(q, dl, ml, t, k));
            }
        }
    }
}

template <class K>
__device__ __forceinline__ void dequant_bf16(const u8* __restrict__ w, u16* __restrict__ out, int rows, int cols, int row_bytes) {
    const int r = (int)blockIdx.x;
    if (r >= rows) return;
    dequant_row<K>(w + (long long)r * row_bytes, cols, out + (long long)r * cols);
}

// Out-of-range ids read the last row (as the spec's min(id, table_rows-1)).
template <class K>
__device__ __forceinline__ void dequant_rows(const u8* __restrict__ w, const u32* __restrict__ ids, float* __restrict__ out, int n,
                                             int cols, int row_bytes, int table_rows) {
    const int i = (int)blockIdx.x;
    if (i >= n) return;
    float* o = out + (long long)i * cols;
    if (table_rows <= 0) {
        for (int k = (int)threadIdx.x; k < cols; k += (int)blockDim.x) o[k] = 0.0f;
        return;
    }
    const u32 id = ids[i] < (u32)table_rows ? ids[i] : (u32)(table_rows - 1);
    dequant_row<K>(w + (long long)id * row_bytes, cols, o);
}

// ---- entry points ----
// gemv_K:         launch: grid (ceil(rows/4)), block 128 (one warp per row)
// mmq_K:          launch: grid (ceil(rows/64), ceil(batch/64)), block 128 (4 warps);
//                 block (bx, by) computes out rows [64by, 64by+64) x weight rows
//                 [64bx, 64bx+64) (a smaller grid.y loops over the batch, each
//                 pass decoding the weight tile again); quantised kinds only,
//                 sm_80+ (tensor cores); x 8-byte aligned
// dequant_bf16_K: launch: grid (rows), block 256
// dequant_rows_K: launch: grid (n), block 256

#define GEMV_ARGS const u8* __restrict__ w, const float* __restrict__ x, const float* __restrict__ bias, float* __restrict__ out, \
                  int rows, int cols, int row_bytes, int batch
#define BF16_ARGS const u8* __restrict__ w, u16* __restrict__ out, int rows, int cols, int row_bytes
#define ROWS_ARGS const u8* __restrict__ w, const u32* __restrict__ ids, float* __restrict__ out, int n, int cols, int row_bytes, \
                  int table_rows

extern "C" __global__ void gemv_f32(GEMV_ARGS) { gemv<KF32>(w, x, bias, out, rows, cols, row_bytes, batch); }
extern "C" __global__ void gemv_f16(GEMV_ARGS) { gemv<KF16>(w, x, bias, out, rows, cols, row_bytes, batch); }
extern "C" __global__ void gemv_bf16(GEMV_ARGS) { gemv<KBF16>(w, x, bias, out, rows, cols, row_bytes, batch); }
extern "C" __global__ void gemv_q4_0(GEMV_ARGS) { gemv<KQ4_0>(w, x, bias, out, rows, cols, row_bytes, batch); }
extern "C" __global__ void gemv_q5_0(GEMV_ARGS) { gemv<KQ5_0>(w, x, bias, out, rows, cols, row_bytes, batch); }
extern "C" __global__ void gemv_q8_0(GEMV_ARGS) { gemv<KQ8_0>(w, x, bias, out, rows, cols, row_bytes, batch); }
extern "C" __global__ void gemv_q4_k(GEMV_ARGS) { gemv<KQ4K>(w, x, bias, out, rows, cols, row_bytes, batch); }
extern "C" __global__ void gemv_q5_k(GEMV_ARGS) { gemv<KQ5K>(w, x, bias, out, rows, cols, row_bytes, batch); }
extern "C" __global__ void gemv_q6_k(GEMV_ARGS) { gemv<KQ6K>(w, x, bias, out, rows, cols, row_bytes, batch); }
extern "C" __global__ void gemv_nf4(GEMV_ARGS) { gemv<KNF4>(w, x, bias, out, rows, cols, row_bytes, batch); }
extern "C" __global__ void gemv_fp4(GEMV_ARGS) { gemv<KFP4>(w, x, bias, out, rows, cols, row_bytes, batch); }
extern "C" __global__ void gemv_int4g128(GEMV_ARGS) { gemv<KInt4G128>(w, x, bias, out, rows, cols, row_bytes, batch); }
extern "C" __global__ void gemv_int4g64(GEMV_ARGS) { gemv<KInt4G64>(w, x, bias, out, rows, cols, row_bytes, batch); }
extern "C" __global__ void gemv_int4g32(GEMV_ARGS) { gemv<KInt4G32>(w, x, bias, out, rows, cols, row_bytes, batch); }

extern "C" __global__ void mmq_q4_0(GEMV_ARGS) { mmq<KQ4_0>(w, x, bias, out, rows, cols, row_bytes, batch); }
extern "C" __global__ void mmq_q5_0(GEMV_ARGS) { mmq<KQ5_0>(w, x, bias, out, rows, cols, row_bytes, batch); }
extern "C" __global__ void mmq_q8_0(GEMV_ARGS) { mmq<KQ8_0>(w, x, bias, out, rows, cols, row_bytes, batch); }
extern "C" __global__ void mmq_q4_k(GEMV_ARGS) { mmq<KQ4K>(w, x, bias, out, rows, cols, row_bytes, batch); }
extern "C" __global__ void mmq_q5_k(GEMV_ARGS) { mmq<KQ5K>(w, x, bias, out, rows, cols, row_bytes, batch); }
extern "C" __global__ void mmq_q6_k(GEMV_ARGS) { mmq<KQ6K>(w, x, bias, out, rows, cols, row_bytes, batch); }
extern "C" __global__ void mmq_nf4(GEMV_ARGS) { mmq<KNF4>(w, x, bias, out, rows, cols, row_bytes, batch); }
extern "C" __global__ void mmq_fp4(GEMV_ARGS) { mmq<KFP4>(w, x, bias, out, rows, cols, row_bytes, batch); }
extern "C" __global__ void mmq_int4g128(GEMV_ARGS) { mmq<KInt4G128>(w, x, bias, out, rows, cols, row_bytes, batch); }
extern "C" __global__ void mmq_int4g64(GEMV_ARGS) { mmq<KInt4G64>(w, x, bias, out, rows, cols, row_bytes, batch); }
extern "C" __global__ void mmq_int4g32(GEMV_ARGS) { mmq<KInt4G32>(w, x, bias, out, rows, cols, row_bytes, batch); }

extern "C" __global__ void dequant_bf16_f32(BF16_ARGS) { dequant_bf16<KF32>(w, out, rows, cols, row_bytes); }
extern "C" __global__ void dequant_bf16_f16(BF16_ARGS) { dequant_bf16<KF16>(w, out, rows, cols, row_bytes); }
extern "C" __global__ void dequant_bf16_bf16(BF16_ARGS) { dequant_bf16<KBF16>(w, out, rows, cols, row_bytes); }
extern "C" __global__ void dequant_bf16_q4_0(BF16_ARGS) { dequant_bf16<KQ4_0>(w, out, rows, cols, row_bytes); }
extern "C" __global__ void dequant_bf16_q5_0(BF16_ARGS) { dequant_bf16<KQ5_0>(w, out, rows, cols, row_bytes); }
extern "C" __global__ void dequant_bf16_q8_0(BF16_ARGS) { dequant_bf16<KQ8_0>(w, out, rows, cols, row_bytes); }
extern "C" __global__ void dequant_bf16_q4_k(BF16_ARGS) { dequant_bf16<KQ4K>(w, out, rows, cols, row_bytes); }
extern "C" __global__ void dequant_bf16_q5_k(BF16_ARGS) { dequant_bf16<KQ5K>(w, out, rows, cols, row_bytes); }
extern "C" __global__ void dequant_bf16_q6_k(BF16_ARGS) { dequant_bf16<KQ6K>(w, out, rows, cols, row_bytes); }
extern "C" __global__ void dequant_bf16_nf4(BF16_ARGS) { dequant_bf16<KNF4>(w, out, rows, cols, row_bytes); }
extern "C" __global__ void dequant_bf16_fp4(BF16_ARGS) { dequant_bf16<KFP4>(w, out, rows, cols, row_bytes); }
extern "C" __global__ void dequant_bf16_int4g128(BF16_ARGS) { dequant_bf16<KInt4G128>(w, out, rows, cols, row_bytes); }
extern "C" __global__ void dequant_bf16_int4g64(BF16_ARGS) { dequant_bf16<KInt4G64>(w, out, rows, cols, row_bytes); }
extern "C" __global__ void dequant_bf16_int4g32(BF16_ARGS) { dequant_bf16<KInt4G32>(w, out, rows, cols, row_bytes); }

extern "C" __global__ void dequant_rows_f32(ROWS_ARGS) { dequant_rows<KF32>(w, ids, out, n, cols, row_bytes, table_rows); }
extern "C" __global__ void dequant_rows_f16(ROWS_ARGS) { dequant_rows<KF16>(w, ids, out, n, cols, row_bytes, table_rows); }
extern "C" __global__ void dequant_rows_bf16(ROWS_ARGS) { dequant_rows<KBF16>(w, ids, out, n, cols, row_bytes, table_rows); }
extern "C" __global__ void dequant_rows_q4_0(ROWS_ARGS) { dequant_rows<KQ4_0>(w, ids, out, n, cols, row_bytes, table_rows); }
extern "C" __global__ void dequant_rows_q5_0(ROWS_ARGS) { dequant_rows<KQ5_0>(w, ids, out, n, cols, row_bytes, table_rows); }
extern "C" __global__ void dequant_rows_q8_0(ROWS_ARGS) { dequant_rows<KQ8_0>(w, ids, out, n, cols, row_bytes, table_rows); }
extern "C" __global__ void dequant_rows_q4_k(ROWS_ARGS) { dequant_rows<KQ4K>(w, ids, out, n, cols, row_bytes, table_rows); }
extern "C" __global__ void dequant_rows_q5_k(ROWS_ARGS) { dequant_rows<KQ5K>(w, ids, out, n, cols, row_bytes, table_rows); }
extern "C" __global__ void dequant_rows_q6_k(ROWS_ARGS) { dequant_rows<KQ6K>(w, ids, out, n, cols, row_bytes, table_rows); }
extern "C" __global__ void dequant_rows_nf4(ROWS_ARGS) { dequant_rows<KNF4>(w, ids, out, n, cols, row_bytes, table_rows); }
extern "C" __global__ void dequant_rows_fp4(ROWS_ARGS) { dequant_rows<KFP4>(w, ids, out, n, cols, row_bytes, table_rows); }
extern "C" __global__ void dequant_rows_int4g128(ROWS_ARGS) { dequant_rows<KInt4G128>(w, ids, out, n, cols, row_bytes, table_rows); }
extern "C" __global__ void dequant_rows_int4g64(ROWS_ARGS) { dequant_rows<KInt4G64>(w, ids, out, n, cols, row_bytes, table_rows); }
extern "C" __global__ void dequant_rows_int4g32(ROWS_ARGS) { dequant_rows<KInt4G32>(w, ids, out, n, cols, row_bytes, table_rows); }

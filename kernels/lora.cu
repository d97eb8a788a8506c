// Batched heterogeneous LoRA (BGMV-style): out[r] += (x[r] · Aᵀ) · Bt with the
// matrices of row r's segment. Reference: src/backend/cpu/lora.rs. row_seg[r]
// is the segment index or -1 (row untouched); seg_a[s] / seg_bt[s] are device
// addresses of A [rank, in_f] and Bt [rank, out_f] (row-major, scaling folded
// into Bt), seg_rank[s] its rank. t is scratch [rows, max_rank]. The segment
// count is not passed: the caller guarantees row_seg[r] < its length. Ranks
// above max_rank are clamped to it (t has only max_rank columns).

#define LORA_SHRINK_THREADS 128

__device__ __forceinline__ float lora_load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float lora_load(const u16* p, long long i) { return bf16_to_f32(p[i]); }

__device__ __forceinline__ int lora_rank(const int* seg_rank, int seg, int max_rank) {
    if (seg < 0) return 0;
    const int rank = seg_rank[seg];
    return rank < max_rank ? rank : max_rank;
}

// Block (r, j) for every (r, j) of a [rows, max_rank] grid; blocks stride over
// both, so any grid is correct.
template <typename W>
__device__ __forceinline__ void lora_shrink(const float* x, const int* row_seg, const unsigned long long* seg_a,
                                            const int* seg_rank, float* t, int rows, int in_f, int max_rank,
                                            float* scratch) {
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const int seg = row_seg[r];
        const int rank = lora_rank(seg_rank, seg, max_rank);
        const float* xr = x + r * in_f;
        for (int j = blockIdx.y; j < max_rank; j += gridDim.y) {
            // Uniform per block: the barriers inside block_sum are reached by all.
            if (j >= rank) {
                if (threadIdx.x == 0) t[r * max_rank + j] = 0.0f;
                continue;
            }
            const W* a = (const W*)seg_a[seg] + (long long)j * in_f;
            float s = 0.0f;
            for (int k = threadIdx.x; k < in_f; k += LORA_SHRINK_THREADS) s += xr[k] * lora_load(a, k);
            s = block_sum<LORA_SHRINK_THREADS>(s, scratch);
            if (threadIdx.x == 0) t[r * max_rank + j] = s;
        }
    }
}

// Columns [256b, 256b+256) of row r for block (r, b); blocks stride over rows
// and column tiles, so any grid is correct. Each output gets
// out + t0·b0 + t1·b1 + ... in rank order, as on the CPU.
template <typename W>
__device__ __forceinline__ void lora_expand(const float* t, const int* row_seg, const unsigned long long* seg_bt,
                                            const int* seg_rank, float* out, int rows, int out_f, int max_rank) {
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const int seg = row_seg[r];
        if (seg < 0) continue;
        const int rank = lora_rank(seg_rank, seg, max_rank);
        const W* bt = (const W*)seg_bt[seg];
        const float* tr = t + r * max_rank;
        float* orow = out + r * out_f;
        for (long long c = (long long)blockIdx.y * blockDim.x + threadIdx.x; c < out_f;
             c += (long long)gridDim.y * blockDim.x) {
            float acc = orow[c];
            for (int j = 0; j < rank; ++j) acc += tr[j] * lora_load(bt, (long long)j * out_f + c);
            orow[c] = acc;
        }
    }
}

// launch: grid (rows, max_rank), block 128: block (r, j) writes t[r, j] =
// Σ_k x[r,k] A[j,k] (a block-wide dot product), or 0 when row r has no segment
// or j >= its rank.
extern "C" __global__ void lora_shrink_f32(const float* x, const int* row_seg, const unsigned long long* seg_a,
                                           const int* seg_rank, float* t, int rows, int in_f, int max_rank) {
    __shared__ float scratch[LORA_SHRINK_THREADS / WARP];
    lora_shrink<float>(x, row_seg, seg_a, seg_rank, t, rows, in_f, max_rank, scratch);
}

// launch: grid (rows, max_rank), block 128. As lora_shrink_f32 with A in bf16.
extern "C" __global__ void lora_shrink_bf16(const float* x, const int* row_seg, const unsigned long long* seg_a,
                                            const int* seg_rank, float* t, int rows, int in_f, int max_rank) {
    __shared__ float scratch[LORA_SHRINK_THREADS / WARP];
    lora_shrink<u16>(x, row_seg, seg_a, seg_rank, t, rows, in_f, max_rank, scratch);
}

// launch: grid (rows, ceil(out_f/256)), block 256: a thread per output column,
// out[r,c] += Σ_{j<rank} t[r,j] Bt[j,c] (reads of Bt coalesced along c). Rows
// with no segment are untouched.
extern "C" __global__ void lora_expand_f32(const float* t, const int* row_seg, const unsigned long long* seg_bt,
                                           const int* seg_rank, float* out, int rows, int out_f, int max_rank) {
    lora_expand<float>(t, row_seg, seg_bt, seg_rank, out, rows, out_f, max_rank);
}

// launch: grid (rows, ceil(out_f/256)), block 256. As lora_expand_f32 with Bt in bf16.
extern "C" __global__ void lora_expand_bf16(const float* t, const int* row_seg, const unsigned long long* seg_bt,
                                            const int* seg_rank, float* out, int rows, int out_f, int max_rank) {
    lora_expand<u16>(t, row_seg, seg_bt, seg_rank, out, rows, out_f, max_rank);
}

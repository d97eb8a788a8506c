// Paged attention, split-K over the context (flash-decoding). Reference
// semantics: src/backend/cpu/attention.rs. Query token t has
// tok_meta[3t..3t+3] = {first, ctx, table_off}: it sees key positions
// [first, ctx), and position p lives at slot
// block_tables[table_off + p / block_size] * block_size + p % block_size.
// attention_partial scores one partition of those keys per (token, head) and
// keeps unnormalised sums; attention_reduce merges the partitions.
// q and out are [tokens, num_heads * head_dim]; query head h reads KV head
// h / (num_heads / kv_heads) (GQA), as on the CPU.

#define ATTN_THREADS 128
#define ATTN_WARPS (ATTN_THREADS / WARP)
#define ATTN_MAX_DIM 256
#define ATTN_DIMS_PER_LANE (ATTN_MAX_DIM / WARP)
#define ATTN_MAX_PARTITION 1024
// Keys a warp has in flight at once: their loads are independent, so issuing
// them together hides memory latency that one key at a time would serialise.
#define ATTN_UNROLL 4

// The cache holds f32 (attention_partial) or bf16 (attention_partial_bf16, as
// kv.cu's write_kv_bf16 stores it): one body, templated on the element type,
// reads it through this; everything after the load is f32 either way.
__device__ __forceinline__ float kv_load(const float* p, int i) { return p[i]; }
__device__ __forceinline__ float kv_load(const u16* p, int i) { return bf16_to_f32(p[i]); }

// launch: grid (tokens, num_heads, max_partitions), block 128.
// Block (t, h, p) covers keys [first + p*partition_size,
// min(ctx, first + (p+1)*partition_size)) of token t for query head h, in four
// steps: the keys' slots; the scores (a warp per key, lanes split head_dim,
// warp_sum); max, exp and sum over the block; Σ p·v (a warp per key, lanes own
// dims, then the four warps' sums added in a fixed order). Writes
// part_acc[row*head_dim + i] = Σ exp(s - m) v_i and part_ml[row*2..] = {m, Σ exp(s - m)}
// with row = (t*num_heads + h)*max_partitions + p; an empty partition (or a
// token with ctx == 0, or parameters outside the contract: head_dim > 256,
// partition_size > 1024, num_heads not a multiple of kv_heads) writes
// {-inf, 0} and zeros, so attention_reduce outputs zeros for it. The token
// count is not a parameter: the grid's x must be it.
template <typename T>
__device__ __forceinline__ void attention_partial_body(const float* q, const T* kcache, const T* vcache,
                                                       const u32* block_tables, const int* tok_meta, float* part_acc,
                                                       float* part_ml, int num_heads, int kv_heads, int head_dim,
                                                       int block_size, float scale, int partition_size,
                                                       int max_partitions) {
    __shared__ float s_p[ATTN_MAX_PARTITION];  // scores, then exp(score - max)
    __shared__ u32 s_slot[ATTN_MAX_PARTITION];
    __shared__ float s_acc[ATTN_WARPS][ATTN_MAX_DIM];
    __shared__ float scratch[ATTN_WARPS];

    const long long t = blockIdx.x;
    const int h = blockIdx.y, part = blockIdx.z;
    if (h >= num_heads || part >= max_partitions) return;
    const int tid = threadIdx.x, lane = tid % WARP, warp = tid / WARP;
    const long long row = (t * num_heads + h) * max_partitions + part;
    float* acc_out = part_acc + row * head_dim;
    float* ml_out = part_ml + row * 2;

    const int first = tok_meta[t * 3 + 0], ctx = tok_meta[t * 3 + 1], table_off = tok_meta[t * 3 + 2];
    const bool valid = kv_heads > 0 && num_heads % kv_heads == 0 && head_dim > 0 && head_dim <= ATTN_MAX_DIM &&
                       block_size > 0 && partition_size > 0 && partition_size <= ATTN_MAX_PARTITION &&
                       first >= 0 && table_off >= 0;
    const long long start = (long long)first + (long long)part * partition_size;
    const long long stop = start + partition_size;
    const long long end = stop < ctx ? stop : (long long)ctx;
    const int n = (valid && end > start) ? (int)(end - start) : 0;
    if (n == 0) {
        for (int i = tid; i < head_dim; i += ATTN_THREADS) acc_out[i] = 0.0f;
        if (tid == 0) {
            ml_out[0] = -INFINITY;
            ml_out[1] = 0.0f;
        }
        return;
    }

    const int kv_head = h / (num_heads / kv_heads);
    const long long width = (long long)kv_heads * head_dim;
    const long long head_off = (long long)kv_head * head_dim;

    // The block table is read once per key here, not once per key and warp.
    for (int j = tid; j < n; j += ATTN_THREADS) {
        const long long pos = start + j;
        s_slot[j] = block_tables[table_off + pos / block_size] * (u32)block_size + (u32)(pos % block_size);
    }

    // This lane's share of the query: dims lane, lane+32, ...
    const float* qh = q + (t * num_heads + h) * head_dim;
    float qr[ATTN_DIMS_PER_LANE];
    for (int k = 0; k < ATTN_DIMS_PER_LANE; ++k) {
        const int i = lane + WARP * k;
        qr[k] = i < head_dim ? qh[i] : 0.0f;
    }
    __syncthreads();

    // Scores. j0 is the same for the whole warp, so every lane reaches each
    // warp_sum (missing keys contribute a 0 that is never stored).
    for (int j0 = warp * ATTN_UNROLL; j0 < n; j0 += ATTN_WARPS * ATTN_UNROLL) {
        float d[ATTN_UNROLL];
        for (int u = 0; u < ATTN_UNROLL; ++u) {
            d[u] = 0.0f;
            if (j0 + u >= n) continue;
            const T* kr = kcache + (long long)s_slot[j0 + u] * width + head_off;
            for (int k = 0; k < ATTN_DIMS_PER_LANE; ++k) {
                const int i = lane + WARP * k;
                if (i < head_dim) d[u] += qr[k] * kv_load(kr, i);
            }
        }
        for (int u = 0; u < ATTN_UNROLL; ++u) d[u] = warp_sum(d[u]);
        if (lane == 0) {
            for (int u = 0; u < ATTN_UNROLL; ++u)
                if (j0 + u < n) s_p[j0 + u] = d[u] * scale;
        }
    }
    __syncthreads();

    float m = -INFINITY;
    for (int j = tid; j < n; j += ATTN_THREADS) m = fmaxf(m, s_p[j]);
    m = block_max<ATTN_THREADS>(m, scratch);
    float l = 0.0f;
    for (int j = tid; j < n; j += ATTN_THREADS) {
        const float p = expf(s_p[j] - m);
        s_p[j] = p;
        l += p;
    }
    l = block_sum<ATTN_THREADS>(l, scratch);
    __syncthreads();  // every exp(s - m) is in s_p before any warp reads them

    float acc[ATTN_DIMS_PER_LANE];
    for (int k = 0; k < ATTN_DIMS_PER_LANE; ++k) acc[k] = 0.0f;
    for (int j0 = warp * ATTN_UNROLL; j0 < n; j0 += ATTN_WARPS * ATTN_UNROLL) {
        for (int u = 0; u < ATTN_UNROLL; ++u) {
            if (j0 + u >= n) break;
            const float p = s_p[j0 + u];
            const T* vr = vcache + (long long)s_slot[j0 + u] * width + head_off;
            for (int k = 0; k < ATTN_DIMS_PER_LANE; ++k) {
                const int i = lane + WARP * k;
                if (i < head_dim) acc[k] += p * kv_load(vr, i);
            }
        }
    }
    for (int k = 0; k < ATTN_DIMS_PER_LANE; ++k) {
        const int i = lane + WARP * k;
        if (i < head_dim) s_acc[warp][i] = acc[k];
    }
    __syncthreads();
    for (int i = tid; i < head_dim; i += ATTN_THREADS) {
        float a = 0.0f;
        for (int w = 0; w < ATTN_WARPS; ++w) a += s_acc[w][i];
        acc_out[i] = a;
    }
    if (tid == 0) {
        ml_out[0] = m;
        ml_out[1] = l;
    }
}

// launch: as above, over an f32 cache.
extern "C" __global__ void attention_partial(const float* q, const float* kcache, const float* vcache,
                                             const u32* block_tables, const int* tok_meta, float* part_acc,
                                             float* part_ml, int num_heads, int kv_heads, int head_dim,
                                             int block_size, float scale, int partition_size, int max_partitions) {
    attention_partial_body(q, kcache, vcache, block_tables, tok_meta, part_acc, part_ml, num_heads, kv_heads,
                           head_dim, block_size, scale, partition_size, max_partitions);
}

// launch: as attention_partial, over a bf16 cache (keys and values widened to
// f32 as they are read). Its partials go to the same attention_reduce.
extern "C" __global__ void attention_partial_bf16(const float* q, const u16* kcache, const u16* vcache,
                                                  const u32* block_tables, const int* tok_meta, float* part_acc,
                                                  float* part_ml, int num_heads, int kv_heads, int head_dim,
                                                  int block_size, float scale, int partition_size,
                                                  int max_partitions) {
    attention_partial_body(q, kcache, vcache, block_tables, tok_meta, part_acc, part_ml, num_heads, kv_heads,
                           head_dim, block_size, scale, partition_size, max_partitions);
}

// launch: grid (tokens, num_heads), block 128. Block (t, h) merges the
// max_partitions partials of (t, h): with M the largest partition max, each
// partition weighs exp(m_p - M); out[t, h*head_dim + i] =
// Σ_p w_p acc_p[i] / Σ_p w_p l_p. Empty partitions (m = -inf) are skipped, and
// when all are empty (ctx == 0) the output is zeros. Threads own dims; each
// recomputes the same weights in the same order, so no further exchange is
// needed. The token count is not a parameter: the grid's x must be it.
extern "C" __global__ void attention_reduce(const float* part_acc, const float* part_ml, float* out, int num_heads,
                                            int head_dim, int max_partitions) {
    __shared__ float scratch[ATTN_WARPS];
    const long long t = blockIdx.x;
    const int h = blockIdx.y;
    if (h >= num_heads) return;
    const int tid = threadIdx.x;
    const long long row0 = (t * num_heads + h) * max_partitions;
    const float* ml = part_ml + row0 * 2;
    const float* acc = part_acc + row0 * head_dim;
    float* o = out + (t * num_heads + h) * head_dim;

    float m = -INFINITY;
    for (int p = tid; p < max_partitions; p += ATTN_THREADS) m = fmaxf(m, ml[2 * p]);
    const float M = block_max<ATTN_THREADS>(m, scratch);
    for (int i = tid; i < head_dim; i += ATTN_THREADS) {
        float a = 0.0f, L = 0.0f;
        for (int p = 0; p < max_partitions; ++p) {
            const float mp = ml[2 * p];
            if (mp == -INFINITY) continue;
            const float w = expf(mp - M);
            L += ml[2 * p + 1] * w;
            a += acc[(long long)p * head_dim + i] * w;
        }
        // L >= 1 whenever a partition is non-empty (its max term is exp(0)).
        o[i] = L > 0.0f ? a * (1.0f / L) : 0.0f;
    }
}

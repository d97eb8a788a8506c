// Training kernels: the backward of the row-wise ops, attention's backward,
// cross-entropy, dropout and AdamW, and the small tensor utilities training
// needs. Reference semantics: src/backend/cpu/train_ops.rs,
// src/backend/cpu/attention_grad.rs and src/backend/cpu/mod.rs. The
// input-gradient GEMMs go to cuBLAS (src/backend/cuda/gemm.rs); rope's
// backward is ops.cu's rope with direction -1.
//
// Sums run in a different order than on the CPU (per thread, then a tree), so
// reductions agree to rounding; dropout, AdamW and the utilities are bit-exact.

#define TRAIN_THREADS 256

// A product that is never fused into an FMA with the sum it feeds: AdamW
// rounds every step as PyTorch (and the CPU backend) does, and NVRTC contracts
// a*b + c by default (--fmad=true). The emulator's g++ does not contract.
__device__ __forceinline__ float t_mul(float a, float b) {
#ifdef __CUDACC_RTC__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

// ---- row-wise backward ops ----

// launch: grid (rows), block 256. One block per row; any grid works (blocks
// stride over rows). dx += r·(dy·w) − x·(r³·Σ(dy·w·x)/n) with
// r = 1/sqrt(Σx²/n + eps), as the CPU computes it.
extern "C" __global__ void rms_norm_backward(const float* x, const float* w, const float* dy, float* dx, int rows,
                                             int cols, float eps) {
    __shared__ float scratch[TRAIN_THREADS / WARP];
    for (long long r = grid_block_index(); r < rows; r += grid_block_count()) {
        const float* xr = x + r * cols;
        const float* dyr = dy + r * cols;
        float* dxr = dx + r * cols;
        float ss = 0.0f, gx = 0.0f;
        for (int c = threadIdx.x; c < cols; c += TRAIN_THREADS) {
            const float v = xr[c];
            ss += v * v;
            gx += (dyr[c] * w[c]) * v;
        }
        ss = block_sum<TRAIN_THREADS>(ss, scratch);
        gx = block_sum<TRAIN_THREADS>(gx, scratch);
        const float inv = 1.0f / sqrtf(ss / (float)cols + eps);
        const float coef = inv * inv * inv * gx / (float)cols;
        for (int c = threadIdx.x; c < cols; c += TRAIN_THREADS) dxr[c] += inv * (dyr[c] * w[c]) - xr[c] * coef;
    }
}

// launch: grid (ceil(n/256)), block 256. Any grid works (grid-stride loop).
// With s = sigmoid(g): dup = dout·g·s, dgate = dout·up·s·(1 + g·(1 − s)).
extern "C" __global__ void silu_mul_backward(const float* gate, const float* up, const float* dout, float* dgate,
                                             float* dup, long long n) {
    const long long stride = grid_block_count() * blockDim.x;
    for (long long i = grid_block_index() * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float g = gate[i], u = up[i], d = dout[i];
        const float s = 1.0f / (1.0f + expf(-g));
        dup[i] = d * (g * s);
        dgate[i] = d * u * (s * (1.0f + g * (1.0f - s)));
    }
}

// ---- cross-entropy ----

#define TRAIN_ARG_NONE 0xffffffffu

// launch: grid (rows), block 256: one block per row of logits (any vocabulary
// size; threads stride over it); any grid works (blocks stride over rows).
// Per row r with label y = labels[r] (< vocab, checked by the caller):
// loss[r] = (max + log Σ exp(x − max)) − x[y], correct[r] = (first argmax == y)
// (a NaN never wins; a row with no maximum counts argmax 0, as on the CPU),
// and with write_grad the row is overwritten with
// grad_scale · (softmax(x) − onehot(y)). Three passes over the row: maximum
// and first index, Σ exp, then the gradient.
extern "C" __global__ void cross_entropy(float* logits, const u32* labels, int rows, int vocab, int write_grad,
                                         float grad_scale, float* loss, u32* correct) {
    __shared__ float scratch[TRAIN_THREADS / WARP];
    __shared__ u32 s_idx[TRAIN_THREADS];
    const int tid = threadIdx.x;
    for (long long r = grid_block_index(); r < rows; r += grid_block_count()) {
        float* l = logits + r * vocab;
        const u32 label = labels[r];
        // Read before any thread writes the gradient (after the barriers below).
        const float x_label = label < (u32)vocab ? l[label] : u32_as_f32(0x7fc00000u);
        float m = -INFINITY;
        u32 best = TRAIN_ARG_NONE;
        for (int i = tid; i < vocab; i += TRAIN_THREADS) {
            const float v = l[i];
            if (v > m) {
                m = v;
                best = (u32)i;
            }
        }
        const float M = block_max<TRAIN_THREADS>(m, scratch);
        // The least index among threads holding the row's maximum (a tree:
        // indices cannot go through the float-only shuffle exactly).
        s_idx[tid] = (m == M && best != TRAIN_ARG_NONE) ? best : TRAIN_ARG_NONE;
        __syncthreads();
        for (int w = TRAIN_THREADS / 2; w > 0; w >>= 1) {
            if (tid < w && s_idx[tid + w] < s_idx[tid]) s_idx[tid] = s_idx[tid + w];
            __syncthreads();
        }
        float s = 0.0f;
        for (int i = tid; i < vocab; i += TRAIN_THREADS) s += expf(l[i] - M);
        const float S = block_sum<TRAIN_THREADS>(s, scratch);
        if (tid == 0) {
            const u32 arg = s_idx[0] == TRAIN_ARG_NONE ? 0u : s_idx[0];
            loss[r] = (M + logf(S)) - x_label;
            correct[r] = arg == label ? 1u : 0u;
        }
        if (write_grad) {
            const float inv = grad_scale / S;
            for (int i = tid; i < vocab; i += TRAIN_THREADS) {
                float g = expf(l[i] - M) * inv;
                if ((u32)i == label) g -= grad_scale;
                l[i] = g;
            }
        }
        // s_idx[0] is read above before the next row's threads overwrite it.
        __syncthreads();
    }
}

// ---- attention backward ----
//
// Whole sequences of a flattened batch: key j of a sequence is its row
// rows.start + j. q, out, dout, dq are [rows, num_heads*head_dim]; k, v, dk,
// dv are [rows, kv_heads*head_dim]; query head h reads KV head
// h / (num_heads / kv_heads). p = softmax(scale · q·k) is recomputed from q
// and k; with D = dout·out and ds = p·(dout·v − D):
// dq = scale Σ ds k, dk = scale Σ ds q, dv = Σ p dout. Two kernels, no
// atomics: attention_backward_dq walks a query row's keys (and leaves the row's
// softmax statistics), attention_backward_dkv a key row's queries. Every
// dot product is lane-strided partial sums then warp_sum, in the same order in
// both kernels, so both recompute the same p.

#define AB_THREADS 128
#define AB_WARPS (AB_THREADS / WARP)
#define AB_MAX_DIM 256
#define AB_DPL (AB_MAX_DIM / WARP)
#define AB_UNROLL 4

__device__ __forceinline__ bool ab_valid(int num_heads, int kv_heads, int head_dim) {
    return kv_heads > 0 && num_heads % kv_heads == 0 && head_dim > 0 && head_dim <= AB_MAX_DIM;
}

// This lane's share (dims lane, lane+32, ...) of a head vector; zeros past head_dim.
__device__ __forceinline__ void ab_load(const float* p, int head_dim, float (&r)[AB_DPL]) {
    const int lane = (int)threadIdx.x % WARP;
    for (int k = 0; k < AB_DPL; ++k) {
        const int i = lane + WARP * k;
        r[k] = i < head_dim ? p[i] : 0.0f;
    }
}

// This lane's part of a·b over its dims (warp_sum completes it).
__device__ __forceinline__ float ab_dot(const float (&a)[AB_DPL], const float (&b)[AB_DPL]) {
    float s = 0.0f;
    for (int k = 0; k < AB_DPL; ++k) s += a[k] * b[k];
    return s;
}

// The four warps' accumulators summed in warp order into dst[0..head_dim)
// times `mul`. Every thread calls it (it holds barriers).
__device__ __forceinline__ void ab_store_sum(float (&s_acc)[AB_WARPS][AB_MAX_DIM], const float (&acc)[AB_DPL],
                                             float* dst, int head_dim, float mul) {
    const int tid = threadIdx.x, lane = tid % WARP, warp = tid / WARP;
    __syncthreads();  // s_acc is free (a previous use has been read)
    for (int k = 0; k < AB_DPL; ++k) {
        const int i = lane + WARP * k;
        if (i < head_dim) s_acc[warp][i] = acc[k];
    }
    __syncthreads();
    for (int i = tid; i < head_dim; i += AB_THREADS) {
        float a = 0.0f;
        for (int w = 0; w < AB_WARPS; ++w) a += s_acc[w][i];
        dst[i] = mul * a;
    }
}

// launch: grid (rows, num_heads), block 128; any grid works (blocks stride over
// rows in x and heads in y). Block (i, h) handles query row i, head h, whose
// keys are rows [q_meta[2i], q_meta[2i+1]) (causal, cut by a sliding window;
// an empty range, e.g. a row in no sequence, or parameters outside the
// contract, gives dq = 0). Warps take keys j ≡ warp (mod 4), AB_UNROLL at a
// time. Pass 1: the scores and an online max / Σ exp per warp, merged in warp
// order. Pass 2: the scores again, p, ds and dq = scale Σ ds k in registers,
// then the warps' sums in warp order. Writes stats[(i*num_heads + h)*3 ..] =
// {max, 1/Σ exp, D} for attention_backward_dkv.
extern "C" __global__ void attention_backward_dq(const float* q, const float* k, const float* v, const float* out,
                                                 const float* dout, const int* q_meta, float* stats, float* dq,
                                                 int rows, int num_heads, int kv_heads, int head_dim, float scale) {
    __shared__ float s_ml[AB_WARPS][2];
    __shared__ float s_acc[AB_WARPS][AB_MAX_DIM];
    const int tid = threadIdx.x, lane = tid % WARP, warp = tid / WARP;
    const bool valid = ab_valid(num_heads, kv_heads, head_dim);
    for (long long i = blockIdx.x; i < rows; i += gridDim.x) {
        for (int h = blockIdx.y; h < num_heads; h += gridDim.y) {
            const long long qoff = (i * num_heads + h) * head_dim;
            const int lo = q_meta[2 * i], hi = q_meta[2 * i + 1];
            float* st = stats + (i * num_heads + h) * 3;
            if (!valid || hi <= lo) {  // uniform per block: no thread waits at a barrier alone
                for (int c = tid; c < head_dim; c += AB_THREADS) dq[qoff + c] = 0.0f;
                if (tid == 0) {
                    st[0] = -INFINITY;
                    st[1] = 0.0f;
                    st[2] = 0.0f;
                }
                continue;
            }
            const long long kw = (long long)kv_heads * head_dim;
            const long long koff = (long long)(h / (num_heads / kv_heads)) * head_dim;
            float qr[AB_DPL], dor[AB_DPL], orr[AB_DPL];
            ab_load(q + qoff, head_dim, qr);
            ab_load(dout + qoff, head_dim, dor);
            ab_load(out + qoff, head_dim, orr);
            const float D = warp_sum(ab_dot(dor, orr));

            // Pass 1: per warp, an online maximum and Σ exp(s − max).
            float m = -INFINITY, l = 0.0f;
            for (int j0 = lo + warp * AB_UNROLL; j0 < hi; j0 += AB_WARPS * AB_UNROLL) {
                float s[AB_UNROLL];
                for (int u = 0; u < AB_UNROLL; ++u) {
                    s[u] = 0.0f;
                    if (j0 + u >= hi) continue;
                    float kr[AB_DPL];
                    ab_load(k + (long long)(j0 + u) * kw + koff, head_dim, kr);
                    s[u] = ab_dot(qr, kr);
                }
                for (int u = 0; u < AB_UNROLL; ++u) s[u] = warp_sum(s[u]);
                for (int u = 0; u < AB_UNROLL && j0 + u < hi; ++u) {
                    const float x = s[u] * scale;
                    if (x > m) {
                        l = l * expf(m - x) + 1.0f;  // exp(-inf) = 0 for the first key
                        m = x;
                    } else {
                        l += expf(x - m);
                    }
                }
            }
            if (lane == 0) {
                s_ml[warp][0] = m;
                s_ml[warp][1] = l;
            }
            __syncthreads();
            float M = -INFINITY;
            for (int w = 0; w < AB_WARPS; ++w) M = fmaxf(M, s_ml[w][0]);
            float L = 0.0f;
            for (int w = 0; w < AB_WARPS; ++w)
                if (s_ml[w][0] != -INFINITY) L += s_ml[w][1] * expf(s_ml[w][0] - M);
            const float inv = 1.0f / L;

            // Pass 2: p, ds and Σ ds k.
            float acc[AB_DPL];
            for (int c = 0; c < AB_DPL; ++c) acc[c] = 0.0f;
            for (int j0 = lo + warp * AB_UNROLL; j0 < hi; j0 += AB_WARPS * AB_UNROLL) {
                float s[AB_UNROLL], e[AB_UNROLL];
                float kr[AB_UNROLL][AB_DPL];
                for (int u = 0; u < AB_UNROLL; ++u) {
                    s[u] = 0.0f;
                    e[u] = 0.0f;
                    for (int c = 0; c < AB_DPL; ++c) kr[u][c] = 0.0f;
                    if (j0 + u >= hi) continue;
                    const long long off = (long long)(j0 + u) * kw + koff;
                    float vr[AB_DPL];
                    ab_load(k + off, head_dim, kr[u]);
                    ab_load(v + off, head_dim, vr);
                    s[u] = ab_dot(qr, kr[u]);
                    e[u] = ab_dot(dor, vr);
                }
                for (int u = 0; u < AB_UNROLL; ++u) {
                    s[u] = warp_sum(s[u]);
                    e[u] = warp_sum(e[u]);
                }
                for (int u = 0; u < AB_UNROLL && j0 + u < hi; ++u) {
                    const float p = expf(s[u] * scale - M) * inv;
                    const float ds = p * (e[u] - D);
                    for (int c = 0; c < AB_DPL; ++c) acc[c] += ds * kr[u][c];
                }
            }
            // Its barriers also keep the next (i, h) from rewriting s_ml before
            // every thread has read it above.
            ab_store_sum(s_acc, acc, dq + qoff, head_dim, scale);
            if (tid == 0) {
                st[0] = M;
                st[1] = inv;
                st[2] = D;
            }
        }
    }
}

// launch: grid (rows, kv_heads), block 128; any grid works (blocks stride over
// rows in x and KV heads in y). Block (j, g) handles key row j of KV head g,
// seen by query rows [k_meta[2j], k_meta[2j+1]) (an empty range, e.g. a row
// in no sequence, or parameters outside the contract, gives zeros). Its work
// items are (query row, query head of g's group) in row-major order; warps
// take items t ≡ warp (mod 4), AB_UNROLL at a time, recompute p from the
// query's stats (written by attention_backward_dq, which must run first), and
// keep dk and dv in registers; the warps' sums are added in warp order and
// written once.
extern "C" __global__ void attention_backward_dkv(const float* q, const float* k, const float* v, const float* dout,
                                                  const int* k_meta, const float* stats, float* dk, float* dv,
                                                  int rows, int num_heads, int kv_heads, int head_dim, float scale) {
    __shared__ float s_acc[AB_WARPS][AB_MAX_DIM];
    const int tid = threadIdx.x, warp = tid / WARP;
    const bool valid = ab_valid(num_heads, kv_heads, head_dim);
    for (long long j = blockIdx.x; j < rows; j += gridDim.x) {
        for (int g = blockIdx.y; g < kv_heads; g += gridDim.y) {
            const long long kvoff = (j * kv_heads + g) * head_dim;
            const int lo = k_meta[2 * j], hi = k_meta[2 * j + 1];
            if (!valid || hi <= lo) {  // uniform per block
                for (int c = tid; c < head_dim; c += AB_THREADS) {
                    dk[kvoff + c] = 0.0f;
                    dv[kvoff + c] = 0.0f;
                }
                continue;
            }
            const int group = num_heads / kv_heads;
            float kr[AB_DPL], vr[AB_DPL];
            ab_load(k + kvoff, head_dim, kr);
            ab_load(v + kvoff, head_dim, vr);
            float adk[AB_DPL], adv[AB_DPL];
            for (int c = 0; c < AB_DPL; ++c) {
                adk[c] = 0.0f;
                adv[c] = 0.0f;
            }
            const long long items = (long long)(hi - lo) * group;
            for (long long t0 = (long long)warp * AB_UNROLL; t0 < items; t0 += AB_WARPS * AB_UNROLL) {
                float s[AB_UNROLL], e[AB_UNROLL];
                float qr[AB_UNROLL][AB_DPL], dor[AB_UNROLL][AB_DPL];
                long long head_row[AB_UNROLL];
                for (int u = 0; u < AB_UNROLL; ++u) {
                    s[u] = 0.0f;
                    e[u] = 0.0f;
                    head_row[u] = 0;
                    for (int c = 0; c < AB_DPL; ++c) {
                        qr[u][c] = 0.0f;
                        dor[u][c] = 0.0f;
                    }
                    const long long t = t0 + u;
                    if (t >= items) continue;
                    const long long i = lo + t / group;
                    const long long h = (long long)g * group + t % group;
                    head_row[u] = i * num_heads + h;
                    ab_load(q + head_row[u] * head_dim, head_dim, qr[u]);
                    ab_load(dout + head_row[u] * head_dim, head_dim, dor[u]);
                    s[u] = ab_dot(qr[u], kr);
                    e[u] = ab_dot(dor[u], vr);
                }
                for (int u = 0; u < AB_UNROLL; ++u) {
                    s[u] = warp_sum(s[u]);
                    e[u] = warp_sum(e[u]);
                }
                for (int u = 0; u < AB_UNROLL && t0 + u < items; ++u) {
                    const float* st = stats + head_row[u] * 3;
                    const float p = expf(s[u] * scale - st[0]) * st[1];
                    const float sds = scale * (p * (e[u] - st[2]));
                    for (int c = 0; c < AB_DPL; ++c) {
                        adk[c] += sds * qr[u][c];
                        adv[c] += p * dor[u][c];
                    }
                }
            }
            ab_store_sum(s_acc, adk, dk + kvoff, head_dim, 1.0f);
            ab_store_sum(s_acc, adv, dv + kvoff, head_dim, 1.0f);
        }
    }
}

// ---- elementwise and utilities ----

// launch: grid (n), block 256: block i adds src row i to dst row rows[i]. Any
// grid works (blocks stride over rows). The caller guarantees distinct rows,
// each < dst's rows (so no two blocks write one row).
extern "C" __global__ void add_rows(const float* src, const u32* rows, float* dst, int n, int cols) {
    for (long long i = grid_block_index(); i < n; i += grid_block_count()) {
        const float* s = src + i * cols;
        float* d = dst + (long long)rows[i] * cols;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) d[c] += s[c];
    }
}

// Keep-or-drop of element `index`: src/backend/mod.rs's dropout_keep bit for
// bit (SplitMix64 of (seed, index), top 24 bits as a uniform in [0, 1)).
__device__ __forceinline__ bool train_dropout_keep(unsigned long long seed, unsigned long long index, float p) {
    unsigned long long z = seed ^ (index * 0x9E3779B97F4A7C15ull);
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    // z >> 40 < 2^24 converts exactly, and dividing by 2^24 is exact.
    const float u = (float)(u32)(z >> 40) / 16777216.0f;
    return u >= p;
}

// launch: grid (ceil(n/256)), block 256. Any grid works (grid-stride loop).
// out[i] = x[i] · keep_scale where element i is kept, else 0 (keep_scale =
// 1/(1 − p), rounded to f32 by the caller as the CPU does). seed is the u64
// seed's bits.
extern "C" __global__ void dropout(const float* x, float* out, long long n, float p, float keep_scale,
                                   long long seed) {
    const long long stride = grid_block_count() * blockDim.x;
    for (long long i = grid_block_index() * blockDim.x + threadIdx.x; i < n; i += stride) {
        const bool keep = train_dropout_keep((unsigned long long)seed, (unsigned long long)i, p);
        out[i] = keep ? x[i] * keep_scale : 0.0f;
    }
}

// launch: grid (ceil(n/256)), block 256. Any grid works (grid-stride loop).
extern "C" __global__ void copy_f32(const float* x, float* out, long long n) {
    const long long stride = grid_block_count() * blockDim.x;
    for (long long i = grid_block_index() * blockDim.x + threadIdx.x; i < n; i += stride) out[i] = x[i];
}

// launch: grid (ceil(n/256)), block 256. Any grid works (grid-stride loop).
extern "C" __global__ void fill_f32(float* x, long long n, float value) {
    const long long stride = grid_block_count() * blockDim.x;
    for (long long i = grid_block_index() * blockDim.x + threadIdx.x; i < n; i += stride) x[i] = value;
}

// launch: grid (ceil(n/256)), block 256. Any grid works (grid-stride loop).
extern "C" __global__ void scale_f32(float* x, long long n, float s) {
    const long long stride = grid_block_count() * blockDim.x;
    for (long long i = grid_block_index() * blockDim.x + threadIdx.x; i < n; i += stride) x[i] *= s;
}

#define SUMSQ_CHUNK 4096

// launch: grid (ceil(n/4096)), block 256; any grid works (blocks stride over
// chunks). partial[c] = Σ x² over elements [4096c, 4096c + 4096) (each thread
// its strided share, then block_sum); the caller adds the partials in f64.
// partial must hold ceil(n/4096) floats.
extern "C" __global__ void sum_squares_partial(const float* x, long long n, float* partial) {
    __shared__ float scratch[TRAIN_THREADS / WARP];
    const long long chunks = (n + SUMSQ_CHUNK - 1) / SUMSQ_CHUNK;
    for (long long c = grid_block_index(); c < chunks; c += grid_block_count()) {
        const long long end = (c + 1) * SUMSQ_CHUNK < n ? (c + 1) * SUMSQ_CHUNK : n;
        float s = 0.0f;
        for (long long i = c * SUMSQ_CHUNK + threadIdx.x; i < end; i += TRAIN_THREADS) s += x[i] * x[i];
        s = block_sum<TRAIN_THREADS>(s, scratch);
        if (threadIdx.x == 0) partial[c] = s;
    }
}

// launch: grid (ceil(n/256)), block 256. Any grid works (grid-stride loop).
// One AdamW step, src/backend/cpu/train_ops.rs's adamw operation for
// operation (torch's single-tensor path; the scalars come from the host,
// computed there as the CPU computes them): with g = grad·grad_scale,
// m ← lerp(m, g, w1), v ← v·beta2 + w2·g², param ← param·decay −
// step_size · m / (sqrt(v)/bc2_sqrt + eps).
extern "C" __global__ void adamw(float* param, const float* grad, float* m, float* v, long long n, float grad_scale,
                                 float decay, float w1, float w2, float beta2, float bc2_sqrt, float step_size,
                                 float eps) {
    const long long stride = grid_block_count() * blockDim.x;
    for (long long i = grid_block_index() * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float g = grad[i] * grad_scale;
        const float p = param[i] * decay;
        const float mo = m[i];
        // torch.lerp: m + w·(g − m) for a weight below 0.5, else g − (g − m)·(1 − w).
        const float mi = w1 < 0.5f ? mo + t_mul(w1, g - mo) : g - t_mul(g - mo, 1.0f - w1);
        const float vi = t_mul(v[i], beta2) + t_mul(w2, t_mul(g, g));
        const float denom = sqrtf(vi) / bc2_sqrt + eps;
        param[i] = p + t_mul(-step_size, mi / denom);
        m[i] = mi;
        v[i] = vi;
    }
}

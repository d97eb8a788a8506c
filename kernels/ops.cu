// Element-wise and row-wise ops on f32 activations. Reference semantics:
// src/backend/cpu/ops.rs, src/backend/cpu/mod.rs and src/engine/sampler.rs.
// Sums run in a different order than on the CPU (per thread, then a tree), so
// results agree to rounding, not bit for bit.

#define OPS_ROW_THREADS 256

// out = w * (x * 1/sqrt(mean(x^2) + eps)), in that order as on the CPU. `ss` is
// the row's sum of squares.
__device__ __forceinline__ void ops_rms_norm_write(const float* xr, const float* w, float* orow, int cols,
                                                   float ss, float eps) {
    const float inv = 1.0f / sqrtf(ss / (float)cols + eps);
    for (int c = threadIdx.x; c < cols; c += OPS_ROW_THREADS) orow[c] = w[c] * (xr[c] * inv);
}

// launch: grid (rows), block 256. One block per row; any grid works (blocks
// stride over rows).
extern "C" __global__ void rms_norm(const float* x, const float* w, float* out, int rows, int cols, float eps) {
    __shared__ float scratch[OPS_ROW_THREADS / WARP];
    for (long long r = grid_block_index(); r < rows; r += grid_block_count()) {
        const float* xr = x + r * cols;
        float ss = 0.0f;
        for (int c = threadIdx.x; c < cols; c += OPS_ROW_THREADS) ss += xr[c] * xr[c];
        ss = block_sum<OPS_ROW_THREADS>(ss, scratch);
        ops_rms_norm_write(xr, w, out + r * cols, cols, ss, eps);
    }
}

// launch: grid (rows), block 256. The residual add x += y fused with the norm
// of the updated x; each thread re-reads only the x elements it wrote itself.
extern "C" __global__ void add_rms_norm(float* x, const float* y, const float* w, float* out, int rows, int cols,
                                        float eps) {
    __shared__ float scratch[OPS_ROW_THREADS / WARP];
    for (long long r = grid_block_index(); r < rows; r += grid_block_count()) {
        float* xr = x + r * cols;
        const float* yr = y + r * cols;
        float ss = 0.0f;
        for (int c = threadIdx.x; c < cols; c += OPS_ROW_THREADS) {
            const float v = xr[c] + yr[c];
            xr[c] = v;
            ss += v * v;
        }
        ss = block_sum<OPS_ROW_THREADS>(ss, scratch);
        ops_rms_norm_write(xr, w, out + r * cols, cols, ss, eps);
    }
}

// launch: grid (ceil(n/256)), block 256. Any grid works (grid-stride loop).
extern "C" __global__ void add_assign(float* x, const float* y, long long n) {
    const long long stride = grid_block_count() * blockDim.x;
    for (long long i = grid_block_index() * blockDim.x + threadIdx.x; i < n; i += stride) x[i] += y[i];
}

// launch: grid (rows, ceil(cols/256)), block 256: block (r, b) adds bias to
// columns [256b, 256b+256) of row r. Any grid works (blocks stride over rows
// in x and column tiles in y).
extern "C" __global__ void add_bias(float* out, const float* bias, int rows, int cols) {
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        float* orow = out + r * cols;
        for (long long c = (long long)blockIdx.y * blockDim.x + threadIdx.x; c < cols;
             c += (long long)gridDim.y * blockDim.x)
            orow[c] += bias[c];
    }
}

// launch: grid (tokens, heads), block 64: block (t, h) rotates head h of token
// t; threads loop over the d/2 pairs. Any grid works (strides over both).
// The angle is rounded to f32 first, as transformers (and the CPU backend) do;
// cosf/sinf then differ from the CPU's f64 cos/sin by about 1e-7. direction
// is 1 (rope) or -1: the inverse rotation, which is also rope's gradient.
extern "C" __global__ void rope(float* x, const u32* positions, const float* inv_freq, int tokens, int heads,
                                int head_dim, int interleaved, float direction) {
    const int half = head_dim / 2;
    for (long long t = blockIdx.x; t < tokens; t += gridDim.x) {
        const float pos = (float)positions[t];
        for (long long h = blockIdx.y; h < heads; h += gridDim.y) {
            float* xh = x + (t * heads + h) * head_dim;
            for (int i = threadIdx.x; i < half; i += blockDim.x) {
                const float angle = pos * inv_freq[i];
                const float c = cosf(angle), s = direction * sinf(angle);
                const int a = interleaved ? 2 * i : i;
                const int b = interleaved ? 2 * i + 1 : i + half;
                const float x1 = xh[a], x2 = xh[b];
                xh[a] = x1 * c - x2 * s;
                xh[b] = x2 * c + x1 * s;
            }
        }
    }
}

// launch: grid (ceil(n/256)), block 256. Any grid works (grid-stride loop).
extern "C" __global__ void silu_mul(const float* gate, const float* up, float* out, long long n) {
    const long long stride = grid_block_count() * blockDim.x;
    for (long long i = grid_block_index() * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// launch: grid (n), block 256: block i copies row rows[i] of x to row i of out.
// Any grid works (blocks stride over rows). x's row count is not passed: the
// caller guarantees rows[i] < x's rows, as the CPU backend's slice indexing does.
extern "C" __global__ void gather_rows(const float* x, const u32* rows, float* out, int n, int cols) {
    for (long long i = grid_block_index(); i < n; i += grid_block_count()) {
        const float* src = x + (long long)rows[i] * cols;
        float* dst = out + i * cols;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = src[c];
    }
}

// GPTQ act-order weights store their inputs in another order: element j of a
// row multiplies input perm[j]. Reference: CpuBackend::matmul_many and
// matmul_input_grad (src/backend/cpu/mod.rs).
// launch: grid (rows), block 256: block r writes out[r, j] = x[r, perm[j]].
// Any grid works (blocks stride over rows); perm[j] < cols is the caller's.
extern "C" __global__ void gather_cols(const float* x, const u32* perm, float* out, int rows, int cols) {
    for (long long r = grid_block_index(); r < rows; r += grid_block_count()) {
        const float* src = x + r * cols;
        float* dst = out + r * cols;
        for (int j = threadIdx.x; j < cols; j += blockDim.x) dst[j] = src[perm[j]];
    }
}

// launch: grid (rows), block 256: block r adds src[r, j] to dst[r, perm[j]]
// (the input gradient back in natural order). perm is a permutation, so no two
// threads write the same element.
extern "C" __global__ void scatter_add_cols(const float* src, const u32* perm, float* dst, int rows, int cols) {
    for (long long r = grid_block_index(); r < rows; r += grid_block_count()) {
        const float* s = src + r * cols;
        float* d = dst + r * cols;
        for (int j = threadIdx.x; j < cols; j += blockDim.x) d[perm[j]] += s[j];
    }
}

// launch: grid (ceil(n/256)), block 256. Any grid works (grid-stride loop).
extern "C" __global__ void f32_to_bf16_kernel(const float* x, u16* out, long long n) {
    const long long stride = grid_block_count() * blockDim.x;
    for (long long i = grid_block_index() * blockDim.x + threadIdx.x; i < n; i += stride) out[i] = f32_to_bf16(x[i]);
}

// f32 -> IEEE half, round to nearest even, by integer arithmetic (as the `half`
// crate's f16::from_f32): overflow gives infinity, underflow gives subnormals
// or a signed zero, NaNs stay NaN.
__device__ __forceinline__ u16 ops_f32_to_f16(float f) {
    const u32 x = f32_as_u32(f);
    const u32 sign = (x & 0x80000000u) >> 16;
    const u32 exp = x & 0x7f800000u;
    const u32 man = x & 0x007fffffu;
    if (exp == 0x7f800000u) return (u16)(sign | 0x7c00u | (man != 0 ? 0x0200u : 0u) | (man >> 13));
    const int half_exp = (int)(exp >> 23) - 127 + 15;
    if (half_exp >= 0x1f) return (u16)(sign | 0x7c00u);
    if (half_exp <= 0) {
        if (14 - half_exp > 24) return (u16)sign;
        const u32 m = man | 0x00800000u;
        u32 half_man = m >> (14 - half_exp);
        const u32 round_bit = 1u << (13 - half_exp);
        if ((m & round_bit) != 0 && (m & (3u * round_bit - 1u)) != 0) half_man += 1;
        return (u16)(sign | half_man);
    }
    const u32 h = sign | ((u32)half_exp << 10) | (man >> 13);
    // A carry out of the mantissa correctly bumps the exponent (up to infinity).
    const u32 round_bit = 0x00001000u;
    return (u16)(((man & round_bit) != 0 && (man & (3u * round_bit - 1u)) != 0) ? h + 1 : h);
}

// launch: grid (ceil(n/256)), block 256. Any grid works (grid-stride loop).
extern "C" __global__ void f32_to_f16_kernel(const float* x, u16* out, long long n) {
    const long long stride = grid_block_count() * blockDim.x;
    for (long long i = grid_block_index() * blockDim.x + threadIdx.x; i < n; i += stride) out[i] = ops_f32_to_f16(x[i]);
}

#define ARGMAX_NONE 0xffffffffu

// launch: grid (rows), block 256: one block per row of logits; any grid works
// (blocks stride over rows). Writes idx[r] (the first index of the max, as
// sampler.rs's argmax: a NaN never wins, except that a NaN at index 0 makes the
// answer 0 as there), max_out[r] (the max over non-NaN logits) and lse_out[r] =
// log(sum(exp(l - max))) + max (NaN if any logit is NaN, as in sampler.rs's
// logprobs; -inf when every logit is -inf). One pass over the row: each thread
// keeps an online (max, first index, sum of exp) over its elements.
extern "C" __global__ void argmax_logsumexp(const float* logits, int rows, int vocab, u32* idx, float* max_out,
                                            float* lse_out) {
    __shared__ float scratch[OPS_ROW_THREADS / WARP];
    __shared__ u32 s_idx[OPS_ROW_THREADS];
    const int tid = threadIdx.x;
    for (long long r = grid_block_index(); r < rows; r += grid_block_count()) {
        const float* l = logits + r * vocab;
        float m = -INFINITY, s = 0.0f;
        u32 best = ARGMAX_NONE;
        for (int i = tid; i < vocab; i += OPS_ROW_THREADS) {
            const float v = l[i];
            if (v > m) {
                // The old terms were relative to m; exp(-inf - v) = 0 for the first.
                s = s * expf(m - v) + 1.0f;
                m = v;
                best = (u32)i;
            } else if (v != -INFINITY) {
                s += expf(v - m);  // a NaN v propagates into the sum
            }
        }
        const float M = block_max<OPS_ROW_THREADS>(m, scratch);
        // A thread that saw only -inf (and maybe NaN) has m = -inf: its terms
        // are zero, or NaN which must carry through (NaN * 0 = NaN).
        const float term = (m == -INFINITY) ? s * 0.0f : s * expf(m - M);
        const float S = block_sum<OPS_ROW_THREADS>(term, scratch);
        // Each thread's `best` is its first index holding its max; the answer is
        // the least of those whose max is the row's (a tree: indices cannot go
        // through the float-only shuffle exactly).
        s_idx[tid] = (m == M && best != ARGMAX_NONE) ? best : ARGMAX_NONE;
        __syncthreads();
        for (int w = OPS_ROW_THREADS / 2; w > 0; w >>= 1) {
            if (tid < w && s_idx[tid + w] < s_idx[tid]) s_idx[tid] = s_idx[tid + w];
            __syncthreads();
        }
        if (tid == 0) {
            u32 arg = s_idx[0];
            if (arg == ARGMAX_NONE || (vocab > 0 && l[0] != l[0])) arg = 0;
            idx[r] = arg;
            max_out[r] = M;
            lse_out[r] = M + logf(S);
        }
        // s_idx[0] is read above before the next row's threads overwrite it.
        __syncthreads();
    }
}

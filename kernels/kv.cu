// Paged KV cache writes. Reference: CpuBackend::write_kv in
// src/backend/cpu/mod.rs. One layer's cache is [num_slots, width] with
// width = kv_heads * head_dim and slot = block * block_size + offset. The
// cache holds f32 (write_kv) or bf16 (write_kv_bf16, half the bytes): one
// body, templated on the element type.

__device__ __forceinline__ void kv_store(float* p, long long i, float x) { p[i] = x; }
// Round to nearest even, as half::bf16::from_f32.
__device__ __forceinline__ void kv_store(u16* p, long long i, float x) { p[i] = f32_to_bf16(x); }

template <typename T>
__device__ __forceinline__ void write_kv_rows(const float* k, const float* v, T* kcache, T* vcache, const u32* slots,
                                              int tokens, int width) {
    for (long long t = grid_block_index(); t < tokens; t += grid_block_count()) {
        const long long dst = (long long)slots[t] * width;
        const long long src = t * width;
        for (int c = threadIdx.x; c < width; c += blockDim.x) {
            kv_store(kcache, dst + c, k[src + c]);
            kv_store(vcache, dst + c, v[src + c]);
        }
    }
}

// launch: grid (tokens), block 256: block t copies token t's key and value rows
// to slot slots[t] of kcache / vcache (which point at the layer's base). Any
// grid works (blocks stride over tokens). The cache's slot count is not
// passed: the caller guarantees slots[t] < num_slots (the CPU backend panics
// on a slot out of range).
extern "C" __global__ void write_kv(const float* k, const float* v, float* kcache, float* vcache, const u32* slots,
                                   int tokens, int width) {
    write_kv_rows(k, v, kcache, vcache, slots, tokens, width);
}

// launch: as write_kv, into a bf16 cache: each value stored as f32_to_bf16.
extern "C" __global__ void write_kv_bf16(const float* k, const float* v, u16* kcache, u16* vcache, const u32* slots,
                                        int tokens, int width) {
    write_kv_rows(k, v, kcache, vcache, slots, tokens, width);
}

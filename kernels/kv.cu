// Paged KV cache writes. Reference: CpuBackend::write_kv in
// src/backend/cpu/mod.rs. One layer's cache is [num_slots, width] with
// width = kv_heads * head_dim and slot = block * block_size + offset.

// launch: grid (tokens), block 256: block t copies token t's key and value rows
// to slot slots[t] of kcache / vcache (which point at the layer's base). Any
// grid works (blocks stride over tokens). The cache's slot count is not
// passed: the caller guarantees slots[t] < num_slots (the CPU backend panics
// on a slot out of range).
extern "C" __global__ void write_kv(const float* k, const float* v, float* kcache, float* vcache, const u32* slots,
                                   int tokens, int width) {
    for (long long t = grid_block_index(); t < tokens; t += grid_block_count()) {
        const long long dst = (long long)slots[t] * width;
        const long long src = t * width;
        for (int c = threadIdx.x; c < width; c += blockDim.x) {
            kcache[dst + c] = k[src + c];
            vcache[dst + c] = v[src + c];
        }
    }
}

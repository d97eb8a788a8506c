// CPU shim that lets g++ compile the CUDA kernels in kernels/*.cu unchanged, so
// their numerics can be checked without a GPU (tests/cuda_kernels_emu.rs).
//
// Model: one launch = the blocks of the grid run one after another; the threads
// of a block are real std::threads running concurrently, so `__shared__` can be
// `static` (one block owns it at a time) and `__syncthreads` is a barrier. The
// same std::threads are reused for every block of a launch. Warp shuffles and
// the tensor-core mma meet at a per-warp barrier. Misuse that a GPU would
// silently tolerate or hang on (a thread leaving the kernel while others wait
// in __syncthreads, a partial-mask shuffle, a deadlock) aborts with a message
// instead.
#pragma once

#include <math.h>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __shared__ static
#define __constant__ static
#define __launch_bounds__(...)
#ifndef INFINITY
#define INFINITY (__builtin_inff())
#endif

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline dim3 gridDim;
inline dim3 blockDim;

// CUDA math that <cmath> lacks, and the integer min/max CUDA puts in scope.
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline float __uint_as_float(unsigned int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float f) { int v; std::memcpy(&v, &f, 4); return v; }
inline unsigned int __float_as_uint(float f) { unsigned int v; std::memcpy(&v, &f, 4); return v; }

namespace emu {

[[noreturn]] inline void die(const char* what) {
  std::fprintf(stderr, "kernel-emu: %s (block %u,%u,%u thread %u,%u,%u)\n", what, blockIdx.x, blockIdx.y,
               blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
  std::fflush(stderr);
  std::_Exit(3);
}

// What each thread of the running block is doing (for the deadlock report).
enum State : int { RUNNING = 0, IN_SYNCTHREADS = 1, IN_SHUFFLE = 2, FINISHED = 3 };

struct Warp {
  unsigned lanes = 32;
  uint64_t slot[32] = {};
  uint32_t mma_a[32][4] = {};  // each lane's mma fragments (mma_bf16_16816)
  uint32_t mma_b[32][2] = {};
  std::unique_ptr<std::barrier<>> bar;
};

struct Block {
  unsigned threads = 0;
  std::vector<int> tag;  // per thread: IN_SYNCTHREADS or FINISHED at the barrier
  std::vector<std::atomic<int>> state;
  std::vector<Warp> warps;
  struct Check {
    Block* b;
    void operator()() noexcept {
      // Every thread must arrive at the same kind of barrier: a thread that has
      // left the kernel must not be counted as reaching a __syncthreads.
      int first = b->tag[0];
      for (unsigned i = 1; i < b->threads; i++)
        if (b->tag[i] != first) {
          unsigned in_sync = 0;
          for (unsigned j = 0; j < b->threads; j++) in_sync += b->tag[j] == IN_SYNCTHREADS;
          std::fprintf(stderr,
                       "kernel-emu: divergent __syncthreads: %u of %u threads wait in __syncthreads while "
                       "the others have returned from the kernel (block %u,%u,%u)\n",
                       in_sync, b->threads, blockIdx.x, blockIdx.y, blockIdx.z);
          std::_Exit(3);
        }
    }
  };
  std::unique_ptr<std::barrier<Check>> bar;
};

inline Block g_block;
inline thread_local unsigned t_linear;

inline void block_barrier(int tag) {
  g_block.tag[t_linear] = tag;
  g_block.state[t_linear].store(tag, std::memory_order_relaxed);
  g_block.bar->arrive_and_wait();
  g_block.state[t_linear].store(RUNNING, std::memory_order_relaxed);
}

template <class T>
inline T shfl_xor(unsigned mask, T v, int lane_mask, int width) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of an unsupported type");
  if (mask != 0xffffffffu) die("__shfl_xor_sync with a mask other than 0xffffffff");
  if (width != 32) die("__shfl_xor_sync with a width other than 32");
  Warp& w = g_block.warps[t_linear / 32];
  unsigned lane = t_linear % 32;
  unsigned partner = lane ^ (unsigned)(lane_mask & 31);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  g_block.state[t_linear].store(IN_SHUFFLE, std::memory_order_relaxed);
  w.slot[lane] = bits;
  w.bar->arrive_and_wait();
  uint64_t got = partner < w.lanes ? w.slot[partner] : bits;
  w.bar->arrive_and_wait();
  g_block.state[t_linear].store(RUNNING, std::memory_order_relaxed);
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}

inline float bf16_bits_to_f32(uint32_t h) {
  uint32_t u = (h & 0xffffu) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 for one warp (common.cuh's
// mma_bf16_16816): every lane publishes its fragments, the warp meets, each lane
// rebuilds the whole A (16x16) and B (16x8) from all 32 lanes by the PTX ISA's
// formulas (section "Matrix Fragments for mma.m16n8k16 with floating point
// type"; common.cuh spells out the mapping) and computes its own four outputs
// of D = A·B + C: f32 sums of the (exact) bf16 products in k order, then + C.
// The second meeting keeps a fast lane's next mma from overwriting fragments a
// slow lane has yet to read.
inline void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  Warp& w = g_block.warps[t_linear / 32];
  if (w.lanes != 32) die("mma.sync in a warp of fewer than 32 threads");
  const unsigned lane = t_linear % 32;
  g_block.state[t_linear].store(IN_SHUFFLE, std::memory_order_relaxed);
  std::memcpy(w.mma_a[lane], a, sizeof a);
  std::memcpy(w.mma_b[lane], b, sizeof b);
  w.bar->arrive_and_wait();
  float A[16][16], B[16][8];
  for (unsigned l = 0; l < 32; l++) {
    const unsigned g = l >> 2, t = l & 3;  // groupID, threadID_in_group
    for (unsigned i = 0; i < 8; i++) {     // a_i: register i/2, half i%2
      const unsigned row = g + ((i & 2) ? 8 : 0), col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = bf16_bits_to_f32(w.mma_a[l][i / 2] >> (16 * (i & 1)));
    }
    for (unsigned i = 0; i < 4; i++) {  // b_i: register i/2, half i%2
      const unsigned k = 2 * t + (i & 1) + (i >= 2 ? 8 : 0), n = g;
      B[k][n] = bf16_bits_to_f32(w.mma_b[l][i / 2] >> (16 * (i & 1)));
    }
  }
  w.bar->arrive_and_wait();
  g_block.state[t_linear].store(RUNNING, std::memory_order_relaxed);
  const unsigned g = lane >> 2, t = lane & 3;
  for (unsigned i = 0; i < 4; i++) {  // c_i / d_i
    const unsigned row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    float s = 0.0f;
    for (unsigned k = 0; k < 16; k++) s += A[row][k] * B[k][col];
    d[i] += s;
  }
}

}  // namespace emu

inline void __syncthreads() { emu::block_barrier(emu::IN_SYNCTHREADS); }

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return emu::shfl_xor(mask, v, lane_mask, width);
}

namespace emu {

inline std::atomic<bool> g_done{false};

// Kills a launch that makes no progress (a shuffle some lanes of a warp never
// reach, an endless loop) and says where the threads are.
inline void start_watchdog(double seconds) {
  std::thread([seconds] {
    auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
    while (!g_done.load()) {
      if (std::chrono::steady_clock::now() > until) {
        unsigned n[4] = {0, 0, 0, 0};
        for (unsigned i = 0; i < g_block.threads; i++) n[g_block.state[i].load() & 3]++;
        std::fprintf(stderr,
                     "kernel-emu: no progress after %.0f s (deadlock?): %u threads running, %u in "
                     "__syncthreads, %u in __shfl_xor_sync or mma, %u returned from the kernel\n",
                     seconds, n[RUNNING], n[IN_SYNCTHREADS], n[IN_SHUFFLE], n[FINISHED]);
        std::fflush(stderr);
        std::_Exit(4);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }).detach();
}

// Runs `body()` (one kernel invocation) for every thread of every block.
template <class F>
void launch(dim3 grid, dim3 block, F&& body) {
  gridDim = grid;
  blockDim = block;
  unsigned n = block.x * block.y * block.z;
  Block& b = g_block;
  b.threads = n;
  b.tag.assign(n, RUNNING);
  b.state = std::vector<std::atomic<int>>(n);
  b.warps = std::vector<Warp>((n + 31) / 32);
  for (unsigned w = 0; w < b.warps.size(); w++) {
    b.warps[w].lanes = n - 32 * w < 32 ? n - 32 * w : 32;
    b.warps[w].bar = std::make_unique<std::barrier<>>(b.warps[w].lanes);
  }
  b.bar = std::make_unique<std::barrier<Block::Check>>(n, Block::Check{&b});
  std::vector<std::thread> pool;
  pool.reserve(n);
  for (unsigned t = 0; t < n; t++) {
    pool.emplace_back([&, t] {
      t_linear = t;
      threadIdx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
      for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
          for (unsigned x = 0; x < grid.x; x++) {
            blockIdx = uint3{x, y, z};
            body();
            // The block ends when all its threads have returned: only then may the
            // next block reuse the statics that stand for shared memory.
            block_barrier(FINISHED);
          }
    });
  }
  for (auto& th : pool) th.join();
}

}  // namespace emu

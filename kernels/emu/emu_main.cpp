// kernel-emu: runs one kernel of kernels/*.cu on the CPU (see cuda_emu.h).
//
//   kernel-emu <kernel> <gx,gy,gz> <bx,by,bz> <arg>...
//   arg: b:<file>  the file's bytes as a device buffer (written back after the run)
//        i:<int> | l:<int64> | f:<float> | n (null pointer)
//        a:<k1>,<k2>,...  a buffer of the u64 addresses of the k-th b: arguments
//   Arguments after the kernel's parameters may only be b: buffers: buffers that
//   are no parameter themselves but are reached through an a: table.
//
// Each kernels/<module>.cu is compiled as NVRTC compiles it: common.cuh followed
// by the module, here inside a namespace of its own, so helpers and macros of
// one module cannot collide with another's. The table below spells out every
// kernel's signature from kernels/*.cu; a kernel whose parameters differ
// does not compile. Build: g++ -O2 -std=c++20 -pthread emu_main.cpp
#include "cuda_emu.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <functional>
#include <map>
#include <string>
#include <tuple>
#include <utility>

#ifdef EMU_SELFTEST
#include EMU_SELFTEST
#else
namespace emu_ops {
#include "../common.cuh"
#include "../ops.cu"
}  // namespace emu_ops
namespace emu_kv {
#include "../common.cuh"
#include "../kv.cu"
}  // namespace emu_kv
namespace emu_attention {
#include "../common.cuh"
#include "../attention.cu"
}  // namespace emu_attention
namespace emu_lora {
#include "../common.cuh"
#include "../lora.cu"
}  // namespace emu_lora
namespace emu_quant {
#include "../common.cuh"
#include "../quant.cu"
}  // namespace emu_quant
namespace emu_train {
#include "../common.cuh"
#include "../train.cu"
}  // namespace emu_train
#endif

namespace {

using u8 = unsigned char;
using u16 = unsigned short;
using u32 = unsigned int;
using u64 = unsigned long long;

[[noreturn]] void fail(const std::string& msg) {
  std::fprintf(stderr, "kernel-emu: %s\n", msg.c_str());
  std::exit(2);
}

// A device buffer: its bytes end right before a PROT_NONE page, so a read or
// write past the (8-byte padded) end faults instead of passing unnoticed.
struct Buffer {
  std::string path;  // empty for a:-buffers
  size_t size = 0;
  unsigned char* data = nullptr;
};

Buffer alloc_buffer(size_t size) {
  static const size_t page = (size_t)sysconf(_SC_PAGESIZE);
  size_t padded = (size + 7) / 8 * 8;
  size_t body = (padded + page - 1) / page * page;
  void* m = mmap(nullptr, body + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) fail("out of memory for a buffer of " + std::to_string(size) + " bytes");
  unsigned char* base = (unsigned char*)m;
  if (mprotect(base + body, page, PROT_NONE) != 0) fail("mprotect failed");
  Buffer b;
  b.size = size;
  b.data = base + body - padded;  // zero filled by mmap: the padding reads as zeros
  return b;
}

Buffer load_buffer(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) fail("cannot open " + path);
  std::fseek(f, 0, SEEK_END);
  long n = std::ftell(f);
  std::fseek(f, 0, SEEK_SET);
  Buffer b = alloc_buffer((size_t)n);
  if (n > 0 && std::fread(b.data, 1, (size_t)n, f) != (size_t)n) fail("cannot read " + path);
  std::fclose(f);
  b.path = path;
  return b;
}

void store_buffer(const Buffer& b) {
  FILE* f = std::fopen(b.path.c_str(), "wb");
  if (!f || (b.size > 0 && std::fwrite(b.data, 1, b.size, f) != b.size)) fail("cannot write " + b.path);
  std::fclose(f);
}

struct Ctx {
  std::vector<Buffer> bufs;  // b: arguments in order
  std::vector<Buffer> addr_bufs;
};

long long parse_int(const std::string& s, const char* what) {
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(s.c_str(), &end, 0);
  if (s.empty() || *end || errno) fail(std::string("bad ") + what + " '" + s + "'");
  return v;
}

template <class T>
const char* type_name() {
  if constexpr (std::is_pointer_v<T>) return "pointer";
  else if constexpr (std::is_same_v<T, int>) return "int (i:)";
  else if constexpr (std::is_same_v<T, long long>) return "long long (l:)";
  else if constexpr (std::is_same_v<T, float>) return "float (f:)";
  else return "?";
}

// One kernel argument, parsed for the parameter type T.
template <class T>
T parse_arg(Ctx& ctx, const std::string& a, size_t pos) {
  auto bad = [&](const char* why) -> T {
    fail("argument " + std::to_string(pos) + " '" + a + "': " + why + "; the kernel expects " + type_name<T>());
  };
  std::string tag = a.substr(0, 2), rest = a.size() > 2 ? a.substr(2) : "";
  if constexpr (std::is_pointer_v<T>) {
    if (a == "n") return nullptr;
    if (tag == "b:") return nullptr;  // set to the buffer's address by parse_all
    if (tag == "a:") {
      using P = std::remove_cv_t<std::remove_pointer_t<T>>;
      if (!std::is_same_v<P, u64>) return bad("a: is only for unsigned long long* parameters");
      std::vector<u64> addrs;
      size_t start = 0;
      while (start <= rest.size()) {
        size_t comma = rest.find(',', start);
        std::string item = rest.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
        long long k = parse_int(item, "buffer index");
        if (k < 0 || (size_t)k >= ctx.bufs.size()) return bad("buffer index out of range");
        addrs.push_back((u64)(uintptr_t)ctx.bufs[(size_t)k].data);
        if (comma == std::string::npos) break;
        start = comma + 1;
      }
      Buffer b = alloc_buffer(addrs.size() * 8);
      std::memcpy(b.data, addrs.data(), addrs.size() * 8);
      ctx.addr_bufs.push_back(b);
      return reinterpret_cast<T>(b.data);
    }
    return bad("not a pointer argument");
  } else if constexpr (std::is_same_v<T, int>) {
    if (tag != "i:") return bad("not an i: argument");
    long long v = parse_int(rest, "int");
    if (v < INT32_MIN || v > INT32_MAX) return bad("out of range for int");
    return (int)v;
  } else if constexpr (std::is_same_v<T, long long>) {
    if (tag != "l:") return bad("not an l: argument");
    return parse_int(rest, "int64");
  } else if constexpr (std::is_same_v<T, float>) {
    if (tag != "f:") return bad("not an f: argument");
    char* end = nullptr;
    float v = std::strtof(rest.c_str(), &end);
    if (rest.empty() || *end) return bad("not a float");
    return v;
  } else {
    static_assert(sizeof(T) == 0, "kernel parameter type without a parser");
  }
}

using Runner = std::function<void(Ctx&, const std::vector<std::string>&, dim3, dim3)>;

template <class... A, size_t... I>
std::tuple<A...> parse_all(Ctx& ctx, const std::vector<std::string>& args, std::index_sequence<I...>) {
  std::tuple<A...> t{parse_arg<A>(ctx, args[I], I)...};
  // b: arguments become the address of their buffer, in order of appearance.
  size_t k = 0;
  auto fix = [&](auto& slot, const std::string& a) {
    using T = std::remove_reference_t<decltype(slot)>;
    if constexpr (std::is_pointer_v<T>) {
      if (a.rfind("b:", 0) == 0) slot = reinterpret_cast<T>(ctx.bufs[k].data);
    }
    if (a.rfind("b:", 0) == 0) k++;
  };
  (fix(std::get<I>(t), args[I]), ...);
  return t;
}

// Checks the kernel against the spec's signature (A... spelled in the table)
// and returns a runner that parses arguments into exactly those types.
template <class... A>
Runner entry(void (*kernel)(A...)) {
  return [kernel](Ctx& ctx, const std::vector<std::string>& args, dim3 grid, dim3 block) {
    // Arguments past the kernel's parameters may only be b: buffers that a:
    // arguments point at (LoRA matrices reached through address tables).
    bool extra_ok = args.size() >= sizeof...(A);
    for (size_t i = sizeof...(A); extra_ok && i < args.size(); i++) extra_ok = args[i].rfind("b:", 0) == 0;
    if (!extra_ok)
      fail("expected " + std::to_string(sizeof...(A)) + " kernel arguments (then only extra b: buffers), got " +
           std::to_string(args.size()));
    auto t = parse_all<A...>(ctx, args, std::index_sequence_for<A...>{});
    emu::launch(grid, block, [&] { std::apply(kernel, t); });
  };
}

// clang-format off
#define K(ns, name, ...) {#name, entry<__VA_ARGS__>(&ns::name)}
std::map<std::string, Runner> kernels() {
#ifdef EMU_SELFTEST
  return {EMU_SELFTEST_TABLE};
#else
  return {
    K(emu_ops, rms_norm, const float*, const float*, float*, int, int, float),
    K(emu_ops, add_rms_norm, float*, const float*, const float*, float*, int, int, float),
    K(emu_ops, add_assign, float*, const float*, long long),
    K(emu_ops, add_bias, float*, const float*, int, int),
    K(emu_ops, rope, float*, const u32*, const float*, int, int, int, int, float),
    K(emu_ops, silu_mul, const float*, const float*, float*, long long),
    K(emu_ops, gather_rows, const float*, const u32*, float*, int, int),
    K(emu_ops, gather_cols, const float*, const u32*, float*, int, int),
    K(emu_ops, scatter_add_cols, const float*, const u32*, float*, int, int),
    K(emu_ops, f32_to_bf16_kernel, const float*, u16*, long long),
    K(emu_ops, f32_to_f16_kernel, const float*, u16*, long long),
    K(emu_ops, argmax_logsumexp, const float*, int, int, u32*, float*, float*),
    K(emu_kv, write_kv, const float*, const float*, float*, float*, const u32*, int, int),
    K(emu_kv, write_kv_bf16, const float*, const float*, u16*, u16*, const u32*, int, int),
    K(emu_attention, attention_partial, const float*, const float*, const float*, const u32*, const int*,
      float*, float*, int, int, int, int, float, int, int),
    K(emu_attention, attention_partial_bf16, const float*, const u16*, const u16*, const u32*, const int*,
      float*, float*, int, int, int, int, float, int, int),
    K(emu_attention, attention_reduce, const float*, const float*, float*, int, int, int),
    K(emu_lora, lora_shrink_f32, const float*, const int*, const u64*, const int*, float*, int, int, int),
    K(emu_lora, lora_expand_f32, const float*, const int*, const u64*, const int*, float*, int, int, int),
    K(emu_lora, lora_shrink_bf16, const float*, const int*, const u64*, const int*, float*, int, int, int),
    K(emu_lora, lora_expand_bf16, const float*, const int*, const u64*, const int*, float*, int, int, int),
#define QUANT(kind) \
    K(emu_quant, gemv_##kind, const u8*, const float*, const float*, float*, int, int, int, int), \
    K(emu_quant, dequant_bf16_##kind, const u8*, u16*, int, int, int), \
    K(emu_quant, dequant_rows_##kind, const u8*, const u32*, float*, int, int, int, int)
    QUANT(f32), QUANT(f16), QUANT(bf16), QUANT(q4_0), QUANT(q5_0), QUANT(q8_0),
    QUANT(q4_k), QUANT(q5_k), QUANT(q6_k), QUANT(nf4), QUANT(fp4),
    QUANT(int4g128), QUANT(int4g64), QUANT(int4g32),
#undef QUANT
#define MMQ(kind) K(emu_quant, mmq_##kind, const u8*, const float*, const float*, float*, int, int, int, int)
    MMQ(q4_0), MMQ(q5_0), MMQ(q8_0), MMQ(q4_k), MMQ(q5_k), MMQ(q6_k), MMQ(nf4), MMQ(fp4),
    MMQ(int4g128), MMQ(int4g64), MMQ(int4g32),
#undef MMQ
    K(emu_train, rms_norm_backward, const float*, const float*, const float*, float*, int, int, float),
    K(emu_train, silu_mul_backward, const float*, const float*, const float*, float*, float*, long long),
    K(emu_train, cross_entropy, float*, const u32*, int, int, int, float, float*, u32*),
    K(emu_train, attention_backward_dq, const float*, const float*, const float*, const float*, const float*,
      const int*, float*, float*, int, int, int, int, float),
    K(emu_train, attention_backward_dkv, const float*, const float*, const float*, const float*, const int*,
      const float*, float*, float*, int, int, int, int, float),
    K(emu_train, add_rows, const float*, const u32*, float*, int, int),
    K(emu_train, dropout, const float*, float*, long long, float, float, long long),
    K(emu_train, copy_f32, const float*, float*, long long),
    K(emu_train, fill_f32, float*, long long, float),
    K(emu_train, scale_f32, float*, long long, float),
    K(emu_train, sum_squares_partial, const float*, long long, float*),
    K(emu_train, adamw, float*, const float*, float*, float*, long long, float, float, float, float, float, float,
      float, float),
  };
#endif
}
#undef K
// clang-format on

dim3 parse_dim(const std::string& s, const char* what) {
  unsigned v[3];
  size_t start = 0;
  for (int i = 0; i < 3; i++) {
    size_t comma = s.find(',', start);
    if ((i < 2) != (comma != std::string::npos)) fail(std::string("bad ") + what + " '" + s + "' (want x,y,z)");
    long long x = parse_int(s.substr(start, comma == std::string::npos ? std::string::npos : comma - start), what);
    if (x < 1 || x > (1ll << 31)) fail(std::string(what) + " dimension out of range in '" + s + "'");
    v[i] = (unsigned)x;
    start = comma + 1;
  }
  return dim3(v[0], v[1], v[2]);
}

void on_segv(int) {
  const char msg[] =
      "kernel-emu: segmentation fault: an out-of-bounds access? (every buffer ends at a guard page)\n";
  ssize_t r = write(2, msg, sizeof msg - 1);
  (void)r;
  _exit(5);
}

}  // namespace

int main(int argc, char** argv) {
  auto table = kernels();
  if (argc == 2 && std::string(argv[1]) == "--list") {
    for (auto& [name, _] : table) std::printf("%s\n", name.c_str());
    return 0;
  }
  if (argc < 4) fail("usage: kernel-emu <kernel> <gx,gy,gz> <bx,by,bz> <arg>...  (or --list)");
  auto it = table.find(argv[1]);
  if (it == table.end()) fail(std::string("unknown kernel '") + argv[1] + "' (--list shows them)");
  dim3 grid = parse_dim(argv[2], "grid"), block = parse_dim(argv[3], "block");
  unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
  if (threads > 1024) fail("more than 1024 threads per block");
  std::vector<std::string> args(argv + 4, argv + argc);
  Ctx ctx;
  for (auto& a : args)
    if (a.rfind("b:", 0) == 0) ctx.bufs.push_back(load_buffer(a.substr(2)));
  signal(SIGSEGV, on_segv);
  signal(SIGBUS, on_segv);
  const char* t = std::getenv("KERNEL_EMU_TIMEOUT_S");
  emu::start_watchdog(t ? std::atof(t) : 120.0);
  it->second(ctx, args, grid, block);
  emu::g_done = true;
  for (auto& b : ctx.bufs) store_buffer(b);
  return 0;
}

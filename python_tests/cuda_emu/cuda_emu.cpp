// The runtime of the CUDA emulation (see cuda_emu.h): a grid runs block after
// block; the threads of a block are fibers on one OS thread that run, round
// robin, until each blocks at a barrier (__syncthreads or a warp shuffle) or
// exits. A barrier releases when every thread it needs has arrived, after a
// check that they all arrived at the same call site; a block in which no
// fiber can run before all have exited is a deadlock on a GPU (or UB), and
// stops the launch with a message.
//
// Fibers start through makecontext / setcontext and then switch with
// _setjmp / _longjmp, which (unlike swapcontext) makes no system call.
#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cuda_emu.h"

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace cuda_emu {
namespace {

constexpr int kMaxThreads = 1024;
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr std::size_t kStackBytes = 128 * 1024;
constexpr std::size_t kSlotBytes = 16;

enum class State { kRunnable, kAtSync, kAtShuffle, kExited };

struct Fiber {
  jmp_buf context;
  ucontext_t start;
  char* stack = nullptr;  // kStackBytes above a guard page
  bool started = false;
  // The emulated thread it runs in the current block.
  uint3 tid;
  int linear = 0;
  State state = State::kRunnable;
  const char* file = nullptr;  // call site of the barrier it waits at
  int line = 0;
  unsigned long long syncs = 0;
  // A pending shuffle.
  unsigned mask = 0;
  ShflKind kind = ShflKind::kIdx;
  int arg = 0, width = 32;
  std::size_t size = 0;
  void* out = nullptr;
};

Fiber* fibers = nullptr;  // kMaxThreads, created on first use
jmp_buf scheduler_context;
Fiber* current = nullptr;
const std::function<void()>* thread_body = nullptr;
bool in_launch = false;

unsigned char slots[kMaxWarps][32][kSlotBytes];
int warp_waiting[kMaxWarps];
int sync_waiting = 0;
int block_threads = 0;

unsigned long long block_serial = 0;
std::vector<std::pair<void*, unsigned long long>> shared_touched;

cudaError_t last_error = cudaSuccess;
std::string error_message;  // the latest failure, until taken
std::string failure;        // set inside a block: stop it
int schedule_mode = 0;      // see cuda_emu_set_schedule
unsigned long long schedule_seed = 0x9e3779b97f4a7c15ull;

void fiber_main() {
  for (;;) {
    (*thread_body)();
    current->state = State::kExited;
    // Back to the scheduler; resumed here (and looping) when reused.
    if (!_setjmp(current->context)) _longjmp(scheduler_context, 1);
  }
}

Fiber& fiber(int i) {
  if (fibers == nullptr) fibers = new Fiber[kMaxThreads];
  Fiber& f = fibers[i];
  if (f.stack == nullptr) {
    const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    void* mem = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
      std::fprintf(stderr, "cuda_emu: cannot map a fiber stack\n");
      std::abort();
    }
    mprotect(mem, page, PROT_NONE);  // an overflow faults instead of corrupting
    f.stack = static_cast<char*>(mem) + page;
  }
  return f;
}

// Run f until it blocks or exits.
void resume(Fiber& f) {
  current = &f;
  threadIdx = f.tid;
  if (_setjmp(scheduler_context)) return;
  if (f.started) _longjmp(f.context, 1);
  f.started = true;
  getcontext(&f.start);
  f.start.uc_stack.ss_sp = f.stack;
  f.start.uc_stack.ss_size = kStackBytes;
  f.start.uc_link = nullptr;
  makecontext(&f.start, fiber_main, 0);
  setcontext(&f.start);
}

// Called on a fiber: wait for the scheduler.
void block_current() {
  if (!_setjmp(current->context)) _longjmp(scheduler_context, 1);
}

std::string site(const Fiber& f) { return std::string(f.file) + ":" + std::to_string(f.line); }

std::string thread_name(const Fiber& f) {
  return "thread " + std::to_string(f.linear) + " (warp " + std::to_string(f.linear / 32) +
         ", lane " + std::to_string(f.linear % 32) + ")";
}

void fail(const std::string& message) {
  if (failure.empty()) failure = message;
}

int lanes_in_warp(int warp) {
  const int left = block_threads - warp * 32;
  return left < 32 ? left : 32;
}

void release_warp(int warp) {
  const int lanes = lanes_in_warp(warp);
  Fiber* lane0 = &fibers[warp * 32];
  const unsigned present = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  for (int l = 0; l < lanes; ++l) {
    const Fiber& f = fibers[warp * 32 + l];
    if (f.file != lane0->file || f.line != lane0->line || f.kind != lane0->kind ||
        f.mask != lane0->mask || f.width != lane0->width || f.size != lane0->size) {
      fail("lanes of one warp at different shuffles: " + thread_name(*lane0) + " at " +
           site(*lane0) + ", " + thread_name(f) + " at " + site(f));
      return;
    }
  }
  if (lane0->mask != present) {
    char buf[160];
    std::snprintf(buf, sizeof(buf),
                  "shuffle at %s:%d with mask 0x%08x in a warp of %d lanes (mask 0x%08x): %s",
                  lane0->file, lane0->line, lane0->mask, lanes, present,
                  (lane0->mask & ~present) ? "the mask names lanes that do not exist (UB)"
                                           : "partial masks are not emulated");
    fail(buf);
    return;
  }
  const int width = lane0->width;
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fail("shuffle at " + site(*lane0) + " with width " + std::to_string(width) +
         ", not a power of 2 in [1, 32]");
    return;
  }
  for (int l = 0; l < lanes; ++l) {
    Fiber& f = fibers[warp * 32 + l];
    const int first = l & ~(width - 1);
    int src = l;
    switch (f.kind) {
      case ShflKind::kIdx: src = first + (f.arg & (width - 1)); break;
      case ShflKind::kUp: src = l - f.arg < first ? l : l - f.arg; break;
      case ShflKind::kDown: src = l + f.arg >= first + width ? l : l + f.arg; break;
      case ShflKind::kXor: {
        const int x = l ^ f.arg;
        src = (x < 0 || x >= first + width) ? l : x;
        break;
      }
    }
    if (src >= lanes) {
      fail("shuffle at " + site(f) + ": " + thread_name(f) + " reads lane " +
           std::to_string(src) + ", which does not exist");
      return;
    }
    std::memcpy(f.out, slots[warp][src], f.size);
  }
  for (int l = 0; l < lanes; ++l) fibers[warp * 32 + l].state = State::kRunnable;
  warp_waiting[warp] = 0;
}

void release_sync() {
  const Fiber& first = fibers[0];
  for (int i = 1; i < block_threads; ++i) {
    const Fiber& f = fibers[i];
    if (f.file != first.file || f.line != first.line) {
      fail("__syncthreads at different call sites in one block: " + thread_name(first) + " at " +
           site(first) + ", " + thread_name(f) + " at " + site(f));
      return;
    }
  }
  for (int i = 0; i < block_threads; ++i) fibers[i].state = State::kRunnable;
  sync_waiting = 0;
}

// No fiber can run and some have not exited: say why.
std::string diagnose_deadlock() {
  for (int w = 0; w * 32 < block_threads; ++w) {
    if (warp_waiting[w] == 0) continue;
    const Fiber* waiting = nullptr;
    for (int l = 0; l < lanes_in_warp(w); ++l) {
      if (fibers[w * 32 + l].state == State::kAtShuffle) waiting = &fibers[w * 32 + l];
    }
    for (int l = 0; l < lanes_in_warp(w); ++l) {
      const Fiber& f = fibers[w * 32 + l];
      if (f.state == State::kExited) {
        return "shuffle at " + site(*waiting) + " in warp " + std::to_string(w) + " while " +
               thread_name(f) + " has exited (UB: the mask names an exited lane)";
      }
      if (f.state == State::kAtSync) {
        return "divergent warp " + std::to_string(w) + ": " + thread_name(*waiting) +
               " waits at the shuffle at " + site(*waiting) + ", " + thread_name(f) +
               " at __syncthreads at " + site(f);
      }
    }
  }
  int exited = 0;
  const Fiber* at_sync = nullptr;
  for (int i = 0; i < block_threads; ++i) {
    if (fibers[i].state == State::kExited) ++exited;
    if (fibers[i].state == State::kAtSync) at_sync = &fibers[i];
  }
  if (at_sync != nullptr) {
    return std::to_string(sync_waiting) + " threads wait at __syncthreads at " + site(*at_sync) +
           " (their barrier #" + std::to_string(at_sync->syncs) + ") while " +
           std::to_string(exited) +
           " threads have exited: not every thread of the block reaches the same __syncthreads";
  }
  return "no thread can run (emulator error)";
}

unsigned long long next_random() {
  schedule_seed ^= schedule_seed << 13;
  schedule_seed ^= schedule_seed >> 7;
  schedule_seed ^= schedule_seed << 17;
  return schedule_seed;
}

void run_block(const dim3& block, std::vector<int>& order) {
  ++block_serial;
  block_threads = static_cast<int>(block.x * block.y * block.z);
  for (int i = 0; i < block_threads; ++i) {
    Fiber& f = fiber(i);
    f.tid = uint3{static_cast<unsigned>(i) % block.x, (static_cast<unsigned>(i) / block.x) % block.y,
                  static_cast<unsigned>(i) / (block.x * block.y)};
    f.linear = i;
    f.state = State::kRunnable;
    f.syncs = 0;
    f.file = nullptr;
    f.line = 0;
  }
  for (int w = 0; w < kMaxWarps; ++w) warp_waiting[w] = 0;
  sync_waiting = 0;
  order.resize(block_threads);
  const bool reversed = schedule_mode == 1 || schedule_mode == 4;
  for (int i = 0; i < block_threads; ++i) order[i] = reversed ? block_threads - 1 - i : i;
  if (schedule_mode == 2) {
    for (int i = block_threads - 1; i > 0; --i) {
      std::swap(order[i], order[static_cast<int>(next_random() % static_cast<unsigned>(i + 1))]);
    }
  }
  // Round robin gives every runnable fiber a turn per pass; the priority
  // orders (3, 4) always resume the first runnable fiber of the order, so a
  // warp released from a barrier runs ahead of the others as far as it can,
  // which exposes a missing __syncthreads before shared memory is reused.
  const bool priority = schedule_mode >= 3;
  int exited = 0;
  while (exited < block_threads) {
    bool ran = false;
    for (int i : order) {
      Fiber& f = fibers[i];
      if (f.state != State::kRunnable) continue;
      if (priority && ran) break;  // rescan from the first
      ran = true;
      resume(f);
      if (!failure.empty()) return;
      switch (f.state) {
        case State::kExited: ++exited; break;
        case State::kAtShuffle: {
          const int w = f.linear / 32;
          if (++warp_waiting[w] == lanes_in_warp(w)) release_warp(w);
          break;
        }
        case State::kAtSync:
          if (++sync_waiting == block_threads) release_sync();
          break;
        case State::kRunnable: break;
      }
      if (!failure.empty()) return;
    }
    if (!ran && exited < block_threads) {
      fail(diagnose_deadlock());
      return;
    }
  }
}

}  // namespace

void syncthreads(const char* file, int line) {
  Fiber* f = current;
  f->state = State::kAtSync;
  f->file = file;
  f->line = line;
  ++f->syncs;
  block_current();
}

void warp_shuffle(const char* file, int line, unsigned mask, ShflKind kind, int arg, int width,
                  const void* value, void* out, std::size_t size) {
  Fiber* f = current;
  if (!(mask & (1u << (f->linear % 32)))) {
    fail("shuffle at " + std::string(file) + ":" + std::to_string(line) + ": " + thread_name(*f) +
         " is not in its own mask (UB)");
    std::memcpy(out, value, size);
    block_current();  // never resumed: the block stops
    return;
  }
  std::memcpy(slots[f->linear / 32][f->linear % 32], value, size);
  f->state = State::kAtShuffle;
  f->file = file;
  f->line = line;
  f->mask = mask;
  f->kind = kind;
  f->arg = arg;
  f->width = width;
  f->size = size;
  f->out = out;
  block_current();
}

bool shared_first_touch(void* address) {
  for (auto& entry : shared_touched) {
    if (entry.first == address) {
      if (entry.second == block_serial) return false;
      entry.second = block_serial;
      return true;
    }
  }
  shared_touched.emplace_back(address, block_serial);
  return true;
}

cudaError_t run_grid(const char* kernel, const char* caller, dim3 grid, dim3 block,
                     std::size_t dynamic_smem, const std::function<void()>& body) {
  auto reject = [&](cudaError_t code, const std::string& why) {
    last_error = code;
    error_message = std::string("launch of ") + kernel + " (from " + caller + "): " + why;
    return code;
  };
  if (in_launch) return reject(cudaErrorLaunchFailure, "launch from inside a kernel");
  const unsigned long long threads =
      static_cast<unsigned long long>(block.x) * block.y * block.z;
  char shape[160];
  std::snprintf(shape, sizeof(shape), "grid (%u, %u, %u), block (%u, %u, %u)", grid.x, grid.y,
                grid.z, block.x, block.y, block.z);
  if (threads == 0 || threads > kMaxThreads || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      grid.x == 0 || grid.x > 0x7fffffffu || grid.y == 0 || grid.y > 65535 || grid.z == 0 ||
      grid.z > 65535) {
    return reject(cudaErrorInvalidConfiguration, std::string("invalid configuration ") + shape);
  }
  if (dynamic_smem != 0) {
    return reject(cudaErrorInvalidValue, "dynamic shared memory is not emulated");
  }
  in_launch = true;
  thread_body = &body;
  gridDim = grid;
  blockDim = block;
  std::vector<int> order;
  for (unsigned z = 0; z < grid.z && failure.empty(); ++z) {
    for (unsigned y = 0; y < grid.y && failure.empty(); ++y) {
      for (unsigned x = 0; x < grid.x && failure.empty(); ++x) {
        blockIdx = uint3{x, y, z};
        run_block(block, order);
      }
    }
  }
  in_launch = false;
  thread_body = nullptr;
  if (!failure.empty()) {
    char where[256];
    std::snprintf(where, sizeof(where), " (block (%u, %u, %u) of %s)", blockIdx.x, blockIdx.y,
                  blockIdx.z, shape);
    const std::string why = failure + where;
    failure.clear();
    // Fibers stopped inside the kernel start afresh in the next launch.
    for (int i = 0; i < kMaxThreads && fibers != nullptr; ++i) fibers[i].started = false;
    return reject(cudaErrorLaunchFailure, why);
  }
  return cudaSuccess;
}

}  // namespace cuda_emu

// --- UB found by the compiler's instrumentation ----------------------------------------
// The kernels are compiled with -fsanitize=alignment,null,bounds,... (build.py)
// against these handlers instead of libubsan: a misaligned 16-byte load (a
// "misaligned address" fault on a GPU), a null dereference, an index past a
// fixed-size array or a signed overflow inside a kernel stops the launch like
// the UB above; outside a kernel it is reported after the call.
namespace {

struct SourceLocation {
  const char* file;
  std::uint32_t line;
  std::uint32_t column;
};
struct TypeDescriptor {
  std::uint16_t kind;
  std::uint16_t info;
  char name[1];
};
struct TypeMismatchData {
  SourceLocation loc;
  const TypeDescriptor* type;
  unsigned char log_alignment;
  unsigned char type_check_kind;
};

[[gnu::noinline]] void report_ub(const SourceLocation* loc, const std::string& what, bool fatal) {
  const std::string message = what + " at " + (loc && loc->file ? loc->file : "?") + ":" +
                              std::to_string(loc ? loc->line : 0);
  if (cuda_emu::in_launch && cuda_emu::current != nullptr) {
    cuda_emu::fail(message + " in " + cuda_emu::thread_name(*cuda_emu::current));
    cuda_emu::block_current();  // never resumed: the launch stops
  }
  if (cuda_emu::error_message.empty()) cuda_emu::error_message = message;
  if (fatal) {
    std::fprintf(stderr, "cuda_emu: %s\n", message.c_str());
    std::abort();
  }
}

}  // namespace

extern "C" {

void __ubsan_handle_type_mismatch_v1(TypeMismatchData* data, std::uintptr_t pointer) {
  char buf[256];
  const std::uintptr_t alignment = std::uintptr_t(1) << data->log_alignment;
  if (pointer == 0) {
    std::snprintf(buf, sizeof(buf), "null pointer access of type %s", data->type->name);
  } else if (pointer & (alignment - 1)) {
    std::snprintf(buf, sizeof(buf), "misaligned access of type %s at %#lx (needs %lu-byte alignment)",
                  data->type->name, static_cast<unsigned long>(pointer),
                  static_cast<unsigned long>(alignment));
  } else {
    std::snprintf(buf, sizeof(buf), "invalid access of type %s at %#lx", data->type->name,
                  static_cast<unsigned long>(pointer));
  }
  report_ub(&data->loc, buf, false);
}
void __ubsan_handle_out_of_bounds(SourceLocation* loc, void*) {
  report_ub(loc, "index out of bounds of a fixed-size array", false);
}
void __ubsan_handle_add_overflow(SourceLocation* loc, void*, void*) {
  report_ub(loc, "signed integer overflow (+)", false);
}
void __ubsan_handle_sub_overflow(SourceLocation* loc, void*, void*) {
  report_ub(loc, "signed integer overflow (-)", false);
}
void __ubsan_handle_mul_overflow(SourceLocation* loc, void*, void*) {
  report_ub(loc, "signed integer overflow (*)", false);
}
void __ubsan_handle_negate_overflow(SourceLocation* loc, void*) {
  report_ub(loc, "signed integer overflow (negation)", false);
}
void __ubsan_handle_divrem_overflow(SourceLocation* loc, void*, void*) {
  report_ub(loc, "integer division overflow or by zero", false);
}
void __ubsan_handle_shift_out_of_bounds(SourceLocation* loc, void*, void*) {
  report_ub(loc, "shift out of bounds", false);
}
void __ubsan_handle_load_invalid_value(SourceLocation* loc, void*) {
  report_ub(loc, "load of an invalid bool or enum value", false);
}
void __ubsan_handle_float_cast_overflow(SourceLocation* loc, void*) {
  report_ub(loc, "float to integer conversion out of range", false);
}
void __ubsan_handle_pointer_overflow(SourceLocation* loc, void*, void*) {
  report_ub(loc, "pointer arithmetic overflow", false);
}
void __ubsan_handle_vla_bound_not_positive(SourceLocation* loc, void*) {
  report_ub(loc, "variable-length array bound not positive", false);
}
void __ubsan_handle_invalid_builtin(SourceLocation* loc) {
  report_ub(loc, "invalid argument to a builtin", false);
}
[[noreturn]] void __ubsan_handle_builtin_unreachable(SourceLocation* loc) {
  report_ub(loc, "__builtin_unreachable reached", true);
  std::abort();
}
[[noreturn]] void __ubsan_handle_missing_return(SourceLocation* loc) {
  report_ub(loc, "end of a value-returning function reached", true);
  std::abort();
}

}  // extern "C"

cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_emu::last_error;
  cuda_emu::last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return cuda_emu::last_error; }

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

// C ABI for the Python side.
extern "C" {

// The message of the latest failed launch ("" if none); taking it clears it.
const char* cuda_emu_take_error() {
  static std::string taken;
  taken.swap(cuda_emu::error_message);
  cuda_emu::error_message.clear();
  return taken.c_str();
}

// Order in which a block's runnable fibers are resumed: round robin by thread
// index (0), reversed (1), or over a fresh random permutation per block (2,
// seeded); or always the first runnable by thread index (3) or reversed (4).
void cuda_emu_set_schedule(int mode, unsigned long long seed) {
  cuda_emu::schedule_mode = mode;
  cuda_emu::schedule_seed = seed ? seed : 0x9e3779b97f4a7c15ull;
}
}  // extern "C"

// A small CUDA emulation layer, so that the kernels of csrc/cuda/*.cu run (and
// are tested) on a machine without a GPU. Force-included (g++ -include
// cuda_emu.h) into every translation unit of the emulated build; the .cu files
// are first rewritten by python_tests/cuda_emu/build.py (the <<<...>>> launch
// syntax becomes a call of cuda_emu::launch, and each __shared__ declaration
// gets a poisoning call, so that memory a block reads before writing is NaN).
//
// Execution model: the blocks of a grid run one after another; the threads of
// a block run as cooperative fibers on one OS thread, switching only at
// __syncthreads() and at warp shuffles (cuda_emu.cpp). __shared__ variables
// are function-local statics, which is correct because blocks never overlap.
// UB that a GPU would punish stops the launch with a message naming the
// kernel: a full-mask shuffle while a lane of the warp has exited or waits
// elsewhere, lanes of one shuffle at different call sites, a block whose
// threads do not all reach the same __syncthreads, an invalid launch shape;
// and, through the -fsanitize checks build.py compiles in (handlers in
// cuda_emu.cpp), a misaligned vector load, a null dereference, an index past
// a fixed-size array, a signed overflow.
#pragma once

// Every system header the kernels use, before __CUDACC__ is defined below.
#include <math.h>

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

// The kernels see the device side of their headers.
#ifndef __CUDACC__
#define __CUDACC__ 1
#endif
#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 900
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
// build.py rewrites `__shared__ T name[..];` itself; this covers any other use.
#define __shared__ static

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

// The built-in indices: globals that the scheduler sets before resuming each
// fiber (only one fiber runs at a time).
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
constexpr int warpSize = 32;

// --- runtime API ---------------------------------------------------------------------

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t error);
inline cudaError_t cudaDeviceSynchronize() { return cudaPeekAtLastError(); }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaPeekAtLastError(); }

// --- device intrinsics -----------------------------------------------------------------

// nvcc lowers __expf to ex2.approx.ftz(x * log2 e) and __logf to
// lg2.approx.ftz(x) * ln 2: the extra rounding of the scaling and the flush of
// subnormals are modelled (not the few ulp of the approximate ex2 / lg2).
inline float __expf(float x) {
  const float r = exp2f(x * 1.44269504088896341f);
  return r < FLT_MIN ? 0.0f : r;
}
inline float __logf(float x) {
  if (x > 0.0f && x < FLT_MIN) x = 0.0f;
  return log2f(x) * 0.693147180559945309f;
}

template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

namespace cuda_emu {

enum class ShflKind : int { kIdx, kUp, kDown, kXor };

// Exchange `size` bytes of `value` within the calling warp (cuda_emu.cpp);
// `out` receives the source lane's bytes (or the caller's own, per CUDA's
// rules for lanes outside the width group).
void warp_shuffle(const char* file, int line, unsigned mask, ShflKind kind, int arg, int width,
                  const void* value, void* out, std::size_t size);
void syncthreads(const char* file, int line);

template <typename T>
inline T shfl(const char* file, int line, unsigned mask, ShflKind kind, T var, int arg, int width) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16, "shuffle of a register type");
  T out;
  warp_shuffle(file, line, mask, kind, arg, width, &var, &out, sizeof(T));
  return out;
}
// The intrinsics, with the call site (__FILE__, __LINE__) in front.
template <typename T>
inline T shfl_idx(const char* file, int line, unsigned mask, T var, int src_lane, int width = 32) {
  return shfl(file, line, mask, ShflKind::kIdx, var, src_lane, width);
}
template <typename T>
inline T shfl_up(const char* file, int line, unsigned mask, T var, unsigned delta, int width = 32) {
  return shfl(file, line, mask, ShflKind::kUp, var, static_cast<int>(delta), width);
}
template <typename T>
inline T shfl_down(const char* file, int line, unsigned mask, T var, unsigned delta, int width = 32) {
  return shfl(file, line, mask, ShflKind::kDown, var, static_cast<int>(delta), width);
}
template <typename T>
inline T shfl_xor(const char* file, int line, unsigned mask, T var, int lane_mask, int width = 32) {
  return shfl(file, line, mask, ShflKind::kXor, var, lane_mask, width);
}

// Shared memory is undefined when a block starts: the first thread of a block
// to reach a __shared__ declaration fills it with NaN bytes (floating fields)
// or 0x5a bytes (integers), so a read before any write shows.
bool shared_first_touch(void* address);
template <typename T>
inline void shared_poison(T& object) {
  if (!shared_first_touch(&object)) return;
  using Element = std::remove_all_extents_t<T>;
  std::memset(static_cast<void*>(&object), std::is_integral_v<Element> ? 0x5a : 0xff, sizeof(T));
}

// One grid: check the configuration, then run every block.
cudaError_t run_grid(const char* kernel, const char* caller, dim3 grid, dim3 block,
                     std::size_t dynamic_smem, const std::function<void()>& thread_body);

template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  const char* name;
  const char* caller;
  dim3 grid, block;
  std::size_t smem;

  template <typename... Args>
  void operator()(Args&&... args) const {
    // The arguments are converted and copied once, like a launch's parameter
    // buffer; each thread then gets its own by-value copies.
    const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    run_grid(name, caller, grid, block, smem, [&] { std::apply(kernel, params); });
  }
};

template <typename... Params>
inline Launch<Params...> launch(const char* name, const char* caller, void (*kernel)(Params...),
                                dim3 grid, dim3 block, std::size_t smem = 0,
                                cudaStream_t /*stream*/ = nullptr) {
  return Launch<Params...>{kernel, name, caller, grid, block, smem};
}

}  // namespace cuda_emu

#define __syncthreads() ::cuda_emu::syncthreads(__FILE__, __LINE__)
#define __shfl_sync(...) ::cuda_emu::shfl_idx(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::cuda_emu::shfl_up(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::cuda_emu::shfl_down(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::cuda_emu::shfl_xor(__FILE__, __LINE__, __VA_ARGS__)

// Kernels that check the emulation itself (python_tests/test_cuda_emulated.py):
// shuffle semantics, and the UB and bad launches it must refuse. Compiled
// through the same rewrite as csrc/cuda/*.cu.
#include <cuda_runtime.h>

#include <cstdint>

namespace {

// out[t] = the shuffle of in[t] of the given kind (0 idx, 1 up, 2 down, 3 xor).
__global__ void shuffle_kernel(const float* in, float* out, int kind, int arg, int width) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  const float v = in[t];
  float r = 0;
  switch (kind) {
    case 0: r = __shfl_sync(0xffffffffu, v, arg, width); break;
    case 1: r = __shfl_up_sync(0xffffffffu, v, static_cast<unsigned>(arg), width); break;
    case 2: r = __shfl_down_sync(0xffffffffu, v, static_cast<unsigned>(arg), width); break;
    default: r = __shfl_xor_sync(0xffffffffu, v, arg, width); break;
  }
  out[t] = r;
}

// Lane `lane` of warp 0 returns before a full-mask shuffle.
__global__ void exit_before_shuffle_kernel(float* out, int lane) {
  if (static_cast<int>(threadIdx.x) == lane) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<float>(threadIdx.x), 1);
}

// Thread `skip` returns before a __syncthreads the others reach.
__global__ void early_exit_sync_kernel(float* out, int skip) {
  if (static_cast<int>(threadIdx.x) == skip) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// Half of the block waits at one __syncthreads, half at another.
__global__ void split_sync_kernel(float* out) {
  if (threadIdx.x < 64) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// Lanes of a warp shuffle at two call sites.
__global__ void divergent_shuffle_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 32 < 16) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 2);
  }
  out[threadIdx.x] = v;
}

// One warp shuffles while another lane of it waits at __syncthreads.
__global__ void shuffle_vs_sync_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x == 3) {
    __syncthreads();
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
    __syncthreads();
  }
  out[threadIdx.x] = v;
}

// Every thread but `skip` writes shared memory, then all read a neighbour:
// the element never written must read as poison (NaN) in every block.
__global__ void shared_poison_kernel(float* out, int skip) {
  __shared__ float values[256];
  if (static_cast<int>(threadIdx.x) != skip) values[threadIdx.x] = static_cast<float>(blockIdx.x);
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = values[(threadIdx.x + 1) % blockDim.x];
}

// A missing barrier: the read of another thread's element races with its write.
__global__ void missing_barrier_kernel(float* out) {
  __shared__ float values[256];
  values[threadIdx.x] = 1.0f;
  out[threadIdx.x] = values[blockDim.x - 1 - threadIdx.x];
}

// A 16-byte load from an address 4 bytes past a 16-byte boundary.
struct alignas(16) Vec4 {
  float v[4];
};
__global__ void misaligned_load_kernel(const float* in, float* out) {
  const Vec4 pack = reinterpret_cast<const Vec4*>(in + 1)[threadIdx.x];
  out[threadIdx.x] = pack.v[0];
}

// 64 threads index a shared array of 32.
__global__ void shared_out_of_bounds_kernel(float* out) {
  __shared__ float values[32];
  values[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = values[0];
}

// Records the index built-ins.
__global__ void index_kernel(int* out) {
  const int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int threads = blockDim.x * blockDim.y * blockDim.z;
  int* o = out + 4 * (block * threads + thread);
  o[0] = block;
  o[1] = thread;
  o[2] = threads;
  o[3] = gridDim.x * gridDim.y * gridDim.z;
}

}  // namespace

extern "C" {

int emu_selftest_shuffle(const float* in, float* out, int n_threads, int kind, int arg, int width) {
  shuffle_kernel<<<1, n_threads>>>(in, out, kind, arg, width);
  return cudaGetLastError();
}

int emu_selftest_bad(int which, float* out, int arg) {
  switch (which) {
    case 0: exit_before_shuffle_kernel<<<1, 64>>>(out, arg); break;
    case 1: early_exit_sync_kernel<<<1, 128>>>(out, arg); break;
    case 2: split_sync_kernel<<<1, 128>>>(out); break;
    case 3: divergent_shuffle_kernel<<<1, 64>>>(out); break;
    case 4: shuffle_vs_sync_kernel<<<1, 64>>>(out); break;
    case 5: shared_poison_kernel<<<3, 256>>>(out, arg); break;
    case 6: missing_barrier_kernel<<<1, 256>>>(out); break;
    case 7: shared_poison_kernel<<<0, 256>>>(out, arg); break;    // grid 0
    case 8: shared_poison_kernel<<<1, 2048>>>(out, arg); break;   // block > 1024
    case 9: exit_before_shuffle_kernel<<<1, 48>>>(out, 100); break;  // partial warp, full mask
    case 10: misaligned_load_kernel<<<1, 32>>>(out, out + 256); break;
    case 11: shared_out_of_bounds_kernel<<<1, 64>>>(out); break;
    default: return -1;
  }
  return cudaGetLastError();
}

int emu_selftest_index(int* out, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                       unsigned bz) {
  index_kernel<<<dim3(gx, gy, gz), dim3(bx, by, bz)>>>(out);
  return cudaGetLastError();
}

}  // extern "C"

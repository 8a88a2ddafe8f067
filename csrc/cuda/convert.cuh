// Loads and stores between the storage types of the CUDA kernels (float,
// double, __half, __nv_bfloat16) and their accumulation types (float, or
// double for double): one definition for every kernel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace rlhf_kernels::cuda {

template <typename T>
__device__ __forceinline__ float to_acc(T x) {
  return static_cast<float>(x);
}
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(float x) {
  return static_cast<T>(x);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <typename T>
__device__ __forceinline__ T from_acc(double x) {
  return static_cast<T>(x);
}

}  // namespace rlhf_kernels::cuda

// Host launcher of the CUDA truncation-threshold kernel: raw pointers, no torch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "rlhf_kernels/common.h"

namespace rlhf_kernels::cuda {

// out[r] (n_rows,): the threshold whose kept set {x >= out[r]} (raw logits,
// compared in acc_t) is row r's under a sampler's truncation (csrc/ops.cpp
// truncation_threshold): top_k (<= 0, or at least the current set's size: off),
// top_p (>= 1: off), min_p (<= 0: off), min-p first (vLLM's order) or last
// (transformers'). -inf when nothing truncates or the row is all -inf; NaN for a
// row holding a NaN. scalar_t: float, double, __half or __nv_bfloat16; acc_t:
// float (double for double).
template <typename scalar_t, typename acc_t>
cudaError_t launch_truncation_threshold(const scalar_t* logits, RowLayout layout, int64_t n_rows,
                                        int64_t vocab, acc_t inv_temperature, int64_t top_k,
                                        acc_t top_p, acc_t min_p, bool min_p_first, acc_t* out,
                                        cudaStream_t stream);

}  // namespace rlhf_kernels::cuda

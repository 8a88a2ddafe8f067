// Host launchers of the CUDA logprobs kernels: raw pointers, no torch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "rlhf_kernels/common.h"

namespace rlhf_kernels::cuda {

// scalar_t: float, double, __half or __nv_bfloat16; acc_t: float (double for
// double). Semantics as rlhf_kernels::cpu::logprobs_fwd_rows over all rows.
// min_logit (n_rows,), or null for none: row r keeps its logits x >= min_logit[r]
// (raw, compared in acc_t) and is the softmax of those alone; row_max is
// their max, -inf when none is kept.
template <typename scalar_t, typename acc_t>
cudaError_t launch_logprobs_fwd(const scalar_t* logits, RowLayout layout, const int64_t* labels,
                                int64_t n_rows, int64_t vocab, acc_t inv_temperature,
                                int64_t ignore_index, acc_t* logp, acc_t* entropy, acc_t* row_max,
                                acc_t* log_sum, const acc_t* min_logit, cudaStream_t stream);

// grad_entropy and entropy may be null; grad_logits may alias logits with the
// same layout (in-place backward); min_logit as in the forward.
template <typename scalar_t, typename acc_t>
cudaError_t launch_logprobs_bwd(const acc_t* grad_logp, const acc_t* grad_entropy,
                                const scalar_t* logits, RowLayout in_layout,
                                const int64_t* labels, const acc_t* row_max, const acc_t* log_sum,
                                const acc_t* entropy, int64_t n_rows, int64_t vocab,
                                acc_t inv_temperature, int64_t ignore_index, scalar_t* grad_logits,
                                RowLayout out_layout, const acc_t* min_logit, cudaStream_t stream);

}  // namespace rlhf_kernels::cuda

// Host launchers of the CUDA advantage kernels: raw pointers, no torch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "rlhf_kernels/advantages.h"

namespace rlhf_kernels::cuda {

// scalar_t: float, double, __half or __nv_bfloat16; acc_t: float (double for
// double). kl[i] = kl_value(logp[i], ref[i]) over n elements.
template <typename scalar_t, typename acc_t>
cudaError_t launch_kl_penalty_fwd(const scalar_t* logp, const scalar_t* ref, int estimator,
                                  acc_t* kl, int64_t n, cudaStream_t stream);

// grad_logp = grad * dkl/dlogp, grad_ref = -grad_logp.
template <typename scalar_t, typename acc_t>
cudaError_t launch_kl_penalty_bwd(const acc_t* grad, const scalar_t* logp, const scalar_t* ref,
                                  int estimator, scalar_t* grad_logp, scalar_t* grad_ref,
                                  int64_t n, cudaStream_t stream);

// Fused KL + shaping + GAE + partial sums, one thread block per sequence;
// semantics as rlhf_kernels::cpu::advantages_seqs over all sequences. Packed
// offsets are clamped to [0, total] (total = total_tokens), so unchecked bad
// offsets never read out of bounds.
template <typename scalar_t, typename acc_t>
cudaError_t launch_advantages(const AdvantagesArgs<scalar_t, acc_t>& args, int64_t total_tokens,
                              cudaStream_t stream);

}  // namespace rlhf_kernels::cuda

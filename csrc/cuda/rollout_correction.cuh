// Host launcher of the CUDA rollout_correction kernel: raw pointers, no torch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "rlhf_kernels/rollout_correction_math.h"

namespace rlhf_kernels::cuda {

// scalar_t: float, double, __half or __nv_bfloat16; acc_t: float (double for
// double); mask_t: bool (nonzero = valid, weight 1) or acc_t (the token's
// weight, 0 = not valid). logp, rollout_logp and mask are (num_seqs, seq_len)
// contiguous; writes weights and keep (num_seqs, seq_len) and stats
// (num_seqs, kRcStatColumns), one thread block per sequence. Semantics as the
// CPU kernel (csrc/cpu/rollout_correction_glue.cpp) over
// rollout_correction_math.h; sums are taken in a fixed tree, so results do not
// depend on scheduling, but they may differ from the CPU's sequential sums by
// rounding. More than 2^31 - 1 sequences: cudaErrorInvalidConfiguration,
// nothing launched.
template <typename scalar_t, typename acc_t, typename mask_t>
cudaError_t launch_rollout_correction(const scalar_t* logp, const scalar_t* rollout_logp, const mask_t* mask,
                                      const RcParams& params, int64_t num_seqs, int64_t seq_len,
                                      acc_t* weights, bool* keep, acc_t* stats, cudaStream_t stream);

}  // namespace rlhf_kernels::cuda

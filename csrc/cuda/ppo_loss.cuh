// Host launchers of the CUDA PPO loss kernels: raw pointers, no torch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "rlhf_kernels/aggregation.h"
#include "rlhf_kernels/common.h"
#include "rlhf_kernels/ppo_math.h"

namespace rlhf_kernels::cuda {

// A sequence of T tokens spans ppo_chunks(T) thread blocks (ppo_math.h).
using ::rlhf_kernels::kPpoChunk;
using ::rlhf_kernels::ppo_chunks;

// acc_t: float or double. Token tensors (seqs * seq_len,) contiguous; the
// mask is `mask` (1 byte per token) or `weight` (acc_t per token, the token's
// weight), exactly one set (rlhf_kernels/cpu/ppo_loss.h). Semantics as rlhf_kernels::cpu::ppo_policy_rows, except
// that statistics come per chunk: partial (seqs, ppo_chunks(seq_len),
// kPolicyStats), summed (max / min for the ratio columns) by the caller.
// ref_logp, entropy and grad may be null.
template <typename acc_t>
cudaError_t launch_ppo_policy_fwd(const acc_t* logp, const acc_t* old_logp, const acc_t* advantages,
                                  const uint8_t* mask, const acc_t* weight, const acc_t* ref_logp,
                                  const acc_t* entropy, int64_t seqs, int64_t seq_len, PolicyParams<acc_t> params,
                                  acc_t* grad, acc_t* partial, cudaStream_t stream);

// partial: (seqs, ppo_chunks(seq_len), kValueStats). grad may be null.
template <typename acc_t>
cudaError_t launch_ppo_value_fwd(const acc_t* values, const acc_t* old_values, const acc_t* returns,
                                 const uint8_t* mask, const acc_t* weight, int64_t seqs,
                                 int64_t seq_len, acc_t clip, acc_t* grad, acc_t* partial,
                                 cudaStream_t stream);

// ppo_sequence_clip (aggregation.h finalize_sequence_clip) in one thread block:
// rows (seqs, kPolicyStats) contiguous; writes loss (1), coef (seqs) and stats
// (kPgLossOut); the sums over the rows in double.
template <typename acc_t>
cudaError_t launch_ppo_sequence_clip(const acc_t* rows, int64_t seqs, int64_t seq_len, AggParams agg,
                                     acc_t ratio_low, acc_t ratio_high, acc_t dual_clip, acc_t* loss, acc_t* coef,
                                     acc_t* stats, cudaStream_t stream);

// scale_by_sign: y[i] = x[i] * (x[i] > 0 ? pos[r] : neg[r]), r = i / seq_len;
// x and y (rows * seq_len) contiguous, n = rows * seq_len > 0.
template <typename acc_t>
cudaError_t launch_scale_by_sign(const acc_t* x, const acc_t* pos, const acc_t* neg, int64_t n, int64_t seq_len,
                                 acc_t* y, cudaStream_t stream);

// x[i] = x[i] * (scale[0] / applied[0]) in acc_t, rounded once to scalar_t,
// unless the factor is 1: then no element is touched. Both are read on the
// device, so the caller never synchronises (the backward of a loss whose
// gradient was written in the forward for a unit upstream gradient, `applied`
// the scale already in it: loss.backward() passes 1). The caller then sets
// applied = scale (after the kernel: every block reads the old value).
template <typename scalar_t, typename acc_t>
cudaError_t launch_scale_unless_one(scalar_t* x, const acc_t* scale, const acc_t* applied, int64_t n,
                                    cudaStream_t stream);

// ppo_loss_from_logits's forward with its logits gradient; semantics of
// ppo_logits_grad_native (csrc/ops.cpp). ref_logp may be null. One block per
// row, at most max_blocks blocks (each then takes several rows; <= 0: no bound).
template <typename scalar_t, typename acc_t>
cudaError_t launch_ppo_logits_grad(const scalar_t* logits, RowLayout in_layout, const int64_t* labels,
                                   const acc_t* old_logp, const acc_t* advantages,
                                   const acc_t* row_weight, const acc_t* ref_logp, int64_t n_rows,
                                   int64_t vocab, acc_t inv_temperature, int64_t ignore_index,
                                   PolicyParams<acc_t> params, acc_t entropy_coef, acc_t* logp,
                                   acc_t* entropy, acc_t* row_max, acc_t* log_sum,
                                   scalar_t* grad_logits, RowLayout out_layout, int64_t max_blocks,
                                   cudaStream_t stream);

}  // namespace rlhf_kernels::cuda

// CPU kernels of the fused PPO losses: plain C++ over raw pointers, one call
// per range of token chunks so that the caller chooses the threading.
//
// Inputs are (B, T) row-major, contiguous, of the accumulation type acc_t
// (float, or double for gradcheck). The mask is either `mask`, 1 byte per
// token (nonzero: valid), or `weight`, acc_t per token (nonzero: valid; the
// token's loss, gradient, count and statistics are multiplied by it): exactly
// one of the two is set.
// One pass per token writes the gradient coefficient (the derivative of the
// token's loss, 0 on masked tokens) and accumulates per-chunk sums; the
// aggregation weights, which depend on the totals, are applied afterwards.
#pragma once

#include <cstdint>

#include "rlhf_kernels/ppo_math.h"

namespace rlhf_kernels::cpu {

// Work items [item_begin, item_end) of the seqs * ppo_chunks(seq_len) chunks
// (ppo_math.h); item i is chunk i % chunks of sequence i / chunks. ref_logp
// (with p.kl_estimator != kKlNone), entropy and grad may be null.
// partial: (seqs, ppo_chunks(seq_len), kPolicyStats), see PolicyStat; the
// caller sums it over chunks (max / min for the ratio columns).
template <typename acc_t>
void ppo_policy_chunks(const acc_t* logp, const acc_t* old_logp, const acc_t* advantages,
                       const uint8_t* mask, const acc_t* weight, const acc_t* ref_logp,
                       const acc_t* entropy,
                       int64_t seq_len, const PolicyParams<acc_t>& p, acc_t* grad,
                       acc_t* partial, int64_t item_begin, int64_t item_end);

// partial: (seqs, ppo_chunks(seq_len), kValueStats), see ValueStat. grad may be null.
template <typename acc_t>
void ppo_value_chunks(const acc_t* values, const acc_t* old_values, const acc_t* returns,
                      const uint8_t* mask, const acc_t* weight, int64_t seq_len, acc_t clip,
                      acc_t* grad,
                      acc_t* partial, int64_t item_begin, int64_t item_end);

}  // namespace rlhf_kernels::cpu

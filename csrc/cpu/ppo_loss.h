// CPU kernels of the fused PPO losses: plain C++ over raw pointers, one call
// per range of sequences so that the caller chooses the threading.
//
// Inputs are (B, T) row-major, contiguous, of the accumulation type acc_t
// (float, or double for gradcheck); mask is 1 byte per token (nonzero: valid).
// One pass per token writes the gradient coefficient (the derivative of the
// token's loss, 0 on masked tokens) and accumulates per-sequence sums; the
// aggregation weights, which depend on the totals, are applied afterwards.
#pragma once

#include <cstdint>

#include "rlhf_kernels/ppo_math.h"

namespace rlhf_kernels::cpu {

// Sequences [seq_begin, seq_end). ref_logp (with p.kl_estimator != kKlNone),
// entropy and grad may be null. seq_stats: (B, kPolicyStats), see PolicyStat.
template <typename acc_t>
void ppo_policy_rows(const acc_t* logp, const acc_t* old_logp, const acc_t* advantages,
                     const uint8_t* mask, const acc_t* ref_logp, const acc_t* entropy,
                     int64_t seq_len, const PolicyParams<acc_t>& p, acc_t* grad,
                     acc_t* seq_stats, int64_t seq_begin, int64_t seq_end);

// seq_stats: (B, kValueStats), see ValueStat. grad may be null.
template <typename acc_t>
void ppo_value_rows(const acc_t* values, const acc_t* old_values, const acc_t* returns,
                    const uint8_t* mask, int64_t seq_len, acc_t clip, acc_t* grad,
                    acc_t* seq_stats, int64_t seq_begin, int64_t seq_end);

}  // namespace rlhf_kernels::cpu

// CPU kernels of the advantage ops: plain C++ over raw pointers, one call per
// range of elements / sequences so that the caller chooses the threading.
#pragma once

#include <cstdint>

#include "rlhf_kernels/advantages.h"

namespace rlhf_kernels::cpu {

// kl[i] = kl_value(logp[i], ref[i]) for i in [begin, end); acc_t is float
// (double for double inputs).
template <typename scalar_t, typename acc_t>
void kl_penalty_fwd_range(const scalar_t* logp, const scalar_t* ref, int estimator, acc_t* kl,
                          int64_t begin, int64_t end);

// grad_logp[i] = grad[i] * dkl/dlogp, grad_ref[i] = -grad[i] * dkl/dlogp.
template <typename scalar_t, typename acc_t>
void kl_penalty_bwd_range(const acc_t* grad, const scalar_t* logp, const scalar_t* ref,
                          int estimator, scalar_t* grad_logp, scalar_t* grad_ref, int64_t begin,
                          int64_t end);

// Sequences [seq_begin, seq_end): per sequence, one reverse pass
//   r_t = token_rewards[t]  or  -kl_coef * kl_t + [t == last valid] * score
//   delta_t = r_t + gamma * V_next - V_t;  A_t = delta_t + gamma * lam * A_next
// (Schulman et al., 2016, GAE), where V_next / A_next belong to the next valid
// position (0 past the end); masked positions carry them and output 0. The
// recurrence runs in double, so long sequences stay accurate for float inputs.
template <typename scalar_t, typename acc_t>
void advantages_seqs(const AdvantagesArgs<scalar_t, acc_t>& args, int64_t seq_begin,
                     int64_t seq_end);

}  // namespace rlhf_kernels::cpu

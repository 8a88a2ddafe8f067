// Shared, torch-free definitions of the advantage kernels (CPU and CUDA): the
// argument block of the fused
// shaping + GAE kernel. A header of its own rather than more of common.h, so
// that each op's native definitions stay in one place.
#pragma once

#include <math.h>

#include <cstdint>

#include "rlhf_kernels/common.h"
#include "rlhf_kernels/kl.h"

namespace rlhf_kernels {

// Sequences of the fused KL + shaping + GAE kernel. Sequence b covers
// positions [b * seq_len, (b + 1) * seq_len) of the flat inputs (padded), or
// [cu_seqlens[b], cu_seqlens[b + 1]) (packed).
template <typename scalar_t, typename acc_t>
struct AdvantagesArgs {
  const scalar_t* values;         // (N,)
  const uint8_t* mask;            // (N,) 0/1, or null: every position valid
  const int32_t* cu_seqlens;      // (B + 1,), or null: padded with seq_len
  int64_t seq_len;
  int64_t num_seqs;
  const scalar_t* token_rewards;  // (N,), or null: shape them from the three below
  const acc_t* scores;            // (B,)
  const scalar_t* logp;           // (N,)
  const scalar_t* ref_logp;       // (N,)
  const acc_t* kl_coef_scale;     // (1,) multiplies kl_coef, or null
  acc_t kl_coef;
  int estimator;
  acc_t gamma;
  acc_t lam;
  acc_t* advantages;              // (N,) unwhitened, 0 at masked positions
  acc_t* returns;                 // (N,) advantages + values, 0 at masked positions
  acc_t* token_rewards_out;       // (N,) when shaping, else null
  acc_t* kl_out;                  // (N,) when shaping, else null
  double* stats;                  // (B, 4): valid count, sum A, sum A^2, sum kl
};

constexpr int kAdvantageStats = 4;

}  // namespace rlhf_kernels

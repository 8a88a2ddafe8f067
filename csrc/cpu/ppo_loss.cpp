// CPU kernels of the fused PPO losses; the per-token math lives in
// rlhf_kernels/ppo_math.h, shared with the CUDA kernels.
#include "ppo_loss.h"

#include <limits>

namespace rlhf_kernels::cpu {

template <typename acc_t>
void ppo_policy_rows(const acc_t* logp, const acc_t* old_logp, const acc_t* advantages,
                     const uint8_t* mask, const acc_t* ref_logp, const acc_t* entropy,
                     int64_t seq_len, const PolicyParams<acc_t>& p, acc_t* grad,
                     acc_t* seq_stats, int64_t seq_begin, int64_t seq_end) {
  const bool has_ref = p.kl_estimator != kKlNone && ref_logp != nullptr;
  PolicyParams<acc_t> params = p;
  if (!has_ref) params.kl_estimator = kKlNone;
  for (int64_t seq = seq_begin; seq < seq_end; ++seq) {
    const int64_t base = seq * seq_len;
    acc_t pg_sum = 0, count = 0, clip_count = 0, dual_count = 0, approx_kl = 0;
    acc_t kl_sum = 0, entropy_sum = 0;
    acc_t ratio_max = -std::numeric_limits<acc_t>::infinity();
    acc_t ratio_min = std::numeric_limits<acc_t>::infinity();
    for (int64_t t = 0; t < seq_len; ++t) {
      const int64_t i = base + t;
      if (!mask[i]) {
        if (grad) grad[i] = acc_t(0);
        continue;
      }
      const acc_t ref = has_ref ? ref_logp[i] : acc_t(0);
      const PolicyToken<acc_t> tok = policy_token<acc_t>(logp[i], old_logp[i], advantages[i], ref, params);
      if (grad) grad[i] = tok.grad;
      pg_sum += tok.loss;
      count += acc_t(1);
      clip_count += tok.clipped ? acc_t(1) : acc_t(0);
      dual_count += tok.dual ? acc_t(1) : acc_t(0);
      approx_kl += old_logp[i] - logp[i];
      ratio_max = tok.ratio > ratio_max ? tok.ratio : ratio_max;
      ratio_min = tok.ratio < ratio_min ? tok.ratio : ratio_min;
      kl_sum += tok.kl;
      if (entropy) entropy_sum += entropy[i];
    }
    acc_t* out = seq_stats + seq * kPolicyStats;
    out[kPgLossSum] = pg_sum;
    out[kValidCount] = count;
    out[kClipCount] = clip_count;
    out[kDualClipCount] = dual_count;
    out[kApproxKlSum] = approx_kl;
    out[kRatioMax] = ratio_max;
    out[kRatioMin] = ratio_min;
    out[kKlPenaltySum] = kl_sum;
    out[kEntropySum] = entropy_sum;
  }
}

template <typename acc_t>
void ppo_value_rows(const acc_t* values, const acc_t* old_values, const acc_t* returns,
                    const uint8_t* mask, int64_t seq_len, acc_t clip, acc_t* grad,
                    acc_t* seq_stats, int64_t seq_begin, int64_t seq_end) {
  for (int64_t seq = seq_begin; seq < seq_end; ++seq) {
    const int64_t base = seq * seq_len;
    acc_t loss_sum = 0, count = 0, clip_count = 0;
    for (int64_t t = 0; t < seq_len; ++t) {
      const int64_t i = base + t;
      if (!mask[i]) {
        if (grad) grad[i] = acc_t(0);
        continue;
      }
      const ValueToken<acc_t> tok = value_token<acc_t>(values[i], old_values[i], returns[i], clip);
      if (grad) grad[i] = tok.grad;
      loss_sum += tok.loss;
      count += acc_t(1);
      clip_count += tok.clipped ? acc_t(1) : acc_t(0);
    }
    acc_t* out = seq_stats + seq * kValueStats;
    out[kVfLossSum] = loss_sum;
    out[kVfValidCount] = count;
    out[kVfClipCount] = clip_count;
  }
}

#define RLHF_INSTANTIATE(acc_t)                                                                  \
  template void ppo_policy_rows<acc_t>(const acc_t*, const acc_t*, const acc_t*, const uint8_t*, \
                                       const acc_t*, const acc_t*, int64_t,                      \
                                       const PolicyParams<acc_t>&, acc_t*, acc_t*, int64_t,      \
                                       int64_t);                                                 \
  template void ppo_value_rows<acc_t>(const acc_t*, const acc_t*, const acc_t*, const uint8_t*,  \
                                      int64_t, acc_t, acc_t*, acc_t*, int64_t, int64_t);
RLHF_INSTANTIATE(float)
RLHF_INSTANTIATE(double)
#undef RLHF_INSTANTIATE

}  // namespace rlhf_kernels::cpu

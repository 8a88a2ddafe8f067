// Per-token PPO loss terms and their derivatives, shared by the CPU and CUDA
// kernels (host and device), torch-free. Every branch reproduces the gradient
// torch autograd gives the eager reference (rlhf_kernels/reference.py):
//   clamp(x, lo, hi): derivative 1 on the closed interval [lo, hi], else 0;
//   maximum / minimum: at a tie each argument gets half the gradient;
//   where(c, a, b): the selected branch only.
// So inside the clip range (where clamp returns the ratio itself and l1 == l2
// exactly) the derivative is 0.5 * (dl1 + dl2) = dl1, as in autograd.
#pragma once

#include <cmath>
#include <cstdint>

#include "rlhf_kernels/common.h"
#include "rlhf_kernels/kl.h"

namespace rlhf_kernels {

// Columns of the per-sequence statistics the policy kernels write, (B, 9).
enum PolicyStat : int {
  kPgLossSum = 0,   // sum of the per-token surrogate l over valid tokens
  kValidCount,      // number of valid tokens
  kClipCount,       // tokens with l2 > l1
  kDualClipCount,   // tokens where the dual clip is active
  kApproxKlSum,     // sum of old_logp - logp
  kRatioMax,        // -inf when no valid token
  kRatioMin,        // +inf when no valid token
  kKlPenaltySum,    // sum of the KL penalty (0 without ref_logp)
  kEntropySum,      // sum of the entropy (0 without entropy)
  kPolicyStats
};

// Columns of the per-sequence statistics of the value loss, (B, 3).
enum ValueStat : int { kVfLossSum = 0, kVfValidCount, kVfClipCount, kValueStats };

// Tokens per work item (CUDA thread block, CPU task) of the per-token kernels:
// a sequence of T tokens spans ppo_chunks(T) items, each writing one row of
// partial statistics (summed, max / min for the ratio columns, afterwards), so
// that no sum runs over more than kPpoChunk tokens in the accumulation type and
// one long (packed) sequence is still split across threads. A multiple of every
// CPU vector width.
constexpr int64_t kPpoChunk = 1024;
RLHF_HOST_DEVICE inline int64_t ppo_chunks(int64_t seq_len) {
  return seq_len <= 0 ? 1 : (seq_len + kPpoChunk - 1) / kPpoChunk;
}

template <typename acc_t>
struct PolicyParams {
  acc_t ratio_low;     // 1 - clip_low
  acc_t ratio_high;    // 1 + clip_high
  acc_t dual_clip;     // c > 1, used when has_dual_clip
  bool has_dual_clip;
  int kl_estimator;    // KlEstimator
  acc_t kl_coef;
};

template <typename acc_t>
struct PolicyToken {
  acc_t loss;      // the surrogate l (dual clip applied)
  acc_t grad;      // d(l + kl_coef * kl) / d logp
  acc_t ratio;
  acc_t kl;        // KL penalty (0 without an estimator)
  bool clipped;    // l2 > l1
  bool dual;       // dual clip active
};

// One valid token. PPO (Schulman et al., 2017) with the dual clip of Ye et al.
// (2020): ratio = exp(clamp(logp - old, -20, 20)), l = max(-A r, -A clamp(r, lo, hi)),
// A < 0: min(l, -c A).
template <typename acc_t>
RLHF_HOST_DEVICE inline PolicyToken<acc_t> policy_token(acc_t logp, acc_t old_logp, acc_t adv,
                                                        acc_t ref_logp,
                                                        const PolicyParams<acc_t>& p) {
  PolicyToken<acc_t> out;
  const acc_t diff = logp - old_logp;
  const acc_t log_ratio = diff < acc_t(-20) ? acc_t(-20) : (diff > acc_t(20) ? acc_t(20) : diff);
  const acc_t d_log_ratio = (diff >= acc_t(-20) && diff <= acc_t(20)) ? acc_t(1) : acc_t(0);
  const acc_t ratio = acc_exp(log_ratio);
  const acc_t neg_adv = -adv;
  const acc_t clamped = ratio < p.ratio_low ? p.ratio_low : (ratio > p.ratio_high ? p.ratio_high : ratio);
  const bool in_range = ratio >= p.ratio_low && ratio <= p.ratio_high;
  const acc_t loss1 = neg_adv * ratio;
  const acc_t loss2 = neg_adv * clamped;
  const acc_t dloss1 = neg_adv;  // d / d ratio
  const acc_t dloss2 = in_range ? neg_adv : acc_t(0);
  acc_t loss, dloss;
  out.clipped = loss2 > loss1;
  if (loss1 > loss2) {
    loss = loss1;
    dloss = dloss1;
  } else if (loss2 > loss1) {
    loss = loss2;
    dloss = dloss2;
  } else {
    loss = loss1;
    dloss = acc_t(0.5) * (dloss1 + dloss2);
  }
  out.dual = false;
  if (p.has_dual_clip && adv < acc_t(0)) {
    const acc_t loss3 = neg_adv * p.dual_clip;
    if (loss > loss3) {
      out.dual = true;
      loss = loss3;
      dloss = acc_t(0);
    } else if (loss == loss3) {
      dloss = acc_t(0.5) * dloss;
    }
  }
  out.loss = loss;
  out.ratio = ratio;
  acc_t grad = dloss * ratio * d_log_ratio;
  acc_t kl = acc_t(0), dkl = acc_t(0);
  if (p.kl_estimator != kKlNone) {
    kl = kl_value(logp, ref_logp, p.kl_estimator);
    dkl = kl_grad_logp(logp, ref_logp, p.kl_estimator);
  }
  out.kl = kl;
  if (p.kl_estimator != kKlNone) grad += p.kl_coef * dkl;
  out.grad = grad;
  return out;
}

template <typename acc_t>
struct ValueToken {
  acc_t loss;  // 0.5 * max((v - R)^2, (v_clipped - R)^2)
  acc_t grad;  // d loss / d values
  bool clipped;
};

template <typename acc_t>
RLHF_HOST_DEVICE inline ValueToken<acc_t> value_token(acc_t values, acc_t old_values,
                                                      acc_t returns, acc_t clip) {
  const acc_t diff = values - old_values;
  const bool in_range = diff >= -clip && diff <= clip;
  const acc_t err1 = values - returns;
  // In range v_clipped is `values` itself (old + (values - old) would round
  // to a neighbour and count a spurious clip): a tie, as in exact arithmetic.
  const acc_t err2 = in_range ? err1 : (old_values + (diff < -clip ? -clip : clip)) - returns;
  const acc_t loss1 = err1 * err1;
  const acc_t loss2 = err2 * err2;
  const acc_t dloss1 = acc_t(2) * err1;
  const acc_t dloss2 = in_range ? acc_t(2) * err2 : acc_t(0);
  ValueToken<acc_t> out;
  out.clipped = loss2 > loss1;
  if (loss1 > loss2) {
    out.loss = loss1;
    out.grad = dloss1;
  } else if (loss2 > loss1) {
    out.loss = loss2;
    out.grad = dloss2;
  } else {
    out.loss = loss1;
    out.grad = acc_t(0.5) * (dloss1 + dloss2);
  }
  out.loss = acc_t(0.5) * out.loss;
  out.grad = acc_t(0.5) * out.grad;
  return out;
}

}  // namespace rlhf_kernels

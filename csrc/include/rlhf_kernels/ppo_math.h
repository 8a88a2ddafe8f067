// Per-token PPO loss terms and their derivatives, shared by the CPU and CUDA
// kernels (host and device), torch-free: this header holds the types and
// constants; the maths is in ppo_token_math.h, included below (and again by
// each copy of the CPU vector loops).
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
  kClipCount,       // tokens with l2 > l1 (cispo: r outside the range; dppo: masked)
  kDualClipCount,   // tokens where the dual clip is active (dppo: r > c, not masked)
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

// The per-token policy objectives (policy_token, ppo_token_math.h), codes
// shared with rlhf_kernels/ops/ppo_options.py (LOSS_TYPES). r = exp(clamp(logp
// - old_logp, -20, 20)), A the advantage, sg() a stop-gradient:
//   kFormClip:   PPO's max(-A r, -A clip(r, lo, hi)), dual clip c for A < 0;
//   kFormCispo:  -A sg(clip(r, lo, hi)) logp (MiniMax-M1, 2025);
//   kFormSapo:   -A (4 / tau) sigmoid(tau (r - 1)), tau = tau_pos for A > 0,
//                tau_neg otherwise (Gao et al., 2025);
//   kFormGpg:    -A logp (GPG, REINFORCE: no ratio);
//   kFormDppoTv: -A sg(min(r, c)) logp where the probability moved less than
//                the threshold in the advantage's direction, 0 elsewhere
//                (DPPO-Binary-TV, arXiv 2602.04879);
//   kFormDppoKl: the same with the binary KL of the token's probability
//                (DPPO-Binary-KL);
//   kFormDro:    -(A logp - beta / 2 (logp - old_logp)^2), the log-ratio
//                unclamped (verl's dro: Direct Reward Optimization);
//   kFormGeoMean: GMPO's token term (arXiv 2507.20673, verl's geo_mean), for
//                the per-sequence sums of ppo_policy_rows: l = the log-ratio
//                d unclamped, clipped in A's direction (min(d, hi) for A > 0,
//                max(d, lo) for A < 0, lo = -clip_low), 0 for A = 0; clipped /
//                dual count d outside [lo, hi] with A > 0 / A < 0; without a
//                KL estimator the KL column sums A (the sequence's mean
//                advantage). The loss exp(mean l) needs the sums: in Python.
// Two more forms serve ppo_policy_rows only (no token loss, a zero gradient),
// for the objectives whose loss is a function of per-sequence sums:
//   kFormSequenceSums: the loss column sums A where A >= 0 (P_b), the KL
//                column A where A <= 0 (N_b), clipped / dual count A > 0 /
//                A < 0 (NaN kept in both sums): PPO's clip on one ratio per
//                sequence (GSPO, LUSPO) is -(P_b min(r, hi) + N_b max(r, lo)).
//   kFormVespoSums: the loss column sums clamp(logp - old_logp, -20, 20)
//                (VESPO's per-sequence log-weight).
enum PolicyForm : int {
  kFormClip = 0, kFormCispo, kFormSapo, kFormGpg, kFormDppoTv, kFormDppoKl, kFormDro, kFormGeoMean, kPolicyForms,
  kFormSequenceSums = kPolicyForms, kFormVespoSums, kRowsForms
};

// The objective's parameters. ratio_low / ratio_high / dual_clip are the
// three numbers of the form: clip and cispo, the ratio's range [1 - clip_low,
// 1 + clip_high] (and clip's dual clip c); sapo, tau_neg and tau_pos; dppo,
// the thresholds of a fall (A <= 0) and of a rise (A > 0) and the cap c of
// the stopped ratio; dro, beta in ratio_low. gpg takes none.
template <typename acc_t>
struct PolicyParams {
  acc_t ratio_low;     // see above
  acc_t ratio_high;
  acc_t dual_clip;     // clip: c > 1, used when has_dual_clip; dppo: the cap
  bool has_dual_clip;
  int form;            // PolicyForm
  int kl_estimator;    // KlEstimator
  acc_t kl_coef;
};

template <typename acc_t>
PolicyParams<acc_t> cast_params(const PolicyParams<double>& p) {
  return PolicyParams<acc_t>{static_cast<acc_t>(p.ratio_low), static_cast<acc_t>(p.ratio_high),
                             static_cast<acc_t>(p.dual_clip), p.has_dual_clip, p.form, p.kl_estimator,
                             static_cast<acc_t>(p.kl_coef)};
}

// PolicyParams from the ops' double arguments, on the host: the torch glue
// (csrc/*/ppo_loss_glue.cpp) and the CUDA emulator's wrappers
// (python_tests/cuda_emu/wrappers.cpp) build the kernels' parameters with it.
template <typename acc_t>
PolicyParams<acc_t> policy_params(double ratio_low, double ratio_high, double dual_clip, int64_t form,
                                  int64_t kl_estimator, double kl_coef) {
  return cast_params<acc_t>(PolicyParams<double>{ratio_low, ratio_high, dual_clip,
                                                 form == kFormClip && dual_clip > 0, static_cast<int>(form),
                                                 static_cast<int>(kl_estimator), kl_coef});
}

// One token's PPO terms (policy_token, ppo_token_math.h); mask_t<T> is bool for
// a scalar T, an integer vector of 0 / -1 in the CPU vector loops.
template <typename T>
struct PolicyToken {
  T loss;               // the surrogate l (dual clip applied)
  T grad;               // d(l + kl_coef * kl) / d logp
  T ratio;
  T kl;                 // KL penalty (0 without an estimator)
  mask_t<T> clipped;    // l2 > l1 (cispo: r outside [lo, hi]; dppo: the token masked)
  mask_t<T> dual;       // dual clip active (dppo: r > c on a kept token)
};

template <typename T>
struct ValueToken {
  T loss;               // 0.5 * max((v - R)^2, (v_clipped - R)^2)
  T grad;               // d loss / d values
  mask_t<T> clipped;
};

#include "rlhf_kernels/ppo_token_math.h"

}  // namespace rlhf_kernels

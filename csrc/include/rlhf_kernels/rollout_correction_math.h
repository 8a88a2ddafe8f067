// The rollout correction of one sequence, written once for the CPU kernel and
// the CUDA kernel (host and device): importance weights of the trainer's
// log-probs against the sampler's, log_ratio = logp - rollout_logp, and the
// rejection of tokens and sequences whose divergence passes a threshold.
// Semantics of verl 0.9.1's rollout_corr_helper (compute_rollout_correction_
// weights, compute_rollout_rejection_mask), TRL 1.16's
// vllm_importance_sampling_mode and OpenRLHF 0.11's is_correction_*; the
// Python twin is rlhf_kernels/reference.py:rollout_correction and the tests
// compare the three (python_tests/ops/test_rollout_correction.py).
//
// Per sequence, two sweeps over its tokens (the second from cache):
//   1. sums over the valid tokens, each weighted by its mask value w:
//      n = sum w, sum w * lr, sum w * k1, k2, k3 (of lr clamped to +-20),
//      max k2, max k3, sum w * |lr|, max |lr|; then the sequence rules.
//   2. each token's raw weight exp(clamp(x, +-20)), x = lr (level token),
//      sum w * lr (sequence: the product of the ratios) or sum w * lr / n
//      (geometric: their geometric mean); truncated (clamped to [lower,
//      upper]) or masked (0 outside [lower, upper]); the token rules.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace rlhf_kernels {

// Level of the importance weight.
constexpr int kRcToken = 0, kRcSequence = 1, kRcGeometric = 2;
// What is done with a raw weight outside [lower, upper].
constexpr int kRcNoWeights = 0, kRcTruncate = 1, kRcMask = 2;
// A rejection rule: kind = aggregation * 3 + (estimator - 1), aggregation 0
// token, 1 sequence sum, 2 sequence mean, 3 sequence max; estimator k1, k2,
// k3 of the clamped log-ratio (k1 = -lr, k2 = lr^2 / 2, k3 = exp(lr) - 1 - lr).
// A token or sequence is kept when lo <= statistic <= hi (lo = -inf: no lower
// bound).
constexpr int kRcMaxRules = 8;
constexpr int kRcStatColumns = 9;
// exp(+-20) bounds every weight, as verl's SAFETY_BOUND.
constexpr double kRcSafetyBound = 20.0;

struct RcParams {
  int level;
  int mode;
  double lower;  // 0: none
  double upper;  // inf: none
  int num_rules;
  int kind[kRcMaxRules];
  double lo[kRcMaxRules];
  double hi[kRcMaxRules];
};

// The per-sequence sums of sweep 1.
template <typename A>
struct RcRow {
  A n = 0, sum_lr = 0, sum_k[3] = {0, 0, 0}, max_k[3], sum_abs = 0, max_abs = 0;
  bool any_valid = false;
};

template <typename A>
RLHF_HOST_DEVICE inline A rc_exp(A x) {
#if defined(__CUDA_ARCH__)
  return exp(x);
#else
  return std::exp(x);
#endif
}

template <typename A>
RLHF_HOST_DEVICE inline A rc_clamp(A x) {
  const A b = static_cast<A>(kRcSafetyBound);
  return x < -b ? -b : (x > b ? b : x);  // NaN stays NaN
}

// k1, k2, k3 of the clamped log-ratio (verl's token_k1/k2/k3).
template <typename A>
RLHF_HOST_DEVICE inline void rc_estimates(A lr_safe, A* k) {
  k[0] = -lr_safe;
  k[1] = A(0.5) * lr_safe * lr_safe;
  k[2] = rc_exp(lr_safe) - A(1) - lr_safe;
}

template <typename A>
RLHF_HOST_DEVICE inline void rc_row_init(RcRow<A>& row) {
  row = RcRow<A>{};
  row.max_k[0] = row.max_k[1] = row.max_k[2] = -INFINITY;
}

// Sweep 1, one token of mask value w (w == 0: not valid).
template <typename A>
RLHF_HOST_DEVICE inline void rc_accumulate(RcRow<A>& row, A lr, A w) {
  if (w == A(0)) return;
  A k[3];
  rc_estimates(rc_clamp(lr), k);
  row.any_valid = true;
  row.n += w;
  row.sum_lr += w * lr;
  const A a = lr < A(0) ? -lr : lr;
  row.sum_abs += w * a;
  row.max_abs = a > row.max_abs || a != a ? a : row.max_abs;
  for (int j = 0; j < 3; ++j) {
    row.sum_k[j] += w * k[j];
    row.max_k[j] = k[j] > row.max_k[j] || k[j] != k[j] ? k[j] : row.max_k[j];
  }
}

// Two partial rows of one sequence combined (the CUDA block reduction).
template <typename A>
RLHF_HOST_DEVICE inline void rc_combine(RcRow<A>& a, const RcRow<A>& b) {
  a.any_valid = a.any_valid || b.any_valid;
  a.n += b.n;
  a.sum_lr += b.sum_lr;
  a.sum_abs += b.sum_abs;
  a.max_abs = b.max_abs > a.max_abs || b.max_abs != b.max_abs ? b.max_abs : a.max_abs;
  for (int j = 0; j < 3; ++j) {
    a.sum_k[j] += b.sum_k[j];
    a.max_k[j] = b.max_k[j] > a.max_k[j] || b.max_k[j] != b.max_k[j] ? b.max_k[j] : a.max_k[j];
  }
}

template <typename A>
RLHF_HOST_DEVICE inline bool rc_within(A v, double lo, double hi) {
  return v >= static_cast<A>(lo) && v <= static_cast<A>(hi);  // NaN: rejected
}

// After sweep 1: whether the sequence passes every sequence rule, and the
// log of its weight for the sequence and geometric levels.
template <typename A>
RLHF_HOST_DEVICE inline bool rc_sequence_keep(const RcRow<A>& row, const RcParams& p) {
  bool keep = true;
  for (int r = 0; r < p.num_rules; ++r) {
    const int agg = p.kind[r] / 3, est = p.kind[r] % 3;
    if (agg == 0) continue;
    A v;
    if (agg == 1) {
      v = row.sum_k[est];
    } else if (agg == 2) {
      v = row.n > A(0) ? row.sum_k[est] / row.n : A(0);
    } else {
      v = row.any_valid ? row.max_k[est] : A(0);
    }
    keep = keep && rc_within(v, p.lo[r], p.hi[r]);
  }
  return keep;
}

template <typename A>
RLHF_HOST_DEVICE inline A rc_sequence_log_weight(const RcRow<A>& row, const RcParams& p) {
  if (p.level == kRcSequence) return row.sum_lr;
  return row.n > A(0) ? row.sum_lr / row.n : A(0);
}

// Sweep 2, one token: its weight (0 where not valid), whether it is kept, and
// whether its raw weight fell outside [lower, upper].
template <typename A>
struct RcToken {
  A weight;
  bool keep;
  bool out_of_band;
};

template <typename A>
RLHF_HOST_DEVICE inline RcToken<A> rc_token(A lr, A w, bool seq_keep, A seq_log_weight, const RcParams& p) {
  RcToken<A> t{A(0), false, false};
  if (w == A(0)) return t;
  const A x = p.level == kRcToken ? lr : seq_log_weight;
  const A raw = rc_exp(rc_clamp(x));
  const A lower = static_cast<A>(p.lower), upper = static_cast<A>(p.upper);
  t.out_of_band = raw < lower || raw > upper;
  if (p.mode == kRcNoWeights) {
    t.weight = A(1);
  } else if (p.mode == kRcTruncate) {
    t.weight = raw < lower ? lower : (raw > upper ? upper : raw);
  } else {
    t.weight = t.out_of_band ? A(0) : raw;
  }
  bool keep = seq_keep;
  A k[3];
  rc_estimates(rc_clamp(lr), k);
  for (int r = 0; r < p.num_rules; ++r) {
    if (p.kind[r] / 3 == 0) keep = keep && rc_within(k[p.kind[r] % 3], p.lo[r], p.hi[r]);
  }
  t.keep = keep;
  return t;
}

// The statistics row of one sequence (kRcStatColumns values), summed over
// sequences by the caller: n, sum w k1, sum w k3, sum w |lr|, max |lr|,
// sum w weight, sum w [out of band], sum w [rejected], [a valid token rejected].
template <typename A>
RLHF_HOST_DEVICE inline void rc_row_stats(const RcRow<A>& row, A sum_weight, A sum_oob, A sum_rejected,
                                          bool any_rejected, A* out) {
  out[0] = row.n;
  out[1] = row.sum_k[0];
  out[2] = row.sum_k[2];
  out[3] = row.sum_abs;
  out[4] = row.max_abs;
  out[5] = sum_weight;
  out[6] = sum_oob;
  out[7] = sum_rejected;
  out[8] = any_rejected ? A(1) : A(0);
}

}  // namespace rlhf_kernels

// The losses' aggregation, torch-free: from the per-chunk partial sums the PPO
// token kernels write (ppo_math.h PolicyStat / ValueStat) to the loss, its
// statistics and the per-sequence weights, in one pass over (B, chunks, K).
//
// Every loss is sum_b w_b * (sum of the valid token losses of sequence b), with
// w_b fixed by the mode (rlhf_kernels.reference.agg_loss):
//   token-mean               1 / (num_tokens or the valid tokens)
//   token-sum                1
//   seq-mean-token-sum       1 / S
//   seq-mean-token-mean      1 / (S * valid_b)
//   seq-mean-token-sum-norm  1 / (S * T)
// S = num_seqs or the number of sequences with a valid token. A count is the
// sum of the token weights (1 per valid token of a bool mask); a count of 0
// divides by 1, so a batch without a valid token gives 0, never NaN. Sums run in
// double: B sequences of float32 partials lose nothing to the order.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "rlhf_kernels/common.h"
#include "rlhf_kernels/ppo_math.h"

namespace rlhf_kernels {

// In the order of rlhf_kernels.reference.AGG_MODES.
enum Aggregation : int {
  kTokenMean = 0,
  kTokenSum,
  kSeqMeanTokenSum,
  kSeqMeanTokenMean,
  kSeqMeanTokenSumNorm,
  kAggregations
};

struct AggParams {
  int mode;           // Aggregation
  double num_tokens;  // token-mean denominator; <= 0: the valid tokens
  double num_seqs;    // S of the seq-mean modes; <= 0: the sequences with a valid token
};

// Columns of the policy statistics the ops return: POLICY_STAT_NAMES in
// rlhf_kernels/ops/ppo_loss.py, then (from logits) pg_loss, kl, entropy.
enum PolicyOutStat : int {
  kClipFrac = 0,
  kClipFracLower,
  kApproxKl,
  kRatioMaxOut,
  kRatioMinOut,
  kPgLossOut,
  kKlOut,
  kEntropyOut,
  kPolicyOutStats
};

namespace detail {

// max / min that keep a NaN once seen (as torch.amax / amin do).
inline double nan_max(double a, double b) { return (b > a || b != b) && a == a ? b : a; }
inline double nan_min(double a, double b) { return (b < a || b != b) && a == a ? b : a; }

// Chunk-summed column `k` of sequence b.
template <typename acc_t>
double seq_sum(const acc_t* partial, int64_t b, int64_t chunks, int n_stats, int k) {
  double s = 0;
  for (int64_t c = 0; c < chunks; ++c) s += static_cast<double>(partial[(b * chunks + c) * n_stats + k]);
  return s;
}

RLHF_HOST_DEVICE inline double seq_weight(const AggParams& agg, double count_b, double total, double nonempty,
                                          int64_t seq_len) {
  const double seqs = agg.num_seqs > 0 ? agg.num_seqs : (nonempty > 1 ? nonempty : 1.0);
  switch (agg.mode) {
    case kTokenMean: return 1.0 / (agg.num_tokens > 0 ? agg.num_tokens : (total > 0 ? total : 1.0));
    case kTokenSum: return 1.0;
    case kSeqMeanTokenSum: return 1.0 / seqs;
    case kSeqMeanTokenMean: return 1.0 / ((count_b > 0 ? count_b : 1.0) * seqs);
    default: return 1.0 / (seqs * static_cast<double>(seq_len > 1 ? seq_len : 1));
  }
}

// The policy statistics kClipFrac .. kRatioMinOut from their sums over the
// valid tokens (total: their count): shares over the tokens, the ratio
// extremes 0 without a valid token.
template <typename acc_t>
RLHF_HOST_DEVICE inline void write_policy_stats(acc_t* stats, double total, double clips, double duals,
                                                double approx_kl, double ratio_max, double ratio_min) {
  const double denom = total > 0 ? total : 1.0;
  stats[kClipFrac] = static_cast<acc_t>(clips / denom);
  stats[kClipFracLower] = static_cast<acc_t>(duals / denom);
  stats[kApproxKl] = static_cast<acc_t>(approx_kl / denom);
  stats[kRatioMaxOut] = static_cast<acc_t>(total > 0 ? ratio_max : 0.0);
  stats[kRatioMinOut] = static_cast<acc_t>(total > 0 ? ratio_min : 0.0);
}

}  // namespace detail

// The policy loss from (B, chunks, kPolicyStats) partials: loss = pg + kl_coef
// * kl - entropy_coef * entropy (each aggregated with the same weights), the
// kPolicyOutStats statistics (ratio extremes 0 without a valid token) and
// weights (B,), each divided by `divisor` (a global count given as a tensor).
template <typename acc_t>
void finalize_policy(const acc_t* partial, int64_t seqs, int64_t chunks, int64_t seq_len,
                     const AggParams& agg, double kl_coef, double entropy_coef, double divisor,
                     acc_t* loss, acc_t* stats, acc_t* weights) {
  double total = 0, nonempty = 0, clips = 0, duals = 0, approx_kl = 0;
  double ratio_max = -std::numeric_limits<double>::infinity();
  double ratio_min = std::numeric_limits<double>::infinity();
  for (int64_t b = 0; b < seqs; ++b) {
    const double count = detail::seq_sum(partial, b, chunks, kPolicyStats, kValidCount);
    total += count;
    nonempty += count > 0 ? 1 : 0;
    clips += detail::seq_sum(partial, b, chunks, kPolicyStats, kClipCount);
    duals += detail::seq_sum(partial, b, chunks, kPolicyStats, kDualClipCount);
    approx_kl += detail::seq_sum(partial, b, chunks, kPolicyStats, kApproxKlSum);
    for (int64_t c = 0; c < chunks; ++c) {
      const acc_t* row = partial + (b * chunks + c) * kPolicyStats;
      ratio_max = detail::nan_max(ratio_max, static_cast<double>(row[kRatioMax]));
      ratio_min = detail::nan_min(ratio_min, static_cast<double>(row[kRatioMin]));
    }
  }
  double pg = 0, kl = 0, entropy = 0;
  for (int64_t b = 0; b < seqs; ++b) {
    const double count = detail::seq_sum(partial, b, chunks, kPolicyStats, kValidCount);
    const double w = detail::seq_weight(agg, count, total, nonempty, seq_len) / divisor;
    weights[b] = static_cast<acc_t>(w);
    pg += w * detail::seq_sum(partial, b, chunks, kPolicyStats, kPgLossSum);
    kl += w * detail::seq_sum(partial, b, chunks, kPolicyStats, kKlPenaltySum);
    entropy += w * detail::seq_sum(partial, b, chunks, kPolicyStats, kEntropySum);
  }
  *loss = static_cast<acc_t>(pg + kl_coef * kl - entropy_coef * entropy);
  detail::write_policy_stats(stats, total, clips, duals, approx_kl, ratio_max, ratio_min);
  stats[kPgLossOut] = static_cast<acc_t>(pg);
  stats[kKlOut] = static_cast<acc_t>(kl);
  stats[kEntropyOut] = static_cast<acc_t>(entropy);
}

// The value loss from (B, chunks, kValueStats) partials: loss, vf_clipfrac and
// weights (B,).
template <typename acc_t>
void finalize_value(const acc_t* partial, int64_t seqs, int64_t chunks, int64_t seq_len,
                    const AggParams& agg, acc_t* loss, acc_t* vf_clipfrac, acc_t* weights) {
  double total = 0, nonempty = 0, clips = 0;
  for (int64_t b = 0; b < seqs; ++b) {
    const double count = detail::seq_sum(partial, b, chunks, kValueStats, kVfValidCount);
    total += count;
    nonempty += count > 0 ? 1 : 0;
    clips += detail::seq_sum(partial, b, chunks, kValueStats, kVfClipCount);
  }
  double sum = 0;
  for (int64_t b = 0; b < seqs; ++b) {
    const double count = detail::seq_sum(partial, b, chunks, kValueStats, kVfValidCount);
    const double w = detail::seq_weight(agg, count, total, nonempty, seq_len);
    weights[b] = static_cast<acc_t>(w);
    sum += w * detail::seq_sum(partial, b, chunks, kValueStats, kVfLossSum);
  }
  *loss = static_cast<acc_t>(sum);
  *vf_clipfrac = static_cast<acc_t>(clips / (total > 0 ? total : 1.0));
}

// PPO's clip on one ratio per sequence (GSPO's "sequence" level, LUSPO) from
// the (B, kPolicyStats) rows of form kFormSequenceSums (ppo_math.h), in the
// rows' type as rlhf_kernels/ops/policy_objectives.py's composition
// (_sequence_clip_finish), the sums over B in double: with n_b = max(count_b,
// 1), s_b = -approx_kl_b / n_b, r_b = exp(clamp(s_b, -20, 20)), P_b / N_b
// the loss / KL columns and w_b the aggregation's weight,
//   loss   = sum_b w_b -(P_b min(r_b, hi) + N_b max(r_b, lo)), a dual clip c
//            replacing max(r_b, lo) by c where it exceeds c;
//   coef_b = d loss / d s_b / n_b (a bound's derivative passes at a tie, half
//            at the dual clip's; 0 where s_b is clamped);
//   stats  = POLICY_STAT_NAMES: clipfrac the clip column's tokens of the
//            sequences with r_b > hi plus the dual column's with r_b < lo,
//            clipfrac_lower the dual column's where the dual clip holds, both
//            over the valid tokens; approx_kl; ratio max / min over the
//            sequences with a valid token and r_b not NaN (0 without a valid
//            token).
// sequence_clip_row is one sequence (the host loop below and the CUDA kernel).
template <typename acc_t>
struct SequenceClip {
  acc_t loss, coef, clips, duals, ratio;
};

template <typename acc_t>
RLHF_HOST_DEVICE inline SequenceClip<acc_t> sequence_clip_row(const acc_t* row, acc_t w, acc_t ratio_low,
                                                              acc_t ratio_high, acc_t dual_clip) {
  const acc_t one = 1, zero = 0, bound = 20;
  const acc_t count = row[kValidCount];
  const acc_t n = count < one ? one : count;  // clamp(min=1): a NaN stays
  const acc_t log_ratio = -row[kApproxKlSum] / n;
  const acc_t clamped = log_ratio < -bound ? -bound : (log_ratio > bound ? bound : log_ratio);
  const acc_t ratio = std::exp(clamped);
  const acc_t pos = row[kPgLossSum], neg = row[kKlPenaltySum];
  const acc_t upper = ratio > ratio_high ? ratio_high : ratio;
  acc_t lower = ratio < ratio_low ? ratio_low : ratio;
  const acc_t d_upper = ratio <= ratio_high ? one : zero;
  acc_t d_lower = ratio >= ratio_low ? one : zero;
  bool dual = false;
  if (dual_clip > 0) {
    dual = lower > dual_clip;
    d_lower = dual ? zero : (lower == dual_clip ? acc_t(0.5) * d_lower : d_lower);
    lower = dual ? dual_clip : lower;
  }
  const acc_t moves = log_ratio >= -bound && log_ratio <= bound ? one : zero;
  SequenceClip<acc_t> out;
  out.loss = w * -(pos * upper + neg * lower);
  out.coef = w * -(pos * d_upper + neg * d_lower) * ratio * moves / n;
  out.clips = (ratio > ratio_high ? row[kClipCount] : zero) + (ratio < ratio_low ? row[kDualClipCount] : zero);
  out.duals = dual ? row[kDualClipCount] : zero;
  out.ratio = ratio;
  return out;
}

template <typename acc_t>
void finalize_sequence_clip(const acc_t* rows, int64_t seqs, int64_t seq_len, const AggParams& agg,
                            acc_t ratio_low, acc_t ratio_high, acc_t dual_clip, acc_t* loss, acc_t* coef,
                            acc_t* stats) {
  double total = 0, nonempty = 0;
  for (int64_t b = 0; b < seqs; ++b) {
    const double count = rows[b * kPolicyStats + kValidCount];
    total += count;
    nonempty += count > 0 ? 1 : 0;
  }
  double sum = 0, clips = 0, duals = 0, approx_kl = 0;
  double ratio_max = -std::numeric_limits<double>::infinity();
  double ratio_min = std::numeric_limits<double>::infinity();
  for (int64_t b = 0; b < seqs; ++b) {
    const acc_t* row = rows + b * kPolicyStats;
    const acc_t w = static_cast<acc_t>(detail::seq_weight(agg, row[kValidCount], total, nonempty, seq_len));
    const SequenceClip<acc_t> s = sequence_clip_row(row, w, ratio_low, ratio_high, dual_clip);
    sum += static_cast<double>(s.loss);
    coef[b] = s.coef;
    clips += static_cast<double>(s.clips);
    duals += static_cast<double>(s.duals);
    approx_kl += static_cast<double>(row[kApproxKlSum]);
    if (row[kValidCount] > 0 && s.ratio == s.ratio) {
      ratio_max = s.ratio > ratio_max ? s.ratio : ratio_max;
      ratio_min = s.ratio < ratio_min ? s.ratio : ratio_min;
    }
  }
  *loss = static_cast<acc_t>(sum);
  detail::write_policy_stats(stats, total, clips, duals, approx_kl, ratio_max, ratio_min);
}

// grad (B, T) *= weights[b], rows [b_begin, b_end): the token gradient for a
// unit upstream gradient.
template <typename acc_t>
void scale_rows(acc_t* grad, const acc_t* weights, int64_t seq_len, int64_t b_begin, int64_t b_end) {
  for (int64_t b = b_begin; b < b_end; ++b) {
    const acc_t w = weights[b];
    acc_t* row = grad + b * seq_len;
    for (int64_t t = 0; t < seq_len; ++t) row[t] *= w;
  }
}

}  // namespace rlhf_kernels

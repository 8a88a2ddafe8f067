// The torch glue of the PPO loss ops (csrc/cpu/ppo_loss_glue.cpp,
// csrc/cuda/ppo_loss_glue.cpp): argument checks, the token tensors as the
// kernels read them, the aggregation with ATen ops and the public ops over a
// device's token pass and finalisation.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/types.h>

#include <initializer_list>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common.h"
#include "logprobs.h"
#include "rlhf_kernels/aggregation.h"
#include "rlhf_kernels/ppo_math.h"

namespace rlhf_kernels {

// The objective's code (PolicyForm, ppo_math.h): a loss form, or with
// `forms` = kRowsForms also a rows-only form (ppo_policy_rows).
inline void check_loss_type(int64_t loss_type, int forms = kPolicyForms) {
  TORCH_CHECK_VALUE(loss_type >= 0 && loss_type < forms, "loss_type: bad code ", loss_type);
}

// Checks of ppo_logits_grad_native's arguments (both devices): the number of
// rows and the PolicyParams they imply.
struct PpoLogitsGradArgs {
  int64_t n_rows;
  PolicyParams<double> params;
};

inline PpoLogitsGradArgs check_ppo_logits_grad(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& grad_logits,
    RowLayout in_layout, RowLayout out_layout, const at::Tensor& old_logp,
    const at::Tensor& advantages, const at::Tensor& row_weight,
    const std::optional<at::Tensor>& ref_logp, double ratio_low, double ratio_high,
    double dual_clip, int64_t loss_type, double kl_coef, int64_t kl_estimator) {
  const int64_t n_rows = checked_grad_rows(logits, labels, grad_logits, in_layout, out_layout);
  const at::ScalarType acc = acc_dtype_for(logits);
  check_row_tensor(old_logp, n_rows, acc, "old_logp");
  check_row_tensor(advantages, n_rows, acc, "advantages");
  check_row_tensor(row_weight, n_rows, acc, "row_weight");
  if (ref_logp) check_row_tensor(*ref_logp, n_rows, acc, "ref_logp");
  TORCH_CHECK_VALUE(kl_estimator >= kKlNone && kl_estimator <= kKlK3, "kl_estimator: bad code ", kl_estimator);
  TORCH_CHECK_VALUE(kl_estimator == kKlNone || ref_logp, "ref_logp: required with a KL estimator");
  check_loss_type(loss_type);
  return {n_rows, policy_params<double>(ratio_low, ratio_high, dual_clip, loss_type, kl_estimator, kl_coef)};
}

// The (B, T) token tensors of the PPO loss kernels, flattened to (B * T,).
struct PpoShape {
  int64_t seqs;
  int64_t seq_len;
  int64_t numel() const { return seqs * seq_len; }
};

// Checks of the PPO kernels' token inputs: `first` and `others` contiguous
// (N,) tensors of one floating dtype, mask a contiguous (N,) tensor, bool
// (valid or not) or of that dtype (per-token weights, nonzero = valid), and N
// a multiple of seq_len. Returns (B, T).
inline PpoShape check_ppo_inputs(const at::Tensor& first,
                                 std::initializer_list<const at::Tensor*> others,
                                 const at::Tensor& mask, int64_t seq_len,
                                 std::initializer_list<const char*> names) {
  TORCH_CHECK_VALUE(first.dim() == 1 && first.is_contiguous(),
                    "expected contiguous (N,) token tensors");
  TORCH_CHECK_VALUE(first.scalar_type() == at::kFloat || first.scalar_type() == at::kDouble,
                    "token tensors must be float32 or float64");
  const int64_t n = first.numel();
  TORCH_CHECK_VALUE(seq_len >= 0 && (seq_len == 0 ? n == 0 : n % seq_len == 0),
                    "seq_len: ", seq_len, " does not divide ", n, " tokens");
  auto name = names.begin();
  for (const at::Tensor* t : others) check_row_tensor(*t, n, first.scalar_type(), *name++);
  check_row_tensor(mask, n, mask.scalar_type() == at::kBool ? at::kBool : first.scalar_type(), "mask");
  TORCH_CHECK(first.device() == mask.device(), "mask: must be on the device of the inputs");
  return PpoShape{seq_len == 0 ? 0 : n / seq_len, seq_len};
}

// The kernels read a mask through two pointers, exactly one of them set: a
// bool mask's bytes (0 or 1), or a weight mask's values (acc_t; nonzero = valid).
inline const uint8_t* mask_data(const at::Tensor& mask) {
  return mask.scalar_type() == at::kBool ? reinterpret_cast<const uint8_t*>(mask.const_data_ptr()) : nullptr;
}

template <typename acc_t>
const acc_t* weight_data(const at::Tensor& mask) {
  return mask.scalar_type() == at::kBool ? nullptr : mask.const_data_ptr<acc_t>();
}

// A mask as the kernels read it, (N,) contiguous: bool stays bool, any other
// dtype becomes per-token weights in `dtype` (0/1 weights give exactly the bool
// results).
inline at::Tensor kernel_mask(const at::Tensor& mask, at::ScalarType dtype) {
  return (mask.scalar_type() == at::kBool ? mask : mask.to(dtype)).reshape({-1}).contiguous();
}

// Per-sequence (or total) counts as divisors: a count of 0 (no valid token)
// divides by 1, so that its zero sum stays 0; weight counts in (0, 1) divide
// as they are (a weighted mean).
inline at::Tensor count_divisor(const at::Tensor& count) {
  return at::where(count.gt(0), count, at::ones_like(count));
}

// Checks of the policy token pass's arguments (both devices).
inline PpoShape check_ppo_policy_inputs(const at::Tensor& logp, const at::Tensor& old_logp,
                                        const at::Tensor& advantages, const at::Tensor& mask,
                                        const std::optional<at::Tensor>& ref_logp,
                                        const std::optional<at::Tensor>& entropy, int64_t seq_len,
                                        int64_t kl_estimator) {
  const PpoShape shape = check_ppo_inputs(logp, {&old_logp, &advantages}, mask, seq_len,
                                          {"old_logp", "advantages"});
  const at::ScalarType acc = logp.scalar_type();
  if (ref_logp) check_row_tensor(*ref_logp, shape.numel(), acc, "ref_logp");
  if (entropy) check_row_tensor(*entropy, shape.numel(), acc, "entropy");
  TORCH_CHECK_VALUE(kl_estimator >= kKlNone && kl_estimator <= kKlK3, "kl_estimator: bad code ", kl_estimator);
  TORCH_CHECK_VALUE(kl_estimator == kKlNone || ref_logp, "ref_logp: required with a KL estimator");
  return shape;
}

// The token inputs of the public loss ops, (..., T) of any float dtype and a
// mask of any dtype, as the kernels read them: contiguous (N,) tensors of the
// computation dtype (float64 if any input is float64, else float32) and the
// mask (kernel_mask: bool, or weights in the computation dtype). The Python
// layer has checked shapes and devices.
struct LossTokens {
  std::vector<at::Tensor> values;  // in the order given
  at::Tensor mask;
  int64_t seqs;
  int64_t seq_len;
  at::TensorOptions options() const { return values[0].options(); }
  int64_t numel() const { return seqs * seq_len; }
};

inline LossTokens loss_tokens(std::initializer_list<const at::Tensor*> values, const at::Tensor& mask) {
  const at::Tensor& first = **values.begin();
  bool f64 = false;
  for (const at::Tensor* t : values) f64 = f64 || t->scalar_type() == at::kDouble;
  const at::ScalarType dtype = f64 ? at::kDouble : at::kFloat;
  LossTokens out;
  for (const at::Tensor* t : values) out.values.push_back(t->to(dtype).reshape({-1}).contiguous());
  out.mask = kernel_mask(mask, dtype);
  TORCH_CHECK_VALUE(first.dim() >= 1, "expected token tensors of shape (..., T)");
  out.seq_len = first.size(-1);
  out.seqs = 1;
  for (int64_t d = 0; d + 1 < first.dim(); ++d) out.seqs *= first.size(d);
  return out;
}

inline AggParams agg_params(int64_t agg, std::optional<double> num_tokens, std::optional<double> num_seqs) {
  TORCH_CHECK_VALUE(agg >= 0 && agg < kAggregations, "agg: bad code ", agg);
  return AggParams{static_cast<int>(agg), num_tokens.value_or(0.0), num_seqs.value_or(0.0)};
}

// (B, 1, K) partials of B sequences without a token: zero sums, the ratio
// extremes at -inf / +inf (max_col < 0: no extremes).
inline at::Tensor empty_partials(int64_t seqs, int64_t n_stats, int64_t max_col, int64_t min_col,
                                 const at::TensorOptions& options) {
  at::Tensor partial = at::zeros({seqs, 1, n_stats}, options);
  if (max_col >= 0) {
    partial.select(2, max_col).fill_(-std::numeric_limits<double>::infinity());
    partial.select(2, min_col).fill_(std::numeric_limits<double>::infinity());
  }
  return partial;
}

// aggregation.h's weights with ATen ops, on the device of `counts` (B,), in
// double as the host loop computes them (so both give the same weights), then
// in `dtype`, divided by `divisor` when given: no host synchronisation.
inline at::Tensor aggregation_weights(const at::Tensor& counts, const AggParams& agg, int64_t seq_len,
                                      at::ScalarType dtype, const std::optional<at::Tensor>& divisor) {
  const at::Tensor c = counts.to(at::kDouble);
  const at::Tensor ones = at::ones_like(c);
  const at::Tensor seqs = agg.num_seqs > 0 ? at::full({}, agg.num_seqs, c.options())
                                           : c.gt(0).sum().to(at::kDouble).clamp_min(1);
  at::Tensor w;
  switch (agg.mode) {
    case kTokenMean: w = agg.num_tokens > 0 ? ones.div(agg.num_tokens) : ones.div(count_divisor(c.sum())); break;
    case kTokenSum: w = ones; break;
    case kSeqMeanTokenSum: w = ones.div(seqs); break;
    case kSeqMeanTokenMean: w = ones.div(count_divisor(c).mul(seqs)); break;
    default: w = ones.div(seqs.mul(static_cast<double>(std::max<int64_t>(seq_len, 1))));
  }
  if (divisor) w = w.div(divisor->to(w.device(), at::kDouble));
  return w.to(dtype);
}

// finalize_policy (aggregation.h) with ATen ops: (loss, stats (kPolicyOutStats,), weights).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> finalize_policy_aten(
    const at::Tensor& partial, int64_t seq_len, const AggParams& agg, double kl_coef, double entropy_coef,
    const std::optional<at::Tensor>& divisor) {
  const at::Tensor seq = partial.to(at::kDouble).sum(1);  // (B, K)
  const at::Tensor counts = seq.select(1, kValidCount);
  const at::Tensor total = counts.sum();
  const at::Tensor weights = aggregation_weights(counts, agg, seq_len, at::kDouble, divisor);
  const at::Tensor weighted = weights.unsqueeze(1).mul(seq).sum(0);  // (K,)
  const at::Tensor pg = weighted.select(0, kPgLossSum), kl = weighted.select(0, kKlPenaltySum);
  const at::Tensor entropy = weighted.select(0, kEntropySum);
  const at::Tensor loss = pg.add(kl, kl_coef).sub(entropy, entropy_coef);
  const at::Tensor denom = count_divisor(total);
  const at::Tensor any = total.gt(0);
  const at::Tensor zero = at::zeros({}, seq.options());
  const at::Tensor ratio_max = partial.numel() ? partial.select(2, kRatioMax).amax().to(at::kDouble) : zero;
  const at::Tensor ratio_min = partial.numel() ? partial.select(2, kRatioMin).amin().to(at::kDouble) : zero;
  const at::Tensor stats = at::stack({seq.select(1, kClipCount).sum().div(denom),
                                      seq.select(1, kDualClipCount).sum().div(denom),
                                      seq.select(1, kApproxKlSum).sum().div(denom),
                                      at::where(any, ratio_max, zero), at::where(any, ratio_min, zero), pg, kl,
                                      entropy});
  const at::ScalarType dtype = partial.scalar_type();
  return {loss.to(dtype), stats.to(dtype), weights.to(dtype)};
}

// finalize_value with ATen ops: (loss, vf_clipfrac (1,), weights).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> finalize_value_aten(const at::Tensor& partial,
                                                                         int64_t seq_len, const AggParams& agg) {
  const at::Tensor seq = partial.to(at::kDouble).sum(1);
  const at::Tensor counts = seq.select(1, kVfValidCount);
  const at::Tensor weights = aggregation_weights(counts, agg, seq_len, at::kDouble, std::nullopt);
  const at::Tensor loss = weights.mul(seq.select(1, kVfLossSum)).sum();
  const at::Tensor clipfrac = seq.select(1, kVfClipCount).sum().div(count_divisor(counts.sum())).reshape({1});
  const at::ScalarType dtype = partial.scalar_type();
  return {loss.to(dtype), clipfrac.to(dtype), weights.to(dtype)};
}

// The inputs of the public ppo_loss_from_logits op as its kernels read them.
struct FromLogitsInputs {
  LogitsRows rows;
  at::Tensor labels;  // (N,) int64
  at::Tensor old_logp, advantages;
  std::optional<at::Tensor> ref_logp;
  at::Tensor mask;  // (N,) kernel_mask: bool, or weights in the accumulation dtype
  int64_t seqs, seq_len;
  bool fused;       // the logits gradient written in the forward (see fused_logits_grad)
};

// The gradient is written in the forward when one is wanted and the logits are
// not to be overwritten, except for float16: its gradient must be scaled
// (GradScaler) before it is rounded to float16, or small values underflow.
inline bool fused_logits_grad(const at::Tensor& logits, bool need_grad, bool inplace_backward) {
  return need_grad && !inplace_backward && logits.scalar_type() != at::kHalf;
}

inline FromLogitsInputs from_logits_inputs(const at::Tensor& logits, const at::Tensor& labels,
                                           const at::Tensor& old_logp, const at::Tensor& advantages,
                                           const at::Tensor& mask, const std::optional<at::Tensor>& ref_logp,
                                           bool inplace_backward, bool need_grad) {
  const at::ScalarType acc = acc_dtype_for(logits);
  auto flat = [&](const at::Tensor& t) { return t.to(acc).reshape({-1}).contiguous(); };
  FromLogitsInputs in{logits_rows(logits), labels.reshape({-1}).to(at::kLong).contiguous(), flat(old_logp),
                      flat(advantages), std::nullopt, kernel_mask(mask, acc), 1, labels.size(-1), fused_logits_grad(logits, need_grad, inplace_backward)};
  if (ref_logp) in.ref_logp = flat(*ref_logp);
  for (int64_t d = 0; d + 1 < labels.dim(); ++d) in.seqs *= labels.size(d);
  return in;
}

// The native row kernels of the logprobs op, through the dispatcher (CPU or CUDA by the tensors).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_rows_native(
    const LogitsRows& rows, const at::Tensor& labels, double inv_temperature, int64_t ignore_index,
    bool compute_entropy) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rlhf_kernels::logprobs_fwd_native", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t, double,
                                 int64_t, bool, const std::optional<at::Tensor>&)>();
  return op.call(rows.tensor, labels, rows.layout.inner_rows, rows.layout.outer_stride, rows.layout.inner_stride,
                 inv_temperature, ignore_index, compute_entropy, std::nullopt);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_logits_grad_native(
    const FromLogitsInputs& in, const at::Tensor& row_weight, const at::Tensor& grad_logits, double inv_temperature,
    double ratio_low, double ratio_high, double dual_clip, int64_t loss_type, double kl_coef, int64_t kl_estimator,
    double entropy_coef, int64_t max_rows_in_flight) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("rlhf_kernels::ppo_logits_grad_native", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, const at::Tensor&, int64_t, int64_t, int64_t, int64_t, int64_t,
              double, int64_t, double, double, double, int64_t, double, int64_t, double, int64_t)>();
  const RowLayout out = contiguous_rows(in.rows, in.rows.tensor.size(-1));
  return op.call(in.rows.tensor, in.labels, in.old_logp, in.advantages, row_weight, in.ref_logp, grad_logits,
                 in.rows.layout.inner_rows, in.rows.layout.outer_stride, in.rows.layout.inner_stride,
                 out.outer_stride, out.inner_stride, inv_temperature, -100, ratio_low, ratio_high, dual_clip,
                 loss_type, kl_coef, kl_estimator, entropy_coef, max_rows_in_flight);
}

using FromLogitsOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                     at::Tensor, at::Tensor>;

// The public op ppo_loss_from_logits over a device's token pass and
// finalisation (CPU: host loop, CUDA: ATen ops): one read of the logits (and,
// with the gradient in the forward, one write of its gradient), then one pass
// over the tokens and one over the sequences. Returns loss, stats
// (kPolicyOutStats,), the token gradient dl/dlogp (0 on masked tokens;
// unfused, with a gradient wanted; else empty), the weights w_b (the backward
// scales by them), row_max, log_sum, entropy (N,) and the logits gradient
// (fused; else empty).
//   partials(logp, old, adv, mask, ref, entropy, seq_len, lo, hi, dual, loss_type, kl_coef, kl_code, need_grad)
//     -> (grad, (B, chunks, kPolicyStats) partial)
//   finalize(partial, seq_len, agg, kl_coef, entropy_coef, count) -> (loss, stats, weights)
template <typename Partials, typename Finalize>
FromLogitsOutputs ppo_loss_from_logits_impl(
    const at::Tensor& logits, const FromLogitsInputs& in, double temperature, double ratio_low, double ratio_high,
    double dual_clip, int64_t loss_type, const AggParams& agg, double kl_coef, int64_t kl_estimator,
    double entropy_coef, bool need_grad, const std::optional<at::Tensor>& count, int64_t max_rows_in_flight,
    Partials&& partials, Finalize&& finalize) {
  check_loss_type(loss_type);
  const double inv_temperature = 1.0 / temperature;
  const int64_t kl_code = in.ref_logp ? kl_estimator : kKlNone;
  at::Tensor grad_logits = at::empty({0}, logits.options()), weights;
  at::Tensor logp, entropy, row_max, log_sum;
  if (in.fused) {
    // The weights first (they depend on the mask only): the gradient written
    // now is the final one for a unit upstream gradient. A token's row weight
    // is w_b, times its own weight for a weight mask.
    const at::Tensor m = in.mask.view({in.seqs, in.seq_len});
    weights = aggregation_weights(m.sum(-1, false, at::kDouble), agg, in.seq_len, in.old_logp.scalar_type(),
                                  count);
    const at::Tensor w = m.scalar_type() == at::kBool ? weights.unsqueeze(1) : weights.unsqueeze(1).mul(m);
    const at::Tensor row_weight = at::where(m.ne(0), w, at::zeros({}, weights.options())).reshape({-1}).contiguous();
    grad_logits = at::empty(logits.sizes(), logits.options());
    std::tie(logp, entropy, row_max, log_sum) =
        ppo_logits_grad_native(in, row_weight, grad_logits, inv_temperature, ratio_low, ratio_high, dual_clip,
                               loss_type, kl_coef, kl_code, entropy_coef, max_rows_in_flight);
  } else {
    std::tie(logp, entropy, row_max, log_sum) = logprobs_rows_native(in.rows, in.labels, inv_temperature, -100, true);
  }
  const bool token_grad = need_grad && !in.fused;
  at::Tensor grad, partial;
  if (in.labels.numel() == 0) {
    grad = at::empty({0}, in.old_logp.options());
    partial = empty_partials(in.seqs, kPolicyStats, kRatioMax, kRatioMin, in.old_logp.options());
  } else {
    std::tie(grad, partial) = partials(logp, in.old_logp, in.advantages, in.mask, in.ref_logp, entropy, in.seq_len,
                                       ratio_low, ratio_high, dual_clip, loss_type, kl_coef, kl_code, token_grad);
  }
  auto [loss, stats, final_weights] = finalize(partial, in.seq_len, agg, kl_coef, entropy_coef, count);
  if (!in.fused) weights = final_weights;
  return {loss, stats, grad, weights, row_max, log_sum, entropy, grad_logits};
}

using LossOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The token pass of ppo_policy_loss and ppo_policy_rows on a device: (T, the
// token gradient dl/dlogp (empty unless need_grad), the (B, chunks,
// kPolicyStats) partials), the partials of B empty sequences without a token.
template <typename Partials>
std::tuple<int64_t, at::Tensor, at::Tensor> policy_token_pass(const at::Tensor& logp, const at::Tensor& old_logp,
                                                              const at::Tensor& advantages, const at::Tensor& mask,
                                                              double ratio_low, double ratio_high, double dual_clip,
                                                              int64_t loss_type, bool need_grad, Partials&& partials,
                                                              int forms = kPolicyForms) {
  check_loss_type(loss_type, forms);
  const LossTokens tok = loss_tokens({&logp, &old_logp, &advantages}, mask);
  if (tok.numel() == 0) {
    return {tok.seq_len, at::empty({0}, tok.options()),
            empty_partials(tok.seqs, kPolicyStats, kRatioMax, kRatioMin, tok.options())};
  }
  auto [grad, partial] = partials(tok.values[0], tok.values[1], tok.values[2], tok.mask, std::nullopt, std::nullopt,
                                  tok.seq_len, ratio_low, ratio_high, dual_clip, loss_type, 0.0, kKlNone, need_grad);
  return {tok.seq_len, grad, partial};
}

// The public ppo_policy_loss over a device's token pass (as in
// ppo_loss_from_logits_impl) and finalisation; returns loss, stats (5,), the
// token gradient dl/dlogp (0 on masked tokens; empty unless need_grad) and the
// weights w_b: the backward's gradient is w_b * dl/dlogp * upstream, one pass.
template <typename Partials, typename Finalize>
LossOutputs ppo_policy_loss_impl(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                                 const at::Tensor& mask, double ratio_low, double ratio_high, double dual_clip,
                                 int64_t loss_type, const AggParams& agg, bool need_grad, Partials&& partials,
                                 Finalize&& finalize) {
  const auto [seq_len, grad, partial] = policy_token_pass(logp, old_logp, advantages, mask, ratio_low, ratio_high,
                                                         dual_clip, loss_type, need_grad, partials);
  auto [loss, stats, weights] = finalize(partial, seq_len, agg, 0.0, 0.0, std::nullopt);
  return {loss, stats.narrow(0, 0, kPgLossOut), grad, weights};
}

// ppo_policy_rows: ppo_policy_loss_impl's token pass alone, its per-sequence
// sums (B, kPolicyStats) (the chunks summed; max / min for the ratio columns)
// and the token gradient dl/dlogp (0 on masked tokens; empty unless need_grad).
template <typename Partials>
std::tuple<at::Tensor, at::Tensor> ppo_policy_rows_impl(const at::Tensor& logp, const at::Tensor& old_logp,
                                                        const at::Tensor& advantages, const at::Tensor& mask,
                                                        double ratio_low, double ratio_high, double dual_clip,
                                                        int64_t loss_type, bool need_grad, Partials&& partials) {
  const auto [seq_len, grad, partial] = policy_token_pass(logp, old_logp, advantages, mask, ratio_low, ratio_high,
                                                         dual_clip, loss_type, need_grad, partials, kRowsForms);
  at::Tensor rows = partial.sum(1);
  rows.select(1, kRatioMax).copy_(std::get<0>(partial.select(2, kRatioMax).max(1)));
  rows.select(1, kRatioMin).copy_(std::get<0>(partial.select(2, kRatioMin).min(1)));
  return {grad, rows};
}

// ppo_sequence_clip on a device: rows (B, kPolicyStats) float32 | float64
// checked and made contiguous, the outputs (loss, coef (B,), stats
// (kPgLossOut,)) allocated, then finalize(rows, agg, loss, coef, stats) the
// device's finalize_sequence_clip (aggregation.h).
template <typename Finalize>
std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_sequence_clip_impl(const at::Tensor& rows, int64_t agg,
                                                                      std::optional<double> num_tokens,
                                                                      std::optional<double> num_seqs,
                                                                      Finalize&& finalize) {
  TORCH_CHECK_VALUE(rows.dim() == 2 && rows.size(1) == kPolicyStats, "rows: expected shape (B, ", kPolicyStats,
                    "), got ", rows.sizes());
  TORCH_CHECK_VALUE(rows.scalar_type() == at::kFloat || rows.scalar_type() == at::kDouble,
                    "rows: expected float32 or float64, got ", rows.scalar_type());
  const AggParams params = agg_params(agg, num_tokens, num_seqs);
  const at::Tensor in = rows.contiguous();
  at::Tensor loss = at::empty({}, in.options()), coef = at::empty({in.size(0)}, in.options());
  at::Tensor stats = at::empty({kPgLossOut}, in.options());
  finalize(in, params, loss, coef, stats);
  return {loss, coef, stats};
}

// scale_by_sign on a device: x (..., T) float32 | float64 and pos, neg (R,) of
// its dtype checked, x made contiguous and the output allocated, then
// scale(x, pos, neg, out, rows, T) the device's loop.
template <typename Scale>
at::Tensor scale_by_sign_impl(const at::Tensor& x, const at::Tensor& pos, const at::Tensor& neg, Scale&& scale) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "x: expected shape (..., T), got a 0-dim tensor");
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                    "x: expected float32 or float64, got ", x.scalar_type());
  const int64_t seq_len = x.size(-1);
  const int64_t rows = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"pos", &pos}, {"neg", &neg}}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == rows, name, ": expected shape (", rows, ",), got ", t->sizes());
    TORCH_CHECK_VALUE(t->scalar_type() == x.scalar_type(), name, ": expected ", x.scalar_type(), ", got ",
                      t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == x.device(), name, ": expected device ", x.device(), ", got ", t->device());
  }
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  if (in.numel() > 0) scale(in, pos.contiguous(), neg.contiguous(), out, rows, seq_len);
  return out;
}

// The public ppo_value_loss, as ppo_policy_loss_impl; stats (1,) vf_clipfrac.
template <typename Partials, typename Finalize>
LossOutputs ppo_value_loss_impl(const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
                                const at::Tensor& mask, double clip, const AggParams& agg, bool need_grad,
                                Partials&& partials, Finalize&& finalize) {
  const LossTokens tok = loss_tokens({&values, &old_values, &returns}, mask);
  at::Tensor grad, partial;
  if (tok.numel() > 0) {
    std::tie(grad, partial) = partials(tok.values[0], tok.values[1], tok.values[2], tok.mask, tok.seq_len, clip,
                                       need_grad);
  } else {
    grad = at::empty({0}, tok.options());
    partial = empty_partials(tok.seqs, kValueStats, -1, -1, tok.options());
  }
  auto [loss, stats, weights] = finalize(partial, tok.seq_len, agg);
  return {loss, stats, grad, weights};
}

}  // namespace rlhf_kernels

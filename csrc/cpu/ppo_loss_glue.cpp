// Torch glue for the CPU PPO loss kernels: checks, allocation, at::parallel_for
// over the token chunks, and the reduction of per-chunk partials (glue/ppo_loss.h);
// ppo_loss_from_logits's fused logits gradient over the logprobs row kernels.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "../glue/ppo_loss.h"
#include "logprobs.h"
#include "ppo_loss.h"

namespace rlhf_kernels {
namespace {

// Chunks per parallel task: ~16k tokens amortise a task.
constexpr int64_t kGrainChunks = 16384 / kPpoChunk;

// The token pass of the policy loss: grad (N,) (empty unless need_grad) and the
// (B, chunks, kPolicyStats) partial sums.
std::tuple<at::Tensor, at::Tensor> policy_partials(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
    const at::Tensor& mask, const std::optional<at::Tensor>& ref_logp,
    const std::optional<at::Tensor>& entropy, int64_t seq_len, double ratio_low, double ratio_high,
    double dual_clip, int64_t loss_type, double kl_coef, int64_t kl_estimator, bool need_grad) {
  const PpoShape shape = check_ppo_policy_inputs(logp, old_logp, advantages, mask, ref_logp, entropy,
                                                 seq_len, kl_estimator);
  const at::ScalarType acc = logp.scalar_type();
  at::Tensor grad = at::empty({need_grad ? shape.numel() : 0}, logp.options());
  const int64_t chunks = ppo_chunks(seq_len);
  at::Tensor partial = at::empty({shape.seqs, chunks, kPolicyStats}, logp.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "ppo_policy_fwd_cpu", [&] {
    using acc_t = scalar_t;
    const auto params =
        policy_params<acc_t>(ratio_low, ratio_high, dual_clip, loss_type, kl_estimator, kl_coef);
    const acc_t* ref_data = ref_logp ? ref_logp->const_data_ptr<acc_t>() : nullptr;
    const acc_t* entropy_data = entropy ? entropy->const_data_ptr<acc_t>() : nullptr;
    acc_t* grad_data = need_grad ? grad.mutable_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, shape.seqs * chunks, kGrainChunks, [&](int64_t begin, int64_t end) {
      cpu::ppo_policy_chunks<acc_t>(
          logp.const_data_ptr<acc_t>(), old_logp.const_data_ptr<acc_t>(),
          advantages.const_data_ptr<acc_t>(), mask_data(mask), weight_data<acc_t>(mask), ref_data,
          entropy_data, seq_len,
          params, grad_data, partial.mutable_data_ptr<acc_t>(), begin, end);
    });
  });
  return {grad, partial};
}

// The aggregation of the partials on the host (aggregation.h), one pass over B:
// (loss, stats (kPolicyOutStats,), weights), divided by a CPU count tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> finalize_policy_host(const at::Tensor& partial, int64_t seq_len,
                                                                    const AggParams& agg, double kl_coef,
                                                                    double entropy_coef,
                                                                    const std::optional<at::Tensor>& divisor) {
  const auto options = partial.options();
  at::Tensor loss = at::empty({}, options), stats = at::empty({kPolicyOutStats}, options);
  at::Tensor weights = at::empty({partial.size(0)}, options);
  const double d = divisor ? divisor->item<double>() : 1.0;  // a CPU count: no device sync
  AT_DISPATCH_FLOATING_TYPES(partial.scalar_type(), "finalize_policy_host", [&] {
    finalize_policy<scalar_t>(partial.const_data_ptr<scalar_t>(), partial.size(0), partial.size(1), seq_len, agg,
                              kl_coef, entropy_coef, d, loss.mutable_data_ptr<scalar_t>(),
                              stats.mutable_data_ptr<scalar_t>(), weights.mutable_data_ptr<scalar_t>());
  });
  return {loss, stats, weights};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> finalize_value_host(const at::Tensor& partial, int64_t seq_len,
                                                                   const AggParams& agg) {
  const auto options = partial.options();
  at::Tensor loss = at::empty({}, options), stats = at::empty({1}, options);
  at::Tensor weights = at::empty({partial.size(0)}, options);
  AT_DISPATCH_FLOATING_TYPES(partial.scalar_type(), "finalize_value_host", [&] {
    finalize_value<scalar_t>(partial.const_data_ptr<scalar_t>(), partial.size(0), partial.size(1), seq_len, agg,
                             loss.mutable_data_ptr<scalar_t>(), stats.mutable_data_ptr<scalar_t>(),
                             weights.mutable_data_ptr<scalar_t>());
  });
  return {loss, stats, weights};
}

// The public op ppo_policy_loss (csrc/ops.cpp; glue/ppo_loss.h ppo_policy_loss_impl).
LossOutputs ppo_policy_loss_cpu(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                                const at::Tensor& mask, double ratio_low, double ratio_high, double dual_clip,
                                int64_t loss_type, int64_t agg, std::optional<double> num_tokens,
                                std::optional<double> num_seqs, bool need_grad) {
  return ppo_policy_loss_impl(logp, old_logp, advantages, mask, ratio_low, ratio_high, dual_clip, loss_type,
                              agg_params(agg, num_tokens, num_seqs), need_grad, policy_partials,
                              finalize_policy_host);
}

// The token pass of the value loss: grad (N,) and (B, chunks, kValueStats) partials.
std::tuple<at::Tensor, at::Tensor> value_partials(const at::Tensor& values,
                                                     const at::Tensor& old_values,
                                                     const at::Tensor& returns,
                                                     const at::Tensor& mask, int64_t seq_len,
                                                     double clip, bool need_grad) {
  const PpoShape shape = check_ppo_inputs(values, {&old_values, &returns}, mask, seq_len,
                                          {"old_values", "returns"});
  at::Tensor grad = at::empty({need_grad ? shape.numel() : 0}, values.options());
  const int64_t chunks = ppo_chunks(seq_len);
  at::Tensor partial = at::empty({shape.seqs, chunks, kValueStats}, values.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "ppo_value_fwd_cpu", [&] {
    using acc_t = scalar_t;
    acc_t* grad_data = need_grad ? grad.mutable_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, shape.seqs * chunks, kGrainChunks, [&](int64_t begin, int64_t end) {
      cpu::ppo_value_chunks<acc_t>(values.const_data_ptr<acc_t>(),
                                   old_values.const_data_ptr<acc_t>(),
                                   returns.const_data_ptr<acc_t>(), mask_data(mask),
                                   weight_data<acc_t>(mask), seq_len,
                                   static_cast<acc_t>(clip), grad_data,
                                   partial.mutable_data_ptr<acc_t>(), begin, end);
    });
  });
  return {grad, partial};
}


// The public op ppo_value_loss (glue/ppo_loss.h ppo_value_loss_impl).
LossOutputs ppo_value_loss_cpu(const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
                               const at::Tensor& mask, double clip, int64_t agg, std::optional<double> num_tokens,
                               std::optional<double> num_seqs, bool need_grad) {
  return ppo_value_loss_impl(values, old_values, returns, mask, clip, agg_params(agg, num_tokens, num_seqs),
                             need_grad, value_partials, finalize_value_host);
}

// The public op ppo_loss_from_logits (csrc/ops.cpp; glue/ppo_loss.h ppo_loss_from_logits_impl).
FromLogitsOutputs ppo_loss_from_logits_cpu(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old_logp, const at::Tensor& advantages,
    const at::Tensor& mask, const std::optional<at::Tensor>& ref_logp, double temperature, double ratio_low,
    double ratio_high, double dual_clip, int64_t loss_type, int64_t agg, std::optional<double> num_tokens,
    std::optional<double> num_seqs, double kl_coef, int64_t kl_estimator, double entropy_coef,
    bool inplace_backward, bool need_grad, const std::optional<at::Tensor>& count, int64_t max_rows_in_flight) {
  const AggParams params = agg_params(agg, num_tokens, num_seqs);
  const FromLogitsInputs in =
      from_logits_inputs(logits, labels, old_logp, advantages, mask, ref_logp, inplace_backward, need_grad);
  check_labels_in_range(in.labels, logits.size(-1), -100);
  return ppo_loss_from_logits_impl(logits, in, temperature, ratio_low, ratio_high, dual_clip, loss_type, params,
                                   kl_coef, kl_estimator, entropy_coef, need_grad, count, max_rows_in_flight,
                                   policy_partials, finalize_policy_host);
}

// grad *= scale / applied unless they are equal, then applied = scale (CPU
// tensors: reading them is no device sync); the product in the accumulation
// dtype, rounded once.
void scale_grad_cpu(at::Tensor& grad, at::Tensor& applied, const at::Tensor& scale) {
  check_row_tensor(applied, 1, acc_dtype_for(grad), "applied");
  const at::Tensor factor = scale.to(applied.scalar_type()).reshape({1}).div(applied);
  applied.copy_(scale.reshape({1}));
  const double s = factor.item<double>();
  if (s == 1.0) return;
  if (grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble) {
    grad.mul_(s);
  } else {
    grad.copy_(grad.to(at::kFloat).mul_(s));
  }
}

// ppo_logits_grad_native (csrc/ops.cpp): per row, logprobs_fwd_rows, the
// token's weighted PPO derivative, then logprobs_bwd_rows (cpu/logprobs.h).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_logits_grad_cpu(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old_logp,
    const at::Tensor& advantages, const at::Tensor& row_weight,
    const std::optional<at::Tensor>& ref_logp, const at::Tensor& grad_logits, int64_t inner_rows,
    int64_t in_outer_stride, int64_t in_inner_stride, int64_t out_outer_stride,
    int64_t out_inner_stride, double inv_temperature, int64_t ignore_index, double ratio_low,
    double ratio_high, double dual_clip, int64_t loss_type, double kl_coef, int64_t kl_estimator,
    double entropy_coef, int64_t /*max_rows_in_flight: rows are cached per thread*/) {
  const RowLayout in_layout{inner_rows, in_outer_stride, in_inner_stride};
  const RowLayout out_layout{inner_rows, out_outer_stride, out_inner_stride};
  const PpoLogitsGradArgs checked = check_ppo_logits_grad(
      logits, labels, grad_logits, in_layout, out_layout, old_logp, advantages, row_weight, ref_logp,
      ratio_low, ratio_high, dual_clip, loss_type, kl_coef, kl_estimator);
  const int64_t n_rows = checked.n_rows;
  const at::ScalarType acc = acc_dtype_for(logits);
  const int64_t vocab = logits.size(-1);
  const auto opts = logits.options().dtype(acc);
  at::Tensor logp = at::empty({n_rows}, opts), entropy = at::empty({n_rows}, opts);
  at::Tensor row_max = at::empty({n_rows}, opts), log_sum = at::empty({n_rows}, opts);
  at::Tensor g = at::empty({n_rows}, opts), g_entropy = at::empty({n_rows}, opts);
  dispatch_float_dtype<bf16_t, fp16_t>(logits.scalar_type(), "logits", [&](auto scalar, auto acc_v) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc_v);
    const auto* data = reinterpret_cast<const scalar_t*>(logits.const_data_ptr());
    auto* out = reinterpret_cast<scalar_t*>(grad_logits.data_ptr());
    const int64_t* label_data = labels.const_data_ptr<int64_t>();
    const acc_t* old = old_logp.const_data_ptr<acc_t>();
    const acc_t* adv = advantages.const_data_ptr<acc_t>();
    const acc_t* weight = row_weight.const_data_ptr<acc_t>();
    const acc_t* ref = ref_logp ? ref_logp->const_data_ptr<acc_t>() : nullptr;
    acc_t *logp_d = logp.mutable_data_ptr<acc_t>(), *entropy_d = entropy.mutable_data_ptr<acc_t>();
    acc_t* row_max_d = row_max.mutable_data_ptr<acc_t>();
    acc_t *log_sum_d = log_sum.mutable_data_ptr<acc_t>(), *g_d = g.mutable_data_ptr<acc_t>();
    acc_t* g_entropy_d = g_entropy.mutable_data_ptr<acc_t>();
    const PolicyParams<acc_t> p = cast_params<acc_t>(checked.params);
    const auto inv_t = static_cast<acc_t>(inv_temperature);
    const auto entropy_c = static_cast<acc_t>(entropy_coef);
    at::parallel_for(0, n_rows, cpu::grain_rows(vocab), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        cpu::logprobs_fwd_rows<scalar_t, acc_t>(data, in_layout, label_data, vocab, inv_t,
                                                ignore_index, logp_d, entropy_d, row_max_d,
                                                log_sum_d, r, r + 1);
        const acc_t w = weight[r];
        g_d[r] = acc_t(0);
        g_entropy_d[r] = acc_t(0);
        if (w != acc_t(0)) {  // a valid token: its weighted PPO derivative
          g_d[r] = w * policy_token<acc_t>(logp_d[r], old[r], adv[r], ref ? ref[r] : acc_t(0), p).grad;
          g_entropy_d[r] = -entropy_c * w;
        }
        // The row again, from cache, for its gradient.
        const acc_t* g_entropy_arg = entropy_c != acc_t(0) ? g_entropy_d : nullptr;
        cpu::logprobs_bwd_rows<scalar_t, acc_t>(g_d, g_entropy_arg, data, in_layout, label_data,
                                                row_max_d, log_sum_d, entropy_d, vocab, inv_t,
                                                ignore_index, out, out_layout, r, r + 1);
      }
    });
  });
  return {logp, entropy, row_max, log_sum};
}

// The op ppo_policy_rows (glue/ppo_loss.h ppo_policy_rows_impl).
std::tuple<at::Tensor, at::Tensor> ppo_policy_rows_cpu(const at::Tensor& logp, const at::Tensor& old_logp,
                                                      const at::Tensor& advantages, const at::Tensor& mask,
                                                      double ratio_low, double ratio_high, double dual_clip,
                                                      int64_t loss_type, bool need_grad) {
  return ppo_policy_rows_impl(logp, old_logp, advantages, mask, ratio_low, ratio_high, dual_clip, loss_type,
                              need_grad, policy_partials);
}

// The op ppo_sequence_clip: finalize_sequence_clip (aggregation.h) on the host.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_sequence_clip_cpu(const at::Tensor& rows, double ratio_low,
                                                                     double ratio_high, double dual_clip,
                                                                     int64_t agg, std::optional<double> num_tokens,
                                                                     std::optional<double> num_seqs,
                                                                     int64_t seq_len) {
  return ppo_sequence_clip_impl(rows, agg, num_tokens, num_seqs, [&](const at::Tensor& in, const AggParams& params,
                                                                     at::Tensor& loss, at::Tensor& coef,
                                                                     at::Tensor& stats) {
    AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "ppo_sequence_clip_cpu", [&] {
      finalize_sequence_clip<scalar_t>(in.const_data_ptr<scalar_t>(), in.size(0), seq_len, params,
                                       static_cast<scalar_t>(ratio_low), static_cast<scalar_t>(ratio_high),
                                       static_cast<scalar_t>(dual_clip), loss.mutable_data_ptr<scalar_t>(),
                                       coef.mutable_data_ptr<scalar_t>(), stats.mutable_data_ptr<scalar_t>());
    });
  });
}

// The op scale_by_sign: rows split over the threads, each a loop the compiler vectorises.
at::Tensor scale_by_sign_cpu(const at::Tensor& x, const at::Tensor& pos, const at::Tensor& neg) {
  return scale_by_sign_impl(x, pos, neg, [](const at::Tensor& in, const at::Tensor& p, const at::Tensor& n,
                                            at::Tensor& out, int64_t rows, int64_t seq_len) {
    AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "scale_by_sign_cpu", [&] {
      const scalar_t* x = in.const_data_ptr<scalar_t>();
      const scalar_t *pos = p.const_data_ptr<scalar_t>(), *neg = n.const_data_ptr<scalar_t>();
      scalar_t* y = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / seq_len), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const scalar_t up = pos[r], down = neg[r];
          const scalar_t* xr = x + r * seq_len;
          scalar_t* yr = y + r * seq_len;
          for (int64_t t = 0; t < seq_len; ++t) yr[t] = xr[t] * (xr[t] > scalar_t(0) ? up : down);
        }
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("ppo_policy_loss", &ppo_policy_loss_cpu);
  m.impl("ppo_policy_rows", &ppo_policy_rows_cpu);
  m.impl("ppo_sequence_clip", &ppo_sequence_clip_cpu);
  m.impl("scale_by_sign", &scale_by_sign_cpu);
  m.impl("ppo_value_loss", &ppo_value_loss_cpu);
  m.impl("scale_grad_", &scale_grad_cpu);
  m.impl("ppo_loss_from_logits", &ppo_loss_from_logits_cpu);
  m.impl("ppo_logits_grad_native", &ppo_logits_grad_cpu);
}

}  // namespace rlhf_kernels

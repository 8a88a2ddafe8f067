// Torch glue for the CPU kernels: argument checks, output allocation and
// at::parallel_for over rows.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "../glue/logprobs.h"
#include "../glue/ppo_loss.h"  // ppo_logits_grad_native
#include "logprobs.h"

namespace rlhf_kernels {
namespace {

// Rows per parallel task: enough work (>= ~64k elements) to amortise a task.
int64_t grain_rows(int64_t vocab) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(vocab, 1)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& labels, int64_t inner_rows, int64_t outer_stride,
    int64_t inner_stride, double inv_temperature, int64_t ignore_index, bool compute_entropy) {
  const RowLayout layout{inner_rows, outer_stride, inner_stride};
  const int64_t n_rows = checked_rows(logits, labels, layout);
  const int64_t vocab = logits.size(-1);
  const auto opts = logits.options().dtype(acc_dtype_for(logits));
  at::Tensor logp = at::empty({n_rows}, opts);
  at::Tensor row_max = at::empty({n_rows}, opts), log_sum = at::empty({n_rows}, opts);
  at::Tensor entropy = at::empty({compute_entropy ? n_rows : 0}, opts);
  dispatch_float_dtype<bf16_t, fp16_t>(logits.scalar_type(), "logits", [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    const auto* data = reinterpret_cast<const scalar_t*>(logits.const_data_ptr());
    const int64_t* label_data = labels.const_data_ptr<int64_t>();
    acc_t* logp_data = logp.mutable_data_ptr<acc_t>();
    acc_t* row_max_data = row_max.mutable_data_ptr<acc_t>();
    acc_t* log_sum_data = log_sum.mutable_data_ptr<acc_t>();
    acc_t* entropy_data = compute_entropy ? entropy.mutable_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, n_rows, grain_rows(vocab), [&](int64_t begin, int64_t end) {
      cpu::logprobs_fwd_rows<scalar_t, acc_t>(data, layout, label_data, vocab,
                                              static_cast<acc_t>(inv_temperature), ignore_index,
                                              logp_data, entropy_data, row_max_data,
                                              log_sum_data, begin, end);
    });
  });
  return {logp, entropy, row_max, log_sum};
}

void logprobs_bwd_cpu(const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                      const at::Tensor& logits, const at::Tensor& labels,
                      const at::Tensor& row_max, const at::Tensor& log_sum,
                      const std::optional<at::Tensor>& entropy, const at::Tensor& grad_logits,
                      int64_t inner_rows, int64_t in_outer_stride, int64_t in_inner_stride,
                      int64_t out_outer_stride, int64_t out_inner_stride, double inv_temperature,
                      int64_t ignore_index) {
  const RowLayout in_layout{inner_rows, in_outer_stride, in_inner_stride};
  const RowLayout out_layout{inner_rows, out_outer_stride, out_inner_stride};
  const int64_t n_rows = check_logprobs_bwd(grad_logp, grad_entropy, logits, labels, row_max,
                                            log_sum, entropy, grad_logits, in_layout, out_layout);
  const int64_t vocab = logits.size(-1);
  dispatch_float_dtype<bf16_t, fp16_t>(logits.scalar_type(), "logits", [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    const auto* data = reinterpret_cast<const scalar_t*>(logits.const_data_ptr());
    auto* out = reinterpret_cast<scalar_t*>(grad_logits.data_ptr());
    const acc_t* g = grad_logp.const_data_ptr<acc_t>();
    const acc_t* g_entropy = grad_entropy ? grad_entropy->const_data_ptr<acc_t>() : nullptr;
    const acc_t* entropy_data = entropy ? entropy->const_data_ptr<acc_t>() : nullptr;
    const acc_t* row_max_data = row_max.const_data_ptr<acc_t>();
    const acc_t* log_sum_data = log_sum.const_data_ptr<acc_t>();
    const int64_t* label_data = labels.const_data_ptr<int64_t>();
    at::parallel_for(0, n_rows, grain_rows(vocab), [&](int64_t begin, int64_t end) {
      cpu::logprobs_bwd_rows<scalar_t, acc_t>(g, g_entropy, data, in_layout, label_data,
                                              row_max_data, log_sum_data, entropy_data, vocab,
                                              static_cast<acc_t>(inv_temperature), ignore_index,
                                              out, out_layout, begin, end);
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_logits_grad_cpu(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old_logp,
    const at::Tensor& advantages, const at::Tensor& row_weight,
    const std::optional<at::Tensor>& ref_logp, const at::Tensor& grad_logits, int64_t inner_rows,
    int64_t in_outer_stride, int64_t in_inner_stride, int64_t out_outer_stride,
    int64_t out_inner_stride, double inv_temperature, int64_t ignore_index, double ratio_low,
    double ratio_high, double dual_clip, double kl_coef, int64_t kl_estimator,
    double entropy_coef, int64_t /*max_rows_in_flight: rows are cached per thread*/) {
  const RowLayout in_layout{inner_rows, in_outer_stride, in_inner_stride};
  const RowLayout out_layout{inner_rows, out_outer_stride, out_inner_stride};
  const PpoLogitsGradArgs checked = check_ppo_logits_grad(
      logits, labels, grad_logits, in_layout, out_layout, old_logp, advantages, row_weight, ref_logp,
      ratio_low, ratio_high, dual_clip, kl_coef, kl_estimator);
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
    at::parallel_for(0, n_rows, grain_rows(vocab), [&](int64_t begin, int64_t end) {
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

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("logprobs_fwd_native", &logprobs_fwd_cpu);
  m.impl("logprobs", &logprobs_op<&logprobs_fwd_cpu>);
  m.impl("logprobs_backward", &logprobs_backward_op<&logprobs_bwd_cpu>);
  m.impl("logprobs_backward_", &logprobs_backward_inplace_op<&logprobs_bwd_cpu>);
  m.impl("logprobs_bwd_native", &logprobs_bwd_cpu);
  m.impl("ppo_logits_grad_native", &ppo_logits_grad_cpu);
}

}  // namespace rlhf_kernels

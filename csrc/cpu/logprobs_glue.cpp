// Torch glue for the CPU kernels: argument checks, output allocation and
// at::parallel_for over rows.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "../glue/logprobs.h"
#include "logprobs.h"

namespace rlhf_kernels {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& labels, int64_t inner_rows, int64_t outer_stride,
    int64_t inner_stride, double inv_temperature, int64_t ignore_index, bool compute_entropy,
    const std::optional<at::Tensor>& min_logit) {
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
    const acc_t* thr = threshold_data<acc_t>(min_logit, n_rows, acc_dtype_for(logits));
    at::parallel_for(0, n_rows, cpu::grain_rows(vocab), [&](int64_t begin, int64_t end) {
      cpu::logprobs_fwd_rows<scalar_t, acc_t>(data, layout, label_data, vocab,
                                              static_cast<acc_t>(inv_temperature), ignore_index,
                                              logp_data, entropy_data, row_max_data,
                                              log_sum_data, begin, end, thr);
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
                      int64_t ignore_index, const std::optional<at::Tensor>& min_logit) {
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
    const acc_t* thr = threshold_data<acc_t>(min_logit, n_rows, row_max.scalar_type());
    at::parallel_for(0, n_rows, cpu::grain_rows(vocab), [&](int64_t begin, int64_t end) {
      cpu::logprobs_bwd_rows<scalar_t, acc_t>(g, g_entropy, data, in_layout, label_data,
                                              row_max_data, log_sum_data, entropy_data, vocab,
                                              static_cast<acc_t>(inv_temperature), ignore_index,
                                              out, out_layout, begin, end, thr);
    });
  });
}

at::Tensor truncation_threshold_cpu(const at::Tensor& logits, int64_t inner_rows, int64_t outer_stride,
                                   int64_t inner_stride, double inv_temperature, int64_t top_k, double top_p,
                                   double min_p, bool min_p_first) {
  const RowLayout layout{inner_rows, outer_stride, inner_stride};
  const int64_t vocab = logits.size(-1);
  const int64_t n_rows = vocab > 0 ? logits.numel() / vocab : 0;
  at::Tensor out = at::empty({n_rows}, logits.options().dtype(acc_dtype_for(logits)));
  dispatch_float_dtype<bf16_t, fp16_t>(logits.scalar_type(), "logits", [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    const auto* data = reinterpret_cast<const scalar_t*>(logits.const_data_ptr());
    acc_t* out_data = out.mutable_data_ptr<acc_t>();
    at::parallel_for(0, n_rows, 1, [&](int64_t begin, int64_t end) {
      cpu::truncation_threshold_rows<scalar_t, acc_t>(data, layout, vocab, static_cast<acc_t>(inv_temperature),
                                                      top_k, top_p, min_p, min_p_first, out_data, begin, end);
    });
  });
  return out;
}

// The public truncated_logprobs (csrc/ops.cpp): logprobs' outputs shaped as
// logprobs_op gives them, and the threshold (N,).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> truncated_logprobs_cpu(
    const at::Tensor& logits, const at::Tensor& labels, double temperature, int64_t ignore_index,
    bool compute_entropy, bool /*inplace_backward: the backward's*/, int64_t top_k, double top_p, double min_p,
    bool min_p_first) {
  check_logprobs_args(logits, labels, temperature);
  check_truncation_args(top_k, top_p, min_p);
  const LogitsRows rows = logits_rows(logits);
  const at::Tensor flat = flat_labels(labels);
  check_labels_in_range(flat, logits.size(-1), ignore_index);
  const int64_t n_rows = checked_rows(rows.tensor, flat, rows.layout);
  const int64_t vocab = logits.size(-1);
  const auto opts = logits.options().dtype(acc_dtype_for(logits));
  at::Tensor logp = at::empty({n_rows}, opts), min_logit = at::empty({n_rows}, opts);
  at::Tensor row_max = at::empty({n_rows}, opts), log_sum = at::empty({n_rows}, opts);
  at::Tensor entropy = at::empty({compute_entropy ? n_rows : 0}, opts);
  dispatch_float_dtype<bf16_t, fp16_t>(logits.scalar_type(), "logits", [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    const auto* data = reinterpret_cast<const scalar_t*>(rows.tensor.const_data_ptr());
    const int64_t* label_data = flat.const_data_ptr<int64_t>();
    acc_t* entropy_data = compute_entropy ? entropy.mutable_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, n_rows, 1, [&](int64_t begin, int64_t end) {
      cpu::truncated_fwd_rows<scalar_t, acc_t>(
          data, rows.layout, label_data, vocab, static_cast<acc_t>(1.0 / temperature), ignore_index, top_k, top_p,
          min_p, min_p_first, logp.mutable_data_ptr<acc_t>(), entropy_data, row_max.mutable_data_ptr<acc_t>(),
          log_sum.mutable_data_ptr<acc_t>(), min_logit.mutable_data_ptr<acc_t>(), begin, end);
    });
  });
  return {shaped_like(std::move(logp), labels), compute_entropy ? shaped_like(std::move(entropy), labels) : entropy,
          row_max, log_sum, min_logit};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("logprobs_fwd_native", &logprobs_fwd_cpu);
  m.impl("logprobs", &logprobs_op<&logprobs_fwd_cpu>);
  m.impl("logprobs_backward", &logprobs_backward_op<&logprobs_bwd_cpu>);
  m.impl("logprobs_backward_", &logprobs_backward_inplace_op<&logprobs_bwd_cpu>);
  m.impl("logprobs_bwd_native", &logprobs_bwd_cpu);
  m.impl("truncation_threshold", &truncation_threshold_op<&truncation_threshold_cpu>);
  m.impl("truncated_logprobs", &truncated_logprobs_cpu);
}

}  // namespace rlhf_kernels

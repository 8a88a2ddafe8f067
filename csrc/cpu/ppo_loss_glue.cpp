// Torch glue for the CPU PPO loss kernels: checks, allocation and
// at::parallel_for over sequences.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "../glue.h"
#include "ppo_loss.h"

namespace rlhf_kernels {
namespace {

// Sequences per parallel task: ~16k tokens amortise a task.
int64_t grain_seqs(int64_t seq_len) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(seq_len, 1)); }

std::tuple<at::Tensor, at::Tensor> ppo_policy_fwd_cpu(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
    const at::Tensor& mask, const std::optional<at::Tensor>& ref_logp,
    const std::optional<at::Tensor>& entropy, int64_t seq_len, double ratio_low, double ratio_high,
    double dual_clip, double kl_coef, int64_t kl_estimator, bool need_grad) {
  const PpoShape shape = check_ppo_policy_inputs(logp, old_logp, advantages, mask, ref_logp, entropy,
                                                 seq_len, kl_estimator);
  const at::ScalarType acc = logp.scalar_type();
  at::Tensor grad = at::empty({need_grad ? shape.numel() : 0}, logp.options());
  at::Tensor seq_stats = at::empty({shape.seqs, kPolicyStats}, logp.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "ppo_policy_fwd_cpu", [&] {
    using acc_t = scalar_t;
    PolicyParams<acc_t> params{static_cast<acc_t>(ratio_low), static_cast<acc_t>(ratio_high),
                               static_cast<acc_t>(dual_clip), dual_clip > 0,
                               static_cast<int>(kl_estimator), static_cast<acc_t>(kl_coef)};
    const acc_t* ref_data = ref_logp ? ref_logp->const_data_ptr<acc_t>() : nullptr;
    const acc_t* entropy_data = entropy ? entropy->const_data_ptr<acc_t>() : nullptr;
    acc_t* grad_data = need_grad ? grad.mutable_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, shape.seqs, grain_seqs(seq_len), [&](int64_t begin, int64_t end) {
      cpu::ppo_policy_rows<acc_t>(
          logp.const_data_ptr<acc_t>(), old_logp.const_data_ptr<acc_t>(),
          advantages.const_data_ptr<acc_t>(), mask_data(mask), ref_data, entropy_data, seq_len,
          params, grad_data, seq_stats.mutable_data_ptr<acc_t>(), begin, end);
    });
  });
  return {grad, seq_stats};
}

std::tuple<at::Tensor, at::Tensor> ppo_value_fwd_cpu(const at::Tensor& values,
                                                     const at::Tensor& old_values,
                                                     const at::Tensor& returns,
                                                     const at::Tensor& mask, int64_t seq_len,
                                                     double clip, bool need_grad) {
  const PpoShape shape = check_ppo_inputs(values, {&old_values, &returns}, mask, seq_len,
                                          {"old_values", "returns"});
  at::Tensor grad = at::empty({need_grad ? shape.numel() : 0}, values.options());
  at::Tensor seq_stats = at::empty({shape.seqs, kValueStats}, values.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "ppo_value_fwd_cpu", [&] {
    using acc_t = scalar_t;
    acc_t* grad_data = need_grad ? grad.mutable_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, shape.seqs, grain_seqs(seq_len), [&](int64_t begin, int64_t end) {
      cpu::ppo_value_rows<acc_t>(values.const_data_ptr<acc_t>(), old_values.const_data_ptr<acc_t>(),
                                 returns.const_data_ptr<acc_t>(), mask_data(mask), seq_len,
                                 static_cast<acc_t>(clip), grad_data,
                                 seq_stats.mutable_data_ptr<acc_t>(), begin, end);
    });
  });
  return {grad, seq_stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("ppo_policy_fwd_native", &ppo_policy_fwd_cpu);
  m.impl("ppo_value_fwd_native", &ppo_value_fwd_cpu);
}

}  // namespace rlhf_kernels

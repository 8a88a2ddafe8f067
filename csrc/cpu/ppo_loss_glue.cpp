// Torch glue for the CPU PPO loss kernels: checks, allocation, at::parallel_for
// over the token chunks, and the reduction of per-chunk partials (glue.h).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "../glue.h"
#include "ppo_loss.h"

namespace rlhf_kernels {
namespace {

// Chunks per parallel task: ~16k tokens amortise a task.
constexpr int64_t kGrainChunks = 16384 / kPpoChunk;

std::tuple<at::Tensor, at::Tensor> ppo_policy_fwd_cpu(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
    const at::Tensor& mask, const std::optional<at::Tensor>& ref_logp,
    const std::optional<at::Tensor>& entropy, int64_t seq_len, double ratio_low, double ratio_high,
    double dual_clip, double kl_coef, int64_t kl_estimator, bool need_grad) {
  const PpoShape shape = check_ppo_policy_inputs(logp, old_logp, advantages, mask, ref_logp, entropy,
                                                 seq_len, kl_estimator);
  const at::ScalarType acc = logp.scalar_type();
  at::Tensor grad = at::empty({need_grad ? shape.numel() : 0}, logp.options());
  const int64_t chunks = ppo_chunks(seq_len);
  at::Tensor partial = at::empty({shape.seqs, chunks, kPolicyStats}, logp.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "ppo_policy_fwd_cpu", [&] {
    using acc_t = scalar_t;
    const auto params =
        policy_params<acc_t>(ratio_low, ratio_high, dual_clip, kl_estimator, kl_coef);
    const acc_t* ref_data = ref_logp ? ref_logp->const_data_ptr<acc_t>() : nullptr;
    const acc_t* entropy_data = entropy ? entropy->const_data_ptr<acc_t>() : nullptr;
    acc_t* grad_data = need_grad ? grad.mutable_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, shape.seqs * chunks, kGrainChunks, [&](int64_t begin, int64_t end) {
      cpu::ppo_policy_chunks<acc_t>(
          logp.const_data_ptr<acc_t>(), old_logp.const_data_ptr<acc_t>(),
          advantages.const_data_ptr<acc_t>(), mask_data(mask), ref_data, entropy_data, seq_len,
          params, grad_data, partial.mutable_data_ptr<acc_t>(), begin, end);
    });
  });
  return {grad, reduce_partials(partial, kRatioMax, kRatioMin)};
}

std::tuple<at::Tensor, at::Tensor> ppo_value_fwd_cpu(const at::Tensor& values,
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
                                   returns.const_data_ptr<acc_t>(), mask_data(mask), seq_len,
                                   static_cast<acc_t>(clip), grad_data,
                                   partial.mutable_data_ptr<acc_t>(), begin, end);
    });
  });
  return {grad, reduce_partials(partial, -1, -1)};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("ppo_policy_fwd_native", &ppo_policy_fwd_cpu);
  m.impl("ppo_value_fwd_native", &ppo_value_fwd_cpu);
}

}  // namespace rlhf_kernels

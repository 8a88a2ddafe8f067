// Torch glue for the CPU advantage kernels: checks, allocation and
// at::parallel_for over elements (KL) or sequences (GAE).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "../glue/advantages.h"
#include "advantages.h"

namespace rlhf_kernels {
namespace {

constexpr int64_t kElementGrain = 32768;

// The public op kl_penalty (one crossing): any layouts of one dtype, read contiguous.
at::Tensor kl_penalty_cpu(const at::Tensor& logp_in, const at::Tensor& ref_logp_in, int64_t estimator) {
  const at::Tensor logp = logp_in.contiguous(), ref_logp = ref_logp_in.contiguous();
  check_kl_inputs(logp, ref_logp, estimator);
  at::Tensor kl = at::empty(logp.sizes(), logp.options().dtype(acc_dtype_for(logp)));
  dispatch_float_dtype<bf16_t, fp16_t>(logp.scalar_type(), "logp", [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    const auto* x = reinterpret_cast<const scalar_t*>(logp.const_data_ptr());
    const auto* y = reinterpret_cast<const scalar_t*>(ref_logp.const_data_ptr());
    acc_t* out = kl.mutable_data_ptr<acc_t>();
    at::parallel_for(0, logp.numel(), kElementGrain, [&](int64_t begin, int64_t end) {
      cpu::kl_penalty_fwd_range<scalar_t, acc_t>(x, y, static_cast<int>(estimator), out, begin, end);
    });
  });
  return kl;
}

// (grad_logp, grad_ref_logp) in the inputs' dtype; grad of any float dtype and layout.
std::tuple<at::Tensor, at::Tensor> kl_penalty_backward_cpu(const at::Tensor& grad_in, const at::Tensor& logp_in,
                                                      const at::Tensor& ref_logp_in, int64_t estimator) {
  const at::Tensor logp = logp_in.contiguous(), ref_logp = ref_logp_in.contiguous();
  const at::Tensor grad = grad_in.to(acc_dtype_for(logp)).contiguous();
  check_kl_inputs(logp, ref_logp, estimator);
  check_row_tensor(grad, logp.numel(), acc_dtype_for(logp), "grad");
  at::Tensor grad_logp = at::empty(logp.sizes(), logp.options());
  at::Tensor grad_ref = at::empty(logp.sizes(), logp.options());
  dispatch_float_dtype<bf16_t, fp16_t>(logp.scalar_type(), "logp", [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    const auto* x = reinterpret_cast<const scalar_t*>(logp.const_data_ptr());
    const auto* y = reinterpret_cast<const scalar_t*>(ref_logp.const_data_ptr());
    const acc_t* g = grad.const_data_ptr<acc_t>();
    auto* gx = reinterpret_cast<scalar_t*>(grad_logp.data_ptr());
    auto* gy = reinterpret_cast<scalar_t*>(grad_ref.data_ptr());
    at::parallel_for(0, logp.numel(), kElementGrain, [&](int64_t begin, int64_t end) {
      cpu::kl_penalty_bwd_range<scalar_t, acc_t>(g, x, y, static_cast<int>(estimator), gx, gy,
                                                 begin, end);
    });
  });
  return {grad_logp, grad_ref};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> advantages_cpu(
    const at::Tensor& values, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& cu_seqlens, const std::optional<at::Tensor>& token_rewards,
    const std::optional<at::Tensor>& scores, const std::optional<at::Tensor>& logp,
    const std::optional<at::Tensor>& ref_logp, const std::optional<at::Tensor>& kl_coef_scale,
    double kl_coef, int64_t estimator, double gamma,
    double lam) {
  const auto [num_seqs, seq_len] = check_advantages(values, mask, cu_seqlens, token_rewards, scores,
                                                    logp, ref_logp, kl_coef_scale, estimator);
  AdvantagesOutputs out = alloc_advantages_outputs(values, num_seqs, !token_rewards.has_value());
  if (cu_seqlens && num_seqs > 0) {
    // The kernel trusts the offsets: they must stay inside the tensors.
    const int32_t* cu = cu_seqlens->const_data_ptr<int32_t>();
    TORCH_CHECK_VALUE(cu[0] >= 0 && cu[num_seqs] <= values.numel(),
                      "cu_seqlens: offsets outside [0, total]");
    for (int64_t b = 0; b < num_seqs; ++b)
      TORCH_CHECK_VALUE(cu[b] <= cu[b + 1], "cu_seqlens: offsets must be non-decreasing");
  }
  dispatch_float_dtype<bf16_t, fp16_t>(values.scalar_type(), "values", [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    const auto args = advantages_args<scalar_t, acc_t>(values, mask, cu_seqlens, token_rewards, scores,
                                                       logp, ref_logp, kl_coef_scale, kl_coef, estimator,
                                                       gamma, lam, seq_len, num_seqs, out);
    // Sequences per task: about 16k positions of work each.
    const int64_t per_seq = cu_seqlens ? std::max<int64_t>(1, values.numel() / std::max<int64_t>(num_seqs, 1))
                                       : std::max<int64_t>(1, seq_len);
    const int64_t grain = std::max<int64_t>(1, 16384 / per_seq);
    at::parallel_for(0, num_seqs, grain, [&](int64_t begin, int64_t end) {
      cpu::advantages_seqs<scalar_t, acc_t>(args, begin, end);
    });
  });
  return {out.advantages, out.returns, out.token_rewards, out.kl, out.stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) {
  m.impl("kl_penalty", &kl_penalty_cpu);
  m.impl("kl_penalty_backward", &kl_penalty_backward_cpu);
  m.impl("advantages", &advantages_cpu);
}

}  // namespace rlhf_kernels

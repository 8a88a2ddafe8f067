// Torch glue for the CUDA PPO loss kernels: checks, allocation, stream and
// device guard, and the (cheap, O(B * chunks)) reduction of per-chunk partials
// (glue/ppo_loss.h).
// A launcher's cudaError_t (which includes a launch shape it refuses before
// any launch, unseen by cudaGetLastError) goes to C10_CUDA_CHECK; the extra
// parentheses keep a template argument list's comma inside its one argument.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "../glue/ppo_loss.h"
#include "ppo_loss.cuh"

namespace rlhf_kernels {
namespace {

// The token pass of the policy loss: grad (N,) and (B, chunks, kPolicyStats) partials.
std::tuple<at::Tensor, at::Tensor> policy_partials(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
    const at::Tensor& mask, const std::optional<at::Tensor>& ref_logp,
    const std::optional<at::Tensor>& entropy, int64_t seq_len, double ratio_low, double ratio_high,
    double dual_clip, int64_t loss_type, double kl_coef, int64_t kl_estimator, bool need_grad) {
  const c10::cuda::CUDAGuard guard(logp.device());
  const PpoShape shape = check_ppo_policy_inputs(logp, old_logp, advantages, mask, ref_logp, entropy,
                                                 seq_len, kl_estimator);
  const at::ScalarType acc = logp.scalar_type();
  at::Tensor grad = at::empty({need_grad ? shape.numel() : 0}, logp.options());
  const int64_t chunks = ppo_chunks(seq_len);
  at::Tensor partial = at::empty({shape.seqs, chunks, kPolicyStats}, logp.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, "ppo_policy_fwd_cuda", [&] {
    using acc_t = scalar_t;
    const auto params =
        policy_params<acc_t>(ratio_low, ratio_high, dual_clip, loss_type, kl_estimator, kl_coef);
    C10_CUDA_CHECK(cuda::launch_ppo_policy_fwd<acc_t>(
        logp.const_data_ptr<acc_t>(), old_logp.const_data_ptr<acc_t>(),
        advantages.const_data_ptr<acc_t>(), mask_data(mask), weight_data<acc_t>(mask),
        ref_logp ? ref_logp->const_data_ptr<acc_t>() : nullptr,
        entropy ? entropy->const_data_ptr<acc_t>() : nullptr, shape.seqs, seq_len, params,
        need_grad ? grad.mutable_data_ptr<acc_t>() : nullptr, partial.mutable_data_ptr<acc_t>(),
        stream));
  });
  return {grad, partial};
}

// The token pass of the value loss: grad (N,) and (B, chunks, kValueStats) partials.
std::tuple<at::Tensor, at::Tensor> value_partials(const at::Tensor& values,
                                                      const at::Tensor& old_values,
                                                      const at::Tensor& returns,
                                                      const at::Tensor& mask, int64_t seq_len,
                                                      double clip, bool need_grad) {
  const c10::cuda::CUDAGuard guard(values.device());
  const PpoShape shape = check_ppo_inputs(values, {&old_values, &returns}, mask, seq_len,
                                          {"old_values", "returns"});
  at::Tensor grad = at::empty({need_grad ? shape.numel() : 0}, values.options());
  const int64_t chunks = ppo_chunks(seq_len);
  at::Tensor partial = at::empty({shape.seqs, chunks, kValueStats}, values.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "ppo_value_fwd_cuda", [&] {
    using acc_t = scalar_t;
    C10_CUDA_CHECK(cuda::launch_ppo_value_fwd<acc_t>(
        values.const_data_ptr<acc_t>(), old_values.const_data_ptr<acc_t>(),
        returns.const_data_ptr<acc_t>(), mask_data(mask), weight_data<acc_t>(mask), shape.seqs, seq_len,
        static_cast<acc_t>(clip), need_grad ? grad.mutable_data_ptr<acc_t>() : nullptr,
        partial.mutable_data_ptr<acc_t>(), stream));
  });
  return {grad, partial};
}

// The public ops ppo_policy_loss and ppo_value_loss (glue/ppo_loss.h *_impl), aggregated
// on the device with ATen ops: no host synchronisation.
LossOutputs ppo_policy_loss_cuda(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                                 const at::Tensor& mask, double ratio_low, double ratio_high, double dual_clip,
                                 int64_t loss_type, int64_t agg, std::optional<double> num_tokens,
                                 std::optional<double> num_seqs, bool need_grad) {
  const c10::cuda::CUDAGuard guard(logp.device());
  return ppo_policy_loss_impl(logp, old_logp, advantages, mask, ratio_low, ratio_high, dual_clip, loss_type,
                              agg_params(agg, num_tokens, num_seqs), need_grad, policy_partials,
                              finalize_policy_aten);
}

LossOutputs ppo_value_loss_cuda(const at::Tensor& values, const at::Tensor& old_values, const at::Tensor& returns,
                                const at::Tensor& mask, double clip, int64_t agg, std::optional<double> num_tokens,
                                std::optional<double> num_seqs, bool need_grad) {
  const c10::cuda::CUDAGuard guard(values.device());
  return ppo_value_loss_impl(values, old_values, returns, mask, clip, agg_params(agg, num_tokens, num_seqs),
                             need_grad, value_partials, finalize_value_aten);
}

// The public op ppo_loss_from_logits (csrc/ops.cpp; glue/ppo_loss.h ppo_loss_from_logits_impl),
// aggregated on the device without a host synchronisation.
FromLogitsOutputs ppo_loss_from_logits_cuda(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old_logp, const at::Tensor& advantages,
    const at::Tensor& mask, const std::optional<at::Tensor>& ref_logp, double temperature, double ratio_low,
    double ratio_high, double dual_clip, int64_t loss_type, int64_t agg, std::optional<double> num_tokens,
    std::optional<double> num_seqs, double kl_coef, int64_t kl_estimator, double entropy_coef,
    bool inplace_backward, bool need_grad, const std::optional<at::Tensor>& count, int64_t max_rows_in_flight) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const AggParams params = agg_params(agg, num_tokens, num_seqs);
  const FromLogitsInputs in =
      from_logits_inputs(logits, labels, old_logp, advantages, mask, ref_logp, inplace_backward, need_grad);
  return ppo_loss_from_logits_impl(logits, in, temperature, ratio_low, ratio_high, dual_clip, loss_type, params,
                                   kl_coef, kl_estimator, entropy_coef, need_grad, count, max_rows_in_flight,
                                   policy_partials, finalize_policy_aten);
}

// grad *= scale / applied unless they are equal, then applied = scale; read on
// the device (no host synchronisation).
void scale_grad_cuda(at::Tensor& grad, at::Tensor& applied, const at::Tensor& scale) {
  const c10::cuda::CUDAGuard guard(grad.device());
  TORCH_CHECK_VALUE(grad.is_contiguous(), "grad: must be contiguous");
  check_row_tensor(applied, 1, acc_dtype_for(grad), "applied");
  const at::Tensor s = scale.to(grad.device(), acc_dtype_for(grad)).reshape({1}).contiguous();
  dispatch_float_dtype<__nv_bfloat16, __half>(grad.scalar_type(), "grad", [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    C10_CUDA_CHECK((cuda::launch_scale_unless_one<scalar_t, acc_t>(
        reinterpret_cast<scalar_t*>(grad.data_ptr()), s.const_data_ptr<acc_t>(), applied.const_data_ptr<acc_t>(),
        grad.numel(), c10::cuda::getCurrentCUDAStream())));
  });
  applied.copy_(s);
}

// ppo_logits_grad_native (csrc/ops.cpp): one launch, softmax_rows.cuh's row
// helpers around the token's weighted PPO derivative (ppo_loss.cu).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_logits_grad_cuda(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old_logp,
    const at::Tensor& advantages, const at::Tensor& row_weight,
    const std::optional<at::Tensor>& ref_logp, const at::Tensor& grad_logits, int64_t inner_rows,
    int64_t in_outer_stride, int64_t in_inner_stride, int64_t out_outer_stride,
    int64_t out_inner_stride, double inv_temperature, int64_t ignore_index, double ratio_low,
    double ratio_high, double dual_clip, int64_t loss_type, double kl_coef, int64_t kl_estimator,
    double entropy_coef, int64_t max_rows_in_flight) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const RowLayout in_layout{inner_rows, in_outer_stride, in_inner_stride};
  const RowLayout out_layout{inner_rows, out_outer_stride, out_inner_stride};
  const PpoLogitsGradArgs checked = check_ppo_logits_grad(
      logits, labels, grad_logits, in_layout, out_layout, old_logp, advantages, row_weight, ref_logp,
      ratio_low, ratio_high, dual_clip, loss_type, kl_coef, kl_estimator);
  const int64_t n_rows = checked.n_rows;
  const at::ScalarType acc = acc_dtype_for(logits);
  const auto opts = logits.options().dtype(acc);
  at::Tensor logp = at::empty({n_rows}, opts), entropy = at::empty({n_rows}, opts);
  at::Tensor row_max = at::empty({n_rows}, opts), log_sum = at::empty({n_rows}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_dtype<__nv_bfloat16, __half>(logits.scalar_type(), "logits", [&](auto scalar, auto acc_v) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc_v);
    C10_CUDA_CHECK((cuda::launch_ppo_logits_grad<scalar_t, acc_t>(
        reinterpret_cast<const scalar_t*>(logits.const_data_ptr()), in_layout,
        labels.const_data_ptr<int64_t>(), old_logp.const_data_ptr<acc_t>(),
        advantages.const_data_ptr<acc_t>(), row_weight.const_data_ptr<acc_t>(),
        ref_logp ? ref_logp->const_data_ptr<acc_t>() : nullptr, n_rows, logits.size(-1),
        static_cast<acc_t>(inv_temperature), ignore_index, cast_params<acc_t>(checked.params),
        static_cast<acc_t>(entropy_coef), logp.mutable_data_ptr<acc_t>(),
        entropy.mutable_data_ptr<acc_t>(), row_max.mutable_data_ptr<acc_t>(),
        log_sum.mutable_data_ptr<acc_t>(), reinterpret_cast<scalar_t*>(grad_logits.data_ptr()),
        out_layout, max_rows_in_flight, stream)));
  });
  return {logp, entropy, row_max, log_sum};
}

// The op ppo_policy_rows (glue/ppo_loss.h ppo_policy_rows_impl).
std::tuple<at::Tensor, at::Tensor> ppo_policy_rows_cuda(const at::Tensor& logp, const at::Tensor& old_logp,
                                                      const at::Tensor& advantages, const at::Tensor& mask,
                                                      double ratio_low, double ratio_high, double dual_clip,
                                                      int64_t loss_type, bool need_grad) {
  return ppo_policy_rows_impl(logp, old_logp, advantages, mask, ratio_low, ratio_high, dual_clip, loss_type,
                              need_grad, policy_partials);
}

// The op ppo_sequence_clip: finalize_sequence_clip's maths in one thread block.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_sequence_clip_cuda(const at::Tensor& rows, double ratio_low,
                                                                      double ratio_high, double dual_clip,
                                                                      int64_t agg, std::optional<double> num_tokens,
                                                                      std::optional<double> num_seqs,
                                                                      int64_t seq_len) {
  const c10::cuda::CUDAGuard guard(rows.device());
  return ppo_sequence_clip_impl(rows, agg, num_tokens, num_seqs, [&](const at::Tensor& in, const AggParams& params,
                                                                     at::Tensor& loss, at::Tensor& coef,
                                                                     at::Tensor& stats) {
    AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "ppo_sequence_clip_cuda", [&] {
      C10_CUDA_CHECK(cuda::launch_ppo_sequence_clip<scalar_t>(
          in.const_data_ptr<scalar_t>(), in.size(0), seq_len, params, static_cast<scalar_t>(ratio_low),
          static_cast<scalar_t>(ratio_high), static_cast<scalar_t>(dual_clip), loss.mutable_data_ptr<scalar_t>(),
          coef.mutable_data_ptr<scalar_t>(), stats.mutable_data_ptr<scalar_t>(),
          c10::cuda::getCurrentCUDAStream()));
    });
  });
}

// The op scale_by_sign: one grid-stride pass.
at::Tensor scale_by_sign_cuda(const at::Tensor& x, const at::Tensor& pos, const at::Tensor& neg) {
  const c10::cuda::CUDAGuard guard(x.device());
  return scale_by_sign_impl(x, pos, neg, [](const at::Tensor& in, const at::Tensor& p, const at::Tensor& n,
                                            at::Tensor& out, int64_t, int64_t seq_len) {
    AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "scale_by_sign_cuda", [&] {
      C10_CUDA_CHECK(cuda::launch_scale_by_sign<scalar_t>(
          in.const_data_ptr<scalar_t>(), p.const_data_ptr<scalar_t>(), n.const_data_ptr<scalar_t>(), in.numel(),
          seq_len, out.mutable_data_ptr<scalar_t>(), c10::cuda::getCurrentCUDAStream()));
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) {
  m.impl("ppo_policy_loss", &ppo_policy_loss_cuda);
  m.impl("ppo_policy_rows", &ppo_policy_rows_cuda);
  m.impl("ppo_sequence_clip", &ppo_sequence_clip_cuda);
  m.impl("scale_by_sign", &scale_by_sign_cuda);
  m.impl("ppo_value_loss", &ppo_value_loss_cuda);
  m.impl("scale_grad_", &scale_grad_cuda);
  m.impl("ppo_loss_from_logits", &ppo_loss_from_logits_cuda);
  m.impl("ppo_logits_grad_native", &ppo_logits_grad_cuda);
}

}  // namespace rlhf_kernels

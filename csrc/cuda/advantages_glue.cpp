// Torch glue for the CUDA advantage kernels: checks, allocation, stream and
// device guard. The packed offsets are not read here (that would synchronise):
// the Python op checks them on request (RLHF_KERNELS_CHECK=1) and the kernel
// clamps them, so a bad cu_seqlens never reads out of bounds.
// A launcher's cudaError_t (which includes a launch shape it refuses before
// any launch, unseen by cudaGetLastError) goes to C10_CUDA_CHECK; the extra
// parentheses keep a template argument list's comma inside its one argument.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>
#include <torch/types.h>

#include "../glue/advantages.h"
#include "advantages.cuh"

namespace rlhf_kernels {
namespace {

// The public op kl_penalty (one crossing): any layouts of one dtype, read contiguous.
at::Tensor kl_penalty_cuda(const at::Tensor& logp_in, const at::Tensor& ref_logp_in, int64_t estimator) {
  const at::Tensor logp = logp_in.contiguous(), ref_logp = ref_logp_in.contiguous();
  const c10::cuda::CUDAGuard guard(logp.device());
  check_kl_inputs(logp, ref_logp, estimator);
  at::Tensor kl = at::empty(logp.sizes(), logp.options().dtype(acc_dtype_for(logp)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_dtype<__nv_bfloat16, __half>(logp.scalar_type(), "logp", [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    C10_CUDA_CHECK((cuda::launch_kl_penalty_fwd<scalar_t, acc_t>(
        reinterpret_cast<const scalar_t*>(logp.const_data_ptr()),
        reinterpret_cast<const scalar_t*>(ref_logp.const_data_ptr()), static_cast<int>(estimator),
        kl.mutable_data_ptr<acc_t>(), logp.numel(), stream)));
  });
  return kl;
}

// (grad_logp, grad_ref_logp) in the inputs' dtype; grad of any float dtype and layout.
std::tuple<at::Tensor, at::Tensor> kl_penalty_backward_cuda(const at::Tensor& grad_in, const at::Tensor& logp_in,
                                                       const at::Tensor& ref_logp_in, int64_t estimator) {
  const at::Tensor logp = logp_in.contiguous(), ref_logp = ref_logp_in.contiguous();
  const at::Tensor grad = grad_in.to(acc_dtype_for(logp)).contiguous();
  const c10::cuda::CUDAGuard guard(logp.device());
  check_kl_inputs(logp, ref_logp, estimator);
  check_row_tensor(grad, logp.numel(), acc_dtype_for(logp), "grad");
  at::Tensor grad_logp = at::empty(logp.sizes(), logp.options());
  at::Tensor grad_ref = at::empty(logp.sizes(), logp.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_dtype<__nv_bfloat16, __half>(logp.scalar_type(), "logp", [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    C10_CUDA_CHECK((cuda::launch_kl_penalty_bwd<scalar_t, acc_t>(
        grad.const_data_ptr<acc_t>(), reinterpret_cast<const scalar_t*>(logp.const_data_ptr()),
        reinterpret_cast<const scalar_t*>(ref_logp.const_data_ptr()), static_cast<int>(estimator),
        reinterpret_cast<scalar_t*>(grad_logp.data_ptr()),
        reinterpret_cast<scalar_t*>(grad_ref.data_ptr()), logp.numel(), stream)));
  });
  return {grad_logp, grad_ref};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> advantages_cuda(
    const at::Tensor& values, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& cu_seqlens, const std::optional<at::Tensor>& token_rewards,
    const std::optional<at::Tensor>& scores, const std::optional<at::Tensor>& logp,
    const std::optional<at::Tensor>& ref_logp, const std::optional<at::Tensor>& kl_coef_scale,
    double kl_coef, int64_t estimator, double gamma, double lam) {
  const c10::cuda::CUDAGuard guard(values.device());
  const auto [num_seqs, seq_len] = check_advantages(values, mask, cu_seqlens, token_rewards, scores,
                                                    logp, ref_logp, kl_coef_scale, estimator);
  AdvantagesOutputs out = alloc_advantages_outputs(values, num_seqs, !token_rewards.has_value());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_dtype<__nv_bfloat16, __half>(values.scalar_type(), "values", [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    const auto args = advantages_args<scalar_t, acc_t>(values, mask, cu_seqlens, token_rewards, scores,
                                                       logp, ref_logp, kl_coef_scale, kl_coef, estimator,
                                                       gamma, lam, seq_len, num_seqs, out);
    C10_CUDA_CHECK((cuda::launch_advantages<scalar_t, acc_t>(args, values.numel(), stream)));
  });
  return {out.advantages, out.returns, out.token_rewards, out.kl, out.stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) {
  m.impl("kl_penalty", &kl_penalty_cuda);
  m.impl("kl_penalty_backward", &kl_penalty_backward_cuda);
  m.impl("advantages", &advantages_cuda);
}

}  // namespace rlhf_kernels

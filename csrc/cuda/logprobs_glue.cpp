// Torch glue for the CUDA kernels: checks, allocation, stream and device guard.
// A launcher's cudaError_t (which includes a launch shape it refuses before
// any launch, unseen by cudaGetLastError) goes to C10_CUDA_CHECK; the extra
// parentheses keep a template argument list's comma inside its one argument.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>
#include <torch/types.h>

#include "../glue/logprobs.h"
#include "logprobs.cuh"
#include "truncation.cuh"

namespace rlhf_kernels {
namespace {

// min_logit's data for the kernels (glue/logprobs.h threshold_data), on the
// logits' device.
template <typename acc_t>
const acc_t* min_logit_data(const std::optional<at::Tensor>& min_logit, const at::Tensor& logits,
                            int64_t n_rows) {
  TORCH_CHECK_VALUE(!min_logit || min_logit->device() == logits.device(),
                    "min_logit: expected a tensor on the logits' device ", logits.device());
  return threshold_data<acc_t>(min_logit, n_rows, acc_dtype_for(logits));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& labels, int64_t inner_rows, int64_t outer_stride,
    int64_t inner_stride, double inv_temperature, int64_t ignore_index, bool compute_entropy,
    const std::optional<at::Tensor>& min_logit) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const RowLayout layout{inner_rows, outer_stride, inner_stride};
  const int64_t n_rows = checked_rows(logits, labels, layout);
  const auto opts = logits.options().dtype(acc_dtype_for(logits));
  at::Tensor logp = at::empty({n_rows}, opts);
  at::Tensor row_max = at::empty({n_rows}, opts), log_sum = at::empty({n_rows}, opts);
  at::Tensor entropy = at::empty({compute_entropy ? n_rows : 0}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_dtype<__nv_bfloat16, __half>(logits.scalar_type(), "logits", [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    C10_CUDA_CHECK((cuda::launch_logprobs_fwd<scalar_t, acc_t>(
        reinterpret_cast<const scalar_t*>(logits.const_data_ptr()), layout,
        labels.const_data_ptr<int64_t>(), n_rows, logits.size(-1),
        static_cast<acc_t>(inv_temperature), ignore_index, logp.mutable_data_ptr<acc_t>(),
        compute_entropy ? entropy.mutable_data_ptr<acc_t>() : nullptr,
        row_max.mutable_data_ptr<acc_t>(), log_sum.mutable_data_ptr<acc_t>(),
        min_logit_data<acc_t>(min_logit, logits, n_rows), stream)));
  });
  return {logp, entropy, row_max, log_sum};
}

void logprobs_bwd_cuda(const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                       const at::Tensor& logits, const at::Tensor& labels,
                       const at::Tensor& row_max, const at::Tensor& log_sum,
                       const std::optional<at::Tensor>& entropy, const at::Tensor& grad_logits,
                       int64_t inner_rows, int64_t in_outer_stride, int64_t in_inner_stride,
                       int64_t out_outer_stride, int64_t out_inner_stride, double inv_temperature,
                       int64_t ignore_index, const std::optional<at::Tensor>& min_logit) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const RowLayout in_layout{inner_rows, in_outer_stride, in_inner_stride};
  const RowLayout out_layout{inner_rows, out_outer_stride, out_inner_stride};
  const int64_t n_rows = check_logprobs_bwd(grad_logp, grad_entropy, logits, labels, row_max,
                                            log_sum, entropy, grad_logits, in_layout, out_layout);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_dtype<__nv_bfloat16, __half>(logits.scalar_type(), "logits", [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    C10_CUDA_CHECK((cuda::launch_logprobs_bwd<scalar_t, acc_t>(
        grad_logp.const_data_ptr<acc_t>(),
        grad_entropy ? grad_entropy->const_data_ptr<acc_t>() : nullptr,
        reinterpret_cast<const scalar_t*>(logits.const_data_ptr()), in_layout,
        labels.const_data_ptr<int64_t>(), row_max.const_data_ptr<acc_t>(),
        log_sum.const_data_ptr<acc_t>(), entropy ? entropy->const_data_ptr<acc_t>() : nullptr,
        n_rows, logits.size(-1),
        static_cast<acc_t>(inv_temperature), ignore_index,
        reinterpret_cast<scalar_t*>(grad_logits.data_ptr()), out_layout,
        min_logit_data<acc_t>(min_logit, logits, n_rows), stream)));
  });
}

// (N,) thresholds, the accumulation dtype, of the rows of a layout that
// glue/logprobs.h logits_rows made (last dimension contiguous).
at::Tensor truncation_threshold_cuda(const at::Tensor& logits, int64_t inner_rows, int64_t outer_stride,
                                     int64_t inner_stride, double inv_temperature, int64_t top_k, double top_p,
                                     double min_p, bool min_p_first) {
  const c10::cuda::CUDAGuard guard(logits.device());
  TORCH_CHECK_VALUE(logits.dim() >= 1 && logits.size(-1) >= 1 && logits.stride(-1) == 1,
                    "logits: expected (..., V) with V >= 1 and a contiguous last dimension");
  const RowLayout layout{inner_rows, outer_stride, inner_stride};
  const int64_t vocab = logits.size(-1);
  const int64_t n_rows = logits.numel() / vocab;
  at::Tensor out = at::empty({n_rows}, logits.options().dtype(acc_dtype_for(logits)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_dtype<__nv_bfloat16, __half>(logits.scalar_type(), "logits", [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    C10_CUDA_CHECK((cuda::launch_truncation_threshold<scalar_t, acc_t>(
        reinterpret_cast<const scalar_t*>(logits.const_data_ptr()), layout, n_rows, vocab,
        static_cast<acc_t>(inv_temperature), top_k, static_cast<acc_t>(top_p), static_cast<acc_t>(min_p),
        min_p_first, out.mutable_data_ptr<acc_t>(), stream)));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) {
  m.impl("logprobs_fwd_native", &logprobs_fwd_cuda);
  m.impl("logprobs", &logprobs_op<&logprobs_fwd_cuda>);
  m.impl("logprobs_backward", &logprobs_backward_op<&logprobs_bwd_cuda>);
  m.impl("logprobs_backward_", &logprobs_backward_inplace_op<&logprobs_bwd_cuda>);
  m.impl("logprobs_bwd_native", &logprobs_bwd_cuda);
  m.impl("truncation_threshold", &truncation_threshold_op<&truncation_threshold_cuda>);
}

}  // namespace rlhf_kernels

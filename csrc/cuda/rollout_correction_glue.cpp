// Torch glue of the CUDA rollout_correction kernel: the shared checks and
// outputs (csrc/glue/rollout_correction.h), contiguous inputs, device guard
// and the current stream. The launcher's cudaError_t (which includes a grid it
// refuses before any launch, unseen by cudaGetLastError) goes to
// C10_CUDA_CHECK; the extra parentheses keep a template argument list's
// commas inside its one argument.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>
#include <torch/types.h>

#include "../glue/rollout_correction.h"
#include "rollout_correction.cuh"

namespace rlhf_kernels {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> rollout_correction_cuda(
    const at::Tensor& logp_in, const at::Tensor& rollout_in, const at::Tensor& mask_in, int64_t level,
    int64_t mode, double lower, double upper, at::IntArrayRef kinds, at::ArrayRef<double> lo,
    at::ArrayRef<double> hi) {
  const RcParams p = rollout_correction_params(logp_in, rollout_in, mask_in, level, mode, lower, upper, kinds,
                                               lo, hi);
  // The dispatcher picks this kernel when any input is on a CUDA device; the
  // kernel reads all three through device pointers.
  TORCH_CHECK_VALUE(rollout_in.device() == logp_in.device() && mask_in.device() == logp_in.device(),
                    "rollout_logp, mask: expected the device of logp");
  const c10::cuda::CUDAGuard guard(logp_in.device());
  const at::Tensor logp = logp_in.contiguous(), rollout = rollout_in.contiguous(), mask = mask_in.contiguous();
  RcOutputs out = alloc_rollout_correction_outputs(logp);
  const int64_t num_seqs = logp.size(0), seq_len = logp.size(1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_dtype<__nv_bfloat16, __half>(logp.scalar_type(), "logp", [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    const auto* x = reinterpret_cast<const scalar_t*>(logp.const_data_ptr());
    const auto* y = reinterpret_cast<const scalar_t*>(rollout.const_data_ptr());
    auto run = [&](const auto* m) {
      using mask_t = std::remove_const_t<std::remove_pointer_t<decltype(m)>>;
      C10_CUDA_CHECK((cuda::launch_rollout_correction<scalar_t, acc_t, mask_t>(
          x, y, m, p, num_seqs, seq_len, out.weights.mutable_data_ptr<acc_t>(),
          out.keep.mutable_data_ptr<bool>(), out.stats.mutable_data_ptr<acc_t>(), stream)));
    };
    with_mask_data<acc_t>(mask, run);
  });
  return {out.weights, out.keep, out.stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) { m.impl("rollout_correction", &rollout_correction_cuda); }

}  // namespace rlhf_kernels

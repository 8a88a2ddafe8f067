// What the torch glue of every native op (csrc/cpu/*_glue.cpp,
// csrc/cuda/*_glue.cpp) uses: the dtype dispatch and the per-row tensor checks.
#pragma once

#include <torch/types.h>

namespace rlhf_kernels {

// Calls f(scalar_t{}, acc_t{}) for the logits dtype; the 16-bit types are the
// device's own (bf16_t / fp16_t on CPU, __nv_bfloat16 / __half on CUDA).
template <typename bf16_type, typename fp16_type, typename F>
void dispatch_float_dtype(at::ScalarType dtype, const char* name, const F& f) {
  switch (dtype) {
    case at::kFloat: f(float{}, float{}); break;
    case at::kDouble: f(double{}, double{}); break;
    case at::kBFloat16: f(bf16_type{}, float{}); break;
    case at::kHalf: f(fp16_type{}, float{}); break;
    default: TORCH_CHECK_VALUE(false, name, ": unsupported dtype ", dtype);
  }
}

// A contiguous (n,) tensor of `dtype`, as every per-row input of a kernel is.
inline void check_row_tensor(const at::Tensor& t, int64_t n, at::ScalarType dtype,
                             const char* name) {
  TORCH_CHECK_VALUE(t.numel() == n && t.is_contiguous() && t.scalar_type() == dtype, name,
                    ": expected a contiguous (", n, ",) tensor of dtype ", dtype);
}

inline at::ScalarType acc_dtype_for(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace rlhf_kernels

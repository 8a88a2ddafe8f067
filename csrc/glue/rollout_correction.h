// The torch glue of rollout_correction shared by the CPU and CUDA
// implementations: the checks, the parameters and the outputs.
#pragma once

#include <torch/types.h>

#include <rlhf_kernels/rollout_correction_math.h>

#include "common.h"

namespace rlhf_kernels {

struct RcOutputs {
  at::Tensor weights, keep, stats;
};

// Checks the tensors (the public function has checked them for users; this
// guards direct torch.ops calls) and returns the kernel's parameters.
inline RcParams rollout_correction_params(const at::Tensor& logp, const at::Tensor& rollout_logp,
                                          const at::Tensor& mask, int64_t level, int64_t mode,
                                          double lower, double upper, at::IntArrayRef kinds,
                                          at::ArrayRef<double> lo, at::ArrayRef<double> hi) {
  TORCH_CHECK_VALUE(logp.dim() == 2, "logp: expected shape (B, T)");
  TORCH_CHECK_VALUE(rollout_logp.sizes() == logp.sizes() && mask.sizes() == logp.sizes(),
                    "rollout_logp, mask: expected the shape of logp");
  TORCH_CHECK_VALUE(rollout_logp.scalar_type() == logp.scalar_type(), "rollout_logp: expected the dtype of logp");
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kBool || mask.scalar_type() == acc_dtype_for(logp),
                    "mask: expected bool or the accumulation dtype");
  TORCH_CHECK_VALUE(level >= kRcToken && level <= kRcGeometric, "level: expected 0, 1 or 2");
  TORCH_CHECK_VALUE(mode >= kRcNoWeights && mode <= kRcMask, "mode: expected 0, 1 or 2");
  TORCH_CHECK_VALUE(kinds.size() <= static_cast<size_t>(kRcMaxRules) && lo.size() == kinds.size() &&
                        hi.size() == kinds.size(),
                    "rules: at most ", kRcMaxRules, " kinds with one lo and one hi each");
  RcParams p{};
  p.level = static_cast<int>(level);
  p.mode = static_cast<int>(mode);
  p.lower = lower;
  p.upper = upper;
  p.num_rules = static_cast<int>(kinds.size());
  for (int r = 0; r < p.num_rules; ++r) {
    TORCH_CHECK_VALUE(kinds[r] >= 0 && kinds[r] < 12, "rule_kinds: expected codes in [0, 12)");
    p.kind[r] = static_cast<int>(kinds[r]);
    p.lo[r] = lo[r];
    p.hi[r] = hi[r];
  }
  return p;
}

// f(pointer to the mask's data): bool for a bool mask, acc_t for token weights.
template <typename acc_t, typename F>
void with_mask_data(const at::Tensor& mask, const F& f) {
  if (mask.scalar_type() == at::kBool) {
    f(mask.const_data_ptr<bool>());
  } else {
    f(mask.const_data_ptr<acc_t>());
  }
}

inline RcOutputs alloc_rollout_correction_outputs(const at::Tensor& logp) {
  const auto opts = logp.options().dtype(acc_dtype_for(logp));
  return {at::empty(logp.sizes(), opts), at::empty(logp.sizes(), logp.options().dtype(at::kBool)),
          at::empty({logp.size(0), kRcStatColumns}, opts)};
}

}  // namespace rlhf_kernels

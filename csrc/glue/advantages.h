// The torch glue of the KL penalty and advantages ops
// (csrc/cpu/advantages_glue.cpp, csrc/cuda/advantages_glue.cpp): argument
// checks, output allocation and the kernels' argument block.
#pragma once

#include <torch/types.h>

#include <optional>
#include <utility>
#include <vector>

#include "common.h"
#include "rlhf_kernels/advantages.h"

namespace rlhf_kernels {

// Checks of advantages_native's arguments (CPU and CUDA glue). Returns
// (num_seqs, seq_len); seq_len is 0 for the packed layout.
inline std::pair<int64_t, int64_t> check_advantages(
    const at::Tensor& values, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& cu_seqlens, const std::optional<at::Tensor>& token_rewards,
    const std::optional<at::Tensor>& scores, const std::optional<at::Tensor>& logp,
    const std::optional<at::Tensor>& ref_logp, const std::optional<at::Tensor>& kl_coef_scale,
    int64_t estimator) {
  TORCH_CHECK_VALUE(values.is_contiguous(), "values: must be contiguous");
  int64_t num_seqs, seq_len = 0;
  if (cu_seqlens) {
    TORCH_CHECK_VALUE(values.dim() == 1, "values: expected (total,) with cu_seqlens");
    TORCH_CHECK_VALUE(cu_seqlens->dim() == 1 && cu_seqlens->numel() >= 1 &&
                          cu_seqlens->scalar_type() == at::kInt && cu_seqlens->is_contiguous(),
                      "cu_seqlens: expected a contiguous (B + 1,) int32 tensor");
    num_seqs = cu_seqlens->numel() - 1;
  } else {
    TORCH_CHECK_VALUE(values.dim() == 2, "values: expected (B, T) without cu_seqlens");
    num_seqs = values.size(0);
    seq_len = values.size(1);
  }
  const int64_t n = values.numel();
  if (mask) check_row_tensor(*mask, n, at::kBool, "mask");
  TORCH_CHECK_VALUE(estimator >= 0 && estimator <= 3, "estimator: must be in [0, 3]");
  if (token_rewards) {
    check_row_tensor(*token_rewards, n, values.scalar_type(), "token_rewards");
  } else {
    TORCH_CHECK_VALUE(scores && logp && ref_logp,
                      "advantages: needs token_rewards, or scores, logp and ref_logp");
    check_row_tensor(*scores, num_seqs, acc_dtype_for(values), "scores");
    check_row_tensor(*logp, n, values.scalar_type(), "logp");
    check_row_tensor(*ref_logp, n, values.scalar_type(), "ref_logp");
    if (kl_coef_scale) check_row_tensor(*kl_coef_scale, 1, acc_dtype_for(values), "kl_coef_scale");
  }
  return {num_seqs, seq_len};
}

inline void check_kl_inputs(const at::Tensor& logp, const at::Tensor& ref_logp, int64_t estimator) {
  TORCH_CHECK_VALUE(logp.is_contiguous() && ref_logp.is_contiguous(),
                    "logp, ref_logp: must be contiguous");
  TORCH_CHECK_VALUE(logp.sizes() == ref_logp.sizes() && logp.scalar_type() == ref_logp.scalar_type(),
                    "ref_logp: shape and dtype must match logp");
  TORCH_CHECK_VALUE(estimator >= 0 && estimator <= 3, "estimator: must be in [0, 3]");
}

// Outputs of advantages_native (both devices): advantages, returns, the shaped
// rewards and the KL (empty without shaping), and the (B, kAdvantageStats)
// float64 per-sequence partial sums.
struct AdvantagesOutputs {
  at::Tensor advantages, returns, token_rewards, kl, stats;
};

inline AdvantagesOutputs alloc_advantages_outputs(const at::Tensor& values, int64_t num_seqs,
                                                  bool shaping) {
  const auto opts = values.options().dtype(acc_dtype_for(values));
  // An owning copy of the sizes: an IntArrayRef of a braced list would dangle.
  const std::vector<int64_t> shaped = shaping ? values.sizes().vec() : std::vector<int64_t>{0};
  return {at::empty(values.sizes(), opts), at::empty(values.sizes(), opts), at::empty(shaped, opts),
          at::empty(shaped, opts),
          at::empty({num_seqs, kAdvantageStats}, values.options().dtype(at::kDouble))};
}

// The kernels' argument block over the op's tensors; scalar_t is the device's
// storage type (bf16_t / __nv_bfloat16, ...), acc_t its accumulator.
template <typename scalar_t, typename acc_t>
AdvantagesArgs<scalar_t, acc_t> advantages_args(
    const at::Tensor& values, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& cu_seqlens, const std::optional<at::Tensor>& token_rewards,
    const std::optional<at::Tensor>& scores, const std::optional<at::Tensor>& logp,
    const std::optional<at::Tensor>& ref_logp, const std::optional<at::Tensor>& kl_coef_scale,
    double kl_coef, int64_t estimator, double gamma, double lam, int64_t seq_len, int64_t num_seqs,
    AdvantagesOutputs& out) {
  const bool shaping = !token_rewards.has_value();
  auto ptr = [](const std::optional<at::Tensor>& t) {
    return t ? reinterpret_cast<const scalar_t*>(t->const_data_ptr()) : nullptr;
  };
  AdvantagesArgs<scalar_t, acc_t> args{};
  args.values = reinterpret_cast<const scalar_t*>(values.const_data_ptr());
  args.mask = mask ? reinterpret_cast<const uint8_t*>(mask->const_data_ptr()) : nullptr;
  args.cu_seqlens = cu_seqlens ? cu_seqlens->const_data_ptr<int32_t>() : nullptr;
  args.seq_len = seq_len;
  args.num_seqs = num_seqs;
  args.token_rewards = ptr(token_rewards);
  args.scores = shaping ? scores->const_data_ptr<acc_t>() : nullptr;
  args.logp = ptr(logp);
  args.ref_logp = ptr(ref_logp);
  args.kl_coef_scale = kl_coef_scale ? kl_coef_scale->const_data_ptr<acc_t>() : nullptr;
  args.kl_coef = static_cast<acc_t>(kl_coef);
  args.estimator = static_cast<int>(estimator);
  args.gamma = static_cast<acc_t>(gamma);
  args.lam = static_cast<acc_t>(lam);
  args.advantages = out.advantages.mutable_data_ptr<acc_t>();
  args.returns = out.returns.mutable_data_ptr<acc_t>();
  args.token_rewards_out = shaping ? out.token_rewards.mutable_data_ptr<acc_t>() : nullptr;
  args.kl_out = shaping ? out.kl.mutable_data_ptr<acc_t>() : nullptr;
  args.stats = out.stats.mutable_data_ptr<double>();
  return args;
}

}  // namespace rlhf_kernels

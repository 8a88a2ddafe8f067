// rollout_correction on the CPU: one task per block of sequences, each
// sequence in the two sweeps of rollout_correction_math.h.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <type_traits>

#include "../glue/rollout_correction.h"

namespace rlhf_kernels {
namespace {

template <typename A, typename M>
A mask_value(M m) {
  if constexpr (std::is_same_v<M, bool>) {
    return m ? A(1) : A(0);
  } else {
    return static_cast<A>(m);
  }
}

template <typename scalar_t, typename acc_t, typename mask_t>
void rollout_correction_rows(const scalar_t* logp, const scalar_t* rollout, const mask_t* mask,
                             const RcParams& p, int64_t seq_len, acc_t* weights, bool* keep, acc_t* stats,
                             int64_t begin, int64_t end) {
  for (int64_t b = begin; b < end; ++b) {
    const int64_t o = b * seq_len;
    RcRow<acc_t> row;
    rc_row_init(row);
    for (int64_t t = 0; t < seq_len; ++t) {
      rc_accumulate(row, acc_t(to_float(logp[o + t])) - acc_t(to_float(rollout[o + t])),
                    mask_value<acc_t>(mask[o + t]));
    }
    const bool seq_keep = rc_sequence_keep(row, p);
    const acc_t seq_log_weight = rc_sequence_log_weight(row, p);
    acc_t sum_weight = 0, sum_oob = 0, sum_rejected = 0;
    bool any_rejected = false;
    for (int64_t t = 0; t < seq_len; ++t) {
      const acc_t w = mask_value<acc_t>(mask[o + t]);
      const RcToken<acc_t> tok = rc_token(acc_t(to_float(logp[o + t])) - acc_t(to_float(rollout[o + t])), w,
                                          seq_keep, seq_log_weight, p);
      weights[o + t] = tok.weight;
      keep[o + t] = tok.keep;
      if (w != acc_t(0)) {
        sum_weight += w * tok.weight;
        sum_oob += tok.out_of_band ? w : acc_t(0);
        sum_rejected += tok.keep ? acc_t(0) : w;
        any_rejected = any_rejected || !tok.keep;
      }
    }
    rc_row_stats(row, sum_weight, sum_oob, sum_rejected, any_rejected, stats + b * kRcStatColumns);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rollout_correction_cpu(
    const at::Tensor& logp_in, const at::Tensor& rollout_in, const at::Tensor& mask_in, int64_t level,
    int64_t mode, double lower, double upper, at::IntArrayRef kinds, at::ArrayRef<double> lo,
    at::ArrayRef<double> hi) {
  const RcParams p = rollout_correction_params(logp_in, rollout_in, mask_in, level, mode, lower, upper, kinds,
                                               lo, hi);
  const at::Tensor logp = logp_in.contiguous(), rollout = rollout_in.contiguous(), mask = mask_in.contiguous();
  RcOutputs out = alloc_rollout_correction_outputs(logp);
  const int64_t num_seqs = logp.size(0), seq_len = logp.size(1);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(seq_len, 1));
  dispatch_float_dtype<bf16_t, fp16_t>(logp.scalar_type(), "logp", [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    const auto* x = reinterpret_cast<const scalar_t*>(logp.const_data_ptr());
    const auto* y = reinterpret_cast<const scalar_t*>(rollout.const_data_ptr());
    acc_t* weights = out.weights.mutable_data_ptr<acc_t>();
    bool* keep = out.keep.mutable_data_ptr<bool>();
    acc_t* stats = out.stats.mutable_data_ptr<acc_t>();
    auto run = [&](const auto* m) {
      at::parallel_for(0, num_seqs, grain, [&](int64_t begin, int64_t end) {
        rollout_correction_rows<scalar_t, acc_t>(x, y, m, p, seq_len, weights, keep, stats, begin, end);
      });
    };
    with_mask_data<acc_t>(mask, run);
  });
  return {out.weights, out.keep, out.stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) { m.impl("rollout_correction", &rollout_correction_cpu); }

}  // namespace rlhf_kernels

// CPU kernels for logprobs_from_logits: plain C++ over raw pointers, one call
// per range of rows so that the caller chooses the threading (at::parallel_for
// in the torch glue, a plain loop in the ctest harness).
#pragma once

#include <cstdint>

#include "rlhf_kernels/common.h"

namespace rlhf_kernels::cpu {

// Forward, rows [row_begin, row_end):
//   x = logits[row] * inv_temperature
//   lse = logsumexp(x); logp = x[label] - lse; entropy = lse - sum(softmax(x) * x)
// Ignored rows (label == ignore_index) get logp = entropy = 0; a label outside
// [0, vocab) gives logp = NaN and is never read. `entropy` may be null (not
// computed). acc_t is float, or double for double logits.
template <typename scalar_t, typename acc_t>
void logprobs_fwd_rows(const scalar_t* logits, RowLayout layout, const int64_t* labels,
                       int64_t vocab, acc_t inv_temperature, int64_t ignore_index,
                       acc_t* logp, acc_t* entropy, acc_t* lse, int64_t row_begin,
                       int64_t row_end);

// Backward, rows [row_begin, row_end), one pass over the row:
//   p = softmax(x);  dlogits = inv_temperature * (g_logp * (onehot(label) - p)
//                                - g_entropy * p * (log p + entropy))
// grad_entropy may be null. grad_logits may alias logits (same layout): each
// element is read before it is written.
template <typename scalar_t, typename acc_t>
void logprobs_bwd_rows(const acc_t* grad_logp, const acc_t* grad_entropy,
                       const scalar_t* logits, RowLayout in_layout, const int64_t* labels,
                       const acc_t* lse, const acc_t* entropy, int64_t vocab,
                       acc_t inv_temperature, int64_t ignore_index, scalar_t* grad_logits,
                       RowLayout out_layout, int64_t row_begin, int64_t row_end);

}  // namespace rlhf_kernels::cpu

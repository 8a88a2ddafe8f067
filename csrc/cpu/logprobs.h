// CPU kernels for logprobs_from_logits: plain C++ over raw pointers, one call
// per range of rows so that the caller chooses the threading (at::parallel_for
// in the torch glue, a plain loop in the ctest harness).
#pragma once

#include <algorithm>
#include <cstdint>

#include "rlhf_kernels/common.h"

namespace rlhf_kernels::cpu {

// Rows per parallel task: enough work (>= ~64k elements) to amortise a task.
inline int64_t grain_rows(int64_t vocab) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(vocab, 1)); }

// Forward, rows [row_begin, row_end), x = logits[row]:
//   row_max = max(x); y = (x - row_max) * inv_temperature; log_sum = log sum exp(y)
//   logp = y[label] - log_sum; entropy = log_sum - sum(exp(y) * y) / sum(exp(y))
// row_max is the raw max (not over T) and log_sum >= 0: the backward recomputes
// log p = y - log_sum from them. Ignored rows (label == ignore_index) get
// logp = entropy = 0; a label outside [0, vocab) gives logp = NaN and is never
// read. `entropy` may be null (not computed). acc_t is float, or double for
// double logits. With min_logit (per row, may be null) the softmax is over the
// kept set x >= min_logit[row] only: row_max is the kept max (-inf when the
// set is empty), a label outside it gets logp = -inf, and the backward's p is
// 0 outside it.
template <typename scalar_t, typename acc_t>
void logprobs_fwd_rows(const scalar_t* logits, RowLayout layout, const int64_t* labels,
                       int64_t vocab, acc_t inv_temperature, int64_t ignore_index,
                       acc_t* logp, acc_t* entropy, acc_t* row_max, acc_t* log_sum,
                       int64_t row_begin, int64_t row_end, const acc_t* min_logit = nullptr);

// Backward, rows [row_begin, row_end), one pass over the row, from the
// forward's row_max and log_sum:
//   log p = (x - row_max) * inv_temperature - log_sum, p = exp(log p)
// (never x * inv_temperature - lse: see chunk_grad in logprobs_chunks.inc)
//   dlogits = inv_temperature * (g_logp * (onehot(label) - p)
//                                - g_entropy * p * (log p + entropy))
// grad_entropy may be null. grad_logits may alias logits (same layout): each
// element is read before it is written.
template <typename scalar_t, typename acc_t>
void logprobs_bwd_rows(const acc_t* grad_logp, const acc_t* grad_entropy,
                       const scalar_t* logits, RowLayout in_layout, const int64_t* labels,
                       const acc_t* row_max, const acc_t* log_sum, const acc_t* entropy,
                       int64_t vocab, acc_t inv_temperature, int64_t ignore_index,
                       scalar_t* grad_logits, RowLayout out_layout, int64_t row_begin,
                       int64_t row_end, const acc_t* min_logit = nullptr);

// The per-row threshold of a sampler's truncation (csrc/ops.cpp
// truncation_threshold): top_k <= 0, top_p >= 1, min_p <= 0 are off.
template <typename scalar_t, typename acc_t>
void truncation_threshold_rows(const scalar_t* logits, RowLayout layout, int64_t vocab, acc_t inv_temperature,
                               int64_t top_k, double top_p, double min_p, bool min_p_first, acc_t* out,
                               int64_t row_begin, int64_t row_end);

// truncation_threshold_rows into min_logit, then logprobs_fwd_rows over each
// row's kept set x >= min_logit[row], the same outputs. The kept set's sums
// come out of the threshold's own passes where they can (float rows: after a
// top-k cut, from its candidates when at most 4096; a threshold set by top-p
// over the whole row, from its level sums): no second read of the row then.
template <typename scalar_t, typename acc_t>
void truncated_fwd_rows(const scalar_t* logits, RowLayout layout, const int64_t* labels, int64_t vocab,
                        acc_t inv_temperature, int64_t ignore_index, int64_t top_k, double top_p, double min_p,
                        bool min_p_first, acc_t* logp, acc_t* entropy, acc_t* row_max, acc_t* log_sum,
                        acc_t* min_logit, int64_t row_begin, int64_t row_end);

}  // namespace rlhf_kernels::cpu

// The torch glue of the logprobs ops (csrc/cpu/logprobs_glue.cpp,
// csrc/cuda/logprobs_glue.cpp): the logits' row layout and its checks, and the
// public ops over a device's row kernels. ppo_loss_from_logits reads its
// logits through the same rows (glue/ppo_loss.h).
#pragma once

#include <torch/types.h>

#include <algorithm>
#include <charconv>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "common.h"
#include "rlhf_kernels/common.h"

namespace rlhf_kernels {

inline int64_t checked_rows(const at::Tensor& logits, const at::Tensor& labels,
                            RowLayout layout) {
  TORCH_CHECK_VALUE(logits.dim() >= 1 && logits.stride(-1) == 1,
                    "logits: the last dimension must be contiguous");
  TORCH_CHECK_VALUE(labels.scalar_type() == at::kLong && labels.is_contiguous(),
                    "labels: expected a contiguous int64 tensor (N = its numel rows)");
  TORCH_CHECK_VALUE(layout.inner_rows >= 1, "inner_rows must be >= 1");
  const int64_t n_rows = labels.numel();
  const int64_t vocab = logits.size(-1);
  TORCH_CHECK_VALUE(vocab >= 1, "logits: the vocabulary dimension V must be >= 1");
  if (n_rows > 0) {
    // The layout must stay inside the tensor's storage.
    // With non-negative strides the farthest row is the last one, or the last
    // row of the previous (complete) outer block.
    int64_t span = layout.offset(n_rows - 1) + vocab;
    const int64_t last_block_start = ((n_rows - 1) / layout.inner_rows) * layout.inner_rows;
    if (last_block_start > 0) span = std::max(span, layout.offset(last_block_start - 1) + vocab);
    const int64_t available =
        static_cast<int64_t>(logits.storage().nbytes() / logits.element_size()) -
        logits.storage_offset();
    TORCH_CHECK_VALUE(layout.outer_stride >= 0 && layout.inner_stride >= 0 && span <= available,
                      "logits: row layout reaches outside the tensor's storage");
  }
  return n_rows;
}

// The logits and the buffer their gradient goes to (same dtype, each inside
// its storage by its layout); returns the number of rows.
inline int64_t checked_grad_rows(const at::Tensor& logits, const at::Tensor& labels,
                                 const at::Tensor& grad_logits, RowLayout in_layout,
                                 RowLayout out_layout) {
  const int64_t n_rows = checked_rows(logits, labels, in_layout);
  checked_rows(grad_logits, labels, out_layout);
  TORCH_CHECK_VALUE(grad_logits.scalar_type() == logits.scalar_type(),
                    "grad_logits: dtype must match logits");
  return n_rows;
}

// Checks of logprobs_bwd_native's arguments; returns the number of rows.
inline int64_t check_logprobs_bwd(const at::Tensor& grad_logp,
                                  const std::optional<at::Tensor>& grad_entropy,
                                  const at::Tensor& logits, const at::Tensor& labels,
                                  const at::Tensor& row_max, const at::Tensor& log_sum,
                                  const std::optional<at::Tensor>& entropy,
                                  const at::Tensor& grad_logits, RowLayout in_layout,
                                  RowLayout out_layout) {
  const int64_t n_rows = checked_grad_rows(logits, labels, grad_logits, in_layout, out_layout);
  const at::ScalarType acc = acc_dtype_for(logits);
  check_row_tensor(grad_logp, n_rows, acc, "grad_logp");
  check_row_tensor(row_max, n_rows, acc, "row_max");
  check_row_tensor(log_sum, n_rows, acc, "log_sum");
  if (grad_entropy) check_row_tensor(*grad_entropy, n_rows, acc, "grad_entropy");
  if (entropy) check_row_tensor(*entropy, n_rows, acc, "entropy");
  return n_rows;
}

// The rows of (..., V) logits as the kernels address them (rlhf_kernels/common.h
// RowLayout): leading dims that collapse to at most two strided dims (any
// slice of a (B, T, V) tensor, e.g. logits[:, :-1]) are read in place; any
// other layout, or a non-contiguous last dim, is copied first.
struct LogitsRows {
  at::Tensor tensor;  // the logits, or their contiguous copy
  RowLayout layout;
};

inline LogitsRows logits_rows(const at::Tensor& logits) {
  at::Tensor t = logits.stride(-1) == 1 ? logits : logits.contiguous();
  int64_t sizes[2], strides[2];
  int dims = 0;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    const int64_t size = t.size(d), stride = t.stride(d);
    if (size == 1) continue;
    if (dims > 0 && strides[dims - 1] == size * stride) {
      sizes[dims - 1] *= size;
      strides[dims - 1] = stride;
    } else if (dims < 2) {
      sizes[dims] = size;
      strides[dims++] = stride;
    } else {
      dims = 3;  // more than two strided dims: copy
      break;
    }
  }
  const int64_t vocab = t.size(-1);
  if (dims == 0) return {t, RowLayout{1, 0, 0}};
  if (dims == 1) return {t, RowLayout{std::max<int64_t>(1, sizes[0]), 0, strides[0]}};
  if (dims == 2) return {t, RowLayout{std::max<int64_t>(1, sizes[1]), strides[0], strides[1]}};
  t = t.contiguous();
  return {t, RowLayout{std::max<int64_t>(1, t.numel() / std::max<int64_t>(vocab, 1)), 0, vocab}};
}

// The layout of a contiguous buffer of the logits' shape, with the same
// inner_rows as `rows` (the kernels index both by one row number).
inline RowLayout contiguous_rows(const LogitsRows& rows, int64_t vocab) {
  return RowLayout{rows.layout.inner_rows, rows.layout.inner_rows * vocab, vocab};
}

// Labels outside [0, V) that are not ignore_index: a ValueError naming them
// (CPU tensors; on a GPU the kernels give NaN instead, never a bad read).
inline void check_labels_in_range(const at::Tensor& labels, int64_t vocab, int64_t ignore_index) {
  const int64_t* l = labels.const_data_ptr<int64_t>();
  for (int64_t i = 0, n = labels.numel(); i < n; ++i) {
    TORCH_CHECK_VALUE(l[i] == ignore_index || (l[i] >= 0 && l[i] < vocab), "labels: value ", l[i],
                      " is outside [0, ", vocab, ") and is not ignore_index");
  }
}

// The public logprobs ops over a device's row kernels (the *_native ops'
// implementations): the row layout and the labels as the kernels read them,
// in C++, so that a call crosses the dispatcher once.
//   fwd(logits, labels, inner_rows, outer, inner, inv_T, ignore_index, entropy, min_logit)
//       -> (logp, entropy, m, log s)
//   bwd(g, g_H, logits, labels, m, log s, H, out, inner_rows, in_outer, in_inner, out_outer, out_inner, inv_T,
//       ignore, min_logit)
//   threshold(logits, inner_rows, outer, inner, inv_T, top_k, top_p, min_p, min_p_first) -> (N,) threshold
using LogprobsFwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t, double, int64_t, bool,
    const std::optional<at::Tensor>&);
using LogprobsBwd = void (*)(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const std::optional<at::Tensor>&, const at::Tensor&, int64_t, int64_t, int64_t,
                             int64_t, int64_t, double, int64_t, const std::optional<at::Tensor>&);
using ThresholdRows = at::Tensor (*)(const at::Tensor&, int64_t, int64_t, int64_t, double, int64_t, double, double,
                                     bool);

// The labels as the kernels read them: contiguous int64 of any shape, row r
// the r-th element (not reshaped: a view per call is host time the kernels
// do not need at a few rows, python -m benchmarks.bench_overhead).
inline at::Tensor flat_labels(const at::Tensor& labels) {
  return labels.scalar_type() == at::kLong && labels.is_contiguous() ? labels : labels.to(at::kLong).contiguous();
}

// A (N,) output the op has just allocated, given the labels' shape in place
// (its own TensorImpl: no view).
inline at::Tensor shaped_like(at::Tensor t, const at::Tensor& labels) {
  if (t.dim() != labels.dim()) t.unsafeGetTensorImpl()->set_sizes_contiguous(labels.sizes());
  return t;
}

// Python's spelling of a shape, a dtype and a float in the messages below,
// so that the native op raises what rlhf_kernels.logprobs_from_logits raises
// for the other backends (rlhf_kernels/ops/logprobs.py).
inline std::string py_shape(c10::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + (sizes.size() == 1 ? ",)" : ")");
}

inline std::string py_dtype(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

inline std::string py_float(double x) {
  char buf[32];
  const auto end = std::to_chars(buf, buf + sizeof(buf), x).ptr;
  std::string out(buf, end);
  if (out.find_first_of(".eni") == std::string::npos) out += ".0";  // not for 1e+20, inf, nan
  return out;
}

// Checked before the dispatcher picks a kernel by the tensors' devices (a
// meta labels tensor would otherwise select the meta kernel).
inline void check_one_device(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK_VALUE(labels.device() == logits.device(), "tensors must be on one device: logits on ",
                    logits.device().str(), ", labels on ", labels.device().str());
}

// The arguments of the public op, checked as logprobs_from_logits checks
// them (ValueError naming the argument): a direct torch.ops call, and the
// eager call of the native backends, which runs no Python checks.
inline void check_logprobs_args(const at::Tensor& logits, const at::Tensor& labels, double temperature) {
  const at::ScalarType dtype = logits.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble,
                    "logits: dtype ", py_dtype(dtype), " is not supported (expected float32, bfloat16, float16, "
                    "float64)");
  TORCH_CHECK_VALUE(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, "labels: dtype ",
                    py_dtype(labels.scalar_type()), " is not supported (expected int64, int32)");
  check_one_device(logits, labels);
  TORCH_CHECK_VALUE(logits.dim() >= 1, "logits: expected shape (..., V) with at least one dimension");
  TORCH_CHECK_VALUE(logits.size(-1) > 0, "logits: the vocabulary dimension V must be > 0");
  const c10::IntArrayRef rows = logits.sizes().slice(0, logits.dim() - 1);
  TORCH_CHECK_VALUE(labels.sizes() == rows, "labels: shape ", py_shape(labels.sizes()),
                    " does not match logits.shape[:-1] ", py_shape(rows));
  TORCH_CHECK_VALUE(temperature > 0 && temperature < std::numeric_limits<double>::infinity(),
                    "temperature: must be a finite number > 0, got ", py_float(temperature));
}

// logp and entropy (empty unless compute_entropy) shaped like labels, row_max and log_sum (N,).
template <LogprobsFwd fwd>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_op(const at::Tensor& logits,
                                                                       const at::Tensor& labels, double temperature,
                                                                       int64_t ignore_index, bool compute_entropy,
                                                                       bool /*inplace_backward: the backward's*/,
                                                                       const std::optional<at::Tensor>& min_logit) {
  check_logprobs_args(logits, labels, temperature);
  const LogitsRows rows = logits_rows(logits);
  const at::Tensor flat = flat_labels(labels);
  if (logits.device().is_cpu()) check_labels_in_range(flat, logits.size(-1), ignore_index);
  auto [logp, entropy, row_max, log_sum] =
      fwd(rows.tensor, flat, rows.layout.inner_rows, rows.layout.outer_stride, rows.layout.inner_stride,
          1.0 / temperature, ignore_index, compute_entropy, min_logit);
  return {shaped_like(std::move(logp), labels), compute_entropy ? shaped_like(std::move(entropy), labels) : entropy,
          row_max, log_sum};
}

// One value broadcast to every element (all strides 0): the gradient of a
// sum() or a mean().
inline bool broadcast_value(const at::Tensor& g) {
  for (int64_t d = 0; d < g.dim(); ++d) {
    if (g.size(d) > 1 && g.stride(d) != 0) return false;
  }
  return true;
}

template <typename acc_t>
at::Tensor filled_rows(const at::Tensor& g) {
  at::Tensor out = at::empty({g.numel()}, g.options());
  std::fill_n(out.mutable_data_ptr<acc_t>(), g.numel(), *g.const_data_ptr<acc_t>());
  return out;
}

// The upstream gradients as the kernels read them: N contiguous values,
// accumulation dtype. A broadcast CPU gradient is filled in directly (its
// strided copy through a TensorIterator costs more than the kernel at a few
// rows: python -m benchmarks.bench_overhead).
inline at::Tensor row_grad(const at::Tensor& g, at::ScalarType acc) {
  if (g.is_cpu() && g.scalar_type() == acc && (acc == at::kFloat || acc == at::kDouble) && g.numel() > 1 &&
      broadcast_value(g)) {
    return acc == at::kDouble ? filled_rows<double>(g) : filled_rows<float>(g);
  }
  return g.scalar_type() == acc && g.is_contiguous() ? g : g.to(acc).contiguous();
}

template <LogprobsBwd bwd>
void logprobs_backward_into(const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                            const LogitsRows& rows, const at::Tensor& labels, const at::Tensor& row_max,
                            const at::Tensor& log_sum, const std::optional<at::Tensor>& entropy,
                            const at::Tensor& out, RowLayout out_layout, double temperature, int64_t ignore_index,
                            const std::optional<at::Tensor>& min_logit) {
  const at::ScalarType acc = row_max.scalar_type();
  std::optional<at::Tensor> g_entropy, h;
  if (grad_entropy) {
    g_entropy = row_grad(*grad_entropy, acc);
    h = *entropy;
  }
  bwd(row_grad(grad_logp, acc), g_entropy, rows.tensor, flat_labels(labels), row_max, log_sum, h, out,
      rows.layout.inner_rows, rows.layout.outer_stride, rows.layout.inner_stride, out_layout.outer_stride,
      out_layout.inner_stride, 1.0 / temperature, ignore_index, min_logit);
}

// The logits gradient, a new (contiguous) tensor.
template <LogprobsBwd bwd>
at::Tensor logprobs_backward_op(const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                                const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& row_max,
                                const at::Tensor& log_sum, const std::optional<at::Tensor>& entropy,
                                double temperature, int64_t ignore_index,
                                const std::optional<at::Tensor>& min_logit) {
  const LogitsRows rows = logits_rows(logits);
  at::Tensor out = at::empty(logits.sizes(), logits.options());
  logprobs_backward_into<bwd>(grad_logp, grad_entropy, rows, labels, row_max, log_sum, entropy, out,
                              contiguous_rows(rows, logits.size(-1)), temperature, ignore_index, min_logit);
  return out;
}

// The logits gradient written over the logits (a layout the kernels cannot
// address in place goes through a buffer, then is copied back).
template <LogprobsBwd bwd>
void logprobs_backward_inplace_op(const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                                  const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& row_max,
                                  const at::Tensor& log_sum, const std::optional<at::Tensor>& entropy,
                                  double temperature, int64_t ignore_index,
                                  const std::optional<at::Tensor>& min_logit) {
  const LogitsRows rows = logits_rows(logits);
  if (rows.tensor.is_same(logits)) {
    logprobs_backward_into<bwd>(grad_logp, grad_entropy, rows, labels, row_max, log_sum, entropy, logits,
                                rows.layout, temperature, ignore_index, min_logit);
  } else {
    at::Tensor grad = logprobs_backward_op<bwd>(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy,
                                                temperature, ignore_index, min_logit);
    const_cast<at::Tensor&>(logits).copy_(grad);
  }
}

// A per-row threshold as the kernels read it: (N,) contiguous, accumulation
// dtype; none (nullptr) keeps every logit.
template <typename acc_t>
const acc_t* threshold_data(const std::optional<at::Tensor>& min_logit, int64_t n_rows, at::ScalarType acc) {
  if (!min_logit) return nullptr;
  check_row_tensor(*min_logit, n_rows, acc, "min_logit");
  return min_logit->const_data_ptr<acc_t>();
}

// A sampler's truncation as the kernels take it (off: 0, 1, 0).
inline void check_truncation_args(int64_t top_k, double top_p, double min_p) {
  TORCH_CHECK_VALUE(top_k >= 0, "top_k: must be >= 0 (0: off)");
  TORCH_CHECK_VALUE(top_p > 0 && top_p <= 1, "top_p: must be in (0, 1] (1: off)");
  TORCH_CHECK_VALUE(min_p >= 0 && min_p <= 1, "min_p: must be in [0, 1] (0: off)");
}

// The public truncation_threshold over a device's row kernel.
template <ThresholdRows threshold>
at::Tensor truncation_threshold_op(const at::Tensor& logits, double temperature, int64_t top_k, double top_p,
                                   double min_p, bool min_p_first) {
  TORCH_CHECK_VALUE(temperature > 0, "temperature: must be > 0");
  check_truncation_args(top_k, top_p, min_p);
  TORCH_CHECK_VALUE(logits.dim() >= 1 && logits.size(-1) >= 1, "logits: expected shape (..., V) with V >= 1");
  const LogitsRows rows = logits_rows(logits);
  return threshold(rows.tensor, rows.layout.inner_rows, rows.layout.outer_stride, rows.layout.inner_stride,
                   1.0 / temperature, top_k, top_p, min_p, min_p_first);
}

}  // namespace rlhf_kernels

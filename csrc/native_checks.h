// Argument checks shared by the CPU and CUDA glue of the native ops.
#pragma once

#include <torch/types.h>

#include "rlhf_kernels/common.h"

namespace rlhf_kernels {

inline int64_t checked_rows(const at::Tensor& logits, const at::Tensor& labels,
                            RowLayout layout) {
  TORCH_CHECK_VALUE(logits.dim() >= 1 && logits.stride(-1) == 1,
                    "logits: the last dimension must be contiguous");
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.scalar_type() == at::kLong &&
                        labels.is_contiguous(),
                    "labels: expected a contiguous (N,) int64 tensor");
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

}  // namespace rlhf_kernels

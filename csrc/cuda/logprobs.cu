// Fused log-probability / entropy of sampled tokens, CUDA.
// One thread block per row streams the row once with 16-byte loads and keeps,
// per thread, the online-softmax state (m, s, t) of Milakov & Gimelshein
// (2018) over the raw logits x: with y = (x - m) * inv_T, s = sum exp(y),
// t = sum exp(y) * y; logp = (x_label - m) * inv_T - log s, entropy =
// log(s) - t / s; m and log s are saved for the backward. Shifting the raw x
// keeps y <= 0 exactly (x * inv_T - m could become a fused multiply-add and
// exceed 0 at the max), so s >= 1, logp <= 0 and entropy >= 0 at any
// temperature. Thread states merge by warp shuffles, then across warps.
// The backward reads the row once more and writes the gradient once.
// With a per-row threshold (min_logit) the row is its kept logits
// x >= min_logit[row] alone: m is their max (-inf when none is kept), s and t
// their sums; a label below the threshold has logp -inf, and the gradient is
// 0 outside the kept set apart from the label's one-hot term.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "logprobs.cuh"
#include "softmax_rows.cuh"

namespace rlhf_kernels::cuda {

using namespace softmax_rows;

namespace {

// A row's kept set: every logit (KeepAll, the kernels without min_logit) or
// x >= min_logit[row].
template <typename Keep, typename acc_t>
__device__ __forceinline__ Keep row_keep(const acc_t* min_logit, int64_t row_index) {
  if constexpr (std::is_same_v<Keep, KeepAll>) {
    return KeepAll{};
  } else {
    return Keep{min_logit[row_index]};
  }
}

template <typename scalar_t, typename acc_t, typename Keep>
__global__ void __launch_bounds__(kThreads)
logprobs_fwd_kernel(const scalar_t* __restrict__ logits, RowLayout layout,
                    const int64_t* __restrict__ labels, int64_t vocab, acc_t inv_temperature,
                    int64_t ignore_index, acc_t* __restrict__ logp, acc_t* __restrict__ entropy,
                    acc_t* __restrict__ row_max, acc_t* __restrict__ log_sum,
                    const acc_t* __restrict__ min_logit) {
  const int64_t row_index = blockIdx.x;
  const scalar_t* row = logits + layout.offset(row_index);
  const Keep keep = row_keep<Keep>(min_logit, row_index);
  const SoftmaxState<acc_t> st = row_softmax_state(row, vocab, inv_temperature, keep);
  if (threadIdx.x == 0) {
    acc_t row_logp, row_entropy, row_log_sum;
    row_outputs(st, row, labels[row_index], vocab, inv_temperature, ignore_index, keep, &row_logp,
                &row_entropy, &row_log_sum);
    row_max[row_index] = kept_max<Keep>(st);
    log_sum[row_index] = row_log_sum;
    logp[row_index] = row_logp;
    if (entropy) entropy[row_index] = row_entropy;
  }
}

template <typename scalar_t, typename acc_t, bool kVectorized, typename Keep>
__global__ void __launch_bounds__(kThreads)
logprobs_bwd_kernel(const acc_t* __restrict__ grad_logp, const acc_t* __restrict__ grad_entropy,
                    const scalar_t* logits, RowLayout in_layout,
                    const int64_t* __restrict__ labels, const acc_t* __restrict__ row_max,
                    const acc_t* __restrict__ log_sum, const acc_t* __restrict__ entropy,
                    int64_t vocab, acc_t inv_temperature, int64_t ignore_index,
                    scalar_t* grad_logits, RowLayout out_layout,
                    const acc_t* __restrict__ min_logit) {
  const int64_t row_index = blockIdx.x;
  const int64_t label = labels[row_index];
  const bool ignored = label == ignore_index;
  const acc_t g = ignored ? acc_t(0) : grad_logp[row_index];
  const acc_t g_entropy = (ignored || grad_entropy == nullptr) ? acc_t(0) : grad_entropy[row_index];
  write_row_grad<scalar_t, acc_t, kVectorized>(
      logits + in_layout.offset(row_index), grad_logits + out_layout.offset(row_index), vocab, label,
      ignore_index, g, g_entropy, row_max[row_index], log_sum[row_index],
      entropy ? entropy[row_index] : acc_t(0), inv_temperature, row_keep<Keep>(min_logit, row_index));
}

// The kernels without a threshold are those before truncation existed: the
// predicate folds away, leaving no per-element select.
template <typename Keep, typename scalar_t, typename acc_t>
void launch_fwd_kernel(const scalar_t* logits, RowLayout layout, const int64_t* labels,
                       int64_t n_rows, int64_t vocab, acc_t inv_temperature, int64_t ignore_index,
                       acc_t* logp, acc_t* entropy, acc_t* row_max, acc_t* log_sum,
                       const acc_t* min_logit, cudaStream_t stream) {
  logprobs_fwd_kernel<scalar_t, acc_t, Keep><<<static_cast<unsigned>(n_rows), kThreads, 0, stream>>>(
      logits, layout, labels, vocab, inv_temperature, ignore_index, logp, entropy, row_max,
      log_sum, min_logit);
}

template <typename Keep, typename scalar_t, typename acc_t>
void launch_bwd_kernel(const acc_t* grad_logp, const acc_t* grad_entropy, const scalar_t* logits,
                       RowLayout in_layout, const int64_t* labels, const acc_t* row_max,
                       const acc_t* log_sum, const acc_t* entropy, int64_t n_rows, int64_t vocab,
                       acc_t inv_temperature, int64_t ignore_index, scalar_t* grad_logits,
                       RowLayout out_layout, const acc_t* min_logit, cudaStream_t stream) {
  // The 16-byte path needs input and output rows to share their alignment.
  const bool vectorized = rows_aligned(logits, in_layout, n_rows, sizeof(scalar_t)) &&
                          rows_aligned(grad_logits, out_layout, n_rows, sizeof(scalar_t));
  const unsigned blocks = static_cast<unsigned>(n_rows);
  if (vectorized) {
    logprobs_bwd_kernel<scalar_t, acc_t, true, Keep><<<blocks, kThreads, 0, stream>>>(
        grad_logp, grad_entropy, logits, in_layout, labels, row_max, log_sum, entropy, vocab,
        inv_temperature, ignore_index, grad_logits, out_layout, min_logit);
  } else {
    logprobs_bwd_kernel<scalar_t, acc_t, false, Keep><<<blocks, kThreads, 0, stream>>>(
        grad_logp, grad_entropy, logits, in_layout, labels, row_max, log_sum, entropy, vocab,
        inv_temperature, ignore_index, grad_logits, out_layout, min_logit);
  }
}

}  // namespace

template <typename scalar_t, typename acc_t>
cudaError_t launch_logprobs_fwd(const scalar_t* logits, RowLayout layout, const int64_t* labels,
                                int64_t n_rows, int64_t vocab, acc_t inv_temperature,
                                int64_t ignore_index, acc_t* logp, acc_t* entropy, acc_t* row_max,
                                acc_t* log_sum, const acc_t* min_logit, cudaStream_t stream) {
  if (n_rows == 0) return cudaSuccess;
  // One block per row, and grid.x is at most 2^31 - 1: refuse more rows
  // rather than let the cast to unsigned wrap (2^32 + 1 rows would run 1 block).
  if (n_rows > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  if (min_logit) {
    launch_fwd_kernel<KeepAtLeast<acc_t>>(logits, layout, labels, n_rows, vocab, inv_temperature,
                                          ignore_index, logp, entropy, row_max, log_sum, min_logit,
                                          stream);
  } else {
    launch_fwd_kernel<KeepAll>(logits, layout, labels, n_rows, vocab, inv_temperature, ignore_index,
                               logp, entropy, row_max, log_sum, min_logit, stream);
  }
  return cudaGetLastError();
}

template <typename scalar_t, typename acc_t>
cudaError_t launch_logprobs_bwd(const acc_t* grad_logp, const acc_t* grad_entropy,
                                const scalar_t* logits, RowLayout in_layout,
                                const int64_t* labels, const acc_t* row_max, const acc_t* log_sum,
                                const acc_t* entropy, int64_t n_rows, int64_t vocab,
                                acc_t inv_temperature, int64_t ignore_index, scalar_t* grad_logits,
                                RowLayout out_layout, const acc_t* min_logit,
                                cudaStream_t stream) {
  if (n_rows == 0) return cudaSuccess;
  if (n_rows > 0x7fffffffLL) return cudaErrorInvalidConfiguration;  // as in the forward
  if (min_logit) {
    launch_bwd_kernel<KeepAtLeast<acc_t>>(grad_logp, grad_entropy, logits, in_layout, labels,
                                          row_max, log_sum, entropy, n_rows, vocab, inv_temperature,
                                          ignore_index, grad_logits, out_layout, min_logit, stream);
  } else {
    launch_bwd_kernel<KeepAll>(grad_logp, grad_entropy, logits, in_layout, labels, row_max, log_sum,
                               entropy, n_rows, vocab, inv_temperature, ignore_index, grad_logits,
                               out_layout, min_logit, stream);
  }
  return cudaGetLastError();
}

#define RLHF_INSTANTIATE(scalar_t, acc_t)                                                       \
  template cudaError_t launch_logprobs_fwd<scalar_t, acc_t>(                                   \
      const scalar_t*, RowLayout, const int64_t*, int64_t, int64_t, acc_t, int64_t, acc_t*,    \
      acc_t*, acc_t*, acc_t*, const acc_t*, cudaStream_t);                                     \
  template cudaError_t launch_logprobs_bwd<scalar_t, acc_t>(                                   \
      const acc_t*, const acc_t*, const scalar_t*, RowLayout, const int64_t*, const acc_t*,    \
      const acc_t*, const acc_t*, int64_t, int64_t, acc_t, int64_t, scalar_t*, RowLayout,      \
      const acc_t*, cudaStream_t);

RLHF_INSTANTIATE(float, float)
RLHF_INSTANTIATE(__half, float)
RLHF_INSTANTIATE(__nv_bfloat16, float)
RLHF_INSTANTIATE(double, double)
#undef RLHF_INSTANTIATE

}  // namespace rlhf_kernels::cuda

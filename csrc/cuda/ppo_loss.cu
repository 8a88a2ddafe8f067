// Fused PPO losses, CUDA: one thread block per 1024-token chunk of a
// sequence. Each thread evaluates the per-token loss and its derivative
// (rlhf_kernels/ppo_math.h, shared with the CPU kernels), writes the
// derivative, and the block reduces its partial statistics by warp shuffles
// then across warps (one write of kPolicyStats values per block).
#include <cmath>

#include "convert.cuh"
#include "ppo_loss.cuh"
#include "softmax_rows.cuh"

namespace rlhf_kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

enum class Reduce { kSum, kMax, kMin };

template <typename acc_t>
__device__ __forceinline__ acc_t combine(acc_t a, acc_t b, Reduce op) {
  switch (op) {
    case Reduce::kMax: return a > b ? a : b;
    case Reduce::kMin: return a < b ? a : b;
    default: return a + b;
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t identity(Reduce op) {
  return op == Reduce::kMax ? acc_t(-INFINITY) : (op == Reduce::kMin ? acc_t(INFINITY) : acc_t(0));
}

// Block-wide reduction of K values per thread; thread 0 writes them to out.
template <typename acc_t, int K>
__device__ __forceinline__ void block_reduce_store(acc_t (&v)[K], const Reduce (&ops)[K], acc_t* out) {
  __shared__ acc_t shared[K][kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
      v[k] = combine(v[k], __shfl_xor_sync(0xffffffffu, v[k], offset), ops[k]);
    if (lane == 0) shared[k][warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      acc_t x = lane < kWarps ? shared[k][lane] : identity<acc_t>(ops[k]);
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1)
        x = combine(x, __shfl_xor_sync(0xffffffffu, x, offset), ops[k]);
      if (lane == 0) out[k] = x;
    }
  }
}

// Token i's weight: its mask byte as 0 / 1, or its weight (ppo_loss.cuh).
template <typename acc_t>
__device__ __forceinline__ acc_t token_weight(const uint8_t* __restrict__ mask,
                                              const acc_t* __restrict__ weight, int64_t i) {
  return weight ? weight[i] : (mask[i] ? acc_t(1) : acc_t(0));
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    ppo_policy_fwd_kernel(const acc_t* __restrict__ logp, const acc_t* __restrict__ old_logp,
                          const acc_t* __restrict__ advantages, const uint8_t* __restrict__ mask,
                          const acc_t* __restrict__ weight, const acc_t* __restrict__ ref_logp,
                          const acc_t* __restrict__ entropy,
                          int64_t seq_len, int64_t chunks, PolicyParams<acc_t> params,
                          acc_t* __restrict__ grad, acc_t* __restrict__ partial) {
  const int64_t block = blockIdx.x;
  const int64_t seq = block / chunks;
  const int64_t start = (block % chunks) * kPpoChunk;
  const int64_t end = start + kPpoChunk < seq_len ? start + kPpoChunk : seq_len;
  acc_t v[kPolicyStats] = {0, 0, 0, 0, 0, acc_t(-INFINITY), acc_t(INFINITY), 0, 0};
  for (int64_t t = start + threadIdx.x; t < end; t += kThreads) {
    const int64_t i = seq * seq_len + t;
    const acc_t w = token_weight(mask, weight, i);
    if (w == acc_t(0)) {
      if (grad) grad[i] = acc_t(0);
      continue;
    }
    const acc_t lp = logp[i], old = old_logp[i];
    const PolicyToken<acc_t> tok =
        policy_token<acc_t>(lp, old, advantages[i], ref_logp ? ref_logp[i] : acc_t(0), params);
    if (grad) grad[i] = w * tok.grad;
    v[kPgLossSum] += w * tok.loss;
    v[kValidCount] += w;
    v[kClipCount] += tok.clipped ? w : acc_t(0);
    v[kDualClipCount] += tok.dual ? w : acc_t(0);
    v[kApproxKlSum] += w * (old - lp);
    v[kRatioMax] = tok.ratio > v[kRatioMax] ? tok.ratio : v[kRatioMax];
    v[kRatioMin] = tok.ratio < v[kRatioMin] ? tok.ratio : v[kRatioMin];
    v[kKlPenaltySum] += w * tok.kl;
    if (entropy) v[kEntropySum] += w * entropy[i];
  }
  constexpr Reduce ops[kPolicyStats] = {Reduce::kSum, Reduce::kSum, Reduce::kSum,
                                        Reduce::kSum, Reduce::kSum, Reduce::kMax,
                                        Reduce::kMin, Reduce::kSum, Reduce::kSum};
  block_reduce_store<acc_t, kPolicyStats>(v, ops, partial + block * kPolicyStats);
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    ppo_value_fwd_kernel(const acc_t* __restrict__ values, const acc_t* __restrict__ old_values,
                         const acc_t* __restrict__ returns, const uint8_t* __restrict__ mask,
                         const acc_t* __restrict__ weight, int64_t seq_len, int64_t chunks, acc_t clip, acc_t* __restrict__ grad,
                         acc_t* __restrict__ partial) {
  const int64_t block = blockIdx.x;
  const int64_t seq = block / chunks;
  const int64_t start = (block % chunks) * kPpoChunk;
  const int64_t end = start + kPpoChunk < seq_len ? start + kPpoChunk : seq_len;
  acc_t v[kValueStats] = {0, 0, 0};
  for (int64_t t = start + threadIdx.x; t < end; t += kThreads) {
    const int64_t i = seq * seq_len + t;
    const acc_t w = token_weight(mask, weight, i);
    if (w == acc_t(0)) {
      if (grad) grad[i] = acc_t(0);
      continue;
    }
    const ValueToken<acc_t> tok = value_token<acc_t>(values[i], old_values[i], returns[i], clip);
    if (grad) grad[i] = w * tok.grad;
    v[kVfLossSum] += w * tok.loss;
    v[kVfValidCount] += w;
    v[kVfClipCount] += tok.clipped ? w : acc_t(0);
  }
  constexpr Reduce ops[kValueStats] = {Reduce::kSum, Reduce::kSum, Reduce::kSum};
  block_reduce_store<acc_t, kValueStats>(v, ops, partial + block * kValueStats);
}

// ppo_sequence_clip: the rows strided over one block's threads twice, the
// counts first (the aggregation's weights need their totals), then each
// sequence (sequence_clip_row, aggregation.h); sums in double, thread 0 writes.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    ppo_sequence_clip_kernel(const acc_t* __restrict__ rows, int64_t seqs, int64_t seq_len, AggParams agg,
                             acc_t ratio_low, acc_t ratio_high, acc_t dual_clip, acc_t* __restrict__ loss,
                             acc_t* __restrict__ coef, acc_t* __restrict__ stats) {
  __shared__ double totals[2];
  double counts[2] = {0, 0};
  for (int64_t b = threadIdx.x; b < seqs; b += kThreads) {
    const double count = rows[b * kPolicyStats + kValidCount];
    counts[0] += count;
    counts[1] += count > 0 ? 1 : 0;
  }
  constexpr Reduce kSums[2] = {Reduce::kSum, Reduce::kSum};
  block_reduce_store<double, 2>(counts, kSums, totals);
  __syncthreads();
  const double total = totals[0], nonempty = totals[1];
  // loss, clipped, dual-clipped, approx_kl, ratio max, ratio min
  double v[6] = {0, 0, 0, 0, -INFINITY, INFINITY};
  for (int64_t b = threadIdx.x; b < seqs; b += kThreads) {
    const acc_t* row = rows + b * kPolicyStats;
    const acc_t w = static_cast<acc_t>(::rlhf_kernels::detail::seq_weight(agg, row[kValidCount], total, nonempty,
                                                                          seq_len));
    const SequenceClip<acc_t> s = sequence_clip_row(row, w, ratio_low, ratio_high, dual_clip);
    coef[b] = s.coef;
    v[0] += s.loss;
    v[1] += s.clips;
    v[2] += s.duals;
    v[3] += row[kApproxKlSum];
    if (row[kValidCount] > 0 && s.ratio == s.ratio) {
      v[4] = s.ratio > v[4] ? s.ratio : v[4];
      v[5] = s.ratio < v[5] ? s.ratio : v[5];
    }
  }
  __shared__ double out[6];
  constexpr Reduce kOps[6] = {Reduce::kSum, Reduce::kSum, Reduce::kSum, Reduce::kSum, Reduce::kMax, Reduce::kMin};
  block_reduce_store<double, 6>(v, kOps, out);
  __syncthreads();
  if (threadIdx.x == 0) {
    *loss = static_cast<acc_t>(out[0]);
    ::rlhf_kernels::detail::write_policy_stats(stats, total, out[1], out[2], out[3], out[4], out[5]);
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    scale_by_sign_kernel(const acc_t* __restrict__ x, const acc_t* __restrict__ pos, const acc_t* __restrict__ neg,
                         int64_t n, int64_t seq_len, acc_t* __restrict__ y) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    const acc_t v = x[i];
    const int64_t r = i / seq_len;
    y[i] = v * (v > acc_t(0) ? pos[r] : neg[r]);
  }
}

}  // namespace

template <typename acc_t>
cudaError_t launch_ppo_sequence_clip(const acc_t* rows, int64_t seqs, int64_t seq_len, AggParams agg,
                                     acc_t ratio_low, acc_t ratio_high, acc_t dual_clip, acc_t* loss, acc_t* coef,
                                     acc_t* stats, cudaStream_t stream) {
  ppo_sequence_clip_kernel<acc_t><<<1, kThreads, 0, stream>>>(rows, seqs, seq_len, agg, ratio_low, ratio_high,
                                                              dual_clip, loss, coef, stats);
  return cudaGetLastError();
}

template <typename acc_t>
cudaError_t launch_scale_by_sign(const acc_t* x, const acc_t* pos, const acc_t* neg, int64_t n, int64_t seq_len,
                                 acc_t* y, cudaStream_t stream) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  constexpr int64_t kMaxBlocks = 65536;  // more elements: each thread strides over the grid
  scale_by_sign_kernel<acc_t><<<static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks), kThreads, 0,
                                 stream>>>(x, pos, neg, n, seq_len, y);
  return cudaGetLastError();
}

template <typename acc_t>
cudaError_t launch_ppo_policy_fwd(const acc_t* logp, const acc_t* old_logp, const acc_t* advantages,
                                  const uint8_t* mask, const acc_t* weight, const acc_t* ref_logp,
                                  const acc_t* entropy, int64_t seqs, int64_t seq_len,
                                  PolicyParams<acc_t> params, acc_t* grad, acc_t* partial,
                                  cudaStream_t stream) {
  const int64_t chunks = ppo_chunks(seq_len);
  const int64_t blocks = seqs * chunks;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  ppo_policy_fwd_kernel<acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      logp, old_logp, advantages, mask, weight, ref_logp, entropy, seq_len, chunks, params, grad,
      partial);
  return cudaGetLastError();
}

template <typename acc_t>
cudaError_t launch_ppo_value_fwd(const acc_t* values, const acc_t* old_values, const acc_t* returns,
                                 const uint8_t* mask, const acc_t* weight, int64_t seqs,
                                 int64_t seq_len, acc_t clip, acc_t* grad, acc_t* partial,
                                 cudaStream_t stream) {
  const int64_t chunks = ppo_chunks(seq_len);
  const int64_t blocks = seqs * chunks;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  ppo_value_fwd_kernel<acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      values, old_values, returns, mask, weight, seq_len, chunks, clip, grad, partial);
  return cudaGetLastError();
}

#define RLHF_INSTANTIATE(acc_t)                                                                   \
  template cudaError_t launch_scale_by_sign<acc_t>(const acc_t*, const acc_t*, const acc_t*, int64_t, int64_t, \
                                                   acc_t*, cudaStream_t);                                   \
  template cudaError_t launch_ppo_sequence_clip<acc_t>(const acc_t*, int64_t, int64_t, AggParams, acc_t, acc_t, \
                                                       acc_t, acc_t*, acc_t*, acc_t*, cudaStream_t);         \
  template cudaError_t launch_ppo_policy_fwd<acc_t>(                                              \
      const acc_t*, const acc_t*, const acc_t*, const uint8_t*, const acc_t*, const acc_t*,       \
      const acc_t*, int64_t, int64_t, PolicyParams<acc_t>, acc_t*, acc_t*, cudaStream_t);         \
  template cudaError_t launch_ppo_value_fwd<acc_t>(const acc_t*, const acc_t*, const acc_t*,      \
                                                   const uint8_t*, const acc_t*, int64_t, int64_t, \
                                                   acc_t, acc_t*, acc_t*, cudaStream_t);
RLHF_INSTANTIATE(float)
RLHF_INSTANTIATE(double)
#undef RLHF_INSTANTIATE

}  // namespace rlhf_kernels::cuda

namespace rlhf_kernels::cuda {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(256) scale_unless_one_kernel(scalar_t* x, const acc_t* scale,
                                                                const acc_t* applied, int64_t n) {
  const acc_t s = *scale / *applied;
  if (s == acc_t(1)) return;  // the usual case: two loads per block, no pass over x
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    x[i] = from_acc<scalar_t>(to_acc(x[i]) * s);
  }
}

// ppo_loss_from_logits with the gradient in the same block, one per row: the
// row's softmax (one read), its token's weighted PPO derivative
// (rlhf_kernels/ppo_math.h, as every thread computes it), then the row's
// gradient: a second read that finds the row in L2, and one write.
template <typename scalar_t, typename acc_t, bool kVectorized>
__global__ void __launch_bounds__(softmax_rows::kThreads)
ppo_logits_grad_kernel(const scalar_t* logits, RowLayout in_layout,
                       const int64_t* __restrict__ labels, const acc_t* __restrict__ old_logp,
                       const acc_t* __restrict__ advantages, const acc_t* __restrict__ row_weight,
                       const acc_t* __restrict__ ref_logp, int64_t n_rows, int64_t vocab,
                       acc_t inv_temperature, int64_t ignore_index, PolicyParams<acc_t> params,
                       acc_t entropy_coef, acc_t* __restrict__ logp, acc_t* __restrict__ entropy,
                       acc_t* __restrict__ row_max, acc_t* __restrict__ log_sum,
                       scalar_t* grad_logits, RowLayout out_layout) {
  // Rows in a grid-stride loop: the grid size bounds the rows in flight, and
  // so the bytes between a row's first read and its second (which should hit L2).
  for (int64_t row_index = blockIdx.x; row_index < n_rows; row_index += gridDim.x) {
    const scalar_t* row = logits + in_layout.offset(row_index);
    const int64_t label = labels[row_index];
    const softmax_rows::SoftmaxState<acc_t> st =
        softmax_rows::row_softmax_state(row, vocab, inv_temperature, softmax_rows::KeepAll{});
    acc_t row_logp, row_entropy, row_log_sum;
    softmax_rows::row_outputs(st, row, label, vocab, inv_temperature, ignore_index,
                              softmax_rows::KeepAll{}, &row_logp, &row_entropy, &row_log_sum);
    if (threadIdx.x == 0) {
      logp[row_index] = row_logp;
      entropy[row_index] = row_entropy;
      row_max[row_index] = st.m;
      log_sum[row_index] = row_log_sum;
    }
    const acc_t w = row_weight[row_index];
    acc_t g = 0, g_entropy = 0;
    if (w != acc_t(0)) {  // a valid token
      const acc_t ref = ref_logp ? ref_logp[row_index] : acc_t(0);
      g = w * policy_token<acc_t>(row_logp, old_logp[row_index], advantages[row_index], ref, params).grad;
      g_entropy = -entropy_coef * w;
    }
    softmax_rows::write_row_grad<scalar_t, acc_t, kVectorized>(
        row, grad_logits + out_layout.offset(row_index), vocab, label, ignore_index, g, g_entropy, st.m,
        row_log_sum, row_entropy, inv_temperature, softmax_rows::KeepAll{});
    __syncthreads();  // block_merge's shared partials are rewritten by the next row
  }
}

}  // namespace

template <typename scalar_t, typename acc_t>
cudaError_t launch_scale_unless_one(scalar_t* x, const acc_t* scale, const acc_t* applied, int64_t n,
                                    cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  // A grid-stride loop over a bounded grid: few blocks to skip when scale == 1.
  const int64_t blocks = (n + 255) / 256;
  scale_unless_one_kernel<scalar_t, acc_t>
      <<<static_cast<unsigned>(blocks < 1024 ? blocks : 1024), 256, 0, stream>>>(x, scale, applied, n);
  return cudaGetLastError();
}

template <typename scalar_t, typename acc_t>
cudaError_t launch_ppo_logits_grad(const scalar_t* logits, RowLayout in_layout, const int64_t* labels,
                                   const acc_t* old_logp, const acc_t* advantages,
                                   const acc_t* row_weight, const acc_t* ref_logp, int64_t n_rows,
                                   int64_t vocab, acc_t inv_temperature, int64_t ignore_index,
                                   PolicyParams<acc_t> params, acc_t entropy_coef, acc_t* logp,
                                   acc_t* entropy, acc_t* row_max, acc_t* log_sum,
                                   scalar_t* grad_logits, RowLayout out_layout, int64_t max_blocks,
                                   cudaStream_t stream) {
  if (n_rows == 0) return cudaSuccess;
  const int64_t grid = max_blocks > 0 && max_blocks < n_rows ? max_blocks : n_rows;
  if (grid > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const bool vectorized =
      softmax_rows::rows_aligned(logits, in_layout, n_rows, sizeof(scalar_t)) &&
      softmax_rows::rows_aligned(grad_logits, out_layout, n_rows, sizeof(scalar_t));
  const unsigned blocks = static_cast<unsigned>(grid);
  if (vectorized) {
    ppo_logits_grad_kernel<scalar_t, acc_t, true><<<blocks, softmax_rows::kThreads, 0, stream>>>(
        logits, in_layout, labels, old_logp, advantages, row_weight, ref_logp, n_rows, vocab,
        inv_temperature, ignore_index, params, entropy_coef, logp, entropy, row_max, log_sum,
        grad_logits, out_layout);
  } else {
    ppo_logits_grad_kernel<scalar_t, acc_t, false><<<blocks, softmax_rows::kThreads, 0, stream>>>(
        logits, in_layout, labels, old_logp, advantages, row_weight, ref_logp, n_rows, vocab,
        inv_temperature, ignore_index, params, entropy_coef, logp, entropy, row_max, log_sum,
        grad_logits, out_layout);
  }
  return cudaGetLastError();
}

#define RLHF_INSTANTIATE(scalar_t, acc_t)                                                       \
  template cudaError_t launch_scale_unless_one<scalar_t, acc_t>(scalar_t*, const acc_t*,        \
                                                                const acc_t*, int64_t,         \
                                                                cudaStream_t);                 \
  template cudaError_t launch_ppo_logits_grad<scalar_t, acc_t>(                                \
      const scalar_t*, RowLayout, const int64_t*, const acc_t*, const acc_t*, const acc_t*,    \
      const acc_t*, int64_t, int64_t, acc_t, int64_t, PolicyParams<acc_t>, acc_t, acc_t*,      \
      acc_t*, acc_t*, acc_t*, scalar_t*, RowLayout, int64_t, cudaStream_t);
RLHF_INSTANTIATE(float, float)
RLHF_INSTANTIATE(double, double)
RLHF_INSTANTIATE(__half, float)
RLHF_INSTANTIATE(__nv_bfloat16, float)
#undef RLHF_INSTANTIATE

}  // namespace rlhf_kernels::cuda

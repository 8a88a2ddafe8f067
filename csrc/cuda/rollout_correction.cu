// rollout_correction, CUDA: one thread block per sequence, the two sweeps of
// rlhf_kernels/rollout_correction_math.h. Sweep 1: each thread accumulates an
// RcRow over its strided tokens (t = threadIdx.x + k * kThreads), a block
// reduction gives the sequence's row, from which every thread derives the
// sequence verdict and log-weight. Sweep 2 (the same tokens again, from
// cache): each token's weight and keep, and per-thread sums reduced into the
// sequence's statistics row. Both reductions are fixed trees (warp shuffles
// down, then the warps in index order), so the results are the same on every
// run and in every thread order (python_tests/ops/test_cuda_emulated.py).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "convert.cuh"
#include "rollout_correction.cuh"

namespace rlhf_kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename A>
__device__ __forceinline__ A mask_value(bool m) {
  return m ? A(1) : A(0);
}
template <typename A>
__device__ __forceinline__ A mask_value(A w) {
  return w;
}

// RcRow's fields, one slot per warp: shared memory is never initialised (nvcc
// warns 20054 on a shared RcRow, whose members have initialisers).
template <typename A>
struct WarpRows {
  A n[kWarps], sum_lr[kWarps], sum_k[3][kWarps], max_k[3][kWarps], sum_abs[kWarps], max_abs[kWarps];
  bool any_valid[kWarps];
};

// Sweep 2's per-thread sums (w * weight, w * out of band, w * rejected) and
// whether a valid token was rejected, one slot per warp.
template <typename A>
struct WarpSums {
  A sum[3][kWarps];
  bool any_rejected[kWarps];
};

template <typename A>
__device__ __forceinline__ RcRow<A> shfl_down_row(const RcRow<A>& r, int offset) {
  RcRow<A> o;
  o.n = __shfl_down_sync(kFullMask, r.n, offset);
  o.sum_lr = __shfl_down_sync(kFullMask, r.sum_lr, offset);
  for (int j = 0; j < 3; ++j) {
    o.sum_k[j] = __shfl_down_sync(kFullMask, r.sum_k[j], offset);
    o.max_k[j] = __shfl_down_sync(kFullMask, r.max_k[j], offset);
  }
  o.sum_abs = __shfl_down_sync(kFullMask, r.sum_abs, offset);
  o.max_abs = __shfl_down_sync(kFullMask, r.max_abs, offset);
  o.any_valid = __shfl_down_sync(kFullMask, static_cast<int>(r.any_valid), offset) != 0;
  return o;
}

template <typename A>
__device__ __forceinline__ void store_row(WarpRows<A>& slots, int w, const RcRow<A>& r) {
  slots.n[w] = r.n;
  slots.sum_lr[w] = r.sum_lr;
  for (int j = 0; j < 3; ++j) {
    slots.sum_k[j][w] = r.sum_k[j];
    slots.max_k[j][w] = r.max_k[j];
  }
  slots.sum_abs[w] = r.sum_abs;
  slots.max_abs[w] = r.max_abs;
  slots.any_valid[w] = r.any_valid;
}

template <typename A>
__device__ __forceinline__ RcRow<A> load_row(const WarpRows<A>& slots, int w) {
  RcRow<A> r;
  r.n = slots.n[w];
  r.sum_lr = slots.sum_lr[w];
  for (int j = 0; j < 3; ++j) {
    r.sum_k[j] = slots.sum_k[j][w];
    r.max_k[j] = slots.max_k[j][w];
  }
  r.sum_abs = slots.sum_abs[w];
  r.max_abs = slots.max_abs[w];
  r.any_valid = slots.any_valid[w];
  return r;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(kFullMask, x, offset);
  return x;
}

template <typename scalar_t, typename acc_t, typename mask_t>
__global__ void __launch_bounds__(kThreads)
    rollout_correction_kernel(const scalar_t* __restrict__ logp, const scalar_t* __restrict__ rollout,
                              const mask_t* __restrict__ mask, const RcParams p, int64_t seq_len,
                              acc_t* __restrict__ weights, bool* __restrict__ keep,
                              acc_t* __restrict__ stats) {
  __shared__ WarpRows<acc_t> warp_rows;
  __shared__ WarpSums<acc_t> warp_sums;

  const int64_t o = static_cast<int64_t>(blockIdx.x) * seq_len;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;

  // Sweep 1: this thread's tokens, then the block's row. Lanes past the end
  // of a shuffle keep their own row; only lane 0's result is used.
  RcRow<acc_t> row;
  rc_row_init(row);
  for (int64_t t = threadIdx.x; t < seq_len; t += kThreads) {
    rc_accumulate(row, to_acc(logp[o + t]) - to_acc(rollout[o + t]), mask_value<acc_t>(mask[o + t]));
  }
  for (int offset = 16; offset > 0; offset >>= 1) rc_combine(row, shfl_down_row(row, offset));
  if (lane == 0) store_row(warp_rows, warp, row);
  __syncthreads();
  // Every thread combines the warps in index order: one result, no second barrier.
  RcRow<acc_t> total = load_row(warp_rows, 0);
  for (int w = 1; w < kWarps; ++w) rc_combine(total, load_row(warp_rows, w));
  const bool seq_keep = rc_sequence_keep(total, p);
  const acc_t seq_log_weight = rc_sequence_log_weight(total, p);

  // Sweep 2: each token's weight and verdict.
  acc_t sums[3] = {0, 0, 0};  // w * weight, w * [out of band], w * [rejected]
  bool any_rejected = false;
  for (int64_t t = threadIdx.x; t < seq_len; t += kThreads) {
    const acc_t w = mask_value<acc_t>(mask[o + t]);
    const RcToken<acc_t> tok =
        rc_token(to_acc(logp[o + t]) - to_acc(rollout[o + t]), w, seq_keep, seq_log_weight, p);
    weights[o + t] = tok.weight;
    keep[o + t] = tok.keep;
    if (w != acc_t(0)) {
      sums[0] += w * tok.weight;
      sums[1] += tok.out_of_band ? w : acc_t(0);
      sums[2] += tok.keep ? acc_t(0) : w;
      any_rejected = any_rejected || !tok.keep;
    }
  }
  for (int j = 0; j < 3; ++j) {
    const acc_t s = warp_sum(sums[j]);
    if (lane == 0) warp_sums.sum[j][warp] = s;
  }
  int warp_any = any_rejected ? 1 : 0;
  for (int offset = 16; offset > 0; offset >>= 1) warp_any |= __shfl_down_sync(kFullMask, warp_any, offset);
  if (lane == 0) warp_sums.any_rejected[warp] = warp_any != 0;
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t s[3] = {0, 0, 0};
    bool any = false;
    for (int w = 0; w < kWarps; ++w) {
      for (int j = 0; j < 3; ++j) s[j] += warp_sums.sum[j][w];
      any = any || warp_sums.any_rejected[w];
    }
    rc_row_stats(total, s[0], s[1], s[2], any, stats + static_cast<int64_t>(blockIdx.x) * kRcStatColumns);
  }
}

}  // namespace

template <typename scalar_t, typename acc_t, typename mask_t>
cudaError_t launch_rollout_correction(const scalar_t* logp, const scalar_t* rollout_logp, const mask_t* mask,
                                      const RcParams& params, int64_t num_seqs, int64_t seq_len,
                                      acc_t* weights, bool* keep, acc_t* stats, cudaStream_t stream) {
  if (num_seqs == 0) return cudaSuccess;
  if (num_seqs < 0 || num_seqs > 0x7fffffff || seq_len < 0) return cudaErrorInvalidConfiguration;
  rollout_correction_kernel<scalar_t, acc_t, mask_t><<<static_cast<unsigned>(num_seqs), kThreads, 0, stream>>>(
      logp, rollout_logp, mask, params, seq_len, weights, keep, stats);
  return cudaGetLastError();
}

#define RLHF_INSTANTIATE(scalar_t, acc_t, mask_t)                                                          \
  template cudaError_t launch_rollout_correction<scalar_t, acc_t, mask_t>(                                 \
      const scalar_t*, const scalar_t*, const mask_t*, const RcParams&, int64_t, int64_t, acc_t*, bool*, \
      acc_t*, cudaStream_t);

RLHF_INSTANTIATE(float, float, bool)
RLHF_INSTANTIATE(float, float, float)
RLHF_INSTANTIATE(double, double, bool)
RLHF_INSTANTIATE(double, double, double)
RLHF_INSTANTIATE(__half, float, bool)
RLHF_INSTANTIATE(__half, float, float)
RLHF_INSTANTIATE(__nv_bfloat16, float, bool)
RLHF_INSTANTIATE(__nv_bfloat16, float, float)
#undef RLHF_INSTANTIATE

}  // namespace rlhf_kernels::cuda

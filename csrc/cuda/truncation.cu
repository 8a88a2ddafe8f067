// The kept set of a sampler's truncation as a per-row threshold, CUDA
// (csrc/ops.cpp truncation_threshold). With m the row max and
// mass(S) = sum_{x in S} exp((x - m) * inv_T), every step is a threshold on
// the raw logits x:
//   t_m = m + log(min_p) / inv_T       (q >= min_p * q_max)
//   t_k = the k-th largest x of the current set C (ties at it kept)
//   t_p = the largest x of C with mass({x' in C : x' >= x}) >= top_p * mass(C)
//         (a tie group at the boundary kept whole)
// in transformers' order (t_k on the row, t_p on {x >= t_k}, t_m) or vLLM's
// (t_m, t_k on {x >= t_m}, t_p on {x >= max(t_m, t_k)}); the threshold is the
// largest of them (-inf for a step that is off).
//
// One thread block per row. Selection is exact, by bisection over the
// order-preserving unsigned key of the accumulation type (B = 32 bits for
// float, 64 for double): from the top bit down, the largest key t whose count
// (top-k) or mass (top-p) over the keys >= t in C is still enough; that t is
// an element's key. Each count or mass is one read of the row by the block.
// Reads of the row:
//   1          the max m (and NaN)
//   + 1        |C| for top-k after min-p (vLLM's order, min_p > 0, top_k > 0)
//   + B        top-k, when 0 < top_k < |C|
//   + 1 + B    top-p (mass(C), then the bisection), when top_p < 1
// at most 3 + 2B: 67 for float, half and bfloat16 logits, 131 for double.
// Each thread adds its elements in one fixed order and the block reduces them
// in one fixed tree, so the computed mass over keys >= t never increases with
// t: the bisection is exact for the masses it computes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstring>

#include "softmax_rows.cuh"
#include "truncation.cuh"

namespace rlhf_kernels::cuda {

using softmax_rows::aligned_head;
using softmax_rows::kThreads;
using softmax_rows::kWarps;
using softmax_rows::Pack;

namespace {

template <typename acc_t>
struct OrderKey;
template <>
struct OrderKey<float> {
  using type = unsigned int;
  static constexpr int kBits = 32;
};
template <>
struct OrderKey<double> {
  using type = unsigned long long;
  static constexpr int kBits = 64;
};

// The unsigned integer whose order is the order of the (non-NaN) values:
// the sign bit set for x >= 0, every bit flipped for x < 0; -0 maps as +0.
template <typename acc_t>
__device__ __forceinline__ typename OrderKey<acc_t>::type order_key(acc_t x) {
  using key_t = typename OrderKey<acc_t>::type;
  constexpr key_t kSign = key_t(1) << (OrderKey<acc_t>::kBits - 1);
  if (x == acc_t(0)) x = acc_t(0);
  key_t bits;
  memcpy(&bits, &x, sizeof(bits));
  return (bits & kSign) ? ~bits : (bits | kSign);
}

// The value of a key (order_key's inverse).
template <typename acc_t>
__device__ __forceinline__ acc_t key_value(typename OrderKey<acc_t>::type key) {
  using key_t = typename OrderKey<acc_t>::type;
  constexpr key_t kSign = key_t(1) << (OrderKey<acc_t>::kBits - 1);
  const key_t bits = (key & kSign) ? (key ^ kSign) : ~key;
  acc_t x;
  memcpy(&x, &bits, sizeof(x));
  return x;
}

__device__ __forceinline__ float precise_exp(float x) { return expf(x); }
__device__ __forceinline__ double precise_exp(double x) { return exp(x); }
__device__ __forceinline__ float precise_log(float x) { return logf(x); }
__device__ __forceinline__ double precise_log(double x) { return log(x); }

// max(a, b), NaN if either is NaN.
template <typename acc_t>
__device__ __forceinline__ acc_t nan_max(acc_t a, acc_t b) {
  return (a > b || a != a) ? a : b;
}

// f(x) for this thread's logits of the row (acc_t), always in the same order:
// the scalar head and tail, then the 16-byte packs (as row_softmax_state).
template <typename scalar_t, typename F>
__device__ __forceinline__ void for_each_logit(const scalar_t* row, int64_t vocab, F&& f) {
  constexpr int kPack = Pack<scalar_t>::kSize;
  const int64_t head = aligned_head(row, vocab);
  const int64_t n_packs = (vocab - head) / kPack;
  const int64_t body_end = head + n_packs * kPack;
  for (int64_t j = threadIdx.x; j < head + (vocab - body_end); j += kThreads) {
    const int64_t col = j < head ? j : body_end + (j - head);
    f(to_acc(row[col]));
  }
  const Pack<scalar_t>* packs = reinterpret_cast<const Pack<scalar_t>*>(row + head);
  for (int64_t p = threadIdx.x; p < n_packs; p += kThreads) {
    const Pack<scalar_t> pack = packs[p];
#pragma unroll
    for (int k = 0; k < kPack; ++k) f(to_acc(pack.v[k]));
  }
}

// The block's sum of v (a fixed tree: warp shuffles, then the warps in
// order), returned to every thread.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T partial[kWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  T total = partial[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) total += partial[w];
  __syncthreads();  // partial is rewritten by the next reduction
  return total;
}

// The block's max of v, NaN if any is NaN, returned to every thread.
template <typename acc_t>
__device__ __forceinline__ acc_t block_max(acc_t v) {
  __shared__ acc_t partial[kWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  acc_t total = partial[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) total = nan_max(total, partial[w]);
  __syncthreads();
  return total;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
truncation_threshold_kernel(const scalar_t* __restrict__ logits, RowLayout layout, int64_t vocab,
                            acc_t inv_temperature, int64_t top_k, acc_t top_p, acc_t min_p,
                            bool min_p_first, acc_t* __restrict__ out) {
  using key_t = typename OrderKey<acc_t>::type;
  constexpr int kBits = OrderKey<acc_t>::kBits;
  const acc_t neg_inf = -INFINITY;
  const int64_t row_index = blockIdx.x;
  const scalar_t* row = logits + layout.offset(row_index);

  acc_t m = neg_inf;
  for_each_logit(row, vocab, [&](acc_t x) { m = nan_max(m, x); });
  m = block_max(m);
  // A NaN row has no threshold; an all -inf row keeps every logit.
  if (m != m || m == neg_inf) {
    if (threadIdx.x == 0) out[row_index] = m;
    return;
  }

  const acc_t t_m = min_p > acc_t(0) ? m + precise_log(min_p) / inv_temperature : neg_inf;
  // The current set C is {x >= lo}.
  acc_t lo = min_p_first ? t_m : neg_inf;

  acc_t t_k = neg_inf;
  if (top_k > 0 && top_k < vocab) {
    long long size = vocab;
    if (lo != neg_inf) {
      long long n = 0;
      for_each_logit(row, vocab, [&](acc_t x) { n += x >= lo ? 1 : 0; });
      size = block_sum(n);
    }
    if (top_k < size) {
      key_t t = 0;
      for (int bit = kBits - 1; bit >= 0; --bit) {
        const key_t candidate = t | (key_t(1) << bit);
        long long n = 0;
        for_each_logit(row, vocab, [&](acc_t x) { n += (x >= lo && order_key(x) >= candidate) ? 1 : 0; });
        if (block_sum(n) >= top_k) t = candidate;
      }
      t_k = key_value<acc_t>(t);
    }
  }
  lo = t_k > lo ? t_k : lo;

  acc_t t_p = neg_inf;
  if (top_p < acc_t(1)) {
    auto mass = [&](key_t candidate) {
      acc_t s = 0;
      for_each_logit(row, vocab, [&](acc_t x) {
        s += (x >= lo && order_key(x) >= candidate) ? precise_exp((x - m) * inv_temperature) : acc_t(0);
      });
      return block_sum(s);
    };
    const acc_t target = top_p * mass(0);
    key_t t = 0;
    for (int bit = kBits - 1; bit >= 0; --bit) {
      const key_t candidate = t | (key_t(1) << bit);
      if (mass(candidate) >= target) t = candidate;
    }
    t_p = key_value<acc_t>(t);
  }

  acc_t thr = t_k > t_m ? t_k : t_m;
  thr = t_p > thr ? t_p : thr;
  if (threadIdx.x == 0) out[row_index] = thr;
}

}  // namespace

template <typename scalar_t, typename acc_t>
cudaError_t launch_truncation_threshold(const scalar_t* logits, RowLayout layout, int64_t n_rows,
                                        int64_t vocab, acc_t inv_temperature, int64_t top_k,
                                        acc_t top_p, acc_t min_p, bool min_p_first, acc_t* out,
                                        cudaStream_t stream) {
  if (n_rows == 0) return cudaSuccess;
  // One block per row; grid.x is at most 2^31 - 1.
  if (n_rows > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  truncation_threshold_kernel<scalar_t, acc_t><<<static_cast<unsigned>(n_rows), kThreads, 0, stream>>>(
      logits, layout, vocab, inv_temperature, top_k, top_p, min_p, min_p_first, out);
  return cudaGetLastError();
}

#define RLHF_INSTANTIATE(scalar_t, acc_t)                                                        \
  template cudaError_t launch_truncation_threshold<scalar_t, acc_t>(                            \
      const scalar_t*, RowLayout, int64_t, int64_t, acc_t, int64_t, acc_t, acc_t, bool, acc_t*, \
      cudaStream_t);

RLHF_INSTANTIATE(float, float)
RLHF_INSTANTIATE(__half, float)
RLHF_INSTANTIATE(__nv_bfloat16, float)
RLHF_INSTANTIATE(double, double)
#undef RLHF_INSTANTIATE

}  // namespace rlhf_kernels::cuda

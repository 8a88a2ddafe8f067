// Device helpers of the row kernels that read a row of logits with the online
// softmax and write its gradient: the logprobs kernels (logprobs.cu) and the
// fused PPO logits gradient (ppo_loss.cu). The method is described at the top
// of logprobs.cu. Each helper takes the row's kept set as a predicate on the
// logit (KeepAll, or KeepAtLeast: a truncated sampler's set); the softmax,
// its sums and the gradient are those of the kept logits alone.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "convert.cuh"
#include "rlhf_kernels/common.h"

namespace rlhf_kernels::cuda::softmax_rows {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kVecBytes = 16;
// exp underflows below this; clamping keeps 0 * (-inf) out of t.
constexpr float kMinExpArg = -87.3f;

// max(y, kMinExpArg), keeping NaN.
template <typename acc_t>
__device__ __forceinline__ acc_t clamp_exp_arg(acc_t y) {
  return y < acc_t(kMinExpArg) ? acc_t(kMinExpArg) : y;
}

__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }
__device__ __forceinline__ float fast_log(float x) { return __logf(x); }
__device__ __forceinline__ double fast_log(double x) { return log(x); }

template <typename acc_t>
struct SoftmaxState {
  acc_t m, s, t;
};

template <typename acc_t>
__device__ __forceinline__ acc_t lowest() {
  return std::is_same_v<acc_t, float> ? -FLT_MAX : -DBL_MAX;
}

// Every logit is kept: the untruncated rows (the predicate folds away).
struct KeepAll {
  template <typename acc_t>
  __device__ __forceinline__ bool operator()(acc_t) const {
    return true;
  }
};

// The logits x >= thr are kept, compared in acc_t (none for a NaN thr); a NaN
// logit is kept too, so that it makes its row NaN as without a threshold.
// thr = -inf keeps every logit, with the same arithmetic as KeepAll.
template <typename acc_t>
struct KeepAtLeast {
  acc_t thr;
  __device__ __forceinline__ bool operator()(acc_t x) const { return x >= thr || x != x; }
};

// (m1, s1, t1) + (m2, s2, t2) with both sums re-expressed at the larger max.
// An empty state (s = 0) contributes nothing, even with m = -inf; a NaN one
// (a NaN logit) makes the result NaN.
template <typename acc_t>
__device__ __forceinline__ SoftmaxState<acc_t> merge(SoftmaxState<acc_t> a, SoftmaxState<acc_t> b,
                                                     acc_t inv_temperature) {
  const acc_t m = a.m > b.m ? a.m : b.m;
  const acc_t da = clamp_exp_arg((a.m - m) * inv_temperature);
  const acc_t db = clamp_exp_arg((b.m - m) * inv_temperature);
  const acc_t ea = a.s != 0 ? fast_exp(da) : acc_t(0);
  const acc_t eb = b.s != 0 ? fast_exp(db) : acc_t(0);
  SoftmaxState<acc_t> r;
  r.m = m;
  r.s = ea * a.s + eb * b.s;
  r.t = (a.s != 0 ? ea * (a.t + da * a.s) : acc_t(0)) + (b.s != 0 ? eb * (b.t + db * b.s) : acc_t(0));
  return r;
}

// Add the kept ones of n raw logits to a thread's state. The state's max is
// that of kept logits only (a pack with none kept leaves it as it is); a
// logit that is not kept adds nothing, by a select (its y may be +inf when
// the state is still empty, and 0 * inf is NaN).
template <typename acc_t, int N, typename Keep>
__device__ __forceinline__ void accumulate(SoftmaxState<acc_t>& st, const acc_t (&x)[N],
                                           acc_t inv_temperature, Keep keep) {
  acc_t local = keep(x[0]) ? x[0] : lowest<acc_t>();
#pragma unroll
  for (int k = 1; k < N; ++k) local = keep(x[k]) && x[k] > local ? x[k] : local;
  if (local > st.m) {
    const acc_t d = clamp_exp_arg((st.m - local) * inv_temperature), a = fast_exp(d);
    st.t = st.s != 0 ? a * (st.t + d * st.s) : acc_t(0);
    st.s = a * st.s;
    st.m = local;
  }
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const acc_t y = clamp_exp_arg((x[k] - st.m) * inv_temperature);
    const acc_t e = fast_exp(y);
    const bool kept = keep(x[k]);
    st.s += kept ? e : acc_t(0);
    st.t += kept ? e * y : acc_t(0);
  }
}

template <typename acc_t>
__device__ SoftmaxState<acc_t> block_merge(SoftmaxState<acc_t> st, acc_t inv_temperature) {
  __shared__ SoftmaxState<acc_t> partial[kWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    SoftmaxState<acc_t> other;
    other.m = __shfl_xor_sync(0xffffffffu, st.m, offset);
    other.s = __shfl_xor_sync(0xffffffffu, st.s, offset);
    other.t = __shfl_xor_sync(0xffffffffu, st.t, offset);
    st = merge(st, other, inv_temperature);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = st;
  __syncthreads();
  st = partial[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) st = merge(st, partial[w], inv_temperature);
  return st;
}

template <typename scalar_t>
struct alignas(kVecBytes) Pack {
  static constexpr int kSize = kVecBytes / sizeof(scalar_t);
  scalar_t v[kSize];
};

// Elements before the first 16-byte boundary of a row (rows of a strided or
// odd-V tensor start at any element).
template <typename scalar_t>
__device__ __forceinline__ int64_t aligned_head(const scalar_t* row, int64_t vocab) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(row);
  int64_t head = static_cast<int64_t>(((kVecBytes - (addr % kVecBytes)) % kVecBytes) / sizeof(scalar_t));
  if (addr % sizeof(scalar_t) != 0) head = vocab;  // never: torch aligns elements
  return head < vocab ? head : vocab;
}

// One read of a row by the whole block: the merged (m, s, t) of its kept
// logits (s = 0 and m = lowest when none is kept).
template <typename scalar_t, typename acc_t, typename Keep>
__device__ SoftmaxState<acc_t> row_softmax_state(const scalar_t* row, int64_t vocab,
                                                 acc_t inv_temperature, Keep keep) {
  constexpr int kPack = Pack<scalar_t>::kSize;
  SoftmaxState<acc_t> st{lowest<acc_t>(), acc_t(0), acc_t(0)};
  const int64_t head = aligned_head(row, vocab);
  const int64_t n_packs = (vocab - head) / kPack;
  const int64_t body_end = head + n_packs * kPack;
  // Scalar head and tail, then the 16-byte body.
  for (int64_t j = threadIdx.x; j < head + (vocab - body_end); j += kThreads) {
    const int64_t col = j < head ? j : body_end + (j - head);
    acc_t x[1] = {to_acc(row[col])};
    accumulate(st, x, inv_temperature, keep);
  }
  const Pack<scalar_t>* packs = reinterpret_cast<const Pack<scalar_t>*>(row + head);
  for (int64_t p = threadIdx.x; p < n_packs; p += kThreads) {
    const Pack<scalar_t> pack = packs[p];
    acc_t x[kPack];
#pragma unroll
    for (int k = 0; k < kPack; ++k) x[k] = to_acc(pack.v[k]);
    accumulate(st, x, inv_temperature, keep);
  }
  return block_merge(st, inv_temperature);
}

// The max of a row's kept logits from its merged state: -inf when none is
// kept (s = 0, which KeepAll never has).
template <typename Keep, typename acc_t>
__device__ __forceinline__ acc_t kept_max(const SoftmaxState<acc_t>& st) {
  if constexpr (std::is_same_v<Keep, KeepAll>) {
    return st.m;
  } else {
    return st.s != acc_t(0) ? st.m : acc_t(-INFINITY);
  }
}

// logp of the label (0 if ignored; NaN if out of range, a label never read;
// -inf if not kept) and entropy (0 if ignored; NaN, 0 / 0, when no logit is
// kept) from a row's merged state; also returns log s.
template <typename scalar_t, typename acc_t, typename Keep>
__device__ __forceinline__ void row_outputs(const SoftmaxState<acc_t>& st, const scalar_t* row,
                                            int64_t label, int64_t vocab, acc_t inv_temperature,
                                            int64_t ignore_index, Keep keep, acc_t* logp,
                                            acc_t* entropy, acc_t* log_sum) {
  // s >= 1 when a logit is kept: an approximate log must not go below 0
  // (logp <= 0, entropy >= 0); an empty kept set (s = 0) gives 0 too.
  acc_t log_s = fast_log(st.s);
  log_s = log_s < acc_t(0) ? acc_t(0) : log_s;
  *log_sum = log_s;
  if (label == ignore_index) {
    *logp = 0;
    *entropy = 0;
  } else {
    if (label >= 0 && label < vocab) {
      const acc_t x = to_acc(row[label]);
      *logp = keep(x) ? (x - st.m) * inv_temperature - log_s : acc_t(-INFINITY);
    } else {
      *logp = acc_t(NAN);
    }
    *entropy = log_s - st.t / st.s;
  }
}

// One read of a row and one write of its gradient, by the whole block:
// dlogits = inv_T * (g * (onehot(label) - p) - g_entropy * p * (log p + H)),
// log p = (x - m) * inv_T - log s from the row's raw max m and log s. The
// shift comes first for float32 accuracy at any |x| / T: x - m is exact near
// the max (Sterbenz: x within a factor 2 of m), else one rounding of a value
// of size |x - m|. As x * inv_T - lse (lse = m * inv_T + log s) two values of
// size |x| / T would cancel, each rounded by up to half its ulp: ~5e-4
// absolute in log p at |x| / T ~ 1e4, and so relative in p.
// A logit that is not kept gets p = 0 by a select, never exp(y) * 0 (its y is
// +inf when the kept set is empty, m = -inf), and so only the label's
// one-hot term.
// No __restrict__ on row / out_row: they alias in the in-place case.
template <typename scalar_t, typename acc_t, bool kVectorized, typename Keep>
__device__ __forceinline__ void write_row_grad(const scalar_t* row, scalar_t* out_row, int64_t vocab,
                                               int64_t label, int64_t ignore_index, acc_t g,
                                               acc_t g_entropy, acc_t row_max, acc_t row_log_sum,
                                               acc_t row_entropy, acc_t inv_temperature, Keep keep) {
  constexpr int kPack = kVectorized ? Pack<scalar_t>::kSize : 1;
  const bool ignored = label == ignore_index;
  const bool bad_label = !ignored && !(label >= 0 && label < vocab);
  if (ignored) g = g_entropy = acc_t(0);
  const bool zero_row = ignored || bad_label;

  auto grad_at = [&](acc_t xv, int64_t col) -> acc_t {
    // The fill is chosen here rather than held in a register: the float64
    // fused kernel is at ptxas's 64-register budget on sm_90a (it spilled).
    if (zero_row) return bad_label ? acc_t(NAN) : acc_t(0);
    acc_t d = 0;
    if (keep(xv)) {
      const acc_t y = clamp_exp_arg((xv - row_max) * inv_temperature - row_log_sum);
      const acc_t p = fast_exp(y);
      d = -inv_temperature * p * (g + g_entropy * (y + row_entropy));
    }
    if (col == label) d += inv_temperature * g;
    return d;
  };
  auto store = [](scalar_t* dst, acc_t v) { *dst = from_acc<scalar_t>(v); };

  const int64_t head = kVectorized ? aligned_head(row, vocab) : vocab;
  const int64_t n_packs = (vocab - head) / kPack;
  const int64_t body_end = head + n_packs * kPack;
  for (int64_t j = threadIdx.x; j < head + (vocab - body_end); j += kThreads) {
    const int64_t col = j < head ? j : body_end + (j - head);
    store(out_row + col, grad_at(to_acc(row[col]), col));
  }
  if constexpr (kVectorized) {
    const Pack<scalar_t>* in_packs = reinterpret_cast<const Pack<scalar_t>*>(row + head);
    Pack<scalar_t>* out_packs = reinterpret_cast<Pack<scalar_t>*>(out_row + head);
    for (int64_t p = threadIdx.x; p < n_packs; p += kThreads) {
      const Pack<scalar_t> pack = in_packs[p];
      Pack<scalar_t> out;
#pragma unroll
      for (int k = 0; k < kPack; ++k) {
        const int64_t col = head + p * kPack + k;
        store(&out.v[k], grad_at(to_acc(pack.v[k]), col));
      }
      out_packs[p] = out;
    }
  }
}

inline bool rows_aligned(const void* base, RowLayout layout, int64_t n_rows, size_t elem) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(base);
  const bool strides_ok = n_rows <= 1 || ((layout.inner_stride * elem) % kVecBytes == 0 &&
                                          (layout.outer_stride * elem) % kVecBytes == 0);
  return addr % kVecBytes == 0 && strides_ok;
}

}  // namespace rlhf_kernels::cuda::softmax_rows

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
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cmath>
#include <type_traits>

#include "convert.cuh"
#include "logprobs.cuh"

namespace rlhf_kernels::cuda {
namespace {

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

// Add n raw logits to a thread's state.
template <typename acc_t, int N>
__device__ __forceinline__ void accumulate(SoftmaxState<acc_t>& st, const acc_t (&x)[N],
                                           acc_t inv_temperature) {
  acc_t local = x[0];
#pragma unroll
  for (int k = 1; k < N; ++k) local = x[k] > local ? x[k] : local;
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
    st.s += e;
    st.t += e * y;
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

// One read of a row by the whole block: its merged (m, s, t).
template <typename scalar_t, typename acc_t>
__device__ SoftmaxState<acc_t> row_softmax_state(const scalar_t* row, int64_t vocab,
                                                 acc_t inv_temperature) {
  constexpr int kPack = Pack<scalar_t>::kSize;
  SoftmaxState<acc_t> st{lowest<acc_t>(), acc_t(0), acc_t(0)};
  const int64_t head = aligned_head(row, vocab);
  const int64_t n_packs = (vocab - head) / kPack;
  const int64_t body_end = head + n_packs * kPack;
  // Scalar head and tail, then the 16-byte body.
  for (int64_t j = threadIdx.x; j < head + (vocab - body_end); j += kThreads) {
    const int64_t col = j < head ? j : body_end + (j - head);
    acc_t x[1] = {to_acc(row[col])};
    accumulate(st, x, inv_temperature);
  }
  const Pack<scalar_t>* packs = reinterpret_cast<const Pack<scalar_t>*>(row + head);
  for (int64_t p = threadIdx.x; p < n_packs; p += kThreads) {
    const Pack<scalar_t> pack = packs[p];
    acc_t x[kPack];
#pragma unroll
    for (int k = 0; k < kPack; ++k) x[k] = to_acc(pack.v[k]);
    accumulate(st, x, inv_temperature);
  }
  return block_merge(st, inv_temperature);
}

// logp of the label (0 if ignored, NaN if out of range: never read) and
// entropy (0 if ignored) from a row's merged state; also returns log s.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void row_outputs(const SoftmaxState<acc_t>& st, const scalar_t* row,
                                            int64_t label, int64_t vocab, acc_t inv_temperature,
                                            int64_t ignore_index, acc_t* logp, acc_t* entropy,
                                            acc_t* log_sum) {
  // s >= 1: an approximate log must not go below 0 (logp <= 0, entropy >= 0).
  acc_t log_s = fast_log(st.s);
  log_s = log_s < acc_t(0) ? acc_t(0) : log_s;
  *log_sum = log_s;
  if (label == ignore_index) {
    *logp = 0;
    *entropy = 0;
  } else {
    *logp = (label >= 0 && label < vocab) ? (to_acc(row[label]) - st.m) * inv_temperature - log_s
                                          : acc_t(NAN);
    *entropy = log_s - st.t / st.s;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
logprobs_fwd_kernel(const scalar_t* __restrict__ logits, RowLayout layout,
                    const int64_t* __restrict__ labels, int64_t vocab, acc_t inv_temperature,
                    int64_t ignore_index, acc_t* __restrict__ logp, acc_t* __restrict__ entropy,
                    acc_t* __restrict__ row_max, acc_t* __restrict__ log_sum) {
  const int64_t row_index = blockIdx.x;
  const scalar_t* row = logits + layout.offset(row_index);
  const SoftmaxState<acc_t> st = row_softmax_state(row, vocab, inv_temperature);
  if (threadIdx.x == 0) {
    acc_t row_logp, row_entropy, row_log_sum;
    row_outputs(st, row, labels[row_index], vocab, inv_temperature, ignore_index, &row_logp,
                &row_entropy, &row_log_sum);
    row_max[row_index] = st.m;
    log_sum[row_index] = row_log_sum;
    logp[row_index] = row_logp;
    if (entropy) entropy[row_index] = row_entropy;
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
// No __restrict__ on row / out_row: they alias in the in-place case.
template <typename scalar_t, typename acc_t, bool kVectorized>
__device__ __forceinline__ void write_row_grad(const scalar_t* row, scalar_t* out_row, int64_t vocab,
                                               int64_t label, int64_t ignore_index, acc_t g,
                                               acc_t g_entropy, acc_t row_max, acc_t row_log_sum,
                                               acc_t row_entropy, acc_t inv_temperature) {
  constexpr int kPack = kVectorized ? Pack<scalar_t>::kSize : 1;
  const bool ignored = label == ignore_index;
  const bool bad_label = !ignored && !(label >= 0 && label < vocab);
  if (ignored) g = g_entropy = acc_t(0);
  const bool zero_row = ignored || bad_label;

  auto grad_at = [&](acc_t xv, int64_t col) -> acc_t {
    // The fill is chosen here rather than held in a register: the float64
    // fused kernel is at ptxas's 64-register budget on sm_90a (it spilled).
    if (zero_row) return bad_label ? acc_t(NAN) : acc_t(0);
    const acc_t y = clamp_exp_arg((xv - row_max) * inv_temperature - row_log_sum);
    const acc_t p = fast_exp(y);
    acc_t d = -inv_temperature * p * (g + g_entropy * (y + row_entropy));
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

template <typename scalar_t, typename acc_t, bool kVectorized>
__global__ void __launch_bounds__(kThreads)
logprobs_bwd_kernel(const acc_t* __restrict__ grad_logp, const acc_t* __restrict__ grad_entropy,
                    const scalar_t* logits, RowLayout in_layout,
                    const int64_t* __restrict__ labels, const acc_t* __restrict__ row_max,
                    const acc_t* __restrict__ log_sum, const acc_t* __restrict__ entropy,
                    int64_t vocab, acc_t inv_temperature, int64_t ignore_index,
                    scalar_t* grad_logits, RowLayout out_layout) {
  const int64_t row_index = blockIdx.x;
  const int64_t label = labels[row_index];
  const bool ignored = label == ignore_index;
  const acc_t g = ignored ? acc_t(0) : grad_logp[row_index];
  const acc_t g_entropy = (ignored || grad_entropy == nullptr) ? acc_t(0) : grad_entropy[row_index];
  write_row_grad<scalar_t, acc_t, kVectorized>(
      logits + in_layout.offset(row_index), grad_logits + out_layout.offset(row_index), vocab, label,
      ignore_index, g, g_entropy, row_max[row_index], log_sum[row_index],
      entropy ? entropy[row_index] : acc_t(0), inv_temperature);
}

// ppo_loss_from_logits with the gradient in the same block, one per row: the
// row's softmax (one read), its token's weighted PPO derivative
// (rlhf_kernels/ppo_math.h, as every thread computes it), then the row's
// gradient: a second read that finds the row in L2, and one write.
template <typename scalar_t, typename acc_t, bool kVectorized>
__global__ void __launch_bounds__(kThreads)
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
    const SoftmaxState<acc_t> st = row_softmax_state(row, vocab, inv_temperature);
    acc_t row_logp, row_entropy, row_log_sum;
    row_outputs(st, row, label, vocab, inv_temperature, ignore_index, &row_logp, &row_entropy,
                &row_log_sum);
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
    write_row_grad<scalar_t, acc_t, kVectorized>(row, grad_logits + out_layout.offset(row_index), vocab,
                                                 label, ignore_index, g, g_entropy, st.m,
                                                 row_log_sum, row_entropy, inv_temperature);
    __syncthreads();  // block_merge's shared partials are rewritten by the next row
  }
}

bool rows_aligned(const void* base, RowLayout layout, int64_t n_rows, size_t elem) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(base);
  const bool strides_ok = n_rows <= 1 || ((layout.inner_stride * elem) % kVecBytes == 0 &&
                                          (layout.outer_stride * elem) % kVecBytes == 0);
  return addr % kVecBytes == 0 && strides_ok;
}

}  // namespace

template <typename scalar_t, typename acc_t>
cudaError_t launch_logprobs_fwd(const scalar_t* logits, RowLayout layout, const int64_t* labels,
                                int64_t n_rows, int64_t vocab, acc_t inv_temperature,
                                int64_t ignore_index, acc_t* logp, acc_t* entropy, acc_t* row_max,
                                acc_t* log_sum, cudaStream_t stream) {
  if (n_rows == 0) return cudaSuccess;
  // One block per row, and grid.x is at most 2^31 - 1: refuse more rows
  // rather than let the cast to unsigned wrap (2^32 + 1 rows would run 1 block).
  if (n_rows > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  logprobs_fwd_kernel<scalar_t, acc_t><<<static_cast<unsigned>(n_rows), kThreads, 0, stream>>>(
      logits, layout, labels, vocab, inv_temperature, ignore_index, logp, entropy, row_max,
      log_sum);
  return cudaGetLastError();
}

template <typename scalar_t, typename acc_t>
cudaError_t launch_logprobs_bwd(const acc_t* grad_logp, const acc_t* grad_entropy,
                                const scalar_t* logits, RowLayout in_layout,
                                const int64_t* labels, const acc_t* row_max, const acc_t* log_sum,
                                const acc_t* entropy, int64_t n_rows, int64_t vocab,
                                acc_t inv_temperature, int64_t ignore_index, scalar_t* grad_logits,
                                RowLayout out_layout, cudaStream_t stream) {
  if (n_rows == 0) return cudaSuccess;
  if (n_rows > 0x7fffffffLL) return cudaErrorInvalidConfiguration;  // as in the forward
  // The 16-byte path needs input and output rows to share their alignment.
  const bool vectorized = rows_aligned(logits, in_layout, n_rows, sizeof(scalar_t)) &&
                          rows_aligned(grad_logits, out_layout, n_rows, sizeof(scalar_t));
  const unsigned blocks = static_cast<unsigned>(n_rows);
  if (vectorized) {
    logprobs_bwd_kernel<scalar_t, acc_t, true><<<blocks, kThreads, 0, stream>>>(
        grad_logp, grad_entropy, logits, in_layout, labels, row_max, log_sum, entropy, vocab,
        inv_temperature, ignore_index, grad_logits, out_layout);
  } else {
    logprobs_bwd_kernel<scalar_t, acc_t, false><<<blocks, kThreads, 0, stream>>>(
        grad_logp, grad_entropy, logits, in_layout, labels, row_max, log_sum, entropy, vocab,
        inv_temperature, ignore_index, grad_logits, out_layout);
  }
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
  const bool vectorized = rows_aligned(logits, in_layout, n_rows, sizeof(scalar_t)) &&
                          rows_aligned(grad_logits, out_layout, n_rows, sizeof(scalar_t));
  const unsigned blocks = static_cast<unsigned>(grid);
  if (vectorized) {
    ppo_logits_grad_kernel<scalar_t, acc_t, true><<<blocks, kThreads, 0, stream>>>(
        logits, in_layout, labels, old_logp, advantages, row_weight, ref_logp, n_rows, vocab,
        inv_temperature, ignore_index, params, entropy_coef, logp, entropy, row_max, log_sum,
        grad_logits, out_layout);
  } else {
    ppo_logits_grad_kernel<scalar_t, acc_t, false><<<blocks, kThreads, 0, stream>>>(
        logits, in_layout, labels, old_logp, advantages, row_weight, ref_logp, n_rows, vocab,
        inv_temperature, ignore_index, params, entropy_coef, logp, entropy, row_max, log_sum,
        grad_logits, out_layout);
  }
  return cudaGetLastError();
}

#define RLHF_INSTANTIATE(scalar_t, acc_t)                                                       \
  template cudaError_t launch_logprobs_fwd<scalar_t, acc_t>(                                   \
      const scalar_t*, RowLayout, const int64_t*, int64_t, int64_t, acc_t, int64_t, acc_t*,    \
      acc_t*, acc_t*, acc_t*, cudaStream_t);                                                   \
  template cudaError_t launch_logprobs_bwd<scalar_t, acc_t>(                                   \
      const acc_t*, const acc_t*, const scalar_t*, RowLayout, const int64_t*, const acc_t*,    \
      const acc_t*, const acc_t*, int64_t, int64_t, acc_t, int64_t, scalar_t*, RowLayout,      \
      cudaStream_t);                                                                           \
  template cudaError_t launch_ppo_logits_grad<scalar_t, acc_t>(                                \
      const scalar_t*, RowLayout, const int64_t*, const acc_t*, const acc_t*, const acc_t*,    \
      const acc_t*, int64_t, int64_t, acc_t, int64_t, PolicyParams<acc_t>, acc_t, acc_t*,      \
      acc_t*, acc_t*, acc_t*, scalar_t*, RowLayout, int64_t, cudaStream_t);

RLHF_INSTANTIATE(float, float)
RLHF_INSTANTIATE(__half, float)
RLHF_INSTANTIATE(__nv_bfloat16, float)
RLHF_INSTANTIATE(double, double)
#undef RLHF_INSTANTIATE

}  // namespace rlhf_kernels::cuda

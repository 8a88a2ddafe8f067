// KL penalty and fused shaping + GAE, CUDA.
// GAE (Schulman et al., 2016) is scanned in W_t = gamma*lam*A_t + gamma*V_t,
// which obeys W_t = a_t * W_{t+1} + b_t with (a, b) = (gamma*lam,
// gamma*lam*(r_t - V_t) + gamma*V_t) at a valid position and the identity
// (1, 0) at a masked one; then A_t = r_t - V_t + W_{t+1}. One thread block per
// sequence walks it from the end in chunks of kThreads * kItems positions:
// each thread composes its kItems affine maps, a warp scans the thread
// aggregates with shuffles, warp totals compose through shared memory, and
// the chunk's total carries W into the next (earlier) chunk. Affine maps
// compose associatively: (a1, b1) then (a2, b2) = (a1 * a2, a2 * b1 + b2).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "advantages.cuh"
#include "convert.cuh"

namespace rlhf_kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 4;
constexpr int kChunk = kThreads * kItems;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename scalar_t, typename acc_t>
__global__ void kl_fwd_kernel(const scalar_t* __restrict__ logp, const scalar_t* __restrict__ ref,
                              int estimator, acc_t* __restrict__ kl, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    kl[i] = kl_value<acc_t>(to_acc(logp[i]), to_acc(ref[i]), estimator);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void kl_bwd_kernel(const acc_t* __restrict__ grad, const scalar_t* __restrict__ logp,
                              const scalar_t* __restrict__ ref, int estimator,
                              scalar_t* __restrict__ grad_logp, scalar_t* __restrict__ grad_ref,
                              int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    const acc_t d = grad[i] * kl_grad_logp<acc_t>(to_acc(logp[i]), to_acc(ref[i]), estimator);
    grad_logp[i] = from_acc<scalar_t>(d);
    grad_ref[i] = from_acc<scalar_t>(-d);
  }
}

template <typename acc_t>
struct Affine {
  acc_t a, b;  // W -> a * W + b
};

// `first` applied, then `then`.
template <typename acc_t>
__device__ __forceinline__ Affine<acc_t> compose(Affine<acc_t> first, Affine<acc_t> then) {
  return {first.a * then.a, then.a * first.b + then.b};
}

__device__ __forceinline__ double warp_sum(double x) {
  for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(kFullMask, x, off);
  return x;
}

__device__ __forceinline__ long long warp_max(long long x) {
  for (int off = 16; off > 0; off >>= 1) {
    const long long y = __shfl_down_sync(kFullMask, x, off);
    x = y > x ? y : x;
  }
  return x;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ bool is_valid(const AdvantagesArgs<scalar_t, acc_t>& args, int64_t p,
                                         int64_t start, int64_t end) {
  return p >= start && p < end && (args.mask == nullptr || args.mask[p] != 0);
}

// The reward at a valid position p (and its kl): given, or shaped.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t reward_at(const AdvantagesArgs<scalar_t, acc_t>& args, int64_t p,
                                           int64_t last, acc_t score, acc_t kl_coef, acc_t* kl) {
  if (args.token_rewards != nullptr) {
    *kl = acc_t(0);
    return to_acc(args.token_rewards[p]);
  }
  *kl = kl_value<acc_t>(to_acc(args.logp[p]), to_acc(args.ref_logp[p]), args.estimator);
  return -kl_coef * *kl + (p == last ? score : acc_t(0));
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    advantages_kernel(const AdvantagesArgs<scalar_t, acc_t> args, int64_t total) {
  __shared__ Affine<acc_t> warp_total[kWarps];
  __shared__ long long warp_last[kWarps];
  __shared__ double warp_stats[kWarps][kAdvantageStats];

  const int64_t seq = blockIdx.x;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  int64_t start, end;
  if (args.cu_seqlens != nullptr) {
    start = min(max(static_cast<int64_t>(args.cu_seqlens[seq]), int64_t(0)), total);
    end = min(max(static_cast<int64_t>(args.cu_seqlens[seq + 1]), start), total);
  } else {
    start = seq * args.seq_len;
    end = start + args.seq_len;
  }
  const bool shaping = args.token_rewards == nullptr;
  const acc_t kl_coef = args.kl_coef * (args.kl_coef_scale != nullptr ? *args.kl_coef_scale : acc_t(1));
  const acc_t score = shaping ? args.scores[seq] : acc_t(0);
  const acc_t gamma = args.gamma;
  const acc_t gamma_lam = args.gamma * args.lam;

  // The last valid position (where the score goes): each thread finds its
  // largest valid position walking down, then a block max.
  int64_t last = end - 1;
  if (shaping && args.mask != nullptr) {
    long long local = start - 1;
    for (int64_t p = end - 1 - threadIdx.x; p >= start; p -= kThreads) {
      if (args.mask[p]) {
        local = p;
        break;
      }
    }
    local = warp_max(local);
    if (lane == 0) warp_last[warp] = local;
    __syncthreads();
    last = warp_last[0];
    for (int w = 1; w < kWarps; ++w) last = warp_last[w] > last ? warp_last[w] : last;
  }

  acc_t carry = 0;  // W just past the current chunk
  double count = 0, adv_sum = 0, adv_sq = 0, kl_sum = 0;
  for (int64_t chunk_end = end; chunk_end > start; chunk_end -= kChunk) {
    acc_t a[kItems], b[kItems], c[kItems], value[kItems];
    bool valid[kItems];
    Affine<acc_t> agg{acc_t(1), acc_t(0)};
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      // Positions in decreasing time order along k = thread * kItems + i.
      const int64_t p = chunk_end - 1 - (static_cast<int64_t>(threadIdx.x) * kItems + i);
      valid[i] = is_valid(args, p, start, end);
      value[i] = valid[i] ? to_acc(args.values[p]) : acc_t(0);
      acc_t kl = 0;
      const acc_t reward = valid[i] ? reward_at(args, p, last, score, kl_coef, &kl) : acc_t(0);
      c[i] = reward - value[i];
      if (shaping && p >= start) {
        args.kl_out[p] = kl;
        args.token_rewards_out[p] = reward;
        kl_sum += kl;
      }
      // The map of position p + 1, which produces W_{p+1} from W_{p+2}.
      const int64_t q = p + 1;
      if (p >= start && is_valid(args, q, start, end)) {
        acc_t kl_q;
        const acc_t v_q = to_acc(args.values[q]);
        const acc_t r_q = reward_at(args, q, last, score, kl_coef, &kl_q);
        a[i] = gamma_lam;
        b[i] = gamma_lam * (r_q - v_q) + gamma * v_q;
      } else {
        a[i] = 1;
        b[i] = 0;
      }
      agg = compose(agg, Affine<acc_t>{a[i], b[i]});
    }
    // Inclusive scan of the thread aggregates within the warp.
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const acc_t pa = __shfl_up_sync(kFullMask, agg.a, off);
      const acc_t pb = __shfl_up_sync(kFullMask, agg.b, off);
      if (lane >= off) agg = compose(Affine<acc_t>{pa, pb}, agg);
    }
    if (lane == 31) warp_total[warp] = agg;
    // Exclusive within the warp.
    Affine<acc_t> before{__shfl_up_sync(kFullMask, agg.a, 1), __shfl_up_sync(kFullMask, agg.b, 1)};
    if (lane == 0) before = Affine<acc_t>{acc_t(1), acc_t(0)};
    __syncthreads();
    Affine<acc_t> prefix{acc_t(1), acc_t(0)};
    for (int w = 0; w < warp; ++w) prefix = compose(prefix, warp_total[w]);
    prefix = compose(prefix, before);
    acc_t w_next = prefix.a * carry + prefix.b;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t p = chunk_end - 1 - (static_cast<int64_t>(threadIdx.x) * kItems + i);
      w_next = a[i] * w_next + b[i];  // W_{p+1}
      if (p < start) continue;
      const acc_t adv = valid[i] ? c[i] + w_next : acc_t(0);
      args.advantages[p] = adv;
      args.returns[p] = valid[i] ? adv + value[i] : acc_t(0);
      if (valid[i]) {
        count += 1;
        adv_sum += adv;
        adv_sq += static_cast<double>(adv) * adv;
      }
    }
    Affine<acc_t> chunk_total{acc_t(1), acc_t(0)};
    for (int w = 0; w < kWarps; ++w) chunk_total = compose(chunk_total, warp_total[w]);
    carry = chunk_total.a * carry + chunk_total.b;
    __syncthreads();  // warp_total is rewritten by the next chunk
  }

  const double partial[kAdvantageStats] = {count, adv_sum, adv_sq, kl_sum};
#pragma unroll
  for (int j = 0; j < kAdvantageStats; ++j) {
    const double s = warp_sum(partial[j]);
    if (lane == 0) warp_stats[warp][j] = s;
  }
  __syncthreads();
  if (threadIdx.x < kAdvantageStats) {
    double s = 0;
    for (int w = 0; w < kWarps; ++w) s += warp_stats[w][threadIdx.x];
    args.stats[seq * kAdvantageStats + threadIdx.x] = s;
  }
}

int elementwise_blocks(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65536 ? blocks : 65536);
}

}  // namespace

template <typename scalar_t, typename acc_t>
cudaError_t launch_kl_penalty_fwd(const scalar_t* logp, const scalar_t* ref, int estimator,
                                  acc_t* kl, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  kl_fwd_kernel<scalar_t, acc_t><<<elementwise_blocks(n), kThreads, 0, stream>>>(logp, ref, estimator, kl, n);
  return cudaGetLastError();
}

template <typename scalar_t, typename acc_t>
cudaError_t launch_kl_penalty_bwd(const acc_t* grad, const scalar_t* logp, const scalar_t* ref,
                                  int estimator, scalar_t* grad_logp, scalar_t* grad_ref,
                                  int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  kl_bwd_kernel<scalar_t, acc_t><<<elementwise_blocks(n), kThreads, 0, stream>>>(
      grad, logp, ref, estimator, grad_logp, grad_ref, n);
  return cudaGetLastError();
}

template <typename scalar_t, typename acc_t>
cudaError_t launch_advantages(const AdvantagesArgs<scalar_t, acc_t>& args, int64_t total_tokens,
                              cudaStream_t stream) {
  if (args.num_seqs == 0) return cudaSuccess;
  if (args.num_seqs > 0x7fffffff) return cudaErrorInvalidConfiguration;
  advantages_kernel<scalar_t, acc_t>
      <<<static_cast<unsigned>(args.num_seqs), kThreads, 0, stream>>>(args, total_tokens);
  return cudaGetLastError();
}

#define RLHF_INSTANTIATE(scalar_t, acc_t)                                                        \
  template cudaError_t launch_kl_penalty_fwd<scalar_t, acc_t>(const scalar_t*, const scalar_t*, \
                                                              int, acc_t*, int64_t,             \
                                                              cudaStream_t);                    \
  template cudaError_t launch_kl_penalty_bwd<scalar_t, acc_t>(                                  \
      const acc_t*, const scalar_t*, const scalar_t*, int, scalar_t*, scalar_t*, int64_t,       \
      cudaStream_t);                                                                            \
  template cudaError_t launch_advantages<scalar_t, acc_t>(const AdvantagesArgs<scalar_t, acc_t>&, \
                                                          int64_t, cudaStream_t);

RLHF_INSTANTIATE(float, float)
RLHF_INSTANTIATE(double, double)
RLHF_INSTANTIATE(__half, float)
RLHF_INSTANTIATE(__nv_bfloat16, float)
#undef RLHF_INSTANTIATE

}  // namespace rlhf_kernels::cuda

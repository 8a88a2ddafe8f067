// CPU kernels of the fused PPO losses. The per-token math is policy_token /
// value_token (rlhf_kernels/ppo_token_math.h), shared with the CUDA kernels;
// float sequences run it on 8 or 16 tokens at a time through
// ppo_loss_vec.inc (baseline, AVX2 and AVX-512 copies, chosen at run time like
// the logprobs kernels), their tails and double on one token at a time here.
#include "ppo_loss.h"

#include "isa.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

namespace rlhf_kernels::cpu {
namespace {

#define RLHF_ISA_LOOPS "ppo_loss_vec.inc"
#include "isa_copies.inc"

// The vector loops for this CPU, chosen once (isa.h); `lanes` tokens a step.
struct VecKernels {
  void (*policy)(const float*, const float*, const float*, const uint8_t*, const float*,
                 const float*, const float*, int64_t, const PolicyParams<float>&, float*, float*);
  void (*value)(const float*, const float*, const float*, const uint8_t*, const float*, int64_t,
                float, float*, float*);
  int64_t lanes;
};

const VecKernels& vec_kernels() {
  static const VecKernels kernels = [] {
#ifdef RLHF_HAVE_X86_COPIES
    switch (cpu_isa()) {
      case Isa::kAvx512: return VecKernels{avx512::policy_tokens, avx512::value_tokens, avx512::vec::kLanes};
      case Isa::kAvx2: return VecKernels{avx2::policy_tokens, avx2::value_tokens, avx2::vec::kLanes};
      default: break;
    }
#endif
    return VecKernels{baseline::policy_tokens, baseline::value_tokens, baseline::vec::kLanes};
  }();
  return kernels;
}

// Tokens [t_begin, t_end) of the sequence starting at `base`, one at a time.
// Token i's weight: its mask byte as 0 / 1, or its weight (see ppo_loss.h).
template <typename acc_t>
inline acc_t token_weight(const uint8_t* mask, const acc_t* weight, int64_t i) {
  return weight ? weight[i] : (mask[i] ? acc_t(1) : acc_t(0));
}

template <typename acc_t>
void policy_scalar(const acc_t* logp, const acc_t* old_logp, const acc_t* advantages,
                   const uint8_t* mask, const acc_t* weight, const acc_t* ref_logp,
                   const acc_t* entropy, const PolicyParams<acc_t>& p, acc_t* grad, int64_t base,
                   int64_t t_begin, int64_t t_end, acc_t* sums) {
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t i = base + t;
    const acc_t w = token_weight(mask, weight, i);
    if (w == acc_t(0)) {
      if (grad) grad[i] = acc_t(0);
      continue;
    }
    const acc_t ref = ref_logp ? ref_logp[i] : acc_t(0);
    const PolicyToken<acc_t> tok = policy_token<acc_t>(logp[i], old_logp[i], advantages[i], ref, p);
    if (grad) grad[i] = w * tok.grad;
    sums[kPgLossSum] += w * tok.loss;
    sums[kValidCount] += w;
    sums[kClipCount] += tok.clipped ? w : acc_t(0);
    sums[kDualClipCount] += tok.dual ? w : acc_t(0);
    sums[kApproxKlSum] += w * (old_logp[i] - logp[i]);
    sums[kRatioMax] = tok.ratio > sums[kRatioMax] ? tok.ratio : sums[kRatioMax];
    sums[kRatioMin] = tok.ratio < sums[kRatioMin] ? tok.ratio : sums[kRatioMin];
    sums[kKlPenaltySum] += w * tok.kl;
    if (entropy) sums[kEntropySum] += w * entropy[i];
  }
}

template <typename acc_t>
void value_scalar(const acc_t* values, const acc_t* old_values, const acc_t* returns,
                  const uint8_t* mask, const acc_t* weight, acc_t clip, acc_t* grad, int64_t base,
                  int64_t t_begin, int64_t t_end, acc_t* sums) {
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t i = base + t;
    const acc_t w = token_weight(mask, weight, i);
    if (w == acc_t(0)) {
      if (grad) grad[i] = acc_t(0);
      continue;
    }
    const ValueToken<acc_t> tok = value_token<acc_t>(values[i], old_values[i], returns[i], clip);
    if (grad) grad[i] = w * tok.grad;
    sums[kVfLossSum] += w * tok.loss;
    sums[kVfValidCount] += w;
    sums[kVfClipCount] += tok.clipped ? w : acc_t(0);
  }
}

// The token range [t_begin, t_end) of work item `item` (see ppo_policy_chunks).
struct ChunkRange {
  int64_t base, t_begin, t_end;
};
inline ChunkRange chunk_range(int64_t item, int64_t seq_len) {
  const int64_t chunks = ppo_chunks(seq_len);
  const int64_t t_begin = (item % chunks) * kPpoChunk;
  return {(item / chunks) * seq_len, t_begin, std::min(t_begin + kPpoChunk, seq_len)};
}

}  // namespace

template <typename acc_t>
void ppo_policy_chunks(const acc_t* logp, const acc_t* old_logp, const acc_t* advantages,
                       const uint8_t* mask, const acc_t* weight, const acc_t* ref_logp,
                       const acc_t* entropy, int64_t seq_len, const PolicyParams<acc_t>& p,
                       acc_t* grad, acc_t* partial, int64_t item_begin, int64_t item_end) {
  PolicyParams<acc_t> params = p;
  if (ref_logp == nullptr) params.kl_estimator = kKlNone;
  const acc_t* ref = params.kl_estimator == kKlNone ? nullptr : ref_logp;
  for (int64_t item = item_begin; item < item_end; ++item) {
    const ChunkRange r = chunk_range(item, seq_len);
    acc_t* sums = partial + item * kPolicyStats;
    for (int k = 0; k < kPolicyStats; ++k) sums[k] = acc_t(0);
    sums[kRatioMax] = -std::numeric_limits<acc_t>::infinity();
    sums[kRatioMin] = std::numeric_limits<acc_t>::infinity();
    int64_t t = r.t_begin;
    if constexpr (std::is_same_v<acc_t, float>) {
      const int64_t n = (r.t_end - r.t_begin) - (r.t_end - r.t_begin) % vec_kernels().lanes;
      const int64_t i = r.base + r.t_begin;
      vec_kernels().policy(logp + i, old_logp + i, advantages + i, mask ? mask + i : nullptr,
                           weight ? weight + i : nullptr, ref ? ref + i : nullptr,
                           entropy ? entropy + i : nullptr, n, params, grad ? grad + i : nullptr,
                           sums);
      t += n;
    }
    policy_scalar<acc_t>(logp, old_logp, advantages, mask, weight, ref, entropy, params, grad,
                         r.base, t, r.t_end, sums);
  }
}

template <typename acc_t>
void ppo_value_chunks(const acc_t* values, const acc_t* old_values, const acc_t* returns,
                      const uint8_t* mask, const acc_t* weight, int64_t seq_len, acc_t clip,
                      acc_t* grad, acc_t* partial, int64_t item_begin, int64_t item_end) {
  for (int64_t item = item_begin; item < item_end; ++item) {
    const ChunkRange r = chunk_range(item, seq_len);
    acc_t* sums = partial + item * kValueStats;
    for (int k = 0; k < kValueStats; ++k) sums[k] = acc_t(0);
    int64_t t = r.t_begin;
    if constexpr (std::is_same_v<acc_t, float>) {
      const int64_t n = (r.t_end - r.t_begin) - (r.t_end - r.t_begin) % vec_kernels().lanes;
      const int64_t i = r.base + r.t_begin;
      vec_kernels().value(values + i, old_values + i, returns + i, mask ? mask + i : nullptr,
                          weight ? weight + i : nullptr, n, clip, grad ? grad + i : nullptr, sums);
      t += n;
    }
    value_scalar<acc_t>(values, old_values, returns, mask, weight, clip, grad, r.base, t, r.t_end,
                        sums);
  }
}

#define RLHF_INSTANTIATE(acc_t)                                                                  \
  template void ppo_policy_chunks<acc_t>(const acc_t*, const acc_t*, const acc_t*,              \
                                         const uint8_t*, const acc_t*, const acc_t*,             \
                                         const acc_t*, int64_t, const PolicyParams<acc_t>&,      \
                                         acc_t*, acc_t*, int64_t, int64_t);                      \
  template void ppo_value_chunks<acc_t>(const acc_t*, const acc_t*, const acc_t*, const uint8_t*, \
                                        const acc_t*, int64_t, acc_t, acc_t*, acc_t*, int64_t,   \
                                        int64_t);
RLHF_INSTANTIATE(float)
RLHF_INSTANTIATE(double)
#undef RLHF_INSTANTIATE

}  // namespace rlhf_kernels::cpu

// Shared, torch-free definitions of the advantage kernels (CPU and CUDA): the
// KL estimators and their derivatives, and the argument block of the fused
// shaping + GAE kernel. A header of its own rather than more of common.h, so
// that each op's native definitions stay in one place.
#pragma once

#include <math.h>

#include <cstdint>

#include "rlhf_kernels/common.h"

namespace rlhf_kernels {

// Estimator codes shared with rlhf_kernels/ops/advantages.py (_ESTIMATORS).
enum KLEstimator : int { kKLK1 = 0, kKLAbs = 1, kKLK2 = 2, kKLK3 = 3 };

RLHF_HOST_DEVICE inline float kl_exp(float x) { return expf(x); }
RLHF_HOST_DEVICE inline double kl_exp(double x) { return exp(x); }

// Per-token KL estimate (Schulman, 2020): k1 = logp - ref; abs = |k1|;
// k2 = k1^2 / 2; k3 = exp(x) - x - 1, x = clamp(ref - logp, -20, 20), result
// clamped to [-10, 10]. Comparisons are written so that NaN propagates.
template <typename T>
RLHF_HOST_DEVICE inline T kl_value(T logp, T ref, int estimator) {
  const T d = logp - ref;
  switch (estimator) {
    case kKLK1: return d;
    case kKLAbs: return d < T(0) ? -d : d;
    case kKLK2: return T(0.5) * d * d;
    default: {
      T x = ref - logp;
      x = x < T(-20) ? T(-20) : (x > T(20) ? T(20) : x);
      const T y = kl_exp(x) - x - T(1);
      return y < T(-10) ? T(-10) : (y > T(10) ? T(10) : y);
    }
  }
}

// d kl / d logp; d kl / d ref is its negative. At a clamp the gradient is
// that of torch.clamp (passes at the boundary, 0 beyond it); abs has 0 at 0.
template <typename T>
RLHF_HOST_DEVICE inline T kl_grad_logp(T logp, T ref, int estimator) {
  const T d = logp - ref;
  switch (estimator) {
    case kKLK1: return T(1);
    case kKLAbs: return d > T(0) ? T(1) : (d < T(0) ? T(-1) : T(0));
    case kKLK2: return d;
    default: {
      const T x = ref - logp;
      if (x < T(-20) || x > T(20)) return T(0);
      const T e = kl_exp(x);
      if (e - x - T(1) > T(10)) return T(0);
      return T(1) - e;
    }
  }
}

// Sequences of the fused KL + shaping + GAE kernel. Sequence b covers
// positions [b * seq_len, (b + 1) * seq_len) of the flat inputs (padded), or
// [cu_seqlens[b], cu_seqlens[b + 1]) (packed).
template <typename scalar_t, typename acc_t>
struct AdvantagesArgs {
  const scalar_t* values;         // (N,)
  const uint8_t* mask;            // (N,) 0/1, or null: every position valid
  const int32_t* cu_seqlens;      // (B + 1,), or null: padded with seq_len
  int64_t seq_len;
  int64_t num_seqs;
  const scalar_t* token_rewards;  // (N,), or null: shape them from the three below
  const acc_t* scores;            // (B,)
  const scalar_t* logp;           // (N,)
  const scalar_t* ref_logp;       // (N,)
  const acc_t* kl_coef_scale;     // (1,) multiplies kl_coef, or null
  acc_t kl_coef;
  int estimator;
  acc_t gamma;
  acc_t lam;
  acc_t* advantages;              // (N,) unwhitened, 0 at masked positions
  acc_t* returns;                 // (N,) advantages + values, 0 at masked positions
  acc_t* token_rewards_out;       // (N,) when shaping, else null
  acc_t* kl_out;                  // (N,) when shaping, else null
  double* stats;                  // (B, 4): valid count, sum A, sum A^2, sum kl
};

constexpr int kAdvantageStats = 4;

}  // namespace rlhf_kernels

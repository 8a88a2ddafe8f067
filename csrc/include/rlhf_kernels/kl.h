// The per-token KL estimators of Schulman (2020), "Approximating KL
// divergence", and their derivatives: one definition for every kernel that
// needs them (kl_penalty, the fused shaping + GAE, the PPO losses), host and
// device, torch-free.
#pragma once

#include <math.h>

#include "rlhf_kernels/common.h"

namespace rlhf_kernels {

// Estimator codes, shared with rlhf_kernels/ops/advantages.py
// (KL_ESTIMATOR_CODES); kKlNone (-1) means "no KL term".
enum KlEstimator : int { kKlNone = -1, kKlK1 = 0, kKlAbs = 1, kKlK2 = 2, kKlK3 = 3 };

// k3 = exp(x) - x - 1 and its derivative exp(x) - 1, without their
// cancellation near x = 0 (near on-policy k3 ~ x^2 / 2, and exp(x) - x - 1 in
// float keeps only ~1e-7 of absolute accuracy: all noise at |x| ~ 1e-4).
template <typename T>
struct K3Terms {
  T k3, expm1;
};

// For |x| < 1/2: k3 = x^2 (1/2! + x/3! + ... + x^n/(n+2)!), n = 7 in float and
// 14 in double (truncation below the unit roundoff), and expm1 = x + k3;
// exp(x) - x - 1 beyond. (expm1(x) - x would cancel as well.) NaN gives NaN.
RLHF_HOST_DEVICE inline float k3_series_tail(float) { return 1.f / 362880.f; }  // 1/9!
RLHF_HOST_DEVICE inline double k3_series_tail(double x) {
  double p = 1.0 / 20922789888000.0;  // 1/16!
  p = p * x + 1.0 / 1307674368000.0;
  p = p * x + 1.0 / 87178291200.0;
  p = p * x + 1.0 / 6227020800.0;
  p = p * x + 1.0 / 479001600.0;
  p = p * x + 1.0 / 39916800.0;
  p = p * x + 1.0 / 3628800.0;
  return p * x + 1.0 / 362880.0;  // ... 1/9!
}
// exp in the accumulation type, host and device (also the PPO ratio's, ppo_math.h).
RLHF_HOST_DEVICE inline float acc_exp(float x) { return expf(x); }
RLHF_HOST_DEVICE inline double acc_exp(double x) { return exp(x); }

template <typename T>
RLHF_HOST_DEVICE inline K3Terms<T> k3_terms(T x) {
  if (x > T(-0.5) && x < T(0.5)) {
    T p = k3_series_tail(x);
    p = p * x + T(1) / T(40320);
    p = p * x + T(1) / T(5040);
    p = p * x + T(1) / T(720);
    p = p * x + T(1) / T(120);
    p = p * x + T(1) / T(24);
    p = p * x + T(1) / T(6);
    p = p * x + T(0.5);
    const T k3 = x * x * p;
    return {k3, x + k3};
  }
  const T e = acc_exp(x);
  return {e - x - T(1), e - T(1)};
}

// Per-token KL estimate (Schulman, 2020): k1 = logp - ref; abs = |k1|;
// k2 = k1^2 / 2; k3 = exp(x) - x - 1, x = clamp(ref - logp, -20, 20), result
// clamped to [-10, 10] (computed by k3_terms). Comparisons are written so that
// NaN propagates.
template <typename T>
RLHF_HOST_DEVICE inline T kl_value(T logp, T ref, int estimator) {
  const T d = logp - ref;
  switch (estimator) {
    case kKlK1: return d;
    case kKlAbs: return d < T(0) ? -d : d;
    case kKlK2: return T(0.5) * d * d;
    default: {
      T x = ref - logp;
      x = x < T(-20) ? T(-20) : (x > T(20) ? T(20) : x);
      const T y = k3_terms(x).k3;
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
    case kKlK1: return T(1);
    case kKlAbs: return d > T(0) ? T(1) : (d < T(0) ? T(-1) : T(0));
    case kKlK2: return d;
    default: {
      // Written so that NaN gives 0, as torch.clamp's gradient (the reference).
      const T x = ref - logp;
      if (!(x >= T(-20) && x <= T(20))) return T(0);
      const K3Terms<T> k = k3_terms(x);
      if (!(k.k3 <= T(10))) return T(0);
      return -k.expm1;
    }
  }
}

}  // namespace rlhf_kernels

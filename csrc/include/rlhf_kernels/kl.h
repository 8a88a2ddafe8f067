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

RLHF_HOST_DEVICE inline float kl_exp(float x) { return expf(x); }
RLHF_HOST_DEVICE inline double kl_exp(double x) { return exp(x); }

// Per-token KL estimate (Schulman, 2020): k1 = logp - ref; abs = |k1|;
// k2 = k1^2 / 2; k3 = exp(x) - x - 1, x = clamp(ref - logp, -20, 20), result
// clamped to [-10, 10]. Comparisons are written so that NaN propagates.
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
    case kKlK1: return T(1);
    case kKlAbs: return d > T(0) ? T(1) : (d < T(0) ? T(-1) : T(0));
    case kKlK2: return d;
    default: {
      const T x = ref - logp;
      if (x < T(-20) || x > T(20)) return T(0);
      const T e = kl_exp(x);
      if (e - x - T(1) > T(10)) return T(0);
      return T(1) - e;
    }
  }
}

}  // namespace rlhf_kernels

// The per-token KL estimators of Schulman (2020), "Approximating KL
// divergence", and their derivatives: one definition for every kernel that
// needs them (kl_penalty, the fused shaping + GAE, the PPO losses), host and
// device, torch-free. This header holds the types; the maths is in
// kl_math.h, included below (and again by each copy of the CPU vector loops).
#pragma once

#include <math.h>

#include <type_traits>
#include <utility>

#include "rlhf_kernels/common.h"

// The per-token maths (kl_math.h, ppo_token_math.h) is always inlined: into
// the CUDA kernels, the CPU scalar loops and, lane-wise, the CPU vector loops
// (which must keep their vectors in registers).
#define RLHF_TOKEN_FN RLHF_HOST_DEVICE inline __attribute__((always_inline))

namespace rlhf_kernels {

// Estimator codes, shared with rlhf_kernels/ops/advantages.py
// (KL_ESTIMATOR_CODES); kKlNone (-1) means "no KL term".
enum KlEstimator : int { kKlNone = -1, kKlK1 = 0, kKlAbs = 1, kKlK2 = 2, kKlK3 = 3 };

// The value types the per-token maths runs on: a scalar (float or double) or a
// GCC vector of floats (csrc/cpu/vec.h). lane_t<T> is the type of one element
// (T itself for a scalar), the type of the constants and parameters; mask_t<T>
// what a comparison gives (bool, or an integer vector of 0 / -1).
template <typename T, typename = void>
struct LaneOf {
  using type = T;
};
template <typename T>
struct LaneOf<T, std::void_t<decltype(std::declval<T&>()[0])>> {
  using type = std::remove_reference_t<decltype(std::declval<T&>()[0])>;
};
template <typename T>
using lane_t = typename LaneOf<T>::type;
template <typename T>
using mask_t = decltype(std::declval<T>() < std::declval<T>());

// k3 = exp(x) - x - 1 and its derivative exp(x) - 1 (k3_terms, kl_math.h).
template <typename T>
struct K3Terms {
  T k3, expm1;
};

// A KL estimate and its derivative d kl / d logp (kl_terms, kl_math.h).
template <typename T>
struct KlTerms {
  T kl, dkl;
};

// exp in the accumulation type, host and device (also the PPO ratio's). The
// CPU vector loops bring their own for their vectors (vec::exp).
RLHF_HOST_DEVICE inline float acc_exp(float x) { return expf(x); }
RLHF_HOST_DEVICE inline double acc_exp(double x) { return exp(x); }
// log likewise (DPPO's binary KL); the CPU vector loops bring vec::log.
RLHF_HOST_DEVICE inline float acc_log(float x) { return logf(x); }
RLHF_HOST_DEVICE inline double acc_log(double x) { return log(x); }

#include "rlhf_kernels/kl_math.h"

}  // namespace rlhf_kernels

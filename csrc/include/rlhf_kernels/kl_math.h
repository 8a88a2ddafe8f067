// The per-token KL maths (Schulman, 2020), written once for every value type
// the kernels compute on: a scalar (float, double: the CPU scalar loops and the
// CUDA kernels, host and device) or a GCC vector of floats (the CPU vector
// loops, csrc/cpu/ppo_loss_vec.inc), lane by lane with the same operations.
//
// No include guard and no namespace on purpose, like csrc/cpu/vec.h: kl.h
// includes this file in namespace rlhf_kernels, and each instruction-set copy
// of the CPU vector loops includes it again inside its own namespace, after
// declaring acc_exp for its vectors, so that its copy of these functions is
// compiled for that instruction set (GCC does not inline an AVX2 function into
// one compiled outside a `#pragma GCC target` region). The types and traits
// it uses (lane_t, mask_t, K3Terms, KlTerms) are in kl.h.
//
// Branch-free where the value type is a vector: comparisons give masks, `?:`
// selects (GCC applies it lane-wise to vectors in C++), `&` ands two masks;
// constants are of the lane type S. Comparisons are written so that NaN
// propagates (no fmin / fmax).

// x clamped to [lo, hi] as torch.clamp does it, keeping NaN.
template <typename T>
RLHF_TOKEN_FN T clamp_keep_nan(T x, lane_t<T> lo, lane_t<T> hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// lo <= x <= hi (false for NaN): where torch.clamp(x, lo, hi) passes the
// gradient (1 on the closed interval, 0 beyond it).
template <typename T>
RLHF_TOKEN_FN mask_t<T> within(T x, lane_t<T> lo, lane_t<T> hi) {
  return (x >= lo) & (x <= hi);
}

// p x^n + c1 x^(n-1) + ... + cn by Horner's rule (the fold runs left to right).
template <typename T, typename... C>
RLHF_TOKEN_FN T horner(T p, T x, C... c) {
  ((p = p * x + c), ...);
  return p;
}

// k3 = exp(x) - x - 1 and its derivative exp(x) - 1, without their
// cancellation near x = 0 (near on-policy k3 ~ x^2 / 2, and exp(x) - x - 1 in
// float keeps only ~1e-7 of absolute accuracy: all noise at |x| ~ 1e-4).
// For |x| < 1/2: k3 = x^2 (1/2! + x/3! + ... + x^n/(n+2)!), n = 7 in float and
// 14 in double (truncation below the unit roundoff), and expm1 = x + k3;
// exp(x) - x - 1 beyond. (expm1(x) - x would cancel as well.) NaN gives NaN.
//
// The series from its top coefficient down to 1/9!.
template <typename T>
RLHF_TOKEN_FN T k3_series_tail(T x) {
  using S = lane_t<T>;
  if constexpr (std::is_same_v<S, double>) {
    return horner(T{} + 1.0 / 20922789888000.0, x,  // 1/16!
                  1.0 / 1307674368000.0, 1.0 / 87178291200.0, 1.0 / 6227020800.0,
                  1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0);  // ... 1/9!
  } else {
    (void)x;
    return T{} + S(1) / S(362880);  // 1/9!
  }
}

template <typename T>
RLHF_TOKEN_FN K3Terms<T> k3_terms(T x) {
  using S = lane_t<T>;
  const T p = horner(k3_series_tail(x), x, S(1) / S(40320), S(1) / S(5040), S(1) / S(720),
                     S(1) / S(120), S(1) / S(24), S(1) / S(6), S(0.5));
  const T series = x * x * p;
  const auto small = (x > S(-0.5)) & (x < S(0.5));
  // A scalar skips the exp it does not need; vector lanes take both and select.
  if constexpr (std::is_same_v<mask_t<T>, bool>) {
    if (small) return {series, x + series};
  }
  const T e = acc_exp(x);
  return {small ? series : e - x - S(1), small ? x + series : e - S(1)};
}

// Per-token KL estimate (Schulman, 2020) and d kl / d logp (d kl / d ref is
// its negative): k1 = logp - ref; abs = |k1|; k2 = k1^2 / 2; k3 = exp(x) - x
// - 1, x = clamp(ref - logp, -20, 20), result clamped to [-10, 10] (computed
// by k3_terms). At a clamp the gradient is that of torch.clamp (passes at the
// boundary, 0 beyond it, 0 for NaN, as the reference); abs has 0 at 0.
template <typename T>
RLHF_TOKEN_FN KlTerms<T> kl_terms(T logp, T ref, int estimator) {
  using S = lane_t<T>;
  const T d = logp - ref;
  switch (estimator) {
    case kKlK1: return {d, T{} + S(1)};
    case kKlAbs: return {d < S(0) ? -d : d, d > S(0) ? S(1) : (d < S(0) ? S(-1) : S(0))};
    case kKlK2: return {S(0.5) * (d * d), d};
    default: {
      const T x = ref - logp;
      const K3Terms<T> k = k3_terms(clamp_keep_nan(x, S(-20), S(20)));
      // k3 >= 0 (also in rounding): its lower clamp never acts.
      const auto live = within(x, S(-20), S(20)) & (k.k3 <= S(10));
      return {clamp_keep_nan(k.k3, S(-10), S(10)), live ? -k.expm1 : T{}};
    }
  }
}

template <typename T>
RLHF_TOKEN_FN T kl_value(T logp, T ref, int estimator) {
  return kl_terms(logp, ref, estimator).kl;
}

template <typename T>
RLHF_TOKEN_FN T kl_grad_logp(T logp, T ref, int estimator) {
  return kl_terms(logp, ref, estimator).dkl;
}

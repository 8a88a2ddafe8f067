// The per-token PPO loss terms and their derivatives, written once for every
// value type the kernels compute on: a scalar (float, double: the CPU scalar
// loops and the CUDA kernels, host and device) or a GCC vector of floats (the
// CPU vector loops, csrc/cpu/ppo_loss_vec.inc), lane by lane with the same
// operations. No include guard and no namespace, for the reasons of
// kl_math.h, which must be included first in the same namespace; the types
// (PolicyParams, PolicyToken, ValueToken) are in ppo_math.h.
//
// Every select reproduces the gradient torch autograd gives the eager
// reference (rlhf_kernels/reference.py):
//   clamp(x, lo, hi): derivative 1 on the closed interval [lo, hi], else 0;
//   maximum / minimum: at a tie each argument gets half the gradient;
//   where(c, a, b): the selected branch only.
// So inside the clip range (where clamp returns the ratio itself and l1 == l2
// exactly) the derivative is 0.5 * (dl1 + dl2) = dl1, as in autograd.

// One valid token. PPO (Schulman et al., 2017) with the dual clip of Ye et al.
// (2020): ratio = exp(clamp(logp - old, -20, 20)), l = max(-A r, -A clamp(r, lo, hi)),
// A < 0: min(l, -c A).
template <typename T>
RLHF_TOKEN_FN PolicyToken<T> policy_token(T logp, T old_logp, T adv, T ref_logp,
                                          const PolicyParams<lane_t<T>>& p) {
  using S = lane_t<T>;
  const T diff = logp - old_logp;
  const T ratio = acc_exp(clamp_keep_nan(diff, S(-20), S(20)));
  const T neg_adv = -adv;
  const T loss1 = neg_adv * ratio;
  const T loss2 = neg_adv * clamp_keep_nan(ratio, p.ratio_low, p.ratio_high);
  // d l1 / d ratio = -A; d l2 / d ratio:
  const T dloss2 = within(ratio, p.ratio_low, p.ratio_high) ? neg_adv : T{};
  PolicyToken<T> out;
  out.clipped = loss2 > loss1;
  // max(l1, l2), as the chain l1 > l2 / l2 > l1 / tie (nvcc allocates fewer
  // registers for it than for clipped ? l2 : l1).
  const auto first = loss1 > loss2;
  T dloss = first ? neg_adv : (out.clipped ? dloss2 : S(0.5) * (neg_adv + dloss2));
  T loss = first ? loss1 : (out.clipped ? loss2 : loss1);
  out.dual = mask_t<T>{};
  if (p.has_dual_clip) {
    const T loss3 = neg_adv * p.dual_clip;
    const auto negative = adv < S(0);
    out.dual = negative & (loss > loss3);
    dloss = out.dual ? T{} : ((negative & (loss == loss3)) ? S(0.5) * dloss : dloss);
    loss = out.dual ? loss3 : loss;
  }
  out.loss = loss;
  out.ratio = ratio;
  out.grad = dloss * ratio * (within(diff, S(-20), S(20)) ? T{} + S(1) : T{});
  out.kl = T{};
  if (p.kl_estimator != kKlNone) {
    // Two calls that the compiler merges (one kl_terms register-spills the
    // float64 CUDA kernel on sm_80).
    out.kl = kl_value(logp, ref_logp, p.kl_estimator);
    out.grad = out.grad + p.kl_coef * kl_grad_logp(logp, ref_logp, p.kl_estimator);
  }
  return out;
}

template <typename T>
RLHF_TOKEN_FN ValueToken<T> value_token(T values, T old_values, T returns, lane_t<T> clip) {
  using S = lane_t<T>;
  const T diff = values - old_values;
  const auto in_range = within(diff, -clip, clip);
  const T err1 = values - returns;
  // In range v_clipped is `values` itself (old + (values - old) would round
  // to a neighbour and count a spurious clip): a tie, as in exact arithmetic.
  const T err2 = in_range ? err1 : (old_values + (diff < -clip ? -clip : clip)) - returns;
  const T loss1 = err1 * err1;
  const T loss2 = err2 * err2;
  const T dloss1 = S(2) * err1;
  const T dloss2 = in_range ? S(2) * err2 : T{};
  ValueToken<T> out;
  out.clipped = loss2 > loss1;
  out.loss = S(0.5) * (out.clipped ? loss2 : loss1);
  out.grad = S(0.5) * (loss1 > loss2 ? dloss1 : (out.clipped ? dloss2 : S(0.5) * (dloss1 + dloss2)));
  return out;
}

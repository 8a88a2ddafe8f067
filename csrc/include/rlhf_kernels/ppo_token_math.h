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

// Logical not of a comparison's result: bool, or a vector mask of 0 / -1.
template <typename M>
RLHF_TOKEN_FN M mask_not(M m) {
  if constexpr (std::is_same_v<M, bool>) {
    return !m;
  } else {
    return ~m;
  }
}

// PPO (Schulman et al., 2017) with the dual clip of Ye et al. (2020):
// l = max(-A r, -A clamp(r, lo, hi)); A < 0: min(l, -c A). Sets loss,
// clipped, dual and d loss / d ratio (returned).
template <typename T>
RLHF_TOKEN_FN T clip_terms(PolicyToken<T>& out, T ratio, T adv, const PolicyParams<lane_t<T>>& p) {
  using S = lane_t<T>;
  const T neg_adv = -adv;
  const T loss1 = neg_adv * ratio;
  const T loss2 = neg_adv * clamp_keep_nan(ratio, p.ratio_low, p.ratio_high);
  // d l1 / d ratio = -A; d l2 / d ratio:
  const T dloss2 = within(ratio, p.ratio_low, p.ratio_high) ? neg_adv : T{};
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
  return dloss;
}

// DPPO's trust region (arXiv 2602.04879, verl's dppo_tv / dppo_kl): whether
// the token is kept, from the probabilities p = exp(logp), p_old =
// exp(old_logp). TV: p - p_old <= hi for A > 0, >= -lo otherwise. KL: the
// binary KL p_old (old - logp) + (1 - p_old) log((1 - p_old + 1e-8) / (1 - p
// + 1e-8)) <= hi for A > 0 unless p <= p_old, <= lo otherwise unless p >= p_old.
template <typename T>
RLHF_TOKEN_FN mask_t<T> dppo_kept(T logp, T old_logp, T adv, const PolicyParams<lane_t<T>>& p) {
  using S = lane_t<T>;
  const T prob = acc_exp(logp);
  const T old_prob = acc_exp(old_logp);
  const auto positive = adv > S(0);
  if (p.form == kFormDppoTv) {
    const T rise = prob - old_prob;
    return positive ? (rise <= p.ratio_high) : (rise >= -p.ratio_low);
  }
  const T binary_kl = old_prob * (old_logp - logp) +
                      (S(1) - old_prob) * acc_log((S(1) - old_prob + S(1e-8)) / (S(1) - prob + S(1e-8)));
  return positive ? ((binary_kl <= p.ratio_high) | (prob <= old_prob))
                  : ((binary_kl <= p.ratio_low) | (prob >= old_prob));
}

// (The helpers are called as (name)(...): no argument-dependent lookup, which
// would also find rlhf_kernels' copies from a vector-loop copy's namespace.)
// One valid token of the objective p.form (PolicyForm, ppo_math.h), plus
// kl_coef times the KL penalty to the reference. grad is d / d logp of the
// sum: through the ratio for clip and sapo, through logp with the stopped
// weight for cispo, gpg and dppo, through logp and the log-ratio for dro.
template <typename T>
RLHF_TOKEN_FN PolicyToken<T> policy_token(T logp, T old_logp, T adv, T ref_logp,
                                          const PolicyParams<lane_t<T>>& p) {
  using S = lane_t<T>;
  const T diff = logp - old_logp;
  const T ratio = acc_exp(clamp_keep_nan(diff, S(-20), S(20)));
  const T neg_adv = -adv;
  PolicyToken<T> out;
  out.ratio = ratio;
  out.clipped = mask_t<T>{};
  out.dual = mask_t<T>{};
  // d ratio / d logp = ratio inside the clamp, 0 beyond it (torch.clamp's).
  const auto ratio_moves = within(diff, S(-20), S(20));
  if (p.form == kFormClip) {
    out.grad = (clip_terms)(out, ratio, adv, p) * ratio * (ratio_moves ? T{} + S(1) : T{});
  } else if (p.form == kFormSapo) {
    const T tau = adv > S(0) ? T{} + p.ratio_high : T{} + p.ratio_low;
    // gate = sigmoid(x), x = tau (r - 1), as torch's; its complement
    // sigmoid(-x) = 1 / (1 + 1 / e) from the same e = exp(-x) (1 - gate
    // would cancel for large r; e = inf and e = 0 give 1 and 0).
    const T e = acc_exp(-(tau * (ratio - S(1))));
    const T gate = S(1) / (S(1) + e);
    const T gate_c = S(1) / (S(1) + S(1) / e);
    out.loss = neg_adv * (gate * (S(4) / tau));
    out.grad = neg_adv * (S(4) / tau) * (gate * gate_c) * tau * (ratio_moves ? ratio : T{});
  } else if (p.form == kFormGeoMean) {
    // GMPO: d clipped in A's direction (ratio_low = -clip_low, ratio_high =
    // clip_high); derivative 1 where d passes, a tie at the bound included
    // (torch's minimum splits it, its clamp passes both halves).
    const auto positive = adv > S(0);
    const auto negative = adv < S(0);
    const T upper = diff < p.ratio_high ? diff : T{} + p.ratio_high;
    const T lower = diff > p.ratio_low ? diff : T{} + p.ratio_low;
    out.loss = positive ? upper : (negative ? lower : T{});
    const T one = T{} + S(1);
    out.grad = positive ? (diff <= p.ratio_high ? one : T{}) : (negative ? (diff >= p.ratio_low ? one : T{}) : T{});
    const auto outside = (diff > p.ratio_high) | (diff < p.ratio_low);
    out.clipped = outside & positive;
    out.dual = outside & negative;
  } else if (p.form == kFormSequenceSums) {
    // A where A >= 0 (a NaN A kept); the KL column takes A where A <= 0.
    out.loss = adv < S(0) ? T{} : adv;
    out.grad = T{};
    out.clipped = adv > S(0);
    out.dual = adv < S(0);
  } else if (p.form == kFormVespoSums) {
    out.loss = clamp_keep_nan(diff, S(-20), S(20));
    out.grad = T{};
  } else if (p.form == kFormDro) {
    // -(A logp - beta / 2 d^2), d = logp - old_logp: d / d logp = -(A - beta d).
    out.loss = -(logp * adv - S(0.5) * p.ratio_low * (diff * diff));
    out.grad = -(adv - p.ratio_low * diff);
  } else {
    // -A w logp with a stopped weight w.
    T weight = T{} + S(1);
    if (p.form == kFormCispo) {
      weight = clamp_keep_nan(ratio, p.ratio_low, p.ratio_high);
      out.clipped = (ratio < p.ratio_low) | (ratio > p.ratio_high);
    } else if (p.form != kFormGpg) {  // dppo
      const auto kept = (dppo_kept)(logp, old_logp, adv, p);
      const T capped = ratio > p.dual_clip ? T{} + p.dual_clip : ratio;
      weight = kept ? capped : T{};
      out.clipped = mask_not(kept);
      out.dual = kept & (ratio > p.dual_clip);
    }
    out.loss = neg_adv * weight * logp;
    out.grad = neg_adv * weight;
  }
  out.kl = T{};
  if (p.kl_estimator != kKlNone) {
    // Two calls that the compiler merges (one kl_terms register-spills the
    // float64 CUDA kernel on sm_80).
    out.kl = kl_value(logp, ref_logp, p.kl_estimator);
    out.grad = out.grad + p.kl_coef * kl_grad_logp(logp, ref_logp, p.kl_estimator);
  } else if (p.form == kFormGeoMean) {
    out.kl = adv;  // the KL column sums A (ppo_math.h)
  } else if (p.form == kFormSequenceSums) {
    out.kl = adv > S(0) ? T{} : adv;
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

"""Plain-PyTorch references of every op, written from the formulas.

Tests compare the kernels with these in float64, benchmarks time them as the
eager baseline (the way TRL and verl compute the same quantities), and the
``"eager"`` backend (rlhf_kernels/eager) runs them where no kernel is built. ``upcast=True``
computes in float32 (float64 stays float64); ``upcast=False`` computes in the
input dtype, which is what the bf16 accuracy rule of the tests compares to.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .aggregation import AGG_MODES, agg_loss, divisor as _divisor, mask_weights  # noqa: F401  (AGG_MODES: the tests')


def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    if not upcast or dtype == torch.float64:
        return dtype
    return torch.float32


def logprobs_from_logits(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    upcast: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """``log_softmax(logits / T)[label]`` and optionally ``-sum(p * log p)``.

    logits: (..., V); labels: (...) integer. Positions whose label equals
    ``ignore_index`` give 0. A label outside [0, V) gives NaN (never an
    out-of-bounds read). Differentiable through torch autograd.
    """
    x = logits.to(_compute_dtype(logits.dtype, upcast)) / temperature
    log_probs = torch.log_softmax(x, dim=-1)
    vocab = logits.shape[-1]
    labels = labels.long()
    ignored = labels == ignore_index
    in_range = (labels >= 0) & (labels < vocab)
    safe = torch.where(in_range, labels, torch.zeros_like(labels))
    logp = log_probs.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(in_range, logp, torch.full_like(logp, float("nan")))
    logp = torch.where(ignored, torch.zeros_like(logp), logp)
    if not return_entropy:
        return logp
    probs = log_probs.exp()
    # p * log p with p = 0 (a -inf logit) is 0, not NaN; a NaN logit stays NaN.
    # log p is replaced before the product, so that autograd never multiplies
    # by -inf either (its gradient at such an entry is 0, not NaN).
    plogp = probs * torch.where(probs == 0, torch.zeros_like(log_probs), log_probs)
    entropy = -plogp.sum(-1)
    entropy = torch.where(ignored, torch.zeros_like(entropy), entropy)
    return logp, entropy


def logprobs_grad(
    grad_logp: Tensor,
    grad_entropy: Tensor | None,
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float,
    ignore_index: int,
) -> Tensor:
    """Closed-form gradient of ``sum(grad_logp * logp + grad_entropy * entropy)``
    with respect to ``logits``, in the logits' dtype:
    ``(grad_logp * (onehot - p) - grad_entropy * p * (log p + H)) / T``.
    """
    x = logits.to(_compute_dtype(logits.dtype, True)) / temperature
    log_probs = torch.log_softmax(x, dim=-1)
    probs = log_probs.exp()
    vocab = logits.shape[-1]
    labels = labels.long()
    ignored = labels == ignore_index
    in_range = (labels >= 0) & (labels < vocab)
    g = torch.where(ignored, torch.zeros_like(grad_logp), grad_logp).to(x.dtype).unsqueeze(-1)
    grad = -g * probs
    if grad_entropy is not None:
        entropy = -torch.where(probs == 0, torch.zeros_like(probs), probs * log_probs).sum(-1)
        gh = torch.where(ignored, torch.zeros_like(grad_entropy), grad_entropy).to(x.dtype)
        grad = grad - gh.unsqueeze(-1) * torch.where(
            probs == 0, torch.zeros_like(probs), probs * (log_probs + entropy.unsqueeze(-1))
        )
    safe = torch.where(in_range, labels, torch.zeros_like(labels)).unsqueeze(-1)
    grad = grad.scatter_add(-1, safe, torch.where(in_range.unsqueeze(-1), g, torch.zeros_like(g)))
    bad = ~ignored & ~in_range
    grad = torch.where(bad.unsqueeze(-1), torch.full_like(grad, float("nan")), grad)
    return (grad / temperature).to(logits.dtype)


# --- PPO losses ---------------------------------------------------------------------

def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """The (weighted) mean of x over the valid tokens of mask (0 without any)."""
    valid, weight = mask_weights(mask, x.dtype)
    x = torch.where(valid, x, torch.zeros_like(x))
    if weight is None:
        return x.sum() / valid.sum().clamp(min=1)
    return (x * weight).sum() / _divisor(weight.sum())


def _masked_extreme(x: Tensor, mask: Tensor, largest: bool) -> Tensor:
    # 0 when no token is valid (never +-inf or NaN).
    if x.numel() == 0:
        return x.new_zeros(())
    mask = mask != 0
    fill = float("-inf") if largest else float("inf")
    x = torch.where(mask, x, torch.full_like(x, fill))
    extreme = x.amax() if largest else x.amin()
    return torch.where(mask.any(), extreme, torch.zeros_like(extreme))


LOSS_TYPES = ("clip", "cispo", "sapo", "gpg", "dppo_tv", "dppo_kl", "dro", "geo_mean", "clip_cov", "kl_cov", "luspo",
              "vespo")


def _sequence_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """(B, 1): each sequence's mean of logp - old_logp over its valid tokens
    (weighted by the mask's weights; count 0 -> 1), as TRL's / verl's GSPO."""
    valid, weight = mask_weights(mask, logp.dtype)
    w = weight if weight is not None else valid.to(logp.dtype)
    x = torch.where(valid, logp - old_logp, torch.zeros_like(logp))
    return (x * w).sum(-1, keepdim=True) / w.sum(-1, keepdim=True).clamp(min=1)


def _vespo_phi(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
               params: tuple[float, float, float, float]) -> Tensor:
    """VESPO's weight as TRL's GRPOTrainer.get_gamma_weights writes it (no
    sampler ratio), per token (k, lambda by the token's advantage), detached."""
    k_pos, lambda_pos, k_neg, lambda_neg = params
    valid, weight = mask_weights(mask, logp.dtype)
    w = weight if weight is not None else valid.to(logp.dtype)
    log_ratio = torch.clamp((logp - old_logp).detach(), -20.0, 20.0)
    seq = (torch.where(valid, log_ratio, torch.zeros_like(log_ratio)) * w).sum(-1, keepdim=True)
    log_w = torch.clamp(seq, math.log(1e-8), 20.0)
    nonneg = advantages >= 0
    k = torch.where(nonneg, torch.as_tensor(k_pos, dtype=logp.dtype), torch.as_tensor(k_neg, dtype=logp.dtype))
    lam = torch.where(nonneg, torch.as_tensor(lambda_pos, dtype=logp.dtype),
                      torch.as_tensor(lambda_neg, dtype=logp.dtype)).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _cov_token_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, loss_type: str,
                    clip_low: float, clip_high: float, cov_ratio: float, cov_bounds, kl_cov_coef: float,
                    generator) -> tuple[Tensor, Tensor]:
    """Clip-Cov / KL-Cov as verl's compute_policy_loss_clip_cov / _kl_cov write
    them: (token loss, selected); the ratio clamped at e^+-20 as in the other
    objectives (verl's is not: they differ past it), kl_cov's top-k by a
    stable sort (verl: torch.topk, whose ties are unspecified)."""
    valid = mask != 0
    w = mask.to(logp.dtype) if mask.dtype != torch.bool else valid.to(logp.dtype)
    ratio = torch.exp(torch.clamp(logp - old_logp, min=-20.0, max=20.0))
    loss1 = -advantages * ratio
    flat_valid = valid.reshape(-1)
    if loss_type == "clip_cov":
        def masked_mean(x):
            return (torch.where(valid, x, torch.zeros_like(x)) * w).sum() / (w.sum() + 1e-300)

        loss2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
        clipped = (loss2 > loss1) & valid
        cov = (advantages - masked_mean(advantages)) * (logp - masked_mean(logp.detach()))
        cov = cov.detach().masked_fill(~valid | clipped, -torch.inf)
        clip_num = max(int(cov_ratio * float(w.sum())), 1)
        found = torch.nonzero(((cov < cov_bounds[1]) & (cov > cov_bounds[0]) & valid).reshape(-1)).squeeze(-1)
        perm = torch.randperm(len(found), generator=generator)
        chosen = found[perm[:min(clip_num, len(found))]]
        selected = torch.zeros_like(flat_valid)
        selected[chosen] = True
        selected = selected.reshape(valid.shape)
        return torch.maximum(loss1, loss2) * (~selected).to(logp.dtype), selected
    idx = torch.nonzero(flat_valid).squeeze(-1)
    a, lp = advantages.detach().reshape(-1)[idx], logp.detach().reshape(-1)[idx]
    selected = torch.zeros_like(flat_valid)
    if len(idx):
        cov = (a - a.mean()) * (lp - lp.mean())
        k = max(1, int(len(idx) * cov_ratio))
        selected[idx[torch.sort(cov, descending=True, stable=True).indices[:k]]] = True
    selected = selected.reshape(valid.shape)
    return torch.where(selected, loss1 + kl_cov_coef * (logp - old_logp).abs(), loss1), selected


def _geo_mean_token_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_low: float,
                         clip_high: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """GMPO as verl's compute_policy_loss_geo_mean writes it, each sequence's
    loss -mean(A) R_b spread over its tokens as -A_t R_b: (token loss, R_b per
    token, clipped with A > 0, clipped with A < 0). The mean's count is the
    sum of the weights (0 -> 1) where verl adds 1e-8."""
    x = logp - old_logp
    sgn = torch.sign(advantages)
    clamped = torch.clamp(x, -clip_low, clip_high)
    c = sgn * torch.minimum(sgn * x, sgn * clamped)
    valid, weight = mask_weights(mask, x.dtype)
    w = weight if weight is not None else valid.to(x.dtype)
    c = torch.where(valid, c, torch.zeros_like(c))
    count = w.sum(-1, keepdim=True)
    ratio = torch.exp((c * w).sum(-1, keepdim=True) / torch.where(count > 0, count, torch.ones_like(count)))
    ratio = ratio.expand_as(x)
    outside = x != clamped
    return -advantages * ratio, ratio, outside & (advantages > 0), outside & (advantages < 0)


def _policy_token_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, ratio: Tensor, loss_type: str,
                       clip_low: float, clip_high: float, dual_clip: float | None, tau_pos: float,
                       tau_neg: float, dro_beta: float | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(token loss, clipped, dual active or None) of one objective, each as
    verl's compute_policy_loss_<name> writes it (verl/trainer/ppo/core_algos.py)."""
    if loss_type == "clip":
        loss1 = -advantages * ratio
        loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
        clipped_loss = torch.maximum(loss1, loss2)
        if dual_clip is None:
            return clipped_loss, loss2 > loss1, None
        loss3 = -advantages * dual_clip
        negative = advantages < 0
        return (torch.where(negative, torch.minimum(clipped_loss, loss3), clipped_loss), loss2 > loss1,
                (clipped_loss > loss3) & negative)
    if loss_type == "cispo":
        weight = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high).detach()
        return -weight * advantages * logp, (ratio < 1.0 - clip_low) | (ratio > 1.0 + clip_high), None
    if loss_type == "sapo":
        tau = torch.where(advantages > 0, torch.as_tensor(tau_pos, dtype=ratio.dtype),
                          torch.as_tensor(tau_neg, dtype=ratio.dtype))
        gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
        return -gate * advantages, torch.zeros_like(ratio, dtype=torch.bool), None
    if loss_type == "gpg":
        return -logp * advantages, torch.zeros_like(ratio, dtype=torch.bool), None
    if loss_type == "dro":
        log_ratio = logp - old_logp
        return (-(logp * advantages - 0.5 * dro_beta * log_ratio.square()), torch.zeros_like(ratio, dtype=torch.bool),
                None)
    cap = 20.0 if dual_clip is None else dual_clip
    weight = torch.clamp(ratio, max=cap).detach()
    prob, old_prob = torch.exp(logp), torch.exp(old_logp)
    if loss_type == "dppo_tv":
        kept = torch.where(advantages > 0, (prob - old_prob) <= clip_high, (prob - old_prob) >= -clip_low)
    elif loss_type == "dppo_kl":
        binary_kl = old_prob * (old_logp - logp) + (1 - old_prob) * torch.log(
            (1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
        kept = torch.where(advantages > 0, (binary_kl <= clip_high) | (prob <= old_prob),
                           (binary_kl <= clip_low) | (prob >= old_prob))
    else:
        raise ValueError(f"loss_type: unknown objective {loss_type!r}; expected one of {LOSS_TYPES}")
    kept = kept.detach()
    return -advantages * weight * logp * kept.to(ratio.dtype), ~kept, kept & (ratio > cap)


def ppo_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    loss_type: str = "clip",
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    dro_beta: float | None = None,
    cov_ratio: float = 2e-4,
    cov_bounds: tuple[float, float] = (1.0, 5.0),
    kl_cov_coef: float = 1.0,
    generator: torch.Generator | None = None,
    vespo_params: tuple[float, float, float, float] = (2.0, 3.0, 3.0, 2.0),
    upcast: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The policy objective ``loss_type``, eagerly, as verl/OpenRLHF compute it:

    ``ratio = exp(clamp(logp - old_logp, -20, 20))``; "clip": ``l1 = -A *
    ratio``, ``l2 = -A * clamp(ratio, 1 - clip_low, 1 + clip_high)``, ``l =
    max(l1, l2)``; with ``dual_clip = c``, tokens with A < 0 take ``min(l, -c *
    A)``. The other objectives as verl's functions of the same names
    (_policy_token_loss; dppo's cap is dual_clip, default 20, its thresholds
    clip_low / clip_high; "geo_mean": _geo_mean_token_loss, its ratio
    unclamped, its clipfrac / clipfrac_lower the log-ratio outside [-clip_low,
    clip_high] where A > 0 / A < 0; "clip_cov" / "kl_cov": _cov_token_loss,
    clipfrac the share of valid tokens selected; "luspo": clip on each
    sequence's ratio exp(clamp(mean log-ratio, -20, 20)), the gradient through
    the mean, as TRL's sequence-level importance weights; "vespo": -sg(phi) A
    logp, phi from _vespo_phi, as TRL). The loss is ``agg_loss(l,
    mask, agg)``. Returns
    (loss, stats) with stats clipfrac (l2 > l1; cispo: the ratio outside its
    range; dppo: the tokens masked), clipfrac_lower (dual clip active; dppo:
    ratio > cap on a kept token), approx_kl (masked mean of old_logp - logp),
    ratio_max and ratio_min over valid tokens.
    """
    dtype = _compute_dtype(logp.dtype, upcast)
    logp, old_logp, advantages = logp.to(dtype), old_logp.to(dtype), advantages.to(dtype)
    clip_high = clip_low if clip_high is None else clip_high
    if loss_type == "geo_mean":
        token_loss, ratio, clipped, dual = _geo_mean_token_loss(logp, old_logp, advantages, mask, clip_low, clip_high)
    elif loss_type == "luspo":
        ratio = torch.exp(torch.clamp(_sequence_log_ratio(logp, old_logp, mask), -20.0, 20.0)).expand_as(logp)
        token_loss, clipped, dual = _policy_token_loss(logp, old_logp, advantages, ratio, "clip", clip_low,
                                                       clip_high, dual_clip, tau_pos, tau_neg)
    elif loss_type == "vespo":
        ratio = torch.exp(torch.clamp(logp - old_logp, min=-20.0, max=20.0))
        token_loss = -_vespo_phi(logp, old_logp, advantages, mask, vespo_params) * advantages * logp
        clipped, dual = torch.zeros_like(ratio, dtype=torch.bool), None
    elif loss_type in ("clip_cov", "kl_cov"):
        token_loss, clipped = _cov_token_loss(logp, old_logp, advantages, mask, loss_type, clip_low, clip_high,
                                              cov_ratio, cov_bounds, kl_cov_coef, generator)
        ratio, dual = torch.exp(torch.clamp(logp - old_logp, min=-20.0, max=20.0)), None
    else:
        ratio = torch.exp(torch.clamp(logp - old_logp, min=-20.0, max=20.0))
        token_loss, clipped, dual = _policy_token_loss(logp, old_logp, advantages, ratio, loss_type, clip_low,
                                                       clip_high, dual_clip, tau_pos, tau_neg, dro_beta)
    clipfrac = _masked_mean(clipped.to(dtype), mask)
    clipfrac_lower = clipfrac.new_zeros(()) if dual is None else _masked_mean(dual.to(dtype), mask)
    loss = agg_loss(token_loss, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs)
    ratio = ratio.detach()
    stats = {
        "clipfrac": clipfrac.detach(),
        "clipfrac_lower": clipfrac_lower.detach(),
        "approx_kl": _masked_mean((old_logp - logp).detach(), mask),
        "ratio_max": _masked_extreme(ratio, mask, largest=True),
        "ratio_min": _masked_extreme(ratio, mask, largest=False),
    }
    return loss, stats


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip: float = 0.2,
    agg: str = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    upcast: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss, eagerly (verl ``compute_value_loss``):
    ``v_clipped = old_values + clamp(values - old_values, -clip, clip)``,
    ``0.5 * agg(max((values - R)^2, (v_clipped - R)^2))``; stats vf_clipfrac
    (share of valid tokens where the clipped error is the larger). Inside the
    clip range v_clipped is taken as ``values`` itself, its exact value: the
    rounded ``old + (values - old)`` would make ties look clipped."""
    dtype = _compute_dtype(values.dtype, upcast)
    values, old_values, returns = values.to(dtype), old_values.to(dtype), returns.to(dtype)
    diff = values - old_values
    in_range = (diff >= -clip) & (diff <= clip)
    clipped = torch.where(in_range, values, old_values + torch.clamp(diff, -clip, clip))
    loss1 = (values - returns) ** 2
    loss2 = (clipped - returns) ** 2
    token_loss = torch.maximum(loss1, loss2)
    loss = 0.5 * agg_loss(token_loss, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs)
    stats = {"vf_clipfrac": _masked_mean((loss2 > loss1).to(dtype), mask)}
    return loss, stats


def ppo_loss_from_logits(
    logits: Tensor,
    labels: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    ref_logp: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    loss_type: str = "clip",
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    dro_beta: float | None = None,
    cov_ratio: float = 2e-4,
    cov_bounds: tuple[float, float] = (1.0, 5.0),
    kl_cov_coef: float = 1.0,
    generator: torch.Generator | None = None,
    vespo_params: tuple[float, float, float, float] = (2.0, 3.0, 3.0, 2.0),
    upcast: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The composition ``logprobs_from_logits`` -> ``ppo_policy_loss``
    + ``kl_coef * agg(kl_penalty(logp, ref_logp))`` - ``entropy_coef * agg(entropy)``.
    stats add pg_loss, kl (the aggregated penalty, 0 without ref_logp) and entropy."""
    logp, entropy = logprobs_from_logits(
        logits, labels, temperature=temperature, return_entropy=True, upcast=upcast
    )
    pg_loss, stats = ppo_policy_loss(
        logp, old_logp, advantages, mask, clip_low=clip_low, clip_high=clip_high,
        dual_clip=dual_clip, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs, loss_type=loss_type,
        tau_pos=tau_pos, tau_neg=tau_neg, dro_beta=dro_beta, cov_ratio=cov_ratio, cov_bounds=cov_bounds,
        kl_cov_coef=kl_cov_coef, generator=generator, vespo_params=vespo_params, upcast=upcast,
    )
    aggregate = lambda x: agg_loss(x, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs)  # noqa: E731
    entropy_agg = aggregate(entropy)
    loss = pg_loss - entropy_coef * entropy_agg
    if ref_logp is not None:
        kl = aggregate(kl_penalty(logp, ref_logp.to(logp.dtype), kl_estimator, upcast=upcast))
        loss = loss + kl_coef * kl
    else:
        kl = pg_loss.new_zeros(())
    stats.update(pg_loss=pg_loss.detach(), kl=kl.detach(), entropy=entropy_agg.detach())
    return loss, stats

# --- KL penalty, reward shaping, GAE, whitening, group advantages ----------------

KL_ESTIMATORS = ("k1", "abs", "k2", "mse", "k3", "low_var_kl")


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k1", *, upcast: bool = True) -> Tensor:
    """Per-token KL estimate between the policy and the reference policy
    (Schulman, "Approximating KL divergence", 2020), as in verl ``kl_penalty``:
    ``k1 = logp - ref``; ``abs = |k1|``; ``k2 = mse = k1^2 / 2``;
    ``k3 = low_var_kl = exp(x) - x - 1`` with ``x = clamp(ref - logp, -20, 20)``
    and the result clamped to [-10, 10]. Differentiable through autograd."""
    dtype = _compute_dtype(torch.promote_types(logp.dtype, ref_logp.dtype), upcast)
    logp, ref_logp = logp.to(dtype), ref_logp.to(dtype)
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "abs":
        return (logp - ref_logp).abs()
    if estimator in ("k2", "mse"):
        return 0.5 * (logp - ref_logp).square()
    if estimator in ("k3", "low_var_kl"):
        x = torch.clamp(ref_logp - logp, min=-20.0, max=20.0)
        return torch.clamp(torch.exp(x) - x - 1.0, min=-10.0, max=10.0)
    raise ValueError(f"estimator: unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def kl_penalty_grad(logp: Tensor, ref_logp: Tensor, estimator: str = "k1") -> Tensor:
    """Closed-form ``d kl / d logp`` of ``kl_penalty`` (``d kl / d ref`` is its
    negative), with torch's conventions at the clamps and at 0 for abs."""
    d = logp - ref_logp
    if estimator == "k1":
        return torch.ones_like(d)
    if estimator == "abs":
        return torch.sign(d)
    if estimator in ("k2", "mse"):
        return d
    x = ref_logp - logp
    e = torch.exp(x)
    live = (x >= -20.0) & (x <= 20.0) & (e - x - 1.0 <= 10.0)
    return torch.where(live, 1.0 - e, torch.zeros_like(e))


def shape_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """``token_rewards = -kl_coef * kl`` on valid tokens plus ``scores[b]`` at the
    last valid token of row b; 0 at masked positions. (B, T) padded layout; a
    row with no valid token gets nothing (its score is dropped)."""
    mask = mask.bool()
    rewards = torch.where(mask, -kl_coef * kl, torch.zeros_like(kl))
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    if mask.shape[-1] == 0:  # T = 0: nothing to place the score on (amax needs a nonempty dim)
        return rewards
    last = torch.where(mask, positions, torch.full_like(positions, -1)).amax(-1)
    has_any = last >= 0
    at_last = (positions == last.unsqueeze(-1)) & has_any.unsqueeze(-1)
    return rewards + torch.where(at_last, scores.to(rewards.dtype).unsqueeze(-1), torch.zeros_like(rewards))


def gae_loop(token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """GAE (Schulman et al., 2016) by the explicit reverse loop over time that
    TRL and verl run, vectorised over the batch, (B, T) padded:
    ``delta_t = r_t + gamma * V_next - V_t``, ``A_t = delta_t + gamma * lam * A_next``,
    where V_next and A_next belong to the next *valid* position (0 after the
    end): a masked position carries both through unchanged. Returns the
    unwhitened advantages and ``returns = A + V``, both 0 at masked positions."""
    mask = mask.bool()
    next_value = values.new_zeros(values.shape[0])
    running = values.new_zeros(values.shape[0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        valid = mask[:, t]
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        new_running = delta + gamma * lam * running
        running = torch.where(valid, new_running, running)
        next_value = torch.where(valid, values[:, t], next_value)
        advantages[:, t] = torch.where(valid, new_running, torch.zeros_like(new_running))
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    return advantages, returns


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """``(x - mean) * rsqrt(var + eps)`` over the valid positions, unbiased
    variance; 0 at masked positions. With fewer than two valid positions the
    variance is taken as 0 (so one valid token whitens to 0, none gives all 0)."""
    mask = mask.bool()
    count = mask.sum()
    total = torch.where(mask, x, torch.zeros_like(x)).sum()
    mean = total / count.clamp(min=1)
    centred = torch.where(mask, x - mean, torch.zeros_like(x))
    var = centred.square().sum() / (count - 1).clamp(min=1)
    var = torch.where(count > 1, var, torch.zeros_like(var))
    return torch.where(mask, (x - mean) * torch.rsqrt(var + eps), torch.zeros_like(x))


def _packed_to_padded(x: Tensor, cu_seqlens: Tensor) -> tuple[Tensor, Tensor]:
    bounds = [int(v) for v in cu_seqlens.tolist()]
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    width = max(lengths, default=0)
    out = x.new_zeros(len(lengths), max(width, 1))
    valid = torch.zeros(len(lengths), max(width, 1), dtype=torch.bool, device=x.device)
    for b, (s, n) in enumerate(zip(bounds[:-1], lengths)):
        out[b, :n] = x[s : s + n]
        valid[b, :n] = True
    return out, valid


def _padded_to_packed(x: Tensor, cu_seqlens: Tensor) -> Tensor:
    bounds = [int(v) for v in cu_seqlens.tolist()]
    parts = [x[b, : e - s] for b, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))]
    return torch.cat(parts) if parts else x.new_zeros(0)


def compute_gae(
    token_rewards: Tensor,
    values: Tensor,
    mask: Tensor | None,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
    cu_seqlens: Tensor | None = None,
    upcast: bool = True,
) -> tuple[Tensor, Tensor]:
    """GAE by the Python loop (``gae_loop``) then ``masked_whiten``; padded
    (B, T) with ``mask``, or packed (total,) with ``cu_seqlens`` (B + 1 offsets).
    Returns (advantages, returns)."""
    dtype = _compute_dtype(torch.promote_types(token_rewards.dtype, values.dtype), upcast)
    token_rewards, values = token_rewards.to(dtype), values.to(dtype)
    if mask is None:
        mask = torch.ones(values.shape, dtype=torch.bool, device=values.device)
    mask = mask.bool()
    if cu_seqlens is None:
        adv, ret = gae_loop(token_rewards, values, mask, gamma, lam)
    else:
        r2, valid = _packed_to_padded(token_rewards, cu_seqlens)
        v2, _ = _packed_to_padded(values, cu_seqlens)
        m2, _ = _packed_to_padded(mask.to(dtype), cu_seqlens)
        a2, t2 = gae_loop(r2, v2, valid & m2.bool(), gamma, lam)
        adv, ret = _padded_to_packed(a2, cu_seqlens), _padded_to_packed(t2, cu_seqlens)
    if whiten:
        adv = masked_whiten(adv, mask)
    return adv, ret


def ppo_advantages(
    scores: Tensor,
    logp: Tensor,
    ref_logp: Tensor,
    values: Tensor,
    mask: Tensor | None,
    *,
    kl_coef: float,
    estimator: str = "k1",
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
    cu_seqlens: Tensor | None = None,
    upcast: bool = True,
) -> dict[str, Tensor]:
    """KL penalty, reward shaping, GAE and whitening unfused, as in TRL/verl.
    Returns a dict with advantages, returns, token_rewards and kl."""
    dtype = _compute_dtype(torch.promote_types(torch.promote_types(logp.dtype, ref_logp.dtype), values.dtype), upcast)
    if mask is None:
        mask = torch.ones(values.shape, dtype=torch.bool, device=values.device)
    mask = mask.bool()
    kl = kl_penalty(logp.to(dtype), ref_logp.to(dtype), estimator, upcast=upcast)
    kl = torch.where(mask, kl, torch.zeros_like(kl))
    if cu_seqlens is None:
        rewards = shape_rewards(scores.to(dtype), kl, mask, kl_coef)
    else:
        kl2, valid = _packed_to_padded(kl, cu_seqlens)
        m2, _ = _packed_to_padded(mask.to(dtype), cu_seqlens)
        rewards = _padded_to_packed(shape_rewards(scores.to(dtype), kl2, valid & m2.bool(), kl_coef), cu_seqlens)
    adv, ret = compute_gae(rewards, values.to(dtype), mask, gamma=gamma, lam=lam, whiten=whiten,
                           cu_seqlens=cu_seqlens, upcast=upcast)
    return {"advantages": adv, "returns": ret, "token_rewards": rewards, "kl": kl}


def group_advantages(
    scores: Tensor,
    group_size: int | None = None,
    group_ids: Tensor | None = None,
    *,
    mode: str = "grpo",
    eps: float = 1e-6,
) -> Tensor:
    """Outcome advantages within groups of responses to one prompt, by an
    explicit loop over groups: ``grpo`` = (s - mean_g) / (std_g + eps) with the
    unbiased std (DeepSeekMath, 2024); ``dr_grpo`` = s - mean_g (Liu et al.,
    2025); ``rloo`` = s - mean of the other members (Ahmadian et al., 2024).
    A group of one gets advantage 0 in every mode (its std is taken as 0 and it
    has no other members)."""
    if group_ids is None:
        group_ids = torch.arange(scores.shape[0], device=scores.device) // group_size
    out = torch.zeros_like(scores)
    for g in torch.unique(group_ids).tolist():
        idx = (group_ids == g).nonzero().squeeze(-1)
        s = scores[idx]
        n = s.numel()
        mean = s.mean()
        if mode == "grpo":
            std = s.std(unbiased=True) if n > 1 else torch.zeros_like(mean)
            out[idx] = (s - mean) / (std + eps)
        elif mode == "dr_grpo":
            out[idx] = s - mean
        elif mode == "rloo":
            out[idx] = s - (s.sum() - s) / (n - 1) if n > 1 else torch.zeros_like(s)
        else:
            raise ValueError(f"mode: unknown mode {mode!r}")
    return out


# --- rollout correction ---------------------------------------------------------------------------

ROLLOUT_SAFETY_BOUND = 20.0  # log-ratios clamped to +-20 before exp (verl's SAFETY_BOUND)


def rollout_correction(logp: Tensor, rollout_logp: Tensor, mask: Tensor, *, level: str = "token",
                       mode: str | None = "truncate", lower: float | None = None, upper: float | None = 2.0,
                       rules: tuple = (), upcast: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """The importance weights of the trainer's log-probs against the
    sampler's and the rejection mask, written from verl's formulas
    (``rollout_corr_helper``) with TRL's lower bound: returns (weights (B, T),
    keep (B, T) bool, per-sequence statistics (B, 9): n, sum w k1, sum w k3,
    sum w |lr|, max |lr|, sum w weight, sum w [out of band], sum w [rejected],
    [a valid token rejected]). ``rules``: (option, lo, hi) with option
    "token_k1" ... "seq_max_k3" and the bounds on the statistic (k1's in log
    space)."""
    dtype = _compute_dtype(logp.dtype, upcast)
    lr = logp.to(dtype) - rollout_logp.to(dtype)
    w = mask.to(dtype)
    valid = mask != 0
    lr_safe = lr.clamp(-ROLLOUT_SAFETY_BOUND, ROLLOUT_SAFETY_BOUND)
    k = {"k1": -lr_safe, "k2": 0.5 * lr_safe ** 2, "k3": torch.exp(lr_safe) - 1 - lr_safe}
    n = w.sum(-1)
    seq_lr = (lr * w).sum(-1, keepdim=True)
    if level == "token":
        x = lr
    elif level == "sequence":
        x = seq_lr.expand_as(lr)
    else:
        x = torch.where(n[:, None] > 0, seq_lr / n[:, None].clamp_min(1e-300), 0.0).expand_as(lr)
    raw = torch.exp(x.clamp(-ROLLOUT_SAFETY_BOUND, ROLLOUT_SAFETY_BOUND))
    lo = 0.0 if lower is None else lower
    hi = float("inf") if upper is None else upper
    out_of_band = (raw < lo) | (raw > hi)
    if mode is None:
        weights = torch.ones_like(raw)
    elif mode == "truncate":
        weights = raw.clamp(lo, hi)
    else:
        weights = torch.where(out_of_band, 0.0, raw)
    weights = torch.where(valid, weights, 0.0)
    keep = valid.clone()
    for option, r_lo, r_hi in rules:
        agg, est = option.rsplit("_", 1)
        stat = k[est]
        if agg == "seq_sum":
            stat = (stat * w).sum(-1, keepdim=True)
        elif agg == "seq_mean":
            stat = torch.where(n[:, None] > 0, (stat * w).sum(-1, keepdim=True) / n[:, None].clamp_min(1e-300), 0.0)
        elif agg == "seq_max":
            top = stat.masked_fill(~valid, float("-inf")).amax(-1, keepdim=True)
            stat = torch.where(valid.any(-1, keepdim=True), top, 0.0)
        keep &= (stat >= r_lo) & (stat <= r_hi)
    rejected = valid & ~keep
    stats = torch.stack([
        n, (k["k1"] * w).sum(-1), (k["k3"] * w).sum(-1), (lr.abs() * w).sum(-1),
        torch.where(valid, lr.abs(), 0.0).amax(-1) if lr.shape[-1] > 0 else n * 0,
        (weights * w).sum(-1), (out_of_band & valid).to(dtype).mul(w).sum(-1), rejected.to(dtype).mul(w).sum(-1),
        rejected.any(-1).to(dtype),
    ], dim=-1)
    return weights, keep, stats

"""The PPO losses in plain torch ops (the "eager" backend):
``rlhf_kernels.reference`` itself, differentiated by torch autograd (the
kernels' gradients are defined as that autograd, tie rules included)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .._validation import check_labels_in_range
from .advantages import ESTIMATOR_NAMES
from .logprobs import grad_into_input

_POLICY_STATS = ("clipfrac", "clipfrac_lower", "approx_kl", "ratio_max", "ratio_min")


def _computed(mask: Tensor, *tensors: Tensor) -> list[Tensor]:
    """The tensors in the computation dtype, masked positions set to 0: as in
    the kernels, whatever a masked position holds (NaN) gets a zero gradient."""
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    valid = mask != 0
    return [torch.where(valid, t.to(dtype), 0.0) for t in tensors]


def _objective(ratio_low: float, ratio_high: float, dual_clip: float, loss_type: int) -> dict:
    """The reference's keywords of the kernels' numbers of an objective
    (PolicyParams, csrc/include/rlhf_kernels/ppo_math.h; ops/ppo_options.py)."""
    name = reference.LOSS_TYPES[loss_type]
    if name == "sapo":
        return dict(loss_type=name, tau_neg=ratio_low, tau_pos=ratio_high)
    if name == "dro":
        return dict(loss_type=name, dro_beta=ratio_low)
    if name.startswith("dppo"):
        return dict(loss_type=name, clip_low=ratio_low, clip_high=ratio_high, dual_clip=dual_clip)
    return dict(loss_type=name, clip_low=1.0 - ratio_low, clip_high=ratio_high - 1.0, dual_clip=dual_clip or None)


def policy_loss(logp, old_logp, advantages, mask, ratio_low, ratio_high, dual_clip, loss_type, agg, num_tokens,
                num_seqs):
    """ppo_policy_loss's contract: (loss, stats (5,)); the objective as the
    kernels take it (_objective), agg the index in AGG_MODES."""
    loss, stats = reference.ppo_policy_loss(
        *_computed(mask, logp, old_logp, advantages), mask, agg=reference.AGG_MODES[agg], num_tokens=num_tokens,
        num_seqs=num_seqs, **_objective(ratio_low, ratio_high, dual_clip, loss_type),
    )
    return loss, torch.stack([stats[name] for name in _POLICY_STATS])


GEO_MEAN, SEQUENCE_SUMS, VESPO_SUMS = 7, 8, 9  # the rows' forms (PolicyForm, csrc/include/rlhf_kernels/ppo_math.h)


def policy_rows(logp, old_logp, advantages, mask, ratio_low, ratio_high, dual_clip, loss_type, need_grad):
    """ppo_policy_rows's contract for the forms that need it (an empty grad,
    rows (B, 9) of the PolicyStat columns): geo_mean (7), the loss column
    differentiated by autograd, GMPO's token term written as verl's
    compute_policy_loss_geo_mean (its tie rules), ratio_low = -clip_low; the
    sums of the rows-only forms 8 (A where A >= 0 in the loss column, A where
    A <= 0 in the KL column, the tokens with A > 0 / A < 0 counted as clipped
    / dual) and 9 (the log-ratio clamped to [-20, 20] in the loss column)."""
    if loss_type not in (GEO_MEAN, SEQUENCE_SUMS, VESPO_SUMS):
        raise ValueError(f"loss_type: the eager ppo_policy_rows serves geo_mean (7) and the rows forms 8 and 9, "
                         f"not {loss_type}")
    logp, old_logp, advantages = _computed(mask, logp, old_logp, advantages)
    valid, weight = reference.mask_weights(mask, logp.dtype)
    w = weight if weight is not None else valid.to(logp.dtype)
    x = logp - old_logp
    zeros = w.sum(-1) * 0.0
    if loss_type == GEO_MEAN:
        sgn = torch.sign(advantages)
        term = sgn * torch.minimum(sgn * x, sgn * torch.clamp(x, ratio_low, ratio_high))
        outside = ((x > ratio_high) | (x < ratio_low)) & valid
        clipped, dual, kl = outside & (advantages > 0), outside & (advantages < 0), advantages
    elif loss_type == SEQUENCE_SUMS:
        term = torch.where(advantages < 0, 0.0, advantages)
        clipped, dual = (advantages > 0) & valid, (advantages < 0) & valid
        kl = torch.where(advantages > 0, 0.0, advantages)
    else:
        term = torch.clamp(x, -20.0, 20.0)
        clipped = dual = torch.zeros_like(valid)
        kl = torch.zeros_like(x)
    ratio = torch.exp(torch.clamp(x, -20.0, 20.0))
    columns = [
        (term * w).sum(-1), w.sum(-1), clipped.to(w.dtype).mul(w).sum(-1), dual.to(w.dtype).mul(w).sum(-1),
        ((old_logp - logp) * w).sum(-1),
        torch.where(valid, ratio, -torch.inf).amax(-1) if x.shape[-1] else zeros - torch.inf,
        torch.where(valid, ratio, torch.inf).amin(-1) if x.shape[-1] else zeros + torch.inf,
        (kl * w).sum(-1), zeros,
    ]
    return logp.new_empty(0), torch.stack(columns, -1).reshape(-1, len(columns))


def value_loss(values, old_values, returns, mask, clip, agg, num_tokens, num_seqs):
    """ppo_value_loss's contract: (loss, stats (1,) = vf_clipfrac)."""
    loss, stats = reference.ppo_value_loss(
        *_computed(mask, values, old_values, returns), mask, clip=clip, agg=reference.AGG_MODES[agg],
        num_tokens=num_tokens, num_seqs=num_seqs,
    )
    return loss, stats["vf_clipfrac"].reshape(1)


def ppo_loss_from_logits(logits, labels, old_logp, advantages, mask, ref_logp, temperature, ratio_low, ratio_high,
                         dual_clip, loss_type, agg, num_tokens, num_seqs, kl_coef, kl_estimator, entropy_coef,
                         inplace_backward, need_grad, count, max_rows_in_flight):
    """ppo_loss_from_logits' contract: (loss, stats (8,)); count divides the loss
    and its aggregated terms (a global count given as a tensor)."""
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():  # raising needs a value
        check_labels_in_range(labels, logits.shape[-1], -100)
    tensors = _computed(mask, old_logp, advantages, *(() if ref_logp is None else (ref_logp,)))
    loss, stats = reference.ppo_loss_from_logits(
        grad_into_input(logits, inplace_backward), labels, tensors[0], tensors[1], mask, temperature=temperature,
        **_objective(ratio_low, ratio_high, dual_clip, loss_type), agg=reference.AGG_MODES[agg],
        num_tokens=num_tokens, num_seqs=num_seqs,
        ref_logp=tensors[2] if ref_logp is not None else None, kl_coef=kl_coef,
        kl_estimator=ESTIMATOR_NAMES.get(kl_estimator, "k3"), entropy_coef=entropy_coef,
    )
    stats = torch.stack([stats[name] for name in _POLICY_STATS + ("pg_loss", "kl", "entropy")])
    if count is not None:
        divisor = count.to(loss.dtype)
        loss = loss / divisor
        stats = torch.cat([stats[:5], stats[5:] / divisor])
    return loss, stats

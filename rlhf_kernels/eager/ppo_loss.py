"""The PPO losses in plain torch ops (the "reference" backend): the token
losses are ``rlhf_kernels.reference`` itself, differentiated by torch autograd
(the kernels' gradients are defined as that autograd, tie rules included);
the from-logits path composes the kernels' closed form."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from . import logprobs as _logprobs

_POLICY_STATS = ("clipfrac", "clipfrac_lower", "approx_kl", "ratio_max", "ratio_min")


def _computed(mask: Tensor, *tensors: Tensor) -> list[Tensor]:
    """The tensors in the computation dtype, masked positions set to 0: as in
    the kernels, whatever a masked position holds (NaN) gets a zero gradient."""
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    valid = mask != 0
    return [torch.where(valid, t.to(dtype), 0.0) for t in tensors]


def policy_loss(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, agg, num_tokens, num_seqs):
    """ppo_policy_loss's contract: (loss, stats (5,)); agg the index in AGG_MODES, dual_clip 0 for none."""
    loss, stats = reference.ppo_policy_loss(
        *_computed(mask, logp, old_logp, advantages), mask, clip_low=clip_low, clip_high=clip_high,
        dual_clip=dual_clip or None, agg=reference.AGG_MODES[agg], num_tokens=num_tokens, num_seqs=num_seqs,
    )
    return loss, torch.stack([stats[name] for name in _POLICY_STATS])


def value_loss(values, old_values, returns, mask, clip, agg, num_tokens, num_seqs):
    """ppo_value_loss's contract: (loss, stats (1,) = vf_clipfrac)."""
    loss, stats = reference.ppo_value_loss(
        *_computed(mask, values, old_values, returns), mask, clip=clip, agg=reference.AGG_MODES[agg],
        num_tokens=num_tokens, num_seqs=num_seqs,
    )
    return loss, stats["vf_clipfrac"].reshape(1)


def _clamp_t(x: Tensor, lo, hi) -> Tensor:
    return torch.where(x < lo, lo, torch.where(x > hi, hi, x))


def policy(logp, old_logp, adv, mask, ref_logp, entropy, seq_len, ratio_low, ratio_high,
                  dual_clip, kl_coef, kl_code, need_grad):
    """The kernels' closed form in plain torch ops (the "reference" backend)."""
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    half = 0.5
    diff = logp - old_logp
    ratio = torch.exp(_clamp_t(diff, -20.0, 20.0))
    d_log_ratio = ((diff >= -20.0) & (diff <= 20.0)).to(logp.dtype)
    neg_adv = -adv
    loss1 = neg_adv * ratio
    loss2 = neg_adv * _clamp_t(ratio, ratio_low, ratio_high)
    dloss2 = torch.where((ratio >= ratio_low) & (ratio <= ratio_high), neg_adv, zero)
    clipped = loss2 > loss1
    loss = torch.where(clipped, loss2, loss1)
    dloss = torch.where(loss1 > loss2, neg_adv, torch.where(clipped, dloss2, half * (neg_adv + dloss2)))
    dual = torch.zeros_like(mask)
    if dual_clip > 0:
        loss3 = neg_adv * dual_clip
        negative = adv < 0
        dual = negative & (loss > loss3)
        dloss = torch.where(dual, zero, torch.where(negative & (loss == loss3), half * dloss, dloss))
        loss = torch.where(dual, loss3, loss)
    grad = dloss * ratio * d_log_ratio
    kl = torch.zeros_like(logp)
    if kl_code >= 0:
        k1 = logp - ref_logp
        if kl_code == 0:
            kl, dkl = k1, torch.ones_like(k1)
        elif kl_code == 1:
            kl, dkl = k1.abs(), torch.sign(k1)
        elif kl_code == 2:
            kl, dkl = half * (k1 * k1), k1
        else:
            d_raw = ref_logp - logp
            d = _clamp_t(d_raw, -20.0, 20.0)
            e = torch.exp(d)
            k = e - d - 1.0
            kl = _clamp_t(k, -10.0, 10.0)
            passes = (d_raw >= -20.0) & (d_raw <= 20.0) & (k >= -10.0) & (k <= 10.0)
            dkl = torch.where(passes, 1.0 - e, zero)
        grad = grad + kl_coef * dkl
    seqs = logp.numel() // seq_len if seq_len > 0 else 0

    def per_seq(x: Tensor) -> Tensor:
        return torch.where(mask, x, zero).view(seqs, seq_len).sum(-1)

    inf = torch.tensor(float("inf"), dtype=logp.dtype, device=logp.device)
    ratio_seq = ratio.view(seqs, seq_len)
    mask_seq = mask.view(seqs, seq_len)
    columns = [
        per_seq(loss), per_seq(torch.ones_like(loss)), per_seq(clipped.to(logp.dtype)),
        per_seq(dual.to(logp.dtype)), per_seq(old_logp - logp),
        torch.where(mask_seq, ratio_seq, -inf).amax(-1) if seq_len > 0 else zero.expand(seqs),
        torch.where(mask_seq, ratio_seq, inf).amin(-1) if seq_len > 0 else zero.expand(seqs),
        per_seq(kl), per_seq(entropy) if entropy is not None else zero.expand(seqs),
    ]
    grad = torch.where(mask, grad, zero) if need_grad else logp.new_empty(0)
    return grad, torch.stack(columns, dim=-1)


def value(values, old_values, returns, mask, seq_len, clip, need_grad):
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    diff = values - old_values
    in_range = (diff >= -clip) & (diff <= clip)
    err1 = values - returns
    err2 = torch.where(in_range, err1, (old_values + _clamp_t(diff, -clip, clip)) - returns)
    loss1, loss2 = err1 * err1, err2 * err2
    dloss1 = 2.0 * err1
    dloss2 = torch.where(in_range, 2.0 * err2, zero)
    clipped = loss2 > loss1
    loss = 0.5 * torch.where(clipped, loss2, loss1)
    grad = 0.5 * torch.where(loss1 > loss2, dloss1, torch.where(clipped, dloss2, 0.5 * (dloss1 + dloss2)))
    seqs = values.numel() // seq_len if seq_len > 0 else 0

    def per_seq(x: Tensor) -> Tensor:
        return torch.where(mask, x, zero).view(seqs, seq_len).sum(-1)

    stats = torch.stack([per_seq(loss), per_seq(torch.ones_like(loss)), per_seq(clipped.to(values.dtype))], -1)
    return (torch.where(mask, grad, zero) if need_grad else values.new_empty(0)), stats


def logits_grad(logits, labels, old_logp, adv, row_weight, ref_logp, grad_logits, inv_temperature,
                           ratio_low, ratio_high, dual_clip, kl_coef, kl_code, entropy_coef):
    """Forward, token pass, backward as three steps, in plain torch."""
    logp, entropy, row_max, log_sum = _logprobs.forward(logits, labels, inv_temperature, -100, True)
    valid = row_weight != 0
    grad, _ = policy(logp, old_logp, adv, valid, ref_logp, None, max(1, logp.numel()),
                                   ratio_low, ratio_high, dual_clip, kl_coef, kl_code, True)
    grad_logp = grad * row_weight
    grad_entropy = (-entropy_coef * row_weight) if entropy_coef != 0.0 else None
    _logprobs.backward(grad_logp, grad_entropy, logits, labels, row_max, log_sum,
                               entropy if grad_entropy is not None else None, grad_logits,
                               inv_temperature, -100)
    return logp, entropy, row_max, log_sum

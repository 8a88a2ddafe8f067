"""The policy objectives composed around the token kernels of ppo_loss.py:
each is either a token form of the policy kernels (``loss_code``), or the
token kernels on transformed inputs (GSPO-token's sequence ratio, the
token weights folded into the advantages, clip_cov / kl_cov's selected
tokens, VESPO's per-sequence weight), or a loss from the kernels'
per-sequence sums (``ppo_policy_rows``: GMPO; PPO's clip on GSPO's and
LUSPO's sequence ratio). ``policy_loss`` is
``ppo_policy_loss`` on checked inputs and options, for every loss type.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .._dispatch import implementation, register, triton_installed
from .._validation import FLOAT_DTYPES, check_same_device, check_tensor, check_tokens, check_weights, compute_dtype
from ..aggregation import (
    AGG_MODES, APPROX_KL, CLIP, COUNT, DUAL, KL_SUM, N_POLICY_STATS, PG_SUM, POLICY_STAT_NAMES, agg_loss, divide,
    divisor, mask_weights, policy_stats, sequence_weights,
)
from ..eager import ppo_loss as _eager
from ._op import differentiable, native_op, no_double_backward
from .ppo_options import KERNEL_FORMS, PPOLossOptions

if triton_installed():
    from ..triton import ppo_loss as _triton  # noqa: F401  (defines the rlhf_kernels::*_triton ops)


# --- the policy token pass alone: (grad, rows), rows the per-sequence sums (B, 9) ---
# (GMPO's sequence terms); differentiable through the loss column only: d
# rows[b, PG_SUM] / d logp_t = grad_t, the other columns are statistics.


def _policy_rows_fake(logp, old_logp, advantages, mask, ratio_low, ratio_high, dual_clip, loss_type, need_grad):
    dtype = compute_dtype(logp, old_logp, advantages)
    return (logp.new_empty((logp.numel() if need_grad else 0,), dtype=dtype),
            logp.new_empty((math.prod(logp.shape[:-1]), N_POLICY_STATS), dtype=dtype))


def _policy_rows_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[0])
    if ctx.needs_input_grad[0]:
        ctx.shape, ctx.dtype = inputs[0].shape, inputs[0].dtype
        ctx.save_for_backward(output[0])


def _policy_rows_backward(ctx, _, grad_rows):
    grads = [None] * len(ctx.needs_input_grad)
    if ctx.needs_input_grad[0]:
        no_double_backward("ppo_policy_rows", grad_rows)
        (grad,) = ctx.saved_tensors
        if grad.numel() != math.prod(ctx.shape):
            raise RuntimeError("ppo_policy_rows: called with need_grad=False, it kept no token gradient")
        seqs = grad_rows.shape[0]
        token = grad.view(seqs, -1) * grad_rows[:, PG_SUM].to(grad.dtype).unsqueeze(-1)
        grads[0] = token.view(ctx.shape).to(ctx.dtype)
    return tuple(grads)


for _backends, _op in ((("cpu", "cuda"), native_op("ppo_policy_rows")),
                       (("triton",), torch.ops.rlhf_kernels.ppo_policy_rows_triton.default
                        if triton_installed() else None)):
    if _op is not None:
        torch.library.register_fake(_op)(_policy_rows_fake)
        register("ppo_policy_rows", _backends, differentiable(_op, _policy_rows_setup_context,
                                                              _policy_rows_backward))
register("ppo_policy_rows", ("eager",), _eager.policy_rows)


def _check_token_weights(advantages: Tensor, token_weights: Tensor, shape) -> None:
    check_tensor("token_weights", token_weights, FLOAT_DTYPES)
    check_same_device(advantages=advantages, token_weights=token_weights)
    check_tokens("advantages", shape, token_weights=token_weights)
    check_weights("token_weights", token_weights)


def weighted_advantages(advantages: Tensor, token_weights: Optional[Tensor], shape, loss_type: str) -> Tensor:
    """advantages * token_weights (in the computation dtype), detached. The
    clipped objective is positively homogeneous in A, per token: w * l(A) =
    l(w * A) for w >= 0, the dual clip included (sign(w A) = sign(A)), and so
    is its gradient; so the policy kernels weight a token's policy term by
    scaling its advantage, and the KL and entropy terms stay unweighted (as
    verl's rollout correction and OpenRLHF's IS correction weight them). A
    token of weight 0 counts as unclipped in clipfrac."""
    advantages = advantages.detach()
    if token_weights is None:
        return advantages
    if loss_type == "dro":
        raise ValueError("token_weights: not with loss_type='dro' (its log-ratio penalty is not proportional to A)")
    _check_token_weights(advantages, token_weights, shape)
    dtype = compute_dtype(advantages, token_weights)
    return advantages.to(dtype) * token_weights.detach().to(dtype)


def _sequence_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor, backend: Optional[str]) -> Tensor:
    """old' that makes the token kernels compute GSPO-token's sequence ratio
    (ratio_level "sequence-token", verl's gspo; Zheng et al., 2025): s_b =
    the (weighted) mean of logp - old_logp over the valid tokens of sequence
    b (divided by max(count, 1), as verl), old' = sg(logp) - s_b, so that
    each token's ratio exp(logp - old') has the value exp(s_b) and its
    gradient flows through the token's own log-prob. The sums in one token
    pass of the kernels (ppo_policy_rows, form geo_mean: the count and the
    sum of old - logp per sequence, accumulated in the computation dtype),
    then old' in one pass. (The gradient through the sequence mean, level
    "sequence", is _sequence_clip_loss.)"""
    # the two columns read do not depend on A: old_logp in its place, no third tensor read
    rows = implementation("ppo_policy_rows", backend, logp.device)(
        logp.detach(), old_logp.detach(), old_logp.detach(), mask, 0.0, 0.0, 0.0,
        KERNEL_FORMS.index("geo_mean"), False)[1]
    counts = rows[:, COUNT].clamp(min=1).view(logp.shape[:-1])
    seq_log_ratio = (-rows[:, APPROX_KL]).view(logp.shape[:-1]) / counts
    dtype = compute_dtype(logp, old_logp)
    return logp.detach().to(dtype) - seq_log_ratio.to(dtype).unsqueeze(-1)


SEQUENCE_SUMS, VESPO_SUMS = 8, 9  # ppo_policy_rows' rows-only forms (PolicyForm, csrc/include/rlhf_kernels/ppo_math.h)


class _PerSequenceGradient(torch.autograd.Function):
    """``loss`` (computed) in value; backward, d loss / d logp_t = upstream *
    c_b * w_t on the valid tokens of sequence b (w_t the mask's weight, 1
    for a bool mask), 0 elsewhere: one pass over the mask."""

    @staticmethod
    def forward(ctx, logp: Tensor, loss: Tensor, coef: Tensor, mask: Tensor) -> Tensor:
        ctx.save_for_backward(coef, mask)
        ctx.shape, ctx.dtype = logp.shape, logp.dtype
        return loss.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        no_double_backward("ppo_policy_loss", grad, "the sequence coefficients are computed without autograd")
        coef, mask = ctx.saved_tensors
        c = (coef * grad).to(ctx.dtype).unsqueeze(-1)
        m = mask.reshape(c.shape[0], ctx.shape[-1])
        # a bool mask through its bytes: torch's CPU conversion from uint8 is
        # vectorized, from bool it is not (about 5x slower at 1M tokens)
        token = m.view(torch.uint8).to(ctx.dtype).mul_(c) if m.dtype == torch.bool else (m * c).to(ctx.dtype)
        return token.view(ctx.shape), None, None, None


def _sequence_clip_finish(rows: Tensor, ratio_low: float, ratio_high: float, dual_clip: float, agg: int,
                          num_tokens: Optional[float], num_seqs: Optional[float],
                          seq_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """The op ppo_sequence_clip (csrc/ops.cpp) composed of torch ops: from
    the (B, 9) rows of ppo_policy_rows' form 8, (loss, coef (B,), stats (5,))
    as aggregation.h's finalize_sequence_clip writes them."""
    counts = rows[:, COUNT]
    n = counts.clamp(min=1)
    log_ratio = -rows[:, APPROX_KL] / n
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
    pos, neg = rows[:, PG_SUM], rows[:, KL_SUM]
    upper, lower = ratio.clamp(max=ratio_high), ratio.clamp(min=ratio_low)
    d_upper, d_lower = (ratio <= ratio_high).to(ratio.dtype), (ratio >= ratio_low).to(ratio.dtype)
    dual = torch.zeros_like(ratio, dtype=torch.bool)
    if dual_clip > 0:
        dual = lower > dual_clip
        d_lower = torch.where(dual, 0.0, torch.where(lower == dual_clip, 0.5 * d_lower, d_lower))
        lower = torch.where(dual, dual_clip, lower)
    weights = sequence_weights(counts, seq_len, AGG_MODES[agg], num_tokens, num_seqs)
    loss = (weights * -(pos * upper + neg * lower)).sum()
    moves = ((log_ratio >= -20.0) & (log_ratio <= 20.0)).to(ratio.dtype)
    coef = weights * -(pos * d_upper + neg * d_lower) * ratio * moves / n
    nonempty = (counts > 0) & (ratio == ratio)
    table = torch.stack([
        torch.zeros_like(counts), counts,
        torch.where(ratio > ratio_high, rows[:, CLIP], 0.0) + torch.where(ratio < ratio_low, rows[:, DUAL], 0.0),
        torch.where(dual, rows[:, DUAL], 0.0), rows[:, APPROX_KL],
        torch.where(nonempty, ratio, -math.inf), torch.where(nonempty, ratio, math.inf),
        torch.zeros_like(counts), torch.zeros_like(counts),
    ], -1)
    return loss, coef, policy_stats(table)


def _sequence_clip_fake(rows, *args):
    return rows.new_empty(()), rows.new_empty((rows.shape[0],)), rows.new_empty((len(POLICY_STAT_NAMES),))


register("ppo_sequence_clip", ("triton", "eager"), _sequence_clip_finish)
if native_op("ppo_sequence_clip") is not None:  # a host loop (CPU), one thread block (CUDA)
    torch.library.register_fake(native_op("ppo_sequence_clip"))(_sequence_clip_fake)
    register("ppo_sequence_clip", ("cpu", "cuda"), native_op("ppo_sequence_clip"))


def _sequence_clip_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, o: PPOLossOptions,
                        seq_len: int) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clip on GSPO's sequence ratio with the gradient through the
    sequence mean (ratio_level "sequence": GSPO, OpenRLHF's "gspo", TRL's
    "luspo"), from the per-sequence sums of one token pass (ppo_policy_rows,
    form 8) and the loss of B numbers (ppo_sequence_clip): with s_b = sum_t
    w_t (logp - old_logp) / max(n_b, 1), r_b = exp(clamp(s_b, -20, 20)) and
    P_b / N_b the weighted sums of A where A > 0 / A < 0, the sequence's loss
    is -(P_b min(r_b, hi) + N_b max(r_b, lo)) (A < 0 with the dual clip: -N_b
    c where max(r_b, lo) > c), the tie rules of the token kernels' clip (a
    bound's derivative passes; half at the dual clip's tie), and d L / d
    logp_t = w_b (d loss_b / d r_b) r_b w_t / max(n_b, 1): the backward is one
    pass over the mask. ``advantages`` already weighted (token_weights). The
    stats are the token kernels' on the same ratio: clipfrac the share of the
    valid tokens with A > 0 in sequences with r_b > hi and A < 0 with r_b <
    lo, ratio_max / ratio_min over the r_b."""
    rows = implementation("ppo_policy_rows", o.backend, logp.device)(
        logp.detach(), old_logp.detach(), advantages, mask, 0.0, 0.0, 0.0, SEQUENCE_SUMS, False)[1]
    loss, coef, stats = implementation("ppo_sequence_clip", o.backend, logp.device)(
        rows, o.ratio_low, o.ratio_high, o.dual_clip, o.agg_code, o.kernel_num_tokens, o.kernel_num_seqs, seq_len)
    loss = _PerSequenceGradient.apply(logp, loss, coef, mask)
    return loss, dict(zip(POLICY_STAT_NAMES, stats.unbind()))


def _geo_mean_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, o: PPOLossOptions,
                   seq_len: int) -> tuple[Tensor, dict[str, Tensor]]:
    """GMPO (Zhao et al., 2025, arXiv 2507.20673; verl's geo_mean) on the
    kernels' per-sequence sums (ppo_policy_rows, form geo_mean): with c_t the
    log-ratio clipped in A's direction, S_b = sum_t w_t c_t, n_b = sum_t w_t
    (0 -> 1) and R_b = exp(S_b / n_b), each token's loss is -A_t R_b, so
    ``agg`` gives sum_b w_b (-sum_t w_t A_t) R_b with the aggregation's
    sequence weights w_b; d R_b / d logp_t = R_b w_t [c_t passes] / n_b, one
    pass over the tokens each way. ``advantages`` already weighted
    (token_weights). The stats are GMPO's: clipfrac / clipfrac_lower the
    share of valid tokens with the log-ratio outside [-clip_low, clip_high]
    and A > 0 / A < 0 (verl's pg_clipfrac / pg_clipfrac_lower), ratio_max /
    ratio_min over the R_b of the sequences with a valid token."""
    rows = implementation("ppo_policy_rows", o.backend, logp.device)(
        logp, old_logp.detach(), advantages, mask, o.ratio_low, o.ratio_high, 0.0, o.loss_code,
        logp.requires_grad and torch.is_grad_enabled())[1]
    counts = rows[:, COUNT].detach()
    seq_ratio = torch.exp(rows[:, PG_SUM] / divisor(counts))
    weights = sequence_weights(counts, seq_len, o.agg, o.kernel_num_tokens, o.kernel_num_seqs)
    loss = (weights * -rows[:, KL_SUM].detach() * seq_ratio).sum()
    stats = rows.detach()
    total = divisor(counts.sum())
    nonempty = counts > 0
    found = nonempty.any()
    ratio = seq_ratio.detach()
    ratio_max = torch.where(nonempty, ratio, -math.inf).amax() if ratio.numel() else ratio.new_zeros(())
    ratio_min = torch.where(nonempty, ratio, math.inf).amin() if ratio.numel() else ratio.new_zeros(())
    return loss, {
        "clipfrac": stats[:, CLIP].sum() / total, "clipfrac_lower": stats[:, DUAL].sum() / total,
        "approx_kl": stats[:, APPROX_KL].sum() / total, "ratio_max": torch.where(found, ratio_max, 0.0),
        "ratio_min": torch.where(found, ratio_min, 0.0),
    }


def _cov_selected(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                  o: PPOLossOptions) -> tuple[Tensor, Tensor]:
    """(the (..., T) bool tokens clip_cov / kl_cov select, their share of the
    valid tokens as clipfrac). The covariance (A - mean A)(logp - mean logp)
    over the whole batch in float64: clip_cov's means weighted by the mask, a
    random choice among the valid unclipped tokens with the covariance inside
    its bounds (torch.randperm over them in row-major order, one host read of
    their count); kl_cov's means unweighted, the tokens of largest covariance
    by a stable sort (ties to the lower row-major index; no host read)."""
    cov = o.cov
    valid, weight = mask_weights(mask, torch.float64)
    w = weight if weight is not None else valid.to(torch.float64)
    a = torch.where(valid, advantages.detach().to(torch.float64), 0.0)
    lp = torch.where(valid, logp.detach().to(torch.float64), 0.0)
    if o.loss_type == "clip_cov":
        total = w.sum()
        centred = (a - (a * w).sum() / total.clamp(min=1e-300)) * (lp - (lp * w).sum() / total.clamp(min=1e-300))
        ratio = torch.exp(lp - old_logp.detach().to(torch.float64))
        clipped = -a * ratio.clamp(1.0 - o.clip_low, 1.0 + o.clip_high) > -a * ratio
        candidates = valid & ~clipped & (centred > cov.low) & (centred < cov.high)
        flat = torch.nonzero(candidates.reshape(-1)).squeeze(-1)
        n_found, mask_sum = flat.shape[0], float(total)
        take = min(max(int(cov.ratio * mask_sum), 1), n_found)
        device = cov.generator.device if cov.generator is not None else torch.device("cpu")
        chosen = flat[torch.randperm(n_found, generator=cov.generator, device=device)[:take].to(flat.device)]
        selected = torch.zeros(candidates.numel(), dtype=torch.bool, device=mask.device)
        selected[chosen] = True
        selected = selected.reshape(candidates.shape)
    else:
        n = valid.sum().to(torch.float64)
        centred = (a - a.sum() / n.clamp(min=1)) * (lp - lp.sum() / n.clamp(min=1))
        key = torch.where(valid, centred, -math.inf).reshape(-1)
        order = torch.sort(key, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        k = torch.floor(n * cov.ratio).clamp(min=1)
        selected = valid & (rank.reshape(valid.shape) < k)
    share = (selected.to(torch.float64) * w).sum() / divisor(w.sum())
    return selected, share


def _vespo_advantages(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                      token_weights: Optional[Tensor], params: tuple[float, float, float, float],
                      backend: Optional[str]) -> Tensor:
    """A phi, detached, in the computation dtype, with VESPO's (TRL's
    get_gamma_weights) phi = exp(lambda + k log w - lambda w), log w =
    clamp(S_b, log 1e-8, 20), S_b the sum over sequence b's valid tokens of
    clamp(logp - old_logp, -20, 20) (weighted by the mask's weights; one
    token pass of the kernels, ppo_policy_rows form 9) plus, with
    token_weights, of clamp(log token_weight, log 1e-8, 20); (k, lambda)
    = (k_pos, lambda_pos) where A >= 0, else (k_neg, lambda_neg), lambda
    clamped at >= 1e-4; NaN and +-inf phi give 0, as TRL's. Both signs' phi
    per sequence (float64), then A phi_pos where A > 0, A phi_neg elsewhere
    (scale_by_sign: one pass natively)."""
    k_pos, lambda_pos, k_neg, lambda_neg = params
    dtype = compute_dtype(logp, old_logp, advantages)
    # form 9 reads no advantage: old_logp in its place, no third tensor read
    rows = implementation("ppo_policy_rows", backend, logp.device)(
        logp.detach(), old_logp.detach(), old_logp.detach(), mask, 0.0, 0.0, 0.0, VESPO_SUMS, False)[1]
    log_w = rows[:, PG_SUM].reshape(*logp.shape[:-1], 1)
    if token_weights is not None:
        _check_token_weights(advantages, token_weights, logp.shape)
        valid, _ = mask_weights(mask, dtype)
        # filled, not multiplied by the mask: the tokens outside it may hold NaN
        log_tw = token_weights.detach().to(dtype).log().clamp_(math.log(1e-8), 20.0).masked_fill_(~valid, 0.0)
        log_w = log_w + log_tw.sum(-1, keepdim=True)
    log_w = log_w.to(torch.float64).clamp(math.log(1e-8), 20.0)
    w_seq = torch.exp(log_w)

    def phi(k: float, lam: float) -> Tensor:  # (B, 1): one per sequence and sign
        lam = max(lam, 1e-4)
        return torch.exp(lam + k * log_w - lam * w_seq).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).to(dtype)

    return implementation("scale_by_sign", backend, logp.device)(
        advantages.detach().to(dtype), phi(k_pos, lambda_pos).view(-1), phi(k_neg, lambda_neg).view(-1))


def _scale_by_sign(x: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    """The op scale_by_sign (csrc/ops.cpp) composed of torch ops: x (..., T)
    times pos[r] where x > 0, neg[r] elsewhere, per row r, as max(x, 0) pos +
    min(x, 0) neg (x times its weight: a zero term adds nothing to a finite
    weight), in same-dtype products (torch's CPU where over x's sign is
    several times slower)."""
    pos, neg = pos.view(*x.shape[:-1], 1), neg.view(*x.shape[:-1], 1)
    return x.clamp(min=0).mul_(pos).addcmul_(x.clamp(max=0), neg)


register("scale_by_sign", ("eager",), _scale_by_sign)
if triton_installed():
    register("scale_by_sign", ("triton",), torch.ops.rlhf_kernels.scale_by_sign_triton.default)
if native_op("scale_by_sign") is not None:  # one pass (CPU rows over threads; CUDA grid stride)
    torch.library.register_fake(native_op("scale_by_sign"))(lambda x, pos, neg: x.new_empty(x.shape))
    register("scale_by_sign", ("cpu", "cuda"), native_op("scale_by_sign"))


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, token_weights: Optional[Tensor],
                 o: PPOLossOptions) -> tuple[Tensor, dict[str, Tensor]]:
    """ppo_policy_loss on checked inputs."""
    if o.loss_type == "geo_mean":
        advantages = weighted_advantages(advantages, token_weights, logp.shape, o.loss_type)
        loss, stats = _geo_mean_loss(logp, old_logp, advantages, mask, o, logp.shape[-1] if logp.dim() else 1)
        return divide(loss, o.divisor), stats
    batch_stats, penalty = {}, None
    if o.vespo is not None:  # gpg's -A logp on A phi (the token weights joined phi's sum)
        advantages = _vespo_advantages(logp, old_logp, advantages, mask, token_weights, o.vespo, o.backend)
        token_weights = None
    if o.cov is not None:
        selected, share = _cov_selected(logp, old_logp, advantages, mask, o)
        if o.loss_type == "clip_cov":  # the selected tokens' loss and gradient removed
            keep = (~selected).to(compute_dtype(advantages))
            token_weights = keep if token_weights is None else keep * token_weights.detach()
        else:  # kl_cov: + kl_cov_coef |logp - old_logp| on the selected tokens, weighted as their policy term
            dtype = compute_dtype(logp, old_logp)
            penalty = torch.where(selected, o.cov.kl_coef * (logp.to(dtype) - old_logp.detach().to(dtype)).abs(), 0.0)
            if token_weights is not None:
                penalty = penalty * token_weights.detach()
        batch_stats = {"clipfrac": share}
    advantages = weighted_advantages(advantages, token_weights, logp.shape, o.loss_type)
    if o.ratio_level == "sequence":  # clip and luspo, the objectives that take it (ppo_options)
        loss, stats = _sequence_clip_loss(logp, old_logp, advantages, mask, o, logp.shape[-1] if logp.dim() else 1)
        return divide(loss, o.divisor), stats
    if o.ratio_level != "token":  # "sequence-token"
        old_logp = _sequence_ratio(logp, old_logp, mask, o.backend)
    loss, stats = implementation("ppo_policy_loss", o.backend, logp.device)(
        logp, old_logp.detach(), advantages, mask, o.ratio_low, o.ratio_high, o.dual_clip, o.loss_code, o.agg_code,
        o.kernel_num_tokens, o.kernel_num_seqs,
    )
    loss = divide(loss, o.divisor)
    if penalty is not None:
        loss = loss + agg_loss(penalty, mask, o.agg, num_tokens=o.num_tokens, num_seqs=o.num_seqs).to(loss.dtype)
    stats = dict(zip(POLICY_STAT_NAMES, stats.unbind()))
    return loss, dict(stats, **{k: v.to(stats["clipfrac"].dtype) for k, v in batch_stats.items()})

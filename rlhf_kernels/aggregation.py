"""How a per-token loss becomes a scalar: the aggregation modes, their
per-sequence weights and the statistics columns of the token kernels, the
Python twin of csrc/include/rlhf_kernels/aggregation.h.

Every aggregation is linear in the per-token losses:
``agg(l) = sum_b w_b * sum_t m_bt * l_bt``, with ``m`` the mask (1 per valid
token of a bool mask, the weight itself otherwise) and ``w_b`` fixed by the
mode and the per-sequence counts (``sequence_weights``). The fused kernels
use that form; ``agg_loss`` is the direct masked reduction. Imports nothing
of rlhf_kernels: the ops, the float64 oracle and the trainer all read it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# Columns of the per-sequence statistics of the PPO token kernels
# (csrc/include/rlhf_kernels/ppo_math.h PolicyStat, ValueStat).
PG_SUM, COUNT, CLIP, DUAL, APPROX_KL, RATIO_MAX, RATIO_MIN, KL_SUM, ENTROPY_SUM = range(9)
N_POLICY_STATS = 9
VF_SUM, VF_COUNT, VF_CLIP = range(3)
N_VALUE_STATS = 3
# The reduced statistics of ppo_policy_loss, in the order the ops return them.
POLICY_STAT_NAMES = ("clipfrac", "clipfrac_lower", "approx_kl", "ratio_max", "ratio_min")

AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)


def agg_loss(
    loss_mat: Tensor,
    mask: Tensor,
    agg: str,
    *,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
) -> Tensor:
    """Aggregate a (..., T) per-token loss over the valid tokens of ``mask``.

    ``token-mean``: sum / (``num_tokens`` or the number of valid tokens);
    ``token-sum``: sum; ``seq-mean-token-sum``: mean over sequences of the
    per-sequence sums; ``seq-mean-token-mean``: mean over sequences of the
    per-sequence means; ``seq-mean-token-sum-norm``: seq-mean-token-sum / T.
    The sequence means run over the sequences with at least one valid token
    (``num_seqs`` overrides that count). No valid token gives 0. Masked
    positions are selected away (``where``), so NaN there never leaks.

    A mask of any dtype but bool holds per-token weights (nonzero = valid):
    each token's loss counts times its weight and each count is the sum of
    the weights, the weighted means verl and OpenRLHF compute with float
    masks (``sum(w * l) / sum(w)``); 0/1 weights give the bool results.
    """
    valid, weight = mask_weights(mask, loss_mat.dtype)
    values = torch.where(valid, loss_mat, torch.zeros_like(loss_mat))
    if weight is not None:
        values = values * weight
        counts = weight.sum(-1)
    else:
        counts = valid.sum(-1)
    if agg == "token-mean":
        denom = num_tokens if num_tokens is not None else divisor(counts.sum())
        return values.sum() / denom
    if agg == "token-sum":
        return values.sum()
    seq_sum = values.sum(-1)
    seqs = num_seqs if num_seqs is not None else (counts > 0).sum().clamp(min=1)
    if agg == "seq-mean-token-sum":
        return seq_sum.sum() / seqs
    if agg == "seq-mean-token-mean":
        return (seq_sum / divisor(counts)).sum() / seqs
    if agg == "seq-mean-token-sum-norm":
        return seq_sum.sum() / seqs / max(loss_mat.shape[-1], 1)  # T = 0: 0, not 0 / 0
    raise ValueError(f"agg: unknown mode {agg!r}; expected one of {AGG_MODES}")


def mask_weights(mask: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """(valid, weights): a bool mask is (mask, None); any other dtype holds
    per-token weights, valid where nonzero, as ``dtype`` (0 where invalid)."""
    if mask.dtype == torch.bool:
        return mask, None
    valid = mask != 0
    return valid, torch.where(valid, mask.to(dtype), 0.0)


def divisor(count: Tensor) -> Tensor:
    """A count as a divisor: 0 (no valid token) divides by 1; a weight count in
    (0, 1) divides as it is."""
    return torch.where(count > 0, count, torch.ones_like(count))


def divide(loss: Tensor, count: Optional[Tensor]) -> Tensor:
    """``loss / count`` for a count given as a tensor (a global count
    all-reduced on the device), ``loss`` for none."""
    return loss if count is None else loss / count.to(loss.dtype)


def sequence_weights(counts: Tensor, seq_len: int, agg: str, num_tokens: Optional[float],
                     num_seqs: Optional[float]) -> Tensor:
    """w_b with loss = sum_b w_b * (sum of the valid token losses of sequence b).

    token-mean: 1 / (num_tokens or valid tokens); token-sum: 1;
    seq-mean-token-sum: 1 / S; seq-mean-token-mean: 1 / (S * valid_b);
    seq-mean-token-sum-norm: 1 / (S * T), with S = num_seqs or the number of
    sequences with a valid token. A count is the sum of the token weights (1
    per valid token of a bool mask); a count of 0 divides by 1 (``divisor``),
    so a batch without a valid token gives 0, never NaN."""
    ones = torch.ones_like(counts)
    if agg == "token-mean":
        denom = num_tokens if num_tokens is not None else divisor(counts.sum())
        return ones / denom
    if agg == "token-sum":
        return ones
    seqs = num_seqs if num_seqs is not None else (counts > 0).sum().to(counts.dtype).clamp(min=1)
    if agg == "seq-mean-token-sum":
        return ones / seqs
    if agg == "seq-mean-token-mean":
        return 1.0 / (divisor(counts) * seqs)
    if agg == "seq-mean-token-sum-norm":
        return ones / (seqs * max(seq_len, 1))  # T = 0: no token, a loss of 0
    raise ValueError(f"agg: unknown mode {agg!r}; expected one of {AGG_MODES}")


def token_weights(mask: Tensor, agg: str, num_tokens, num_seqs, dtype: torch.dtype) -> Tensor:
    """(..., T) w with ``agg_loss(x, mask, agg, ...) == sum(w * x)`` for every x
    (the aggregation is linear in x: w is its gradient, taken once)."""
    x = torch.zeros(mask.shape, dtype=dtype, device=mask.device, requires_grad=True)
    with torch.enable_grad():
        total = agg_loss(x, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs)
        (w,) = torch.autograd.grad(total, x, allow_unused=True)
    return torch.zeros_like(x) if w is None else w.detach()


def policy_stats(seq_stats: Tensor) -> Tensor:
    """(5,) ``POLICY_STAT_NAMES`` from the (B, N_POLICY_STATS) per-sequence
    sums: shares over the valid tokens, ratio extremes (0 without a valid token)."""
    counts = seq_stats[:, COUNT]
    total = counts.sum()
    denom = divisor(total)
    any_valid = total > 0
    zero = torch.zeros((), dtype=seq_stats.dtype, device=seq_stats.device)
    if seq_stats.shape[0] == 0:
        ratio_max = ratio_min = zero
    else:
        ratio_max = torch.where(any_valid, seq_stats[:, RATIO_MAX].amax(), zero)
        ratio_min = torch.where(any_valid, seq_stats[:, RATIO_MIN].amin(), zero)
    return torch.stack([
        seq_stats[:, CLIP].sum() / denom, seq_stats[:, DUAL].sum() / denom,
        seq_stats[:, APPROX_KL].sum() / denom, ratio_max, ratio_min,
    ])

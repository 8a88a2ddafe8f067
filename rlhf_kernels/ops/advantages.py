"""PPO advantages: KL penalty, reward shaping, GAE, whitening, group advantages
and the adaptive KL controller.

GAE (Schulman et al., 2016) is the affine recurrence A_t = c_t + gamma * lam * A_{t+1}
over the valid tokens. The kernels scan it in the variable carried between
valid positions, W_t = gamma * lam * A_t + gamma * V_t, which obeys
W_t = a_t * W_{t+1} + b_t with (a_t, b_t) = (gamma * lam, gamma * lam * c_t + gamma * V_t)
at a valid position and the identity (1, 0) at a masked one (a hole carries the
next value and the running advantage through). Then A_t = r_t - V_t + W_{t+1}.
Affine maps compose associatively, (a1, b1) o (a2, b2) = (a1 * a2, a1 * b2 + b1),
so the Triton and CUDA kernels run a reverse parallel scan over time, chunk by
chunk with a carry; the C++ kernel runs the plain reverse loop per sequence.
One launch produces advantages, returns, the shaped rewards and the per-sequence
partial sums (count, sum A, sum A^2, sum kl); whitening is a second,
elementwise pass over those sums (all-reduced in one collective across ranks).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .._dispatch import implementation, native_extension_loaded, register, triton_installed
from .._launch import acc_dtype
from ..eager import advantages as _eager
from ._op import differentiable, in_backward, undifferentiated
from .._validation import (
    FLOAT_DTYPES, check_cu_seqlens, check_estimator, check_finite, check_int, check_nonnegative, check_positive, check_same_device,
    check_tensor, check_unit_interval, check_weights,
)

_WHITEN_EPS = 1e-8
_N_STATS = 4  # per sequence: valid count, sum A, sum A^2, sum kl

if triton_installed():
    from ..triton import advantages as _triton  # noqa: F401  (defines the rlhf_kernels::*_triton ops)


# --- KL penalty: one op each, native (csrc) or Triton; the eager backend is torch autograd ---


def _kl_fake(logp, ref_logp, estimator):
    return logp.new_empty(logp.shape, dtype=acc_dtype(logp.dtype))


def _kl_backward_fake(grad, logp, ref_logp, estimator):
    return logp.new_empty(logp.shape), ref_logp.new_empty(ref_logp.shape)


def _kl_setup_context(ctx, inputs, output):
    logp, ref_logp, estimator = inputs
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        ctx.save_for_backward(logp, ref_logp)
    ctx.estimator = estimator


def _kl_backward_with(backward_op) -> Callable:
    backward_op = in_backward(backward_op)

    def backward(ctx, grad):
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None, None
        logp, ref_logp = ctx.saved_tensors
        grad_logp, grad_ref = backward_op(grad, logp, ref_logp, ctx.estimator)
        return (grad_logp if ctx.needs_input_grad[0] else None,
                grad_ref if ctx.needs_input_grad[1] else None, None)

    return backward


def _register_kl(backends: tuple[str, ...], op, backward_op) -> None:
    torch.library.register_fake(op)(_kl_fake)
    torch.library.register_fake(backward_op)(_kl_backward_fake)
    register("kl_penalty", backends, differentiable(op, _kl_setup_context, _kl_backward_with(backward_op)))


if native_extension_loaded():
    _register_kl(("cpu", "cuda"), torch.ops.rlhf_kernels.kl_penalty.default,
                 torch.ops.rlhf_kernels.kl_penalty_backward.default)
if triton_installed():
    _register_kl(("triton",), torch.ops.rlhf_kernels.kl_penalty_triton.default,
                 torch.ops.rlhf_kernels.kl_penalty_triton_backward.default)
register("kl_penalty", ("eager",), _eager.kl_penalty)


# --- fused shaping + GAE: the native op (csrc advantages), its Triton twin, the eager composition ---


def _advantages_fake(values, mask, cu_seqlens, token_rewards, scores, logp, ref_logp, kl_coef_scale, kl_coef,
                     estimator, gamma, lam):
    acc = acc_dtype(values.dtype)
    shaped = values.shape if token_rewards is None else (0,)
    num_seqs = values.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return (values.new_empty(values.shape, dtype=acc), values.new_empty(values.shape, dtype=acc),
            values.new_empty(shaped, dtype=acc), values.new_empty(shaped, dtype=acc),
            values.new_empty((num_seqs, _N_STATS), dtype=torch.float64))


def _register_advantages(backends: tuple[str, ...], op) -> None:
    torch.library.register_fake(op)(_advantages_fake)
    register("advantages", backends, undifferentiated(op))


if native_extension_loaded():
    _register_advantages(("cpu", "cuda"), torch.ops.rlhf_kernels.advantages.default)
if triton_installed():
    _register_advantages(("triton",), torch.ops.rlhf_kernels.advantages_triton.default)
register("advantages", ("eager",), _eager.advantages)


# --- validation and whitening -------------------------------------------------------


def _prepare_layout(name: str, ref: Tensor, mask: Tensor | None,
                    cu_seqlens: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """Checks the layout of the per-token tensors; returns the mask as a
    contiguous bool tensor and cu_seqlens contiguous (each or None)."""
    if cu_seqlens is None:
        if ref.dim() != 2:
            raise ValueError(f"{name}: expected shape (B, T) (or (total,) with cu_seqlens), got {tuple(ref.shape)}")
    else:
        if ref.dim() != 1:
            raise ValueError(f"{name}: expected shape (total,) with cu_seqlens, got {tuple(ref.shape)}")
        check_cu_seqlens(cu_seqlens, ref.shape[0])
        cu_seqlens = cu_seqlens.contiguous()  # the kernels read it with stride 1
    if mask is None:
        return None, cu_seqlens
    check_tensor("mask", mask)
    if tuple(mask.shape) != tuple(ref.shape):
        raise ValueError(f"mask: shape {tuple(mask.shape)} does not match {name} {tuple(ref.shape)}")
    return (mask if mask.dtype == torch.bool else mask != 0).contiguous(), cu_seqlens


def _check_same_shape(ref_name: str, ref: Tensor, **tensors: Tensor) -> None:
    for name, t in tensors.items():
        check_tensor(name, t, FLOAT_DTYPES)
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match {ref_name} {tuple(ref.shape)}")


def _common_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _reduce_stats(stats: Tensor, extra: list[Tensor], process_group) -> Tensor:
    """Sum the per-sequence partials (plus extra 0-dim float64 sums) into one
    tensor; with a process group, all-reduce that one tensor (one collective)."""
    totals = stats.sum(0)
    if extra:
        totals = torch.cat([totals, torch.stack(extra)])
    if process_group is not None:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=process_group)
    return totals


def _moments(count: Tensor, total: Tensor, total_sq: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased variance from (count, sum, sum of squares), float64;
    with fewer than two values the variance is 0 (no NaN)."""
    mean = total / count.clamp(min=1)
    var = (total_sq - total * mean) / (count - 1).clamp(min=1)
    var = torch.where(count > 1, var.clamp(min=0), torch.zeros_like(var))
    return mean, var


def _whitening_weights(mask: Tensor | None) -> Tensor | None:
    """Per-token weights of the whitening statistics: a mask of any dtype but
    bool (verl's float response masks, fractional weights; finite, >= 0)
    weights each token's advantage by its value, as verl's ``masked_whiten``;
    None for a bool mask or none."""
    if mask is None or mask.dtype == torch.bool:
        return None
    check_weights("mask", mask)
    return torch.where(mask != 0, mask.to(torch.float64), 0.0)


def _weighted_sums(advantages: Tensor, weights: Tensor) -> list[Tensor]:
    """(sum w, sum w A, sum w A^2), 0-dim float64 (A is 0 at masked positions)."""
    a = advantages.to(torch.float64)
    wa = weights * a
    return [weights.sum(), wa.sum(), (wa * a).sum()]


def _whitening_moments(totals: Tensor, weighted: bool) -> tuple[Tensor, Tensor]:
    """Mean and variance to whiten with: the weighted sums (the last three
    totals) or the kernel's counts (the first three)."""
    count, total, total_sq = totals[-3:] if weighted else totals[:3]
    return _moments(count, total, total_sq)


def _whiten(advantages: Tensor, mask: Tensor | None, mean: Tensor, var: Tensor) -> Tensor:
    dtype = advantages.dtype
    whitened = (advantages - mean.to(dtype)) * torch.rsqrt(var + _WHITEN_EPS).to(dtype)
    if mask is None:
        return whitened
    return torch.where(mask, whitened, torch.zeros_like(whitened))


# --- public functions ---------------------------------------------------------------


def kl_penalty(logp: Tensor, ref_logp: Tensor, *, estimator: str = "k1", backend: str | None = None) -> Tensor:
    """Per-token KL estimate between the policy and the reference policy
    (Schulman, "Approximating KL divergence", 2020), differentiable in both.

    ``k1`` = logp - ref; ``abs`` = |k1|; ``k2`` / ``mse`` = k1^2 / 2;
    ``k3`` / ``low_var_kl`` = exp(x) - x - 1 with x = clamp(ref - logp, -20, 20)
    and the result clamped to [-10, 10] (verl's ``low_var_kl``). The kernels
    evaluate k3 and its gradient without the cancellation of exp(x) - x - 1 near
    x = 0 (a series for |x| < 1/2), so near on-policy they keep float32 accuracy
    where the eager formula (``backend="eager"``) keeps about 1e-7 absolute.

    Args:
        logp: (...) float32 | bfloat16 | float16 | float64, policy log-probs.
        ref_logp: (...) like ``logp``, reference log-probs (dtypes are promoted).
        estimator: "k1" | "abs" | "k2" | "mse" | "k3" | "low_var_kl".
        backend: "triton" | "cuda" | "cpu" | "eager"; default by device.

    Returns:
        kl: (...) float32 (float64 for float64 inputs). The gradients flow to
        ``logp`` and ``ref_logp`` in their own dtypes.
    """
    check_tensor("logp", logp, FLOAT_DTYPES)
    check_tensor("ref_logp", ref_logp, FLOAT_DTYPES)
    check_same_device(logp=logp, ref_logp=ref_logp)
    if tuple(ref_logp.shape) != tuple(logp.shape):
        raise ValueError(f"ref_logp: shape {tuple(ref_logp.shape)} does not match logp {tuple(logp.shape)}")
    code = check_estimator(estimator)
    if logp.dtype != ref_logp.dtype:
        dtype = _common_dtype(logp, ref_logp)
        logp, ref_logp = logp.to(dtype), ref_logp.to(dtype)
    return implementation("kl_penalty", backend, logp.device)(logp, ref_logp, code)


def compute_gae(
    token_rewards: Tensor,
    values: Tensor,
    mask: Tensor | None,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
    cu_seqlens: Tensor | None = None,
    process_group=None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016) in one kernel launch.

    ``delta_t = r_t + gamma * V_next - V_t``, ``A_t = delta_t + gamma * lam * A_next``,
    with V_next / A_next those of the next valid position (0 past the end): a
    masked position (a hole, e.g. a tool output in a multi-turn rollout)
    carries both through unchanged and its own reward is ignored.
    ``returns = A + V``. With ``whiten``, ``A <- (A - mean) * rsqrt(var + 1e-8)``
    over the valid tokens with the unbiased variance (taken as 0 with fewer than
    two valid tokens, so one valid token whitens to 0 and none gives all 0);
    with ``process_group`` the (count, sum, sum of squares) are all-reduced in
    one collective, so the whitening is global over the data-parallel ranks.
    Outputs are 0 at masked positions and carry no gradient.

    Args:
        token_rewards: (B, T) padded, or (total,) packed with ``cu_seqlens``;
            float32 | bfloat16 | float16 | float64 (float32 accumulation).
        values: like ``token_rewards``, the critic's values.
        mask: like ``token_rewards``: bool, True at valid tokens; or of any other
            dtype, nonzero at valid tokens, whose values weight each token in the
            whitening's mean and variance (verl's ``masked_whiten``; 0/1 weights
            give the bool results); None: all valid.
        gamma, lam: discount and GAE lambda, in [0, 1].
        cu_seqlens: (B + 1,) int32 offsets of the packed sequences, from 0 to total.
        process_group: a torch.distributed group to whiten over, or None.
        backend: "triton" | "cuda" | "cpu" | "eager"; default by device.

    Returns:
        (advantages, returns), each like ``values``, float32 (float64 for float64 inputs).
    """
    check_tensor("token_rewards", token_rewards, FLOAT_DTYPES)
    check_tensor("values", values, FLOAT_DTYPES)
    check_same_device(token_rewards=token_rewards, values=values, mask=mask, cu_seqlens=cu_seqlens)
    weights = _whitening_weights(mask) if whiten else None
    mask, cu_seqlens = _prepare_layout("values", values, mask, cu_seqlens)
    _check_same_shape("values", values, token_rewards=token_rewards)
    gamma = check_unit_interval("gamma", gamma)
    lam = check_unit_interval("lam", lam)
    dtype = _common_dtype(token_rewards, values)
    advantages, returns, _, _, stats = implementation("advantages", backend, values.device)(
        values.detach().to(dtype).contiguous(), mask, cu_seqlens, token_rewards.detach().to(dtype).contiguous(),
        None, None, None, None, 0.0, 0, gamma, lam,
    )
    if whiten:
        extra = _weighted_sums(advantages, weights) if weights is not None else []
        totals = _reduce_stats(stats, extra, process_group)
        mean, var = _whitening_moments(totals, weights is not None)
        advantages = _whiten(advantages, mask, mean, var)
    return advantages, returns


class PPOAdvantages(NamedTuple):
    """Outputs of ``ppo_advantages``. Per token (like ``values``): advantages
    (whitened if asked), returns, token_rewards, kl (0 at masked positions).
    0-dim float64 tensors, global over ``process_group`` when given:
    kl_mean (mean kl per valid token), kl_sum_mean (mean over sequences of the
    summed kl, TRL's "objective/kl"), score_mean, advantage_mean and
    advantage_std (before whitening, unbiased), num_tokens (valid tokens)."""

    advantages: Tensor
    returns: Tensor
    token_rewards: Tensor
    kl: Tensor
    kl_mean: Tensor
    kl_sum_mean: Tensor
    score_mean: Tensor
    advantage_mean: Tensor
    advantage_std: Tensor
    num_tokens: Tensor


def ppo_advantages(
    scores: Tensor,
    logp: Tensor,
    ref_logp: Tensor,
    values: Tensor,
    mask: Tensor | None,
    *,
    kl_coef: float | Tensor,
    estimator: str = "k1",
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
    cu_seqlens: Tensor | None = None,
    process_group=None,
    backend: str | None = None,
) -> PPOAdvantages:
    """KL penalty + reward shaping + GAE + returns in one kernel launch, then whitening.

    ``kl = kl_penalty(logp, ref_logp, estimator)`` on valid tokens;
    ``token_rewards = -kl_coef * kl`` on valid tokens plus ``scores[b]`` at the
    last valid token of sequence b (a sequence with no valid token drops its
    score); then GAE, returns and whitening exactly as ``compute_gae``. Nothing
    here is differentiable (these are PPO targets).

    Args:
        scores: (B,) any float dtype, the sequence-level reward-model scores.
        logp, ref_logp, values: (B, T) padded, or (total,) packed with
            ``cu_seqlens``; float32 | bfloat16 | float16 | float64.
        mask: like ``values``, as in ``compute_gae`` (a non-bool mask weights
            the whitening; advantage_mean / advantage_std are then weighted);
            None: every token valid.
        kl_coef: float >= 0, or a 0-dim tensor (e.g. ``AdaptiveKLController.value``)
            that the kernel reads on the device, without a host synchronisation.
        estimator, gamma, lam, whiten, cu_seqlens, process_group, backend: as in
            ``kl_penalty`` and ``compute_gae``.

    Returns:
        PPOAdvantages (see there).
    """
    check_tensor("scores", scores, FLOAT_DTYPES)
    check_tensor("logp", logp, FLOAT_DTYPES)
    check_tensor("ref_logp", ref_logp, FLOAT_DTYPES)
    check_tensor("values", values, FLOAT_DTYPES)
    check_same_device(scores=scores, logp=logp, ref_logp=ref_logp, values=values, mask=mask,
                      cu_seqlens=cu_seqlens)
    weights = _whitening_weights(mask)
    mask, cu_seqlens = _prepare_layout("values", values, mask, cu_seqlens)
    _check_same_shape("values", values, logp=logp, ref_logp=ref_logp)
    num_seqs = values.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if tuple(scores.shape) != (num_seqs,):
        raise ValueError(f"scores: shape {tuple(scores.shape)} does not match the number of sequences ({num_seqs},)")
    kl_coef_scale = None
    if isinstance(kl_coef, Tensor):
        # Read on the device by the kernel: no host synchronisation.
        if kl_coef.numel() != 1:
            raise ValueError(f"kl_coef: expected a float or a 0-dim tensor, got shape {tuple(kl_coef.shape)}")
        check_tensor("kl_coef", kl_coef, FLOAT_DTYPES)
        kl_coef_scale, kl_coef = kl_coef.detach().reshape(1), 1.0
    kl_coef = check_nonnegative("kl_coef", kl_coef)
    code = check_estimator(estimator)
    gamma = check_unit_interval("gamma", gamma)
    lam = check_unit_interval("lam", lam)
    dtype = _common_dtype(logp, ref_logp, values)
    acc = acc_dtype(dtype)
    scores_acc = scores.detach().to(acc).contiguous()
    if kl_coef_scale is not None:
        kl_coef_scale = kl_coef_scale.to(device=values.device, dtype=acc)
    advantages, returns, token_rewards, kl, stats = implementation("advantages", backend, values.device)(
        values.detach().to(dtype).contiguous(), mask, cu_seqlens, None, scores_acc,
        logp.detach().to(dtype).contiguous(), ref_logp.detach().to(dtype).contiguous(),
        kl_coef_scale, kl_coef, code, gamma, lam,
    )
    extra = [scores_acc.double().sum(), torch.full((), float(num_seqs), dtype=torch.float64, device=values.device)]
    if weights is not None:
        extra += _weighted_sums(advantages, weights)
    totals = _reduce_stats(stats, extra, process_group)
    count, adv_sum, adv_sq, kl_sum, score_sum, seqs = totals[:6].unbind(0)
    mean, var = _whitening_moments(totals, weights is not None)
    if whiten:
        advantages = _whiten(advantages, mask, mean, var)
    return PPOAdvantages(
        advantages=advantages, returns=returns, token_rewards=token_rewards, kl=kl,
        kl_mean=kl_sum / count.clamp(min=1), kl_sum_mean=kl_sum / seqs.clamp(min=1),
        score_mean=score_sum / seqs.clamp(min=1), advantage_mean=mean, advantage_std=var.sqrt(),
        num_tokens=count,
    )


_GROUP_MODES = ("grpo", "dr_grpo", "rloo", "opo", "grpo_passk", "passk")


def group_advantages(
    scores: Tensor,
    group_size: int | None = None,
    group_ids: Tensor | None = None,
    *,
    mode: str = "grpo",
    eps: float = 1e-6,
    lengths: Tensor | None = None,
) -> Tensor:
    """Outcome advantages within groups of responses to the same prompt.

    ``grpo`` = (s - mean_g) / (std_g + eps), unbiased std (Shao et al., 2024);
    ``dr_grpo`` = s - mean_g (Liu et al., 2025); ``rloo`` = s - mean of the
    other members = n / (n - 1) * (s - mean_g) (Ahmadian et al., 2024);
    ``opo`` = s - sum_g(l s) / sum_g(l), the length-weighted baseline of OPO
    (Hao et al., 2025; verl's "opo"), ``lengths`` l required (a group whose
    lengths sum to 0 takes the baseline 0); ``grpo_passk`` (verl's
    "grpo_passk", Pass@k training): the group's best response gets (its score
    - the second best) / (std_g + eps), every other 0, so a tie for the best
    gives the group 0; ``passk``: the same without the division by the std.
    A group of one gets 0 in every mode (its std is taken as 0 and it has no
    other members); a group of two gets +-1/sqrt(2) (grpo, unless equal) or
    +-(s1 - s2) (rloo). Plain PyTorch segment sums and maxima (B scores are
    tiny): no kernel and no host synchronisation, so it compiles into the
    caller's graph.

    Args:
        scores: (B,) float, one score per response.
        group_size: responses per prompt, consecutive; B must be a multiple.
        group_ids: (B,) integer group of each response (any values, any order);
            give exactly one of group_size and group_ids.
        mode: "grpo" | "dr_grpo" | "rloo" | "opo" | "grpo_passk" | "passk".
        eps: added to the std in grpo and grpo_passk.
        lengths: (B,) float or integer, each response's length (opo only).

    Returns:
        (B,) advantages, in the scores' dtype (float32 for 16-bit scores).
    """
    check_tensor("scores", scores, FLOAT_DTYPES)
    if scores.dim() != 1:
        raise ValueError(f"scores: expected shape (B,), got {tuple(scores.shape)}")
    if mode not in _GROUP_MODES:
        raise ValueError(f"mode: unknown mode {mode!r}; expected one of {_GROUP_MODES}")
    eps = check_nonnegative("eps", eps)
    n = scores.shape[0]
    if (group_size is None) == (group_ids is None):
        raise ValueError("group_size, group_ids: give exactly one of them")
    if group_ids is None:
        group_size = check_int("group_size", group_size)
        if group_size < 1 or n % group_size != 0:
            raise ValueError(f"group_size: must be >= 1 and divide the batch size {n}, got {group_size}")
        dense = torch.arange(n, device=scores.device) // group_size
    else:
        check_tensor("group_ids", group_ids, (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8))
        check_same_device(scores=scores, group_ids=group_ids)
        if tuple(group_ids.shape) != (n,):
            raise ValueError(f"group_ids: shape {tuple(group_ids.shape)} does not match scores ({n},)")
        # Dense ids in [0, n) without torch.unique (whose output size syncs).
        ordered, order = torch.sort(group_ids.long(), stable=True)
        starts = torch.ones_like(ordered, dtype=torch.long)
        starts[1:] = (ordered[1:] != ordered[:-1]).long()
        dense = torch.empty_like(order).scatter_(0, order, torch.cumsum(starts, 0) - 1)
    if (lengths is not None) != (mode == "opo"):
        raise ValueError("lengths: required with mode 'opo' and only there")
    s = scores.to(acc_dtype(scores.dtype) if scores.dtype != torch.float64 else torch.float64)
    count = s.new_zeros(n).index_add_(0, dense, torch.ones_like(s))
    mean = s.new_zeros(n).index_add_(0, dense, s) / count.clamp(min=1)
    centred = s - mean[dense]
    n_g = count[dense]
    zeros = torch.zeros_like(s)

    def std() -> Tensor:  # unbiased, 0 for a group of one
        m2 = s.new_zeros(n).index_add_(0, dense, centred.square())
        return torch.where(n_g > 1, torch.sqrt(m2 / (count - 1).clamp(min=1))[dense], zeros)

    if mode == "dr_grpo":
        out = centred
    elif mode == "rloo":
        out = torch.where(n_g > 1, centred * n_g / (n_g - 1).clamp(min=1), zeros)
    elif mode == "opo":
        length = _checked_lengths(lengths, scores).to(s.dtype)
        total = s.new_zeros(n).index_add_(0, dense, length)
        baseline = s.new_zeros(n).index_add_(0, dense, length * s) / torch.where(total > 0, total, 1.0)
        out = torch.where(n_g > 1, s - baseline[dense], zeros)
    elif mode in ("grpo_passk", "passk"):
        best = s.new_full((n,), -math.inf).scatter_reduce_(0, dense, s, "amax")[dense]
        at_best = s == best
        ties = s.new_zeros(n).index_add_(0, dense, at_best.to(s.dtype))[dense]
        second = s.new_full((n,), -math.inf).scatter_reduce_(0, dense, torch.where(at_best, -math.inf, s),
                                                             "amax")[dense]
        gap = torch.where(at_best & (ties == 1) & (n_g > 1), best - second, zeros)
        out = gap / (std() + eps) if mode == "grpo_passk" else gap
    else:
        out = centred / (std() + eps)
    return out.to(scores.dtype) if scores.dtype in (torch.float32, torch.float64) else out


def _checked_lengths(lengths: Tensor, scores: Tensor) -> Tensor:
    check_tensor("lengths", lengths, FLOAT_DTYPES + (torch.int64, torch.int32, torch.int16, torch.int8,
                                                     torch.uint8))
    check_same_device(scores=scores, lengths=lengths)
    if tuple(lengths.shape) != tuple(scores.shape):
        raise ValueError(f"lengths: shape {tuple(lengths.shape)} does not match scores {tuple(scores.shape)}")
    return lengths


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al., 2019, "Fine-Tuning Language
    Models from Human Preferences"): ``err = clip(kl / target - 1, -0.2, 0.2)``,
    ``coef *= 1 + err * n_steps / horizon``.

    ``update`` takes a float or a 0-dim tensor (e.g. ``PPOAdvantages.kl_sum_mean``
    on the GPU); with a tensor the coefficient becomes a 0-dim tensor on its
    device and nothing synchronises. ``value`` is the current coefficient
    (float or 0-dim tensor); ``state_dict`` / ``load_state_dict`` checkpoint it.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value: float | Tensor = (init_kl_coef if isinstance(init_kl_coef, Tensor)
                                      else check_nonnegative("init_kl_coef", init_kl_coef))
        self.target = check_positive("target", target)
        self.horizon = check_positive("horizon", horizon)

    def update(self, current_kl: float | Tensor, n_steps: int | float) -> float | Tensor:
        if isinstance(current_kl, Tensor):
            if current_kl.dim() != 0:
                raise ValueError(f"current_kl: expected a 0-dim tensor or a float, got shape {tuple(current_kl.shape)}")
            # In float64: a bf16 / fp16 KL would round every multiplier (1.00512 -> 1.0078).
            err = torch.clamp(current_kl.detach().double() / self.target - 1.0, -0.2, 0.2)
            mult = 1.0 + err * (float(n_steps) / self.horizon)
            if isinstance(self.value, Tensor):
                self.value = self.value.to(device=mult.device, dtype=torch.promote_types(self.value.dtype, mult.dtype)) * mult
            else:
                self.value = mult * self.value
        else:
            current_kl = check_finite("current_kl", current_kl)  # a NaN would stick in the coefficient
            err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            mult = 1.0 + err * float(n_steps) / self.horizon
            self.value = self.value * mult
        return self.value

    def state_dict(self) -> dict:
        value = self.value.detach().clone() if isinstance(self.value, Tensor) else self.value
        return {"value": value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        value = state["value"]
        self.value = value.detach().clone() if isinstance(value, Tensor) else float(value)
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])


__all__ = [
    "AdaptiveKLController",
    "PPOAdvantages",
    "compute_gae",
    "group_advantages",
    "kl_penalty",
    "ppo_advantages",
]

"""Fused PPO losses: the clipped policy loss, the clipped value loss, and the
policy loss (with KL penalty and entropy bonus) straight from the logits.

Every loss here is ``sum_b w_b * sum_t mask * l(token)`` for per-sequence
weights ``w_b`` fixed by the aggregation mode (csrc/include/rlhf_kernels/
aggregation.h; ``rlhf_kernels.aggregation.sequence_weights`` for the Triton
twins).
So one pass over the tokens gives both the per-sequence sums and the
derivative of each token's loss; the weights follow from the per-sequence
counts, and the backward is ``grad_output * w_b * dl/dx`` (one multiply), the
gradient having been produced during the forward pass (as the fused
cross-entropy kernels of Liger / Apple's CCE do).

Tie convention: the per-token derivative reproduces torch autograd of the
eager reference (``rlhf_kernels.reference``): clamp passes the gradient on the
closed interval [lo, hi]; at a tie of max / min each side gets half. See
``csrc/include/rlhf_kernels/ppo_token_math.h``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from .._dispatch import checks_enabled, implementation, native_extension_loaded, register, triton_installed
from .._launch import acc_dtype, grad_in_forward, rows_in_flight
from .._validation import (
    FLOAT_DTYPES, INDEX_DTYPES, check_agg, check_labels_in_range, check_mask, check_positive, check_same_device,
    check_tensor, check_tokens, compute_dtype,
)
from ..aggregation import POLICY_STAT_NAMES, agg_loss, divide
from ..eager import ppo_loss as _eager
from ..packing import packed_rows
from ._op import differentiable, in_backward, native_op, no_double_backward, tracing
from .advantages import kl_penalty
from .logprobs import logprobs_from_logits
from .policy_objectives import policy_loss, weighted_advantages
from .ppo_options import VESPO_PARAMS, PPOLossOptions, fill_args
from .truncation import truncates

if triton_installed():
    from ..triton import ppo_loss as _triton  # noqa: F401  (defines the rlhf_kernels::*_triton ops)


def _num_seqs(shape) -> int:
    return math.prod(shape[:-1])


# --- the token losses: one op each, native (CPU / CUDA kernels of csrc) or Triton ----------
# (loss, stats, grad, weights): grad = dl/dx (0 on masked tokens), produced in
# the forward; the backward is w_b * grad * the upstream gradient, one pass.


def _token_loss_fake(n_stats: int) -> Callable:
    """The fake of a token loss op whose stats have n_stats entries."""

    def fake(x, y, z, mask, *args):
        dtype = compute_dtype(x, y, z)
        need_grad = args[-1]
        return (x.new_empty((), dtype=dtype), x.new_empty((n_stats,), dtype=dtype),
                x.new_empty((x.numel() if need_grad else 0,), dtype=dtype),
                x.new_empty((_num_seqs(x.shape),), dtype=dtype))

    return fake


def _token_loss_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    if ctx.needs_input_grad[0]:
        ctx.shape = inputs[0].shape
        ctx.save_for_backward(output[2], output[3])


def _scaled_token_grad(grad: Tensor, weights: Tensor, grad_loss: Tensor, shape) -> Tensor:
    """grad_output * w_b * dl/dx, in the tokens' shape: one pass."""
    return (grad.view(weights.shape[0], shape[-1]) * (weights * grad_loss).unsqueeze(-1)).view(shape)



def _token_loss_backward(name: str) -> Callable:
    """The backward of the token loss op `name`: its saved gradient times the upstream one."""

    def backward(ctx, grad_loss, *_):
        grads = [None] * len(ctx.needs_input_grad)
        if ctx.needs_input_grad[0]:
            no_double_backward(name, grad_loss)
            grad, weights = ctx.saved_tensors
            grads[0] = _scaled_token_grad(grad, weights, grad_loss, ctx.shape)
        return tuple(grads)

    return backward


def _token_loss_ops(name: str, n_stats: int) -> dict[str, Callable]:
    """backend -> the differentiable caller of the `name` op (native and Triton)."""
    callers = {}
    triton_op = getattr(torch.ops.rlhf_kernels, name + "_triton").default if triton_installed() else None
    for backends, op in ((("cpu", "cuda"), native_op(name)), (("triton",), triton_op)):
        if op is not None:
            torch.library.register_fake(op)(_token_loss_fake(n_stats))
            caller = differentiable(op, _token_loss_setup_context, _token_loss_backward(name), returns=2)
            callers.update(dict.fromkeys(backends, caller))
    return callers


def _register_policy_loss(backends, caller):
    def token_policy_loss(logp, old_logp, advantages, mask, ratio_low, ratio_high, dual_clip, loss_type, agg,
                          num_tokens, num_seqs):
        need_grad = logp.requires_grad and torch.is_grad_enabled()
        return caller(logp, old_logp, advantages, mask, ratio_low, ratio_high, dual_clip, loss_type, agg,
                      num_tokens, num_seqs, need_grad)

    register("ppo_policy_loss", backends, token_policy_loss)


def _register_value_loss(backends, caller):
    def value_loss(values, old_values, returns, mask, clip, agg, num_tokens, num_seqs):
        need_grad = values.requires_grad and torch.is_grad_enabled()
        return caller(values, old_values, returns, mask, clip, agg, num_tokens, num_seqs, need_grad)

    register("ppo_value_loss", backends, value_loss)


for _backend, _caller in _token_loss_ops("ppo_policy_loss", len(POLICY_STAT_NAMES)).items():
    _register_policy_loss((_backend,), _caller)
for _backend, _caller in _token_loss_ops("ppo_value_loss", 1).items():
    _register_value_loss((_backend,), _caller)
register("ppo_policy_loss", ("eager",), _eager.policy_loss)
register("ppo_value_loss", ("eager",), _eager.value_loss)


# --- the loss from the logits: the native op, its Triton twin, the eager composition --------
# With a gradient wanted (and the logits not to be overwritten), each row of
# logits is read once for logp / entropy / its softmax (raw max and log-sum),
# its token's dL/dlogp follows from the PPO formula (the aggregation weights
# depend on the mask only), and the row's gradient is written straight away,
# while the row is still in cache: one read and one write of the logits in all,
# where a separate backward would read them again. The backward then only
# scales that gradient by the upstream one, on the device, and only when it is
# not 1 (scale_grad_): no host synchronisation.


def _from_logits_fake(logits, labels, old_logp, advantages, mask, ref_logp, temperature, ratio_low, ratio_high,
                      dual_clip, loss_type, agg, num_tokens, num_seqs, kl_coef, kl_estimator, entropy_coef,
                      inplace_backward, need_grad, count, max_rows_in_flight):
    acc = acc_dtype(logits.dtype)
    n = labels.numel()
    new = lambda *shape: logits.new_empty(shape, dtype=acc)  # noqa: E731
    fused = grad_in_forward(logits.dtype, need_grad, inplace_backward)
    return (new(), new(8), new(0 if fused or not need_grad else n), new(_num_seqs(labels.shape)), new(n), new(n),
            new(n), logits.new_empty(logits.shape if fused else (0,)))



def _from_logits_setup_context(ctx, inputs, output):
    (logits, labels, _old_logp, _advantages, mask, _ref_logp, temperature, _ratio_low, _ratio_high, _dual_clip,
     _loss_type, _agg, _num_tokens, _num_seqs, _kl_coef, _kl_estimator, entropy_coef, inplace_backward, need_grad,
     _count, _max_rows_in_flight) = inputs
    _, _, grad, weights, row_max, log_sum, entropy, grad_logits = output
    ctx.mark_non_differentiable(*output[1:])
    if not ctx.needs_input_grad[0]:
        return
    ctx.fused = grad_in_forward(logits.dtype, need_grad, inplace_backward)
    if ctx.fused:
        # Only the gradient is kept, not the logits. No (N, V) zeros for the
        # outputs that get no gradient.
        ctx.set_materialize_grads(False)
        ctx.traced = tracing(grad_logits)
        if ctx.traced:
            ctx.save_for_backward(grad_logits)
        else:
            # Eagerly the backward scales this buffer in place, on the device,
            # by the ratio of the upstream gradient to the one already in it
            # (`applied`): a later backward through a retained graph rescales it
            # again. Kept on ctx, not saved: the scaling must not count as a
            # modification of a saved tensor.
            ctx.grad_logits = grad_logits
            ctx.applied = torch.ones(1, dtype=acc_dtype(logits.dtype), device=logits.device)
    else:
        ctx.save_for_backward(logits, labels, mask, grad, weights, row_max, log_sum, entropy)
    ctx.params = (temperature, entropy_coef, inplace_backward)


def _from_logits_backward_with(scale_grad_, backward_op, backward_inplace_op) -> Callable:
    """The backward of a from-logits op over its backend's ops."""
    scale_grad_, backward_op, backward_inplace_op = (
        in_backward(scale_grad_), in_backward(backward_op), in_backward(backward_inplace_op))

    def backward(ctx, grad_loss, *_):
        grads = [None] * len(ctx.needs_input_grad)
        if not ctx.needs_input_grad[0] or grad_loss is None:  # None: only if grads are not materialised
            return tuple(grads)
        no_double_backward("ppo_loss_from_logits", grad_loss)
        if ctx.fused:
            # Written for a unit upstream gradient: scaled in float32 (a bf16
            # scale would bias it), rounded once; eagerly on the device and
            # only when the upstream gradient is not the one already applied
            # (loss.backward() passes 1: no pass at all). No host synchronisation.
            if ctx.traced:
                (grad_logits,) = ctx.saved_tensors
                grads[0] = (grad_logits.float() * grad_loss.float()).to(grad_logits.dtype)
            else:
                scale_grad_(ctx.grad_logits, ctx.applied, grad_loss)
                grads[0] = ctx.grad_logits
            return tuple(grads)
        logits, labels, mask, grad, weights, row_max, log_sum, entropy = ctx.saved_tensors
        temperature, entropy_coef, inplace_backward = ctx.params
        if grad.numel() != labels.numel():
            raise RuntimeError("ppo_loss_from_logits: the op was called with need_grad=False, so it has no "
                               "gradient for the logits")
        seqs, seq_len = weights.shape[0], labels.shape[-1]
        scale = (weights * grad_loss).unsqueeze(-1)  # (B, 1)
        grad_logp = (grad.view(seqs, seq_len) * scale).reshape(-1)
        grad_entropy = None
        if entropy_coef != 0.0:
            # d loss / d entropy = -entropy_coef * w_b on valid tokens.
            grad_entropy = torch.where(mask.reshape(seqs, seq_len) != 0, -entropy_coef * scale, 0.0).reshape(-1)
        args = (grad_logp, grad_entropy, logits, labels, row_max, log_sum,
                entropy if grad_entropy is not None else None, temperature, -100)
        # One more pass over the logits writes their gradient.
        if inplace_backward:
            backward_inplace_op(*args)
            grads[0] = logits
        else:
            grads[0] = backward_op(*args)
        return tuple(grads)

    return backward


def _register_from_logits(backends: tuple[str, ...], op, scale_grad_, backward_op, backward_inplace_op) -> None:
    torch.library.register_fake(op)(_from_logits_fake)
    register("ppo_loss_from_logits", backends,
             differentiable(op, _from_logits_setup_context,
                            _from_logits_backward_with(scale_grad_, backward_op, backward_inplace_op), returns=2))


if native_extension_loaded():
    _ops = torch.ops.rlhf_kernels
    torch.library.register_fake(_ops.scale_grad_.default)(lambda grad, applied, scale: None)
    _register_from_logits(("cpu", "cuda"), _ops.ppo_loss_from_logits.default, _ops.scale_grad_.default,
                          _ops.logprobs_backward.default, _ops.logprobs_backward_.default)
if triton_installed():
    _ops = torch.ops.rlhf_kernels
    _register_from_logits(("triton",), _ops.ppo_loss_from_logits_triton.default, _ops.scale_grad_triton_.default,
                          _ops.logprobs_triton_backward.default, _ops.logprobs_triton_backward_.default)
register("ppo_loss_from_logits", ("eager",), _eager.ppo_loss_from_logits)


# --- public functions -------------------------------------------------------------------


def _check_policy_inputs(shape_name: str, shape, old_logp: Optional[Tensor], advantages: Tensor, mask: Tensor,
                         ref_logp: Optional[Tensor] = None, old_optional: bool = False, **others: Tensor) -> None:
    """The per-token inputs of a policy loss: float tensors (a bool or
    weight mask) of the token shape ``shape``, on one device; old_logp may
    be None where ``old_optional``."""
    optional = dict(ref_logp=ref_logp, **({"old_logp": old_logp} if old_optional else {}))
    given = {k: t for k, t in optional.items() if t is not None}
    required = dict(others, **({} if old_optional else {"old_logp": old_logp}), advantages=advantages)
    for name, t in dict(required, **given).items():
        check_tensor(name, t, FLOAT_DTYPES)
    check_mask(mask)
    check_same_device(**required, **given, mask=mask)
    check_tokens(shape_name, shape, **{k: t for k, t in required.items() if k not in others}, mask=mask, **given)



def _combined_loss(logp: Tensor, entropy: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                   ref_logp: Optional[Tensor], token_weights: Optional[Tensor],
                   o: PPOLossOptions) -> tuple[Tensor, dict[str, Tensor]]:
    """ppo_loss_from_logprobs on checked inputs: the policy op, then the KL and
    entropy terms aggregated as the policy term (``agg_loss``)."""
    pg_loss, stats = policy_loss(logp, old_logp, advantages, mask, token_weights, o)

    def aggregate(x: Tensor) -> Tensor:
        return agg_loss(x, mask, o.agg, num_tokens=o.num_tokens, num_seqs=o.num_seqs).to(pg_loss.dtype)

    entropy_agg = aggregate(entropy if o.entropy_coef != 0 else entropy.detach())
    loss = pg_loss - o.entropy_coef * entropy_agg if o.entropy_coef != 0 else pg_loss
    if ref_logp is not None:
        kl = aggregate(kl_penalty(logp, ref_logp.detach(), estimator=o.kl_estimator, backend=o.backend))
        if o.kl_coef != 0:
            loss = loss + o.kl_coef * kl
    else:
        kl = pg_loss.new_zeros(())
    stats.update(pg_loss=pg_loss.detach(), kl=kl.detach(), entropy=entropy_agg.detach())
    return loss, stats


def _logprobs_loss(logp: Tensor, entropy: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                   ref_logp: Optional[Tensor], token_weights: Optional[Tensor], cu_seqlens: Optional[Tensor],
                   max_seqlen: Optional[int], o: PPOLossOptions) -> tuple[Tensor, dict[str, Tensor]]:
    """ppo_loss_from_logprobs with checked options ``o``: the inputs checked
    (and, with ``cu_seqlens``, scattered from packed (N,) into (S, T) rows)."""
    _, (logp, entropy, old_logp, advantages, mask, ref_logp, token_weights) = packed_rows(
        cu_seqlens, max_seqlen, logp=logp, entropy=entropy, old_logp=old_logp, advantages=advantages, mask=mask,
        ref_logp=ref_logp, token_weights=token_weights)
    check_tensor("logp", logp, FLOAT_DTYPES)
    if logp.dim() < 1:
        raise ValueError("logp: expected shape (B, T) (or (..., T)), got a 0-dim tensor")
    _check_policy_inputs("logp", logp.shape, old_logp, advantages, mask, ref_logp, logp=logp, entropy=entropy)
    check_tokens("logp", logp.shape, entropy=entropy)
    return _combined_loss(logp, entropy, old_logp, advantages, mask, ref_logp, token_weights, o)


@fill_args
def ppo_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    loss_type: str = "clip",
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    dro_beta: float | None = None,
    cov_ratio: float = 2e-4,
    cov_bounds: tuple[float, float] = (1.0, 5.0),
    kl_cov_coef: float = 1.0,
    generator: torch.Generator | None = None,
    vespo_params: tuple[float, float, float, float] = VESPO_PARAMS,
    agg: str = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    token_weights: Tensor | None = None,
    ratio_level: str = "token",
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    backend: str | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The policy loss, fused in one pass: PPO's clipped objective
    (Schulman et al., 2017) by default, or another of ``loss_type``.

    ``ratio = exp(clamp(logp - old_logp, -20, 20))``, ``l1 = -A * ratio``,
    ``l2 = -A * clamp(ratio, 1 - clip_low, 1 + clip_high)``, ``l = max(l1, l2)``;
    with ``dual_clip = c`` (Ye et al., 2020) tokens with A < 0 take
    ``min(l, -c * A)``. ``loss = agg(l)`` over the valid tokens of ``mask``.

    Args:
        logp: (B, T) float32 | float64 (bf16 / fp16 are upcast to float32):
            log-probabilities under the current policy; differentiable.
        old_logp, advantages: (B, T), same; not differentiated.
        {policy_args}
        {packed_args}
        {backend_arg}

    Returns:
        (loss, stats): loss a 0-dim float32 (float64) tensor, 0 when no token is
        valid; stats 0-dim tensors (no host synchronisation): clipfrac (share of
        valid tokens with l2 > l1; cispo: the ratio outside its range; dppo:
        the tokens masked; 0 for sapo and gpg), clipfrac_lower (dual clip
        active; dppo: the ratio above the cap on a kept token), approx_kl
        (mean of old_logp - logp), ratio_max, ratio_min (0 when no token is
        valid).

    The gradient follows torch autograd of ``reference.ppo_policy_loss``,
    including its tie rules (half the gradient to each side of max / min at
    a tie; clamp passes it on the closed interval).
    """
    _, (logp, old_logp, advantages, mask, token_weights) = packed_rows(
        cu_seqlens, max_seqlen, logp=logp, old_logp=old_logp, advantages=advantages, mask=mask,
        token_weights=token_weights)
    check_tensor("logp", logp, FLOAT_DTYPES)
    if logp.dim() < 1:
        raise ValueError("logp: expected shape (B, T) (or (..., T)), got a 0-dim tensor")
    _check_policy_inputs("logp", logp.shape, old_logp, advantages, mask, logp=logp)
    o = PPOLossOptions.checked(logp.device, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                               loss_type=loss_type, tau_pos=tau_pos, tau_neg=tau_neg, dro_beta=dro_beta,
                               cov_ratio=cov_ratio, cov_bounds=cov_bounds, kl_cov_coef=kl_cov_coef,
                               generator=generator, vespo_params=vespo_params, agg=agg, num_tokens=num_tokens,
                               num_seqs=num_seqs,
                               ratio_level=ratio_level, backend=backend)
    return policy_loss(logp, old_logp, advantages, mask, token_weights, o)


@fill_args
def ppo_loss_from_logprobs(
    logp: Tensor,
    entropy: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    loss_type: str = "clip",
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    dro_beta: float | None = None,
    cov_ratio: float = 2e-4,
    cov_bounds: tuple[float, float] = (1.0, 5.0),
    kl_cov_coef: float = 1.0,
    generator: torch.Generator | None = None,
    vespo_params: tuple[float, float, float, float] = VESPO_PARAMS,
    agg: str = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    ref_logp: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    token_weights: Tensor | None = None,
    ratio_level: str = "token",
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    backend: str | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss of ``ppo_loss_from_logits`` from log-probabilities and entropies
    computed elsewhere (an unfused model head, ``logprobs_from_logits``):

    ``loss = ppo_policy_loss(logp, ...) + kl_coef * agg(kl_penalty(logp, ref_logp))
    - entropy_coef * agg(entropy)``, every term aggregated by ``agg`` over the
    same counts, with the stats of ``ppo_loss_from_logits``.

    Args:
        logp, entropy: (B, T) float, differentiable: the current policy's
            log-probabilities of the sampled tokens and its entropies.
        old_logp, advantages: (B, T), as in ``ppo_policy_loss``.
        {policy_args}
        {penalty_args}
        {packed_args}
        {backend_arg}

    Returns:
        {combined_returns}
    """
    check_tensor("logp", logp, FLOAT_DTYPES)
    o = PPOLossOptions.checked(logp.device, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                               loss_type=loss_type, tau_pos=tau_pos, tau_neg=tau_neg, dro_beta=dro_beta,
                               cov_ratio=cov_ratio, cov_bounds=cov_bounds, kl_cov_coef=kl_cov_coef,
                               generator=generator, vespo_params=vespo_params, agg=agg, num_tokens=num_tokens,
                               num_seqs=num_seqs,
                               ratio_level=ratio_level, kl_coef=kl_coef,
                               kl_estimator=kl_estimator, entropy_coef=entropy_coef, backend=backend)
    return _logprobs_loss(logp, entropy, old_logp, advantages, mask, ref_logp, token_weights, cu_seqlens, max_seqlen,
                          o)


@fill_args
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
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    backend: str | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss, fused in one pass:
    ``v_clipped = old_values + clamp(values - old_values, -clip, clip)``,
    ``loss = 0.5 * agg(max((values - R)^2, (v_clipped - R)^2))``. Inside the
    clip range v_clipped is ``values`` exactly (its rounded sum would count
    spurious clips in ``vf_clipfrac``).

    Args:
        values: (B, T) float32 | float64 (bf16 / fp16 upcast): the critic's
            predictions; differentiable.
        old_values, returns: (B, T), same; not differentiated.
        mask: (B, T) bool, or per-token weights (any other dtype), as in
            ``ppo_policy_loss``.
        clip: > 0.
        agg, num_tokens, num_seqs: as in ``ppo_policy_loss``.
        {packed_args}
        {backend_arg}

    Returns:
        (loss, stats): 0-dim loss (0 without valid tokens); stats
        ``vf_clipfrac``, the share of valid tokens where the clipped error is
        the larger one.
    """
    _, (values, old_values, returns, mask) = packed_rows(cu_seqlens, max_seqlen, values=values,
                                                         old_values=old_values, returns=returns, mask=mask)
    check_tensor("values", values, FLOAT_DTYPES)
    check_tensor("old_values", old_values, FLOAT_DTYPES)
    check_tensor("returns", returns, FLOAT_DTYPES)
    check_mask(mask)
    check_same_device(values=values, old_values=old_values, returns=returns, mask=mask)
    if values.dim() < 1:
        raise ValueError("values: expected shape (B, T) (or (..., T)), got a 0-dim tensor")
    check_tokens("values", values.shape, old_values=old_values, returns=returns, mask=mask)
    clip = check_positive("clip", clip)
    agg_code, num_tokens, num_seqs, divisor = check_agg(agg, num_tokens, num_seqs, values.device)
    loss, stats = implementation("ppo_value_loss", backend, values.device)(
        values, old_values.detach(), returns.detach(), mask, clip, agg_code, num_tokens, num_seqs,
    )
    return divide(loss, divisor), {"vf_clipfrac": stats[0]}


@fill_args
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
    loss_type: str = "clip",
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    dro_beta: float | None = None,
    cov_ratio: float = 2e-4,
    cov_bounds: tuple[float, float] = (1.0, 5.0),
    kl_cov_coef: float = 1.0,
    generator: torch.Generator | None = None,
    vespo_params: tuple[float, float, float, float] = VESPO_PARAMS,
    agg: str = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    ref_logp: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    token_weights: Tensor | None = None,
    ratio_level: str = "token",
    inplace_backward: bool = False,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    min_logit: float | Tensor | None = None,
    truncation_order: str = "hf",
    vocab_parallel_group=None,
    vocab_start: int | None = None,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    backend: str | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO policy loss straight from the logits, with KL penalty and entropy bonus:

    ``logp, H = logprobs_from_logits(logits / temperature, labels)``;
    ``loss = ppo_policy_loss(logp, ...) + kl_coef * agg(kl(logp, ref_logp))
    - entropy_coef * agg(H)``. The loss is a sum of per-token terms whose
    weights depend on the mask only, so when a gradient is wanted it is
    produced in the forward: each row of logits is read once for logp and
    entropy, its token's dL/dlogp follows, and the row's gradient is written
    while the row is still in cache (one read and one write of the logits in
    all); the backward only hands that buffer on (scaling it, one more pass,
    when the upstream gradient is not exactly 1). Without a gradient (no_grad,
    or logits that do not require one) it is one read. Extra memory O(B * T)
    besides the (B, T, V) gradient itself. float16 logits (and
    ``inplace_backward``) take the gradient in the backward instead, after
    the upstream scale (GradScaler's), so that it does not underflow. No
    double backward (``create_graph=True``). A sequence-level ratio needs
    every logp of a sequence before any token's gradient, so it runs as
    ``logprobs_from_logits`` then ``ppo_loss_from_logprobs`` (the logits
    gradient in the backward).

    Args:
        logits: (B, T, V) float32 | bfloat16 | float16 (float64 for gradcheck);
            strided rows (``logits[:, :-1]``) are read in place.
        labels: (B, T) int64 | int32, the sampled tokens (``-100``: ignored,
            logp = entropy = 0 there).
        old_logp, advantages: (B, T), as in ``ppo_policy_loss``.
        temperature: > 0, the logits are divided by it.
        {policy_args}
        {penalty_args}
        inplace_backward: write the logits gradient into the logits buffer
            (no (B, T, V) gradient buffer; the logits are consumed by the
            backward): three passes over the logits, as the gradient is then
            written in the backward.
        top_k, top_p, min_p, min_logit, truncation_order: the sampler's
            truncation, as in ``logprobs_from_logits``: log-probs and entropy
            of the kept set (then logprobs_from_logits and
            ppo_loss_from_logprobs, the gradient in the backward).
        vocab_parallel_group, vocab_start: vocabulary-sharded logits, as in
            ``logprobs_from_logits`` (then logprobs_from_logits and
            ppo_loss_from_logprobs, the gradient in the backward; not with
            ``inplace_backward``).
        {packed_args}
            logits (N, V) and labels (N,) packed alike; then
            logprobs_from_logits and ppo_loss_from_logprobs (the gradient in
            the backward).
        {backend_arg}

    Returns:
        {combined_returns}
    """
    check_tensor("logits", logits, FLOAT_DTYPES)
    o = PPOLossOptions.checked(logits.device, temperature=temperature, clip_low=clip_low, clip_high=clip_high,
                               dual_clip=dual_clip, loss_type=loss_type, tau_pos=tau_pos, tau_neg=tau_neg,
                               dro_beta=dro_beta, cov_ratio=cov_ratio, cov_bounds=cov_bounds,
                               kl_cov_coef=kl_cov_coef, generator=generator, vespo_params=vespo_params, agg=agg,
                               num_tokens=num_tokens, num_seqs=num_seqs, ratio_level=ratio_level, kl_coef=kl_coef,
                               kl_estimator=kl_estimator, entropy_coef=entropy_coef, backend=backend)
    truncation = dict(top_k=top_k, top_p=top_p, min_p=min_p, min_logit=min_logit, truncation_order=truncation_order)
    truncated = truncates(top_k, top_p, min_p, min_logit)
    if cu_seqlens is not None:
        if logits.dim() != 2:
            raise ValueError(f"logits: expected shape (N, V) with cu_seqlens, got {tuple(logits.shape)}")
        logp, entropy = logprobs_from_logits(logits, labels, temperature=o.temperature, return_entropy=True,
                                             inplace_backward=inplace_backward, **truncation,
                                             vocab_parallel_group=vocab_parallel_group, vocab_start=vocab_start,
                                             backend=backend)
        return _logprobs_loss(logp, entropy, old_logp, advantages, mask, ref_logp, token_weights, cu_seqlens,
                              max_seqlen, o)
    if max_seqlen is not None:
        raise ValueError("max_seqlen: only with cu_seqlens")
    check_tensor("labels", labels, INDEX_DTYPES)
    if logits.dim() < 2:
        raise ValueError("logits: expected shape (B, T, V) (or (..., T, V))")
    if logits.shape[-1] == 0:
        raise ValueError("logits: the vocabulary dimension V must be > 0")
    tokens = logits.shape[:-1]
    _check_policy_inputs("logits.shape[:-1]", tokens, old_logp, advantages, mask, ref_logp, logits=logits)
    check_tokens("logits.shape[:-1]", tokens, labels=labels)
    check_same_device(logits=logits, labels=labels)
    ref_logp = None if ref_logp is None else ref_logp.detach()
    if o.sequence_terms or vocab_parallel_group is not None or truncated:
        logp, entropy = logprobs_from_logits(logits, labels, temperature=o.temperature, return_entropy=True,
                                             inplace_backward=inplace_backward, **truncation,
                                             vocab_parallel_group=vocab_parallel_group, vocab_start=vocab_start,
                                             backend=backend)
        return _combined_loss(logp, entropy, old_logp, advantages, mask, ref_logp, token_weights, o)
    if vocab_start is not None:
        raise ValueError("vocab_start: only with vocab_parallel_group")
    advantages = weighted_advantages(advantages, token_weights, tokens, o.loss_type)
    if labels.is_cuda and checks_enabled():
        check_labels_in_range(labels, logits.shape[-1], -100)
    need_grad = logits.requires_grad and torch.is_grad_enabled()
    in_flight = rows_in_flight(labels.numel(), logits.shape[-1] * logits.element_size(), logits.device)
    loss, stats = implementation("ppo_loss_from_logits", backend, logits.device)(
        logits, labels, old_logp.detach(), advantages, mask, ref_logp, o.temperature, o.ratio_low, o.ratio_high,
        o.dual_clip, o.loss_code, o.agg_code, o.kernel_num_tokens, o.kernel_num_seqs, o.kl_coef, o.kl_code,
        o.entropy_coef, bool(inplace_backward), need_grad, o.divisor, in_flight,
    )
    return loss, dict(zip(POLICY_STAT_NAMES + ("pg_loss", "kl", "entropy"), stats.unbind()))


__all__ = ["ppo_loss_from_logits", "ppo_loss_from_logprobs", "ppo_policy_loss", "ppo_value_loss"]

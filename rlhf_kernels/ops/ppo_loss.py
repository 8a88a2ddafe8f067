"""Fused PPO losses: the clipped policy loss, the clipped value loss, and the
policy loss (with KL penalty and entropy bonus) straight from the logits.

Every loss here is ``sum_b w_b * sum_t mask * l(token)`` for per-sequence
weights ``w_b`` fixed by the aggregation mode (csrc/include/rlhf_kernels/
aggregation.h; ``_aggregation_weights`` for the Triton twins).
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

from .. import reference
from .._dispatch import checks_enabled, implementation, native_extension_loaded, register, triton_installed
from .._launch import (
    APPROX_KL, CLIP, COUNT, DUAL, ENTROPY_SUM, KL_SUM, N_POLICY_STATS, N_VALUE_STATS, PG_SUM, RATIO_MAX, RATIO_MIN,
    VF_CLIP, VF_COUNT, VF_SUM, acc_dtype, rows_in_flight,
)
from .._validation import (
    FLOAT_DTYPES, INDEX_DTYPES, check_finite, check_labels_in_range, check_positive, check_same_device, check_tensor,
)
from ..eager import ppo_loss as _eager
from ._op import differentiable
from .advantages import _check_estimator

if triton_installed():
    from ..triton import logprobs as _triton_logprobs
    from ..triton import ppo_loss as _triton


AGG_MODES = reference.AGG_MODES
POLICY_STAT_NAMES = ("clipfrac", "clipfrac_lower", "approx_kl", "ratio_max", "ratio_min")


# --- aggregation ------------------------------------------------------------------------


def _aggregation_weights(counts: Tensor, seq_len: int, agg: str, num_tokens: Optional[float],
                         num_seqs: Optional[float]) -> Tensor:
    """w_b with loss = sum_b w_b * (sum of the valid token losses of sequence b).

    token-mean: 1 / (num_tokens or valid tokens); token-sum: 1;
    seq-mean-token-sum: 1 / S; seq-mean-token-mean: 1 / (S * valid_b);
    seq-mean-token-sum-norm: 1 / (S * T), with S = num_seqs or the number of
    sequences with a valid token. A count is the sum of the token weights (1
    per valid token of a bool mask); a count of 0 divides by 1 (``_divisor``),
    so a batch without a valid token gives 0, never NaN."""
    ones = torch.ones_like(counts)
    if agg == "token-mean":
        denom = num_tokens if num_tokens is not None else _divisor(counts.sum())
        return ones / denom
    if agg == "token-sum":
        return ones
    seqs = num_seqs if num_seqs is not None else (counts > 0).sum().to(counts.dtype).clamp(min=1)
    if agg == "seq-mean-token-sum":
        return ones / seqs
    if agg == "seq-mean-token-mean":
        return 1.0 / (_divisor(counts) * seqs)
    if agg == "seq-mean-token-sum-norm":
        return ones / (seqs * max(seq_len, 1))  # T = 0: no token, a loss of 0
    raise ValueError(f"agg: unknown mode {agg!r}; expected one of {AGG_MODES}")


def _divisor(count: Tensor) -> Tensor:
    """A count as a divisor: 0 (no valid token) divides by 1, weight counts in
    (0, 1) as they are (csrc/glue/ppo_loss.h count_divisor)."""
    return torch.where(count > 0, count, torch.ones_like(count))


def _kernel_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A mask as the token kernels read it, flat: bool stays bool (valid or
    not), any other dtype becomes per-token weights in ``dtype`` (csrc/glue/ppo_loss.h
    kernel_mask)."""
    return _token_view(mask if mask.dtype == torch.bool else mask.to(dtype)).contiguous()


def _policy_stats(seq_stats: Tensor) -> Tensor:
    """(5,) clipfrac, clipfrac_lower, approx_kl, ratio_max, ratio_min."""
    counts = seq_stats[:, COUNT]
    total = counts.sum()
    denom = _divisor(total)
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


def _token_view(x: Tensor) -> Tensor:
    return x.reshape(-1)


def _seq_len(shape) -> int:
    return int(shape[-1])


def _num_seqs(shape) -> int:
    return math.prod(shape[:-1])


def _run_tokens(token_pass, shape, n_stats: int, like: Tensor, need_grad: bool, *args):
    """token_pass(*args) (a Triton token kernel: (grad, seq_stats)), or, without
    any token, the statistics of B empty sequences (zero counts; ratio max / min
    at -inf / +inf) without a launch."""
    if like.numel() == 0:
        stats = like.new_zeros((_num_seqs(shape), n_stats))
        if n_stats == N_POLICY_STATS:
            stats[:, RATIO_MAX] = float("-inf")
            stats[:, RATIO_MIN] = float("inf")
        return like.new_empty(0), stats
    return token_pass(*args)


# --- custom ops ---------------------------------------------------------------------------


# --- the token losses: one op each, native (CPU / CUDA kernels of csrc) or Triton ----------
# (loss, stats, grad, weights): grad = dl/dx (0 on masked tokens), produced in
# the forward; the backward is w_b * grad * the upstream gradient, one pass.


def _token_loss_fake(n_stats: int) -> Callable:
    """The fake of a token loss op whose stats have n_stats entries."""

    def fake(x, y, z, mask, *args):
        dtype = _compute_dtype(x, y, z)
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


def _no_double_backward(op: str, grad_loss: Tensor) -> None:
    """The token / logits gradients are computed in the forward, not by
    differentiable ops: a second derivative (create_graph=True) would be 0."""
    if torch.is_grad_enabled() and not _tracing(grad_loss):
        raise RuntimeError(f"{op}: no double backward (create_graph=True): its gradient is computed in the "
                           "forward, not by differentiable ops")


def _token_loss_backward(name: str) -> Callable:
    """The backward of the token loss op `name`: its saved gradient times the upstream one."""

    def backward(ctx, grad_loss, *_):
        grads = [None] * len(ctx.needs_input_grad)
        if ctx.needs_input_grad[0]:
            _no_double_backward(name, grad_loss)
            grad, weights = ctx.saved_tensors
            grads[0] = _scaled_token_grad(grad, weights, grad_loss, ctx.shape)
        return tuple(grads)

    return backward


def _tokens(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The token tensors as the Triton kernels read them: flat, contiguous, of
    the computation dtype (the native ops do this in C++)."""
    dtype = _compute_dtype(*tensors)
    return tuple(t.to(dtype).reshape(-1).contiguous() for t in tensors)


def _weights(counts: Tensor, shape, agg: int, num_tokens, num_seqs, count: Optional[Tensor] = None) -> Tensor:
    """The aggregation weights w_b, divided by a count given as a tensor."""
    return _divide(_aggregation_weights(counts, _seq_len(shape), AGG_MODES[agg], num_tokens, num_seqs), count)


@torch.library.custom_op("rlhf_kernels::ppo_policy_loss_triton", mutates_args=())
def _ppo_policy_loss_triton(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, ratio_low: float,
    ratio_high: float, dual_clip: float, agg: int, num_tokens: Optional[float],
    num_seqs: Optional[float], need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    tokens = _tokens(logp, old_logp, advantages)
    grad, seq_stats = _run_tokens(
        _triton.policy, logp.shape, N_POLICY_STATS, tokens[0], need_grad, *tokens, _kernel_mask(mask, tokens[0].dtype),
        None, None, _seq_len(logp.shape), ratio_low, ratio_high, dual_clip, 0.0, -1, need_grad,
    )
    weights = _weights(seq_stats[:, COUNT], logp.shape, agg, num_tokens, num_seqs)
    return (weights * seq_stats[:, PG_SUM]).sum(), _policy_stats(seq_stats), grad, weights


@torch.library.custom_op("rlhf_kernels::ppo_value_loss_triton", mutates_args=())
def _ppo_value_loss_triton(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float, agg: int,
    num_tokens: Optional[float], num_seqs: Optional[float], need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    tokens = _tokens(values, old_values, returns)
    grad, seq_stats = _run_tokens(
        _triton.value, values.shape, N_VALUE_STATS, tokens[0], need_grad, *tokens, _kernel_mask(mask, tokens[0].dtype),
        _seq_len(values.shape), clip, need_grad,
    )
    counts = seq_stats[:, VF_COUNT]
    weights = _weights(counts, values.shape, agg, num_tokens, num_seqs)
    clipfrac = seq_stats[:, VF_CLIP].sum() / _divisor(counts.sum())
    return (weights * seq_stats[:, VF_SUM]).sum(), clipfrac.reshape(1), grad, weights


def _native_op(name: str):
    return getattr(torch.ops.rlhf_kernels, name).default if native_extension_loaded() else None


def _token_loss_ops(name: str, n_stats: int) -> dict[str, Callable]:
    """backend -> the differentiable caller of the `name` op (native and Triton)."""
    callers = {}
    for backends, op in ((("cpu", "cuda"), _native_op(name)),
                         (("triton",), getattr(torch.ops.rlhf_kernels, name + "_triton").default)):
        if op is not None:
            torch.library.register_fake(op)(_token_loss_fake(n_stats))
            caller = differentiable(op, _token_loss_setup_context, _token_loss_backward(name))
            callers.update(dict.fromkeys(backends, caller))
    return callers


def _register_policy_loss(backends, caller):
    def policy_loss(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip, agg, num_tokens, num_seqs):
        need_grad = logp.requires_grad and torch.is_grad_enabled()
        loss, stats, _, _ = caller(logp, old_logp, advantages, mask, 1.0 - clip_low, 1.0 + clip_high, dual_clip,
                                   agg, num_tokens, num_seqs, need_grad)
        return loss, stats

    register("ppo_policy_loss", backends, policy_loss)


def _register_value_loss(backends, caller):
    def value_loss(values, old_values, returns, mask, clip, agg, num_tokens, num_seqs):
        need_grad = values.requires_grad and torch.is_grad_enabled()
        loss, stats, _, _ = caller(values, old_values, returns, mask, clip, agg, num_tokens, num_seqs, need_grad)
        return loss, stats

    register("ppo_value_loss", backends, value_loss)


for _backend, _caller in _token_loss_ops("ppo_policy_loss", len(POLICY_STAT_NAMES)).items():
    _register_policy_loss((_backend,), _caller)
for _backend, _caller in _token_loss_ops("ppo_value_loss", 1).items():
    _register_value_loss((_backend,), _caller)
register("ppo_policy_loss", ("reference",), _eager.policy_loss)
register("ppo_value_loss", ("reference",), _eager.value_loss)


# --- the loss from the logits: the native op, its Triton twin, the eager composition --------
# With a gradient wanted (and the logits not to be overwritten), each row of
# logits is read once for logp / entropy / its softmax (raw max and log-sum),
# its token's dL/dlogp follows from the PPO formula (the aggregation weights
# depend on the mask only), and the row's gradient is written straight away,
# while the row is still in cache: one read and one write of the logits in all,
# where a separate backward would read them again. The backward then only
# scales that gradient by the upstream one, on the device, and only when it is
# not 1 (scale_grad_): no host synchronisation.


def _grad_in_forward(dtype: torch.dtype, need_grad: bool, inplace_backward: bool) -> bool:
    """Whether ppo_loss_from_logits writes the logits gradient in its forward:
    when one is needed and the logits are not to be overwritten, and not for
    float16, whose gradient must be scaled (GradScaler) before it is rounded
    to float16, or small values underflow (csrc/glue/ppo_loss.h fused_logits_grad)."""
    return need_grad and not inplace_backward and dtype != torch.float16


def _from_logits_fake(logits, labels, old_logp, advantages, mask, ref_logp, temperature, ratio_low, ratio_high,
                      dual_clip, agg, num_tokens, num_seqs, kl_coef, kl_estimator, entropy_coef, inplace_backward,
                      need_grad, count, max_rows_in_flight):
    acc = acc_dtype(logits.dtype)
    n = labels.numel()
    new = lambda *shape: logits.new_empty(shape, dtype=acc)  # noqa: E731
    fused = _grad_in_forward(logits.dtype, need_grad, inplace_backward)
    return (new(), new(8), new(0 if fused or not need_grad else n), new(_num_seqs(labels.shape)), new(n), new(n),
            new(n), logits.new_empty(logits.shape if fused else (0,)))


@torch.library.custom_op("rlhf_kernels::ppo_loss_from_logits_triton", mutates_args=())
def _ppo_loss_from_logits_triton(
    logits: Tensor, labels: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, ref_logp: Optional[Tensor],
    temperature: float, ratio_low: float, ratio_high: float, dual_clip: float, agg: int, num_tokens: Optional[float],
    num_seqs: Optional[float], kl_coef: float, kl_estimator: int, entropy_coef: float, inplace_backward: bool,
    need_grad: bool, count: Optional[Tensor], max_rows_in_flight: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The native op's composite (csrc/glue/ppo_loss.h ppo_loss_from_logits_impl) over the Triton kernels."""
    if labels.device.type == "cpu":  # the interpreter: as the native CPU op checks
        check_labels_in_range(labels, logits.shape[-1], -100)
    acc = acc_dtype(logits.dtype)
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    seq_len, seqs = _seq_len(labels.shape), _num_seqs(labels.shape)
    token_mask = _kernel_mask(mask, acc)
    old, adv = (t.to(acc).reshape(-1).contiguous() for t in (old_logp, advantages))
    ref = None if ref_logp is None else ref_logp.to(acc).reshape(-1).contiguous()
    kl_code = kl_estimator if ref is not None else -1
    agg_mode = AGG_MODES[agg]
    grad_logits = logits.new_empty(0)
    fused = _grad_in_forward(logits.dtype, need_grad, inplace_backward)
    if fused:
        m = token_mask.view(seqs, seq_len)
        weights = _divide(_aggregation_weights(m.sum(-1, dtype=acc), seq_len, agg_mode, num_tokens, num_seqs), count)
        w = weights.unsqueeze(-1) if m.dtype == torch.bool else weights.unsqueeze(-1) * m
        row_weight = torch.where(m != 0, w, 0.0).reshape(-1)
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        logp, entropy, row_max, log_sum = _triton.logits_grad(
            logits, flat_labels, old, adv, row_weight.contiguous(), ref, grad_logits, 1.0 / temperature,
            ratio_low, ratio_high, dual_clip, kl_coef, kl_code, entropy_coef, max_rows_in_flight,
        )
    else:
        logp, entropy, row_max, log_sum = _triton_logprobs.forward(logits, flat_labels, 1.0 / temperature, -100, True)
    token_grad = need_grad and not fused
    grad, seq_stats = _run_tokens(
        _triton.policy, labels.shape, N_POLICY_STATS, logp, token_grad, logp, old, adv, token_mask, ref, entropy,
        seq_len, ratio_low, ratio_high, dual_clip, kl_coef, kl_code, token_grad,
    )
    if not fused:
        weights = _weights(seq_stats[:, COUNT], labels.shape, agg, num_tokens, num_seqs, count)
    pg_loss = (weights * seq_stats[:, PG_SUM]).sum()
    kl = (weights * seq_stats[:, KL_SUM]).sum()
    entropy_agg = (weights * seq_stats[:, ENTROPY_SUM]).sum()
    loss = pg_loss + kl_coef * kl - entropy_coef * entropy_agg
    stats = torch.cat([_policy_stats(seq_stats), torch.stack([pg_loss, kl, entropy_agg])])
    return loss, stats, grad, weights, row_max, log_sum, entropy, grad_logits


def _tracing(t: Tensor) -> bool:
    """True while a graph is traced (torch.compile, AOT autograd, make_fx): t
    has no value to branch on."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return (torch.compiler.is_compiling() or isinstance(t, (FakeTensor, FunctionalTensor))
            or get_proxy_mode() is not None)


def _from_logits_setup_context(ctx, inputs, output):
    (logits, labels, _old_logp, _advantages, mask, _ref_logp, temperature, _ratio_low, _ratio_high, _dual_clip, _agg,
     _num_tokens, _num_seqs, _kl_coef, _kl_estimator, entropy_coef, inplace_backward, need_grad, _count,
     _max_rows_in_flight) = inputs
    _, _, grad, weights, row_max, log_sum, entropy, grad_logits = output
    ctx.mark_non_differentiable(*output[1:])
    if not ctx.needs_input_grad[0]:
        return
    ctx.fused = _grad_in_forward(logits.dtype, need_grad, inplace_backward)
    if ctx.fused:
        # Only the gradient is kept, not the logits. No (N, V) zeros for the
        # outputs that get no gradient.
        ctx.set_materialize_grads(False)
        ctx.traced = _tracing(grad_logits)
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

    def backward(ctx, grad_loss, *_):
        grads = [None] * len(ctx.needs_input_grad)
        if not ctx.needs_input_grad[0] or grad_loss is None:  # None: only if grads are not materialised
            return tuple(grads)
        _no_double_backward("ppo_loss_from_logits", grad_loss)
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


@torch.library.custom_op("rlhf_kernels::scale_grad_triton_", mutates_args=("grad", "applied"))
def _scale_grad_triton_(grad: Tensor, applied: Tensor, scale: Tensor) -> None:
    _triton.scale_unless_one(grad, applied, scale)


@_scale_grad_triton_.register_fake
def _(grad, applied, scale):
    return None


def _register_from_logits(backends: tuple[str, ...], op, scale_grad_, backward_op, backward_inplace_op) -> None:
    torch.library.register_fake(op)(_from_logits_fake)
    caller = differentiable(op, _from_logits_setup_context,
                            _from_logits_backward_with(scale_grad_, backward_op, backward_inplace_op))

    def from_logits(*args):
        loss, stats, *_ = caller(*args)
        return loss, stats

    register("ppo_loss_from_logits", backends, from_logits)


if native_extension_loaded():
    _ops = torch.ops.rlhf_kernels
    torch.library.register_fake(_ops.scale_grad_.default)(lambda grad, applied, scale: None)
    _register_from_logits(("cpu", "cuda"), _ops.ppo_loss_from_logits.default, _ops.scale_grad_.default,
                          _ops.logprobs_backward.default, _ops.logprobs_backward_.default)
_register_from_logits(("triton",), torch.ops.rlhf_kernels.ppo_loss_from_logits_triton.default,
                      torch.ops.rlhf_kernels.scale_grad_triton_.default,
                      torch.ops.rlhf_kernels.logprobs_triton_backward.default,
                      torch.ops.rlhf_kernels.logprobs_triton_backward_.default)
register("ppo_loss_from_logits", ("reference",), _eager.ppo_loss_from_logits)


# --- public functions -------------------------------------------------------------------


def _check_clip(clip_low: float, clip_high: float | None, dual_clip: float | None) -> tuple[float, float, float]:
    clip_low = check_positive("clip_low", clip_low)
    clip_high = clip_low if clip_high is None else check_positive("clip_high", clip_high)
    if dual_clip is None:
        dual = 0.0
    else:
        dual = check_finite("dual_clip", dual_clip)
        if dual <= 1.0:
            raise ValueError(f"dual_clip: must be > 1 (or None), got {dual}")
    return clip_low, clip_high, dual


def _check_agg(agg: str, num_tokens, num_seqs,
               device: torch.device) -> tuple[int, Optional[float], Optional[float], Optional[Tensor]]:
    """(agg code, num_tokens, num_seqs, divisor): the mode's index in
    AGG_MODES; float counts go to the kernels; a count
    given as a 1-element tensor (a global count all-reduced on the GPU) is
    replaced by 1 and returned as the divisor of the loss, so that nothing
    synchronises with the host (it is then not checked for > 0). Only the count
    the mode uses matters: num_tokens for token-mean, num_seqs for seq-mean-*."""
    if agg not in AGG_MODES:
        raise ValueError(f"agg: unknown mode {agg!r}; expected one of {AGG_MODES}")
    used = "num_tokens" if agg == "token-mean" else ("num_seqs" if agg.startswith("seq-mean") else None)
    counts, divisor = {}, None
    for name, value in (("num_tokens", num_tokens), ("num_seqs", num_seqs)):
        if isinstance(value, Tensor):
            if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
                raise ValueError(f"{name}: expected a number or a 1-element real tensor, got {value.dtype} "
                                 f"of shape {tuple(value.shape)}")
            if value.device not in (device, torch.device("cpu")):
                raise ValueError(f"{name}: on {value.device}, the inputs on {device}")
            counts[name] = None
            if name == used:
                counts[name], divisor = 1.0, value.detach().reshape(())
        else:
            counts[name] = None if value is None else check_positive(name, value)
    return AGG_MODES.index(agg), counts["num_tokens"], counts["num_seqs"], divisor


def _divide(loss: Tensor, divisor: Optional[Tensor]) -> Tensor:
    return loss if divisor is None else loss / divisor.to(loss.dtype)


def _check_tokens(shape_name: str, shape, **tensors: Tensor) -> None:
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match {shape_name} {tuple(shape)}")


def _check_weights(name: str, weights: Tensor) -> None:
    """Per-token weights (a mask of a dtype other than bool, or token_weights)
    must be finite and >= 0: checked on CPU tensors, and on GPU tensors with
    RLHF_KERNELS_CHECK=1 (it synchronises); not while torch.compile traces."""
    if weights.dtype == torch.bool or torch.compiler.is_compiling():
        return
    if weights.device.type != "cpu" and not checks_enabled():
        return
    bad = ~(torch.isfinite(weights) & (weights >= 0)) if weights.is_floating_point() else weights < 0
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: weights must be finite and >= 0, got {weights[index].item()} at index {index}")


def _check_mask(mask: Tensor) -> None:
    """A bool mask (valid or not), or per-token weights of any real dtype
    (nonzero = valid; the kernels weight each token's loss, gradient, count
    and statistics by it)."""
    check_tensor("mask", mask)
    if mask.is_complex():
        raise ValueError("mask: complex masks are not supported")
    _check_weights("mask", mask)


RATIO_LEVELS = ("token", "sequence", "sequence-token")


def _weighted_advantages(advantages: Tensor, token_weights: Optional[Tensor], shape) -> Tensor:
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
    check_tensor("token_weights", token_weights, FLOAT_DTYPES)
    check_same_device(advantages=advantages, token_weights=token_weights)
    _check_tokens("advantages", shape, token_weights=token_weights)
    _check_weights("token_weights", token_weights)
    dtype = _compute_dtype(advantages, token_weights)
    return advantages.to(dtype) * token_weights.detach().to(dtype)


def _sequence_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor, level: str) -> tuple[Tensor, Tensor]:
    """(logp', old') that make the token kernels compute GSPO's sequence-level
    ratio (Zheng et al., 2025): s_b = the (weighted) mean of logp - old_logp
    over the valid tokens of sequence b (divided by max(count, 1), as verl and
    OpenRLHF), old' = sg(logp) - s_b, so that each token's ratio
    exp(logp' - old') has the value exp(s_b).
    "sequence-token" (GSPO-token, verl): logp' = logp, each token's gradient
    through its own log-prob. "sequence" (GSPO, OpenRLHF): logp' = sg(logp) +
    (m_b - sg(m_b)) with m_b the same mean of logp, equal in value, so that
    the gradient flows through the sequence mean: d L / d logp_t = w_t /
    max(count, 1) * (sum of the sequence's token gradients). The two agree when
    the advantage is constant over a sequence. s_b in float64 (a float32 old'
    costs half an ulp of |logp| in the log-ratio)."""
    valid, weight = reference.mask_weights(mask, torch.float64)
    w = weight if weight is not None else valid.to(torch.float64)
    counts = w.sum(-1).clamp(min=1)
    lp = logp.detach().to(torch.float64)
    seq_log_ratio = (torch.where(valid, lp - old_logp.detach().to(torch.float64), 0.0) * w).sum(-1) / counts
    dtype = _compute_dtype(logp, old_logp)
    old_eff = (lp - seq_log_ratio.unsqueeze(-1)).to(dtype)
    if level == "sequence":
        x = logp.to(dtype)
        mean = (torch.where(valid, x, 0.0) * w.to(dtype)).sum(-1) / counts.to(dtype)
        logp = x.detach() + (mean - mean.detach()).unsqueeze(-1)
    return logp, old_eff


def _check_ratio_level(ratio_level: str) -> str:
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level: unknown level {ratio_level!r}; expected one of {RATIO_LEVELS}")
    return ratio_level


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


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
    token_weights: Tensor | None = None,
    ratio_level: str = "token",
    backend: str | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped PPO policy loss (Schulman et al., 2017), fused in one pass.

    ``ratio = exp(clamp(logp - old_logp, -20, 20))``, ``l1 = -A * ratio``,
    ``l2 = -A * clamp(ratio, 1 - clip_low, 1 + clip_high)``, ``l = max(l1, l2)``;
    with ``dual_clip = c`` (Ye et al., 2020) tokens with A < 0 take
    ``min(l, -c * A)``. ``loss = agg(l)`` over the valid tokens of ``mask``.

    Args:
        logp: (B, T) float32 | float64 (bf16 / fp16 are upcast to float32):
            log-probabilities under the current policy; differentiable.
        old_logp, advantages: (B, T), same; not differentiated.
        mask: (B, T) bool, or per-token weights of any other dtype (float
            0/1 masks, fractional weights; finite, >= 0, nonzero = valid):
            each token's loss, gradient and statistics count times its
            weight, and every count (the token-mean denominator, a
            sequence's length) is the sum of the weights: verl's and
            OpenRLHF's weighted means, ``sum(w * l) / sum(w)``.
        token_weights: (B, T) float, >= 0, or None: multiply each token's
            loss and gradient but not the counts or the statistics (verl's
            rollout importance-sampling weights, OpenRLHF's IS correction);
            not differentiated.
        ratio_level: "token" (PPO), "sequence" (GSPO, Zheng et al., 2025;
            OpenRLHF's "gspo") or "sequence-token" (GSPO-token; verl's
            "gspo"): every token of a sequence takes the ratio exp(mean over
            its valid tokens of logp - old_logp); its gradient flows through
            that mean ("sequence") or through the token's own logp
            ("sequence-token"); the two agree when the advantage is constant
            over the sequence. ratio_max / ratio_min are then sequence ratios.
        clip_low, clip_high: > 0; the ratio is clipped to
            [1 - clip_low, 1 + clip_high]; clip_high defaults to clip_low.
        dual_clip: None or c > 1.
        agg: "token-mean" | "token-sum" | "seq-mean-token-sum" |
            "seq-mean-token-mean" | "seq-mean-token-sum-norm" (seq-mean-token-sum / T).
        num_tokens: token-mean denominator instead of the number of valid
            tokens (global normalisation under data parallelism).
        num_seqs: the number of sequences the seq-mean modes divide by,
            instead of the number with >= 1 valid token. Either count may be a
            1-element tensor on the inputs' device (e.g. all-reduced there): it
            then divides the loss on the device, with no host synchronisation
            (and no check that it is > 0).
        backend: "triton" | "cuda" | "cpu" | "reference"; default by device.

    Returns:
        (loss, stats): loss a 0-dim float32 (float64) tensor, 0 when no token is
        valid; stats 0-dim tensors (no host synchronisation): clipfrac (share of
        valid tokens with l2 > l1), clipfrac_lower (dual clip active),
        approx_kl (mean of old_logp - logp), ratio_max, ratio_min (0 when no
        token is valid).

    The gradient follows torch autograd of ``reference.ppo_policy_loss``,
    including its tie rules (half the gradient to each side of max / min at
    a tie; clamp passes it on the closed interval).
    """
    check_tensor("logp", logp, FLOAT_DTYPES)
    check_tensor("old_logp", old_logp, FLOAT_DTYPES)
    check_tensor("advantages", advantages, FLOAT_DTYPES)
    _check_mask(mask)
    check_same_device(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    if logp.dim() < 1:
        raise ValueError("logp: expected shape (B, T) (or (..., T)), got a 0-dim tensor")
    _check_tokens("logp", logp.shape, old_logp=old_logp, advantages=advantages, mask=mask)
    clip_low, clip_high, dual = _check_clip(clip_low, clip_high, dual_clip)
    agg_code, num_tokens, num_seqs, divisor = _check_agg(agg, num_tokens, num_seqs, logp.device)
    advantages = _weighted_advantages(advantages, token_weights, logp.shape)
    if _check_ratio_level(ratio_level) != "token":
        logp, old_logp = _sequence_ratio(logp, old_logp, mask, ratio_level)
    loss, stats = implementation("ppo_policy_loss", backend, logp.device)(
        logp, old_logp.detach(), advantages, mask, clip_low, clip_high, dual, agg_code, num_tokens, num_seqs,
    )
    return _divide(loss, divisor), dict(zip(POLICY_STAT_NAMES, stats.unbind()))


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

    Returns:
        (loss, stats): 0-dim loss (0 without valid tokens); stats
        ``vf_clipfrac``, the share of valid tokens where the clipped error is
        the larger one.
    """
    check_tensor("values", values, FLOAT_DTYPES)
    check_tensor("old_values", old_values, FLOAT_DTYPES)
    check_tensor("returns", returns, FLOAT_DTYPES)
    _check_mask(mask)
    check_same_device(values=values, old_values=old_values, returns=returns, mask=mask)
    if values.dim() < 1:
        raise ValueError("values: expected shape (B, T) (or (..., T)), got a 0-dim tensor")
    _check_tokens("values", values.shape, old_values=old_values, returns=returns, mask=mask)
    clip = check_positive("clip", clip)
    agg_code, num_tokens, num_seqs, divisor = _check_agg(agg, num_tokens, num_seqs, values.device)
    loss, stats = implementation("ppo_value_loss", backend, values.device)(
        values, old_values.detach(), returns.detach(), mask, clip, agg_code, num_tokens, num_seqs,
    )
    return _divide(loss, divisor), {"vf_clipfrac": stats[0]}


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
    token_weights: Tensor | None = None,
    ratio_level: str = "token",
    inplace_backward: bool = False,
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
    double backward (``create_graph=True``).

    Args:
        logits: (B, T, V) float32 | bfloat16 | float16 (float64 for gradcheck);
            strided rows (``logits[:, :-1]``) are read in place.
        labels: (B, T) int64 | int32, the sampled tokens (``-100``: ignored,
            logp = entropy = 0 there).
        old_logp, advantages, mask: (B, T) as in ``ppo_policy_loss``.
        ref_logp: (B, T) float, the reference policy's logp; adds the KL
            penalty with ``kl_coef`` (estimator "k1" | "abs" | "k2" | "mse" |
            "k3" | "low_var_kl").
        entropy_coef: weight of the entropy bonus (subtracted).
        token_weights: (B, T) weights of the policy term only (the KL and
            entropy terms are weighted by the mask alone), as in
            ``ppo_policy_loss``.
        ratio_level: "token", "sequence" or "sequence-token" (GSPO), as in
            ``ppo_policy_loss``.
            The sequence ratio needs every logp of a sequence before any
            token's gradient, so it runs as ``logprobs_from_logits`` then
            ``ppo_policy_loss`` (the logits gradient in the backward).
        inplace_backward: write the logits gradient into the logits buffer
            (no (B, T, V) gradient buffer; the logits are consumed by the
            backward): three passes over the logits, as the gradient is then
            written in the backward.
        Others: as in ``ppo_policy_loss``.

    Returns:
        (loss, stats): the 0-dim loss (float32; float64 for float64 logits) and
        0-dim stats: the ``ppo_policy_loss`` stats plus pg_loss (the policy
        term), kl (aggregated penalty, 0 without ref_logp) and entropy
        (aggregated).
    """
    check_tensor("logits", logits, FLOAT_DTYPES)
    check_tensor("labels", labels, INDEX_DTYPES)
    check_tensor("old_logp", old_logp, FLOAT_DTYPES)
    check_tensor("advantages", advantages, FLOAT_DTYPES)
    _check_mask(mask)
    if ref_logp is not None:
        check_tensor("ref_logp", ref_logp, FLOAT_DTYPES)
    check_same_device(logits=logits, labels=labels, old_logp=old_logp, advantages=advantages,
                      mask=mask, ref_logp=ref_logp)
    if logits.dim() < 2:
        raise ValueError("logits: expected shape (B, T, V) (or (..., T, V))")
    if logits.shape[-1] == 0:
        raise ValueError("logits: the vocabulary dimension V must be > 0")
    tokens = logits.shape[:-1]
    _check_tokens("logits.shape[:-1]", tokens, labels=labels, old_logp=old_logp,
                  advantages=advantages, mask=mask)
    if ref_logp is not None:
        _check_tokens("logits.shape[:-1]", tokens, ref_logp=ref_logp)
        ref_logp = ref_logp.detach()
    temperature = check_positive("temperature", temperature)
    clip_low, clip_high, dual = _check_clip(clip_low, clip_high, dual_clip)
    counts_given = dict(num_tokens=num_tokens, num_seqs=num_seqs)
    agg_code, num_tokens, num_seqs, divisor = _check_agg(agg, num_tokens, num_seqs, logits.device)
    kl_coef = check_finite("kl_coef", kl_coef)
    entropy_coef = check_finite("entropy_coef", entropy_coef)
    kl_code = _check_estimator(kl_estimator, "kl_estimator")
    if _check_ratio_level(ratio_level) != "token":
        from .logprobs import logprobs_from_logits

        logp, entropy = logprobs_from_logits(logits, labels, temperature=temperature, return_entropy=True,
                                             inplace_backward=inplace_backward, backend=backend)
        return composed_policy_loss(
            logp, entropy, old_logp, advantages, mask, ref_logp=ref_logp, kl_coef=kl_coef,
            kl_estimator=kl_estimator, entropy_coef=entropy_coef, backend=backend, clip_low=clip_low,
            clip_high=clip_high, dual_clip=dual_clip, agg=agg, token_weights=token_weights, ratio_level=ratio_level,
            **counts_given,
        )
    advantages = _weighted_advantages(advantages, token_weights, tokens)
    if labels.is_cuda and checks_enabled():
        check_labels_in_range(labels, logits.shape[-1], -100)
    need_grad = logits.requires_grad and torch.is_grad_enabled()
    in_flight = rows_in_flight(labels.numel(), logits.shape[-1] * logits.element_size(), logits.device)
    loss, stats = implementation("ppo_loss_from_logits", backend, logits.device)(
        logits, labels, old_logp.detach(), advantages, mask, ref_logp, temperature, 1.0 - clip_low,
        1.0 + clip_high, dual, agg_code, num_tokens, num_seqs, kl_coef, kl_code, entropy_coef,
        bool(inplace_backward), need_grad, divisor, in_flight,
    )
    return loss, dict(zip(POLICY_STAT_NAMES + ("pg_loss", "kl", "entropy"), stats.unbind()))


def composed_policy_loss(
    logp: Tensor,
    entropy: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logp: Tensor | None,
    kl_coef: float,
    kl_estimator: str,
    entropy_coef: float,
    backend: str | None,
    agg: str = "token-mean",
    num_tokens=None,
    num_seqs=None,
    **policy_kwargs,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``ppo_policy_loss(logp, ...) + kl_coef * agg(kl_penalty(logp, ref_logp))
    - entropy_coef * agg(entropy)`` over our ops, with the stats of
    ``ppo_loss_from_logits``: the fused LM head's loss, and
    ``ppo_loss_from_logits`` at the sequence ratio level. The entropy's
    gradient is taken only when ``entropy_coef != 0``."""
    from .advantages import kl_penalty

    if ref_logp is not None:
        check_tensor("ref_logp", ref_logp, FLOAT_DTYPES)
        _check_tokens("logp", logp.shape, ref_logp=ref_logp)
    entropy_coef, kl_coef = float(entropy_coef), float(kl_coef)
    pg_loss, stats = ppo_policy_loss(logp, old_logp, advantages, mask, agg=agg, num_tokens=num_tokens,
                                     num_seqs=num_seqs, backend=backend, **policy_kwargs)

    def aggregate(x: Tensor) -> Tensor:
        return reference.agg_loss(x, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs).to(pg_loss.dtype)

    entropy_agg = aggregate(entropy if entropy_coef != 0 else entropy.detach())
    loss = pg_loss - entropy_coef * entropy_agg if entropy_coef != 0 else pg_loss
    if ref_logp is not None:
        kl = aggregate(kl_penalty(logp, ref_logp.detach(), estimator=kl_estimator, backend=backend))
        if kl_coef != 0:
            loss = loss + kl_coef * kl
    else:
        kl = pg_loss.new_zeros(())
    stats.update(pg_loss=pg_loss.detach(), kl=kl.detach(), entropy=entropy_agg.detach())
    return loss, stats


__all__ = ["ppo_policy_loss", "ppo_value_loss", "ppo_loss_from_logits"]

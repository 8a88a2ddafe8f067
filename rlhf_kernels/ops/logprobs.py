"""logprobs_from_logits: log-probabilities of the sampled tokens, and entropy,
from (..., V) logits in one pass, with a one-pass backward.

Forward: online softmax (Milakov & Gimelshein, 2018) over y = (x - m) / T, m
the running max of the raw logits, with a third running sum t = sum exp(y) * y,
so that logp = y_label - log s and entropy = log s - t / s (s = sum exp(y))
come out of the same single read of the logits.
Backward: d logits = (g * (onehot(label) - p) - g_H * p * (log p + H)) / T,
one read of the logits and one write of the gradient (optionally in place),
with log p = (x - m) / T - log s from the forward's m and log s (not
x / T - lse, which cancels at large |x| / T).
"""


from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .._dispatch import checks_enabled, implementation, native_extension_loaded, register, triton_installed
from .._launch import acc_dtype
from .._validation import (
    FLOAT_DTYPES, INDEX_DTYPES, check_int, check_labels_in_range, check_positive, check_same_device, check_tensor,
)
from ..eager import logprobs as _eager
from ._op import differentiable, in_backward, no_double_backward
from .truncation import kept_threshold, sampler_args, truncates

if triton_installed():
    from ..triton import logprobs as _triton  # noqa: F401  (defines the rlhf_kernels::logprobs_triton* ops)


# --- the ops: native (csrc logprobs, logprobs_backward, logprobs_backward_) and their Triton twins ---
# forward: (logp, entropy, row_max, log_sum); the backward recomputes the softmax
# from row_max and log_sum and writes the logits gradient (into the logits with
# inplace_backward).


def _logprobs_fake(logits, labels, temperature, ignore_index, compute_entropy, inplace_backward, min_logit=None):
    acc = acc_dtype(logits.dtype)
    rows = (labels.numel(),)
    return (logits.new_empty(labels.shape, dtype=acc),
            logits.new_empty(labels.shape if compute_entropy else (0,), dtype=acc),
            logits.new_empty(rows, dtype=acc), logits.new_empty(rows, dtype=acc))


def _backward_fake(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy, temperature, ignore_index,
                   min_logit=None):
    return logits.new_empty(logits.shape)


def _backward_inplace_fake(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy, temperature,
                           ignore_index, min_logit=None):
    return None


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, compute_entropy, inplace_backward, min_logit = inputs
    _, entropy, row_max, log_sum = output
    ctx.mark_non_differentiable(row_max, log_sum)
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(logits, labels, row_max, log_sum, entropy if compute_entropy else None, min_logit)
        ctx.params = (temperature, ignore_index, compute_entropy, inplace_backward)


# csrc/autograd.cpp raises the same error
NO_DOUBLE_BACKWARD = "its backward is a kernel without a derivative"


def _backward_with(backward_op, backward_inplace_op) -> Callable:
    backward_op, backward_inplace_op = in_backward(backward_op), in_backward(backward_inplace_op)

    def backward(ctx, grad_logp, grad_entropy, _grad_row_max, _grad_log_sum):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        no_double_backward("logprobs_from_logits", grad_logp, NO_DOUBLE_BACKWARD)
        logits, labels, row_max, log_sum, entropy, min_logit = ctx.saved_tensors
        temperature, ignore_index, compute_entropy, inplace_backward = ctx.params
        args = (grad_logp, grad_entropy if compute_entropy else None, logits, labels, row_max, log_sum, entropy,
                temperature, ignore_index, min_logit)
        if inplace_backward:
            backward_inplace_op(*args)
            return logits, None, None, None, None, None, None
        return backward_op(*args), None, None, None, None, None, None

    return backward


def _register(backends: tuple[str, ...], op, backward_op, backward_inplace_op, native_autograd=None) -> Callable:
    torch.library.register_fake(op)(_logprobs_fake)
    torch.library.register_fake(backward_op)(_backward_fake)
    torch.library.register_fake(backward_inplace_op)(_backward_inplace_fake)
    # (logp, entropy); row_max and log_sum are the backward's
    return register("logprobs", backends,
                    differentiable(op, _setup_context, _backward_with(backward_op, backward_inplace_op), returns=2,
                                   native_autograd=native_autograd))


# The native backends' eager call: logprobs_autograd (logprobs with this
# formula in C++, csrc/autograd.cpp) through _C.call_op; the op checks its own
# arguments (csrc/glue/logprobs.h, check_logprobs_args).
_native = _call_op = _autograd_index = None
if native_extension_loaded():
    from .. import _C

    _ops = torch.ops.rlhf_kernels
    torch.library.register_fake(_ops.logprobs_autograd.default)(lambda *args: _logprobs_fake(*args)[:2])
    _native = _register(("cpu", "cuda"), _ops.logprobs.default, _ops.logprobs_backward.default,
                        _ops.logprobs_backward_.default, _ops.logprobs_autograd.default)
    _call_op, _autograd_index = _C.call_op, _C.op_index("rlhf_kernels::logprobs_autograd", "")
if triton_installed():
    _ops = torch.ops.rlhf_kernels
    _register(("triton",), _ops.logprobs_triton.default, _ops.logprobs_triton_backward.default,
              _ops.logprobs_triton_backward_.default)
register("logprobs", ("eager",), _eager.logprobs)


# truncated_logprobs (CPU): logprobs over the kept set of a sampler's truncation found in the same call, with
# logprobs' backward on the threshold it returns (the min_logit of the composition it stands for).
def _truncated_fake(logits, labels, temperature, ignore_index, compute_entropy, inplace_backward, top_k, top_p,
                    min_p, min_p_first):
    logp, entropy, row_max, log_sum = _logprobs_fake(logits, labels, temperature, ignore_index, compute_entropy,
                                                     inplace_backward)
    return logp, entropy, row_max, log_sum, torch.empty_like(row_max)


def _truncated_setup_context(ctx, inputs, output):
    _setup_context(ctx, (*inputs[:6], output[4]), output[:4])
    ctx.mark_non_differentiable(output[2], output[3], output[4])  # replaces _setup_context's marks


def _truncated_backward_with(backward) -> Callable:
    def truncated_backward(ctx, grad_logp, grad_entropy, _grad_row_max, _grad_log_sum, _grad_min_logit):
        return (*backward(ctx, grad_logp, grad_entropy, None, None), None, None, None)

    return truncated_backward


_truncated_native = None
if native_extension_loaded():
    _ops = torch.ops.rlhf_kernels
    torch.library.register_fake(_ops.truncated_logprobs.default)(_truncated_fake)
    _truncated_native = differentiable(
        _ops.truncated_logprobs.default, _truncated_setup_context,
        _truncated_backward_with(_backward_with(_ops.logprobs_backward.default, _ops.logprobs_backward_.default)),
        returns=2)


# --- public function ----------------------------------------------------------------


def logprobs_from_logits(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    min_logit: float | Tensor | None = None,
    truncation_order: str = "hf",
    vocab_parallel_group=None,
    vocab_start: int | None = None,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probabilities of ``labels`` under ``softmax(logits / temperature)``.

    ``logp = log_softmax(logits / T)[..., label]`` and, with ``return_entropy``,
    ``entropy = -sum(p * log p)`` for ``p = softmax(logits / T)``. Both are
    differentiable with respect to ``logits``; positions whose label equals
    ``ignore_index`` give 0 and a zero gradient. The forward reads the logits
    once and allocates nothing of size (N, V); the backward writes the logits
    gradient in one pass.

    Args:
        logits: (..., V) float32 | bfloat16 | float16 (float64 for gradcheck);
            any leading shape. Rows may be strided: a slice such as
            ``logits[:, :-1]`` is read in place, not copied.
        labels: (...) int64 | int32, the sampled token ids, in [0, V) or
            ``ignore_index``. On CPU an id out of range raises ValueError; on a
            GPU it gives NaN (never an out-of-bounds read) unless
            ``RLHF_KERNELS_CHECK=1``, which checks and raises (synchronising).
        temperature: > 0, the sampling temperature the logits are divided by.
        ignore_index: label value that marks positions to skip.
        return_entropy: also return the entropy of each position.
        inplace_backward: write the logits gradient into the logits buffer
            instead of a new tensor (saves one (N, V) allocation). The logits
            are consumed: do not use them after backward.
        top_k, top_p, min_p: the sampler's truncation: logp and entropy are
            those of the renormalised kept set it sampled from, found from
            each row (``truncation_threshold``; ties as documented there);
            the gradient flows to the kept logits only. None: off. On the
            CPU backend the threshold and the forward are one op whose
            kept-set sums come from the threshold's passes (after a top-k
            cut, or when top-p sets the threshold): no second read of the
            logits then.
        min_logit: a float or a tensor of the labels' shape: keep only the
            logits >= it (raw, before the temperature), for a sampler that
            reports its kept set; with top_k / top_p / min_p, the larger of
            the two thresholds. A label outside the kept set gets logp
            -inf; a row whose every logit is below it, NaN. Not
            differentiated.
        truncation_order: "hf" (transformers: top-k, top-p, min-p) or
            "vllm" (min-p, top-k, top-p); matters only when min_p is combined
            with top_k or top_p.
        vocab_parallel_group: a ``torch.distributed`` process group whose
            ranks each hold a vocabulary shard: ``logits`` (..., V_r) are this
            rank's columns, ``labels`` global ids (the same on every rank).
            One all_gather of per-row partials in the forward, none in the
            backward (every rank must backpropagate the same gradients);
            the results are the whole vocabulary's, on every rank
            (``ops/vocab_parallel.py``). Not with ``inplace_backward``.
        vocab_start: the shard's first global id; default rank x V_r. Not
            with the truncation arguments (the kept set needs the whole row).
        backend: "triton" | "cuda" | "cpu" | "eager" to force one;
            default: ``RLHF_KERNELS_BACKEND``, else the best for the device.

    Returns:
        logp: (...) float32 (float64 for float64 logits); with
        ``return_entropy``, the tuple (logp, entropy), entropy likewise.
    """
    if (_native is not None and type(logits) is Tensor and backend is None and top_k is None and top_p is None
            and min_p is None and min_logit is None and vocab_parallel_group is None and vocab_start is None
            and truncation_order == "hf" and not torch.compiler.is_compiling()
            and implementation("logprobs", None, logits.device) is _native
            and not (logits.is_cuda and checks_enabled())):
        # the native op checks the arguments as below; NotImplemented: one _C.call_op does not convert
        out = _call_op(_autograd_index, logits, labels, temperature, ignore_index, bool(return_entropy),
                       bool(inplace_backward), None)
        if out is not NotImplemented:
            return out if return_entropy else out[0]
    check_tensor("logits", logits, FLOAT_DTYPES)
    check_tensor("labels", labels, INDEX_DTYPES)
    device = logits.device
    if labels.device != device:
        check_same_device(logits=logits, labels=labels)
    shape = logits.shape
    if not shape:
        raise ValueError("logits: expected shape (..., V) with at least one dimension")
    if shape[-1] == 0:
        raise ValueError("logits: the vocabulary dimension V must be > 0")
    if labels.shape != shape[:-1]:
        raise ValueError(f"labels: shape {tuple(labels.shape)} does not match logits.shape[:-1] {tuple(shape[:-1])}")
    temperature = check_positive("temperature", temperature)
    ignore_index = check_int("ignore_index", ignore_index)
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"ignore_index: must fit in int64, got {ignore_index}")
    if vocab_parallel_group is not None:
        if any(a is not None for a in (top_k, top_p, min_p, min_logit)):
            raise ValueError("top_k, top_p, min_p, min_logit: not with vocab_parallel_group (the kept set needs the "
                             "whole row)")
        if inplace_backward:
            raise ValueError("inplace_backward: not with vocab_parallel_group (the shard's gradient is fixed "
                             "up after the kernel writes it)")
        from .vocab_parallel import logprobs_from_logits_vp

        logp, entropy = logprobs_from_logits_vp(
            logits.reshape(-1, shape[-1]), labels.reshape(-1).to(torch.int64), vocab_parallel_group,
            vocab_start, temperature, ignore_index, bool(return_entropy), backend)
        logp = logp.view(labels.shape)
        return (logp, entropy.view(labels.shape)) if return_entropy else logp
    if vocab_start is not None:
        raise ValueError("vocab_start: only with vocab_parallel_group")
    if top_k is None and top_p is None and min_p is None and min_logit is None and truncation_order == "hf":
        thr = None
    elif (_truncated_native is not None and min_logit is None and device.type == "cpu"
          and truncates(top_k, top_p, min_p, None) and implementation("logprobs", backend, device) is _native):
        # the kept set's sums from the threshold's own passes (csrc/ops.cpp truncated_logprobs)
        logp, entropy = _truncated_native(logits, labels, temperature, ignore_index, bool(return_entropy),
                                          bool(inplace_backward), *sampler_args(top_k, top_p, min_p,
                                                                                truncation_order))
        return (logp, entropy) if return_entropy else logp
    else:
        thr = kept_threshold(logits, labels.shape, temperature, top_k, top_p, min_p, min_logit, truncation_order,
                             backend)
    if labels.is_cuda and checks_enabled():
        check_labels_in_range(labels, shape[-1], ignore_index)
    logp, entropy = implementation("logprobs", backend, device)(
        logits, labels, temperature, ignore_index, bool(return_entropy), bool(inplace_backward), thr,
    )
    return (logp, entropy) if return_entropy else logp


__all__ = ["logprobs_from_logits"]

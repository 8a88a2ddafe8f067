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

from typing import Optional

import torch
from torch import Tensor

from .._dispatch import checks_enabled, resolve_backend, triton_installed
from .._launch import acc_dtype, layouts, row_layout
from .._validation import FLOAT_DTYPES, INDEX_DTYPES, check_int, check_positive, check_same_device, check_tensor
from ..eager import logprobs as _eager


def _check_labels_in_range(labels: Tensor, vocab: int, ignore_index: int) -> None:
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(f"labels: value {first} is outside [0, {vocab}) and is not ignore_index")


# --- forward / backward per backend -------------------------------------------------


def _fwd_native(logits, labels, inv_temperature, ignore_index, compute_entropy):
    tensor, inner_rows, outer, inner = row_layout(logits)
    return torch.ops.rlhf_kernels.logprobs_fwd_native(
        tensor, labels, inner_rows, outer, inner, inv_temperature, ignore_index, compute_entropy
    )


_FORWARD = {"cpu": _fwd_native, "cuda": _fwd_native, "reference": _eager.forward}


def _bwd_native(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy, out, inv_temperature,
                ignore_index):
    tensor, inner_rows, in_outer, in_inner, out_outer, out_inner = layouts(logits, out)
    torch.ops.rlhf_kernels.logprobs_bwd_native(
        grad_logp, grad_entropy, tensor, labels, row_max, log_sum, entropy, out, inner_rows,
        in_outer, in_inner, out_outer, out_inner, inv_temperature, ignore_index,
    )


_BACKWARD = {"cpu": _bwd_native, "cuda": _bwd_native, "reference": _eager.backward}
if triton_installed():
    from ..triton import logprobs as _triton

    _FORWARD["triton"], _BACKWARD["triton"] = _triton.forward, _triton.backward


def _flat_labels(labels: Tensor) -> Tensor:
    return labels.reshape(-1).to(torch.int64).contiguous()


def _validate_labels(logits: Tensor, labels: Tensor, ignore_index: int) -> None:
    # Always on CPU (no sync involved); on GPU only when RLHF_KERNELS_CHECK=1,
    # since it synchronises. Without it a bad label gives NaN, never a bad read.
    if labels.device.type == "cpu" or checks_enabled():
        _check_labels_in_range(labels, logits.shape[-1], ignore_index)


# --- custom ops ---------------------------------------------------------------------


@torch.library.custom_op("rlhf_kernels::logprobs_fwd", mutates_args=())
def _logprobs_fwd(
    logits: Tensor, labels: Tensor, temperature: float, ignore_index: int,
    compute_entropy: bool, inplace_backward: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _validate_labels(logits, labels, ignore_index)
    flat = _flat_labels(labels)
    logp, entropy, row_max, log_sum = _FORWARD[backend](logits, flat, 1.0 / temperature, ignore_index,
                                                        compute_entropy)
    entropy = entropy.view(labels.shape) if compute_entropy else entropy
    return logp.view(labels.shape), entropy, row_max, log_sum


@_logprobs_fwd.register_fake
def _(logits, labels, temperature, ignore_index, compute_entropy, inplace_backward, backend):
    acc = acc_dtype(logits.dtype)
    logp = logits.new_empty(labels.shape, dtype=acc)
    entropy = logits.new_empty(labels.shape if compute_entropy else (0,), dtype=acc)
    row_max = logits.new_empty((labels.numel(),), dtype=acc)
    log_sum = logits.new_empty((labels.numel(),), dtype=acc)
    return logp, entropy, row_max, log_sum


def _backward_args(grad_logp, grad_entropy, labels, row_max, entropy):
    acc = row_max.dtype
    grad_logp = grad_logp.reshape(-1).to(acc).contiguous()
    if grad_entropy is not None:
        grad_entropy = grad_entropy.reshape(-1).to(acc).contiguous()
        entropy = entropy.reshape(-1)
    return grad_logp, grad_entropy, _flat_labels(labels), entropy


@torch.library.custom_op("rlhf_kernels::logprobs_bwd", mutates_args=())
def _logprobs_bwd(
    grad_logp: Tensor, grad_entropy: Optional[Tensor], logits: Tensor, labels: Tensor,
    row_max: Tensor, log_sum: Tensor, entropy: Optional[Tensor], temperature: float, ignore_index: int,
    backend: str,
) -> Tensor:
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    grad_logp, grad_entropy, flat, entropy = _backward_args(grad_logp, grad_entropy, labels, row_max, entropy)
    _BACKWARD[backend](grad_logp, grad_entropy, logits, flat, row_max, log_sum, entropy, grad_logits,
                       1.0 / temperature, ignore_index)
    return grad_logits


@_logprobs_bwd.register_fake
def _(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy, temperature, ignore_index, backend):
    return logits.new_empty(logits.shape)


@torch.library.custom_op("rlhf_kernels::logprobs_bwd_inplace", mutates_args=("logits",))
def _logprobs_bwd_inplace(
    grad_logp: Tensor, grad_entropy: Optional[Tensor], logits: Tensor, labels: Tensor,
    row_max: Tensor, log_sum: Tensor, entropy: Optional[Tensor], temperature: float, ignore_index: int,
    backend: str,
) -> None:
    grad_logp, grad_entropy, flat, entropy = _backward_args(grad_logp, grad_entropy, labels, row_max, entropy)
    tensor, *_ = row_layout(logits)
    if tensor is logits:
        _BACKWARD[backend](grad_logp, grad_entropy, logits, flat, row_max, log_sum, entropy, logits,
                           1.0 / temperature, ignore_index)
    else:  # a layout the kernels cannot address in place: compute, then copy back
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        _BACKWARD[backend](grad_logp, grad_entropy, logits, flat, row_max, log_sum, entropy, grad,
                           1.0 / temperature, ignore_index)
        logits.copy_(grad)


@_logprobs_bwd_inplace.register_fake
def _(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy, temperature, ignore_index, backend):
    return None


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, compute_entropy, inplace_backward, backend = inputs
    _, entropy, row_max, log_sum = output
    ctx.mark_non_differentiable(row_max, log_sum)
    ctx.save_for_backward(logits, labels, row_max, log_sum, entropy if compute_entropy else None)
    ctx.params = (temperature, ignore_index, compute_entropy, inplace_backward, backend)


def _backward(ctx, grad_logp, grad_entropy, _grad_row_max, _grad_log_sum):
    logits, labels, row_max, log_sum, entropy = ctx.saved_tensors
    temperature, ignore_index, compute_entropy, inplace_backward, backend = ctx.params
    if not ctx.needs_input_grad[0]:
        return (None,) * 7
    if grad_logp is None:
        grad_logp = torch.zeros_like(row_max)
    if not compute_entropy:
        grad_entropy = None
    elif grad_entropy is None:
        grad_entropy = torch.zeros_like(row_max)
    args = (grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy, temperature, ignore_index,
            backend)
    if inplace_backward:
        torch.ops.rlhf_kernels.logprobs_bwd_inplace(*args)
        grad_logits = logits
    else:
        grad_logits = torch.ops.rlhf_kernels.logprobs_bwd(*args)
    return grad_logits, None, None, None, None, None, None


_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


# --- public function ----------------------------------------------------------------


def logprobs_from_logits(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
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
        backend: "triton" | "cuda" | "cpu" | "reference" to force one;
            default: ``RLHF_KERNELS_BACKEND``, else the best for the device.

    Returns:
        logp: (...) float32 (float64 for float64 logits); with
        ``return_entropy``, the tuple (logp, entropy), entropy likewise.
    """
    check_tensor("logits", logits, FLOAT_DTYPES)
    check_tensor("labels", labels, INDEX_DTYPES)
    check_same_device(logits=logits, labels=labels)
    if logits.dim() < 1:
        raise ValueError("logits: expected shape (..., V) with at least one dimension")
    if logits.shape[-1] == 0:
        raise ValueError("logits: the vocabulary dimension V must be > 0")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels: shape {tuple(labels.shape)} does not match logits.shape[:-1] "
            f"{tuple(logits.shape[:-1])}"
        )
    temperature = check_positive("temperature", temperature)
    ignore_index = check_int("ignore_index", ignore_index)
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"ignore_index: must fit in int64, got {ignore_index}")
    chosen = resolve_backend(backend, logits.device, "logprobs")
    logp, entropy, _, _ = torch.ops.rlhf_kernels.logprobs_fwd(
        logits, labels, temperature, ignore_index, bool(return_entropy),
        bool(inplace_backward), chosen,
    )
    return (logp, entropy) if return_entropy else logp


__all__ = ["logprobs_from_logits"]

"""logprobs_from_logits in plain torch ops (the "eager" backend):
``rlhf_kernels.reference`` under torch autograd, with the op's in-place backward."""

from __future__ import annotations

import math

import torch

from .. import reference
from .._launch import acc_dtype
from .._validation import check_labels_in_range


class _GradIntoInput(torch.autograd.Function):
    """The identity, whose backward writes the incoming gradient over its
    input's buffer and hands that buffer on (inplace_backward: the logits are
    consumed, no second (N, V) buffer is kept)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        x.copy_(grad)
        return x


def grad_into_input(x: torch.Tensor, inplace_backward: bool) -> torch.Tensor:
    return _GradIntoInput.apply(x) if inplace_backward else x


def logprobs(logits, labels, temperature, ignore_index, compute_entropy, inplace_backward, min_logit=None):
    """logprobs_from_logits' contract: (logp, entropy or empty), computed in float32 (float64 stays); with
    min_logit (N,), over the kept set logits >= min_logit only (the others set to -inf)."""
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():  # raising needs a value
        check_labels_in_range(labels, logits.shape[-1], ignore_index)
    x = grad_into_input(logits, inplace_backward)
    cut = None
    if min_logit is not None:
        cut = x.to(min_logit.dtype) < min_logit.view(labels.shape)[..., None]
        x = x.masked_fill(cut, -math.inf)
    out = reference.logprobs_from_logits(x, labels, temperature=temperature, ignore_index=ignore_index,
                                         return_entropy=compute_entropy)
    if cut is not None:  # a label outside the kept set: -inf, also where nothing is kept (NaN above)
        in_range = (labels >= 0) & (labels < logits.shape[-1])
        label_cut = cut.gather(-1, torch.where(in_range, labels, 0).long()[..., None])[..., 0] & in_range
        logp = out[0] if compute_entropy else out
        logp = torch.where(label_cut & (labels != ignore_index), -math.inf, logp)
        out = (logp, out[1]) if compute_entropy else logp
    return out if compute_entropy else (out, logits.new_empty(0, dtype=acc_dtype(logits.dtype)))

"""Plain-PyTorch references of every op, written from the formulas.

Tests compare the kernels with these in float64, benchmarks time them as the
eager baseline (the way TRL and verl compute the same quantities), and the
``"reference"`` backend runs them where no kernel is built. ``upcast=True``
computes in float32 (float64 stays float64); ``upcast=False`` computes in the
input dtype, which is what the bf16 accuracy rule of the tests compares to.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    if not upcast or dtype == torch.float64:
        return dtype
    return torch.float32


def logprobs_from_logits(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    upcast: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """``log_softmax(logits / T)[label]`` and optionally ``-sum(p * log p)``.

    logits: (..., V); labels: (...) integer. Positions whose label equals
    ``ignore_index`` give 0. A label outside [0, V) gives NaN (never an
    out-of-bounds read). Differentiable through torch autograd.
    """
    x = logits.to(_compute_dtype(logits.dtype, upcast)) / temperature
    log_probs = torch.log_softmax(x, dim=-1)
    vocab = logits.shape[-1]
    labels = labels.long()
    ignored = labels == ignore_index
    in_range = (labels >= 0) & (labels < vocab)
    safe = torch.where(in_range, labels, torch.zeros_like(labels))
    logp = log_probs.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(in_range, logp, torch.full_like(logp, float("nan")))
    logp = torch.where(ignored, torch.zeros_like(logp), logp)
    if not return_entropy:
        return logp
    probs = log_probs.exp()
    # p * log p with p = 0 (a -inf logit) is 0, not NaN.
    plogp = torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs))
    entropy = -plogp.sum(-1)
    entropy = torch.where(ignored, torch.zeros_like(entropy), entropy)
    return logp, entropy


def logprobs_grad(
    grad_logp: Tensor,
    grad_entropy: Tensor | None,
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float,
    ignore_index: int,
) -> Tensor:
    """Closed-form gradient of ``sum(grad_logp * logp + grad_entropy * entropy)``
    with respect to ``logits``, in the logits' dtype:
    ``(grad_logp * (onehot - p) - grad_entropy * p * (log p + H)) / T``.
    """
    x = logits.to(_compute_dtype(logits.dtype, True)) / temperature
    log_probs = torch.log_softmax(x, dim=-1)
    probs = log_probs.exp()
    vocab = logits.shape[-1]
    labels = labels.long()
    ignored = labels == ignore_index
    in_range = (labels >= 0) & (labels < vocab)
    g = torch.where(ignored, torch.zeros_like(grad_logp), grad_logp).to(x.dtype).unsqueeze(-1)
    grad = -g * probs
    if grad_entropy is not None:
        entropy = -torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs)).sum(-1)
        gh = torch.where(ignored, torch.zeros_like(grad_entropy), grad_entropy).to(x.dtype)
        grad = grad - gh.unsqueeze(-1) * torch.where(
            probs > 0, probs * (log_probs + entropy.unsqueeze(-1)), torch.zeros_like(probs)
        )
    safe = torch.where(in_range, labels, torch.zeros_like(labels)).unsqueeze(-1)
    grad = grad.scatter_add(-1, safe, torch.where(in_range.unsqueeze(-1), g, torch.zeros_like(g)))
    bad = ~ignored & ~in_range
    grad = torch.where(bad.unsqueeze(-1), torch.full_like(grad, float("nan")), grad)
    return (grad / temperature).to(logits.dtype)

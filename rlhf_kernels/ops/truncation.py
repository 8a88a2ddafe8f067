"""truncation_threshold: the kept set of a sampler's top-k / top-p / min-p
truncation, as one raw-logit threshold per row (keep the logits >= it), and
the ``min_logit`` the log-prob ops take.

A sampler that truncates draws from the renormalised kept set, so the
log-probability of a sampled token under the sampling distribution is
``log_softmax`` over the kept set, not over the vocabulary (by about
``-log P(kept)`` per token). The row kernels of the log-prob ops restrict
their softmax to ``{x >= min_logit[row]}``; this module finds the threshold
from the row itself, as the samplers define the kept set:

- transformers' warpers (``order="hf"``): temperature, top-k, top-p on the
  top-k set's renormalised probabilities, then min-p;
- vLLM's sampler (``order="vllm"``): temperature, min-p, then top-k and top-p
  on the min-p set. The two differ only when min-p is combined with top-k or
  top-p.

Ties: a top-k threshold keeps every logit equal to the k-th largest, as both
samplers do. A tie group straddling the top-p boundary is kept whole, where
both samplers cut it by sort position (an order torch leaves unspecified):
the kept set here is theirs plus the rest of that group, so a token they
sampled is always in it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .._dispatch import native_extension_loaded, register, implementation, triton_installed
from .._launch import acc_dtype
from .._validation import FLOAT_DTYPES, check_positive, check_same_device, check_tensor

if triton_installed():
    from ..triton import truncation as _triton  # noqa: F401  (defines rlhf_kernels::truncation_threshold_triton)

ORDERS = ("hf", "vllm")


def _eager_threshold(logits: Tensor, temperature: float, top_k: int, top_p: float, min_p: float,
                     min_p_first: bool) -> Tensor:
    """truncation_threshold in torch ops: a sort of each row, (N, V) buffers."""
    vocab = logits.shape[-1]
    x = logits.reshape(-1, vocab).to(acc_dtype(logits.dtype))
    m = x.amax(-1, keepdim=True)
    thr = torch.full_like(m, -math.inf)

    def apply_min_p(thr):
        return torch.maximum(thr, m + temperature * math.log(min_p)) if min_p > 0 else thr

    def apply_top_k(thr):
        if top_k <= 0 or top_k >= vocab:
            return thr
        kept = x >= thr
        kth = torch.where(kept, x, -math.inf).topk(top_k, -1).values[:, -1:]
        return torch.where(kept.sum(-1, keepdim=True) > top_k, torch.maximum(thr, kth), thr)

    def apply_top_p(thr):
        if top_p >= 1:
            return thr
        values, order = x.sort(-1, descending=True)
        w = torch.where(values >= thr, torch.exp((values - m) / temperature), 0.0)
        before = w.cumsum(-1) - w  # mass of the elements sorted before each
        # The mass strictly above a value: that before the first of its tie group.
        start = torch.ones_like(values, dtype=torch.bool)
        start[:, 1:] = values[:, 1:] != values[:, :-1]
        group = start.long().cumsum(-1) - 1
        above = torch.zeros_like(before).scatter_reduce(-1, group, torch.where(start, before, math.inf), "amin",
                                                        include_self=False).gather(-1, group)
        kept = (values >= thr) & (above < top_p * w.sum(-1, keepdim=True))
        return torch.maximum(thr, torch.where(kept, values, math.inf).amin(-1, keepdim=True))

    if min_p_first:
        thr = apply_top_p(apply_top_k(apply_min_p(thr)))
    else:
        thr = apply_min_p(apply_top_p(apply_top_k(thr)))
    thr = torch.where(m == -math.inf, -math.inf, thr)  # a row of -inf: nothing to cut
    thr = torch.where(torch.isnan(x).any(-1, keepdim=True), math.nan, thr)
    return thr[:, 0].contiguous()


def _threshold_fake(logits, temperature, top_k, top_p, min_p, min_p_first):
    return logits.new_empty(logits.numel() // logits.shape[-1], dtype=acc_dtype(logits.dtype))


if native_extension_loaded():
    torch.library.register_fake("rlhf_kernels::truncation_threshold")(_threshold_fake)
    register("truncation_threshold", ("cpu", "cuda"), torch.ops.rlhf_kernels.truncation_threshold.default)
if triton_installed():
    register("truncation_threshold", ("triton",), torch.ops.rlhf_kernels.truncation_threshold_triton.default)
register("truncation_threshold", ("eager",), _eager_threshold)


def sampler_args(top_k, top_p, min_p, order) -> tuple[int, float, float, bool]:
    """(top_k, top_p, min_p, min_p_first) as the kernels take them, off as 0,
    1, 0; ValueError naming a bad one. top_k None, 0 or -1 (vLLM's) is off."""
    if top_k is None or top_k in (0, -1):
        top_k = 0
    elif isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k: expected an int >= 1 (None, 0 or -1: off), got {top_k!r}")
    top_p = 1.0 if top_p is None else float(top_p)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: expected a value in (0, 1] (None or 1: off), got {top_p!r}")
    min_p = 0.0 if min_p is None else float(min_p)
    if not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p: expected a value in [0, 1] (None or 0: off), got {min_p!r}")
    if order not in ORDERS:
        raise ValueError(f"truncation_order: expected one of {ORDERS}, got {order!r}")
    return top_k, top_p, min_p, order == "vllm"


def truncation_threshold(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    truncation_order: str = "hf",
    backend: str | None = None,
) -> Tensor:
    """The kept set of a top-k / top-p / min-p sampler, per row, as the raw
    logit threshold ``t`` such that the kept set is ``{logits >= t}`` (the
    ``min_logit`` of the log-prob ops). Not differentiable (piecewise constant).

    Args:
        logits: (..., V) float32 | bfloat16 | float16 | float64, raw (before
            the temperature); any layout.
        temperature: > 0, the sampling temperature (top-p's probabilities are
            those of ``softmax(logits / temperature)``).
        top_k: keep the k largest (ties at the k-th kept); None, 0 or -1: off.
        top_p: keep the smallest set of largest logits whose probability
            reaches ``top_p`` (the module docstring gives the tie rule); None
            or 1: off.
        min_p: keep the tokens of probability >= ``min_p`` x the largest
            (``logits >= max + T log min_p``); None or 0: off.
        truncation_order: "hf" (transformers' warpers: top-k, top-p, min-p)
            or "vllm" (min-p, then top-k, top-p).
        backend: "triton" | "cuda" | "cpu" | "eager"; default as the other ops.

    Returns:
        (...) float32 (float64 for float64 logits): -inf where nothing is cut,
        NaN for a row holding a NaN.

    Costs per row: CPU, one pass for the max (with the NaN check and the
    moments that place top-p's levels), one for top-p's mass, a compress pass
    per step and an expected-linear selection over the values a step can
    keep (after a top-k cut, top-p over top-k's candidates only); Triton and CUDA, an exact bisection over the 32-bit keys (a
    read of the row per bit); eager, a sort.
    """
    check_tensor("logits", logits, FLOAT_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError("logits: expected shape (..., V) with V >= 1")
    temperature = check_positive("temperature", temperature)
    top_k, top_p, min_p, min_p_first = sampler_args(top_k, top_p, min_p, truncation_order)
    thr = implementation("truncation_threshold", backend, logits.device)(
        logits.detach(), temperature, top_k, top_p, min_p, min_p_first)
    return thr.view(logits.shape[:-1])


def truncates(top_k, top_p, min_p, min_logit) -> bool:
    """Whether these truncation arguments cut anything (off: None, and top_k
    0 / -1, top_p 1, min_p 0)."""
    return not (top_k in (None, 0, -1) and top_p in (None, 1, 1.0) and min_p in (None, 0, 0.0)) \
        or min_logit is not None


def kept_threshold(logits: Tensor, tokens, temperature: float, top_k, top_p, min_p, min_logit,
                   truncation_order: str, backend: Optional[str]) -> Optional[Tensor]:
    """The (N,) contiguous threshold the row kernels take (None: no truncation),
    from the sampler's arguments and a ``min_logit`` (a float, or a tensor of
    the token shape ``tokens``), the larger of the two where both are given."""
    sampled = truncates(top_k, top_p, min_p, None)
    if not sampled and min_logit is None:
        if truncation_order not in ORDERS:
            raise ValueError(f"truncation_order: expected one of {ORDERS}, got {truncation_order!r}")
        return None
    acc = acc_dtype(logits.dtype)
    n = math.prod(tokens)
    thr = None
    if sampled:
        thr = truncation_threshold(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                   truncation_order=truncation_order, backend=backend).reshape(n)
    if min_logit is not None:
        if isinstance(min_logit, Tensor):
            check_tensor("min_logit", min_logit, FLOAT_DTYPES)
            check_same_device(logits=logits, min_logit=min_logit)
            try:
                given = min_logit.detach().to(acc).expand(tuple(tokens)).reshape(n)
            except RuntimeError:
                raise ValueError(f"min_logit: shape {tuple(min_logit.shape)} does not broadcast to the token "
                                 f"shape {tuple(tokens)}") from None
        elif isinstance(min_logit, (int, float)) and not isinstance(min_logit, bool):
            given = torch.full((n,), float(min_logit), dtype=acc, device=logits.device)
        else:
            raise ValueError(f"min_logit: expected a float or a tensor, got {type(min_logit).__name__}")
        thr = given if thr is None else torch.maximum(thr, given)
    return thr.contiguous()


__all__ = ["truncation_threshold"]

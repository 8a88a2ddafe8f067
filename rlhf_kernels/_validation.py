"""Input checks shared by the public ops: each raises ValueError naming the argument."""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from ._dispatch import checks_enabled
from .aggregation import AGG_MODES

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)


def check_tensor(name: str, value: object, dtypes: tuple[torch.dtype, ...] | None = None) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name}: dtype {value.dtype} is not supported (expected {names})")
    return value


def check_same_device(**tensors: Tensor | None) -> None:
    device = None
    for t in tensors.values():
        if t is None:
            continue
        if device is None:
            device = t.device
        elif t.device != device:
            where = ", ".join(f"{name} on {t.device}" for name, t in tensors.items() if t is not None)
            raise ValueError(f"tensors must be on one device: {where}")


def check_shape(name: str, tensor: Tensor, shape: tuple[int, ...] | torch.Size, expected: str) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(
            f"{name}: shape {tuple(tensor.shape)} does not match {expected} {tuple(shape)}"
        )


def _as_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise ValueError(f"{name}: expected a number, got {type(value).__name__}")
    return float(value)


# Comparisons instead of math.isfinite: under torch.compile a float argument
# that changes between calls becomes a symbolic float, which math.isfinite
# cannot take (a graph break, or an error with fullgraph=True).
def check_positive(name: str, value: float) -> float:
    if type(value) is not float:
        value = _as_float(name, value)
    if not (value > 0 and value < math.inf):
        raise ValueError(f"{name}: must be a finite number > 0, got {value}")
    return value


def check_nonnegative(name: str, value: float) -> float:
    value = _as_float(name, value)
    if not (value >= 0 and value < math.inf):
        raise ValueError(f"{name}: must be a finite number >= 0, got {value}")
    return value


def check_finite(name: str, value: float) -> float:
    value = _as_float(name, value)
    if not (-math.inf < value < math.inf):
        raise ValueError(f"{name}: must be a finite number, got {value}")
    return value


def check_int(name: str, value: object) -> int:
    """A Python / numpy integer (not a bool, not a float that looks like one)."""
    if type(value) is int:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    return int(value)


def check_labels_in_range(labels: Tensor, vocab: int, ignore_index: int) -> None:
    """ValueError for a label outside [0, V) that is not ignore_index (it
    synchronises on a GPU: there only with RLHF_KERNELS_CHECK=1)."""
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(f"labels: value {first} is outside [0, {vocab}) and is not ignore_index")


def check_unit_interval(name: str, value: float) -> float:
    value = check_finite(name, value)
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{name}: must be in [0, 1], got {value}")
    return value


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: the token kernels' dtype."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_tokens(shape_name: str, shape, **tensors: Tensor) -> None:
    """Each tensor has the token shape ``shape`` (named ``shape_name`` in the error)."""
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match {shape_name} {tuple(shape)}")


def check_weights(name: str, weights: Tensor) -> None:
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


def check_mask(mask: Tensor) -> None:
    """A bool mask (valid or not), or per-token weights of any real dtype
    (nonzero = valid; the kernels weight each token's loss, gradient, count
    and statistics by it)."""
    check_tensor("mask", mask)
    if mask.is_complex():
        raise ValueError("mask: complex masks are not supported")
    check_weights("mask", mask)


# KL estimator name -> kernel code (csrc/include/rlhf_kernels/kl.h KlEstimator).
KL_ESTIMATOR_CODES = {"k1": 0, "abs": 1, "k2": 2, "mse": 2, "k3": 3, "low_var_kl": 3}


def check_estimator(estimator: str, name: str = "estimator") -> int:
    """The kernel code of a KL estimator name; ValueError naming the argument."""
    if not isinstance(estimator, str) or estimator not in KL_ESTIMATOR_CODES:
        raise ValueError(f"{name}: unknown KL estimator {estimator!r}; expected one of {tuple(KL_ESTIMATOR_CODES)}")
    return KL_ESTIMATOR_CODES[estimator]


def check_clip(clip_low: float, clip_high: float | None, dual_clip: float | None) -> tuple[float, float, float]:
    """(clip_low, clip_high, dual): clip_high defaults to clip_low, dual 0.0 for no dual clip."""
    clip_low = check_positive("clip_low", clip_low)
    clip_high = clip_low if clip_high is None else check_positive("clip_high", clip_high)
    if dual_clip is None:
        dual = 0.0
    else:
        dual = check_finite("dual_clip", dual_clip)
        if dual <= 1.0:
            raise ValueError(f"dual_clip: must be > 1 (or None), got {dual}")
    return clip_low, clip_high, dual


def check_agg(agg: str, num_tokens, num_seqs,
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


RATIO_LEVELS = ("token", "sequence", "sequence-token")


def check_ratio_level(ratio_level: str) -> str:
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level: unknown level {ratio_level!r}; expected one of {RATIO_LEVELS}")
    return ratio_level


def check_cu_seqlens(cu_seqlens: Tensor, total: int) -> None:
    """cu_seqlens: (S + 1,) int32 offsets of S packed sequences in ``total``
    tokens: 0, non-decreasing, ``total`` (flash-attention's varlen layout)."""
    check_tensor("cu_seqlens", cu_seqlens, (torch.int32,))
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens: expected a (B + 1,) int32 tensor, got shape {tuple(cu_seqlens.shape)}")
    # Reading the offsets synchronises: always on CPU, on a GPU only with
    # RLHF_KERNELS_CHECK=1 (the kernels clamp the offsets, so never a bad read);
    # never inside torch.compile (a value read would break the graph).
    if (cu_seqlens.device.type == "cpu" or checks_enabled()) and not torch.compiler.is_compiling():
        offsets = cu_seqlens.to("cpu", torch.int64)
        if int(offsets[0]) != 0:
            raise ValueError(f"cu_seqlens: must start at 0, got {int(offsets[0])}")
        if bool((offsets.diff() < 0).any()):
            raise ValueError("cu_seqlens: offsets must be non-decreasing")
        if int(offsets[-1]) != total:
            raise ValueError(f"cu_seqlens: must end at the total number of tokens {total}, got {int(offsets[-1])}")

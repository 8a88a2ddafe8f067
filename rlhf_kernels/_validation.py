"""Input checks shared by the public ops: each raises ValueError naming the argument."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)


def check_tensor(name: str, value: object, dtypes: Iterable[torch.dtype] | None = None) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise ValueError(f"{name}: dtype {value.dtype} is not supported (expected {names})")
    return value


def check_same_device(**tensors: Tensor | None) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
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
    import numbers

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

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


def check_positive(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: must be a finite number > 0, got {value}")
    return value

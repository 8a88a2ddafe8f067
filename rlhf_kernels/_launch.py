"""Host-side launch geometry shared by the native and Triton launchers: the
accumulation dtype, the row layout of (..., V) logits, and the rows the fused
GPU kernels keep in flight."""

from __future__ import annotations

import os

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, else float32: the kernels' accumulation and output dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_layout(logits: Tensor) -> tuple[Tensor, int, int, int]:
    """Describe the rows of (..., V) logits as (B, T) strided rows:
    returns (tensor, inner_rows, outer_stride, inner_stride). Leading dims that
    collapse to at most two strided dims (any slice of a (B, T, V) tensor) are
    read in place; anything else, or a non-contiguous last dim, is copied."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    dims: list[list[int]] = []
    for size, stride in zip(logits.shape[:-1], logits.stride()[:-1]):
        if size == 1:
            continue
        if dims and dims[-1][1] == size * stride:
            dims[-1] = [dims[-1][0] * size, stride]
        else:
            dims.append([size, stride])
    if not dims:
        return logits, 1, 0, 0
    if len(dims) == 1:
        return logits, max(1, dims[0][0]), 0, dims[0][1]
    if len(dims) == 2:
        return logits, max(1, dims[1][0]), dims[0][1], dims[1][1]
    logits = logits.contiguous()
    return logits, max(1, logits.numel() // logits.shape[-1]), 0, logits.shape[-1]


def layouts(logits: Tensor, out: Tensor) -> tuple[Tensor, int, int, int, int, int]:
    """Row layouts of the input and of the gradient buffer, with one inner_rows:
    the buffer is either the logits themselves (in place) or contiguous."""
    tensor, inner_rows, in_outer, in_inner = row_layout(logits)
    if out is tensor:
        return tensor, inner_rows, in_outer, in_inner, in_outer, in_inner
    assert out.is_contiguous()
    vocab = logits.shape[-1]
    return tensor, inner_rows, in_outer, in_inner, inner_rows * vocab, vocab


def rows_in_flight(n_rows: int, row_bytes: int, device: torch.device) -> int:
    """How many rows the fused GPU kernels work on at once (0: all). Between a
    row's first read and its second, the other rows in flight stream through
    L2: keeping their bytes to about half of L2 lets the second read hit it,
    but at least one row per SM keeps every SM busy. A prediction, to be
    measured (benchmarks/bench_ppo_loss.py sweeps it; RLHF_KERNELS_ROWS_IN_FLIGHT
    overrides it)."""
    override = os.environ.get("RLHF_KERNELS_ROWS_IN_FLIGHT")
    if override is not None:
        try:
            return max(0, int(override))
        except ValueError:
            raise ValueError(f"RLHF_KERNELS_ROWS_IN_FLIGHT: expected an integer, got {override!r}") from None
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    l2_bytes = getattr(props, "L2_cache_size", 0) or 50 * 2**20
    rows = max(props.multi_processor_count, (l2_bytes // 2) // max(row_bytes, 1))
    return 0 if rows >= n_rows else int(rows)


def grad_in_forward(dtype: torch.dtype, need_grad: bool, inplace_backward: bool) -> bool:
    """Whether ppo_loss_from_logits writes the logits gradient in its forward:
    when one is needed and the logits are not to be overwritten, and not for
    float16, whose gradient must be scaled (GradScaler) before it is rounded
    to float16, or small values underflow (the native glue's fused_logits_grad)."""
    return need_grad and not inplace_backward and dtype != torch.float16

"""Packed (padding-free) batches: S sequences of ragged lengths laid end to
end in N tokens, delimited by ``cu_seqlens`` (int32, (S + 1,): 0, the running
lengths, N; flash-attention's varlen layout, what verl's remove-padding and
TRL's padding-free collator hand the model).

The losses and ``rollout_correction`` take per-token tensors of shape (N,)
with ``cu_seqlens=``: their sequence-level terms (the aggregations, GSPO's
sequence ratio, the correction's sequence levels) run per sequence, and
padded and packed layouts of the same data give the same results. The
per-token tensors (N floats each, never the (N, V) logits or the (N, H)
hidden state) are scattered into (S, T) rows, T = ``max_seqlen`` (default:
the longest sequence; ``seq-mean-token-sum-norm`` divides by it), and the
padded kernels run on them; the gradients come back through the scatter."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._validation import check_cu_seqlens, check_int, check_same_device, check_tensor


class Packing(NamedTuple):
    """The (S, T) rows of a packed batch: ``index`` the flat position of each
    slot (N, a padding slot, past a sequence's end), ``valid`` the slots that
    hold a token, ``total`` N."""

    index: Tensor
    valid: Tensor
    total: int


def packing(cu_seqlens: Tensor, total: int, max_seqlen: Optional[int] = None) -> Packing:
    """The rows of ``total`` packed tokens; ValueError naming the argument.
    ``max_seqlen`` (>= every length) avoids reading the lengths on the host
    (and, under ``torch.compile(fullgraph=True)``, is required)."""
    check_cu_seqlens(cu_seqlens, total)
    starts = cu_seqlens[:-1].to(torch.int64)
    lengths = cu_seqlens.diff().to(torch.int64)
    # The longest length is read on the host where it is needed (no
    # max_seqlen) or cheap (CPU), never inside torch.compile with max_seqlen.
    read = max_seqlen is None or (cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling())
    longest = int(lengths.max()) if lengths.numel() and read else 0
    if max_seqlen is None:
        width = longest
    else:
        width = check_int("max_seqlen", max_seqlen)
        if width < longest:
            raise ValueError(f"max_seqlen: {width} is below the longest sequence ({longest} tokens)")
    pos = torch.arange(width, device=cu_seqlens.device)
    valid = pos[None, :] < lengths[:, None]
    index = torch.where(valid, starts[:, None] + pos[None, :], total)
    return Packing(index, valid, total)


def to_rows(x: Optional[Tensor], p: Packing, name: str) -> Optional[Tensor]:
    """(N, ...) -> (S, T, ...), zeros (False) in the padding slots;
    differentiable. ValueError when x is not (N, ...)."""
    if x is None:
        return None
    if x.dim() < 1 or x.shape[0] != p.total:
        raise ValueError(f"{name}: expected shape (N, ...) with N = {p.total} packed tokens (cu_seqlens[-1]), "
                         f"got {tuple(x.shape)}")
    padded = torch.cat([x, x.new_zeros((1,) + tuple(x.shape[1:]))])
    return padded[p.index]


def from_rows(rows: Tensor, p: Packing) -> Tensor:
    """(S, T, ...) -> (N, ...): the tokens in their packed order."""
    return rows[p.valid]


def packed_rows(cu_seqlens: Optional[Tensor], max_seqlen: Optional[int],
                **tensors: Optional[Tensor]) -> tuple[Optional[Packing], list]:
    """(None, the tensors as given), or with ``cu_seqlens`` (the Packing, each
    (N,) tensor scattered into its (S, T) rows); in keyword order, None
    staying None. ValueError naming the argument."""
    if cu_seqlens is None:
        if max_seqlen is not None:
            raise ValueError("max_seqlen: only with cu_seqlens")
        return None, list(tensors.values())
    first_name, first = next(iter(tensors.items()))
    check_tensor(first_name, first)
    for name, t in tensors.items():
        if t is not None:
            check_tensor(name, t)
            if t.dim() != 1:
                raise ValueError(f"{name}: expected shape (N,) with cu_seqlens, got {tuple(t.shape)}")
    check_same_device(cu_seqlens=cu_seqlens, **{first_name: first})
    p = packing(cu_seqlens, first.shape[0], max_seqlen)
    return p, [to_rows(t, p, name) for name, t in tensors.items()]


__all__ = ["Packing", "from_rows", "packed_rows", "packing", "to_rows"]

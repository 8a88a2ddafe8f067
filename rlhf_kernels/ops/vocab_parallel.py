"""Vocabulary-parallel log-probabilities and entropy: each rank of a process
group holds a shard of the vocabulary (its columns of the logits, or its rows
of the LM head: Megatron's ColumnParallelLinear layout); the labels are
global ids, the same on every rank.

Forward: each rank runs its backend's row kernels on its shard (the ones of
``logprobs_from_logits`` / ``logprobs_from_hidden``), which give per row the
log-prob of the label where the shard holds it, the shard's entropy, its raw
max m_r and its log-sum s_r = log sum_v exp((x_v - m_r) / T); one all_gather
of those partials, and every rank merges them:

    M = max_r m_r,   L = log sum_r exp((m_r - M) / T + s_r)
    s'_r = (M - m_r) / T + L      (the whole row's log-sum, at m_r)
    logp = logp_owner + s_owner - s'_owner
    H = sum_r w_r (H_r + s'_r - s_r),   w_r = exp(s_r - s'_r)

Backward: no collective for the logits or the head rows: the shard's kernel
backward, given (m_r, s'_r) and the whole row's H, is the gradient of the
whole softmax on the shard. A row whose label another shard holds has no
one-hot term on this shard: the head's tiles and the eager rows take such a
label (one past the shard) as it is; the logits kernels, which check their
labels, run it with local label 0 and the gradient of that column is then
written again from its exact value (one rounding, as every other column).
The hidden state's gradient is the sum of the shards' parts: one all_reduce.
Every rank must backpropagate the same upstream gradients (the same loss on
the same outputs), as with Megatron's vocabulary-parallel cross-entropy.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .._dispatch import checks_enabled, native_extension_loaded, resolve_backend, triton_installed
from .._launch import acc_dtype


class RowKernels(NamedTuple):
    """A backend's row contract: ``forward(logits (N, V), labels (N,), T,
    ignore_index, compute_entropy) -> (logp, entropy, row_max, log_sum)`` and
    ``backward(grad_logp, grad_entropy, logits, labels, row_max, log_sum,
    entropy, T, ignore_index) -> grad_logits``; ``foreign_ok``: a label V is
    taken as no label of this shard."""

    forward: Callable
    backward: Callable
    foreign_ok: bool


def _eager_forward(logits, labels, temperature, ignore_index, compute_entropy):
    x = logits.to(acc_dtype(logits.dtype))
    row_max = x.amax(-1)
    y = (x - row_max.unsqueeze(-1)) / temperature
    log_sum = torch.logsumexp(y, -1)
    ignored = labels == ignore_index
    here = (labels >= 0) & (labels < x.shape[-1])  # else ignored, or another shard's
    picked = y.gather(-1, torch.where(here, labels, 0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(here, picked - log_sum, 0.0)
    entropy = log_sum - (torch.softmax(y, -1) * y).sum(-1) if compute_entropy else x.new_empty(0)
    return logp, torch.where(ignored, 0.0, entropy) if compute_entropy else entropy, row_max, log_sum


def _eager_backward(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy, temperature, ignore_index):
    x = logits.to(acc_dtype(logits.dtype))
    log_p = (x - row_max.unsqueeze(-1)) / temperature - log_sum.unsqueeze(-1)
    p = log_p.exp()
    ignored = labels == ignore_index
    here = (labels >= 0) & (labels < x.shape[-1])
    onehot = torch.zeros_like(p).scatter_(-1, torch.where(here, labels, 0).unsqueeze(-1), here.unsqueeze(-1).to(p))
    grad = grad_logp.unsqueeze(-1) * (onehot - p)
    if grad_entropy is not None:
        grad = grad - grad_entropy.unsqueeze(-1) * p * (log_p + entropy.unsqueeze(-1))
    return torch.where(ignored.unsqueeze(-1), 0.0, grad / temperature).to(logits.dtype)


def row_kernels(backend: str) -> RowKernels:
    """The row contract of ``backend`` ("cpu" | "cuda" | "triton" | "eager")."""
    if backend == "eager":
        return RowKernels(_eager_forward, _eager_backward, True)
    ops = torch.ops.rlhf_kernels
    if backend in ("cpu", "cuda") and native_extension_loaded():
        fwd, bwd = ops.logprobs.default, ops.logprobs_backward.default
    elif backend == "triton" and triton_installed():
        from ..triton import logprobs as _triton  # noqa: F401  (defines the ops)

        fwd, bwd = ops.logprobs_triton.default, ops.logprobs_triton_backward.default
    else:
        raise ValueError(f"backend: {backend!r} is not available here")
    return RowKernels(lambda *a: fwd(*a, False), bwd, False)


class Shard(NamedTuple):
    """This rank's place in the vocabulary: global ids [start, start + size)."""

    group: object
    start: int
    size: int


def shard_of(group, vocab_start: Optional[int], shard_size: int) -> Shard:
    """The shard of this rank; ValueError naming the argument. ``vocab_start``
    defaults to rank x shard_size (even shards)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("vocab_parallel_group: torch.distributed is not initialised")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("vocab_parallel_group: this process is not a member of the group")
    if vocab_start is None:
        vocab_start = rank * shard_size
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start: expected an int >= 0, got {vocab_start!r}")
    return Shard(group, vocab_start, shard_size)


def _local_labels(labels: Tensor, shard: Shard, ignore_index: int, foreign: int) -> tuple[Tensor, Tensor, Tensor]:
    """(local ids: the label's column where this shard holds it, ignore_index
    where ignored, else ``foreign``; owned; ignored)."""
    ignored = labels == ignore_index
    local = labels - shard.start
    owned = (local >= 0) & (local < shard.size) & ~ignored
    return torch.where(owned, local, torch.where(ignored, labels, foreign)), owned, ignored


def _merge(shard: Shard, logp: Tensor, entropy: Tensor, row_max: Tensor, log_sum: Tensor, owned: Tensor,
           ignored: Tensor, temperature: float, compute_entropy: bool, check: bool):
    """The one collective: every rank's (m, s, logp, owned, H) rows; returns
    (logp, entropy or empty, this shard's s'). ValueError (``check``) when a
    label is in no shard or in several."""
    acc = row_max.dtype
    parts = [row_max, log_sum, torch.where(owned, logp, 0.0), owned.to(acc)]
    if compute_entropy:
        parts.append(entropy)
    mine = torch.stack(parts)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(shard.group))]
    dist.all_gather(gathered, mine, group=shard.group)
    every = torch.stack(gathered)  # (R, parts, N)
    m, s, lp, own = every[:, 0], every[:, 1], every[:, 2], every[:, 3]
    top = m.amax(0)
    total = torch.logsumexp((m - top) / temperature + s, 0)
    whole = (top - m) / temperature + total  # s'_r of every shard, (R, N)
    bad = (own.sum(0) != 1) & ~ignored
    if check and bool(bad.any()):
        raise ValueError("labels: an id outside every rank's vocabulary shard, or in several "
                         "(check vocab_start and the shards' sizes)")
    # unchecked (a GPU without RLHF_KERNELS_CHECK=1): NaN there, as the whole-vocabulary op gives
    out_logp = torch.where(ignored, 0.0, torch.where(bad, math.nan, (own * (lp + s - whole)).sum(0)))
    out_entropy = row_max.new_empty(0)
    if compute_entropy:
        weights = torch.exp(s - whole)
        out_entropy = torch.where(ignored, 0.0, (weights * (every[:, 4] + whole - s)).sum(0))
    return out_logp, out_entropy, whole[dist.get_rank(shard.group)]


def _column_zero(logits: Tensor, row_max: Tensor, whole: Tensor, entropy: Optional[Tensor], g: Tensor,
                 g_entropy: Optional[Tensor], temperature: float) -> Tensor:
    """The exact gradient of column 0 for a row without a label on it:
    -(g + g_H (log p + H)) p / T, p = exp((x - m) / T - s')."""
    log_p = (logits[:, 0].to(row_max.dtype) - row_max) / temperature - whole
    p = log_p.exp()
    coef = g if g_entropy is None else g + g_entropy * (log_p + entropy)
    return -coef * p / temperature


class _FromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, shard, kernels, temperature, ignore_index, compute_entropy, check):
        local, owned, ignored = _local_labels(labels, shard, ignore_index, shard.size if kernels.foreign_ok else 0)
        logp, entropy, row_max, log_sum = kernels.forward(logits, local, temperature, ignore_index,
                                                           compute_entropy)
        out_logp, out_entropy, whole = _merge(shard, logp, entropy, row_max, log_sum, owned, ignored, temperature,
                                              compute_entropy, check)
        # the whole row's entropy: the entropy term of the kernel's backward
        ctx.save_for_backward(logits, local, owned, ignored, row_max, whole, out_entropy if compute_entropy else None)
        ctx.params = (kernels, temperature, ignore_index, compute_entropy)
        ctx.mark_non_differentiable(*(() if compute_entropy else (out_entropy,)))
        ctx.set_materialize_grads(False)
        return out_logp, out_entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, local, owned, ignored, row_max, whole, entropy = ctx.saved_tensors
        kernels, temperature, ignore_index, compute_entropy = ctx.params
        if grad_logp is None and (grad_entropy is None or not compute_entropy):
            return (None,) * 8
        acc = row_max.dtype
        g = grad_logp.to(acc) if grad_logp is not None else torch.zeros_like(row_max)
        g_entropy = grad_entropy.to(acc) if compute_entropy and grad_entropy is not None else None
        grad = kernels.backward(g, g_entropy, logits, local, row_max, whole, entropy, temperature, ignore_index)
        if not kernels.foreign_ok:  # the rows run with local label 0 for another shard's label
            exact = _column_zero(logits, row_max, whole, entropy, g, g_entropy, temperature)
            grad[:, 0] = torch.where(owned | ignored, grad[:, 0], exact.to(grad.dtype))
        return (grad,) + (None,) * 7


def logprobs_from_logits_vp(logits: Tensor, labels: Tensor, group, vocab_start: Optional[int], temperature: float,
                            ignore_index: int, compute_entropy: bool, backend: Optional[str]) -> tuple[Tensor, Tensor]:
    """logits (N, V_r) this rank's vocabulary columns, labels (N,) int64
    global ids: (logp, entropy or empty), each (N,), the same on every rank."""
    shard = shard_of(group, vocab_start, logits.shape[-1])
    kernels = row_kernels(resolve_backend(backend, logits.device, "logprobs"))
    return _FromLogits.apply(logits, labels, shard, kernels, temperature, ignore_index, compute_entropy,
                             logits.device.type == "cpu" or checks_enabled())


class _FromHidden(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, shard, forward, backward, temperature, ignore_index,
                compute_entropy, check):
        local, owned, ignored = _local_labels(labels, shard, ignore_index, shard.size)
        logp, entropy, row_max, log_sum = forward(hidden, weight, bias, local, temperature, ignore_index,
                                                  compute_entropy)
        out_logp, out_entropy, whole = _merge(shard, logp, entropy, row_max, log_sum, owned, ignored, temperature,
                                              compute_entropy, check)
        ctx.save_for_backward(hidden, weight, bias, local, owned, ignored, row_max, whole,
                              out_entropy if compute_entropy else None)
        ctx.params = (shard, backward, temperature, ignore_index, compute_entropy)
        ctx.mark_non_differentiable(*(() if compute_entropy else (out_entropy,)))
        ctx.set_materialize_grads(False)
        return out_logp, out_entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, local, owned, ignored, row_max, whole, entropy = ctx.saved_tensors
        shard, backward, temperature, ignore_index, compute_entropy = ctx.params
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_bias = need_bias and bias is not None
        if grad_logp is None and (grad_entropy is None or not compute_entropy):
            return (None,) * 11
        acc = row_max.dtype
        g = grad_logp.to(acc) if grad_logp is not None else torch.zeros_like(row_max)
        g_entropy = grad_entropy.to(acc) if compute_entropy and grad_entropy is not None else None
        grad_hidden, grad_weight, grad_bias = backward(g, g_entropy, hidden, weight, bias, local, row_max, whole,
                                                       entropy, temperature, ignore_index, need_hidden,
                                                       need_weight, need_bias)
        if need_hidden:
            grad_hidden = grad_hidden.to(acc)
            dist.all_reduce(grad_hidden, group=shard.group)  # the sum of the shards' parts
            grad_hidden = grad_hidden.to(hidden.dtype)
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return (grad_hidden if need_hidden else None, grad_weight if need_weight else None,
                grad_bias if need_bias else None) + (None,) * 8


def _hidden_kernels(backend: str, chunk_bytes: int):
    """(forward, backward) of the hidden path for ``backend``, in the shape
    _FromHidden calls them."""
    if backend == "eager":
        def logits_of(hidden, weight, bias):  # in the accumulation dtype, as the eager head
            acc = acc_dtype(hidden.dtype)
            return torch.nn.functional.linear(hidden.to(acc), weight.to(acc), None if bias is None else bias.to(acc))

        def forward(hidden, weight, bias, labels, temperature, ignore_index, compute_entropy):
            return _eager_forward(logits_of(hidden, weight, bias), labels, temperature, ignore_index,
                                  compute_entropy)

        def backward(g, g_entropy, hidden, weight, bias, labels, row_max, log_sum, entropy, temperature,
                     ignore_index, need_hidden, need_weight, need_bias):
            acc = row_max.dtype
            dz = _eager_backward(g, g_entropy, logits_of(hidden, weight, bias), labels, row_max, log_sum, entropy,
                                 temperature, ignore_index)
            grad_hidden = (dz @ weight.to(acc)).to(hidden.dtype) if need_hidden else None
            grad_weight = (dz.T @ hidden.to(acc)).to(weight.dtype) if need_weight else None
            grad_bias = dz.sum(0).to(bias.dtype) if need_bias else None
            return grad_hidden, grad_weight, grad_bias

        return forward, backward
    from .lm_head_tiles import backward_tiles, forward_tiles

    rows = "triton" if backend == "triton" else "native"

    def forward(hidden, weight, bias, labels, temperature, ignore_index, compute_entropy):
        return forward_tiles(hidden, weight, bias, labels, temperature, ignore_index, compute_entropy, chunk_bytes,
                             rows, foreign_ok=True)

    def backward(g, g_entropy, hidden, weight, bias, labels, row_max, log_sum, entropy, temperature, ignore_index,
                 need_hidden, need_weight, need_bias):
        return backward_tiles(g, g_entropy, hidden, weight, bias, labels, row_max, log_sum, entropy, temperature,
                              ignore_index, chunk_bytes, rows, need_hidden, need_weight, need_bias, foreign_ok=True)

    return forward, backward


def logprobs_from_hidden_vp(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, group,
                            vocab_start: Optional[int], temperature: float, ignore_index: int, compute_entropy: bool,
                            chunk_bytes: int, backend: Optional[str]) -> tuple[Tensor, Tensor]:
    """hidden (N, H), weight (V_r, H) this rank's head rows, bias (V_r,) or
    None, labels (N,) int64 global ids: (logp, entropy or empty), each (N,),
    the same on every rank; hidden's gradient complete on every rank."""
    shard = shard_of(group, vocab_start, weight.shape[0])
    forward, backward = _hidden_kernels(resolve_backend(backend, hidden.device, "logprobs_from_hidden"), chunk_bytes)
    return _FromHidden.apply(hidden, weight, bias, labels, shard, forward, backward, temperature, ignore_index,
                             compute_entropy, hidden.device.type == "cpu" or checks_enabled())


__all__ = ["logprobs_from_hidden_vp", "logprobs_from_logits_vp", "row_kernels", "shard_of"]

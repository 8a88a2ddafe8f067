"""logprobs_from_hidden and ppo_loss_from_hidden: the log-probabilities (and
entropy, and the PPO loss) of the sampled tokens straight from the last hidden
state and the LM head, never building the (N, V) logits.

The logits z = (hidden @ weight.T + bias) are made one tile at a time, a
token block of ``tb`` rows by a vocabulary block of ``vb`` columns, into one
float32 buffer (float64 for float64 inputs; bf16/fp16 products accumulate in
float32 and are never rounded to the input dtype), and each tile goes through
our logprobs row kernel (online softmax, the label, entropy) as it stands:

Forward: per tile the kernel gives each row's raw max m_c, log s_c (the
log-sum of exp((z - m_c) / T)), entropy H_c and, for the tile holding the
label, logp_c. With M = max_c m_c and a_c = (m_c - M) / T + log s_c:
    log_sum = logsumexp_c a_c,  w_c = exp(a_c - log_sum),
    logp    = logp_c* + (a_c* - log_sum)          (c*: the label's tile)
    entropy = sum_c w_c (H_c + log_sum - a_c)
every term of which is <= 0 (logp) or >= 0 (entropy): no cancellation,
exact for any V (a tile narrower than vb at the end is just narrower).
Backward: each tile is made again (one GEMM) and the row kernel writes its
gradient over it from the forward's (M, log_sum, entropy); then
d hidden += dZ @ W_c and d W_c = dZ^T @ hidden (all of a token block in one
GEMM, so a bf16 weight gradient is rounded once), d bias_c = sum(dZ): four
GEMMs in all for a per-token output, whose upstream gradient is only known
in the backward. ``ppo_loss_from_hidden``, a scalar loss whose per-token
gradient is known as soon as a token's log-prob is, computes its gradient
in the forward instead (token blocks of whole-vocabulary rows, ``row_block``):
three GEMMs (``_loss_grad_in_forward``).

A tile is a window of its rows: the buffer has one spare column past the
vocabulary block, set to -inf (no weight in the softmax); a label outside the
window points at it, so the row kernel adds its one-hot there, and the
GEMMs never read it.

bf16/fp16 hidden and weight go into the GEMMs as they are, with float32
products (cuBLAS; on a CPU with bf16/fp16 dot products, MKL's
cblas_gemm_bf16bf16f32 / f16f16f32), and the logits gradient goes into the
gradient GEMMs in their dtype, as on every GPU implementation. Other CPUs
(and a torch without MKL) multiply float32 copies of each weight tile, which
is faster there (``_mixed_products``, ``_cpu_mixed_gemm``).

Memory: ``tb * (vb + 8) * 4`` bytes of buffer, plus with bf16/fp16 operands
``tb * (vb + 8) * 2`` for its bf16/fp16 copy and ``vb * H * 4`` for a float32
weight-gradient tile (``2 * vb * H * 4`` for the float32 copies of a weight
tile and of its gradient where they are converted), all within a budget
(``chunk_bytes``, default ``default_chunk_bytes``: 1/32 of the float32 logits
within [8, 256] MiB; ``tile_plan`` is the formula, ``_tile_bytes`` its
arguments), plus O(N * H) for the float32 hidden gradient. The weight gradient
is written in place, except for bf16/fp16 weights when N is more than one
token block (a float32 accumulator, V * H * 4 bytes).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
from torch import Tensor

from .._dispatch import (
    checks_enabled, implementation, native_extension_loaded, register, resolve_backend, triton_installed,
)
from .._launch import acc_dtype, row_layout
from .._validation import (
    FLOAT_DTYPES, INDEX_DTYPES, check_int, check_labels_in_range, check_positive, check_same_device, check_tensor,
)
from .. import reference as _reference
from ._op import differentiable

if triton_installed():
    from ..triton import logprobs as _triton

# The smallest vocabulary block worth a GEMM, and the budget bounds.
MIN_VOCAB_BLOCK = 1024
_MIN_TILE_COLS = 128
_MIN_CHUNK_BYTES = 8 << 20
_MAX_CHUNK_BYTES = 256 << 20
# The three-GEMM loss path's default budget, in default_chunk_bytes: 1/16 of
# the float32 logits (token blocks of N/16 whole rows; the dW accumulation
# over fewer, longer blocks runs faster than at N/32 on CPU BLAS).
LOSS_BUDGET_FACTOR = 2
# Spare columns per buffer row: one sentinel, rounded up to 8 (rows of a vb
# that is a multiple of 8 stay 32-byte aligned).
_PAD = 8


def default_chunk_bytes(n_rows: int, vocab: int) -> int:
    """The default tile budget: 1/32 of the float32 logits, within [8, 256] MiB.
    (At N=1024, V=151936: 19 MiB, 0.03x the logits; at N=8192: 152 MiB.)"""
    return int(min(_MAX_CHUNK_BYTES, max(_MIN_CHUNK_BYTES, n_rows * vocab * 4 // 32)))


def tile_plan(n_rows: int, vocab: int, chunk_bytes: int, itemsize: int = 4, col_bytes: int = 0) -> tuple[int, int]:
    """(token block, vocabulary block) for tiles of at most ``chunk_bytes``:
    the buffer (``itemsize`` bytes an element) plus ``col_bytes`` per
    vocabulary column (``_tile_bytes`` gives both for the operands). All tokens in one block unless a
    MIN_VOCAB_BLOCK-wide tile of them would not fit; then the widest
    vocabulary block that does, but never narrower than _MIN_TILE_COLS (a
    budget below one such row is exceeded). A token block is never shorter
    than ``col_bytes / itemsize`` rows (or n_rows): the per-column operand
    bytes, which a tile pays whatever its token count, take at most half of a
    tile, so that a wide hidden state (H = 8192: 32 KiB a column) narrows the
    vocabulary block instead of leaving one token per GEMM."""
    vmin = min(vocab, MIN_VOCAB_BLOCK)
    tb = (chunk_bytes - vmin * col_bytes) // ((vmin + _PAD) * itemsize)
    tb = max(1, min(n_rows, max(tb, min_token_block(itemsize, col_bytes))))
    vb = max(min(vocab, _MIN_TILE_COLS), min(vocab, chunk_bytes // (tb * itemsize + col_bytes) - _PAD))
    return tb, vb


def min_token_block(itemsize: int, col_bytes: int) -> int:
    """tile_plan's shortest token block: as many buffer bytes a column as operand bytes."""
    return -(-col_bytes // itemsize)


def row_block_bytes(rows: int, vocab: int, itemsize: int = 4, col_bytes: int = 0) -> int:
    """The budget in which row_block gives ``rows`` tokens a block (its inverse)."""
    return vocab * col_bytes + rows * (vocab + _PAD) * itemsize


def _mixed_products(hidden: Tensor, weight: Tensor) -> bool:
    """Whether the GEMMs take bf16/fp16 hidden and weight as they are, with
    float32 products (cuBLAS; on CPU MKL's, when this torch has it: the
    extension's mixed_gemm_), rather than float32 copies of them."""
    if not (_low_precision(hidden) and hidden.dtype == weight.dtype):
        return False
    if hidden.device.type == "cuda":
        return True
    return hidden.device.type == "cpu" and _cpu_mixed_gemm(hidden.dtype)


@functools.lru_cache(maxsize=None)  # the CPU and the build do not change
def _cpu_mixed_gemm(dtype: torch.dtype) -> bool:
    """MKL's bf16/fp16 -> float32 GEMM (mixed_gemm_) where it beats the
    float32 GEMM on float32 copies: a CPU with bf16 (fp16) dot products,
    AVX512_BF16 or AMX (AMX-FP16). Without them MKL converts inside the GEMM:
    on an AVX2 EPYC the head ran ~5% slower that way, with 0.094x instead of
    0.071x the logits in extra peak memory (the bf16 copy of each tile)."""
    if not (native_extension_loaded() and torch.ops.rlhf_kernels.mixed_gemm_available(dtype)):
        return False
    if dtype == torch.bfloat16:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.cpu._is_amx_fp16_supported()


def _tile_bytes(hidden: Tensor, weight: Tensor) -> tuple[int, int]:
    """(bytes per tile element, bytes per vocabulary column) for tile_plan /
    row_block: the float32 (float64) buffer, plus, with mixed products, its
    bf16/fp16 copy for the gradient GEMMs and a float32 weight-gradient tile
    (H * 4 a column); with converted operands, the float32 copies of a weight
    tile and of its gradient (2 * H * 4)."""
    itemsize = torch.finfo(acc_dtype(hidden.dtype)).bits // 8
    if _mixed_products(hidden, weight):
        return itemsize + hidden.element_size(), weight.shape[1] * 4
    return itemsize, 2 * weight.shape[1] * 4 if _low_precision(weight) else 0


def _plan(hidden: Tensor, weight: Tensor, n_rows: int, chunk_bytes: int) -> tuple[int, int]:
    return tile_plan(n_rows, weight.shape[0], chunk_bytes, *_tile_bytes(hidden, weight))


def row_block(n_rows: int, vocab: int, chunk_bytes: int, itemsize: int = 4, col_bytes: int = 0) -> int:
    """Tokens per block of whole-vocabulary tiles within ``chunk_bytes`` (the
    three-GEMM loss path): ``(chunk_bytes - vocab * col_bytes) // ((vocab + 8)
    * itemsize)``, at most n_rows; 0 when not one row fits."""
    return max(0, min(n_rows, (chunk_bytes - vocab * col_bytes) // ((vocab + _PAD) * itemsize)))


# --- the row kernels per backend: fwd(tile, labels, inv_t, entropy) and
# bwd(g, g_entropy, tile, labels, row_max, log_sum, entropy, inv_t), in place ---

_NO_LABEL = -1  # never a local label (those are in [0, vb]): the kernels' ignore_index


def _native_fwd(tile, labels, inv_t, compute_entropy):
    tensor, inner_rows, outer, inner = row_layout(tile)
    return torch.ops.rlhf_kernels.logprobs_fwd_native(tensor, labels, inner_rows, outer, inner, inv_t, _NO_LABEL,
                                                      compute_entropy)


def _native_bwd(g, g_entropy, tile, labels, row_max, log_sum, entropy, inv_t):
    tensor, inner_rows, outer, inner = row_layout(tile)
    assert tensor is tile
    torch.ops.rlhf_kernels.logprobs_bwd_native(g, g_entropy, tile, labels, row_max, log_sum, entropy, tile,
                                               inner_rows, outer, inner, outer, inner, inv_t, _NO_LABEL)


def _triton_fwd(tile, labels, inv_t, compute_entropy):
    return _triton.forward(tile, labels, inv_t, _NO_LABEL, compute_entropy)


def _triton_bwd(g, g_entropy, tile, labels, row_max, log_sum, entropy, inv_t):
    _triton.backward(g, g_entropy, tile, labels, row_max, log_sum, entropy, tile, inv_t, _NO_LABEL)


_ROWS: dict[str, tuple[Callable, Callable]] = {"native": (_native_fwd, _native_bwd)}
if triton_installed():
    _ROWS["triton"] = (_triton_fwd, _triton_bwd)


# --- tiles ------------------------------------------------------------------


def _low_precision(t: Tensor) -> bool:
    return t.dtype in (torch.bfloat16, torch.float16)


def _gemm(out: Tensor, a: Tensor, b: Tensor, accumulate: bool = False) -> None:
    """out (=|+=) a @ b, out in the accumulation dtype. bf16/fp16 operands
    (``_mixed_products``): a float32 product, cuBLAS's or MKL's."""
    if a.dtype != out.dtype:
        if out.device.type == "cuda":
            torch.addmm(out, a, b, out_dtype=out.dtype, beta=1 if accumulate else 0, out=out)
        else:
            torch.ops.rlhf_kernels.mixed_gemm_(out, a, b, 1.0 if accumulate else 0.0)
    elif accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


class _Operands:
    """hidden, weight and bias as the GEMMs take them, a block at a time."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], acc: torch.dtype):
        self.acc = acc
        self.convert = not _mixed_products(hidden, weight)
        self.hidden, self.weight, self.bias = hidden, weight, bias

    def rows(self, t0: int, t1: int) -> Tensor:
        h = self.hidden[t0:t1]
        return h.to(self.acc) if self.convert else h

    def cols(self, v0: int, v1: int) -> Tensor:
        w = self.weight[v0:v1]
        return w.to(self.acc) if self.convert else w

    def logits_into(self, buf: Tensor, h: Tensor, w: Tensor, v0: int, v1: int) -> Tensor:
        """Writes z = h @ w.T (+ bias) into buf's first v1 - v0 columns and -inf
        into the sentinel column after them; returns the (n, vc + 1) window."""
        n, vc = h.shape[0], v1 - v0
        z = buf[:n, :vc]
        _gemm(z, h, w.t())
        if self.bias is not None:
            z.add_(self.bias[v0:v1].to(self.acc))
        buf[:n, vc].fill_(-math.inf)
        return buf[:n, :vc + 1]


def _local_labels(labels: Tensor, v0: int, vc: int) -> tuple[Tensor, Tensor]:
    """Labels relative to a window [v0, v0 + vc); outside it, the sentinel column vc."""
    local = labels - v0
    inside = (local >= 0) & (local < vc)
    return torch.where(inside, local, vc), inside


def _forward_impl(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, temperature: float,
                  ignore_index: int, compute_entropy: bool, chunk_bytes: int, rows: str, extras: bool = False):
    """(logp, entropy, row_max, log_sum), and with ``extras`` a dict of TRL's
    ChunkedLogProbFunction statistics per row (float32 | bool, (N,)):
    log_sum_sq_probs = log sum p^2, mean_logits = mean of z / T over V, and
    is_top1 = the label is the first maximum of z."""
    fwd, _ = _ROWS[rows]
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    if labels.device.type == "cpu":  # as the native CPU ops check (on a GPU: NaN, see the docstring)
        check_labels_in_range(labels, vocab, ignore_index)
    acc = acc_dtype(hidden.dtype)
    dev = hidden.device
    inv_t = 1.0 / temperature
    logp = torch.full((n_rows,), math.nan, dtype=acc, device=dev)
    entropy = torch.zeros(n_rows if compute_entropy else 0, dtype=acc, device=dev)
    row_max = torch.empty(n_rows, dtype=acc, device=dev)
    log_sum = torch.empty(n_rows, dtype=acc, device=dev)
    stats = {"log_sum_sq_probs": torch.empty(n_rows, dtype=acc, device=dev),
             "mean_logits": torch.empty(n_rows, dtype=acc, device=dev),
             "is_top1": torch.empty(n_rows, dtype=torch.bool, device=dev)} if extras else None
    if n_rows == 0:
        return (logp, entropy, row_max, log_sum) + ((stats,) if extras else ())
    tb, vb = _plan(hidden, weight, n_rows, chunk_bytes)
    buf = torch.empty(tb, vb + _PAD, dtype=acc, device=dev)
    ops = _Operands(hidden, weight, bias, acc)
    n_tiles = -(-vocab // vb)
    for t0 in range(0, n_rows, tb):
        t1 = min(n_rows, t0 + tb)
        h, lab = ops.rows(t0, t1), labels[t0:t1]
        n = t1 - t0
        maxes = torch.empty(n_tiles, n, dtype=acc, device=dev)
        logs = torch.empty(n_tiles, n, dtype=acc, device=dev)
        ents = torch.empty(n_tiles, n, dtype=acc, device=dev) if compute_entropy else None
        label_logp = torch.full((n,), math.nan, dtype=acc, device=dev)
        label_tile = torch.zeros(n, dtype=torch.int64, device=dev)
        if extras:
            sq = torch.empty(n_tiles, n, dtype=acc, device=dev)
            z_sum = torch.zeros(n, dtype=acc, device=dev)
            z_label = torch.zeros(n, dtype=acc, device=dev)
            max_before = torch.full((n,), -math.inf, dtype=acc, device=dev)
        for c, v0 in enumerate(range(0, vocab, vb)):
            v1 = min(vocab, v0 + vb)
            tile = ops.logits_into(buf, h, ops.cols(v0, v1), v0, v1)
            local, inside = _local_labels(lab, v0, v1 - v0)
            lp, ent, mx, ls = fwd(tile, local, inv_t, compute_entropy)
            maxes[c], logs[c] = mx, ls
            if compute_entropy:
                ents[c] = ent
            label_logp = torch.where(inside, lp, label_logp)
            label_tile = torch.where(inside, c, label_tile)
            if extras:  # plain torch over the tile (only for TRL's optional outputs)
                real = tile[:, :v1 - v0]
                sq[c] = torch.logsumexp((real - mx[:, None]) * (2 * inv_t), 1)
                z_sum += real.sum(1) * inv_t
                z_label = torch.where(inside, real.gather(1, local.clamp(max=v1 - v0 - 1)[:, None])[:, 0], z_label)
                cols = torch.arange(v1 - v0, device=dev)
                prefix = torch.where(cols[None] < local[:, None], real, -math.inf).amax(1)
                max_before = torch.maximum(max_before, torch.where(lab >= v1, mx, torch.where(inside, prefix,
                                                                                             -math.inf)))
        m = maxes.amax(0)
        a = (maxes - m) * inv_t + logs  # log-sum of each tile relative to the row max
        ls = torch.logsumexp(a, 0).clamp_min(0)  # >= the max tile's log s >= 0
        ignored = lab == ignore_index
        row_max[t0:t1], log_sum[t0:t1] = m, ls
        a_label = a.gather(0, label_tile[None]).squeeze(0)
        logp[t0:t1] = torch.where(ignored, 0.0, label_logp + (a_label - ls))
        if compute_entropy:
            w = torch.exp(a - ls)
            entropy[t0:t1] = torch.where(ignored, 0.0, (w * (ents + (ls - a))).sum(0))
        if extras:  # sq_c = log sum exp(2 (z - m_c) / T) over tile c
            stats["log_sum_sq_probs"][t0:t1] = torch.logsumexp(sq + (2 * inv_t) * (maxes - m), 0) - 2 * ls
            stats["mean_logits"][t0:t1] = z_sum / vocab
            stats["is_top1"][t0:t1] = (z_label >= m) & (z_label > max_before)
    return (logp, entropy, row_max, log_sum) + ((stats,) if extras else ())


def _backward_impl(grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor], hidden: Tensor, weight: Tensor,
                   bias: Optional[Tensor], labels: Tensor, row_max: Tensor, log_sum: Tensor,
                   entropy: Optional[Tensor], temperature: float, ignore_index: int, chunk_bytes: int, rows: str,
                   need_hidden: bool, need_weight: bool, need_bias: bool):
    _, bwd = _ROWS[rows]
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    acc = row_max.dtype
    dev = hidden.device
    inv_t = 1.0 / temperature
    tb, vb = _plan(hidden, weight, max(n_rows, 1), chunk_bytes)
    many_blocks = n_rows > tb
    grad_hidden, grad_weight, grad_bias = _grad_buffers(hidden, weight, acc, tb, need_hidden, need_weight,
                                                        need_bias)
    ignored = labels == ignore_index
    bad = ~ignored & ((labels < 0) | (labels >= vocab))  # NaN gradients, as logprobs_from_logits gives
    zero = torch.zeros((), dtype=acc, device=dev)
    g = grad_logp.to(acc) if grad_logp is not None else torch.zeros(n_rows, dtype=acc, device=dev)
    g = torch.where(ignored, zero, torch.where(bad, math.nan, g)).contiguous()
    g_ent = None
    if grad_entropy is not None:
        g_ent = torch.where(ignored, zero, grad_entropy.to(acc)).contiguous()
    if n_rows == 0 or not (need_hidden or need_weight or need_bias):
        return grad_hidden, grad_weight, grad_bias
    buf = torch.empty(tb, vb + _PAD, dtype=acc, device=dev)
    ops = _Operands(hidden, weight, bias, acc)
    for t0 in range(0, n_rows, tb):
        t1 = min(n_rows, t0 + tb)
        n = t1 - t0
        h = ops.rows(t0, t1)
        lab = labels[t0:t1]
        for v0 in range(0, vocab, vb):
            v1 = min(vocab, v0 + vb)
            w = ops.cols(v0, v1)
            tile = ops.logits_into(buf, h, w, v0, v1)
            local, _ = _local_labels(lab, v0, v1 - v0)
            bwd(g[t0:t1], None if g_ent is None else g_ent[t0:t1], tile, local, row_max[t0:t1], log_sum[t0:t1],
                None if entropy is None else entropy[t0:t1], inv_t)
            _tile_grads(tile[:, :v1 - v0], h, w, grad_hidden, grad_weight, grad_bias, t0, t1, v0, v1, many_blocks)
    return grad_hidden, grad_weight, grad_bias


def _grad_buffers(hidden: Tensor, weight: Tensor, acc: torch.dtype, tb: int, need_hidden: bool,
                  need_weight: bool, need_bias: bool) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """The gradients _tile_grads writes for token blocks of ``tb`` rows: hidden
    and bias in the accumulation dtype; the weight's in place when every tile
    of it is one GEMM (one token block) or the weight is in the accumulation
    dtype, else float32; left unzeroed when one token block writes each of
    its rows once."""
    n_rows, vocab, dev = hidden.shape[0], weight.shape[0], hidden.device
    grad_hidden = torch.zeros(hidden.shape, dtype=acc, device=dev) if need_hidden else None
    grad_weight = None
    if need_weight:
        one_block = 0 < n_rows <= tb
        grad_weight = (torch.empty if one_block else torch.zeros)(
            weight.shape, dtype=weight.dtype if weight.dtype == acc or n_rows <= tb else acc, device=dev)
    grad_bias = torch.zeros(vocab, dtype=acc, device=dev) if need_bias else None
    return grad_hidden, grad_weight, grad_bias


def _tile_grads(dz: Tensor, h: Tensor, w: Tensor, grad_hidden: Optional[Tensor], grad_weight: Optional[Tensor],
                grad_bias: Optional[Tensor], t0: int, t1: int, v0: int, v1: int, many_blocks: bool) -> None:
    """The GEMMs of a tile's logits gradient dz (rows t0:t1, columns v0:v1):
    d hidden += dz @ w, d weight (+)= dz^T @ h, d bias += sum(dz). With bf16/fp16
    operands (mixed products) dz goes into the GEMMs in their dtype, as on
    every GPU implementation; the products stay float32."""
    d = dz.to(w.dtype) if _low_precision(w) else dz
    if grad_hidden is not None:
        _gemm(grad_hidden[t0:t1], d, w, accumulate=True)
    if grad_weight is not None:
        gw = grad_weight[v0:v1]
        if gw.dtype == dz.dtype:
            _gemm(gw, d.t(), h, accumulate=many_blocks)
        else:  # a bf16/fp16 weight gradient from one token block: one rounding
            product = torch.empty(gw.shape, dtype=dz.dtype, device=dz.device)
            _gemm(product, d.t(), h)
            gw.copy_(product)
    if grad_bias is not None:
        grad_bias[v0:v1] += dz.sum(0)


# --- a scalar loss: its gradient during the forward (three GEMMs) ----------------


def _agg_weights(mask: Tensor, agg: str, num_tokens, num_seqs, dtype: torch.dtype) -> Tensor:
    """(B, T) w with agg_loss(x, mask, agg, ...) == sum(w * x) for every x
    (the aggregation is linear in x: w is its gradient, taken once)."""
    x = torch.zeros(mask.shape, dtype=dtype, device=mask.device, requires_grad=True)
    with torch.enable_grad():
        total = _reference.agg_loss(x, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs)
        (w,) = torch.autograd.grad(total, x, allow_unused=True)
    return torch.zeros_like(x) if w is None else w.detach()


def _loss_grad_in_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, temperature: float,
                          ignore_index: int, chunk_bytes: int, rows: str, token_grads: Callable,
                          need: tuple[bool, bool, bool]):
    """Forward of a per-token loss from the hidden state with its gradient
    computed on the way: each token block's whole-vocabulary tile is made once
    (GEMM 1), its rows give logp and entropy, ``token_grads(t0, t1, logp,
    entropy) -> (g_logp, g_entropy or None)`` gives the loss's gradient at
    those tokens, the row kernel writes the logits gradient over the tile, and
    d hidden = dZ @ W (GEMM 2), d W += dZ^T @ h (GEMM 3). Returns (logp,
    entropy, grad_hidden, grad_weight, grad_bias), the gradients in the
    accumulation dtype (a bf16/fp16 weight's: in its dtype from one token
    block, else float32)."""
    fwd, bwd = _ROWS[rows]
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    if labels.device.type == "cpu":
        check_labels_in_range(labels, vocab, ignore_index)
    acc = acc_dtype(hidden.dtype)
    dev = hidden.device
    inv_t = 1.0 / temperature
    tb, vb = row_block(n_rows, vocab, chunk_bytes, *_tile_bytes(hidden, weight)), vocab
    assert tb > 0, "whole rows only"
    many_blocks = n_rows > tb
    need_hidden, need_weight, need_bias = need
    logp = torch.empty(n_rows, dtype=acc, device=dev)
    entropy = torch.empty(n_rows, dtype=acc, device=dev)
    grad_hidden, grad_weight, grad_bias = _grad_buffers(hidden, weight, acc, tb, need_hidden, need_weight,
                                                        need_bias)
    buf = torch.empty(tb, vb + _PAD, dtype=acc, device=dev)
    ops = _Operands(hidden, weight, bias, acc)
    w = ops.cols(0, vocab)
    zero = torch.zeros((), dtype=acc, device=dev)
    for t0 in range(0, n_rows, tb):
        t1 = min(n_rows, t0 + tb)
        h, lab = ops.rows(t0, t1), labels[t0:t1]
        tile = ops.logits_into(buf, h, w, 0, vocab)
        local, _ = _local_labels(lab, 0, vocab)
        lp, ent, mx, ls = fwd(tile, local, inv_t, True)
        ignored = lab == ignore_index
        logp[t0:t1] = torch.where(ignored, zero, lp)
        entropy[t0:t1] = torch.where(ignored, zero, ent)
        g, g_ent = token_grads(t0, t1, logp[t0:t1], entropy[t0:t1])
        g = torch.where(ignored, zero, g.to(acc)).contiguous()
        if g_ent is not None:
            g_ent = torch.where(ignored, zero, g_ent.to(acc)).contiguous()
        bwd(g, g_ent, tile, local, mx, ls, ent if g_ent is not None else None, inv_t)
        _tile_grads(tile[:, :vocab], h, w, grad_hidden, grad_weight, grad_bias, t0, t1, 0, vocab, many_blocks)
    return logp, entropy, grad_hidden, grad_weight, grad_bias


class _PrecomputedGrad(torch.autograd.Function):
    """A loss value tied to inputs whose gradients were computed in the
    forward: the backward scales them by the upstream gradient (in place: one
    backward through it)."""

    @staticmethod
    def forward(ctx, loss, grads, *inputs):
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("ppo_loss_from_hidden: the gradient computed in the forward was used by an earlier "
                               "backward; pass grad_in_forward=False to backpropagate through it twice")
        return (None, None) + tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)).to(x.dtype)
                                    for g, x in grads)


# --- the ops ------------------------------------------------------------------
# rlhf_kernels::logprobs_from_hidden(hidden (N, H), weight (V, H), bias (V,)?,
# labels (N,) int64, ...) -> (logp, entropy, row_max, log_sum), each (N,) in
# the accumulation dtype (entropy empty unless compute_entropy); rows names
# the row kernels ("native": the extension's CPU or CUDA kernels; "triton").


@torch.library.custom_op("rlhf_kernels::logprobs_from_hidden", mutates_args=())
def _logprobs_from_hidden_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                             temperature: float, ignore_index: int, compute_entropy: bool, chunk_bytes: int,
                             rows: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _forward_impl(hidden, weight, bias, labels, temperature, ignore_index, compute_entropy, chunk_bytes,
                         rows)


@_logprobs_from_hidden_op.register_fake
def _(hidden, weight, bias, labels, temperature, ignore_index, compute_entropy, chunk_bytes, rows):
    acc = acc_dtype(hidden.dtype)
    n = hidden.shape[0]
    return (hidden.new_empty(n, dtype=acc), hidden.new_empty(n if compute_entropy else 0, dtype=acc),
            hidden.new_empty(n, dtype=acc), hidden.new_empty(n, dtype=acc))


@torch.library.custom_op("rlhf_kernels::logprobs_from_hidden_backward", mutates_args=())
def _logprobs_from_hidden_backward_op(
        grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor], hidden: Tensor, weight: Tensor,
        bias: Optional[Tensor], labels: Tensor, row_max: Tensor, log_sum: Tensor, entropy: Optional[Tensor],
        temperature: float, ignore_index: int, chunk_bytes: int, rows: str, need_hidden: bool, need_weight: bool,
        need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    grads = _backward_impl(grad_logp, grad_entropy, hidden, weight, bias, labels, row_max, log_sum, entropy,
                           temperature, ignore_index, chunk_bytes, rows, need_hidden, need_weight, need_bias)
    like = (hidden, weight, weight)
    return tuple(hidden.new_empty(0) if grad is None else grad.to(x.dtype) for grad, x in zip(grads, like))


@_logprobs_from_hidden_backward_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, labels, row_max, log_sum, entropy, temperature, ignore_index,
      chunk_bytes, rows, need_hidden, need_weight, need_bias):
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            weight.new_empty((weight.shape[0],) if need_bias else (0,)))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, ignore_index, compute_entropy, chunk_bytes, rows = inputs
    _, entropy, row_max, log_sum = output
    ctx.mark_non_differentiable(row_max, log_sum)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, weight, bias, labels, row_max, log_sum, entropy if compute_entropy else None)
    ctx.params = (temperature, ignore_index, compute_entropy, chunk_bytes, rows)


def _backward(ctx, grad_logp, grad_entropy, _grad_row_max, _grad_log_sum):
    hidden, weight, bias, labels, row_max, log_sum, entropy = ctx.saved_tensors
    temperature, ignore_index, compute_entropy, chunk_bytes, rows = ctx.params
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_bias = need_bias and bias is not None
    if grad_logp is None and (grad_entropy is None or not compute_entropy):
        return (None,) * 9
    grads = _logprobs_from_hidden_backward_op(
        grad_logp, grad_entropy if compute_entropy else None, hidden, weight, bias, labels, row_max, log_sum,
        entropy, temperature, ignore_index, chunk_bytes, rows, need_hidden, need_weight, need_bias)
    grad_hidden, grad_weight, grad_bias = (g if need else None
                                           for g, need in zip(grads, (need_hidden, need_weight, need_bias)))
    return (grad_hidden, grad_weight, grad_bias) + (None,) * 6


_caller = differentiable(torch.ops.rlhf_kernels.logprobs_from_hidden.default, _setup_context, _backward)


def _kernel_backend(rows: str) -> Callable:
    def logprobs(hidden, weight, bias, labels, temperature, ignore_index, compute_entropy, chunk_bytes):
        logp, entropy, _, _ = _caller(hidden, weight, bias, labels, temperature, ignore_index, compute_entropy,
                                      chunk_bytes, rows)
        return logp, entropy

    return logprobs


def _reference_backend(hidden, weight, bias, labels, temperature, ignore_index, compute_entropy, chunk_bytes):
    """Plain PyTorch with the (N, V) logits, in the accumulation dtype."""
    acc = acc_dtype(hidden.dtype)
    logits = torch.nn.functional.linear(hidden.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    logp, entropy = _reference.logprobs_from_logits(logits, labels, temperature=temperature,
                                                    ignore_index=ignore_index, return_entropy=True)
    return logp, entropy if compute_entropy else logp.new_empty(0)


if native_extension_loaded():
    register("logprobs_from_hidden", ("cpu", "cuda"), _kernel_backend("native"))
if triton_installed():
    register("logprobs_from_hidden", ("triton",), _kernel_backend("triton"))
register("logprobs_from_hidden", ("reference",), _reference_backend)


# --- public functions -----------------------------------------------------------


def _check_head(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor) -> None:
    check_tensor("hidden", hidden, FLOAT_DTYPES)
    check_tensor("weight", weight, FLOAT_DTYPES)
    check_tensor("labels", labels, INDEX_DTYPES)
    if bias is not None:
        check_tensor("bias", bias, FLOAT_DTYPES)
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    if hidden.dim() < 1:
        raise ValueError("hidden: expected shape (..., H) with at least one dimension")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: expected shape (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight: the vocabulary dimension V must be > 0")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels: shape {tuple(labels.shape)} does not match hidden.shape[:-1] "
                         f"{tuple(hidden.shape[:-1])}")
    if (hidden.dtype == torch.float64) != (weight.dtype == torch.float64):
        raise ValueError(f"weight: dtype {weight.dtype} with hidden {hidden.dtype}: float64 goes with float64 only")


def _check_chunk_bytes(chunk_bytes: Optional[int], n_rows: int, vocab: int, factor: int = 1) -> int:
    if chunk_bytes is None:
        return factor * default_chunk_bytes(n_rows, vocab)
    chunk_bytes = check_int("chunk_bytes", chunk_bytes)
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes: must be > 0, got {chunk_bytes}")
    return chunk_bytes


def logprobs_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    chunk_bytes: int | None = None,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probabilities of ``labels`` under ``softmax((hidden @ weight.T + bias) / temperature)``,
    without building the logits.

    The same values and gradients as
    ``logprobs_from_logits(hidden @ weight.T + bias, labels, ...)``, computed
    a (token block x vocabulary block) tile at a time into one float32 buffer
    of at most ``chunk_bytes``: extra memory is that buffer plus O(N * H)
    (see the module docstring), not the (N, V) logits. Differentiable with
    respect to hidden, weight (possibly tied to the input embedding) and
    bias; the backward makes each tile again (no logits are kept).

    Args:
        hidden: (..., H) float32 | bfloat16 | float16 (float64 for gradcheck),
            the last hidden state.
        weight: (V, H), the LM head (any float dtype; float64 with float64 hidden).
        labels: (...) int64 | int32, the sampled token ids in [0, V) or
            ``ignore_index`` (logp = entropy = 0 and a zero gradient there).
            On CPU an id out of range raises ValueError; on a GPU it gives NaN
            unless ``RLHF_KERNELS_CHECK=1``.
        bias: (V,) or None.
        temperature: > 0, the logits are divided by it.
        return_entropy: also return the entropy of each position (costs
            nothing more when not asked; differentiable when it is).
        ignore_index: label value that marks positions to skip.
        chunk_bytes: budget of the tile buffer; default
            ``default_chunk_bytes(N, V)`` = N * V * 4 / 32 within [8, 256] MiB.
        backend: "cpu" | "cuda" | "triton" (the row kernels; GEMMs are BLAS /
            cuBLAS) | "reference" (plain PyTorch, with the logits); default as
            for every op.

    Returns:
        logp: (...) float32 (float64 for float64 hidden); with
        ``return_entropy`` the tuple (logp, entropy).
    """
    _check_head(hidden, weight, bias, labels)
    temperature = check_positive("temperature", temperature)
    ignore_index = check_int("ignore_index", ignore_index)
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"ignore_index: must fit in int64, got {ignore_index}")
    vocab = weight.shape[0]
    if labels.is_cuda and checks_enabled():
        check_labels_in_range(labels, vocab, ignore_index)
    shape = labels.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1).to(torch.int64)
    chunk_bytes = _check_chunk_bytes(chunk_bytes, flat_labels.numel(), vocab)
    logp, entropy = implementation("logprobs_from_hidden", backend, hidden.device)(
        flat_hidden, weight, bias, flat_labels, temperature, ignore_index, bool(return_entropy), chunk_bytes)
    logp = logp.view(shape)
    return (logp, entropy.view(shape)) if return_entropy else logp


def ppo_loss_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    ref_logp: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    token_weights: Tensor | None = None,
    ratio_level: str = "token",
    chunk_bytes: int | None = None,
    grad_in_forward: bool = True,
    backend: str | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The PPO policy loss, KL penalty and entropy bonus of ``ppo_loss_from_logits``
    straight from the last hidden state and the LM head, never building the logits.

    ``logp, H = logprobs_from_hidden(hidden, weight, labels, bias=bias,
    temperature=temperature, return_entropy=True)``, then
    ``loss = ppo_policy_loss(logp, ...) + kl_coef * agg(kl_penalty(logp, ref_logp))
    - entropy_coef * agg(H)``: the same value, gradients and stats as
    ``ppo_loss_from_logits(hidden @ weight.T + bias, ...)``. Extra memory is
    logprobs_from_hidden's (one tile buffer + O(B * T * H)); the entropy's
    gradient is computed only when ``entropy_coef != 0``.

    With ``grad_in_forward`` (the default) and a gradient wanted, at
    ratio_level "token", when a token block's whole-vocabulary tile fits
    ``chunk_bytes`` (default here: 2 * default_chunk_bytes, 1/16 of the
    float32 logits within [16, 512] MiB: blocks of N / 16 tokens,
    ``row_block``), and outside
    ``torch.compile``: the gradient is computed during the forward, three
    GEMMs in all (each token block's logits once, d hidden, d weight: the
    loss's per-token gradient is known as soon as the block's log-probs are,
    the aggregation being linear) and kept until the backward, which scales
    it (one backward per forward). The weight's gradient (V x H; float32 for
    a bf16/fp16 weight over several token blocks) is then held from the
    forward on. Otherwise the backward makes each tile again (four GEMMs).
    A bf16/fp16 head's budget must also hold a float32 V x H buffer (its
    weight gradient's product or accumulator, ``V * H * 4`` bytes; twice that
    where the CPU multiplies float32 copies): at the default budget and a
    real vocabulary it does not, and the four-GEMM path runs, which writes
    the weight gradient in place, rounded once. ``chunk_bytes`` of
    ``V * H * 4`` plus the rows' tiles chooses the three GEMMs, which is
    slower at such budgets: the float32 V x H gradient is read and written
    once per token block (N=1024, H=512, V=151936 bf16 on a 2-core AMX CPU:
    2.0 s and 0.59x the float32 logits in extra peak, against 0.65 s and
    0.20x for the four GEMMs).

    Args:
        hidden: (B, T, H) (or (..., T, H)); weight (V, H); bias (V,) or None.
        labels: (B, T) int64 | int32 (``-100``: ignored, logp = entropy = 0).
        old_logp, advantages, mask, ref_logp: (B, T) as in ``ppo_loss_from_logits``.
        chunk_bytes, backend: as in ``logprobs_from_hidden``.
        grad_in_forward: the three-GEMM path above where it applies (False:
            always the four-GEMM backward).
        Others: as in ``ppo_loss_from_logits``.

    Returns:
        (loss, stats) as ``ppo_loss_from_logits``: the 0-dim loss and the
        ``ppo_policy_loss`` stats plus pg_loss, kl and entropy.
    """
    from .ppo_loss import composed_policy_loss

    if hidden.dim() < 3:
        raise ValueError("hidden: expected shape (B, T, H) (or (..., T, H))")
    if ref_logp is not None:
        check_tensor("ref_logp", ref_logp, FLOAT_DTYPES)
        if tuple(ref_logp.shape) != tuple(labels.shape):
            raise ValueError(f"ref_logp: shape {tuple(ref_logp.shape)} does not match labels {tuple(labels.shape)}")
    loss_kwargs = dict(ref_logp=ref_logp, kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
                       backend=backend, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg,
                       num_tokens=num_tokens, num_seqs=num_seqs, token_weights=token_weights, ratio_level=ratio_level)
    plan = _grad_in_forward_plan(hidden, weight, bias, labels, (old_logp, advantages, mask, ref_logp, token_weights),
                                 ratio_level, chunk_bytes, grad_in_forward, backend)
    if plan is None:
        logp, entropy = logprobs_from_hidden(hidden, weight, labels, bias=bias, temperature=temperature,
                                             return_entropy=True, chunk_bytes=chunk_bytes, backend=backend)
        return composed_policy_loss(logp, entropy, old_logp, advantages, mask, **loss_kwargs)
    return _ppo_loss_grad_in_forward(hidden, weight, bias, labels, old_logp, advantages, mask, temperature, *plan,
                                     loss_kwargs)


def _grad_in_forward_plan(hidden, weight, bias, labels, per_token, ratio_level, chunk_bytes, grad_in_forward,
                          backend) -> Optional[tuple[str, int]]:
    """(the row kernels, "native" | "triton", and the budget) of the
    three-GEMM path, or None where it does not apply (see ppo_loss_from_hidden)."""
    _check_head(hidden, weight, bias, labels)
    wanted = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not (grad_in_forward and wanted and ratio_level == "token") or torch.compiler.is_compiling():
        return None
    rows = {"cpu": "native", "cuda": "native", "triton": "triton"}.get(
        resolve_backend(backend, hidden.device, "logprobs_from_hidden"))
    n_rows = labels.numel()
    if rows not in _ROWS or n_rows == 0 or any(t is not None and tuple(t.shape) != tuple(labels.shape)
                                               for t in per_token):
        return None  # (the composition's checks name a misshapen argument)
    budget = _check_chunk_bytes(chunk_bytes, n_rows, weight.shape[0], LOSS_BUDGET_FACTOR)
    fits = row_block(n_rows, weight.shape[0], budget, *_tile_bytes(hidden, weight)) > 0
    return (rows, budget) if fits else None


def _ppo_loss_grad_in_forward(hidden, weight, bias, labels, old_logp, advantages, mask, temperature, rows,
                              chunk_bytes, kw):
    """ppo_loss_from_hidden's three-GEMM path: the loss and stats of the
    composition (``composed_policy_loss`` on the forward's logp and entropy),
    the gradient from ``_loss_grad_in_forward``."""
    from .advantages import kl_penalty
    from .ppo_loss import composed_policy_loss, ppo_policy_loss

    temperature = check_positive("temperature", temperature)
    shape = labels.shape
    flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
    acc = acc_dtype(hidden.dtype)
    weights = flat(_agg_weights(mask, kw["agg"], kw["num_tokens"], kw["num_seqs"], acc))
    old, adv, ref, tw = (flat(t) for t in (old_logp, advantages, kw["ref_logp"], kw["token_weights"]))
    kl_coef, entropy_coef = float(kw["kl_coef"]), float(kw["entropy_coef"])
    policy = dict(clip_low=kw["clip_low"], clip_high=kw["clip_high"], dual_clip=kw["dual_clip"], agg="token-sum",
                  backend=kw["backend"])

    def token_grads(t0: int, t1: int, logp: Tensor, entropy: Tensor):
        # loss = sum_t w_t * loss_t(logp_t) - entropy_coef * sum_t w_t * H_t: each
        # token's term depends on its own logp only.
        x = logp.detach()[None].requires_grad_(True)
        with torch.enable_grad():
            total, _ = ppo_policy_loss(x, old[None, t0:t1], adv[None, t0:t1], torch.ones_like(x, dtype=torch.bool),
                                       token_weights=None if tw is None else tw[None, t0:t1], **policy)
            if ref is not None and kl_coef != 0:
                total = total + kl_coef * kl_penalty(x, ref[None, t0:t1].detach(), estimator=kw["kl_estimator"],
                                                     backend=kw["backend"]).sum()
            (g,) = torch.autograd.grad(total, x)
        w = weights[t0:t1]
        g = torch.where(w != 0, w * g[0].to(acc), torch.zeros((), dtype=acc, device=w.device))
        return g, (-entropy_coef * w if entropy_coef != 0 else None)

    need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    with torch.no_grad():
        logp, entropy, gh, gw, gb = _loss_grad_in_forward(
            hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1).to(torch.int64), temperature,
            -100, chunk_bytes, rows, token_grads, need)
        loss, stats = composed_policy_loss(logp.view(shape), entropy.view(shape), old_logp, advantages, mask, **kw)
    pairs = [(None if gh is None else gh.view(hidden.shape), hidden), (gw, weight)]
    if bias is not None:
        pairs.append((gb, bias))
    return _PrecomputedGrad.apply(loss, tuple(pairs), *(x for _, x in pairs)), stats


__all__ = ["default_chunk_bytes", "logprobs_from_hidden", "ppo_loss_from_hidden", "row_block", "tile_plan"]

"""The tiles of the fused LM head (``ops/lm_head.py``): the logits made a tile
at a time and put through the logprobs row kernels, forward, backward, and a
scalar loss's gradient during the forward; the plan: ``ops/lm_head_plan.py``.

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
three GEMMs (``loss_grad_in_forward``).

A tile is a window of its rows: the buffer has one spare column past the
vocabulary block, set to -inf (no weight in the softmax); a label outside the
window points at it, so the row kernel adds its one-hot there, and the
GEMMs never read it.

bf16/fp16 hidden and weight go into the GEMMs as they are, with float32
products (cuBLAS; on a CPU with bf16/fp16 dot products, MKL's
cblas_gemm_bf16bf16f32 / f16f16f32), and the logits gradient goes into the
gradient GEMMs in their dtype, as on every GPU implementation. Other CPUs
(and a torch without MKL) multiply float32 copies of each weight tile, which
is faster there (``lm_head_plan.mixed_products``).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from .._dispatch import triton_installed
from .._launch import acc_dtype, row_layout
from .._validation import check_labels_in_range
from . import lm_head_plan
from .lm_head_plan import PAD, low_precision, row_block, tile_bytes

if triton_installed():
    from ..triton import logprobs as _triton


# --- the row kernels per backend: fwd(tile, labels, inv_t, entropy, min_logit) and
# bwd(g, g_entropy, tile, labels, row_max, log_sum, entropy, inv_t, min_logit), in place;
# min_logit: the rows' thresholds or None ---

NO_LABEL = -1  # never a local label (those are in [0, vb]): the kernels' ignore_index


def _native_fwd(tile, labels, inv_t, compute_entropy, min_logit):
    tensor, inner_rows, outer, inner = row_layout(tile)
    return torch.ops.rlhf_kernels.logprobs_fwd_native(tensor, labels, inner_rows, outer, inner, inv_t, NO_LABEL,
                                                      compute_entropy, min_logit)


def _native_bwd(g, g_entropy, tile, labels, row_max, log_sum, entropy, inv_t, min_logit):
    tensor, inner_rows, outer, inner = row_layout(tile)
    assert tensor is tile
    torch.ops.rlhf_kernels.logprobs_bwd_native(g, g_entropy, tile, labels, row_max, log_sum, entropy, tile,
                                               inner_rows, outer, inner, outer, inner, inv_t, NO_LABEL, min_logit)


def _triton_fwd(tile, labels, inv_t, compute_entropy, min_logit):
    return _triton.forward(tile, labels, inv_t, NO_LABEL, compute_entropy, min_logit)


def _triton_bwd(g, g_entropy, tile, labels, row_max, log_sum, entropy, inv_t, min_logit):
    _triton.backward(g, g_entropy, tile, labels, row_max, log_sum, entropy, tile, inv_t, NO_LABEL, min_logit)


ROWS: dict[str, tuple[Callable, Callable]] = {"native": (_native_fwd, _native_bwd)}
if triton_installed():
    ROWS["triton"] = (_triton_fwd, _triton_bwd)


# --- tiles ------------------------------------------------------------------


def _gemm(out: Tensor, a: Tensor, b: Tensor, accumulate: bool = False) -> None:
    """out (=|+=) a @ b, out in the accumulation dtype. bf16/fp16 operands
    (``mixed_products``): a float32 product, cuBLAS's or MKL's."""
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
        self.convert = not lm_head_plan.mixed_products(hidden, weight)
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


def forward_tiles(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, temperature: float,
                  ignore_index: int, compute_entropy: bool, chunk_bytes: int, rows: str, extras: bool = False,
                  foreign_ok: bool = False, min_logit: Optional[Tensor] = None):
    """(logp, entropy, row_max, log_sum), and with ``extras`` a dict of TRL's
    ChunkedLogProbFunction statistics per row (float32 | bool, (N,)):
    log_sum_sq_probs = log sum p^2, mean_logits = mean of z / T over V, and
    is_top1 = the label is the first maximum of z. ``foreign_ok``: a label V
    is held by another vocabulary shard (its logp NaN, the rest of the row
    computed; ops/vocab_parallel.py). ``min_logit`` (N,): each row's kept set
    is its logits >= it (a tile holding none of them has weight 0)."""
    fwd, _ = ROWS[rows]
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    if labels.device.type == "cpu":  # as the native CPU ops check (on a GPU: NaN, see the docstring)
        check_labels_in_range(labels, vocab + foreign_ok, ignore_index)
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
    tb, vb = lm_head_plan.plan(hidden, weight, n_rows, chunk_bytes)
    buf = torch.empty(tb, vb + PAD, dtype=acc, device=dev)
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
            lp, ent, mx, ls = fwd(tile, local, inv_t, compute_entropy,
                                  None if min_logit is None else min_logit[t0:t1])
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
            terms = w * (ents + (ls - a))
            if min_logit is not None:  # a tile with nothing kept: w = 0, its entropy 0 / 0
                terms = torch.where(w == 0, 0.0, terms)
            entropy[t0:t1] = torch.where(ignored, 0.0, terms.sum(0))
        if extras:  # sq_c = log sum exp(2 (z - m_c) / T) over tile c
            stats["log_sum_sq_probs"][t0:t1] = torch.logsumexp(sq + (2 * inv_t) * (maxes - m), 0) - 2 * ls
            stats["mean_logits"][t0:t1] = z_sum / vocab
            stats["is_top1"][t0:t1] = (z_label >= m) & (z_label > max_before)
    return (logp, entropy, row_max, log_sum) + ((stats,) if extras else ())


def backward_tiles(grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor], hidden: Tensor, weight: Tensor,
                   bias: Optional[Tensor], labels: Tensor, row_max: Tensor, log_sum: Tensor,
                   entropy: Optional[Tensor], temperature: float, ignore_index: int, chunk_bytes: int, rows: str,
                   need_hidden: bool, need_weight: bool, need_bias: bool, foreign_ok: bool = False,
                   min_logit: Optional[Tensor] = None):
    """The gradients of forward_tiles' logp and entropy; ``foreign_ok``: a
    label V is another shard's (no one-hot term in this head's rows)."""
    _, bwd = ROWS[rows]
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    acc = row_max.dtype
    dev = hidden.device
    inv_t = 1.0 / temperature
    tb, vb = lm_head_plan.plan(hidden, weight, max(n_rows, 1), chunk_bytes)
    many_blocks = n_rows > tb
    grad_hidden, grad_weight, grad_bias = _grad_buffers(hidden, weight, acc, tb, need_hidden, need_weight,
                                                        need_bias)
    ignored = labels == ignore_index
    bad = ~ignored & ((labels < 0) | (labels >= vocab + foreign_ok))  # NaN gradients, as logprobs_from_logits
    zero = torch.zeros((), dtype=acc, device=dev)
    g = grad_logp.to(acc) if grad_logp is not None else torch.zeros(n_rows, dtype=acc, device=dev)
    g = torch.where(ignored, zero, torch.where(bad, math.nan, g)).contiguous()
    g_ent = None
    if grad_entropy is not None:
        g_ent = torch.where(ignored, zero, grad_entropy.to(acc)).contiguous()
    if n_rows == 0 or not (need_hidden or need_weight or need_bias):
        return grad_hidden, grad_weight, grad_bias
    buf = torch.empty(tb, vb + PAD, dtype=acc, device=dev)
    ops = _Operands(hidden, weight, bias, acc)
    for t0 in range(0, n_rows, tb):
        t1 = min(n_rows, t0 + tb)
        h = ops.rows(t0, t1)
        lab = labels[t0:t1]
        for v0 in range(0, vocab, vb):
            v1 = min(vocab, v0 + vb)
            w = ops.cols(v0, v1)
            tile = ops.logits_into(buf, h, w, v0, v1)
            local, _ = _local_labels(lab, v0, v1 - v0)
            bwd(g[t0:t1], None if g_ent is None else g_ent[t0:t1], tile, local, row_max[t0:t1], log_sum[t0:t1],
                None if entropy is None else entropy[t0:t1], inv_t, None if min_logit is None else min_logit[t0:t1])
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
    d = dz.to(w.dtype) if low_precision(w) else dz
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


def loss_grad_in_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, temperature: float,
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
    fwd, bwd = ROWS[rows]
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    if labels.device.type == "cpu":
        check_labels_in_range(labels, vocab, ignore_index)
    acc = acc_dtype(hidden.dtype)
    dev = hidden.device
    inv_t = 1.0 / temperature
    tb, vb = row_block(n_rows, vocab, chunk_bytes, *tile_bytes(hidden, weight)), vocab
    assert tb > 0, "whole rows only"
    many_blocks = n_rows > tb
    need_hidden, need_weight, need_bias = need
    logp = torch.empty(n_rows, dtype=acc, device=dev)
    entropy = torch.empty(n_rows, dtype=acc, device=dev)
    grad_hidden, grad_weight, grad_bias = _grad_buffers(hidden, weight, acc, tb, need_hidden, need_weight,
                                                        need_bias)
    buf = torch.empty(tb, vb + PAD, dtype=acc, device=dev)
    ops = _Operands(hidden, weight, bias, acc)
    w = ops.cols(0, vocab)
    zero = torch.zeros((), dtype=acc, device=dev)
    for t0 in range(0, n_rows, tb):
        t1 = min(n_rows, t0 + tb)
        h, lab = ops.rows(t0, t1), labels[t0:t1]
        tile = ops.logits_into(buf, h, w, 0, vocab)
        local, _ = _local_labels(lab, 0, vocab)
        lp, ent, mx, ls = fwd(tile, local, inv_t, True, None)
        ignored = lab == ignore_index
        logp[t0:t1] = torch.where(ignored, zero, lp)
        entropy[t0:t1] = torch.where(ignored, zero, ent)
        g, g_ent = token_grads(t0, t1, logp[t0:t1], entropy[t0:t1])
        g = torch.where(ignored, zero, g.to(acc)).contiguous()
        if g_ent is not None:
            g_ent = torch.where(ignored, zero, g_ent.to(acc)).contiguous()
        bwd(g, g_ent, tile, local, mx, ls, ent if g_ent is not None else None, inv_t, None)
        _tile_grads(tile[:, :vocab], h, w, grad_hidden, grad_weight, grad_bias, t0, t1, 0, vocab, many_blocks)
    return logp, entropy, grad_hidden, grad_weight, grad_bias


class PrecomputedGrad(torch.autograd.Function):
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

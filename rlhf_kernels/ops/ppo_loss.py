"""Fused PPO losses: the clipped policy loss, the clipped value loss, and the
policy loss (with KL penalty and entropy bonus) straight from the logits.

Every loss here is ``sum_b w_b * sum_t mask * l(token)`` for per-sequence
weights ``w_b`` fixed by the aggregation mode (see ``_aggregation_weights``).
So one pass over the tokens gives both the per-sequence sums and the
derivative of each token's loss; the weights follow from the per-sequence
counts, and the backward is ``grad_output * w_b * dl/dx`` (one multiply), the
gradient having been produced during the forward pass (as the fused
cross-entropy kernels of Liger / Apple's CCE do).

Tie convention: the per-token derivative reproduces torch autograd of the
eager reference (``rlhf_kernels.reference``): clamp passes the gradient on the
closed interval [lo, hi]; at a tie of max / min each side gets half. See
``csrc/include/rlhf_kernels/ppo_math.h``.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .._backend import f64_parts, on_tensor_device, resolve_backend, triton_installed
from .._validation import FLOAT_DTYPES, INDEX_DTYPES, check_finite, check_positive, check_same_device, check_tensor
from . import logprobs as _lp
from .advantages import _check_estimator

if triton_installed():
    import triton
    import triton.language as tl
else:  # pragma: no cover - exercised only where Triton is absent
    triton = None

# Columns of the per-sequence statistics (csrc/include/rlhf_kernels/ppo_math.h).
PG_SUM, COUNT, CLIP, DUAL, APPROX_KL, RATIO_MAX, RATIO_MIN, KL_SUM, ENTROPY_SUM = range(9)
N_POLICY_STATS = 9
VF_SUM, VF_COUNT, VF_CLIP = range(3)
N_VALUE_STATS = 3

AGG_MODES = reference.AGG_MODES
POLICY_STAT_NAMES = ("clipfrac", "clipfrac_lower", "approx_kl", "ratio_max", "ratio_min")


if triton is not None:
    from .logprobs import _clamp, _f64, _k3_terms, _label_logp, _row_grad, _row_softmax

    @triton.jit
    def _chunk_tokens(mask_ptr, seq_len, n_chunks, BLOCK: tl.constexpr):
        # This program's work item (a chunk of BLOCK tokens of one sequence) on a
        # flat grid (axis 0 takes 2^31 - 1 programs, axes 1 and 2 only 65535):
        # (item, token offsets, inside the sequence, valid = inside and unmasked).
        item = tl.program_id(0).to(tl.int64)
        t = (item % n_chunks) * BLOCK + tl.arange(0, BLOCK)
        in_seq = t < seq_len
        offs = (item // n_chunks) * seq_len + t
        valid = (tl.load(mask_ptr + offs, mask=in_seq, other=0) != 0) & in_seq
        return item, offs, in_seq, valid

    @triton.jit
    def _policy_terms(logp, old, adv, ref, ratio_low, ratio_high, dual_c, kl_coef,
                      HAS_DUAL: tl.constexpr, KL_ESTIMATOR: tl.constexpr):
        """PPO-clip (Schulman et al., 2017) + dual clip (Ye et al., 2020) per token
        (rlhf_kernels/ppo_math.h): (loss, d(loss + kl_coef * kl)/d logp, clipped,
        dual active, ratio, kl), for a block of tokens or a single one."""
        diff = logp - old
        log_ratio = _clamp(diff, -20.0, 20.0)
        d_log_ratio = tl.where((diff >= -20.0) & (diff <= 20.0), 1.0, 0.0)
        ratio = tl.exp(log_ratio)
        neg_adv = -adv
        loss1 = neg_adv * ratio
        loss2 = neg_adv * _clamp(ratio, ratio_low, ratio_high)
        dloss2 = tl.where((ratio >= ratio_low) & (ratio <= ratio_high), neg_adv, 0.0)
        clipped = loss2 > loss1
        loss = tl.where(clipped, loss2, loss1)
        dloss = tl.where(loss1 > loss2, neg_adv, tl.where(clipped, dloss2, 0.5 * (neg_adv + dloss2)))
        if HAS_DUAL:
            loss3 = neg_adv * dual_c
            negative = adv < 0.0
            dual = negative & (loss > loss3)
            dloss = tl.where(dual, 0.0, tl.where(negative & (loss == loss3), 0.5 * dloss, dloss))
            loss = tl.where(dual, loss3, loss)
        else:
            dual = clipped & False
        grad = dloss * ratio * d_log_ratio
        kl = tl.zeros_like(ratio)
        if KL_ESTIMATOR >= 0:
            k1 = logp - ref
            if KL_ESTIMATOR == 0:
                kl = k1
                dkl = tl.zeros_like(ratio) + 1.0
            elif KL_ESTIMATOR == 1:
                kl = tl.where(k1 < 0.0, -k1, k1)
                dkl = tl.where(k1 > 0.0, 1.0, tl.where(k1 < 0.0, -1.0, 0.0))
            elif KL_ESTIMATOR == 2:
                kl = 0.5 * (k1 * k1)
                dkl = k1
            else:
                # k3 (low_var_kl): exp(d) - d - 1, d = clamp(ref - logp, -20, 20), into [-10, 10].
                d_raw = ref - logp
                k, expm1 = _k3_terms(_clamp(d_raw, -20.0, 20.0))
                kl = _clamp(k, -10.0, 10.0)
                passes = (d_raw >= -20.0) & (d_raw <= 20.0) & (k >= -10.0) & (k <= 10.0)
                dkl = tl.where(passes, -expm1, 0.0)
            grad = grad + kl_coef * dkl
        return loss, grad, clipped, dual, ratio, kl

    @triton.jit
    def _ppo_policy_fwd_kernel(
        logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, entropy_ptr, grad_ptr, partial_ptr,
        seq_len, n_chunks, low_hi, low_mid, low_lo, high_hi, high_mid, high_lo, dual_hi, dual_mid, dual_lo,
        kl_coef_hi, kl_coef_mid, kl_coef_lo,
        HAS_DUAL: tl.constexpr, KL_ESTIMATOR: tl.constexpr, HAS_ENTROPY: tl.constexpr,
        NEED_GRAD: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # PPO-clip (Schulman et al., 2017) + dual clip (Ye et al., 2020) per token;
        # one program per (sequence, chunk) writes dl/dlogp and 9 partial sums.
        item, offs, in_seq, valid = _chunk_tokens(mask_ptr, seq_len, n_chunks, BLOCK)
        ratio_low = _f64(low_hi, low_mid, low_lo, ACC_DTYPE)
        ratio_high = _f64(high_hi, high_mid, high_lo, ACC_DTYPE)
        logp = tl.load(logp_ptr + offs, mask=valid, other=0.0).to(ACC_DTYPE)
        old = tl.load(old_ptr + offs, mask=valid, other=0.0).to(ACC_DTYPE)
        adv = tl.load(adv_ptr + offs, mask=valid, other=0.0).to(ACC_DTYPE)
        if KL_ESTIMATOR >= 0:
            ref = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(ACC_DTYPE)
        else:
            ref = logp
        loss, grad, clipped, dual, ratio, kl = _policy_terms(
            logp, old, adv, ref, ratio_low, ratio_high, _f64(dual_hi, dual_mid, dual_lo, ACC_DTYPE),
            _f64(kl_coef_hi, kl_coef_mid, kl_coef_lo, ACC_DTYPE), HAS_DUAL, KL_ESTIMATOR,
        )
        if NEED_GRAD:
            tl.store(grad_ptr + offs, tl.where(valid, grad, 0.0), mask=in_seq)
        out = partial_ptr + item * 9
        tl.store(out + 0, tl.sum(tl.where(valid, loss, 0.0), axis=0))
        tl.store(out + 1, tl.sum(valid.to(ACC_DTYPE), axis=0))
        tl.store(out + 2, tl.sum((valid & clipped).to(ACC_DTYPE), axis=0))
        tl.store(out + 3, tl.sum((valid & dual).to(ACC_DTYPE), axis=0))
        tl.store(out + 4, tl.sum(tl.where(valid, old - logp, 0.0), axis=0))
        tl.store(out + 5, tl.max(tl.where(valid, ratio, float("-inf")), axis=0))
        tl.store(out + 6, tl.min(tl.where(valid, ratio, float("inf")), axis=0))
        tl.store(out + 7, tl.sum(tl.where(valid, kl, 0.0), axis=0))
        if HAS_ENTROPY:
            entropy = tl.load(entropy_ptr + offs, mask=valid, other=0.0).to(ACC_DTYPE)
            tl.store(out + 8, tl.sum(tl.where(valid, entropy, 0.0), axis=0))
        else:
            tl.store(out + 8, tl.sum(tl.zeros((BLOCK,), ACC_DTYPE), axis=0))

    @triton.jit
    def _ppo_logits_grad_kernel(
        logits_ptr, labels_ptr, old_ptr, adv_ptr, weight_ptr, ref_ptr, grad_ptr, logp_ptr, entropy_ptr,
        lse_ptr, n_rows, inner_rows, in_outer_stride, in_inner_stride, out_outer_stride, out_inner_stride, vocab,
        inv_t_hi, inv_t_mid, inv_t_lo, ignore_index, low_hi, low_mid, low_lo, high_hi, high_mid, high_lo,
        dual_hi, dual_mid, dual_lo, kl_coef_hi, kl_coef_mid, kl_coef_lo, ent_hi, ent_mid, ent_lo,
        HAS_DUAL: tl.constexpr, KL_ESTIMATOR: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
        ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        # ppo_loss_from_logits with the gradient in the same program, row by
        # row: the row's softmax (one read), its token's weighted dL/dlogp, then
        # the row's gradient (the row again, from cache, and one write).
        inv_temperature = _f64(inv_t_hi, inv_t_mid, inv_t_lo, ACC_DTYPE)
        # Rows in a grid-stride loop: the grid bounds the rows in flight (see _rows_in_flight).
        for row_index in range(tl.program_id(0), n_rows, tl.num_programs(0)):
            row = row_index + tl.zeros((), tl.int64)  # int64 offsets
            outer = row // inner_rows
            inner = row % inner_rows
            row_ptr = logits_ptr + outer * in_outer_stride + inner * in_inner_stride
            out_ptr = grad_ptr + outer * out_outer_stride + inner * out_inner_stride
            m, log_s, entropy = _row_softmax(row_ptr, vocab, inv_temperature, ACC_DTYPE, BLOCK_V)
            lse = m * inv_temperature + log_s
            label = tl.load(labels_ptr + row)
            ignored = label == ignore_index
            logp = tl.where(ignored, 0.0, _label_logp(row_ptr, label, vocab, m, log_s, inv_temperature, ACC_DTYPE))
            entropy = tl.where(ignored, 0.0, entropy)
            tl.store(lse_ptr + row, lse)
            tl.store(logp_ptr + row, logp)
            tl.store(entropy_ptr + row, entropy)
            weight = tl.load(weight_ptr + row).to(ACC_DTYPE)
            valid = weight != 0.0
            old = tl.load(old_ptr + row).to(ACC_DTYPE)
            adv = tl.load(adv_ptr + row).to(ACC_DTYPE)
            if KL_ESTIMATOR >= 0:
                ref = tl.load(ref_ptr + row).to(ACC_DTYPE)
            else:
                ref = logp
            _, tok_grad, _, _, _, _ = _policy_terms(
                logp, old, adv, ref, _f64(low_hi, low_mid, low_lo, ACC_DTYPE),
                _f64(high_hi, high_mid, high_lo, ACC_DTYPE), _f64(dual_hi, dual_mid, dual_lo, ACC_DTYPE),
                _f64(kl_coef_hi, kl_coef_mid, kl_coef_lo, ACC_DTYPE), HAS_DUAL, KL_ESTIMATOR,
            )
            g = tl.where(valid, weight * tok_grad, 0.0)
            if HAS_ENTROPY_GRAD:
                g_entropy = tl.where(valid, -_f64(ent_hi, ent_mid, ent_lo, ACC_DTYPE) * weight, 0.0)
            else:
                g_entropy = tl.zeros((), ACC_DTYPE)
            _row_grad(row_ptr, out_ptr, vocab, label, ignore_index, g, g_entropy, entropy, lse,
                      inv_temperature, ACC_DTYPE, BLOCK_V)

    @triton.jit
    def _ppo_value_fwd_kernel(
        values_ptr, old_ptr, returns_ptr, mask_ptr, grad_ptr, partial_ptr,
        seq_len, n_chunks, clip_hi, clip_mid, clip_lo,
        NEED_GRAD: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # 0.5 * max((v - R)^2, (v_clipped - R)^2) per token; v_clipped = old +
        # clamp(v - old, -c, c), exactly v in range.
        item, offs, in_seq, valid = _chunk_tokens(mask_ptr, seq_len, n_chunks, BLOCK)
        clip = _f64(clip_hi, clip_mid, clip_lo, ACC_DTYPE)
        values = tl.load(values_ptr + offs, mask=valid, other=0.0).to(ACC_DTYPE)
        old = tl.load(old_ptr + offs, mask=valid, other=0.0).to(ACC_DTYPE)
        returns = tl.load(returns_ptr + offs, mask=valid, other=0.0).to(ACC_DTYPE)
        diff = values - old
        in_range = (diff >= -clip) & (diff <= clip)
        err1 = values - returns
        err2 = tl.where(in_range, err1, (old + _clamp(diff, -clip, clip)) - returns)
        loss1 = err1 * err1
        loss2 = err2 * err2
        dloss1 = 2.0 * err1
        dloss2 = tl.where(in_range, 2.0 * err2, 0.0)
        clipped = loss2 > loss1
        loss = 0.5 * tl.where(clipped, loss2, loss1)
        grad = 0.5 * tl.where(loss1 > loss2, dloss1, tl.where(clipped, dloss2, 0.5 * (dloss1 + dloss2)))
        if NEED_GRAD:
            tl.store(grad_ptr + offs, tl.where(valid, grad, 0.0), mask=in_seq)
        out = partial_ptr + item * 3
        tl.store(out + 0, tl.sum(tl.where(valid, loss, 0.0), axis=0))
        tl.store(out + 1, tl.sum(valid.to(ACC_DTYPE), axis=0))
        tl.store(out + 2, tl.sum((valid & clipped).to(ACC_DTYPE), axis=0))



def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _token_block(seq_len: int, device: torch.device) -> int:
    # The interpreter favours few, wide programs; a GPU many 1024-wide ones.
    cap = 4096 if device.type != "cuda" else 1024
    return max(16, min(triton.next_power_of_2(max(seq_len, 1)), cap))


def _reduce_partials(partial: Tensor, max_col: int | None, min_col: int | None) -> Tensor:
    """(B, C, K) chunk partials -> (B, K): sums, with max / min for the ratio columns."""
    stats = partial.sum(1)
    if max_col is not None:
        stats[:, max_col] = partial[:, :, max_col].amax(1)
        stats[:, min_col] = partial[:, :, min_col].amin(1)
    return stats


# --- per-token kernels per backend ----------------------------------------------------
# Each takes flat (N,) = (B * T,) token tensors of one float dtype and a bool
# mask, and returns (grad (N,) or empty, seq_stats (B, K)).


def _policy_native(logp, old_logp, adv, mask, ref_logp, entropy, seq_len, ratio_low, ratio_high,
                   dual_clip, kl_coef, kl_code, need_grad):
    return torch.ops.rlhf_kernels.ppo_policy_fwd_native(
        logp, old_logp, adv, mask, ref_logp, entropy, seq_len, ratio_low, ratio_high,
        dual_clip, kl_coef, kl_code, need_grad,
    )


@on_tensor_device
def _policy_triton(logp, old_logp, adv, mask, ref_logp, entropy, seq_len, ratio_low, ratio_high,
                   dual_clip, kl_coef, kl_code, need_grad):
    n = logp.numel()
    seqs = n // seq_len if seq_len > 0 else 0
    block = _token_block(seq_len, logp.device)
    chunks = max(1, triton.cdiv(seq_len, block))
    grad = torch.empty(n if need_grad else 0, dtype=logp.dtype, device=logp.device)
    partial = torch.empty((seqs, chunks, N_POLICY_STATS), dtype=logp.dtype, device=logp.device)
    if seqs > 0:
        _ppo_policy_fwd_kernel[(seqs * chunks,)](
            logp, old_logp, adv, mask.view(torch.uint8),
            ref_logp if ref_logp is not None else logp, entropy if entropy is not None else logp,
            grad if need_grad else logp, partial, seq_len, chunks,
            *f64_parts(ratio_low), *f64_parts(ratio_high), *f64_parts(dual_clip), *f64_parts(kl_coef),
            HAS_DUAL=dual_clip > 0, KL_ESTIMATOR=kl_code, HAS_ENTROPY=entropy is not None,
            NEED_GRAD=need_grad, ACC_DTYPE=_tl_acc(logp.dtype), BLOCK=block,
        )
    return grad, _reduce_partials(partial, RATIO_MAX, RATIO_MIN)


def _clamp_t(x: Tensor, lo, hi) -> Tensor:
    return torch.where(x < lo, lo, torch.where(x > hi, hi, x))


def _policy_torch(logp, old_logp, adv, mask, ref_logp, entropy, seq_len, ratio_low, ratio_high,
                  dual_clip, kl_coef, kl_code, need_grad):
    """The kernels' closed form in plain torch ops (the "reference" backend)."""
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    half = 0.5
    diff = logp - old_logp
    ratio = torch.exp(_clamp_t(diff, -20.0, 20.0))
    d_log_ratio = ((diff >= -20.0) & (diff <= 20.0)).to(logp.dtype)
    neg_adv = -adv
    loss1 = neg_adv * ratio
    loss2 = neg_adv * _clamp_t(ratio, ratio_low, ratio_high)
    dloss2 = torch.where((ratio >= ratio_low) & (ratio <= ratio_high), neg_adv, zero)
    clipped = loss2 > loss1
    loss = torch.where(clipped, loss2, loss1)
    dloss = torch.where(loss1 > loss2, neg_adv, torch.where(clipped, dloss2, half * (neg_adv + dloss2)))
    dual = torch.zeros_like(mask)
    if dual_clip > 0:
        loss3 = neg_adv * dual_clip
        negative = adv < 0
        dual = negative & (loss > loss3)
        dloss = torch.where(dual, zero, torch.where(negative & (loss == loss3), half * dloss, dloss))
        loss = torch.where(dual, loss3, loss)
    grad = dloss * ratio * d_log_ratio
    kl = torch.zeros_like(logp)
    if kl_code >= 0:
        k1 = logp - ref_logp
        if kl_code == 0:
            kl, dkl = k1, torch.ones_like(k1)
        elif kl_code == 1:
            kl, dkl = k1.abs(), torch.sign(k1)
        elif kl_code == 2:
            kl, dkl = half * (k1 * k1), k1
        else:
            d_raw = ref_logp - logp
            d = _clamp_t(d_raw, -20.0, 20.0)
            e = torch.exp(d)
            k = e - d - 1.0
            kl = _clamp_t(k, -10.0, 10.0)
            passes = (d_raw >= -20.0) & (d_raw <= 20.0) & (k >= -10.0) & (k <= 10.0)
            dkl = torch.where(passes, 1.0 - e, zero)
        grad = grad + kl_coef * dkl
    seqs = logp.numel() // seq_len if seq_len > 0 else 0

    def per_seq(x: Tensor) -> Tensor:
        return torch.where(mask, x, zero).view(seqs, seq_len).sum(-1)

    inf = torch.tensor(float("inf"), dtype=logp.dtype, device=logp.device)
    ratio_seq = ratio.view(seqs, seq_len)
    mask_seq = mask.view(seqs, seq_len)
    columns = [
        per_seq(loss), per_seq(torch.ones_like(loss)), per_seq(clipped.to(logp.dtype)),
        per_seq(dual.to(logp.dtype)), per_seq(old_logp - logp),
        torch.where(mask_seq, ratio_seq, -inf).amax(-1) if seq_len > 0 else zero.expand(seqs),
        torch.where(mask_seq, ratio_seq, inf).amin(-1) if seq_len > 0 else zero.expand(seqs),
        per_seq(kl), per_seq(entropy) if entropy is not None else zero.expand(seqs),
    ]
    grad = torch.where(mask, grad, zero) if need_grad else logp.new_empty(0)
    return grad, torch.stack(columns, dim=-1)


_POLICY = {"cpu": _policy_native, "cuda": _policy_native, "triton": _policy_triton, "reference": _policy_torch}


def _value_native(values, old_values, returns, mask, seq_len, clip, need_grad):
    return torch.ops.rlhf_kernels.ppo_value_fwd_native(values, old_values, returns, mask, seq_len, clip, need_grad)


@on_tensor_device
def _value_triton(values, old_values, returns, mask, seq_len, clip, need_grad):
    n = values.numel()
    seqs = n // seq_len if seq_len > 0 else 0
    block = _token_block(seq_len, values.device)
    chunks = max(1, triton.cdiv(seq_len, block))
    grad = torch.empty(n if need_grad else 0, dtype=values.dtype, device=values.device)
    partial = torch.empty((seqs, chunks, N_VALUE_STATS), dtype=values.dtype, device=values.device)
    if seqs > 0:
        _ppo_value_fwd_kernel[(seqs * chunks,)](
            values, old_values, returns, mask.view(torch.uint8), grad if need_grad else values,
            partial, seq_len, chunks, *f64_parts(clip),
            NEED_GRAD=need_grad, ACC_DTYPE=_tl_acc(values.dtype), BLOCK=block,
        )
    return grad, _reduce_partials(partial, None, None)


def _value_torch(values, old_values, returns, mask, seq_len, clip, need_grad):
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    diff = values - old_values
    in_range = (diff >= -clip) & (diff <= clip)
    err1 = values - returns
    err2 = torch.where(in_range, err1, (old_values + _clamp_t(diff, -clip, clip)) - returns)
    loss1, loss2 = err1 * err1, err2 * err2
    dloss1 = 2.0 * err1
    dloss2 = torch.where(in_range, 2.0 * err2, zero)
    clipped = loss2 > loss1
    loss = 0.5 * torch.where(clipped, loss2, loss1)
    grad = 0.5 * torch.where(loss1 > loss2, dloss1, torch.where(clipped, dloss2, 0.5 * (dloss1 + dloss2)))
    seqs = values.numel() // seq_len if seq_len > 0 else 0

    def per_seq(x: Tensor) -> Tensor:
        return torch.where(mask, x, zero).view(seqs, seq_len).sum(-1)

    stats = torch.stack([per_seq(loss), per_seq(torch.ones_like(loss)), per_seq(clipped.to(values.dtype))], -1)
    return (torch.where(mask, grad, zero) if need_grad else values.new_empty(0)), stats


_VALUE = {"cpu": _value_native, "cuda": _value_native, "triton": _value_triton, "reference": _value_torch}


# --- aggregation ------------------------------------------------------------------------


def _aggregation_weights(counts: Tensor, seq_len: int, agg: str, num_tokens: Optional[float],
                         num_seqs: Optional[float]) -> Tensor:
    """w_b with loss = sum_b w_b * (sum of the valid token losses of sequence b).

    token-mean: 1 / (num_tokens or valid tokens); token-sum: 1;
    seq-mean-token-sum: 1 / S; seq-mean-token-mean: 1 / (S * valid_b);
    seq-mean-token-sum-norm: 1 / (S * T), with S = num_seqs or the number of
    sequences with a valid token. Every count is clamped to >= 1, so a batch
    without a valid token gives 0, never NaN."""
    ones = torch.ones_like(counts)
    if agg == "token-mean":
        denom = num_tokens if num_tokens is not None else counts.sum().clamp(min=1)
        return ones / denom
    if agg == "token-sum":
        return ones
    seqs = num_seqs if num_seqs is not None else (counts > 0).sum().to(counts.dtype).clamp(min=1)
    if agg == "seq-mean-token-sum":
        return ones / seqs
    if agg == "seq-mean-token-mean":
        return 1.0 / (counts.clamp(min=1) * seqs)
    if agg == "seq-mean-token-sum-norm":
        return ones / (seqs * max(seq_len, 1))  # T = 0: no token, a loss of 0
    raise ValueError(f"agg: unknown mode {agg!r}; expected one of {AGG_MODES}")


def _policy_stats(seq_stats: Tensor) -> Tensor:
    """(5,) clipfrac, clipfrac_lower, approx_kl, ratio_max, ratio_min."""
    counts = seq_stats[:, COUNT]
    total = counts.sum()
    denom = total.clamp(min=1)
    any_valid = total > 0
    zero = torch.zeros((), dtype=seq_stats.dtype, device=seq_stats.device)
    if seq_stats.shape[0] == 0:
        ratio_max = ratio_min = zero
    else:
        ratio_max = torch.where(any_valid, seq_stats[:, RATIO_MAX].amax(), zero)
        ratio_min = torch.where(any_valid, seq_stats[:, RATIO_MIN].amin(), zero)
    return torch.stack([
        seq_stats[:, CLIP].sum() / denom, seq_stats[:, DUAL].sum() / denom,
        seq_stats[:, APPROX_KL].sum() / denom, ratio_max, ratio_min,
    ])


def _token_view(x: Tensor) -> Tensor:
    return x.reshape(-1)


def _seq_len(shape) -> int:
    return int(shape[-1])


def _num_seqs(shape) -> int:
    return math.prod(shape[:-1])


def _run_tokens(table, backend: str, shape, n_stats: int, like: Tensor, need_grad: bool, *args):
    """table[backend](*args), or, without any token, the statistics of B empty
    sequences (zero counts; ratio max / min at -inf / +inf) without a launch."""
    if like.numel() == 0:
        stats = like.new_zeros((_num_seqs(shape), n_stats))
        if n_stats == N_POLICY_STATS:
            stats[:, RATIO_MAX] = float("-inf")
            stats[:, RATIO_MIN] = float("inf")
        return like.new_empty(0), stats
    return table[backend](*args)


# --- custom ops ---------------------------------------------------------------------------


@torch.library.custom_op("rlhf_kernels::ppo_policy_loss_fwd", mutates_args=())
def _ppo_policy_loss_fwd(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, ratio_low: float,
    ratio_high: float, dual_clip: float, agg: str, num_tokens: Optional[float],
    num_seqs: Optional[float], need_grad: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    seq_len = _seq_len(logp.shape)
    grad, seq_stats = _run_tokens(
        _POLICY, backend, logp.shape, N_POLICY_STATS, logp, need_grad, _token_view(logp), _token_view(old_logp), _token_view(advantages), _token_view(mask),
        None, None, seq_len, ratio_low, ratio_high, dual_clip, 0.0, -1, need_grad,
    )
    weights = _aggregation_weights(seq_stats[:, COUNT], seq_len, agg, num_tokens, num_seqs)
    loss = (weights * seq_stats[:, PG_SUM]).sum()
    return loss, _policy_stats(seq_stats), grad, weights


@_ppo_policy_loss_fwd.register_fake
def _(logp, old_logp, advantages, mask, ratio_low, ratio_high, dual_clip, agg, num_tokens,
      num_seqs, need_grad, backend):
    seqs = _num_seqs(logp.shape)
    return (logp.new_empty(()), logp.new_empty((5,)), logp.new_empty((logp.numel() if need_grad else 0,)),
            logp.new_empty((seqs,)))


def _scaled_token_grad(grad: Tensor, weights: Tensor, grad_loss: Tensor, shape) -> Tensor:
    """grad_output * w_b * dl/dx, back in the tokens' shape."""
    seqs = weights.shape[0]
    scale = (weights * grad_loss).unsqueeze(-1)
    return (grad.view(seqs, shape[-1]) * scale).view(shape)


def _no_double_backward(op: str, grad_loss: Tensor) -> None:
    """The token / logits gradients are computed in the forward, not by
    differentiable ops: a second derivative (create_graph=True) would be 0."""
    if torch.is_grad_enabled() and not _tracing(grad_loss):
        raise RuntimeError(f"{op}: no double backward (create_graph=True): its gradient is computed in the "
                           "forward, not by differentiable ops")


def _policy_setup_context(ctx, inputs, output):
    ctx.shape = inputs[0].shape
    _, _, grad, weights = output
    ctx.save_for_backward(grad, weights)


def _policy_backward(ctx, grad_loss, _grad_stats, _grad_grad, _grad_weights):
    grad, weights = ctx.saved_tensors
    grad_logp = None
    if ctx.needs_input_grad[0]:
        _no_double_backward("ppo_policy_loss", grad_loss)
        grad_logp = _scaled_token_grad(grad, weights, grad_loss, ctx.shape)
    return (grad_logp,) + (None,) * 11


_ppo_policy_loss_fwd.register_autograd(_policy_backward, setup_context=_policy_setup_context)


@torch.library.custom_op("rlhf_kernels::ppo_value_loss_fwd", mutates_args=())
def _ppo_value_loss_fwd(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float, agg: str,
    num_tokens: Optional[float], num_seqs: Optional[float], need_grad: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    seq_len = _seq_len(values.shape)
    grad, seq_stats = _run_tokens(
        _VALUE, backend, values.shape, N_VALUE_STATS, values, need_grad, _token_view(values), _token_view(old_values), _token_view(returns), _token_view(mask),
        seq_len, clip, need_grad,
    )
    counts = seq_stats[:, VF_COUNT]
    weights = _aggregation_weights(counts, seq_len, agg, num_tokens, num_seqs)
    loss = (weights * seq_stats[:, VF_SUM]).sum()
    clipfrac = seq_stats[:, VF_CLIP].sum() / counts.sum().clamp(min=1)
    return loss, clipfrac.reshape(1), grad, weights


@_ppo_value_loss_fwd.register_fake
def _(values, old_values, returns, mask, clip, agg, num_tokens, num_seqs, need_grad, backend):
    seqs = _num_seqs(values.shape)
    return (values.new_empty(()), values.new_empty((1,)),
            values.new_empty((values.numel() if need_grad else 0,)), values.new_empty((seqs,)))


def _value_backward(ctx, grad_loss, _grad_stats, _grad_grad, _grad_weights):
    grad, weights = ctx.saved_tensors
    grad_values = None
    if ctx.needs_input_grad[0]:
        _no_double_backward("ppo_value_loss", grad_loss)
        grad_values = _scaled_token_grad(grad, weights, grad_loss, ctx.shape)
    return (grad_values,) + (None,) * 9


_ppo_value_loss_fwd.register_autograd(_value_backward, setup_context=_policy_setup_context)


# --- the logits gradient during the forward ---------------------------------------------
# When a gradient is needed (and the logits are not to be overwritten), each row
# of logits is read once for logp / entropy / lse, its token's dL/dlogp follows
# from the PPO formula (the aggregation weights depend on the mask only), and the
# row's gradient is written straight away, while the row is still in cache: one
# read and one write of the logits in all, where a separate backward would read
# them again. grad_logits (contiguous, the logits' dtype) is written in place.


def _rows_in_flight(n_rows: int, row_bytes: int, device: torch.device) -> int:
    """How many rows the fused GPU kernels work on at once (0: all). Between a
    row's first read and its second, the other rows in flight stream through
    L2: keeping their bytes to about half of L2 lets the second read hit it,
    but at least one row per SM keeps every SM busy. A prediction, to be
    measured (benchmarks/bench_losses.py sweeps it; RLHF_KERNELS_ROWS_IN_FLIGHT
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


def _logits_grad_native(logits, labels, old_logp, adv, row_weight, ref_logp, grad_logits, inv_temperature,
                        ratio_low, ratio_high, dual_clip, kl_coef, kl_code, entropy_coef):
    tensor, inner_rows, in_outer, in_inner, out_outer, out_inner = _lp._layouts(logits, grad_logits)
    row_bytes = logits.shape[-1] * logits.element_size()
    return torch.ops.rlhf_kernels.ppo_logits_grad_native(
        tensor, labels, old_logp, adv, row_weight, ref_logp, grad_logits, inner_rows, in_outer, in_inner,
        out_outer, out_inner, inv_temperature, -100, ratio_low, ratio_high, dual_clip, kl_coef, kl_code,
        entropy_coef, _rows_in_flight(labels.numel(), row_bytes, logits.device),
    )


def _logits_grad_reference(logits, labels, old_logp, adv, row_weight, ref_logp, grad_logits, inv_temperature,
                           ratio_low, ratio_high, dual_clip, kl_coef, kl_code, entropy_coef):
    """Forward, token pass, backward as three steps, in plain torch."""
    logp, entropy, lse = _lp._FORWARD["reference"](logits, labels, inv_temperature, -100, True)
    valid = row_weight != 0
    grad, _ = _POLICY["reference"](logp, old_logp, adv, valid, ref_logp, None, max(1, logp.numel()),
                                   ratio_low, ratio_high, dual_clip, kl_coef, kl_code, True)
    grad_logp = grad * row_weight
    grad_entropy = (-entropy_coef * row_weight) if entropy_coef != 0.0 else None
    _lp._BACKWARD["reference"](grad_logp, grad_entropy, logits, labels, lse,
                               entropy if grad_entropy is not None else None, grad_logits,
                               inv_temperature, -100)
    return logp, entropy, lse


@on_tensor_device
def _logits_grad_triton(logits, labels, old_logp, adv, row_weight, ref_logp, grad_logits, inv_temperature,
                        ratio_low, ratio_high, dual_clip, kl_coef, kl_code, entropy_coef):
    tensor, inner_rows, in_outer, in_inner, out_outer, out_inner = _lp._layouts(logits, grad_logits)
    n_rows, vocab = labels.numel(), logits.shape[-1]
    acc = _lp._acc_dtype(logits.dtype)
    logp, entropy, lse = (torch.empty(n_rows, dtype=acc, device=logits.device) for _ in range(3))
    if n_rows > 0:
        block, warps = _lp._triton_block(vocab, logits.device)
        grid = _rows_in_flight(n_rows, vocab * logits.element_size(), logits.device) or n_rows
        _ppo_logits_grad_kernel[(grid,)](
            tensor, labels, old_logp, adv, row_weight, ref_logp if ref_logp is not None else old_logp,
            grad_logits, logp, entropy, lse, n_rows, inner_rows, in_outer, in_inner, out_outer, out_inner, vocab,
            *f64_parts(inv_temperature), -100, *f64_parts(ratio_low), *f64_parts(ratio_high),
            *f64_parts(dual_clip), *f64_parts(kl_coef), *f64_parts(entropy_coef),
            HAS_DUAL=dual_clip > 0, KL_ESTIMATOR=kl_code, HAS_ENTROPY_GRAD=entropy_coef != 0.0,
            ACC_DTYPE=_tl_acc(logits.dtype), BLOCK_V=block, num_warps=warps,
        )
    return logp, entropy, lse


_LOGITS_GRAD = {"cpu": _logits_grad_native, "cuda": _logits_grad_native,
                "triton": _logits_grad_triton, "reference": _logits_grad_reference}


@torch.library.custom_op("rlhf_kernels::ppo_loss_from_logits_fwd", mutates_args=())
def _ppo_loss_from_logits_fwd(
    logits: Tensor, labels: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
    ref_logp: Optional[Tensor], temperature: float, ratio_low: float, ratio_high: float,
    dual_clip: float, agg: str, num_tokens: Optional[float], num_seqs: Optional[float],
    kl_coef: float, kl_code: int, entropy_coef: float, inplace_backward: bool, need_grad: bool,
    backend: str, count: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # count: a global count given as a tensor (see _check_agg), divided into the
    # weights on the device, so that the gradient written in the forward is the
    # final one (an upstream gradient of 1: no scaling pass in the backward).
    _lp._validate_labels(logits, labels, -100)
    flat_labels = _lp._flat_labels(labels)
    seq_len = _seq_len(labels.shape)
    seqs = _num_seqs(labels.shape)
    token_mask = _token_view(mask)
    tokens = (_token_view(old_logp), _token_view(advantages), token_mask,
              _token_view(ref_logp) if ref_logp is not None else None)
    grad_logits = logits.new_empty(0)
    fused = _grad_in_forward(logits.dtype, need_grad, inplace_backward)
    if fused:
        # The gradient now (for a unit upstream gradient), in the same pass.
        counts = token_mask.view(seqs, seq_len).sum(-1).to(old_logp.dtype)
        weights = _divide(_aggregation_weights(counts, seq_len, agg, num_tokens, num_seqs), count)
        row_weight = torch.where(token_mask.view(seqs, seq_len), weights.unsqueeze(-1), 0.0).reshape(-1)
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        logp, entropy, lse = _LOGITS_GRAD[backend](
            logits, flat_labels, tokens[0], tokens[1], row_weight.contiguous(), tokens[3], grad_logits,
            1.0 / temperature, ratio_low, ratio_high, dual_clip, kl_coef, kl_code, entropy_coef,
        )
    else:
        # One read of the logits: logp, entropy and lse per row.
        logp, entropy, lse = _lp._FORWARD[backend](logits, flat_labels, 1.0 / temperature, -100, True)
    # Then one pass over the tokens: ratio, clip, KL, sums (and dL/dlogp, unless
    # the logits gradient is already written).
    token_grad = need_grad and not fused
    grad, seq_stats = _run_tokens(
        _POLICY, backend, labels.shape, N_POLICY_STATS, logp, token_grad, logp, tokens[0], tokens[1], token_mask,
        tokens[3], entropy, seq_len, ratio_low, ratio_high, dual_clip, kl_coef, kl_code, token_grad,
    )
    if not fused:
        weights = _divide(_aggregation_weights(seq_stats[:, COUNT], seq_len, agg, num_tokens, num_seqs), count)
    pg_loss = (weights * seq_stats[:, PG_SUM]).sum()
    kl = (weights * seq_stats[:, KL_SUM]).sum()
    entropy_agg = (weights * seq_stats[:, ENTROPY_SUM]).sum()
    loss = pg_loss + kl_coef * kl - entropy_coef * entropy_agg
    stats = torch.cat([_policy_stats(seq_stats), torch.stack([pg_loss, kl, entropy_agg])])
    return loss, stats, grad, weights, lse, entropy, grad_logits


@_ppo_loss_from_logits_fwd.register_fake
def _(logits, labels, old_logp, advantages, mask, ref_logp, temperature, ratio_low, ratio_high,
      dual_clip, agg, num_tokens, num_seqs, kl_coef, kl_code, entropy_coef, inplace_backward,
      need_grad, backend, count=None):
    acc = _lp._acc_dtype(logits.dtype)
    n = labels.numel()
    seqs = _num_seqs(labels.shape)
    new = lambda *shape: logits.new_empty(shape, dtype=acc)  # noqa: E731
    fused = _grad_in_forward(logits.dtype, need_grad, inplace_backward)
    grad_logits = logits.new_empty(logits.shape if fused else (0,))
    return new(), new(8), new(0 if fused or not need_grad else n), new(seqs), new(n), new(n), grad_logits


def _grad_in_forward(dtype: torch.dtype, need_grad: bool, inplace_backward: bool) -> bool:
    """Whether ppo_loss_from_logits writes the logits gradient in its forward:
    when one is needed and the logits are not to be overwritten, and not for
    float16, whose gradient must be scaled (GradScaler) before it is rounded
    to float16, or small values underflow."""
    return need_grad and not inplace_backward and dtype != torch.float16


def _tracing(t: Tensor) -> bool:
    """True while a graph is traced (torch.compile, AOT autograd, make_fx): t
    has no value to branch on."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return (torch.compiler.is_compiling() or isinstance(t, (FakeTensor, FunctionalTensor))
            or get_proxy_mode() is not None)


def _from_logits_setup_context(ctx, inputs, output):
    logits, labels, _, _, mask = inputs[:5]
    temperature, entropy_coef, inplace_backward, backend = inputs[6], inputs[15], inputs[16], inputs[18]
    _, _, grad, weights, lse, entropy, grad_logits = output
    ctx.fused = _grad_in_forward(logits.dtype, inputs[17], inplace_backward)  # inputs[17]: need_grad
    if ctx.fused:
        # Only the gradient is kept, not the logits. The backward hands this
        # buffer on as it is (a leaf's .grad may become this very buffer: with
        # retain_graph, editing that .grad in place makes a later backward
        # through the graph raise, as for any saved tensor modified in place).
        ctx.save_for_backward(grad_logits)
        # No (N, V) zeros for the outputs that get no gradient.
        ctx.set_materialize_grads(False)
    else:
        ctx.save_for_backward(logits, labels, mask, grad, weights, lse, entropy)
    ctx.params = (temperature, entropy_coef, inplace_backward, backend)


def _from_logits_backward(ctx, grad_loss, _gs, _gg, _gw, _glse, _gent, _ggl):
    if not ctx.needs_input_grad[0] or grad_loss is None:  # None: only if grads are not materialised
        return (None,) * 20
    if ctx.fused:
        (grad_logits,) = ctx.saved_tensors
        # Written for a unit upstream gradient: scaled only when it is not 1 (a
        # check that synchronises once, eagerly; compiled graphs always scale,
        # since they cannot branch on a value).
        _no_double_backward("ppo_loss_from_logits", grad_loss)
        # The product in float32, rounded once (a bf16 scale would bias it).
        if _tracing(grad_loss):
            grad_logits = (grad_logits.float() * grad_loss.float()).to(grad_logits.dtype)
        else:
            scale = float(grad_loss)  # the one host synchronisation of this backward
            if scale != 1.0:
                grad_logits = grad_logits.mul(scale)
        return (grad_logits,) + (None,) * 19
    logits, labels, mask, grad, weights, lse, entropy = ctx.saved_tensors
    temperature, entropy_coef, inplace_backward, backend = ctx.params
    scale = (weights * grad_loss).unsqueeze(-1)  # (B, 1)
    seqs, seq_len = weights.shape[0], labels.shape[-1]
    grad_logp = (grad.view(seqs, seq_len) * scale).reshape(-1)
    grad_entropy = None
    if entropy_coef != 0.0:
        # d loss / d entropy = -entropy_coef * w_b on valid tokens.
        grad_entropy = torch.where(mask.reshape(seqs, seq_len), -entropy_coef * scale, 0.0)
        grad_entropy = grad_entropy.reshape(-1).to(grad_logp.dtype)
    args = (grad_logp, grad_entropy, logits, labels, lse, entropy if grad_entropy is not None else None,
            temperature, -100, backend)
    # One more pass over the logits writes their gradient.
    if inplace_backward:
        torch.ops.rlhf_kernels.logprobs_bwd_inplace(*args)
        grad_logits = logits
    else:
        grad_logits = torch.ops.rlhf_kernels.logprobs_bwd(*args)
    return (grad_logits,) + (None,) * 19


_ppo_loss_from_logits_fwd.register_autograd(_from_logits_backward, setup_context=_from_logits_setup_context)


# --- public functions -------------------------------------------------------------------


def _check_clip(clip_low: float, clip_high: float | None, dual_clip: float | None) -> tuple[float, float, float]:
    clip_low = check_positive("clip_low", clip_low)
    clip_high = clip_low if clip_high is None else check_positive("clip_high", clip_high)
    if dual_clip is None:
        dual = 0.0
    else:
        dual = check_finite("dual_clip", dual_clip)
        if dual <= 1.0:
            raise ValueError(f"dual_clip: must be > 1 (or None), got {dual}")
    return 1.0 - clip_low, 1.0 + clip_high, dual


def _check_agg(agg: str, num_tokens, num_seqs,
               device: torch.device) -> tuple[Optional[float], Optional[float], Optional[Tensor]]:
    """(num_tokens, num_seqs, divisor): float counts go to the kernels; a count
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
    return counts["num_tokens"], counts["num_seqs"], divisor


def _divide(loss: Tensor, divisor: Optional[Tensor]) -> Tensor:
    return loss if divisor is None else loss / divisor.to(loss.dtype)


def _check_tokens(shape_name: str, shape, **tensors: Tensor) -> None:
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match {shape_name} {tuple(shape)}")


def _check_mask(mask: Tensor) -> Tensor:
    check_tensor("mask", mask)
    if mask.is_complex():
        raise ValueError("mask: complex masks are not supported")
    return mask if mask.dtype == torch.bool else mask != 0


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _prepare(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.to(dtype).contiguous()


def ppo_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    backend: str | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped PPO policy loss (Schulman et al., 2017), fused in one pass.

    ``ratio = exp(clamp(logp - old_logp, -20, 20))``, ``l1 = -A * ratio``,
    ``l2 = -A * clamp(ratio, 1 - clip_low, 1 + clip_high)``, ``l = max(l1, l2)``;
    with ``dual_clip = c`` (Ye et al., 2020) tokens with A < 0 take
    ``min(l, -c * A)``. ``loss = agg(l)`` over the valid tokens of ``mask``.

    Args:
        logp: (B, T) float32 | float64 (bf16 / fp16 are upcast to float32):
            log-probabilities under the current policy; differentiable.
        old_logp, advantages: (B, T), same; not differentiated.
        mask: (B, T) bool (or any dtype; nonzero = valid token).
        clip_low, clip_high: > 0; the ratio is clipped to
            [1 - clip_low, 1 + clip_high]; clip_high defaults to clip_low.
        dual_clip: None or c > 1.
        agg: "token-mean" | "token-sum" | "seq-mean-token-sum" |
            "seq-mean-token-mean" | "seq-mean-token-sum-norm" (seq-mean-token-sum / T).
        num_tokens: token-mean denominator instead of the number of valid
            tokens (global normalisation under data parallelism).
        num_seqs: the number of sequences the seq-mean modes divide by,
            instead of the number with >= 1 valid token. Either count may be a
            1-element tensor on the inputs' device (e.g. all-reduced there): it
            then divides the loss on the device, with no host synchronisation
            (and no check that it is > 0).
        backend: "triton" | "cuda" | "cpu" | "reference"; default by device.

    Returns:
        (loss, stats): loss a 0-dim float32 (float64) tensor, 0 when no token is
        valid; stats 0-dim tensors (no host synchronisation): clipfrac (share of
        valid tokens with l2 > l1), clipfrac_lower (dual clip active),
        approx_kl (mean of old_logp - logp), ratio_max, ratio_min (0 when no
        token is valid).

    The gradient follows torch autograd of ``reference.ppo_policy_loss``,
    including its tie rules (half the gradient to each side of max / min at
    a tie; clamp passes it on the closed interval).
    """
    check_tensor("logp", logp, FLOAT_DTYPES)
    check_tensor("old_logp", old_logp, FLOAT_DTYPES)
    check_tensor("advantages", advantages, FLOAT_DTYPES)
    mask = _check_mask(mask)
    check_same_device(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    if logp.dim() < 1:
        raise ValueError("logp: expected shape (B, T) (or (..., T)), got a 0-dim tensor")
    _check_tokens("logp", logp.shape, old_logp=old_logp, advantages=advantages, mask=mask)
    ratio_low, ratio_high, dual = _check_clip(clip_low, clip_high, dual_clip)
    num_tokens, num_seqs, divisor = _check_agg(agg, num_tokens, num_seqs, logp.device)
    chosen = resolve_backend(backend, logp.device, "ppo_policy_loss")
    dtype = _compute_dtype(logp, old_logp, advantages)
    loss, stats, _, _ = torch.ops.rlhf_kernels.ppo_policy_loss_fwd(
        _prepare(logp, dtype), _prepare(old_logp.detach(), dtype), _prepare(advantages.detach(), dtype),
        mask.contiguous(), ratio_low, ratio_high, dual, agg, num_tokens, num_seqs,
        bool(logp.requires_grad and torch.is_grad_enabled()), chosen,
    )
    stats = stats.detach()
    return _divide(loss, divisor), {name: stats[i] for i, name in enumerate(POLICY_STAT_NAMES)}


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip: float = 0.2,
    agg: str = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    backend: str | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss, fused in one pass:
    ``v_clipped = old_values + clamp(values - old_values, -clip, clip)``,
    ``loss = 0.5 * agg(max((values - R)^2, (v_clipped - R)^2))``. Inside the
    clip range v_clipped is ``values`` exactly (its rounded sum would count
    spurious clips in ``vf_clipfrac``).

    Args:
        values: (B, T) float32 | float64 (bf16 / fp16 upcast): the critic's
            predictions; differentiable.
        old_values, returns: (B, T), same; not differentiated.
        mask: (B, T) bool (nonzero = valid).
        clip: > 0.
        agg, num_tokens, num_seqs: as in ``ppo_policy_loss``.

    Returns:
        (loss, stats): 0-dim loss (0 without valid tokens); stats
        ``vf_clipfrac``, the share of valid tokens where the clipped error is
        the larger one.
    """
    check_tensor("values", values, FLOAT_DTYPES)
    check_tensor("old_values", old_values, FLOAT_DTYPES)
    check_tensor("returns", returns, FLOAT_DTYPES)
    mask = _check_mask(mask)
    check_same_device(values=values, old_values=old_values, returns=returns, mask=mask)
    if values.dim() < 1:
        raise ValueError("values: expected shape (B, T) (or (..., T)), got a 0-dim tensor")
    _check_tokens("values", values.shape, old_values=old_values, returns=returns, mask=mask)
    clip = check_positive("clip", clip)
    num_tokens, num_seqs, divisor = _check_agg(agg, num_tokens, num_seqs, values.device)
    chosen = resolve_backend(backend, values.device, "ppo_value_loss")
    dtype = _compute_dtype(values, old_values, returns)
    loss, stats, _, _ = torch.ops.rlhf_kernels.ppo_value_loss_fwd(
        _prepare(values, dtype), _prepare(old_values.detach(), dtype), _prepare(returns.detach(), dtype),
        mask.contiguous(), clip, agg, num_tokens, num_seqs,
        bool(values.requires_grad and torch.is_grad_enabled()), chosen,
    )
    return _divide(loss, divisor), {"vf_clipfrac": stats.detach()[0]}


def ppo_loss_from_logits(
    logits: Tensor,
    labels: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
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
    inplace_backward: bool = False,
    backend: str | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO policy loss straight from the logits, with KL penalty and entropy bonus:

    ``logp, H = logprobs_from_logits(logits / temperature, labels)``;
    ``loss = ppo_policy_loss(logp, ...) + kl_coef * agg(kl(logp, ref_logp))
    - entropy_coef * agg(H)``. The loss is a sum of per-token terms whose
    weights depend on the mask only, so when a gradient is wanted it is
    produced in the forward: each row of logits is read once for logp, entropy
    and lse, its token's dL/dlogp follows, and the row's gradient is written
    while the row is still in cache (one read and one write of the logits in
    all); the backward only hands that buffer on (scaling it, one more pass,
    when the upstream gradient is not exactly 1). Without a gradient (no_grad,
    or logits that do not require one) it is one read. Extra memory O(B * T)
    besides the (B, T, V) gradient itself. float16 logits (and
    ``inplace_backward``) take the gradient in the backward instead, after
    the upstream scale (GradScaler's), so that it does not underflow. No
    double backward (``create_graph=True``).

    Args:
        logits: (B, T, V) float32 | bfloat16 | float16 (float64 for gradcheck);
            strided rows (``logits[:, :-1]``) are read in place.
        labels: (B, T) int64 | int32, the sampled tokens (``-100``: ignored,
            logp = entropy = 0 there).
        old_logp, advantages, mask: (B, T) as in ``ppo_policy_loss``.
        ref_logp: (B, T) float, the reference policy's logp; adds the KL
            penalty with ``kl_coef`` (estimator "k1" | "abs" | "k2" | "mse" |
            "k3" | "low_var_kl").
        entropy_coef: weight of the entropy bonus (subtracted).
        inplace_backward: write the logits gradient into the logits buffer
            (no (B, T, V) gradient buffer; the logits are consumed by the
            backward): three passes over the logits, as the gradient is then
            written in the backward.
        Others: as in ``ppo_policy_loss``.

    Returns:
        (loss, stats): the 0-dim loss (float32; float64 for float64 logits) and
        0-dim stats: the ``ppo_policy_loss`` stats plus pg_loss (the policy
        term), kl (aggregated penalty, 0 without ref_logp) and entropy
        (aggregated).
    """
    check_tensor("logits", logits, FLOAT_DTYPES)
    check_tensor("labels", labels, INDEX_DTYPES)
    check_tensor("old_logp", old_logp, FLOAT_DTYPES)
    check_tensor("advantages", advantages, FLOAT_DTYPES)
    mask = _check_mask(mask)
    if ref_logp is not None:
        check_tensor("ref_logp", ref_logp, FLOAT_DTYPES)
    check_same_device(logits=logits, labels=labels, old_logp=old_logp, advantages=advantages,
                      mask=mask, ref_logp=ref_logp)
    if logits.dim() < 2:
        raise ValueError("logits: expected shape (B, T, V) (or (..., T, V))")
    if logits.shape[-1] == 0:
        raise ValueError("logits: the vocabulary dimension V must be > 0")
    tokens = logits.shape[:-1]
    _check_tokens("logits.shape[:-1]", tokens, labels=labels, old_logp=old_logp,
                  advantages=advantages, mask=mask)
    if ref_logp is not None:
        _check_tokens("logits.shape[:-1]", tokens, ref_logp=ref_logp)
    temperature = check_positive("temperature", temperature)
    ratio_low, ratio_high, dual = _check_clip(clip_low, clip_high, dual_clip)
    num_tokens, num_seqs, divisor = _check_agg(agg, num_tokens, num_seqs, logits.device)
    kl_coef = check_finite("kl_coef", kl_coef)
    entropy_coef = check_finite("entropy_coef", entropy_coef)
    kl_code = _check_estimator(kl_estimator, "kl_estimator")
    if ref_logp is None:
        kl_code = -1  # no KL term
    chosen = resolve_backend(backend, logits.device, "ppo_loss_from_logits")
    acc = _lp._acc_dtype(logits.dtype)
    loss, stats, _, _, _, _, _ = torch.ops.rlhf_kernels.ppo_loss_from_logits_fwd(
        logits, labels, _prepare(old_logp.detach(), acc), _prepare(advantages.detach(), acc),
        mask.contiguous(), None if ref_logp is None else _prepare(ref_logp.detach(), acc),
        temperature, ratio_low, ratio_high, dual, agg, num_tokens, num_seqs, kl_coef, kl_code,
        entropy_coef, bool(inplace_backward), bool(logits.requires_grad and torch.is_grad_enabled()),
        chosen, divisor,
    )
    stats = stats.detach()
    names = POLICY_STAT_NAMES + ("pg_loss", "kl", "entropy")
    return loss, {name: stats[i] for i, name in enumerate(names)}


__all__ = ["ppo_policy_loss", "ppo_value_loss", "ppo_loss_from_logits"]

"""Triton kernels of the PPO losses: the per-token policy and value kernels
(one program per chunk of a sequence, partial sums per chunk), the
from-logits kernel that writes the logits gradient in the forward, their
launchers, and the custom ops ``rlhf_kernels::*_triton`` with the native ops'
schemas (their fakes, autograd and public functions: ``ops/ppo_loss.py``)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
import triton
import triton.language as tl

from .._launch import acc_dtype, grad_in_forward, layouts
from .._validation import check_labels_in_range, compute_dtype
from ..aggregation import (
    AGG_MODES, COUNT, ENTROPY_SUM, KL_SUM, N_POLICY_STATS, N_VALUE_STATS, PG_SUM, RATIO_MAX, RATIO_MIN, VF_CLIP,
    VF_COUNT, VF_SUM, divide, divisor, policy_stats, sequence_weights,
)
from ._device import (
    _chunk_tokens, _clamp, _f64, _label_logp, _policy_terms, _row_grad, _row_softmax, _token_weight, f64_parts,
    on_tensor_device, tl_acc,
)
from . import advantages as _advantages
from . import logprobs as _logprobs

N_POLICY_FORMS = 8  # the objectives' codes, PolicyForm in csrc/include/rlhf_kernels/ppo_math.h (FORM of the kernels)
N_ROWS_FORMS = 10  # and ppo_policy_rows' two more (kRowsForms)

@triton.jit
def _ppo_policy_fwd_kernel(
    logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, entropy_ptr, grad_ptr, partial_ptr,
    seq_len, n_chunks, low_hi, low_mid, low_lo, high_hi, high_mid, high_lo, dual_hi, dual_mid, dual_lo,
    kl_coef_hi, kl_coef_mid, kl_coef_lo,
    HAS_DUAL: tl.constexpr, KL_ESTIMATOR: tl.constexpr, FORM: tl.constexpr, HAS_ENTROPY: tl.constexpr,
    NEED_GRAD: tl.constexpr, HAS_WEIGHT: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    # The policy objective FORM (_policy_terms) per token; one program per
    # (sequence, chunk) writes dl/dlogp and 9 partial sums,
    # each token's terms times its weight (HAS_WEIGHT: the mask holds weights).
    item, offs, in_seq, valid = _chunk_tokens(mask_ptr, seq_len, n_chunks, BLOCK)
    w = _token_weight(mask_ptr, offs, valid, HAS_WEIGHT, ACC_DTYPE)
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
        _f64(kl_coef_hi, kl_coef_mid, kl_coef_lo, ACC_DTYPE), HAS_DUAL, KL_ESTIMATOR, FORM,
    )
    if NEED_GRAD:
        tl.store(grad_ptr + offs, tl.where(valid, w * grad, 0.0), mask=in_seq)
    out = partial_ptr + item * 9
    tl.store(out + 0, tl.sum(tl.where(valid, w * loss, 0.0), axis=0))
    tl.store(out + 1, tl.sum(w, axis=0))
    tl.store(out + 2, tl.sum(tl.where(valid & clipped, w, 0.0), axis=0))
    tl.store(out + 3, tl.sum(tl.where(valid & dual, w, 0.0), axis=0))
    tl.store(out + 4, tl.sum(tl.where(valid, w * (old - logp), 0.0), axis=0))
    tl.store(out + 5, tl.max(tl.where(valid, ratio, float("-inf")), axis=0))
    tl.store(out + 6, tl.min(tl.where(valid, ratio, float("inf")), axis=0))
    tl.store(out + 7, tl.sum(tl.where(valid, w * kl, 0.0), axis=0))
    if HAS_ENTROPY:
        entropy = tl.load(entropy_ptr + offs, mask=valid, other=0.0).to(ACC_DTYPE)
        tl.store(out + 8, tl.sum(tl.where(valid, w * entropy, 0.0), axis=0))
    else:
        tl.store(out + 8, tl.sum(tl.zeros((BLOCK,), ACC_DTYPE), axis=0))

@triton.jit
def _ppo_logits_grad_kernel(
    logits_ptr, labels_ptr, old_ptr, adv_ptr, weight_ptr, ref_ptr, grad_ptr, logp_ptr, entropy_ptr,
    row_max_ptr, log_sum_ptr, n_rows, inner_rows, in_outer_stride, in_inner_stride, out_outer_stride,
    out_inner_stride, vocab,
    inv_t_hi, inv_t_mid, inv_t_lo, ignore_index, low_hi, low_mid, low_lo, high_hi, high_mid, high_lo,
    dual_hi, dual_mid, dual_lo, kl_coef_hi, kl_coef_mid, kl_coef_lo, ent_hi, ent_mid, ent_lo,
    HAS_DUAL: tl.constexpr, KL_ESTIMATOR: tl.constexpr, FORM: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
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
        label = tl.load(labels_ptr + row)
        ignored = label == ignore_index
        logp = tl.where(ignored, 0.0, _label_logp(row_ptr, label, vocab, m, log_s, inv_temperature, ACC_DTYPE))
        entropy = tl.where(ignored, 0.0, entropy)
        tl.store(row_max_ptr + row, m)
        tl.store(log_sum_ptr + row, log_s)
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
            _f64(kl_coef_hi, kl_coef_mid, kl_coef_lo, ACC_DTYPE), HAS_DUAL, KL_ESTIMATOR, FORM,
        )
        g = tl.where(valid, weight * tok_grad, 0.0)
        if HAS_ENTROPY_GRAD:
            g_entropy = tl.where(valid, -_f64(ent_hi, ent_mid, ent_lo, ACC_DTYPE) * weight, 0.0)
        else:
            g_entropy = tl.zeros((), ACC_DTYPE)
        _row_grad(row_ptr, out_ptr, vocab, label, ignore_index, g, g_entropy, entropy, m, log_s,
                  inv_temperature, ACC_DTYPE, BLOCK_V)

@triton.jit
def _ppo_value_fwd_kernel(
    values_ptr, old_ptr, returns_ptr, mask_ptr, grad_ptr, partial_ptr,
    seq_len, n_chunks, clip_hi, clip_mid, clip_lo,
    NEED_GRAD: tl.constexpr, HAS_WEIGHT: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    # 0.5 * max((v - R)^2, (v_clipped - R)^2) per token, times its weight;
    # v_clipped = old + clamp(v - old, -c, c), exactly v in range.
    item, offs, in_seq, valid = _chunk_tokens(mask_ptr, seq_len, n_chunks, BLOCK)
    w = _token_weight(mask_ptr, offs, valid, HAS_WEIGHT, ACC_DTYPE)
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
        tl.store(grad_ptr + offs, tl.where(valid, w * grad, 0.0), mask=in_seq)
    out = partial_ptr + item * 3
    tl.store(out + 0, tl.sum(tl.where(valid, w * loss, 0.0), axis=0))
    tl.store(out + 1, tl.sum(w, axis=0))
    tl.store(out + 2, tl.sum(tl.where(valid & clipped, w, 0.0), axis=0))


def token_block(seq_len: int, device: torch.device) -> int:
    # The interpreter favours few, wide programs; a GPU many 1024-wide ones.
    cap = 4096 if device.type != "cuda" else 1024
    return max(16, min(triton.next_power_of_2(max(seq_len, 1)), cap))


def reduce_partials(partial: Tensor, max_col: int | None, min_col: int | None) -> Tensor:
    """(B, C, K) chunk partials -> (B, K): sums, with max / min for the ratio columns."""
    stats = partial.sum(1)
    if max_col is not None:
        stats[:, max_col] = partial[:, :, max_col].amax(1)
        stats[:, min_col] = partial[:, :, min_col].amin(1)
    return stats


def _mask_arg(mask: Tensor) -> Tensor:
    """A kernel mask (bool, or weights of the computation dtype) as the token kernels read it."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _token_outputs(x, seq_len: int, n_stats: int, need_grad: bool):
    """(seqs, chunks, block, grad, partial) of a token kernel over x (B * T,):
    one program per BLOCK tokens of a sequence, one row of partial sums each."""
    n = x.numel()
    seqs = n // seq_len if seq_len > 0 else 0
    block = token_block(seq_len, x.device)
    chunks = max(1, triton.cdiv(seq_len, block))
    grad = torch.empty(n if need_grad else 0, dtype=x.dtype, device=x.device)
    partial = torch.empty((seqs, chunks, n_stats), dtype=x.dtype, device=x.device)
    return seqs, chunks, block, grad, partial


@on_tensor_device
def policy(logp, old_logp, adv, mask, ref_logp, entropy, seq_len, ratio_low, ratio_high,
           dual_clip, loss_type, kl_coef, kl_code, need_grad):
    """The policy token kernel of the objective loss_type (PolicyForm); HAS_DUAL only for clip (0)."""
    seqs, chunks, block, grad, partial = _token_outputs(logp, seq_len, N_POLICY_STATS, need_grad)
    if seqs > 0:
        _ppo_policy_fwd_kernel[(seqs * chunks,)](
            logp, old_logp, adv, _mask_arg(mask),
            ref_logp if ref_logp is not None else logp, entropy if entropy is not None else logp,
            grad if need_grad else logp, partial, seq_len, chunks,
            *f64_parts(ratio_low), *f64_parts(ratio_high), *f64_parts(dual_clip), *f64_parts(kl_coef),
            HAS_DUAL=loss_type == 0 and dual_clip > 0, KL_ESTIMATOR=kl_code, FORM=loss_type,
            HAS_ENTROPY=entropy is not None,
            NEED_GRAD=need_grad, HAS_WEIGHT=mask.dtype != torch.bool, ACC_DTYPE=tl_acc(logp.dtype), BLOCK=block,
        )
    return grad, reduce_partials(partial, RATIO_MAX, RATIO_MIN)


@on_tensor_device
def value(values, old_values, returns, mask, seq_len, clip, need_grad):
    seqs, chunks, block, grad, partial = _token_outputs(values, seq_len, N_VALUE_STATS, need_grad)
    if seqs > 0:
        _ppo_value_fwd_kernel[(seqs * chunks,)](
            values, old_values, returns, _mask_arg(mask), grad if need_grad else values,
            partial, seq_len, chunks, *f64_parts(clip),
            NEED_GRAD=need_grad, HAS_WEIGHT=mask.dtype != torch.bool, ACC_DTYPE=tl_acc(values.dtype), BLOCK=block,
        )
    return grad, reduce_partials(partial, None, None)


@on_tensor_device
def logits_grad(logits, labels, old_logp, adv, row_weight, ref_logp, grad_logits, inv_temperature,
                ratio_low, ratio_high, dual_clip, loss_type, kl_coef, kl_code, entropy_coef, max_rows_in_flight):
    """The fused from-logits kernel of the objective loss_type; at most max_rows_in_flight rows at once (0: all)."""
    tensor, inner_rows, in_outer, in_inner, out_outer, out_inner = layouts(logits, grad_logits)
    n_rows, vocab = labels.numel(), logits.shape[-1]
    acc = acc_dtype(logits.dtype)
    logp, entropy, row_max, log_sum = (torch.empty(n_rows, dtype=acc, device=logits.device) for _ in range(4))
    if n_rows > 0:
        block, warps = _logprobs.block_config(vocab, logits.device)
        grid = min(max_rows_in_flight, n_rows) or n_rows
        _ppo_logits_grad_kernel[(grid,)](
            tensor, labels, old_logp, adv, row_weight, ref_logp if ref_logp is not None else old_logp,
            grad_logits, logp, entropy, row_max, log_sum, n_rows, inner_rows, in_outer, in_inner, out_outer,
            out_inner, vocab,
            *f64_parts(inv_temperature), -100, *f64_parts(ratio_low), *f64_parts(ratio_high),
            *f64_parts(dual_clip), *f64_parts(kl_coef), *f64_parts(entropy_coef),
            HAS_DUAL=loss_type == 0 and dual_clip > 0, KL_ESTIMATOR=kl_code, FORM=loss_type,
            HAS_ENTROPY_GRAD=entropy_coef != 0.0,
            ACC_DTYPE=tl_acc(logits.dtype), BLOCK_V=block, num_warps=warps,
        )
    return logp, entropy, row_max, log_sum


@triton.jit
def _scale_unless_one_kernel(x_ptr, scale_ptr, applied_ptr, n, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    # x *= scale / applied in ACC_DTYPE, rounded once, unless that is 1 (read on
    # the device: the caller never synchronises); then nothing is touched.
    # A grid-stride loop over a bounded grid: few programs to skip when it is 1.
    scale = tl.load(scale_ptr).to(ACC_DTYPE) / tl.load(applied_ptr).to(ACC_DTYPE)
    if scale != 1.0:
        for start in range(tl.program_id(0) * BLOCK, n, tl.num_programs(0) * BLOCK):
            offs = start + tl.zeros((), tl.int64) + tl.arange(0, BLOCK)
            inside = offs < n
            x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(ACC_DTYPE)
            tl.store(x_ptr + offs, (x * scale).to(x_ptr.dtype.element_ty), mask=inside)


@on_tensor_device
def scale_unless_one(x: Tensor, applied: Tensor, scale: Tensor) -> None:
    """x *= scale / applied unless that is 1, then applied = scale (launch_scale_unless_one in csrc/cuda)."""
    n = x.numel()
    scale = scale.to(applied.dtype).reshape(1)
    if n > 0:
        block = _advantages.elem_block(x.device)
        _scale_unless_one_kernel[(min(triton.cdiv(n, block), 1024),)](
            x, scale, applied, n, ACC_DTYPE=tl_acc(x.dtype), BLOCK=block,
        )
    applied.copy_(scale)


@triton.jit
def _scale_by_sign_kernel(x_ptr, pos_ptr, neg_ptr, y_ptr, n, seq_len, BLOCK: tl.constexpr):
    # y = x * (x > 0 ? pos[r] : neg[r]), r = i // seq_len; a grid-stride loop over a bounded grid.
    for start in range(tl.program_id(0) * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.zeros((), tl.int64) + tl.arange(0, BLOCK)
        inside = offs < n
        x = tl.load(x_ptr + offs, mask=inside, other=0.0)
        row = offs // seq_len
        weight = tl.where(x > 0, tl.load(pos_ptr + row, mask=inside, other=0.0),
                          tl.load(neg_ptr + row, mask=inside, other=0.0))
        tl.store(y_ptr + offs, x * weight, mask=inside)


# --- the custom ops: the native ops' composites (csrc/glue/ppo_loss.h) over these kernels ---


def _kernel_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A mask as the token kernels read it, flat: bool stays bool (valid or
    not), any other dtype becomes per-token weights in ``dtype`` (the native
    glue's kernel_mask)."""
    return (mask if mask.dtype == torch.bool else mask.to(dtype)).reshape(-1).contiguous()


def _tokens(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The token tensors as the kernels read them: flat, contiguous, of the
    computation dtype (the native ops do this in C++)."""
    dtype = compute_dtype(*tensors)
    return tuple(t.to(dtype).reshape(-1).contiguous() for t in tensors)


def _num_seqs(shape) -> int:
    return math.prod(shape[:-1])


def _run_tokens(token_pass, shape, n_stats: int, like: Tensor, *args):
    """token_pass(*args) (a token kernel: (grad, seq_stats)), or, without any
    token, the statistics of B empty sequences (zero counts; ratio max / min at
    -inf / +inf) without a launch."""
    if like.numel() == 0:
        stats = like.new_zeros((_num_seqs(shape), n_stats))
        if n_stats == N_POLICY_STATS:
            stats[:, RATIO_MAX] = float("-inf")
            stats[:, RATIO_MIN] = float("inf")
        return like.new_empty(0), stats
    return token_pass(*args)


def _check_loss_type(loss_type: int, forms: int = N_POLICY_FORMS) -> None:
    """A PolicyForm code (0 clip ... 7 geo_mean; with forms = N_ROWS_FORMS also
    the rows-only 8, 9), as the native glue's check_loss_type."""
    if not 0 <= loss_type < forms:
        raise ValueError(f"loss_type: bad code {loss_type}")


def _weights(counts: Tensor, shape, agg: int, num_tokens, num_seqs, count: Optional[Tensor] = None) -> Tensor:
    """The aggregation weights w_b, divided by a count given as a tensor."""
    return divide(sequence_weights(counts, int(shape[-1]), AGG_MODES[agg], num_tokens, num_seqs), count)


@torch.library.custom_op("rlhf_kernels::ppo_policy_rows_triton", mutates_args=())
def ppo_policy_rows_op(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, ratio_low: float, ratio_high: float,
    dual_clip: float, loss_type: int, need_grad: bool,
) -> tuple[Tensor, Tensor]:
    """The native ppo_policy_rows (csrc/glue/ppo_loss.h ppo_policy_rows_impl): the token pass alone."""
    _check_loss_type(loss_type, N_ROWS_FORMS)
    tokens = _tokens(logp, old_logp, advantages)
    return _run_tokens(
        policy, logp.shape, N_POLICY_STATS, tokens[0], *tokens, _kernel_mask(mask, tokens[0].dtype),
        None, None, int(logp.shape[-1]), ratio_low, ratio_high, dual_clip, loss_type, 0.0, -1, need_grad,
    )


@torch.library.custom_op("rlhf_kernels::ppo_policy_loss_triton", mutates_args=())
def ppo_policy_loss_op(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, ratio_low: float,
    ratio_high: float, dual_clip: float, loss_type: int, agg: int, num_tokens: Optional[float],
    num_seqs: Optional[float], need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_loss_type(loss_type)
    tokens = _tokens(logp, old_logp, advantages)
    grad, seq_stats = _run_tokens(
        policy, logp.shape, N_POLICY_STATS, tokens[0], *tokens, _kernel_mask(mask, tokens[0].dtype),
        None, None, int(logp.shape[-1]), ratio_low, ratio_high, dual_clip, loss_type, 0.0, -1, need_grad,
    )
    weights = _weights(seq_stats[:, COUNT], logp.shape, agg, num_tokens, num_seqs)
    return (weights * seq_stats[:, PG_SUM]).sum(), policy_stats(seq_stats), grad, weights


@torch.library.custom_op("rlhf_kernels::ppo_value_loss_triton", mutates_args=())
def ppo_value_loss_op(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float, agg: int,
    num_tokens: Optional[float], num_seqs: Optional[float], need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    tokens = _tokens(values, old_values, returns)
    grad, seq_stats = _run_tokens(
        value, values.shape, N_VALUE_STATS, tokens[0], *tokens, _kernel_mask(mask, tokens[0].dtype),
        int(values.shape[-1]), clip, need_grad,
    )
    counts = seq_stats[:, VF_COUNT]
    weights = _weights(counts, values.shape, agg, num_tokens, num_seqs)
    clipfrac = seq_stats[:, VF_CLIP].sum() / divisor(counts.sum())
    return (weights * seq_stats[:, VF_SUM]).sum(), clipfrac.reshape(1), grad, weights


@torch.library.custom_op("rlhf_kernels::ppo_loss_from_logits_triton", mutates_args=())
def ppo_loss_from_logits_op(
    logits: Tensor, labels: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, ref_logp: Optional[Tensor],
    temperature: float, ratio_low: float, ratio_high: float, dual_clip: float, loss_type: int, agg: int,
    num_tokens: Optional[float], num_seqs: Optional[float], kl_coef: float, kl_estimator: int, entropy_coef: float,
    inplace_backward: bool, need_grad: bool, count: Optional[Tensor], max_rows_in_flight: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The native op's composite (csrc/glue/ppo_loss.h ppo_loss_from_logits_impl) over the Triton kernels."""
    _check_loss_type(loss_type)
    if labels.device.type == "cpu":  # the interpreter: as the native CPU op checks
        check_labels_in_range(labels, logits.shape[-1], -100)
    acc = acc_dtype(logits.dtype)
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    seq_len, seqs = int(labels.shape[-1]), _num_seqs(labels.shape)
    token_mask = _kernel_mask(mask, acc)
    old, adv = (t.to(acc).reshape(-1).contiguous() for t in (old_logp, advantages))
    ref = None if ref_logp is None else ref_logp.to(acc).reshape(-1).contiguous()
    kl_code = kl_estimator if ref is not None else -1
    grad_logits = logits.new_empty(0)
    fused = grad_in_forward(logits.dtype, need_grad, inplace_backward)
    if fused:
        m = token_mask.view(seqs, seq_len)
        weights = _weights(m.sum(-1, dtype=acc), labels.shape, agg, num_tokens, num_seqs, count)
        w = weights.unsqueeze(-1) if m.dtype == torch.bool else weights.unsqueeze(-1) * m
        row_weight = torch.where(m != 0, w, 0.0).reshape(-1)
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        logp, entropy, row_max, log_sum = logits_grad(
            logits, flat_labels, old, adv, row_weight.contiguous(), ref, grad_logits, 1.0 / temperature,
            ratio_low, ratio_high, dual_clip, loss_type, kl_coef, kl_code, entropy_coef, max_rows_in_flight,
        )
    else:
        logp, entropy, row_max, log_sum = _logprobs.forward(logits, flat_labels, 1.0 / temperature, -100, True)
    token_grad = need_grad and not fused
    grad, seq_stats = _run_tokens(
        policy, labels.shape, N_POLICY_STATS, logp, logp, old, adv, token_mask, ref, entropy,
        seq_len, ratio_low, ratio_high, dual_clip, loss_type, kl_coef, kl_code, token_grad,
    )
    if not fused:
        weights = _weights(seq_stats[:, COUNT], labels.shape, agg, num_tokens, num_seqs, count)
    pg_loss = (weights * seq_stats[:, PG_SUM]).sum()
    kl = (weights * seq_stats[:, KL_SUM]).sum()
    entropy_agg = (weights * seq_stats[:, ENTROPY_SUM]).sum()
    loss = pg_loss + kl_coef * kl - entropy_coef * entropy_agg
    stats = torch.cat([policy_stats(seq_stats), torch.stack([pg_loss, kl, entropy_agg])])
    return loss, stats, grad, weights, row_max, log_sum, entropy, grad_logits


@torch.library.custom_op("rlhf_kernels::scale_grad_triton_", mutates_args=("grad", "applied"))
def scale_grad_op(grad: Tensor, applied: Tensor, scale: Tensor) -> None:
    scale_unless_one(grad, applied, scale)


@scale_grad_op.register_fake
def _(grad, applied, scale):
    return None


@torch.library.custom_op("rlhf_kernels::scale_by_sign_triton", mutates_args=())
def scale_by_sign_op(x: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    """The native scale_by_sign (csrc/glue/ppo_loss.h scale_by_sign_impl): one grid-stride pass."""
    if x.dim() < 1:
        raise ValueError("x: expected shape (..., T), got a 0-dim tensor")
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"x: expected float32 or float64, got {x.dtype}")
    rows = math.prod(x.shape[:-1])
    for name, t in (("pos", pos), ("neg", neg)):
        if tuple(t.shape) != (rows,):
            raise ValueError(f"{name}: expected shape ({rows},), got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise ValueError(f"{name}: expected {x.dtype}, got {t.dtype}")
    x = x.contiguous()
    y = torch.empty_like(x)
    if x.numel() > 0:
        _launch_scale_by_sign(x, pos.contiguous(), neg.contiguous(), y)
    return y


@on_tensor_device
def _launch_scale_by_sign(x: Tensor, pos: Tensor, neg: Tensor, y: Tensor) -> None:
    n = x.numel()
    block = _advantages.elem_block(x.device)
    _scale_by_sign_kernel[(min(triton.cdiv(n, block), 1024),)](x, pos, neg, y, n, x.shape[-1], BLOCK=block)


@scale_by_sign_op.register_fake
def _(x, pos, neg):
    return torch.empty_like(x, memory_format=torch.contiguous_format)

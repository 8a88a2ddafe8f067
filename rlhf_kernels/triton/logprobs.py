"""Triton kernels of logprobs_from_logits: one program per row, the online
softmax of _device._row_softmax forward, _device._row_grad backward; with a
per-row threshold min_logit (HAS_THRESHOLD), the same over the kept set
{x >= min_logit[row]} (_kept_row_softmax, _kept_row_grad)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
import triton
import triton.language as tl

from .._launch import acc_dtype, layouts, row_layout
from .._validation import check_labels_in_range
from ._device import (
    _clamp_exp_arg, _f64, _label_logp, _row_grad, _row_softmax, f64_parts, on_tensor_device, tl_acc,
)


@triton.jit
def _kept(x, threshold):
    # The kept set {x >= threshold}; NaN logits stay in it, so that they reach
    # the sums as they do without a threshold (the row comes out NaN).
    return (x >= threshold) | (x != x)

@triton.jit
def _kept_row_softmax(row_ptr, vocab, threshold, inv_temperature, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr):
    """_row_softmax over the kept set only: returns (m, log s, entropy) of the
    renormalised kept set, m = -inf and entropy NaN (0 / 0) when it is empty.
    Whether an element is kept is a select, never a product with 0: outside
    the set y may be +-inf (x far above the running m, before any kept one)."""
    m = tl.full((), -3.0e38, ACC_DTYPE)
    s = tl.zeros((), ACC_DTYPE)
    t = tl.zeros((), ACC_DTYPE)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < vocab
        x = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(ACC_DTYPE)
        kept = in_row & _kept(x, threshold)
        # A tile whose max is below the threshold contributes nothing: new_m == m.
        new_m = tl.maximum(m, tl.max(tl.where(kept, x, float("-inf")), axis=0))
        delta = _clamp_exp_arg((m - new_m) * inv_temperature)
        alpha = tl.exp(delta)
        y = tl.where(kept, _clamp_exp_arg((x - new_m) * inv_temperature), 0.0)
        e = tl.where(kept, tl.exp(y), 0.0)
        t = alpha * (t + delta * s) + tl.sum(e * y, axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = new_m
    log_s = tl.log(s)
    log_s = tl.where(log_s < 0.0, 0.0, log_s)  # s >= 1 when the set is not empty; log 0 = -inf -> 0
    # s > 0 iff some element is kept (its own term is exp(0) = 1, later rescales >= exp(_MIN_EXP_ARG)).
    return tl.where(s == 0.0, float("-inf"), m), log_s, log_s - t / s

@triton.jit
def _kept_label_logp(row_ptr, label, vocab, threshold, m, log_s, inv_temperature, ACC_DTYPE: tl.constexpr):
    # _label_logp, -inf for a label outside the kept set.
    in_range = (label >= 0) & (label < vocab)
    x_label = tl.load(row_ptr + tl.where(in_range, label, 0)).to(ACC_DTYPE)
    logp = tl.where(_kept(x_label, threshold), (x_label - m) * inv_temperature - log_s, float("-inf"))
    return tl.where(in_range, logp, float("nan"))

@triton.jit
def _kept_row_grad(row_ptr, out_ptr, vocab, threshold, label, ignore_index, g, g_entropy, row_entropy, m, log_s,
                   inv_temperature, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr):
    """_row_grad with p = 0 outside the kept set, selected, not multiplied:
    there (x - m) may be +inf (m = -inf for an empty set) and row_entropy NaN.
    The label's one-hot term inv_T * g stays wherever the label is."""
    ignored = label == ignore_index
    bad_label = (label != ignore_index) & ((label < 0) | (label >= vocab))
    g = tl.where(ignored, 0.0, g)
    g_entropy = tl.where(ignored, 0.0, g_entropy)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < vocab
        x = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(ACC_DTYPE)
        kept = _kept(x, threshold)
        y = tl.where(kept, _clamp_exp_arg((x - m) * inv_temperature - log_s), 0.0)
        p = tl.exp(y)
        grad = tl.where(kept, -inv_temperature * p * (g + g_entropy * (y + row_entropy)), 0.0)
        grad = grad + tl.where(cols == label, inv_temperature * g, 0.0)
        grad = tl.where(ignored, 0.0, grad)
        grad = tl.where(bad_label, float("nan"), grad)
        tl.store(out_ptr + cols, grad.to(out_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr, labels_ptr, min_logit_ptr, logp_ptr, entropy_ptr, row_max_ptr, log_sum_ptr,
    inner_rows, outer_stride, inner_stride, vocab, inv_t_hi, inv_t_mid, inv_t_lo, ignore_index,
    COMPUTE_ENTROPY: tl.constexpr, HAS_THRESHOLD: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # One program per row; HAS_THRESHOLD: over the kept set {x >= min_logit[row]}.
    inv_temperature = _f64(inv_t_hi, inv_t_mid, inv_t_lo, ACC_DTYPE)
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // inner_rows) * outer_stride + (row % inner_rows) * inner_stride
    label = tl.load(labels_ptr + row)
    if HAS_THRESHOLD:
        threshold = tl.load(min_logit_ptr + row).to(ACC_DTYPE)
        m, log_s, entropy = _kept_row_softmax(row_ptr, vocab, threshold, inv_temperature, ACC_DTYPE, BLOCK_V)
        logp = _kept_label_logp(row_ptr, label, vocab, threshold, m, log_s, inv_temperature, ACC_DTYPE)
    else:
        m, log_s, entropy = _row_softmax(row_ptr, vocab, inv_temperature, ACC_DTYPE, BLOCK_V)
        logp = _label_logp(row_ptr, label, vocab, m, log_s, inv_temperature, ACC_DTYPE)
    tl.store(row_max_ptr + row, m)
    tl.store(log_sum_ptr + row, log_s)
    ignored = label == ignore_index
    tl.store(logp_ptr + row, tl.where(ignored, 0.0, logp))
    if COMPUTE_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(ignored, 0.0, entropy))

@triton.jit
def _logprobs_bwd_kernel(
    grad_logp_ptr, grad_entropy_ptr, logits_ptr, labels_ptr, row_max_ptr, log_sum_ptr, entropy_ptr, min_logit_ptr,
    grad_ptr, inner_rows, in_outer_stride, in_inner_stride, out_outer_stride, out_inner_stride,
    vocab, inv_t_hi, inv_t_mid, inv_t_lo, ignore_index,
    HAS_ENTROPY_GRAD: tl.constexpr, HAS_THRESHOLD: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    inv_temperature = _f64(inv_t_hi, inv_t_mid, inv_t_lo, ACC_DTYPE)
    row = tl.program_id(0).to(tl.int64)
    outer = row // inner_rows
    inner = row % inner_rows
    row_ptr = logits_ptr + outer * in_outer_stride + inner * in_inner_stride
    out_ptr = grad_ptr + outer * out_outer_stride + inner * out_inner_stride
    label = tl.load(labels_ptr + row)
    g = tl.load(grad_logp_ptr + row).to(ACC_DTYPE)
    if HAS_ENTROPY_GRAD:
        g_entropy = tl.load(grad_entropy_ptr + row).to(ACC_DTYPE)
        row_entropy = tl.load(entropy_ptr + row).to(ACC_DTYPE)
    else:
        g_entropy = tl.zeros((), ACC_DTYPE)
        row_entropy = tl.zeros((), ACC_DTYPE)
    m = tl.load(row_max_ptr + row).to(ACC_DTYPE)
    log_s = tl.load(log_sum_ptr + row).to(ACC_DTYPE)
    if HAS_THRESHOLD:
        threshold = tl.load(min_logit_ptr + row).to(ACC_DTYPE)
        _kept_row_grad(row_ptr, out_ptr, vocab, threshold, label, ignore_index, g, g_entropy, row_entropy, m,
                       log_s, inv_temperature, ACC_DTYPE, BLOCK_V)
    else:
        _row_grad(row_ptr, out_ptr, vocab, label, ignore_index, g, g_entropy, row_entropy, m, log_s,
                  inv_temperature, ACC_DTYPE, BLOCK_V)


def block_config(vocab: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_V, num_warps). The interpreter favours big blocks (fewer Python
    loop steps); on a GPU 4096-wide chunks keep 16 warps busy on 16-byte loads."""
    if device.type != "cuda":
        return min(triton.next_power_of_2(vocab), 8192), 4
    block = min(triton.next_power_of_2(vocab), 4096)
    return block, (16 if block >= 4096 else max(1, min(8, block // 256)))


def addressable_in_place(logits) -> bool:
    """Whether the kernels can write the logits gradient over these logits."""
    return row_layout(logits)[0] is logits


def check_min_logit(min_logit: Optional[Tensor], n_rows: int, logits: Tensor) -> None:
    """ValueError unless min_logit is None or (N,) contiguous in the accumulation
    dtype on the logits' device: the layout the kernels read."""
    if min_logit is None:
        return
    acc = acc_dtype(logits.dtype)
    if not isinstance(min_logit, Tensor):
        raise ValueError(f"min_logit: expected a torch.Tensor or None, got {type(min_logit).__name__}")
    if min_logit.dtype != acc:
        raise ValueError(f"min_logit: dtype {min_logit.dtype} is not supported (expected {acc} for "
                         f"{logits.dtype} logits)")
    if tuple(min_logit.shape) != (n_rows,):
        raise ValueError(f"min_logit: shape {tuple(min_logit.shape)} does not match the rows ({n_rows},)")
    if not min_logit.is_contiguous():
        raise ValueError("min_logit: expected a contiguous tensor")
    if min_logit.device != logits.device:
        raise ValueError(f"min_logit: on {min_logit.device}, the logits on {logits.device}")


@on_tensor_device
def forward(logits, labels, inv_temperature, ignore_index, compute_entropy, min_logit=None):
    """(logp, entropy, row_max, log_sum) of (..., V) logits and (N,) int64 labels;
    min_logit (N,) restricts each row to its kept set {x >= min_logit[row]}."""
    tensor, inner_rows, outer, inner = row_layout(logits)
    n_rows, vocab = labels.numel(), logits.shape[-1]
    check_min_logit(min_logit, n_rows, logits)
    acc = acc_dtype(logits.dtype)
    logp = torch.empty(n_rows, dtype=acc, device=logits.device)
    row_max = torch.empty(n_rows, dtype=acc, device=logits.device)
    log_sum = torch.empty(n_rows, dtype=acc, device=logits.device)
    entropy = torch.empty(n_rows if compute_entropy else 0, dtype=acc, device=logits.device)
    if n_rows > 0:
        block, warps = block_config(vocab, logits.device)
        has_threshold = min_logit is not None
        _logprobs_fwd_kernel[(n_rows,)](
            tensor, labels, min_logit if has_threshold else logp, logp, entropy if compute_entropy else logp,
            row_max, log_sum, inner_rows, outer, inner, vocab, *f64_parts(inv_temperature), ignore_index,
            COMPUTE_ENTROPY=compute_entropy, HAS_THRESHOLD=has_threshold, ACC_DTYPE=tl_acc(acc),
            BLOCK_V=block, num_warps=warps,
        )
    return logp, entropy, row_max, log_sum


@on_tensor_device
def backward(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy, out, inv_temperature,
             ignore_index, min_logit=None):
    """Writes the logits gradient into out (the logits themselves or a contiguous
    buffer); min_logit as the forward's."""
    tensor, inner_rows, in_outer, in_inner, out_outer, out_inner = layouts(logits, out)
    n_rows, vocab = labels.numel(), logits.shape[-1]
    check_min_logit(min_logit, n_rows, logits)
    if n_rows == 0:
        return
    block, warps = block_config(vocab, logits.device)
    has_entropy_grad = grad_entropy is not None
    has_threshold = min_logit is not None
    _logprobs_bwd_kernel[(n_rows,)](
        grad_logp, grad_entropy if has_entropy_grad else grad_logp, tensor, labels, row_max, log_sum,
        entropy if has_entropy_grad else log_sum, min_logit if has_threshold else log_sum, out,
        inner_rows, in_outer, in_inner, out_outer, out_inner, vocab, *f64_parts(inv_temperature), ignore_index,
        HAS_ENTROPY_GRAD=has_entropy_grad, HAS_THRESHOLD=has_threshold,
        ACC_DTYPE=tl_acc(logits.dtype),
        BLOCK_V=block, num_warps=warps,
    )


# --- the custom ops rlhf_kernels::logprobs_triton*, the native ops' schemas (fakes, autograd: ops/logprobs.py) ---


@torch.library.custom_op("rlhf_kernels::logprobs_triton", mutates_args=())
def logprobs_op(logits: Tensor, labels: Tensor, temperature: float, ignore_index: int, compute_entropy: bool,
                inplace_backward: bool, min_logit: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if labels.device.type == "cpu":  # the interpreter: as the native CPU op checks
        check_labels_in_range(labels, logits.shape[-1], ignore_index)
    flat = labels.reshape(-1).to(torch.int64).contiguous()
    logp, entropy, row_max, log_sum = forward(logits, flat, 1.0 / temperature, ignore_index, compute_entropy,
                                              min_logit)
    return logp.view(labels.shape), entropy.view(labels.shape) if compute_entropy else entropy, row_max, log_sum


def _backward_into(out, grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy, temperature,
                   ignore_index, min_logit):
    acc = row_max.dtype
    if grad_entropy is not None:
        grad_entropy, entropy = grad_entropy.reshape(-1).to(acc).contiguous(), entropy.reshape(-1)
    backward(grad_logp.reshape(-1).to(acc).contiguous(), grad_entropy, logits,
             labels.reshape(-1).to(torch.int64).contiguous(), row_max, log_sum, entropy, out,
             1.0 / temperature, ignore_index, min_logit)


@torch.library.custom_op("rlhf_kernels::logprobs_triton_backward", mutates_args=())
def logprobs_backward_op(grad_logp: Tensor, grad_entropy: Optional[Tensor], logits: Tensor, labels: Tensor,
                         row_max: Tensor, log_sum: Tensor, entropy: Optional[Tensor], temperature: float,
                         ignore_index: int, min_logit: Optional[Tensor] = None) -> Tensor:
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _backward_into(out, grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy, temperature,
                   ignore_index, min_logit)
    return out


@torch.library.custom_op("rlhf_kernels::logprobs_triton_backward_", mutates_args=("logits",))
def logprobs_backward_inplace_op(grad_logp: Tensor, grad_entropy: Optional[Tensor], logits: Tensor,
                                 labels: Tensor, row_max: Tensor, log_sum: Tensor, entropy: Optional[Tensor],
                                 temperature: float, ignore_index: int, min_logit: Optional[Tensor] = None) -> None:
    if addressable_in_place(logits):
        _backward_into(logits, grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy,
                       temperature, ignore_index, min_logit)
    else:  # a layout the kernels cannot address in place: compute, then copy back
        logits.copy_(logprobs_backward_op(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy,
                                          temperature, ignore_index, min_logit))

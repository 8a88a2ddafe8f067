"""Triton kernels of logprobs_from_logits: one program per row, the online
softmax of _device._row_softmax forward, _device._row_grad backward."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
import triton
import triton.language as tl

from .._launch import acc_dtype, layouts, row_layout
from .._validation import check_labels_in_range
from ._device import _f64, _label_logp, _row_grad, _row_softmax, f64_parts, on_tensor_device, tl_acc


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr, labels_ptr, logp_ptr, entropy_ptr, row_max_ptr, log_sum_ptr,
    inner_rows, outer_stride, inner_stride, vocab, inv_t_hi, inv_t_mid, inv_t_lo, ignore_index,
    COMPUTE_ENTROPY: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # One program per row.
    inv_temperature = _f64(inv_t_hi, inv_t_mid, inv_t_lo, ACC_DTYPE)
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // inner_rows) * outer_stride + (row % inner_rows) * inner_stride
    m, log_s, entropy = _row_softmax(row_ptr, vocab, inv_temperature, ACC_DTYPE, BLOCK_V)
    tl.store(row_max_ptr + row, m)
    tl.store(log_sum_ptr + row, log_s)
    label = tl.load(labels_ptr + row)
    ignored = label == ignore_index
    logp = _label_logp(row_ptr, label, vocab, m, log_s, inv_temperature, ACC_DTYPE)
    tl.store(logp_ptr + row, tl.where(ignored, 0.0, logp))
    if COMPUTE_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(ignored, 0.0, entropy))

@triton.jit
def _logprobs_bwd_kernel(
    grad_logp_ptr, grad_entropy_ptr, logits_ptr, labels_ptr, row_max_ptr, log_sum_ptr, entropy_ptr, grad_ptr,
    inner_rows, in_outer_stride, in_inner_stride, out_outer_stride, out_inner_stride,
    vocab, inv_t_hi, inv_t_mid, inv_t_lo, ignore_index,
    HAS_ENTROPY_GRAD: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
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


@on_tensor_device
def forward(logits, labels, inv_temperature, ignore_index, compute_entropy):
    tensor, inner_rows, outer, inner = row_layout(logits)
    n_rows, vocab = labels.numel(), logits.shape[-1]
    acc = acc_dtype(logits.dtype)
    logp = torch.empty(n_rows, dtype=acc, device=logits.device)
    row_max = torch.empty(n_rows, dtype=acc, device=logits.device)
    log_sum = torch.empty(n_rows, dtype=acc, device=logits.device)
    entropy = torch.empty(n_rows if compute_entropy else 0, dtype=acc, device=logits.device)
    if n_rows > 0:
        block, warps = block_config(vocab, logits.device)
        _logprobs_fwd_kernel[(n_rows,)](
            tensor, labels, logp, entropy if compute_entropy else logp, row_max, log_sum,
            inner_rows, outer, inner, vocab, *f64_parts(inv_temperature), ignore_index,
            COMPUTE_ENTROPY=compute_entropy, ACC_DTYPE=tl_acc(acc),
            BLOCK_V=block, num_warps=warps,
        )
    return logp, entropy, row_max, log_sum


@on_tensor_device
def backward(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy, out, inv_temperature,
             ignore_index):
    tensor, inner_rows, in_outer, in_inner, out_outer, out_inner = layouts(logits, out)
    n_rows, vocab = labels.numel(), logits.shape[-1]
    if n_rows == 0:
        return
    block, warps = block_config(vocab, logits.device)
    has_entropy_grad = grad_entropy is not None
    _logprobs_bwd_kernel[(n_rows,)](
        grad_logp, grad_entropy if has_entropy_grad else grad_logp, tensor, labels, row_max, log_sum,
        entropy if has_entropy_grad else log_sum, out,
        inner_rows, in_outer, in_inner, out_outer, out_inner, vocab, *f64_parts(inv_temperature), ignore_index,
        HAS_ENTROPY_GRAD=has_entropy_grad,
        ACC_DTYPE=tl_acc(logits.dtype),
        BLOCK_V=block, num_warps=warps,
    )


# --- the custom ops rlhf_kernels::logprobs_triton*, the native ops' schemas (fakes, autograd: ops/logprobs.py) ---


@torch.library.custom_op("rlhf_kernels::logprobs_triton", mutates_args=())
def logprobs_op(logits: Tensor, labels: Tensor, temperature: float, ignore_index: int, compute_entropy: bool,
                inplace_backward: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if labels.device.type == "cpu":  # the interpreter: as the native CPU op checks
        check_labels_in_range(labels, logits.shape[-1], ignore_index)
    flat = labels.reshape(-1).to(torch.int64).contiguous()
    logp, entropy, row_max, log_sum = forward(logits, flat, 1.0 / temperature, ignore_index, compute_entropy)
    return logp.view(labels.shape), entropy.view(labels.shape) if compute_entropy else entropy, row_max, log_sum


def _backward_into(out, grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy, temperature,
                   ignore_index):
    acc = row_max.dtype
    if grad_entropy is not None:
        grad_entropy, entropy = grad_entropy.reshape(-1).to(acc).contiguous(), entropy.reshape(-1)
    backward(grad_logp.reshape(-1).to(acc).contiguous(), grad_entropy, logits,
             labels.reshape(-1).to(torch.int64).contiguous(), row_max, log_sum, entropy, out,
             1.0 / temperature, ignore_index)


@torch.library.custom_op("rlhf_kernels::logprobs_triton_backward", mutates_args=())
def logprobs_backward_op(grad_logp: Tensor, grad_entropy: Optional[Tensor], logits: Tensor, labels: Tensor,
                         row_max: Tensor, log_sum: Tensor, entropy: Optional[Tensor], temperature: float,
                         ignore_index: int) -> Tensor:
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _backward_into(out, grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy, temperature,
                   ignore_index)
    return out


@torch.library.custom_op("rlhf_kernels::logprobs_triton_backward_", mutates_args=("logits",))
def logprobs_backward_inplace_op(grad_logp: Tensor, grad_entropy: Optional[Tensor], logits: Tensor,
                                 labels: Tensor, row_max: Tensor, log_sum: Tensor, entropy: Optional[Tensor],
                                 temperature: float, ignore_index: int) -> None:
    if addressable_in_place(logits):
        _backward_into(logits, grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy,
                       temperature, ignore_index)
    else:  # a layout the kernels cannot address in place: compute, then copy back
        logits.copy_(logprobs_backward_op(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy,
                                          temperature, ignore_index))

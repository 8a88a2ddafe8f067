"""logprobs_from_logits: log-probabilities of the sampled tokens, and entropy,
from (..., V) logits in one pass, with a one-pass backward.

Forward: online softmax (Milakov & Gimelshein, 2018) with a third running sum
t = sum exp(x - m) * (x - m), so that lse = m + log s and
entropy = log s - t / s come out of the same single read of the logits.
Backward: d logits = (g * (onehot(label) - p) - g_H * p * (log p + H)) / T,
one read of the logits and one write of the gradient (optionally in place).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .._backend import checks_enabled, f64_parts, on_tensor_device, resolve_backend, triton_installed
from .._validation import FLOAT_DTYPES, INDEX_DTYPES, check_int, check_positive, check_same_device, check_tensor

if triton_installed():
    import triton
    import triton.language as tl
else:  # pragma: no cover - exercised only where Triton is absent
    triton = None

# exp underflows below this; clamping keeps 0 * (-inf) out of the sums.
_MIN_EXP_ARG = tl.constexpr(-87.3) if triton is not None else -87.3


if triton is not None:

    @triton.jit
    def _f64(hi, mid, lo, ACC_DTYPE: tl.constexpr):
        # A float argument from its fp32 parts (_backend.f64_parts): exact in float64.
        zero = tl.zeros((), ACC_DTYPE)
        return (zero + hi) + ((zero + mid) + lo)

    @triton.jit
    def _clamp(x, lo, hi):
        # where-based, to match the C++ (x < lo ? lo : x > hi ? hi : x) bit for bit;
        # keeps NaN (tl.minimum / tl.maximum would drop it).
        return tl.where(x < lo, lo, tl.where(x > hi, hi, x))

    @triton.jit
    def _k3_terms(x):
        # (exp(x) - x - 1, exp(x) - 1) as k3_terms in csrc/include/rlhf_kernels/kl.h:
        # for |x| < 1/2 the series x^2 (1/2! + x/3! + ...), where exp(x) - x - 1
        # would cancel to noise (k3 ~ x^2 / 2 near on-policy); to x^7/9! in
        # float32, to x^14/16! in float64 (truncation below the unit roundoff).
        if x.dtype == tl.float64:
            p = tl.zeros_like(x) + (1.0 / 20922789888000.0)
            p = p * x + (1.0 / 1307674368000.0)
            p = p * x + (1.0 / 87178291200.0)
            p = p * x + (1.0 / 6227020800.0)
            p = p * x + (1.0 / 479001600.0)
            p = p * x + (1.0 / 39916800.0)
            p = p * x + (1.0 / 3628800.0)
            p = p * x + (1.0 / 362880.0)
        else:
            p = tl.zeros_like(x) + (1.0 / 362880.0)
        p = p * x + (1.0 / 40320.0)
        p = p * x + (1.0 / 5040.0)
        p = p * x + (1.0 / 720.0)
        p = p * x + (1.0 / 120.0)
        p = p * x + (1.0 / 24.0)
        p = p * x + (1.0 / 6.0)
        p = p * x + 0.5
        series = x * x * p
        small = (x > -0.5) & (x < 0.5)
        e = tl.exp(x)
        return tl.where(small, series, e - x - 1.0), tl.where(small, x + series, e - 1.0)

    @triton.jit
    def _clamp_exp_arg(y):
        # max(y, _MIN_EXP_ARG), keeping NaN.
        return tl.where(y < _MIN_EXP_ARG, _MIN_EXP_ARG, y)

    @triton.jit
    def _row_softmax(row_ptr, vocab, inv_temperature, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr):
        """One read of a row: online softmax with running (m, s, t) over the raw
        logits x, y = (x - m) * inv_T; returns (m, log s, entropy). logp =
        (x_label - m) * inv_T - log s and lse = m * inv_T + log s. Shifting the raw
        x keeps y <= 0 exactly (no fused multiply-add of x * inv_T - m), so s >= 1
        and logp <= 0, entropy >= 0 at any temperature."""
        # A finite "empty" max keeps the rescale finite when s = 0.
        m = tl.full((), -3.0e38, ACC_DTYPE)
        s = tl.zeros((), ACC_DTYPE)
        t = tl.zeros((), ACC_DTYPE)
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < vocab
            x = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(ACC_DTYPE)
            new_m = tl.maximum(m, tl.max(x, axis=0))
            delta = _clamp_exp_arg((m - new_m) * inv_temperature)
            alpha = tl.exp(delta)
            y = _clamp_exp_arg((x - new_m) * inv_temperature)
            e = tl.where(in_row, tl.exp(y), 0.0)
            t = alpha * (t + delta * s) + tl.sum(e * y, axis=0)
            s = alpha * s + tl.sum(e, axis=0)
            m = new_m
        log_s = tl.log(s)
        log_s = tl.where(log_s < 0.0, 0.0, log_s)  # s >= 1; an approximate log must not say less
        return m, log_s, log_s - t / s

    @triton.jit
    def _label_logp(row_ptr, label, vocab, m, log_s, inv_temperature, ACC_DTYPE: tl.constexpr):
        # An out-of-range label is never read: NaN marks it.
        in_range = (label >= 0) & (label < vocab)
        x_label = tl.load(row_ptr + tl.where(in_range, label, 0)).to(ACC_DTYPE)
        return tl.where(in_range, (x_label - m) * inv_temperature - log_s, float("nan"))

    @triton.jit
    def _row_grad(row_ptr, out_ptr, vocab, label, ignore_index, g, g_entropy, row_entropy, lse,
                  inv_temperature, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr):
        """One read of a row and one write of its gradient:
        d x = inv_T * (g * (onehot - p) - g_H * p * (log p + H))."""
        ignored = label == ignore_index
        bad_label = (label != ignore_index) & ((label < 0) | (label >= vocab))
        g = tl.where(ignored, 0.0, g)
        g_entropy = tl.where(ignored, 0.0, g_entropy)
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < vocab
            x = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(ACC_DTYPE) * inv_temperature
            y = _clamp_exp_arg(x - lse)
            p = tl.exp(y)
            grad = -inv_temperature * p * (g + g_entropy * (y + row_entropy))
            grad = grad + tl.where(cols == label, inv_temperature * g, 0.0)
            grad = tl.where(ignored, 0.0, grad)
            grad = tl.where(bad_label, float("nan"), grad)
            tl.store(out_ptr + cols, grad.to(out_ptr.dtype.element_ty), mask=in_row)

    @triton.jit
    def _logprobs_fwd_kernel(
        logits_ptr, labels_ptr, logp_ptr, entropy_ptr, lse_ptr,
        inner_rows, outer_stride, inner_stride, vocab, inv_t_hi, inv_t_mid, inv_t_lo, ignore_index,
        COMPUTE_ENTROPY: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        # One program per row.
        inv_temperature = _f64(inv_t_hi, inv_t_mid, inv_t_lo, ACC_DTYPE)
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + (row // inner_rows) * outer_stride + (row % inner_rows) * inner_stride
        m, log_s, entropy = _row_softmax(row_ptr, vocab, inv_temperature, ACC_DTYPE, BLOCK_V)
        tl.store(lse_ptr + row, m * inv_temperature + log_s)
        label = tl.load(labels_ptr + row)
        ignored = label == ignore_index
        logp = _label_logp(row_ptr, label, vocab, m, log_s, inv_temperature, ACC_DTYPE)
        tl.store(logp_ptr + row, tl.where(ignored, 0.0, logp))
        if COMPUTE_ENTROPY:
            tl.store(entropy_ptr + row, tl.where(ignored, 0.0, entropy))

    @triton.jit
    def _logprobs_bwd_kernel(
        grad_logp_ptr, grad_entropy_ptr, logits_ptr, labels_ptr, lse_ptr, entropy_ptr, grad_ptr,
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
        lse = tl.load(lse_ptr + row).to(ACC_DTYPE)
        _row_grad(row_ptr, out_ptr, vocab, label, ignore_index, g, g_entropy, row_entropy, lse,
                  inv_temperature, ACC_DTYPE, BLOCK_V)


def _triton_block(vocab: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_V, num_warps). The interpreter favours big blocks (fewer Python
    loop steps); on a GPU 4096-wide chunks keep 16 warps busy on 16-byte loads."""
    if device.type != "cuda":
        return min(triton.next_power_of_2(vocab), 8192), 4
    block = min(triton.next_power_of_2(vocab), 4096)
    return block, (16 if block >= 4096 else max(1, min(8, block // 256)))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_layout(logits: Tensor) -> tuple[Tensor, int, int, int]:
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


def _check_labels_in_range(labels: Tensor, vocab: int, ignore_index: int) -> None:
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(f"labels: value {first} is outside [0, {vocab}) and is not ignore_index")


# --- forward / backward per backend -------------------------------------------------


def _fwd_native(logits, labels, inv_temperature, ignore_index, compute_entropy):
    tensor, inner_rows, outer, inner = _row_layout(logits)
    return torch.ops.rlhf_kernels.logprobs_fwd_native(
        tensor, labels, inner_rows, outer, inner, inv_temperature, ignore_index, compute_entropy
    )


@on_tensor_device
def _fwd_triton(logits, labels, inv_temperature, ignore_index, compute_entropy):
    tensor, inner_rows, outer, inner = _row_layout(logits)
    n_rows, vocab = labels.numel(), logits.shape[-1]
    acc = _acc_dtype(logits.dtype)
    logp = torch.empty(n_rows, dtype=acc, device=logits.device)
    lse = torch.empty(n_rows, dtype=acc, device=logits.device)
    entropy = torch.empty(n_rows if compute_entropy else 0, dtype=acc, device=logits.device)
    if n_rows > 0:
        block, warps = _triton_block(vocab, logits.device)
        _logprobs_fwd_kernel[(n_rows,)](
            tensor, labels, logp, entropy if compute_entropy else logp, lse,
            inner_rows, outer, inner, vocab, *f64_parts(inv_temperature), ignore_index,
            COMPUTE_ENTROPY=compute_entropy, ACC_DTYPE=tl.float64 if acc == torch.float64 else tl.float32,
            BLOCK_V=block, num_warps=warps,
        )
    return logp, entropy, lse


def _fwd_reference(logits, labels, inv_temperature, ignore_index, compute_entropy):
    x = logits.to(_acc_dtype(logits.dtype)).reshape(-1, logits.shape[-1])
    out = reference.logprobs_from_logits(
        x, labels, temperature=1.0 / inv_temperature, ignore_index=ignore_index,
        return_entropy=compute_entropy,
    )
    logp, entropy = out if compute_entropy else (out, x.new_empty(0))
    lse = torch.logsumexp(x * inv_temperature, dim=-1)
    return logp, entropy, lse


_FORWARD = {"cpu": _fwd_native, "cuda": _fwd_native, "triton": _fwd_triton, "reference": _fwd_reference}


def _layouts(logits: Tensor, out: Tensor) -> tuple[Tensor, int, int, int, int, int]:
    """Row layouts of the input and of the gradient buffer, with one inner_rows:
    the buffer is either the logits themselves (in place) or contiguous."""
    tensor, inner_rows, in_outer, in_inner = _row_layout(logits)
    if out is tensor:
        return tensor, inner_rows, in_outer, in_inner, in_outer, in_inner
    assert out.is_contiguous()
    vocab = logits.shape[-1]
    return tensor, inner_rows, in_outer, in_inner, inner_rows * vocab, vocab


def _bwd_native(grad_logp, grad_entropy, logits, labels, lse, entropy, out, inv_temperature, ignore_index):
    tensor, inner_rows, in_outer, in_inner, out_outer, out_inner = _layouts(logits, out)
    torch.ops.rlhf_kernels.logprobs_bwd_native(
        grad_logp, grad_entropy, tensor, labels, lse, entropy, out, inner_rows,
        in_outer, in_inner, out_outer, out_inner, inv_temperature, ignore_index,
    )


@on_tensor_device
def _bwd_triton(grad_logp, grad_entropy, logits, labels, lse, entropy, out, inv_temperature, ignore_index):
    tensor, inner_rows, in_outer, in_inner, out_outer, out_inner = _layouts(logits, out)
    n_rows, vocab = labels.numel(), logits.shape[-1]
    if n_rows == 0:
        return
    block, warps = _triton_block(vocab, logits.device)
    has_entropy_grad = grad_entropy is not None
    _logprobs_bwd_kernel[(n_rows,)](
        grad_logp, grad_entropy if has_entropy_grad else grad_logp, tensor, labels, lse,
        entropy if has_entropy_grad else lse, out,
        inner_rows, in_outer, in_inner, out_outer, out_inner, vocab, *f64_parts(inv_temperature), ignore_index,
        HAS_ENTROPY_GRAD=has_entropy_grad,
        ACC_DTYPE=tl.float64 if logits.dtype == torch.float64 else tl.float32,
        BLOCK_V=block, num_warps=warps,
    )


def _bwd_reference(grad_logp, grad_entropy, logits, labels, lse, entropy, out, inv_temperature, ignore_index):
    grad = reference.logprobs_grad(
        grad_logp, grad_entropy, logits.reshape(-1, logits.shape[-1]), labels,
        temperature=1.0 / inv_temperature, ignore_index=ignore_index,
    )
    out.copy_(grad.view(out.shape))


_BACKWARD = {"cpu": _bwd_native, "cuda": _bwd_native, "triton": _bwd_triton, "reference": _bwd_reference}


def _flat_labels(labels: Tensor) -> Tensor:
    return labels.reshape(-1).to(torch.int64).contiguous()


def _validate_labels(logits: Tensor, labels: Tensor, ignore_index: int) -> None:
    # Always on CPU (no sync involved); on GPU only when RLHF_KERNELS_CHECK=1,
    # since it synchronises. Without it a bad label gives NaN, never a bad read.
    if labels.device.type == "cpu" or checks_enabled():
        _check_labels_in_range(labels, logits.shape[-1], ignore_index)


# --- custom ops ---------------------------------------------------------------------


@torch.library.custom_op("rlhf_kernels::logprobs_fwd", mutates_args=())
def _logprobs_fwd(
    logits: Tensor, labels: Tensor, temperature: float, ignore_index: int,
    compute_entropy: bool, inplace_backward: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    _validate_labels(logits, labels, ignore_index)
    flat = _flat_labels(labels)
    logp, entropy, lse = _FORWARD[backend](logits, flat, 1.0 / temperature, ignore_index, compute_entropy)
    entropy = entropy.view(labels.shape) if compute_entropy else entropy
    return logp.view(labels.shape), entropy, lse


@_logprobs_fwd.register_fake
def _(logits, labels, temperature, ignore_index, compute_entropy, inplace_backward, backend):
    acc = _acc_dtype(logits.dtype)
    logp = logits.new_empty(labels.shape, dtype=acc)
    entropy = logits.new_empty(labels.shape if compute_entropy else (0,), dtype=acc)
    lse = logits.new_empty((labels.numel(),), dtype=acc)
    return logp, entropy, lse


def _backward_args(grad_logp, grad_entropy, labels, lse, entropy):
    acc = lse.dtype
    grad_logp = grad_logp.reshape(-1).to(acc).contiguous()
    if grad_entropy is not None:
        grad_entropy = grad_entropy.reshape(-1).to(acc).contiguous()
        entropy = entropy.reshape(-1)
    return grad_logp, grad_entropy, _flat_labels(labels), entropy


@torch.library.custom_op("rlhf_kernels::logprobs_bwd", mutates_args=())
def _logprobs_bwd(
    grad_logp: Tensor, grad_entropy: Optional[Tensor], logits: Tensor, labels: Tensor,
    lse: Tensor, entropy: Optional[Tensor], temperature: float, ignore_index: int, backend: str,
) -> Tensor:
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    grad_logp, grad_entropy, flat, entropy = _backward_args(grad_logp, grad_entropy, labels, lse, entropy)
    _BACKWARD[backend](grad_logp, grad_entropy, logits, flat, lse, entropy, grad_logits,
                       1.0 / temperature, ignore_index)
    return grad_logits


@_logprobs_bwd.register_fake
def _(grad_logp, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index, backend):
    return logits.new_empty(logits.shape)


@torch.library.custom_op("rlhf_kernels::logprobs_bwd_inplace", mutates_args=("logits",))
def _logprobs_bwd_inplace(
    grad_logp: Tensor, grad_entropy: Optional[Tensor], logits: Tensor, labels: Tensor,
    lse: Tensor, entropy: Optional[Tensor], temperature: float, ignore_index: int, backend: str,
) -> None:
    grad_logp, grad_entropy, flat, entropy = _backward_args(grad_logp, grad_entropy, labels, lse, entropy)
    tensor, *_ = _row_layout(logits)
    if tensor is logits:
        _BACKWARD[backend](grad_logp, grad_entropy, logits, flat, lse, entropy, logits,
                           1.0 / temperature, ignore_index)
    else:  # a layout the kernels cannot address in place: compute, then copy back
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        _BACKWARD[backend](grad_logp, grad_entropy, logits, flat, lse, entropy, grad,
                           1.0 / temperature, ignore_index)
        logits.copy_(grad)


@_logprobs_bwd_inplace.register_fake
def _(grad_logp, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index, backend):
    return None


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, compute_entropy, inplace_backward, backend = inputs
    _, entropy, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, labels, lse, entropy if compute_entropy else None)
    ctx.params = (temperature, ignore_index, compute_entropy, inplace_backward, backend)


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    logits, labels, lse, entropy = ctx.saved_tensors
    temperature, ignore_index, compute_entropy, inplace_backward, backend = ctx.params
    if not ctx.needs_input_grad[0]:
        return (None,) * 7
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    if not compute_entropy:
        grad_entropy = None
    elif grad_entropy is None:
        grad_entropy = torch.zeros_like(lse)
    args = (grad_logp, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index, backend)
    if inplace_backward:
        torch.ops.rlhf_kernels.logprobs_bwd_inplace(*args)
        grad_logits = logits
    else:
        grad_logits = torch.ops.rlhf_kernels.logprobs_bwd(*args)
    return grad_logits, None, None, None, None, None, None


_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


# --- public function ----------------------------------------------------------------


def logprobs_from_logits(
    logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probabilities of ``labels`` under ``softmax(logits / temperature)``.

    ``logp = log_softmax(logits / T)[..., label]`` and, with ``return_entropy``,
    ``entropy = -sum(p * log p)`` for ``p = softmax(logits / T)``. Both are
    differentiable with respect to ``logits``; positions whose label equals
    ``ignore_index`` give 0 and a zero gradient. The forward reads the logits
    once and allocates nothing of size (N, V); the backward writes the logits
    gradient in one pass.

    Args:
        logits: (..., V) float32 | bfloat16 | float16 (float64 for gradcheck);
            any leading shape. Rows may be strided: a slice such as
            ``logits[:, :-1]`` is read in place, not copied.
        labels: (...) int64 | int32, the sampled token ids, in [0, V) or
            ``ignore_index``. On CPU an id out of range raises ValueError; on a
            GPU it gives NaN (never an out-of-bounds read) unless
            ``RLHF_KERNELS_CHECK=1``, which checks and raises (synchronising).
        temperature: > 0, the sampling temperature the logits are divided by.
        ignore_index: label value that marks positions to skip.
        return_entropy: also return the entropy of each position.
        inplace_backward: write the logits gradient into the logits buffer
            instead of a new tensor (saves one (N, V) allocation). The logits
            are consumed: do not use them after backward.
        backend: "triton" | "cuda" | "cpu" | "reference" to force one;
            default: ``RLHF_KERNELS_BACKEND``, else the best for the device.

    Returns:
        logp: (...) float32 (float64 for float64 logits); with
        ``return_entropy``, the tuple (logp, entropy), entropy likewise.
    """
    check_tensor("logits", logits, FLOAT_DTYPES)
    check_tensor("labels", labels, INDEX_DTYPES)
    check_same_device(logits=logits, labels=labels)
    if logits.dim() < 1:
        raise ValueError("logits: expected shape (..., V) with at least one dimension")
    if logits.shape[-1] == 0:
        raise ValueError("logits: the vocabulary dimension V must be > 0")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels: shape {tuple(labels.shape)} does not match logits.shape[:-1] "
            f"{tuple(logits.shape[:-1])}"
        )
    temperature = check_positive("temperature", temperature)
    ignore_index = check_int("ignore_index", ignore_index)
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"ignore_index: must fit in int64, got {ignore_index}")
    chosen = resolve_backend(backend, logits.device, "logprobs")
    logp, entropy, _ = torch.ops.rlhf_kernels.logprobs_fwd(
        logits, labels, temperature, ignore_index, bool(return_entropy),
        bool(inplace_backward), chosen,
    )
    return (logp, entropy) if return_entropy else logp


__all__ = ["logprobs_from_logits"]

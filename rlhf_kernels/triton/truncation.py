"""Triton kernel of truncation_threshold: per row, the raw-logit threshold t
whose kept set {x >= t} is a top-k / top-p / min-p sampler's (ops/truncation.py
states the semantics), by exact bisection over the order-preserving integer
keys of the values; and the custom op rlhf_kernels::truncation_threshold_triton
with its fake."""

from __future__ import annotations

import math

import torch
from torch import Tensor
import triton
import triton.language as tl

from .._launch import acc_dtype, row_layout
from .._validation import FLOAT_DTYPES
from ._device import _f64, f64_parts, on_tensor_device, tl_acc
from . import logprobs as _logprobs


@triton.jit
def _order_key(x):
    # The float's bits as a signed integer of its width, the magnitude bits
    # flipped for negative values: a < b as floats iff key(a) < key(b) as
    # integers (non-NaN). -0.0 is keyed as +0.0, to which it compares equal.
    x = tl.where(x == 0.0, 0.0, x)
    if x.dtype == tl.float64:
        bits = x.to(tl.int64, bitcast=True)
        return bits ^ ((bits >> 63) & 0x7FFFFFFFFFFFFFFF)
    else:
        bits = x.to(tl.int32, bitcast=True)
        return bits ^ ((bits >> 31) & 0x7FFFFFFF)

@triton.jit
def _as_key(k, ACC_DTYPE: tl.constexpr):
    # An int64 holding a key (or a midpoint of two) as the key type of ACC_DTYPE values, which it fits.
    if ACC_DTYPE == tl.float64:
        return k.to(tl.int64)
    else:
        return k.to(tl.int32)

@triton.jit
def _key_value(key, ACC_DTYPE: tl.constexpr):
    # The inverse of _order_key: the flip depends on the sign bit alone, which it keeps.
    k = _as_key(key, ACC_DTYPE)
    if ACC_DTYPE == tl.float64:
        return (k ^ ((k >> 63) & 0x7FFFFFFFFFFFFFFF)).to(tl.float64, bitcast=True)
    else:
        return (k ^ ((k >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)

@triton.jit
def _at_or_above(row_ptr, vocab, key_min, m, inv_temperature, MASS: tl.constexpr, ACC_DTYPE: tl.constexpr,
                 BLOCK_V: tl.constexpr):
    # One read of the row: over its elements with key >= key_min, their count
    # (MASS False) or their mass sum exp((x - m) * inv_T) (MASS True).
    if MASS:
        total = tl.zeros((), ACC_DTYPE)
    else:
        total = tl.zeros((), tl.int32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < vocab
        x = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(ACC_DTYPE)
        selected = in_row & (_order_key(x) >= key_min)
        if MASS:
            total += tl.sum(tl.where(selected, tl.exp((x - m) * inv_temperature), 0.0), axis=0)
        else:
            total += tl.sum(selected.to(tl.int32), axis=0)
    return total

@triton.jit
def _largest_key(row_ptr, vocab, lo, hi, target, m, inv_temperature, MASS: tl.constexpr, ACC_DTYPE: tl.constexpr,
                 BLOCK_V: tl.constexpr):
    # The largest key t in [lo, hi) with _at_or_above(t) >= target, lo if none
    # (lo, hi int64). Bisection on the key range: ceil(log2(hi - lo)) reads of
    # the row, at most the key width (32; 64 for float64). The midpoint avoids
    # hi - lo, which overflows int64 for float64 keys of both signs.
    while lo + 1 < hi:
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)
        reached = _at_or_above(row_ptr, vocab, _as_key(mid, ACC_DTYPE), m, inv_temperature, MASS, ACC_DTYPE,
                               BLOCK_V) >= target
        lo = tl.where(reached, mid, lo)
        hi = tl.where(reached, hi, mid)
    return lo

@triton.jit
def _truncation_threshold_kernel(
    logits_ptr, threshold_ptr, inner_rows, outer_stride, inner_stride, vocab,
    inv_t_hi, inv_t_mid, inv_t_lo, min_p_shift_hi, min_p_shift_mid, min_p_shift_lo, top_p_hi, top_p_mid, top_p_lo,
    top_k, min_p_first, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per row, never more than a tile of it in registers:
    t_m = m + T log min_p (min_p_shift = T log min_p; -inf: off), t_k the k-th
    largest of the current set (0 < top_k < |set|), t_p the largest value v of
    the current set C with mass(x >= v within C) >= top_p * Z_C (top_p < 1),
    each step's set the elements >= the thresholds before it; min_p first
    (vLLM) or last (HF). The threshold is max(t_m, t_k, t_p) (-inf: nothing
    cut), NaN for a row holding a NaN. Both selections are exact: bisection on
    the key of the value, over [key(current bound), key(m)].
    Reads of the row (passes), float32 keys: 1 (max, NaN count); top-k: 1
    (size of the min-p set, vLLM order with min-p only) + at most 32 counting
    passes; top-p: 1 (Z_C) + at most 32 mass passes (an exp per element each).
    At most 67 in all; float64 keys, at most 64 passes per selection."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // inner_rows) * outer_stride + (row % inner_rows) * inner_stride
    inv_temperature = _f64(inv_t_hi, inv_t_mid, inv_t_lo, ACC_DTYPE)
    min_p_shift = _f64(min_p_shift_hi, min_p_shift_mid, min_p_shift_lo, ACC_DTYPE)
    top_p = _f64(top_p_hi, top_p_mid, top_p_lo, ACC_DTYPE)

    m = tl.full((), float("-inf"), ACC_DTYPE)
    n_nan = tl.zeros((), tl.int32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < vocab
        x = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(ACC_DTYPE)
        n_nan += tl.sum((x != x).to(tl.int32), axis=0)
        m = tl.maximum(m, tl.max(tl.where(x != x, float("-inf"), x), axis=0))

    t_m = m + min_p_shift
    bound = tl.full((), float("-inf"), ACC_DTYPE)  # the current set: x >= bound
    if n_nan == 0:
        if min_p_first:
            bound = tl.maximum(bound, t_m)
        hi = _order_key(m).to(tl.int64) + 1
        if top_k > 0:
            n_set = tl.zeros((), tl.int32) + vocab
            if bound != float("-inf"):  # the min-p set (vLLM order)
                n_set = _at_or_above(row_ptr, vocab, _order_key(bound), m, inv_temperature, False, ACC_DTYPE,
                                     BLOCK_V)
            if top_k < n_set:
                t_k = _largest_key(row_ptr, vocab, _order_key(bound).to(tl.int64), hi, top_k, m, inv_temperature,
                                   False, ACC_DTYPE, BLOCK_V)
                bound = tl.maximum(bound, _key_value(t_k, ACC_DTYPE))
        if top_p < 1.0:
            # Z_C by the bisection's own f(lo) (same pass, same rounding): f(lo) >= top_p * Z_C holds exactly.
            z = _at_or_above(row_ptr, vocab, _order_key(bound), m, inv_temperature, True, ACC_DTYPE, BLOCK_V)
            t_p = _largest_key(row_ptr, vocab, _order_key(bound).to(tl.int64), hi, top_p * z, m, inv_temperature,
                               True, ACC_DTYPE, BLOCK_V)
            bound = tl.maximum(bound, _key_value(t_p, ACC_DTYPE))
    threshold = tl.maximum(bound, t_m)
    tl.store(threshold_ptr + row, tl.where(n_nan > 0, float("nan"), threshold))


def _check_args(logits: Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> None:
    if not isinstance(logits, Tensor) or logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"logits: expected a float32, bfloat16, float16 or float64 tensor, got "
                         f"{getattr(logits, 'dtype', type(logits).__name__)}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError("logits: expected shape (..., V) with V >= 1")
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k: must be >= 0 (0: off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: must be in (0, 1] (1: off), got {top_p}")
    if not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p: must be in [0, 1] (0: off), got {min_p}")


@on_tensor_device
def threshold(logits: Tensor, temperature: float, top_k: int, top_p: float, min_p: float,
              min_p_first: bool) -> Tensor:
    """(N,) thresholds (accumulation dtype) of the rows of (..., V) logits."""
    tensor, inner_rows, outer, inner = row_layout(logits)
    vocab = logits.shape[-1]
    n_rows = logits.numel() // vocab
    out = torch.empty(n_rows, dtype=acc_dtype(logits.dtype), device=logits.device)
    if n_rows > 0:
        block, warps = _logprobs.block_config(vocab, logits.device)
        min_p_shift = temperature * math.log(min_p) if min_p > 0 else -math.inf
        _truncation_threshold_kernel[(n_rows,)](
            tensor, out, inner_rows, outer, inner, vocab,
            *f64_parts(1.0 / temperature), *f64_parts(min_p_shift), *f64_parts(top_p),
            top_k if top_k < vocab else 0, bool(min_p_first),
            ACC_DTYPE=tl_acc(logits.dtype), BLOCK_V=block, num_warps=warps,
        )
    return out


@torch.library.custom_op("rlhf_kernels::truncation_threshold_triton", mutates_args=())
def truncation_threshold_op(logits: Tensor, temperature: float, top_k: int, top_p: float, min_p: float,
                            min_p_first: bool) -> Tensor:
    _check_args(logits, temperature, top_k, top_p, min_p)
    return threshold(logits, temperature, top_k, top_p, min_p, min_p_first)


@truncation_threshold_op.register_fake
def _(logits, temperature, top_k, top_p, min_p, min_p_first):
    _check_args(logits, temperature, top_k, top_p, min_p)
    return logits.new_empty((logits.numel() // logits.shape[-1],), dtype=acc_dtype(logits.dtype))

"""Triton kernel of rollout_correction (one program per sequence, the two
sweeps of csrc/include/rlhf_kernels/rollout_correction_math.h), its launcher
and the custom op ``rlhf_kernels::rollout_correction_triton`` with the native
op's schema."""

from __future__ import annotations

import torch
from torch import Tensor
import triton
import triton.language as tl

from ._device import _clamp, on_tensor_device, tl_acc

_STAT_COLUMNS = 9
_SAFETY_BOUND = tl.constexpr(20.0)


@triton.jit
def _estimate(lr_safe, est):
    # k1, k2 or k3 (est 0, 1, 2) of the clamped log-ratio.
    return tl.where(est == 0, -lr_safe,
                    tl.where(est == 1, 0.5 * lr_safe * lr_safe, tl.exp(lr_safe) - 1.0 - lr_safe))


@triton.jit
def _load_chunk(logp_ptr, rollout_ptr, mask_ptr, offs, inside, ACC_DTYPE: tl.constexpr):
    # One chunk of a sequence: both log-probs and the mask value, in ACC_DTYPE.
    x = tl.load(logp_ptr + offs, mask=inside, other=0.0).to(ACC_DTYPE)
    y = tl.load(rollout_ptr + offs, mask=inside, other=0.0).to(ACC_DTYPE)
    w = tl.load(mask_ptr + offs, mask=inside, other=0).to(ACC_DTYPE)
    return x, y, w


@triton.jit
def _rollout_correction_kernel(
    logp_ptr, rollout_ptr, mask_ptr, weights_ptr, keep_ptr, stats_ptr, params_ptr, seq_len, level, mode,
    NUM_RULES: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * seq_len
    lanes = tl.arange(0, BLOCK)
    zero = tl.zeros((BLOCK,), ACC_DTYPE)
    n, sum_lr, sum_abs = zero, zero, zero
    s1, s2, s3 = zero, zero, zero
    m_abs = zero
    m1, m2, m3 = zero - float("inf"), zero - float("inf"), zero - float("inf")
    nan_abs, nan1, nan2, nan3 = zero, zero, zero, zero
    # Sweep 1: the sequence's sums.
    for start in range(0, seq_len, BLOCK):
        offs = start + lanes
        inside = offs < seq_len
        x, y, w = _load_chunk(logp_ptr, rollout_ptr, mask_ptr, base + offs, inside, ACC_DTYPE)
        valid = w != 0.0
        lr = tl.where(valid, x - y, 0.0)
        lr_safe = _clamp(lr, -_SAFETY_BOUND, _SAFETY_BOUND)
        k1 = -lr_safe
        k2 = 0.5 * lr_safe * lr_safe
        k3 = tl.exp(lr_safe) - 1.0 - lr_safe
        a = tl.abs(lr)
        n += w
        sum_lr += w * lr
        sum_abs += w * a
        s1 += w * k1
        s2 += w * k2
        s3 += w * k3
        m_abs = tl.maximum(m_abs, tl.where(valid, a, 0.0))
        m1 = tl.maximum(m1, tl.where(valid, k1, float("-inf")))
        m2 = tl.maximum(m2, tl.where(valid, k2, float("-inf")))
        m3 = tl.maximum(m3, tl.where(valid, k3, float("-inf")))
        nan_abs += tl.where(valid & (a != a), 1.0, 0.0)
        nan1 += tl.where(valid & (k1 != k1), 1.0, 0.0)
        nan2 += tl.where(valid & (k2 != k2), 1.0, 0.0)
        nan3 += tl.where(valid & (k3 != k3), 1.0, 0.0)
    n_all = tl.sum(n, axis=0)
    any_valid = tl.sum(tl.where(n != 0.0, 1, 0), axis=0) > 0
    lr_all = tl.sum(sum_lr, axis=0)
    sums1, sums2, sums3 = tl.sum(s1, axis=0), tl.sum(s2, axis=0), tl.sum(s3, axis=0)
    max_abs = tl.where(tl.sum(nan_abs, axis=0) > 0, float("nan"), tl.max(m_abs, axis=0))
    max1 = tl.where(tl.sum(nan1, axis=0) > 0, float("nan"), tl.max(m1, axis=0))
    max2 = tl.where(tl.sum(nan2, axis=0) > 0, float("nan"), tl.max(m2, axis=0))
    max3 = tl.where(tl.sum(nan3, axis=0) > 0, float("nan"), tl.max(m3, axis=0))
    # params: lower, upper, then (kind, lo, hi) per rule, float64 (exact bounds in float64 kernels).
    seq_keep = n_all >= 0.0  # True: n is a sum of weights >= 0
    for r in tl.static_range(NUM_RULES):
        kind = tl.load(params_ptr + 2 + 3 * r).to(tl.int32)
        lo = tl.load(params_ptr + 3 + 3 * r).to(ACC_DTYPE)
        hi = tl.load(params_ptr + 4 + 3 * r).to(ACC_DTYPE)
        agg = kind // 3
        est = kind % 3
        total = tl.where(est == 0, sums1, tl.where(est == 1, sums2, sums3))
        top = tl.where(est == 0, max1, tl.where(est == 1, max2, max3))
        mean = tl.where(n_all > 0.0, total / tl.where(n_all > 0.0, n_all, 1.0), 0.0)
        v = tl.where(agg == 1, total, tl.where(agg == 2, mean, tl.where(any_valid, top, 0.0)))
        seq_keep = seq_keep & ((agg == 0) | ((v >= lo) & (v <= hi)))
    seq_log_weight = tl.where(level == 1, lr_all,
                              tl.where(n_all > 0.0, lr_all / tl.where(n_all > 0.0, n_all, 1.0), 0.0))
    lower_acc = tl.load(params_ptr).to(ACC_DTYPE)
    upper_acc = tl.load(params_ptr + 1).to(ACC_DTYPE)
    sum_weight, sum_oob, sum_rej, any_rej = zero, zero, zero, zero
    # Sweep 2: each token's weight and verdict.
    for start in range(0, seq_len, BLOCK):
        offs = start + lanes
        inside = offs < seq_len
        x, y, w = _load_chunk(logp_ptr, rollout_ptr, mask_ptr, base + offs, inside, ACC_DTYPE)
        valid = w != 0.0
        lr = x - y
        lr_safe = _clamp(lr, -_SAFETY_BOUND, _SAFETY_BOUND)
        raw = tl.exp(_clamp(tl.where(level == 0, lr, seq_log_weight), -_SAFETY_BOUND, _SAFETY_BOUND))
        oob = (raw < lower_acc) | (raw > upper_acc)
        truncated = tl.where(raw < lower_acc, lower_acc, tl.where(raw > upper_acc, upper_acc, raw))
        weight = tl.where(mode == 0, 1.0, tl.where(mode == 1, truncated, tl.where(oob, 0.0, raw)))
        weight = tl.where(valid, weight, 0.0)
        keep = tl.where(seq_keep, valid, False)
        for r in tl.static_range(NUM_RULES):
            kind = tl.load(params_ptr + 2 + 3 * r).to(tl.int32)
            lo = tl.load(params_ptr + 3 + 3 * r).to(ACC_DTYPE)
            hi = tl.load(params_ptr + 4 + 3 * r).to(ACC_DTYPE)
            k = _estimate(lr_safe, kind % 3)
            keep = keep & ((kind // 3 != 0) | ((k >= lo) & (k <= hi)))
        tl.store(weights_ptr + base + offs, weight, mask=inside)
        tl.store(keep_ptr + base + offs, keep.to(tl.int8), mask=inside)
        sum_weight += w * weight
        sum_oob += tl.where(valid & oob, w, 0.0)
        rejected = valid & (keep == 0)
        sum_rej += tl.where(rejected, w, 0.0)
        any_rej += tl.where(rejected, 1.0, 0.0)
    out = stats_ptr + row * 9
    tl.store(out + 0, n_all)
    tl.store(out + 1, sums1)
    tl.store(out + 2, sums3)
    tl.store(out + 3, tl.sum(sum_abs, axis=0))
    tl.store(out + 4, max_abs)
    tl.store(out + 5, tl.sum(sum_weight, axis=0))
    tl.store(out + 6, tl.sum(sum_oob, axis=0))
    tl.store(out + 7, tl.sum(sum_rej, axis=0))
    tl.store(out + 8, tl.where(tl.sum(any_rej, axis=0) > 0, 1.0, 0.0).to(ACC_DTYPE))


@on_tensor_device
def rollout_correction(logp: Tensor, rollout_logp: Tensor, mask: Tensor, level: int, mode: int, lower: float,
                       upper: float, rule_kinds: list[int], rule_lo: list[float], rule_hi: list[float]):
    acc = torch.float64 if logp.dtype == torch.float64 else torch.float32
    logp, rollout_logp, mask = logp.contiguous(), rollout_logp.contiguous(), mask.contiguous()
    num_seqs, seq_len = logp.shape
    weights = torch.empty(logp.shape, dtype=acc, device=logp.device)
    keep = torch.empty(logp.shape, dtype=torch.bool, device=logp.device)
    stats = torch.empty((num_seqs, _STAT_COLUMNS), dtype=acc, device=logp.device)
    params = torch.tensor([lower, upper] + [v for r in zip(rule_kinds, rule_lo, rule_hi) for v in r],
                          dtype=torch.float64, device=logp.device)
    if num_seqs > 0:
        block = min(max(triton.next_power_of_2(max(seq_len, 1)), 16), 1024)
        # keep is written as int8 into the bool buffer (one byte each).
        _rollout_correction_kernel[(num_seqs,)](
            logp, rollout_logp, mask, weights, keep.view(torch.int8), stats, params, seq_len, level, mode,
            NUM_RULES=len(rule_kinds), ACC_DTYPE=tl_acc(logp.dtype), BLOCK=block,
            num_warps=4 if block <= 512 else 8,
        )
    return weights, keep, stats


@torch.library.custom_op("rlhf_kernels::rollout_correction_triton", mutates_args=())
def rollout_correction_op(logp: Tensor, rollout_logp: Tensor, mask: Tensor, level: int, mode: int, lower: float,
                          upper: float, rule_kinds: list[int], rule_lo: list[float],
                          rule_hi: list[float]) -> tuple[Tensor, Tensor, Tensor]:
    return rollout_correction(logp, rollout_logp, mask, level, mode, lower, upper, rule_kinds, rule_lo, rule_hi)

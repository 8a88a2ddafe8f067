"""Triton kernels of the KL penalty and of the fused shaping + GAE scan
(see rlhf_kernels/ops/advantages.py for the recurrence), their launchers and
the custom ops ``rlhf_kernels::*_triton`` with the native ops' schemas."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
import triton
import triton.language as tl

from .._launch import acc_dtype
from ._device import _f64, _kl_terms, f64_parts, on_tensor_device, tl_acc

_N_STATS = 4  # per sequence: valid count, sum A, sum A^2, sum kl


@triton.jit
def _kl_fwd_kernel(logp_ptr, ref_ptr, kl_ptr, n, ESTIMATOR: tl.constexpr,
                   ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    logp = tl.load(logp_ptr + offs, mask=inside, other=0.0).to(ACC_DTYPE)
    ref = tl.load(ref_ptr + offs, mask=inside, other=0.0).to(ACC_DTYPE)
    kl, _ = _kl_terms(logp, ref, ESTIMATOR)
    tl.store(kl_ptr + offs, kl, mask=inside)

@triton.jit
def _kl_bwd_kernel(grad_ptr, logp_ptr, ref_ptr, grad_logp_ptr, grad_ref_ptr, n,
                   ESTIMATOR: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    # d kl / d logp; d kl / d ref is its negative.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    g = tl.load(grad_ptr + offs, mask=inside, other=0.0).to(ACC_DTYPE)
    logp = tl.load(logp_ptr + offs, mask=inside, other=0.0).to(ACC_DTYPE)
    ref = tl.load(ref_ptr + offs, mask=inside, other=0.0).to(ACC_DTYPE)
    _, dk = _kl_terms(logp, ref, ESTIMATOR)
    out = g * dk
    ty = grad_logp_ptr.dtype.element_ty
    tl.store(grad_logp_ptr + offs, out.to(ty), mask=inside)
    tl.store(grad_ref_ptr + offs, (-out).to(ty), mask=inside)

@triton.jit
def _affine_combine(a1, b1, a2, b2):
    # Scanning in order of decreasing time: the later map (a2, b2) applies after.
    return a1 * a2, a2 * b1 + b2

@triton.jit
def _token_reward(pos, valid, seq, last, rewards_ptr, scores_ptr, logp_ptr, ref_ptr, kl_coef,
                  SHAPING: tl.constexpr, ESTIMATOR: tl.constexpr, ACC_DTYPE: tl.constexpr):
    if SHAPING:
        logp = tl.load(logp_ptr + pos, mask=valid, other=0.0).to(ACC_DTYPE)
        ref = tl.load(ref_ptr + pos, mask=valid, other=0.0).to(ACC_DTYPE)
        kl, _ = _kl_terms(logp, ref, ESTIMATOR)
        kl = tl.where(valid, kl, 0.0)
        score = tl.load(scores_ptr + seq).to(ACC_DTYPE)
        reward = tl.where(valid, -kl_coef * kl + tl.where(pos == last, score, 0.0), 0.0)
    else:
        reward = tl.load(rewards_ptr + pos, mask=valid, other=0.0).to(ACC_DTYPE)
        kl = reward
    return reward, kl

@triton.jit
def _advantages_kernel(
    values_ptr, mask_ptr, cu_ptr, rewards_ptr, scores_ptr, logp_ptr, ref_ptr, kl_scale_ptr,
    adv_ptr, ret_ptr, rewards_out_ptr, kl_out_ptr, stats_ptr,
    seq_len, total, kl_coef_hi, kl_coef_mid, kl_coef_lo, gamma_hi, gamma_mid, gamma_lo,
    lam_hi, lam_mid, lam_lo,
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, SHAPING: tl.constexpr, HAS_KL_SCALE: tl.constexpr,
    ESTIMATOR: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per sequence; chunks of BLOCK positions from the end, each
    # loaded in decreasing time order so that a forward associative_scan is
    # the reverse-time scan of W_t = a_t * W_{t+1} + b_t (module docstring).
    seq = tl.program_id(0)
    if PACKED:
        # Clamped: a bad cu_seqlens on a GPU (unchecked) never reads out of bounds.
        start = tl.minimum(tl.maximum(tl.load(cu_ptr + seq).to(tl.int64), 0), total)
        end = tl.minimum(tl.maximum(tl.load(cu_ptr + seq + 1).to(tl.int64), start), total)
    else:
        start = seq.to(tl.int64) * seq_len
        end = start + seq_len
    ks = tl.arange(0, BLOCK)
    # Python floats reach a kernel as fp32: three fp32 parts (_device.f64_parts)
    # keep float64 inputs exact.
    gamma = _f64(gamma_hi, gamma_mid, gamma_lo, ACC_DTYPE)
    lam = _f64(lam_hi, lam_mid, lam_lo, ACC_DTYPE)
    kl_coef = _f64(kl_coef_hi, kl_coef_mid, kl_coef_lo, ACC_DTYPE)
    gamma_lam = gamma * lam
    if HAS_KL_SCALE:
        kl_coef = kl_coef * tl.load(kl_scale_ptr)
    last = end - 1
    if SHAPING and HAS_MASK:
        last = start - 1
        for chunk_start in range(start, end, BLOCK):
            pos = chunk_start + ks
            valid = (pos < end) & (tl.load(mask_ptr + pos, mask=pos < end, other=0) != 0)
            last = tl.maximum(last, tl.max(tl.where(valid, pos, start - 1), axis=0))
    carry = tl.zeros((), ACC_DTYPE)
    count = tl.zeros((), tl.float64)
    adv_sum = tl.zeros((), tl.float64)
    adv_sq = tl.zeros((), tl.float64)
    kl_sum = tl.zeros((), tl.float64)
    n_chunks = tl.cdiv(end - start, BLOCK)
    for chunk in range(0, n_chunks):
        pos = end - 1 - chunk * BLOCK - ks
        inside = pos >= start
        nxt = pos + 1
        nxt_inside = inside & (nxt < end)
        if HAS_MASK:
            valid = inside & (tl.load(mask_ptr + pos, mask=inside, other=0) != 0)
            nxt_valid = nxt_inside & (tl.load(mask_ptr + nxt, mask=nxt_inside, other=0) != 0)
        else:
            valid = inside
            nxt_valid = nxt_inside
        value = tl.load(values_ptr + pos, mask=valid, other=0.0).to(ACC_DTYPE)
        reward, kl = _token_reward(pos, valid, seq, last, rewards_ptr, scores_ptr, logp_ptr,
                                   ref_ptr, kl_coef, SHAPING, ESTIMATOR, ACC_DTYPE)
        nxt_value = tl.load(values_ptr + nxt, mask=nxt_valid, other=0.0).to(ACC_DTYPE)
        nxt_reward, _ = _token_reward(nxt, nxt_valid, seq, last, rewards_ptr, scores_ptr,
                                      logp_ptr, ref_ptr, kl_coef, SHAPING, ESTIMATOR, ACC_DTYPE)
        a = tl.where(nxt_valid, gamma_lam, 1.0).to(ACC_DTYPE)
        b = tl.where(nxt_valid, gamma_lam * (nxt_reward - nxt_value) + gamma * nxt_value, 0.0)
        b = b.to(ACC_DTYPE)
        scan_a, scan_b = tl.associative_scan((a, b), 0, _affine_combine)
        w_next = scan_a * carry + scan_b  # W_{t+1}
        adv = tl.where(valid, reward - value + w_next, 0.0).to(ACC_DTYPE)
        ret = tl.where(valid, adv + value, 0.0).to(ACC_DTYPE)
        tl.store(adv_ptr + pos, adv, mask=inside)
        tl.store(ret_ptr + pos, ret, mask=inside)
        if SHAPING:
            tl.store(rewards_out_ptr + pos, reward, mask=inside)
            tl.store(kl_out_ptr + pos, kl, mask=inside)
            kl_sum += tl.sum(kl.to(tl.float64), axis=0)
        carry = tl.sum(tl.where(ks == BLOCK - 1, w_next, 0.0), axis=0).to(ACC_DTYPE)
        count += tl.sum(valid.to(tl.float64), axis=0)
        adv64 = adv.to(tl.float64)
        adv_sum += tl.sum(adv64, axis=0)
        adv_sq += tl.sum(adv64 * adv64, axis=0)
    tl.store(stats_ptr + seq * 4 + 0, count)
    tl.store(stats_ptr + seq * 4 + 1, adv_sum)
    tl.store(stats_ptr + seq * 4 + 2, adv_sq)
    tl.store(stats_ptr + seq * 4 + 3, kl_sum)


def elem_block(device: torch.device) -> int:
    # The interpreter favours big blocks (fewer Python steps).
    return 4096 if device.type != "cuda" else 1024


@on_tensor_device
def kl_forward(logp, ref_logp, estimator):
    kl = torch.empty(logp.shape, dtype=acc_dtype(logp.dtype), device=logp.device)
    n = logp.numel()
    if n > 0:
        block = elem_block(logp.device)
        _kl_fwd_kernel[(triton.cdiv(n, block),)](
            logp, ref_logp, kl, n, ESTIMATOR=estimator, ACC_DTYPE=tl_acc(logp.dtype), BLOCK=block
        )
    return kl


@on_tensor_device
def kl_backward(grad, logp, ref_logp, estimator):
    grad_logp = torch.empty_like(logp)
    grad_ref = torch.empty_like(ref_logp)
    n = logp.numel()
    if n > 0:
        block = elem_block(logp.device)
        _kl_bwd_kernel[(triton.cdiv(n, block),)](
            grad, logp, ref_logp, grad_logp, grad_ref, n,
            ESTIMATOR=estimator, ACC_DTYPE=tl_acc(logp.dtype), BLOCK=block,
        )
    return grad_logp, grad_ref


@on_tensor_device
def advantages(values, mask, cu_seqlens, token_rewards, scores, logp, ref_logp, kl_coef_scale, kl_coef,
                estimator, gamma, lam):
    acc = acc_dtype(values.dtype)
    device = values.device
    shaping = token_rewards is None
    num_seqs = values.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    seq_len = values.shape[1] if cu_seqlens is None else 0
    advantages = torch.empty(values.shape, dtype=acc, device=device)
    returns = torch.empty(values.shape, dtype=acc, device=device)
    rewards_out = torch.empty(values.shape if shaping else (0,), dtype=acc, device=device)
    kl_out = torch.empty(values.shape if shaping else (0,), dtype=acc, device=device)
    stats = torch.empty((num_seqs, _N_STATS), dtype=torch.float64, device=device)
    if num_seqs > 0:
        longest = seq_len if cu_seqlens is None else values.numel()
        block = max(16, min(1024, triton.next_power_of_2(max(longest, 1))))
        mask_u8 = mask.view(torch.uint8) if mask is not None else values
        dummy = values
        _advantages_kernel[(num_seqs,)](
            values, mask_u8, cu_seqlens if cu_seqlens is not None else stats,
            token_rewards if token_rewards is not None else dummy,
            scores if scores is not None else stats, logp if logp is not None else dummy,
            ref_logp if ref_logp is not None else dummy,
            kl_coef_scale if kl_coef_scale is not None else stats,
            advantages, returns, rewards_out if shaping else advantages, kl_out if shaping else advantages,
            stats, seq_len, values.numel(), *f64_parts(kl_coef), *f64_parts(gamma), *f64_parts(lam),
            PACKED=cu_seqlens is not None, HAS_MASK=mask is not None, SHAPING=shaping,
            HAS_KL_SCALE=kl_coef_scale is not None,
            ESTIMATOR=estimator, ACC_DTYPE=tl_acc(values.dtype), BLOCK=block,
            num_warps=4 if block <= 512 else 8,
        )
    return advantages, returns, rewards_out, kl_out, stats


@torch.library.custom_op("rlhf_kernels::kl_penalty_triton", mutates_args=())
def kl_penalty_op(logp: Tensor, ref_logp: Tensor, estimator: int) -> Tensor:
    return kl_forward(logp.contiguous(), ref_logp.contiguous(), estimator)


@torch.library.custom_op("rlhf_kernels::kl_penalty_triton_backward", mutates_args=())
def kl_penalty_backward_op(grad: Tensor, logp: Tensor, ref_logp: Tensor, estimator: int) -> tuple[Tensor, Tensor]:
    return kl_backward(grad.to(acc_dtype(logp.dtype)).contiguous(), logp.contiguous(), ref_logp.contiguous(),
                       estimator)


@torch.library.custom_op("rlhf_kernels::advantages_triton", mutates_args=())
def advantages_op(
    values: Tensor, mask: Optional[Tensor], cu_seqlens: Optional[Tensor], token_rewards: Optional[Tensor],
    scores: Optional[Tensor], logp: Optional[Tensor], ref_logp: Optional[Tensor],
    kl_coef_scale: Optional[Tensor], kl_coef: float, estimator: int, gamma: float, lam: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return advantages(values, mask, cu_seqlens, token_rewards, scores, logp, ref_logp, kl_coef_scale,
                      kl_coef, estimator, gamma, lam)

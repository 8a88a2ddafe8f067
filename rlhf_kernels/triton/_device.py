"""Jitted building blocks shared by the Triton kernels (the Triton twin of
csrc/include/rlhf_kernels/*.h), and the host helpers of their launchers."""

from __future__ import annotations

import functools
import struct

import torch
import triton
import triton.language as tl

# exp underflows below this; clamping keeps 0 * (-inf) out of the sums.
_MIN_EXP_ARG = tl.constexpr(-87.3)


def tl_acc(dtype: torch.dtype):
    """The accumulation dtype of a kernel over `dtype` inputs."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def f64_parts(x: float) -> tuple[float, float, float]:
    """x as three fp32 values with hi + (mid + lo) == x exactly in float64.

    A compiled Triton kernel receives every Python float as fp32; float64
    kernels rebuild their scalar arguments from these parts (an fp32 pair is
    not enough: its low part is itself rounded to fp32). Beyond the fp32
    range x comes back as an infinity (hi = +-inf, mid = lo = 0), never NaN."""

    def f32(v: float) -> float:
        return struct.unpack("f", struct.pack("f", v))[0]

    x = float(x)
    hi = f32(x)
    if hi in (float("inf"), float("-inf")):  # beyond the fp32 range (or infinite): infinite
        return hi, 0.0, 0.0
    mid = f32(x - hi)
    return hi, mid, f32(x - hi - mid)


def on_tensor_device(fn):
    """Run a Triton launcher with its first tensor argument's GPU as the current
    device (Triton launches on the current device, which need not be the
    tensors' one)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is None or first.device.type != "cuda":
            return fn(*args, **kwargs)
        with torch.cuda.device(first.device):
            return fn(*args, **kwargs)

    return wrapper


@triton.jit
def _f64(hi, mid, lo, ACC_DTYPE: tl.constexpr):
    # A float argument from its fp32 parts (_device.f64_parts): exact in float64.
    zero = tl.zeros((), ACC_DTYPE)
    return (zero + hi) + ((zero + mid) + lo)

@triton.jit
def _clamp(x, lo, hi):
    # where-based, to match the C++ (x < lo ? lo : x > hi ? hi : x) bit for bit;
    # keeps NaN (tl.minimum / tl.maximum would drop it).
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))

@triton.jit
def _horner7(p, x, c1: tl.constexpr, c2: tl.constexpr, c3: tl.constexpr, c4: tl.constexpr,
             c5: tl.constexpr, c6: tl.constexpr, c7: tl.constexpr):
    # p x^7 + c1 x^6 + ... + c7 by Horner's rule (horner in kl_math.h).
    return ((((((p * x + c1) * x + c2) * x + c3) * x + c4) * x + c5) * x + c6) * x + c7

@triton.jit
def _k3_terms(x):
    # (exp(x) - x - 1, exp(x) - 1) as k3_terms in csrc/include/rlhf_kernels/kl_math.h:
    # for |x| < 1/2 the series x^2 (1/2! + x/3! + ...), where exp(x) - x - 1
    # would cancel to noise (k3 ~ x^2 / 2 near on-policy); to x^7/9! in
    # float32, to x^14/16! in float64 (truncation below the unit roundoff).
    if x.dtype == tl.float64:
        p = _horner7(tl.zeros_like(x) + (1.0 / 20922789888000.0), x, 1.0 / 1307674368000.0,
                     1.0 / 87178291200.0, 1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0,
                     1.0 / 3628800.0, 1.0 / 362880.0)
    else:
        p = tl.zeros_like(x) + (1.0 / 362880.0)
    p = _horner7(p, x, 1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5)
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
    (x_label - m) * inv_T - log s, and the backward (_row_grad) recomputes p
    from m and log s. Shifting the raw x keeps y <= 0 exactly (no fused
    multiply-add of x * inv_T - m), so s >= 1 and logp <= 0, entropy >= 0 at
    any temperature."""
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
def _row_grad(row_ptr, out_ptr, vocab, label, ignore_index, g, g_entropy, row_entropy, m, log_s,
              inv_temperature, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr):
    """One read of a row and one write of its gradient:
    d x = inv_T * (g * (onehot - p) - g_H * p * (log p + H)), with log p =
    (x - m) * inv_T - log s from the row's raw max m and log s (_row_softmax).
    The shift comes first for float32 accuracy at any |x| / T: x - m is exact
    near the max (Sterbenz: x within a factor 2 of m), else one rounding of a
    value of size |x - m|. As x * inv_T - lse (lse = m * inv_T + log s) two
    values of size |x| / T would cancel, each rounded by up to half its ulp:
    ~5e-4 absolute in log p at |x| / T ~ 1e4, and so relative in p."""
    ignored = label == ignore_index
    bad_label = (label != ignore_index) & ((label < 0) | (label >= vocab))
    g = tl.where(ignored, 0.0, g)
    g_entropy = tl.where(ignored, 0.0, g_entropy)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < vocab
        x = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(ACC_DTYPE)
        y = _clamp_exp_arg((x - m) * inv_temperature - log_s)
        p = tl.exp(y)
        grad = -inv_temperature * p * (g + g_entropy * (y + row_entropy))
        grad = grad + tl.where(cols == label, inv_temperature * g, 0.0)
        grad = tl.where(ignored, 0.0, grad)
        grad = tl.where(bad_label, float("nan"), grad)
        tl.store(out_ptr + cols, grad.to(out_ptr.dtype.element_ty), mask=in_row)

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
def _token_weight(mask_ptr, offs, valid, HAS_WEIGHT: tl.constexpr, ACC_DTYPE: tl.constexpr):
    # Each token's weight: the mask's own value for a weight mask (HAS_WEIGHT),
    # else 1 on valid tokens; 0 on the others either way.
    if HAS_WEIGHT:
        return tl.load(mask_ptr + offs, mask=valid, other=0.0).to(ACC_DTYPE)
    else:
        return valid.to(ACC_DTYPE)

@triton.jit
def _kl_terms(logp, ref, ESTIMATOR: tl.constexpr):
    """Per-token KL estimate (Schulman, 2020) and d kl / d logp (d kl / d ref is
    its negative), as kl_terms in csrc/include/rlhf_kernels/kl_math.h: k1 =
    logp - ref (ESTIMATOR 0), abs = |k1| (1), k2 = k1^2 / 2 (2), k3 = exp(x) -
    x - 1, x = clamp(ref - logp, -20, 20), into [-10, 10] (3). At a clamp the
    gradient is torch.clamp's (passes at the boundary, 0 beyond it and for
    NaN); abs has 0 at 0."""
    d = logp - ref
    if ESTIMATOR == 0:
        kl = d
        dkl = tl.zeros_like(d) + 1.0
    elif ESTIMATOR == 1:
        kl = tl.where(d < 0.0, -d, d)
        dkl = tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, 0.0)).to(d.dtype)
    elif ESTIMATOR == 2:
        kl = 0.5 * (d * d)
        dkl = d
    else:
        x = ref - logp
        k, expm1 = _k3_terms(_clamp(x, -20.0, 20.0))
        kl = _clamp(k, -10.0, 10.0)
        live = (x >= -20.0) & (x <= 20.0) & (k <= 10.0)  # k3 >= 0: its lower clamp never acts
        dkl = tl.where(live, -expm1, 0.0)
    return kl, dkl

@triton.jit
def _dppo_kept(logp, old, adv, ratio_low, ratio_high, FORM: tl.constexpr):
    """DPPO's trust region (dppo_kept in ppo_token_math.h): whether the token is
    kept, from p = exp(logp), p_old = exp(old). TV (FORM 4): p - p_old <= hi
    for A > 0, >= -lo otherwise. KL (FORM 5): the binary KL p_old (old - logp)
    + (1 - p_old) log((1 - p_old + 1e-8) / (1 - p + 1e-8)) <= hi for A > 0
    unless p <= p_old, <= lo otherwise unless p >= p_old."""
    prob = tl.exp(logp)
    old_prob = tl.exp(old)
    positive = adv > 0.0
    if FORM == 4:
        rise = prob - old_prob
        kept = tl.where(positive, rise <= ratio_high, rise >= -ratio_low)
    else:
        binary_kl = old_prob * (old - logp) + (1.0 - old_prob) * tl.log((1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
        kept = tl.where(positive, (binary_kl <= ratio_high) | (prob <= old_prob),
                        (binary_kl <= ratio_low) | (prob >= old_prob))
    return kept

@triton.jit
def _policy_terms(logp, old, adv, ref, ratio_low, ratio_high, dual_c, kl_coef,
                  HAS_DUAL: tl.constexpr, KL_ESTIMATOR: tl.constexpr, FORM: tl.constexpr):
    """One token's policy objective FORM (PolicyForm in csrc/include/rlhf_kernels/
    ppo_math.h: 0 clip, 1 cispo, 2 sapo, 3 gpg, 4 dppo_tv, 5 dppo_kl, 6 dro,
    7 geo_mean; the rows-only 8 sequence sums, 9 VESPO's sums) plus
    kl_coef times the KL penalty, as policy_token in ppo_token_math.h (with its
    tie rules): (loss, d(loss + kl_coef * kl)/d logp, clipped, dual active,
    ratio, kl), for a block of tokens or a single one. ratio_low / ratio_high /
    dual_c are the form's three numbers (PolicyParams); HAS_DUAL only for clip.
    Clip: PPO-clip (Schulman et al., 2017) + dual clip (Ye et al., 2020)."""
    diff = logp - old
    log_ratio = _clamp(diff, -20.0, 20.0)
    d_log_ratio = tl.where((diff >= -20.0) & (diff <= 20.0), 1.0, 0.0)
    ratio = tl.exp(log_ratio)
    neg_adv = -adv
    if FORM == 0:
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
    elif FORM == 2:
        # sapo: -A (4 / tau) sigmoid(tau (r - 1)), tau = ratio_high (tau_pos) for A > 0, else ratio_low.
        tau = tl.where(adv > 0.0, ratio_high, ratio_low)
        # gate = sigmoid(x), x = tau (r - 1), and its complement 1 / (1 + 1 / e)
        # from the same e = exp(-x), as policy_token (no cancellation in 1 - gate).
        e = tl.exp(-(tau * (ratio - 1.0)))
        gate = 1.0 / (1.0 + e)
        gate_c = 1.0 / (1.0 + 1.0 / e)
        loss = neg_adv * (gate * (4.0 / tau))
        grad = neg_adv * (4.0 / tau) * (gate * gate_c) * tau * tl.where(d_log_ratio != 0.0, ratio, 0.0)
        clipped = tl.zeros_like(ratio) != 0.0  # none
        dual = clipped
    elif FORM == 7:
        # geo_mean (GMPO's token term): d unclamped, clipped in A's direction
        # (ratio_low = -clip_low, ratio_high = clip_high), 0 for A = 0; derivative
        # 1 where d passes, a tie at the bound included.
        positive = adv > 0.0
        negative = adv < 0.0
        upper = tl.where(diff < ratio_high, diff, ratio_high)
        lower = tl.where(diff > ratio_low, diff, ratio_low)
        loss = tl.where(positive, upper, tl.where(negative, lower, 0.0))
        grad = tl.where(positive, tl.where(diff <= ratio_high, 1.0, 0.0),
                        tl.where(negative, tl.where(diff >= ratio_low, 1.0, 0.0), 0.0))
        outside = (diff > ratio_high) | (diff < ratio_low)
        clipped = outside & positive
        dual = outside & negative
    elif FORM == 8:
        # sequence sums: A where A >= 0 (NaN kept); the KL column A where A <= 0.
        loss = tl.where(adv < 0.0, 0.0, adv)
        grad = tl.zeros_like(ratio)
        clipped = adv > 0.0
        dual = adv < 0.0
    elif FORM == 9:
        # VESPO's sums: the log-ratio clamped to [-20, 20].
        loss = _clamp(diff, -20.0, 20.0)
        grad = tl.zeros_like(ratio)
        clipped = tl.zeros_like(ratio) != 0.0  # none
        dual = clipped
    elif FORM == 6:
        # dro: -(A logp - beta / 2 d^2), beta = ratio_low, d = logp - old (unclamped).
        loss = -(logp * adv - 0.5 * ratio_low * (diff * diff))
        grad = -(adv - ratio_low * diff)
        clipped = tl.zeros_like(ratio) != 0.0  # none
        dual = clipped
    else:
        # -A w logp with a stopped weight w: cispo clamp(r, lo, hi); gpg 1; dppo min(r, c) on kept tokens, else 0.
        if FORM == 1:
            weight = _clamp(ratio, ratio_low, ratio_high)
            clipped = (ratio < ratio_low) | (ratio > ratio_high)
            dual = clipped & False
        elif FORM == 3:
            weight = tl.zeros_like(ratio) + 1.0
            clipped = tl.zeros_like(ratio) != 0.0  # none
            dual = clipped
        else:
            kept = _dppo_kept(logp, old, adv, ratio_low, ratio_high, FORM)
            weight = tl.where(kept, tl.where(ratio > dual_c, dual_c, ratio), 0.0)
            clipped = ~kept
            dual = kept & (ratio > dual_c)
        loss = neg_adv * weight * logp
        grad = neg_adv * weight
    kl = tl.zeros_like(ratio)
    if KL_ESTIMATOR >= 0:
        kl, dkl = _kl_terms(logp, ref, KL_ESTIMATOR)
        grad = grad + kl_coef * dkl
    elif FORM == 7:
        kl = adv + tl.zeros_like(ratio)  # geo_mean: the KL column sums A (ppo_math.h)
    elif FORM == 8:
        kl = tl.where(adv > 0.0, 0.0, adv)
    return loss, grad, clipped, dual, ratio, kl

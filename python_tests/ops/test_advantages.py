"""KL penalty, shaping, GAE, whitening, group advantages and the KL controller
against float64 references written from the formulas, on every backend present."""

import math
import os
import tempfile

import pytest
import torch
from hypothesis import strategies as st

import rlhf_kernels
from rlhf_kernels import reference

from helpers import gpu
from properties import (check_close, dtypes_all, generator, grad_tols, random_mask, run_backend_property, run_property,
                        seeds)

ESTIMATORS = ["k1", "abs", "k2", "mse", "k3", "low_var_kl"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _mask_with_holes(shape, seed, p_valid=0.75):
    """Random holes (multi-turn tool outputs), right padding of random length,
    one all-masked row and one length-1 row when there are enough rows."""
    gen = _gen(seed)
    B, T = shape
    mask = torch.rand(shape, generator=gen) < p_valid
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask &= torch.arange(T) < lengths[:, None]
    if B >= 3:
        mask[1] = False  # all masked
        mask[2] = False
        mask[2, 0] = True  # length 1
    return mask


def _inputs(shape, dtype, seed=0):
    gen = _gen(seed)
    rewards = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    values = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype)
    return rewards, values


def _loop64(rewards, values, mask, gamma, lam, whiten):
    """The float64 reference: the explicit reverse loop, then masked whitening."""
    adv, ret = reference.gae_loop(rewards.double(), values.double(), mask.bool(), gamma, lam)
    if whiten:
        adv = reference.masked_whiten(adv, mask)
    return adv, ret


def _scalar_loop64(rewards, values, mask, gamma, lam):
    """An independent scalar loop per sequence, straight from the formulas."""
    B, T = values.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        next_value, running = 0.0, 0.0
        for t in reversed(range(T)):
            if not mask[b, t]:
                continue
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            running = delta + gamma * lam * running
            next_value = float(values[b, t])
            adv[b, t] = running
    ret = torch.where(mask, adv + values.double(), torch.zeros_like(adv))
    return adv, ret


def _close(got, want, atol=2e-5, rtol=2e-5):
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)


# --- references agree with each other -----------------------------------------------


def test_vectorised_loop_matches_scalar_loop():
    mask = _mask_with_holes((5, 37), seed=1)
    rewards, values = _inputs((5, 37), torch.float64, seed=1)
    a1, r1 = reference.gae_loop(rewards, values, mask, 0.99, 0.9)
    a2, r2 = _scalar_loop64(rewards, values, mask, 0.99, 0.9)
    torch.testing.assert_close(a1, a2, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(r1, r2, atol=1e-12, rtol=1e-12)


# --- KL penalty ------------------------------------------------------------------------


def _kl64(logp, ref, estimator):
    d = logp.double() - ref.double()
    if estimator == "k1":
        return d
    if estimator == "abs":
        return d.abs()
    if estimator in ("k2", "mse"):
        return 0.5 * d * d
    x = (-d).clamp(-20, 20)
    return (x.exp() - x - 1).clamp(-10, 10)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("shape", [(5, 37), (4133,)], ids=str)  # odd sizes; not a block multiple
def test_kl_penalty_forward_and_grad(device_backend, estimator, shape):
    device, backend = device_backend
    gen = _gen(3)
    logp = (torch.randn(shape, generator=gen) * 3).to(device)
    ref = (torch.randn(shape, generator=gen) * 3).to(device)
    logp.view(-1)[:2] = torch.tensor([30.0, -30.0])  # the k3 clamps
    x, y = logp.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    kl = rlhf_kernels.kl_penalty(x, y, estimator=estimator, backend=backend)
    assert kl.dtype == torch.float32 and kl.shape == logp.shape
    _close(kl, _kl64(logp, ref, estimator), atol=1e-5, rtol=1e-5)
    g = torch.randn(shape, generator=gen).to(device)
    (kl * g).sum().backward()
    x64, y64 = logp.double().requires_grad_(True), ref.double().requires_grad_(True)
    (_kl64(x64, y64, estimator) * g.double()).sum().backward()
    _close(x.grad, x64.grad, atol=1e-5, rtol=1e-5)
    _close(y.grad, y64.grad, atol=1e-5, rtol=1e-5)


def _near_on_policy(n, seed):
    """float32 (logp, ref) whose log-ratios span 1e-6 .. 0.3 and both signs."""
    gen = _gen(seed)
    logp = -torch.rand(n, generator=gen) * 3
    scale = 10.0 ** (torch.rand(n, generator=gen) * 5.5 - 6)
    ref = logp + torch.randn(n, generator=gen) * scale
    return logp, ref


def test_kl_penalty_k3_near_on_policy_keeps_float32_accuracy(device_backend):
    """k3 = exp(x) - x - 1 ~ x^2 / 2 near on-policy: computed as written in float32
    it keeps ~1e-7 absolute, pure noise at |x| ~ 1e-4 (the eager reference's
    median relative error there is ~1). The kernels stay within a few float32 ulp,
    value and gradient."""
    device, backend = device_backend
    logp, ref = _near_on_policy(3000, seed=23)
    x, y = logp.to(device).requires_grad_(True), ref.to(device)
    kl = rlhf_kernels.kl_penalty(x, y, estimator="k3", backend=backend)
    d = ref.double() - logp.double()
    exact = torch.expm1(d) - d
    eager = reference.kl_penalty(logp, ref, "k3", upcast=False)
    assert ((eager.double() - exact).abs() / exact)[exact > 0].median() > 1e-3  # what the kernels do better
    if backend == "eager":  # the eager formula itself, cancellation included
        assert torch.equal(kl.detach().cpu(), eager)
        return
    kl.sum().backward()
    torch.testing.assert_close(kl.double().cpu(), exact, atol=0, rtol=1e-6)
    torch.testing.assert_close(x.grad.double().cpu(), -torch.expm1(d), atol=0, rtol=1e-6)
    # float64 (gradcheck's dtype): accurate to ~1e-15 down to |x| = 1e-9, against the
    # series sum_{k >= 2} x^k / k! (expm1(x) - x cancels too: 1e-7 relative at 1e-9).
    d64 = torch.tensor([1e-9, -3e-7, 1e-6, 3e-4, -0.02, 0.1, 0.49, -0.6], dtype=torch.float64)
    series = sum(d64**k / float(math.factorial(k)) for k in range(2, 30))
    x64 = torch.zeros(8, dtype=torch.float64, device=device, requires_grad=True)
    kl64 = rlhf_kernels.kl_penalty(x64, d64.to(device), estimator="k3", backend=backend)
    kl64.sum().backward()
    torch.testing.assert_close(kl64.detach().cpu(), series, atol=0, rtol=1e-13)
    torch.testing.assert_close(x64.grad.cpu(), -torch.expm1(d64), atol=0, rtol=1e-13)


@pytest.mark.parametrize("estimator", ["k1", "abs", "k2", "k3"])
def test_kl_penalty_nan_stays_nan(device_backend, estimator):
    """A NaN log-prob gives a NaN penalty (as the eager formula), never a clamped number."""
    device, backend = device_backend
    logp = torch.tensor([-1.0, float("nan"), -2.0, -0.5], device=device)
    ref = torch.tensor([-1.5, -1.0, float("nan"), -0.5], device=device)
    x = logp.clone().requires_grad_(True)
    kl = rlhf_kernels.kl_penalty(x, ref, estimator=estimator, backend=backend)
    assert torch.isnan(kl.detach().cpu()[1:3]).all() and torch.isfinite(kl.detach().cpu()[[0, 3]]).all()
    if estimator == "k3":  # its gradient at NaN is 0 on every backend, as torch.clamp's
        kl.sum().backward()
        assert torch.equal(x.grad.cpu()[1:3], torch.zeros(2))


@pytest.mark.parametrize("estimator", ["k1", "abs", "k2", "k3"])
def test_kl_penalty_gradcheck_float64(device_backend, estimator):
    device, backend = device_backend
    gen = _gen(4)
    logp = torch.randn(3, 7, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    ref = torch.randn(3, 7, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)

    def f(a, b):
        return rlhf_kernels.kl_penalty(a, b, estimator=estimator, backend=backend)

    assert torch.autograd.gradcheck(f, (logp, ref), eps=1e-6, atol=1e-6)


def test_kl_penalty_bf16_grad_dtype(device_backend):
    device, backend = device_backend
    gen = _gen(5)
    logp = torch.randn(4, 9, generator=gen).to(torch.bfloat16).to(device).requires_grad_(True)
    ref = torch.randn(4, 9, generator=gen).to(torch.bfloat16).to(device).requires_grad_(True)
    kl = rlhf_kernels.kl_penalty(logp, ref, estimator="k3", backend=backend)
    kl.sum().backward()
    assert kl.dtype == torch.float32 and logp.grad.dtype == ref.grad.dtype == torch.bfloat16
    _close(kl, _kl64(logp.detach(), ref.detach(), "k3"), atol=1e-5, rtol=1e-5)


# --- GAE -----------------------------------------------------------------------------

# (B, T): odd T, T not a power of two, a single step, a block and a half.
GAE_SHAPES = [(6, 37), (3, 1), (4, 1500)]


@pytest.mark.parametrize("shape", GAE_SHAPES, ids=str)
@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.9), (0.0, 0.5), (1.0, 0.0)])
def test_gae_padded_matches_float64_loop(device_backend, shape, gamma, lam, poison_uninitialized):
    device, backend = device_backend
    mask = _mask_with_holes(shape, seed=shape[1])
    rewards, values = _inputs(shape, torch.float32, seed=7)
    adv, ret = rlhf_kernels.compute_gae(rewards.to(device), values.to(device), mask.to(device),
                                        gamma=gamma, lam=lam, whiten=False, backend=backend)
    want_adv, want_ret = _scalar_loop64(rewards, values, mask, gamma, lam) if shape[1] < 100 else \
        _loop64(rewards, values, mask, gamma, lam, whiten=False)
    assert adv.dtype == ret.dtype == torch.float32
    _close(adv.cpu(), want_adv, atol=1e-4, rtol=1e-5)
    _close(ret.cpu(), want_ret, atol=1e-4, rtol=1e-5)
    assert torch.all(adv.cpu()[~mask] == 0) and torch.all(ret.cpu()[~mask] == 0)


def test_gae_long_sequence_gamma_lam_one_float32(device_backend):
    """T = 8192, gamma = lam = 1: A_t is a sum of up to 8192 terms; float32
    must stay within a few ulps of the float64 loop at that magnitude."""
    device, backend = device_backend
    shape = (2, 8192)
    mask = _mask_with_holes(shape, seed=11, p_valid=0.9)
    mask[0] = torch.rand(8192, generator=_gen(12)) < 0.9  # long row with holes, no right padding
    rewards, values = _inputs(shape, torch.float32, seed=11)
    rewards = rewards + 0.3  # a drift, so the sums grow to O(1e3)
    adv, ret = rlhf_kernels.compute_gae(rewards.to(device), values.to(device), mask.to(device),
                                        gamma=1.0, lam=1.0, whiten=False, backend=backend)
    want_adv, want_ret = _loop64(rewards, values, mask, 1.0, 1.0, whiten=False)
    scale = want_adv.abs().max().item()
    assert scale > 500
    _close(adv.cpu(), want_adv, atol=3e-6 * scale, rtol=0)
    _close(ret.cpu(), want_ret, atol=3e-6 * scale, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_gae_dtypes(device_backend, dtype):
    device, backend = device_backend
    shape = (5, 53)
    mask = _mask_with_holes(shape, seed=2)
    rewards, values = _inputs(shape, dtype, seed=2)
    adv, ret = rlhf_kernels.compute_gae(rewards.to(device), values.to(device), mask.to(device),
                                        gamma=0.99, lam=0.95, whiten=True, backend=backend)
    assert adv.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # Same rounded inputs, float64 arithmetic: float32 accumulation is far
    # tighter than any error of bf16/fp16 arithmetic.
    want_adv, want_ret = _loop64(rewards, values, mask, 0.99, 0.95, whiten=True)
    if dtype == torch.float64 and backend != "triton":
        tol = 1e-10
    else:  # Triton passes gamma and lam as float32 scalars
        tol = 1e-5
    _close(adv.cpu(), want_adv, atol=tol, rtol=tol)
    _close(ret.cpu(), want_ret, atol=tol, rtol=tol)


def _pack(x, mask):
    """Padded (B, T) rows truncated at their lengths (last valid + 1) -> packed."""
    lengths = [int(torch.nonzero(row).max()) + 1 if row.any() else 0 for row in mask]
    parts = [x[b, :n] for b, n in enumerate(lengths)]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
    return torch.cat(parts), cu, lengths


def test_packed_equals_padded(device_backend):
    device, backend = device_backend
    shape = (7, 45)
    mask = _mask_with_holes(shape, seed=5)
    rewards, values = _inputs(shape, torch.float32, seed=5)
    padded = rlhf_kernels.compute_gae(rewards.to(device), values.to(device), mask.to(device),
                                      gamma=0.99, lam=0.95, whiten=True, backend=backend)
    r_p, cu, lengths = _pack(rewards, mask)
    v_p, _, _ = _pack(values, mask)
    m_p, _, _ = _pack(mask, mask)
    packed = rlhf_kernels.compute_gae(r_p.to(device), v_p.to(device), m_p.to(device), gamma=0.99,
                                      lam=0.95, whiten=True, cu_seqlens=cu.to(device), backend=backend)
    for got_p, got_pad in zip(packed, padded):
        want = torch.cat([got_pad.cpu()[b, :n] for b, n in enumerate(lengths)])
        torch.testing.assert_close(got_p.cpu(), want, atol=2e-6, rtol=2e-6)
    # And against the float64 loop directly.
    want_adv, _ = _loop64(rewards, values, mask, 0.99, 0.95, whiten=True)
    _close(packed[0].cpu(), torch.cat([want_adv[b, :n] for b, n in enumerate(lengths)]))


def test_packed_empty_sequences_and_no_mask(device_backend):
    device, backend = device_backend
    cu = torch.tensor([0, 3, 3, 10, 11], dtype=torch.int32)  # an empty sequence, a length-1 one
    rewards, values = _inputs((1, 11), torch.float32, seed=9)
    rewards, values = rewards[0], values[0]
    adv, ret = rlhf_kernels.compute_gae(rewards.to(device), values.to(device), None, gamma=0.9, lam=0.8,
                                        whiten=False, cu_seqlens=cu.to(device), backend=backend)
    want_adv, want_ret = reference.compute_gae(rewards.double(), values.double(), None, gamma=0.9, lam=0.8,
                                               whiten=False, cu_seqlens=cu)
    _close(adv.cpu(), want_adv)
    _close(ret.cpu(), want_ret)
    # The length-1 sequence: A = r - V.
    assert abs(float(adv[10]) - float(rewards[10] - values[10])) < 1e-6
    # A strided view of cu_seqlens reads the same offsets (it is made contiguous).
    strided = torch.stack([cu, torch.full_like(cu, 99)], -1).reshape(-1)[::2]
    assert not strided.is_contiguous() and torch.equal(strided, cu)
    adv2, ret2 = rlhf_kernels.compute_gae(rewards.to(device), values.to(device), None, gamma=0.9, lam=0.8,
                                          whiten=False, cu_seqlens=strided.to(device), backend=backend)
    torch.testing.assert_close(adv2, adv, atol=0, rtol=0)


def test_empty_time_dimension(device_backend):
    """T = 0 (nothing generated): empty outputs and zero statistics, no error."""
    device, backend = device_backend
    z = torch.zeros(2, 0, device=device)
    adv, ret = rlhf_kernels.compute_gae(z, z, None, backend=backend)
    assert adv.shape == ret.shape == (2, 0)
    out = rlhf_kernels.ppo_advantages(torch.zeros(2, device=device), z, z, z, z.bool(), kl_coef=0.1, backend=backend)
    assert out.advantages.shape == (2, 0) and float(out.kl_mean) == 0 and float(out.num_tokens) == 0


@pytest.mark.parametrize("n_valid", [0, 1, 2])
def test_whitening_edge_cases(device_backend, n_valid):
    device, backend = device_backend
    shape = (3, 8)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask.view(-1)[torch.tensor([5, 17][:n_valid], dtype=torch.long)] = True
    rewards, values = _inputs(shape, torch.float32, seed=n_valid)
    adv, ret = rlhf_kernels.compute_gae(rewards.to(device), values.to(device), mask.to(device),
                                        whiten=True, backend=backend)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    want_adv, want_ret = _loop64(rewards, values, mask, 1.0, 0.95, whiten=True)
    _close(adv.cpu(), want_adv)
    _close(ret.cpu(), want_ret)
    if n_valid < 2:
        assert torch.all(adv == 0)  # one token whitens to 0, none gives all 0
    else:
        assert torch.allclose(adv.cpu()[mask].abs(), torch.full((2,), 1 / math.sqrt(2)), atol=1e-5)


def test_whitening_statistics_unbiased(device_backend):
    device, backend = device_backend
    shape = (4, 29)
    mask = _mask_with_holes(shape, seed=21)
    rewards, values = _inputs(shape, torch.float32, seed=21)
    adv, _ = rlhf_kernels.compute_gae(rewards.to(device), values.to(device), mask.to(device), whiten=True,
                                      backend=backend)
    valid = adv.cpu()[mask].double()
    assert abs(valid.mean().item()) < 1e-6
    assert abs(valid.var(unbiased=True).item() - 1) < 1e-5


# --- fused PPO advantages -------------------------------------------------------------------


def _ppo_inputs(shape, seed, dtype=torch.float32):
    gen = _gen(seed)
    logp = (-torch.rand(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    ref = (-torch.rand(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    values = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    scores = torch.randn(shape[0], generator=gen, dtype=torch.float64).to(dtype)
    return scores, logp, ref, values


def _ppo64(scores, logp, ref, values, mask, kl_coef, estimator, gamma, lam, whiten):
    """From the formulas, in float64: kl, shaping, loop, whitening."""
    kl = torch.where(mask, _kl64(logp, ref, estimator), torch.zeros(mask.shape, dtype=torch.float64))
    rewards = -kl_coef * kl
    for b in range(mask.shape[0]):
        idx = torch.nonzero(mask[b])
        if len(idx):
            rewards[b, int(idx.max())] += float(scores[b])
    adv, ret = _loop64(rewards, values, mask, gamma, lam, whiten)
    return adv, ret, rewards, kl


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("shape", [(5, 41), (3, 700)], ids=str)
def test_ppo_advantages_matches_float64(device_backend, estimator, shape, poison_uninitialized):
    device, backend = device_backend
    mask = _mask_with_holes(shape, seed=31)
    scores, logp, ref, values = _ppo_inputs(shape, seed=31)
    out = rlhf_kernels.ppo_advantages(
        scores.to(device), logp.to(device), ref.to(device), values.to(device), mask.to(device),
        kl_coef=0.05, estimator=estimator, gamma=0.99, lam=0.95, whiten=True, backend=backend,
    )
    want_adv, want_ret, want_rew, want_kl = _ppo64(scores, logp, ref, values, mask, 0.05, estimator,
                                                   0.99, 0.95, True)
    _close(out.kl.cpu(), want_kl)
    _close(out.token_rewards.cpu(), want_rew)
    _close(out.advantages.cpu(), want_adv, atol=5e-5)
    _close(out.returns.cpu(), want_ret, atol=5e-5)
    n = mask.sum()
    assert out.num_tokens.item() == n.item()
    torch.testing.assert_close(out.kl_mean.cpu(), want_kl.sum() / n)
    torch.testing.assert_close(out.kl_sum_mean.cpu(), want_kl.sum() / shape[0])
    torch.testing.assert_close(out.score_mean.cpu().float(), scores.double().mean().float())
    raw, _ = _loop64(want_rew, values, mask, 0.99, 0.95, whiten=False)
    torch.testing.assert_close(out.advantage_mean.cpu(), raw[mask].mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.advantage_std.cpu(), raw[mask].std(), atol=1e-5, rtol=1e-5)
    for t in (out.kl_mean, out.score_mean, out.advantage_mean, out.advantage_std, out.num_tokens):
        assert t.dim() == 0


def test_ppo_advantages_tensor_kl_coef_matches_float(device_backend):
    """A 0-dim tensor kl_coef (read by the kernel on the device) gives what the float gives."""
    device, backend = device_backend
    shape = (3, 19)
    mask = _mask_with_holes(shape, seed=45)
    scores, logp, ref, values = (t.to(device) for t in _ppo_inputs(shape, seed=45))
    kw = dict(estimator="k1", gamma=0.99, lam=0.9, backend=backend)
    a = rlhf_kernels.ppo_advantages(scores, logp, ref, values, mask.to(device), kl_coef=0.07, **kw)
    b = rlhf_kernels.ppo_advantages(scores, logp, ref, values, mask.to(device),
                                    kl_coef=torch.tensor(0.07, dtype=torch.float64, device=device), **kw)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    c = rlhf_kernels.ppo_advantages(scores, logp, ref, values, mask.to(device), kl_coef=0.5, **kw)
    assert not torch.allclose(a.token_rewards, c.token_rewards)


def test_ppo_advantages_packed_equals_padded(device_backend):
    device, backend = device_backend
    shape = (6, 33)
    mask = _mask_with_holes(shape, seed=41)
    scores, logp, ref, values = _ppo_inputs(shape, seed=41)
    kw = dict(kl_coef=0.1, estimator="k2", gamma=1.0, lam=0.9, whiten=True, backend=backend)
    padded = rlhf_kernels.ppo_advantages(scores.to(device), logp.to(device), ref.to(device),
                                         values.to(device), mask.to(device), **kw)
    lp, cu, lengths = _pack(logp, mask)
    packed = rlhf_kernels.ppo_advantages(
        scores.to(device), lp.to(device), _pack(ref, mask)[0].to(device), _pack(values, mask)[0].to(device),
        _pack(mask, mask)[0].to(device), cu_seqlens=cu.to(device), **kw,
    )
    for name in ("advantages", "returns", "token_rewards", "kl"):
        want = torch.cat([getattr(padded, name).cpu()[b, :n] for b, n in enumerate(lengths)])
        torch.testing.assert_close(getattr(packed, name).cpu(), want, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(packed.kl_mean, padded.kl_mean)


def test_ppo_advantages_bf16_inputs(device_backend):
    device, backend = device_backend
    shape = (4, 50)
    mask = _mask_with_holes(shape, seed=51)
    scores, logp, ref, values = _ppo_inputs(shape, seed=51, dtype=torch.bfloat16)
    out = rlhf_kernels.ppo_advantages(scores.to(device), logp.to(device), ref.to(device), values.to(device),
                                      mask.to(device), kl_coef=0.2, estimator="abs", backend=backend)
    assert out.advantages.dtype == torch.float32
    want_adv, want_ret, want_rew, _ = _ppo64(scores, logp, ref, values, mask, 0.2, "abs", 1.0, 0.95, True)
    _close(out.advantages.cpu(), want_adv, atol=5e-5)
    _close(out.returns.cpu(), want_ret, atol=5e-5)
    _close(out.token_rewards.cpu(), want_rew)


# --- group advantages ------------------------------------------------------------------------


def _group64(scores, groups, mode, eps):
    out = torch.zeros(len(scores), dtype=torch.float64)
    for g in set(groups):
        idx = [i for i, x in enumerate(groups) if x == g]
        s = [float(scores[i]) for i in idx]
        n = len(s)
        mean = sum(s) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in s) / (n - 1)) if n > 1 else 0.0
        for i, x in zip(idx, s):
            if mode == "grpo":
                out[i] = (x - mean) / (std + eps)
            elif mode == "dr_grpo":
                out[i] = x - mean
            else:
                out[i] = x - (sum(s) - x) / (n - 1) if n > 1 else 0.0
    return out


@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_group_advantages_fixed_size(mode, group_size):
    scores = torch.randn(12, generator=_gen(group_size))
    got = rlhf_kernels.group_advantages(scores, group_size, mode=mode)
    want = _group64(scores, [i // group_size for i in range(12)], mode, 1e-6)
    _close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got).all()
    if group_size == 1:
        assert torch.all(got == 0)
    if group_size == 2 and mode == "grpo":
        torch.testing.assert_close(got.abs(), torch.full((12,), 1 / math.sqrt(2)), atol=1e-4, rtol=0)
    torch.testing.assert_close(got.double(), reference.group_advantages(scores, group_size, mode=mode).double(),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "rloo"])
def test_group_advantages_ids_unsorted_mixed_sizes(mode):
    ids = torch.tensor([7, 3, 7, 100, 3, 7, -2, 3, 3, 100])  # groups of 3, 4, 2, 1
    scores = torch.randn(10, generator=_gen(8), dtype=torch.float64)
    got = rlhf_kernels.group_advantages(scores, group_ids=ids, mode=mode)
    _close(got, _group64(scores, ids.tolist(), mode, 1e-6), atol=1e-10, rtol=1e-10)
    assert got[6] == 0  # the group of one
    # Equal scores in a group: grpo gives 0, not NaN.
    flat = rlhf_kernels.group_advantages(torch.ones(4), 2, mode=mode)
    assert torch.all(flat == 0)


def test_group_advantages_compiles():
    torch._dynamo.reset()
    f = torch.compile(lambda s, g: rlhf_kernels.group_advantages(s, group_ids=g, mode="grpo"), fullgraph=True)
    s, g = torch.randn(8), torch.tensor([0, 1, 0, 1, 2, 2, 2, 3])
    torch.testing.assert_close(f(s, g), rlhf_kernels.group_advantages(s, group_ids=g))


# --- adaptive KL controller ------------------------------------------------------------------


def test_adaptive_kl_controller_float_and_tensor():
    ctl = rlhf_kernels.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(9.0, n_steps=256)  # err = clip(0.5) = 0.2
    assert math.isclose(ctl.value, 0.2 * (1 + 0.2 * 256 / 10000))
    ctl.update(5.7, n_steps=256)  # err = -0.05
    want = 0.2 * (1 + 0.2 * 256 / 10000) * (1 - 0.05 * 256 / 10000)
    assert math.isclose(ctl.value, want, rel_tol=1e-12)
    ctl.update(torch.tensor(0.0, dtype=torch.float64), n_steps=100)  # err = -0.2, as a tensor
    assert isinstance(ctl.value, torch.Tensor) and ctl.value.dim() == 0
    want *= 1 - 0.2 * 100 / 10000
    assert math.isclose(ctl.value.item(), want, rel_tol=1e-12)
    state = ctl.state_dict()
    other = rlhf_kernels.AdaptiveKLController(1.0, target=1.0, horizon=1.0)
    other.load_state_dict(state)
    assert math.isclose(other.value.item(), want) and other.target == 6.0 and other.horizon == 10000
    ctl.update(torch.tensor(12.0, dtype=torch.float64), n_steps=100)
    assert math.isclose(other.value.item(), want)  # the checkpoint was a copy


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_adaptive_kl_controller_low_precision_kl(dtype):
    """A bf16 / fp16 KL (exact in its dtype) must not round the multipliers: 100
    updates give the float64 coefficient, not a drifted one (bf16 gave 0.414)."""
    ctl = rlhf_kernels.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    for _ in range(100):
        ctl.update(torch.tensor(10.0, dtype=dtype), n_steps=256)
    want = 0.2 * (1 + 0.2 * 256 / 10000) ** 100
    assert math.isclose(float(ctl.value), want, rel_tol=1e-12)


def test_adaptive_kl_controller_feeds_ppo_advantages():
    ctl = rlhf_kernels.AdaptiveKLController(0.1, target=0.01, horizon=100)
    scores, logp, ref, values = _ppo_inputs((2, 9), seed=3)
    out = rlhf_kernels.ppo_advantages(scores, logp, ref, values, None, kl_coef=ctl.value)
    ctl.update(out.kl_sum_mean, n_steps=2)
    assert isinstance(ctl.value, torch.Tensor)
    out2 = rlhf_kernels.ppo_advantages(scores, logp, ref, values, None, kl_coef=ctl.value)
    want = _ppo64(scores, logp, ref, values, torch.ones(2, 9, dtype=torch.bool), float(ctl.value), "k1",
                  1.0, 0.95, True)[2]
    _close(out2.token_rewards, want)


def test_adaptive_kl_controller_bad_args():
    with pytest.raises(ValueError, match="target"):
        rlhf_kernels.AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError, match="horizon"):
        rlhf_kernels.AdaptiveKLController(0.1, target=1.0, horizon=-1)
    with pytest.raises(ValueError, match="current_kl"):
        rlhf_kernels.AdaptiveKLController(0.1, 1.0, 10).update(torch.ones(2), 1)


# --- opcheck, torch.compile ------------------------------------------------------------------


def test_opcheck(device_backend):
    """The registered ops themselves (schema, fake, autograd, AOT dispatch): the
    native ops for the cpu / cuda backends, their Triton twins for triton (the
    eager backend is plain torch: no op)."""
    device, backend = device_backend
    suffix = {"cpu": "", "cuda": "", "triton": "_triton"}.get(backend)
    if suffix is None:
        return
    shape = (3, 10)
    mask = _mask_with_holes(shape, seed=61).to(device)
    scores, logp, ref, values = (t.to(device) for t in _ppo_inputs(shape, seed=61))
    rewards = torch.randn(shape).to(device)
    op = getattr(torch.ops.rlhf_kernels, "advantages" + suffix).default
    torch.library.opcheck(op, (values, mask, None, rewards, None, None, None, None, 0.0, 0, 0.99, 0.95))
    torch.library.opcheck(op, (values, None, None, None, scores, logp, ref, None, 0.1, 3, 1.0, 0.9))
    coef = torch.tensor([0.3], device=device)  # a device-side kl_coef multiplier
    torch.library.opcheck(op, (values, mask, None, None, scores, logp, ref, coef, 0.1, 0, 1.0, 0.9))
    cu = torch.tensor([0, 4, 4, 9], dtype=torch.int32, device=device)
    torch.library.opcheck(op, (values.view(-1)[:9], None, cu, rewards.view(-1)[:9], None, None, None, None, 0.0,
                               0, 0.9, 0.9))
    x = logp.clone().requires_grad_(True)
    y = ref.clone().requires_grad_(True)
    kl = "kl_penalty" + suffix
    torch.library.opcheck(getattr(torch.ops.rlhf_kernels, kl).default, (x, y, 3))
    torch.library.opcheck(getattr(torch.ops.rlhf_kernels, kl + "_backward").default,
                          (torch.randn(shape, device=device), logp, ref, 2))
    torch.library.opcheck(getattr(torch.ops.rlhf_kernels, kl).default, (x.t(), y.t(), 1))  # strided: read in place


def test_torch_compile_fullgraph(device_backend):
    device, backend = device_backend
    torch._dynamo.reset()
    shape = (4, 12)
    mask = _mask_with_holes(shape, seed=71).to(device)
    scores, logp, ref, values = (t.to(device) for t in _ppo_inputs(shape, seed=71))

    def step(scores, logp, ref, values, mask):
        out = rlhf_kernels.ppo_advantages(scores, logp, ref, values, mask, kl_coef=0.05, estimator="k3",
                                          gamma=0.99, lam=0.95, backend=backend)
        adv, ret = rlhf_kernels.compute_gae(out.token_rewards, values, mask, backend=backend)
        kl = rlhf_kernels.kl_penalty(logp, ref, estimator="k2", backend=backend)
        return out.advantages, out.kl_mean, adv, ret, kl.sum()

    compiled = torch.compile(step, fullgraph=True)
    got = compiled(scores, logp, ref, values, mask)
    want = step(scores, logp, ref, values, mask)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)

    def kl_loss(a, b):
        return rlhf_kernels.kl_penalty(a, b, estimator="k3", backend=backend).mean()

    x1, x2 = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    torch.compile(kl_loss, fullgraph=True)(x1, ref).backward()
    kl_loss(x2, ref).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


# --- bad inputs ----------------------------------------------------------------------------


def _bad_gae(**over):
    kw = dict(token_rewards=torch.randn(2, 5), values=torch.randn(2, 5), mask=torch.ones(2, 5, dtype=torch.bool))
    kw.update(over)
    return lambda: rlhf_kernels.compute_gae(kw.pop("token_rewards"), kw.pop("values"), kw.pop("mask"), **kw)


@pytest.mark.parametrize(
    "call, match",
    [
        (_bad_gae(token_rewards=torch.randn(2, 6)), "token_rewards: shape"),
        (_bad_gae(mask=torch.ones(2, 4, dtype=torch.bool)), "mask: shape"),
        (_bad_gae(values=torch.randn(10), token_rewards=torch.randn(10), mask=None), r"values: expected shape \(B, T\)"),
        (_bad_gae(token_rewards=torch.zeros(2, 5, dtype=torch.long)), "token_rewards: dtype"),
        (_bad_gae(gamma=1.5), "gamma"),
        (_bad_gae(gamma=-0.1), "gamma"),
        (_bad_gae(lam=float("nan")), "lam"),
        (_bad_gae(lam=2.0), "lam"),
        (_bad_gae(cu_seqlens=torch.tensor([0, 5, 10], dtype=torch.int32)), r"values: expected shape \(total,\)"),
        (_bad_gae(values=torch.randn(10), token_rewards=torch.randn(10), mask=None,
                  cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32)), "cu_seqlens: offsets must be non-decreasing"),
        (_bad_gae(values=torch.randn(10), token_rewards=torch.randn(10), mask=None,
                  cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32)), "cu_seqlens: must end at the total"),
        (_bad_gae(values=torch.randn(10), token_rewards=torch.randn(10), mask=None,
                  cu_seqlens=torch.tensor([1, 4, 10], dtype=torch.int32)), "cu_seqlens: must start at 0"),
        (_bad_gae(values=torch.randn(10), token_rewards=torch.randn(10), mask=None,
                  cu_seqlens=torch.tensor([0, 4, 10])), "cu_seqlens: dtype"),
        (_bad_gae(backend="tpu"), "backend: unknown backend"),
        (lambda: rlhf_kernels.kl_penalty(torch.randn(3), torch.randn(4)), "ref_logp: shape"),
        (lambda: rlhf_kernels.kl_penalty(torch.randn(3), torch.randn(3), estimator="k9"), "estimator"),
        (lambda: rlhf_kernels.ppo_advantages(torch.randn(3), torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5),
                                             None, kl_coef=0.1), "scores: shape"),
        (lambda: rlhf_kernels.ppo_advantages(torch.randn(2), torch.randn(2, 5), torch.randn(2, 4), torch.randn(2, 5),
                                             None, kl_coef=0.1), "ref_logp: shape"),
        (lambda: rlhf_kernels.ppo_advantages(torch.randn(2), torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5),
                                             None, kl_coef=-1.0), "kl_coef"),
        (lambda: rlhf_kernels.group_advantages(torch.randn(6), 4), "group_size"),
        (lambda: rlhf_kernels.group_advantages(torch.randn(6)), "exactly one"),
        (lambda: rlhf_kernels.group_advantages(torch.randn(6), 2, mode="ppo"), "mode"),
        (lambda: rlhf_kernels.group_advantages(torch.randn(6), group_ids=torch.zeros(5, dtype=torch.long)), "group_ids: shape"),
        (lambda: rlhf_kernels.group_advantages(torch.randn(6), 1.5), "group_size: expected an integer"),
        (lambda: rlhf_kernels.kl_penalty(torch.randn(3), torch.randn(3), estimator=["k1"]), "estimator"),
        (lambda: rlhf_kernels.ppo_advantages(torch.randn(2), torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5),
                                             None, kl_coef=None), "kl_coef: expected a number"),
        (lambda: rlhf_kernels.AdaptiveKLController(0.1, 1.0, 10).update(float("nan"), 1), "current_kl"),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- distributed whitening ---------------------------------------------------------------------


def _dist_worker(rank, world, init_file, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        shape = (3, 17)
        mask = _mask_with_holes(shape, seed=100 + rank)
        scores, logp, ref, values = _ppo_inputs(shape, seed=100 + rank)
        rewards, _ = _inputs(shape, torch.float32, seed=100 + rank)
        adv, ret = rlhf_kernels.compute_gae(rewards, values, mask, whiten=True, process_group=dist.group.WORLD)
        out = rlhf_kernels.ppo_advantages(scores, logp, ref, values, mask, kl_coef=0.1, process_group=dist.group.WORLD)
        results[rank] = (adv, ret, out.advantages, out.kl_mean, out.score_mean)
    finally:
        dist.destroy_process_group()


def test_process_group_whitening_is_global():
    import torch.multiprocessing as mp

    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(_dist_worker, args=(world, os.path.join(tmp, "init"), results), nprocs=world, join=True)
        results = dict(results)
    masks, raw_adv, ppo_raw = [], [], []
    kl_all, scores_all = [], []
    for rank in range(world):
        shape = (3, 17)
        mask = _mask_with_holes(shape, seed=100 + rank)
        scores, logp, ref, values = _ppo_inputs(shape, seed=100 + rank)
        rewards, _ = _inputs(shape, torch.float32, seed=100 + rank)
        masks.append(mask)
        raw_adv.append(_loop64(rewards, values, mask, 1.0, 0.95, whiten=False)[0])
        a, _, _, kl = _ppo64(scores, logp, ref, values, mask, 0.1, "k1", 1.0, 0.95, whiten=False)
        ppo_raw.append(a)
        kl_all.append(kl[mask])
        scores_all.append(scores.double())
    mask_all = torch.cat(masks)
    want_gae = reference.masked_whiten(torch.cat(raw_adv), mask_all).split(3)
    want_ppo = reference.masked_whiten(torch.cat(ppo_raw), mask_all).split(3)
    for rank in range(world):
        adv, ret, ppo_adv, kl_mean, score_mean = results[rank]
        _close(adv, want_gae[rank])
        _close(ppo_adv, want_ppo[rank], atol=5e-5)
        torch.testing.assert_close(kl_mean, torch.cat(kl_all).mean())
        torch.testing.assert_close(score_mean, torch.cat(scores_all).mean())
    # Local whitening would differ: the test can tell.
    local = reference.masked_whiten(raw_adv[0], masks[0])
    assert not torch.allclose(local, want_gae[0], atol=1e-3)


def test_triton_scan_order_is_reverse_time():
    """A reward only at t = 0 must not reach later positions; one at the end
    reaches every earlier position (catches a scan running the wrong way)."""
    for backend in rlhf_kernels.available_backends():
        rewards = torch.zeros(1, 20)
        rewards[0, -1] = 1.0
        values = torch.zeros(1, 20)
        adv, _ = rlhf_kernels.compute_gae(rewards, values, None, gamma=1.0, lam=0.5, whiten=False, backend=backend)
        torch.testing.assert_close(adv[0], 0.5 ** torch.arange(19, -1, -1.0))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backends_real_shapes(dtype):
    """Goal #3's GPU shape (B = 512, T = 2048, as bench_advantages times it) and
    a long one (T = 8192), with holes, on every GPU backend, against the
    float64 loop."""
    for shape in [(512, 2048), (8, 8192)]:
        mask = _mask_with_holes(shape, seed=shape[1])
        scores, logp, ref, values = _ppo_inputs(shape, seed=shape[1], dtype=dtype)
        want_adv, want_ret, want_rew, want_kl = _ppo64(scores, logp, ref, values, mask, 0.05, "k3", 1.0, 1.0, True)
        for backend in ("cuda", "triton"):
            if backend not in rlhf_kernels.available_backends():
                continue
            out = rlhf_kernels.ppo_advantages(
                scores.cuda(), logp.cuda(), ref.cuda(), values.cuda(), mask.cuda(), kl_coef=0.05,
                estimator="k3", gamma=1.0, lam=1.0, backend=backend,
            )
            _close(out.kl.cpu(), want_kl)
            _close(out.token_rewards.cpu(), want_rew)
            _close(out.advantages.cpu(), want_adv, atol=1e-4)
            scale = want_ret.abs().max().item()
            _close(out.returns.cpu(), want_ret, atol=3e-6 * scale + 1e-5)


def test_float64_gamma_lam_kl_coef_keep_float64_precision(device_backend):
    """Found by the property tests: the Triton kernel took gamma, lam and kl_coef
    as fp32 kernel arguments, so float64 inputs came back with ~1e-9 relative
    error. They now travel as fp32 (hi, lo) pairs."""
    device, backend = device_backend
    gen = _gen(7)
    logp = -torch.rand(2, 9, generator=gen, dtype=torch.float64)
    ref = logp + torch.randn(2, 9, generator=gen, dtype=torch.float64) * 0.3
    values = torch.randn(2, 9, generator=gen, dtype=torch.float64)
    scores = torch.randn(2, generator=gen, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    gamma, lam, kl_coef = 1.0, 0.1582076003319344, 0.1234567890123
    out = rlhf_kernels.ppo_advantages(scores.to(device), logp.to(device), ref.to(device), values.to(device),
                                      mask.to(device), kl_coef=kl_coef, gamma=gamma, lam=lam, whiten=False,
                                      backend=backend)
    want = reference.ppo_advantages(scores, logp, ref, values, mask, kl_coef=kl_coef, gamma=gamma, lam=lam,
                                    whiten=False)
    for name in ("advantages", "returns", "token_rewards"):
        torch.testing.assert_close(getattr(out, name).cpu(), want[name], atol=1e-13, rtol=1e-13, msg=name)


def _weighted_whiten_reference(adv, weights):
    """verl's masked_whiten, float64: (A - m) / sqrt(v + 1e-8), m the weighted
    mean, v the weighted variance with Bessel's sum(w) / (sum(w) - 1)."""
    w = weights.double()
    a = adv.double()
    m = (a * w).sum() / w.sum()
    v = ((a - m) ** 2 * w).sum() / w.sum() * w.sum() / (w.sum() - 1)
    return torch.where(w != 0, (a - m) / torch.sqrt(v + 1e-8), 0.0)


def test_whitening_weights_tokens_by_a_non_bool_mask(device_backend):
    """A float mask weights each token in the whitening statistics (verl's
    masked_whiten); 0/1 weights give the bool mask's results; the GAE
    recursion reads nonzero as valid."""
    device, backend = device_backend
    gen = torch.Generator().manual_seed(31)
    rewards, values = torch.randn(4, 12, generator=gen), torch.randn(4, 12, generator=gen)
    valid = torch.rand(4, 12, generator=gen) > 0.2
    weights = torch.where(valid, 0.25 + 2 * torch.rand(4, 12, generator=gen), 0.0)
    to = lambda *ts: [t.to(device) for t in ts]  # noqa: E731
    raw, _ = rlhf_kernels.compute_gae(*to(rewards, values, valid), gamma=1.0, lam=0.95, whiten=False,
                                      backend=backend)
    got, _ = rlhf_kernels.compute_gae(*to(rewards, values, weights), gamma=1.0, lam=0.95, backend=backend)
    torch.testing.assert_close(got.cpu().double(), _weighted_whiten_reference(raw.cpu(), weights),
                               rtol=1e-5, atol=1e-5)
    bool_adv, _ = rlhf_kernels.compute_gae(*to(rewards, values, valid), gamma=1.0, lam=0.95, backend=backend)
    float01, _ = rlhf_kernels.compute_gae(*to(rewards, values, valid.float()), gamma=1.0, lam=0.95, backend=backend)
    torch.testing.assert_close(float01, bool_adv, rtol=1e-6, atol=1e-6)
    # ppo_advantages: the same weighted whitening, its advantage_mean / std weighted, num_tokens counted
    scores = torch.randn(4, generator=gen)
    logp, ref = torch.randn(4, 12, generator=gen) - 2, torch.randn(4, 12, generator=gen) - 2
    plain = rlhf_kernels.ppo_advantages(*to(scores, logp, ref, values, valid), kl_coef=0.1, whiten=False,
                                        backend=backend)
    out = rlhf_kernels.ppo_advantages(*to(scores, logp, ref, values, weights), kl_coef=0.1, backend=backend)
    torch.testing.assert_close(out.advantages.cpu().double(),
                               _weighted_whiten_reference(plain.advantages.cpu(), weights), rtol=1e-5, atol=1e-5)
    w = weights.double()
    mean = (plain.advantages.cpu().double() * w).sum() / w.sum()
    assert float(out.advantage_mean) == pytest.approx(float(mean), rel=1e-6, abs=1e-9)
    assert int(out.num_tokens) == int(valid.sum())
    with pytest.raises(ValueError, match="mask: weights must be finite and >= 0"):
        rlhf_kernels.compute_gae(*to(rewards, values, -weights), gamma=1.0, lam=0.95, backend=backend)


# === property tests (hypothesis; run_property and the shared strategies: python_tests/properties.py) ===


# --- kl_penalty -----------------------------------------------------------------------------------


@st.composite
def kl_cases(draw, tiny: bool):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 5 if tiny else 40)) for _ in range(ndim))
    return dict(shape=shape, estimator=draw(st.sampled_from(ESTIMATORS)),
                dtype=draw(dtypes_all), ref_dtype=draw(dtypes_all),
                # 30 takes k3 past its clamps (|x| > 20, result > 10).
                spread=draw(st.sampled_from([0.05, 1.0, 30.0])), seed=draw(seeds))


def _check_kl(device, backend, case):
    gen = generator(case["seed"])
    logp = (-torch.rand(case["shape"], generator=gen, dtype=torch.float64) * 5).to(case["dtype"])
    ref = (logp.double() + torch.randn(case["shape"], generator=gen, dtype=torch.float64) * case["spread"])
    ref = ref.to(case["ref_dtype"])
    grad_out = torch.randn(case["shape"], generator=gen, dtype=torch.float64)
    x = logp.clone().to(device).requires_grad_(True)
    r = ref.clone().to(device).requires_grad_(True)
    kl = rlhf_kernels.kl_penalty(x, r, estimator=case["estimator"], backend=backend)
    common = torch.promote_types(case["dtype"], case["ref_dtype"])
    assert kl.dtype == (torch.float64 if common == torch.float64 else torch.float32)
    x64, r64 = logp.double(), ref.double()
    want = reference.kl_penalty(x64, r64, case["estimator"])
    scale = 1.0 + float(want.abs().max())
    rtol, atol = (1e-10, 1e-10 * scale) if common == torch.float64 else (1e-5, 1e-5 * scale)
    check_close(kl, want, rtol, atol, "kl")
    (kl * grad_out.to(device, kl.dtype)).sum().backward()
    d = reference.kl_penalty_grad(x64, r64, case["estimator"]) * grad_out
    assert x.grad.dtype == case["dtype"] and r.grad.dtype == case["ref_dtype"]
    # k3 sits on exp(): a float32 input error of 1 ulp in (ref - logp) moves its
    # gradient by that much relative to exp(x).
    g_scale = 1.0 + float(d.abs().max())
    check_close(x.grad, d, *grad_tols(case["dtype"], g_scale * 10), "grad logp")
    check_close(r.grad, -d, *grad_tols(case["ref_dtype"], g_scale * 10), "grad ref_logp")


def test_kl_penalty_property(device_backend):
    run_backend_property("kl_penalty", device_backend, kl_cases, _check_kl, native=150, triton=40)


# --- compute_gae and ppo_advantages -------------------------------------------------------------


@st.composite
def gae_cases(draw, tiny: bool):
    layout = draw(st.sampled_from(["padded", "packed"]))
    batch = draw(st.integers(1, 4 if tiny else 9))
    if layout == "padded":
        seq_lens = [draw(st.integers(1, 24 if tiny else 300))] * batch
    else:
        # Packed sequences of any length, empty ones included.
        seq_lens = draw(st.lists(st.integers(0, 20 if tiny else 200), min_size=batch, max_size=batch))
    unit = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0, allow_nan=False))
    return dict(
        layout=layout, seq_lens=seq_lens, dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
        gamma=draw(unit), lam=draw(unit), whiten=draw(st.booleans()),
        mask=draw(st.sampled_from(["none", "full", "holes", "holes+edge-rows"])),
        p_valid=draw(st.sampled_from([0.2, 0.8])), seed=draw(seeds),
    )


def _gae_layout(case, gen):
    """(shape, mask or None, cu_seqlens or None, the (B, T) padded mask, the
    positions of each packed token in that padded view)."""
    lens = case["seq_lens"]
    if case["layout"] == "padded":
        B, T = len(lens), lens[0]
    else:
        B, T = len(lens), max(max(lens), 1)
    if case["mask"] in ("none", "full"):
        mask2 = torch.zeros(B, T, dtype=torch.bool)
        for b, n in enumerate(lens):
            mask2[b, :n] = True
    else:
        mask2 = random_mask((B, T), gen, case["p_valid"], case["mask"] == "holes+edge-rows",
                      case["mask"] == "holes+edge-rows")
        for b, n in enumerate(lens):
            mask2[b, n:] = False
    if case["layout"] == "padded":
        mask = None if case["mask"] == "none" else mask2
        return (B, T), mask, None, mask2, None
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)
    flat = torch.cat([mask2[b, :n] for b, n in enumerate(lens)]) if sum(lens) else torch.zeros(0, dtype=torch.bool)
    where = [(b, t) for b, n in enumerate(lens) for t in range(n)]
    mask = None if case["mask"] == "none" else flat
    return (sum(lens),), mask, cu, mask2, where


def _to_padded(x, where, B, T):
    """A packed (total,) tensor in the (B, T) padded layout (0 elsewhere)."""
    out = torch.zeros(B, T, dtype=torch.float64)
    for i, (b, t) in enumerate(where):
        out[b, t] = float(x[i])
    return out


def _from_padded(x, where):
    return torch.tensor([float(x[b, t]) for b, t in where], dtype=torch.float64)


def _tol(dtype, scale):
    return (1e-9, 1e-9 * scale) if dtype == torch.float64 else (3e-5, 3e-5 * scale)


def _check_whitened(whitened, raw, mask, dtype, what):
    """The whitened output is masked_whiten of the op's own raw advantages:
    checking against the float64 raw ones would amplify harmless float32
    differences by 1 / std when the std is tiny."""
    m = torch.ones(raw.shape, dtype=torch.bool) if mask is None else mask.cpu()
    want = reference.masked_whiten(raw.detach().double().cpu(), m)
    check_close(whitened, want, *_tol(dtype, 1.0), what)


def _check_gae(device, backend, case):
    gen = generator(case["seed"])
    shape, mask, cu, mask2, where = _gae_layout(case, gen)
    dtype = case["dtype"]
    rewards = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    values = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype)
    kwargs = dict(gamma=case["gamma"], lam=case["lam"], backend=backend,
                  cu_seqlens=None if cu is None else cu.to(device))
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    raw, ret = rlhf_kernels.compute_gae(dev(rewards), dev(values), dev(mask), whiten=False, **kwargs)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert raw.dtype == ret.dtype == out_dtype and raw.shape == shape

    B, T = mask2.shape
    if cu is None:
        r2, v2 = rewards.double(), values.double()
    else:
        r2, v2 = _to_padded(rewards, where, B, T), _to_padded(values, where, B, T)
    want_adv, want_ret = reference.gae_loop(r2, v2, mask2, case["gamma"], case["lam"])
    if cu is not None:
        want_adv, want_ret = _from_padded(want_adv, where), _from_padded(want_ret, where)
    scale = 1.0 + float(want_ret.abs().max()) if want_ret.numel() else 1.0
    check_close(raw, want_adv, *_tol(dtype, scale), "advantages")
    check_close(ret, want_ret, *_tol(dtype, scale), "returns")
    valid = torch.ones(shape, dtype=torch.bool) if mask is None else mask
    assert torch.all(raw.cpu()[~valid] == 0) and torch.all(ret.cpu()[~valid] == 0)

    if case["whiten"]:
        adv_w, ret_w = rlhf_kernels.compute_gae(dev(rewards), dev(values), dev(mask), whiten=True, **kwargs)
        check_close(ret_w, ret, 0, 0, "returns (whitened call)")
        _check_whitened(adv_w, raw, mask, dtype, "whitened advantages")


def test_compute_gae_property(device_backend):
    run_backend_property("compute_gae", device_backend, gae_cases, _check_gae, native=150, triton=25)


@st.composite
def ppo_adv_cases(draw, tiny: bool):
    case = draw(gae_cases(tiny))
    case.update(estimator=draw(st.sampled_from(ESTIMATORS)),
                kl_coef=draw(st.sampled_from([0.0, 0.05, 0.3])),
                kl_coef_tensor=draw(st.booleans()))
    return case


def _check_ppo_advantages(device, backend, case):
    gen = generator(case["seed"])
    shape, mask, cu, mask2, where = _gae_layout(case, gen)
    dtype = case["dtype"]
    B, T = mask2.shape
    scores = torch.randn(B, generator=gen, dtype=torch.float64).to(dtype)
    logp = (-torch.rand(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    ref = (logp.double() + torch.randn(shape, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    values = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    kl_coef = torch.tensor(case["kl_coef"], dtype=torch.float64).to(device) if case["kl_coef_tensor"] else case["kl_coef"]
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    out = rlhf_kernels.ppo_advantages(
        dev(scores), dev(logp), dev(ref), dev(values), dev(mask), kl_coef=kl_coef, estimator=case["estimator"],
        gamma=case["gamma"], lam=case["lam"], whiten=case["whiten"], cu_seqlens=dev(cu), backend=backend,
    )
    raw = rlhf_kernels.ppo_advantages(
        dev(scores), dev(logp), dev(ref), dev(values), dev(mask), kl_coef=kl_coef, estimator=case["estimator"],
        gamma=case["gamma"], lam=case["lam"], whiten=False, cu_seqlens=dev(cu), backend=backend,
    ).advantages

    # From the formulas, float64, in the padded view.
    pad = (lambda x: x.double()) if cu is None else (lambda x: _to_padded(x, where, B, T))  # noqa: E731
    unpad = (lambda x: x) if cu is None else (lambda x: _from_padded(x, where))  # noqa: E731
    kl2 = torch.where(mask2, reference.kl_penalty(pad(logp), pad(ref), case["estimator"]), 0.0)
    rewards2 = reference.shape_rewards(scores.double(), kl2, mask2, case["kl_coef"])
    adv2, ret2 = reference.gae_loop(rewards2, pad(values), mask2, case["gamma"], case["lam"])
    scale = 1.0 + float(ret2.abs().max())
    check_close(out.kl, unpad(kl2), *_tol(dtype, 1.0 + float(kl2.abs().max())), "kl")
    check_close(out.token_rewards, unpad(rewards2), *_tol(dtype, 1.0 + float(rewards2.abs().max())), "token_rewards")
    check_close(raw, unpad(adv2), *_tol(dtype, scale), "advantages")
    check_close(out.returns, unpad(ret2), *_tol(dtype, scale), "returns")
    if case["whiten"]:
        _check_whitened(out.advantages, raw, mask, dtype, "whitened advantages")
    else:
        check_close(out.advantages, raw, 0, 0, "advantages (whiten=False)")

    n = int(mask2.sum())
    assert int(out.num_tokens) == n
    stat_tol = dict(rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(out.kl_mean.cpu(), kl2.sum() / max(n, 1), **stat_tol)
    torch.testing.assert_close(out.kl_sum_mean.cpu(), kl2.sum() / max(B, 1), **stat_tol)
    torch.testing.assert_close(out.score_mean.cpu(), scores.double().mean() if B else torch.tensor(0.0, dtype=torch.float64), **stat_tol)
    valid_adv = adv2[mask2]
    torch.testing.assert_close(out.advantage_mean.cpu(), valid_adv.mean() if n else torch.tensor(0.0, dtype=torch.float64), **stat_tol)
    torch.testing.assert_close(out.advantage_std.cpu(), valid_adv.std() if n > 1 else torch.tensor(0.0, dtype=torch.float64), **stat_tol)


def test_ppo_advantages_property(device_backend):
    run_backend_property("ppo_advantages", device_backend, ppo_adv_cases, _check_ppo_advantages, native=120, triton=25)


# --- group_advantages and the adaptive KL controller (plain PyTorch, one backend) -------------


@st.composite
def group_cases(draw):
    use_ids = draw(st.booleans())
    if use_ids:
        batch = draw(st.integers(1, 40))
        ids = draw(st.lists(st.integers(-5, 1000), min_size=batch, max_size=batch))
        group_size = None
    else:
        group_size = draw(st.integers(1, 8))
        batch = group_size * draw(st.integers(1, 6))
        ids = None
    return dict(batch=batch, group_size=group_size, ids=ids, mode=draw(st.sampled_from(["grpo", "dr_grpo", "rloo"])),
                # 0/1 rewards (verifiable tasks: ties, all-equal groups) or continuous scores
                binary=draw(st.booleans()), dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
                eps=draw(st.sampled_from([1e-6, 1e-4])), seed=draw(seeds))


def _check_group(case):
    gen = generator(case["seed"])
    raw = torch.randn(case["batch"], generator=gen, dtype=torch.float64)
    scores = ((raw > 0).double() if case["binary"] else raw).to(case["dtype"])
    ids = None if case["ids"] is None else torch.tensor(case["ids"], dtype=torch.int64)
    got = rlhf_kernels.group_advantages(scores, case["group_size"], ids, mode=case["mode"], eps=case["eps"])
    want = reference.group_advantages(scores.double(), case["group_size"], ids, mode=case["mode"], eps=case["eps"])
    assert got.shape == scores.shape
    # grpo divides by (std + eps): float32 means carry eps32 * |s| / eps.
    amplify = 1.0 / case["eps"] if case["mode"] == "grpo" else 1.0
    tol = 1e-12 if case["dtype"] == torch.float64 else 2e-7
    check_close(got, want, 1e-5, tol * amplify * (1.0 + float(scores.double().abs().max())), "group advantages")


def test_group_advantages_property():
    run_property("group_advantages", "pytorch", group_cases(), _check_group, native=200, triton=0)


@st.composite
def kl_controller_cases(draw):
    return dict(init=draw(st.floats(0.0, 1.0)), target=draw(st.floats(0.01, 10.0)),
                horizon=draw(st.floats(1.0, 1e5)),
                steps=draw(st.lists(st.tuples(st.floats(0.0, 50.0), st.integers(1, 1024)), min_size=1, max_size=8)),
                as_tensor=draw(st.booleans()))


def _check_kl_controller(case):
    ctl = rlhf_kernels.AdaptiveKLController(case["init"], case["target"], case["horizon"])
    want = case["init"]
    for kl, n_steps in case["steps"]:
        err = min(max(kl / case["target"] - 1.0, -0.2), 0.2)
        want *= 1.0 + err * n_steps / case["horizon"]
        got = ctl.update(torch.tensor(kl, dtype=torch.float64) if case["as_tensor"] else kl, n_steps)
    assert float(got) == pytest.approx(want, rel=1e-12, abs=1e-15)
    restored = rlhf_kernels.AdaptiveKLController(1.0, 1.0, 1.0)
    restored.load_state_dict(ctl.state_dict())
    assert float(restored.value) == float(ctl.value)


def test_adaptive_kl_controller_property():
    run_property("kl_controller", "pytorch", kl_controller_cases(), _check_kl_controller, native=200, triton=0)


def test_group_modes_opo_and_passk_match_a_float64_loop():
    """group_advantages' opo, grpo_passk and passk against a per-group loop in
    float64, on unsorted integer ids, ties and a group of one (0 in every mode)."""
    gen = torch.Generator().manual_seed(48)
    ids = torch.tensor([3, 1, 3, 7, 1, 3, 9, 7, 1, 3])
    scores = torch.randn(10, generator=gen, dtype=torch.float64)
    scores[[0, 2]] = scores[[0, 2, 5, 9]].max() + 0.5  # group 3's best tied
    lengths = torch.randint(1, 9, (10,), generator=gen)
    for mode in ("opo", "grpo_passk", "passk"):
        kw = dict(lengths=lengths) if mode == "opo" else {}
        got = rlhf_kernels.group_advantages(scores.float(), group_ids=ids, mode=mode, eps=1e-6, **kw)
        want = torch.zeros(10, dtype=torch.float64)
        for g in ids.unique():
            idx = torch.nonzero(ids == g).squeeze(-1)
            s = scores[idx]
            if len(idx) < 2:
                continue
            if mode == "opo":
                l64 = lengths[idx].double()
                want[idx] = s - (l64 * s).sum() / l64.sum()
            else:
                top = torch.sort(s, descending=True).values
                if top[0] > top[1]:
                    gap = top[0] - top[1]
                    want[idx[s.argmax()]] = gap / (s.std() + 1e-6) if mode == "grpo_passk" else gap
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    assert torch.all(rlhf_kernels.group_advantages(scores, group_ids=ids, mode="passk")[ids == 3] == 0)
    with pytest.raises(ValueError, match="lengths"):
        rlhf_kernels.group_advantages(scores, group_ids=ids, mode="opo")
    with pytest.raises(ValueError, match="lengths"):
        rlhf_kernels.group_advantages(scores, group_ids=ids, mode="grpo", lengths=lengths)
    with pytest.raises(ValueError, match="lengths"):
        rlhf_kernels.group_advantages(scores, group_ids=ids, mode="opo", lengths=lengths[:5])

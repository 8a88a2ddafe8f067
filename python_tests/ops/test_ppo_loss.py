"""ppo_policy_loss, ppo_value_loss and ppo_loss_from_logits against float64
references written from the formulas (rlhf_kernels.reference), on every backend
present, gradients included."""

import math

import pytest
import torch
from hypothesis import strategies as st

import rlhf_kernels
from rlhf_kernels import reference
from rlhf_kernels import _dispatch

from helpers import (LARGE_LOGITS, assert_no_worse_than_torch, check_stats, gpu, large_logits, policy_tokens,
                     probable_labels)
from properties import ESTIMATORS, check_close, generator, grad_tols, random_mask, run_backend_property, seeds

AGGS = reference.AGG_MODES
# (clip_low, clip_high, dual_clip): symmetric; asymmetric (DAPO clip-higher) with dual clip.
CLIPS = [(0.2, None, None), (0.2, 0.28, 3.0)]
# float32 kernels against float64 on the same inputs: loss and gradient.
F32 = dict(atol=1e-6, rtol=1e-5)


# --- policy loss --------------------------------------------------------------------------


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip", CLIPS, ids=["symmetric", "asym-dual"])
def test_policy_loss_matches_float64(device_backend, agg, clip):
    device, backend = device_backend
    clip_low, clip_high, dual = clip
    logp, old, adv, mask = policy_tokens((5, 123), device)  # odd T: partial chunks everywhere
    kwargs = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual, agg=agg)
    x = logp.clone().requires_grad_(True)
    loss, stats = rlhf_kernels.ppo_policy_loss(x, old, adv, mask, backend=backend, **kwargs)
    loss.backward()
    assert loss.dim() == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)

    x64 = logp.double().requires_grad_(True)
    want, want_stats = reference.ppo_policy_loss(x64, old.double(), adv.double(), mask, **kwargs)
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), **F32)
    grad = torch.where(mask, x.grad, 0.0)
    torch.testing.assert_close(grad.double(), torch.where(mask, x64.grad, 0.0), **F32)
    assert torch.all(x.grad[~mask] == 0)  # no gradient to masked (NaN) slots
    check_stats(stats, want_stats)
    # The test data really exercises what it claims to.
    assert 0.1 < stats["clipfrac"] < 0.9 and stats["ratio_max"] > 1e8
    if dual is not None:
        assert stats["clipfrac_lower"] > 0.05


def test_policy_clipfrac_asymmetric_differs():
    """clip_high really is used: a wider upper clip clips fewer tokens."""
    logp, old, adv, mask = policy_tokens((4, 200), "cpu", seed=3, scale=0.15)
    _, sym = rlhf_kernels.ppo_policy_loss(logp, old, adv, mask, clip_low=0.1)
    _, asym = rlhf_kernels.ppo_policy_loss(logp, old, adv, mask, clip_low=0.1, clip_high=0.4)
    assert asym["clipfrac"] < sym["clipfrac"]


def test_policy_ties_follow_autograd(device_backend):
    """Ties of max / min and clamp boundaries, in float64, give exactly the
    gradient torch autograd gives the reference (half to each side of a tie,
    clamp inclusive)."""
    device, backend = device_backend
    logp = torch.tensor([[-1.0, -2.0, -3.0, 20.0, -20.5, -0.5, -4.0, -1.0]], dtype=torch.float64)
    old = torch.tensor([[-1.0, -2.0, -3.0, 0.0, -0.5, -0.5, -4.0, -1.0 - 2.0]], dtype=torch.float64)
    # ratio 1 (l1 == l2), A = 0 (l1 == l2 == l3 = 0), log-ratio exactly +20 and -20,
    # negative advantage at ratio 1; the last token: ratio e^2 with A < 0 and
    # dual clip c = e^2 computed the same way as the kernels do (a dual tie).
    adv = torch.tensor([[0.7, 0.0, -0.3, 1.0, -1.0, -2.0, 0.0, -1.5]], dtype=torch.float64)
    mask = torch.ones_like(adv, dtype=torch.bool)
    dual = float(torch.exp(torch.tensor(2.0, dtype=torch.float64)))
    for kwargs in (dict(), dict(dual_clip=dual)):
        x = logp.clone().to(device).requires_grad_(True)
        loss, _ = rlhf_kernels.ppo_policy_loss(x, old.to(device), adv.to(device), mask.to(device),
                                               agg="token-sum", backend=backend, **kwargs)
        loss.backward()
        x64 = logp.clone().requires_grad_(True)
        want, _ = reference.ppo_policy_loss(x64, old, adv, mask, agg="token-sum", **kwargs)
        want.backward()
        torch.testing.assert_close(loss.cpu(), want.detach(), atol=1e-12, rtol=0)
        torch.testing.assert_close(x.grad.cpu(), x64.grad, atol=1e-12, rtol=0)
    assert x64.grad[0, -1] == pytest.approx(0.5 * 1.5 * dual)  # the dual tie halves


def test_policy_and_value_nan_token_gives_nan_loss(device_backend):
    """A NaN in a valid token makes the loss NaN (a diverged run must show), on every
    backend; NaN in masked tokens is never read."""
    device, backend = device_backend
    logp, old, adv, mask = policy_tokens((3, 40), device, seed=9)
    valid = mask.nonzero()[0].tolist()
    for name in ("logp", "old", "adv"):
        ins = {"logp": logp.clone(), "old": old.clone(), "adv": adv.clone()}
        ins[name][valid[0], valid[1]] = float("nan")
        loss, _ = rlhf_kernels.ppo_policy_loss(ins["logp"], ins["old"], ins["adv"], mask, backend=backend)
        assert torch.isnan(loss), name
    values = torch.where(mask, torch.randn(3, 40, device=device), float("nan"))
    values[valid[0], valid[1]] = float("nan")
    loss, _ = rlhf_kernels.ppo_value_loss(values, torch.zeros_like(values), torch.zeros_like(values), mask,
                                          backend=backend)
    assert torch.isnan(loss)


def test_policy_gradcheck_float64(device_backend):
    device, backend = device_backend
    logp, old, adv, mask = policy_tokens((3, 17), device, dtype=torch.float64, seed=5, scale=0.3)
    logp = torch.where(mask, logp, 0.0)
    for agg in ("token-mean", "seq-mean-token-mean"):
        def f(inp):
            return rlhf_kernels.ppo_policy_loss(inp, old, adv, mask, clip_high=0.3, dual_clip=2.0,
                                                agg=agg, backend=backend)[0]
        assert torch.autograd.gradcheck(f, (logp.clone().requires_grad_(True),), eps=1e-7, atol=1e-7)


def test_policy_num_tokens_and_num_seqs(device_backend):
    device, backend = device_backend
    logp, old, adv, mask = policy_tokens((4, 31), device, seed=7)
    for agg, kw in (("token-mean", dict(num_tokens=1000)), ("seq-mean-token-sum", dict(num_seqs=16)),
                    ("seq-mean-token-mean", dict(num_seqs=9)), ("seq-mean-token-sum-norm", dict(num_seqs=5))):
        x = logp.clone().requires_grad_(True)
        loss, _ = rlhf_kernels.ppo_policy_loss(x, old, adv, mask, agg=agg, backend=backend, **kw)
        loss.backward()
        x64 = logp.double().requires_grad_(True)
        want, _ = reference.ppo_policy_loss(x64, old.double(), adv.double(), mask, agg=agg, **kw)
        want.backward()
        torch.testing.assert_close(loss.double(), want.detach(), **F32)
        torch.testing.assert_close(torch.where(mask, x.grad, 0.0).double(), torch.where(mask, x64.grad, 0.0), **F32)


@pytest.mark.parametrize("agg", AGGS)
def test_counts_as_device_tensors_equal_float_counts(device_backend, agg):
    """Global counts given as 0-dim tensors (all-reduced on the GPU, as verl and
    OpenRLHF pass them) give the float-count loss, gradient and aggregated stats,
    for the three losses, without a host synchronisation (compiles fullgraph)."""
    device, backend = device_backend
    logp, old, adv, mask = policy_tokens((3, 23), device, seed=17)
    counts = dict(num_tokens=57.0, num_seqs=5.0)
    tensors = {k: torch.tensor(v, device=device) for k, v in counts.items()}
    results = []
    for kw in (counts, tensors):
        x = logp.clone().requires_grad_(True)
        p, _ = rlhf_kernels.ppo_policy_loss(x, old, adv, mask, agg=agg, backend=backend, **kw)
        v, _ = rlhf_kernels.ppo_value_loss(x, old, adv, mask, agg=agg, backend=backend, **kw)
        (p + v).backward()
        results.append((p.detach(), v.detach(), x.grad))
    torch.testing.assert_close(results[1], results[0], atol=1e-7, rtol=1e-6)
    logits, labels, lold, ladv, lmask, ref = _logits_inputs((2, 5, 37), device, seed=18)
    outs = []
    for kw in (counts, tensors):
        x = logits.clone().requires_grad_(True)
        loss, stats = rlhf_kernels.ppo_loss_from_logits(x, labels, lold, ladv, lmask, ref_logp=ref, kl_coef=0.1,
                                                        entropy_coef=0.01, agg=agg, backend=backend, **kw)
        loss.backward()
        outs.append((loss.detach(), stats["pg_loss"], stats["kl"], stats["entropy"], x.grad))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-7, rtol=1e-6)
    if agg == "token-mean" and backend != "triton":
        compiled = torch.compile(lambda a, n: rlhf_kernels.ppo_policy_loss(a, old, adv, mask, num_tokens=n,
                                                                           backend=backend)[0], fullgraph=True)
        torch.testing.assert_close(compiled(logp, tensors["num_tokens"]), results[0][0], atol=1e-7, rtol=1e-6)
    with pytest.raises(ValueError, match="num_tokens"):
        rlhf_kernels.ppo_policy_loss(logp, old, adv, mask, num_tokens=torch.ones(2, device=device), backend=backend)


@pytest.mark.parametrize("agg", AGGS)
def test_no_valid_token_gives_zero(device_backend, agg):
    device, backend = device_backend
    logp = torch.full((3, 10), float("nan"), device=device, requires_grad=True)
    mask = torch.zeros(3, 10, dtype=torch.bool, device=device)
    nan = torch.full((3, 10), float("nan"), device=device)
    loss, stats = rlhf_kernels.ppo_policy_loss(logp, nan, nan, mask, agg=agg, dual_clip=3.0, backend=backend)
    loss.backward()
    assert loss.item() == 0 and torch.all(logp.grad == 0)
    assert all(v.item() == 0 for v in stats.values())
    values = torch.full((3, 10), float("nan"), device=device, requires_grad=True)
    vloss, vstats = rlhf_kernels.ppo_value_loss(values, nan, nan, mask, agg=agg, backend=backend)
    vloss.backward()
    assert vloss.item() == 0 and torch.all(values.grad == 0) and vstats["vf_clipfrac"].item() == 0


def test_empty_batch_and_length_one(device_backend):
    device, backend = device_backend
    for shape in ((0, 7), (4, 0)):
        x = torch.randn(shape, device=device, requires_grad=True)
        mask = torch.ones(shape, dtype=torch.bool, device=device)
        loss, stats = rlhf_kernels.ppo_policy_loss(x, x.detach(), x.detach(), mask, agg="seq-mean-token-mean", backend=backend)
        loss.backward()
        assert loss.item() == 0 and x.grad.shape == shape and stats["ratio_max"].item() == 0
    x = torch.randn(0, 4, 10, device=device, requires_grad=True)
    z = torch.zeros(0, 4, device=device)
    loss, _ = rlhf_kernels.ppo_loss_from_logits(x, z.long(), z, z, z.bool(), entropy_coef=0.1, backend=backend)
    loss.backward()
    assert loss.item() == 0 and x.grad.shape == (0, 4, 10)
    logp, old, adv, mask = policy_tokens((6, 1), device, seed=2)  # length-1 sequences
    got, _ = rlhf_kernels.ppo_policy_loss(logp, old, adv, mask, agg="seq-mean-token-mean", backend=backend)
    want, _ = reference.ppo_policy_loss(logp.double(), old.double(), adv.double(), mask, agg="seq-mean-token-mean")
    torch.testing.assert_close(got.double(), want, **F32)


def test_every_output_written(device_backend, poison_uninitialized):
    device, backend = device_backend
    logp, old, adv, mask = policy_tokens((3, 70), device, seed=4)
    x = logp.clone().requires_grad_(True)
    loss, stats = rlhf_kernels.ppo_policy_loss(x, old, adv, mask, agg="seq-mean-token-mean", backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(v) for v in stats.values())
    v = torch.where(mask, logp, 0.0).requires_grad_(True)
    vloss, vstats = rlhf_kernels.ppo_value_loss(v, old, adv, mask, backend=backend)
    vloss.backward()
    assert torch.isfinite(vloss) and torch.isfinite(v.grad).all() and torch.isfinite(vstats["vf_clipfrac"])


def test_bf16_inputs_no_worse_than_torch(device_backend):
    device, backend = device_backend
    logp, old, adv, mask = policy_tokens((4, 100), device, seed=8, dtype=torch.bfloat16, scale=0.3)
    logp = torch.where(mask, logp, 0.0)
    x = logp.clone().requires_grad_(True)
    loss, _ = rlhf_kernels.ppo_policy_loss(x, old, adv, mask, agg="seq-mean-token-mean", backend=backend)
    loss.backward()
    assert x.grad.dtype == torch.bfloat16
    x64 = logp.double().requires_grad_(True)
    want, _ = reference.ppo_policy_loss(x64, old, adv, mask, agg="seq-mean-token-mean")
    want.backward()
    xb = logp.clone().requires_grad_(True)
    torch_bf16, _ = reference.ppo_policy_loss(xb, old, adv, mask, agg="seq-mean-token-mean", upcast=False)
    torch_bf16.backward()
    assert_no_worse_than_torch(loss, want, torch_bf16)
    assert_no_worse_than_torch(x.grad, x64.grad, xb.grad)


# --- value loss ---------------------------------------------------------------------------


@pytest.mark.parametrize("agg", AGGS)
def test_value_loss_matches_float64(device_backend, agg):
    device, backend = device_backend
    gen = torch.Generator().manual_seed(11)
    values = torch.randn(5, 123, generator=gen)
    old = values + torch.randn(5, 123, generator=gen) * 0.4  # about half outside clip 0.2
    returns = torch.randn(5, 123, generator=gen)
    mask = torch.rand(5, 123, generator=gen) > 0.25
    mask[2] = False
    values, old, returns, mask = (t.to(device) for t in (values, old, returns, mask))
    v = values.clone().requires_grad_(True)
    loss, stats = rlhf_kernels.ppo_value_loss(v, old, returns, mask, clip=0.2, agg=agg, backend=backend)
    loss.backward()
    v64 = values.double().requires_grad_(True)
    want, want_stats = reference.ppo_value_loss(v64, old.double(), returns.double(), mask, clip=0.2, agg=agg)
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), **F32)
    torch.testing.assert_close(v.grad.double(), torch.where(mask, v64.grad, 0.0), **F32)
    check_stats(stats, want_stats)
    assert 0.1 < stats["vf_clipfrac"] < 0.9


def test_value_in_range_is_never_clipped(device_backend):
    """|values - old| <= clip is a tie in exact arithmetic (v_clipped == values):
    no token may count as clipped, in float32 as in float64 (the rounded
    old + (values - old) differs from values in some tokens)."""
    device, backend = device_backend
    gen = torch.Generator().manual_seed(13)
    for dtype in (torch.float32, torch.float64):
        values = torch.randn(4, 1500, generator=gen, dtype=dtype) * 3
        old = values + (torch.rand(4, 1500, generator=gen, dtype=dtype) - 0.5) * 0.39  # |diff| < 0.2
        returns = torch.randn(4, 1500, generator=gen, dtype=dtype) * 3
        assert ((old + (values - old)) != values).any()  # the rounding the kernels must not count
        mask = torch.ones(4, 1500, dtype=torch.bool)
        v = values.to(device).requires_grad_(True)
        loss, stats = rlhf_kernels.ppo_value_loss(v, old.to(device), returns.to(device), mask.to(device),
                                                  clip=0.2, backend=backend)
        loss.backward()
        assert stats["vf_clipfrac"].item() == 0.0
        torch.testing.assert_close(v.grad.cpu(), (values - returns) / values.numel(), atol=1e-7, rtol=1e-6)


def test_long_packed_sequence_sums_stay_accurate(device_backend):
    """One 1-D sequence of 4M tokens: the per-token kernels sum in chunks, so the
    float32 loss and statistics keep float32 accuracy instead of drifting with
    the sequence length (a running float32 sum over 4M tokens is off by ~1e-4)."""
    device, backend = device_backend
    # 4M tokens; 64k (64 chunks) under the Triton interpreter, which is slow.
    n = 1 << 16 if backend == "triton" and device == "cpu" else 1 << 22
    gen = torch.Generator().manual_seed(14)
    values = torch.rand(n, generator=gen) + 1.0
    old = values + (torch.rand(n, generator=gen) - 0.5)
    returns = values + 0.3
    mask = torch.ones(n, dtype=torch.bool)
    logp = -torch.rand(n, generator=gen)
    old_logp = logp + (torch.rand(n, generator=gen) - 0.5) * 0.1
    adv = torch.rand(n, generator=gen) + 0.5
    to = lambda *ts: [t.to(device) for t in ts]  # noqa: E731
    loss, stats = rlhf_kernels.ppo_value_loss(*to(values, old, returns, mask), clip=0.2, backend=backend)
    want, want_stats = reference.ppo_value_loss(values.double(), old.double(), returns.double(), mask, clip=0.2)
    torch.testing.assert_close(loss.double().cpu(), want, atol=0, rtol=2e-6)
    torch.testing.assert_close(stats["vf_clipfrac"].double().cpu(), want_stats["vf_clipfrac"], atol=0, rtol=2e-6)
    ploss, pstats = rlhf_kernels.ppo_policy_loss(*to(logp, old_logp, adv, mask), backend=backend)
    pwant, pwant_stats = reference.ppo_policy_loss(logp.double(), old_logp.double(), adv.double(), mask)
    torch.testing.assert_close(ploss.double().cpu(), pwant, atol=0, rtol=2e-6)
    torch.testing.assert_close(pstats["approx_kl"].double().cpu(), pwant_stats["approx_kl"], atol=1e-9, rtol=2e-5)


def test_value_gradcheck_float64(device_backend):
    device, backend = device_backend
    gen = torch.Generator().manual_seed(12)
    values, old, returns = (torch.randn(3, 13, generator=gen, dtype=torch.float64).to(device) for _ in range(3))
    mask = (torch.rand(3, 13, generator=gen) > 0.2).to(device)

    def f(inp):
        return rlhf_kernels.ppo_value_loss(inp, old, returns, mask, clip=0.5, agg="seq-mean-token-mean", backend=backend)[0]

    assert torch.autograd.gradcheck(f, (values.clone().requires_grad_(True),), eps=1e-7, atol=1e-7)


# --- loss from logits ---------------------------------------------------------------------


def _logits_inputs(shape, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B, T, V = shape
    logits = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2).to(dtype).to(device)
    labels = torch.randint(0, V, (B, T), generator=gen).to(device)
    with torch.no_grad():
        logp = reference.logprobs_from_logits(logits.double(), labels)
    old = (logp + torch.randn(B, T, generator=gen, dtype=torch.float64).to(device) * 0.5).float()
    ref = (logp + torch.randn(B, T, generator=gen, dtype=torch.float64).to(device) * 0.5).float()
    adv = torch.randn(B, T, generator=gen).to(device)
    mask = (torch.rand(B, T, generator=gen) > 0.2).to(device)
    mask[0, -1] = False
    labels[0, -1] = -100  # ignored label on a masked slot
    return logits, labels, old, adv, mask, ref


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(clip_high=0.28, dual_clip=3.0, agg="seq-mean-token-mean", ref_logp=True, kl_coef=0.1,
             kl_estimator="k3", entropy_coef=0.01, temperature=0.7),
        dict(agg="seq-mean-token-sum-norm", ref_logp=True, kl_coef=0.05, kl_estimator="k1", entropy_coef=0.02),
        dict(agg="token-sum", ref_logp=True, kl_coef=0.2, kl_estimator="abs"),
        dict(agg="seq-mean-token-sum", ref_logp=True, kl_coef=0.3, kl_estimator="mse", dual_clip=2.0),
    ],
    ids=["defaults", "k3-entropy-dual-T0.7", "k1-norm", "abs-sum", "k2-dual"],
)
def test_loss_from_logits_matches_float64_composition(device_backend, kwargs):
    device, backend = device_backend
    logits, labels, old, adv, mask, ref = _logits_inputs((3, 7, 301), device)
    kwargs = dict(kwargs)
    if kwargs.pop("ref_logp", False):
        kwargs["ref_logp"] = ref
    x = logits.clone().requires_grad_(True)
    loss, stats = rlhf_kernels.ppo_loss_from_logits(x, labels, old, adv, mask, backend=backend, **kwargs)
    loss.backward()
    x64 = logits.double().requires_grad_(True)
    want, want_stats = reference.ppo_loss_from_logits(x64, labels, old.double(), adv.double(), mask, **kwargs)
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), **F32)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-6, rtol=1e-4)
    check_stats(stats, want_stats, atol=1e-5, rtol=1e-5)
    assert torch.all(x.grad[~mask] == 0)


def test_loss_from_logits_strided_and_inplace(device_backend):
    """logits[:, :-1] read in place; with inplace_backward the gradient lands in
    the logits buffer and equals the out-of-place one."""
    device, backend = device_backend
    full, labels, old, adv, mask, ref = _logits_inputs((2, 9, 130), device, seed=3)
    labels, old, adv, mask, ref = (t[:, :-1] for t in (labels, old, adv, mask, ref))
    kwargs = dict(ref_logp=ref, kl_coef=0.1, entropy_coef=0.01, agg="seq-mean-token-mean", backend=backend)
    grads = {}
    for inplace in (False, True):
        leaf = full.clone().requires_grad_(True)
        work = leaf * 1
        loss, _ = rlhf_kernels.ppo_loss_from_logits(work[:, :-1], labels, old, adv, mask,
                                                    inplace_backward=inplace, **kwargs)
        loss.backward()
        grads[inplace] = (leaf.grad, work)
    # The in-place and out-of-place backwards may vectorise differently:
    # rounding-level differences (1.5e-8 absolute seen on an AMD EPYC).
    torch.testing.assert_close(grads[True][0], grads[False][0], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(grads[True][1].detach()[:, :-1], grads[False][0][:, :-1], atol=1e-7, rtol=1e-6)
    x64 = full[:, :-1].double().requires_grad_(True)
    kwargs.pop("backend")
    want, _ = reference.ppo_loss_from_logits(x64, labels, old.double(), adv.double(), mask, **kwargs)
    want.backward()
    torch.testing.assert_close(grads[False][0][:, :-1].double(), x64.grad, atol=1e-6, rtol=1e-4)
    assert torch.all(grads[False][0][:, -1] == 0)


def test_loss_from_logits_upstream_gradient_scales_the_forward_gradient(device_backend):
    """The logits gradient is written during the forward for a unit upstream
    gradient: a scaled loss (gradient accumulation) and a sum with another term
    and a second backward through a retained graph must still be exact."""
    device, backend = device_backend
    logits, labels, old, adv, mask, ref = _logits_inputs((2, 5, 67), device, seed=9)
    kwargs = dict(ref_logp=ref, kl_coef=0.1, entropy_coef=0.01)
    x64 = logits.double().requires_grad_(True)
    want, _ = reference.ppo_loss_from_logits(x64, labels, old.double(), adv.double(), mask, **kwargs)
    (want_grad,) = torch.autograd.grad(want, x64)
    x = logits.clone().requires_grad_(True)
    loss, _ = rlhf_kernels.ppo_loss_from_logits(x, labels, old, adv, mask, backend=backend, **kwargs)
    (0.25 * loss + x.square().sum()).backward(retain_graph=True)
    torch.testing.assert_close(x.grad.double(), 0.25 * want_grad + 2 * logits.double(), atol=1e-6, rtol=1e-4)
    x.grad = None
    loss.backward(retain_graph=True)  # upstream gradient exactly 1: the forward's buffer as it is
    torch.testing.assert_close(x.grad.double(), want_grad, atol=1e-6, rtol=1e-4)
    (g,) = torch.autograd.grad(loss * 3, x)  # and once more, scaled
    torch.testing.assert_close(g.double(), 3 * want_grad, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # no gradient wanted: forward only, same loss
        again, _ = rlhf_kernels.ppo_loss_from_logits(x, labels, old, adv, mask, backend=backend, **kwargs)
    torch.testing.assert_close(again, loss.detach(), atol=0, rtol=0)


def test_loss_from_logits_float16_with_a_grad_scaler_sized_upstream_gradient(device_backend):
    """float16 logits: the gradient must not be rounded to float16 before the
    upstream scale (GradScaler's 65536) is applied, or it is inf / NaN or
    underflows: it is then written in the backward, scaled."""
    device, backend = device_backend
    logits, labels, old, adv, mask, ref = _logits_inputs((2, 8, 301), device, dtype=torch.float16, seed=12)
    x = logits.clone().requires_grad_(True)
    # A global token count (data parallel) makes the unscaled gradient ~1e-9:
    # below float16's range until it is scaled.
    kwargs = dict(num_tokens=1e5)
    loss, _ = rlhf_kernels.ppo_loss_from_logits(x, labels, old, adv, mask, backend=backend, **kwargs)
    (loss * 65536.0).backward()
    x64 = logits.double().requires_grad_(True)
    want, _ = reference.ppo_loss_from_logits(x64, labels, old.double(), adv.double(), mask, **kwargs)
    (want * 65536.0).backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=2e-3)


def test_loss_from_logits_no_double_backward(device_backend):
    """Every kernel loss computes its gradient in the forward: a second
    derivative (create_graph=True) is an error, never a silent 0. (The
    eager backend's token losses are torch autograd: their second
    derivative is the true one.)"""
    device, backend = device_backend
    logits, labels, old, adv, mask, _ = _logits_inputs((2, 3, 41), device, seed=13)
    x = logits.clone().requires_grad_(True)
    loss, _ = rlhf_kernels.ppo_loss_from_logits(x, labels, old, adv, mask, backend=backend)
    if backend == "eager":
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        x64 = logits.double().requires_grad_(True)
        want, _ = reference.ppo_loss_from_logits(x64, labels, old.double(), adv.double(), mask)
        (g64,) = torch.autograd.grad(want, x64, create_graph=True)
        torch.testing.assert_close(g.double(), g64, **F32)
    else:
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(loss, x, create_graph=True)
    logp, old, adv, mask = policy_tokens((2, 9), device, seed=14)
    for loss_fn in (rlhf_kernels.ppo_policy_loss, rlhf_kernels.ppo_value_loss):
        x = logp.clone().requires_grad_(True)
        loss, _ = loss_fn(x, old, adv, mask, backend=backend)
        if backend == "eager":
            (g,) = torch.autograd.grad(loss, x, create_graph=True)
            x64 = logp.double().requires_grad_(True)
            ref_fn = getattr(reference, loss_fn.__name__)
            (g64,) = torch.autograd.grad(ref_fn(x64, old.double(), adv.double(), mask)[0], x64, create_graph=True)
            torch.testing.assert_close(torch.where(mask, g, 0.0).double(), torch.where(mask, g64, 0.0), **F32)
            continue
        with pytest.raises(RuntimeError, match=f"{loss_fn.__name__}: no double backward"):
            torch.autograd.grad(loss, x, create_graph=True)


def test_empty_time_axis_gives_zero_in_every_mode(device_backend):
    """T = 0: every aggregation gives 0 (seq-mean-token-sum-norm divided by T = 0 gave NaN)."""
    device, backend = device_backend
    z = torch.zeros(3, 0, device=device)
    for agg in AGGS:
        for loss_fn in (rlhf_kernels.ppo_policy_loss, rlhf_kernels.ppo_value_loss):
            loss, _ = loss_fn(z, z, z, z.bool(), agg=agg, backend=backend)
            assert loss.item() == 0, (loss_fn.__name__, agg)
        assert reference.ppo_policy_loss(z, z, z, z.bool(), agg=agg)[0].item() == 0


def test_compiled_loss_with_a_changing_float_count():
    """A float count that changes every step (a global token count) becomes a
    symbolic float under torch.compile: the checks must take it (math.isfinite
    could not), so one graph serves every step, fullgraph."""
    logp, old, adv, mask = policy_tokens((2, 9), "cpu", seed=15)
    compiled = torch.compile(lambda n, c: rlhf_kernels.ppo_policy_loss(logp, old, adv, mask, num_tokens=n,
                                                                       clip_low=c)[0], fullgraph=True)
    for n, c in ((100.0, 0.2), (101.0, 0.25), (37.5, 0.3)):
        want, _ = rlhf_kernels.ppo_policy_loss(logp, old, adv, mask, num_tokens=n, clip_low=c)
        torch.testing.assert_close(compiled(n, c), want)


def test_loss_from_logits_fewer_rows_in_flight_than_rows(device_backend, monkeypatch):
    """The fused GPU kernels take rows in a grid-stride loop when the rows in
    flight are bounded (RLHF_KERNELS_ROWS_IN_FLIGHT): same result."""
    device, backend = device_backend
    logits, labels, old, adv, mask, ref = _logits_inputs((2, 5, 67), device, seed=11)
    kwargs = dict(ref_logp=ref, kl_coef=0.1, entropy_coef=0.01, backend=backend)
    grads = []
    for rows in ("0", "3"):
        monkeypatch.setenv("RLHF_KERNELS_ROWS_IN_FLIGHT", rows)
        x = logits.clone().requires_grad_(True)
        loss, _ = rlhf_kernels.ppo_loss_from_logits(x, labels, old, adv, mask, **kwargs)
        loss.backward()
        grads.append((loss.detach(), x.grad))
    torch.testing.assert_close(grads[1], grads[0], atol=0, rtol=0)


def test_rows_in_flight_policy():
    from rlhf_kernels._launch import rows_in_flight as _rows_in_flight

    assert _rows_in_flight(8192, 304128, torch.device("cpu")) == 0  # no bound off the GPU


def test_loss_from_logits_bf16_no_worse_than_torch(device_backend):
    device, backend = device_backend
    logits, labels, old, adv, mask, ref = _logits_inputs((2, 6, 1001), device, dtype=torch.bfloat16, seed=6)
    kwargs = dict(ref_logp=ref, kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0)
    x = logits.clone().requires_grad_(True)
    loss, _ = rlhf_kernels.ppo_loss_from_logits(x, labels, old, adv, mask, backend=backend, **kwargs)
    loss.backward()
    assert x.grad.dtype == torch.bfloat16
    x64 = logits.double().requires_grad_(True)
    want, _ = reference.ppo_loss_from_logits(x64, labels, old.double(), adv.double(), mask, **kwargs)
    want.backward()
    xb = logits.clone().requires_grad_(True)
    torch_bf16, _ = reference.ppo_loss_from_logits(xb, labels, old, adv, mask, upcast=False, **kwargs)
    torch_bf16.backward()
    assert_no_worse_than_torch(loss, want, torch_bf16)
    assert_no_worse_than_torch(x.grad, x64.grad, xb.grad)


@pytest.mark.parametrize("scale, temperature", LARGE_LOGITS.values(), ids=LARGE_LOGITS)
@pytest.mark.parametrize("inplace", [False, True], ids=["fused", "inplace_backward"])
def test_loss_from_logits_gradient_at_large_logits_no_worse_than_torch(device_backend, scale, temperature,
                                                                       inplace):
    """|x| / T ~ 1e4: the logits gradient, written in the forward (fused) or in
    the backward (inplace_backward), within 2x of eager float32 autograd's
    error. Probable labels, so that logp is O(1) and the float32 rounding of
    the ratio exp(logp - old_logp) does not swamp the comparison."""
    device, backend = device_backend
    gen = torch.Generator().manual_seed(43)
    B, T, V = 3, 3, 500
    logits = large_logits(B * T, V, scale, temperature, gen)
    logits, labels = logits.view(B, T, V), probable_labels(logits, gen).view(B, T)
    with torch.no_grad():
        logp = reference.logprobs_from_logits(logits.double(), labels, temperature=temperature)
    old = (logp + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.4).float()
    ref = (logp + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.4).float()
    adv = torch.randn(B, T, generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.2
    kwargs = dict(temperature=temperature, agg="token-sum", ref_logp=ref, kl_coef=0.1, entropy_coef=0.1)

    def grad_of(fn, x):
        x = x.clone().requires_grad_(True)
        loss, _ = fn(x * 1)  # a non-leaf buffer that inplace_backward may overwrite
        loss.backward()
        return x.grad.cpu()

    on = lambda t: t.to(device)  # noqa: E731
    got = grad_of(lambda x: rlhf_kernels.ppo_loss_from_logits(
        x, on(labels), on(old), on(adv), on(mask), **dict(kwargs, ref_logp=on(ref)), inplace_backward=inplace,
        backend=backend), on(logits))
    want = grad_of(lambda x: reference.ppo_loss_from_logits(
        x, labels, old.double(), adv.double(), mask, **dict(kwargs, ref_logp=ref.double())), logits.double())
    eager = grad_of(lambda x: reference.ppo_loss_from_logits(
        x, labels, old, adv, mask, upcast=False, **kwargs), logits)
    assert_no_worse_than_torch(got, want, eager)
    assert torch.all(got[~mask] == 0)


def test_loss_from_logits_gradcheck_float64(device_backend):
    device, backend = device_backend
    logits, labels, old, adv, mask, ref = _logits_inputs((2, 3, 11), device, dtype=torch.float64, seed=9)
    old, adv, ref = old.double(), adv.double(), ref.double()

    def f(inp):
        return rlhf_kernels.ppo_loss_from_logits(
            inp, labels, old, adv, mask, temperature=1.3, clip_high=0.3, dual_clip=3.0, ref_logp=ref,
            kl_coef=0.2, entropy_coef=0.05, agg="seq-mean-token-mean", backend=backend,
        )[0]

    assert torch.autograd.gradcheck(f, (logits.clone().requires_grad_(True),), eps=1e-6, atol=1e-6)


def test_loss_from_logits_all_masked(device_backend):
    device, backend = device_backend
    logits, labels, old, adv, mask, ref = _logits_inputs((2, 4, 50), device, seed=10)
    mask = torch.zeros_like(mask)
    x = logits.clone().requires_grad_(True)
    loss, stats = rlhf_kernels.ppo_loss_from_logits(x, labels, old, adv, mask, ref_logp=ref, kl_coef=0.1,
                                                    entropy_coef=0.1, agg="seq-mean-token-mean", backend=backend)
    loss.backward()
    assert loss.item() == 0 and torch.all(x.grad == 0) and all(v.item() == 0 for v in stats.values())


# --- registration, compile, bad inputs ----------------------------------------------------


def test_opcheck(device_backend):
    """The registered ops themselves (schema, fake, autograd, AOT dispatch): the
    native op for the cpu / cuda backends, its Triton twin for triton (the
    eager backend is plain torch: no op)."""
    device, backend = device_backend
    logp, old, adv, mask = policy_tokens((3, 20), device, seed=13, scale=0.3)
    logp = torch.where(mask, logp, 0.0).requires_grad_(True)
    suffix = {"cpu": "", "cuda": "", "triton": "_triton"}.get(backend)
    for agg, num_tokens in (("seq-mean-token-mean", None), ("token-mean", 50.0)) if suffix is not None else ():
        code = reference.AGG_MODES.index(agg)
        for float_mask in (mask, mask.float()):
            torch.library.opcheck(getattr(torch.ops.rlhf_kernels, "ppo_policy_loss" + suffix).default,
                                  (logp, old, adv, float_mask, 0.8, 1.28, 3.0, 0, code, num_tokens, None, True))
            torch.library.opcheck(getattr(torch.ops.rlhf_kernels, "ppo_value_loss" + suffix).default,
                                  (logp, old, adv, float_mask, 0.2, code, num_tokens, None, True))
    if suffix is None:
        return
    logits, labels, old, adv, mask, ref = _logits_inputs((2, 3, 40), device, seed=14)
    logits.requires_grad_(True)
    op = getattr(torch.ops.rlhf_kernels, "ppo_loss_from_logits" + suffix).default
    for inplace, count in ((False, None), (True, None), (False, torch.tensor(7.0, device=device))):
        torch.library.opcheck(op, (logits, labels, old, adv, mask.float(), ref, 0.9, 0.8, 1.2, 0.0, 0, 0, None, None,
                                   0.1, 3, 0.01, inplace, True, count, 0))
    torch.library.opcheck(op, (logits, labels, old, adv, mask, None, 1.1, 0.8, 1.2, 3.0, 0, 3, None, 4.0, 0.0, -1,
                               0.0, False, True, None, 0))
    torch.library.opcheck(op, (logits.detach(), labels, old, adv, mask, None, 1.1, 0.8, 1.2, 3.0, 0, 3, None, 4.0,
                               0.0, -1, 0.0, False, False, None, 0))


def test_torch_compile_fullgraph(device_backend):
    device, backend = device_backend
    torch._dynamo.reset()
    logp, old, adv, mask = policy_tokens((3, 40), device, seed=15, scale=0.3)
    logp = torch.where(mask, logp, 0.0)
    logits, labels, lold, ladv, lmask, ref = _logits_inputs((2, 5, 64), device, seed=16)

    def step(x, v, z):
        pg, pg_stats = rlhf_kernels.ppo_policy_loss(x, old, adv, mask, clip_high=0.28, dual_clip=3.0,
                                                    agg="seq-mean-token-mean", backend=backend)
        vf, vf_stats = rlhf_kernels.ppo_value_loss(v, old, adv, mask, clip=0.2, backend=backend)
        fl, fl_stats = rlhf_kernels.ppo_loss_from_logits(z, labels, lold, ladv, lmask, ref_logp=ref, kl_coef=0.1,
                                                         entropy_coef=0.01, temperature=0.9, backend=backend)
        return pg + 0.5 * vf + fl, pg_stats["clipfrac"] + vf_stats["vf_clipfrac"] + fl_stats["kl"]

    compiled = torch.compile(step, fullgraph=True)
    inputs = [logp.clone().requires_grad_(True), logp.clone().requires_grad_(True), logits.clone().requires_grad_(True)]
    out, stat = compiled(*inputs)
    out.backward()
    eager_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    want, want_stat = step(*eager_inputs)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(stat, want_stat)
    for got, exp in zip(inputs, eager_inputs):
        torch.testing.assert_close(got.grad, exp.grad)


def _ok():
    return torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5), torch.ones(2, 5, dtype=torch.bool)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(old_logp=torch.randn(2, 4)), "old_logp: shape"),
        (dict(advantages=torch.randn(5, 2)), "advantages: shape"),
        (dict(mask=torch.ones(2, 6, dtype=torch.bool)), "mask: shape"),
        (dict(logp=torch.tensor(1.0)), "logp: expected shape"),
        (dict(logp=torch.zeros(2, 5, dtype=torch.long)), "logp: dtype"),
        (dict(clip_low=0.0), "clip_low"),
        (dict(clip_low=-0.1), "clip_low"),
        (dict(clip_high=0.0), "clip_high"),
        (dict(clip_high=float("nan")), "clip_high"),
        (dict(dual_clip=1.0), "dual_clip"),
        (dict(dual_clip=0.5), "dual_clip"),
        (dict(agg="mean"), "agg: unknown mode"),
        (dict(num_tokens=0), "num_tokens"),
        (dict(num_seqs=-1), "num_seqs"),
        (dict(backend="tpu"), "backend: unknown"),
    ],
)
def test_policy_bad_inputs(change, match):
    logp, old, adv, mask = _ok()
    args = dict(logp=logp, old_logp=old, advantages=adv, mask=mask)
    kwargs = {k: v for k, v in change.items() if k not in args}
    args.update({k: v for k, v in change.items() if k in args})
    with pytest.raises(ValueError, match=match):
        rlhf_kernels.ppo_policy_loss(args["logp"], args["old_logp"], args["advantages"], args["mask"], **kwargs)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda v, o, r, m: rlhf_kernels.ppo_value_loss(v, o, r[:, :3], m), "returns: shape"),
        (lambda v, o, r, m: rlhf_kernels.ppo_value_loss(v, o, r, m, clip=0.0), "clip"),
        (lambda v, o, r, m: rlhf_kernels.ppo_value_loss(v, o, r, m, clip=-1.0), "clip"),
        (lambda v, o, r, m: rlhf_kernels.ppo_value_loss(v, o, r, m, agg="sum"), "agg: unknown mode"),
        (lambda v, o, r, m: rlhf_kernels.ppo_value_loss(v, [0.0], r, m), "old_values: expected a torch.Tensor"),
    ],
)
def test_value_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call(*_ok())


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(labels=torch.zeros(2, 4, dtype=torch.long)), "labels: shape"),
        (dict(labels=torch.full((2, 3), 17)), "labels: value 17"),
        (dict(old_logp=torch.randn(3, 2)), "old_logp: shape"),
        (dict(logits=torch.randn(2, 3, 0)), "V must be > 0"),
        (dict(logits=torch.randn(6)), "logits: expected shape"),
        (dict(ref_logp=torch.randn(2, 2)), "ref_logp: shape"),
        (dict(kl_estimator="k9"), "kl_estimator"),
        (dict(temperature=0.0), "temperature"),
        (dict(dual_clip=1.0), "dual_clip"),
        (dict(clip_low=0.0), "clip_low"),
        (dict(agg="nope"), "agg: unknown mode"),
        (dict(kl_coef=float("inf")), "kl_coef"),
    ],
)
def test_from_logits_bad_inputs(change, match):
    args = dict(logits=torch.randn(2, 3, 10), labels=torch.zeros(2, 3, dtype=torch.long),
                old_logp=torch.randn(2, 3), advantages=torch.randn(2, 3), mask=torch.ones(2, 3, dtype=torch.bool))
    pos = {k: change.get(k, v) for k, v in args.items()}
    kwargs = {k: v for k, v in change.items() if k not in args}
    with pytest.raises(ValueError, match=match):
        rlhf_kernels.ppo_loss_from_logits(*pos.values(), **kwargs)


def test_env_forces_backend(monkeypatch):
    calls = []
    key = ("ppo_policy_loss", "eager")
    original = _dispatch._REGISTRY[key]
    monkeypatch.setitem(_dispatch._REGISTRY, key, lambda *a: calls.append(1) or original(*a))
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "eager")
    logp, old, adv, mask = _ok()
    rlhf_kernels.ppo_policy_loss(logp, old, adv, mask)
    assert calls == [1]


@gpu
def test_gpu_backends_agree_large():
    logp, old, adv, mask = policy_tokens((64, 4096), "cuda", seed=17)
    want, want_stats = reference.ppo_policy_loss(logp.double(), old.double(), adv.double(), mask, dual_clip=3.0)
    for backend in ("cuda", "triton"):
        if backend in rlhf_kernels.available_backends():
            got, stats = rlhf_kernels.ppo_policy_loss(logp, old, adv, mask, dual_clip=3.0, backend=backend)
            torch.testing.assert_close(got.double(), want, **F32)
            check_stats(stats, want_stats)


@pytest.mark.skipif("cpu" not in rlhf_kernels.available_backends(), reason="the C++ extension is not built")
def test_native_logits_grad_op_checks_its_arguments():
    logits = torch.randn(4, 10)
    labels = torch.randint(0, 10, (4,))
    tok = torch.zeros(4)
    grad = torch.empty_like(logits)
    op = torch.ops.rlhf_kernels.ppo_logits_grad_native
    args = [logits, labels, tok, tok, tok, None, grad, 4, 0, 10, 0, 10, 1.0, -100, 0.8, 1.2, 0.0, 0, 0.0, -1, 0.0, 0]
    logp, entropy, row_max, log_sum = op(*args)
    assert logp.shape == entropy.shape == row_max.shape == log_sum.shape == (4,)
    assert torch.equal(row_max, logits.amax(-1))
    bad = list(args)
    bad[2] = torch.zeros(3)
    with pytest.raises(ValueError, match="old_logp"):
        op(*bad)
    bad = list(args)
    bad[19] = 3  # k3 without ref_logp
    with pytest.raises(ValueError, match="ref_logp"):
        op(*bad)
    bad = list(args)
    bad[6] = torch.empty(4, 10, dtype=torch.float64)
    with pytest.raises(ValueError, match="grad_logits"):
        op(*bad)
    bad = list(args)
    bad[17] = 8  # no such objective
    with pytest.raises(ValueError, match="loss_type"):
        op(*bad)


# === property tests (hypothesis; run_property and the shared strategies: python_tests/properties.py) ===


# --- PPO losses ------------------------------------------------------------------------------------


@st.composite
def clip_settings(draw):
    clip_low = draw(st.sampled_from([0.1, 0.2, 0.5]))
    clip_high = draw(st.sampled_from([None, 0.28, 1.0]))
    dual = draw(st.sampled_from([None, 1.5, 3.0]))
    return clip_low, clip_high, dual


@st.composite
def token_loss_cases(draw, tiny: bool):
    B = draw(st.integers(1, 4 if tiny else 9))
    T = draw(st.integers(1, 40 if tiny else 700))
    return dict(
        shape=(B, T), dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
        clip=draw(clip_settings()), agg=draw(st.sampled_from(AGGS)),
        num_tokens=draw(st.sampled_from([None, 7.0])), num_seqs=draw(st.sampled_from([None, 3.0])),
        mask=draw(st.sampled_from(["full", "holes", "holes+edge-rows", "none-valid"])),
        spread=draw(st.sampled_from([0.05, 0.5, 30.0])),  # 30: log-ratios past the +-20 clamp
        value_clip=draw(st.sampled_from([0.1, 0.2, 10.0])), seed=draw(seeds),
    )


def _loss_mask(case, gen):
    shape = case["shape"]
    if case["mask"] == "full":
        return torch.ones(shape, dtype=torch.bool)
    if case["mask"] == "none-valid":
        return torch.zeros(shape, dtype=torch.bool)
    edge = case["mask"] == "holes+edge-rows"
    return random_mask(shape, gen, 0.7, edge, edge)


def _check_loss_stats(got, want, count, what):
    assert set(got) == set(want), (set(got), set(want))
    for name, w in want.items():
        g = got[name]
        assert g.dim() == 0, (what, name)
        # Fractions count tokens: a float32 / float64 disagreement at a clip
        # boundary moves them by 1 / count. Random data makes that rare.
        check_close(g, w, 1e-5, 1e-6 * (1.0 + float(abs(w))), f"{what} stat {name}")


def _check_policy_loss(device, backend, case):
    gen = generator(case["seed"])
    shape, dtype = case["shape"], case["dtype"]
    mask = _loss_mask(case, gen)
    logp = (-torch.rand(shape, generator=gen, dtype=torch.float64) * 3)
    old = logp + torch.randn(shape, generator=gen, dtype=torch.float64) * case["spread"]
    adv = torch.randn(shape, generator=gen, dtype=torch.float64)
    logp, old, adv = logp.to(dtype), old.to(dtype), adv.to(dtype)
    # Masked slots hold NaN: they must never be read into the loss or gradient.
    logp = torch.where(mask, logp, torch.full_like(logp, float("nan")))
    clip_low, clip_high, dual = case["clip"]
    kwargs = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual, agg=case["agg"],
                  num_tokens=case["num_tokens"], num_seqs=case["num_seqs"])
    x = logp.clone().to(device).requires_grad_(True)
    loss, stats = rlhf_kernels.ppo_policy_loss(x, old.to(device), adv.to(device), mask.to(device),
                                               backend=backend, **kwargs)
    x64 = logp.double().clone().requires_grad_(True)
    want, want_stats = reference.ppo_policy_loss(x64, old.double(), adv.double(), mask, **kwargs)
    assert loss.dim() == 0 and torch.isfinite(loss)
    scale = 1.0 + float(torch.where(mask, adv.double().abs(), 0).max()) * math.exp(min(20, case["spread"] * 5))
    f64 = dtype == torch.float64
    check_close(loss, want, *((1e-10, 1e-12 * scale) if f64 else (1e-5, 1e-6 * scale)), "policy loss")
    _check_loss_stats(stats, want_stats, int(mask.sum()), "policy")
    loss.backward()
    want.backward()
    assert x.grad.dtype == dtype
    assert torch.all(x.grad.cpu()[~mask] == 0)
    got_grad = torch.where(mask, x.grad.cpu().double(), 0.0)
    want_grad = torch.where(mask, x64.grad, 0.0)
    check_close(got_grad, want_grad, *grad_tols(dtype, scale), "policy grad")


def test_ppo_policy_loss_property(device_backend):
    run_backend_property("ppo_policy_loss", device_backend, token_loss_cases, _check_policy_loss, native=150, triton=25)


def _check_value_loss(device, backend, case):
    gen = generator(case["seed"])
    shape, dtype = case["shape"], case["dtype"]
    mask = _loss_mask(case, gen)
    old = torch.randn(shape, generator=gen, dtype=torch.float64)
    values = old + torch.randn(shape, generator=gen, dtype=torch.float64) * min(case["spread"], 2.0)
    returns = old + torch.randn(shape, generator=gen, dtype=torch.float64)
    values, old, returns = values.to(dtype), old.to(dtype), returns.to(dtype)
    values = torch.where(mask, values, torch.full_like(values, float("nan")))
    kwargs = dict(clip=case["value_clip"], agg=case["agg"], num_tokens=case["num_tokens"], num_seqs=case["num_seqs"])
    x = values.clone().to(device).requires_grad_(True)
    loss, stats = rlhf_kernels.ppo_value_loss(x, old.to(device), returns.to(device), mask.to(device),
                                              backend=backend, **kwargs)
    x64 = values.double().clone().requires_grad_(True)
    want, want_stats = reference.ppo_value_loss(x64, old.double(), returns.double(), mask, **kwargs)
    assert loss.dim() == 0 and torch.isfinite(loss)
    f64 = dtype == torch.float64
    scale = 1.0 + float(want.detach().abs()) + 10.0
    check_close(loss, want, *((1e-10, 1e-12 * scale) if f64 else (1e-5, 1e-6 * scale)), "value loss")
    # vf_clipfrac counts loss2 > loss1, a tie inside the clip range (where
    # old + (v - old) is v up to rounding) that rounding decides either way,
    # in verl's formula as in ours: bound it by the unambiguous tokens.
    v64, o64, r64 = values.double(), old.double(), returns.double()
    d = v64 - o64
    ambiguous = mask & (d.abs() <= case["value_clip"] * (1 + 1e-6))
    clipped = mask & ~ambiguous & ((o64 + d.clamp(-case["value_clip"], case["value_clip"]) - r64).square() > (v64 - r64).square())
    count = max(int(mask.sum()), 1)
    low, high = int(clipped.sum()) / count, int((clipped | ambiguous).sum()) / count
    assert set(stats) == {"vf_clipfrac"} and stats["vf_clipfrac"].dim() == 0
    assert low - 1e-6 <= float(stats["vf_clipfrac"]) <= high + 1e-6, (float(stats["vf_clipfrac"]), low, high)
    loss.backward()
    want.backward()
    assert x.grad.dtype == dtype and torch.all(x.grad.cpu()[~mask] == 0)
    check_close(torch.where(mask, x.grad.cpu().double(), 0.0), torch.where(mask, x64.grad, 0.0),
           *grad_tols(dtype, 10.0), "value grad")


def test_ppo_value_loss_property(device_backend):
    run_backend_property("ppo_value_loss", device_backend, token_loss_cases, _check_value_loss, native=150, triton=25)


@st.composite
def logits_loss_cases(draw, tiny: bool):
    return dict(
        B=draw(st.integers(1, 2 if tiny else 4)), T=draw(st.integers(1, 5 if tiny else 24)),
        V=draw(st.one_of(st.integers(1, 64 if tiny else 700), st.sampled_from([1, 2049] if not tiny else [1, 3]))),
        dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])),
        strided=draw(st.booleans()), temperature=draw(st.sampled_from([1.0, 0.6, 1.7])),
        clip=draw(clip_settings()), agg=draw(st.sampled_from(AGGS)),
        num_tokens=draw(st.sampled_from([None, 5.0])),
        mask=draw(st.sampled_from(["full", "holes", "holes+edge-rows", "none-valid"])),
        ignore=draw(st.booleans()), ref=draw(st.booleans()), estimator=draw(st.sampled_from(ESTIMATORS)),
        kl_coef=draw(st.sampled_from([0.0, 0.1])), entropy_coef=draw(st.sampled_from([0.0, 0.01])),
        inplace=draw(st.booleans()), seed=draw(seeds),
    )


def _check_loss_from_logits(device, backend, case):
    gen = generator(case["seed"])
    B, T, V, dtype = case["B"], case["T"], case["V"], case["dtype"]
    case = dict(case, shape=(B, T))
    mask = _loss_mask(case, gen)
    full = (torch.randn(B, T + 1, V, generator=gen, dtype=torch.float64) * 2).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=gen)
    if case["ignore"]:
        labels = torch.where(torch.rand(B, T, generator=gen) < 0.2, torch.full_like(labels, -100), labels)
    # Old log-probs near the current ones: ratios on both sides of the clip range.
    with torch.no_grad():
        cur = reference.logprobs_from_logits(full[:, :-1].double(), labels)
    old = cur + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.3
    ref = cur + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.3
    adv = torch.randn(B, T, generator=gen, dtype=torch.float64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    clip_low, clip_high, dual = case["clip"]
    kwargs = dict(temperature=case["temperature"], clip_low=clip_low, clip_high=clip_high, dual_clip=dual,
                  agg=case["agg"], num_tokens=case["num_tokens"], kl_coef=case["kl_coef"],
                  kl_estimator=case["estimator"], entropy_coef=case["entropy_coef"])

    leaf = full.clone().to(device).requires_grad_(True)
    base = leaf * 1 if case["inplace"] else leaf
    logits = base[:, :-1] if case["strided"] else base[:, :-1].contiguous()
    loss, stats = rlhf_kernels.ppo_loss_from_logits(
        logits, labels.to(device), old.to(device, acc), adv.to(device, acc), mask.to(device),
        ref_logp=ref.to(device, acc) if case["ref"] else None, inplace_backward=case["inplace"],
        backend=backend, **kwargs)
    x64 = full.double().clone().requires_grad_(True)
    want, want_stats = reference.ppo_loss_from_logits(
        x64[:, :-1], labels, old.to(acc).double(), adv.to(acc).double(), mask,
        ref_logp=ref.to(acc).double() if case["ref"] else None, **kwargs)
    assert loss.dim() == 0 and torch.isfinite(loss)
    f64 = dtype == torch.float64
    scale = 1.0 + float(adv.abs().max()) * 5.0 + math.log(V + 1)
    check_close(loss, want, *((1e-9, 1e-11 * scale) if f64 else (1e-5, 2e-5 * scale)), "loss from logits")
    _check_loss_stats(stats, want_stats, int(mask.sum()), "from logits")
    loss.backward()
    want.backward()
    assert leaf.grad.dtype == dtype
    check_close(leaf.grad, x64.grad, *grad_tols(dtype, scale / case["temperature"]), "logits grad")
    assert torch.all(leaf.grad[:, -1] == 0)


def test_ppo_loss_from_logits_property(device_backend):
    run_backend_property("ppo_loss_from_logits", device_backend, logits_loss_cases, _check_loss_from_logits, native=100, triton=20)

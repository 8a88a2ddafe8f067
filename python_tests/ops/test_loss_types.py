"""The policy objectives of ``loss_type`` (clip, cispo, sapo, gpg, dppo_tv,
dppo_kl, dro, geo_mean, clip_cov, kl_cov, luspo, vespo) on ppo_policy_loss, ppo_loss_from_logits and ppo_loss_from_hidden,
against the float64 reference (rlhf_kernels.reference, autograd) on every
backend present: loss, statistics and gradients, at log-ratios past the
clamp; the op registration, compile and the argument checks. (The Triton
interpreter's run: test_loss_types_triton.py; the CUDA kernels':
test_cuda_emulated.py; verl's own functions as oracles: test_verl.py.)"""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rlhf_kernels
from rlhf_kernels import reference

from helpers import check_stats, policy_tokens, seeded_draws, sequence_clip_rows

LOSS_TYPES = reference.LOSS_TYPES
F32 = dict(atol=1e-6, rtol=1e-5)

# Per objective, keywords under which its selections happen on _tokens' data:
# cispo's range clips, dppo's thresholds mask tokens and its cap binds.
OBJECTIVE_KWARGS = {
    "clip": dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0),
    "cispo": dict(clip_low=0.2, clip_high=0.28),
    "sapo": dict(tau_pos=1.0, tau_neg=1.05),
    "gpg": {},
    "dppo_tv": dict(clip_low=0.05, clip_high=0.08, dual_clip=1.5),
    "dppo_kl": dict(clip_low=0.02, clip_high=0.03, dual_clip=1.5),
    "dro": dict(dro_beta=0.3),
    "geo_mean": dict(clip_low=0.2, clip_high=0.28),
    # bounds and shares that select some tokens on this data
    "clip_cov": dict(clip_low=0.2, clip_high=0.28, cov_ratio=0.05, cov_bounds=(0.0, 1.0)),
    "kl_cov": dict(cov_ratio=0.05, kl_cov_coef=0.5),
    "luspo": dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0),
    "vespo": dict(vespo_params=(2.5, 3.5, 3.0, 1.5)),
}


def _tokens(shape, device, seed=0, dtype=torch.float32):
    """policy_tokens with log-ratios of scale 0.6 (near the clip range) and
    valid old log-probabilities (<= 0: dppo reads exp(old_logp)); token 5's
    log-ratio -22 still meets the clamp."""
    logp, old, adv, mask = policy_tokens(shape, device, seed=seed, dtype=dtype, scale=0.6)
    old = old.clamp(max=0.0)
    logp.view(-1)[5], old.view(-1)[5] = -22.5, -0.5
    return logp, old, adv, mask


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_policy_loss_types_match_float64(device_backend, loss_type, agg, dtype):
    device, backend = device_backend
    logp, old, adv, mask = _tokens((4, 67), device, dtype=dtype)
    kwargs = dict(OBJECTIVE_KWARGS[loss_type], agg=agg, loss_type=loss_type)
    x = logp.clone().requires_grad_(True)
    loss, stats = rlhf_kernels.ppo_policy_loss(x, old, adv, mask, backend=backend, **seeded_draws(kwargs))
    loss.backward()
    x64 = logp.double().requires_grad_(True)
    want, want_stats = reference.ppo_policy_loss(x64, old.double(), adv.double(), mask, **seeded_draws(kwargs))
    want.backward()
    tol = F32 if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(loss.double(), want.detach(), **tol)
    torch.testing.assert_close(torch.where(mask, x.grad, 0.0).double(), torch.where(mask, x64.grad, 0.0), **tol)
    assert torch.all(x.grad[~mask] == 0)
    check_stats(stats, want_stats, **tol)
    # the selections really happen on this data
    if loss_type in ("cispo", "dppo_tv", "dppo_kl", "clip_cov", "kl_cov"):
        assert 0.01 < stats["clipfrac"] < 0.95, stats
    if loss_type.startswith("dppo"):
        assert 0.0 < stats["clipfrac_lower"] < 0.95, stats


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_types_from_logits_and_hidden_match_float64(device_backend, loss_type):
    """The fused logits gradient (and the unfused one with inplace_backward),
    the KL penalty and the entropy bonus; the hidden path equals the logits
    path on the same head."""
    device, backend = device_backend
    gen = torch.Generator().manual_seed(3)
    B, T, H, V = 3, 9, 16, 53
    hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.5
    logits = hidden @ weight.T
    labels = torch.randint(0, V, (B, T), generator=gen)
    logp = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    old = logp + 0.6 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, T, generator=gen, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = torch.rand(B, T, generator=gen) > 0.2
    kwargs = dict(OBJECTIVE_KWARGS[loss_type], loss_type=loss_type, ref_logp=ref.float().to(device), kl_coef=0.1,
                  entropy_coef=0.01, agg="seq-mean-token-mean")
    x64 = logits.clone().requires_grad_(True)
    want, want_stats = reference.ppo_loss_from_logits(x64, labels, old, adv, mask,
                                                      **seeded_draws(dict(kwargs, ref_logp=ref)))
    want.backward()
    to = lambda t: t.float().to(device)  # noqa: E731
    for inplace in (False, True):
        x = to(logits).requires_grad_(True)
        loss, stats = rlhf_kernels.ppo_loss_from_logits(x.clone() if inplace else x, labels.to(device), to(old),
                                                        to(adv), mask.to(device), inplace_backward=inplace,
                                                        backend=backend, **seeded_draws(kwargs))
        loss.backward()
        torch.testing.assert_close(loss.double().cpu(), want.detach(), **F32)
        torch.testing.assert_close(x.grad.double().cpu(), x64.grad, atol=1e-6, rtol=1e-4)
        check_stats(stats, want_stats, atol=1e-5, rtol=1e-5)
    h, w = to(hidden).requires_grad_(True), to(weight).requires_grad_(True)
    loss_h, stats_h = rlhf_kernels.ppo_loss_from_hidden(h, w, labels.to(device), to(old), to(adv), mask.to(device),
                                                        backend=backend, **seeded_draws(kwargs))
    loss_h.backward()
    h64, w64 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    want_h, _ = reference.ppo_loss_from_logits(h64 @ w64.T, labels, old, adv, mask,
                                               **seeded_draws(dict(kwargs, ref_logp=ref)))
    want_h.backward()
    torch.testing.assert_close(loss_h.double().cpu(), want_h.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad.double().cpu(), h64.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w.grad.double().cpu(), w64.grad, atol=1e-5, rtol=1e-4)
    check_stats(stats_h, want_stats, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_types_no_valid_token_gives_zero(device_backend, loss_type):
    device, backend = device_backend
    logp, old, adv, mask = _tokens((3, 8), device)
    x = torch.where(mask, logp, 0.0).requires_grad_(True)
    loss, stats = rlhf_kernels.ppo_policy_loss(x, old, adv, torch.zeros_like(mask), loss_type=loss_type,
                                               backend=backend, **OBJECTIVE_KWARGS[loss_type])
    loss.backward()
    assert loss.item() == 0.0 and torch.all(x.grad == 0)
    assert stats["clipfrac"].item() == 0.0 and stats["approx_kl"].item() == 0.0


@pytest.mark.parametrize("loss_type", ["sapo", "gpg", "dro", "geo_mean", "luspo"])  # not the stop-gradient weights
def test_loss_types_gradcheck_float64(device_backend, loss_type):
    """The objectives without a stop-gradient (cispo's and dppo's stopped
    weights make finite differences differ from the gradient by design)."""
    device, backend = device_backend
    logp, old, adv, mask = _tokens((3, 11), device, seed=5, dtype=torch.float64)
    logp = torch.where(mask, logp, -1.0)
    old = logp + 0.5 * (old - logp).clamp(-1, 1)  # inside the log-ratio clamp

    def f(x):
        return rlhf_kernels.ppo_policy_loss(x, old, adv, mask, loss_type=loss_type, backend=backend,
                                            **OBJECTIVE_KWARGS[loss_type])[0]

    assert torch.autograd.gradcheck(f, (logp.clone().requires_grad_(True),), eps=1e-7, atol=1e-7)


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES[1:] if t not in ("dro", "luspo", "vespo")])
def test_loss_types_token_weights_scale_each_token(device_backend, loss_type):
    """token_weights multiply each token's loss and gradient (the objectives
    are positively homogeneous in A), not the counts. (luspo: clip's
    sequence-level test in test_ppo_loss_weights.py; vespo's weights join its
    phi: test_trl.py against TRL's.)"""
    device, backend = device_backend
    logp, old, adv, mask = _tokens((3, 20), device, seed=8, dtype=torch.float64)
    logp = torch.where(mask, logp, 0.0)
    w = torch.rand(3, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device) + 0.1
    kw = dict(OBJECTIVE_KWARGS[loss_type], loss_type=loss_type, agg="token-sum")
    x = logp.clone().requires_grad_(True)
    loss = rlhf_kernels.ppo_policy_loss(x, old, adv, mask, token_weights=w, backend=backend, **seeded_draws(kw))[0]
    loss.backward()
    x64 = logp.clone().requires_grad_(True)
    low, high = kw.get("clip_low", 0.2), kw.get("clip_high", kw.get("clip_low", 0.2))
    if loss_type == "geo_mean":  # -A_t R_b per token, R_b unweighted
        tok = reference._geo_mean_token_loss(x64, old, adv, mask, low, high)[0]
    elif loss_type in ("clip_cov", "kl_cov"):  # the selection unweighted
        tok = reference._cov_token_loss(x64, old, adv, mask, loss_type, low, high, kw["cov_ratio"],
                                        kw.get("cov_bounds", (1.0, 5.0)), kw.get("kl_cov_coef", 1.0),
                                        seeded_draws(kw).get("generator"))[0]
    else:
        tok, _, _ = reference._policy_token_loss(
            x64, old, adv, torch.exp(torch.clamp(x64 - old, -20, 20)), loss_type, low, high, kw.get("dual_clip"),
            kw.get("tau_pos", 1.0), kw.get("tau_neg", 1.05), kw.get("dro_beta"))
    want = (torch.where(mask, tok, 0.0) * w).sum()
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(x.grad, torch.where(mask, x64.grad, 0.0))


def test_loss_type_argument_checks():
    logp, old, adv, mask = _tokens((2, 6), "cpu")
    call = lambda **kw: rlhf_kernels.ppo_policy_loss(logp, old, adv, mask, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="loss_type"):
        call(loss_type="vanilla")
    for name in ("cispo", "sapo", "gpg"):
        with pytest.raises(ValueError, match="dual_clip"):
            call(loss_type=name, dual_clip=3.0)
    with pytest.raises(ValueError, match="ratio_level"):
        call(loss_type="cispo", ratio_level="sequence")
    with pytest.raises(ValueError, match="tau_pos"):
        call(loss_type="sapo", tau_pos=0.0)
    with pytest.raises(ValueError, match="tau_neg"):
        call(loss_type="sapo", tau_neg=float("nan"))
    with pytest.raises(ValueError, match="dual_clip"):
        call(loss_type="dppo_tv", dual_clip=-1.0)
    with pytest.raises(ValueError, match="clip_low"):
        call(loss_type="dppo_kl", clip_low=0.0)
    with pytest.raises(ValueError, match="dro_beta"):
        call(loss_type="dro")
    with pytest.raises(ValueError, match="dual_clip"):
        call(loss_type="geo_mean", dual_clip=3.0)
    with pytest.raises(ValueError, match="ratio_level"):
        call(loss_type="geo_mean", ratio_level="sequence")
    for bad, match in ((dict(cov_ratio=0.0), "cov_ratio"), (dict(cov_ratio=1.5), "cov_ratio"),
                       (dict(cov_bounds=(2.0, 1.0)), "cov_bounds"), (dict(cov_bounds="ab"), "cov_bounds"),
                       (dict(kl_cov_coef=float("nan")), "kl_cov_coef"), (dict(generator=3), "generator")):
        with pytest.raises(ValueError, match=match):
            call(loss_type="clip_cov", **bad)
    with pytest.raises(ValueError, match="dual_clip"):
        call(loss_type="kl_cov", dual_clip=3.0)
    with pytest.raises(ValueError, match="dro_beta"):
        call(loss_type="dro", dro_beta=-0.1)
    with pytest.raises(ValueError, match="ratio_level"):
        call(loss_type="luspo", ratio_level="sequence-token")
    for bad in ((1.0, 2.0, 3.0), (1.0, float("inf"), 3.0, 2.0), "abcd", None):
        with pytest.raises(ValueError, match="vespo_params"):
            call(loss_type="vespo", vespo_params=bad)
    with pytest.raises(ValueError, match="dual_clip"):
        call(loss_type="vespo", dual_clip=3.0)
    with pytest.raises(ValueError, match="token_weights"):
        call(loss_type="dro", dro_beta=0.1, token_weights=torch.ones(2, 6))
    if "cpu" in rlhf_kernels.available_backends():
        with pytest.raises(ValueError, match="loss_type"):
            torch.ops.rlhf_kernels.ppo_policy_loss(logp, old, adv, mask, 0.8, 1.2, 0.0, 8, 0, None, None, False)


def test_loss_types_opcheck_and_compile(device_backend):
    device, backend = device_backend
    logp, old, adv, mask = _tokens((3, 20), device, seed=13)
    logp = torch.where(mask, logp, 0.0).requires_grad_(True)
    suffix = {"cpu": "", "cuda": "", "triton": "_triton"}.get(backend)
    if suffix is not None:
        op = getattr(torch.ops.rlhf_kernels, "ppo_policy_loss" + suffix).default
        for code, numbers in ((1, (0.8, 1.28, 0.0)), (2, (1.05, 1.0, 0.0)), (5, (0.02, 0.03, 1.5)),
                              (6, (0.3, 0.0, 0.0))):
            torch.library.opcheck(op, (logp, old, adv, mask, *numbers, code, 4, None, None, True))
        rows = getattr(torch.ops.rlhf_kernels, "ppo_policy_rows" + suffix).default  # GMPO's sums (form 7)
        for x, need_grad in ((logp, True), (logp.detach(), False)):
            torch.library.opcheck(rows, (x, old, adv, mask, -0.2, 0.28, 0.0, 7, need_grad))
    torch._dynamo.reset()
    for loss_type in ("cispo", "dppo_tv", "geo_mean"):
        fn = lambda x: rlhf_kernels.ppo_policy_loss(x, old, adv, mask, loss_type=loss_type,  # noqa: E731
                                                    backend=backend, **OBJECTIVE_KWARGS[loss_type])[0]
        torch.testing.assert_close(torch.compile(fn, fullgraph=True)(logp), fn(logp))


def _rows_reference(logp, old, adv, m, form):
    """The (B, 9) sums of ppo_policy_rows' rows-only forms in float64, written
    from their definitions (csrc/include/rlhf_kernels/ppo_math.h)."""
    valid = m != 0
    w = torch.where(valid, m.double(), 0.0)
    a = torch.where(valid, adv.double(), 0.0)
    x = torch.where(valid, logp.double() - old.double(), 0.0)
    zeros = w.sum(-1) * 0
    if form == 8:
        pos, neg = torch.where(a > 0, a, 0.0), torch.where(a < 0, a, 0.0)
        loss, kl, clipped, dual = (pos * w).sum(-1), (neg * w).sum(-1), ((a > 0) * w).sum(-1), ((a < 0) * w).sum(-1)
    else:
        loss, kl, clipped, dual = (x.clamp(-20.0, 20.0) * w).sum(-1), zeros, zeros, zeros
    ratio = torch.exp(x.clamp(-20.0, 20.0))
    return torch.stack([loss, w.sum(-1), clipped, dual, (-x * w).sum(-1),
                        torch.where(valid, ratio, -torch.inf).amax(-1), torch.where(valid, ratio, torch.inf).amin(-1),
                        kl, zeros], -1)


@pytest.mark.parametrize("form", [8, 9])
@pytest.mark.parametrize("weighted", [False, True], ids=["bool-mask", "weight-mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_only_forms_match_float64(device_backend, form, weighted, dtype):
    """ppo_policy_rows' forms 8 (the sums of A where A > 0 / A < 0 and their
    counts: GSPO's and LUSPO's sequence clip) and 9 (VESPO's clamped log-ratio
    sums) against float64 sums, log-ratios past the +-20 clamp included, on
    every backend; a NaN advantage stays in its sequence's sums; the loss ops
    refuse the codes."""
    from rlhf_kernels._dispatch import implementation

    device, backend = device_backend
    logp, old, adv, mask = _tokens((4, 1100), device, seed=form, dtype=dtype)
    adv.view(-1)[:3] = 0.0
    m = mask
    if weighted:
        gen = torch.Generator().manual_seed(21)
        m = torch.where(mask, torch.rand(mask.shape, generator=gen, dtype=dtype).to(device) * 2, 0.0)
    rows_op = implementation("ppo_policy_rows", backend, logp.device)
    grad, rows = rows_op(logp, old, adv, m, 0.0, 0.0, 0.0, form, False)
    want = _rows_reference(logp, old, adv, m, form)
    tol = dict(atol=1e-3, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-9, rtol=1e-10)
    torch.testing.assert_close(rows.double(), want, **tol)
    assert grad.numel() == 0
    if form == 9:
        assert want[0, 0] != -want[0, 4]  # the clamp changed row 0's sum
    else:
        assert want[:, 2].sum() > 0 and want[:, 3].sum() > 0
        nan_adv = adv.clone()
        nan_adv[2, torch.nonzero(mask[2])[0, 0]] = float("nan")
        nan_rows = rows_op(logp, old, nan_adv, m, 0.0, 0.0, 0.0, form, False)[1]
        assert nan_rows[2, 0].isnan() and nan_rows[2, 7].isnan()
        torch.testing.assert_close(nan_rows[[0, 3]], rows[[0, 3]])
    if backend in ("cpu", "cuda"):
        with pytest.raises(ValueError, match="loss_type"):
            torch.ops.rlhf_kernels.ppo_policy_loss(logp, old, adv, mask, 0.8, 1.2, 0.0, form, 0, None, None, False)
        with pytest.raises(ValueError, match="loss_type"):
            torch.ops.rlhf_kernels.ppo_policy_rows(logp, old, adv, mask, 0.0, 0.0, 0.0, 10, False)
        torch.library.opcheck(torch.ops.rlhf_kernels.ppo_policy_rows.default,
                              (logp, old, adv, m, 0.0, 0.0, 0.0, form, False))


class _KernelCalls(TorchDispatchMode):
    """Records (name, args) of each rlhf_kernels op dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "rlhf_kernels":
            self.seen.append((func.overloadpacket.__name__, args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("loss_type, kwargs", [
    ("luspo", dict(agg="seq-mean-token-sum")),
    ("clip", dict(ratio_level="sequence", dual_clip=3.0, agg="seq-mean-token-mean")),
])
def test_sequence_clip_is_one_token_pass(device_backend, loss_type, kwargs):
    """PPO's clip on the sequence ratio (GSPO's "sequence", LUSPO) runs one
    token kernel: the rows of form 8, forward and backward (its gradient a
    product of the mask with per-sequence numbers), no token loss kernel;
    natively the loss of the B rows is one more call (ppo_sequence_clip)."""
    device, backend = device_backend
    logp, old, adv, mask = _tokens((3, 40), device)
    x = logp.clone().requires_grad_(True)
    with _KernelCalls() as ops:
        loss, _ = rlhf_kernels.ppo_policy_loss(x, old, adv, mask, loss_type=loss_type, backend=backend, **kwargs)
        loss.backward()
    if backend != "eager":
        names = [name for name, _ in ops.seen]
        assert names in (["ppo_policy_rows", "ppo_sequence_clip"], ["ppo_policy_rows_triton"])
        assert ops.seen[0][1][7] == 8  # the rows' form
        assert (backend in ("cpu", "cuda")) == ("ppo_sequence_clip" in names)  # the loss of B numbers natively
    # the values (the clip case: test_ppo_loss_weights.test_sequence_ratio_is_one_ratio_per_sequence)
    if loss_type == "clip":
        return
    x64 = logp.double().requires_grad_(True)
    want, _ = reference.ppo_policy_loss(x64, old.double(), adv.double(), mask, loss_type=loss_type,
                                        **dict(OBJECTIVE_KWARGS[loss_type], **kwargs))
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), **F32)
    torch.testing.assert_close(torch.where(mask, x.grad, 0.0).double(), torch.where(mask, x64.grad, 0.0), **F32)


@pytest.mark.parametrize("shape", [(0, 7), (3, 0), (6,), (2, 3, 9)])
def test_sequence_clip_shapes(device_backend, shape):
    """The sequence clip on empty batches, empty sequences, one flat sequence
    and a 3-D batch: the value and gradient of the float64 reference (zero
    without a token), the gradient in the input's shape."""
    device, backend = device_backend
    gen = torch.Generator().manual_seed(3)
    logp = (-torch.rand(shape, generator=gen, dtype=torch.float64) * 3).to(device)
    old = logp + (torch.randn(shape, generator=gen, dtype=torch.float64) * 0.3).to(device)
    adv = torch.randn(shape, generator=gen, dtype=torch.float64).to(device)
    mask = (torch.rand(shape, generator=gen) > 0.3).to(device)
    x = logp.float().requires_grad_(True)
    loss, stats = rlhf_kernels.ppo_policy_loss(x, old.float(), adv.float(), mask, loss_type="luspo", backend=backend)
    loss.backward()
    x64 = logp.clone().requires_grad_(True)
    want, want_stats = reference.ppo_policy_loss(x64, old, adv, mask, loss_type="luspo")
    want.backward()
    assert x.grad.shape == x.shape
    torch.testing.assert_close(loss.double(), want.detach(), **F32)
    torch.testing.assert_close(x.grad.double(), torch.where(mask, x64.grad, 0.0), **F32)
    check_stats(stats, want_stats, **F32)


def test_sequence_clip_ties(device_backend):
    """The sequence clip at exact ties, float64: r_b equal to 1 + clip_high
    (A > 0: the bound's derivative passes) and to the dual clip c (A < 0: half
    of it), against the reference's autograd (torch.maximum / minimum split a
    tie, clamp passes its bounds)."""
    device, backend = device_backend
    r = math.exp(1.0)
    tie = float(torch.exp(torch.tensor(1.0, dtype=torch.float64)))
    logp = torch.tensor([[1.0, 0.5], [1.0, 1.5]], dtype=torch.float64, device=device)
    old = torch.tensor([[0.0, -0.5], [0.0, 0.5]], dtype=torch.float64, device=device)  # s_b = 1: r_b = e
    adv = torch.tensor([[0.7, 1.3], [-0.4, -2.0]], dtype=torch.float64, device=device)
    mask = torch.ones(2, 2, dtype=torch.bool, device=device)
    kw = dict(loss_type="luspo", clip_low=0.2, clip_high=tie - 1.0, dual_clip=tie)
    assert 1.0 + kw["clip_high"] == tie and abs(tie - r) < 1e-15
    x = logp.clone().requires_grad_(True)
    loss, stats = rlhf_kernels.ppo_policy_loss(x, old, adv, mask, backend=backend, **kw)
    loss.backward()
    x64 = logp.clone().requires_grad_(True)
    want, want_stats = reference.ppo_policy_loss(x64, old, adv, mask, **kw)
    want.backward()
    torch.testing.assert_close(loss, want.detach(), atol=1e-14, rtol=1e-14)
    torch.testing.assert_close(x.grad, x64.grad, atol=1e-14, rtol=1e-14)
    assert x.grad[0].abs().min() > 0 and x.grad[1].abs().min() > 0  # both ties pass a gradient
    check_stats(stats, want_stats, atol=1e-14, rtol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("agg", range(5))
@pytest.mark.parametrize("dual_clip", [0.0, 3.0])
def test_sequence_clip_host_loop_equals_its_composition(dtype, agg, dual_clip):
    """ppo_sequence_clip's host loop (aggregation.h) against the torch
    composition the other backends run, on rows with the edge cases: empty
    and fractional counts, log-ratios beyond +-20, NaN sums, ratios at the
    bounds and at the dual clip; opcheck of the op."""
    if "cpu" not in rlhf_kernels.available_backends():
        pytest.skip("the C++ extension is not built")
    from rlhf_kernels.ops.policy_objectives import _sequence_clip_finish

    rows = sequence_clip_rows(64, seed=agg, dtype=dtype)
    args = (0.8, 1.28, dual_clip, agg)
    for num_tokens, num_seqs in ((None, None), (100.0, 7.0)):
        got = torch.ops.rlhf_kernels.ppo_sequence_clip(rows, *args, num_tokens, num_seqs, 40)
        want = _sequence_clip_finish(rows, *args, num_tokens, num_seqs, 40)
        tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-6, rtol=1e-5)
        for g, w in zip(got, want):
            assert g.dtype == dtype and g.shape == w.shape
            torch.testing.assert_close(g, w, equal_nan=True, **tol)
        assert got[0].isnan() and got[1][5].isnan()  # the NaN sequence's loss and coefficient
        assert got[1][3] == 0 and got[1][4] == 0  # clamped log-ratios pass no gradient
    for n in (0, 5):  # an empty batch: zeros
        loss, coef, stats = torch.ops.rlhf_kernels.ppo_sequence_clip(rows[5:5 + n].nan_to_num(), *args, None,
                                                                     None, 40)
        torch.testing.assert_close(stats, _sequence_clip_finish(rows[5:5 + n].nan_to_num(), *args, None, None,
                                                                40)[2], **tol)
    assert loss.isfinite()
    torch.library.opcheck(torch.ops.rlhf_kernels.ppo_sequence_clip.default,  # (opcheck compares NaN unequal)
                          (rows.nan_to_num(), *args, None, 3.0, 40))
    with pytest.raises(ValueError, match="rows: expected shape"):
        torch.ops.rlhf_kernels.ppo_sequence_clip(rows[:, :8], *args, None, None, 40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5, 37), (2, 3, 8), (9,), (0, 4), (3, 0)])
def test_scale_by_sign_equals_its_composition(device_backend, dtype, shape):
    """scale_by_sign (VESPO's A phi) on the backend against the torch
    composition the eager backend runs: x times pos[r] where x > 0, neg[r]
    elsewhere, with zeros, NaN and +-inf in x and a zero weight; strided x;
    opcheck and the arguments' ValueErrors."""
    from rlhf_kernels._dispatch import implementation
    from rlhf_kernels.ops.policy_objectives import _scale_by_sign

    device, backend = device_backend
    gen = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    rows = math.prod(shape[:-1])
    pos = torch.rand(rows, generator=gen, dtype=torch.float64) * 3
    neg = torch.rand(rows, generator=gen, dtype=torch.float64) * 3
    if x.numel() >= 6:
        x.view(-1)[:5] = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
        neg[0] = 0.0
    x, pos, neg = (t.to(dtype).to(device) for t in (x, pos, neg))
    op = implementation("scale_by_sign", backend, x.device)
    want = x * torch.where(x > 0, pos.view(*shape[:-1], 1), neg.view(*shape[:-1], 1))  # one rounding
    for arg in (x, x.transpose(0, -1).contiguous().transpose(0, -1) if x.dim() > 1 else x):
        got = op(arg, pos, neg)
        assert got.shape == x.shape and got.dtype == dtype
        torch.testing.assert_close(got, want, equal_nan=True, atol=0, rtol=0)
        torch.testing.assert_close(got, _scale_by_sign(arg, pos, neg), equal_nan=True, atol=0, rtol=0)
    if backend in ("cpu", "cuda"):
        torch.library.opcheck(torch.ops.rlhf_kernels.scale_by_sign.default, (x.nan_to_num(), pos, neg))
        with pytest.raises(ValueError, match="pos: expected shape"):
            torch.ops.rlhf_kernels.scale_by_sign(x, pos[:-1] if rows else pos.new_zeros(1), neg)
        with pytest.raises(ValueError, match="neg: expected"):
            torch.ops.rlhf_kernels.scale_by_sign(x, pos, neg.to(torch.float16))
        with pytest.raises(ValueError, match="x: expected float32 or float64"):
            torch.ops.rlhf_kernels.scale_by_sign(x.half(), pos, neg)


def test_vespo_runs_its_three_ops(device_backend):
    """VESPO on a kernel backend is three ops: the rows of form 9 (its
    log-weights), scale_by_sign (A phi) and the token loss (gpg's form 3)."""
    device, backend = device_backend
    logp, old, adv, mask = _tokens((3, 40), device)
    with _KernelCalls() as ops:
        rlhf_kernels.ppo_policy_loss(logp.clone().requires_grad_(True), old, adv, mask, loss_type="vespo",
                                     backend=backend)[0].backward()
    suffix = {"cpu": "", "cuda": "", "triton": "_triton"}.get(backend)
    names = [name for name, _ in ops.seen]
    if suffix is None:
        assert names == []
    else:
        assert names == [f"ppo_policy_rows{suffix}", f"scale_by_sign{suffix}", f"ppo_policy_loss{suffix}"]

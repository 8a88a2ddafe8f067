"""Truncated sampling: truncation_threshold and the min_logit / top_k / top_p /
min_p arguments of the log-prob and loss ops, on every backend present,
against a float64 sort-based reference (ties included); transformers' own
warpers and vLLM's own top-k / top-p as oracles of the kept set."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rlhf_kernels
from rlhf_kernels import reference

from helpers import assert_close_to_reference, assert_no_worse_than_torch

# (top_k, top_p, min_p, order, temperature): every step alone, combined, both orders.
SAMPLERS = [
    (5, None, None, "hf", 1.0),
    (None, 0.9, None, "hf", 0.7),
    (None, 0.5, None, "hf", 1.3),
    (None, None, 0.1, "hf", 1.0),
    (3, 0.8, 0.05, "hf", 1.0),
    (3, 0.8, 0.3, "vllm", 1.0),
    (None, 0.6, 0.2, "vllm", 0.7),
    (None, 0.6, 0.2, "hf", 0.7),
    (1, None, None, "hf", 1.0),
]


def ref_kept(x, temperature, top_k, top_p, min_p, order):
    """The kept set of one float64 row, from a sort (the definition of
    rlhf_kernels.ops.truncation: ties at top-k's k-th value kept, a tie group
    at top-p's boundary kept whole)."""
    keep = torch.ones_like(x, dtype=torch.bool)
    m = x.max()

    def minp(keep):
        return keep & (x >= m + temperature * math.log(min_p)) if min_p else keep

    def topk(keep):
        if not top_k or top_k >= int(keep.sum()):
            return keep
        return keep & (x >= x[keep].sort(descending=True).values[top_k - 1])

    def topp(keep):
        if top_p is None or top_p >= 1:
            return keep
        q = torch.where(keep, ((x - m) / temperature).exp(), torch.zeros_like(x))
        values, index = torch.unique(x, return_inverse=True)  # ascending distinct values
        mass = torch.zeros_like(values).index_add_(0, index, q)
        strictly_above = mass.flip(0).cumsum(0).flip(0) - mass  # of the distinct values greater than each
        return keep & (strictly_above[index] < top_p * q.sum())

    return topp(topk(minp(keep))) if order == "vllm" else minp(topp(topk(keep)))


def ref_logprobs(logits, labels, keep, temperature):
    """float64 log-probs and entropies of the renormalised kept sets, differentiable."""
    x = logits.double().masked_fill(~keep, -math.inf)
    return reference.logprobs_from_logits(x, labels, temperature=temperature, return_entropy=True)


def _rows(n, vocab, seed, ties=False, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * scale
    return x.round() if ties else x


def _sampled(keep, seed):
    """One token per row drawn from the kept set (uniformly: any kept token)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.multinomial(keep.double(), 1, generator=gen)[:, 0]


def _mid_gap(logits, thr):
    """Thresholds keeping the same sets as ``thr`` but halfway between the
    smallest kept and the largest cut logit: what to pass as min_logit to a
    second computation of the logits (the hidden path's tiles round
    differently from one GEMM)."""
    cut = torch.where(logits < thr[..., None], logits, -math.inf).amax(-1)
    return torch.where(torch.isfinite(cut), (thr + cut) / 2, thr)


def _vocabs(backend):
    # The interpreter runs Triton's bisection slowly: a real vocabulary on the compiled backends only.
    return (1, 7, 1000) if backend == "triton" else (1, 7, 1000, 151936)


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("sampler", SAMPLERS, ids=str)
def test_threshold_is_the_reference_kept_set(device_backend, sampler, ties):
    device, backend = device_backend
    top_k, top_p, min_p, order, temperature = sampler
    for vocab in _vocabs(backend):
        x = _rows(4 if vocab > 10000 else 6, vocab, vocab, ties)
        for dtype in (torch.float32, torch.float64):
            logits = x.to(dtype).to(device)
            thr = rlhf_kernels.truncation_threshold(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                                    min_p=min_p, truncation_order=order, backend=backend)
            assert thr.shape == (x.shape[0],) and thr.dtype == (torch.float64 if dtype == torch.float64
                                                                 else torch.float32)
            for r in range(x.shape[0]):
                row = logits[r].double().cpu()
                want = ref_kept(row, temperature, top_k, top_p, min_p, order)
                got = row >= thr[r].double().cpu()
                assert torch.equal(got, want), (vocab, dtype, r, int(got.sum()), int(want.sum()))


def test_threshold_layouts_and_specials(device_backend):
    """Strided rows read in place, (B, T, V) shapes, bf16, a NaN row, a -inf row, nothing cut."""
    device, backend = device_backend
    x = _rows(2 * 5, 33, 1).view(2, 5, 33).float().to(device)
    thr = rlhf_kernels.truncation_threshold(x[:, :-1], top_p=0.7, backend=backend)
    assert thr.shape == (2, 4)
    torch.testing.assert_close(thr, rlhf_kernels.truncation_threshold(x[:, :-1].contiguous(), top_p=0.7,
                                                                      backend=backend))
    xb = x.reshape(10, 33).bfloat16()
    thr = rlhf_kernels.truncation_threshold(xb, top_k=4, backend=backend)
    for r in range(10):
        assert torch.equal(xb[r].float() >= thr[r], ref_kept(xb[r].double().cpu(), 1.0, 4, None, None, "hf").to(device))
    special = x.reshape(10, 33).clone()
    special[0, 3] = math.nan
    special[1] = -math.inf
    thr = rlhf_kernels.truncation_threshold(special, top_p=0.9, backend=backend)
    assert math.isnan(thr[0]) and thr[1] == -math.inf
    assert (rlhf_kernels.truncation_threshold(special[2:], backend=backend) == -math.inf).all()
    assert (rlhf_kernels.truncation_threshold(special[2:], top_k=33, top_p=1.0, min_p=0.0,
                                              backend=backend) == -math.inf).all()


@pytest.mark.parametrize("sampler", SAMPLERS[:6], ids=str)
def test_logprobs_of_the_kept_set(device_backend, sampler):
    """Values and gradients (logp and entropy both weighted) against float64,
    sampled tokens (always kept), a few labels outside the kept set (-inf,
    with the gradient of the others still right) and an ignored one."""
    device, backend = device_backend
    top_k, top_p, min_p, order, temperature = sampler
    for vocab in (7, 1000):
        x = _rows(8, vocab, 7 + vocab)
        keep = torch.stack([ref_kept(r, temperature, top_k, top_p, min_p, order) for r in x])
        labels = _sampled(keep, vocab)
        labels[3] = -100
        outside = (~keep[5]).nonzero()
        if len(outside):
            labels[5] = outside[0, 0]
        logits = x.float().to(device).requires_grad_(True)
        logp, ent = rlhf_kernels.logprobs_from_logits(
            logits, labels.to(device), temperature=temperature, return_entropy=True, top_k=top_k, top_p=top_p,
            min_p=min_p, truncation_order=order, backend=backend)
        x64 = logits.detach().double().cpu().requires_grad_(True)
        want_logp, want_ent = ref_logprobs(x64, labels, keep, temperature)
        assert_close_to_reference(logp.cpu(), want_logp, torch.float32)
        assert_close_to_reference(ent.cpu(), want_ent, torch.float32)
        if len(outside):
            assert logp[5] == -math.inf
        finite = torch.isfinite(want_logp)
        g_logp = torch.randn(8, dtype=torch.float64) * finite
        g_ent = torch.randn(8, dtype=torch.float64)
        (want_logp.nan_to_num(0.0, 0.0, 0.0) * g_logp + want_ent * g_ent).sum().backward()
        (logp.nan_to_num(0.0, 0.0, 0.0) * g_logp.float().to(device) + ent * g_ent.float().to(device)).sum().backward()
        torch.testing.assert_close(logits.grad.double().cpu(), x64.grad, atol=2e-5, rtol=2e-5)
        assert (logits.grad.cpu()[~keep & (labels[:, None] != torch.arange(vocab))] == 0).all()


class _Ops(TorchDispatchMode):
    """The rlhf_kernels ops that ran, in order."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "rlhf_kernels":
            self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _fused_rows(vocab):
    """Rows where each way of summing the kept set is taken: normal at three
    spreads, a trained model's (one token holds most of the mass), ties, a
    NaN row, a row of -inf, one finite value, a row holding +inf."""
    gen = torch.Generator().manual_seed(vocab)
    rows = [torch.randn(vocab, generator=gen) * s for s in (0.3, 3.0, 30.0)]
    peaked = torch.randn(vocab, generator=gen) * 2
    peaked[vocab // 3] = 12.0
    rows += [peaked, (torch.randn(vocab, generator=gen) * 3).round()]
    special = torch.randn(4, vocab, generator=gen)
    special[0, vocab // 2] = math.nan
    special[1] = -math.inf
    special[2, 1:] = -math.inf
    special[3, 7] = math.inf  # NaN outputs, as the plain op gives
    return torch.cat([torch.stack(rows), special])


@pytest.mark.parametrize("sampler", [
    (None, 0.9, None, "hf", 1.0), (None, 0.5, None, "hf", 0.7), (50, None, None, "hf", 1.0),
    (5000, None, None, "hf", 1.0), (50, 0.9, 0.05, "hf", 1.0), (None, 0.9, 0.05, "hf", 1.0),
    (None, 0.9, 0.5, "hf", 1.0), (None, 0.9, 0.05, "vllm", 1.3), (None, None, 0.1, "hf", 1.0),
], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_fused_forward_equals_the_composition(sampler, dtype):
    """On the CPU, logprobs_from_logits with top_k / top_p / min_p runs one op
    (truncated_logprobs: the kept set's sums from the threshold's own passes
    where they give them) instead of truncation_threshold then logprobs with
    min_logit: the same logp, entropy and gradients as that composition, on
    rows that take each way (top-k's candidates, top-p's level sums, a later
    min-p raising the threshold, more candidates than are summed one by one,
    min-p alone), strided logits, an ignored token, a label outside the kept
    set and one outside the vocabulary; with and without the entropy."""
    top_k, top_p, min_p, order, temperature = sampler
    kw = dict(top_k=top_k, top_p=top_p, min_p=min_p, truncation_order=order, temperature=temperature)
    for vocab in (1000, 32000):
        x = _fused_rows(vocab)
        n = x.shape[0]
        padded = torch.cat([x, torch.zeros(n, 3)], 1).to(dtype)
        logits = padded[:, :vocab]  # rows read in place through their stride
        labels = torch.where(torch.isnan(x).any(-1), 0, x.nan_to_num(0).argmax(-1))
        labels[6] = -100  # the row of -inf: ignored
        labels[2] = x[2].argmin()
        z1 = logits.detach().clone().requires_grad_(True)
        with _Ops() as ops:
            logp, ent = rlhf_kernels.logprobs_from_logits(z1, labels, return_entropy=True, backend="cpu", **kw)
        assert ops.names == ["truncated_logprobs"]
        z2 = logits.detach().clone().requires_grad_(True)
        thr = rlhf_kernels.truncation_threshold(z2.detach(), backend="cpu", **kw)
        want_logp, want_ent = rlhf_kernels.logprobs_from_logits(z2, labels, return_entropy=True, min_logit=thr,
                                                                temperature=temperature, backend="cpu")
        tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-6, rtol=2e-6)
        torch.testing.assert_close(logp, want_logp, equal_nan=True, **tol)
        torch.testing.assert_close(ent, want_ent, equal_nan=True, **tol)
        logp_only = rlhf_kernels.logprobs_from_logits(logits, labels, backend="cpu", **kw)  # no entropy's sums
        torch.testing.assert_close(logp_only, want_logp.detach(), equal_nan=True, **tol)
        assert math.isnan(ent[5]) and logp[6] == 0 and ent[6] == 0  # the NaN row; the ignored token
        assert math.isnan(logp[8]) and math.isnan(ent[8])  # the row holding +inf
        assert (logp[2] == -math.inf) == bool(logits[2, labels[2]] < thr[2])  # a label outside the kept set
        g = torch.randn(n, dtype=logp.dtype)
        ((logp.nan_to_num(0.0, 0.0, 0.0) * g).sum() + ent.nan_to_num(0.0).sum()).backward()
        ((want_logp.nan_to_num(0.0, 0.0, 0.0) * g).sum() + want_ent.nan_to_num(0.0).sum()).backward()
        torch.testing.assert_close(z1.grad, z2.grad, equal_nan=True, **tol)
    with pytest.raises(ValueError, match="labels"):
        rlhf_kernels.logprobs_from_logits(x, torch.full((n,), vocab), top_p=0.9, backend="cpu")


def test_min_logit_forms_and_empty_rows(device_backend):
    """min_logit as a float, a per-token tensor and broadcast, combined with
    top_k (the larger threshold wins); a row whose max is below it: NaN
    entropy, -inf logp; no gradient through the rows' cut logits."""
    device, backend = device_backend
    x = _rows(6, 50, 3).float().to(device)
    labels = x.argmax(-1)
    cut = torch.tensor([0.5, 1.0, -1.0, 2.0, 0.0, 1e9], dtype=torch.float32, device=device)
    logp, ent = rlhf_kernels.logprobs_from_logits(x, labels, min_logit=cut, return_entropy=True, backend=backend)
    want_logp, want_ent = ref_logprobs(x.cpu(), labels.cpu(), x.cpu().double() >= cut.cpu().double()[:, None], 1.0)
    assert_close_to_reference(logp[:5].cpu(), want_logp[:5], torch.float32)
    assert_close_to_reference(ent[:5].cpu(), want_ent[:5], torch.float32)
    assert logp[5] == -math.inf and math.isnan(ent[5])
    scalar = rlhf_kernels.logprobs_from_logits(x, labels, min_logit=0.5, backend=backend)
    torch.testing.assert_close(scalar, rlhf_kernels.logprobs_from_logits(
        x, labels, min_logit=torch.full((6,), 0.5, device=device), backend=backend))
    both = rlhf_kernels.logprobs_from_logits(x, labels, min_logit=-10.0, top_k=3, backend=backend)
    torch.testing.assert_close(both, rlhf_kernels.logprobs_from_logits(x, labels, top_k=3, backend=backend))
    x3 = x.view(2, 3, 50)
    torch.testing.assert_close(
        rlhf_kernels.logprobs_from_logits(x3, labels.view(2, 3), min_logit=torch.tensor([[0.5], [1.0]],
                                                                                      device=device),
                                          backend=backend),
        rlhf_kernels.logprobs_from_logits(x3, labels.view(2, 3), min_logit=torch.tensor(
            [[0.5] * 3, [1.0] * 3], device=device), backend=backend))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_torch(device_backend, dtype):
    device, backend = device_backend
    x = _rows(16, 1000, 11).to(dtype)
    keep = torch.stack([ref_kept(r, 1.0, None, 0.9, None, "hf") for r in x.double()])
    labels = _sampled(keep, 11)
    logp, ent = rlhf_kernels.logprobs_from_logits(x.to(device), labels.to(device), top_p=0.9, return_entropy=True,
                                                  backend=backend)
    want_logp, want_ent = ref_logprobs(x, labels, keep, 1.0)
    torch_logp, torch_ent = reference.logprobs_from_logits(x.masked_fill(~keep, -math.inf), labels,
                                                           return_entropy=True, upcast=False)
    assert_no_worse_than_torch(logp.cpu(), want_logp, torch_logp)
    assert_no_worse_than_torch(ent.cpu(), want_ent, torch_ent)


@pytest.mark.parametrize("scale, temperature", [(1e4, 1.0), (100.0, 0.01)], ids=["1e4-T1", "100-T0.01"])
def test_extreme_magnitudes_no_worse_than_torch(device_backend, scale, temperature):
    """|logits| / T ~ 1e4, a few logits near the top and the cut among them:
    values and gradient within 2x of float32 torch's error against float64
    (torch float32 divides by T before subtracting the max: 1e-4 off at
    T = 0.01)."""
    device, backend = device_backend
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 500, generator=gen, dtype=torch.float64) * scale
    x[:, :8] = x.amax(-1, keepdim=True) + torch.randn(6, 8, generator=gen, dtype=torch.float64) * 2 * temperature
    x = x.float().double()
    keep = torch.stack([ref_kept(r, temperature, None, 0.8, None, "hf") for r in x])
    labels = _sampled(keep, 5)
    g = torch.randn(6, generator=gen, dtype=torch.float64)

    def run(fn, dtype):
        inp = x.to(dtype).detach().clone().requires_grad_(True)
        logp, ent = fn(inp)
        (logp.double() * g + ent.double()).sum().backward()
        return logp.detach().double(), ent.detach().double(), inp.grad.double()

    want = run(lambda z: ref_logprobs(z, labels, keep, temperature), torch.float64)
    eager32 = run(lambda z: reference.logprobs_from_logits(z.masked_fill(~keep, -math.inf), labels,
                                                           temperature=temperature, return_entropy=True,
                                                           upcast=False), torch.float32)
    got = run(lambda z: rlhf_kernels.logprobs_from_logits(z.to(device), labels.to(device), temperature=temperature,
                                                          top_p=0.8, return_entropy=True, backend=backend),
              torch.float32)
    for ours, torch32, ref in zip(got, eager32, want):
        assert_no_worse_than_torch(ours.cpu(), ref, torch32, floor=1e-5 * ref.abs().max().item())


def test_gradcheck_float64(device_backend):
    device, backend = device_backend
    x = _rows(4, 9, 2).to(device).requires_grad_(True)
    labels = x.detach().argmax(-1)
    top = x.detach().sort(-1, descending=True).values
    cut = (top[:, 4] + top[:, 5]) / 2  # the 5 largest kept, away from gradcheck's steps

    def f(inp):
        return rlhf_kernels.logprobs_from_logits(inp, labels, temperature=1.3, return_entropy=True, min_logit=cut,
                                                 backend=backend)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)


def test_hidden_path_equals_logits_path(device_backend):
    """logprobs_from_hidden with min_logit: the logits path's values and
    gradients, with vocabulary tiles that hold no kept logit (a tiny budget:
    many tiles)."""
    device, backend = device_backend
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, 16, generator=gen).to(device).requires_grad_(True)
    weight = torch.randn(300, 16, generator=gen).to(device).requires_grad_(True)
    bias = torch.randn(300, generator=gen).to(device).requires_grad_(True)
    logits = (hidden @ weight.T + bias).detach()
    thr = _mid_gap(logits, rlhf_kernels.truncation_threshold(logits, top_p=0.7, temperature=0.8))
    labels = logits.argmax(-1)
    for chunk_bytes in (None, 2048):
        logp, ent = rlhf_kernels.logprobs_from_hidden(hidden, weight, labels, bias=bias, temperature=0.8,
                                                      return_entropy=True, min_logit=thr, chunk_bytes=chunk_bytes,
                                                      backend=backend)
        (logp.sum() + 0.3 * ent.sum()).backward()
        grads = [t.grad.clone() for t in (hidden, weight, bias)]
        for t in (hidden, weight, bias):
            t.grad = None
        z = hidden @ weight.T + bias
        want_logp, want_ent = rlhf_kernels.logprobs_from_logits(z, labels, temperature=0.8, return_entropy=True,
                                                                min_logit=thr, backend="eager")
        (want_logp.sum() + 0.3 * want_ent.sum()).backward()
        torch.testing.assert_close(logp, want_logp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent, want_ent, atol=1e-5, rtol=1e-5)
        for got, t in zip(grads, (hidden, weight, bias)):
            torch.testing.assert_close(got, t.grad, atol=1e-4, rtol=1e-4)
            t.grad = None


def test_losses_take_the_truncation(device_backend):
    """ppo_loss_from_logits (padded and packed) and ppo_loss_from_hidden with
    the sampler's truncation: the loss of the truncated log-probs, and its
    gradients."""
    device, backend = device_backend
    gen = torch.Generator().manual_seed(9)
    hidden = torch.randn(2, 6, 16, generator=gen).to(device)
    weight = torch.randn(200, 16, generator=gen).to(device)
    logits = hidden @ weight.T
    labels = logits.argmax(-1)
    old = torch.randn(2, 6, generator=gen).to(device) * 0.1 - 1
    adv = torch.randn(2, 6, generator=gen).to(device)
    mask = torch.ones(2, 6, dtype=torch.bool, device=device)
    kw = dict(entropy_coef=0.01, backend=backend)
    thr = _mid_gap(logits, rlhf_kernels.truncation_threshold(logits, top_k=20, top_p=0.9))

    def composed(z):
        logp, ent = rlhf_kernels.logprobs_from_logits(z, labels, top_k=20, top_p=0.9, return_entropy=True,
                                                      backend=backend)
        return rlhf_kernels.ppo_loss_from_logprobs(logp, ent, old, adv, mask, **kw)[0]

    z1 = logits.clone().requires_grad_(True)
    want = composed(z1)
    want.backward()
    z2 = logits.clone().requires_grad_(True)
    loss, _ = rlhf_kernels.ppo_loss_from_logits(z2, labels, old, adv, mask, top_k=20, top_p=0.9, **kw)
    loss.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(z2.grad, z1.grad)
    cu = torch.tensor([0, 6, 12], dtype=torch.int32, device=device)
    packed, _ = rlhf_kernels.ppo_loss_from_logits(logits.view(12, 200), labels.view(12), old.view(12),
                                                  adv.view(12), mask.view(12), top_k=20, top_p=0.9, cu_seqlens=cu,
                                                  **kw)
    torch.testing.assert_close(packed, want)
    w = weight.clone().requires_grad_(True)
    from_hidden, _ = rlhf_kernels.ppo_loss_from_hidden(hidden, w, labels, old, adv, mask, min_logit=thr, **kw)
    torch.testing.assert_close(from_hidden, want, atol=1e-5, rtol=1e-5)
    from_hidden.backward()
    torch.testing.assert_close(w.grad, z1.grad.reshape(12, 200).T @ hidden.reshape(12, 16), atol=1e-4, rtol=1e-4)


def test_opcheck(device_backend):
    device, backend = device_backend
    ops = torch.ops.rlhf_kernels
    suffix = {"cpu": "", "cuda": "", "triton": "_triton"}.get(backend)
    if suffix is None:
        return
    x = _rows(4, 33, 4).float().to(device)
    labels = x.argmax(-1)
    cut = x.sort(-1, descending=True).values[:, 6].contiguous()
    forward = getattr(ops, "logprobs" + suffix).default
    for inplace in (False, True):
        torch.library.opcheck(forward, (x.clone().requires_grad_(True), labels, 0.9, -100, True, inplace, cut))
    _, ent, row_max, log_sum = forward(x, labels, 0.9, -100, True, False, cut)
    g = torch.randn(4, device=device)
    torch.library.opcheck(getattr(ops, "logprobs" + suffix + "_backward").default,
                          (g, g.clone(), x, labels, row_max, log_sum, ent, 0.9, -100, cut))
    torch.library.opcheck(getattr(ops, "logprobs" + suffix + "_backward_").default,
                          (g, None, x.clone(), labels, row_max, log_sum, None, 0.9, -100, cut))
    threshold = getattr(ops, "truncation_threshold" + suffix).default
    torch.library.opcheck(threshold, (x, 0.8, 5, 0.9, 0.05, False))
    torch.library.opcheck(threshold, (x.view(2, 2, 33)[:, :1], 1.0, 0, 0.5, 0.0, True))
    if backend == "cpu":
        out = ops.truncated_logprobs(x.clone().requires_grad_(True), labels, 1.0, -100, True, False, 0, 0.9, 0.0,
                                     False)
        assert out[0].requires_grad and out[1].requires_grad
        assert not any(t.requires_grad for t in out[2:])  # row_max, log_sum, the threshold
        for args in ((0.8, 5, 0.9, 0.05, False), (1.0, 0, 0.5, 0.0, True), (1.2, 0, 1.0, 0.1, False)):
            for inplace, compute_entropy in ((False, True), (True, False)):
                torch.library.opcheck(ops.truncated_logprobs.default,
                                      (x.clone().requires_grad_(True), labels, args[0], -100, compute_entropy, inplace,
                                       *args[1:]))


def test_torch_compile_fullgraph(device_backend):
    device, backend = device_backend
    torch._dynamo.reset()
    x = _rows(6, 64, 8).float().to(device)
    labels = x.argmax(-1)

    def loss_fn(z):
        logp, ent = rlhf_kernels.logprobs_from_logits(z, labels, temperature=0.9, top_k=10, top_p=0.8,
                                                      return_entropy=True, backend=backend)
        return (logp * 2.0).sum() - 0.01 * ent.sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    x1 = x.clone().requires_grad_(True)
    out = compiled(x1)
    out.backward()
    x2 = x.clone().requires_grad_(True)
    want = loss_fn(x2)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k=1.5), "top_k: expected an int"),
    (dict(top_k=-3), "top_k: expected an int"),
    (dict(top_p=0.0), "top_p: expected a value in"),
    (dict(top_p=1.5), "top_p: expected a value in"),
    (dict(min_p=-0.1), "min_p: expected a value in"),
    (dict(truncation_order="sglang"), "truncation_order: expected one of"),
    (dict(min_logit=torch.zeros(3)), "min_logit: shape"),
    (dict(min_logit="1"), "min_logit: expected a float or a tensor"),
    (dict(min_logit=torch.zeros(4, dtype=torch.long)), "min_logit: dtype"),
])
def test_bad_arguments(kwargs, match):
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match=match):
        rlhf_kernels.logprobs_from_logits(x, x.argmax(-1), **kwargs)


def test_truncation_not_with_vocab_parallel():
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match="top_k, top_p, min_p, min_logit: not with vocab_parallel_group"):
        rlhf_kernels.logprobs_from_logits(x, x.argmax(-1), top_p=0.9, vocab_parallel_group=object())


# --- the samplers' own code as oracles ---------------------------------------------


@pytest.mark.parametrize("sampler", [(50, None, None), (None, 0.9, None), (None, None, 0.05), (20, 0.8, 0.1)],
                         ids=str)
def test_transformers_warpers_kept_set(sampler):
    """transformers' TopK / TopP / MinP warpers, chained as generate() chains
    them, keep exactly our kept set on float32 rows without ties at the
    boundary; the log-softmax of their processed scores is our log-prob."""
    from transformers.generation.logits_process import (
        LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    top_k, top_p, min_p = sampler
    temperature = 0.7
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p:
        warpers.append(MinPLogitsWarper(min_p))
    x = _rows(16, 5000, 21).float()
    scores = warpers(None, x.clone())
    thr = rlhf_kernels.truncation_threshold(x, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    assert torch.equal(torch.isfinite(scores), x >= thr[:, None])
    labels = torch.multinomial(scores.softmax(-1), 1)[:, 0]
    logp = rlhf_kernels.logprobs_from_logits(x, labels, temperature=temperature, top_k=top_k, top_p=top_p,
                                             min_p=min_p)
    want = scores.log_softmax(-1).gather(-1, labels[:, None])[:, 0]
    torch.testing.assert_close(logp, want, atol=2e-5, rtol=2e-5)


def test_vllm_sampler_kept_set():
    """vLLM's own top-k / top-p (and its min-p processor's rule, applied
    first) keep our kept set with truncation_order="vllm"."""
    topk_topp = pytest.importorskip("vllm.v1.sample.ops.topk_topp_sampler")
    x = _rows(12, 4000, 23).float()
    k = torch.full((12,), 40, dtype=torch.long)
    p = torch.full((12,), 0.85)
    min_p = 0.02
    probs = x.softmax(-1)
    after_min_p = x.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), -math.inf)
    processed = topk_topp.apply_top_k_top_p_pytorch(after_min_p.clone(), k, p)
    thr = rlhf_kernels.truncation_threshold(x, top_k=40, top_p=0.85, min_p=min_p, truncation_order="vllm")
    assert torch.equal(torch.isfinite(processed), x >= thr[:, None])
    hf_order = rlhf_kernels.truncation_threshold(x, top_k=40, top_p=0.85, min_p=min_p)
    assert not torch.equal(hf_order, thr)  # the orders differ when min_p is combined with top_p

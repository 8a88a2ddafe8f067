"""The Triton kernels of truncated sampling, called directly (not through the
public API): rlhf_kernels::truncation_threshold_triton against the sort-based
float64 reference of the spec, and the log-prob row kernels with a per-row
min_logit (forward, backward, in place) against log_softmax over the kept set
in float64. Small N and few V: the interpreter runs each program in Python."""

import math
import os

import pytest
import torch

from rlhf_kernels import _dispatch

if not _dispatch.triton_installed():
    pytest.skip("Triton is not installed", allow_module_level=True)

from rlhf_kernels.triton import logprobs as tlp  # noqa: E402
from rlhf_kernels.triton import truncation as ttr  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1", allow_module_level=True)

IGNORE = -100
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
# 1: a single logit; 7: fewer than a tile, ties likely with integers; 1000 and
# 5003: several GPU tiles, 5003 prime (tails everywhere).
VOCABS = [1, 7, 1000, 5003]
# (top_k, top_p, min_p, min_p_first, temperature): each value of the brief's
# grid at least once, both orders where min-p meets top-k / top-p.
SAMPLERS = [
    (1, 1.0, 0.0, False, 1.0),  # top-k 1 alone: the max's tie group
    (5, 0.9, 0.0, False, 0.7),  # top-p on the top-k set
    (5, 0.5, 0.1, False, 1.3),  # all three, HF order
    (5, 0.5, 0.1, True, 1.3),  # all three, vLLM order
    (0, 0.9, 0.1, True, 0.7),  # top-p on the min-p set
    (-1, 0.5, 0.0, False, 1.0),  # top_k = V (-1 stands for V): off
    (0, 1.0, 0.1, False, 1.0),  # min-p alone
    (5, 1.0, 0.1, True, 0.7),  # top-k on the min-p set
    (0, 1.0, 0.0, False, 1.0),  # all off: -inf
]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _strided_logits(vocab, dtype, seed=0, scale=3.0, integer=False):
    """(2, 3, V) logits sliced to (2, 2, V): strided rows, read in place."""
    gen = _gen(seed)
    if integer:  # ties, and at the thresholds
        full = torch.randint(-3, 4, (2, 3, vocab), generator=gen).to(torch.float64)
    else:
        full = torch.randn(2, 3, vocab, generator=gen, dtype=torch.float64) * scale
    return full.to(dtype).to(DEVICE)[:, :-1]


# --- the float64 reference of the threshold (the spec's, with slack for rounding) ---


def ref_keep(x, temperature, top_k, top_p, min_p, min_p_first, slack=0.0):
    """The kept set of one row x (V,) float64. slack > 0 widens it (top-p's
    target times 1 + slack, min-p's cut lower by slack * (|m| + |T log min_p|)),
    slack < 0 narrows it: the two bracket the sets a rounded computation may
    give."""
    keep = torch.ones_like(x, dtype=torch.bool)
    m = x.max()
    p_target = min(top_p * (1 + slack), 1.0) if top_p < 1 else 1.0

    def minp(keep):
        if min_p <= 0:
            return keep
        shift = temperature * math.log(min_p)
        return keep & (x >= m + shift - slack * (abs(m) + abs(shift)))

    def topk(keep):
        if top_k <= 0 or top_k >= int(keep.sum()):
            return keep
        kth = x[keep].sort(descending=True).values[top_k - 1]
        return keep & (x >= kth)

    def topp(keep):
        if p_target >= 1:
            return keep
        q = torch.where(keep, ((x - m) / temperature).exp(), torch.zeros_like(x))
        z = q.sum()
        # The mass strictly above x_j (the spec's q[x > x_j].sum(), by a sort).
        values, order = x.sort()
        suffix = torch.cat([q[order].flip(0).cumsum(0).flip(0), q.new_zeros(1)])
        above = suffix[torch.searchsorted(values, x, right=True)]
        return keep & (above < p_target * z)

    return topp(topk(minp(keep))) if min_p_first else minp(topp(topk(keep)))


def _assert_kept_sets(logits, thr, sampler, slack):
    top_k, top_p, min_p, min_p_first, temperature = sampler
    rows = logits.reshape(-1, logits.shape[-1]).double().cpu()
    for r, (x, t) in enumerate(zip(rows, thr.cpu())):
        got = x >= t.double()
        want = ref_keep(x, temperature, top_k, top_p, min_p, min_p_first)
        if torch.equal(got, want):
            continue
        narrow = ref_keep(x, temperature, top_k, top_p, min_p, min_p_first, -slack)
        wide = ref_keep(x, temperature, top_k, top_p, min_p, min_p_first, slack)
        assert bool((narrow <= got).all() and (got <= wide).all()), (
            f"row {r}: kept {got.nonzero().flatten().tolist()}, want {want.nonzero().flatten().tolist()}")


def _slack(dtype):
    return 1e-12 if dtype == torch.float64 else 1e-5


def _threshold(logits, sampler):
    top_k, top_p, min_p, min_p_first, temperature = sampler
    return torch.ops.rlhf_kernels.truncation_threshold_triton(logits, temperature, top_k, top_p, min_p, min_p_first)


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_threshold_random_rows(dtype, vocab):
    logits = _strided_logits(vocab, dtype, seed=vocab)
    for sampler in SAMPLERS:
        if sampler[0] == -1:
            sampler = (vocab,) + sampler[1:]
        thr = _threshold(logits, sampler)
        assert thr.shape == (4,) and thr.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        _assert_kept_sets(logits, thr, sampler, _slack(dtype))
        if sampler[:3] == (0, 1.0, 0.0):
            assert bool((thr == -math.inf).all())
        if 0 < sampler[0] < vocab and sampler[1:3] == (1.0, 0.0):  # top-k alone: a logit's value
            for x, t in zip(logits.reshape(-1, vocab), thr):
                assert bool((x.to(thr.dtype) == t).any())


@pytest.mark.parametrize("vocab", [7, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_threshold_ties(dtype, vocab):
    # Integer logits in [-3, 3]: every threshold sits on a tie group, kept whole.
    logits = _strided_logits(vocab, dtype, seed=1, integer=True)
    for sampler in SAMPLERS:
        if sampler[0] == -1:
            sampler = (vocab,) + sampler[1:]
        _assert_kept_sets(logits, _threshold(logits, sampler), sampler, _slack(dtype))


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_threshold_large_logits(temperature):
    # |x| ~ 1e4: every probability but the max's underflows; the keys are exact.
    logits = _strided_logits(1000, torch.float32, seed=2, scale=1e4)
    for sampler in [(5, 0.9, 0.1, False, temperature), (50, 0.5, 0.0, True, temperature),
                    (0, 1.0, 1e-4, True, temperature)]:
        _assert_kept_sets(logits, _threshold(logits, sampler), sampler, 1e-5)


def test_threshold_special_values():
    x = torch.tensor([[0.0, -0.0, -1.0, 2.0, 2.0, -math.inf],
                      [1.0, math.nan, 0.0, 0.0, 0.0, 0.0],
                      [-0.0, 0.0, 0.0, -2.0, -3.0, -4.0]], device=DEVICE)
    thr = _threshold(x, (3, 1.0, 0.0, False, 1.0)).cpu()
    assert thr[0].item() == 0.0  # the 3rd largest: a zero, both zeros kept
    assert math.isnan(thr[1].item())  # a NaN in the row
    assert thr[2].item() == 0.0 and bool((x[2].cpu() >= thr[2]).sum() == 3)
    thr = _threshold(x[:1], (0, 0.5, 0.0, False, 1.0)).cpu()  # the tied max: mass above it 0 < top_p Z
    assert thr[0].item() == 2.0
    thr = _threshold(x[:1], (0, 1.0, 1.0, True, 1.0)).cpu()  # min_p 1: the max's tie group
    assert thr[0].item() == 2.0


def test_threshold_layouts_and_empty():
    logits = torch.randn(3, 4, 50, generator=_gen(3)).to(DEVICE)
    sampler = (5, 0.9, 0.1, True, 0.7)
    want = _threshold(logits.reshape(-1, 50).contiguous(), sampler)
    for view in (logits.transpose(0, 1), logits[:, ::2], logits[..., :1, :]):  # copied / strided / one row each
        got = _threshold(view, sampler)
        torch.testing.assert_close(got, _threshold(view.contiguous(), sampler), rtol=0, atol=0)
    assert torch.equal(_threshold(logits[:, 1:3], sampler), want.view(3, 4)[:, 1:3].reshape(-1))
    assert _threshold(logits[:0], sampler).shape == (0,)


@pytest.mark.parametrize("name, args", [
    ("temperature", (0.0, 5, 0.9, 0.1, False)),
    ("top_k", (1.0, -1, 0.9, 0.1, False)),
    ("top_p", (1.0, 5, 0.0, 0.1, False)),
    ("top_p", (1.0, 5, 1.5, 0.1, False)),
    ("min_p", (1.0, 5, 0.9, -0.1, False)),
    ("min_p", (1.0, 5, 0.9, 1.1, False)),
])
def test_threshold_bad_arguments(name, args):
    with pytest.raises(ValueError, match=name):
        torch.ops.rlhf_kernels.truncation_threshold_triton(torch.zeros(2, 5, device=DEVICE), *args)
    with pytest.raises(ValueError, match="logits"):
        torch.ops.rlhf_kernels.truncation_threshold_triton(torch.zeros(2, 0, device=DEVICE), 1.0, 0, 1.0, 0.0, False)


def test_threshold_opcheck():
    logits = torch.randn(2, 3, 40, generator=_gen(4)).to(DEVICE)
    torch.library.opcheck(torch.ops.rlhf_kernels.truncation_threshold_triton.default,
                          (logits, 0.7, 5, 0.9, 0.1, True))


# --- the row kernels over the kept set ----------------------------------------


def ref_rows(x, labels, thr, temperature, g, g_entropy):
    """float64 (logp, entropy, d logits) over the kept sets {x >= thr} of the
    rows of x (N, V), by log_softmax with the others masked to -inf; the
    spec's gradient keeps the label's one-hot term inv_T * g wherever the
    label is (masked_fill drops it for a label outside the set). Rows with an
    empty set are left to the callers (log_softmax of -inf only is NaN)."""
    x = x.detach().clone().requires_grad_()
    keep = x.detach() >= thr[:, None]
    lsm = torch.log_softmax((x / temperature).masked_fill(~keep, -math.inf), -1)
    entropy = -(lsm.exp() * lsm.masked_fill(~keep, 0.0)).sum(-1)
    ignored = labels == IGNORE
    index = torch.where(ignored, 0, labels)
    logp = lsm.gather(-1, index[:, None])[:, 0]
    logp = torch.where(ignored, 0.0, logp)
    entropy = torch.where(ignored, 0.0, entropy)
    ((g * logp).sum() + (g_entropy * entropy).sum()).backward()
    grad = x.grad
    outside = ~ignored & ~keep.gather(-1, index[:, None])[:, 0]
    grad[outside, index[outside]] += g[outside] / temperature
    return logp.detach(), entropy.detach(), grad


def _check(got, want, dtype, what, rtol=1e-5, atol=1e-5):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if dtype == torch.bfloat16:
        # A bf16 output: one of its ulps (the interpreter truncates to bf16 where a GPU rounds to nearest).
        err = (got - want).abs()
        ulp = torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(1e-30))) - 7)
        bound = ulp + atol + rtol * want.abs()
        assert bool((err <= bound).all()), (what, (err - bound).max().item())
    else:
        tol = (1e-10, 1e-10) if dtype == torch.float64 else (rtol, atol)
        torch.testing.assert_close(got, want, rtol=tol[0], atol=tol[1], equal_nan=True, msg=lambda m: f"{what}: {m}")


def _row_case(logits, thr, temperature, entropy_grad, seed):
    """Labels (one outside its kept set, one ignored), gradients, and the
    kernels' forward and backward (into a buffer and, where addressable, in
    place)."""
    vocab = logits.shape[-1]
    rows = logits.reshape(-1, vocab)
    n = rows.shape[0]
    gen = _gen(seed)
    labels = torch.randint(0, vocab, (n,), generator=gen).to(DEVICE)
    labels[0] = rows[0].float().argmin()  # outside the kept set unless that is the whole row
    labels[1] = IGNORE
    acc = thr.dtype
    g = torch.randn(n, generator=gen, dtype=torch.float64).to(acc).to(DEVICE)
    g_h = torch.randn(n, generator=gen, dtype=torch.float64).to(acc).to(DEVICE) if entropy_grad else None
    logp, ent, row_max, log_sum = tlp.forward(logits, labels, 1.0 / temperature, IGNORE, True, thr)
    out = torch.full(logits.shape, math.nan, dtype=logits.dtype, device=DEVICE)
    tlp.backward(g, g_h, logits, labels, row_max, log_sum, ent if entropy_grad else None, out, 1.0 / temperature,
                 IGNORE, thr)
    if tlp.addressable_in_place(logits):
        inplace = logits.clone()
        tlp.backward(g, g_h, inplace, labels, row_max, log_sum, ent if entropy_grad else None, inplace,
                     1.0 / temperature, IGNORE, thr)
        assert torch.equal(inplace, out)
    return labels, g, g_h, (logp, ent, row_max, log_sum), out


@pytest.mark.parametrize("temperature", [0.7, 1.3])
@pytest.mark.parametrize("vocab", [7, 1000, 5003])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_over_kept_set(dtype, vocab, temperature):
    logits = _strided_logits(vocab, dtype, seed=10 + vocab)
    thr = _threshold(logits, (5, 0.9, 0.1, True, temperature))
    thr[-1] = logits[1, 1].to(thr.dtype).max() + 1.0  # the last row: empty kept set
    labels, g, g_h, (logp, ent, row_max, log_sum), grad = _row_case(logits, thr, temperature, True, vocab)
    x = logits.reshape(-1, vocab).double()
    live = slice(0, 3)
    want_logp, want_ent, want_grad = ref_rows(x[live].cpu(), labels[live].cpu(), thr[live].double().cpu(),
                                              temperature, g[live].double().cpu(), g_h[live].double().cpu())
    assert logp[0].item() == -math.inf  # the label outside its kept set
    assert logp[1].item() == 0.0 and ent[1].item() == 0.0  # ignored
    _check(logp[live], want_logp, torch.float64 if dtype == torch.float64 else torch.float32, "logp")
    _check(ent[live], want_ent, torch.float64 if dtype == torch.float64 else torch.float32, "entropy")
    kept_max = torch.where(x >= thr[:, None].double(), x, -math.inf).amax(-1)
    assert torch.equal(row_max.double(), kept_max)  # the kept max, -inf for the empty set
    _check(grad.reshape(-1, vocab)[live], want_grad, dtype, "grad", rtol=1e-4, atol=1e-6)
    # The empty set: logp -inf, entropy 0 / 0, the gradient only the label's one-hot term.
    assert logp[3].item() == -math.inf and math.isnan(ent[3].item()) and log_sum[3].item() == 0.0
    want_empty = torch.zeros(vocab, dtype=torch.float64)
    want_empty[labels[3]] = g[3].double().item() / temperature
    _check(grad.reshape(-1, vocab)[3], want_empty, dtype, "grad of the empty row")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_ties_and_no_entropy_grad(dtype):
    # Integer logits with a top-k threshold on a tie group: the whole group is kept.
    logits = _strided_logits(1000, dtype, seed=5, integer=True)
    thr = _threshold(logits, (5, 1.0, 0.0, False, 1.0))
    labels, g, _, (logp, ent, _, _), grad = _row_case(logits, thr, 1.0, False, 5)
    x = logits.reshape(-1, 1000).double().cpu()
    assert bool(((x >= thr[:, None].double().cpu()).sum(-1) > 5).all())
    want_logp, want_ent, want_grad = ref_rows(x, labels.cpu(), thr.double().cpu(), 1.0, g.double().cpu(),
                                              torch.zeros(4, dtype=torch.float64))
    _check(logp, want_logp, torch.float32, "logp")
    _check(ent, want_ent, torch.float32, "entropy")
    _check(grad.reshape(-1, 1000), want_grad, dtype, "grad", rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_rows_large_logits(temperature):
    logits = _strided_logits(1000, torch.float32, seed=6, scale=1e4)
    thr = _threshold(logits, (0, 1.0, 1e-3, False, temperature))
    thr[2] = logits[1, 0].topk(3).values[-1]  # a row keeping its 3 largest
    labels, g, g_h, (logp, ent, _, _), grad = _row_case(logits, thr, temperature, True, 6)
    x = logits.reshape(-1, 1000).double().cpu()
    want_logp, want_ent, want_grad = ref_rows(x, labels.cpu(), thr.double().cpu(), temperature, g.double().cpu(),
                                              g_h.double().cpu())
    _check(logp, want_logp, torch.float32, "logp")
    _check(ent, want_ent, torch.float32, "entropy")
    _check(grad.reshape(-1, 1000), want_grad, torch.float32, "grad", rtol=1e-4, atol=1e-6)


def test_minus_inf_threshold_is_untruncated():
    # min_logit = -inf keeps every logit: the same bits as no min_logit.
    logits = _strided_logits(1000, torch.float32, seed=7)
    labels = torch.randint(0, 1000, (4,), generator=_gen(7)).to(DEVICE)
    thr = torch.full((4,), -math.inf, device=DEVICE)
    with_thr = tlp.forward(logits, labels, 1 / 0.7, IGNORE, True, thr)
    without = tlp.forward(logits, labels, 1 / 0.7, IGNORE, True)
    for a, b in zip(with_thr, without):
        assert torch.equal(a, b)
    g = torch.randn(4, generator=_gen(8)).to(DEVICE)
    grads = []
    for t in (thr, None):
        out = torch.empty(logits.shape, device=DEVICE)
        tlp.backward(g, g, logits, labels, without[2], without[3], without[1], out, 1 / 0.7, IGNORE, t)
        grads.append(out)
    assert torch.equal(grads[0], grads[1])


def test_rows_nan_logit_and_bad_label():
    logits = torch.randn(3, 20, generator=_gen(9)).to(DEVICE)
    logits[0, 3] = math.nan
    thr = torch.full((3,), -0.5, device=DEVICE)
    labels = torch.tensor([0, 25, 2], device=DEVICE)  # 25: out of range
    logits[0, 0] = 5.0  # a kept label (one outside the set is -inf, NaN or not)
    logp, ent, _, _ = tlp.forward(logits, labels, 1.0, IGNORE, True, thr)
    assert math.isnan(logp[0].item()) and math.isnan(ent[0].item())  # NaN propagates as without a threshold
    assert math.isnan(logp[1].item())
    out = torch.empty_like(logits)
    g = torch.ones(3, device=DEVICE)
    tlp.backward(g, None, logits, labels, *tlp.forward(logits, labels, 1.0, IGNORE, True, thr)[2:], None, out, 1.0,
                 IGNORE, thr)
    assert bool(out[1].isnan().all())


def test_custom_ops_take_min_logit():
    logits = _strided_logits(300, torch.float32, seed=11)
    labels = torch.randint(0, 300, (2, 2), generator=_gen(11)).to(DEVICE)
    thr = _threshold(logits, (5, 0.9, 0.0, False, 0.7))
    ops = torch.ops.rlhf_kernels
    logp, ent, row_max, log_sum = ops.logprobs_triton(logits, labels, 0.7, IGNORE, True, False, thr)
    want = tlp.forward(logits, labels.reshape(-1), 1 / 0.7, IGNORE, True, thr)
    assert torch.equal(logp.reshape(-1), want[0]) and torch.equal(row_max, want[2])
    g = torch.randn(2, 2, generator=_gen(12)).to(DEVICE)
    grad = ops.logprobs_triton_backward(g, g, logits, labels, row_max, log_sum, ent, 0.7, IGNORE, thr)
    x = logits.reshape(-1, 300).double().cpu()
    _, _, want_grad = ref_rows(x, labels.reshape(-1).cpu(), thr.double().cpu(), 0.7, g.reshape(-1).double().cpu(),
                               g.reshape(-1).double().cpu())
    _check(grad.reshape(-1, 300), want_grad, torch.float32, "grad", rtol=1e-4, atol=1e-6)
    contiguous = logits.contiguous()
    ops.logprobs_triton_backward_(g, g, contiguous, labels, row_max, log_sum, ent, 0.7, IGNORE, thr)
    assert torch.equal(contiguous, grad)
    # Without min_logit: the untruncated op, as before.
    untruncated = ops.logprobs_triton(logits, labels, 0.7, IGNORE, True, False)
    assert not torch.equal(untruncated[0], logp)


@pytest.mark.parametrize("bad, match", [
    (lambda n: torch.zeros(n, dtype=torch.float64), "dtype"),
    (lambda n: torch.zeros(n + 1), "shape"),
    (lambda n: torch.zeros(2 * n)[::2], "contiguous"),
])
def test_min_logit_checked(bad, match):
    logits = torch.randn(3, 10, generator=_gen(13)).to(DEVICE)
    labels = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="min_logit.*" + match):
        tlp.forward(logits, labels, 1.0, IGNORE, False, bad(3).to(DEVICE))

"""Property tests: every public op against its float64 reference on random cases.

Hypothesis draws the case (shapes including 1 and non-powers of two, dtypes,
masks with holes and all-masked rows, temperatures, clip settings, estimators,
gamma / lambda, padded and packed layouts, strided rows) and a seed; the
tensors come from a torch generator with that seed, so a failing case is
small, printable and replayable. Every backend of ``device_backend`` runs each
case (the Triton interpreter on tiny shapes: it is slow).

Determinism. By default (the ``ci`` profile) each property runs a fixed number
of examples from a fixed seed, after replaying the committed example database
``python_tests/ops/.hypothesis_db`` read-only: the same cases on every run.
``RLHF_PROPERTY_PROFILE=explore`` draws fresh random cases, ten times as many,
and saves any failure into that database; commit it and CI replays the failure
from then on.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase, ReadOnlyDatabase
from hypothesis.internal.reflection import function_digest  # the key Hypothesis files examples under

import rlhf_kernels
from rlhf_kernels import reference

DB_DIR = Path(__file__).resolve().parent / ".hypothesis_db"
PROFILE = os.environ.get("RLHF_PROPERTY_PROFILE", "ci")
if PROFILE not in ("ci", "explore"):
    raise ValueError(f"RLHF_PROPERTY_PROFILE: expected 'ci' or 'explore', got {PROFILE!r}")
EXAMPLE_SCALE = 10 if PROFILE == "explore" else 1

_BASE = settings(
    deadline=None,  # the Triton interpreter and first calls are slow, and CI machines vary
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Relative rounding of one value stored in each dtype (half an ulp, doubled for slack).
ROUNDING = {torch.float64: 1e-12, torch.float32: 2**-22, torch.bfloat16: 2**-8, torch.float16: 2**-11}


def run_property(name: str, backend: str, strategy, check, native: int, triton: int) -> None:
    """Run ``check(case)`` on ``native`` examples of ``strategy`` (``triton`` for
    the Triton interpreter).

    ci profile: first replay every example of the committed database for this
    (property, backend), read-only and nothing else; then a derandomised run
    (its seed is a digest of the test, so the same cases every time).
    Hypothesis keeps the two apart on purpose: a fixed seed or derandomize
    turns the database off. explore profile: fresh random cases, failures saved.
    """
    examples = (triton if backend == "triton" else native) * EXAMPLE_SCALE
    if backend == "reference":
        examples //= 2  # the fallback path: the formulas themselves, less to find there

    def prop(case):
        check(case)

    # The database key and the derandomised seed are digests of the test's
    # source plus this: one per (property, backend), as pytest's parametrisation
    # gets from Hypothesis' plugin.
    prop._hypothesis_internal_add_digest = f"{name}[{backend}]".encode()
    if PROFILE == "explore":
        settings(_BASE, max_examples=examples, database=DirectoryBasedExampleDatabase(DB_DIR))(given(strategy)(prop))()
        return
    database = ReadOnlyDatabase(DirectoryBasedExampleDatabase(DB_DIR))
    if any(True for _ in database.fetch(function_digest(prop))):  # a run of nothing is a skip
        settings(_BASE, database=database, phases=[Phase.reuse])(given(strategy)(prop))()
    settings(_BASE, max_examples=examples, derandomize=True, database=None)(given(strategy)(prop))()


# --- shared strategies and helpers ------------------------------------------------------------


def _gen(seed_: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed_)


def _mask(shape, gen, p_valid: float, all_masked_row: bool, length_one_row: bool) -> torch.Tensor:
    """Random holes and right padding; optionally one all-masked row and one
    row with a single valid token (when there are rows to spare)."""
    B, T = shape
    mask = torch.rand(shape, generator=gen) < p_valid
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask &= torch.arange(T) < lengths[:, None]
    if all_masked_row:
        mask[int(torch.randint(0, B, (1,), generator=gen))] = False
    if length_one_row and B > 1:
        row = int(torch.randint(0, B, (1,), generator=gen))
        mask[row] = False
        mask[row, int(torch.randint(0, T, (1,), generator=gen))] = True
    return mask


def _close(got, want, rtol, atol, what=""):
    got = got.detach().double().cpu()
    want = want.detach().double().cpu()
    assert got.shape == want.shape, (what, got.shape, want.shape)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=False, msg=lambda m: f"{what}: {m}")


def _grad_tols(dtype, scale):
    """A gradient in `dtype`: its rounding, plus float32 accumulation noise."""
    if dtype == torch.float64:
        return 1e-9, 1e-10 * scale
    return max(ROUNDING[dtype] * 2, 1e-4), 1e-6 * scale


dtypes_all = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])
seeds = st.integers(0, 2**31 - 1)


# --- logprobs_from_logits ----------------------------------------------------------------------


@dataclass
class LogprobsCase:
    layout: str  # "flat" (N, V) | "bt" (B, T, V) | "strided": logits[:, :-1] of (B, T + 1, V)
    rows: tuple[int, ...]
    vocab: int
    dtype: torch.dtype
    temperature: float
    scale: float
    p_ignore: float
    ignore_index: int
    return_entropy: bool
    backward: bool
    inplace_backward: bool
    seed: int


@st.composite
def logprobs_cases(draw, tiny: bool):
    layout = draw(st.sampled_from(["flat", "bt", "strided"]))
    max_rows = 3 if tiny else 6
    rows = (draw(st.integers(1, max_rows * 2)),) if layout == "flat" else (
        draw(st.integers(1, max_rows)), draw(st.integers(1, max_rows)))
    if tiny:
        vocab = draw(st.one_of(st.integers(1, 300), st.sampled_from([1, 2, 8193])))
    else:
        # 2048 is the C++ chunk, 8 its vector width; 8192 the interpreter's block.
        vocab = draw(st.one_of(st.integers(1, 600), st.sampled_from([1, 7, 8, 9, 2047, 2048, 2049, 4100, 8193])))
    return LogprobsCase(
        layout=layout, rows=rows, vocab=vocab, dtype=draw(dtypes_all),
        temperature=draw(st.sampled_from([1.0, 0.25, 0.7, 1.3, 4.0])),
        scale=draw(st.sampled_from([0.1, 2.0, 20.0])),
        p_ignore=draw(st.sampled_from([0.0, 0.3, 1.0])),
        ignore_index=draw(st.sampled_from([-100, -1])),
        return_entropy=draw(st.booleans()), backward=draw(st.booleans()),
        inplace_backward=draw(st.booleans()), seed=draw(seeds),
    )


def _check_logprobs(device, backend, case: LogprobsCase):
    gen = _gen(case.seed)
    V = case.vocab
    full_rows = case.rows if case.layout != "strided" else (case.rows[0], case.rows[1] + 1)
    full = (torch.randn(*full_rows, V, generator=gen, dtype=torch.float64) * case.scale).to(case.dtype)
    labels = torch.randint(0, V, case.rows, generator=gen)
    labels = torch.where(torch.rand(case.rows, generator=gen) < case.p_ignore,
                         torch.full_like(labels, case.ignore_index), labels)
    weights = torch.randn(case.rows, generator=gen, dtype=torch.float64)
    weights_h = torch.randn(case.rows, generator=gen, dtype=torch.float64)

    leaf = full.clone().to(device).requires_grad_(case.backward)
    base = leaf * 1 if case.backward and case.inplace_backward else leaf  # in-place needs a non-leaf
    logits = base[:, :-1] if case.layout == "strided" else base
    out = rlhf_kernels.logprobs_from_logits(
        logits, labels.to(device), temperature=case.temperature, ignore_index=case.ignore_index,
        return_entropy=case.return_entropy, inplace_backward=case.inplace_backward, backend=backend,
    )
    logp, ent = out if case.return_entropy else (out, None)

    x64 = (full[:, :-1] if case.layout == "strided" else full).double().clone().requires_grad_(True)
    want_logp, want_ent = reference.logprobs_from_logits(
        x64, labels, temperature=case.temperature, ignore_index=case.ignore_index, return_entropy=True)

    out_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32
    assert logp.dtype == out_dtype and logp.shape == labels.shape
    # float32 accumulation: the error grows with the magnitude of logits / T.
    magnitude = max(1.0, float(x64.detach().abs().max()) / case.temperature) if x64.numel() else 1.0
    rtol, atol = (1e-10, 1e-10 * magnitude) if case.dtype == torch.float64 else (2e-5, 2e-5 * magnitude)
    _close(logp, want_logp, rtol, atol, "logp")
    ignored = labels == case.ignore_index
    assert torch.all(logp.detach().cpu()[ignored] == 0)
    if ent is not None:
        assert ent.dtype == out_dtype
        _close(ent, want_ent, rtol, atol * math.log(V + 1), "entropy")
        assert torch.all(ent.detach().cpu()[ignored] == 0)
        assert torch.all(ent.detach().cpu() >= 0)  # an entropy is never negative, not even by rounding
    assert torch.all(logp.detach().cpu() <= 0)  # a log-probability is never positive (verl's bug)

    if not case.backward:
        return
    loss = (logp * weights.to(device, logp.dtype)).sum()
    want = (want_logp * weights).sum()
    if ent is not None:
        loss = loss + (ent * weights_h.to(device, ent.dtype)).sum()
        want = want + (want_ent * weights_h).sum()
    loss.backward()
    want.backward()
    grad = leaf.grad[:, :-1] if case.layout == "strided" else leaf.grad
    assert grad.dtype == case.dtype
    g_rtol, g_atol = _grad_tols(case.dtype, 1.0 / case.temperature)
    _close(grad, x64.grad, g_rtol, g_atol, "grad")
    if case.layout == "strided":
        assert torch.all(leaf.grad[:, -1] == 0)  # the position past the slice gets nothing


def test_logprobs_from_logits_property(device_backend):
    device, backend = device_backend
    run_property("logprobs", backend, logprobs_cases(tiny=backend == "triton"),
                 lambda c: _check_logprobs(device, backend, c), native=150, triton=25)


# --- kl_penalty -----------------------------------------------------------------------------------

ESTIMATORS = ("k1", "abs", "k2", "mse", "k3", "low_var_kl")


@st.composite
def kl_cases(draw, tiny: bool):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 5 if tiny else 40)) for _ in range(ndim))
    return dict(shape=shape, estimator=draw(st.sampled_from(ESTIMATORS)),
                dtype=draw(dtypes_all), ref_dtype=draw(dtypes_all),
                # 30 takes k3 past its clamps (|x| > 20, result > 10).
                spread=draw(st.sampled_from([0.05, 1.0, 30.0])), seed=draw(seeds))


def _check_kl(device, backend, case):
    gen = _gen(case["seed"])
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
    _close(kl, want, rtol, atol, "kl")
    (kl * grad_out.to(device, kl.dtype)).sum().backward()
    d = reference.kl_penalty_grad(x64, r64, case["estimator"]) * grad_out
    assert x.grad.dtype == case["dtype"] and r.grad.dtype == case["ref_dtype"]
    # k3 sits on exp(): a float32 input error of 1 ulp in (ref - logp) moves its
    # gradient by that much relative to exp(x).
    g_scale = 1.0 + float(d.abs().max())
    _close(x.grad, d, *_grad_tols(case["dtype"], g_scale * 10), "grad logp")
    _close(r.grad, -d, *_grad_tols(case["ref_dtype"], g_scale * 10), "grad ref_logp")


def test_kl_penalty_property(device_backend):
    device, backend = device_backend
    run_property("kl_penalty", backend, kl_cases(tiny=backend == "triton"),
                 lambda c: _check_kl(device, backend, c), native=150, triton=40)


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
        mask2 = _mask((B, T), gen, case["p_valid"], case["mask"] == "holes+edge-rows",
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
    _close(whitened, want, *_tol(dtype, 1.0), what)


def _check_gae(device, backend, case):
    gen = _gen(case["seed"])
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
    _close(raw, want_adv, *_tol(dtype, scale), "advantages")
    _close(ret, want_ret, *_tol(dtype, scale), "returns")
    valid = torch.ones(shape, dtype=torch.bool) if mask is None else mask
    assert torch.all(raw.cpu()[~valid] == 0) and torch.all(ret.cpu()[~valid] == 0)

    if case["whiten"]:
        adv_w, ret_w = rlhf_kernels.compute_gae(dev(rewards), dev(values), dev(mask), whiten=True, **kwargs)
        _close(ret_w, ret, 0, 0, "returns (whitened call)")
        _check_whitened(adv_w, raw, mask, dtype, "whitened advantages")


def test_compute_gae_property(device_backend):
    device, backend = device_backend
    run_property("compute_gae", backend, gae_cases(tiny=backend == "triton"),
                 lambda c: _check_gae(device, backend, c), native=150, triton=25)


@st.composite
def ppo_adv_cases(draw, tiny: bool):
    case = draw(gae_cases(tiny))
    case.update(estimator=draw(st.sampled_from(ESTIMATORS)),
                kl_coef=draw(st.sampled_from([0.0, 0.05, 0.3])),
                kl_coef_tensor=draw(st.booleans()))
    return case


def _check_ppo_advantages(device, backend, case):
    gen = _gen(case["seed"])
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
    _close(out.kl, unpad(kl2), *_tol(dtype, 1.0 + float(kl2.abs().max())), "kl")
    _close(out.token_rewards, unpad(rewards2), *_tol(dtype, 1.0 + float(rewards2.abs().max())), "token_rewards")
    _close(raw, unpad(adv2), *_tol(dtype, scale), "advantages")
    _close(out.returns, unpad(ret2), *_tol(dtype, scale), "returns")
    if case["whiten"]:
        _check_whitened(out.advantages, raw, mask, dtype, "whitened advantages")
    else:
        _close(out.advantages, raw, 0, 0, "advantages (whiten=False)")

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
    device, backend = device_backend
    run_property("ppo_advantages", backend, ppo_adv_cases(tiny=backend == "triton"),
                 lambda c: _check_ppo_advantages(device, backend, c), native=120, triton=25)


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
    gen = _gen(case["seed"])
    raw = torch.randn(case["batch"], generator=gen, dtype=torch.float64)
    scores = ((raw > 0).double() if case["binary"] else raw).to(case["dtype"])
    ids = None if case["ids"] is None else torch.tensor(case["ids"], dtype=torch.int64)
    got = rlhf_kernels.group_advantages(scores, case["group_size"], ids, mode=case["mode"], eps=case["eps"])
    want = reference.group_advantages(scores.double(), case["group_size"], ids, mode=case["mode"], eps=case["eps"])
    assert got.shape == scores.shape
    # grpo divides by (std + eps): float32 means carry eps32 * |s| / eps.
    amplify = 1.0 / case["eps"] if case["mode"] == "grpo" else 1.0
    tol = 1e-12 if case["dtype"] == torch.float64 else 2e-7
    _close(got, want, 1e-5, tol * amplify * (1.0 + float(scores.double().abs().max())), "group advantages")


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


# --- PPO losses ------------------------------------------------------------------------------------

AGGS = reference.AGG_MODES


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
    return _mask(shape, gen, 0.7, edge, edge)


def _check_stats(got, want, count, what):
    assert set(got) == set(want), (set(got), set(want))
    for name, w in want.items():
        g = got[name]
        assert g.dim() == 0, (what, name)
        # Fractions count tokens: a float32 / float64 disagreement at a clip
        # boundary moves them by 1 / count. Random data makes that rare.
        _close(g, w, 1e-5, 1e-6 * (1.0 + float(abs(w))), f"{what} stat {name}")


def _check_policy_loss(device, backend, case):
    gen = _gen(case["seed"])
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
    _close(loss, want, *((1e-10, 1e-12 * scale) if f64 else (1e-5, 1e-6 * scale)), "policy loss")
    _check_stats(stats, want_stats, int(mask.sum()), "policy")
    loss.backward()
    want.backward()
    assert x.grad.dtype == dtype
    assert torch.all(x.grad.cpu()[~mask] == 0)
    got_grad = torch.where(mask, x.grad.cpu().double(), 0.0)
    want_grad = torch.where(mask, x64.grad, 0.0)
    _close(got_grad, want_grad, *_grad_tols(dtype, scale), "policy grad")


def test_ppo_policy_loss_property(device_backend):
    device, backend = device_backend
    run_property("ppo_policy_loss", backend, token_loss_cases(tiny=backend == "triton"),
                 lambda c: _check_policy_loss(device, backend, c), native=150, triton=25)


def _check_value_loss(device, backend, case):
    gen = _gen(case["seed"])
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
    _close(loss, want, *((1e-10, 1e-12 * scale) if f64 else (1e-5, 1e-6 * scale)), "value loss")
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
    _close(torch.where(mask, x.grad.cpu().double(), 0.0), torch.where(mask, x64.grad, 0.0),
           *_grad_tols(dtype, 10.0), "value grad")


def test_ppo_value_loss_property(device_backend):
    device, backend = device_backend
    run_property("ppo_value_loss", backend, token_loss_cases(tiny=backend == "triton"),
                 lambda c: _check_value_loss(device, backend, c), native=150, triton=25)


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
    gen = _gen(case["seed"])
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
    _close(loss, want, *((1e-9, 1e-11 * scale) if f64 else (1e-5, 2e-5 * scale)), "loss from logits")
    _check_stats(stats, want_stats, int(mask.sum()), "from logits")
    loss.backward()
    want.backward()
    assert leaf.grad.dtype == dtype
    _close(leaf.grad, x64.grad, *_grad_tols(dtype, scale / case["temperature"]), "logits grad")
    assert torch.all(leaf.grad[:, -1] == 0)


def test_ppo_loss_from_logits_property(device_backend):
    device, backend = device_backend
    run_property("ppo_loss_from_logits", backend, logits_loss_cases(tiny=backend == "triton"),
                 lambda c: _check_loss_from_logits(device, backend, c), native=100, triton=20)

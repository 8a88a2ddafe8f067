"""Shared machinery of the property tests: each op's file (``ops/test_logprobs.py``,
``ops/test_advantages.py``, ``ops/test_ppo_loss.py``) checks every public op
against its float64 reference on random cases through ``run_property``.

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

import os
from pathlib import Path

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase, ReadOnlyDatabase
from hypothesis.internal.reflection import function_digest  # the key Hypothesis files examples under

DB_DIR = Path(__file__).resolve().parent / "ops" / ".hypothesis_db"
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
    if backend == "eager":
        examples //= 2  # the fallback path: the formulas themselves, less to find there

    def prop(case):
        check(case)

    # The database key and the derandomised seed are digests of the test's
    # source plus this: one per (property, backend), as pytest's parametrisation
    # gets from Hypothesis' plugin. The eager backend's examples are filed under
    # its deprecated name "reference" (ops/.hypothesis_db holds them so).
    key = "reference" if backend == "eager" else backend
    prop._hypothesis_internal_add_digest = f"{name}[{key}]".encode()
    if PROFILE == "explore":
        settings(_BASE, max_examples=examples, database=DirectoryBasedExampleDatabase(DB_DIR))(given(strategy)(prop))()
        return
    database = ReadOnlyDatabase(DirectoryBasedExampleDatabase(DB_DIR))
    if any(True for _ in database.fetch(function_digest(prop))):  # a run of nothing is a skip
        settings(_BASE, database=database, phases=[Phase.reuse])(given(strategy)(prop))()
    settings(_BASE, max_examples=examples, derandomize=True, database=None)(given(strategy)(prop))()


def run_backend_property(name: str, device_backend, cases, check, native: int, triton: int) -> None:
    """``run_property`` on the (device, backend) of the ``device_backend``
    fixture: the strategy ``cases(tiny=...)`` (tiny shapes for the Triton
    interpreter) and ``check(device, backend, case)``."""
    device, backend = device_backend
    run_property(name, backend, cases(tiny=backend == "triton"),
                 lambda c: check(device, backend, c), native=native, triton=triton)


# --- shared strategies and helpers ------------------------------------------------------------


def generator(seed_: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed_)


def random_mask(shape, gen, p_valid: float, all_masked_row: bool, length_one_row: bool) -> torch.Tensor:
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


def check_close(got, want, rtol, atol, what=""):
    got = got.detach().double().cpu()
    want = want.detach().double().cpu()
    assert got.shape == want.shape, (what, got.shape, want.shape)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=False, msg=lambda m: f"{what}: {m}")


def grad_tols(dtype, scale):
    """A gradient in `dtype`: its rounding, plus float32 accumulation noise."""
    if dtype == torch.float64:
        return 1e-9, 1e-10 * scale
    return max(ROUNDING[dtype] * 2, 1e-4), 1e-6 * scale


dtypes_all = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])
seeds = st.integers(0, 2**31 - 1)

# The KL estimators, in the order the strategies sample them.
ESTIMATORS = ("k1", "abs", "k2", "mse", "k3", "low_var_kl")

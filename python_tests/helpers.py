"""Shared test helpers: the GPU-only mark, tolerances and the bf16/fp16 accuracy
rule. Tests import them from here (``from helpers import ...``; pyproject.toml
puts python_tests/ on pytest's ``pythonpath``); conftest.py holds only fixtures,
hooks and pytest configuration."""

import math
import os

import pytest
import torch

import rlhf_kernels

# A test that needs a CUDA GPU: skipped on machines without one.
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")



def backends_for(device: str) -> list[str]:
    """Every backend that can run tensors of `device` on this machine (Triton
    on the CPU through its interpreter)."""
    names = rlhf_kernels.available_backends()
    if device == "cpu":
        return [b for b in names if b in ("cpu", "eager") or (b == "triton" and os.environ.get("TRITON_INTERPRET") == "1")]
    return [b for b in names if b in ("cuda", "triton", "eager")]


# (dtype, atol, rtol) for results computed with float32 accumulation from
# inputs of that dtype, compared with float64 on the same (rounded) inputs.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-5, 2e-5),
    torch.float16: (2e-5, 2e-5),
}


def assert_close_to_reference(got, want64, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got.double(), want64, atol=atol, rtol=rtol, equal_nan=True)


def assert_no_worse_than_torch(got, want64, torch_same_dtype, factor=2.0, floor=1e-6):
    """flash-attention's rule for low-precision inputs: the kernel's max error
    against float64 is at most `factor` times the error of the same computation
    done by PyTorch in the input dtype (plus a tiny floor for exact cases)."""
    kernel_err = (got.double() - want64).abs().max().item()
    torch_err = (torch_same_dtype.double() - want64).abs().max().item()
    assert kernel_err <= factor * torch_err + floor, (kernel_err, torch_err)


# (scale, temperature) pairs with |logits| / T ~ 1e4, where a softmax
# recomputed as x / T - lse cancels (lse itself is rounded at ulp(1e4) / 2 ~
# 5e-4): the magnitudes of the backward accuracy tests.
LARGE_LOGITS = {"1e4-T1": (1e4, 1.0), "100-T0.01": (100.0, 0.01)}


def large_logits(rows, vocab, scale, temperature, gen):
    """float32 (rows, vocab) logits of magnitude `scale`, rows in turn: randn *
    scale (a softmax all but one-hot); the same with 16 logits within a few T
    of the row max (a peaked row); and scale + randn * 3T (every logit within a
    few T of the others: a spread softmax)."""
    x = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * scale
    peaked = x[1::3]
    peaked[:, :16] = peaked.amax(-1, keepdim=True) + torch.randn(peaked.shape[0], 16, generator=gen,
                                                                 dtype=torch.float64) * 2 * temperature
    x[2::3] = scale + torch.randn(x[2::3].shape, generator=gen, dtype=torch.float64) * 3 * temperature
    return x.float()


def probable_labels(logits, gen):
    """Labels of large_logits rows with a probability that is not negligible
    (so that logp is O(1)): the argmax of a one-hot row, else one of the first
    16 columns."""
    rows = logits.shape[0]
    group = torch.randint(0, 16, (rows,), generator=gen)
    return torch.where(torch.arange(rows) % 3 == 0, logits.argmax(-1), group)


def policy_tokens(shape, device, seed=0, dtype=torch.float32, scale=1.0):
    """The policy losses' test tokens: fresh random (logp, old_logp,
    advantages, mask). Log-ratios of scale ~1 put most ratios far outside
    [0.8, 1.28]; a few beyond +-20 hit the log-ratio clamp; row 1 is fully
    masked and masked slots hold NaN (never read)."""
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(shape, generator=gen, dtype=torch.float64) * 3
    old = logp + torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    adv = torch.randn(shape, generator=gen, dtype=torch.float64)
    mask = torch.rand(shape, generator=gen) > 0.25
    flat_old = old.view(-1)
    if flat_old.numel() > 8:
        flat_old[3] = logp.view(-1)[3] - 25.0  # log-ratio clamped at +20
        flat_old[5] = logp.view(-1)[5] + 23.0  # log-ratio clamped at -20
        mask.view(-1)[3] = mask.view(-1)[5] = True
    if len(shape) == 2 and shape[0] > 1:
        mask[1] = False
    logp = torch.where(mask, logp, torch.full_like(logp, float("nan")))
    to = lambda x: x.to(dtype).to(device)  # noqa: E731
    return to(logp), to(old), to(adv), mask.to(device)


def check_stats(got, want, atol=1e-6, rtol=1e-5):
    """A loss's stats dict against the reference's: the same names, 0-dim tensors, close."""
    assert set(got) == set(want)
    for name in want:
        assert got[name].dim() == 0 and isinstance(got[name], torch.Tensor), name
        torch.testing.assert_close(got[name].double(), want[name].double(), atol=atol, rtol=rtol, msg=name)


def seeded_draws(kwargs: dict) -> dict:
    """Loss keywords with clip_cov's generator seeded anew: each call with
    them draws the same random choice (the op's and the reference's)."""
    if kwargs.get("loss_type") != "clip_cov":
        return kwargs
    return dict(kwargs, generator=torch.Generator().manual_seed(11))


def sequence_clip_rows(b: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """(b, 9) rows of ppo_policy_rows' form 8 for ppo_sequence_clip (b >= 9),
    with its edge cases: empty and fractional counts, log-ratios beyond +-20
    (rows 3, 4), a NaN sum (row 5), ratios at hi = 1.28 (row 6), at lo = 0.8
    (row 7) and at a dual clip of 3 (row 8), as close as float64 gets."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.zeros(b, 9, dtype=torch.float64)
    rows[:, 1] = torch.randint(0, 30, (b,), generator=gen).double()  # counts, 0 among them
    rows[:3, 1] = torch.tensor([0.25, 0.5, 1.5], dtype=torch.float64)  # weight sums below / near 1
    rows[:, 0] = torch.rand(b, generator=gen, dtype=torch.float64) * rows[:, 1]  # P_b
    rows[:, 7] = -torch.rand(b, generator=gen, dtype=torch.float64) * rows[:, 1]  # N_b
    rows[:, 2] = torch.randint(0, 10, (b,), generator=gen).double()  # tokens with A > 0
    rows[:, 3] = torch.randint(0, 10, (b,), generator=gen).double()  # A < 0
    rows[:, 4] = torch.randn(b, generator=gen, dtype=torch.float64) * 0.5 * rows[:, 1]  # sum of old - logp
    rows[3, 4], rows[4, 4] = -30.0 * rows[3, 1], 25.0 * rows[4, 1]  # |s_b| > 20: clamped, no gradient
    rows[5, 0] = float("nan")  # a NaN advantage kept
    rows[6, 1], rows[6, 4] = 1.0, -math.log(1.28)
    rows[7, 1], rows[7, 4] = 1.0, -math.log(0.8)
    rows[8, 1], rows[8, 4], rows[8, 7] = 1.0, -math.log(3.0), -1.0
    return rows.to(dtype)

"""The policy objectives (loss_type) of the Triton backend against the float64
eager reference with autograd: ppo_policy_loss (the policy token kernel) and
ppo_loss_from_logits (the fused logits kernel for the gradient, the policy
kernel for the loss and statistics), float32 and float64, with masked tokens,
ratios spread over the clip / cap / trust-region boundaries, and log-ratios
of +-25 beyond the clamp at +-20. Small shapes: the interpreter runs each
program in Python."""

import os

import pytest
import torch

import rlhf_kernels
from rlhf_kernels import _dispatch, reference

from helpers import seeded_draws

if not _dispatch.triton_installed():
    pytest.skip("Triton is not installed", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1", allow_module_level=True)

B, T, V = 3, 7, 37
LOSS_TYPES = reference.LOSS_TYPES
# Each objective's keywords, each pair asymmetric (a swap shows): dppo's
# thresholds small enough that some tokens are masked, its cap low enough
# that some kept tokens are capped.
KEYWORDS = {
    "clip": dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0),
    "cispo": dict(clip_low=0.2, clip_high=0.28),
    "sapo": dict(tau_pos=0.9, tau_neg=1.3),
    "gpg": dict(),
    "dppo_tv": dict(clip_low=0.04, clip_high=0.08, dual_clip=1.5),
    "dppo_kl": dict(clip_low=0.04, clip_high=0.08, dual_clip=1.5),
    "dro": dict(dro_beta=0.3),
    "geo_mean": dict(clip_low=0.2, clip_high=0.28),
    # bounds and shares that select some tokens on this data
    "clip_cov": dict(clip_low=0.2, clip_high=0.28, cov_ratio=0.05, cov_bounds=(0.0, 1.0)),
    "kl_cov": dict(cov_ratio=0.05, kl_cov_coef=0.5),
    "luspo": dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0),
    "vespo": dict(vespo_params=(2.5, 3.5, 3.0, 1.5)),
}
# The relative tolerance against float64, also the absolute one scaled by the largest compared value (at least 1).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
POLICY_STATS = ("clipfrac", "clipfrac_lower", "approx_kl", "ratio_max", "ratio_min")
LOGITS_STATS = POLICY_STATS + ("pg_loss", "kl", "entropy")


def _old_logp(logp, gen, extreme):
    """(logp, old_logp <= 0) from logp (float64): logp plus noise of scale 0.5,
    a sixth of the tokens on-policy (old_logp = logp: ratio 1, ties) and, with
    extreme, a third at log-ratios of exactly +25 or -25 (logp lowered by 28
    where old_logp = logp + 25, so that old_logp stays <= 0)."""
    old = (logp + 0.5 * torch.randn(logp.shape, generator=gen, dtype=torch.float64)).clamp(max=0.0)
    old = torch.where(torch.randint(0, 6, logp.shape, generator=gen) == 0, logp, old)
    if not extreme:
        return logp, old
    side = _sides(gen)
    rise, fall = side == 0, side == 1
    logp = torch.where(fall, logp - 28.0, logp)
    old = torch.where(rise, logp - 25.0, torch.where(fall, logp + 25.0, old))
    return logp, old


def _sides(gen):
    """Per token 0 (log-ratio +25), 1 (-25) or another value (neither), with
    tokens (1, 0) and (1, 1) (valid in _mask) at +25 and -25."""
    side = torch.randint(0, 6, (B, T), generator=gen)
    side[1, 0], side[1, 1] = 0, 1
    return side


def _mask(gen):
    mask = torch.rand(B, T, generator=gen) > 0.2
    mask[0, -1] = False
    mask[1, :2] = True
    return mask


def _policy_inputs(dtype, seed, extreme):
    gen = torch.Generator().manual_seed(seed)
    logp = -3.0 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    logp, old = _old_logp(logp, gen, extreme)
    adv = torch.randn(B, T, generator=gen, dtype=torch.float64)
    # Round once to the input dtype: the reference then sees exactly the kernel's inputs.
    return logp.to(dtype), old.to(dtype), adv.to(dtype), _mask(gen)


def _logits_inputs(dtype, seed, extreme):
    """As _policy_inputs through the logits: half the labels are the row's
    argmax (probabilities large enough for dppo's thresholds to act); with
    extreme, the label's logit lowered by 40 where old_logp = logp + 25."""
    gen = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    labels = torch.where(torch.rand(B, T, generator=gen) < 0.5, logits.argmax(-1),
                         torch.randint(0, V, (B, T), generator=gen))
    side = _sides(gen) if extreme else torch.full((B, T), 2)
    logits.scatter_add_(-1, labels.unsqueeze(-1), torch.where(side == 1, -40.0, 0.0).double().unsqueeze(-1))
    logits = logits.to(dtype)
    logp = reference.logprobs_from_logits(logits.double(), labels)
    _, old = _old_logp(logp, gen, False)
    old = torch.where(side == 0, logp - 25.0, torch.where(side == 1, logp + 25.0, old))
    ref = logp + 0.5 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = _mask(gen)
    labels[0, -1] = -100  # an ignored label on a masked slot
    return logits, labels, old.to(dtype), adv.to(dtype), mask, ref.to(dtype)


def _close(got, want, dtype, what):
    tol = TOL[dtype]
    scale = max(1.0, float(want.detach().abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got.detach().double(), want.detach(), atol=tol * scale, rtol=tol,
                               msg=lambda m: f"{what}: {m}")


def _check_stats(stats, want_stats, names, dtype):
    assert set(names) <= set(stats)
    for name in names:
        _close(stats[name], want_stats[name], dtype, name)


def _check_boundaries(loss_type, stats, extreme):
    """The inputs reach the objective's boundaries: the test cannot pass vacuously."""
    if loss_type in ("clip", "cispo", "dppo_tv", "dppo_kl", "geo_mean"):
        assert 0.0 < float(stats["clipfrac"]) < 1.0, stats
    if (loss_type.startswith("dppo") or loss_type == "geo_mean") and not extreme:
        assert 0.0 < float(stats["clipfrac_lower"]) < 1.0, stats
    if extreme and loss_type not in ("geo_mean", "luspo"):  # their ratios are sequence means
        assert float(stats["ratio_max"]) > 1e8 and float(stats["ratio_min"]) < 1e-8, stats


@pytest.mark.parametrize("extreme", [False, True], ids=["spread", "clamped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_policy_loss_matches_float64(loss_type, dtype, extreme):
    logp, old, adv, mask = _policy_inputs(dtype, seed=1, extreme=extreme)
    kw = dict(KEYWORDS[loss_type], loss_type=loss_type)
    x = logp.clone().to(DEVICE).requires_grad_(True)
    loss, stats = rlhf_kernels.ppo_policy_loss(x, old.to(DEVICE), adv.to(DEVICE), mask.to(DEVICE),
                                               backend="triton", **seeded_draws(kw))
    loss.backward()
    x64 = logp.double().requires_grad_(True)
    want, want_stats = reference.ppo_policy_loss(x64, old.double(), adv.double(), mask, **seeded_draws(kw))
    want.backward()
    _close(loss.cpu(), want, dtype, "loss")
    _check_stats({k: v.cpu() for k, v in stats.items()}, want_stats, POLICY_STATS, dtype)
    _close(x.grad.cpu(), x64.grad, dtype, "d loss / d logp")
    assert torch.all(x.grad.cpu()[~mask] == 0)
    if loss_type in ("clip", "sapo"):  # through the ratio: none beyond the clamp of the log-ratio
        beyond = (logp.double() - old.double()).abs() > 20.0
        assert torch.all(x.grad.cpu()[beyond] == 0) and torch.all(x64.grad[beyond] == 0)
    _check_boundaries(loss_type, want_stats, extreme)


@pytest.mark.parametrize("extreme", [False, True], ids=["spread", "clamped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_from_logits_matches_float64(loss_type, dtype, extreme):
    logits, labels, old, adv, mask, ref = _logits_inputs(dtype, seed=2, extreme=extreme)
    kw = dict(KEYWORDS[loss_type], loss_type=loss_type, kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01)
    x = logits.clone().to(DEVICE).requires_grad_(True)
    loss, stats = rlhf_kernels.ppo_loss_from_logits(
        x, labels.to(DEVICE), old.to(DEVICE), adv.to(DEVICE), mask.to(DEVICE), ref_logp=ref.to(DEVICE),
        backend="triton", **seeded_draws(kw))
    loss.backward()
    x64 = logits.double().requires_grad_(True)
    want, want_stats = reference.ppo_loss_from_logits(x64, labels, old.double(), adv.double(), mask,
                                                      ref_logp=ref.double(), **seeded_draws(kw))
    want.backward()
    _close(loss.cpu(), want, dtype, "loss")
    _check_stats({k: v.cpu() for k, v in stats.items()}, want_stats, LOGITS_STATS, dtype)
    _close(x.grad.cpu(), x64.grad, dtype, "d loss / d logits")
    assert torch.all(x.grad.cpu()[~mask] == 0)
    _check_boundaries(loss_type, want_stats, extreme)

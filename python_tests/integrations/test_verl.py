"""The verl integration, against the installed verl.

For each patched function: verl's original and our adapter give the same
outputs and gradients (random inputs, masks with holes, all-masked rows, float
masks and rollout weights, bf16 where verl takes it); patch() swaps every
lookup the trainers use (and reaches Ray workers through the setup hook) and
unpatch() restores identity; an untested version is refused before anything is
patched. Skipped where verl is not installed."""

from __future__ import annotations

import importlib
import importlib.metadata
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import rlhf_kernels
from rlhf_kernels import integrations
from rlhf_kernels.integrations import UntestedVersionError

from integration_helpers import (assert_outputs_close, assert_served_only, compare_outputs, compare_outputs_bf16,
                                 mask_with_holes, require, weight_masks)


@pytest.fixture(scope="module")
def verl_mods():
    core = require("verl.trainer.ppo.core_algos", "verl")
    functional = require("verl.utils.torch_functional", "verl")
    from rlhf_kernels.integrations import verl as rk_verl

    return core, functional, rk_verl


def _verl_adapter(rk_verl, name):
    for target in rk_verl._patcher.targets:
        if target.name == name:
            module = importlib.import_module(target.module)
            return getattr(module, name), target.make(getattr(module, name))
    raise KeyError(name)


def test_verl_patch_reaches_ray_workers_through_the_setup_hook(verl_mods):
    """The README's recipe for verl's Ray workers (a patch() in the driver does
    not reach them): Ray's worker_process_setup_hook runs it in every worker."""
    ray = require("ray", "verl")

    def _patched_in_worker():  # local: sent to the worker by value
        import verl.trainer.ppo.core_algos as core_algos

        return hasattr(core_algos.agg_loss, "__wrapped_original__")

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "rlhf_kernels.integrations.verl.patch"})
    try:
        assert ray.get(ray.remote(_patched_in_worker).remote())
    finally:
        ray.shutdown()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verl_logprobs_and_entropy(verl_mods, dtype):
    _, _, rk_verl = verl_mods
    gen = torch.Generator().manual_seed(10)
    logits = (3 * torch.randn(3, 6, 211, generator=gen)).to(dtype)
    labels = torch.randint(0, 211, (3, 6), generator=gen)
    compare = compare_outputs if dtype == torch.float32 else compare_outputs_bf16
    original, ours = _verl_adapter(rk_verl, "logprobs_from_logits")
    compare(lambda x: original(x, labels), lambda x: ours(x, labels), [logits])
    original, ours = _verl_adapter(rk_verl, "entropy_from_logits")
    compare(original, ours, [logits])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verl_fused_linear_for_ppo(verl_mods, monkeypatch, dtype):
    """verl's FusedLinearForPPO (the hidden-state head its dense models call)
    on logprobs_from_hidden: verl's outputs and gradients (bf16 by the 2x
    rule), and our op ran."""
    _, _, rk_verl = verl_mods
    original, ours = _verl_adapter(rk_verl, "FusedLinearForPPO")
    gen = torch.Generator().manual_seed(12)
    hidden = (2 * torch.randn(2, 7, 16, generator=gen)).to(dtype)
    weight = (torch.randn(1201, 16, generator=gen) / 4).to(dtype)
    ids = torch.randint(0, 1201, (2, 7), generator=gen)
    calls = []
    real = rlhf_kernels.logprobs_from_hidden
    monkeypatch.setattr(rlhf_kernels, "logprobs_from_hidden", lambda *a, **k: calls.append(1) or real(*a, **k))
    theirs_fn = lambda h, w: original(chunk_size=5)(h, w, ids, temperature=0.8)  # noqa: E731
    ours_fn = lambda h, w: ours(chunk_size=5)(h, w, ids, temperature=0.8)  # noqa: E731
    if dtype == torch.float32:
        compare_outputs(theirs_fn, ours_fn, [hidden, weight], atol=2e-5, rtol=2e-5)
    else:
        compare_outputs_bf16(theirs_fn, ours_fn, [hidden, weight])
    assert calls


@pytest.mark.parametrize("name", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "k3+", "low_var_kl+"])
def test_verl_kl_penalty(verl_mods, name):
    _, _, rk_verl = verl_mods
    gen = torch.Generator().manual_seed(11)
    logp = -3 * torch.rand(4, 9, generator=gen)
    ref = logp + torch.randn(4, 9, generator=gen)
    ref[0, :3] = logp[0, :3] + torch.tensor([30.0, -30.0, 0.0])  # the clamps
    original, ours = _verl_adapter(rk_verl, "kl_penalty")
    compare_outputs(lambda a, b: original(a, b, name), lambda a, b: ours(a, b, name), [logp, ref])
    with pytest.raises(NotImplementedError):
        ours(logp, ref, "full")


def test_verl_gae(verl_mods):
    _, _, rk_verl = verl_mods
    gen = torch.Generator().manual_seed(12)
    rewards = torch.randn(5, 11, generator=gen)
    values = torch.randn(5, 11, generator=gen)
    mask = mask_with_holes(5, 11, gen).long()
    original, ours = _verl_adapter(rk_verl, "compute_gae_advantage_return")
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8)]:
        assert_outputs_close(ours(rewards, values, mask, gamma, lam), original(rewards, values, mask, gamma, lam))
    one = torch.zeros_like(mask)
    one[2, 4] = 1
    for m in (one, torch.zeros_like(mask)):  # verl's whitening refuses fewer than two tokens; so do we
        with pytest.raises(ValueError):
            original(rewards, values, m, 1.0, 0.95)
        with pytest.raises(ValueError):
            ours(rewards, values, m, 1.0, 0.95)


@pytest.mark.parametrize("name", ["compute_grpo_outcome_advantage", "compute_rloo_outcome_advantage",
                                  "compute_grpo_vectorized_outcome_advantage",
                                  "compute_rloo_vectorized_outcome_advantage"])
@pytest.mark.parametrize("norm", [True, False])
def test_verl_outcome_advantages(verl_mods, name, norm):
    _, _, rk_verl = verl_mods
    gen = torch.Generator().manual_seed(13)
    # groups of 4, 3, 1 (a singleton) and 2 with equal scores, ids as verl passes them (uuid strings), shuffled
    ids = np.array(["a"] * 4 + ["b"] * 3 + ["c"] + ["d"] * 2, dtype=object)
    order = torch.randperm(len(ids), generator=gen).numpy()
    ids = ids[order]
    rewards = torch.zeros(len(ids), 6)
    rewards[:, -1] = torch.randn(len(ids), generator=gen)
    rewards[ids == "d", -1] = 0.5
    mask = mask_with_holes(len(ids), 6, gen).long()
    original, ours = _verl_adapter(rk_verl, name)
    kw = {"norm_adv_by_std_in_grpo": norm} if "grpo" in name else {}
    assert_outputs_close(ours(rewards, mask, ids, **kw), original(rewards, mask, ids, **kw))


class _ActorConfig(SimpleNamespace):
    def get(self, key, default=None):
        return getattr(self, key, default)


@pytest.mark.parametrize("agg", ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                                 "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("batch_info", [{}, {"dp_size": 2, "batch_num_tokens": 50, "global_batch_size": 9,
                                             "loss_scale_factor": 16}])
def test_verl_policy_loss(verl_mods, agg, batch_info):
    _, _, rk_verl = verl_mods
    gen = torch.Generator().manual_seed(14)
    old = -2 * torch.rand(4, 10, generator=gen)
    new = old + 0.4 * torch.randn(4, 10, generator=gen)
    new[0, 0] = old[0, 0] + 25.0  # the log-ratio clamp
    adv = torch.randn(4, 10, generator=gen)
    mask = mask_with_holes(4, 10, gen).long()
    config = _ActorConfig(clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.28, clip_ratio_c=3.0,
                          global_batch_info=batch_info)
    original, ours = _verl_adapter(rk_verl, "compute_policy_loss_vanilla")
    # gradients w.r.t. log_prob only: old_log_prob and advantages are data (verl detaches them; ours takes no gradient)
    compare_outputs(lambda n: original(old, n, adv, mask, agg, config), lambda n: ours(old, n, adv, mask, agg, config), [new])
    # a fully masked micro-batch: verl divides by 0 (NaN), and so do we
    empty = torch.zeros_like(mask)
    if not batch_info and agg != "token-sum":
        assert torch.isnan(ours(old, new, adv, empty, agg, config)[0])
    assert_outputs_close(ours(old, new, adv, empty, agg, config), original(old, new, adv, empty, agg, config))
    weights = torch.rand(4, 10, generator=gen)  # rollout correction (served: token_weights)
    assert_outputs_close(ours(old, new, adv, mask, agg, config, weights), original(old, new, adv, mask, agg, config, weights))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_verl_value_loss(verl_mods, agg):
    _, _, rk_verl = verl_mods
    gen = torch.Generator().manual_seed(15)
    values = torch.randn(4, 10, generator=gen)
    vpreds = values + 0.5 * torch.randn(4, 10, generator=gen)
    returns = torch.randn(4, 10, generator=gen)
    mask = mask_with_holes(4, 10, gen)
    original, ours = _verl_adapter(rk_verl, "compute_value_loss")
    for kw in ({}, {"dp_size": 2, "batch_num_tokens": 30, "global_batch_size": 8, "loss_scale_factor": 4}):
        # gradients w.r.t. vpreds only: returns and old values are targets
        compare_outputs(lambda v: original(v, returns, values, mask, 0.2, agg, **kw),
                 lambda v: ours(v, returns, values, mask, 0.2, agg, **kw), [vpreds])


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_verl_losses_dtype_and_fallbacks(verl_mods, agg):
    """bf16 inputs: verl's seq-mean losses are float32 (token-mean keeps bf16),
    and ours match the dtype; a gradient wanted w.r.t. the advantages or the
    returns, or a global count of 0, runs verl's own code."""
    _, _, rk_verl = verl_mods
    gen = torch.Generator().manual_seed(16)
    old = -2 * torch.rand(4, 10, generator=gen)
    new = old + 0.4 * torch.randn(4, 10, generator=gen)
    adv = torch.randn(4, 10, generator=gen)
    mask = mask_with_holes(4, 10, gen).long()
    config = _ActorConfig(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=3.0,
                          global_batch_info={})
    original, ours = _verl_adapter(rk_verl, "compute_policy_loss_vanilla")
    bf = [t.bfloat16() for t in (old, new, adv)]
    assert ours(*bf, mask, agg, config)[0].dtype == original(*bf, mask, agg, config)[0].dtype
    compare_outputs(lambda a: original(old, new, a, mask, agg, config), lambda a: ours(old, new, a, mask, agg, config),
             [adv])
    v_original, v_ours = _verl_adapter(rk_verl, "compute_value_loss")
    assert v_ours(new.bfloat16(), adv.bfloat16(), old.bfloat16(), mask, 0.2, agg)[0].dtype == \
        v_original(new.bfloat16(), adv.bfloat16(), old.bfloat16(), mask, 0.2, agg)[0].dtype
    compare_outputs(lambda r: v_original(new, r, old, mask, 0.2, agg), lambda r: v_ours(new, r, old, mask, 0.2, agg), [adv])
    zero = {"dp_size": 2, "batch_num_tokens": 0, "global_batch_size": 0}
    assert_outputs_close(v_ours(new, adv, old, mask, 0.2, agg, **zero), v_original(new, adv, old, mask, 0.2, agg, **zero))


_VERL_AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
_VERL_BATCH_INFOS = [{}, {"dp_size": 2, "batch_num_tokens": 50, "global_batch_size": 9},
                     {"dp_size": 4, "batch_num_tokens": 37, "global_batch_size": 6, "loss_scale_factor": 16},
                     {"loss_scale_factor": 3}]


@pytest.mark.parametrize("agg", _VERL_AGG_MODES)
@pytest.mark.parametrize("batch_info", _VERL_BATCH_INFOS)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.long])
def test_verl_agg_loss(verl_mods, agg, batch_info, mask_dtype):
    _, _, rk_verl = verl_mods
    gen = torch.Generator().manual_seed(16)
    loss_mat = torch.randn(5, 11, generator=gen)
    mask = mask_with_holes(5, 11, gen).to(mask_dtype)
    original, ours = _verl_adapter(rk_verl, "agg_loss")
    call = lambda fn: (lambda x: fn(x, mask, agg, **batch_info))  # noqa: E731
    compare_outputs(call(original), call(ours), [loss_mat])
    compare_outputs(call(original), call(ours), [loss_mat.double()], atol=1e-7, rtol=1e-7)
    # bf16: token modes stay bf16, seq-mean modes come out float32 (verl's float32 sequence mask)
    compare_outputs_bf16(call(original), call(ours), [(3 * loss_mat).bfloat16()])
    # a fully masked micro-batch: verl's 0 / 0 (NaN) without global counts, gradients 0
    empty = torch.zeros_like(mask)
    empty_call = lambda fn: (lambda x: fn(x, empty, agg, **batch_info))  # noqa: E731
    compare_outputs(empty_call(original), empty_call(ours), [loss_mat])
    if not batch_info.get("batch_num_tokens") and agg != "token-sum":
        assert torch.isnan(ours(loss_mat, empty, agg, **batch_info))


@pytest.mark.parametrize("agg", _VERL_AGG_MODES)
def test_verl_agg_loss_nonfinite_outside_mask(verl_mods, agg):
    """verl selects masked tokens away in the token modes but multiplies by the
    mask in the seq-mean modes (NaN leaks into the loss, not the gradients)."""
    _, _, rk_verl = verl_mods
    gen = torch.Generator().manual_seed(17)
    loss_mat = torch.randn(4, 9, generator=gen)
    mask = mask_with_holes(4, 9, gen)
    loss_mat[0, 1] = float("nan")  # a hole of a sequence with valid tokens
    loss_mat[1, 3] = float("inf")  # the fully masked sequence
    original, ours = _verl_adapter(rk_verl, "agg_loss")
    compare_outputs(lambda x: original(x, mask, agg), lambda x: ours(x, mask, agg), [loss_mat])
    assert torch.isnan(ours(loss_mat, mask, agg)) == agg.startswith("seq-mean")


def test_verl_agg_loss_falls_back_to_verl(verl_mods):
    """Per-token float weights (served), tensor global counts (verl's own
    code), unknown modes, missing global counts with dp_size > 1 (its error)."""
    _, _, rk_verl = verl_mods
    gen = torch.Generator().manual_seed(18)
    loss_mat = torch.randn(3, 7, generator=gen)
    weights = torch.rand(3, 7, generator=gen)
    original, ours = _verl_adapter(rk_verl, "agg_loss")
    for agg in _VERL_AGG_MODES:
        compare_outputs(lambda x: original(x, weights, agg), lambda x: ours(x, weights, agg), [loss_mat])
        kw = {"dp_size": 2, "batch_num_tokens": torch.tensor(9), "global_batch_size": torch.tensor(3)}
        mask = weights > 0.3
        compare_outputs(lambda x: original(x, mask, agg, **kw), lambda x: ours(x, mask, agg, **kw), [loss_mat])
        if agg != "token-sum":
            with pytest.raises(ValueError, match="required when dp_size > 1"):
                ours(loss_mat, mask, agg, dp_size=2)
    with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
        ours(loss_mat, weights > 0.5, "seq-sum")


def test_verl_patch_swaps_registries_and_trainer_lookups(verl_mods):
    core, functional, rk_verl = verl_mods
    losses = require("verl.workers.utils.losses", "verl")
    names = ["compute_policy_loss_vanilla", "compute_value_loss", "kl_penalty", "compute_gae_advantage_return",
             "compute_grpo_outcome_advantage", "compute_rloo_outcome_advantage", "agg_loss"]
    originals = {n: getattr(core, n) for n in names}
    logprobs = functional.logprobs_from_logits
    with rk_verl.patched():
        for n in names:
            assert getattr(core, n).__wrapped_original__ is originals[n]
        assert core.get_policy_loss_fn("vanilla") is core.compute_policy_loss_vanilla
        assert core.get_adv_estimator_fn("grpo") is core.compute_grpo_outcome_advantage
        assert core.get_adv_estimator_fn("rloo") is core.compute_rloo_outcome_advantage
        assert core.get_adv_estimator_fn("grpo_vectorized") is core.compute_grpo_vectorized_outcome_advantage
        assert core.get_adv_estimator_fn("rloo_vectorized") is core.compute_rloo_vectorized_outcome_advantage
        for name in ("cispo", "sapo", "gpg", "dppo_tv", "dppo_kl", "dro"):
            assert core.get_policy_loss_fn(name) is getattr(core, f"compute_policy_loss_{name}")
        assert core.get_adv_estimator_fn("gae") is core.compute_gae_advantage_return
        assert losses.compute_value_loss is core.compute_value_loss and losses.kl_penalty is core.kl_penalty
        assert losses.agg_loss is core.agg_loss and "verl.workers.utils.losses.agg_loss" in rk_verl.patched_names()
        assert functional.logprobs_from_logits is not logprobs
    for n in names:
        assert getattr(core, n) is originals[n]
    assert core.get_policy_loss_fn("vanilla") is originals["compute_policy_loss_vanilla"]
    assert core.get_adv_estimator_fn("grpo") is originals["compute_grpo_outcome_advantage"]
    assert losses.compute_value_loss is originals["compute_value_loss"] and losses.agg_loss is originals["agg_loss"]
    assert functional.logprobs_from_logits is logprobs


def test_verl_unknown_version_refuses(verl_mods, monkeypatch):
    core, _, rk_verl = verl_mods
    before = core.kl_penalty
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.1.0")
    with pytest.raises(UntestedVersionError, match=r"verl 0\.1\.0 is not a tested version"):
        rk_verl.patch()
    assert core.kl_penalty is before


@pytest.mark.parametrize("agg", ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                                 "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("batch_info", [{}, {"dp_size": 2, "batch_num_tokens": 50, "global_batch_size": 9,
                                             "loss_scale_factor": 16}])
def test_verl_policy_losses_serve_float_masks_and_rollout_weights(verl_mods, agg, batch_info):
    """verl's vanilla and GSPO losses with float masks and rollout IS weights
    (zeros included): served by our kernels, verl's results and gradients."""
    core, _, rk_verl = verl_mods
    gen = torch.Generator().manual_seed(40)
    old = -2 * torch.rand(4, 10, generator=gen)
    new = old + 0.4 * torch.randn(4, 10, generator=gen)
    adv = torch.randn(4, 10, generator=gen)
    is_weights = 2 * torch.rand(4, 10, generator=gen)
    zero_weight = is_weights.clone()
    zero_weight[0, 0] = 0.0  # a valid token of weight 0: verl still counts its clipping
    from verl.workers.config import FSDPActorConfig

    # verl's GSPO asserts a real ActorConfig
    config = FSDPActorConfig(clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.28, clip_ratio_c=3.0,
                             strategy="fsdp", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2, rollout_n=1,
                             global_batch_info=batch_info)
    integrations.reset_report()
    calls = 0
    with rk_verl.patched():
        for name in ("compute_policy_loss_vanilla", "compute_policy_loss_gspo"):
            ours = getattr(core, name)
            original = ours.__wrapped_original__
            assert core.get_policy_loss_fn(name.rpartition("_")[2]) is ours
            for mask in weight_masks(gen, 4, 10).values():
                for w in (None, is_weights, zero_weight):
                    compare_outputs(lambda n: original(old, n, adv, mask, agg, config, w),
                             lambda n: ours(old, n, adv, mask, agg, config, w), [new])
                    calls += 1
            assert_served_only(f"verl.{name}", calls)
            calls = 0
        # GSPO past verl's clamp of the sequence log-ratio (10): verl's own code, counted
        far = new.clone()
        far[2] += 12.0
        mask = mask_with_holes(4, 10, gen)
        compare_outputs(lambda n: core.compute_policy_loss_gspo.__wrapped_original__(old, n, adv, mask, agg, config),
                 lambda n: core.compute_policy_loss_gspo(old, n, adv, mask, agg, config), [far])
    assert integrations.report()["verl.compute_policy_loss_gspo"]["handed_back"] == {
        "a sequence log-ratio above verl's GSPO clamp of 10": 1}


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_verl_value_and_agg_loss_serve_float_masks(verl_mods, agg):
    core, _, rk_verl = verl_mods
    gen = torch.Generator().manual_seed(41)
    values = torch.randn(4, 10, generator=gen)
    vpreds = values + 0.5 * torch.randn(4, 10, generator=gen)
    returns = torch.randn(4, 10, generator=gen)
    loss_mat = torch.randn(4, 10, generator=gen)
    integrations.reset_report()
    calls = 0
    with rk_verl.patched():
        value_loss, aggregate = core.compute_value_loss, core.agg_loss
        for mask in weight_masks(gen, 4, 10).values():
            for kw in ({}, {"dp_size": 2, "batch_num_tokens": 30, "global_batch_size": 8, "loss_scale_factor": 4}):
                compare_outputs(lambda v: value_loss.__wrapped_original__(v, returns, values, mask, 0.2, agg, **kw),
                         lambda v: value_loss(v, returns, values, mask, 0.2, agg, **kw), [vpreds])
                holed = loss_mat.clone()
                holed[0, 1] = float("nan")  # NaN at a masked token leaks in verl's seq-mean modes, as in ours
                compare_outputs(lambda x: aggregate.__wrapped_original__(x, mask, agg, **kw),
                         lambda x: aggregate(x, mask, agg, **kw), [holed])
                calls += 1
    report = integrations.report()
    assert report["verl.compute_value_loss"] == {"served": calls, "handed_back": {}}
    # verl's original value loss calls agg_loss too (patched, served): none handed back
    assert report["verl.agg_loss"]["served"] >= 2 * calls and not report["verl.agg_loss"]["handed_back"]


@pytest.mark.parametrize("rollout_is", ["token", "sequence"])
@pytest.mark.parametrize("threshold", [2.0, "1.5", "0.5_2.0", "0.9_1.1"])
@pytest.mark.parametrize("normalize", [False, True])
def test_verl_rollout_correction_weights(verl_mods, rollout_is, threshold, normalize):
    """compute_rollout_correction_weights: our op's weights and verl's own
    metrics of them, equal to verl's on bool and 0/1 float masks, log-ratios
    up to +-50 (past verl's clamp of 20); fractional masks handed back."""
    helper = require("verl.trainer.ppo.rollout_corr_helper", "verl")
    _, _, rk_verl = verl_mods
    gen = torch.Generator().manual_seed(5)
    integrations.reset_report()
    calls = 0
    with rk_verl.patched():
        ours = helper.compute_rollout_correction_weights
        original = ours.__wrapped_original__
        for spread in (0.1, 1.0, 50.0):
            log_ratio = torch.randn(6, 17, generator=gen) * spread
            holes = mask_with_holes(6, 17, gen)
            for mask in (holes, holes.float()):
                try:
                    want_w, want_m = original(log_ratio, mask, rollout_is, threshold, normalize)
                except ZeroDivisionError:  # verl's effective sample size when IcePop zeroes every weight
                    with pytest.raises(ZeroDivisionError):  # its metrics: verl's, its error too
                        ours(log_ratio, mask, rollout_is, threshold, normalize)
                    continue
                got_w, got_m = ours(log_ratio, mask, rollout_is, threshold, normalize)
                calls += 1
                assert got_w.dtype == want_w.dtype
                torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-7)
                assert got_m.keys() == want_m.keys()
                for key, value in want_m.items():
                    torch.testing.assert_close(got_m[key], value, rtol=1e-5, atol=1e-7, msg=key)
        assert_served_only("verl.compute_rollout_correction_weights", calls)
        fractional = torch.rand(6, 17, generator=gen) * holes
        log_ratio = 0.05 * torch.randn(6, 17, generator=gen)
        want_w, _ = original(log_ratio, fractional, rollout_is, threshold, normalize)
        got_w, _ = ours(log_ratio, fractional, rollout_is, threshold, normalize)
    torch.testing.assert_close(got_w, want_w)
    assert integrations.report()["verl.compute_rollout_correction_weights"]["handed_back"] == {
        "a mask not 0/1, or no valid token": 1}


def test_verl_rollout_correction_through_the_helper(verl_mods):
    """Patched, verl's compute_rollout_correction_and_rejection_mask (what its
    trainers call) takes the weights from our op; verl's errors are kept."""
    require("verl.trainer.ppo.rollout_corr_helper", "verl")
    import verl.trainer.ppo.rollout_corr_helper as helper

    gen = torch.Generator().manual_seed(6)
    old, rollout = torch.randn(4, 12, generator=gen), torch.randn(4, 12, generator=gen)
    mask = mask_with_holes(4, 12, gen).float()
    kwargs = dict(rollout_is="sequence", rollout_is_threshold="0.2_5.0", rollout_rs="token_k1",
                  rollout_rs_threshold="0.5_2.0")
    want = helper.compute_rollout_correction_and_rejection_mask(old, rollout, mask, **kwargs)
    integrations.reset_report()
    with rlhf_kernels.integrations.verl.patched():
        got = helper.compute_rollout_correction_and_rejection_mask(old, rollout, mask, **kwargs)
        with pytest.raises(TypeError, match="boolean"):
            helper.compute_rollout_correction_weights(old - rollout, mask, "token", True)
    torch.testing.assert_close(got[0].batch["rollout_is_weights"], want[0].batch["rollout_is_weights"])
    assert torch.equal(got[1], want[1])
    assert got[2].keys() == want[2].keys()
    for key, value in want[2].items():
        torch.testing.assert_close(got[2][key], value, rtol=1e-5, atol=1e-7, msg=key)
    assert integrations.report()["verl.compute_rollout_correction_weights"]["served"] == 1


def test_verl_remove_padding_logprobs_served(verl_mods):
    """verl's use_remove_padding call shape (dp_actor): the packed
    ``logits_rmpad`` (total_nnz, V) and the rolled ids (total_nnz,), log-probs
    and entropy, served by our kernels and counted."""
    _, functional, rk_verl = verl_mods
    gen = torch.Generator().manual_seed(12)
    logits = 3 * torch.randn(29, 211, generator=gen)  # 29 packed tokens of ragged sequences
    labels = torch.randint(0, 211, (29,), generator=gen)
    integrations.reset_report()
    with rk_verl.patched():
        ours = functional.logprobs_from_logits
        compare_outputs(lambda x: ours.__wrapped_original__(x, labels), lambda x: ours(x, labels), [logits])
        compare_outputs(functional.entropy_from_logits.__wrapped_original__, functional.entropy_from_logits,
                        [logits])
    assert_served_only("verl.logprobs_from_logits", 1)
    assert_served_only("verl.entropy_from_logits", 1)


_OBJECTIVES = ("cispo", "sapo", "gpg", "dppo_tv", "dppo_kl", "geo_mean", "reinforce")


def _objective_inputs(gen):
    """Ratios that clip, mask (dppo) and cap: old near new with log-ratios of
    scale 0.6, one past verl's clamp of 20 each way."""
    old = -2 * torch.rand(4, 10, generator=gen)
    new = old + 0.6 * torch.randn(4, 10, generator=gen)
    new[0, 0] = old[0, 0] + 25.0
    new[2, 3] = old[2, 3] - 25.0
    return old, new, torch.randn(4, 10, generator=gen)


@pytest.mark.parametrize("name", _OBJECTIVES)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("batch_info", [{}, {"dp_size": 2, "batch_num_tokens": 50, "global_batch_size": 9,
                                             "loss_scale_factor": 16}])
def test_verl_objectives_served(verl_mods, name, agg, batch_info):
    """verl's cispo, sapo, gpg, dppo_tv, dppo_kl and geo_mean policy losses,
    looked up by name in verl's registry after patch(), and its reinforce (which
    bypass_mode calls): our kernels serve every call (bool,
    float and weight masks; rollout IS weights, a zero among them), with
    verl's loss, gradient and metrics; a fully masked batch as verl's."""
    core, _, rk_verl = verl_mods
    gen = torch.Generator().manual_seed(41)
    old, new, adv = _objective_inputs(gen)
    is_weights = 2 * torch.rand(4, 10, generator=gen)
    is_weights[0, 1] = 0.0
    from verl.workers.config import FSDPActorConfig

    # thresholds that mask some tokens in dppo, a cap some ratios pass
    clip = (0.05, 0.08) if name.startswith("dppo") else (0.15, 0.28)
    config = FSDPActorConfig(clip_ratio=0.2, clip_ratio_low=clip[0], clip_ratio_high=clip[1], clip_ratio_c=1.5,
                             strategy="fsdp", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2, rollout_n=1,
                             tau_pos=1.0, tau_neg=1.05, global_batch_info=batch_info)
    integrations.reset_report()
    calls = 0
    with rk_verl.patched():
        # reinforce is no registry entry: bypass_mode calls it by its name
        ours = getattr(core, "compute_policy_loss_reinforce") if name == "reinforce" else \
            core.get_policy_loss_fn(name)
        original = ours.__wrapped_original__
        assert getattr(core, f"compute_policy_loss_{name}") is ours
        for mask in (*weight_masks(gen, 4, 10).values(), mask_with_holes(4, 10, gen)):
            for w in (None, is_weights):
                compare_outputs(lambda n: original(old, n, adv, mask, agg, config, w),
                                lambda n: ours(old, n, adv, mask, agg, config, w), [new])
                calls += 1
        empty = torch.zeros(4, 10)
        assert_outputs_close(ours(old, new, adv, empty, agg, config), original(old, new, adv, empty, agg, config))
        calls += 1
        if name in ("cispo", "dppo_tv", "dppo_kl", "geo_mean"):  # the statistics are not vacuous here
            metrics = ours(old, new, adv, mask_with_holes(4, 10, gen), agg, config)[1]
            calls += 1
            assert 0.0 < metrics["actor/pg_clipfrac"] < 1.0, metrics
            if name != "cispo":
                assert 0.0 < metrics["actor/pg_clipfrac_lower"] < 1.0, metrics
    assert_served_only(f"verl.compute_policy_loss_{name}", calls)


@pytest.mark.parametrize("name", ["clip_cov", "kl_cov"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("batch_info", [{}, {"dp_size": 2, "batch_num_tokens": 50, "global_batch_size": 9,
                                             "loss_scale_factor": 16}])
def test_verl_cov_losses_served(verl_mods, name, agg, batch_info):
    """verl's Clip-Cov and KL-Cov by name: our ops select the same tokens
    (clip_cov: the same torch.randperm draw on the default generator, seeded
    alike before each call; kl_cov: the top covariances) and give verl's loss,
    gradient and metrics on bool, float and weight masks with and without
    rollout IS weights; a log-ratio past +-20 (verl's ratio is unclamped
    there) goes to verl's code."""
    core, _, rk_verl = verl_mods
    gen = torch.Generator().manual_seed(46)
    old, new, adv = _objective_inputs(gen)
    new = torch.where((new - old).abs() > 20, old + 0.5, new)
    is_weights = 2 * torch.rand(4, 10, generator=gen)
    is_weights[0, 1] = 0.0
    from verl.workers.config import FSDPActorConfig, PolicyLossConfig

    policy = PolicyLossConfig(loss_mode=name, clip_cov_ratio=0.1, clip_cov_lb=0.0, clip_cov_ub=2.0, kl_cov_ratio=0.1,
                              ppo_kl_coef=0.5)
    config = FSDPActorConfig(clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.28, strategy="fsdp",
                             ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2, rollout_n=1, policy_loss=policy,
                             global_batch_info=batch_info)

    def seeded(fn):
        def call(*a):
            torch.manual_seed(7)
            return fn(*a)
        return call

    integrations.reset_report()
    calls = 0
    with rk_verl.patched():
        ours = core.get_policy_loss_fn(name)
        original = ours.__wrapped_original__
        assert getattr(core, f"compute_policy_loss_{name}") is ours
        for mask in (*weight_masks(gen, 4, 10).values(), mask_with_holes(4, 10, gen)):
            for w in (None, is_weights):
                compare_outputs(seeded(lambda n: original(old, n, adv, mask, agg, config, w)),
                                seeded(lambda n: ours(old, n, adv, mask, agg, config, w)), [new])
                calls += 1
        empty = torch.zeros(4, 10)
        assert_outputs_close(ours(old, new, adv, empty, agg, config), original(old, new, adv, empty, agg, config))
        calls += 1
        if name == "clip_cov":  # the selection is not vacuous: 4 of the 40 tokens at most
            metrics = seeded(ours)(old, new, adv, torch.ones(4, 10), agg, config)[1]
            calls += 1
            assert 0.0 < metrics["actor/pg_clipfrac"] < 0.11, metrics
        far = new.clone()
        far[1, 1] = old[1, 1] + 21.0
        assert_outputs_close(seeded(ours)(old, far, adv, torch.ones(4, 10), agg, config),
                             seeded(original)(old, far, adv, torch.ones(4, 10), agg, config))
    assert_served_only(f"verl.compute_policy_loss_{name}", calls, handed_back={
        "a log-ratio beyond +-20 (verl's ratio is unclamped there)": 1})


@pytest.mark.parametrize("loss_type", ["ppo_clip", "reinforce"])
@pytest.mark.parametrize("rollout_is", ["token", "sequence", None])
def test_verl_bypass_mode_served(verl_mods, loss_type, rollout_is):
    """verl's bypass_mode (old_log_prob = the sampler's): its rollout
    correction and its policy loss (vanilla, or reinforce with the IS
    weights) run on our ops, verl's loss, gradient and metrics; counted
    served only with its inner loss; no rollout_correction config: verl's."""
    core, _, rk_verl = verl_mods
    gen = torch.Generator().manual_seed(44)
    old, new, adv = _objective_inputs(gen)
    from verl.trainer.config.algorithm import RolloutCorrectionConfig
    from verl.workers.config import FSDPActorConfig, PolicyLossConfig

    correction = RolloutCorrectionConfig(rollout_is=rollout_is, rollout_is_threshold=2.0, loss_type=loss_type,
                                         bypass_mode=True)
    config = FSDPActorConfig(clip_ratio=0.2, strategy="fsdp", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2,
                             rollout_n=1, global_batch_info={},
                             policy_loss=PolicyLossConfig(loss_mode="bypass_mode", rollout_correction=correction))
    integrations.reset_report()
    with rk_verl.patched():
        ours = core.get_policy_loss_fn("bypass_mode")
        original = ours.__wrapped_original__
        for mask in (mask_with_holes(4, 10, gen), torch.ones(4, 10)):
            compare_outputs(lambda n: original(old, n, adv, mask, "token-mean", config),
                            lambda n: ours(old, n, adv, mask, "token-mean", config), [new])
    inner = "vanilla" if loss_type == "ppo_clip" else "reinforce"
    assert_served_only("verl.compute_policy_loss_bypass_mode", 2)
    # compare_outputs calls the original too: the patched inner loss serves it as well
    assert integrations.report()[f"verl.compute_policy_loss_{inner}"]["served"] >= 2


def test_verl_bypass_mode_hands_back_with_its_inner_loss(verl_mods):
    core, _, rk_verl = verl_mods
    gen = torch.Generator().manual_seed(45)
    old, new, adv = _objective_inputs(gen)
    from verl.trainer.config.algorithm import RolloutCorrectionConfig
    from verl.workers.config import FSDPActorConfig, PolicyLossConfig

    config = FSDPActorConfig(clip_ratio=0.2, strategy="fsdp", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2,
                             rollout_n=1, global_batch_info={}, policy_loss=PolicyLossConfig(
                                 loss_mode="bypass_mode",
                                 rollout_correction=RolloutCorrectionConfig(rollout_is=None, bypass_mode=True)))
    integrations.reset_report()
    with rk_verl.patched():
        ours = core.get_policy_loss_fn("bypass_mode")
        mask = mask_with_holes(4, 10, gen)
        bad = torch.where(mask > 0, mask, -1.0)  # a negative weight: vanilla hands back
        assert_outputs_close(ours(old, new, adv, bad, "token-mean", config),
                             ours.__wrapped_original__(old, new, adv, bad, "token-mean", config))
    report = integrations.report()
    assert report["verl.compute_policy_loss_bypass_mode"] == {
        "served": 0, "handed_back": {"its compute_policy_loss_vanilla call was handed back": 1}}


def _estimator_batch(gen, dtype, ids):
    """Outcome (and one dense) rewards per response of the groups ``ids``, a
    mask with holes."""
    rewards = torch.zeros(len(ids), 7, dtype=dtype)
    rewards[:, -1] = torch.randn(len(ids), generator=gen, dtype=dtype)
    rewards[:, 2] = 0.3 * torch.randn(len(ids), generator=gen, dtype=dtype)
    mask = mask_with_holes(len(ids), 7, gen).to(dtype)
    mask[1] = 1.0  # masked_whiten needs valid tokens
    return rewards, mask


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_verl_group_estimators_served(verl_mods, norm, dtype):
    """verl's opo, grpo_passk, gdpo and remax estimators by name after patch():
    our ops serve them with verl's outputs: groups of several sizes, a tie for
    a group's best score (pass@k gives it 0), a singleton (opo and gdpo; pass@k
    hands it back, verl raises), gdpo on its reward components with weights and
    on the summed rewards, remax's returns over a mask with holes."""
    from verl.trainer.config import AlgoConfig

    core, _, rk_verl = verl_mods
    gen = torch.Generator().manual_seed(47)
    ids = np.array(["a"] * 4 + ["b"] * 3 + ["c"] + ["d"] * 2, dtype=object)
    ids = ids[torch.randperm(len(ids), generator=gen).numpy()]
    rewards, mask = _estimator_batch(gen, dtype, ids)
    paired = np.array(["a"] * 4 + ["b"] * 3 + ["d"] * 3, dtype=object)  # pass@k needs two per group
    tied = rewards.clone()
    best = torch.nonzero(torch.from_numpy(paired == "b")).squeeze(-1)
    tied[best[:2], -1] = tied[best].sum(-1).max() + 1.0
    tied[best[:2], 2] = 0.0
    config = AlgoConfig(gamma=0.9, norm_adv_by_std_in_grpo=norm, gdpo_reward_keys=["fmt", "acc"],
                        gdpo_reward_weights=[0.5, 2.0])
    components = {"fmt": torch.randn(len(ids), generator=gen).numpy(), "acc": (torch.rand(len(ids), generator=gen)
                                                                              > 0.5).float().numpy()}
    batch = {"prompts": torch.zeros(len(ids), 3, dtype=torch.long),
             "attention_mask": torch.cat([torch.ones(len(ids), 3), mask], -1).long()}
    baselines = torch.randn(len(ids), generator=gen, dtype=dtype)
    integrations.reset_report()
    with rk_verl.patched():
        def check(name, *args, **kwargs):
            ours = core.get_adv_estimator_fn(name)
            assert_outputs_close(ours(*args, **kwargs), ours.__wrapped_original__(*args, **kwargs), atol=1e-6)

        check("opo", rewards, mask, ids, config=config)
        check("grpo_passk", tied, mask, paired, config=config)
        check("grpo_passk", rewards, mask, paired, config=config)
        check("gdpo", rewards, mask, ids, norm_adv_by_std_in_grpo=norm, config=config,
              non_tensor_batch=components, batch=batch)
        check("gdpo", rewards, mask, ids, norm_adv_by_std_in_grpo=norm)
        check("remax", rewards, baselines, mask, config=config)
        passk = core.get_adv_estimator_fn("grpo_passk")
        with pytest.raises(ValueError, match="at least 2 samples"):
            passk(rewards, mask, ids, config=config)
    want = {"opo": 1, "grpo_passk": 2, "gdpo": 2, "remax": 1}
    report = integrations.report()
    for name, calls in want.items():
        fn = {"opo": "compute_opo_outcome_advantage", "grpo_passk": "compute_grpo_passk_outcome_advantage",
              "gdpo": "compute_gdpo_outcome_advantage", "remax": "compute_remax_outcome_advantage"}[name]
        assert report[f"verl.{fn}"]["served"] == calls, report
    assert report["verl.compute_grpo_passk_outcome_advantage"]["handed_back"] == {
        "a group of one (verl raises)": 1}


def test_verl_objectives_hand_back_without_an_actor_config(verl_mods):
    """cispo and sapo assert a real ActorConfig in verl: without one, verl's
    own code runs (and raises as it does), counted as handed back."""
    core, _, rk_verl = verl_mods
    gen = torch.Generator().manual_seed(42)
    old, new, adv = _objective_inputs(gen)
    mask = mask_with_holes(4, 10, gen)
    config = _ActorConfig(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=3.0,
                          global_batch_info={})
    integrations.reset_report()
    with rk_verl.patched():
        for name in ("cispo", "sapo"):
            with pytest.raises(AssertionError):
                core.get_policy_loss_fn(name)(old, new, adv, mask, "token-mean", config)
            assert integrations.report()[f"verl.compute_policy_loss_{name}"]["handed_back"] == {
                "config is not an ActorConfig (verl asserts one)": 1}


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("batch_info", [{}, {"dp_size": 2, "batch_num_tokens": 50, "global_batch_size": 9,
                                             "loss_scale_factor": 16}])
def test_verl_dro_served_and_handed_back(verl_mods, agg, batch_info):
    """verl's DRO loss by name: served for bool, float and weight masks (loss,
    gradient, its one metric); rollout IS weights (verl weights the penalty
    too) and a missing dro_beta (verl raises) go to verl's own code."""
    core, _, rk_verl = verl_mods
    gen = torch.Generator().manual_seed(43)
    old, new, adv = _objective_inputs(gen)
    from verl.workers.config import FSDPActorConfig, PolicyLossConfig

    config = FSDPActorConfig(clip_ratio=0.2, strategy="fsdp", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2,
                             rollout_n=1, policy_loss=PolicyLossConfig(loss_mode="dro", dro_beta=0.3),
                             global_batch_info=batch_info)
    integrations.reset_report()
    calls = 0
    with rk_verl.patched():
        ours = core.get_policy_loss_fn("dro")
        original = ours.__wrapped_original__
        for mask in (*weight_masks(gen, 4, 10).values(), mask_with_holes(4, 10, gen)):
            compare_outputs(lambda n: original(old, n, adv, mask, agg, config),
                            lambda n: ours(old, n, adv, mask, agg, config), [new])
            calls += 1
        assert_served_only("verl.compute_policy_loss_dro", calls)
        mask = mask_with_holes(4, 10, gen)
        weights = 2 * torch.rand(4, 10, generator=gen)
        assert_outputs_close(ours(old, new, adv, mask, agg, config, weights),
                             original(old, new, adv, mask, agg, config, weights))
        no_beta = FSDPActorConfig(clip_ratio=0.2, strategy="fsdp", ppo_mini_batch_size=4,
                                  ppo_micro_batch_size_per_gpu=2, rollout_n=1,
                                  policy_loss=PolicyLossConfig(loss_mode="dro"), global_batch_info={})
        with pytest.raises(ValueError, match="dro_beta"):
            ours(old, new, adv, mask, agg, no_beta)
    assert integrations.report()["verl.compute_policy_loss_dro"]["handed_back"] == {
        "rollout_is_weights (verl weights the log-ratio penalty too)": 1,
        "no positive policy_loss.dro_beta (verl raises)": 1}


@pytest.mark.parametrize("name", ["reinforce_plus_plus_baseline", "reinforce_plus_plus", "gpg"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_verl_more_estimators_served(verl_mods, name, dtype):
    """verl's REINFORCE++ (discounted returns, whitened), REINFORCE++ with the
    group baseline and GPG's estimator, looked up by name after patch(): our
    ops serve them, with verl's outputs on groups with a singleton and ties,
    masks with holes and an all-zero score."""
    core, _, rk_verl = verl_mods
    gen = torch.Generator().manual_seed(44)
    ids = np.array(["a"] * 4 + ["b"] * 3 + ["c"] + ["d"] * 2, dtype=object)
    ids = ids[torch.randperm(len(ids), generator=gen).numpy()]
    rewards = torch.zeros(len(ids), 7, dtype=dtype)
    rewards[:, -1] = torch.randn(len(ids), generator=gen, dtype=dtype)
    rewards[:, 2] = 0.3 * torch.randn(len(ids), generator=gen, dtype=dtype)  # a dense reward too
    rewards[ids == "d"] = 0.0
    mask = mask_with_holes(len(ids), 7, gen).to(dtype)
    mask[1] = 1.0  # masked_whiten needs valid tokens
    config = SimpleNamespace(gamma=0.9)
    integrations.reset_report()
    with rk_verl.patched():
        ours = core.get_adv_estimator_fn(name)
        original = ours.__wrapped_original__
        args = (rewards, mask) if name == "reinforce_plus_plus" else (rewards, mask, ids)
        assert_outputs_close(ours(*args, config=config), original(*args, config=config), atol=1e-6)
    assert_served_only(f"verl.{ours.__name__}", 1)

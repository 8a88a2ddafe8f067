"""The OpenRLHF integration, against the installed OpenRLHF.

For each patched function: OpenRLHF's original and our adapter give the same
outputs and gradients (random inputs, masks with holes, all-masked rows, float
masks, GSPO and IS correction, bf16 where OpenRLHF takes it); patch() swaps
every lookup the trainers use and unpatch() restores identity; an untested
version, or a machine where openrlhf.models does not import, is refused before
anything is patched. Skipped where OpenRLHF is not installed."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import sys
import types

import pytest
import torch

import rlhf_kernels
from rlhf_kernels import integrations
from rlhf_kernels.integrations import UntestedVersionError, stand_ins

from integration_helpers import (assert_outputs_close, assert_served_only, compare_outputs, compare_outputs_bf16,
                                 mask_with_holes, run_with_grads, weight_masks)


def _openrlhf_source(rel: str):
    """OpenRLHF's installed source file, or skip naming what is missing."""
    try:
        dist = importlib.metadata.distribution("openrlhf")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("openrlhf is not installed")
    path = dist.locate_file(f"openrlhf/{rel}")
    if not path.exists():
        pytest.skip(f"openrlhf has no {rel}")
    return path


@pytest.fixture(scope="module")
def openrlhf_utils():
    """``openrlhf.models.utils`` as installed, loaded from its file (these
    tests need neither DeepSpeed nor the flash-attn stand-in): ``deepspeed``
    is stubbed if absent (only ``set_z3_leaf_modules`` uses it), flash-attn is
    absent (its ImportError path is OpenRLHF's CPU fallback)."""
    path = _openrlhf_source("models/utils.py")
    saved = sys.modules.get("deepspeed")
    sys.modules.setdefault("deepspeed", types.ModuleType("deepspeed"))
    try:
        spec = importlib.util.spec_from_file_location("_openrlhf_models_utils", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop("deepspeed", None)
    return module


def _openrlhf_adapter(name, owner=""):
    from rlhf_kernels.integrations import openrlhf as rk_openrlhf

    for target in rk_openrlhf._patcher.targets:
        target_owner, _, attr = target.name.rpartition(".")
        if attr == name and (not owner or target_owner == owner):
            if owner:  # a method: its fallback is the class's own (unpatched) method
                cls = getattr(sys.modules[target.module], owner)
                original = cls.__dict__[name]
                return target.make(getattr(original, "__wrapped_original__", original))
            return target.make(None)
    raise KeyError(name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_openrlhf_log_probs_from_logits(openrlhf_utils, dtype, temperature):
    gen = torch.Generator().manual_seed(20)
    logits = (3 * torch.randn(3, 7, 157, generator=gen)).to(dtype)
    labels = torch.randint(0, 157, (3, 7), generator=gen)
    ours = _openrlhf_adapter("log_probs_from_logits")
    # the in-place division by the temperature happens on a non-leaf copy
    original = lambda x: openrlhf_utils.log_probs_from_logits(x * 1, labels, temperature)  # noqa: E731
    patched = lambda x: ours(x * 1, labels, temperature)  # noqa: E731
    (compare_outputs if dtype == torch.float32 else compare_outputs_bf16)(original, patched, [logits])
    mine, theirs = logits.clone(), logits.clone()
    ours(mine, labels, temperature)
    openrlhf_utils.log_probs_from_logits(theirs, labels, temperature)
    assert torch.equal(mine, theirs)  # OpenRLHF divides the caller's logits in place; so do we


def test_openrlhf_compute_entropy(openrlhf_utils):
    logits = 3 * torch.randn(2, 5, 129, generator=torch.Generator().manual_seed(21))
    original = getattr(openrlhf_utils.compute_entropy, "_torchdynamo_orig_callable", openrlhf_utils.compute_entropy)
    compare_outputs(original, _openrlhf_adapter("compute_entropy"), [logits])


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_openrlhf_compute_approx_kl(openrlhf_utils, estimator, unbiased, monkeypatch):
    monkeypatch.setitem(sys.modules, "openrlhf.models.utils", openrlhf_utils)  # KL_IS_WEIGHT_CLIP
    gen = torch.Generator().manual_seed(22)
    logp = -3 * torch.rand(4, 8, generator=gen)
    base = logp + torch.randn(4, 8, generator=gen)
    old = logp + 0.1 * torch.randn(4, 8, generator=gen)
    base[0, :3] = logp[0, :3] - torch.tensor([30.0, -30.0, 12.0])  # the clamps
    ours = _openrlhf_adapter("compute_approx_kl")
    kw = dict(kl_estimator=estimator, unbiased_gradient=unbiased)
    compare_outputs(lambda a, b: openrlhf_utils.compute_approx_kl(a, b, old, **kw), lambda a, b: ours(a, b, old, **kw),
             [logp, base])
    with pytest.raises(ValueError, match="Unknown kl_estimator"):
        ours(logp, base, kl_estimator="k4")


def test_openrlhf_gae():
    """``get_advantages_and_returns`` as installed (the method's own source;
    its module imports Ray and the vLLM engine)."""
    path = _openrlhf_source("trainer/ppo_utils/experience_maker.py")
    tree = ast.parse(path.read_text())
    method = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "get_advantages_and_returns")
    namespace = {"torch": torch, "Tuple": tuple}
    exec(compile(ast.Module(body=[method], type_ignores=[]), str(path), "exec"), namespace)
    original = namespace["get_advantages_and_returns"]
    ours = _openrlhf_adapter("get_advantages_and_returns")
    gen = torch.Generator().manual_seed(23)
    values, rewards = torch.randn(5, 12, generator=gen), torch.randn(5, 12, generator=gen)
    mask = mask_with_holes(5, 12, gen)
    for m in (mask, mask.long(), None):
        for gamma, lam in [(1.0, 0.95), (0.99, 0.9)]:
            assert_outputs_close(ours(None, values, rewards, m, gamma, lam), original(None, values, rewards, m, gamma, lam))


# OpenRLHF's modules themselves. openrlhf.models imports DeepSpeed (installed by
# setup_env.sh; it imports on CPU) and flash-attn (CUDA only, no CPU install);
# its Ray trainer modules import vLLM (a GPU inference engine that pins its own
# torch). The two are replaced, in these tests only, by the stand-ins of
# rlhf_kernels.integrations.stand_ins.
_OPENRLHF_MODULES = ("openrlhf.models", "openrlhf.models.loss", "openrlhf.models.utils", "openrlhf.models.actor",
                     "openrlhf.trainer.ray.ppo_actor", "openrlhf.trainer.ray.ppo_critic",
                     "openrlhf.trainer.ppo_utils.experience_maker")


@pytest.fixture(scope="module")
def openrlhf_real():
    """OpenRLHF's real packages (models, loss, trainer modules), imported with
    the flash-attn / vLLM stand-ins; on teardown the stand-ins and every
    openrlhf module imported here leave sys.modules."""
    _openrlhf_source("models/loss.py")
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (scripts/setup_env.sh installs it)")
    before = set(sys.modules)
    stubs = stand_ins.install()  # none where the real packages are installed (a GPU machine)
    try:
        modules = {name: importlib.import_module(name) for name in _OPENRLHF_MODULES}
    except Exception as exc:
        _drop_modules(before, stubs)
        pytest.skip(f"openrlhf does not import here: {type(exc).__name__}: {exc}")
    yield modules
    _drop_modules(before, stubs)


def _drop_modules(before, stubs):
    for name in list(sys.modules):
        if name not in before and name.split(".")[0] == "openrlhf":
            del sys.modules[name]
    stand_ins.remove(stubs)


def _compare_empty(original, patched, inputs, nan):
    """No valid token. Without global counts OpenRLHF's masked means are 0 / 0:
    the loss (and clip_ratio, ppo_kl) NaN, as ours; its gradients are then NaN
    too, except where a clamp or max happens to stop them, while ours are 0 (a
    documented difference). With global counts both are 0 / N, equal."""
    theirs, g_theirs = run_with_grads(original, inputs)
    ours, g_ours = run_with_grads(patched, inputs)
    assert_outputs_close(ours, theirs)
    first = ours[0] if isinstance(ours, tuple) else ours
    assert bool(torch.isnan(first)) == nan
    for a, b in zip(g_ours, g_theirs):
        if nan:
            assert (b.isnan() | (b == 0)).all()
            # ours are 0; a case OpenRLHF's own code computes (the fallbacks) is its NaN
            assert not a.any() or torch.equal(a.isnan(), b.isnan())
        else:
            torch.testing.assert_close(a, b)


def _compare_loss_module(original, ours, module, call, double, x, data, mask, batch_info):
    """A loss module's forward, ours against OpenRLHF's, beyond float32: float64
    (``call(fn, **double)``), bf16 (``x`` and ``data`` rounded, within twice
    OpenRLHF's own bf16 error) and no valid token (``_compare_empty``)."""
    compare_outputs(call(original, **double), call(ours, **double), [x.double()], atol=1e-7, rtol=1e-7)
    bf16 = [t.bfloat16() for t in (x, *data)]
    data_call = lambda fn: (lambda x, o, a: fn(module, x, o, a, mask, **batch_info))  # noqa: E731
    compare_outputs_bf16(data_call(original), data_call(ours), [bf16[0]], data=bf16[1:])
    empty = torch.zeros_like(mask)
    _compare_empty(call(original, m=empty), call(ours, m=empty), [x], nan=not batch_info)


def _policy_inputs(gen, batch=5, seq=12, dtype=torch.float32):
    old = -2 * torch.rand(batch, seq, generator=gen)
    new = old + 0.4 * torch.randn(batch, seq, generator=gen)
    new[0, 0] = old[0, 0] + 25.0  # the log-ratio clamp
    new[2, 1] = old[2, 1] - 25.0
    adv = torch.randn(batch, seq, generator=gen)
    return new.to(dtype), old.to(dtype), adv.to(dtype)


# The last: as OpenRLHF's trainer passes them (get_loss_batch_info: 0-dim float32 tensors).
_OPENRLHF_BATCH_INFOS = [{}, {"dp_size": 2, "batch_num_tokens": 30, "global_batch_size": 7},
                         {"dp_size": 4, "batch_num_tokens": 11.0, "global_batch_size": 3.0},
                         {"dp_size": 2, "batch_num_tokens": torch.tensor(30.0), "global_batch_size": torch.tensor(7.0)}]


@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("batch_info", _OPENRLHF_BATCH_INFOS)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.long])
def test_openrlhf_policy_loss(openrlhf_real, dual_clip, token_level_loss, batch_info, mask_dtype):
    loss_mod = openrlhf_real["openrlhf.models.loss"]
    module = loss_mod.PolicyLoss(clip_eps_low=0.15, clip_eps_high=0.28, dual_clip=dual_clip,
                                 token_level_loss=token_level_loss)
    original = loss_mod.PolicyLoss.forward
    original = getattr(original, "__wrapped_original__", original)
    ours = _openrlhf_adapter("forward", "PolicyLoss")
    gen = torch.Generator().manual_seed(24)
    new, old, adv = _policy_inputs(gen)
    mask = mask_with_holes(5, 12, gen).to(mask_dtype)
    # gradients w.r.t. log_probs: old log-probs and advantages are data (OpenRLHF's trainer detaches them)
    call = lambda fn, m=mask, o=old, a=adv: (lambda x: fn(module, x, o, a, m, **batch_info))  # noqa: E731
    compare_outputs(call(original), call(ours), [new])
    double = dict(o=old.double(), a=adv.double())
    _compare_loss_module(original, ours, module, call, double, new, (old, adv), mask, batch_info)


def test_openrlhf_policy_loss_falls_back_to_openrlhf(openrlhf_real):
    """GSPO, the IS correction and weighting masks (served, see the coverage
    tests below), no mask and a gradient w.r.t. the advantages (OpenRLHF's
    own code): OpenRLHF's results."""
    loss_mod = openrlhf_real["openrlhf.models.loss"]
    original = loss_mod.PolicyLoss.forward
    original = getattr(original, "__wrapped_original__", original)
    ours = _openrlhf_adapter("forward", "PolicyLoss")
    gen = torch.Generator().manual_seed(25)
    new, old, adv = _policy_inputs(gen)
    mask = mask_with_holes(5, 12, gen)
    mask[1, 0] = True  # GSPO's per-sequence ratio divides by the count
    rollout = old + 0.05 * torch.randn(5, 12, generator=gen)
    cases = [
        (loss_mod.PolicyLoss(policy_loss_type="gspo"), mask, {}),
        (loss_mod.PolicyLoss(is_correction_level="token", is_correction_mode="clip"), mask,
         {"rollout_log_probs": rollout}),
        (loss_mod.PolicyLoss(is_correction_level="seq"), mask, {"rollout_log_probs": rollout}),
        (loss_mod.PolicyLoss(), torch.rand(5, 12, generator=gen), {}),
        (loss_mod.PolicyLoss(dual_clip=2.0), None, {}),
    ]
    for module, m, kw in cases:
        compare_outputs(lambda x: original(module, x, old, adv, m, **kw), lambda x: ours(module, x, old, adv, m, **kw),
                 [new])
    module = loss_mod.PolicyLoss()
    compare_outputs(lambda x, a: original(module, x, old, a, mask), lambda x, a: ours(module, x, old, a, mask), [new, adv])


@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("batch_info", _OPENRLHF_BATCH_INFOS)
@pytest.mark.parametrize("clip_eps", [0.2, None])
def test_openrlhf_value_loss(openrlhf_real, token_level_loss, batch_info, clip_eps):
    loss_mod = openrlhf_real["openrlhf.models.loss"]
    module = loss_mod.ValueLoss(clip_eps=clip_eps, token_level_loss=token_level_loss)
    original = loss_mod.ValueLoss.forward
    original = getattr(original, "__wrapped_original__", original)
    ours = _openrlhf_adapter("forward", "ValueLoss")
    gen = torch.Generator().manual_seed(26)
    values = torch.randn(5, 12, generator=gen)
    vpreds = values + 0.5 * torch.randn(5, 12, generator=gen)
    returns = torch.randn(5, 12, generator=gen)
    mask = mask_with_holes(5, 12, gen)
    call = lambda fn, m=mask, o=values, r=returns: (lambda v: fn(module, v, o, r, m, **batch_info))  # noqa: E731
    # gradients w.r.t. the predictions: old values and returns are targets
    compare_outputs(call(original), call(ours), [vpreds])
    double = dict(m=mask.long(), o=values.double(), r=returns.double())
    _compare_loss_module(original, ours, module, call, double, vpreds, (values, returns), mask, batch_info)


def test_openrlhf_losses_run_ours_with_the_trainers_tensor_counts(openrlhf_real, monkeypatch):
    """OpenRLHF's trainer always passes get_loss_batch_info's 0-dim float32 count
    tensors: with them the patched losses run our kernels (each call reaches
    ppo_policy_loss / ppo_value_loss), without a host synchronisation."""
    loss_mod = openrlhf_real["openrlhf.models.loss"]
    calls = []
    for name in ("ppo_policy_loss", "ppo_value_loss"):
        real = getattr(rlhf_kernels, name)
        monkeypatch.setattr(rlhf_kernels, name, lambda *a, _real=real, _n=name, **k: calls.append(_n) or _real(*a, **k))
    gen = torch.Generator().manual_seed(27)
    new, old, adv = _policy_inputs(gen)
    mask = mask_with_holes(5, 12, gen)
    info = {"dp_size": 2, "batch_num_tokens": mask.sum().float(), "global_batch_size": torch.tensor(5.0)}
    for token_level_loss in (True, False):
        _openrlhf_adapter("forward", "PolicyLoss")(loss_mod.PolicyLoss(token_level_loss=token_level_loss), new, old,
                                                   adv, mask, **info)
        _openrlhf_adapter("forward", "ValueLoss")(loss_mod.ValueLoss(clip_eps=0.2, token_level_loss=token_level_loss),
                                                  new, old, adv, mask, **info)
    assert calls == ["ppo_policy_loss", "ppo_value_loss"] * 2


def test_openrlhf_patch_swaps_trainer_lookups_and_unpatch_restores(openrlhf_real):
    """The real patch(): every lookup in OpenRLHF's actor, PPO actor, critic and
    experience maker is swapped, the loss modules' forward is ours, outputs
    equal OpenRLHF's, and unpatch() restores identity."""
    from rlhf_kernels.integrations import openrlhf as rk_openrlhf

    utils = openrlhf_real["openrlhf.models.utils"]
    loss_mod = openrlhf_real["openrlhf.models.loss"]
    actor = openrlhf_real["openrlhf.models.actor"]
    ppo_actor = openrlhf_real["openrlhf.trainer.ray.ppo_actor"]
    maker = openrlhf_real["openrlhf.trainer.ppo_utils.experience_maker"]
    names = ("log_probs_from_logits", "compute_entropy", "compute_approx_kl")
    originals = {n: getattr(utils, n) for n in names}
    forwards = (loss_mod.PolicyLoss.forward, loss_mod.ValueLoss.forward)
    gae = maker.RemoteExperienceMaker.get_advantages_and_returns

    gen = torch.Generator().manual_seed(27)
    new, old, adv = _policy_inputs(gen)
    mask = mask_with_holes(5, 12, gen)
    logits = 3 * torch.randn(5, 12, 67, generator=gen)
    labels = torch.randint(0, 67, (5, 12), generator=gen)
    policy_loss, value_loss = loss_mod.PolicyLoss(dual_clip=3.0), loss_mod.ValueLoss(clip_eps=0.2)

    def outputs():
        return (policy_loss(new, old, adv, mask), value_loss(new, old, adv, mask),
                actor.log_probs_from_logits(logits.clone(), labels, 0.7),
                ppo_actor.compute_approx_kl(new, old, kl_estimator="k3"),
                maker.compute_approx_kl(new, old, kl_estimator="k2"),
                maker.RemoteExperienceMaker.get_advantages_and_returns(None, old, adv, mask, 0.99, 0.95))

    expected = outputs()
    with rk_openrlhf.patched():
        for n in names:
            assert getattr(utils, n).__wrapped_original__ is originals[n]
        assert actor.log_probs_from_logits is utils.log_probs_from_logits
        assert actor.compute_entropy is utils.compute_entropy
        assert ppo_actor.compute_approx_kl is maker.compute_approx_kl is utils.compute_approx_kl
        assert ppo_actor.PolicyLoss.forward.__wrapped_original__ is forwards[0]
        assert openrlhf_real["openrlhf.trainer.ray.ppo_critic"].ValueLoss.forward.__wrapped_original__ is forwards[1]
        assert maker.RemoteExperienceMaker.get_advantages_and_returns.__wrapped_original__ is gae
        assert "openrlhf.models.loss.PolicyLoss.forward" in rk_openrlhf.patched_names()
        assert "openrlhf.trainer.ray.ppo_actor.compute_approx_kl" in rk_openrlhf.patched_names()
        got = outputs()
    assert_outputs_close(got, expected, atol=1e-5, rtol=1e-5)
    for n in names:
        assert getattr(utils, n) is originals[n] and getattr(actor, n, originals[n]) is originals[n]
    assert ppo_actor.compute_approx_kl is maker.compute_approx_kl is originals["compute_approx_kl"]
    assert (loss_mod.PolicyLoss.forward, loss_mod.ValueLoss.forward) == forwards
    assert maker.RemoteExperienceMaker.get_advantages_and_returns is gae
    assert not rk_openrlhf.patched_names()


def test_openrlhf_unknown_version_refuses(openrlhf_real, monkeypatch):
    from rlhf_kernels.integrations import openrlhf as rk_openrlhf

    utils = openrlhf_real["openrlhf.models.utils"]
    before = (utils.compute_approx_kl, openrlhf_real["openrlhf.models.loss"].PolicyLoss.forward)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.9.0")
    with pytest.raises(UntestedVersionError, match=r"openrlhf 0\.9\.0 is not a tested version"):
        rk_openrlhf.patch()
    assert (utils.compute_approx_kl, openrlhf_real["openrlhf.models.loss"].PolicyLoss.forward) == before


def test_openrlhf_patch_refuses_cleanly_where_it_cannot_import():
    """Where openrlhf.models does not import (here: flash-attn made unimportable,
    as on a CPU machine without the stand-in), patch() raises and patches
    nothing. In a fresh interpreter, so this process's modules stay as they are."""
    _openrlhf_source("models/utils.py")
    code = (
        "import sys; sys.modules['flash_attn'] = None\n"
        "from rlhf_kernels.integrations import FrameworkNotInstalledError\n"
        "from rlhf_kernels.integrations import openrlhf as rk\n"
        "try:\n    rk.patch()\nexcept FrameworkNotInstalledError as e:\n"
        "    assert 'nothing was patched' in str(e), e\n    assert not rk.patched_names()\n    print('REFUSED')\n"
        "else:\n    print('PATCHED')\n"
    )
    import os
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "REFUSED"


def _is_correction_cases():
    cases = []
    for level in ("token", "seq"):
        for gating in ("ratio", "binary_kl", "tv"):
            for mode in ("mask", "clip"):
                if mode == "clip" and (level == "seq" or gating != "ratio"):
                    continue  # OpenRLHF refuses these
                threshold = (0.8, 1.25) if gating == "ratio" else (0.0, 0.02)
                cases.append(dict(is_correction_level=level, is_correction_gating=gating, is_correction_mode=mode,
                                  is_correction_threshold=threshold))
    return cases


@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("batch_info", _OPENRLHF_BATCH_INFOS[:2])
def test_openrlhf_policy_loss_serves_float_masks_gspo_and_is_correction(openrlhf_real, token_level_loss,
                                                                        batch_info):
    loss_mod = openrlhf_real["openrlhf.models.loss"]
    from rlhf_kernels.integrations import openrlhf as rk_openrlhf

    gen = torch.Generator().manual_seed(42)
    new, old, adv = _policy_inputs(gen)
    new[2, 1] = old[2, 1] - 5.0  # GSPO: OpenRLHF does not clamp its sequence log-ratio
    rollout = old + 0.2 * torch.randn(5, 12, generator=gen)  # IS gates drop or clip some tokens
    masks = weight_masks(gen, 5, 12)
    modules = [loss_mod.PolicyLoss(clip_eps_low=0.15, clip_eps_high=0.28, dual_clip=3.0,
                                   token_level_loss=token_level_loss)]
    modules += [loss_mod.PolicyLoss(token_level_loss=token_level_loss, **kw) for kw in _is_correction_cases()]
    modules += [loss_mod.PolicyLoss(policy_loss_type="gspo"),
                loss_mod.PolicyLoss(policy_loss_type="gspo", is_correction_level="token")]
    integrations.reset_report()
    calls = 0
    with rk_openrlhf.patched():
        forward = loss_mod.PolicyLoss.forward
        original = forward.__wrapped_original__
        for module in modules:
            gspo = module.policy_loss_type == "gspo"
            for name, mask in masks.items():
                if gspo and name == "weights":
                    continue  # fractional weights scale OpenRLHF's GSPO ratio: handed back (below)
                call = lambda fn, m=mask: (lambda x: fn(module, x, old, adv, m, rollout, **batch_info))  # noqa: E731
                compare_outputs(call(original), call(forward), [new])
                calls += 1
        assert_served_only("openrlhf.PolicyLoss.forward", calls)
        gspo = modules[-2]
        compare_outputs(lambda x: original(gspo, x, old, adv, masks["weights"]),
                 lambda x: forward(gspo, x, old, adv, masks["weights"]), [new])
    assert integrations.report()["openrlhf.PolicyLoss.forward"]["handed_back"] == {
        "GSPO with fractional mask weights (OpenRLHF multiplies the ratio by them)": 1}


@pytest.mark.parametrize("token_level_loss", [True, False])
def test_openrlhf_value_loss_serves_float_masks(openrlhf_real, token_level_loss):
    loss_mod = openrlhf_real["openrlhf.models.loss"]
    from rlhf_kernels.integrations import openrlhf as rk_openrlhf

    gen = torch.Generator().manual_seed(43)
    values = torch.randn(5, 12, generator=gen)
    vpreds = values + 0.5 * torch.randn(5, 12, generator=gen)
    returns = torch.randn(5, 12, generator=gen)
    module = loss_mod.ValueLoss(clip_eps=0.2, token_level_loss=token_level_loss)
    integrations.reset_report()
    with rk_openrlhf.patched():
        forward = loss_mod.ValueLoss.forward
        for mask in weight_masks(gen, 5, 12).values():
            for info in _OPENRLHF_BATCH_INFOS:
                compare_outputs(lambda v: forward.__wrapped_original__(module, v, values, returns, mask, **info),
                         lambda v: forward(module, v, values, returns, mask, **info), [vpreds])
    assert_served_only("openrlhf.ValueLoss.forward", 3 * len(_OPENRLHF_BATCH_INFOS))


def _rc_inputs(shape, seed):
    """Trainer and sampler log-probs 0.15 apart, a mask with holes."""
    gen = torch.Generator().manual_seed(seed)
    old = -3 * torch.rand(shape, generator=gen)
    rollout = old + 0.15 * torch.randn(shape, generator=gen)
    mask = torch.rand(shape, generator=gen) < 0.8
    mask[:, 0] = True  # OpenRLHF's per-sequence mean divides by the count unguarded
    return old, rollout, mask


@pytest.mark.parametrize("level,mode,threshold", [("token", "mask", (0.5, 5.0)), ("token", "clip", (0.8, 1.2)),
                                                  ("seq", "mask", (0.97, 1.03))])
def test_openrlhf_is_correction_equals_rollout_correction(openrlhf_real, level, mode, threshold):
    """OpenRLHF 0.11's PolicyLoss with is_correction_level / mode (gating
    "ratio": TIS, ICEPOP, seq-mask-tis) against ppo_policy_loss with our
    weights as token_weights and our kept mask: the same loss."""
    loss_mod = openrlhf_real["openrlhf.models.loss"]
    gen = torch.Generator().manual_seed(31)
    shape = (6, 19)
    old, rollout, mask = _rc_inputs(shape, seed=32)
    logp = old + torch.randn(shape, generator=gen) * 0.1
    adv = torch.randn(shape, generator=gen)
    ref = loss_mod.PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, is_correction_level=level,
                              is_correction_mode=mode, is_correction_threshold=list(threshold))
    out = ref(logp, old, adv, action_mask=mask.float(), rollout_log_probs=rollout)
    want = out[0] if isinstance(out, tuple) else out
    if level == "seq":
        # seq-mask-tis: sequences whose geometric mean ratio exp(mean lr) leaves [low, high] are dropped,
        # the others keep their token weights exp(lr): verl's seq_mean_k1 rule (k1 = -lr, bounds on
        # exp(mean k1) = 1 / the geometric mean) with unbounded token weights.
        ours = rlhf_kernels.rollout_correction(old, rollout, mask, level="token", mode="mask", lower=None, upper=None,
                                               rejection={"seq_mean_k1": (1 / threshold[1], 1 / threshold[0])})
    else:
        ours = rlhf_kernels.rollout_correction(old, rollout, mask, level="token",
                                               mode="truncate" if mode == "clip" else "mask",
                                               lower=threshold[0], upper=threshold[1])
    weights = ours.weights * ours.mask  # the loss still counts every valid token, as OpenRLHF's
    assert 0 < ours.stats["correction/rejected_token_frac"] < 1 or level != "seq"
    got, _ = rlhf_kernels.ppo_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28,
                                          token_weights=weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

"""The TRL, verl and OpenRLHF integrations, against the installed frameworks.

For each patched function: the framework's original and our adapter give the
same outputs and gradients (random inputs, masks with holes, all-masked rows,
bf16 where the framework takes it); patch() swaps every lookup the trainers
use and unpatch() restores identity; an untested version is refused before
anything is patched. A framework that is not installed skips only its tests.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import rlhf_kernels
from rlhf_kernels import integrations
from rlhf_kernels.integrations import FrameworkNotInstalledError, Patcher, UntestedVersionError, _Target, stand_ins


def _require(module: str, framework: str):
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken optional dependency
        pytest.skip(f"{framework} is not importable here ({module}: {type(exc).__name__}: {exc})")


# ---------------------------------------------------------------- helpers

def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]


def _run(fn, inputs, kwargs=None, grad_seed=0):
    """fn's outputs and the gradients of a random projection of its floating outputs."""
    leaves = _leaves(*inputs)
    out = fn(*leaves, **(kwargs or {}))
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if isinstance(o, torch.Tensor)]
    gen = torch.Generator().manual_seed(grad_seed)
    total = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outs if o.requires_grad)
    grads = [None] * len(leaves)
    if isinstance(total, torch.Tensor):
        wrt = [(i, x) for i, x in enumerate(leaves) if x.requires_grad]
        got = torch.autograd.grad(total, [x for _, x in wrt], allow_unused=True)
        for (i, _), g in zip(wrt, got):
            grads[i] = g
    return out, grads


def _assert_close(ours, theirs, atol=1e-5, rtol=1e-5):
    if isinstance(theirs, tuple):
        assert isinstance(ours, tuple) and len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            _assert_close(a, b, atol, rtol)
        return
    if isinstance(theirs, dict):  # metrics
        assert isinstance(ours, dict) and ours.keys() == theirs.keys()
        for key in theirs:
            _assert_close(ours[key], theirs[key], atol, rtol)
        return
    if theirs is None or not isinstance(theirs, torch.Tensor):
        if isinstance(theirs, float):
            assert ours == pytest.approx(theirs, abs=atol, rel=rtol, nan_ok=True)
        else:
            assert ours is None if theirs is None else ours == theirs
        return
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    torch.testing.assert_close(ours.float(), theirs.float(), atol=atol, rtol=rtol, equal_nan=True)


def _compare(original, patched, inputs, kwargs=None, atol=1e-5, rtol=1e-5):
    """Same outputs and input gradients (float32 / float64 inputs)."""
    theirs, g_theirs = _run(original, inputs, kwargs)
    ours, g_ours = _run(patched, inputs, kwargs)
    _assert_close(ours, theirs, atol, rtol)
    for a, b in zip(g_ours, g_theirs):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


def _compare_bf16(original, patched, inputs, kwargs=None, data=()):
    """bf16: our error against the float64 original is at most twice the
    framework's own bf16 error (the style guide's rule), output and gradients.
    ``data``: further positional arguments that take no gradient (float64 too
    in the exact run)."""
    up = lambda ts: [t.double() if t.is_floating_point() else t for t in ts]  # noqa: E731
    exact, g_exact = _run(lambda *x: original(*x, *up(data)), up(inputs), kwargs)
    theirs, g_theirs = _run(lambda *x: original(*x, *data), inputs, kwargs)
    ours, g_ours = _run(lambda *x: patched(*x, *data), inputs, kwargs)
    pick = (lambda o: o[0]) if isinstance(exact, tuple) else (lambda o: o)
    assert pick(ours).dtype == pick(theirs).dtype
    err = lambda a, b: (a.double() - b.double()).abs().max().item()  # noqa: E731
    assert err(pick(ours), pick(exact)) <= 2 * err(pick(theirs), pick(exact)) + 1e-6
    for a, b, e in zip(g_ours, g_theirs, g_exact):
        if e is not None:
            assert err(a, e) <= 2 * err(b, e) + 1e-6


def _mask_with_holes(batch, seq, gen):
    """Right padding of random length, a hole inside row 0, row 1 fully masked."""
    lengths = torch.randint(2, seq + 1, (batch,), generator=gen)
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    mask[0, : seq] = True
    mask[0, 1:3] = False
    mask[1] = False
    return mask


# ------------------------------------------------------------------ generic

def test_not_installed_refuses_cleanly():
    p = Patcher("no_such_framework_xyz", "no-such-framework-xyz", frozenset({"1.0"}), [])
    with pytest.raises(FrameworkNotInstalledError, match="no-such-framework-xyz is not installed"):
        p.patch()


def test_missing_target_patches_nothing(monkeypatch):
    pytest.importorskip("torch.nn.functional")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.0")
    fake = types.ModuleType("fakefw")
    fake.f = lambda: 1
    monkeypatch.setitem(sys.modules, "fakefw", fake)
    original = fake.f
    p = Patcher("fakefw", "fakefw", frozenset({"1.0"}),
                [_Target("fakefw", "f", lambda o: (lambda: 2)), _Target("fakefw", "g", lambda o: o)])
    with pytest.raises(UntestedVersionError, match="has no fakefw.g"):
        p.patch()
    assert fake.f is original and not p.is_patched


# --------------------------------------------------------------------- TRL

@pytest.fixture(scope="module")
def trl_mods():
    utils = _require("trl.trainer.utils", "trl")
    from rlhf_kernels.integrations import trl as rk_trl

    return utils, rk_trl


def _trl_adapter(rk_trl, name):
    utils = sys.modules["trl.trainer.utils"]
    for target in rk_trl._patcher.targets:
        if target.name == name:
            return target.make(getattr(utils, name) if hasattr(utils, name) else None)
    raise KeyError(name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("use_mask", [False, True])
def test_trl_selective_log_softmax(trl_mods, dtype, temperature, use_mask):
    utils, rk_trl = trl_mods
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(4, 7, 37, generator=gen)).to(dtype)  # odd vocabulary
    index = torch.randint(0, 37, (4, 7), generator=gen)
    mask = _mask_with_holes(4, 7, gen) if use_mask else None
    ours = _trl_adapter(rk_trl, "selective_log_softmax")
    _compare(lambda x: utils.selective_log_softmax(x, index, temperature, mask),
             lambda x: ours(x, index, temperature, mask), [logits])


def test_trl_selective_log_softmax_bf16_and_topk(trl_mods):
    utils, rk_trl = trl_mods
    gen = torch.Generator().manual_seed(1)
    logits = (4 * torch.randn(3, 5, 1000, generator=gen)).bfloat16()
    index = torch.randint(0, 1000, (3, 5), generator=gen)
    ours = _trl_adapter(rk_trl, "selective_log_softmax")
    _compare_bf16(lambda x: utils.selective_log_softmax(x, index), lambda x: ours(x, index), [logits])
    topk = torch.randint(0, 1000, (3, 5, 4), generator=gen)  # (..., K): TRL's own code
    _compare(lambda x: utils.selective_log_softmax(x, topk), lambda x: ours(x, topk), [logits.float()])
    with pytest.raises(ValueError, match="temperature"):
        ours(logits, index, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trl_entropy_from_logits(trl_mods, dtype):
    utils, rk_trl = trl_mods
    logits = (3 * torch.randn(2, 9, 301, generator=torch.Generator().manual_seed(2))).to(dtype)
    ours = _trl_adapter(rk_trl, "entropy_from_logits")
    if dtype == torch.float32:
        _compare(utils.entropy_from_logits, ours, [logits])
    else:
        _compare_bf16(utils.entropy_from_logits, ours, [logits])


@pytest.mark.parametrize("entropy_requires_grad", [True, False])
def test_trl_selective_log_softmax_and_entropy(trl_mods, entropy_requires_grad):
    utils, rk_trl = trl_mods
    gen = torch.Generator().manual_seed(3)
    logits = 2 * torch.randn(4, 6, 53, generator=gen)
    index = torch.randint(0, 53, (4, 6), generator=gen)
    mask = _mask_with_holes(4, 6, gen)
    ours = _trl_adapter(rk_trl, "selective_log_softmax_and_entropy")
    kw = dict(entropy_requires_grad=entropy_requires_grad, temperature=0.9, row_mask=mask)
    _compare(lambda x: utils.selective_log_softmax_and_entropy(x, index, **kw), lambda x: ours(x, index, **kw),
             [logits])
    _, entropy = ours(logits.requires_grad_(), index, **kw)
    assert entropy.requires_grad == entropy_requires_grad


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("extra", [{}, {"final_logit_softcapping": 5.0, "logit_scale": 0.5}])
@pytest.mark.parametrize("outputs", [("log_probs",), ("log_probs", "entropy")])
def test_trl_fused_lm_head(trl_mods, monkeypatch, bias, extra, outputs):
    chunked = _require("trl.kernels.chunked_logprob", "trl")
    _, rk_trl = trl_mods
    monkeypatch.setattr(rk_trl, "_LM_HEAD_CHUNK_BYTES", 4 * 97 * 5)  # 5 rows a chunk: several chunks
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(23, 16, generator=gen)
    weight = torch.randn(97, 16, generator=gen) / 4
    b = torch.randn(97, generator=gen) if bias else None
    targets = torch.randint(0, 97, (23,), generator=gen)
    ours = rk_trl._make_chunked_logprob(chunked.ChunkedLogProbFunction)
    args = lambda h, w, *bb: (h, w, bb[0] if bb else None, targets, 0.8, 32,  # noqa: E731
                              extra.get("final_logit_softcapping"), extra.get("logit_scale", 1.0), outputs)
    inputs = [hidden, weight] + ([b] if bias else [])
    _compare(lambda *x: chunked.ChunkedLogProbFunction.apply(*args(*x)), lambda *x: ours.apply(*args(*x)),
             inputs, atol=2e-5, rtol=2e-5)
    # TRL's default outputs (entropy, log_sum_sq_probs, mean_logits, is_top1): ours too, counted
    calls = []
    real = rk_trl._lm_head._forward_impl
    monkeypatch.setattr(rk_trl._lm_head, "_forward_impl", lambda *a, **k: calls.append(1) or real(*a, **k))
    weight_tied = weight.clone()
    weight_tied[5] = weight_tied[targets[0]]  # a tie for the maximum: is_top1 is the first maximum
    hidden[0] = weight_tied[5] * 50
    for w in (weight, weight_tied):
        theirs = chunked.ChunkedLogProbFunction.apply(hidden, w, b, targets, 0.9, 32, None, 1.0)
        mine = ours.apply(hidden, w, b, targets, 0.9, 32, None, 1.0)
        for name, x, y in zip(("log_probs",) + chunked.OPTIONAL_OUTPUTS, theirs, mine):
            if x.dtype == torch.bool:
                assert torch.equal(x, y), name
            else:
                torch.testing.assert_close(y, x, atol=2e-5, rtol=2e-5, msg=name)
    assert len(calls) == 2  # both calls served by our tiles


def test_trl_fused_lm_head_backward_regathers_a_sharded_head(trl_mods, monkeypatch):
    """Under DeepSpeed ZeRO-3 the head's weight is an empty shard outside
    maybe_gather_lm_head_ctx; TRL's backward enters it again, and so must ours
    (simulated: the context fills the weight on entry and empties it on exit; the
    head frozen, as the engine checks a parameter's gradient against its
    partitioned shape, which real ZeRO-3 hooks handle)."""
    import contextlib

    chunked = _require("trl.kernels.chunked_logprob", "trl")
    utils, rk_trl = trl_mods
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(11, 16, generator=gen)
    full = torch.randn(97, 16, generator=gen) / 4
    targets = torch.randint(0, 97, (11,), generator=gen)

    @contextlib.contextmanager
    def sharded(*params):
        params = [p for p in params if p is not None]
        for p in params:
            p.data = full.clone()
        try:
            yield
        finally:
            for p in params:
                p.data = torch.empty(0)

    monkeypatch.setattr(utils, "maybe_gather_lm_head_ctx", sharded)
    ours = rk_trl._make_chunked_logprob(chunked.ChunkedLogProbFunction)
    grads = []
    for fn in (chunked.ChunkedLogProbFunction, ours):
        weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        h = hidden.clone().requires_grad_(True)
        with sharded(weight):  # the forward runs inside the caller's gather
            logp, entropy, *_ = fn.apply(h, weight, None, targets, 1.0, 32, None, 1.0, ("log_probs", "entropy"))
        (logp.sum() + entropy.sum()).backward()  # outside it
        grads.append(h.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=2e-5, rtol=2e-5)


def test_verl_patch_reaches_ray_workers_through_the_setup_hook(verl_mods):
    """The README's recipe for verl's Ray workers (a patch() in the driver does
    not reach them): Ray's worker_process_setup_hook runs it in every worker."""
    ray = _require("ray", "verl")

    def _patched_in_worker():  # local: sent to the worker by value
        import verl.trainer.ppo.core_algos as core_algos

        return hasattr(core_algos.agg_loss, "__wrapped_original__")

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "rlhf_kernels.integrations.verl.patch"})
    try:
        assert ray.get(ray.remote(_patched_in_worker).remote())
    finally:
        ray.shutdown()


def test_trl_patch_swaps_trainer_lookups_and_unpatch_restores(trl_mods):
    utils, rk_trl = trl_mods
    grpo = _require("trl.trainer.grpo_trainer", "trl")
    cpo = _require("trl.experimental.cpo.cpo_trainer", "trl")
    tpo = _require("trl.experimental.tpo.tpo_trainer", "trl")
    import trl.kernels as trl_kernels

    originals = (utils.selective_log_softmax, utils.entropy_from_logits,
                 utils.selective_log_softmax_and_entropy, utils._ChunkedLogProbFunction)
    with rk_trl.patched():
        assert utils.selective_log_softmax is not originals[0]
        assert utils.selective_log_softmax.__wrapped_original__ is originals[0]
        assert cpo.selective_log_softmax is utils.selective_log_softmax
        assert tpo.selective_log_softmax_and_entropy is utils.selective_log_softmax_and_entropy
        assert utils.entropy_from_logits is not originals[1]
        # the GRPO / RLOO trainers' fused LM head looks this up at call time
        assert utils._ChunkedLogProbFunction is trl_kernels.ChunkedLogProbFunction is not originals[3]
        assert "trl.trainer.utils._ChunkedLogProbFunction" in rk_trl.patched_names()
        assert grpo.add_fused_lm_head is utils.add_fused_lm_head
    assert (utils.selective_log_softmax, utils.entropy_from_logits,
            utils.selective_log_softmax_and_entropy, utils._ChunkedLogProbFunction) == originals
    assert cpo.selective_log_softmax is originals[0] and trl_kernels.ChunkedLogProbFunction is originals[3]


def test_trl_unknown_version_refuses(trl_mods, monkeypatch):
    utils, rk_trl = trl_mods
    before = utils.selective_log_softmax
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0.1")
    with pytest.raises(UntestedVersionError, match=r"trl 0\.0\.1 is not a tested version"):
        rk_trl.patch()
    assert utils.selective_log_softmax is before and not rk_trl.patched_names()


def test_trl_grpo_end_to_end(trl_mods, tmp_path, monkeypatch):
    """Three GRPO steps of a tiny random Llama on CPU, patched and unpatched:
    same losses, KL, entropies and gradient norms, and our op really ran."""
    _require("trl.trainer.grpo_trainer", "trl")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_kernels.trainer.models import tiny_llama
    from rlhf_kernels.trainer.task import DigitTask, build_tokenizer

    _, rk_trl = trl_mods
    calls = []
    real = rlhf_kernels.logprobs_from_logits
    monkeypatch.setattr(rlhf_kernels, "logprobs_from_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    # GRPO's fused LM head (ChunkedLogProbFunction) runs on logprobs_from_hidden's tiles
    real_tiles = rk_trl._lm_head._forward_impl
    monkeypatch.setattr(rk_trl._lm_head, "_forward_impl", lambda *a, **k: calls.append(2) or real_tiles(*a, **k))

    def run(patch: bool):
        tok = build_tokenizer()
        model = tiny_llama(len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, hidden_size=32, num_layers=1, num_heads=2)
        path = tmp_path / "model"
        model.save_pretrained(path)  # a local path, so the reference model loads without the hub
        prompts = [DigitTask.prompt_text(d) for d in ([1, 2, 3], [4, 5, 6])] * 4
        args = GRPOConfig(
            output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
            max_completion_length=6, max_steps=3, learning_rate=1e-2, logging_steps=1, report_to=[],
            seed=0, use_cpu=True, save_strategy="no", beta=0.04, disable_tqdm=True,
        )
        trainer = GRPOTrainer(model=str(path), reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
                              args=args, train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok)
        with rk_trl.patched() if patch else _nullcontext():
            trainer.train()
        return [h for h in trainer.state.log_history if "loss" in h]

    plain = run(False)
    assert not calls
    integrations.reset_report()
    patched = run(True)
    assert calls, "the patched trainer never called our ops"
    # coverage: every call of a patched function was served, none handed back
    coverage = integrations.report()
    assert coverage and coverage["trl.ChunkedLogProbFunction"]["served"] > 0, coverage
    assert all(row["served"] > 0 and not row["handed_back"] for row in coverage.values()), coverage
    assert len(plain) == len(patched) == 3
    # Step 1 (same parameters, same samples): our fused head's log-probs equal
    # TRL's to ~5e-7 (test_trl_fused_lm_head); GRPO's step-1 gradient is a
    # near-cancelling advantage-weighted sum, which turns that into ~3e-4
    # relative in its norm (measured). Later steps start from parameters
    # that differ by that much after lr=1e-2 updates.
    for i, (a, b) in enumerate(zip(plain, patched)):
        for key in ("loss", "kl", "entropy", "grad_norm"):
            rel = (1e-4 if key != "grad_norm" else 1e-3) if i == 0 else 1e-2
            assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-5), (i, key)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# -------------------------------------------------------------------- verl

@pytest.fixture(scope="module")
def verl_mods():
    core = _require("verl.trainer.ppo.core_algos", "verl")
    functional = _require("verl.utils.torch_functional", "verl")
    from rlhf_kernels.integrations import verl as rk_verl

    return core, functional, rk_verl


def _verl_adapter(rk_verl, name):
    for target in rk_verl._patcher.targets:
        if target.name == name:
            module = importlib.import_module(target.module)
            return getattr(module, name), target.make(getattr(module, name))
    raise KeyError(name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verl_logprobs_and_entropy(verl_mods, dtype):
    _, _, rk_verl = verl_mods
    gen = torch.Generator().manual_seed(10)
    logits = (3 * torch.randn(3, 6, 211, generator=gen)).to(dtype)
    labels = torch.randint(0, 211, (3, 6), generator=gen)
    compare = _compare if dtype == torch.float32 else _compare_bf16
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
        _compare(theirs_fn, ours_fn, [hidden, weight], atol=2e-5, rtol=2e-5)
    else:
        _compare_bf16(theirs_fn, ours_fn, [hidden, weight])
    assert calls


@pytest.mark.parametrize("name", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "k3+", "low_var_kl+"])
def test_verl_kl_penalty(verl_mods, name):
    _, _, rk_verl = verl_mods
    gen = torch.Generator().manual_seed(11)
    logp = -3 * torch.rand(4, 9, generator=gen)
    ref = logp + torch.randn(4, 9, generator=gen)
    ref[0, :3] = logp[0, :3] + torch.tensor([30.0, -30.0, 0.0])  # the clamps
    original, ours = _verl_adapter(rk_verl, "kl_penalty")
    _compare(lambda a, b: original(a, b, name), lambda a, b: ours(a, b, name), [logp, ref])
    with pytest.raises(NotImplementedError):
        ours(logp, ref, "full")


def test_verl_gae(verl_mods):
    _, _, rk_verl = verl_mods
    gen = torch.Generator().manual_seed(12)
    rewards = torch.randn(5, 11, generator=gen)
    values = torch.randn(5, 11, generator=gen)
    mask = _mask_with_holes(5, 11, gen).long()
    original, ours = _verl_adapter(rk_verl, "compute_gae_advantage_return")
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8)]:
        _assert_close(ours(rewards, values, mask, gamma, lam), original(rewards, values, mask, gamma, lam))
    one = torch.zeros_like(mask)
    one[2, 4] = 1
    for m in (one, torch.zeros_like(mask)):  # verl's whitening refuses fewer than two tokens; so do we
        with pytest.raises(ValueError):
            original(rewards, values, m, 1.0, 0.95)
        with pytest.raises(ValueError):
            ours(rewards, values, m, 1.0, 0.95)


@pytest.mark.parametrize("name", ["compute_grpo_outcome_advantage", "compute_rloo_outcome_advantage"])
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
    mask = _mask_with_holes(len(ids), 6, gen).long()
    original, ours = _verl_adapter(rk_verl, name)
    kw = {"norm_adv_by_std_in_grpo": norm} if "grpo" in name else {}
    _assert_close(ours(rewards, mask, ids, **kw), original(rewards, mask, ids, **kw))


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
    mask = _mask_with_holes(4, 10, gen).long()
    config = _ActorConfig(clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.28, clip_ratio_c=3.0,
                          global_batch_info=batch_info)
    original, ours = _verl_adapter(rk_verl, "compute_policy_loss_vanilla")
    # gradients w.r.t. log_prob only: old_log_prob and advantages are data (verl detaches them; ours takes no gradient)
    _compare(lambda n: original(old, n, adv, mask, agg, config), lambda n: ours(old, n, adv, mask, agg, config), [new])
    # a fully masked micro-batch: verl divides by 0 (NaN), and so do we
    empty = torch.zeros_like(mask)
    if not batch_info and agg != "token-sum":
        assert torch.isnan(ours(old, new, adv, empty, agg, config)[0])
    _assert_close(ours(old, new, adv, empty, agg, config), original(old, new, adv, empty, agg, config))
    weights = torch.rand(4, 10, generator=gen)  # rollout correction (served: token_weights)
    _assert_close(ours(old, new, adv, mask, agg, config, weights), original(old, new, adv, mask, agg, config, weights))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_verl_value_loss(verl_mods, agg):
    _, _, rk_verl = verl_mods
    gen = torch.Generator().manual_seed(15)
    values = torch.randn(4, 10, generator=gen)
    vpreds = values + 0.5 * torch.randn(4, 10, generator=gen)
    returns = torch.randn(4, 10, generator=gen)
    mask = _mask_with_holes(4, 10, gen)
    original, ours = _verl_adapter(rk_verl, "compute_value_loss")
    for kw in ({}, {"dp_size": 2, "batch_num_tokens": 30, "global_batch_size": 8, "loss_scale_factor": 4}):
        # gradients w.r.t. vpreds only: returns and old values are targets
        _compare(lambda v: original(v, returns, values, mask, 0.2, agg, **kw),
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
    mask = _mask_with_holes(4, 10, gen).long()
    config = _ActorConfig(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=3.0,
                          global_batch_info={})
    original, ours = _verl_adapter(rk_verl, "compute_policy_loss_vanilla")
    bf = [t.bfloat16() for t in (old, new, adv)]
    assert ours(*bf, mask, agg, config)[0].dtype == original(*bf, mask, agg, config)[0].dtype
    _compare(lambda a: original(old, new, a, mask, agg, config), lambda a: ours(old, new, a, mask, agg, config),
             [adv])
    v_original, v_ours = _verl_adapter(rk_verl, "compute_value_loss")
    assert v_ours(new.bfloat16(), adv.bfloat16(), old.bfloat16(), mask, 0.2, agg)[0].dtype == \
        v_original(new.bfloat16(), adv.bfloat16(), old.bfloat16(), mask, 0.2, agg)[0].dtype
    _compare(lambda r: v_original(new, r, old, mask, 0.2, agg), lambda r: v_ours(new, r, old, mask, 0.2, agg), [adv])
    zero = {"dp_size": 2, "batch_num_tokens": 0, "global_batch_size": 0}
    _assert_close(v_ours(new, adv, old, mask, 0.2, agg, **zero), v_original(new, adv, old, mask, 0.2, agg, **zero))


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
    mask = _mask_with_holes(5, 11, gen).to(mask_dtype)
    original, ours = _verl_adapter(rk_verl, "agg_loss")
    call = lambda fn: (lambda x: fn(x, mask, agg, **batch_info))  # noqa: E731
    _compare(call(original), call(ours), [loss_mat])
    _compare(call(original), call(ours), [loss_mat.double()], atol=1e-7, rtol=1e-7)
    # bf16: token modes stay bf16, seq-mean modes come out float32 (verl's float32 sequence mask)
    _compare_bf16(call(original), call(ours), [(3 * loss_mat).bfloat16()])
    # a fully masked micro-batch: verl's 0 / 0 (NaN) without global counts, gradients 0
    empty = torch.zeros_like(mask)
    empty_call = lambda fn: (lambda x: fn(x, empty, agg, **batch_info))  # noqa: E731
    _compare(empty_call(original), empty_call(ours), [loss_mat])
    if not batch_info.get("batch_num_tokens") and agg != "token-sum":
        assert torch.isnan(ours(loss_mat, empty, agg, **batch_info))


@pytest.mark.parametrize("agg", _VERL_AGG_MODES)
def test_verl_agg_loss_nonfinite_outside_mask(verl_mods, agg):
    """verl selects masked tokens away in the token modes but multiplies by the
    mask in the seq-mean modes (NaN leaks into the loss, not the gradients)."""
    _, _, rk_verl = verl_mods
    gen = torch.Generator().manual_seed(17)
    loss_mat = torch.randn(4, 9, generator=gen)
    mask = _mask_with_holes(4, 9, gen)
    loss_mat[0, 1] = float("nan")  # a hole of a sequence with valid tokens
    loss_mat[1, 3] = float("inf")  # the fully masked sequence
    original, ours = _verl_adapter(rk_verl, "agg_loss")
    _compare(lambda x: original(x, mask, agg), lambda x: ours(x, mask, agg), [loss_mat])
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
        _compare(lambda x: original(x, weights, agg), lambda x: ours(x, weights, agg), [loss_mat])
        kw = {"dp_size": 2, "batch_num_tokens": torch.tensor(9), "global_batch_size": torch.tensor(3)}
        mask = weights > 0.3
        _compare(lambda x: original(x, mask, agg, **kw), lambda x: ours(x, mask, agg, **kw), [loss_mat])
        if agg != "token-sum":
            with pytest.raises(ValueError, match="required when dp_size > 1"):
                ours(loss_mat, mask, agg, dp_size=2)
    with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
        ours(loss_mat, weights > 0.5, "seq-sum")


def test_verl_patch_swaps_registries_and_trainer_lookups(verl_mods):
    core, functional, rk_verl = verl_mods
    losses = _require("verl.workers.utils.losses", "verl")
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


# ---------------------------------------------------------------- OpenRLHF

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
    (_compare if dtype == torch.float32 else _compare_bf16)(original, patched, [logits])
    mine, theirs = logits.clone(), logits.clone()
    ours(mine, labels, temperature)
    openrlhf_utils.log_probs_from_logits(theirs, labels, temperature)
    assert torch.equal(mine, theirs)  # OpenRLHF divides the caller's logits in place; so do we


def test_openrlhf_compute_entropy(openrlhf_utils):
    logits = 3 * torch.randn(2, 5, 129, generator=torch.Generator().manual_seed(21))
    original = getattr(openrlhf_utils.compute_entropy, "_torchdynamo_orig_callable", openrlhf_utils.compute_entropy)
    _compare(original, _openrlhf_adapter("compute_entropy"), [logits])


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
    _compare(lambda a, b: openrlhf_utils.compute_approx_kl(a, b, old, **kw), lambda a, b: ours(a, b, old, **kw),
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
    mask = _mask_with_holes(5, 12, gen)
    for m in (mask, mask.long(), None):
        for gamma, lam in [(1.0, 0.95), (0.99, 0.9)]:
            _assert_close(ours(None, values, rewards, m, gamma, lam), original(None, values, rewards, m, gamma, lam))


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
    theirs, g_theirs = _run(original, inputs)
    ours, g_ours = _run(patched, inputs)
    _assert_close(ours, theirs)
    first = ours[0] if isinstance(ours, tuple) else ours
    assert bool(torch.isnan(first)) == nan
    for a, b in zip(g_ours, g_theirs):
        if nan:
            assert (b.isnan() | (b == 0)).all()
            # ours are 0; a case OpenRLHF's own code computes (the fallbacks) is its NaN
            assert not a.any() or torch.equal(a.isnan(), b.isnan())
        else:
            torch.testing.assert_close(a, b)


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
    mask = _mask_with_holes(5, 12, gen).to(mask_dtype)
    # gradients w.r.t. log_probs: old log-probs and advantages are data (OpenRLHF's trainer detaches them)
    call = lambda fn, m=mask, o=old, a=adv: (lambda x: fn(module, x, o, a, m, **batch_info))  # noqa: E731
    _compare(call(original), call(ours), [new])
    double = dict(o=old.double(), a=adv.double())
    _compare(call(original, **double), call(ours, **double), [new.double()], atol=1e-7, rtol=1e-7)
    bf16 = [t.bfloat16() for t in (new, old, adv)]
    data_call = lambda fn: (lambda x, o, a: fn(module, x, o, a, mask, **batch_info))  # noqa: E731
    _compare_bf16(data_call(original), data_call(ours), [bf16[0]], data=bf16[1:])
    empty = torch.zeros_like(mask)
    _compare_empty(call(original, m=empty), call(ours, m=empty), [new], nan=not batch_info)


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
    mask = _mask_with_holes(5, 12, gen)
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
        _compare(lambda x: original(module, x, old, adv, m, **kw), lambda x: ours(module, x, old, adv, m, **kw),
                 [new])
    module = loss_mod.PolicyLoss()
    _compare(lambda x, a: original(module, x, old, a, mask), lambda x, a: ours(module, x, old, a, mask), [new, adv])


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
    mask = _mask_with_holes(5, 12, gen)
    call = lambda fn, m=mask, o=values, r=returns: (lambda v: fn(module, v, o, r, m, **batch_info))  # noqa: E731
    # gradients w.r.t. the predictions: old values and returns are targets
    _compare(call(original), call(ours), [vpreds])
    double = dict(m=mask.long(), o=values.double(), r=returns.double())
    _compare(call(original, **double), call(ours, **double), [vpreds.double()], atol=1e-7, rtol=1e-7)
    bf16 = [t.bfloat16() for t in (vpreds, values, returns)]
    data_call = lambda fn: (lambda v, o, r: fn(module, v, o, r, mask, **batch_info))  # noqa: E731
    _compare_bf16(data_call(original), data_call(ours), [bf16[0]], data=bf16[1:])
    empty = torch.zeros_like(mask)
    _compare_empty(call(original, m=empty), call(ours, m=empty), [vpreds], nan=not batch_info)


def test_openrlhf_losses_run_ours_with_the_trainers_tensor_counts(openrlhf_real, monkeypatch):
    """OpenRLHF's trainer always passes get_loss_batch_info's 0-dim float32 count
    tensors: with them the patched losses must run our kernels (they fell back
    to OpenRLHF's code before), without a host synchronisation."""
    loss_mod = openrlhf_real["openrlhf.models.loss"]
    calls = []
    for name in ("ppo_policy_loss", "ppo_value_loss"):
        real = getattr(rlhf_kernels, name)
        monkeypatch.setattr(rlhf_kernels, name, lambda *a, _real=real, _n=name, **k: calls.append(_n) or _real(*a, **k))
    gen = torch.Generator().manual_seed(27)
    new, old, adv = _policy_inputs(gen)
    mask = _mask_with_holes(5, 12, gen)
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
    mask = _mask_with_holes(5, 12, gen)
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
    _assert_close(got, expected, atol=1e-5, rtol=1e-5)
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


# ---------------------------------------------------------------- coverage

@pytest.fixture
def fake_framework(monkeypatch):
    """A framework ``fakefw`` whose ``f(x)`` our adapter serves for x >= 0 and
    hands back (to the original, which returns -1) below."""
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.0")
    fake = types.ModuleType("fakefw")
    fake.f = lambda x: -1
    monkeypatch.setitem(sys.modules, "fakefw", fake)

    def make(original):
        def f(x):
            if x < 0:
                return integrations.hand_back("fakefw.f", "a negative x", original, x)
            return x

        return f

    patcher = Patcher("fakefw", "fakefw", frozenset({"1.0"}), [_Target("fakefw", "f", make)])
    integrations.reset_report()
    yield fake, patcher
    patcher.unpatch()
    integrations.reset_report()


def test_report_counts_served_and_handed_back_calls(fake_framework, caplog):
    fake, patcher = fake_framework
    with patcher.patched():
        with caplog.at_level("WARNING", logger="rlhf_kernels.integrations"):
            assert [fake.f(x) for x in (1, 2, -3, -4, 5)] == [1, 2, -1, -1, 5]
    assert integrations.report() == {"fakefw.f": {"served": 3, "handed_back": {"a negative x": 2}}}
    # one warning for the first hand-back of the reason, none for the second
    warned = [r.getMessage() for r in caplog.records if r.name == "rlhf_kernels.integrations"]
    assert len(warned) == 1 and "fakefw.f: a negative x" in warned[0]
    assert "served      3  handed back      2 (a negative x: 2)" in integrations.format_report()
    integrations.reset_report()
    assert integrations.report() == {} and integrations.format_report() == "no patched function was called"


def test_strict_patch_raises_instead_of_handing_back(fake_framework):
    fake, patcher = fake_framework
    with patcher.patched(strict=True):
        assert fake.f(2) == 2
        with pytest.raises(integrations.HandBackError, match="fakefw.f: a negative x"):
            fake.f(-1)
    with patcher.patched():  # strictness ends with the patch
        assert fake.f(-1) == -1


def test_handing_back_inside_a_served_call_counts_each_function(fake_framework):
    """A hand-back to a framework function that calls another patched function
    counts the outer call as handed back and the inner one as served."""
    fake, patcher = fake_framework
    fake.g = lambda x: fake.f(-x)  # the framework's g calls its f

    def make_g(original):
        return lambda x: integrations.hand_back("fakefw.g", "always", original, x)

    patcher.targets.append(_Target("fakefw", "g", make_g))
    with patcher.patched():
        assert fake.g(-3) == 3
    assert integrations.report() == {"fakefw.f": {"served": 1, "handed_back": {}},
                                     "fakefw.g": {"served": 0, "handed_back": {"always": 1}}}


def _served_only(key: str, calls: int) -> None:
    assert integrations.report().get(key) == {"served": calls, "handed_back": {}}, integrations.report()


def _weight_masks(gen, batch, seq):
    """The masks verl and OpenRLHF pass: float 0/1, and fractional weights with
    zeros (a fully masked row, holes)."""
    mask = _mask_with_holes(batch, seq, gen)
    weights = torch.rand(batch, seq, generator=gen) * mask
    weights[0, 4] = 0.0
    return {"float01": mask.float(), "weights": weights, "int": mask.long()}


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
            for mask in _weight_masks(gen, 4, 10).values():
                for w in (None, is_weights, zero_weight):
                    _compare(lambda n: original(old, n, adv, mask, agg, config, w),
                             lambda n: ours(old, n, adv, mask, agg, config, w), [new])
                    calls += 1
            _served_only(f"verl.{name}", calls)
            calls = 0
        # GSPO past verl's clamp of the sequence log-ratio (10): verl's own code, counted
        far = new.clone()
        far[2] += 12.0
        mask = _mask_with_holes(4, 10, gen)
        _compare(lambda n: core.compute_policy_loss_gspo.__wrapped_original__(old, n, adv, mask, agg, config),
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
        for mask in _weight_masks(gen, 4, 10).values():
            for kw in ({}, {"dp_size": 2, "batch_num_tokens": 30, "global_batch_size": 8, "loss_scale_factor": 4}):
                _compare(lambda v: value_loss.__wrapped_original__(v, returns, values, mask, 0.2, agg, **kw),
                         lambda v: value_loss(v, returns, values, mask, 0.2, agg, **kw), [vpreds])
                holed = loss_mat.clone()
                holed[0, 1] = float("nan")  # NaN at a masked token leaks in verl's seq-mean modes, as in ours
                _compare(lambda x: aggregate.__wrapped_original__(x, mask, agg, **kw),
                         lambda x: aggregate(x, mask, agg, **kw), [holed])
                calls += 1
    report = integrations.report()
    assert report["verl.compute_value_loss"] == {"served": calls, "handed_back": {}}
    # verl's original value loss calls agg_loss too (patched, served): none handed back
    assert report["verl.agg_loss"]["served"] >= 2 * calls and not report["verl.agg_loss"]["handed_back"]


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
    masks = _weight_masks(gen, 5, 12)
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
                _compare(call(original), call(forward), [new])
                calls += 1
        _served_only("openrlhf.PolicyLoss.forward", calls)
        gspo = modules[-2]
        _compare(lambda x: original(gspo, x, old, adv, masks["weights"]),
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
        for mask in _weight_masks(gen, 5, 12).values():
            for info in _OPENRLHF_BATCH_INFOS:
                _compare(lambda v: forward.__wrapped_original__(module, v, values, returns, mask, **info),
                         lambda v: forward(module, v, values, returns, mask, **info), [vpreds])
    _served_only("openrlhf.ValueLoss.forward", 3 * len(_OPENRLHF_BATCH_INFOS))

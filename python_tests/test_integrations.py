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
from rlhf_kernels.integrations import FrameworkNotInstalledError, Patcher, UntestedVersionError, _Target


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


def _compare_bf16(original, patched, inputs, kwargs=None):
    """bf16: our error against the float64 original is at most twice the
    framework's own bf16 error (the style guide's rule), output and gradients."""
    exact, g_exact = _run(original, [t.double() if t.is_floating_point() else t for t in inputs], kwargs)
    theirs, g_theirs = _run(original, inputs, kwargs)
    ours, g_ours = _run(patched, inputs, kwargs)
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
    # statistics our op does not compute: TRL's own function
    both = ("log_probs", "entropy", "is_top1")
    theirs = chunked.ChunkedLogProbFunction.apply(hidden, weight, b, targets, 1.0, 32, None, 1.0, both)
    mine = ours.apply(hidden, weight, b, targets, 1.0, 32, None, 1.0, both)
    assert torch.equal(theirs[4], mine[4])


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
    patched = run(True)
    assert calls, "the patched trainer never called logprobs_from_logits"
    assert len(plain) == len(patched) == 3
    for a, b in zip(plain, patched):
        for key in ("loss", "kl", "entropy", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

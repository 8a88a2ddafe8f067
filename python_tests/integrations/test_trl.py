"""The TRL integration, against the installed TRL.

For each patched function: TRL's original and our adapter give the same
outputs and gradients (random inputs, masks with holes, bf16 where TRL takes
it); patch() swaps every lookup the trainers use and unpatch() restores
identity; an untested version is refused before anything is patched; three
GRPO steps give the same losses patched and unpatched. Skipped where TRL is not
installed."""

from __future__ import annotations

import importlib.metadata
import sys

import pytest
import torch

import rlhf_kernels
from rlhf_kernels import integrations
from rlhf_kernels.integrations import UntestedVersionError

from integration_helpers import compare_outputs, compare_outputs_bf16, mask_with_holes, require


@pytest.fixture(scope="module")
def trl_mods():
    utils = require("trl.trainer.utils", "trl")
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
    mask = mask_with_holes(4, 7, gen) if use_mask else None
    ours = _trl_adapter(rk_trl, "selective_log_softmax")
    compare_outputs(lambda x: utils.selective_log_softmax(x, index, temperature, mask),
             lambda x: ours(x, index, temperature, mask), [logits])


def test_trl_selective_log_softmax_bf16_and_topk(trl_mods):
    utils, rk_trl = trl_mods
    gen = torch.Generator().manual_seed(1)
    logits = (4 * torch.randn(3, 5, 1000, generator=gen)).bfloat16()
    index = torch.randint(0, 1000, (3, 5), generator=gen)
    ours = _trl_adapter(rk_trl, "selective_log_softmax")
    compare_outputs_bf16(lambda x: utils.selective_log_softmax(x, index), lambda x: ours(x, index), [logits])
    topk = torch.randint(0, 1000, (3, 5, 4), generator=gen)  # (..., K): TRL's own code
    compare_outputs(lambda x: utils.selective_log_softmax(x, topk), lambda x: ours(x, topk), [logits.float()])
    with pytest.raises(ValueError, match="temperature"):
        ours(logits, index, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trl_entropy_from_logits(trl_mods, dtype):
    utils, rk_trl = trl_mods
    logits = (3 * torch.randn(2, 9, 301, generator=torch.Generator().manual_seed(2))).to(dtype)
    ours = _trl_adapter(rk_trl, "entropy_from_logits")
    if dtype == torch.float32:
        compare_outputs(utils.entropy_from_logits, ours, [logits])
    else:
        compare_outputs_bf16(utils.entropy_from_logits, ours, [logits])


@pytest.mark.parametrize("entropy_requires_grad", [True, False])
def test_trl_selective_log_softmax_and_entropy(trl_mods, entropy_requires_grad):
    utils, rk_trl = trl_mods
    gen = torch.Generator().manual_seed(3)
    logits = 2 * torch.randn(4, 6, 53, generator=gen)
    index = torch.randint(0, 53, (4, 6), generator=gen)
    mask = mask_with_holes(4, 6, gen)
    ours = _trl_adapter(rk_trl, "selective_log_softmax_and_entropy")
    kw = dict(entropy_requires_grad=entropy_requires_grad, temperature=0.9, row_mask=mask)
    compare_outputs(lambda x: utils.selective_log_softmax_and_entropy(x, index, **kw), lambda x: ours(x, index, **kw),
             [logits])
    _, entropy = ours(logits.requires_grad_(), index, **kw)
    assert entropy.requires_grad == entropy_requires_grad


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("extra", [{}, {"final_logit_softcapping": 5.0, "logit_scale": 0.5}])
@pytest.mark.parametrize("outputs", [("log_probs",), ("log_probs", "entropy")])
def test_trl_fused_lm_head(trl_mods, monkeypatch, bias, extra, outputs):
    chunked = require("trl.kernels.chunked_logprob", "trl")
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
    compare_outputs(lambda *x: chunked.ChunkedLogProbFunction.apply(*args(*x)), lambda *x: ours.apply(*args(*x)),
             inputs, atol=2e-5, rtol=2e-5)
    # TRL's default outputs (entropy, log_sum_sq_probs, mean_logits, is_top1): ours too, counted
    calls = []
    real = rk_trl.lm_head_tiles.forward_tiles
    monkeypatch.setattr(rk_trl.lm_head_tiles, "forward_tiles", lambda *a, **k: calls.append(1) or real(*a, **k))
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

    chunked = require("trl.kernels.chunked_logprob", "trl")
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


def test_trl_patch_swaps_trainer_lookups_and_unpatch_restores(trl_mods):
    utils, rk_trl = trl_mods
    grpo = require("trl.trainer.grpo_trainer", "trl")
    cpo = require("trl.experimental.cpo.cpo_trainer", "trl")
    tpo = require("trl.experimental.tpo.tpo_trainer", "trl")
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
    require("trl.trainer.grpo_trainer", "trl")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_kernels.trainer.models import tiny_llama
    from rlhf_kernels.trainer.task import DigitTask, build_tokenizer

    _, rk_trl = trl_mods
    calls = []
    real = rlhf_kernels.logprobs_from_logits
    monkeypatch.setattr(rlhf_kernels, "logprobs_from_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    # GRPO's fused LM head (ChunkedLogProbFunction) runs on logprobs_from_hidden's tiles
    real_tiles = rk_trl.lm_head_tiles.forward_tiles
    monkeypatch.setattr(rk_trl.lm_head_tiles, "forward_tiles", lambda *a, **k: calls.append(2) or real_tiles(*a, **k))

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


def test_trl_padding_free_logprobs_served(trl_mods):
    """TRL's padding-free batches (padding_free=True: the sequences packed in
    one row, (1, N, V) logits): selective_log_softmax served and counted."""
    utils, rk_trl = trl_mods
    gen = torch.Generator().manual_seed(13)
    logits = 3 * torch.randn(1, 31, 37, generator=gen)
    index = torch.randint(0, 37, (1, 31), generator=gen)
    integrations.reset_report()
    with rk_trl.patched():
        ours = utils.selective_log_softmax
        compare_outputs(lambda x: ours.__wrapped_original__(x, index), lambda x: ours(x, index), [logits])
    assert integrations.report()["trl.selective_log_softmax"] == {"served": 1, "handed_back": {}}


def _grpo_tokens(seed: int, dtype=torch.float64):
    """GRPO's shapes: (B, T) log-probs, one advantage per sequence (B, 1) as
    TRL keeps it, a mask with holes."""
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(6, 9, generator=gen, dtype=dtype) * 2
    old = logp + torch.randn(6, 9, generator=gen, dtype=dtype) * 0.4
    adv = torch.randn(6, 1, generator=gen, dtype=dtype)
    mask = mask_with_holes(6, 9, gen)  # row 1 has no valid token
    return logp, old, adv, mask


@pytest.mark.parametrize("with_sampler_ratio", [False, True])
def test_trl_vespo_equals_trls_gamma_weights(trl_mods, with_sampler_ratio):
    """loss_type="vespo" against TRL's GRPOTrainer.get_gamma_weights and the
    VESPO lines of GRPOTrainer._compute_loss (per_token_loss = -phi * A *
    logp, summed over the mask / the token count), the sampler's importance
    ratio (token_weights) inside phi as TRL's importance_sampling_ratio."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    logp, old, adv, mask = _grpo_tokens(3)
    # a sequence whose summed log-ratio meets TRL's clamp at 20, one at log 1e-8
    old[0] = logp[0] - 3.0
    old[1] = logp[1] + 4.0
    ratio = None
    if with_sampler_ratio:
        ratio = torch.rand(6, 9, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 1.5 + 0.2
        ratio = torch.where(mask, ratio, 1.0)  # TRL sums its log over every position: 1 off the mask
    params = dict(k_pos=2.5, lambda_pos=3.5, k_neg=3.0, lambda_neg=1.5)
    x_trl = logp.clone().requires_grad_(True)
    phi = GRPOTrainer.get_gamma_weights(adv, x_trl - old, mask.to(logp.dtype), ratio, **params)
    want = ((-phi * adv * x_trl) * mask).sum() / mask.sum()
    want.backward()
    for backend in rlhf_kernels.available_backends():
        x = logp.clone().requires_grad_(True)
        loss, _ = rlhf_kernels.ppo_policy_loss(x, old, adv.expand(6, 9), mask, loss_type="vespo",
                                               token_weights=ratio, vespo_params=tuple(params.values()),
                                               backend=backend)
        loss.backward()
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x.grad, x_trl.grad, rtol=1e-12, atol=1e-12)


def test_trl_luspo_equals_trls_sequence_level_clip(trl_mods):
    """loss_type="luspo" with agg="seq-mean-token-sum" against the LUSPO lines
    of GRPOTrainer._compute_loss (importance_sampling_level="sequence": the
    mean log-ratio per sequence, the clip objective on its exp, each
    sequence's (B, 1) loss times its token count, the mean over sequences),
    the gradient through the sequence mean."""
    logp, old, adv, mask = _grpo_tokens(5)
    eps_low, eps_high = 0.2, 0.28
    x_trl = logp.clone().requires_grad_(True)
    m = mask.to(logp.dtype)
    log_importance_weights = (((x_trl - old) * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    want = (per_token_loss * m).sum(-1).mean()  # TRL divides by B: the empty sequence counts
    want.backward()
    for backend in rlhf_kernels.available_backends():
        x = logp.clone().requires_grad_(True)
        loss, stats = rlhf_kernels.ppo_policy_loss(x, old, adv.expand(6, 9), mask, loss_type="luspo",
                                                   clip_low=eps_low, clip_high=eps_high, agg="seq-mean-token-sum",
                                                   num_seqs=6, backend=backend)
        loss.backward()
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x.grad, x_trl.grad, rtol=1e-12, atol=1e-12)
        seq_ratio = coef_1.detach().squeeze(-1)[mask.any(-1)]
        torch.testing.assert_close(stats["ratio_max"], seq_ratio.max())

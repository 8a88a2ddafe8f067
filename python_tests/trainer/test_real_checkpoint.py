"""The PPO trainer on a checkpoint as users bring one (``qwen_checkpoint.py``:
Qwen2, vocabulary 151936, bf16, pad == eos, a trained byte-level BPE, a chat
template, an instruct generation config) and an HF sequence-classification
reward model, loaded back with ``Auto*``."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from rlhf_kernels.trainer.config import OptimConfig, PPOConfig
from rlhf_kernels.trainer.data import response_mask_from_generation
from rlhf_kernels.trainer.models import ScalarHeadModel, sequence_scores
from rlhf_kernels.trainer.ppo import PPOTrainer, eos_token_ids

from qwen_checkpoint import build_checkpoints  # python_tests/trainer is on pytest's sys.path


@pytest.fixture(scope="module")
def qwen_artefacts(tmp_path_factory) -> dict[str, Path]:
    return build_checkpoints(tmp_path_factory.mktemp("qwen"))


def _load(paths):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    policy = AutoModelForCausalLM.from_pretrained(paths["policy"], local_files_only=True)
    tok = AutoTokenizer.from_pretrained(paths["policy"], local_files_only=True)
    rm = AutoModelForSequenceClassification.from_pretrained(paths["rm"], local_files_only=True)
    assert policy.dtype == rm.dtype == torch.bfloat16 and tok.pad_token_id == tok.eos_token_id
    assert policy.get_input_embeddings().weight.shape[0] == 151936
    return policy, tok, rm


def _prompts(tok, n):
    topics = ["count to five", "a poem about the sea", "the quick brown fox", "digits and words"]
    return [tok.apply_chat_template([{"role": "user", "content": topics[i % len(topics)]}], tokenize=False,
                                    add_generation_prompt=True) for i in range(n)]


def _trainer(paths, rank=0, world_size=1, **overrides):
    policy, tok, rm = _load(paths)
    cfg = PPOConfig(iterations=1, rollout_batch_size=4, max_new_tokens=6, mini_batch_size=4, grad_accum_steps=1,
                    ppo_epochs=1, temperature=0.9, policy_optim=OptimConfig(lr=1e-5),
                    value_optim=OptimConfig(lr=1e-5), **overrides)
    # the critic from the bf16 trunk: its float32 head on bf16 hidden states
    critic = ScalarHeadModel.from_causal_lm(policy)
    return PPOTrainer(policy, copy.deepcopy(policy), critic, tok, cfg, prompt_sampler=lambda n, rng: _prompts(tok, n),
                      reward_model=rm, rank=rank, world_size=world_size), tok, rm


def test_rollout_samples_exactly_from_the_policy(qwen_artefacts, monkeypatch):
    """generate() must sample from softmax(logits / T) of the policy, the
    distribution the old log-probs and the KL are computed for: the
    checkpoint's repetition_penalty, min_new_tokens and top-k / top-p must not
    shape the samples (they did: generate() merged the checkpoint's generation
    config into the trainer's arguments). Every EOS id of the model stops."""
    trainer, tok, _ = _trainer(qwen_artefacts)
    policy = trainer.policy
    assert policy.generation_config.repetition_penalty == 1.1  # the checkpoint's, kept on the model
    seen = {}
    real_generate = policy.generate

    def generate(**kwargs):
        out = real_generate(**kwargs, output_scores=True, output_logits=True, return_dict_in_generate=True)
        seen.update(out=out, config=copy.deepcopy(policy.generation_config))
        return out.sequences

    monkeypatch.setattr(policy, "generate", generate)
    torch.manual_seed(0)
    batch, _, _ = trainer.generate(_prompts(tok, 4))
    assert policy.generation_config.repetition_penalty == 1.1  # restored after the call
    config = seen["config"]
    assert config.repetition_penalty in (None, 1.0) and not config.min_new_tokens and config.top_k == 0
    assert sorted(config.eos_token_id) == sorted(eos_token_ids(policy, tok)) == sorted(
        {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")})
    # the processed scores generate() sampled from are exactly logits / T at every step
    for step, (scores, logits) in enumerate(zip(seen["out"].scores, seen["out"].logits)):
        torch.testing.assert_close(scores.float(), logits.float() / 0.9, rtol=1e-6, atol=1e-6, msg=f"step {step}")
    # and the rollout's old log-probs are the policy's log-probs of the sampled tokens
    old_logp = trainer._logprobs(policy, batch)
    sampled = torch.stack([torch.log_softmax(s.float(), -1) for s in seen["out"].scores], 1)
    sampled = sampled.gather(-1, batch.responses[:, : sampled.shape[1]].unsqueeze(-1)).squeeze(-1)
    mask = batch.response_mask[:, : sampled.shape[1]].bool()
    # bf16 forwards (cached generation vs one full pass) differ by a few 1e-3;
    # the repetition penalty alone moved them by ~0.1 before
    assert (old_logp[:, : sampled.shape[1]] - sampled)[mask].abs().max() < 0.03


def test_every_eos_id_ends_a_response():
    im_end, eos, pad = 2, 0, 0
    responses = torch.tensor([[5, 6, im_end, pad, pad], [7, eos, pad, pad, pad], [8, 9, 10, 11, 12]])
    mask, stopped = response_mask_from_generation(responses, [im_end, eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert stopped.tolist() == [True, True, False]


def test_hf_reward_model_scores_as_hf_reads_them(qwen_artefacts):
    """With pad == eos, HF's sequence classifier reads its score at the last
    token that is not the pad (= eos) token: the trainer must read it there
    too (it read the EOS position), on its left-padded prompt + right-padded
    response batches."""
    trainer, tok, rm = _trainer(qwen_artefacts)
    torch.manual_seed(1)
    batch, responses, stopped = trainer.generate(_prompts(tok, 4))
    ours = trainer.score(batch, [], responses, stopped)
    assert ours.dtype == torch.float32 and ours.shape == (4,)
    for i in range(4):
        real = batch.attention_mask[i].bool()
        ids = batch.input_ids[i][real].unsqueeze(0)  # the sequence alone, no padding at all
        with torch.no_grad():
            theirs = rm(input_ids=ids).logits[0, 0].float()
        assert float(ours[i]) == pytest.approx(float(theirs), abs=2e-2), i
    # sequence_scores reads HF classifiers through HF and ScalarHeadModel at the last valid token
    assert torch.equal(sequence_scores(rm, batch.input_ids, batch.attention_mask), ours)


def test_ppo_iteration_on_the_bf16_checkpoint(qwen_artefacts):
    """One full PPO iteration (rollout, HF RM scoring, advantages, update) on
    the bf16 checkpoint: finite statistics (it crashed in the reward stage)."""
    trainer, _, _ = _trainer(qwen_artefacts)
    torch.manual_seed(2)
    metrics = trainer.step()
    for key in ("reward", "kl", "policy_loss", "value_loss", "stopped_frac", "grad_norm"):
        assert torch.isfinite(torch.tensor(metrics[key])), key


def test_bf16_checkpoint_trains_float32_master_weights(qwen_artefacts):
    """AdamW stepped the bf16 weights directly: at lr 1e-6 most updates round
    away (1.85% of the parameters changed in 10 steps). The trained models are
    float32 master weights; the frozen reference and reward model stay bf16."""
    trainer, _, rm = _trainer(qwen_artefacts)
    assert all(p.dtype == torch.float32 for p in trainer.policy.parameters())
    assert all(p.dtype == torch.float32 for p in trainer.value_model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in trainer.ref_policy.parameters()) and rm.dtype == torch.bfloat16
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    torch.manual_seed(3)
    trainer.step()
    changed = sum(int((p.detach() != b).sum()) for p, b in zip(trainer.policy.parameters(), before))
    total = sum(b.numel() for b in before)
    assert changed / total > 0.9, changed / total


def _count_layer_calls(model):
    """Runs of the first decoder layer's MLP forward (inside the checkpointed
    forward; module hooks do not fire in the recomputation)."""
    calls = []
    mlp = (model.model if hasattr(model, "model") else model.trunk).layers[0].mlp
    forward = mlp.forward
    mlp.forward = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)
    return calls


def test_gradient_checkpointing_recomputes_in_the_update(qwen_artefacts):
    """gradient_checkpointing=True: each decoder layer's forward runs again in
    the backward (it was silently off: the update ran in eval mode, where
    transformers skips checkpointing); the update's numbers are unchanged."""
    updates = {}
    calls = {}
    for ckpt in (False, True):
        torch.manual_seed(4)  # the critic's fresh head, then the rollout's samples
        trainer, _, _ = _trainer(qwen_artefacts, gradient_checkpointing=ckpt)
        r = trainer.rollout()
        policy_calls, critic_calls = _count_layer_calls(trainer.policy), _count_layer_calls(trainer.value_model)
        updates[ckpt] = trainer.update(r)
        calls[ckpt] = (len(policy_calls), len(critic_calls))
    assert calls[True] == (2 * calls[False][0], 2 * calls[False][1]), calls
    for key in ("policy_loss", "value_loss", "grad_norm"):
        assert updates[True][key] == pytest.approx(updates[False][key], rel=1e-4, abs=1e-6), key


def test_rollout_passes_run_in_micro_batches(qwen_artefacts):
    """The no-grad passes over the rollout (old and reference log-probs,
    values, scores) run forward_batch_size rows at a time (they ran the whole
    rollout batch at once: 64 x 513 tokens of logits at V = 152k is 10 GB),
    with the same results."""
    out = {}
    for rows in (0, 1):
        torch.manual_seed(5)
        trainer, _, rm = _trainer(qwen_artefacts, forward_batch_size=rows)
        seen = []
        for model in (trainer.policy, trainer.ref_policy, trainer.value_model, rm):
            model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(
                (kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape[0]), with_kwargs=True)
        torch.manual_seed(5)
        r = trainer.rollout()
        out[rows] = r
        # generate() runs the policy on all 4 prompts (its own incremental
        # passes); every other pass takes forward_batch_size rows
        generate_calls = trainer.config.max_new_tokens
        assert seen[generate_calls:] == ([4] * 4 if rows == 0 else [1] * 16), seen
    for key in ("old_logp", "ref_logp", "old_values", "scores"):
        torch.testing.assert_close(getattr(out[1], key), getattr(out[0], key), rtol=0, atol=2e-2, msg=key)


def test_bf16_precision_autocasts_the_forward_with_float32_master_weights(qwen_artefacts):
    trainer, _, _ = _trainer(qwen_artefacts, precision="bf16")
    dtypes = []
    proj = trainer.policy.model.layers[0].mlp.up_proj
    proj.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    torch.manual_seed(6)
    metrics = trainer.step()
    assert dtypes and set(dtypes) == {torch.bfloat16}  # rollout and update passes ran in bf16
    assert all(p.dtype == torch.float32 for p in trainer.policy.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in trainer.policy.parameters())
    for key in ("policy_loss", "value_loss", "grad_norm"):
        assert torch.isfinite(torch.tensor(metrics[key])), key


def test_running_reward_whitening_uses_every_score_so_far(qwen_artefacts):
    trainer, tok, _ = _trainer(qwen_artefacts, reward_running_whiten=True)
    seen = []
    for seed in (7, 8):
        torch.manual_seed(seed)
        batch, responses, stopped = trainer.generate(_prompts(tok, 4))
        trainer.config.reward_running_whiten = False
        raw = trainer.score(batch, [], responses, stopped)
        trainer.config.reward_running_whiten = True
        seen.append(raw.double())
        got = trainer.score(batch, [], responses, stopped)
        everything = torch.cat(seen)
        want = (raw.double() - everything.mean()) / torch.sqrt(everything.var() + 1e-8)
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    assert trainer.state_dict()["score_moments"][0] == 8


@pytest.mark.parametrize("fused_lm_head", [True, False])
def test_fsdp_and_ddp_agree_on_the_first_update_of_a_fixed_rollout(qwen_artefacts, fused_lm_head, monkeypatch):
    """The same rollout, the same seeds: the update of strategy fsdp (a
    one-process FSDP2 group) equals the default one's, with the fused LM head
    (the ops on the unsharded head inside a root forward: a head gradient
    missing from the reduce-scatter would change grad_norm) and without."""
    import torch.distributed as dist

    from rlhf_kernels.trainer import ppo as ppo_module
    from rlhf_kernels.trainer.utils import init_distributed

    torch.manual_seed(11)
    plain, _, _ = _trainer(qwen_artefacts, fused_lm_head=fused_lm_head)
    r = plain.rollout()
    init_distributed("cpu", always=True)
    calls = []
    for name in ("logprobs_from_hidden", "ppo_loss_from_hidden"):
        real = getattr(ppo_module, name)
        monkeypatch.setattr(ppo_module, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    try:
        torch.manual_seed(11)
        sharded, _, _ = _trainer(qwen_artefacts, strategy="fsdp", fused_lm_head=fused_lm_head)
        want = plain.update(r)
        calls.clear()
        got = sharded.update(r)
        sharded_logp = sharded._logprobs(sharded.ref_policy, r.batch)  # a sharded frozen model, no grad
    finally:
        dist.destroy_process_group()
    assert calls == (["ppo_loss_from_hidden", "logprobs_from_hidden"] if fused_lm_head else [])
    torch.testing.assert_close(sharded_logp, r.ref_logp, rtol=0, atol=2e-5)
    for key in ("policy_loss", "value_loss", "grad_norm", "clipfrac", "entropy"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key


def _one_process_group():
    from rlhf_kernels.trainer.utils import init_distributed

    init_distributed("cpu", always=True)


def test_fsdp_bf16_is_fsdp2_mixed_precision_over_float32_master_weights(qwen_artefacts):
    """strategy fsdp + precision bf16: FSDP2's MixedPrecisionPolicy, not
    autocast. The layers see bf16 weights in their forwards (all-gathered in
    bf16), the sharded parameters and gradients the optimizer steps stay
    float32; the update agrees with the float32 one on a fixed rollout to bf16
    accuracy."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy

    torch.manual_seed(12)
    plain, _, _ = _trainer(qwen_artefacts)
    r = plain.rollout()
    _one_process_group()
    try:
        out = {}
        for precision in ("fp32", "bf16"):
            torch.manual_seed(12)
            trainer, _, _ = _trainer(qwen_artefacts, strategy="fsdp", precision=precision)
            seen = []
            proj = trainer.policy.model.layers[0].mlp.up_proj
            proj.register_forward_pre_hook(lambda m, args: seen.append(
                (m.weight.dtype, args[0].dtype, torch.is_autocast_enabled("cpu"))))
            out[precision] = trainer.update(r)
            group = trainer.policy._get_fsdp_state()._fsdp_param_group
            if precision == "bf16":
                assert group.mp_policy == MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16, False)}, set(seen)
                assert all(p.dtype == torch.float32 and type(p).__name__ == "DTensor"
                           for p in trainer.policy.parameters())
                assert all(s["exp_avg"].dtype == torch.float32 for s in trainer.policy_opt.state.values())
            else:
                assert set(seen) == {(torch.float32, torch.float32, False)}
    finally:
        dist.destroy_process_group()
    for key in ("policy_loss", "value_loss", "entropy"):
        assert torch.isfinite(torch.tensor(out["bf16"][key])), key
        assert out["bf16"][key] == pytest.approx(out["fp32"][key], rel=5e-2, abs=5e-3), key


def test_offload_keeps_the_frozen_models_in_cpu_memory_with_the_same_passes(qwen_artefacts, monkeypatch):
    """offload ref, reward: under fsdp FSDP2's CPUOffloadPolicy on the
    reference and the reward model only, their passes on a fixed rollout as
    without; under ddp the trainer brings each one to the device for its
    passes (recorded: this machine has no other device to move them to)."""
    import torch.distributed as dist

    from rlhf_kernels.trainer import fsdp

    torch.manual_seed(13)
    plain, _, _ = _trainer(qwen_artefacts)
    r = plain.rollout()

    def passes(trainer):
        with trainer._frozen("ref") as ref:
            ref_logp = trainer._logprobs(ref, r.batch)
        return ref_logp, trainer.score(r.batch, r.prompts, r.responses, r.stopped)

    _one_process_group()
    try:
        sharded, _, _ = _trainer(qwen_artefacts, strategy="fsdp", offload=["ref", "reward"])
        policy = lambda m: m._get_fsdp_state()._fsdp_param_group.offload_policy  # noqa: E731
        assert type(policy(sharded.ref_policy)).__name__ == "CPUOffloadPolicy"
        assert type(policy(sharded.reward_model)).__name__ == "CPUOffloadPolicy"
        assert type(policy(sharded.policy)).__name__ == "OffloadPolicy"  # the default: none
        got = {"fsdp": passes(sharded)}
    finally:
        dist.destroy_process_group()
    asked = []
    real = fsdp.on_device
    monkeypatch.setattr(fsdp, "on_device", lambda model, device, enabled=True: asked.append(
        (type(model).__name__, enabled)) or real(model, device, enabled))
    ddp, _, _ = _trainer(qwen_artefacts, offload=["ref"])
    ddp.rollout()
    assert asked == [("Qwen2ForCausalLM", True), ("Qwen2ForSequenceClassification", False)]
    got["ddp"] = passes(ddp)
    for name, (ref_logp, scores) in got.items():
        torch.testing.assert_close(ref_logp, r.ref_logp, rtol=0, atol=2e-5, msg=name)
        torch.testing.assert_close(scores, r.scores, rtol=0, atol=2e-5, msg=name)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_sft_and_reward_stages_in_bf16(qwen_artefacts, strategy):
    """precision bf16 in the SFT and reward stages: bf16 autocast over float32
    weights (ddp), or FSDP2's MixedPrecisionPolicy (fsdp: the layers see bf16
    weights, autocast off); float32 master weights either way."""
    import torch.distributed as dist

    from rlhf_kernels.trainer.config import OptimConfig, RewardConfig, SFTConfig
    from rlhf_kernels.trainer.reward import RewardTrainer
    from rlhf_kernels.trainer.sft import SFTTrainer

    policy, tok, _ = _load(qwen_artefacts)
    if strategy == "fsdp":
        _one_process_group()
    try:
        seen = []
        hook = lambda m, args: seen.append((m.weight.dtype, torch.is_autocast_enabled("cpu")))  # noqa: E731
        sft = SFTTrainer(copy.deepcopy(policy), tok, SFTConfig(steps=2, batch_size=2, optim=OptimConfig(lr=1e-4),
                                                               precision="bf16"), strategy=strategy)
        sft.model.model.layers[0].mlp.up_proj.register_forward_pre_hook(hook)
        history = sft.train(lambda rng: ("count to", " five six"))
        rm = RewardTrainer(ScalarHeadModel.from_causal_lm(policy), tok,
                           RewardConfig(steps=2, prompts_per_batch=2, responses_per_prompt=2, precision="bf16"),
                           strategy=strategy)
        rm.model.trunk.layers[0].mlp.up_proj.register_forward_pre_hook(hook)
        rm_history = rm.train(lambda k, rng: ("q", [("the sea", True), ("digits", True)]))
        masters = {p.dtype for model in (sft.model, rm.model) for p in model.parameters()}
    finally:
        if strategy == "fsdp":
            dist.destroy_process_group()
    want = (torch.bfloat16, False) if strategy == "fsdp" else (torch.float32, True)
    assert seen and set(seen) == {want}, set(seen)
    assert masters == {torch.float32}
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history + rm_history)


def _ddp_and_fsdp_worker(rank, world, port, paths, out):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(20 + rank)  # each rank its own rollout (global statistics over both)
        r = _trainer(paths)[0].rollout()
        got = {}
        for strategy in ("ddp", "fsdp"):
            torch.manual_seed(30)  # the critic's fresh head, the same on every rank
            trainer, _, _ = _trainer(paths, rank=rank, world_size=world, strategy=strategy)
            got[strategy] = trainer.update(r)
        torch.save(got, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp_agree_on_two_ranks_on_a_fixed_rollout(qwen_artefacts, tmp_path):
    """2 gloo ranks, each with its own fixed rollout: the first update's losses
    and statistics with strategy ddp and with fsdp (FSDP2 over both ranks,
    the fused LM head inside the root forward) agree, on every rank."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_and_fsdp_worker, args=(2, 29571, qwen_artefacts, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        for key in ("policy_loss", "value_loss", "grad_norm", "clipfrac", "entropy"):
            assert got["fsdp"][key] == pytest.approx(got["ddp"][key], rel=1e-4, abs=1e-6), (rank, key)
        assert got["fsdp"]["memory/model_state_mb"] <= 0.6 * got["ddp"]["memory/model_state_mb"]

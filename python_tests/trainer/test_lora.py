"""LoRA on the policy (PPOConfig.lora_r, the ppo command's --lora-r): on the
Qwen2 test checkpoint (bf16, vocabulary 151936), the reference log-probs are
the base model's (the adapters off, no second copy), the adapters train and
move the policy, the outputs are a PEFT adapter folder and, with --merge, a
plain HF checkpoint of the merged model."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_kernels import cli
from rlhf_kernels.trainer.config import OptimConfig, PPOConfig
from rlhf_kernels.trainer.models import with_lora
from rlhf_kernels.trainer.ppo import PPOTrainer

from qwen_checkpoint import build_checkpoints  # python_tests/trainer is on pytest's sys.path

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    paths = build_checkpoints(root)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in ("count to five", "the quick brown fox")))
    return {**paths, "prompts": prompts}


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)


def test_reference_is_the_base_model_and_the_adapters_train(paths):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(paths["policy"])
    rm = AutoModelForSequenceClassification.from_pretrained(paths["rm"], local_files_only=True)
    rm.config.pad_token_id = tok.pad_token_id  # the reward model's scores differ between responses
    policy = with_lora(_load(paths["policy"]), r=8, alpha=16, dropout=0.0, target_modules="all-linear")
    cfg = PPOConfig(algo="grpo", group_size=2, rollout_batch_size=4, mini_batch_size=4, grad_accum_steps=1,
                    max_new_tokens=4, lora_r=8, policy_optim=OptimConfig(lr=5e-3, schedule="constant"))
    trainer = PPOTrainer(policy, None, None, tok, cfg, prompt_sampler=lambda n, rng: ["count to five"] * n,
                         reward_model=rm)
    assert trainer.ref_policy is None
    trainable = {n for n, p in trainer.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    head = trainer.policy.get_output_embeddings().weight
    assert head.dtype == torch.bfloat16 and not head.requires_grad  # the base (and its LM head) frozen, bf16
    for _ in range(2):
        trainer.step()
    batch = trainer.generate(["count to five", "the quick brown fox"])[0]
    base = _load(paths["policy"]).eval()
    with trainer._frozen("ref") as ref:
        ref_logp = trainer._logprobs(ref, batch)
    base_logp = trainer._logprobs(base, batch)
    policy_logp = trainer._logprobs(trainer.policy, batch)
    mask = batch.response_mask.bool()
    torch.testing.assert_close(ref_logp[mask], base_logp[mask], rtol=0, atol=1e-6)
    assert (policy_logp[mask] - base_logp[mask]).abs().max() > 1e-3  # the adapters moved the policy


def test_ppo_command_writes_adapters_and_the_merged_model(paths, tmp_path):
    out = tmp_path / "run"
    assert cli.main(["ppo", "--policy", str(paths["policy"]), "--reward-model", str(paths["rm"]), "--prompts",
                     str(paths["prompts"]), "--out", str(out), "--iterations", "2", "--rollout-batch-size", "4",
                     "--max-new-tokens", "4", "--lora-r", "8", "--lora-alpha", "32", "--merge"]) == 0
    assert (out / "policy" / "adapter_config.json").is_file()
    assert json.loads((out / "policy" / "adapter_config.json").read_text())["r"] == 8
    adapted = peft.PeftModel.from_pretrained(_load(paths["policy"]), out / "policy").eval()
    merged = _load(out / "policy_merged").eval()
    assert merged.dtype == torch.bfloat16
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    with torch.no_grad():
        a, b = adapted(ids).logits.float(), merged(ids).logits.float()
    assert (a - b).abs().max() <= 0.05 * a.abs().max()  # bf16 merge: one rounding of each weight
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert (out / "critic" / "config.json").is_file()  # the critic trains full weights


def test_lora_configuration_errors(paths, tmp_path, capsys):
    base = ["ppo", "--policy", str(paths["policy"]), "--reward-model", str(paths["rm"]), "--prompts",
            str(paths["prompts"]), "--out", str(tmp_path / "x"), "--iterations", "1"]
    assert cli.main(base + ["--merge"]) == 2
    assert "--merge: only with --lora-r" in capsys.readouterr().err
    assert cli.main(base + ["--lora-r", "4", "--offload", "ref"]) == 2
    assert "ppo.offload: ref has nothing to offload with LoRA" in capsys.readouterr().err
    assert cli.main(base + ["--lora-r", "4", "--strategy", "fsdp"]) == 2
    assert "LoRA is not supported under strategy fsdp" in capsys.readouterr().err

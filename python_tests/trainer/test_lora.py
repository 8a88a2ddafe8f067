"""LoRA on the policy (PPOConfig.lora_r, the ppo command's --lora-r): on the
Qwen2 test checkpoint (bf16, vocabulary 151936), the reference log-probs are
the base model's (the adapters off, no second copy), the adapters train and
move the policy, the outputs are a PEFT adapter folder and, with --merge, a
plain HF checkpoint of the merged model."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from rlhf_kernels import cli
from rlhf_kernels.trainer.config import OptimConfig, PPOConfig
from rlhf_kernels.trainer.models import merged_parameters, with_lora
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


def test_merged_parameters_are_the_merged_model(paths):
    """What the vLLM engine loads for a LoRA policy: the base model's names,
    each adapted weight W + scale B A, as PEFT's merge_and_unload computes it
    (here in float32), and the policy itself left unmerged."""
    torch.manual_seed(0)
    policy = with_lora(_load(paths["policy"]).float(), r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # B starts at zero: a delta to see
    before = {n: p.clone() for n, p in policy.named_parameters()}
    got = dict(merged_parameters(policy))
    want = dict(copy.deepcopy(policy).merge_and_unload().named_parameters())
    assert got.keys() == want.keys()
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, want[name], rtol=0, atol=1e-6)
    base = dict(_load(paths["policy"]).float().named_parameters())
    adapted = [n for n in got if n.endswith("proj.weight")]
    assert adapted and all((got[n] - base[n]).abs().max() > 1e-4 for n in adapted)  # the deltas merged
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())  # the model unchanged
    assert not any(getattr(m, "merged", False) for m in policy.modules())


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
    assert (out / "critic" / "config.json").is_file()  # the critic: its trunk's adapters merged, an HF classifier


def test_sft_and_rm_commands_train_adapters(paths, tmp_path):
    """sft --lora-r: a PEFT adapter folder that lowers the loss, --merge the
    merged model in <out>/merged; rm --lora-r on that merged model: adapters
    on the trunk plus the score head (PEFT's modules_to_save), the chosen
    responses scored above the rejected ones through PeftModel.from_pretrained
    and through the merged classifier alike; ppo then runs on both."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    sft_data, rm_data = tmp_path / "sft.jsonl", tmp_path / "rm.jsonl"
    sft_data.write_text("".join(json.dumps(r) + "\n" for r in (
        {"prompt": "count to five", "response": "one two three four five"},
        {"prompt": "the quick brown fox", "response": "jumps over the lazy dog"})))
    rm_data.write_text("".join(json.dumps(r) + "\n" for r in (
        {"prompt": "count to five", "chosen": "one two three four five", "rejected": "the lazy dog"},
        {"prompt": "a poem", "chosen": "the sea and the sky", "rejected": "digits 0 1 2"})))
    sft = tmp_path / "sft"
    assert cli.main(["sft", "--model", str(paths["policy"]), "--data", str(sft_data), "--out", str(sft),
                     "--steps", "30", "--batch-size", "2", "--lr", "3e-2", "--lora-r", "16", "--merge"]) == 0
    assert len((sft / "metrics.jsonl").read_text().splitlines()) == 30
    config = json.loads((sft / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["task_type"] == "CAUSAL_LM"
    assert not (sft / "config.json").exists()  # adapters only; the merged model is the full checkpoint
    adapted = peft.PeftModel.from_pretrained(_load(paths["policy"]), sft).eval()
    merged = _load(sft / "merged").eval()
    assert merged.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(sft)
    ids = torch.tensor([tok("count to five one two three four five")["input_ids"]])

    def nll(model):  # of the trained text, a mean over its tokens
        with torch.no_grad():
            logits = model(ids).logits[:, :-1].float()
        return float(torch.nn.functional.cross_entropy(logits[0], ids[0, 1:])), logits

    (trained, a), (merged_nll, b) = nll(adapted), nll(merged)
    assert (a - b).abs().max() <= 0.05 * a.abs().max()
    assert trained < nll(_load(paths["policy"]))[0] - 0.1  # the adapters learnt the data

    rm = tmp_path / "rm"
    assert cli.main(["rm", "--model", str(sft / "merged"), "--data", str(rm_data), "--out", str(rm),
                     "--steps", "10", "--batch-size", "2", "--lr", "1e-2", "--lora-r", "8", "--merge"]) == 0
    config = json.loads((rm / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    tok = AutoTokenizer.from_pretrained(rm)

    def classifier(path):
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, local_files_only=True)
        model.config.pad_token_id = tok.pad_token_id
        return model.eval()

    adapted = peft.PeftModel.from_pretrained(classifier(sft / "merged"), rm).eval()
    merged = classifier(rm / "merged")
    assert merged.config.num_labels == 1 and merged.dtype == torch.bfloat16
    for model in (adapted, merged):
        def score(prompt, response):
            ids = tok(prompt + response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            with torch.no_grad():
                return float(model(input_ids=torch.tensor([ids])).logits[0, 0])
        assert score("count to five", "one two three four five") > score("count to five", "the lazy dog")
    out = tmp_path / "ppo"
    assert cli.main(["ppo", "--policy", str(sft / "merged"), "--reward-model", str(rm / "merged"), "--prompts",
                     str(paths["prompts"]), "--out", str(out), "--iterations", "1", "--rollout-batch-size", "4",
                     "--max-new-tokens", "4", "--lora-r", "4"]) == 0


def test_lora_configuration_errors(paths, tmp_path, capsys):
    base = ["ppo", "--policy", str(paths["policy"]), "--reward-model", str(paths["rm"]), "--prompts",
            str(paths["prompts"]), "--out", str(tmp_path / "x"), "--iterations", "1"]
    assert cli.main(base + ["--merge"]) == 2
    assert "--merge: only with --lora-r" in capsys.readouterr().err
    assert cli.main(base + ["--lora-r", "4", "--offload", "ref"]) == 2
    assert "ppo.offload: ref has nothing to offload with LoRA" in capsys.readouterr().err
    stage = ["sft", "--model", str(paths["policy"]), "--data", str(paths["prompts"]), "--out", str(tmp_path / "s")]
    assert cli.main(stage + ["--merge"]) == 2
    assert "--merge: only with --lora-r" in capsys.readouterr().err
    assert cli.main(stage + ["--lora-r", "4", "--lora-alpha", "0"]) == 2
    assert "lora_alpha must be > 0" in capsys.readouterr().err
    assert cli.main(["rm"] + stage[1:] + ["--lora-r", "-1"]) == 2
    assert "lora_r: -1; expected an int >= 0" in capsys.readouterr().err


def _torchrun(port: int, argv: list[str]) -> None:
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "rlhf_kernels.cli", *argv]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def _same_model(adapters, merged_dir, base_dir, loader=None):
    """The PEFT adapter folder over its base against the merged checkpoint:
    the same logits to one bf16 rounding of each weight."""
    loader = loader or _load
    adapted = peft.PeftModel.from_pretrained(loader(base_dir), adapters).eval()
    merged = loader(merged_dir).eval()
    assert merged.dtype == torch.bfloat16
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    with torch.no_grad():
        a, b, base = adapted(ids).logits.float(), merged(ids).logits.float(), loader(base_dir)(ids).logits.float()
    assert (a - b).abs().max() <= 0.05 * a.abs().max()
    assert (a - base).abs().max() > 10 * (a - b).abs().max()  # the adapters moved the model; the merge kept it


def test_lora_under_fsdp_on_two_gloo_ranks(paths, tmp_path):
    """--strategy fsdp with --lora-r on 2 gloo ranks (FSDP2 shards the frozen
    bf16 base and the float32 adapters alike): sft writes the adapters and
    the merged model from the gathered state; ppo trains the policy's and the
    critic's adapters, writes the adapter folder, the merged policy and the
    merged critic, and resumes from its sharded checkpoint."""
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text("".join(json.dumps(r) + "\n" for r in (
        {"prompt": "count to five", "response": "one two three four five"},
        {"prompt": "the quick brown fox", "response": "jumps over the lazy dog"})))
    sft = tmp_path / "sft"
    _torchrun(29561, ["sft", "--model", str(paths["policy"]), "--data", str(sft_data), "--out", str(sft), "--steps",
                      "4", "--batch-size", "2", "--lr", "3e-2", "--lora-r", "8", "--strategy", "fsdp", "--merge"])
    assert json.loads((sft / "args.json").read_text())["world_size"] == 2
    _same_model(sft, sft / "merged", paths["policy"])

    out = tmp_path / "ppo"
    argv = ["ppo", "--policy", str(paths["policy"]), "--reward-model", str(paths["rm"]), "--prompts",
            str(paths["prompts"]), "--out", str(out), "--rollout-batch-size", "4", "--max-new-tokens", "4",
            "--lora-r", "8", "--strategy", "fsdp", "--merge", "--config", str(tmp_path / "lr.json")]
    (tmp_path / "lr.json").write_text(json.dumps({"policy_optim": {"lr": 3e-2, "schedule": "constant"}}))
    _torchrun(29563, argv + ["--iterations", "1"])
    _torchrun(29565, argv + ["--iterations", "2", "--resume"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert rows[1]["kl"] != 0  # the reference is the base (the adapters off under FSDP), the policy has moved
    _same_model(out / "policy", out / "policy_merged", paths["policy"])
    from transformers import AutoModelForSequenceClassification

    critic = AutoModelForSequenceClassification.from_pretrained(out / "critic", local_files_only=True)
    rm = AutoModelForSequenceClassification.from_pretrained(paths["rm"], local_files_only=True)
    assert critic.config.num_labels == 1 and critic.dtype == torch.bfloat16
    trunk = {k: v for k, v in critic.state_dict().items() if "layers.0.self_attn.q_proj.weight" in k}
    assert trunk and all((v.float() - rm.state_dict()[k].float()).abs().max() > 0 for k, v in trunk.items())

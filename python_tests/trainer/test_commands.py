"""`rlhf-kernels sft | rm | ppo` end to end on a checkpoint as users bring one
(``qwen_checkpoint.py``): chat and plain-text data, an HF reward model or a
reward function from a file, the pretraining mix, GRPO / RLOO; each stage's
HF outputs loaded back with ``Auto*``; bad inputs named."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_kernels import cli

from helpers import gpu
from qwen_checkpoint import build_checkpoints  # python_tests/trainer is on pytest's sys.path


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo_command")
    paths = build_checkpoints(root)
    prompts = root / "prompts.jsonl"
    rows = [{"messages": [{"role": "user", "content": "count to five"}]}, {"prompt": "the quick brown fox"},
            {"messages": [{"role": "system", "content": "be short"}, {"role": "user", "content": "a poem"}]}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ptx = root / "ptx.jsonl"
    ptx.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("one two three", "the sea and the sky")))
    return {**paths, "prompts": prompts, "ptx": ptx, "root": root}


def _args(a, out, *extra):
    return ["ppo", "--policy", str(a["policy"]), "--prompts", str(a["prompts"]), "--out", str(out),
            "--rollout-batch-size", "4", "--max-new-tokens", "4", *extra]


def test_ppo_command_with_an_hf_reward_model_writes_hf_checkpoints(artefacts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "run"
    code = cli.main(_args(artefacts, out, "--reward-model", str(artefacts["rm"]), "--iterations", "2",
                          "--reward-normalization", "reference-mean", "--missing-eos-penalty", "0.5",
                          "--ptx-data", str(artefacts["ptx"]), "--ptx-coef", "0.1"))
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    for key in ("reward", "kl", "policy_loss", "value_loss", "ptx_loss", "timing/rollout_s", "timing/scoring_s",
                "timing/advantages_s", "timing/update_s", "memory/rollout_peak_mb", "memory/update_peak_mb"):
        assert all(key in r and r[key] == r[key] for r in rows), key  # present and not NaN
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["reward_bias"] != 0.0
    # the outputs are HF checkpoints in the input's dtype, with the tokenizer
    policy = AutoModelForCausalLM.from_pretrained(out / "policy", local_files_only=True)
    start = AutoModelForCausalLM.from_pretrained(artefacts["policy"], local_files_only=True)
    assert policy.dtype == torch.bfloat16
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), start.parameters()))
    assert AutoTokenizer.from_pretrained(out / "policy").chat_template
    critic = AutoModelForSequenceClassification.from_pretrained(out / "critic", local_files_only=True)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert critic.config.num_labels == 1 and critic.dtype == torch.bfloat16
    # read back as our critic (its trunk and score), its value at the last token is HF's score
    from rlhf_kernels.trainer.commands import critic_from

    with torch.no_grad():
        ours = critic_from(critic)(ids, torch.ones_like(ids))[0, -1]
    with torch.no_grad():
        theirs = critic(input_ids=ids).logits[0, 0]
    assert float(ours) == pytest.approx(float(theirs), abs=1e-2)
    assert (out / "checkpoint.pt").exists() and (out / "curves.png").exists()


def test_ppo_command_with_a_reward_function_from_a_file_and_resume(artefacts, tmp_path):
    reward_file = tmp_path / "my_reward.py"
    log = tmp_path / "calls.jsonl"
    reward_file.write_text(
        "import json, torch\n"
        f"LOG = {str(log)!r}\n"
        "def score(prompts, responses, **info):\n"
        "    with open(LOG, 'a') as f:\n"
        "        f.write(json.dumps({'n': len(responses), 'stopped': list(info['stopped'])}) + '\\n')\n"
        "    return torch.tensor([float(len(r)) for r in responses])\n")
    out = tmp_path / "run"
    args = _args(artefacts, out, "--reward-fn", f"{reward_file}:score", "--reward-normalization", "running")
    assert cli.main(args + ["--iterations", "1"]) == 0
    assert cli.main(args + ["--iterations", "2", "--resume"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]  # resumed at iteration 1, not restarted
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 2 and all(c["n"] == 4 and len(c["stopped"]) == 4 for c in calls)


def test_ppo_command_refuses_bad_input_naming_it(artefacts, tmp_path, capsys):
    a = artefacts
    cases = [
        (_args(a, tmp_path / "x"), "exactly one of --reward-model and --reward-fn"),
        (_args(a, tmp_path / "x", "--reward-fn", "nowhere.py:f"), "--reward-fn: nowhere.py is not a file"),
        (_args({**a, "prompts": tmp_path / "missing.jsonl"}, tmp_path / "x", "--reward-model", str(a["rm"])),
         "--prompts"),
        (_args(a, tmp_path / "x", "--reward-model", str(a["rm"]), "--ptx-coef", "0.5"), "needs --ptx-data"),
        (_args({**a, "policy": tmp_path / "nope"}, tmp_path / "x", "--reward-model", str(a["rm"])), "--policy"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt here"}\n')
    cases.append((_args({**a, "prompts": bad}, tmp_path / "x", "--reward-model", str(a["rm"])),
                  'expected a "prompt" string or a "messages" list'))
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        assert message in capsys.readouterr().err, message


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_ppo_command_group_algorithms_train_no_critic(artefacts, tmp_path, algo):
    out = tmp_path / algo
    code = cli.main(_args(artefacts, out, "--reward-model", str(artefacts["rm"]), "--iterations", "1",
                          "--algo", algo, "--group-size", "2", "--precision", "bf16", "--gradient-checkpointing",
                          "--adv-estimator", "dr_grpo", "--loss-type", "vespo"))
    assert code == 0
    row = json.loads((out / "metrics.jsonl").read_text())
    assert "value_loss" not in row and row["policy_loss"] == row["policy_loss"]
    assert row["adv_estimator"] == "dr_grpo" and row["loss_type"] == "vespo"
    assert (out / "policy" / "config.json").exists() and not (out / "critic").exists()


def test_ppo_command_rollout_correction_flags(artefacts, tmp_path, capsys):
    """--rollout-is / --rollout-rs (verl's spellings) on the Qwen2 checkpoint:
    the mismatch statistics in metrics.jsonl (the HF sampler agrees with the
    trainer to float rounding, so nothing is rejected); a bad threshold is
    refused before training, naming the flag's field."""
    out = tmp_path / "corrected"
    code = cli.main(_args(artefacts, out, "--reward-model", str(artefacts["rm"]), "--iterations", "1",
                          "--algo", "grpo", "--group-size", "2", "--rollout-is", "sequence",
                          "--rollout-is-threshold", "0.5_2.0", "--rollout-rs", "token_k1,seq_max_k3",
                          "--rollout-rs-threshold", "0.9_1.1,0.01"))
    assert code == 0
    row = json.loads((out / "metrics.jsonl").read_text())
    assert 0 <= row["mismatch/abs_diff_max"] < 1e-3
    assert row["correction/rejected_token_frac"] == 0 and row["correction/weight_mean"] == pytest.approx(1, abs=1e-3)
    code = cli.main(_args(artefacts, tmp_path / "bad", "--reward-model", str(artefacts["rm"]), "--rollout-rs",
                          "seq_sum_k2", "--rollout-rs-threshold", "1_2"))
    assert code == 2
    assert "ppo.rollout_correction.rollout_rs_threshold (seq_sum_k2)" in capsys.readouterr().err


def test_sft_then_rm_then_ppo_commands_chain_on_hf_checkpoints(artefacts, tmp_path):
    """sft on chat and prompt/response lines, rm on chosen/rejected lines from
    the SFT model (a fresh one-label head), ppo with that reward model: each
    stage's output is an HF checkpoint the next loads with Auto*."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    sft_data = tmp_path / "sft.jsonl"
    sft_rows = [{"messages": [{"role": "user", "content": "count to five"},
                              {"role": "assistant", "content": "one two three four five"}]},
                {"prompt": "the quick brown fox", "response": "jumps over the lazy dog"}]
    sft_data.write_text("".join(json.dumps(r) + "\n" for r in sft_rows))
    assert cli.main(["sft", "--model", str(artefacts["policy"]), "--data", str(sft_data), "--out",
                     str(tmp_path / "sft"), "--steps", "8", "--batch-size", "2", "--lr", "3e-3"]) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.3, losses  # from log(151936) = 11.9
    sft = AutoModelForCausalLM.from_pretrained(tmp_path / "sft", local_files_only=True)
    assert sft.dtype == torch.bfloat16

    rm_data = tmp_path / "rm.jsonl"
    rm_rows = [{"prompt": "count to five", "chosen": "one two three four five", "rejected": "the lazy dog"},
               {"messages": [{"role": "user", "content": "a poem"}], "chosen": "the sea and the sky",
                "rejected": "digits 0 1 2"}]
    rm_data.write_text("".join(json.dumps(r) + "\n" for r in rm_rows))
    assert cli.main(["rm", "--model", str(tmp_path / "sft"), "--data", str(rm_data), "--out", str(tmp_path / "rm"),
                     "--steps", "10", "--batch-size", "2", "--lr", "3e-3"]) == 0
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", local_files_only=True)
    tok = AutoTokenizer.from_pretrained(tmp_path / "rm")
    assert rm.config.num_labels == 1 and rm.dtype == torch.bfloat16
    # trained on the score HF reads: the chosen responses score above the rejected ones
    def score(prompt, response):
        ids = tok(prompt + response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            return float(rm(input_ids=torch.tensor([ids])).logits[0, 0])
    assert score("count to five", "one two three four five") > score("count to five", "the lazy dog")

    out = tmp_path / "ppo"
    assert cli.main(["ppo", "--policy", str(tmp_path / "sft"), "--reward-model", str(tmp_path / "rm"),
                     "--prompts", str(artefacts["prompts"]), "--out", str(out), "--iterations", "1",
                     "--rollout-batch-size", "4", "--max-new-tokens", "4"]) == 0
    assert (out / "critic" / "config.json").exists()


def test_stage_commands_refuse_bad_data_naming_the_line(artefacts, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    for command, rows, message in (
        ("sft", [{"prompt": "p"}], "line 1: expected \"prompt\" and \"response\""),
        ("sft", [{"messages": [{"role": "user", "content": "hi"}]}], "the last message must be the assistant's"),
        ("rm", [{"prompt": "p", "chosen": "a"}], "expected \"chosen\" and \"rejected\""),
        ("rm", [{"prompt": "p", "responses": ["a", "b"]}, {"prompt": "q", "responses": ["a", "b", "c"]}],
         "line 2 ranks 3 responses, the first row 2"),
    ):
        bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
        argv = [command, "--model", str(artefacts["policy"]), "--data", str(bad), "--out", str(tmp_path / "o")]
        assert cli.main(argv) == 2
        assert message in capsys.readouterr().err, message


def test_ppo_command_logs_to_tensorboard_when_installed(artefacts, tmp_path, monkeypatch):
    """tensorboard is not installed here: a stand-in SummaryWriter records
    what the command writes (every numeric metric of every iteration)."""
    import sys
    import types

    written = []

    class SummaryWriter:
        def __init__(self, log_dir):
            written.append(("dir", log_dir))

        def add_scalar(self, key, value, step):
            written.append((key, step))

        def close(self):
            written.append(("closed", None))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    out = tmp_path / "tb_run"
    assert cli.main(_args(artefacts, out, "--reward-model", str(artefacts["rm"]), "--iterations", "2")) == 0
    assert written[0] == ("dir", str(out / "tb")) and written[-1] == ("closed", None)
    assert {("reward", 0), ("reward", 1), ("timing/update_s", 1), ("policy_loss", 0)} <= set(written)


def test_ppo_command_under_torchrun_on_two_gloo_ranks(artefacts, tmp_path):
    """torchrun --nproc_per_node 2: DDP over gloo, global statistics, rank 0
    writes the outputs, the checkpoint holds both ranks' random streams."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "rlhf_kernels.cli", *_args(artefacts, out, "--reward-model", str(artefacts["rm"]),
                                            "--iterations", "1", "--reward-normalization", "reference-mean")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["tokens"] > 4 * 4  # responses of both ranks (4 each, >= 1 token) counted
    assert json.loads((out / "args.json").read_text())["world_size"] == 2
    ranks = torch.load(out / "checkpoint.pt", weights_only=False)["trainer"]["rank_rng"]
    assert len(ranks) == 2 and ranks[0]["data_rng"] != ranks[1]["data_rng"]
    assert (out / "policy" / "model.safetensors").exists() and (out / "critic" / "model.safetensors").exists()


def _torchrun(nproc: int, port: int, argv: list[str]):
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           "-m", "rlhf_kernels.cli", *argv]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def test_ppo_command_fsdp_on_two_gloo_ranks_shards_the_state_and_resumes_on_any_number(artefacts, tmp_path):
    """--strategy fsdp under torchrun (2 CPU ranks, gloo): each rank holds
    about half the parameters, gradients and optimizer state of a single
    process; the HF checkpoints are gathered on rank 0; the checkpoint
    resumes on 1 rank and on 2. bf16 (FSDP2 mixed precision) with the frozen
    models offloaded to CPU memory."""
    from transformers import AutoModelForCausalLM

    single = tmp_path / "single"
    assert cli.main(_args(artefacts, single, "--reward-model", str(artefacts["rm"]), "--iterations", "1")) == 0
    base = ["--reward-model", str(artefacts["rm"]), "--precision", "bf16", "--offload", "ref,reward"]
    alone = json.loads((single / "metrics.jsonl").read_text().splitlines()[0])["memory/model_state_mb"]
    out = tmp_path / "fsdp"
    _torchrun(2, 29541, _args(artefacts, out, *base, "--iterations", "1", "--strategy", "fsdp"))
    sharded = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["memory/model_state_mb"]
    print(f"model state per rank: {sharded:.1f} MiB sharded over 2 ranks, {alone:.1f} MiB in one process")
    assert sharded <= 0.6 * alone, (sharded, alone)
    policy = AutoModelForCausalLM.from_pretrained(out / "policy", local_files_only=True)
    assert policy.dtype == torch.bfloat16 and policy.get_input_embeddings().weight.shape[0] == 151936
    assert (out / "critic" / "model.safetensors").exists()
    # torch.distributed.checkpoint shards, each rank's own, and the trainer state
    shards = sorted(p.name for p in (out / "checkpoint").iterdir())
    assert "trainer.pt" in shards and ".metadata" in shards and sum(n.endswith(".distcp") for n in shards) == 2
    # the 2-rank checkpoint on 1 rank (a one-process FSDP group), then on 2 again
    assert cli.main(_args(artefacts, out, *base, "--iterations", "2", "--strategy", "fsdp", "--resume")) == 0
    _torchrun(2, 29543, _args(artefacts, out, *base, "--iterations", "3", "--strategy", "fsdp", "--resume"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert json.loads((out / "policy" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]


def test_sft_and_rm_commands_data_parallel_under_torchrun(artefacts, tmp_path):
    """sft (FSDP, bf16 mixed precision) and rm (DDP) on 2 gloo ranks: each rank
    its own examples, one global loss per step, the HF checkpoint from rank 0."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    sft_data, rm_data = tmp_path / "sft.jsonl", tmp_path / "rm.jsonl"
    sft_data.write_text("".join(json.dumps({"prompt": f"count {i}", "response": "one two three"}) + "\n"
                                for i in range(6)))
    rm_data.write_text("".join(json.dumps({"prompt": f"q {i}", "chosen": "the sea", "rejected": "digits"}) + "\n"
                               for i in range(6)))
    _torchrun(2, 29545, ["sft", "--model", str(artefacts["policy"]), "--data", str(sft_data), "--out",
                         str(tmp_path / "sft"), "--steps", "3", "--batch-size", "2", "--lr", "3e-3",
                         "--strategy", "fsdp", "--precision", "bf16"])
    assert len((tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()) == 3
    assert json.loads((tmp_path / "sft" / "args.json").read_text())["world_size"] == 2
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "sft", local_files_only=True).dtype == torch.bfloat16
    _torchrun(2, 29547, ["rm", "--model", str(tmp_path / "sft"), "--data", str(rm_data), "--out",
                         str(tmp_path / "rm"), "--steps", "3", "--batch-size", "2"])
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", local_files_only=True)
    assert rm.config.num_labels == 1


def test_fsdp_run_stopped_with_sigint_resumes_on_two_ranks_as_uninterrupted_and_on_one(artefacts, tmp_path):
    """Ctrl-C (SIGINT to the process group) stops a 2-rank FSDP run at an
    iteration boundary with a checkpoint; resumed on 2 ranks its metrics are
    the uninterrupted run's, resumed on 1 rank it runs to the end."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    argv = lambda out: _args(artefacts, out, "--reward-model", str(artefacts["rm"]), "--iterations", "5",  # noqa: E731
                             "--strategy", "fsdp")
    _torchrun(2, 29551, argv(tmp_path / "full"))
    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29553",
           "-m", "rlhf_kernels.cli", *argv(cut)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    metrics = cut / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            os.killpg(proc.pid, signal.SIGINT)
            break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=600)
    stopped_at = len(metrics.read_text().splitlines())
    assert 2 <= stopped_at < 5, out[-3000:]
    assert (cut / "checkpoint" / "trainer.pt").exists(), out[-3000:]
    shutil.copytree(cut, tmp_path / "cut_one")
    _torchrun(2, 29555, argv(cut) + ["--resume"])

    def rows(run):
        keep = lambda k: not k.startswith(("timing/", "memory/", "time", "tokens_per_s"))  # noqa: E731
        return [{k: v for k, v in json.loads(line).items() if keep(k)}
                for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    full, resumed = rows("full"), rows("cut")
    assert len(full) == len(resumed) == 5
    for a, b in zip(full, resumed):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["iteration"], key)
    assert cli.main(argv(tmp_path / "cut_one") + ["--resume"]) == 0  # the 2-rank checkpoint on 1 rank
    assert [r["iteration"] for r in rows("cut_one")] == [0, 1, 2, 3, 4]


@gpu
def test_ppo_command_fsdp_bf16_offload_on_every_gpu_with_nccl(artefacts, tmp_path):
    """The same FSDP run on the GPUs (NCCL, one rank per GPU), bf16 mixed
    precision, the frozen models offloaded to CPU memory (moved per layer)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "gpu"
    _torchrun(torch.cuda.device_count(), 29561,
              _args(artefacts, out, "--reward-model", str(artefacts["rm"]), "--iterations", "2", "--strategy", "fsdp",
                    "--precision", "bf16", "--offload", "ref,reward", "--device", "cuda"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert all(torch.isfinite(torch.tensor(r["policy_loss"])) for r in rows)
    assert AutoModelForCausalLM.from_pretrained(out / "policy", local_files_only=True).dtype == torch.bfloat16

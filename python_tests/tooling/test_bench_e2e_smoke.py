"""benchmarks/bench_e2e.py runs end to end on the quick shape: our GRPO
iteration and TRL's, each timed in its own child process, as JSON lines."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent


def test_bench_e2e_quick(tmp_path):
    pytest.importorskip("trl")
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import bench_e2e
    finally:
        sys.path.pop(0)
    providers = ["rlhf_kernels (hf generate)", "trl (hf generate)"]
    rows = bench_e2e.main(["--quick", "--providers", ",".join(providers), "--out-dir", str(tmp_path)])
    files = list(tmp_path.glob("*.jsonl"))
    assert len(files) == 1
    lines = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert len(lines) == len(rows) == 2
    assert [r["provider"] for r in lines] == providers
    for r in lines:
        assert r.get("error") is None, r.get("error")
        assert r["op"] == "grpo_iteration" and r["mode"] == "iteration" and r["shape"] == [8, 8]
        assert r["median_s"] > 0
    ours, trl = lines
    assert ours["phase_rollout_s"] > 0 and ours["phase_update_s"] > 0
    assert trl["speedup_vs_trl_hf"] == pytest.approx(1.0)
    assert ours["speedup_vs_trl_hf"] == pytest.approx(trl["median_s"] / ours["median_s"])

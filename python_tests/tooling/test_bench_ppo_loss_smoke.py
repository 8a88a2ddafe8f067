"""benchmarks/bench_ppo_loss.py runs end to end on tiny shapes and writes JSON lines."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_bench_losses_quick(tmp_path):
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import bench_ppo_loss
    finally:
        sys.path.pop(0)
    rows = bench_ppo_loss.main(["--quick", "--out-dir", str(tmp_path)])
    files = list(tmp_path.glob("*.jsonl"))
    assert len(files) == 1
    lines = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert len(lines) == len(rows) > 0
    ops = {(r["op"], r["provider"], r["mode"]) for r in lines}
    for op in ("ppo_policy_loss", "ppo_value_loss", "ppo_loss_from_logits"):
        for mode in ("fwd", "fwd+bwd"):
            assert (op, "eager", mode) in ops
            assert any(o == op and p.startswith("rlhf_kernels:") and m == mode for o, p, m in ops)
    assert all(r["median_ms"] > 0 and r["speedup_vs_eager"] is not None for r in lines)

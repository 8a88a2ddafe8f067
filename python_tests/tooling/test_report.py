"""benchmarks/report.py on a temporary copy of small synthetic result lines."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from benchmarks import report  # noqa: E402

ENV_GPU = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.13.0", "triton": "3.9.0", "cuda": "12.8",
           "git_commit": "abc1234", "date": "2026-11-22T10:00:00+00:00", "copy_gbps": 3000.0}
ENV_CPU = {"device": "CPU AMD EPYC x2 threads", "torch": "2.13.0+cpu", "triton": None, "cuda": None,
           "git_commit": "abc1234", "date": "2026-11-22T10:00:00+00:00", "copy_gbps": 40.0}


def _line(env, **kw):
    row = dict(env)
    row.update(kw)
    return json.dumps(row)


def test_report_tables_goals_and_plots(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    lp = dict(op="logprobs", shape=[8192, 152064], dtype="bfloat16")
    gpu_lines = [
        _line(ENV_GPU, provider="eager (TRL/verl)", mode="fwd_logp_entropy", median_ms=10.0, gbps=250.0,
              frac_copy_bw=0.083, peak_mem_bytes=5 << 30, **lp),
        _line(ENV_GPU, provider="rlhf_kernels[cuda]", mode="fwd_logp_entropy", median_ms=1.0, gbps=2500.0,
              frac_copy_bw=0.83, peak_mem_bytes=1 << 20, **lp),
        _line(ENV_GPU, provider="liger.cross_entropy", mode="fwd_logp_entropy", median_ms=0.8, gbps=3000.0,
              frac_copy_bw=0.9, peak_mem_bytes=None, **lp),
        _line(ENV_GPU, provider="rlhf_kernels[triton]", mode="fwd_logp_entropy", median_ms=1.2, **lp,
              shape_note="ignored extra field"),
        # A second V, for the plot against V.
        _line(ENV_GPU, provider="rlhf_kernels[cuda]", mode="fwd_bwd", median_ms=1.9, op="logprobs",
              shape=[8192, 32000], dtype="bfloat16", peak_mem_bytes=1 << 20),
        _line(ENV_GPU, provider="rlhf_kernels[cuda]", mode="fwd_bwd", median_ms=5.0, op="logprobs",
              shape=[8192, 128256], dtype="bfloat16", peak_mem_bytes=2 << 20),
    ]
    # bench_advantages' fields: mode "forward", speedup_vs_loop, python_loop baseline; an older
    # run of the same case (superseded) and a broken line.
    cpu_lines = [
        _line(dict(ENV_CPU, date="2026-11-01T00:00:00+00:00"), op="ppo_advantages", provider="rlhf_kernels-cpu",
              mode="forward", shape=[64, 1024], dtype="float32", median_ms=5.0, speedup_vs_loop=4.0),
        _line(ENV_CPU, op="ppo_advantages", provider="python_loop", mode="forward", shape=[64, 1024],
              dtype="float32", median_ms=20.0, speedup_vs_loop=1.0),
        _line(ENV_CPU, op="ppo_advantages", provider="rlhf_kernels-cpu", mode="forward", shape=[64, 1024],
              dtype="float32", median_ms=0.25, speedup_vs_loop=80.0, compile_s=None),
        "{not json",
    ]
    (results / "nvidia-h100.jsonl").write_text("\n".join(gpu_lines) + "\n")
    (results / "cpu.jsonl").write_text("\n".join(cpu_lines) + "\n")
    out = tmp_path / "docs" / "performance.md"
    text = report.main(["--results", str(results), "--out", str(out)])
    assert out.read_text() == text

    assert "NVIDIA H100 80GB HBM3" in text and "CPU AMD EPYC x2 threads" in text
    assert "No GPU results exist yet" not in text
    # Speed-ups against the eager baseline of the same case; the newest line wins.
    assert "| logprobs | fwd_logp_entropy | 8192x152064 | bfloat16 | rlhf_kernels[cuda] | 1.000 |" in text
    assert "10.00x" in text and "80.00x" in text and "4.00x" not in text
    goals = {line.split("|")[2].strip(): line.split("|")[3].strip() for line in text.splitlines()
             if line.startswith("| #")}
    assert goals["H100-class GPU: logprobs fwd logp+entropy >= 8x faster than eager"] == "**met**"
    assert goals["H100-class GPU: logprobs fwd logp+entropy, N=8192 V=152064 bf16, >= 85% of copy bandwidth"] == "**not met**"
    assert goals["H100-class GPU: every op ahead of every installed peer on each standard shape"] == "**not met**"
    assert goals["CPU: ppo_advantages B=64 T=1024: >= 50x the Python loop"] == "**met**"
    assert goals["H100-class GPU: ppo_loss_from_logits N=8192 V=152064 bf16 fwd+bwd: <= 2 ms"] == "**not measured**"
    assert "cpu.jsonl:4: not JSON" in text
    img = out.parent / "img"
    pngs = sorted(p.name for p in img.glob("*.png"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert "nvidia-h100-80gb-hbm3-logprobs-vs-v.png" in pngs and "nvidia-h100-80gb-hbm3-speedup.png" in pngs
    assert "](img/nvidia-h100-80gb-hbm3-speedup.png)" in text


def test_report_without_gpu_results_says_so(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "cpu.jsonl").write_text(_line(ENV_CPU, op="ppo_policy_loss", provider="eager", mode="fwd",
                                             shape=[1024, 1024], dtype="float32", median_ms=2.0) + "\n")
    text = report.main(["--results", str(results), "--out", str(tmp_path / "p.md"), "--no-plots"])
    assert "No GPU results exist yet" in text
    assert "not measured" in text and "baseline" in text


def test_goal_met_on_one_device_and_not_another_says_which():
    xeon = dict(ENV_CPU, device="CPU Intel Xeon x2 threads")
    case = dict(op="ppo_advantages", mode="forward", shape=[64, 1024], dtype="float32")
    rows = report.latest([
        dict(ENV_CPU, provider="python_loop", median_ms=20.0, **case),
        dict(ENV_CPU, provider="rlhf_kernels-cpu", median_ms=2.0, **case),  # 10x: not met
        dict(xeon, provider="python_loop", median_ms=20.0, **case),
        dict(xeon, provider="rlhf_kernels-cpu", median_ms=0.2, **case),  # 100x: met
    ])
    goal = next(g for g in report.GOALS if g.text == "ppo_advantages B=64 T=1024: >= 50x the Python loop")
    status, detail = report.goal_status(goal, rows)
    assert status == "met on CPU Intel Xeon x2 threads; not met on CPU AMD EPYC x2 threads"
    assert "10.0x" in detail and "100.0x" in detail
    # Every device meeting it (or none) is the plain verdict.
    assert report.goal_status(goal, [r for r in rows if r["device"] == xeon["device"]])[0] == "met"
    assert report.goal_status(goal, [r for r in rows if r["device"] == ENV_CPU["device"]])[0] == "not met"

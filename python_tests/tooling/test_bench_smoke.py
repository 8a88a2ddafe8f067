"""Smoke tests of the benchmark scripts: they run end to end on tiny shapes
and write JSON lines (to a temporary directory, never benchmarks/results)."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))


def test_bench_advantages_quick(tmp_path):
    from benchmarks import bench_advantages

    rows = bench_advantages.main(["--quick", "--device", "cpu", "--out-dir", str(tmp_path)])
    providers = {(r["op"], r["provider"]) for r in rows}
    for op in ("ppo_advantages", "compute_gae"):
        assert (op, "python_loop") in providers and (op, "torch_compile_ref") in providers
        assert (op, "rlhf_kernels-cpu") in providers
    files = list(tmp_path.glob("*.jsonl"))
    assert len(files) == 1
    lines = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert len(lines) == len(rows)
    assert all(line["median_ms"] > 0 and line["speedup_vs_loop"] > 0 for line in lines)


def test_bench_rollout_correction_quick(tmp_path):
    """Our op against verl's functions and bare torch ops, one JSON line each
    (the Triton interpreter too, where the suite runs it)."""
    from benchmarks import bench_rollout_correction

    rows = bench_rollout_correction.main(["--quick", "--device", "cpu", "--out-dir", str(tmp_path)])
    providers = {r["provider"] for r in rows}
    assert {"bare torch ops", "verl (with its metrics)", "rlhf_kernels:cpu"} <= providers
    assert all(r["median_ms"] > 0 and r["speedup_vs_verl"] > 0 for r in rows)
    lines = (tmp_path / next(tmp_path.glob("*.jsonl")).name).read_text().splitlines()
    assert len(lines) == len(rows)


def test_bench_vocab_parallel_quick(tmp_path):
    """One process and 2 gloo ranks, each a JSON line with its extra peak; the
    ranks' one all_gather forward and one all_reduce backward counted."""
    from benchmarks import bench_vocab_parallel

    rows = bench_vocab_parallel.main(["--quick", "--out-dir", str(tmp_path)])
    assert [r["ranks"] for r in rows] == [1, 2]
    assert all(r["median_ms"] > 0 and r["peak_mem_bytes"] >= 0 for r in rows)
    assert rows[1]["collectives_forward"] == {"all_gather": 1, "all_reduce": 0}
    assert rows[1]["collectives_backward"] == {"all_gather": 0, "all_reduce": 1}
    assert len((tmp_path / next(tmp_path.glob("*.jsonl")).name).read_text().splitlines()) == 2


def test_bench_lora_quick(tmp_path):
    """Full weights and LoRA, each a JSON line with its extra peak."""
    from benchmarks import bench_lora

    rows = bench_lora.main(["--quick", "--out-dir", str(tmp_path)])
    assert [r["lora_r"] for r in rows] == [0, 16]
    assert all(r["peak_mem_bytes"] > 0 for r in rows)
    assert len((tmp_path / next(tmp_path.glob("*.jsonl")).name).read_text().splitlines()) == 2


def test_bench_integrations_quick_every_patched_call_served(tmp_path):
    """Each case of bench_integrations (TRL, verl and OpenRLHF calls: float
    masks, rollout IS weights, GSPO, the IS correction) runs our ops in every
    patched call: none handed back to the framework."""
    import pytest

    for framework in ("trl", "verl"):
        pytest.importorskip(framework)
    from benchmarks import bench_integrations

    before = set(sys.modules)
    try:
        rows = bench_integrations.main(["--quick", "--out-dir", str(tmp_path)])
    finally:  # the benchmark's flash-attn / vLLM stand-ins and OpenRLHF leave with it
        for name in set(sys.modules) - before:
            if name.split(".")[0] in ("flash_attn", "vllm", "openrlhf"):
                del sys.modules[name]
    ours = [r for r in rows if r["provider"] == "rlhf_kernels"]
    assert len(ours) >= 12 and all(r["median_ms"] > 0 for r in rows)
    for row in ours:
        assert row["served"] > 0 and not row["handed_back"], row["op"]
    assert len(list(tmp_path.glob("*.jsonl"))) == 1


def test_bench_fsdp_generate_runs_in_one_process(tmp_path, capsys):
    """bench_fsdp_generate on a one-process FSDP2 group: both ways of
    generating run and are written."""
    from benchmarks import bench_fsdp_generate

    bench_fsdp_generate.main(["--new-tokens", "2", "--out-dir", str(tmp_path)])
    lines = [json.loads(line) for f in tmp_path.glob("*.jsonl") for line in f.read_text().splitlines()]
    assert {r["provider"] for r in lines} == {"all-gather per step", "gathered once"}
    assert all(r["median_ms"] > 0 and r["world_size"] == 1 for r in lines)
    assert "gathered once" in capsys.readouterr().out


def test_bench_overhead_writes_every_op_with_its_ratio(tmp_path, capsys):
    from benchmarks import bench_overhead, report

    assert bench_overhead.main(["--calls", "3", "--repeats", "1", "--out-dir", str(tmp_path)]) == 0
    lines = [json.loads(line) for f in tmp_path.glob("*.jsonl") for line in f.read_text().splitlines()]
    ours = {(r["op"], r["mode"]): r for r in lines if r["provider"] == "rlhf_kernels"}
    eager = {(r["op"], r["mode"]): r for r in lines if r["provider"] == "eager"}
    assert set(ours) == set(eager) and len(ours) == 17
    for key, row in ours.items():
        assert row["median_ms"] > 0
        assert abs(row["ratio_vs_eager"] - row["per_call_us"] / eager[key]["per_call_us"]) < 2e-3
    met, detail = report._overhead_at_most_eager(report.latest(lines))
    assert ("above 1" in detail) == (not met)
    assert "ratio" in capsys.readouterr().out


def test_bench_lm_head_quick_times_every_provider(tmp_path):
    """bench_lm_head on a tiny shape, both workloads: every provider timed
    (the peers that are installed included) and written."""
    from benchmarks import bench_lm_head

    for extra in ([], ["--loss"]):
        rows = bench_lm_head.main(["--quick", "--no-memory", "--out-dir", str(tmp_path)] + extra)
        names = {r["provider"] for r in rows}
        expected = bench_lm_head.loss_providers() if extra else bench_lm_head.providers()
        assert names == set(expected) and "rlhf_kernels" in " ".join(names)
        assert all(r["median_ms"] > 0 and r["shape"] == [64, 32, 5003] for r in rows)
        for r in rows:  # the three GEMMs' rate against one measured GEMM of the shape
            assert r["gemm_tflops"] > 0 and r["frac_gemm_peak"] == pytest.approx(
                r["tflops_3gemm"] / r["gemm_tflops"], rel=1e-2)
            assert r["tflops_3gemm"] == pytest.approx(6 * 64 * 32 * 5003 / (r["median_ms"] * 1e-3) / 1e12, rel=1e-2)
    lines = [line for f in tmp_path.glob("*.jsonl") for line in f.read_text().splitlines()]
    assert len(lines) == len(bench_lm_head.providers()) + len(bench_lm_head.loss_providers())


def test_bench_lm_head_three_gemm_provider_runs_three_gemms_in_bf16(tmp_path, monkeypatch):
    """The --loss "3 GEMMs" provider takes ppo_loss_from_hidden's three-GEMM
    path for a bf16 head too (its budget holds the float32 weight gradient;
    the default would not), and the "4 GEMMs" one does not."""
    from benchmarks import bench_lm_head
    from rlhf_kernels.ops import lm_head_plan, lm_head_tiles

    calls = []
    real = lm_head_tiles.loss_grad_in_forward
    monkeypatch.setattr(lm_head_tiles, "loss_grad_in_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    hidden, weight, labels = bench_lm_head.inputs(64, 1024, 5003, torch.bfloat16)
    # (V x H x 4 = 20 MB: more than the default budget holds besides the rows.)
    operand_bytes = lm_head_plan.tile_bytes(hidden, weight)
    default = lm_head_plan.loss_chunk_bytes(64, 5003, "cpu", *operand_bytes)
    assert lm_head_plan.row_block(64, 5003, default, *operand_bytes) == 0
    provs = bench_lm_head.loss_providers()
    bench_lm_head.fwd_bwd(provs["rlhf_kernels (gradient in the forward, 3 GEMMs)"], hidden, weight, labels)
    assert calls == [1]
    bench_lm_head.fwd_bwd(provs["rlhf_kernels (grad_in_forward=False, 4 GEMMs)"], hidden, weight, labels)
    assert calls == [1]


def test_time_interleaved_round_robin_and_a_failing_provider():
    """common.time_interleaved calls the providers in turn (a warm-up, then
    one call each per round) and hands back a provider's exception."""
    from benchmarks import common

    calls = []

    def failing():
        raise RuntimeError("peer broke")

    out = common.time_interleaved({"a": lambda: calls.append("a"), "bad": failing,
                                   "b": lambda: calls.append("b")}, rounds=3)
    assert calls == ["a", "b"] * 4
    assert list(out) == ["a", "bad", "b"] and isinstance(out["bad"], RuntimeError)
    assert all(out[k].median_ms >= 0 for k in ("a", "b"))


def test_bench_rollout_decode_bound_counts_the_model_weights():
    """bench_rollout's compute bound: 2 FLOP per weight of the decoder's
    projections and the (tied) LM head, counted on the model itself."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from benchmarks import bench_rollout

    shape = bench_rollout.TINY
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=bench_rollout.VOCAB, tie_word_embeddings=True, **shape))
    weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight"))
    bound = bench_rollout.decode_bound(shape)
    assert bound["flop_per_token"] == 2 * (weights + model.lm_head.weight.numel())
    assert bound["gemm_gflops"] > 0
    rate = bound["gemm_gflops"] * 1e9 / bound["flop_per_token"]  # of the rounded GFLOP/s
    assert abs(bound["bound_tokens_per_s"] - rate) <= 1e-3 * rate

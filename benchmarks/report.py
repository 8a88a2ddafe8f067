"""Turn every ``benchmarks/results/*.jsonl`` into ``docs/performance.md`` and PNG plots.

    python -m benchmarks.report                       # the repository's results and docs
    python -m benchmarks.report --results DIR --out FILE --img-dir DIR

Each benchmark writes slightly different fields (``speedup_vs_loop`` in
bench_advantages, ``speedup_vs_eager`` in bench_ppo_loss, peak memory only where
measured); this report recomputes what it shows from the common ones: for each
(device, op, mode, shape, dtype, provider) it keeps the latest line, and the
speed-up is the eager baseline's median over the row's median, the baseline
taken from the same run when that run has one. Nothing here is written by
hand: the goals are data (``GOALS`` below), checked against the lines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "performance.md"
IMG_DIR = ROOT / "docs" / "img"

# The eager formulation each benchmark calls its baseline.
# "verl": its own eager function (objectives); "trl": TRL's GRPO lines (luspo, vespo)
EAGER = ("eager", "eager (TRL/verl)", "python_loop", "verl", "trl")
GPU_CLASS = ("H100", "H200", "H800", "GH200")  # the devices an "H100-class GPU" goal accepts


def is_eager(provider: str) -> bool:
    return provider in EAGER


def is_ours(provider: str) -> bool:
    return provider.startswith("rlhf_kernels")


def is_peer(provider: str) -> bool:
    return not (is_ours(provider) or is_eager(provider) or "compile" in provider)


def is_gpu(device: str) -> bool:
    return not device.upper().startswith("CPU")


def is_h100_class(device: str) -> bool:
    return is_gpu(device) and any(name in device.upper() for name in GPU_CLASS)


# --- loading -----------------------------------------------------------------------------------


def load(results_dir: Path) -> tuple[list[dict], list[str]]:
    """Every parseable line of every *.jsonl (and the problems found)."""
    rows, problems = [], []
    for path in sorted(results_dir.glob("*.jsonl")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{path.name}:{n}: not JSON ({exc.msg})")
                continue
            missing = [k for k in ("device", "op", "provider", "shape", "dtype", "median_ms") if k not in row]
            if missing or not isinstance(row.get("median_ms"), (int, float)) or row["median_ms"] <= 0:
                problems.append(f"{path.name}:{n}: skipped (missing or bad {missing or 'median_ms'})")
                continue
            row.setdefault("mode", "forward")
            row["shape"] = list(row["shape"]) if isinstance(row["shape"], (list, tuple)) else [row["shape"]]
            row["_file"] = path.name
            rows.append(row)
    return rows, problems


def _case(row: dict) -> tuple:
    return (row["device"], row["op"], row["mode"], tuple(row["shape"]), row["dtype"])


def latest(rows: list[dict]) -> list[dict]:
    """The newest line per (device, op, mode, shape, dtype, provider), with its
    speed-up over the eager baseline of the same case."""
    newest: dict[tuple, dict] = {}
    for row in rows:
        key = _case(row) + (row["provider"],)
        if key not in newest or str(row.get("date", "")) >= str(newest[key].get("date", "")):
            newest[key] = row
    by_case_run = {(_case(r), r.get("date")): r for r in rows if is_eager(r["provider"])}
    out = []
    for key, row in newest.items():
        row = dict(row)
        base = by_case_run.get((_case(row), row.get("date")))
        if base is None:
            base = next((newest[k] for k in newest if k[:-1] == key[:-1] and is_eager(k[-1])), None)
        row["speedup"] = base["median_ms"] / row["median_ms"] if base else None
        out.append(row)
    out.sort(key=lambda r: (r["device"], r["op"], r["mode"], r["shape"], r["dtype"], not is_eager(r["provider"]),
                            r["median_ms"]))
    return out


# --- goals -------------------------------------------------------------------------------------


@dataclass
class Goal:
    issue: int
    text: str
    gpu: bool  # an H100-class GPU goal (else: any CPU)
    check: Callable[[list[dict]], tuple[bool, str] | None]  # rows of one device -> (met, detail) or None


def _pick(rows, op, mode=None, shape=None, dtype=None, provider=None):
    return [r for r in rows if r["op"] == op and (mode is None or r["mode"] == mode)
            and (shape is None or tuple(r["shape"]) == tuple(shape)) and (dtype is None or r["dtype"] == dtype)
            and (provider is None or provider(r["provider"]))]


def _best(rows):
    return min(rows, key=lambda r: r["median_ms"]) if rows else None


def _speedup_goal(op, mode, shape, dtype, factor):
    def check(rows):
        ours = _best(_pick(rows, op, mode, shape, dtype, is_ours))
        if ours is None or ours["speedup"] is None:
            return None
        return ours["speedup"] >= factor, f"{ours['speedup']:.1f}x ({ours['provider']})"
    return check


def _time_goal(op, mode, shape, dtype, max_ms):
    def check(rows):
        ours = _best(_pick(rows, op, mode, shape, dtype, is_ours))
        if ours is None:
            return None
        return ours["median_ms"] <= max_ms, f"{ours['median_ms']:.3f} ms ({ours['provider']})"
    return check


def _bandwidth_goal(op, mode, shape, dtype, frac):
    def check(rows):
        ours = _best(_pick(rows, op, mode, shape, dtype, is_ours))
        if ours is None or ours.get("frac_copy_bw") is None:
            return None
        return ours["frac_copy_bw"] >= frac, f"{ours['frac_copy_bw']:.0%} of copy bandwidth ({ours['provider']})"
    return check


def _memory_goal(op, mode, shape, dtype, max_over_input, provider=is_ours):
    def check(rows):
        found = [r for r in _pick(rows, op, mode, shape, dtype, provider) if r.get("peak_mem_over_input") is not None]
        ours = min(found, key=lambda r: r["peak_mem_over_input"]) if found else None
        if ours is None:
            return None
        return (ours["peak_mem_over_input"] <= max_over_input,
                f"extra peak {ours['peak_mem_over_input']:.3f}x the input ({ours['provider']})")
    return check


def _all_of(*checks):
    def check(rows):
        results = [c(rows) for c in checks]
        if any(r is None for r in results):
            return None
        return all(r[0] for r in results), "; ".join(r[1] for r in results)
    return check


def _objectives_goal(factor: float):
    """Each loss_type's fwd+bwd at 1M tokens against verl's function of that
    name (TRL's lines for luspo and vespo)."""
    names = ("clip", "cispo", "sapo", "gpg", "dppo_tv", "dppo_kl", "dro", "geo_mean", "luspo", "vespo")

    def check(rows):
        found = [(name, _best(_pick(rows, f"policy_loss:{name}", "fwd+bwd", (1024, 1024), "float32", is_ours)))
                 for name in names]
        if any(r is None or r["speedup"] is None for _, r in found):
            return None
        return (all(r["speedup"] >= factor for _, r in found),
                "; ".join(f"{name} {r['speedup']:.1f}x" for name, r in found))
    return check


def _ahead_of_peers(rows):
    """Our best beats every installed peer on every case where a peer ran."""
    cases = defaultdict(list)
    for r in rows:
        cases[(r["op"], r["mode"], tuple(r["shape"]), r["dtype"])].append(r)
    lost, compared = [], 0
    for case, rs in cases.items():
        ours = _best([r for r in rs if is_ours(r["provider"])])
        for peer in (r for r in rs if is_peer(r["provider"])):
            if ours is None:
                continue
            compared += 1
            if peer["median_ms"] <= ours["median_ms"]:
                lost.append(f"{case[0]} {case[1]} {'x'.join(map(str, case[2]))}: {peer['provider']}")
    if not compared:
        return None
    return not lost, (f"{compared} comparisons; behind on: " + ", ".join(lost)) if lost else f"{compared} comparisons, all ahead"


def _near_bandwidth(rows):
    """The memory-bound ops' best kernel within 15% of the copy bandwidth."""
    below, checked = [], 0
    for op in ("logprobs", "ppo_loss_from_logits", "kl_penalty"):
        cases = {(r["mode"], tuple(r["shape"]), r["dtype"]) for r in rows if r["op"] == op}
        for mode, shape, dtype in cases:
            ours = _best(_pick(rows, op, mode, shape, dtype, is_ours))
            if ours is None or ours.get("frac_copy_bw") is None:
                continue
            checked += 1
            if ours["frac_copy_bw"] < 0.85:
                below.append(f"{op} {mode} {'x'.join(map(str, shape))} {dtype}: {ours['frac_copy_bw']:.0%}")
    if not checked:
        return None
    return not below, ("below 85%: " + ", ".join(below)) if below else f"{checked} cases at >= 85%"


def _overhead_at_most_eager(rows):
    """Every op's per-call time at tiny shapes (bench_overhead) within its eager composition's."""
    ours = [r for r in rows if r["op"].startswith(OVERHEAD) and is_ours(r["provider"])]
    if not ours:
        return None
    worst = max(ours, key=lambda r: r["speedup"] and 1 / r["speedup"])
    above = [f"{r['op'][len(OVERHEAD):]} {r['mode']}: {1 / r['speedup']:.2f}" for r in ours if r["speedup"] < 1]
    detail = ("above 1: " + ", ".join(above)) if above else (
        f"{len(ours)} cases, worst {worst['op'][len(OVERHEAD):]} {worst['mode']} at {1 / worst['speedup']:.2f}")
    return not above, detail


def _lm_head_goal(shape, dtype):
    """Goal 13: extra peak <= 0.10x the float32 logits, faster than eager, verl
    FusedLinearForPPO and TRL ChunkedLogProbFunction, within 1.15x of torch's
    NLL-only linear_cross_entropy, all in one run (one results file)."""
    def check(rows):
        case = _pick(rows, "lm_head", "fwd_bwd", shape, dtype)
        by = {r["provider"]: r for r in case}
        ours = by.get("rlhf_kernels")
        if ours is None:
            return None
        ms = ours["median_ms"]
        peers = {k: r["median_ms"] for k, r in by.items() if k != "rlhf_kernels"}
        lce = next((v for k, v in peers.items() if "linear_cross_entropy" in k), None)
        beaten = [k for k, v in peers.items() if "linear_cross_entropy" not in k and v <= ms]
        mem = ours.get("peak_mem_over_input")
        ok = (mem is not None and mem <= 0.10 and not beaten and (lce is None or ms <= 1.15 * lce))
        isa = f", {ours['cpu_isa']}" if ours.get("cpu_isa") else ""  # bf16 GEMM speed depends on it
        when = f"commit {ours.get('git_commit')}, {str(ours.get('date', ''))[:10]}{isa}"  # the code it measured
        detail = (f"{ms / 1e3:.2f} s ({when}), extra peak {_fmt(mem)}x the logits; "
                  + ", ".join(f"{k} {v / ms:.2f}x ours" for k, v in sorted(peers.items())))
        return ok, detail
    return check


def _lm_head_gemm_goal(shape, dtype, frac):
    """Goal 13 on a GPU: the fused head's forward + backward (logp + entropy)
    at >= frac of the bf16 GEMM rate measured in the same run, counting the
    three GEMMs a fused head needs (bench_lm_head's frac_gemm_peak); the
    scalar loss's figure (ppo_loss_fwd_bwd) is shown beside it."""
    def check(rows):
        best = lambda mode: _best([r for r in _pick(rows, "lm_head", mode, shape, dtype, is_ours)  # noqa: E731
                                   if r.get("frac_gemm_peak") is not None])
        ours, loss = best("fwd_bwd"), best("ppo_loss_fwd_bwd")
        if ours is None:
            return None
        detail = f"{ours['frac_gemm_peak']:.0%} of {ours['gemm_tflops']:.0f} TFLOP/s ({ours['median_ms']:.1f} ms)"
        if loss is not None:
            detail += f"; scalar loss {loss['frac_gemm_peak']:.0%} ({loss['provider']})"
        return ours["frac_gemm_peak"] >= frac, detail
    return check


def _trainer_update_goal(speedup: float, memory: float):
    """bench_trainer --model qwen (V = 151936): the update phase of the
    kernels against backend=eager (older results files name it backend=reference),
    time and the phase's extra peak."""
    def check(rows):
        pick = lambda name: _best(_pick(rows, "ppo_trainer", "update", ("qwen",), "model",  # noqa: E731
                                        lambda p, n=name: p == f"backend={n}"))
        ref, ours = pick("eager") or pick("reference"), pick("kernels")
        if ref is None or ours is None or "phase_extra_peak_mb" not in ours:
            return None
        fast = ref["median_ms"] / ours["median_ms"]
        lean = ref["phase_extra_peak_mb"] / max(ours["phase_extra_peak_mb"], 1e-9)
        return (fast >= speedup and lean >= memory,
                f"{fast:.1f}x faster, {lean:.1f}x less extra peak ({ours['phase_extra_peak_mb']:.0f} MiB vs "
                f"{ref['phase_extra_peak_mb']:.0f} MiB)")
    return check


def _rollout_goal(speedup: float):
    """bench_rollout: the vLLM engine's tokens/s over HF generate's, same run."""
    def check(rows):
        pick = lambda name: _best(_pick(rows, "rollout", "generate", (64, 64), "float32",  # noqa: E731
                                        lambda p, n=name: p == n))
        hf, vllm = pick("hf generate"), pick("vllm")
        if hf is None or vllm is None:
            return None
        ratio = vllm["tokens_per_s"] / hf["tokens_per_s"]
        detail = (f"{ratio:.2f}x ({vllm['tokens_per_s']:.0f} vs {hf['tokens_per_s']:.0f} tokens/s, "
                  f"engine start {vllm['engine_start_s']:.0f} s)")
        if vllm.get("bound_tokens_per_s"):  # bench_rollout.decode_bound: a large GEMM's rate / FLOP per token
            detail += (f"; the decode's compute bound here {vllm['bound_tokens_per_s']:.0f} tokens/s "
                       f"({vllm['gemm_gflops']:.0f} GFLOP/s, a 2048^3 float32 GEMM): {speedup:g}x HF would need "
                       f"{speedup * hf['tokens_per_s']:.0f}")
        return ratio >= speedup, detail
    return check


def _e2e_goal(ours: str, theirs: str, speedup: float):
    """bench_e2e: one GRPO iteration of ``theirs`` over ``ours``, same run."""
    def check(rows):
        pick = lambda name: _best([r for r in rows if r["op"] == "grpo_iteration"  # noqa: E731
                                   and r["provider"] == name and r.get("median_ms") is not None])
        a, b = pick(ours), pick(theirs)
        if a is None:
            return None
        if b is None:
            failed = [r for r in rows if r["op"] == "grpo_iteration" and r["provider"] == theirs and r.get("error")]
            return (False, f"{theirs} failed here: {failed[-1]['error']}") if failed else None
        ratio = b["median_ms"] / a["median_ms"]
        return ratio >= speedup, (f"{ratio:.2f}x ({a['median_ms'] / 1e3:.2f} s vs {b['median_ms'] / 1e3:.2f} s "
                                  "per iteration)")
    return check


def _vocab_parallel_goal(ratio: float):
    """bench_vocab_parallel: the per-rank extra peak of 2 ranks over one
    process's, and the collectives of the ranks' forward."""
    def check(rows):
        pick = lambda ranks: _best([r for r in rows if r["op"] == "vocab_parallel_lm_head"  # noqa: E731
                                    and r.get("ranks") == ranks and tuple(r["shape"]) == (1024, 512, 151936)])
        one, two = pick(1), pick(2)
        if one is None or two is None or not one.get("peak_mem_bytes"):
            return None
        frac = two["peak_mem_bytes"] / one["peak_mem_bytes"]
        forward = two.get("collectives_forward", {})
        ok = frac <= ratio and sum(forward.values()) == 1
        return ok, (f"{frac:.2f}x ({two['peak_mem_bytes'] / 2**20:.0f} MiB vs {one['peak_mem_bytes'] / 2**20:.0f} "
                    f"MiB); forward collectives {forward}, backward {two.get('collectives_backward')}")
    return check


def _truncation_goal(ratio: float):
    """bench_truncation: each truncation option's time over the plain op's,
    measured round-robin in one run (the latest run of each shape)."""
    def check(rows):
        rows = [r for r in rows if r["op"] == "truncated_logprobs" and r.get("vs_plain") is not None]
        if not rows:
            return None
        latest = {}
        for r in rows:
            key = (r["base_op"], tuple(r["shape"]))
            latest[key] = max(latest.get(key, ""), r.get("date", ""))
        options = [r for r in rows if r.get("date", "") == latest[(r["base_op"], tuple(r["shape"]))]
                   and not r["provider"].startswith(("plain", "truncation_threshold"))]
        worst = max(options, key=lambda r: r["vs_plain"])
        runs = sorted({f"commit {r.get('git_commit')}, {str(r.get('date', ''))[:10]}" for r in options})
        return worst["vs_plain"] <= ratio, f"({'; '.join(runs)}) " + "; ".join(
            f"{r['base_op']} {'x'.join(map(str, r['shape']))} {r['provider']}: {r['vs_plain']:.2f}x" for r in options)
    return check


def _lora_goal(ratio: float):
    """bench_lora: the LoRA run's extra peak over the full-weight run's (with
    its reference), hidden 256, same run."""
    def check(rows):
        pick = lambda lora: _best([r for r in rows if r["op"] == "ppo_lora_memory"  # noqa: E731
                                   and r.get("lora_r") == lora and tuple(r["shape"]) == (256, 151936)])
        full, lora = pick(0), pick(16)
        if full is None or lora is None or not full.get("peak_mem_bytes"):
            return None
        frac = lora["peak_mem_bytes"] / full["peak_mem_bytes"]
        return frac <= ratio, (f"{frac:.2f}x ({lora['peak_mem_bytes'] / 2**20:.0f} MiB vs "
                               f"{full['peak_mem_bytes'] / 2**20:.0f} MiB)")
    return check


OVERHEAD = "overhead:"  # bench_overhead's rows: op = "overhead:<op>"
LOGITS_GPU = (8192, 152064)
GOALS = [
    Goal(2, "logprobs fwd logp+entropy, N=8192 V=152064 bf16, >= 85% of copy bandwidth", True,
         _bandwidth_goal("logprobs", "fwd_logp_entropy", LOGITS_GPU, "bfloat16", 0.85)),
    Goal(2, "logprobs fwd+bwd, N=8192 V=152064 bf16, <= 2 ms", True,
         _time_goal("logprobs", "fwd_bwd", LOGITS_GPU, "bfloat16", 2.0)),
    Goal(2, "logprobs fwd+bwd in-place, extra peak memory < 5% of the logits", True,
         _memory_goal("logprobs", "fwd_bwd", LOGITS_GPU, "bfloat16", 0.05, lambda p: is_ours(p) and "inplace" in p)),
    Goal(2, "logprobs fwd logp+entropy >= 8x faster than eager", True,
         _speedup_goal("logprobs", "fwd_logp_entropy", LOGITS_GPU, "bfloat16", 8.0)),
    Goal(2, "logprobs N=4096 V=32000 float32: >= 2x eager log_softmax+gather", False,
         _speedup_goal("logprobs", "fwd_logp", (4096, 32000), "float32", 2.0)),
    Goal(2, "logprobs N=4096 V=32000 float32: peak memory <= 1.1x the logits (forward)", False,
         _memory_goal("logprobs", "fwd_logp_entropy", (4096, 32000), "float32", 0.1)),
    Goal(3, "ppo_advantages B=512 T=2048 float32 incl. whitening: <= 50 us and >= 500x the Python loop", True,
         _all_of(_time_goal("ppo_advantages", "forward", (512, 2048), "float32", 0.05),
                 _speedup_goal("ppo_advantages", "forward", (512, 2048), "float32", 500.0))),
    Goal(3, "ppo_advantages B=64 T=1024: >= 50x the Python loop", False,
         _speedup_goal("ppo_advantages", "forward", (64, 1024), "float32", 50.0)),
    Goal(4, "ppo_loss_from_logits N=8192 V=152064 bf16 fwd+bwd: <= 2 ms", True,
         _time_goal("ppo_loss_from_logits", "fwd+bwd", (1, 8192, 152064), "bfloat16", 2.0)),
    Goal(4, "ppo_loss_from_logits >= 1.5x faster than Liger's fused GRPO loss", True,
         lambda rows: (lambda ours, liger: None if ours is None or liger is None else
                       (liger["median_ms"] / ours["median_ms"] >= 1.5,
                        f"{liger['median_ms'] / ours['median_ms']:.2f}x"))(
             _best(_pick(rows, "ppo_loss_from_logits", "fwd+bwd", (1, 8192, 152064), "bfloat16", is_ours)),
             _best(_pick(rows, "ppo_loss_from_logits", "fwd+bwd", (1, 8192, 152064), "bfloat16",
                         lambda p: "liger" in p.lower())))),
    Goal(4, "ppo_policy_loss and ppo_value_loss, 1M tokens fwd+bwd: <= 50 us each", True,
         _all_of(_time_goal("ppo_policy_loss", "fwd+bwd", (1024, 1024), "float32", 0.05),
                 _time_goal("ppo_value_loss", "fwd+bwd", (1024, 1024), "float32", 0.05))),
    Goal(4, "ppo_policy_loss and ppo_value_loss, 1M tokens fwd+bwd: >= 3x eager", False,
         _all_of(_speedup_goal("ppo_policy_loss", "fwd+bwd", (1024, 1024), "float32", 3.0),
                 _speedup_goal("ppo_value_loss", "fwd+bwd", (1024, 1024), "float32", 3.0))),
    Goal(30, "each policy objective (loss_type clip, cispo, sapo, gpg, dppo_tv, dppo_kl, dro, geo_mean, luspo, "
             "vespo), 1M tokens fwd+bwd: >= 5x verl's own function of that name, TRL's lines for luspo / vespo "
             "(bench_ppo_loss --ops objectives, round-robin)", False,
         _objectives_goal(5.0)),
    Goal(7, "every op ahead of every installed peer on each standard shape", True, _ahead_of_peers),
    Goal(7, "memory-bound ops within 15% of the memory-bandwidth limit", True, _near_bandwidth),
    Goal(13, "fused LM head N=1024 H=512 V=151936 float32 logp+entropy fwd+bwd: extra peak <= 0.10x the logits, "
             "faster than eager / verl / TRL, <= 1.15x torch linear_cross_entropy (NLL only)", False,
         _lm_head_goal((1024, 512, 151936), "float32")),
    Goal(13, "fused LM head, the same at N=1024 H=512 bf16", False, _lm_head_goal((1024, 512, 151936), "bfloat16")),
    Goal(13, "fused LM head, the same at N=4096 H=896 bf16 (the Qwen2.5-0.5B head)", False,
         _lm_head_goal((4096, 896, 151936), "bfloat16")),
    Goal(13, "fused LM head N=8192 H=4096 V=152064 bf16 logp+entropy fwd+bwd: >= 60% of the bf16 GEMM rate "
             "(three GEMMs' FLOP over the time, against one measured hidden @ weight.T)", True,
         _lm_head_gemm_goal((8192, 4096, 152064), "bfloat16", 0.6)),
    Goal(12, "every op at 8 x 16 tokens costs no more than its eager composition (ours / eager <= 1.0)", False,
         _overhead_at_most_eager),
    Goal(15, "trainer update phase at V=151936 (bench_trainer --model qwen): >= 3x faster and >= 10x less extra "
             "peak memory than backend=eager", False, _trainer_update_goal(3.0, 10.0)),
    Goal(29, "vocabulary-parallel LM head N=1024 H=512 V=151936 float32 on 2 gloo ranks (bench_vocab_parallel): "
             "per-rank extra peak <= 0.6x one process's, one collective per forward", False,
         _vocab_parallel_goal(0.6)),
    Goal(29, "truncated sampling (bench_truncation): each option's forward + backward (top_k=50, top_p=0.9, "
             "min_p=0.05, all three, a given min_logit; the fused head with min_logit) <= 1.3x the plain op, "
             "measured round-robin in one run", False, _truncation_goal(1.3)),
    Goal(31, "PPO with LoRA r=16 on the Qwen2 test checkpoint (bf16, V=151936, hidden 256; bench_lora): extra peak "
             "of the trainer's set-up, rollout and update <= 0.6x the full-weight run with its reference", False,
         _lora_goal(0.6)),
    Goal(28, "rollouts, Qwen2.5-0.5B shape, 64 prompts x 64 new tokens float32 (bench_rollout): the vLLM engine "
             ">= 4x HF generate's tokens/s", False, _rollout_goal(4.0)),
    Goal(28, "one GRPO iteration (bench_e2e), both on HF generate: ours >= 1.5x faster than TRL's GRPOTrainer",
         False, _e2e_goal("rlhf_kernels (hf generate)", "trl (hf generate)", 1.5)),
    Goal(28, "one GRPO iteration (bench_e2e), both on vLLM: ours >= 1.5x faster than TRL's (colocate)", False,
         _e2e_goal("rlhf_kernels (vllm)", "trl (vllm colocate)", 1.5)),
    Goal(28, "one GRPO iteration (bench_e2e): ours on vLLM >= 4x faster than TRL on HF generate", False,
         _e2e_goal("rlhf_kernels (vllm)", "trl (hf generate)", 4.0)),
]


def goal_status(goal: Goal, rows: list[dict]) -> tuple[str, str]:
    devices = sorted({r["device"] for r in rows if (is_h100_class(r["device"]) if goal.gpu else not is_gpu(r["device"]))})
    verdicts = []
    for device in devices:
        result = goal.check([r for r in rows if r["device"] == device])
        if result is not None:
            verdicts.append((device, *result))
    if not verdicts:
        return "not measured", "no results for this case on " + ("an H100-class GPU" if goal.gpu else "a CPU")
    met = [v[0] for v in verdicts if v[1]]
    status = ("met" if len(met) == len(verdicts) else "not met" if not met else
              f"met on {', '.join(met)}; not met on {', '.join(v[0] for v in verdicts if not v[1])}")
    return status, "; ".join(f"{d}: {detail}" for d, _, detail in verdicts)


# --- rendering ---------------------------------------------------------------------------------


def _fmt(v, spec=".3f"):
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _mib(b):
    return "-" if b is None else f"{b / 2**20:.1f} MiB"


# Datasheet HBM peaks (not measured here): what the byte counts of the GPU goals
# allow at best. Measured copy bandwidth is typically 85-92% of these.
PEAK_TBPS = {"H100 SXM (HBM3)": 3.35, "H200 (HBM3e)": 4.8}
LOGITS_BYTES = 8192 * 152064 * 2  # N = 8192, V = 152064, bf16
BOUNDS = [
    ("logprobs forward, logp + entropy (one read)", 1 * LOGITS_BYTES, 0.9),
    ("logprobs forward + backward (read; read + write)", 3 * LOGITS_BYTES, 2.0),
    ("ppo_loss_from_logits forward + backward, gradient in the forward (read + write; "
     "the row's second read from L2)", 2 * LOGITS_BYTES, 2.0),
    ("ppo_loss_from_logits with inplace_backward (read; read + write)", 3 * LOGITS_BYTES, 2.0),
]


def render_bounds() -> list[str]:
    out = ["## Bandwidth bounds of the GPU goals", "",
           "Minimal HBM traffic of each goal's case divided by the datasheet peak bandwidth: no kernel can "
           "beat these. A goal below its bound cannot be met by that data flow on that device.", "",
           "| case | bytes | goal | " + " | ".join(f"bound on {k}" for k in PEAK_TBPS) + " |",
           "| --- | ---: | ---: | " + " | ".join("---:" for _ in PEAK_TBPS) + " |"]
    for name, nbytes, goal_ms in BOUNDS:
        cells = []
        for tbps in PEAK_TBPS.values():
            ms = nbytes / (tbps * 1e12) * 1e3
            cells.append(f"{ms:.2f} ms" + (" (goal out of reach)" if ms > goal_ms else ""))
        out.append(f"| {name} | {nbytes / 1e9:.2f} GB | {goal_ms:g} ms | " + " | ".join(cells) + " |")
    out.append("")
    return out


def render(rows: list[dict], problems: list[str], img_names: dict[str, list[str]], source: str) -> str:
    devices = sorted({r["device"] for r in rows})
    gpus = [d for d in devices if is_gpu(d)]
    out = [
        "# Performance",
        "",
        f"Generated by `benchmarks/report.py` from `{source}/*.jsonl`; do not edit by hand "
        "(rerun the benchmarks, then `python -m benchmarks.report`).",
        "",
    ]
    if devices:
        out.append("Results exist for: " + ", ".join(
            f"**{d}** ({len([r for r in rows if r['device'] == d])} cases)" for d in devices) + ".")
    else:
        out.append("No benchmark results exist yet.")
    out.append("")
    if not gpus:
        out += ["**No GPU results exist yet.** The CUDA and Triton kernels have been compiled and tested "
                "(Triton in its CPU interpreter) but never timed on a GPU: every GPU goal below is "
                "*not measured*. `bash benchmarks/gpu_check.sh` on a GPU machine produces them.", ""]
    out += ["Speed-up: the eager baseline's median over the row's median, for the same op, mode, shape and "
            "dtype (the baseline of the same run where there is one). GB/s counts an explicit minimal number of "
            "bytes; *of copy* is that as a fraction of the same device's measured copy bandwidth. Peak memory "
            "is the extra peak above the inputs (GPU: allocator; CPU: resident set, where measured).", ""]
    out += ["## Goals", "", "| # | goal | status | measured |", "| --- | --- | --- | --- |"]
    for goal in GOALS:
        status, detail = goal_status(goal, rows)
        where = "H100-class GPU" if goal.gpu else "CPU"
        out.append(f"| #{goal.issue} | {where}: {goal.text} | **{status}** | {detail} |")
    out.append("")
    out += render_bounds()
    for device in devices:
        drows = [r for r in rows if r["device"] == device]
        first = drows[0]
        versions = ", ".join(f"{k} {first.get(k)}" for k in ("torch", "triton", "cuda") if first.get(k))
        commits = sorted({str(r.get("git_commit")) for r in drows})
        dates = sorted(str(r.get("date", "")) for r in drows)
        out += [f"## {device}", "", f"{versions}; commits {', '.join(commits)}; {dates[0][:10]} to {dates[-1][:10]}; "
                f"measured copy bandwidth {_fmt(first.get('copy_gbps'), '.1f')} GB/s.", ""]
        for name in img_names.get(device, []):
            out += [f"![{Path(name).stem}]({name})", ""]
        out += ["| op | mode | shape | dtype | provider | median ms | GB/s | of copy | peak memory | speed-up vs eager |",
                "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in drows:
            speed = "baseline" if is_eager(r["provider"]) else (f"{r['speedup']:.2f}x" if r["speedup"] else "-")
            frac = r.get("frac_copy_bw")
            out.append(
                f"| {r['op']} | {r['mode']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['provider']} | "
                f"{r['median_ms']:.3f} | {_fmt(r.get('gbps'), '.1f')} | {'-' if frac is None else f'{frac:.0%}'} | "
                f"{_mib(r.get('peak_mem_bytes'))} | {speed} |")
        out.append("")
    if problems:
        out += ["## Lines skipped", ""] + [f"- {p}" for p in problems] + [""]
    return "\n".join(out)


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def plot(rows: list[dict], img_dir: Path) -> dict[str, list[str]]:
    """PNG plots per device: logprobs time and peak memory against V, and the
    speed-up over eager of every provider per op. Returns file names per device."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[report] matplotlib not installed: no plots", file=sys.stderr)
        return {}
    img_dir.mkdir(parents=True, exist_ok=True)
    names: dict[str, list[str]] = defaultdict(list)
    for device in sorted({r["device"] for r in rows}):
        drows = [r for r in rows if r["device"] == device]
        lp = [r for r in drows if r["op"] == "logprobs" and len(r["shape"]) == 2]
        if lp:
            fig, axes = plt.subplots(1, 2, figsize=(11, 4))
            for (mode, dtype), group in _groups(lp, lambda r: (r["mode"], r["dtype"])):
                if mode not in ("fwd_logp_entropy", "fwd_bwd"):
                    continue
                for provider, prow in _groups(group, lambda r: r["provider"]):
                    prow.sort(key=lambda r: r["shape"][1])
                    vs = [r["shape"][1] for r in prow]
                    axes[0].plot(vs, [r["median_ms"] for r in prow], "o-", label=f"{provider} {mode} {dtype}")
                    mem = [(r["shape"][1], r["peak_mem_bytes"] / 2**20) for r in prow if r.get("peak_mem_bytes") is not None]
                    if mem:
                        axes[1].plot(*zip(*mem), "o-", label=f"{provider} {mode} {dtype}")
            axes[0].set(xlabel="V", ylabel="median ms", title="logprobs: time", yscale="log")
            axes[1].set(xlabel="V", ylabel="extra peak MiB", title="logprobs: peak memory")
            axes[0].legend(fontsize=6)
            fig.suptitle(device, fontsize=9)
            fig.tight_layout()
            name = f"{_slug(device)}-logprobs-vs-v.png"
            fig.savefig(img_dir / name, dpi=110)
            plt.close(fig)
            names[device].append(name)
        bars = [r for r in drows if r["speedup"] and not is_eager(r["provider"])]
        if bars:
            labels = [f"{r['op']} {r['mode']} {'x'.join(map(str, r['shape']))} {r['dtype']}\n{r['provider']}" for r in bars]
            fig, ax = plt.subplots(figsize=(9, 0.32 * len(bars) + 1.2))
            ax.barh(range(len(bars)), [r["speedup"] for r in bars],
                    color=["tab:green" if is_ours(r["provider"]) else "tab:gray" for r in bars])
            ax.set_yticks(range(len(bars)), labels, fontsize=6)
            ax.axvline(1.0, color="black", lw=0.8)
            ax.set(xscale="log", xlabel="speed-up over eager (log scale; green: rlhf_kernels)", title=device)
            ax.invert_yaxis()
            fig.tight_layout()
            name = f"{_slug(device)}-speedup.png"
            fig.savefig(img_dir / name, dpi=110)
            plt.close(fig)
            names[device].append(name)
    return dict(names)


def _groups(rows, key):
    groups = defaultdict(list)
    for r in rows:
        groups[key(r)].append(r)
    return sorted(groups.items(), key=lambda kv: str(kv[0]))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of *.jsonl result lines")
    parser.add_argument("--out", type=Path, default=DOC, help="the Markdown file to write")
    parser.add_argument("--img-dir", type=Path, default=None, help="where the PNGs go (default: img/ next to --out)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    img_dir = args.img_dir or args.out.parent / "img"
    raw, problems = load(args.results)
    rows = latest(raw)
    images = {} if args.no_plots else plot(rows, img_dir)
    images = {d: [os.path.relpath(img_dir / n, args.out.parent) for n in ns] for d, ns in images.items()}
    try:
        source = args.results.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        source = str(args.results)
    text = render(rows, problems, images, source)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"[report] {len(rows)} cases from {len(raw)} lines -> {args.out}", file=sys.stderr)
    return text


if __name__ == "__main__":
    main()

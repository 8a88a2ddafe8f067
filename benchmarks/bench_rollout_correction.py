"""Benchmark rollout_correction against the peers' eager code for the same
correction: verl 0.9.1's ``compute_rollout_correction_weights`` +
``compute_rollout_rejection_mask`` (with their metrics, as verl's trainer
calls them) and the same weights and mask written as bare torch ops (what the
correction costs without verl's ``.item()`` metrics), timed round-robin in
one process.

    python -m benchmarks.bench_rollout_correction            # 1M tokens (1024 x 1024)
    python -m benchmarks.bench_rollout_correction --quick    # tiny shapes, a smoke run

Minimal bytes: two float32 log-probs and a bool mask read, float32 weights and
a bool mask written (14 bytes per token).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.common import (
    RESULTS_DIR, Result, copy_bandwidth_gbps, environment, is_quick, print_table, progress, time_fn,
    time_interleaved, write_results,
)

import rlhf_kernels  # noqa: E402

# IcePop token weights at [0.5, 2] and two rejection rules: verl's spelling and ours.
VERL_KW = dict(rollout_is="token", rollout_is_threshold="0.5_2.0")
VERL_RS = dict(rollout_rs="token_k2,seq_mean_k3", rollout_rs_threshold="0.5,0.05")
OURS_KW = dict(level="token", mode="mask", lower=0.5, upper=2.0, rejection={"token_k2": 0.5, "seq_mean_k3": 0.05})


def _inputs(shape, device):
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(shape, generator=gen) * 3
    rollout = logp + torch.randn(shape, generator=gen) * 0.2
    mask = torch.rand(shape, generator=gen) > 0.1
    return logp.to(device), rollout.to(device), mask.to(device)


def _verl():
    try:
        from verl.trainer.ppo import rollout_corr_helper
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return rollout_corr_helper


def _bare_torch(logp, rollout, mask):
    """The same weights and kept mask as plain torch ops, no metrics."""
    lr = (logp - rollout).clamp(-20, 20)
    raw = lr.exp() * mask
    weights = torch.where((raw >= 0.5) & (raw <= 2.0), raw, 0.0)
    k2 = 0.5 * lr.square()
    k3 = raw - 1 - lr
    m = mask.float()
    seq_k3 = (k3 * m).sum(-1) / m.sum(-1).clamp_min(1)
    keep = mask & (k2 <= 0.5) & (seq_k3 <= 0.05)[:, None]
    return weights, keep


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke run)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (a shared machine times more steadily with 1)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    quick = args.quick or is_quick()
    device = torch.device(args.device)
    env = environment(device)
    copy_gbps = copy_bandwidth_gbps(device, nbytes=(1 << 22) if quick else (1 << 30))
    shape = (8, 64) if quick else (1024, 1024)
    logp, rollout, mask = _inputs(shape, device)
    providers = {"bare torch ops": lambda: _bare_torch(logp, rollout, mask)}
    verl = _verl()
    if verl is not None:
        def verl_fn():
            log_ratio = logp - rollout
            verl.compute_rollout_correction_weights(log_ratio, mask.float(), **VERL_KW)
            verl.compute_rollout_rejection_mask(log_ratio, mask.float(), **VERL_RS)
        providers["verl (with its metrics)"] = verl_fn
    backends = [b for b in rlhf_kernels.available_backends() if b != "eager"]
    backends = [b for b in backends if (b == "cpu" or (quick and b == "triton"))] if device.type == "cpu" else \
        [b for b in backends if b in ("cuda", "triton")]
    for backend in backends:
        providers[f"rlhf_kernels:{backend}"] = (lambda b: lambda: rlhf_kernels.rollout_correction(
            logp, rollout, mask, backend=b, **OURS_KW))(backend)
    progress(f"rollout_correction {shape}: {', '.join(providers)}")
    if device.type == "cpu":
        timings = time_interleaved(providers, rounds=3 if quick else 10)
    else:
        timings = {name: time_fn(fn, device) for name, fn in providers.items()}
    rows = []
    for name, timing in timings.items():
        if isinstance(timing, Exception):
            print(f"{name}: failed: {timing}")
            continue
        rows.append(Result("rollout_correction", name, "fwd", list(shape), "float32", timing, 14 * logp.numel(),
                           copy_gbps).record(env))
    base = {r["provider"]: r["median_ms"] for r in rows}
    for r in rows:
        ref = base.get("verl (with its metrics)")
        r["speedup_vs_verl"] = round(ref / r["median_ms"], 2) if ref else None
    path = write_results(rows, env, args.out_dir)
    print_table(rows)
    print(f"results appended to {path}")
    return rows


if __name__ == "__main__":
    main()

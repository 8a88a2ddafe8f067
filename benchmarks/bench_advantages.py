"""Benchmark of the fused PPO advantage ops against the Python loop of TRL/verl.

Providers, per op (``ppo_advantages``: KL + shaping + GAE + whitening;
``compute_gae``: GAE + whitening):
  - ``python_loop``: the eager baseline, ``rlhf_kernels.reference`` (a Python
    loop over time, one batch of small kernels per step, as TRL and verl do);
  - ``torch_compile_ref``: ``torch.compile`` of the same reference (the loop is
    unrolled at trace time, so compile time grows with T: only run up to
    ``--compile-max-t``; the compile time is recorded);
  - ``rlhf_kernels-<backend>``: our op per backend that runs natively on the
    device (the Triton interpreter on a CPU is not a performance backend);
  - ``verl``: ``verl.trainer.ppo.core_algos.compute_gae_advantage_return`` where
    verl is importable (compute_gae only: it has no fused shaping).

Usage: python -m benchmarks.bench_advantages [--quick] [--device cuda] [--threads N] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


from benchmarks.common import (
    RESULTS_DIR,
    Result,
    copy_bandwidth_gbps,
    environment,
    is_quick,
    peak_memory_gpu,
    print_table,
    progress,
    time_fn,
    write_results,
)

import rlhf_kernels  # noqa: E402
from rlhf_kernels import reference  # noqa: E402

GAMMA, LAM, KL_COEF = 1.0, 0.95, 0.05


def _inputs(batch: int, seq_len: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, seq_len)
    logp = -torch.rand(shape, generator=gen) * 3
    ref_logp = -torch.rand(shape, generator=gen) * 3
    values = torch.randn(shape, generator=gen)
    rewards = torch.randn(shape, generator=gen)
    scores = torch.randn(batch, generator=gen)
    # Right padding of random length plus a few holes (multi-turn tool output).
    lengths = torch.randint(seq_len // 2, seq_len + 1, (batch,), generator=gen)
    mask = (torch.arange(seq_len) < lengths[:, None]) & (torch.rand(shape, generator=gen) < 0.95)
    cast = lambda t: t.to(dtype).to(device)  # noqa: E731
    return dict(scores=cast(scores), logp=cast(logp), ref_logp=cast(ref_logp), values=cast(values),
                rewards=cast(rewards), mask=mask.to(device))


def _verl_gae():
    try:
        from verl.trainer.ppo.core_algos import compute_gae_advantage_return
    except Exception:  # noqa: BLE001 - any import failure means "not installed here"
        return None
    return compute_gae_advantage_return


def _providers(op: str, device: torch.device, compile_ok: bool):
    """(name, fn(inputs)) pairs for one op."""
    out = []
    if op == "ppo_advantages":
        def loop(x):
            return reference.ppo_advantages(x["scores"], x["logp"], x["ref_logp"], x["values"], x["mask"],
                                            kl_coef=KL_COEF, gamma=GAMMA, lam=LAM, whiten=True)

        def ours(backend):
            return lambda x: rlhf_kernels.ppo_advantages(
                x["scores"], x["logp"], x["ref_logp"], x["values"], x["mask"], kl_coef=KL_COEF,
                gamma=GAMMA, lam=LAM, whiten=True, backend=backend)
    else:
        def loop(x):
            return reference.compute_gae(x["rewards"], x["values"], x["mask"], gamma=GAMMA, lam=LAM, whiten=True)

        def ours(backend):
            return lambda x: rlhf_kernels.compute_gae(x["rewards"], x["values"], x["mask"], gamma=GAMMA,
                                                      lam=LAM, whiten=True, backend=backend)
    out.append(("python_loop", loop))
    if compile_ok:
        out.append(("torch_compile_ref", torch.compile(loop)))
    for backend in rlhf_kernels.available_backends():
        if backend == "eager":
            continue  # that is python_loop
        if device.type == "cpu" and backend != "cpu":
            continue  # the Triton interpreter is a correctness tool, not a CPU backend
        if device.type == "cuda" and backend == "cpu":
            continue
        out.append((f"rlhf_kernels-{backend}", ours(backend)))
    verl_fn = _verl_gae()
    if verl_fn is not None and op == "compute_gae":
        out.append(("verl", lambda x: verl_fn(x["rewards"], x["values"], x["mask"].to(x["values"].dtype),
                                              GAMMA, LAM)))
    return out


def _min_bytes(op: str, n_tokens: int, batch: int, elem: int) -> int:
    # Read each input once, write each output once (float32 outputs).
    if op == "ppo_advantages":
        return n_tokens * (3 * elem + 1 + 4 * 4) + batch * elem
    return n_tokens * (2 * elem + 1 + 2 * 4)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a smoke test")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the JSON lines go")
    parser.add_argument("--shapes", default=None, help="comma-separated BxT, e.g. 64x1024,16x4096")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--compile-max-t", type=int, default=128,
                        help="torch.compile of the unrolled loop only up to this T (compile time grows with T)")
    parser.add_argument("--ops", default="ppo_advantages,compute_gae")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for CPU runs (on a shared machine, 1 avoids OpenMP "
                             "barriers waiting on a descheduled thread)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    quick = args.quick or is_quick()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    elif quick:
        shapes = [(4, 8)]
    elif device.type == "cuda":
        shapes = [(512, 2048), (64, 8192)]
    else:
        shapes = [(64, 1024), (64, 128), (16, 4096)]
    max_seconds = 0.2 if quick else 2.0

    env = environment(device)
    copy_gbps = copy_bandwidth_gbps(device, nbytes=1 << 20 if quick else 1 << 30)
    rows: list[dict] = []
    for op in args.ops.split(","):
        for batch, seq_len in shapes:
            x = _inputs(batch, seq_len, dtype, device)
            n_tokens = batch * seq_len
            min_bytes = _min_bytes(op, n_tokens, batch, x["values"].element_size())
            baseline_ms = None
            for name, fn in _providers(op, device, compile_ok=seq_len <= args.compile_max_t):
                progress(f"{op} {batch}x{seq_len} {args.dtype} {name}")
                extra = {}
                if name == "torch_compile_ref":
                    start = time.perf_counter()
                    fn(x)
                    extra["compile_s"] = round(time.perf_counter() - start, 2)
                timing = time_fn(lambda: fn(x), device, max_seconds=max_seconds,
                                 min_runs=3 if name == "python_loop" else 5)
                if name == "python_loop":
                    baseline_ms = timing.median_ms
                extra["speedup_vs_loop"] = round(baseline_ms / timing.median_ms, 2) if baseline_ms else None
                peak = peak_memory_gpu(lambda: fn(x), device) if device.type == "cuda" else None
                result = Result(op=op, provider=name, mode="forward", shape=[batch, seq_len], dtype=args.dtype,
                                timing=timing, min_bytes=min_bytes, copy_gbps=copy_gbps, peak_mem_bytes=peak,
                                input_bytes=min_bytes, extra=extra)
                rows.append(result.record(env))
    path = write_results(rows, env, args.out_dir)
    print_table(rows)
    print()
    for r in rows:
        print(f"{r['op']:15s} {'x'.join(map(str, r['shape'])):10s} {r['provider']:22s} "
              f"{r['median_ms']:10.3f} ms  speed-up vs loop {r['speedup_vs_loop']}x")
    progress(f"results appended to {path}")
    return rows


if __name__ == "__main__":
    main()

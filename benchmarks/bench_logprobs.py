"""Benchmark of logprobs_from_logits against the eager way (TRL / verl), its
torch.compile, and the Liger / TRL kernels where installed.

Modes: forward logp (no grad), forward logp+entropy (no grad), forward+backward
of logp+entropy (and the in-place backward for ours). Minimal bytes: forward
reads the logits once; forward+backward reads them twice and writes the
gradient once (per-row outputs counted too).

    python -m benchmarks.bench_logprobs            # shapes of the present device
    python -m benchmarks.bench_logprobs --quick    # tiny shapes (smoke test)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable

import torch

from benchmarks import common

import rlhf_kernels  # noqa: E402
from rlhf_kernels import reference  # noqa: E402

OP = "logprobs"


# --- baselines ------------------------------------------------------------------------


def eager_logprobs(logits, labels, return_entropy=False):
    """The eager formulation of TRL / verl: float32 log_softmax then gather; the
    entropy from softmax (verl's entropy_from_logits)."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    probs = torch.softmax(logits, dim=-1)
    entropy = torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)
    return logp, entropy


def _compiled_reference():
    return torch.compile(lambda x, y, e: reference.logprobs_from_logits(x, y, return_entropy=e))


def _peer_providers() -> dict[str, Callable]:
    peers: dict[str, Callable] = {}
    try:
        from trl.trainer.utils import selective_log_softmax  # type: ignore

        peers["trl.selective_log_softmax"] = lambda x, y, e: (
            (selective_log_softmax(x, y), torch.zeros(y.shape, device=x.device)) if e else selective_log_softmax(x, y)
        )
    except Exception:  # noqa: BLE001 - any import failure means "not installed here"
        pass
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy  # type: ignore

        def liger(x, y, e):
            logp = -liger_cross_entropy(x, y, reduction="none")
            return (logp, torch.zeros_like(logp)) if e else logp

        peers["liger.cross_entropy"] = liger
    except Exception:  # noqa: BLE001
        pass
    return peers


def providers(device: torch.device) -> dict[str, Callable]:
    out: dict[str, Callable] = {
        "eager (TRL/verl)": lambda x, y, e: eager_logprobs(x, y, e),
        "torch.compile(reference)": _compiled_reference(),
    }
    for backend in rlhf_kernels.available_backends():
        if backend == "eager":
            continue
        if device.type == "cpu" and backend != "cpu":
            continue
        if device.type == "cuda" and backend == "cpu":
            continue
        out[f"rlhf_kernels[{backend}]"] = (
            lambda x, y, e, b=backend, inplace=False: rlhf_kernels.logprobs_from_logits(
                x, y, return_entropy=e, backend=b, inplace_backward=inplace
            )
        )
    if device.type == "cuda":
        out.update(_peer_providers())
    return out


# --- cases ----------------------------------------------------------------------------


def shapes(device: torch.device) -> list[tuple[int, int, torch.dtype]]:
    if common.is_quick():
        return [(64, 1000, torch.float32)]
    if device.type == "cuda":
        return [(8192, v, torch.bfloat16) for v in (32000, 128256, 152064)] + [(8192, 32000, torch.float32)]
    return [(4096, 32000, torch.float32)]


def minimal_bytes(n: int, v: int, dtype: torch.dtype, mode: str) -> int:
    elem = torch.finfo(dtype).bits // 8
    row_io = n * (8 + 4 + (4 if mode != "fwd_logp" else 0))  # labels, logp, entropy
    if mode.startswith("fwd_bwd"):
        return 3 * n * v * elem + 2 * row_io
    return n * v * elem + row_io


def run_mode(fn: Callable, mode: str, logits: torch.Tensor, labels: torch.Tensor, device: torch.device,
             inplace: bool = False):
    """Returns (Timing, peak extra bytes on GPU or None)."""
    if mode == "fwd_logp":
        def call():
            with torch.no_grad():
                fn(logits, labels, False)
        setup = None
    elif mode == "fwd_logp_entropy":
        def call():
            with torch.no_grad():
                fn(logits, labels, True)
        setup = None
    else:
        g = torch.randn(labels.shape, device=device)
        holder = {}

        def setup():
            # In-place backward consumes its logits: each call gets a fresh
            # non-leaf copy (as an lm_head output would be), made outside the
            # timed region.
            leaf = logits.detach().requires_grad_(True)
            holder["x"] = leaf * 1 if inplace else leaf

        def call():
            x = holder["x"]
            logp, ent = fn(x, labels, True)
            torch.autograd.backward([logp, ent], [g, g])

        setup()
    timing = common.time_fn(call, device, setup=setup)
    peak = None
    if device.type == "cuda":
        if setup is not None:
            setup()
        peak = common.peak_memory_gpu(call, device)
    return timing, peak


def cpu_peak_memory(provider: str, n: int, v: int, mode: str) -> int | None:
    """Extra resident memory of one call, measured in a fresh process (the
    high-water mark, reset just before the call, minus the resident size
    before it)."""
    code = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from benchmarks import bench_logprobs as b, common
dev = torch.device('cpu')
fn = b.providers(dev)[{provider!r}]
x = torch.randn({n}, {v}); y = torch.randint(0, {v}, ({n},))
x.add_(0)
import gc; gc.collect()
common.reset_peak_rss()  # the peak of the call, not of making its inputs
before = common.rss_bytes()
if {mode!r} == 'fwd_bwd':
    x.requires_grad_(True); lp, e = fn(x, y, True); torch.autograd.backward([lp, e], [torch.ones_like(lp)] * 2)
else:
    with torch.no_grad(): fn(x, y, {mode!r} != 'fwd_logp')
print(max(0, common.peak_rss_bytes() - before))
"""
    return common.int_from_subprocess(code, timeout=600)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--out-dir", default=str(common.RESULTS_DIR), help="where the JSON lines go")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory subprocesses")
    args = parser.parse_args(argv)
    if args.quick:
        os.environ["RLHF_BENCH_QUICK"] = "1"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = common.environment(device)
    copy_bw = common.copy_bandwidth_gbps(device, 1 << 26 if common.is_quick() else 1 << 30)
    common.progress(f"{env['device']}: measured copy bandwidth {copy_bw:.1f} GB/s")
    rows = []
    provs = providers(device)
    for n, v, dtype in shapes(device):
        gen = torch.Generator().manual_seed(0)
        logits = (torch.randn(n, v, generator=gen) * 2).to(dtype).to(device)
        labels = torch.randint(0, v, (n,), generator=gen).to(device)
        for mode in ("fwd_logp", "fwd_logp_entropy", "fwd_bwd"):
            for name, fn in provs.items():
                variants = [(name, False)]
                if name.startswith("rlhf_kernels") and mode == "fwd_bwd":
                    variants.append((name + " inplace", True))
                for label, inplace in variants:
                    call = (lambda x, y, e, f=fn: f(x, y, e)) if not inplace else (
                        lambda x, y, e, b=name[len("rlhf_kernels["):-1]: rlhf_kernels.logprobs_from_logits(
                            x, y, return_entropy=e, backend=b, inplace_backward=True))
                    common.progress(f"{mode} {n}x{v} {str(dtype)[6:]} {label}")
                    try:
                        timing, peak = run_mode(call, mode, logits, labels, device, inplace=inplace)
                    except Exception as exc:  # noqa: BLE001 - a failing peer must not stop the run
                        common.progress(f"  skipped: {type(exc).__name__}: {exc}")
                        continue
                    if device.type == "cpu" and not args.no_memory and not common.is_quick() and not inplace:
                        peak = cpu_peak_memory(name, n, v, "fwd_bwd" if mode == "fwd_bwd" else mode)
                    res = common.Result(
                        op=OP, provider=label, mode=mode, shape=[n, v], dtype=str(dtype).replace("torch.", ""),
                        timing=timing, min_bytes=minimal_bytes(n, v, dtype, mode), copy_gbps=copy_bw,
                        peak_mem_bytes=peak, input_bytes=logits.numel() * logits.element_size(),
                    )
                    rows.append(res.record(env))
        del logits, labels
    path = common.write_results(rows, env, Path(args.out_dir))
    common.print_table(rows)
    print(f"results appended to {path}")
    return rows


if __name__ == "__main__":
    main()

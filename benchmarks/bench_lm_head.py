"""Benchmark of the fused LM head: per-token log-prob and entropy from the
hidden state and the head's weight, forward + backward (random upstream
gradients on both outputs; gradients of hidden and weight), against:

- eager: ``hidden @ weight.T`` then the float32 log_softmax / gather and the
  softmax entropy (what TRL and verl do without a fused head);
- verl ``FusedLinearForPPO`` (torch, chunks of 512 tokens);
- TRL ``ChunkedLogProbFunction`` (outputs logp and entropy, vocabulary tiles
  of 4096), unpatched;
- torch ``F.linear_cross_entropy`` (mean NLL only: no entropy, a scalar
  loss), for reference.

Peak memory, less the bytes of the gradients a provider returns (which
every provider must produce), as a multiple of the float32 logits
(N * V * 4 bytes): on a CPU each provider once in a fresh process, the
resident high-water mark (reset just before the call) minus the resident
size before it; on a GPU the allocator's peak above what was allocated.

GEMM rate: each row records ``tflops_3gemm`` (the three GEMMs a fused head
cannot avoid, 6 N H V FLOP, over the row's time) and ``frac_gemm_peak``, that
over the rate of one plain ``hidden @ weight.T`` of the same shape and dtype
measured in the same run (cuBLAS's on a GPU: goal #13's "bf16 GEMM rate" in benchmarks/report.py).

``--loss``: the scalar PPO loss instead (clipped policy loss + entropy
bonus, token-mean, forward + backward): ``ppo_loss_from_hidden`` with its
gradient in the forward (three GEMMs), the same with ``grad_in_forward=False``
(four), and the eager logits with ``ppo_loss_from_logits`` of the reference
(mode ``ppo_loss_fwd_bwd``).

    python -m benchmarks.bench_lm_head            # goal #13's shapes (CPU; on a GPU N=8192, H=4096, V=152064 bf16)
    python -m benchmarks.bench_lm_head --quick    # tiny shapes (smoke test)
    python -m benchmarks.bench_lm_head --loss --shape 1024,512,151936,float32
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable

import torch

from benchmarks import common

import rlhf_kernels  # noqa: E402

OP = "lm_head"


def eager(hidden, weight, labels):
    logits = (hidden @ weight.t()).float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    probs = torch.softmax(logits, dim=-1)
    entropy = torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)
    return logp, entropy


def providers() -> dict[str, Callable]:
    provs: dict[str, Callable] = {
        "rlhf_kernels": lambda h, w, y: rlhf_kernels.logprobs_from_hidden(h, w, y, return_entropy=True),
        "eager": eager,
    }
    try:
        from verl.utils.experimental.torch_functional import FusedLinearForPPO  # type: ignore

        head = FusedLinearForPPO()
        provs["verl.FusedLinearForPPO"] = lambda h, w, y: head(h, w, y)
    except Exception:  # noqa: BLE001 - not installed here
        pass
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # type: ignore

        def trl_chunked(h, w, y):
            logp, entropy, *_ = ChunkedLogProbFunction.apply(h, w, None, y, 1.0, 4096, None, 1.0, ("entropy",))
            return logp, entropy

        provs["trl.ChunkedLogProbFunction"] = trl_chunked
    except Exception:  # noqa: BLE001
        pass
    if hasattr(torch.nn.functional, "linear_cross_entropy"):
        provs["torch.linear_cross_entropy (NLL only)"] = lambda h, w, y: (
            -torch.nn.functional.linear_cross_entropy(h, w, y), None)
    return provs


def _loss_inputs(labels):
    gen = torch.Generator().manual_seed(1)
    n = labels.numel()
    old = -torch.rand(n, generator=gen) * 8
    return old, torch.randn(n, generator=gen), torch.ones(n, dtype=torch.bool)


def loss_providers() -> dict[str, Callable]:
    """Scalar PPO losses (policy loss - 0.01 * entropy, token-mean) from (hidden, weight, labels)."""
    from rlhf_kernels import reference

    def ours(grad_in_forward):
        def loss(h, w, y):
            old, adv, mask = _loss_inputs(y)
            return rlhf_kernels.ppo_loss_from_hidden(h[None], w, y[None], old[None], adv[None], mask[None],
                                                     entropy_coef=0.01, grad_in_forward=grad_in_forward,
                                                     chunk_bytes=three_gemm_budget(h, w) if grad_in_forward
                                                     else None)[0]
        return loss

    def eager_loss(h, w, y):
        old, adv, mask = _loss_inputs(y)
        logits = (h @ w.t()).float()
        return reference.ppo_loss_from_logits(logits[None], y[None], old[None], adv[None], mask[None],
                                              entropy_coef=0.01)[0]

    return {"rlhf_kernels (gradient in the forward, 3 GEMMs)": ours(True),
            "rlhf_kernels (grad_in_forward=False, 4 GEMMs)": ours(False),
            "eager logits + reference ppo_loss_from_logits": eager_loss}


def three_gemm_budget(hidden, weight) -> int:
    """ppo_loss_from_hidden's default budget plus what a bf16/fp16 head's
    three-GEMM path also needs (its float32 V x H weight gradient; nothing for
    a float32 head), so that the "3 GEMMs" provider runs them."""
    from rlhf_kernels.ops import lm_head_plan as plan

    n, v = hidden.shape[0], weight.shape[0]
    itemsize, col_bytes = plan.tile_bytes(hidden, weight)
    return plan.loss_chunk_bytes(n, v, hidden.device.type, itemsize, col_bytes) + v * col_bytes


def shapes(device: torch.device) -> list[tuple[int, int, int, torch.dtype]]:
    if common.is_quick():
        return [(64, 32, 5003, torch.float32)]
    if device.type == "cuda":  # goal #13's GPU shape (benchmarks/report.py)
        return [(8192, 4096, 152064, torch.bfloat16)]
    return [(1024, 512, 151936, torch.float32), (1024, 512, 151936, torch.bfloat16),
            (4096, 896, 151936, torch.bfloat16)]


def inputs(n, h, v, dtype, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    hidden = (torch.randn(n, h, generator=gen) * 2).to(device, dtype)
    weight = (torch.randn(v, h, generator=gen) / h ** 0.5).to(device, dtype)
    labels = torch.randint(0, v, (n,), generator=gen).to(device)
    return hidden, weight, labels


def gemm_tflops(hidden, weight) -> float:
    """The measured rate of one plain hidden @ weight.T (2 N H V FLOP)."""
    out = torch.empty(hidden.shape[0], weight.shape[0], dtype=hidden.dtype, device=hidden.device)
    timing = common.time_fn(lambda: torch.mm(hidden, weight.t(), out=out), hidden.device)
    return 2 * hidden.shape[0] * hidden.shape[1] * weight.shape[0] / (timing.median_ms * 1e-3) / 1e12


def gpu_peak_memory(fn, hidden, weight, labels) -> int:
    """Allocator peak of one forward + backward above what was allocated, less the gradients returned."""
    grads = []
    peak = common.peak_memory_gpu(lambda: grads.extend(fwd_bwd(fn, hidden, weight, labels)), hidden.device)
    return max(0, peak - sum(g.numel() * g.element_size() for g in grads))


def fwd_bwd(fn, hidden, weight, labels):
    hidden = hidden.detach().requires_grad_(True)
    weight = weight.detach().requires_grad_(True)
    out = fn(hidden, weight, labels)
    logp, entropy = out if isinstance(out, tuple) else (out, None)
    outs = [o for o in (logp, entropy) if o is not None]
    grads = [torch.full_like(o, 0.5) if o.dim() else torch.ones_like(o) for o in outs]
    torch.autograd.backward(outs, grads)
    return hidden.grad, weight.grad


def cpu_peak_memory(provider: str, n: int, h: int, v: int, dtype: torch.dtype, loss: bool = False) -> int | None:
    """Extra resident bytes of one forward + backward in a fresh process, less the gradients returned."""
    code = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from benchmarks import bench_lm_head as b, common
fn = (b.loss_providers() if {loss!r} else b.providers())[{provider!r}]
hidden, weight, labels = b.inputs({n}, {h}, {v}, torch.{str(dtype)[6:]})
import gc; gc.collect()
common.reset_peak_rss()
before = common.rss_bytes()
gh, gw = b.fwd_bwd(fn, hidden, weight, labels)
grads = gh.numel() * gh.element_size() + gw.numel() * gw.element_size()
print(max(0, common.peak_rss_bytes() - before - grads))
"""
    return common.int_from_subprocess(code, timeout=1200)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--out-dir", default=str(common.RESULTS_DIR), help="where the JSON lines go")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--only", default=None, help="comma-separated provider names")
    parser.add_argument("--shape", default=None, help="N,H,V,dtype (e.g. 1024,512,151936,float32)")
    parser.add_argument("--loss", action="store_true", help="the scalar PPO loss (see the docstring)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    args = parser.parse_args(argv)
    if args.quick:
        os.environ["RLHF_BENCH_QUICK"] = "1"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    env = common.environment(device)
    copy_bw = common.copy_bandwidth_gbps(device, 1 << 26 if common.is_quick() else 1 << 30)
    provs = loss_providers() if args.loss else providers()
    mode = "ppo_loss_fwd_bwd" if args.loss else "fwd_bwd"
    if args.only:
        provs = {k: f for k, f in provs.items() if k in args.only.split(",")}
    todo = shapes(device)
    if args.shape:
        n, h, v, dt = args.shape.split(",")
        todo = [(int(n), int(h), int(v), getattr(torch, dt))]
    rows, path = [], None
    for n, h, v, dtype in todo:
        shape_rows = []
        hidden, weight, labels = inputs(n, h, v, dtype, device)
        logits_bytes = n * v * 4
        gemm = gemm_tflops(hidden, weight)
        # A warm-up and 3 calls (1 at N=4096 on a CPU) per provider,
        # round-robin (common.time_interleaved), median; all in one process,
        # so that the ratios compare like with like.
        common.progress(f"{mode} {n}x{h}x{v} {str(dtype)[6:]} on {env['device']} (one GEMM {gemm:.2f} TFLOP/s): "
                        f"{', '.join(provs)}")
        timings = common.time_interleaved(
            {name: (lambda f=fn: (fwd_bwd(f, hidden, weight, labels), sync())) for name, fn in provs.items()},
            rounds=3 if n < 4096 or device.type == "cuda" else 1)
        for name, timing in timings.items():
            if isinstance(timing, Exception):
                common.progress(f"  {name} skipped: {type(timing).__name__}: {timing}")
                continue
            peak = None
            if device.type == "cuda" and not args.no_memory:
                peak = gpu_peak_memory(provs[name], hidden, weight, labels)
            elif not args.no_memory and not common.is_quick():
                peak = cpu_peak_memory(name, n, h, v, dtype, args.loss)
            tflops = 6 * n * h * v / (timing.median_ms * 1e-3) / 1e12
            res = common.Result(
                op=OP, provider=name, mode=mode, shape=[n, h, v], dtype=str(dtype).replace("torch.", ""),
                timing=timing, min_bytes=logits_bytes, copy_gbps=copy_bw, peak_mem_bytes=peak,
                input_bytes=logits_bytes,
                extra={"extra_peak_over_logits": None if peak is None else round(peak / logits_bytes, 4),
                       "entropy": "NLL only" not in name, "gemm_tflops": round(gemm, 6),
                       "tflops_3gemm": round(tflops, 6), "frac_gemm_peak": round(tflops / gemm, 4)},
            )
            shape_rows.append(res.record(env))
            common.progress(f"  {name}: {timing.median_ms:.0f} ms, {tflops / gemm:.0%} of the GEMM rate"
                            + ("" if peak is None else f", extra peak {peak / logits_bytes:.3f}x the logits"))
        path = common.write_results(shape_rows, env, Path(args.out_dir))  # each shape as it ends
        rows += shape_rows
        del hidden, weight, labels
    common.print_table(rows)
    print(f"results appended to {path}")
    return rows


if __name__ == "__main__":
    main()

"""Truncated sampling's extra cost: ``logprobs_from_logits`` (log-prob and
entropy, forward + backward) with ``top_k`` / ``top_p`` / ``min_p`` / a given
``min_logit`` against the plain op, and ``logprobs_from_hidden`` with
``min_logit`` against the plain fused head, all timed round-robin in one
process (``common.time_interleaved``), so the ratios compare like with like.

    python -m benchmarks.bench_truncation            # 4096 x 32000 and 512 x 151936 fp32; head 1024x512x151936
    python -m benchmarks.bench_truncation --quick    # tiny shapes (smoke test)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import rlhf_kernels
from benchmarks import common
from benchmarks.bench_lm_head import inputs

OP = "truncated_logprobs"
SAMPLERS = {
    "plain": {},
    "top_k=50": dict(top_k=50),
    "top_p=0.9": dict(top_p=0.9),
    "min_p=0.05": dict(min_p=0.05),
    "top_k=50 top_p=0.9 min_p=0.05": dict(top_k=50, top_p=0.9, min_p=0.05),
}


def _fwd_bwd(fn, x):
    x.grad = None
    logp, ent = fn(x)
    (logp.sum() + ent.sum()).backward()


def logits_rows(n: int, v: int, device: torch.device, rounds: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(n, v, generator=gen) * 2).to(device).requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=gen).to(device)
    cut = rlhf_kernels.truncation_threshold(logits.detach(), top_p=0.9)
    fns = {name: (lambda kw=kw: _fwd_bwd(lambda x: rlhf_kernels.logprobs_from_logits(
        x, labels, return_entropy=True, **kw), logits)) for name, kw in SAMPLERS.items()}
    fns["min_logit (given)"] = lambda: _fwd_bwd(lambda x: rlhf_kernels.logprobs_from_logits(
        x, labels, return_entropy=True, min_logit=cut), logits)
    fns["truncation_threshold top_p=0.9 alone"] = lambda: rlhf_kernels.truncation_threshold(logits.detach(), top_p=0.9)
    common.progress(f"{OP} fwd_bwd {n}x{v} float32: {', '.join(fns)}")
    return _rows(common.time_interleaved(fns, rounds), "logprobs_from_logits", [n, v])


def hidden_rows(n: int, h: int, v: int, device: torch.device, rounds: int) -> list[dict]:
    hidden, weight, labels = inputs(n, h, v, torch.float32, device)
    with torch.no_grad():
        logits = hidden @ weight.T
        cut = rlhf_kernels.truncation_threshold(logits, top_p=0.9)
        above = torch.where(logits < cut[:, None], logits, -torch.inf).amax(-1)
        cut = torch.where(torch.isfinite(above), (cut + above) / 2, cut)  # midway: another GEMM rounds otherwise
    del logits
    hidden.requires_grad_(True)

    def run(kw):
        hidden.grad = None
        logp, ent = rlhf_kernels.logprobs_from_hidden(hidden, weight, labels, return_entropy=True, **kw)
        (logp.sum() + ent.sum()).backward()

    fns = {"plain (fused head)": lambda: run({}), "min_logit (fused head)": lambda: run(dict(min_logit=cut))}
    common.progress(f"{OP} fwd_bwd hidden {n}x{h}x{v} float32: {', '.join(fns)}")
    return _rows(common.time_interleaved(fns, rounds), "logprobs_from_hidden", [n, h, v])


def _rows(timings: dict, base_op: str, shape: list[int]) -> list[dict]:
    rows = []
    plain = next(iter(timings.values()))
    for name, t in timings.items():
        if isinstance(t, Exception):
            common.progress(f"  {name} skipped: {type(t).__name__}: {t}")
            continue
        rows.append(dict(op=OP, base_op=base_op, provider=name, mode="fwd_bwd", shape=shape, dtype="float32",
                         median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                         vs_plain=round(t.median_ms / plain.median_ms, 3)))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--device", default="cpu", help="cpu")
    args = parser.parse_args(argv)
    quick = args.quick or common.is_quick()
    device = torch.device(args.device)
    env = common.environment(device)
    rounds = 2 if quick else 5
    rows = []
    for n, v in ([(64, 1000)] if quick else [(4096, 32000), (512, 151936)]):
        rows += logits_rows(n, v, device, rounds)
    rows += hidden_rows(*((64, 32, 1000) if quick else (1024, 512, 151936)), device, rounds)
    rows = [dict(env, **r) for r in rows]
    path = common.write_results(rows, env, args.out_dir)
    for r in rows:
        print(f"{r['base_op']:22s} {str(r['shape']):20s} {r['provider']:38s} {r['median_ms']:9.1f} ms  "
              f"{r['vs_plain']:.2f}x plain")
    print(f"results appended to {path}")
    return rows


if __name__ == "__main__":
    main()

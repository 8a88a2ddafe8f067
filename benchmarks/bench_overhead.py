"""Host overhead: the per-call time of every op at tiny shapes, against the
eager composition it replaces (``rlhf_kernels.reference``, the way TRL / verl
compute the same quantities), in one process.

    python -m benchmarks.bench_overhead               # 8 x 16 tokens, V = 128, 1 thread
    python -m benchmarks.bench_overhead --threads 2 --tokens 8x16 --vocab 128

At 8 x 16 tokens the work is a few microseconds: what is timed is the Python
argument checks, the dispatcher, autograd and the allocations of each call.
Forward is timed without a gradient (a rollout's call), forward+backward with
inputs that require one and ``.backward()`` on the result. Each figure is the
median over repeats of the mean per call in a loop of calls, ours and eager
alternating within each repeat; ``ratio`` is ours / eager (goal: <= 1.0). One JSON line per (op, mode, provider) under
benchmarks/results/ (or --out-dir); a table on stdout.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

import rlhf_kernels
from rlhf_kernels import reference

from benchmarks.common import RESULTS_DIR, environment, progress, write_results

POLICY_KW = dict(clip_low=0.2, clip_high=0.28, agg="token-mean")
LOGITS_KW = dict(temperature=0.9, clip_low=0.2, clip_high=0.28, kl_coef=0.04, kl_estimator="k3",
                 entropy_coef=0.01)


def per_call_us(fns: dict[str, Callable[[], object]], calls: int, repeats: int,
                device: torch.device) -> dict[str, float]:
    """Per provider, the median over `repeats` of the mean time of one call in
    a loop of `calls` (on a GPU, until the last call's work is done). The
    providers' loops alternate within each repeat (round-robin, as
    benchmarks/common.py times), so a slow spell of a shared machine falls on
    each alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns.values():
        for _ in range(max(10, calls // 10)):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            samples[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def _inputs(batch: int, seq: int, vocab: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(batch, seq, generator=gen) * 3
    return {name: t.to(device) for name, t in dict(
        logits=torch.randn(batch, seq, vocab, generator=gen),
        labels=torch.randint(0, vocab, (batch, seq), generator=gen),
        logp=logp,
        old=logp + torch.randn(batch, seq, generator=gen) * 0.1,
        ref=logp + torch.randn(batch, seq, generator=gen) * 0.1,
        adv=torch.randn(batch, seq, generator=gen),
        values=torch.randn(batch, seq, generator=gen),
        returns=torch.randn(batch, seq, generator=gen),
        rewards=torch.randn(batch, seq, generator=gen) * 0.1,
        scores=torch.randn(batch, generator=gen),
        mask=torch.rand(batch, seq, generator=gen) > 0.1,
    ).items()}


def cases(x: dict) -> list[tuple[str, str, Callable, Callable]]:
    """(op, mode, ours, eager): each a no-argument call."""
    def leaf(t):
        return t.clone().requires_grad_(True)

    rk = rlhf_kernels
    lg, lb, lp, old, ref, adv, mask = x["logits"], x["labels"], x["logp"], x["old"], x["ref"], x["adv"], x["mask"]
    v, ret, rew, scores = x["values"], x["returns"], x["rewards"], x["scores"]
    lg_leaf, lp_leaf, v_leaf = leaf(lg), leaf(lp), leaf(v)
    out = []

    def both(op, ours_fwd, eager_fwd, ours_bwd=None, eager_bwd=None):
        def no_grad(fn):
            def run():
                with torch.no_grad():
                    fn()
            return run
        out.append((op, "forward", no_grad(ours_fwd), no_grad(eager_fwd)))
        if ours_bwd is not None:
            out.append((op, "forward+backward", ours_bwd, eager_bwd))

    both("logprobs_from_logits",
         lambda: rk.logprobs_from_logits(lg, lb), lambda: reference.logprobs_from_logits(lg, lb),
         lambda: rk.logprobs_from_logits(lg_leaf, lb).sum().backward(),
         lambda: reference.logprobs_from_logits(lg_leaf, lb).sum().backward())
    # TRL's selective_log_softmax as written (no ignore_index, NaN or label checks): the bare minimum.
    both("logprobs_from_logits(vs log_softmax+gather)",
         lambda: rk.logprobs_from_logits(lg, lb), lambda: torch.log_softmax(lg, -1).gather(-1, lb[..., None]),
         lambda: rk.logprobs_from_logits(lg_leaf, lb).sum().backward(),
         lambda: torch.log_softmax(lg_leaf, -1).gather(-1, lb[..., None]).sum().backward())
    both("logprobs_from_logits+entropy",
         lambda: rk.logprobs_from_logits(lg, lb, return_entropy=True),
         lambda: reference.logprobs_from_logits(lg, lb, return_entropy=True),
         lambda: sum(t.sum() for t in rk.logprobs_from_logits(lg_leaf, lb, return_entropy=True)).backward(),
         lambda: sum(t.sum() for t in reference.logprobs_from_logits(lg_leaf, lb, return_entropy=True)).backward())
    both("kl_penalty(k3)",
         lambda: rk.kl_penalty(lp, ref, estimator="k3"), lambda: reference.kl_penalty(lp, ref, "k3"),
         lambda: rk.kl_penalty(lp_leaf, ref, estimator="k3").sum().backward(),
         lambda: reference.kl_penalty(lp_leaf, ref, "k3").sum().backward())
    both("ppo_policy_loss",
         lambda: rk.ppo_policy_loss(lp, old, adv, mask, **POLICY_KW),
         lambda: reference.ppo_policy_loss(lp, old, adv, mask, **POLICY_KW),
         lambda: rk.ppo_policy_loss(lp_leaf, old, adv, mask, **POLICY_KW)[0].backward(),
         lambda: reference.ppo_policy_loss(lp_leaf, old, adv, mask, **POLICY_KW)[0].backward())
    both("ppo_value_loss",
         lambda: rk.ppo_value_loss(v, old, ret, mask, clip=0.2),
         lambda: reference.ppo_value_loss(v, old, ret, mask, clip=0.2),
         lambda: rk.ppo_value_loss(v_leaf, old, ret, mask, clip=0.2)[0].backward(),
         lambda: reference.ppo_value_loss(v_leaf, old, ret, mask, clip=0.2)[0].backward())
    both("ppo_loss_from_logits",
         lambda: rk.ppo_loss_from_logits(lg, lb, old, adv, mask, ref_logp=ref, **LOGITS_KW),
         lambda: reference.ppo_loss_from_logits(lg, lb, old, adv, mask, ref_logp=ref, **LOGITS_KW),
         lambda: rk.ppo_loss_from_logits(lg_leaf, lb, old, adv, mask, ref_logp=ref, **LOGITS_KW)[0].backward(),
         lambda: reference.ppo_loss_from_logits(lg_leaf, lb, old, adv, mask, ref_logp=ref, **LOGITS_KW)[0].backward())
    both("compute_gae",
         lambda: rk.compute_gae(rew, v, mask, gamma=1.0, lam=0.95),
         lambda: reference.compute_gae(rew, v, mask, gamma=1.0, lam=0.95))
    both("ppo_advantages",
         lambda: rk.ppo_advantages(scores, lp, ref, v, mask, kl_coef=0.05, estimator="k3"),
         lambda: reference.ppo_advantages(scores, lp, ref, v, mask, kl_coef=0.05, estimator="k3"))
    both("group_advantages",
         lambda: rk.group_advantages(scores, group_size=4), lambda: reference.group_advantages(scores, group_size=4))
    return out


def run(tokens: tuple[int, int], vocab: int, calls: int, repeats: int, device: torch.device,
        only: str | None = None) -> list[dict]:
    env = environment(device)
    rows = []
    for op, mode, ours, eager in cases(_inputs(tokens[0], tokens[1], vocab, device)):
        if only and only not in op:
            continue
        progress(f"{op} {mode}")
        times = per_call_us({"rlhf_kernels": ours, "eager": eager}, calls, repeats, device)
        for provider, us in times.items():
            row = dict(env, op=f"overhead:{op}", mode=mode, provider=provider, shape=[*tokens, vocab],
                       dtype="float32", per_call_us=round(us, 2), median_ms=us / 1e3, threads=torch.get_num_threads())
            if provider == "rlhf_kernels":
                row["ratio_vs_eager"] = round(us / times["eager"], 3)
            rows.append(row)
    return rows


def print_rows(rows: list[dict]) -> None:
    ours = [r for r in rows if r["provider"] == "rlhf_kernels"]
    eager = {(r["op"], r["mode"]): r["per_call_us"] for r in rows if r["provider"] == "eager"}
    print(f"{'op':44s} {'mode':17s} {'ours us':>9s} {'eager us':>9s} {'ratio':>6s}")
    for r in ours:
        print(f"{r['op'][len('overhead:'):]:44s} {r['mode']:17s} {r['per_call_us']:9.1f} {eager[(r['op'], r['mode'])]:9.1f} "
              f"{r['ratio_vs_eager']:6.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="8x16", help="B x T")
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--only", default=None, help="only ops whose name contains this")
    p.add_argument("--quick", action="store_true", help="a smoke run: few calls")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    batch, seq = (int(s) for s in args.tokens.lower().split("x"))
    calls, repeats = (5, 2) if args.quick else (args.calls, args.repeats)
    rows = run((batch, seq), args.vocab, calls, repeats, torch.device(args.device), args.only)
    print_rows(rows)
    if not args.no_write and not args.quick:
        print(f"results appended to {write_results(rows, rows[0], Path(args.out_dir))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

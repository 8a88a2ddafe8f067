"""The vocabulary-parallel fused LM head: ``logprobs_from_hidden`` (log-prob
and entropy, forward + backward, random upstream gradients) with the whole
head in one process, against the head split over 2 gloo ranks
(``vocab_parallel_group``, each rank V / 2 rows; the same hidden state and
labels on both), on the CPU.

Per provider, in fresh processes: the extra resident peak of one forward +
backward above the resident size before it, less the gradients returned
(hidden's and the rank's head rows'), and the median time of 3 forward +
backward after a warm-up; the ranks' rows also count the collectives of one
forward and one backward. 1 process runs with the machine's threads, each of
the 2 ranks with half of them.

    python -m benchmarks.bench_vocab_parallel            # N=1024, H=512, V=151936 float32
    python -m benchmarks.bench_vocab_parallel --quick    # a tiny head (smoke test)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks import common

OP = "vocab_parallel_lm_head"
ROOT = str(Path(__file__).resolve().parent.parent)

WORKER = """
import json, os, statistics, sys, time
sys.path.insert(0, {root!r})
import torch
from benchmarks import common
from benchmarks.bench_lm_head import inputs
import rlhf_kernels

world, n, h, v = {world}, {n}, {h}, {v}
rank = int(os.environ.get("RANK", 0))
torch.set_num_threads(max(1, {threads} // world))
group = None
calls = {{"all_gather": 0, "all_reduce": 0}}
if world > 1:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method="file://{init}", rank=rank, world_size=world)
    group = dist.group.WORLD
    for name in calls:
        original = getattr(dist, name)
        def counted(*a, _n=name, _o=original, **k):
            calls[_n] += 1
            return _o(*a, **k)
        setattr(dist, name, counted)
hidden, weight, labels = inputs(n, h, v, torch.float32)
rows = v // world
shard = weight[rank * rows:(rank + 1) * rows if rank < world - 1 else v].contiguous()
del weight
gen = torch.Generator().manual_seed(1)
g_logp, g_entropy = torch.randn(n, generator=gen), torch.randn(n, generator=gen)

def step():
    hid, w = hidden.detach().requires_grad_(), shard.detach().requires_grad_()
    logp, entropy = rlhf_kernels.logprobs_from_hidden(hid, w, labels, return_entropy=True,
                                                      vocab_parallel_group=group)
    forward = dict(calls)
    torch.autograd.backward([logp, entropy], [g_logp, g_entropy])
    return hid.grad, w.grad, forward

import gc; gc.collect()
common.reset_peak_rss()
before = common.rss_bytes()
for k in calls: calls[k] = 0
gh, gw, forward = step()
peak = max(0, common.peak_rss_bytes() - before - gh.numel() * gh.element_size() - gw.numel() * gw.element_size())
backward = {{k: calls[k] - forward[k] for k in calls}}
times = []
for _ in range(4):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
if rank == 0:
    print(json.dumps(dict(peak=peak, times=times[1:], forward=forward, backward=backward)))
if world > 1:
    dist.barrier()  # no rank tears the group down while another is still in it
    dist.destroy_process_group()
    # The group's last reference dropped while the interpreter is alive: its destructor joins
    # gloo's threads, one of which may still be releasing the barrier's work (a Python object
    # inside); left to interpreter exit, that release aborts the process (std::terminate from
    # the thread's GIL acquire, 2 of 25 runs; pytorch/pytorch#179291).
    del group
"""


def run(world: int, n: int, h: int, v: int, threads: int) -> dict:
    """One provider in fresh processes: rank 0's figures."""
    with tempfile.TemporaryDirectory() as tmp:
        code = WORKER.format(root=ROOT, world=world, n=n, h=h, v=v, threads=threads, init=os.path.join(tmp, "init"))
        return common.json_from_processes(code, ranks=world)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny head (smoke test)")
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--device", default="cpu", help="cpu (gloo ranks)")
    args = parser.parse_args(argv)
    quick = args.quick or common.is_quick()
    n, h, v = (64, 32, 1000) if quick else (1024, 512, 151936)
    threads = torch.get_num_threads()
    env = common.environment(torch.device("cpu"))
    rows = []
    for world, provider in ((1, "1 process, whole head"), (2, "2 gloo ranks, V/2 each (per rank)")):
        common.progress(f"{OP} {n}x{h}x{v}: {provider}")
        res = run(world, n, h, v, threads)
        row = dict(env, op=OP, provider=provider, mode="fwd_bwd", shape=[n, h, v], dtype="float32",
                   median_ms=statistics.median(res["times"]) * 1e3, times_s=res["times"],
                   peak_mem_bytes=res["peak"], ranks=world, threads_per_rank=max(1, threads // world))
        if world > 1:
            row.update(collectives_forward=res["forward"], collectives_backward=res["backward"])
        rows.append(row)
    base = rows[0]["peak_mem_bytes"]
    for r in rows:
        r["extra_peak_vs_one_process"] = round(r["peak_mem_bytes"] / base, 3) if base else None
    path = common.write_results(rows, env, args.out_dir)
    common.print_table(rows)
    print(f"results appended to {path}")
    return rows


if __name__ == "__main__":
    main()

"""Generation on an FSDP2-sharded policy: the parameters gathered once for the
whole ``generate()`` (``rlhf_kernels.trainer.fsdp.gathered``, what the trainer
does) against FSDP2's default, an all-gather of every layer at every decoding
step. Run under torchrun (gloo on CPU, NCCL on GPU):

    torchrun --nproc_per_node 2 -m benchmarks.bench_fsdp_generate [--new-tokens 32] [--out-dir DIR]

A Qwen2-shaped policy built from a config (vocabulary 151936, random weights;
hidden 128 and 2 layers on the CPU, the 0.5B shape on a GPU), batch 4, EOS
outside the vocabulary so every step runs; median of 3 after a warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks import common


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS_DIR)
    args = parser.parse_args(argv)
    from transformers import GenerationConfig

    from benchmarks.bench_trainer import _qwen
    from rlhf_kernels.trainer import fsdp
    from rlhf_kernels.trainer.utils import init_distributed

    cuda = torch.cuda.is_available()
    rank, world = init_distributed("cuda" if cuda else "cpu", always=True)
    device = torch.device("cuda") if cuda else torch.device("cpu")
    shape = (896, 24, 14, 2, 4864) if cuda else (128, 2, 4, 2, 256)
    policy, _, _ = _qwen(151936, *shape)
    policy = fsdp.shard(policy.float().to(device))
    policy.generation_config = GenerationConfig(do_sample=True, max_new_tokens=args.new_tokens, top_k=0, top_p=1.0,
                                                pad_token_id=0, eos_token_id=151936)
    ids = torch.randint(2, 151936, (4, 16), device=device)

    def run(gather: bool) -> float:
        times = []
        for _ in range(4):
            torch.manual_seed(rank)
            start = time.perf_counter()
            with torch.no_grad(), fsdp.gathered(policy) if gather else contextlib.nullcontext():
                policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids))
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:]) * 1e3

    per_step, once = run(False), run(True)
    if rank == 0:
        env = common.environment(device)
        rows = [dict(env, op="fsdp_generate", provider=name, mode="generate", shape=[4, 16, args.new_tokens],
                     dtype="float32", median_ms=ms, world_size=world)
                for name, ms in (("all-gather per step", per_step), ("gathered once", once))]
        print(f"generate {args.new_tokens} tokens, batch 4, {world} ranks: all-gather per step {per_step:.0f} ms, "
              f"gathered once {once:.0f} ms ({per_step / once:.2f}x)")
        print(f"results: {common.write_results(rows, env, args.out_dir)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

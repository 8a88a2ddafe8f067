"""Time per PPO phase (rollout, scoring, advantages, update) and peak memory
of the trainer with `backend="reference"` (every op eager PyTorch) against the
kernels.

CPU: the tiny default model of `rlhf-kernels train`. GPU: a Qwen2-0.5B-shaped
model built from a config (vocabulary 151936, random weights), batch 32,
response length 512 (EOS suppressed so every response is full length).

    python -m benchmarks.bench_trainer [--quick] [--device cuda]
Each backend runs in a fresh process so that peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import common

OP = "ppo_trainer"
PHASES = ("rollout", "scoring", "advantages", "update")


def _build(device: str, quick: bool):
    from rlhf_kernels.trainer.config import PPOConfig
    from rlhf_kernels.trainer.models import ScalarHeadModel, tiny_llama
    from rlhf_kernels.trainer.task import DigitTask, build_tokenizer

    if device == "cuda" and not quick:
        from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
        from tokenizers import Tokenizer, models

        vocab = 151936
        cfg = Qwen2Config(vocab_size=vocab, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=2048,
                          tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2)
        torch.manual_seed(0)
        policy = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
        tok = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0")),
            pad_token="t0", eos_token="t1", bos_token="t2", padding_side="left")
        words = [f"t{i}" for i in range(3, vocab)]

        def prompts(n, rng):
            return [" ".join(rng.choice(words) for _ in range(64)) for _ in range(n)]

        def reward_fn(p, r, s):
            return torch.tensor([len(x) % 7 / 7.0 for x in r])

        ppo = PPOConfig(rollout_batch_size=32, mini_batch_size=8, grad_accum_steps=2, ppo_epochs=1,
                        max_new_tokens=512, eval_prompts=0)
        value = ScalarHeadModel.from_causal_lm(policy).to(torch.bfloat16)
        return policy, value, tok, ppo, prompts, reward_fn, 512
    task = DigitTask()
    tok = build_tokenizer()
    policy = tiny_llama(len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id)
    ppo = PPOConfig(rollout_batch_size=16 if quick else 64, mini_batch_size=8 if quick else 32)
    value = ScalarHeadModel.from_causal_lm(policy)
    return (policy, value, tok, ppo, lambda n, rng: [task.prompt_text(d) for d in task.sample_digits(n, rng)],
            task.true_scores, None)


def run_one(backend: str | None, device: str, iterations: int, quick: bool) -> dict:
    """Runs in its own process: a warm-up iteration, then `iterations` timed ones."""
    import copy

    from rlhf_kernels.trainer.ppo import PPOTrainer

    policy, value, tok, ppo, prompts, reward_fn, min_new = _build(device, quick)
    trainer = PPOTrainer(policy, copy.deepcopy(policy), value, tok, ppo, prompt_sampler=prompts,
                         reward_fn=reward_fn, device=device, backend=backend)
    if min_new:  # full-length responses for a fixed workload
        trainer.policy.generation_config.min_new_tokens = min_new
    trainer.step()  # warm-up (allocator, kernels, compile caches)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_rss = common.peak_rss_bytes() if device == "cpu" else None
    per_phase: dict[str, list[float]] = {p: [] for p in PHASES}
    for _ in range(iterations):
        metrics = trainer.step()
        for p in PHASES:
            per_phase[p].append(metrics[f"timing/{p}_s"] * 1e3)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else common.peak_rss_bytes()
    return {"phases_ms": {p: statistics.median(v) for p, v in per_phase.items()}, "peak_mem_bytes": peak,
            "base_rss_bytes": base_rss}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or common.is_quick()
    iterations = args.iterations or (1 if quick else 5 if device == "cpu" else 3)
    if args.child is not None:
        print(json.dumps(run_one(None if args.child == "kernels" else args.child, device, iterations, quick)))
        return []
    env = common.environment(torch.device(device))
    rows = []
    results = {}
    for name in ("reference", "kernels"):
        common.progress(f"trainer {name} on {device}")
        cmd = [sys.executable, "-m", "benchmarks.bench_trainer", "--child", name, "--device", device, "--iterations", str(iterations)]
        if quick:
            cmd.append("--quick")
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=3000, cwd=common.REPO_ROOT,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"))
        if out.returncode != 0:
            raise RuntimeError(f"bench_trainer child {name} failed:\n{out.stderr[-3000:]}")
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        for phase, ms in results[name]["phases_ms"].items():
            row = dict(env, op=OP, provider=f"backend={name}", mode=phase, shape=[], dtype="model",
                       median_ms=ms, peak_mem_bytes=results[name]["peak_mem_bytes"])
            rows.append(row)
    ref, ker = results["reference"], results["kernels"]
    for phase in PHASES:
        print(f"{phase:>10}: reference {ref['phases_ms'][phase]:9.2f} ms   kernels {ker['phases_ms'][phase]:9.2f} ms"
              f"   speed-up {ref['phases_ms'][phase] / max(ker['phases_ms'][phase], 1e-9):5.2f}x")
    print(f"peak memory: reference {ref['peak_mem_bytes'] / 2**20:.0f} MiB, kernels {ker['peak_mem_bytes'] / 2**20:.0f} MiB"
          + (" (process high-water mark)" if device == "cpu" else " (torch.cuda.max_memory_allocated)"))
    path = common.write_results(rows, env, Path(args.out_dir))
    print(f"results appended to {path}")
    return rows


if __name__ == "__main__":
    main()

"""Time per PPO phase (rollout, scoring, advantages, update) and peak memory
of the trainer with `backend="eager"` (every op plain PyTorch) against the
kernels.

CPU: the tiny default model of `rlhf-kernels train`, or (``--model qwen``) a
Qwen2-shaped model with the real vocabulary (151936 rows, hidden 128, 2 layers,
batch 16 in one micro-batch, 64-token responses). GPU: the Qwen2-0.5B shape (random weights),
batch 32, 512-token responses. The Qwen models' EOS id is outside the
vocabulary, so every response is full length.

    python -m benchmarks.bench_trainer [--quick] [--device cuda] [--model tiny|qwen]
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


def _qwen(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int):
    """A Qwen2-shaped policy (random weights, bf16) and a word-level tokenizer
    whose EOS id is the vocabulary size: no row of the model's head, so no
    response stops early (a fixed workload; generate() samples from the
    policy as the trainer asks, with no min-length processor)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=vocab, bos_token_id=None)
    torch.manual_seed(0)
    policy = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    policy.generation_config.eos_token_id = vocab
    words = {f"t{i}": i for i in range(vocab + 1)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="t1")),
                                  pad_token="t0", eos_token=f"t{vocab}", padding_side="left")
    return policy, tok, [f"t{i}" for i in range(2, vocab)]


def _build(device: str, quick: bool, model: str):
    from rlhf_kernels.trainer.config import PPOConfig
    from rlhf_kernels.trainer.models import ScalarHeadModel, tiny_llama
    from rlhf_kernels.trainer.task import DigitTask, build_tokenizer

    if model == "qwen":
        vocab = 151936
        if device == "cuda" and not quick:  # Qwen2-0.5B's shape
            policy, tok, words = _qwen(vocab, 896, 24, 14, 2, 4864)
            batch, mini, accum, prompt_len, new = 32, 8, 2, 64, 512
        else:  # the CPU shape: the 152k-row head dominates; 1024 response tokens per update pass
            policy, tok, words = _qwen(vocab, 128, 2, 4, 2, 256)
            batch, mini, accum, prompt_len, new = (8, 4, 2, 8, 8) if quick else (16, 16, 1, 16, 64)

        def prompts(n, rng):
            return [" ".join(rng.choice(words) for _ in range(prompt_len)) for _ in range(n)]

        def reward_fn(p, r, s):
            return torch.tensor([len(x) % 7 / 7.0 for x in r])

        ppo = PPOConfig(rollout_batch_size=batch, mini_batch_size=mini, grad_accum_steps=accum, ppo_epochs=1,
                        max_new_tokens=new)
        return policy, ScalarHeadModel.from_causal_lm(policy), tok, ppo, prompts, reward_fn
    task = DigitTask()
    tok = build_tokenizer()
    policy = tiny_llama(len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id)
    ppo = PPOConfig(rollout_batch_size=16 if quick else 64, mini_batch_size=8 if quick else 32)
    value = ScalarHeadModel.from_causal_lm(policy)
    return (policy, value, tok, ppo, lambda n, rng: [task.prompt_text(d) for d in task.sample_digits(n, rng)],
            task.true_scores)


def run_one(backend: str | None, device: str, iterations: int, quick: bool, model: str) -> dict:
    """Runs in its own process: a warm-up iteration, then `iterations` timed
    ones; per phase the median time and the largest extra peak memory (the
    trainer's memory/<phase>_peak_mb: allocator on GPU, resident set on CPU)."""
    import copy

    from rlhf_kernels.trainer.ppo import PPOTrainer

    policy, value, tok, ppo, prompts, reward_fn = _build(device, quick, model)
    trainer = PPOTrainer(policy, copy.deepcopy(policy), value, tok, ppo, prompt_sampler=prompts,
                         reward_fn=reward_fn, device=device, backend=backend)
    trainer.step()  # warm-up (allocator, kernels, compile caches)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    per_phase: dict[str, list[float]] = {p: [] for p in PHASES}
    extra_mb: dict[str, float] = {p: 0.0 for p in PHASES}
    lengths = []
    for _ in range(iterations):
        metrics = trainer.step()
        lengths.append(metrics["response_length"])
        for p in PHASES:
            per_phase[p].append(metrics[f"timing/{p}_s"] * 1e3)
            extra_mb[p] = max(extra_mb[p], metrics.get(f"memory/{p}_peak_mb", 0.0))
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else common.peak_rss_bytes()
    return {"phases_ms": {p: statistics.median(v) for p, v in per_phase.items()}, "peak_mem_bytes": peak,
            "phase_extra_peak_mb": extra_mb, "response_length": statistics.mean(lengths)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--model", default=None, choices=("tiny", "qwen"),
                        help="tiny: the main job's model (CPU default); qwen: a Qwen2-shaped model, vocabulary "
                             "151936 (GPU default: the 0.5B shape; CPU: hidden 128, 2 layers)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or common.is_quick()
    iterations = args.iterations or (1 if quick else 5 if device == "cpu" else 3)
    model = args.model or ("qwen" if device == "cuda" else "tiny")
    if args.child is not None:
        print(json.dumps(run_one(None if args.child == "kernels" else args.child, device, iterations, quick, model)))
        return []
    env = common.environment(torch.device(device))
    rows = []
    results = {}
    for name in ("eager", "kernels"):
        common.progress(f"trainer {name} on {device}")
        cmd = [sys.executable, "-m", "benchmarks.bench_trainer", "--child", name, "--device", device,
               "--iterations", str(iterations), "--model", model]
        if quick:
            cmd.append("--quick")
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=3000, cwd=common.REPO_ROOT,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"))
        if out.returncode != 0:
            raise RuntimeError(f"bench_trainer child {name} failed:\n{out.stderr[-3000:]}")
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        for phase, ms in results[name]["phases_ms"].items():
            row = dict(env, op=OP, provider=f"backend={name}", mode=phase, shape=[model], dtype="model",
                       median_ms=ms, peak_mem_bytes=results[name]["peak_mem_bytes"],
                       phase_extra_peak_mb=results[name]["phase_extra_peak_mb"][phase],
                       response_length=results[name]["response_length"])
            rows.append(row)
    ref, ker = results["eager"], results["kernels"]
    for phase in PHASES:
        rm, km = ref["phase_extra_peak_mb"][phase], ker["phase_extra_peak_mb"][phase]
        print(f"{phase:>10}: eager {ref['phases_ms'][phase]:9.2f} ms   kernels {ker['phases_ms'][phase]:9.2f} ms"
              f"   speed-up {ref['phases_ms'][phase] / max(ker['phases_ms'][phase], 1e-9):5.2f}x"
              f"   extra peak {rm:8.1f} MiB vs {km:8.1f} MiB ({rm / max(km, 1e-9):5.1f}x less)")
    print(f"peak memory: eager {ref['peak_mem_bytes'] / 2**20:.0f} MiB, kernels {ker['peak_mem_bytes'] / 2**20:.0f} MiB"
          + (" (process high-water mark)" if device == "cpu" else " (torch.cuda.max_memory_allocated)"))
    path = common.write_results(rows, env, Path(args.out_dir))
    print(f"results appended to {path}")
    return rows


if __name__ == "__main__":
    main()

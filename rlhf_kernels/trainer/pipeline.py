"""`rlhf-kernels train`: the InstructGPT recipe end to end on the embedded
synthetic task (or on local models): SFT -> reward model -> PPO, then the
true task score of the SFT and PPO policies on held-out prompts."""

from __future__ import annotations

import contextlib
import copy
import json
import random
import sys
import tempfile
from pathlib import Path

import torch

from .._dispatch import BACKENDS, DEPRECATED_BACKENDS
from .config import ConfigError, TrainConfig, to_dict, validate_ppo
from .data import check_tokenizer
from .models import ScalarHeadModel, load_causal_lm, lora_critic, tiny_llama, with_lora
from .ppo import PPOTrainer
from .reward import RewardTrainer
from .sft import SFTTrainer
from .task import DigitTask, build_tokenizer
from . import fsdp
from .trackers import Trackers, parse_report_to
from .utils import (
    MetricsLogger, StopRequested, closing_own_group, init_distributed, progress_bar, save_checkpoint, seed_everything,
)

EVAL_SEED = 987654321


def _log(msg: str, rank: int = 0) -> None:
    if rank == 0:
        print(f"[train] {msg}", flush=True)


def _tokenizer_and_policy(cfg: TrainConfig):
    if cfg.model is None:
        tokenizer = build_tokenizer()
        mc = cfg.model_config
        policy = tiny_llama(len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, hidden_size=mc.hidden_size,
                            num_layers=mc.num_layers, num_heads=mc.num_heads, seed=mc.seed)
        return tokenizer, policy
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model, local_files_only=True)
    tokenizer.padding_side = "left"
    check_tokenizer(tokenizer)
    return tokenizer, load_causal_lm(cfg.model)


def check_config(cfg: TrainConfig, world_size: int) -> None:
    """Everything that can be checked before any training starts."""
    for name in ("model", "reward_model"):
        path = getattr(cfg, name)
        if path is not None and not Path(path).is_dir():
            raise ConfigError(f"--{name.replace('_', '-')}: {path} is not a directory")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device}: no CUDA GPU is visible")
    if cfg.backend is not None:
        if cfg.backend not in BACKENDS and cfg.backend not in DEPRECATED_BACKENDS:
            raise ConfigError(f"--backend: unknown {cfg.backend!r}; expected one of {BACKENDS}")
    validate_ppo(cfg.ppo, world_size)
    for name in ("sft", "reward"):
        if getattr(cfg, name).steps < 0:
            raise ConfigError(f"{name}.steps must be >= 0")
    if cfg.ppo.eval_prompts < 1:
        raise ConfigError(f"ppo.eval_prompts: {cfg.ppo.eval_prompts}; the pipeline's result is the held-out "
                          "score of the SFT and PPO policies, which needs at least 1 prompt")
    if cfg.ppo.eval_prompts > 10 ** cfg.task.num_digits // 2:
        raise ConfigError(f"ppo.eval_prompts: {cfg.ppo.eval_prompts} held-out prompts leave too few of the task's "
                          f"{10 ** cfg.task.num_digits} for training (at most half)")
    if cfg.reward.responses_per_prompt < 2:
        raise ConfigError("reward.responses_per_prompt must be >= 2 (rankings need pairs)")


class HeldOut:
    """The evaluation prompts, and a training prompt stream that never draws them."""

    def __init__(self, task: DigitTask, n: int):
        self.task = task
        self.prompts = [task.prompt_text(d) for d in task.sample_digits(n, random.Random(EVAL_SEED))]
        self._held = set(self.prompts)

    def sample_train(self, n: int, rng: random.Random) -> list[str]:
        out = []
        while len(out) < n:
            p = self.task.prompt_text(self.task.sample_digits(1, rng)[0])
            if p not in self._held:
                out.append(p)
        return out


def run(cfg: TrainConfig, *, resume: bool = False, verbose: bool = True) -> dict:
    """Runs the pipeline; returns the summary (also written to <out>/summary.json).
    Returns early, with a checkpoint written, when SIGINT / SIGTERM arrives.
    Under torchrun every stage is data-parallel with ``cfg.ppo.strategy``
    (ddp, or fsdp: FSDP2, a one-process group when not launched by torchrun)."""
    with closing_own_group():
        return _run(cfg, resume, verbose)


def _unsharded(model: torch.nn.Module, build) -> torch.nn.Module:
    """The trained model as a plain module on every rank: itself, or under
    FSDP a fresh ``build()`` holding its gathered full state."""
    if not fsdp.is_sharded(model):
        return model
    fresh = build()
    fresh.load_state_dict(fsdp.full_state_dict(model, every_rank=True))
    return fresh


def _rollout_engine(cfg: TrainConfig, policy: torch.nn.Module, world: int, cleanup: contextlib.ExitStack):
    """The PPO stage's vLLM engine (``ppo.rollout_engine="vllm"``), built
    before any training from the initial policy saved in a temporary folder,
    so that a missing vLLM or a model the engine refuses stops the run before
    SFT; PPOTrainer gives it the PPO policy's weights before the first
    rollout. None for the HF sampler."""
    if cfg.ppo.rollout_engine != "vllm":
        return None
    if world > 1:
        raise ConfigError("ppo.rollout_engine vllm: one process only (the engine runs beside the trainer in its "
                          "process; several ranks would each start one on the same device)")
    from .rollout_engine import VLLMEngine

    folder = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="rlhf-kernels-engine-"))
    policy.save_pretrained(folder)
    try:
        engine = VLLMEngine(folder, gpu_memory_utilization=cfg.ppo.vllm_gpu_memory_utilization, seed=cfg.ppo.seed)
    except ConfigError as exc:
        hint = " (the embedded model: model_config.hidden_size / model_config.num_heads)" if cfg.model is None else ""
        raise ConfigError(f"ppo.rollout_engine vllm: {exc}{hint}") from None
    except RuntimeError as exc:  # vLLM missing or broken
        raise ConfigError(f"ppo.rollout_engine vllm: {exc}") from None
    cleanup.callback(engine.close)
    return engine


def _run(cfg: TrainConfig, resume: bool, verbose: bool) -> dict:
    strategy = cfg.ppo.strategy
    rank, world = init_distributed(cfg.device, always=strategy == "fsdp")
    check_config(cfg, world)
    out = Path(cfg.out)
    main_process = rank == 0
    verbose = verbose and main_process
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    seed_everything(cfg.model_config.seed)
    task = DigitTask(cfg.task.num_digits, cfg.task.demo_accuracy)
    held_out = HeldOut(task, cfg.ppo.eval_prompts)
    tokenizer, policy = _tokenizer_and_policy(cfg)
    device = cfg.device

    report_to = parse_report_to(cfg.report_to)  # a bad name stops the run before any stage

    def stage_logger(stage: str, **kwargs) -> MetricsLogger:
        """The stage's metrics.jsonl and its trackers (closed at the stage's end,
        or when the run ends otherwise)."""
        trackers = Trackers(report_to, out / stage, {"train": to_dict(cfg)}, main_process)
        cleanup.callback(trackers.close)
        return MetricsLogger(out / stage / "metrics.jsonl", main_process, trackers=trackers, **kwargs)

    stop = StopRequested(device)
    with stop.installed(), contextlib.ExitStack() as cleanup:
        engine = _rollout_engine(cfg, policy, world, cleanup)
        # 1. Supervised fine-tuning (data-parallel: each rank its own examples).
        parallel = dict(rank=rank, world_size=world, strategy=strategy)
        sft_path = out / "sft" / "policy.pt"
        if resume and sft_path.exists():
            policy.load_state_dict(torch.load(sft_path, map_location="cpu"))
            _log(f"SFT: loaded {sft_path}", rank)
        else:
            _log(f"SFT: {cfg.sft.steps} steps on {world} rank(s) ({strategy})", rank)
            logger = stage_logger("sft")
            sft = SFTTrainer(policy, tokenizer, cfg.sft, device=device, backend=cfg.backend, verbose=verbose,
                             logger=logger, should_stop=stop.agreed, **parallel)
            sft.train(task.sft_example)
            logger.trackers.close()  # one tracker run per stage (W&B keeps one run active)
            if stop.agreed():  # on every rank (a collective)
                return _interrupted(out, "SFT", rank)
            state = fsdp.export_state_dict(sft.model)  # a collective under FSDP
            if main_process:
                save_checkpoint(sft_path, state)
            policy = _unsharded(policy, lambda: _tokenizer_and_policy(cfg)[1])
        policy.to("cpu")

        # 2. Reward model on ranked comparisons, started from the SFT model.
        rm_path = out / "reward" / "model.pt"
        trunk_source = load_causal_lm(cfg.reward_model) if cfg.reward_model else policy
        reward_model = ScalarHeadModel.from_causal_lm(trunk_source)
        if resume and rm_path.exists():
            reward_model.load_state_dict(torch.load(rm_path, map_location="cpu"))
            _log(f"reward model: loaded {rm_path}", rank)
        else:
            _log(f"reward model: {cfg.reward.steps} steps, {cfg.reward.responses_per_prompt} ranked responses per prompt", rank)
            logger = stage_logger("reward")
            rm = RewardTrainer(reward_model, tokenizer, cfg.reward, device=device, verbose=verbose, logger=logger,
                               should_stop=stop.agreed, **parallel)
            rm.train(task.ranked_example)
            logger.trackers.close()
            if stop.agreed():  # on every rank (a collective)
                return _interrupted(out, "reward model", rank)
            state = fsdp.export_state_dict(rm.model)
            if main_process:
                save_checkpoint(rm_path, state)
            reward_model = _unsharded(reward_model, lambda: ScalarHeadModel.from_causal_lm(trunk_source))
        reward_model.to("cpu")

        # 3. PPO against the reward model, KL-penalised towards the SFT policy;
        #    the critic starts from the reward model (InstructGPT).
        value_model = copy.deepcopy(reward_model)
        if cfg.ppo.lora_r:  # adapters on the policy (its reference: the adapters off) and the critic's trunk
            lora = (cfg.ppo.lora_r, cfg.ppo.lora_alpha, cfg.ppo.lora_dropout, cfg.ppo.lora_target_modules)
            policy, value_model, ref_policy = with_lora(policy, *lora), lora_critic(value_model, *lora), None
        else:
            ref_policy = copy.deepcopy(policy)
        ptx_sampler = (lambda n, rng: [task.sft_example(rng) for _ in range(n)]) if cfg.ppo.ptx_coef > 0 else None
        trainer = PPOTrainer(policy, ref_policy, value_model, tokenizer, cfg.ppo, prompt_sampler=held_out.sample_train,
                             reward_model=reward_model, ptx_sampler=ptx_sampler, device=device,
                             backend=cfg.backend, rank=rank, world_size=world, rollout_engine=engine)
        true_score = task.true_scores
        sft_eval = _evaluate_reference(trainer, held_out, true_score)
        # DDP: one file; FSDP: a torch.distributed.checkpoint directory of shards.
        ckpt_path = out / "ppo" / ("checkpoint" if strategy == "fsdp" else "checkpoint.pt")
        metrics = stage_logger("ppo", resume=resume)
        if resume and (ckpt_path / "trainer.pt" if strategy == "fsdp" else ckpt_path).exists():
            trainer.load(ckpt_path)
            _truncate_metrics(metrics, trainer.iteration)
            _log(f"PPO: resumed from {ckpt_path} at iteration {trainer.iteration} on {world} rank(s)", rank)
        _log(f"PPO: {cfg.ppo.iterations} iterations of {cfg.ppo.rollout_batch_size * world} rollouts ({strategy})",
             rank)
        bar = progress_bar(cfg.ppo.iterations, "ppo", verbose, initial=trainer.iteration)
        while trainer.iteration < cfg.ppo.iterations:
            record = trainer.step()
            metrics.log(record)
            bar.update()
            bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.3f}",
                            clip=f"{record.get('clipfrac', 0.0):.2f}")
            done = trainer.iteration == cfg.ppo.iterations
            stop_now = stop.agreed()  # every rank stops at this step, or none
            if stop_now or done or trainer.iteration % cfg.ppo.checkpoint_every == 0:
                trainer.save(ckpt_path, {"config": to_dict(cfg)})  # on every rank (a collective)
            if stop_now:
                bar.close()
                return _interrupted(out, f"PPO at iteration {trainer.iteration}", rank)
        bar.close()
        ppo_eval = trainer.evaluate(held_out.prompts, true_score)  # the engine samples it too

    summary = {
        "sft_true_score": sft_eval["true_score"],
        "ppo_true_score": ppo_eval["true_score"],
        "kl_to_sft": ppo_eval["kl_to_ref"],
        "held_out_prompts": len(held_out.prompts),
        "iterations": trainer.iteration,
        "world_size": world,
        "strategy": strategy,
        "backend": cfg.backend or "auto",
        "device": torch.cuda.get_device_name() if cfg.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "outputs": str(out.resolve()),
    }
    policy_state = fsdp.export_state_dict(trainer.policy)  # a collective under FSDP
    if main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        torch.save(policy_state, out / "ppo" / "policy.pt")
        plot = _plot(metrics.read(), out / "ppo" / "curves.png")
        _log(f"held-out true score: SFT policy {summary['sft_true_score']:.3f} -> "
             f"PPO policy {summary['ppo_true_score']:.3f}; KL(PPO || SFT) per response "
             f"{summary['kl_to_sft']:.3f} nats", rank)
        _log(f"outputs in {out.resolve()}: summary.json, ppo/metrics.jsonl, {ckpt_path.relative_to(out)}, "
             f"ppo/policy.pt{', ppo/curves.png' if plot else ''}", rank)
    return summary


def _evaluate_reference(trainer: PPOTrainer, held_out: HeldOut, true_score) -> dict:
    """The SFT policy's held-out score: the reference model is the SFT policy."""
    with trainer.reference_as_policy():
        return trainer.evaluate(held_out.prompts, true_score)


def _truncate_metrics(metrics: MetricsLogger, iteration: int) -> None:
    """Drop metric lines written after the checkpoint we resume from."""
    if not metrics.enabled:
        return
    rows = [r for r in metrics.read() if r.get("iteration", -1) < iteration]
    metrics.path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _interrupted(out: Path, where: str, rank: int) -> dict:
    _log(f"interrupted during {where}; resume with --resume --out {out}", rank)
    return {"interrupted": True, "where": where, "outputs": str(out.resolve())}


def _plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[train] matplotlib is not installed: no curves.png", file=sys.stderr)
        return False
    keys = [k for k in ("reward", "kl", "kl_coef", "policy_loss", "value_loss", "clipfrac", "entropy",
                        "response_length", "tokens_per_s", "mismatch/k3", "mismatch/abs_diff_max",
                        "correction/out_of_band_frac", "correction/rejected_token_frac") if rows and k in rows[0]]
    if not keys:
        return False
    grid = -(-len(keys) // 3)
    fig, axes = plt.subplots(grid, 3, figsize=(12, 3 * grid), squeeze=False)
    steps = [r["iteration"] for r in rows]
    for ax, key in zip(axes.flat, keys):
        ax.plot(steps, [r[key] for r in rows])
        ax.set_title(key)
        ax.set_xlabel("iteration")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True

"""Configuration dataclasses of the trainers and of the `rlhf-kernels train` pipeline."""

from __future__ import annotations

import dataclasses
import math
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..ops.ppo_options import LOSS_TYPES
from ..ops.rollout_correction import from_verl_config

OFFLOADABLE = ("ref", "reward")  # PPOConfig.offload: the frozen models
LOSS_AGGREGATIONS = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# PPOConfig.loss_type: the objectives of ppo_policy_loss (ops/ppo_options.py
# LOSS_TYPES), kept with loss_agg, and TRL's GRPOConfig.loss_type names, each
# an objective with TRL's aggregation (trl/trainer/grpo_trainer.py: grpo and
# sapo per-sequence means, bnpo / dapo / cispo token means; dr_grpo's sum over
# max_completion_length is seq-mean-token-sum-norm's over the padded length).
TRL_LOSS_TYPES = {"grpo": ("clip", "seq-mean-token-mean"), "bnpo": ("clip", "token-mean"),
                  "dr_grpo": ("clip", "seq-mean-token-sum-norm"), "dapo": ("clip", "token-mean"),
                  "cispo": ("cispo", "token-mean"), "sapo": ("sapo", "seq-mean-token-mean"),
                  "luspo": ("luspo", "seq-mean-token-sum"), "vespo": ("vespo", "token-mean"),
                  "gmpo": ("geo_mean", "seq-mean-token-mean")}  # not TRL's: GMPO's mean over sequences
# PPOConfig.adv_estimator for grpo / rloo: group_advantages' modes.
ADV_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "opo", "grpo_passk", "passk")


class ConfigError(ValueError):
    """A configuration that cannot run, found at start-up."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"  # "cosine" | "linear" | "constant"
    max_grad_norm: float = 1.0


@dataclass
class SFTConfig:
    """Supervised fine-tuning: next-token loss on the response tokens only."""

    steps: int = 300
    batch_size: int = 64
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, warmup_steps=20))
    seed: int = 0
    log_every: int = 50
    # "bf16": forward and backward under bf16 autocast (strategy fsdp: FSDP2's
    # MixedPrecisionPolicy), float32 master weights either way.
    precision: str = "fp32"


@dataclass
class RewardConfig:
    """Reward model on ranked comparisons: K responses per prompt give all
    K-choose-2 pairs, loss -mean(log sigmoid(r_w - r_l))."""

    steps: int = 150
    prompts_per_batch: int = 16
    responses_per_prompt: int = 4
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=10))
    seed: int = 1
    log_every: int = 50
    # "bf16": forward and backward under bf16 autocast (strategy fsdp: FSDP2's
    # MixedPrecisionPolicy), float32 master weights either way.
    precision: str = "fp32"


@dataclass
class RolloutCorrectionConfig:
    """The sampler / trainer mismatch of the rollouts, measured and corrected
    (rlhf_kernels.rollout_correction), with the field names of verl's
    RolloutCorrectionConfig. Any field set makes the rollout keep the
    sampler's log-prob of each sampled token and log the mismatch statistics
    (mismatch/k1, mismatch/k3, mismatch/abs_diff_mean, mismatch/abs_diff_max,
    correction/*) every iteration."""

    # Importance weights of the trainer's old log-probs against the sampler's,
    # into the policy loss's token_weights: None, "token", "sequence" or
    # "geometric"; rollout_is_threshold a number (truncate: TIS) or
    # "lower_upper" (mask: IcePop).
    rollout_is: Optional[str] = None
    rollout_is_threshold: Any = 2.0
    rollout_is_batch_normalize: bool = False
    # Rejection (tokens or sequences out of the policy loss): verl's options,
    # comma separated ("token_k1", "seq_mean_k3", ...), and thresholds.
    rollout_rs: Optional[str] = None
    rollout_rs_threshold: Any = None
    # The sampler's log-probs as the old log-probs: no recompute forward of
    # the policy in the rollout (one forward pass fewer per iteration), at the
    # cost of the mismatch entering the PPO ratio itself (verl's bypass_mode).
    bypass_mode: bool = False
    # Keep the sampler's log-probs and log the statistics with no correction.
    measure: bool = False

    def enabled(self) -> bool:
        return self.measure or self.bypass_mode or self.rollout_is is not None or self.rollout_rs is not None


@dataclass
class PPOConfig:
    """PPO with a per-token KL penalty to the reference (SFT) policy, GAE and a
    separate critic; ``ptx_coef > 0`` adds InstructGPT's pretraining mix
    (PPO-ptx), off by default (0: plain PPO, as InstructGPT's "PPO" models)."""

    # "ppo" (a critic, GAE, the KL penalty in the rewards), "grpo" (group
    # sampling, group-normalised outcome advantages, no critic, a k3 KL term in
    # the loss; Shao et al., 2024) or "rloo" (group sampling, leave-one-out
    # baselines of the KL-penalised score, no critic; Ahmadian et al., 2024).
    algo: str = "ppo"
    group_size: int = 4  # grpo / rloo: responses per prompt
    # The advantage estimator (verl's algorithm.adv_estimator names): ppo's
    # "gae"; for grpo / rloo a group_advantages mode (ADV_ESTIMATORS), the
    # algo's KL placement kept (grpo: a loss term, rloo: in the score).
    # None: the algo's own ("gae", "grpo", "rloo"). Each metrics.jsonl line
    # records the one used, with the loss type.
    adv_estimator: Optional[str] = None
    iterations: int = 40
    rollout_batch_size: int = 64  # responses per iteration (per process)
    max_new_tokens: int = 8
    temperature: float = 1.0
    # The sampler's truncation (TRL's GRPOConfig names; 0 / 1.0 / 0.0: off).
    # Rollouts sample from the renormalised kept set, and the old, new and
    # reference log-probs are computed over each row's own kept set (the
    # logits path: the kept set needs the whole row, so the fused LM head is
    # off), in the engine's order (hf: top-k, top-p, min-p; vllm: min-p first).
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    ppo_epochs: int = 2
    mini_batch_size: int = 32  # sequences per optimiser step (per process)
    grad_accum_steps: int = 2  # micro-batches per mini-batch
    policy_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, schedule="constant"))
    value_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, schedule="constant"))
    clip_low: float = 0.2
    clip_high: Optional[float] = None
    dual_clip: Optional[float] = None
    value_clip: float = 0.2
    vf_coef: float = 1.0
    entropy_coef: float = 0.0
    loss_agg: str = "token-mean"
    # The policy objective: "clip" (PPO), "cispo", "sapo", "gpg", "dppo_tv",
    # "dppo_kl", "geo_mean" (ppo_policy_loss's loss_type; loss_agg kept), or a
    # TRL name or "gmpo" (TRL_LOSS_TYPES: its objective and aggregation,
    # loss_agg ignored).
    loss_type: str = "clip"
    tau_pos: float = 1.0  # sapo's temperatures (TRL's sapo_temperature_pos / _neg)
    tau_neg: float = 1.05
    # vespo's (TRL's vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg)
    vespo_params: tuple = (2.0, 3.0, 3.0, 2.0)
    dro_beta: Optional[float] = None  # dro's weight of the squared log-ratio (verl's policy_loss.dro_beta), > 0
    fused_loss: bool = True  # ppo_loss_from_logits, else logprobs_from_logits + ppo_policy_loss
    # With fused_loss: the logits gradient written into the logits in the
    # backward (no (B, T, V) gradient buffer; three passes over the logits), or
    # into a new buffer during the forward (one read and one write).
    logits_grad_inplace: bool = True
    # Log-probs and the loss straight from the last hidden state and the LM
    # head (logprobs_from_hidden / ppo_loss_from_hidden): no (B, T, V) logits in
    # any pass. Off with backend "eager", and (with a warning) for heads the
    # fused ops do not express (final-logit soft-capping).
    fused_lm_head: bool = True
    # The policy's update forward packed (TRL's padding_free): each micro-batch's
    # real tokens in one row, positions restarting per sequence, and the loss
    # over the packed response tokens (cu_seqlens); the same loss as the padded
    # batch, without the padding's compute (metric padding_free/tokens_saved_frac).
    # Needs the fused LM head and a model whose attention honours packed
    # position_ids (checked against the padded forward at the first step);
    # not under FSDP.
    padding_free: bool = False
    # LoRA adapters through PEFT (lora_r 0: the full weights are trained): on
    # the policy, whose reference log-probs come from the same model with its
    # adapters off (no second copy), its LM head frozen and shared (the fused
    # head ops unchanged); and, in the ppo command, on the critic's trunk (its
    # scalar head trained in full; the critic saved merged).
    # With the vLLM engine, the merged weights are loaded after each update.
    # TRL's peft_config / OpenRLHF's --lora_rank.
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: str = "all-linear"  # or comma-separated module names
    # Dropout during the PPO update (rollouts and evaluation never use it).
    # Off by default: the ratio is exactly 1 before the first optimiser step.
    dropout_in_update: bool = False
    # Activation checkpointing of the policy's and critic's decoder layers in
    # the update (transformers' gradient_checkpointing_enable, non-reentrant).
    gradient_checkpointing: bool = False
    # Data parallelism under torchrun: "ddp" (every rank holds every model)
    # or "fsdp" (FSDP2: parameters, gradients and optimizer state sharded
    # per decoder layer over the ranks, the frozen models' parameters too).
    strategy: str = "ddp"
    # "fp32": the trained models' float32 master weights compute in float32;
    # "bf16": their forward passes (rollout and update) run under bf16
    # autocast (strategy fsdp: FSDP2's MixedPrecisionPolicy, bf16 all-gathers
    # and compute, float32 gradient reduction), the weights, gradients and
    # optimizer state staying float32.
    precision: str = "fp32"
    # Frozen models kept in CPU memory, from "ref" (the reference policy) and
    # "reward" (the reward model): under fsdp FSDP2's CPUOffloadPolicy (their
    # shards stay in CPU memory; each layer is copied to the device for its
    # forward), under ddp the whole model is moved to the device for its passes
    # of each rollout and back.
    offload: list = field(default_factory=list)
    # Rows per no-grad pass of the rollout (old and reference log-probs,
    # values, scores); 0: the update's micro-batch size.
    forward_batch_size: int = 0
    # GRPO with one optimiser step per rollout (ppo_epochs 1, mini_batch_size
    # = rollout_batch_size, any grad_accum_steps), a fixed KL coefficient
    # (target_kl None), no dropout in the update and no rollout-correction
    # weights or mask: the old log-probs are the update's own, detached (the
    # policy has not moved since the rollout: the same values; the fused loss
    # takes old_logp=None), and the rollout's recompute forward is skipped, as
    # TRL's GRPOTrainer does at num_iterations=1. The KL and mismatch
    # statistics then come from the update's log-probs. False: always the
    # recompute.
    old_logp_from_update: bool = True
    init_kl_coef: float = 0.05
    target_kl: Optional[float] = 1.0  # None: a fixed coefficient
    kl_horizon: int = 2000
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    ptx_coef: float = 0.0
    ptx_batch_size: int = 16
    # Score shaping: score - reward_bias (InstructGPT normalises its RM so the
    # reference policy's mean score is 0: `rlhf-kernels ppo --reward-normalization
    # reference-mean` sets the bias), minus missing_eos_penalty for responses
    # cut off at max_new_tokens without an EOS.
    reward_bias: float = 0.0
    missing_eos_penalty: float = 0.0
    # Whiten the scores by their running mean and std over every iteration so
    # far (and every rank), before the missing-EOS penalty.
    reward_running_whiten: bool = False
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
    # Who samples the rollouts: "hf" (the policy's own generate()) or "vllm"
    # (a vLLM engine colocated in the process, built from the policy's
    # checkpoint, its weights replaced by the policy's after every update;
    # the sampler's log-probs are then always kept and the mismatch logged).
    rollout_engine: str = "hf"
    # vLLM: the share of the GPU's memory (on CPU: of the host's) it reserves.
    vllm_gpu_memory_utilization: float = 0.3
    seed: int = 2
    log_every: int = 1
    checkpoint_every: int = 10
    eval_prompts: int = 256


@dataclass
class ModelConfig:
    """The embedded default model: a small Llama built from a config."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    seed: int = 0


@dataclass
class TaskConfig:
    num_digits: int = 5
    demo_accuracy: float = 0.7


@dataclass
class TrainConfig:
    """The whole `rlhf-kernels train` pipeline: SFT -> reward model -> PPO."""

    out: str = "runs/default"
    device: str = "cpu"
    backend: Optional[str] = None  # None: the best per device; "eager": plain PyTorch everywhere
    model: Optional[str] = None  # local path of a causal LM; default: the embedded tiny Llama
    reward_model: Optional[str] = None  # local path of a causal LM trunk for the reward model
    # trackers of each stage (trainer/trackers.py): "tensorboard", "wandb", both
    # comma separated, or "none"; None: tensorboard when installed. Each stage
    # reports under its own folder (<out>/sft, <out>/reward, <out>/ppo).
    report_to: Optional[str] = None
    task: TaskConfig = field(default_factory=TaskConfig)
    model_config: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)


def _from_dict(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _from_dict(type(default), value, f"{where}.{name}")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def load_config(path: str | Path, cls=None):
    """A ``cls`` (default TrainConfig; the ``ppo`` command reads a PPOConfig)
    from a JSON file, nested sections as in the dataclasses; keys left out
    keep their defaults."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--config: {path} is not valid JSON: {exc}") from exc
    return _from_dict(cls or TrainConfig, data, "config")


def to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def correction_kwargs(rc: RolloutCorrectionConfig) -> dict:
    """rlhf_kernels.rollout_correction's keywords for ``rc`` (ValueError naming the field)."""
    return from_verl_config(rc.rollout_is, rc.rollout_is_threshold, rc.rollout_is_batch_normalize, rc.rollout_rs,
                            rc.rollout_rs_threshold)


def adv_estimator(cfg: PPOConfig) -> str:
    """The advantage estimator cfg runs (its algo's own when not given)."""
    return cfg.adv_estimator or {"ppo": "gae"}.get(cfg.algo, cfg.algo)


def objective(cfg: PPOConfig) -> tuple[str, str]:
    """(loss_type of ppo_policy_loss, aggregation) of cfg.loss_type."""
    return TRL_LOSS_TYPES.get(cfg.loss_type, (cfg.loss_type, cfg.loss_agg))


def truncated(cfg: PPOConfig) -> bool:
    """Whether the sampler truncates (top_k, top_p or min_p on)."""
    return cfg.top_k > 0 or cfg.top_p < 1 or cfg.min_p > 0


# PPOConfig's LoRA fields, as the commands' --lora-* flags set them.
LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")


def check_lora(r, alpha, dropout, prefix: str = "") -> None:
    """ConfigError for LoRA options out of range (``prefix``: where they were
    set, "ppo." for a PPOConfig); r 0: no adapters, nothing else checked."""
    if not isinstance(r, int) or r < 0:
        raise ConfigError(f"{prefix}lora_r: {r!r}; expected an int >= 0 (0: no adapters)")
    if r and (alpha <= 0 or not 0 <= dropout < 1):
        raise ConfigError(f"{prefix}lora_alpha must be > 0 and {prefix}lora_dropout in [0, 1)")


def validate_ppo(cfg: PPOConfig, world_size: int = 1) -> None:
    """Stop at start-up on a configuration that cannot run."""
    if cfg.rollout_batch_size <= 0 or cfg.mini_batch_size <= 0 or cfg.grad_accum_steps <= 0:
        raise ConfigError("ppo: rollout_batch_size, mini_batch_size and grad_accum_steps must be > 0")
    if cfg.rollout_batch_size % cfg.mini_batch_size:
        raise ConfigError(
            f"ppo: rollout_batch_size ({cfg.rollout_batch_size}) must be a multiple of "
            f"mini_batch_size ({cfg.mini_batch_size})"
        )
    if cfg.mini_batch_size % cfg.grad_accum_steps:
        raise ConfigError(
            f"ppo: mini_batch_size ({cfg.mini_batch_size}) must be a multiple of "
            f"grad_accum_steps ({cfg.grad_accum_steps})"
        )
    if cfg.loss_agg not in LOSS_AGGREGATIONS:
        raise ConfigError(f"ppo.loss_agg: unknown {cfg.loss_agg!r}; expected one of {LOSS_AGGREGATIONS}")
    if cfg.loss_type not in LOSS_TYPES and cfg.loss_type not in TRL_LOSS_TYPES:
        raise ConfigError(f"ppo.loss_type: unknown {cfg.loss_type!r}; expected one of {LOSS_TYPES} or TRL's "
                          f"{tuple(TRL_LOSS_TYPES)}")
    if objective(cfg)[0] in ("cispo", "sapo", "gpg") and cfg.dual_clip is not None:
        raise ConfigError(f"ppo.dual_clip: for the clip and dppo objectives, not loss_type {cfg.loss_type!r}")
    if not (cfg.tau_pos > 0 and cfg.tau_neg > 0):
        raise ConfigError("ppo: tau_pos and tau_neg must be > 0")
    if cfg.loss_type == "dro" and not (isinstance(cfg.dro_beta, (int, float)) and 0 < cfg.dro_beta < math.inf):
        raise ConfigError(f"ppo.dro_beta: loss_type 'dro' needs a finite dro_beta > 0, got {cfg.dro_beta!r}")
    if cfg.loss_type == "dro" and cfg.rollout_correction.rollout_is is not None:
        raise ConfigError("ppo.rollout_correction.rollout_is: not with loss_type 'dro' (its log-ratio penalty "
                          "is not proportional to the advantage the weights scale)")
    if not (isinstance(cfg.vespo_params, (list, tuple)) and len(cfg.vespo_params) == 4
            and all(isinstance(p, (int, float)) and math.isfinite(p) for p in cfg.vespo_params)):
        raise ConfigError("ppo: vespo_params must be four finite numbers (k_pos, lambda_pos, k_neg, lambda_neg)")
    if not (0 <= cfg.gamma <= 1 and 0 <= cfg.lam <= 1):
        raise ConfigError("ppo: gamma and lam must lie in [0, 1]")
    if cfg.temperature <= 0:
        raise ConfigError("ppo.temperature must be > 0")
    if cfg.top_k < 0:
        raise ConfigError("ppo.top_k must be >= 0 (0: off)")
    if not 0 < cfg.top_p <= 1:
        raise ConfigError("ppo.top_p must be in (0, 1] (1: off)")
    if not 0 <= cfg.min_p <= 1:
        raise ConfigError("ppo.min_p must be in [0, 1] (0: off)")
    if cfg.padding_free and truncated(cfg):
        raise ConfigError("ppo.padding_free: not with top_k / top_p / min_p (the truncated log-probs run on the "
                          "logits path)")
    if cfg.max_new_tokens <= 0 or cfg.iterations < 0:
        raise ConfigError("ppo: max_new_tokens must be > 0 and iterations >= 0")
    if world_size < 1:
        raise ConfigError("world size must be >= 1")
    if cfg.strategy not in ("ddp", "fsdp"):
        raise ConfigError(f"ppo.strategy: unknown {cfg.strategy!r}; expected ddp or fsdp")
    if cfg.precision not in ("fp32", "bf16"):
        raise ConfigError(f"ppo.precision: unknown {cfg.precision!r}; expected fp32 or bf16")
    if not isinstance(cfg.offload, (list, tuple)) or any(name not in OFFLOADABLE for name in cfg.offload):
        raise ConfigError(f"ppo.offload: {cfg.offload!r}; expected a list from {OFFLOADABLE}")
    if cfg.algo not in ("ppo", "grpo", "rloo"):
        raise ConfigError(f"ppo.algo: unknown {cfg.algo!r}; expected ppo, grpo or rloo")
    if cfg.adv_estimator is not None:
        allowed = ("gae",) if cfg.algo == "ppo" else ADV_ESTIMATORS
        if cfg.adv_estimator not in allowed:
            raise ConfigError(f"ppo.adv_estimator: {cfg.adv_estimator!r} with algo {cfg.algo!r}; expected one of "
                              f"{allowed}")
    if cfg.algo != "ppo" and (cfg.group_size < 2 or cfg.rollout_batch_size % cfg.group_size):
        raise ConfigError(f"ppo.group_size: {cfg.group_size}; {cfg.algo} needs groups of >= 2 responses that "
                          f"divide rollout_batch_size ({cfg.rollout_batch_size})")
    check_lora(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, "ppo.")
    if cfg.lora_r and "ref" in cfg.offload:
        raise ConfigError("ppo.offload: ref has nothing to offload with LoRA (the reference is the policy with "
                          "its adapters off)")
    if cfg.padding_free and cfg.strategy == "fsdp":
        raise ConfigError("ppo.padding_free: not under strategy fsdp (its root forward runs the padded trunk)")
    if cfg.padding_free and not (cfg.fused_loss and cfg.fused_lm_head):
        raise ConfigError("ppo.padding_free: needs fused_loss and fused_lm_head (the packed loss runs from the "
                          "hidden states)")
    if cfg.rollout_engine not in ("hf", "vllm"):
        raise ConfigError(f"ppo.rollout_engine: unknown {cfg.rollout_engine!r}; expected hf or vllm")
    if not 0 < cfg.vllm_gpu_memory_utilization <= 1:
        raise ConfigError(f"ppo.vllm_gpu_memory_utilization: {cfg.vllm_gpu_memory_utilization}; expected (0, 1]")
    rc = cfg.rollout_correction
    try:
        correction_kwargs(rc)
    except ValueError as exc:
        raise ConfigError(f"ppo.rollout_correction.{exc}") from None
    if cfg.forward_batch_size < 0:
        raise ConfigError("ppo.forward_batch_size must be >= 0 (0: the update's micro-batch size)")

"""The command-line flags that ``rlhf-kernels train`` and the ``sft`` / ``rm`` /
``ppo`` commands share: each flag's choices and help written once."""

from __future__ import annotations

import argparse

STRATEGIES = ("ddp", "fsdp")
PRECISIONS = ("fp32", "bf16")


def add_parallel_flags(parser: argparse.ArgumentParser, *, every_stage: bool = False, strategy: str | None = None,
                       precision: str | None = None, offload: bool = True) -> None:
    """``--strategy``, ``--precision`` and (``offload``) ``--offload`` on
    ``parser``. ``every_stage``: the flags apply to each stage of ``train``
    (``--offload`` to its PPO stage). ``strategy`` / ``precision``: the
    defaults (None: the configuration's)."""
    stage = ", every stage" if every_stage else ""
    parser.add_argument("--strategy", default=strategy, choices=STRATEGIES,
                        help=f"under torchrun{stage}: ddp (default; every rank holds every model) or fsdp "
                             "(FSDP2 sharding)")
    parser.add_argument("--precision", default=precision, choices=PRECISIONS,
                        help=f"{'every stage: ' if every_stage else ''}fp32 (default) or bf16 compute (autocast; "
                             "under fsdp FSDP2's MixedPrecisionPolicy); float32 master weights either way")
    if offload:
        parser.add_argument("--offload", default=None, metavar="ref,reward",
                            help=f"{'PPO: ' if every_stage else ''}frozen models kept in CPU memory: ref (the "
                                 "reference policy), reward (the reward model)")


def add_lora_flags(parser: argparse.ArgumentParser, merged: str) -> None:
    """``--lora-r`` and its options (PEFT LoRA adapters; PPOConfig's names and
    defaults), and ``--merge`` (``merged``: where the merged model goes)."""
    group = parser.add_argument_group("LoRA adapters (PEFT)")
    group.add_argument("--lora-r", type=int, default=None, help="adapter rank (default 0: full weights)")
    group.add_argument("--lora-alpha", type=int, default=None, help="LoRA alpha (default 16)")
    group.add_argument("--lora-dropout", type=float, default=None, help="LoRA dropout (default 0)")
    group.add_argument("--lora-target-modules", default=None,
                       help="all-linear (default: every linear layer but the output layer) or module names, "
                            "comma separated")
    group.add_argument("--merge", action="store_true",
                       help=f"with LoRA: also write {merged}, the adapters merged into a plain HF checkpoint")


def add_report_flag(parser: argparse.ArgumentParser) -> None:
    """``--report-to``: the trackers (trainer/trackers.py)."""
    parser.add_argument("--report-to", default=None, metavar="none|tensorboard|wandb",
                        help="trackers, comma separated (default: tensorboard when installed); wandb runs "
                             "offline with WANDB_MODE=offline")


def add_backend_flag(parser: argparse.ArgumentParser) -> None:
    """``--backend``: the ops' backend (None: the best one per device)."""
    parser.add_argument("--backend", default=None, help="triton | cuda | cpu | eager (default: best per device)")


def add_rollout_flags(parser: argparse.ArgumentParser) -> None:
    """The rollout engine and the sampler / trainer mismatch correction
    (PPOConfig.rollout_engine, PPOConfig.rollout_correction with verl's names)."""
    group = parser.add_argument_group("rollouts: the engine, and the sampler's log-probs against the trainer's")
    group.add_argument("--rollout-engine", default=None, choices=("hf", "vllm"),
                       help="hf: the policy's generate() (default); vllm: a vLLM engine in this process, "
                            "built from the policy's checkpoint and given its weights after every update")
    group.add_argument("--rollout-is", default=None, choices=("token", "sequence", "geometric"),
                       help="importance weights into the policy loss, at this level")
    group.add_argument("--rollout-is-threshold", default=None,
                       help="UPPER (truncate: TIS) or LOWER_UPPER (mask: IcePop); default 2.0")
    group.add_argument("--rollout-rs", default=None,
                       help="rejection options, comma separated: token_k1..3, seq_sum_k1..3, seq_mean_k1..3, "
                            "seq_max_k2, seq_max_k3")
    group.add_argument("--rollout-rs-threshold", default=None,
                       help="one threshold for every option or one per option, comma separated "
                            "(a k1 option: UPPER or LOWER_UPPER ratio bounds)")
    group.add_argument("--bypass-mode", action="store_true",
                       help="the sampler's log-probs as the old log-probs (no recompute forward)")
    group.add_argument("--measure-mismatch", action="store_true",
                       help="keep the sampler's log-probs and log the mismatch/* statistics, no correction")


def apply_rollout_flags(args: argparse.Namespace, cfg) -> None:
    """The flags given onto a PPOConfig (a --config file's values stay otherwise)."""
    if args.rollout_engine is not None:
        cfg.rollout_engine = args.rollout_engine
    rc = cfg.rollout_correction
    for name in ("rollout_is", "rollout_is_threshold", "rollout_rs", "rollout_rs_threshold"):
        if getattr(args, name) is not None:
            setattr(rc, name, getattr(args, name))
    rc.bypass_mode = rc.bypass_mode or args.bypass_mode
    rc.measure = rc.measure or args.measure_mismatch


DATA_COLUMNS = ("prompt", "response", "messages", "chosen", "rejected", "text")


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    """``--split`` and the ``--<key>-column`` renames of the data sources
    (JSON lines, or through `datasets`: save_to_disk folders, Parquet / JSON
    files or folders)."""
    group = parser.add_argument_group("data sources: JSON lines, or a datasets folder / Parquet / JSON file")
    group.add_argument("--split", default="train", help="the split of a dataset with several (default train)")
    for key in DATA_COLUMNS:
        group.add_argument(f"--{key}-column", default=None, metavar="NAME",
                           help=f"the source's column holding {key!r} (default {key!r})")


def data_columns(args: argparse.Namespace) -> dict:
    """{our key: the source's column} for the --<key>-column flags given."""
    return {key: getattr(args, f"{key}_column") for key in DATA_COLUMNS if getattr(args, f"{key}_column", None)}

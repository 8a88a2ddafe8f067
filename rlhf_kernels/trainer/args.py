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


def add_backend_flag(parser: argparse.ArgumentParser) -> None:
    """``--backend``: the ops' backend (None: the best one per device)."""
    parser.add_argument("--backend", default=None, help="triton | cuda | cpu | eager (default: best per device)")

"""The experiment trackers the commands report to (``--report-to``): the same
keys and steps as metrics.jsonl, on the main process only.

- ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` in ``<out>/tb``;
- ``wandb``: a Weights & Biases run in ``<out>`` (``WANDB_MODE=offline``
  writes it there without an account or a network; ``wandb sync`` uploads it
  later), the run's config the command's arguments;
- ``none``.

The default (``--report-to`` not given) is tensorboard when it is installed,
else none. A tracker asked for by name and not installed stops the command
before training."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .config import ConfigError

TRACKERS = ("none", "tensorboard", "wandb")


def parse_report_to(value: Optional[str]) -> Optional[list[str]]:
    """``"tensorboard,wandb"`` -> ["tensorboard", "wandb"]; None stays None
    (the default); ``"none"`` -> []."""
    if value is None:
        return None
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown or not names:
        raise ConfigError(f"--report-to: {value!r}; expected a comma-separated list from {TRACKERS}")
    return [n for n in names if n != "none"]


class Trackers:
    """The trackers of one command's main process (``enabled`` False: none)."""

    def __init__(self, report_to: Optional[list[str]], out: Path, config: dict[str, Any], enabled: bool = True,
                 project: str = "rlhf-kernels"):
        self.board = None
        self.wandb_run = None
        if not enabled:
            return
        names = report_to if report_to is not None else ["tensorboard"]
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if report_to is not None:
                    raise ConfigError("--report-to tensorboard: tensorboard is not installed "
                                      "(pip install tensorboard)") from None
            else:
                self.board = SummaryWriter(str(out / "tb"))
        if "wandb" in names:
            try:
                import wandb
            except ImportError:
                raise ConfigError("--report-to wandb: wandb is not installed (pip install wandb)") from None
            out.mkdir(parents=True, exist_ok=True)
            self.wandb_run = wandb.init(project=project, name=out.name, dir=str(out), config=config,
                                        resume="allow")

    def log(self, record: dict[str, Any], step: int) -> None:
        """Every numeric value of ``record`` at ``step``."""
        scalars = {k: float(v) for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iteration"}
        if self.board is not None:
            for key, value in scalars.items():
                self.board.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
            self.board = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


__all__ = ["TRACKERS", "Trackers", "parse_report_to"]

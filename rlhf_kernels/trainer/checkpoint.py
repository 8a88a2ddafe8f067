"""PPOTrainer's checkpoints: ``state_dict`` / ``load_state_dict`` (DDP or one
process) and ``save`` / ``load``, the files (one ``torch.save`` file; under
FSDP a torch.distributed.checkpoint directory with ``trainer.pt``). Each is a
collective: every rank calls it."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch

from .fsdp import unwrapped as _unwrap
from .utils import all_gather_object, load_checkpoint, rng_state, save_checkpoint, set_rng_state

logger = logging.getLogger(__name__)


def _not_sharded(trainer, what: str) -> None:
    if trainer.sharded:
        raise ValueError(f"{what}: an FSDP trainer's models are sharded; checkpoint it with save() / load()")


def state_dict(trainer) -> dict:
    """Everything to resume, DDP or one process (a collective: every rank
    calls it; rank 0 writes it). FSDP trainers checkpoint with ``save``."""
    _not_sharded(trainer, "state_dict")
    return {
        "policy": _unwrap(trainer.policy).state_dict(),
        "value_model": _unwrap(trainer.value_model).state_dict() if trainer.value_model is not None else None,
        "policy_opt": trainer.policy_opt.state_dict(),
        "value_opt": trainer.value_opt.state_dict() if trainer.value_opt is not None else None,
        **_training_state(trainer),
    }


def _training_state(trainer) -> dict:
    """Everything but the models and optimizers (a collective: it gathers
    every rank's random streams)."""
    return {
        "iteration": trainer.iteration,
        "policy_sched": trainer.policy_sched.state_dict(),
        "value_sched": trainer.value_sched.state_dict() if trainer.value_sched is not None else None,
        "kl_ctl": trainer.kl_ctl.state_dict() if trainer.kl_ctl is not None else None,
        "score_moments": trainer._score_moments.cpu(),
        # Every rank's streams (prompts, sampling noise), by rank: a collective,
        # so every rank calls state_dict; rank 0 writes it.
        "rank_rng": all_gather_object({"data_rng": trainer.data_rng.getstate(), "rng": rng_state()}),
    }


def save(trainer, path, extra: dict) -> None:
    """Write a checkpoint (a collective: every rank calls it). DDP: one
    file from rank 0 (``state_dict()`` and ``extra``). FSDP: a directory,
    the models' and optimizers' shards through torch.distributed.checkpoint
    (each rank writes its own; resumable on any number of ranks), the rest
    in ``trainer.pt`` from rank 0."""
    path = Path(path)
    if not trainer.sharded:
        state = state_dict(trainer)
        if trainer.rank == 0:
            save_checkpoint(path, {"trainer": state, **extra})
        return
    import shutil

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    training = _training_state(trainer)
    # Into a fresh directory, then swapped in: an interrupted save leaves the last checkpoint whole.
    tmp = path.with_name(path.name + ".tmp")
    if trainer.rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    dist.barrier()
    dcp.save(_sharded_states(trainer), checkpoint_id=str(tmp))
    if trainer.rank == 0:
        save_checkpoint(tmp / "trainer.pt", {"trainer": training, **extra})
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    dist.barrier()


def load(trainer, path) -> dict:
    """Resume from ``save``'s checkpoint; returns its ``extra``."""
    path = Path(path)
    if not trainer.sharded:
        state = load_checkpoint(path)
        load_state_dict(trainer, state["trainer"])
        return state
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    shards = _sharded_states(trainer)
    dcp.load(shards, checkpoint_id=str(path))  # resharded to this number of ranks
    for name, model, opt in _models_and_optimizers(trainer):
        set_state_dict(model, opt, model_state_dict=shards[name], optim_state_dict=shards[f"{name}_opt"])
    state = load_checkpoint(path / "trainer.pt")
    _load_training_state(trainer, state["trainer"])
    return state


def _models_and_optimizers(trainer):
    pairs = [("policy", trainer.policy, trainer.policy_opt)]
    if trainer.value_model is not None:
        pairs.append(("value_model", trainer.value_model, trainer.value_opt))
    return pairs


def _sharded_states(trainer) -> dict:
    """Model and optimizer state dicts of DTensor shards, by name."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    out = {}
    for name, model, opt in _models_and_optimizers(trainer):
        out[name], out[f"{name}_opt"] = get_state_dict(model, opt)
    return out


def load_state_dict(trainer, state: dict) -> None:
    """``state_dict``'s inverse (DDP or one process; FSDP: ``load``)."""
    _not_sharded(trainer, "load_state_dict")
    _unwrap(trainer.policy).load_state_dict(state["policy"])
    trainer.policy_opt.load_state_dict(state["policy_opt"])
    if trainer.value_model is not None:
        _unwrap(trainer.value_model).load_state_dict(state["value_model"])
        trainer.value_opt.load_state_dict(state["value_opt"])
    _load_training_state(trainer, state)


def _load_training_state(trainer, state: dict) -> None:
    trainer.iteration = state["iteration"]
    trainer.policy_sched.load_state_dict(state["policy_sched"])
    if trainer.value_model is not None:
        trainer.value_sched.load_state_dict(state["value_sched"])
    if "score_moments" in state:
        trainer._score_moments = state["score_moments"].clone()
    if trainer.kl_ctl is not None and state["kl_ctl"] is not None:
        trainer.kl_ctl.load_state_dict(state["kl_ctl"])
    saved = state["rank_rng"]
    if len(saved) == trainer.world_size:
        trainer.data_rng.setstate(saved[trainer.rank]["data_rng"])
        set_rng_state(saved[trainer.rank]["rng"])
    elif not trainer.sharded:
        raise ValueError(f"checkpoint: written by {len(saved)} processes, resumed with {trainer.world_size}; "
                         "resume with the same number of processes (or train with strategy fsdp)")
    else:
        # Another number of ranks: the models and optimizers continue exactly,
        # the sampling streams start afresh (seeded by rank and iteration).
        logger.warning("checkpoint: written by %d processes, resumed with %d; the prompt and sampling "
                       "streams are reseeded", len(saved), trainer.world_size)
        seed = (trainer.config.seed * 1000 + trainer.rank) * 100003 + trainer.iteration
        trainer.data_rng = random.Random(seed)
        torch.manual_seed(seed)

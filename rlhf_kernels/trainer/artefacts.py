"""The Hugging Face artefacts the commands write: the policy (``save_pretrained``
in the checkpoint's dtype, with its tokenizer), a PEFT model's adapters, and
the critic as an ``AutoModelForSequenceClassification`` checkpoint."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from .fsdp import unwrapped
from .models import ScalarHeadModel


def save_policy(policy, tokenizer, path: Path, dtype: torch.dtype, state: dict | None = None) -> None:
    """An HF checkpoint of the policy, in ``dtype`` (the checkpoint's), with the
    tokenizer; ``state``: its full state dict (default: the model's own)."""
    policy = unwrapped(policy)
    state = policy.state_dict() if state is None else state
    state = {k: v.detach().to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_as(policy, path, state, dtype)
    tokenizer.save_pretrained(path)


def save_adapters(policy, tokenizer, path: Path, dtype: torch.dtype, state: dict | None = None) -> None:
    """A PEFT model's adapters as PEFT writes them (adapter_config.json,
    adapter_model.safetensors; loadable with ``PeftModel.from_pretrained`` over
    the base checkpoint), with the modules it trains in full (a classifier's
    score head), in ``dtype``, with the tokenizer; ``state``: the model's full
    state dict (default: its own; under FSDP, export_state_dict's)."""
    model = unwrapped(policy)
    state = model.state_dict() if state is None else state
    state = {k: v.detach().to(dtype) for k, v in state.items() if "lora_" in k or ".modules_to_save." in k}
    model.save_pretrained(path, state_dict=state)
    tokenizer.save_pretrained(path)


def save_as(model, path: Path, state: dict, dtype: torch.dtype) -> None:
    """save_pretrained of ``state`` (tensors in ``dtype``), its config.json
    saying ``dtype`` (save_pretrained writes the dtype of the model's own
    parameters: float32, the master weights')."""
    model.save_pretrained(path, state_dict=state)
    config_file = Path(path) / "config.json"
    config = json.loads(config_file.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    # FSDP2 renames a sharded module's class FSDP<name>; the architecture is <name>
    config["architectures"] = [a.removeprefix("FSDP") for a in config.get("architectures") or []] or None
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_critic(critic: ScalarHeadModel, tokenizer, path: Path, dtype: torch.dtype, state: dict | None = None) -> None:
    """The critic as an HF ``AutoModelForSequenceClassification`` checkpoint
    (its trunk, its head as the one-label score), in ``dtype``; ``state``: its
    full state dict (default: the model's own)."""
    from transformers import AutoModelForSequenceClassification

    critic = unwrapped(critic)
    state = critic.state_dict() if state is None else state
    config = copy.deepcopy(critic.trunk.config)
    config.num_labels = 1
    config.architectures = None
    with torch.device("meta"):
        hf = AutoModelForSequenceClassification.from_config(config)
    trunk = {f"{hf.base_model_prefix}.{k[len('trunk.'):]}": v for k, v in state.items() if k.startswith("trunk.")}
    state = {**trunk, "score.weight": state["head.weight"]}
    state = {k: v.detach().to(dtype) for k, v in state.items()}
    save_as(hf, path, state, dtype)
    tokenizer.save_pretrained(path)

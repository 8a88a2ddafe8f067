"""FSDP2 for the trainer (``strategy="fsdp"``): ``torch.distributed.fsdp.fully_shard``
on every decoder layer, then on the root, for the trained models (parameters,
gradients and optimizer state sharded over the ranks) and the frozen ones
(reference, reward model: parameters sharded, all-gathered layer by layer in
their forwards). Generation gathers the policy's full parameters once per
rollout (``gathered``) instead of once per token and layer."""

from __future__ import annotations

import contextlib
import types
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from .models import is_peft


def _fsdp():
    from torch.distributed.fsdp import FSDPModule, fully_shard

    return FSDPModule, fully_shard


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (transformers' ``*DecoderLayer`` modules)."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def shard(model: nn.Module, *, bf16: bool = False, offload: bool = False) -> nn.Module:
    """fully_shard each decoder layer, then the root (the embeddings, the final
    norm and the head: tied weights stay one parameter). In place; returns
    the model. ``bf16``: FSDP2's MixedPrecisionPolicy, parameters all-gathered
    in bf16 (the forward and backward compute in bf16), gradients
    reduce-scattered in float32 into the float32 sharded parameters (the
    master weights the optimizer steps). ``offload``: CPUOffloadPolicy, the
    shards kept in CPU memory and each layer's copied to the device for its
    forward (frozen models: no gradient, no optimizer step on the CPU)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    _, fully_shard = _fsdp()
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"strategy fsdp: {type(model).__name__} has no *DecoderLayer modules to shard")
    options = {}
    if bf16:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(fsdp_root(model), **options)
    return model


def fsdp_root(model: nn.Module) -> nn.Module:
    """The module sharded as FSDP2's root: a PEFT model's base model (its
    generate() and forward run the base model's forward, where the root's
    hooks unshard the parameters), any other model itself."""
    return model.get_base_model() if is_peft(model) else model


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device, enabled: bool = True) -> Iterator[nn.Module]:
    """An offloaded model (kept in CPU memory) on ``device`` for the passes
    inside, back in CPU memory after them. FSDP2 models offload through
    ``shard(offload=True)`` and are left as they are."""
    param = next(model.parameters(), None)
    there = param is not None and param.device.type == device.type and device.index in (None, param.device.index)
    if not enabled or is_sharded(model) or param is None or there:  # there: a nested call
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to("cpu")


def data_parallel(model: nn.Module, strategy: str, world_size: int, precision: str = "fp32") -> nn.Module:
    """The model to train on ``world_size`` ranks: FSDP2-sharded in place
    (strategy "fsdp"; precision "bf16": MixedPrecisionPolicy), wrapped in DDP
    ("ddp", more than one rank), or as is."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision: unknown {precision!r}; expected fp32 or bf16")
    if strategy == "fsdp":
        return shard(model, bf16=precision == "bf16")
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    return model


def autocast(device: torch.device, precision: str, sharded: bool):
    """bf16 autocast for precision "bf16", unless FSDP2's MixedPrecisionPolicy
    casts instead (``sharded``); else a no-op context."""
    if precision == "bf16" and not sharded:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 modules are their own)."""
    return getattr(model, "module", model)


def export_state_dict(model: nn.Module) -> dict:
    """The full state dict to save on rank 0: gathered under FSDP (a
    collective: every rank calls it), the model's own otherwise."""
    return full_state_dict(model) if is_sharded(model) else unwrapped(model).state_dict()


def is_sharded(model) -> bool:
    FSDPModule, _ = _fsdp()
    return isinstance(fsdp_root(model), FSDPModule)


def _fsdp_modules(model: nn.Module):
    FSDPModule, _ = _fsdp()
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """The model's full parameters all-gathered once and kept through every
    forward inside (generation: one all-gather per rollout, not one per
    token and layer), resharded on exit."""
    if not is_sharded(model):
        yield
        return
    modules = _fsdp_modules(model)
    for m in modules:
        m.set_reshard_after_forward(False)
    fsdp_root(model).unshard()
    try:
        yield
    finally:
        for m in modules:
            m.set_reshard_after_forward(True)
        fsdp_root(model).reshard()


_IN_ROOT_FORWARD = "_rlhf_kernels_in_root_forward"


def in_root_forward(model: nn.Module, fn: Callable, *args):
    """``fn(*args)`` run as a forward of the sharded root (FSDP2's
    ``register_fsdp_forward_method``): inside it, the root's own parameters
    (embeddings, final norm, LM head) are unsharded plain tensors that code
    outside the model's ``forward`` can use, and the backward reduce-scatters
    their gradients as after the model's forward. ``fn`` must not call the
    model itself (its end would reshard them). Not sharded: ``fn(*args)``."""
    if not is_sharded(model):
        return fn(*args)
    model = fsdp_root(model)
    if _IN_ROOT_FORWARD not in model.__dict__:
        from torch.distributed.fsdp import register_fsdp_forward_method

        setattr(model, _IN_ROOT_FORWARD, types.MethodType(lambda self, fn, *a: fn(*a), model))
        register_fsdp_forward_method(model, _IN_ROOT_FORWARD)
    return getattr(model, _IN_ROOT_FORWARD)(fn, *args)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """FSDP2's no_sync: skip the reduce-scatter for all but the last micro-batch."""
    fsdp_root(model).set_requires_gradient_sync(enabled)


def full_state_dict(model: nn.Module, every_rank: bool = False) -> dict:
    """The full (unsharded) state dict on rank 0, on the CPU; {} on the other
    ranks (``every_rank``: on every rank). A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not every_rank:
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this rank holds of the tensors (a DTensor's local shard)."""
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors if isinstance(t, torch.Tensor))


def model_state_mb(models: Iterable[nn.Module], optimizers: Iterable[torch.optim.Optimizer]) -> float:
    """This rank's parameters, gradients and optimizer state, MiB, over the models."""
    total = 0
    for model in models:
        params = list(model.parameters())
        total += local_bytes(params) + local_bytes(p.grad for p in params if p.grad is not None)
    for opt in optimizers:
        for state in opt.state.values():
            total += local_bytes(v for v in state.values() if isinstance(v, torch.Tensor))
    return total / 2**20

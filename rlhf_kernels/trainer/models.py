"""Models of the pipeline: the policy (any causal LM), and the reward and value
models (a causal LM trunk with a scalar head)."""

from __future__ import annotations

import copy
import os
from typing import Any, Callable, Iterator, NamedTuple, Optional

import torch
from torch import Tensor, nn


def tiny_llama(vocab_size: int, *, pad_token_id: int, bos_token_id: int, eos_token_id: int,
               hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
               max_positions: int = 64, seed: int = 0):
    """A small Llama-style causal LM built from a config (random initialisation,
    nothing downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_positions, pad_token_id=pad_token_id,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def load_causal_lm(path: str):
    """A causal LM from a local directory (never downloads)."""
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(path):
        raise ValueError(f"model path {path!r} is not a directory")
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)


class ScalarHeadModel(nn.Module):
    """A causal LM trunk with a linear head giving one scalar per position:
    the reward model reads it at the last valid token, the critic everywhere."""

    def __init__(self, trunk: nn.Module, hidden_size: int, bias: bool = True):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(hidden_size, 1, bias=bias)
        nn.init.normal_(self.head.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        if bias:
            nn.init.zeros_(self.head.bias)

    @classmethod
    def from_causal_lm(cls, lm: nn.Module) -> "ScalarHeadModel":
        """Copy of the LM's trunk (InstructGPT starts the reward model from the
        SFT model) with a fresh scalar head."""
        return cls(copy.deepcopy(lm.base_model), lm.config.hidden_size)

    @property
    def config(self):
        return self.trunk.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) float32 scalars: the head runs in float32 on the trunk's
        hidden states (bf16 / fp16 trunks included)."""
        from .data import position_ids

        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
        weight, bias = self.head.weight, self.head.bias
        values = hidden.float() @ weight.float()[0]  # (B, L), a new tensor (not a view: FSDP2 hooks its output)
        return values if bias is None else values + bias.float()


def last_valid_index(attention_mask: Tensor) -> Tensor:
    """(B,) index of the last position whose mask is 1 (right-padded or not)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return torch.where(attention_mask.bool(), positions, -1).max(dim=1).values.clamp_min(0)


def is_hf_classifier(model: nn.Module) -> bool:
    """An HF sequence-classification model (``AutoModelForSequenceClassification``)."""
    from .fsdp import unwrapped

    model = unwrapped(model)
    return not isinstance(model, ScalarHeadModel) and hasattr(getattr(model, "config", None), "num_labels") \
        and type(model).__name__.endswith("ForSequenceClassification")


def sequence_scores(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(B,) float32 reward per sequence. A ScalarHeadModel: its scalar at each
    sequence's last valid token. An HF sequence classifier (one label): its own
    score, read as HF reads it (at the last token that is not its pad token,
    so with pad == eos the token before the EOS), with positions counted over
    the real tokens as in the other passes."""
    if is_hf_classifier(model):
        from .data import position_ids

        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids(attention_mask), use_cache=False).logits
        if logits.shape[-1] != 1:
            raise ValueError(f"reward model: a sequence classifier with {logits.shape[-1]} labels; a reward model "
                             "has one (num_labels=1)")
        return logits[:, 0].float()
    values = model(input_ids, attention_mask)
    return values.gather(1, last_valid_index(attention_mask).unsqueeze(1)).squeeze(1)


def response_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_len: int) -> Tensor:
    """(B, R, V) logits predicting the response tokens input_ids[:, prompt_len:],
    computed for the last R + 1 positions only when the model supports
    ``logits_to_keep``; a strided view, read in place by the kernels."""
    from .data import position_ids

    response_len = input_ids.shape[1] - prompt_len
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                  use_cache=False)
    try:
        logits = model(**kwargs, logits_to_keep=response_len + 1).logits
    except TypeError:  # a model without logits_to_keep
        logits = model(**kwargs).logits
    return logits[:, -(response_len + 1) : -1]


class LMHead:
    """A causal LM's output layer as the fused LM-head ops take it: logits =
    (hidden @ weight.T + bias) * logit_scale, the scale folded into the
    temperature. ``None`` from ``of`` (with the reason) for heads the ops do not
    express: final-logit soft-capping (Gemma 2), a head that is not a Linear."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], logit_scale: float):
        self.weight, self.bias, self.logit_scale = weight, bias, logit_scale

    @staticmethod
    def of(model: nn.Module) -> tuple[Optional["LMHead"], str]:
        model = getattr(model, "module", model)  # DDP
        config = getattr(model, "config", None)
        if getattr(config, "final_logit_softcapping", None):
            return None, "final_logit_softcapping is set (tanh soft-capping of the logits)"
        get = getattr(model, "get_output_embeddings", None)
        head = get() if get is not None else None
        if not isinstance(head, nn.Linear):
            return None, f"the output layer is {type(head).__name__}, not an nn.Linear"
        scale = float(getattr(config, "logit_scale", None) or 1.0)
        return LMHead(head.weight, head.bias, scale), ""

    @torch.no_grad()
    def logits(self, hidden: Tensor) -> Tensor:
        """(..., V) float32 logits of ``hidden`` (..., H), no gradient, autocast off (for checks)."""
        with torch.autocast(hidden.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return torch.nn.functional.linear(hidden.float(), self.weight.float(), bias) * self.logit_scale


def response_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_len: int,
                    head: LMHead, check: bool = False) -> Tensor:
    """(B, R, H) last hidden states predicting the response tokens (the inputs
    of ``response_logits``'s head), without the (B, R, V) logits: the model
    keeps the logits of one position only. ``check``: that position's logits
    must equal the head applied to its hidden state (else ValueError: a model
    whose last hidden state is not what its head reads)."""
    from .data import position_ids

    response_len = input_ids.shape[1] - prompt_len
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                use_cache=False, output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1]
    if check:
        check_head(model, head.logits(hidden[:, -1]), out.logits[:, -1], hidden.dtype)
    return hidden[:, -(response_len + 1) : -1]


class PackedResponse(NamedTuple):
    """The response tokens of a padded batch, run packed: ``hidden`` (N, H)
    the hidden states predicting them, ``valid`` (B, R) bool where they sit
    in the padded responses (a row-major prefix per row: ``x[valid]`` packs a
    (B, R) tensor), ``cu_seqlens`` (B + 1,) int32, ``tokens`` the tokens the
    model ran (every real prompt and response token, no padding)."""

    hidden: Tensor
    valid: Tensor
    cu_seqlens: Tensor
    tokens: int


def packed_response_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_len: int,
                           check: bool = False) -> PackedResponse:
    """``response_hidden`` without the padding: each row's real tokens (its
    left-padded prompt and right-padded response are contiguous) laid end to
    end in one row, positions restarting at 0 per sequence and no attention
    mask, which transformers' masking turns into a block-diagonal causal mask
    (``masking_utils.find_packed_sequence_indices``; no KV cache). ``check``:
    the packed hidden states must equal the padded forward's (else
    ValueError: a model whose attention crosses the packed sequences)."""
    from .data import position_ids

    real = attention_mask.bool()
    lengths = real.sum(1)
    resp = real[:, prompt_len:].sum(1)
    if bool((lengths - resp < 1).any()):
        raise ValueError("padding_free: a row without a prompt token (nothing predicts its first response token)")
    ids = input_ids[real].unsqueeze(0)
    pos = position_ids(attention_mask)[real].unsqueeze(0)
    out = model(input_ids=ids, position_ids=pos, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1][0]
    zero = lengths.new_zeros(1)
    starts = torch.cat([zero, lengths.cumsum(0)[:-1]])
    cu = torch.cat([zero, resp.cumsum(0)])
    row = torch.repeat_interleave(torch.arange(len(resp), device=resp.device), resp)
    j = torch.arange(int(cu[-1]), device=resp.device) - cu[row]
    picked = hidden[starts[row] + (lengths - resp)[row] - 1 + j]
    valid = torch.arange(input_ids.shape[1] - prompt_len, device=resp.device)[None, :] < resp[:, None]
    if check:
        with torch.no_grad():
            padded = model(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids(attention_mask), use_cache=False, output_hidden_states=True,
                           logits_to_keep=1).hidden_states[-1][:, prompt_len - 1:-1][valid]
        scale = padded.abs().amax().clamp_min(1.0)
        tol = 1e-3 if padded.dtype == torch.float32 else 5e-2
        err = (picked.detach().float() - padded.float()).abs().amax()
        if err > tol * scale:
            raise ValueError(f"padding_free: {type(getattr(model, 'module', model)).__name__}'s packed forward "
                             f"differs from its padded one by {float(err):.3g} (its attention crosses the packed "
                             "sequences, or it ignores position_ids); run without padding_free")
    return PackedResponse(picked, valid, cu.to(torch.int32), int(ids.shape[1]))


def with_response_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_len: int,
                         op: Callable[[Tensor, LMHead], Any], check: bool = False) -> Any:
    """``op(hidden, head)``: ``hidden`` (B, R, H) the last hidden states
    predicting the response tokens (``response_hidden``), ``head`` the model's
    ``LMHead``; no (B, R, V) logits. ``check`` as ``response_hidden``'s.

    Under FSDP2 the head's weight is a sharded DTensor outside the model's
    forward: the trunk (``model.base_model``: embeddings, decoder layers, final
    norm) and ``op`` then run together inside one FSDP forward of the root
    (``fsdp.in_root_forward``), where the root's parameters, the head's among
    them, are unsharded, and their gradients reduce-scatter as a forward's do."""
    from . import fsdp

    if not fsdp.is_sharded(model):
        head, _ = LMHead.of(model)
        return op(response_hidden(model, input_ids, attention_mask, prompt_len, head, check=check), head)
    from .data import position_ids

    response_len = input_ids.shape[1] - prompt_len
    want = None
    if check:  # the model's own logits at the last position: a forward of its own
        with torch.no_grad():
            want = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                         use_cache=False, logits_to_keep=1).logits[:, -1]

    def run(input_ids: Tensor, attention_mask: Tensor):
        head, _ = LMHead.of(model)
        trunk = fsdp.fsdp_root(model).base_model  # a PEFT model's: its base model's (the adapters in it)
        hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                       use_cache=False).last_hidden_state
        got = head.logits(hidden[:, -1]) if check else None
        return op(hidden[:, -(response_len + 1) : -1], head), got, hidden.dtype

    out, got, dtype = fsdp.in_root_forward(model, run, input_ids, attention_mask)
    if check:
        check_head(model, got, want, dtype)
    return out


def check_head(model: nn.Module, got: Tensor, want: Tensor, hidden_dtype: torch.dtype) -> None:
    """ValueError unless ``got`` (the head applied to the last hidden state,
    ``LMHead.logits``) equals ``want`` (the model's own logits there)."""
    # bf16 / fp16 hidden states or an autocast forward: the model's logits are a 16-bit product
    low_precision = hidden_dtype != torch.float32 or torch.is_autocast_enabled(want.device.type)
    want = want.detach().float()
    tol = (1e-2 if low_precision else 1e-4) * max(1.0, want.abs().max().item())
    if not torch.allclose(got, want, atol=tol, rtol=0):
        raise ValueError(
            f"{type(getattr(model, 'module', model)).__name__}: its logits are not its output layer applied "
            "to the last hidden state; run with fused_lm_head=False")


def is_peft(model: nn.Module) -> bool:
    """Whether ``model`` (or the module DDP wraps) is a PEFT model."""
    model = getattr(model, "module", model)
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def with_lora(model: nn.Module, r: int, alpha: int, dropout: float, target_modules: str,
              task_type: Optional[str] = "CAUSAL_LM") -> nn.Module:
    """``model`` with LoRA adapters (PEFT's ``get_peft_model``): only the
    adapters train (and, for ``task_type="SEQ_CLS"``, the score head, in
    full); "all-linear" targets every linear layer but the output layer, so a
    causal LM's head stays the base model's."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        from .config import ConfigError

        raise ConfigError("--lora-r: the peft package is not installed (pip install peft)") from None
    targets = target_modules if target_modules == "all-linear" else \
        [t.strip() for t in target_modules.split(",") if t.strip()]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type=task_type)
    model = get_peft_model(model, config)
    # The modules PEFT trains in full (a classifier's score head) become float32
    # master weights (float32_master) over a trunk that keeps its dtype: they
    # read its hidden state in their own dtype.
    for module in model.modules():
        if type(module).__name__ == "ModulesToSaveWrapper":
            for trained in module.modules_to_save.values():
                trained.register_forward_pre_hook(_input_in_weight_dtype)
    return model


def _input_in_weight_dtype(module: nn.Module, args: tuple) -> tuple:
    return (args[0].to(module.weight.dtype), *args[1:])


def merged_parameters(model: nn.Module, state: Optional[dict] = None) -> Iterator[tuple[str, Tensor]]:
    """A PEFT LoRA model's tensors under its base model's names, each adapted
    weight merged with its active adapters (``W + scale B A``, in float32)
    and a fully trained module (PEFT's modules_to_save: a classifier's score)
    in place of the original, the model unchanged: what an inference engine
    of the base architecture loads, or ``save_pretrained`` writes. ``state``:
    the PEFT model's full state dict to merge (under FSDP, the gathered one;
    default: its parameters, each DTensor gathered). Any other model: its
    ``named_parameters()`` (or ``state``)."""
    if not is_peft(model):
        yield from (model.named_parameters() if state is None else state.items())
        return
    peft_model = getattr(model, "module", model)
    base = peft_model.get_base_model()
    prefix = "base_model.model."
    tensors = {prefix + n: p for n, p in base.named_parameters()} if state is None else state
    modules = dict(base.named_modules())

    def full(name: str) -> Tensor:
        tensor = tensors[name].detach()
        return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor

    for key in tensors:
        name = key.removeprefix(prefix)
        if "lora_" in name or ".original_module." in name:
            continue
        owner, trained, leaf = name.partition(".modules_to_save.")
        if trained:  # "<owner>.modules_to_save.<adapter>.<leaf>"
            adapter, _, leaf = leaf.partition(".")
            if adapter in modules[owner].active_adapters:
                yield f"{owner}.{leaf}", full(key)
            continue
        owner, adapted, leaf = name.rpartition(".base_layer.")
        if not adapted:
            yield name, full(key)
            continue
        layer, tensor = modules[owner], full(key)
        if leaf == "weight" and not layer.merged:
            tensor = tensor.float()
            for a in layer.active_adapters:
                if a in layer.lora_A:
                    delta = full(f"{prefix}{owner}.lora_B.{a}.weight").float() @ \
                        full(f"{prefix}{owner}.lora_A.{a}.weight").float()
                    tensor = tensor + (delta.T if layer.fan_in_fan_out else delta) * layer.scaling[a]
        yield f"{owner}.{leaf}", tensor


def lora_critic(critic: "ScalarHeadModel", r: int, alpha: int, dropout: float,
                target_modules: str) -> "ScalarHeadModel":
    """The critic with LoRA adapters on its trunk (which stays frozen in its
    dtype) and its scalar head trained in full; ``merged_critic_state`` undoes it
    for saving."""
    critic.trunk = with_lora(critic.trunk, r, alpha, dropout, target_modules, task_type=None)
    critic.head.requires_grad_(True)
    return critic


def merged_critic_state(critic: "ScalarHeadModel", state: dict) -> dict:
    """A LoRA critic's full state dict (``state``) with its trunk's adapters
    merged, under a plain ScalarHeadModel's names (what save_critic writes);
    any other critic's as it is."""
    if not is_peft(critic.trunk):
        return state
    trunk = {k[len("trunk."):]: v for k, v in state.items() if k.startswith("trunk.")}
    merged = {f"trunk.{k}": v for k, v in merged_parameters(critic.trunk, trunk)}
    return {**merged, **{k: v for k, v in state.items() if not k.startswith("trunk.")}}

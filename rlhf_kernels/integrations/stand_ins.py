"""Test-only stand-ins for the GPU packages OpenRLHF imports at module level
(flash-attn, vLLM), for running its CPU code where they cannot be installed.
Each stand-in module has just the names OpenRLHF imports; each raises if
called, and OpenRLHF's CPU paths reach none of them (its log-prob helper falls
back when flash_attn.ops does not import). Used by the tests, the pytest
plugin and the benchmarks; never by ``patch()``."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

# package -> {module: names OpenRLHF imports from it}
STAND_INS = {
    "flash_attn": {
        "flash_attn": (),
        "flash_attn.bert_padding": ("index_first_axis", "pad_input", "rearrange", "unpad_input"),
        "flash_attn.utils": (),
        "flash_attn.utils.distributed": ("all_gather",),
    },
    "vllm": {
        "vllm": ("SamplingParams", "AsyncEngineArgs", "AsyncLLMEngine"),
        "vllm.inputs": ("TokensPrompt",),
        "vllm.utils": ("random_uuid",),
    },
}


def _stand_in(name: str, attrs) -> types.ModuleType:
    def unavailable(*args, **kwargs):
        raise NotImplementedError(f"{name} is a test-only stand-in (rlhf_kernels.integrations.stand_ins)")

    module = types.ModuleType(name)
    # A spec without a file or version: transformers' availability checks see
    # the package as not installed (as on a machine without it).
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for attr in attrs:
        setattr(module, attr, unavailable)
    return module


def install(packages=tuple(STAND_INS)) -> dict[str, types.ModuleType]:
    """Stand-ins in sys.modules for those of ``packages`` that are neither
    imported nor installed (on a GPU machine the real ones stay); returns
    them by module name, for ``remove``."""
    installed = {}
    for package in packages:
        if package in sys.modules or importlib.util.find_spec(package) is not None:
            continue
        for name, attrs in STAND_INS[package].items():
            installed[name] = sys.modules[name] = _stand_in(name, attrs)
            parent, _, child = name.rpartition(".")
            if parent in installed:
                setattr(installed[parent], child, installed[name])
    return installed


def remove(installed: dict[str, types.ModuleType]) -> None:
    """Take ``install``'s stand-ins out of sys.modules."""
    for name, module in installed.items():
        if sys.modules.get(name) is module:
            del sys.modules[name]

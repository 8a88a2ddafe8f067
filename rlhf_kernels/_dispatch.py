"""Which kernel implementation runs an op: discovery, the dispatch rule and
the one registry of implementations.

CUDA tensors take the CUDA or the Triton kernel (per op, whichever measured
faster; see ``GPU_PREFERENCE``), CPU tensors take the C++ kernel, and the
plain-PyTorch backend (``"eager"``, rlhf_kernels/eager) runs wherever neither
is built. (``rlhf_kernels.reference`` is the float64 oracle of the tests, not
a backend; ``"reference"`` is still accepted as a deprecated name of
``"eager"``.) ``backend=`` on an op, or the environment variable
``RLHF_KERNELS_BACKEND``, forces one. Each op module registers, per backend,
one callable with the op's contract (``register``); the public function asks
``implementation`` for the one to call.

Nothing here initialises CUDA at import time.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

BACKENDS = ("triton", "cuda", "cpu", "eager")
# Old name -> backend; accepted with a FutureWarning.
DEPRECATED_BACKENDS = {"reference": "eager"}
ENV_BACKEND = "RLHF_KERNELS_BACKEND"
ENV_CHECK = "RLHF_KERNELS_CHECK"

# Default GPU kernel per op when both are built: the hand-written CUDA kernel
# until benchmarks/bench_*.py on a GPU measure the Triton one faster
# (`bash benchmarks/gpu_check.sh`; docs/performance.md lists the devices
# measured, docs/gpu_notes.md the predictions).
GPU_PREFERENCE: dict[str, tuple[str, ...]] = {
    "logprobs": ("cuda", "triton"),
    "ppo_policy_loss": ("cuda", "triton"),
    "ppo_policy_rows": ("cuda", "triton"),
    "ppo_sequence_clip": ("cuda", "triton"),
    "scale_by_sign": ("cuda", "triton"),
    "ppo_value_loss": ("cuda", "triton"),
    "ppo_loss_from_logits": ("cuda", "triton"),
    "advantages": ("cuda", "triton"),
    "kl_penalty": ("cuda", "triton"),
    "logprobs_from_hidden": ("cuda", "triton"),
    "rollout_correction": ("cuda", "triton"),
    "truncation_threshold": ("cuda", "triton"),
}


def _import_native() -> bool:
    try:
        from rlhf_kernels import _C  # noqa: F401  (loading it registers the native ops)
    except ImportError:
        return False
    return True


# Probed once at import (cheap, and none of it initialises CUDA); plain booleans
# so that torch.compile traces the dispatch rule without guards on caches.
_NATIVE = _import_native()
_NATIVE_CUDA = _NATIVE and torch._C._dispatch_has_kernel_for_dispatch_key(
    "rlhf_kernels::logprobs_fwd_native", "CUDA"
)
def _import_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_TRITON = _import_triton()


def native_extension_loaded() -> bool:
    """True when the compiled extension ``rlhf_kernels._C`` imports."""
    return _NATIVE


def native_cuda_built() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return _NATIVE_CUDA


def triton_installed() -> bool:
    return _TRITON


def triton_interpreter() -> bool:
    """Triton kernels run on CPU tensors only under TRITON_INTERPRET=1."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def checks_enabled() -> bool:
    """RLHF_KERNELS_CHECK=1 adds synchronising input checks on GPU tensors."""
    return os.environ.get(ENV_CHECK, "0") == "1"


def available_backends() -> list[str]:
    """The backends this install can run, best first.

    ``"eager"`` is always there; ``"cpu"`` needs the built extension;
    ``"cuda"`` needs the extension built with CUDA kernels and a visible GPU;
    ``"triton"`` needs Triton and a GPU (or ``TRITON_INTERPRET=1``).
    """
    names = []
    gpu = torch.cuda.is_available()
    if triton_installed() and (gpu or triton_interpreter()):
        names.append("triton")
    if native_cuda_built() and gpu:
        names.append("cuda")
    if native_extension_loaded():
        names.append("cpu")
    names.append("eager")
    return names


def canonical_backend(backend: str | None, source: str = "backend") -> str | None:
    """``backend`` with a deprecated name replaced (and warned about); None stays None."""
    if backend in DEPRECATED_BACKENDS:
        new = DEPRECATED_BACKENDS[backend]
        warnings.warn(f"{source}: {backend!r} is a deprecated name of the {new!r} backend",
                      FutureWarning, stacklevel=3)
        return new
    return backend


def resolve_backend(backend: str | None, device: torch.device, op: str) -> str:
    """The backend that runs ``op`` on tensors of ``device``.

    Raises ValueError for an unknown name or a backend that cannot run there.
    """
    requested = backend if backend is not None else os.environ.get(ENV_BACKEND) or None
    source = "backend" if backend is not None else ENV_BACKEND
    requested = canonical_backend(requested, source)
    if requested is not None and requested not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {requested!r}; expected one of {BACKENDS}")
    if device.type == "cuda":
        if requested is None:
            for name in GPU_PREFERENCE[op]:
                if name == "cuda" and native_cuda_built():
                    return name
                if name == "triton" and triton_installed():
                    return name
            return "eager"
        if requested == "cpu":
            raise ValueError(f"{source}: 'cpu' cannot run CUDA tensors")
        if requested == "cuda" and not native_cuda_built():
            raise ValueError(f"{source}: 'cuda' requested but rlhf_kernels._C has no CUDA kernels")
        if requested == "triton" and not triton_installed():
            raise ValueError(f"{source}: 'triton' requested but Triton is not installed")
        return requested
    if device.type == "cpu":
        if requested is None:
            return "cpu" if native_extension_loaded() else "eager"
        if requested == "cuda":
            raise ValueError(f"{source}: 'cuda' cannot run CPU tensors")
        if requested == "cpu" and not native_extension_loaded():
            raise ValueError(f"{source}: 'cpu' requested but rlhf_kernels._C is not built")
        if requested == "triton" and not (triton_installed() and triton_interpreter()):
            raise ValueError(
                f"{source}: 'triton' on CPU tensors needs Triton and TRITON_INTERPRET=1"
            )
        return requested
    if requested not in (None, "eager"):
        raise ValueError(f"{source}: only 'eager' runs on {device.type} tensors")
    return "eager"


# (op, backend) -> the callable with the op's contract. "cpu" and "cuda" hold
# the same native op: the dispatcher picks its device kernel.
_REGISTRY: dict[tuple[str, str], Callable] = {}


def register(op: str, backends: tuple[str, ...], fn: Callable) -> Callable:
    """Record `fn` as the implementation of `op` on each of `backends`."""
    for name in backends:
        _REGISTRY[op, name] = fn
    _RESOLVED.clear()
    return fn


# implementation's answers, by (op, backend, device, RLHF_KERNELS_BACKEND):
# what resolve_backend reads besides them (what is built and installed) is
# fixed for the process. A deprecated name is not kept (it warns on every call).
_RESOLVED: dict[tuple, Callable] = {}
# os.environ's own mapping, read without the KeyError os.environ.get raises
# and catches for an unset variable (a per-call cost of every op).
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENV_BACKEND_KEY = os.environ.encodekey(ENV_BACKEND) if _ENVIRON_DATA is not None else None


def implementation(op: str, backend: str | None, device: torch.device) -> Callable:
    """The implementation of `op` that runs tensors of `device` (``resolve_backend``'s rule)."""
    # keyed by the device itself: hashing it costs less than reading its type
    if backend is None:
        env = os.environ.get(ENV_BACKEND) if _ENVIRON_DATA is None else _ENVIRON_DATA.get(_ENV_BACKEND_KEY)
        key = (op, None, device, env)
    else:
        key = (op, backend, device, None)
    fn = _RESOLVED.get(key)
    if fn is None:
        fn = _REGISTRY[op, resolve_backend(backend, device, op)]
        if (backend if backend is not None else os.environ.get(ENV_BACKEND)) not in DEPRECATED_BACKENDS:
            _RESOLVED[key] = fn
    return fn

"""Test configuration: Triton runs in its interpreter when there is no GPU.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so
this file sets it before rlhf_kernels is imported anywhere.
"""

import os
import tempfile

# A fresh torch.compile cache per session: graphs cached by an earlier build,
# whose ops had other schemas, must not be replayed against this one.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _INDUCTOR_CACHE = os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="rlhf-kernels-inductor-")
else:
    _INDUCTOR_CACHE = None

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import rlhf_kernels  # noqa: E402
from helpers import backends_for  # noqa: E402

def _launch_floats_as_fp32():
    """A compiled Triton kernel receives every Python float argument as fp32;
    the interpreter passes the Python float itself. Round them here as the
    compiled launcher does, so that the interpreter tests see the arguments a
    GPU run sees (a float64 kernel must not rely on an fp32 argument)."""
    import struct

    from triton.runtime.interpreter import InterpretedFunction

    def f32(v):
        return struct.unpack("f", struct.pack("f", v))[0]

    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        args = tuple(f32(a) if type(a) is float else a for a in args)
        return original(self, *args, **kwargs)

    InterpretedFunction.run = run


if os.environ.get("TRITON_INTERPRET") == "1" and rlhf_kernels._dispatch.triton_installed():
    _launch_floats_as_fp32()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


DEVICE_BACKENDS = [(d, b) for d in DEVICES for b in backends_for(d)]


def pytest_generate_tests(metafunc):
    if "device_backend" in metafunc.fixturenames:
        metafunc.parametrize("device_backend", DEVICE_BACKENDS, ids=[f"{d}-{b}" for d, b in DEVICE_BACKENDS])


@pytest.fixture
def poison_uninitialized():
    """Fill every torch.empty with NaN while the test runs, so an output element
    a kernel forgets to write shows up as NaN."""
    import torch.utils.deterministic as det

    old_mode = torch.are_deterministic_algorithms_enabled()
    old_fill = det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old_mode)
    det.fill_uninitialized_memory = old_fill


def pytest_unconfigure(config):
    if _INDUCTOR_CACHE is not None:
        import shutil

        shutil.rmtree(_INDUCTOR_CACHE, ignore_errors=True)

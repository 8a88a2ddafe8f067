"""Package-level behaviour: lean import, backend discovery."""

import subprocess
import sys

import torch

import rlhf_kernels

BLOCK_IMPORTS = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "triton" or name.startswith("triton.") or name == "rlhf_kernels._C":
            raise ImportError("blocked for the test: " + name)
sys.meta_path.insert(0, Block())
"""


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_without_triton_extension_or_gpu_uses_eager():
    out = _run(
        BLOCK_IMPORTS
        + """
import torch, rlhf_kernels
print(rlhf_kernels.available_backends())
x = torch.randn(3, 7); y = torch.tensor([1, 2, 3])
ref = rlhf_kernels.reference.logprobs_from_logits(x, y)
assert torch.allclose(rlhf_kernels.logprobs_from_logits(x, y), ref)
print(torch.cuda.is_initialized())
"""
    )
    assert out.splitlines() == ["['eager']", "False"]


def test_import_does_not_initialise_cuda():
    assert _run("import torch, rlhf_kernels; print(torch.cuda.is_initialized())") == "False"


def test_available_backends_lists_what_is_built():
    names = rlhf_kernels.available_backends()
    assert names[-1] == "eager"
    assert set(names) <= set(rlhf_kernels.BACKENDS)
    # CI and every development machine build the C++ extension.
    assert "cpu" in names
    if torch.cuda.is_available():
        assert "triton" in names


def test_f64_parts_are_fp32_and_rebuild_float64_exactly():
    """Compiled Triton kernels get Python floats as fp32; f64_parts must carry
    a float64 argument through three fp32 values without loss."""
    import math
    import random
    import struct

    from rlhf_kernels.triton._device import f64_parts

    def f32(v):
        return struct.unpack("f", struct.pack("f", v))[0]

    rng = random.Random(0)
    values = [math.e**2, 0.8, 1.2, 1 / 0.7, 1 / 1.3, 0.95, 1e-3, -7.25, 0.0]
    values += [rng.uniform(-10, 10) for _ in range(2000)] + [rng.lognormvariate(0, 6) for _ in range(2000)]
    for v in values:
        hi, mid, lo = f64_parts(v)
        assert (f32(hi), f32(mid), f32(lo)) == (hi, mid, lo)
        assert hi + (mid + lo) == v
    # Beyond fp32: an infinity, not inf + (-inf + nan) = NaN (clip_high=1e39 means "no upper clip").
    assert f64_parts(1e39) == (math.inf, 0.0, 0.0) and f64_parts(-1e39) == (-math.inf, 0.0, 0.0)
    assert f64_parts(math.inf) == (math.inf, 0.0, 0.0)

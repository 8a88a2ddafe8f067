"""Compile every Triton kernel of rlhf_kernels for an NVIDIA GPU, without one.

The Triton interpreter (TRITON_INTERPRET=1), which the CPU test suite uses,
accepts code that the real compiler rejects (non-constexpr globals, type
changes of loop-carried values, unsupported ops), and says nothing about
registers, spills or shared memory. This script drives the public ops with
backend="triton" over the cases the package dispatches, but instead of
launching each kernel it compiles it, through Triton's own JIT path (same
argument specialisation as a real launch), for a CUDA target such as sm_90,
down to a cubin with the ptxas that ships with Triton. No GPU and no CUDA
driver are needed; outputs are left unwritten, so nothing numerical is
checked here (the interpreter tests do that).

    python scripts/triton_aot_check.py --arch 90 --arch 80

Prints one line per compiled specialisation (registers, spill stores, shared
memory) and exits non-zero when a kernel fails to compile, spills, or a
@triton.jit kernel of the package was never reached.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("triton_aot_check: unset TRITON_INTERPRET (it compiles, it does not interpret)")
if "--use-cache" not in sys.argv:
    # A private cache: every run really compiles.
    import tempfile

    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="rlhf-triton-aot-")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import rlhf_kernels  # noqa: E402
from rlhf_kernels import _dispatch  # noqa: E402
from rlhf_kernels.ops.ppo_options import KERNEL_FORMS  # noqa: E402
from rlhf_kernels.triton import advantages as _adv  # noqa: E402
from rlhf_kernels.triton import logprobs as _lp  # noqa: E402
from rlhf_kernels.triton import ppo_loss as _pl  # noqa: E402
from rlhf_kernels.triton import rollout_correction as _rc  # noqa: E402
from rlhf_kernels.triton import truncation as _tr  # noqa: E402

KERNEL_MODULES = (_lp, _adv, _pl, _rc, _tr)


class _CompileOnlyDriver:
    """Enough of a Triton driver for compilation: a device, a stream and a target."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_device(self):
        return self.arch  # JIT caches are per device: one per target

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


@dataclass
class Compiled:
    arch: int
    kernel: str
    dtype: str
    constexprs: str
    num_warps: int
    shared: int
    registers: int | None
    spill_bytes: int | None
    widest_load: int  # bits of the widest global load in the PTX


def _widest_global_load(ptx: str) -> int:
    """Widest ld.global in bits (v4.b32 = 128: the 16-byte loads that reach full bandwidth)."""
    widest = 0
    for m in re.finditer(r"ld\.global(?:\.\w+)*?(?:\.v(\d))?\.[bfsu](\d+)", ptx):
        widest = max(widest, int(m.group(1) or 1) * int(m.group(2)))
    return widest


def _resource_usage(cubin: bytes, workdir: str) -> tuple[int | None, int | None]:
    """(registers, spill stores in bytes) from cuobjdump -res-usage of the cubin."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    path = os.path.join(workdir, "kernel.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=False).stdout
    regs = re.search(r"REG:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    return (int(regs.group(1)) if regs else None), (int(local.group(1)) if local else None)


class _Recorder:
    def __init__(self, arch: int, workdir: str):
        self.arch = arch
        self.workdir = workdir
        self.seen: dict[tuple, Compiled] = {}
        self.kernels_reached: set[str] = set()

    def install(self):
        original = JITFunction.run
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            compiled = original(fn, *args, grid=grid, warmup=True, **kwargs)
            recorder.record(fn, compiled, args, kwargs)
            return compiled

        JITFunction.run = run
        return original

    def record(self, fn, compiled, args, kwargs):
        name = fn.fn.__name__
        self.kernels_reached.add(name)
        consts = ", ".join(
            f"{k}={v}" for k, v in kwargs.items() if k.isupper() and k != "ACC_DTYPE"
        )
        acc = kwargs.get("ACC_DTYPE")
        key = (name, str(compiled.hash) if hasattr(compiled, "hash") else id(compiled))
        if key in self.seen:
            return
        regs, spills = _resource_usage(compiled.asm["cubin"], self.workdir)
        dtype = str(args[0].dtype).replace("torch.", "") if isinstance(args[0], torch.Tensor) else "?"
        self.seen[key] = Compiled(
            arch=self.arch, kernel=name, dtype=dtype, constexprs=f"{consts}, acc={acc}".strip(", "),
            num_warps=compiled.metadata.num_warps, shared=compiled.metadata.shared,
            registers=regs, spill_bytes=spills, widest_load=_widest_global_load(compiled.asm["ptx"]),
        )


def _pretend_cuda(fn):
    """Block-size choosers pick GPU configurations for 'cuda' devices."""
    def wrapped(size, device):
        return fn(size, torch.device("cuda"))
    return wrapped


def _cases():
    """Every dispatch the triton backend can take, on small CPU tensors."""
    F = rlhf_kernels
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(dtype)

    # The production shape of each op too: block sizes depend on it.
    for dtype in (torch.bfloat16, torch.float32):
        logits = randn(2, 152064, dtype=dtype).requires_grad_()
        labels = torch.randint(0, 152064, (2,), generator=gen)
        out = F.logprobs_from_logits(logits, labels, return_entropy=True, backend="triton")
        (out[0].sum() + out[1].sum()).backward()
        # Truncated sampling: the threshold kernel (both orders) and the row kernels with a threshold.
        for order in ("hf", "vllm"):
            out = F.logprobs_from_logits(logits, labels, return_entropy=True, top_k=50, top_p=0.9, min_p=0.05,
                                         truncation_order=order, backend="triton")
        (out[0].sum() + out[1].sum()).backward()
        for seq_len in (1024, 8192):
            rewards, values = randn(2, seq_len, dtype=dtype), randn(2, seq_len, dtype=dtype)
            F.compute_gae(rewards, values, torch.ones(2, seq_len, dtype=torch.bool), backend="triton")

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for vocab in (1000, 32000):
            logits = randn(2, 5, vocab, dtype=dtype).requires_grad_()
            labels = torch.randint(0, vocab, (2, 5), generator=gen)
            for entropy in (False, True):
                for inplace in (False, True):
                    x = logits.detach().clone().requires_grad_()
                    out = F.logprobs_from_logits(x, labels, return_entropy=entropy,
                                                 inplace_backward=inplace, backend="triton")
                    loss = out[0].sum() + out[1].sum() if entropy else out.sum()
                    loss.backward()
            # strided rows
            x = logits.detach().clone().requires_grad_()
            F.logprobs_from_logits(x[:, :-1], labels[:, :-1], temperature=0.7, backend="triton").sum().backward()
            # truncated (every dtype's threshold kernel and thresholded row kernels, in place too)
            for inplace in (False, True):
                x = logits.detach().clone().requires_grad_()
                out = F.logprobs_from_logits(x, labels, return_entropy=True, top_p=0.9, inplace_backward=inplace,
                                             backend="triton")
                (out[0].sum() + out[1].sum()).backward()

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        logp, ref = randn(4, 33, dtype=dtype).requires_grad_(), randn(4, 33, dtype=dtype).requires_grad_()
        for est in ("k1", "abs", "k2", "k3"):
            F.kl_penalty(logp, ref, estimator=est, backend="triton").sum().backward()
        values = randn(4, 33, dtype=dtype)
        mask = torch.ones(4, 33, dtype=torch.bool)
        scores = randn(4, dtype=dtype)
        for est in ("k1", "abs", "k2", "k3"):
            F.ppo_advantages(scores, logp.detach(), ref.detach(), values, mask, kl_coef=0.1,
                             estimator=est, backend="triton")
        F.ppo_advantages(scores, logp.detach(), ref.detach(), values, mask, kl_coef=torch.tensor(0.1),
                         whiten=False, backend="triton")
        F.compute_gae(randn(4, 33, dtype=dtype), values, mask, backend="triton")
        F.compute_gae(randn(4, 33, dtype=dtype), values, None, backend="triton")
        cu = torch.tensor([0, 10, 10, 40, 132], dtype=torch.int32)
        F.compute_gae(randn(132, dtype=dtype), randn(132, dtype=dtype), None, cu_seqlens=cu, backend="triton")
        F.ppo_advantages(scores, logp.detach().reshape(-1), ref.detach().reshape(-1), values.reshape(-1), None,
                         kl_coef=0.1, cu_seqlens=cu, backend="triton")

    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for seq_len in (7, 3000):
            logp = randn(3, seq_len, dtype=dtype).requires_grad_()
            old, adv, ref = randn(3, seq_len, dtype=dtype), randn(3, seq_len, dtype=dtype), randn(3, seq_len, dtype=dtype)
            mask = torch.ones(3, seq_len, dtype=torch.bool)
            for dual in (None, 3.0):
                F.ppo_policy_loss(logp, old, adv, mask, clip_high=0.28, dual_clip=dual,
                                  backend="triton")[0].backward()
            for loss_type in KERNEL_FORMS[1:]:  # the other objectives (FORM)
                F.ppo_policy_loss(logp, old, adv, mask, loss_type=loss_type, dro_beta=0.1,
                                  backend="triton")[0].backward()
            for loss_type in ("luspo", "vespo"):  # the rows-only forms 8 and 9
                F.ppo_policy_loss(logp, old, adv, mask, loss_type=loss_type, backend="triton")[0].backward()
            values = randn(3, seq_len, dtype=dtype).requires_grad_()
            F.ppo_value_loss(values, randn(3, seq_len, dtype=dtype), randn(3, seq_len, dtype=dtype), mask,
                             backend="triton")[0].backward()
            with torch.no_grad():
                F.ppo_policy_loss(logp, old, adv, mask, backend="triton")
                F.ppo_value_loss(values, old, adv, mask, backend="triton")
        logits = randn(2, 6, 1000, dtype=dtype).requires_grad_()
        labels = torch.randint(0, 1000, (2, 6), generator=gen)
        old, adv, ref = randn(2, 6), randn(2, 6), randn(2, 6)
        mask = torch.ones(2, 6, dtype=torch.bool)
        for est in ("k1", "k2", "k3", "abs"):
            F.ppo_loss_from_logits(logits, labels, old, adv, mask, ref_logp=ref, kl_coef=0.1,
                                   kl_estimator=est, entropy_coef=0.01, backend="triton")[0].backward()
        F.ppo_loss_from_logits(logits, labels, old, adv, mask, backend="triton")[0].backward()
        F.ppo_loss_from_logits(logits, labels, old, adv, mask, dual_clip=3.0, inplace_backward=True,
                               backend="triton")[0].backward()
        F.ppo_loss_from_logits(logits, labels, old, adv, mask, dual_clip=3.0, backend="triton")[0].backward()
        for loss_type in KERNEL_FORMS[1:]:
            F.ppo_loss_from_logits(logits, labels, old, adv, mask, ref_logp=ref, kl_coef=0.1, entropy_coef=0.01,
                                   loss_type=loss_type, dro_beta=0.1, backend="triton")[0].backward()

    rules = {"token_k1": 1.5, "seq_mean_k3": 0.1, "seq_max_k2": 0.2}
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for seq_len in (7, 8192):
            logp, rollout = randn(3, seq_len, dtype=dtype), randn(3, seq_len, dtype=dtype)
            for mask in (torch.ones(3, seq_len, dtype=torch.bool), torch.rand(3, seq_len, generator=gen)):
                F.rollout_correction(logp, rollout, mask, level="sequence", mode="mask", lower=0.5, upper=2.0,
                                     rejection=rules, backend="triton")
                F.rollout_correction(logp, rollout, mask, backend="triton")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, action="append", help="compute capability x10 (default 90)")
    ap.add_argument("--allow-spills", action="store_true", help="report spills without failing")
    ap.add_argument("--use-cache", action="store_true", help="reuse Triton's kernel cache")
    args = ap.parse_args(argv)
    arches = args.arch or [90]

    import tempfile

    _dispatch.triton_interpreter = lambda: True  # let backend="triton" take CPU tensors
    _lp.block_config = _pretend_cuda(_lp.block_config)
    _adv.elem_block = (lambda f: lambda device: f(torch.device("cuda")))(_adv.elem_block)
    _pl.token_block = _pretend_cuda(_pl.token_block)

    expected = sorted(
        name for mod in KERNEL_MODULES for name, obj in vars(mod).items()
        if isinstance(obj, JITFunction) and name.endswith("_kernel")
    )
    failures: list[str] = []
    results: list[Compiled] = []
    with tempfile.TemporaryDirectory() as workdir:
        for arch in arches:
            start = time.time()
            driver.set_active(_CompileOnlyDriver(arch))
            rec = _Recorder(arch, workdir)
            original = rec.install()
            try:
                _cases()
            except Exception as exc:  # a compile error surfaces here
                failures.append(f"sm_{arch}: {type(exc).__name__}: {exc}")
            finally:
                JITFunction.run = original
            missing = [k for k in expected if k not in rec.kernels_reached]
            if missing:
                failures.append(f"sm_{arch}: kernels never compiled: {', '.join(missing)}")
            results.extend(rec.seen.values())
            print(f"sm_{arch}: {len(rec.seen)} specialisations of {len(rec.kernels_reached)} kernels "
                  f"compiled in {time.time() - start:.0f} s", flush=True)

    print(f"{'arch':>5} {'kernel':<24} {'input':<8} {'warps':>5} {'regs':>5} {'spill B':>7} {'smem B':>7} {'ld bits':>7}  constexprs")
    for r in sorted(results, key=lambda r: (r.arch, r.kernel, r.dtype, r.constexprs)):
        print(f"sm_{r.arch:<2} {r.kernel:<24} {r.dtype:<8} {r.num_warps:>5} {str(r.registers):>5} "
              f"{str(r.spill_bytes):>7} {r.shared:>7} {r.widest_load:>7}  {r.constexprs}")
        if r.spill_bytes and not args.allow_spills:
            failures.append(f"sm_{r.arch} {r.kernel} ({r.constexprs}) spills {r.spill_bytes} B")
    for f in failures:
        print("FAIL:", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

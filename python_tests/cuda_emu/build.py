"""Build csrc/cuda/*.cu with g++ into one shared library that runs the kernels
on the CPU under the CUDA emulation of this folder (cuda_emu.h).

Each .cu is rewritten into a .cpp first, and each .cuh into a header of the
same name that the build finds before the original: ``kernel<T><<<grid, block, smem,
stream>>>(args)`` becomes ``::cuda_emu::launch("kernel<T>", __PRETTY_FUNCTION__,
kernel<T>, grid, block, smem, stream)(args)``, and ``__shared__ T name[N];``
becomes a function-local static that the first thread of each block poisons.
Line numbers are kept (and ``#line`` names the original file), so compiler
messages and the emulator's call sites point into csrc/cuda.

The library is cached under a key that hashes every input (sources, headers,
this folder, flags, compiler version).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
INCLUDE_DIR = ROOT / "csrc" / "include"
KERNEL_SOURCES = ("logprobs.cu", "advantages.cu", "ppo_loss.cu", "rollout_correction.cu", "truncation.cu")

CXX = os.environ.get("CXX", "g++")
CXXFLAGS = [
    "-std=c++17", "-O1", "-fPIC",
    # The emulator's barriers are opaque calls: nothing may be assumed about
    # the function-local statics that stand for shared memory across them.
    "-fno-ipa-reference", "-fno-strict-aliasing",
    "-ffp-contract=off", "-U_FORTIFY_SOURCE",
    "-Wall", "-Wno-unknown-pragmas",
]
# UB checks compiled into the kernels, reported by cuda_emu.cpp's handlers (not
# libubsan): a misaligned 16-byte Pack load faults on a GPU; on x86 it would
# silently work without this.
SANITIZE = [
    "-fsanitize=alignment,null,bounds,signed-integer-overflow,shift,bool,enum,vla-bound,"
    "pointer-overflow,float-cast-overflow,builtin,unreachable,return",
    "-fsanitize-recover=all",
]

# kernel or kernel<args> (one level of nested <>), then <<<config>>>(
_LAUNCH = re.compile(
    r"(?P<kernel>[A-Za-z_][\w:]*(?:\s*<(?:[^<>;{}]|<[^<>;{}]*>)*>)?)\s*<<<(?P<config>.*?)>>>\s*\(",
    re.S,
)
_SHARED = re.compile(
    r"__shared__\s+(?P<type>[^;{}()]*?)\s*\b(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\]]*\]\s*)*);"
)


def rewrite(source: str, filename: str) -> str:
    """The .cu text as C++ for the emulator (see the module docstring)."""
    if re.search(r"extern\s+__shared__", source):
        raise ValueError(f"{filename}: dynamic shared memory is not emulated")

    def launch(m: re.Match) -> str:
        kernel, config = m.group("kernel"), m.group("config")
        name = " ".join(kernel.split())
        newlines = m.group(0).count("\n") - config.count("\n")
        return (f'::cuda_emu::launch("{name}", __PRETTY_FUNCTION__, {kernel}, {config})'
                + "\n" * newlines + "(")

    out, n_launch = _LAUNCH.subn(launch, source)
    if n_launch != source.count("<<<"):
        raise ValueError(f"{filename}: rewrote {n_launch} of {source.count('<<<')} launches")

    def shared(m: re.Match) -> str:
        return (f"static {m.group('type')} {m.group('name')}{m.group('dims').rstrip()}; "
                f"::cuda_emu::shared_poison({m.group('name')});")

    out, n_shared = _SHARED.subn(shared, out)
    if n_shared != source.count("__shared__"):
        raise ValueError(f"{filename}: rewrote {n_shared} of {source.count('__shared__')} __shared__")
    return f'#line 1 "{filename}"\n' + out


def _inputs() -> list[Path]:
    files = sorted(CUDA_DIR.glob("*.cu")) + sorted(CUDA_DIR.glob("*.cuh")) + sorted(INCLUDE_DIR.rglob("*.h"))
    files += sorted(p for p in HERE.iterdir() if p.suffix in (".h", ".cpp", ".cu") or p.name == "build.py")
    return files


def cache_key() -> str:
    h = hashlib.sha256()
    version = subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True).stdout
    h.update(version.encode())
    h.update(" ".join(CXXFLAGS + SANITIZE).encode())
    for path in _inputs():
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:20]


def compiler_available() -> bool:
    return shutil.which(CXX) is not None


def _prune(cache_dir: Path, keep: int) -> None:
    """Remove all but the `keep` newest libraries (every source edit makes one)."""
    libraries = sorted(cache_dir.glob("cuda_emu_*.so"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in libraries[keep:]:
        for path in (old, old.with_suffix(".warnings.txt")):
            path.unlink(missing_ok=True)


def build(cache_dir: Path) -> Path:
    """Path of the emulated library, built into cache_dir unless already there.
    Raises RuntimeError with the compiler's output if compilation fails."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"cuda_emu_{cache_key()}.so"
    if target.exists():
        return target
    work = Path(tempfile.mkdtemp(prefix="build_", dir=cache_dir))
    try:
        units = []
        for name in KERNEL_SOURCES:
            src = CUDA_DIR / name
            dst = work / (src.stem + ".cpp")
            dst.write_text(rewrite(src.read_text(), f"csrc/cuda/{name}"))
            units.append(dst)
        for src in sorted(CUDA_DIR.glob("*.cuh")):  # device code of the kernels' own headers
            (work / src.name).write_text(rewrite(src.read_text(), f"csrc/cuda/{src.name}"))
        selftest = work / "selftest.cpp"
        selftest.write_text(rewrite((HERE / "selftest.cu").read_text(), "python_tests/cuda_emu/selftest.cu"))
        units += [selftest, HERE / "cuda_emu.cpp", HERE / "wrappers.cpp"]
        includes = ["-include", "cuda_emu.h", "-I", str(HERE), "-I", str(INCLUDE_DIR), "-I", str(work),
                    "-I", str(CUDA_DIR)]

        def compile_unit(unit: Path) -> tuple[Path, subprocess.CompletedProcess]:
            obj = work / (unit.stem + ".o")
            sanitize = [] if unit.name == "cuda_emu.cpp" else SANITIZE  # not the handlers themselves
            cmd = [CXX, *CXXFLAGS, *sanitize, *includes, "-c", str(unit), "-o", str(obj)]
            return obj, subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            results = list(pool.map(compile_unit, units))
        errors = [f"{unit.name}:\n{r.stderr}" for unit, (_, r) in zip(units, results) if r.returncode != 0]
        if errors:
            raise RuntimeError("emulated CUDA build failed:\n" + "\n".join(errors))
        tmp_so = work / "cuda_emu.so"
        # --no-undefined: a sanitizer handler that cuda_emu.cpp lacks fails here, not at load.
        link = subprocess.run([CXX, "-shared", "-Wl,--no-undefined", "-o", str(tmp_so),
                               *[str(o) for o, _ in results]],
                              capture_output=True, text=True)
        if link.returncode != 0:
            raise RuntimeError("emulated CUDA link failed:\n" + link.stderr)
        warnings = "".join(r.stderr for _, r in results)
        (work / "warnings.txt").write_text(warnings)
        os.replace(tmp_so, target)  # atomic: concurrent sessions see all or nothing
        shutil.copy(work / "warnings.txt", target.with_suffix(".warnings.txt"))
        _prune(cache_dir, keep=4)
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)

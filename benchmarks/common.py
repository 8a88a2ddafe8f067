"""Shared benchmark machinery: timing, memory, bandwidth, environment, JSON lines.

GPU timings use ``triton.testing.do_bench`` (median and 20/80 quantiles);
CPU timings a warmed-up loop of ``time.perf_counter`` with the same quantiles.
Every result is appended as one JSON line to ``benchmarks/results/<device>.jsonl``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from rlhf_kernels import _memory

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {cpu} x{torch.get_num_threads()} threads"


def cpu_isa() -> str:
    """The vector ISA torch's CPU kernels use here, and AMX where the CPU has it:
    two CPUs of one model name can differ (bf16 GEMMs ~6x apart)."""
    isa = torch.backends.cpu.get_cpu_capability()
    return isa + ("+AMX" if torch.cpu._is_amx_tile_supported() else "")


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "device": device_name(device),
        "cpu_isa": cpu_isa(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "git_commit": commit,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def time_fn(fn: Callable[[], object], device: torch.device, setup: Callable[[], object] | None = None,
            min_runs: int = 5, max_seconds: float = 2.0) -> Timing:
    """Time fn(). `setup` runs before each call, outside the timed region
    (e.g. to clone a buffer that an in-place kernel overwrites)."""
    if device.type == "cuda":
        import triton.testing

        if setup is None:
            ms = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        else:
            # do_bench cannot exclude setup; time with events per call instead.
            times = []
            for _ in range(3):
                setup(); fn()
            torch.cuda.synchronize()
            for _ in range(max(min_runs, 20)):
                setup()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(); fn(); end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            ms = _quantiles(times)
        return Timing(*ms)
    if setup is not None:
        setup()
    fn()  # warm-up
    times: list[float] = []
    deadline = time.perf_counter() + max_seconds
    while len(times) < min_runs or (time.perf_counter() < deadline and len(times) < 50):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return Timing(*_quantiles(times))


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, Timing | Exception]:
    """CPU timing of several providers of one workload, round-robin: a warm-up
    call each, then ``rounds`` rounds calling each provider once in turn, so a
    slow spell of a shared machine falls on every provider alike rather than
    on whichever ran then. A provider that raises gets its exception instead of
    a Timing and is left out of the later rounds."""
    times: dict[str, list[float]] = {}
    out: dict[str, Timing | Exception] = {}
    for name, fn in fns.items():
        try:
            fn()
            times[name] = []
        except Exception as exc:  # noqa: BLE001 - a failing peer must not stop the run
            out[name] = exc
    for _ in range(rounds):
        for name in list(times):
            start = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    for name, ts in times.items():
        out[name] = Timing(*_quantiles(ts))
    return {name: out[name] for name in fns}


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    ordered = sorted(times)
    q = statistics.quantiles(ordered, n=10, method="inclusive") if len(ordered) > 1 else [ordered[0]] * 9
    return statistics.median(ordered), q[1], q[7]


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device copy bandwidth, counting bytes read plus bytes written."""
    nbytes = nbytes if device.type == "cuda" else nbytes // 4
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device)
    return 2 * nbytes / (timing.median_ms * 1e-3) / 1e9


def peak_memory_gpu(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by fn() above what was allocated before it."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _proc_status_bytes(field: str) -> int:
    kb = _memory.status_kb(field)
    if kb is None:
        raise RuntimeError(f"{field} not in /proc/self/status")
    return kb * 1024


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return _proc_status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident set (VmHWM, not ru_maxrss:
    see rlhf_kernels/_memory.py)."""
    return _proc_status_bytes("VmHWM")


def int_from_subprocess(code: str, timeout: float) -> int | None:
    """Run ``python -c code`` in a fresh process; the integer on its last stdout
    line, or None if it failed (a peer that crashes must not stop a run)."""
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
        return int(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def json_from_processes(code: str, ranks: int = 1, timeout: float = 1800) -> dict:
    """Run ``python -c code`` in ``ranks`` fresh processes at once (environment
    ``RANK`` = 0, 1, ...); the JSON object on rank 0's last stdout line.
    RuntimeError with each failed rank's exit code and stderr tail. Output goes
    to files, not pipes: a rank blocked on a full pipe would hang its peers."""
    files = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in range(ranks)]
    try:
        procs = [subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, RANK=str(r)), stdout=out,
                                  stderr=err, text=True) for r, (out, err) in enumerate(files)]
        for p in procs:
            p.wait(timeout=timeout)
        texts = []
        for out, err in files:
            out.seek(0)
            err.seek(0)
            texts.append((out.read(), err.read()))
    finally:
        for out, err in files:
            out.close()
            err.close()
    failed = [f"rank {r}: exit code {p.returncode}\n{err[-2000:]}"
              for r, (p, (_, err)) in enumerate(zip(procs, texts)) if p.returncode]
    if failed:
        raise RuntimeError("\n".join(failed))
    return json.loads(texts[0][0].strip().splitlines()[-1])


def reset_peak_rss() -> None:
    """Reset the high-water mark to the resident size now (Linux clear_refs 5),
    so that a later peak_rss_bytes() is the peak of what runs after this call."""
    _memory.reset_peak_rss()


@dataclass
class Result:
    op: str
    provider: str
    mode: str
    shape: list[int]
    dtype: str
    timing: Timing
    min_bytes: int
    copy_gbps: float
    peak_mem_bytes: int | None = None
    input_bytes: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        return self.min_bytes / (self.timing.median_ms * 1e-3) / 1e9

    def record(self, env: dict) -> dict:
        row = dict(env)
        row.update(
            op=self.op, provider=self.provider, mode=self.mode, shape=self.shape, dtype=self.dtype,
            **asdict(self.timing), min_bytes=self.min_bytes, gbps=self.gbps,
            copy_gbps=self.copy_gbps, frac_copy_bw=self.gbps / self.copy_gbps,
            peak_mem_bytes=self.peak_mem_bytes,
            peak_mem_over_input=(round(self.peak_mem_bytes / self.input_bytes, 3)
                                 if self.peak_mem_bytes is not None and self.input_bytes else None),
            **self.extra,
        )
        return row


def write_results(rows: list[dict], env: dict, out_dir: Path = RESULTS_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{device_slug(env['device'])}.jsonl"
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def print_table(rows: list[dict], file=None) -> None:
    file = file or sys.stdout  # looked up per call: stdout may have been replaced
    if not rows:
        return
    cols = ["op", "mode", "shape", "dtype", "provider", "median_ms", "gbps", "frac_copy_bw", "peak_mem_over_input"]
    text = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in text)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)), file=file)
    for t in text:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)), file=file)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if v < 100 else f"{v:.1f}"
    if isinstance(v, list):
        return "x".join(str(x) for x in v)
    return "-" if v is None else str(v)


def progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def is_quick() -> bool:
    return os.environ.get("RLHF_BENCH_QUICK", "0") == "1"

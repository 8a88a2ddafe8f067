"""pytest-benchmark layer of the CPU benchmarks (``pytest benchmarks/ --benchmark-only``).

The tests in ``test_bench_cpu.py`` time the cases of the bench_*.py scripts
with pytest-benchmark's ``benchmark`` fixture; each timed case becomes a
``common.Result`` and, at the end of the session, one JSON line in
``--bench-out-dir`` (default ``benchmarks/results``), exactly as the scripts
write them. ``RLHF_BENCH_QUICK=1`` shrinks the shapes to a smoke test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from benchmarks import common

RESULTS: list[common.Result] = []


def pytest_addoption(parser):
    parser.addoption("--bench-out-dir", default=str(common.RESULTS_DIR), help="where the JSON lines go")


@pytest.fixture(scope="session")
def copy_gbps():
    return common.copy_bandwidth_gbps(torch.device("cpu"), 1 << 24 if common.is_quick() else 1 << 30)


@pytest.fixture
def record(benchmark, copy_gbps):
    """record(op, provider, mode, shape, dtype, min_bytes): store the timing of
    the ``benchmark`` call this test just made."""

    def add(op, provider, mode, shape, dtype, min_bytes, **extra):
        stats = getattr(benchmark, "stats", None)
        if stats is None or not getattr(stats, "stats", None) or not stats.stats.data:
            return  # --benchmark-disable: the function ran once, untimed
        ms = [t * 1e3 for t in stats.stats.data]
        timing = common.Timing(*common._quantiles(ms))
        RESULTS.append(common.Result(op=op, provider=provider, mode=mode, shape=list(shape), dtype=dtype,
                                     timing=timing, min_bytes=min_bytes, copy_gbps=copy_gbps, extra=extra))

    return add


def pytest_sessionfinish(session, exitstatus):
    if not RESULTS:
        return
    env = common.environment(torch.device("cpu"))
    rows = [r.record(env) for r in RESULTS]
    eager = {(r["op"], r["mode"], tuple(r["shape"])): r["median_ms"] for r in rows if r["provider"] in
             ("eager", "eager (TRL/verl)", "python_loop")}
    for r in rows:
        base = eager.get((r["op"], r["mode"], tuple(r["shape"])))
        r["speedup_vs_eager"] = round(base / r["median_ms"], 2) if base else None
    path = common.write_results(rows, env, Path(session.config.getoption("--bench-out-dir")))
    common.print_table(rows)
    print(f"results appended to {path}")
    RESULTS.clear()

"""The ``rlhf-kernels`` command.

    rlhf-kernels bench [--quick] [--only logprobs,...]   microbenchmarks of the present device
    rlhf-kernels info                                     what this install has
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

BENCHMARKS = ("logprobs", "advantages", "losses")


def _benchmarks_dir() -> Path:
    path = Path(__file__).resolve().parent.parent / "benchmarks"
    if not (path / "common.py").exists():
        raise SystemExit(
            "rlhf-kernels bench: the benchmarks/ folder of a source checkout is needed "
            f"(looked in {path}); clone the repository and install it with "
            "`pip install --no-build-isolation -e .`"
        )
    return path


def bench(args: argparse.Namespace) -> int:
    bench_dir = _benchmarks_dir()
    sys.path.insert(0, str(bench_dir))
    names = [n for n in (args.only.split(",") if args.only else BENCHMARKS) if n]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"--only: unknown benchmark(s) {unknown}; choose from {BENCHMARKS}")
    ran = 0
    for name in names:
        if not (bench_dir / f"bench_{name}.py").exists():
            print(f"[bench] {name}: not written yet, skipped", file=sys.stderr)
            continue
        module = importlib.import_module(f"bench_{name}")
        argv = ["--quick"] if args.quick else []
        if args.device:
            argv += ["--device", args.device]
        if args.out_dir:
            argv += ["--out-dir", args.out_dir]
        print(f"\n== bench_{name} ==", flush=True)
        module.main(argv)
        ran += 1
    return 0 if ran else 1


def info(_: argparse.Namespace) -> int:
    import torch

    import rlhf_kernels

    print(f"rlhf_kernels {rlhf_kernels.__version__}, torch {torch.__version__}")
    print(f"available backends: {', '.join(rlhf_kernels.available_backends())}")
    print(f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf-kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_bench = sub.add_parser("bench", help="run the microbenchmarks on the present device")
    p_bench.add_argument("--quick", action="store_true", help="tiny shapes, a smoke test")
    p_bench.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    p_bench.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p_bench.add_argument("--out-dir", default=None, help="where JSON lines go (default benchmarks/results)")
    p_bench.set_defaults(func=bench)
    p_info = sub.add_parser("info", help="print the backends this install has")
    p_info.set_defaults(func=info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

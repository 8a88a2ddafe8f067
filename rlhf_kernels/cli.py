"""The ``rlhf-kernels`` command.

    rlhf-kernels train [--config FILE] [--model PATH] [--reward-model PATH]
                       [--device cpu|cuda] [--backend NAME] [--out DIR] [--resume]
                       [--strategy ddp|fsdp] [--precision fp32|bf16] [--offload ref,reward]
                                                          SFT -> reward model -> PPO (the main job)
    rlhf-kernels sft --model DIR --data FILE.jsonl --out DIR   supervised fine-tuning on your data
    rlhf-kernels rm  --model DIR --data FILE.jsonl --out DIR   a reward model on your rankings
    rlhf-kernels ppo --policy DIR (--reward-model DIR | --reward-fn FILE.py:fn) --prompts FILE.jsonl --out DIR
                                                          PPO on your own model, prompts and reward
    rlhf-kernels bench [--quick] [--only logprobs,...]   microbenchmarks of the present device
                       [--pytest]                         CPU: through pytest-benchmark instead
    rlhf-kernels info                                     what this install has
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path
from typing import NoReturn

BENCHMARKS = ("logprobs", "advantages", "ppo_loss", "rollout_correction", "overhead", "lm_head", "vocab_parallel",
              "trainer", "lora")


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
    sys.path.insert(0, str(bench_dir.parent))
    names = [n for n in (args.only.split(",") if args.only else BENCHMARKS) if n]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"--only: unknown benchmark(s) {unknown}; choose from {BENCHMARKS}")
    if args.pytest:
        return _bench_pytest(bench_dir, names, args)
    ran = 0
    for name in names:
        if not (bench_dir / f"bench_{name}.py").exists():
            print(f"[bench] {name}: not written yet, skipped", file=sys.stderr)
            continue
        module = importlib.import_module(f"benchmarks.bench_{name}")
        argv = ["--quick"] if args.quick else []
        if args.device:
            argv += ["--device", args.device]
        if args.out_dir:
            argv += ["--out-dir", args.out_dir]
        print(f"\n== bench_{name} ==", flush=True)
        module.main(argv)
        ran += 1
    return 0 if ran else 1


PYTEST_TESTS = {"logprobs": "test_logprobs", "advantages": "test_advantages", "ppo_loss": "test_token_losses"}


def _bench_pytest(bench_dir: Path, names: list[str], args: argparse.Namespace) -> int:
    """CPU timings via ``pytest benchmarks/ --benchmark-only`` (benchmarks/test_bench_cpu.py),
    in a fresh process; the same JSON lines as the scripts."""
    import os
    import subprocess

    if (args.device or "cpu") != "cpu":
        raise SystemExit("--pytest: the pytest-benchmark layer times the CPU only; GPUs use the scripts")
    cmd = [sys.executable, "-m", "pytest", str(bench_dir / "test_bench_cpu.py"), "--benchmark-only", "-q",
           "-p", "no:cacheprovider", "-k", " or ".join(PYTEST_TESTS[n] for n in names)]
    if args.out_dir:
        cmd += ["--bench-out-dir", args.out_dir]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(bench_dir.parent), env.get("PYTHONPATH")) if p)
    if args.quick:
        env["RLHF_BENCH_QUICK"] = "1"
    print(f"[bench] {' '.join(cmd)}", file=sys.stderr, flush=True)
    return subprocess.run(cmd, env=env, cwd=str(bench_dir.parent)).returncode


def train(args: argparse.Namespace) -> int:
    from .trainer.args import apply_rollout_flags
    from .trainer.config import ConfigError, TrainConfig, load_config

    try:
        cfg = load_config(args.config) if args.config else TrainConfig()
        for name in ("model", "reward_model", "device", "backend", "out", "report_to"):
            value = getattr(args, name)
            if value is not None:
                setattr(cfg, name, value)
        if args.strategy is not None:
            cfg.ppo.strategy = args.strategy
        if args.precision is not None:  # every stage
            cfg.sft.precision = cfg.reward.precision = cfg.ppo.precision = args.precision
        if args.offload is not None:
            from .trainer.commands import parse_offload

            cfg.ppo.offload = parse_offload(args.offload)
        apply_rollout_flags(args, cfg.ppo)
        from .trainer import pipeline

        summary = pipeline.run(cfg, resume=args.resume)
    except (ConfigError, ValueError) as exc:
        print(f"rlhf-kernels train: {exc}", file=sys.stderr)
        return 2
    return 130 if summary.get("interrupted") else 0


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
    p_bench.add_argument("--pytest", action="store_true",
                         help="CPU only: time through pytest-benchmark (pytest benchmarks/ --benchmark-only)")
    p_bench.set_defaults(func=bench)
    from .trainer.args import add_backend_flag, add_parallel_flags, add_report_flag, add_rollout_flags

    p_train = sub.add_parser("train", help="SFT -> reward model -> PPO on the embedded task (the main job)")
    p_train.add_argument("--config", default=None, help="JSON file with TrainConfig fields")
    p_train.add_argument("--model", default=None, help="local path of a causal LM (default: the embedded tiny Llama)")
    p_train.add_argument("--reward-model", dest="reward_model", default=None, help="local path of the reward model's trunk")
    p_train.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    add_backend_flag(p_train)
    p_train.add_argument("--out", default=None, help="output directory (default: runs/default)")
    p_train.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    add_parallel_flags(p_train, every_stage=True)
    add_rollout_flags(p_train)
    add_report_flag(p_train)
    p_train.set_defaults(func=train)
    from .trainer.commands import add_ppo_parser, add_stage_parsers

    add_stage_parsers(sub)
    add_ppo_parser(sub)
    p_info = sub.add_parser("info", help="print the backends this install has")
    p_info.set_defaults(func=info)
    args = parser.parse_args(argv)
    return args.func(args)


def run(argv: list[str] | None = None) -> NoReturn:
    """The command-line entry point (``rlhf-kernels``, ``python -m
    rlhf_kernels.cli``): ``main``, then the process ends through
    ``exit_process`` (which skips the interpreter's finalisation where a
    process group was set up), an exception as Python reports it (traceback,
    exit code 1; 130 for an interrupt)."""
    from .trainer.utils import exit_process

    try:
        code = main(argv)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 130
    except BaseException:  # noqa: BLE001 -- reported, then the same exit path
        traceback.print_exc()
        code = 1
    exit_process(code)


if __name__ == "__main__":
    run()

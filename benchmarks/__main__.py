"""``python -m benchmarks [--quick] [--only logprobs,overhead,...] [--device cuda] [--out-dir DIR] [--pytest]``:
the microbenchmarks of the present device (the same as ``rlhf-kernels bench``).
One benchmark alone: ``python -m benchmarks.bench_<name> [--quick] ...``."""

import sys

from rlhf_kernels.cli import main

raise SystemExit(main(["bench", *sys.argv[1:]]))

#!/usr/bin/env bash
# The main job: set up, then run the microbenchmarks of the present device and
# print their table (results appended to benchmarks/results/<device>.jsonl).
# Extra arguments go to `rlhf-kernels bench` (e.g. --quick, --only logprobs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${PYTHON:-python3}" -m rlhf_kernels.cli bench "$@"

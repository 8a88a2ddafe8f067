#!/usr/bin/env bash
# The main job: set up, then run the whole InstructGPT pipeline on the embedded
# synthetic task (SFT -> reward model -> PPO with KL penalty), printing the
# held-out true score of the SFT and the PPO policy and where the outputs are.
# Extra arguments go to `rlhf-kernels train` (e.g. --device cuda, --out DIR).
# The microbenchmarks are `rlhf-kernels bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${PYTHON:-python3}" -m rlhf_kernels.cli train "$@"

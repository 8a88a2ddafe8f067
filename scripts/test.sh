#!/usr/bin/env bash
# The whole test suite: set up, then run every Python test (Triton through its
# interpreter where there is no GPU; GPU-only tests run where a GPU is present).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh --test
exec "${PYTHON:-python3}" -m pytest python_tests -q "$@"

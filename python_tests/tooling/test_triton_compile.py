"""Every Triton kernel compiles for real GPU targets (sm_90, sm_80) on this
machine, GPU or not: scripts/triton_aot_check.py drives the public ops through
Triton's JIT with a compile-only driver. The interpreter tests check the
numbers; this checks what the interpreter cannot (the compiler accepting the
code, spills)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_kernels import _dispatch

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.mark.skipif(not _dispatch.triton_installed(), reason="Triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the test suite compiles and runs every kernel for real")
def test_every_triton_kernel_compiles_for_sm90_and_sm80_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "triton_aot_check.py"), "--arch", "90", "--arch", "80"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for arch in (90, 80):
        m = re.search(rf"sm_{arch}: (\d+) specialisations of (\d+) kernels", proc.stdout)
        assert m and int(m.group(2)) == 12 and int(m.group(1)) > 50, proc.stdout[:2000]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("sm_")]
    kernels = {row[1] for row in rows if len(row) > 6}
    assert {"_logprobs_fwd_kernel", "_logprobs_bwd_kernel", "_advantages_kernel", "_kl_fwd_kernel",
            "_kl_bwd_kernel", "_ppo_policy_fwd_kernel", "_ppo_value_fwd_kernel", "_ppo_logits_grad_kernel",
            "_scale_unless_one_kernel", "_scale_by_sign_kernel", "_truncation_threshold_kernel"} <= kernels
    # The production logits shape streams with 16-byte loads.
    fwd = [row for row in rows if len(row) > 7 and row[1] == "_logprobs_fwd_kernel" and row[2] == "bfloat16"
           and "BLOCK_V=4096," in row]
    assert fwd and all(int(row[7]) == 128 for row in fwd)


def test_aot_check_refuses_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "triton_aot_check.py")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "unset TRITON_INTERPRET" in proc.stderr

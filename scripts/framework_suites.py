"""Run verl's and OpenRLHF's own CPU tests of the functions we patch, on our adapters.

Both frameworks ship their test suites in their wheels (``tests/`` at the top
of verl's, ``openrlhf-<v>.data/purelib/tests/`` in OpenRLHF's; OpenRLHF has no
sdist on PyPI, and verl's sdist holds the same ``tests/`` as its wheel). This
script downloads the two pinned wheels (``pip download --no-deps``, checked
against the sha256 below, cached in ``--cache``), takes ``tests/`` out of each
(nothing else: the tests run against the installed framework, which must be the
pinned version), and runs the selected files with pytest twice, in separate
processes, each with ``rlhf_kernels.integrations.pytest_plugin``:

1. unpatched: the baseline; every test must pass (or be in ``DESELECTED``);
2. ``--rlhf-patch=<framework> --rlhf-require-served``: every test must pass
   (or be in ``KNOWN_FAILURES``) and each file must have had at least one call
   served by our ops.

It prints the calls served / handed back per file and function, and the
timings; it exits non-zero on any unexpected failure, a stale list entry that
no longer fails, or a file with no served call. Offline, it prints why and
exits 0, except under CI=true, where a missing archive or framework is an
error.

    python scripts/framework_suites.py [--cache DIR] [--report-dir DIR] [--framework verl]

OpenRLHF's tests load its sources by path (``<tests>/../openrlhf/models/loss.py``
under a private module name), not through ``import openrlhf``, so a patch of the
installed package would never reach them. The staged tree therefore puts
there, for the modules our patch targets (``INSTALLED_MODULES``), a module that
re-exports the installed, patched one, and links every other file to the
installed copy; a ``conftest.py`` imports those modules before collection in
both runs, as ``patch()`` does in the patched one.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

CI = os.environ.get("CI") == "true"


@dataclass(frozen=True)
class Suite:
    framework: str  # import name, and the name --rlhf-patch takes
    version: str  # the installed version must be this one
    wheel: str
    sha256: str
    download_args: tuple[str, ...]  # pins the one wheel file, whatever the local interpreter
    tests_prefix: str  # where tests/ sits in the wheel
    files: tuple[str, ...]  # relative to the staged root
    stubs: str = ""  # --rlhf-stub-modules
    installed_modules: tuple[str, ...] = ()  # loaded by path by the tests: staged as the installed ones
    excluded: dict[str, str] = field(default_factory=dict)  # files considered and left out, with why


SUITES = (
    Suite(
        framework="verl",
        version="0.9.1",
        wheel="verl-0.9.1-py3-none-any.whl",
        sha256="db6e6f2a8d9d5808d9ec32d357a42319fdc6967df688ff9d9810050f49bfdd14",
        download_args=(),
        tests_prefix="tests/",
        files=(
            "tests/trainer/ppo/test_core_algos_on_cpu.py",  # kl_penalty, GAE, GRPO, RLOO
            "tests/trainer/ppo/test_loss_aggregation_on_cpu.py",  # agg_loss
            "tests/trainer/ppo/test_dynamic_policy_losses_on_cpu.py",  # agg_loss under the DRO loss
            "tests/trainer/ppo/test_value_loss_normalization_on_cpu.py",  # compute_value_loss
            "tests/trainer/ppo/test_rollout_corr_integration.py",  # compute_policy_loss_vanilla
            "tests/trainer/ppo/test_rollout_corr.py",  # compute_rollout_correction_weights
            "tests/trainer/ppo/test_reinforce_pp_multiturn_on_cpu.py",  # REINFORCE++ advantages
        ),
        excluded={
            "tests/trainer/test_multi_trajectories_advantage_on_cpu.py":
                "imports verl.trainer.ppo.v1, which needs transfer_queue (not installed)",
        },
    ),
    Suite(
        framework="openrlhf",
        version="0.11.2",
        wheel="openrlhf-0.11.2-cp311-cp311-manylinux1_x86_64.whl",
        sha256="c969d70db03a70724c3d8a5a01186c6e0728bce624fb3dff95e39b5396acefa6",
        download_args=("--python-version", "3.11", "--implementation", "cp", "--platform", "manylinux1_x86_64"),
        tests_prefix="openrlhf-0.11.2.data/purelib/tests/",
        files=(
            "tests/test_loss_aggregation.py",  # PolicyLoss
            "tests/test_kl_estimator_gradient.py",  # compute_approx_kl
            "tests/test_actor_entropy_temperature.py",  # Actor: log_probs_from_logits, compute_entropy
            "tests/test_reward_shaping.py",  # get_advantages_and_returns (GAE), PolicyLoss
        ),
        stubs="flash_attn,vllm",
        installed_modules=(
            "openrlhf.models.utils",
            "openrlhf.models.loss",
            "openrlhf.models.actor",
            "openrlhf.trainer.ppo_utils.experience_maker",
        ),
        excluded={
            "tests/test_preference_eval.py": "reads models/loss.py as text (the staged file re-exports)",
            "tests/test_sft_trainer.py": "the SFT loss is not patched",
        },
    ),
)

# Tests that fail unpatched too, here (missing packages, no GPU): deselected in
# both runs. {node id: reason}
DESELECTED: dict[str, str] = {}

# Tests that fail patched and pass unpatched because of a documented semantic
# difference of our adapters. {node id: (reason, what was measured)}
KNOWN_FAILURES: dict[str, tuple[str, str]] = {}


class Skip(Exception):
    """Nothing to run here (offline, framework absent); an error under CI=true."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(suite: Suite, cache: Path) -> Path:
    """The suite's wheel from the cache, downloaded first if absent."""
    path = cache / suite.wheel
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", "--dest", str(cache), *suite.download_args,
               f"{suite.framework}=={suite.version}"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0 or not path.exists():
            raise Skip(f"could not download {suite.wheel} ({' '.join(cmd)}): {out.stderr.strip()[-500:]}")
    digest = _sha256(path)
    if digest != suite.sha256:
        sys.exit(f"framework_suites: {path} has sha256 {digest}, expected {suite.sha256}; delete it to re-download")
    return path


def check_installed(suite: Suite) -> None:
    try:
        version = importlib.metadata.version(suite.framework)
    except importlib.metadata.PackageNotFoundError:
        raise Skip(f"{suite.framework} is not installed (bash scripts/setup_env.sh --test installs it)") from None
    if version != suite.version:
        sys.exit(f"framework_suites: {suite.framework} {version} is installed; these tests are {suite.version}'s")


_INSTALLED_MODULE = '''\
"""Staged by scripts/framework_suites.py: OpenRLHF's tests load this file by
path; it is the installed {name} (patched where the run patches), so that
they test the installed package."""

import importlib as _importlib

_installed = _importlib.import_module("{name}")
globals().update({{k: v for k, v in vars(_installed).items() if not (k.startswith("__") and k.endswith("__"))}})
'''

_CONFTEST = '''\
"""Staged by scripts/framework_suites.py: import, before collection, the
installed modules that the files beside the tests re-export, as the patched
run's patch() does (so that both runs import them in the same state)."""

import importlib

import pytest


@pytest.hookimpl(trylast=True)  # after the plugin's stand-ins
def pytest_configure(config):
    for name in {modules!r}:
        importlib.import_module(name)
'''


def stage(suite: Suite, wheel: Path, root: Path) -> None:
    """``root/tests`` from the wheel; for a suite with ``installed_modules``,
    ``root/<framework>`` as described in the module docstring."""
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.filename.startswith(suite.tests_prefix) and not info.is_dir():
                target = root / "tests" / info.filename[len(suite.tests_prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(info))
    (root / "pytest.ini").write_text("[pytest]\n")  # this file, not an outer project's, configures the run
    if not suite.installed_modules:
        return
    installed = Path(importlib.util.find_spec(suite.framework).origin).parent
    # Links, without __init__.py: the staged directory is then at most a namespace
    # portion, and `import openrlhf` keeps finding the installed (regular) package.
    shutil.copytree(installed, root / suite.framework, copy_function=os.symlink,
                    ignore=shutil.ignore_patterns("__pycache__", "__init__.py"))
    for name in suite.installed_modules:
        path = root.joinpath(*name.split(".")).with_suffix(".py")
        path.unlink()
        path.write_text(_INSTALLED_MODULE.format(name=name))
    (root / "conftest.py").write_text(_CONFTEST.format(modules=suite.installed_modules))


def run_pytest(suite: Suite, root: Path, report: Path, patched: bool) -> tuple[int, float, dict]:
    """One pytest process over the suite's files: (exit code, seconds, JSON report)."""
    cmd = [sys.executable, "-m", "pytest", "-c", "pytest.ini", "--rootdir", ".", "-p", "no:cacheprovider",
           "-q", "--tb=short", "--disable-warnings", "-p", "rlhf_kernels.integrations.pytest_plugin",
           f"--rlhf-report={report}"]
    if suite.stubs:
        cmd.append(f"--rlhf-stub-modules={suite.stubs}")
    if patched:
        cmd += [f"--rlhf-patch={suite.framework}", "--rlhf-require-served"]
    for nodeid in DESELECTED:
        if nodeid.split("::")[0] in suite.files:
            cmd += ["--deselect", nodeid]
    cmd += suite.files
    label = "patched" if patched else "unpatched"
    print(f"\n== {suite.framework} {suite.version}, {label}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    rc = subprocess.run(cmd, cwd=root, timeout=600).returncode
    seconds = time.perf_counter() - start
    data = json.loads(report.read_text()) if report.exists() else {"files": {}}
    return rc, seconds, data


def _failures(data: dict) -> dict[str, str]:
    return {nodeid: outcome for f in data["files"].values() for nodeid, outcome in f["tests"].items()
            if outcome in ("failed", "error")}


def check(suite: Suite, base: tuple[int, float, dict], patched: tuple[int, float, dict]) -> list[str]:
    """The problems of one suite's two runs, printed with the coverage table."""
    problems = []
    for label, (rc, _, data) in (("unpatched", base), ("patched", patched)):
        if rc not in (0, 1):  # 2+: interrupted, internal or usage error, nothing collected
            problems.append(f"{suite.framework} {label}: pytest exited with {rc}")
        ran = {path for path, f in data["files"].items() if f["ran"]}
        problems += [f"{suite.framework} {label}: {path} ran no test" for path in suite.files if path not in ran]
    base_failed, patched_failed = _failures(base[2]), _failures(patched[2])
    for nodeid, outcome in sorted(base_failed.items()):
        problems.append(f"{nodeid}: {outcome} unpatched (fix the environment, or deselect it with its reason)")
    for nodeid, outcome in sorted(patched_failed.items()):
        if nodeid in KNOWN_FAILURES:
            reason, measured = KNOWN_FAILURES[nodeid]
            print(f"known failure {nodeid}: {reason} ({measured})")
        elif nodeid not in base_failed:
            problems.append(f"{nodeid}: {outcome} patched, passes unpatched (an adapter bug?)")
    for nodeid in KNOWN_FAILURES:
        if nodeid.split("::")[0] in suite.files and nodeid not in patched_failed:
            problems.append(f"{nodeid}: listed in KNOWN_FAILURES but did not fail patched (remove it)")

    print(f"\n-- {suite.framework} {suite.version} on rlhf_kernels: calls served / handed back")
    for path in suite.files:
        f = patched[2]["files"].get(path, {"ran": 0, "targets": {}})
        served = sum(t["served"] for t in f["targets"].values())
        back = sum(sum(t["handed_back"].values()) for t in f["targets"].values())
        print(f"{path}: {f['ran']} tests, served {served}, handed back {back}")
        for key, t in sorted(f["targets"].items()):
            reasons = "; ".join(f"{r}: {n}" for r, n in sorted(t["handed_back"].items()))
            print(f"    {key:<55} served {t['served']:>5}" + (f"  handed back ({reasons})" if reasons else ""))
        if f["ran"] and not served:
            problems.append(f"{path}: no call served by rlhf_kernels")
    for path, reason in suite.excluded.items():
        print(f"not run: {path} ({reason})")
    for nodeid, reason in DESELECTED.items():
        if nodeid.split("::")[0] in suite.files:
            print(f"deselected: {nodeid} ({reason})")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/rlhf_kernels/framework_suites",
                        help="where the downloaded wheels are kept (default: %(default)s)")
    parser.add_argument("--report-dir", type=Path, default=None,
                        help="keep the plugin's JSON reports (<framework>.{unpatched,patched}.json) here")
    parser.add_argument("--framework", action="append", choices=[s.framework for s in SUITES],
                        help="run only this framework's suite (repeatable; default: all)")
    args = parser.parse_args()
    suites = [s for s in SUITES if not args.framework or s.framework in args.framework]

    start = time.perf_counter()
    problems, timings = [], []
    for suite in suites:
        try:
            check_installed(suite)
            wheel = fetch(suite, args.cache)
        except Skip as exc:
            if CI:
                print(f"framework_suites: {exc}", file=sys.stderr)
                return 1
            print(f"framework_suites: skipping {suite.framework}: {exc}")
            continue
        with tempfile.TemporaryDirectory(prefix=f"rlhf-{suite.framework}-suite-") as tmp:
            root = Path(tmp)
            stage(suite, wheel, root)
            reports = args.report_dir or root
            reports.mkdir(parents=True, exist_ok=True)
            base = run_pytest(suite, root, reports / f"{suite.framework}.unpatched.json", patched=False)
            patched = run_pytest(suite, root, reports / f"{suite.framework}.patched.json", patched=True)
        timings += [(f"{suite.framework} unpatched", base[1]), (f"{suite.framework} patched", patched[1])]
        problems += check(suite, base, patched)

    if not timings:
        print("framework_suites: nothing ran (see the skip messages above)")
        return 0
    print("\n-- timings: " + ", ".join(f"{label} {s:.1f} s" for label, s in timings)
          + f"; total {time.perf_counter() - start:.1f} s")
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

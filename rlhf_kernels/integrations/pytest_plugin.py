"""pytest plugin: run a framework's own test suite on rlhf_kernels' adapters.

Load it with ``-p rlhf_kernels.integrations.pytest_plugin``. Options:

- ``--rlhf-patch=verl,openrlhf,trl``: ``patch()`` those frameworks in
  ``pytest_configure``, before collection, so that a test module's
  ``from verl.trainer.ppo.core_algos import kl_penalty`` binds our adapter;
  ``unpatch()`` at the end of the run.
- ``--rlhf-report=PATH``: a JSON file with, per test file, the outcome of each
  test and, per patched function (``rlhf_kernels.integrations.report()``'s
  keys), the calls served and handed back by reason, taken as the difference
  of ``report()`` around each test (setup, call and teardown) and around the
  import of the test file.
- ``--rlhf-require-served``: fail the run where a test file ran tests but our
  ops served none of its calls (a suite that only ever reached the
  framework's own code proves nothing about ours).
- ``--rlhf-stub-modules=flash_attn,vllm``: test-only stand-ins, installed
  before patching, for packages OpenRLHF imports names from at import time
  but that have no CPU install (flash-attn: CUDA only; vLLM pins its own
  torch). Each stand-in has just the names OpenRLHF imports, each raising if
  called; a package that is installed is used as it is.

The terminal summary lists, per test file, the calls served and handed back.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from rlhf_kernels import integrations
from rlhf_kernels.integrations import stand_ins

FRAMEWORKS = ("verl", "openrlhf", "trl")

def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("rlhf_kernels", "rlhf_kernels integrations")
    group.addoption("--rlhf-patch", default="", metavar="FRAMEWORKS",
                    help=f"comma-separated frameworks to patch before collection ({', '.join(FRAMEWORKS)})")
    group.addoption("--rlhf-report", default=None, metavar="PATH",
                    help="write per-file test outcomes and served / handed-back counts as JSON to PATH")
    group.addoption("--rlhf-require-served", action="store_true", default=False,
                    help="fail the run if a test file ran tests but rlhf_kernels served none of its calls")
    group.addoption("--rlhf-stub-modules", default="", metavar="PACKAGES",
                    help="comma-separated test-only stand-ins to install if absent "
                         f"({', '.join(stand_ins.STAND_INS)})")


def _names(value: str, known, option: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise pytest.UsageError(f"{option}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    return names


def pytest_configure(config: pytest.Config) -> None:
    frameworks = _names(config.getoption("rlhf_patch"), FRAMEWORKS, "--rlhf-patch")
    stubs = _names(config.getoption("rlhf_stub_modules"), tuple(stand_ins.STAND_INS), "--rlhf-stub-modules")
    if frameworks or stubs or config.getoption("rlhf_report") or config.getoption("rlhf_require_served"):
        config.pluginmanager.register(_Coverage(config, frameworks, stubs), "rlhf_kernels_coverage")


# A test's outcome is its worst phase's: an error in the teardown of a passed test is an error.
_RANK = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}


def _diff(after: dict, before: dict) -> dict:
    """``report()`` counts in ``after`` that are not in ``before``, zero entries dropped."""
    out = {}
    for key, row in after.items():
        old = before.get(key, {"served": 0, "handed_back": {}})
        served = row["served"] - old["served"]
        back = {r: n - old["handed_back"].get(r, 0) for r, n in row["handed_back"].items()}
        back = {r: n for r, n in back.items() if n}
        if served or back:
            out[key] = {"served": served, "handed_back": back}
    return out


class _Coverage:
    """Patches in ``pytest_configure``, counts per test file, reports at the end."""

    def __init__(self, config: pytest.Config, frameworks: list[str], stubs: list[str]):
        self.config = config
        self.frameworks = frameworks
        self.files: dict[str, dict] = {}
        self.unserved: list[str] = []
        self._stubs = stand_ins.install(stubs)
        self._patched = []
        self._current: dict = {}
        try:
            for name in frameworks:
                module = importlib.import_module(f"rlhf_kernels.integrations.{name}")
                if module.patched_names():
                    continue  # patched by someone else: theirs to unpatch
                try:
                    module.patch()
                except (integrations.FrameworkNotInstalledError, integrations.UntestedVersionError) as exc:
                    raise pytest.UsageError(f"--rlhf-patch={name}: {exc}") from exc
                self._patched.append(module)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Unpatch what this run patched and take its stand-ins out of sys.modules."""
        for module in reversed(self._patched):
            module.unpatch()
        self._patched = []
        stand_ins.remove(self._stubs)
        self._stubs = {}

    def _file(self, path: Path) -> dict:
        try:
            key = path.relative_to(self.config.rootpath).as_posix()
        except ValueError:
            key = str(path)
        return self.files.setdefault(key, {"ran": 0, "tests": {}, "targets": {}})

    def _add(self, path: Path, before: dict) -> None:
        targets = self._file(path)["targets"]
        for key, row in _diff(integrations.report(), before).items():
            entry = targets.setdefault(key, {"served": 0, "handed_back": {}})
            entry["served"] += row["served"]
            for reason, n in row["handed_back"].items():
                entry["handed_back"][reason] = entry["handed_back"].get(reason, 0) + n

    @pytest.hookimpl(wrapper=True)
    def pytest_make_collect_report(self, collector: pytest.Collector):
        if not isinstance(collector, pytest.File):
            return (yield)
        before = integrations.report()
        try:
            return (yield)  # imports the test file: module-level calls count for it
        finally:
            self._add(collector.path, before)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem):
        self._current = self._file(item.path)
        before = integrations.report()
        try:
            return (yield)
        finally:
            self._add(item.path, before)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        tests = self._current["tests"]
        if report.when == "call":
            self._current["ran"] += 1
        if report.failed:
            outcome = "failed" if report.when == "call" else "error"
        elif report.skipped:
            outcome = "skipped"
        elif report.when == "call":
            outcome = "passed"
        else:
            return
        if _RANK[outcome] >= _RANK[tests.get(report.nodeid, "passed")]:
            tests[report.nodeid] = outcome

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus) -> None:
        self.unserved = sorted(
            path for path, f in self.files.items()
            if f["ran"] and not any(t["served"] for t in f["targets"].values())
        )
        path = self.config.getoption("rlhf_report")
        if path:
            Path(path).write_text(json.dumps({"patched": self.frameworks, "files": self.files}, indent=1) + "\n")
        if self.unserved and self.config.getoption("rlhf_require_served") and session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        tr = terminalreporter
        tr.write_sep("=", f"rlhf_kernels: calls served / handed back (patched: {', '.join(self.frameworks) or '-'})")
        for path, f in sorted(self.files.items()):
            if not f["ran"] and not f["targets"]:
                continue
            served = sum(t["served"] for t in f["targets"].values())
            back = sum(sum(t["handed_back"].values()) for t in f["targets"].values())
            tr.write_line(f"{path}: {f['ran']} tests ran, served {served}, handed back {back}")
            for key, t in sorted(f["targets"].items()):
                reasons = "; ".join(f"{r}: {n}" for r, n in sorted(t["handed_back"].items()))
                tr.write_line(f"    {key}: served {t['served']}" + (f", handed back ({reasons})" if reasons else ""))
        if self.unserved and self.config.getoption("rlhf_require_served"):
            tr.write_line(
                "--rlhf-require-served: rlhf_kernels served no call in " + ", ".join(self.unserved)
                + " (their tests ran only the frameworks' own code)", red=True, bold=True)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self.close()

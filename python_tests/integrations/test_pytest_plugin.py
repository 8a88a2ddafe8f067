"""rlhf_kernels.integrations.pytest_plugin, run on small test files with pytester.

The runs are in-process (``runpytest``, a few seconds in all): each must
leave verl unpatched and take its stand-ins out of sys.modules when it ends.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

pytest_plugins = ["pytester"]

PLUGIN = ("-p", "rlhf_kernels.integrations.pytest_plugin")


@pytest.fixture(scope="module")
def verl_imported():
    """verl and every module its patch() imports, imported in this process: the
    runs in-process drop, when they end, the modules first imported in them,
    and some (torch's inductor test ops, which verl's trainers pull in) cannot
    be imported a second time."""
    pytest.importorskip("verl.trainer.ppo.core_algos")
    from rlhf_kernels.integrations import verl as rk_verl

    if rk_verl.patched_names():
        pytest.skip("verl is patched by someone else in this process")
    with rk_verl.patched():
        pass


@pytest.fixture
def core_algos(verl_imported):
    """verl's core_algos, unpatched before and after each test."""
    from rlhf_kernels.integrations import verl as rk_verl
    from verl.trainer.ppo import core_algos

    original = core_algos.kl_penalty
    yield core_algos
    assert not rk_verl.patched_names(), "the plugin left verl patched"
    assert core_algos.kl_penalty is original


def test_served_calls_are_counted_per_file(pytester, core_algos):
    pytester.makepyfile(test_kl="""
        import torch
        from verl.trainer.ppo.core_algos import kl_penalty  # bound at import: must be our adapter

        def test_kl():
            logprob, ref = torch.randn(2, 5), torch.randn(2, 5)
            assert kl_penalty(logprob, ref, "low_var_kl").shape == (2, 5)
            assert kl_penalty(logprob, ref, "kl").shape == (2, 5)
    """)
    report = pytester.path / "report.json"
    result = pytester.runpytest(*PLUGIN, "--rlhf-patch=verl", "--rlhf-require-served", f"--rlhf-report={report}")
    result.assert_outcomes(passed=1)
    data = json.loads(report.read_text())
    assert data["patched"] == ["verl"]
    entry = data["files"]["test_kl.py"]
    assert entry["ran"] == 1
    assert entry["tests"] == {"test_kl.py::test_kl": "passed"}
    assert entry["targets"]["verl.kl_penalty"] == {"served": 2, "handed_back": {}}
    result.stdout.fnmatch_lines(["*test_kl.py: 1 tests ran, served 2, handed back 0*"])


def test_unpatched_run_counts_nothing(pytester, core_algos):
    pytester.makepyfile(test_kl="""
        import torch
        from verl.trainer.ppo.core_algos import kl_penalty

        def test_kl():
            kl_penalty(torch.randn(3), torch.randn(3), "kl")
    """)
    report = pytester.path / "report.json"
    pytester.runpytest(*PLUGIN, f"--rlhf-report={report}").assert_outcomes(passed=1)
    assert json.loads(report.read_text())["files"]["test_kl.py"]["targets"] == {}


def test_require_served_fails_a_file_that_reaches_none_of_our_ops(pytester, core_algos):
    pytester.makepyfile(
        test_nothing="""
            def test_nothing():
                assert 1 + 1 == 2
        """,
        test_skipped="""
            import pytest

            @pytest.mark.skip(reason="runs nothing")
            def test_skipped():
                pass
        """,
    )
    result = pytester.runpytest(*PLUGIN, "--rlhf-patch=verl", "--rlhf-require-served")
    result.assert_outcomes(passed=1, skipped=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    # a file whose tests all skipped ran nothing: it is not listed
    result.stdout.fnmatch_lines(["--rlhf-require-served: rlhf_kernels served no call in test_nothing.py (*"])
    # without the option the same run passes
    assert pytester.runpytest(*PLUGIN, "--rlhf-patch=verl").ret == pytest.ExitCode.OK


def test_unknown_names_are_usage_errors(pytester):
    pytester.makepyfile(test_x="def test_x(): pass")
    result = pytester.runpytest(*PLUGIN, "--rlhf-patch=verl,nope")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--rlhf-patch: unknown nope (known: verl, openrlhf, trl)*"])
    result = pytester.runpytest(*PLUGIN, "--rlhf-stub-modules=torch")
    assert result.ret == pytest.ExitCode.USAGE_ERROR


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed: no stand-in")
def test_stand_ins_have_the_imported_names_and_leave_with_the_run(pytester):
    pytester.makepyfile(test_stub="""
        import pytest
        from vllm import SamplingParams
        from vllm.utils import random_uuid

        def test_stub():
            with pytest.raises(NotImplementedError, match="test-only stand-in"):
                SamplingParams()
            with pytest.raises(NotImplementedError):
                random_uuid()
    """)
    pytester.runpytest(*PLUGIN, "--rlhf-stub-modules=vllm").assert_outcomes(passed=1)
    assert not any(name == "vllm" or name.startswith("vllm.") for name in sys.modules)

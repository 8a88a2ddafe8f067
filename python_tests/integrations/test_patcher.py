"""The framework-independent part of the integrations: ``Patcher`` refuses a
framework that is not installed or lacks a target and then patches nothing;
``report()`` counts each patched function's served and handed-back calls;
``patched(strict=True)`` raises instead of handing back."""

from __future__ import annotations

import importlib.metadata
import sys
import types

import pytest

from rlhf_kernels import integrations
from rlhf_kernels.integrations import FrameworkNotInstalledError, Patcher, UntestedVersionError, _Target


def test_not_installed_refuses_cleanly():
    p = Patcher("no_such_framework_xyz", "no-such-framework-xyz", frozenset({"1.0"}), [])
    with pytest.raises(FrameworkNotInstalledError, match="no-such-framework-xyz is not installed"):
        p.patch()


def test_missing_target_patches_nothing(monkeypatch):
    pytest.importorskip("torch.nn.functional")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.0")
    fake = types.ModuleType("fakefw")
    fake.f = lambda: 1
    monkeypatch.setitem(sys.modules, "fakefw", fake)
    original = fake.f
    p = Patcher("fakefw", "fakefw", frozenset({"1.0"}),
                [_Target("fakefw", "f", lambda o: (lambda: 2)), _Target("fakefw", "g", lambda o: o)])
    with pytest.raises(UntestedVersionError, match="has no fakefw.g"):
        p.patch()
    assert fake.f is original and not p.is_patched


@pytest.fixture
def fake_framework(monkeypatch):
    """A framework ``fakefw`` whose ``f(x)`` our adapter serves for x >= 0 and
    hands back (to the original, which returns -1) below."""
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.0")
    fake = types.ModuleType("fakefw")
    fake.f = lambda x: -1
    monkeypatch.setitem(sys.modules, "fakefw", fake)

    def make(original):
        def f(x):
            if x < 0:
                return integrations.hand_back("fakefw.f", "a negative x", original, x)
            return x

        return f

    patcher = Patcher("fakefw", "fakefw", frozenset({"1.0"}), [_Target("fakefw", "f", make)])
    integrations.reset_report()
    yield fake, patcher
    patcher.unpatch()
    integrations.reset_report()


def test_report_counts_served_and_handed_back_calls(fake_framework, caplog):
    fake, patcher = fake_framework
    with patcher.patched():
        with caplog.at_level("WARNING", logger="rlhf_kernels.integrations"):
            assert [fake.f(x) for x in (1, 2, -3, -4, 5)] == [1, 2, -1, -1, 5]
    assert integrations.report() == {"fakefw.f": {"served": 3, "handed_back": {"a negative x": 2}}}
    # one warning for the first hand-back of the reason, none for the second
    warned = [r.getMessage() for r in caplog.records if r.name == "rlhf_kernels.integrations"]
    assert len(warned) == 1 and "fakefw.f: a negative x" in warned[0]
    assert "served      3  handed back      2 (a negative x: 2)" in integrations.format_report()
    integrations.reset_report()
    assert integrations.report() == {} and integrations.format_report() == "no patched function was called"


def test_strict_patch_raises_instead_of_handing_back(fake_framework):
    fake, patcher = fake_framework
    with patcher.patched(strict=True):
        assert fake.f(2) == 2
        with pytest.raises(integrations.HandBackError, match="fakefw.f: a negative x"):
            fake.f(-1)
    with patcher.patched():  # strictness ends with the patch
        assert fake.f(-1) == -1


def test_handing_back_inside_a_served_call_counts_each_function(fake_framework):
    """A hand-back to a framework function that calls another patched function
    counts the outer call as handed back and the inner one as served."""
    fake, patcher = fake_framework
    fake.g = lambda x: fake.f(-x)  # the framework's g calls its f

    def make_g(original):
        return lambda x: integrations.hand_back("fakefw.g", "always", original, x)

    patcher.targets.append(_Target("fakefw", "g", make_g))
    with patcher.patched():
        assert fake.g(-3) == 3
    assert integrations.report() == {"fakefw.f": {"served": 1, "handed_back": {}},
                                     "fakefw.g": {"served": 0, "handed_back": {"always": 1}}}

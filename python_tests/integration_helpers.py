"""Shared helpers of the framework integration tests (``integrations/test_trl.py``,
``test_verl.py``, ``test_openrlhf.py``): the framework's original and our
adapter are run on the same inputs and their outputs and input gradients
compared; masks as the frameworks pass them; the served-call count."""

import importlib

import pytest
import torch

from rlhf_kernels import integrations


def require(module: str, framework: str):
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken optional dependency
        pytest.skip(f"{framework} is not importable here ({module}: {type(exc).__name__}: {exc})")


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]


def run_with_grads(fn, inputs, kwargs=None, grad_seed=0):
    """fn's outputs and the gradients of a random projection of its floating outputs."""
    leaves = _leaves(*inputs)
    out = fn(*leaves, **(kwargs or {}))
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if isinstance(o, torch.Tensor)]
    gen = torch.Generator().manual_seed(grad_seed)
    total = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outs if o.requires_grad)
    grads = [None] * len(leaves)
    if isinstance(total, torch.Tensor):
        wrt = [(i, x) for i, x in enumerate(leaves) if x.requires_grad]
        got = torch.autograd.grad(total, [x for _, x in wrt], allow_unused=True)
        for (i, _), g in zip(wrt, got):
            grads[i] = g
    return out, grads


def assert_outputs_close(ours, theirs, atol=1e-5, rtol=1e-5):
    if isinstance(theirs, tuple):
        assert isinstance(ours, tuple) and len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert_outputs_close(a, b, atol, rtol)
        return
    if isinstance(theirs, dict):  # metrics
        assert isinstance(ours, dict) and ours.keys() == theirs.keys()
        for key in theirs:
            assert_outputs_close(ours[key], theirs[key], atol, rtol)
        return
    if theirs is None or not isinstance(theirs, torch.Tensor):
        if isinstance(theirs, float):
            assert ours == pytest.approx(theirs, abs=atol, rel=rtol, nan_ok=True)
        else:
            assert ours is None if theirs is None else ours == theirs
        return
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    torch.testing.assert_close(ours.float(), theirs.float(), atol=atol, rtol=rtol, equal_nan=True)


def compare_outputs(original, patched, inputs, kwargs=None, atol=1e-5, rtol=1e-5):
    """Same outputs and input gradients (float32 / float64 inputs)."""
    theirs, g_theirs = run_with_grads(original, inputs, kwargs)
    ours, g_ours = run_with_grads(patched, inputs, kwargs)
    assert_outputs_close(ours, theirs, atol, rtol)
    for a, b in zip(g_ours, g_theirs):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


def compare_outputs_bf16(original, patched, inputs, kwargs=None, data=()):
    """bf16: our error against the float64 original is at most twice the
    framework's own bf16 error (the style guide's rule), output and gradients.
    ``data``: further positional arguments that take no gradient (float64 too
    in the exact run)."""
    up = lambda ts: [t.double() if t.is_floating_point() else t for t in ts]  # noqa: E731
    exact, g_exact = run_with_grads(lambda *x: original(*x, *up(data)), up(inputs), kwargs)
    theirs, g_theirs = run_with_grads(lambda *x: original(*x, *data), inputs, kwargs)
    ours, g_ours = run_with_grads(lambda *x: patched(*x, *data), inputs, kwargs)
    pick = (lambda o: o[0]) if isinstance(exact, tuple) else (lambda o: o)
    assert pick(ours).dtype == pick(theirs).dtype
    err = lambda a, b: (a.double() - b.double()).abs().max().item()  # noqa: E731
    assert err(pick(ours), pick(exact)) <= 2 * err(pick(theirs), pick(exact)) + 1e-6
    for a, b, e in zip(g_ours, g_theirs, g_exact):
        if e is not None:
            assert err(a, e) <= 2 * err(b, e) + 1e-6


def mask_with_holes(batch, seq, gen):
    """Right padding of random length, a hole inside row 0, row 1 fully masked."""
    lengths = torch.randint(2, seq + 1, (batch,), generator=gen)
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    mask[0, : seq] = True
    mask[0, 1:3] = False
    mask[1] = False
    return mask


def assert_served_only(key: str, calls: int, handed_back: dict | None = None) -> None:
    """``key`` served ``calls`` times, handed back only as ``handed_back`` says."""
    want = {"served": calls, "handed_back": handed_back or {}}
    assert integrations.report().get(key) == want, integrations.report()


def weight_masks(gen, batch, seq):
    """The masks verl and OpenRLHF pass: float 0/1, and fractional weights with
    zeros (a fully masked row, holes)."""
    mask = mask_with_holes(batch, seq, gen)
    weights = torch.rand(batch, seq, generator=gen) * mask
    weights[0, 4] = 0.0
    return {"float01": mask.float(), "weights": weights, "int": mask.long()}

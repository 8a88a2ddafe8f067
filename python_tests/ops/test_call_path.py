"""The eager call path of the native ops (rlhf_kernels/ops/_op.py,
csrc/python_call.cpp): rlhf_kernels._C.call_below_autograd gives what
torch.ops gives, and hands back NotImplemented, so that torch.ops runs, for
what only torch.ops' parser handles (tensor subclasses, torch-function modes);
Python dispatch modes still see every call; its errors are the op's."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import rlhf_kernels
from rlhf_kernels._dispatch import native_extension_loaded

pytestmark = pytest.mark.skipif(not native_extension_loaded(), reason="needs the native extension")

if native_extension_loaded():
    from rlhf_kernels import _C

LOGPROBS = torch.ops.rlhf_kernels.logprobs.default


def _index(op) -> int:
    return _C.op_index(op._schema.name, op._schema.overload_name)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(3, 5, 11, generator=gen), torch.randint(0, 11, (3, 5), generator=gen)


def _ops_below_autograd(op, *args):
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def test_fast_call_gives_what_torch_ops_gives():
    logits, labels = _inputs()
    args = (logits, labels, 0.7, -100, True, False, None)
    got = _C.call_below_autograd(_index(LOGPROBS), *args)
    assert got is not NotImplemented
    for a, b in zip(got, _ops_below_autograd(LOGPROBS, *args), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    kl = torch.ops.rlhf_kernels.kl_penalty.default
    x, y = logits[0], logits[1]
    torch.testing.assert_close(_C.call_below_autograd(_index(kl), x, y, 2),
                               _ops_below_autograd(kl, x, y, 2), rtol=0, atol=0)


def test_fast_call_hands_back_what_needs_torch_ops():
    logits, labels = _inputs()
    index = _index(LOGPROBS)

    class Sub(torch.Tensor):
        pass

    assert _C.call_below_autograd(index, logits.as_subclass(Sub), labels, 1.0, -100, False, False, None) \
        is NotImplemented
    assert _C.call_below_autograd(index, logits, labels, 1.0, -100, False, False) is NotImplemented  # arity
    assert _C.call_below_autograd(index, logits, labels, "1.0", -100, False, False, None) is NotImplemented
    assert _C.call_below_autograd(index, logits, labels, 1.0, 2**70, False, False, None) is NotImplemented
    with TorchFunctionMode():
        assert _C.call_below_autograd(index, logits, labels, 1.0, -100, False, False, None) is NotImplemented
    # rollout_correction's int[] / float[] arguments are not converted: no index
    rc = torch.ops.rlhf_kernels.rollout_correction.default
    assert _C.op_index(rc._schema.name, rc._schema.overload_name) is None


def test_public_ops_through_a_torch_function_mode_and_a_subclass():
    logits, labels = _inputs()
    want = rlhf_kernels.logprobs_from_logits(logits, labels)
    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Record():
        got = rlhf_kernels.logprobs_from_logits(logits, labels)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert LOGPROBS in seen  # the fallback went through torch.ops

    class Sub(torch.Tensor):
        pass

    got = rlhf_kernels.logprobs_from_logits(logits.as_subclass(Sub), labels)
    torch.testing.assert_close(got.as_subclass(torch.Tensor), want, rtol=0, atol=0)


def test_dispatch_modes_see_the_fast_calls():
    logits, labels = _inputs()
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    leaf = logits.clone().requires_grad_(True)
    with Record():
        rlhf_kernels.logprobs_from_logits(leaf, labels).sum().backward()
        rlhf_kernels.kl_penalty(logits[0], logits[1], estimator="k3")
    names = {str(f) for f in seen}
    assert {"rlhf_kernels.logprobs.default", "rlhf_kernels.logprobs_backward.default",
            "rlhf_kernels.kl_penalty.default"} <= names, names


def test_fast_call_raises_the_ops_errors():
    logits, labels = _inputs()
    labels[0, 0] = 11
    with pytest.raises(ValueError, match="labels: value 11 is outside"):
        _C.call_below_autograd(_index(LOGPROBS), logits, labels, 1.0, -100, False, False, None)
    with pytest.raises(ValueError, match="labels: value 11 is outside"):
        rlhf_kernels.logprobs_from_logits(logits, labels)


def test_gradients_through_the_fast_path_match_the_eager_backend():
    logits, labels = _inputs()
    labels[1, 2] = -100
    leaf = logits.clone().requires_grad_(True)
    logp, entropy = rlhf_kernels.logprobs_from_logits(leaf, labels, temperature=0.8, return_entropy=True)
    (logp.sum() + 0.3 * entropy.sum()).backward()
    ref = logits.clone().requires_grad_(True)
    want, want_h = rlhf_kernels.logprobs_from_logits(ref, labels, temperature=0.8, return_entropy=True,
                                                     backend="eager")
    (want.sum() + 0.3 * want_h.sum()).backward()
    torch.testing.assert_close(logp, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-5, atol=1e-6)

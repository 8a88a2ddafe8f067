"""The eager call path of the native ops (rlhf_kernels/ops/_op.py,
csrc/python_call.cpp): rlhf_kernels._C.call_below_autograd gives what
torch.ops gives, and hands back NotImplemented, so that torch.ops runs, for
what only torch.ops' parser handles (tensor subclasses, torch-function modes);
Python dispatch modes still see every call; its errors are the op's. The
native autograd of logprobs (csrc/autograd.cpp, through _C.call_op) gives the
eager backend's values and gradients for every upstream-gradient layout, keeps
saved-tensor hooks and compiled autograd working, and refuses a double
backward as the Python formula does."""

from __future__ import annotations

import math

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


# --- the native autograd (csrc/autograd.cpp): logprobs_autograd's C++ formula --------------------------------


def _native_node(t: torch.Tensor) -> bool:
    """t was made by the C++ formula (not the Python autograd.Function)."""
    return t.grad_fn is not None and "Logprobs" in t.grad_fn.name() and "CppNode" in t.grad_fn.name()


LOSS_FORMS = ("weighted", "logp only", "entropy only", "sum", "mean", "row sums")


def _loss(form: str, logp: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(logp.shape, generator=gen, dtype=logp.dtype)
    v = torch.randn(logp.shape, generator=gen, dtype=logp.dtype)
    if form == "weighted":
        return (w * logp).sum() + (v * entropy).sum()
    if form == "logp only":  # entropy returned, its gradient undefined
        return (w * logp).sum()
    if form == "entropy only":  # logp's gradient undefined
        return (v * entropy).sum()
    if form == "sum":  # broadcast upstream gradients (all strides 0)
        return logp.sum() + 0.5 * entropy.sum()
    if form == "mean":
        return logp.mean()
    return (logp.sum(-1) * w[:, 0]).sum()  # "row sums": expanded with a non-zero stride


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature, inplace, truncate", [(1.0, False, False), (0.7, False, True),
                                                             (1.3, True, False), (0.9, True, True)])
def test_native_autograd_matches_the_eager_backend(dtype, temperature, inplace, truncate):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 11, generator=gen, dtype=dtype) * 3
    labels = torch.randint(0, 11, (3, 5), generator=gen)
    labels[1, 2] = -100
    kw = dict(temperature=temperature, return_entropy=True)
    if truncate:  # each row keeps its label and the logits above it less 0.5
        kw["min_logit"] = logits.gather(-1, labels.clamp(min=0)[..., None])[..., 0] - 0.5
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for form in LOSS_FORMS:
        grads = {}
        for backend in (None, "eager"):
            leaf = logits.clone().requires_grad_(True)
            x = leaf * 1.0 if inplace else leaf  # inplace_backward consumes its logits: not a leaf's
            logp, entropy = rlhf_kernels.logprobs_from_logits(x, labels, backend=backend,
                                                              inplace_backward=inplace and backend is None, **kw)
            assert _native_node(logp) == (backend is None)
            _loss(form, logp, entropy).backward()
            grads[backend] = (logp.detach(), entropy.detach(), leaf.grad)
        for got, want in zip(grads[None], grads["eager"], strict=True):
            torch.testing.assert_close(got, want, **tol, msg=form)


def test_native_autograd_without_a_gradient_to_track():
    logits, labels = _inputs()
    leaf = logits.clone().requires_grad_(True)
    want = rlhf_kernels.logprobs_from_logits(logits, labels)
    with torch.no_grad():
        got = rlhf_kernels.logprobs_from_logits(leaf, labels)
    assert got.grad_fn is None and not got.requires_grad
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.inference_mode():  # below the autograd keys: logprobs_autograd's CompositeExplicitAutograd kernel
        got = rlhf_kernels.logprobs_from_logits(logits.clone(), labels)
        assert torch.ops.rlhf_kernels.logprobs_autograd(logits.clone(), labels, 1.0, -100, False, False)[0].shape \
            == labels.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_native_autograd_with_saved_tensor_hooks_and_compiled_autograd():
    logits, labels = _inputs()
    want_leaf = logits.clone().requires_grad_(True)
    rlhf_kernels.logprobs_from_logits(want_leaf, labels, backend="eager").pow(2).sum().backward()

    packed = []

    def pack(t):
        packed.append(t.shape)
        return t.clone()  # what an offloading hook does: the backward reads the copy

    leaf = logits.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp = rlhf_kernels.logprobs_from_logits(leaf, labels)
    assert _native_node(logp)
    assert logits.shape in packed and len(packed) >= 4  # logits, labels, row max, log-sum
    logp.pow(2).sum().backward()
    torch.testing.assert_close(leaf.grad, want_leaf.grad, rtol=1e-5, atol=1e-6)

    from torch._dynamo import compiled_autograd

    leaf = logits.clone().requires_grad_(True)
    logp = rlhf_kernels.logprobs_from_logits(leaf, labels)
    assert _native_node(logp)
    with compiled_autograd._enable(torch.compile(backend="eager", fullgraph=True)):
        logp.pow(2).sum().backward()
    torch.testing.assert_close(leaf.grad, want_leaf.grad, rtol=1e-5, atol=1e-6)


def test_double_backward_raises_on_both_formulas():
    logits, labels = _inputs()

    class Any(TorchFunctionMode):  # call_op hands the call back: the Python formula runs
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    for python_formula in (False, True):
        leaf = logits.clone().requires_grad_(True)
        if python_formula:
            with Any():
                logp = rlhf_kernels.logprobs_from_logits(leaf, labels)
        else:
            logp = rlhf_kernels.logprobs_from_logits(leaf, labels)
        assert _native_node(logp) != python_formula
        with pytest.raises(RuntimeError, match="logprobs_from_logits: no double backward"):
            torch.autograd.grad(logp.pow(2).sum(), leaf, create_graph=True)
    # the eager backend is plain torch: its second derivative exists
    leaf = logits.double().requires_grad_(True)
    (g,) = torch.autograd.grad(rlhf_kernels.logprobs_from_logits(leaf, labels, backend="eager").sum(), leaf,
                               create_graph=True)
    assert g.requires_grad


def _error(fn) -> str:
    with pytest.raises(ValueError) as info:
        fn()
    return str(info.value)


@pytest.mark.parametrize("case", ["int logits", "float labels", "shape", "no dims", "empty vocabulary",
                                  "temperature 0", "temperature -1.5", "temperature inf", "temperature nan",
                                  "temperature -100", "meta labels"])
def test_the_native_op_raises_what_the_python_checks_raise(case):
    """The native backends' eager call runs no Python checks: the op's own
    (csrc/glue/logprobs.h) raise the same ValueError, word for word, also for
    a direct torch.ops call."""
    logits, labels = _inputs()
    temperature = 1.0
    if case == "int logits":
        logits = logits.long()
    elif case == "float labels":
        labels = labels.float()
    elif case == "shape":
        labels = labels.t().contiguous()
    elif case == "no dims":
        logits, labels = torch.tensor(1.0), torch.tensor(0)
    elif case == "empty vocabulary":
        logits = logits[..., :0]
    elif case == "meta labels":
        labels = labels.to("meta")
    else:
        temperature = {"0": 0.0, "-1.5": -1.5, "inf": math.inf, "nan": math.nan, "-100": -100.0}[case.split()[1]]
    want = _error(lambda: rlhf_kernels.logprobs_from_logits(logits, labels, temperature=temperature,
                                                            backend="eager"))
    assert _error(lambda: rlhf_kernels.logprobs_from_logits(logits, labels, temperature=temperature)) == want
    if case != "meta labels":  # a direct call with a meta tensor runs the op's fake
        assert _error(lambda: LOGPROBS(logits, labels, temperature, -100, False, False)) == want

"""How a registered op with autograd is called: once through the dispatcher.

``differentiable(op, setup_context, backward)`` registers the autograd formula
on the op itself (``torch.library.register_autograd``: what ``torch.compile``
and ``torch.ops`` callers use) and returns the caller the public functions use.
In eager mode that caller skips the op's Python autograd kernel (whose
redispatch, argument filling and ``autograd.Function`` per call cost more than
a small op's work): it applies one ``autograd.Function`` with the same
``setup_context`` and ``backward`` around a call of the op below the autograd
key, the one crossing of the dispatcher. Without a gradient to track it calls
the op below autograd directly. While compiling it calls the op as is.

Below autograd, a native op (csrc) is called through
``rlhf_kernels._C.call_below_autograd`` (csrc/python_call.cpp), which converts
the arguments by the op's schema in C, where torch.ops' general parser costs
more than a small op's work; it hands back NotImplemented for what needs that
parser (a tensor subclass, a torch-function mode), and the op is then called
through torch.ops.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .._dispatch import native_extension_loaded

if native_extension_loaded():
    from .. import _C
else:
    _C = None

_below_autograd = torch._C._AutoDispatchBelowAutograd


def _below_autograd_call(op) -> Callable:
    """The op called below the autograd keys (eager mode only)."""
    if _C is not None and op.namespace == "rlhf_kernels":
        index = _C.op_index(op._schema.name, op._schema.overload_name)
        if index is not None:
            fast = _C.call_below_autograd

            def call(*args):
                out = fast(index, *args)
                if out is NotImplemented:
                    with _below_autograd():
                        return op(*args)
                return out

            return call

    def call(*args):
        with _below_autograd():
            return op(*args)

    return call


def undifferentiated(op) -> Callable:
    """The caller of an op whose outputs are never differentiated: the op below
    the autograd key in eager mode, the op as is while compiling."""
    below = _below_autograd_call(op)

    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        return below(*args)

    return call


def in_backward(op) -> Callable:
    """The caller of an op that a backward formula runs: below the autograd
    key, unless a graph of the backward is being built (create_graph=True, or
    tracing), where the op goes through the dispatcher as is."""
    below = _below_autograd_call(op)

    def call(*args):
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return op(*args)
        return below(*args)

    return call


def differentiable(op, setup_context: Callable, backward: Callable, returns: int | None = None,
                   native_autograd=None) -> Callable:
    """The caller of ``op`` with its autograd formula (``setup_context`` and
    ``backward`` over all of the op's outputs). With ``returns``, the caller
    gives the first ``returns`` outputs only: the others are what
    ``setup_context`` saves for the backward, and autograd does not track
    them (each tracked output of an ``autograd.Function`` costs host time;
    ``python -m benchmarks.bench_overhead``). ``native_autograd``: the same
    op with the same formula as its autograd kernel in C++ (csrc/autograd.cpp),
    called in eager mode through ``rlhf_kernels._C.call_op``; the Python
    formula is then what ``torch.compile`` and the fallback of
    ``call_op`` (a tensor subclass, a torch-function mode) run."""
    torch.library.register_autograd(op, backward, setup_context=setup_context)
    forward_op = _below_autograd_call(op)
    n_outputs = len(op._schema.returns)
    kept = n_outputs if returns is None else returns
    untracked = (None,) * (n_outputs - kept)

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            output = forward_op(*args)
            setup_context(ctx, args, output)
            return output if returns is None else output[:returns]

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads, *untracked)

    apply = Function.apply

    def call(*args):
        if torch.compiler.is_compiling():
            output = op(*args)
        elif torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            return apply(*args)
        else:
            output = forward_op(*args)
        return output if returns is None else output[:returns]

    index = None
    if native_autograd is not None and _C is not None:
        index = _C.op_index(native_autograd._schema.name, native_autograd._schema.overload_name)
    if index is None:
        return call
    call_op = _C.call_op

    def call_native(*args):
        if not torch.compiler.is_compiling():
            output = call_op(index, *args)
            if output is not NotImplemented:
                return output
        return call(*args)

    return call_native


def native_op(name: str):
    """The native (csrc) op ``rlhf_kernels::name``, None without the extension."""
    return getattr(torch.ops.rlhf_kernels, name).default if native_extension_loaded() else None


def tracing(t: Tensor) -> bool:
    """True while a graph is traced (torch.compile, AOT autograd, make_fx): t
    has no value to branch on."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return (torch.compiler.is_compiling() or isinstance(t, (FakeTensor, FunctionalTensor))
            or get_proxy_mode() is not None)


def no_double_backward(op: str, grad_loss: Tensor,
                       why: str = "its gradient is computed in the forward, not by differentiable ops") -> None:
    """For ops whose gradient is not computed by differentiable ops (in the
    forward, or by a backward kernel without a derivative): a second
    derivative (create_graph=True) would be wrong, so it raises."""
    if torch.is_grad_enabled() and not tracing(grad_loss):
        raise RuntimeError(f"{op}: no double backward (create_graph=True): {why}")

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
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .._dispatch import native_extension_loaded

_below_autograd = torch._C._AutoDispatchBelowAutograd


def undifferentiated(op) -> Callable:
    """The caller of an op whose outputs are never differentiated: the op below
    the autograd key in eager mode, the op as is while compiling."""

    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        with _below_autograd():
            return op(*args)

    return call


def differentiable(op, setup_context: Callable, backward: Callable) -> Callable:
    torch.library.register_autograd(op, backward, setup_context=setup_context)

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            with _below_autograd():
                output = op(*args)
            setup_context(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    apply = Function.apply
    below = undifferentiated(op)

    def call(*args):
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args) \
                and not torch.compiler.is_compiling():
            return apply(*args)
        return below(*args)

    return call


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


def no_double_backward(op: str, grad_loss: Tensor) -> None:
    """For ops whose gradient is computed in the forward, not by differentiable
    ops: a second derivative (create_graph=True) would be 0, so it raises."""
    if torch.is_grad_enabled() and not tracing(grad_loss):
        raise RuntimeError(f"{op}: no double backward (create_graph=True): its gradient is computed in the "
                           "forward, not by differentiable ops")

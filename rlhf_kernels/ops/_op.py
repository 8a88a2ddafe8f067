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

"""logprobs_from_hidden in plain torch ops (the "eager" backend): the (N, V)
logits, then ``rlhf_kernels.reference.logprobs_from_logits`` under torch autograd."""

from __future__ import annotations

import math

import torch

from .. import reference
from .._launch import acc_dtype


def logprobs_from_hidden(hidden, weight, bias, labels, temperature, ignore_index, compute_entropy, chunk_bytes,
                         min_logit=None):
    """logprobs_from_hidden's contract, with the logits, in the accumulation dtype (min_logit: as the eager
    logprobs)."""
    acc = acc_dtype(hidden.dtype)
    logits = torch.nn.functional.linear(hidden.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    if min_logit is not None:
        logits = logits.masked_fill(logits < min_logit[:, None], -math.inf)
    logp, entropy = reference.logprobs_from_logits(logits, labels, temperature=temperature,
                                                   ignore_index=ignore_index, return_entropy=True)
    return logp, entropy if compute_entropy else logp.new_empty(0)

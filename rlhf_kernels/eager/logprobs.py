"""logprobs_from_logits in plain torch ops (the "reference" backend)."""

from __future__ import annotations

import torch

from .. import reference
from .._launch import acc_dtype


def forward(logits, labels, inv_temperature, ignore_index, compute_entropy):
    x = logits.to(acc_dtype(logits.dtype)).reshape(-1, logits.shape[-1])
    out = reference.logprobs_from_logits(
        x, labels, temperature=1.0 / inv_temperature, ignore_index=ignore_index,
        return_entropy=compute_entropy,
    )
    logp, entropy = out if compute_entropy else (out, x.new_empty(0))
    row_max = x.amax(-1)
    log_sum = torch.logsumexp((x - row_max.unsqueeze(-1)) * inv_temperature, dim=-1)
    return logp, entropy, row_max, log_sum


def backward(grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy, out, inv_temperature,
             ignore_index):
    # rlhf_kernels.reference's closed form, which recomputes the softmax with
    # torch's log_softmax (row_max and log_sum go unused): this backend is the
    # eager float32 accuracy the kernels are held to.
    grad = reference.logprobs_grad(
        grad_logp, grad_entropy, logits.reshape(-1, logits.shape[-1]), labels,
        temperature=1.0 / inv_temperature, ignore_index=ignore_index,
    )
    out.copy_(grad.view(out.shape))

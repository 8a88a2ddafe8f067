"""The KL penalty and shaping + GAE in plain torch ops (the "eager"
backend), returning what the kernels return."""

from __future__ import annotations

import torch

from .. import reference
from .._launch import acc_dtype

ESTIMATOR_NAMES = {0: "k1", 1: "abs", 2: "k2", 3: "k3"}  # kernel code -> reference name


def kl_penalty(logp, ref_logp, estimator):
    """kl_penalty's contract: the reference formula in the accumulation dtype, under torch autograd."""
    acc = acc_dtype(logp.dtype)
    return reference.kl_penalty(logp.to(acc), ref_logp.to(acc), ESTIMATOR_NAMES[estimator])


def advantages(values, mask, cu_seqlens, token_rewards, scores, logp, ref_logp, kl_coef_scale, kl_coef,
                   estimator, gamma, lam):
    acc = acc_dtype(values.dtype)
    full_mask = mask if mask is not None else torch.ones(values.shape, dtype=torch.bool, device=values.device)
    empty = values.new_empty((0,), dtype=acc)
    if token_rewards is None:
        if kl_coef_scale is not None:  # the reference reads the scale on the host
            kl_coef = kl_coef * float(kl_coef_scale[0])
        out = reference.ppo_advantages(
            scores, logp, ref_logp, values, full_mask, kl_coef=kl_coef,
            estimator=ESTIMATOR_NAMES[estimator], gamma=gamma, lam=lam, whiten=False,
            cu_seqlens=cu_seqlens,
        )
        adv, ret, rewards, kl = out["advantages"], out["returns"], out["token_rewards"], out["kl"]
    else:
        adv, ret = reference.compute_gae(token_rewards, values, full_mask, gamma=gamma, lam=lam,
                                         whiten=False, cu_seqlens=cu_seqlens)
        rewards, kl = empty, empty.clone()
    # Per-sequence partial sums, as the kernels produce them.
    adv64 = adv.double()
    if cu_seqlens is None:
        per_seq = [full_mask.double().sum(-1), adv64.sum(-1), adv64.square().sum(-1),
                   kl.double().sum(-1) if kl.numel() else adv64.new_zeros(values.shape[0])]
    else:
        seq_ids = torch.repeat_interleave(
            torch.arange(cu_seqlens.numel() - 1, device=values.device), cu_seqlens.diff().long(),
            output_size=values.numel(),
        )
        n_seq = cu_seqlens.numel() - 1

        def seg(x):
            return adv64.new_zeros(n_seq).index_add_(0, seq_ids, x)

        per_seq = [seg(full_mask.double()), seg(adv64), seg(adv64.square()),
                   seg(kl.double()) if kl.numel() else adv64.new_zeros(n_seq)]
    stats = torch.stack(per_seq, dim=-1)
    return adv.to(acc), ret.to(acc), rewards.to(acc), kl.to(acc), stats

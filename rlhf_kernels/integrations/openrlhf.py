"""OpenRLHF on rlhf_kernels: ``rlhf_kernels.integrations.openrlhf.patch()``.

Replaces, in ``openrlhf.models.utils`` and wherever OpenRLHF's modules
imported them (the actor, the PPO actor, the experience maker):

- ``log_probs_from_logits``, ``compute_entropy`` -> ``logprobs_from_logits``;
- ``compute_approx_kl`` -> ``kl_penalty``;
- ``RemoteExperienceMaker.get_advantages_and_returns`` (its GAE) -> ``compute_gae``.

Not replaced: the ``PolicyLoss`` and ``ValueLoss`` modules (classes with
many loss variants; left for a later change).

OpenRLHF 0.11.2 imports flash-attn (CUDA only) and DeepSpeed from
``openrlhf.models``, so ``patch()`` works only where those import (a GPU
machine with OpenRLHF's own install); the adapters' arithmetic is tested on
CPU against OpenRLHF's source with those two imports stubbed out.
"""

from __future__ import annotations

import torch
from torch import Tensor

import rlhf_kernels

from . import Patcher, _Target

TESTED_VERSIONS = frozenset({"0.11.2"})


def _make_log_probs_from_logits(original):
    def log_probs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
        if temperature != 1.0:
            # OpenRLHF semantics: the caller's logits are divided in place.
            logits.div_(temperature)
        logp = rlhf_kernels.logprobs_from_logits(logits, labels, ignore_index=torch.iinfo(torch.int64).min)
        # OpenRLHF semantics: the result is in the logits' dtype (bf16 stays bf16).
        return logp.to(logits.dtype)

    return log_probs_from_logits


def _make_compute_entropy(original):
    def compute_entropy(logits: Tensor) -> Tensor:
        labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
        _, entropy = rlhf_kernels.logprobs_from_logits(logits, labels, return_entropy=True)
        return entropy.to(logits.dtype)

    return compute_entropy


def _make_compute_approx_kl(original):
    def compute_approx_kl(log_probs: Tensor, log_probs_base: Tensor, log_probs_old: Tensor | None = None,
                          kl_estimator: str = "k1", unbiased_gradient: bool = False) -> Tensor:
        if kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"Unknown kl_estimator: {kl_estimator}")
        # OpenRLHF semantics: float32 math, and every estimator's value clamped to
        # [-10, 10] (ours clamps k3 only); its k3 bound on the log-ratio (>= -10)
        # lands in the same final clamp as ours, so values and gradients agree.
        value = rlhf_kernels.kl_penalty(log_probs.float(), log_probs_base.float(), estimator=kl_estimator)
        value = value.clamp(min=-10, max=10)
        if not unbiased_gradient:
            return value
        from openrlhf.models.utils import KL_IS_WEIGHT_CLIP

        # OpenRLHF semantics: keep the value, take the importance-weighted k2 gradient.
        log_ratio = log_probs.float() - log_probs_base.float()
        if log_probs_old is None:
            weight = 1.0
        else:
            weight = (log_probs.float() - log_probs_old.float()).exp().clamp(max=KL_IS_WEIGHT_CLIP).detach()
        surrogate = weight * (log_ratio**2 / 2.0)
        return value.detach() + surrogate - surrogate.detach()

    return compute_approx_kl


def _make_gae(original):
    @torch.no_grad()
    def get_advantages_and_returns(self, values: Tensor, rewards: Tensor, action_mask: Tensor,
                                   gamma: float, lambd: float):
        # OpenRLHF semantics: masked steps are zero-reward, zero-value steps of the
        # recursion (a hole is discounted through, not skipped as in ours), and
        # every position gets an advantage: ours over the masked inputs, no mask.
        if action_mask is not None:
            values = action_mask * values
            rewards = action_mask * rewards
        advantages, _ = rlhf_kernels.compute_gae(rewards, values, None, gamma=gamma, lam=lambd, whiten=False)
        advantages = advantages.to(torch.promote_types(rewards.dtype, values.dtype))
        return advantages, advantages + values

    return get_advantages_and_returns


_patcher = Patcher(
    framework="openrlhf",
    distribution="openrlhf",
    tested_versions=TESTED_VERSIONS,
    targets=[
        _Target("openrlhf.models.utils", "log_probs_from_logits", _make_log_probs_from_logits),
        _Target("openrlhf.models.utils", "compute_entropy", _make_compute_entropy),
        _Target("openrlhf.models.utils", "compute_approx_kl", _make_compute_approx_kl),
        _Target("openrlhf.trainer.ppo_utils.experience_maker", "RemoteExperienceMaker.get_advantages_and_returns",
                _make_gae),
    ],
    consumers=(
        "openrlhf.models.actor",
        "openrlhf.trainer.ray.ppo_actor",
        "openrlhf.trainer.ppo_utils.experience_maker",
    ),
)

patch = _patcher.patch
unpatch = _patcher.unpatch
patched = _patcher.patched
patched_names = _patcher.patched_names
version = _patcher.version

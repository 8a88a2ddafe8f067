"""rlhf_kernels: fused Triton, CUDA and C++ kernels for PPO training of language models.

Importing this package never initialises CUDA and works without a GPU, without
Triton and without the compiled extension (the eager backend then runs).
"""

from ._dispatch import BACKENDS, available_backends
from .aggregation import AGG_MODES, agg_loss
from .ops.advantages import (
    AdaptiveKLController,
    PPOAdvantages,
    compute_gae,
    group_advantages,
    kl_penalty,
    ppo_advantages,
)
from .ops.lm_head import logprobs_from_hidden, ppo_loss_from_hidden
from .ops.logprobs import logprobs_from_logits
from .ops.ppo_loss import ppo_loss_from_logits, ppo_loss_from_logprobs, ppo_policy_loss, ppo_value_loss
from .ops.rollout_correction import RolloutCorrection, rollout_correction
from .ops.truncation import truncation_threshold

__version__ = "0.1.0"

__all__ = [
    "AGG_MODES",
    "AdaptiveKLController",
    "BACKENDS",
    "PPOAdvantages",
    "RolloutCorrection",
    "agg_loss",
    "available_backends",
    "compute_gae",
    "group_advantages",
    "kl_penalty",
    "logprobs_from_hidden",
    "logprobs_from_logits",
    "ppo_loss_from_hidden",
    "ppo_loss_from_logits",
    "ppo_loss_from_logprobs",
    "ppo_policy_loss",
    "ppo_value_loss",
    "ppo_advantages",
    "rollout_correction",
    "truncation_threshold",
]

"""verl's advantage estimators on rlhf_kernels (the makers ``verl.patch()``
installs, see verl.py): ``compute_gae_advantage_return`` -> ``compute_gae``;
"grpo", "rloo" and their vectorized twins, "reinforce_plus_plus_baseline",
"gpg", "gdpo", "grpo_passk", "opo", "remax" -> ``group_advantages``;
"reinforce_plus_plus" -> ``compute_gae`` (V = 0, lam = 1). Each keeps verl's
semantics; a "verl semantics" comment marks where they differ from ours.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

import rlhf_kernels

from . import hand_back


def _float_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype

def _next_valid_fill(full: Tensor, mask: Tensor) -> Tensor:
    """Each masked position takes the value at the next valid position of its
    row (0 past the last one); valid positions keep theirs."""
    seq_len = full.shape[-1]
    positions = torch.arange(seq_len, device=full.device).expand_as(full)
    next_valid = torch.where(mask, positions, seq_len).flip(-1).cummin(-1).values.flip(-1)
    padded = torch.cat([full, full.new_zeros(full.shape[:-1] + (1,))], dim=-1)
    return padded.gather(-1, next_valid)


def _make_compute_gae(original):
    def compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam):
        import verl.utils.torch_functional as verl_F

        with torch.no_grad():
            mask = response_mask.bool()
            advantages, _ = rlhf_kernels.compute_gae(
                token_level_rewards, values, mask, gamma=float(gamma), lam=float(lam), whiten=False
            )
            # verl semantics: a masked position (after EOS, or an observation token
            # inside a multi-turn response) holds the advantage carried from the next
            # valid position, not 0, and its return is that plus its own value.
            advantages = _next_valid_fill(advantages, mask).to(_float_dtype(token_level_rewards, values))
            returns = advantages + values
            # verl semantics: whitened over the valid tokens (unbiased variance; it
            # raises for fewer than two), applied to every position.
            advantages = verl_F.masked_whiten(advantages, response_mask)
        return advantages, returns

    return compute_gae_advantage_return


def _group_inverse(index, device) -> Tensor:
    return torch.from_numpy(np.unique(np.asarray(index), return_inverse=True)[1].reshape(-1)).to(device)


def _alone(groups: Tensor) -> Tensor:
    """Whether each response is the only one of its group (verl's baselines
    give it the group mean 0 and std 1; ours give it the advantage 0)."""
    return torch.bincount(groups)[groups] == 1


def _grpo_scores(scores: Tensor, index, epsilon: float, norm_by_std: bool) -> Tensor:
    """verl's GRPO advantage of each response (B,) on group_advantages."""
    groups = _group_inverse(index, scores.device)
    mode = "grpo" if norm_by_std else "dr_grpo"
    adv = rlhf_kernels.group_advantages(scores, group_ids=groups, mode=mode, eps=epsilon).to(scores.dtype)
    # verl semantics: a group of one has mean 0 and std 1, so it keeps its
    # score (divided by 1 + eps); ours gives it 0.
    kept = scores / (1.0 + epsilon) if norm_by_std else scores
    return torch.where(_alone(groups), kept, adv)


def _make_grpo(original):
    def compute_grpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                       norm_adv_by_std_in_grpo=True, config=None):
        with torch.no_grad():
            adv = _grpo_scores(token_level_rewards.sum(dim=-1), index, epsilon, norm_adv_by_std_in_grpo)
            adv = adv.unsqueeze(-1) * response_mask
        return adv, adv

    return compute_grpo_outcome_advantage


def _make_gdpo(original):
    def compute_gdpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                       norm_adv_by_std_in_grpo=True, config=None, non_tensor_batch=None,
                                       batch=None, **kwargs):
        import verl.utils.torch_functional as verl_F

        args = (token_level_rewards, response_mask, index, epsilon, norm_adv_by_std_in_grpo, config,
                non_tensor_batch, batch)
        # verl semantics: with a config and the batches, one GRPO advantage per reward
        # component (algorithm.gdpo_reward_keys, each response's component score),
        # weighted by gdpo_reward_weights; else the one of the summed rewards.
        components, weights = [token_level_rewards.sum(dim=-1)], None
        if config is not None and non_tensor_batch is not None and batch is not None:
            keys = config.get("gdpo_reward_keys", None)
            if not keys or any(key not in non_tensor_batch for key in keys):
                return hand_back("verl.compute_gdpo_outcome_advantage", "gdpo_reward_keys missing or not in the "
                                 "batch (verl asserts)", original, *args, **kwargs)
            components = [torch.tensor(np.asarray(non_tensor_batch[key], dtype=np.float32),
                                       device=token_level_rewards.device) for key in keys]
            weights = config.get("gdpo_reward_weights", None)
        weights = [1.0] * len(components) if weights is None else list(weights)
        with torch.no_grad():
            total = None
            for weight, scores in zip(weights, components):
                part = torch.tensor(weight, dtype=torch.float32, device=scores.device) * \
                    _grpo_scores(scores, index, epsilon, norm_adv_by_std_in_grpo).unsqueeze(-1) * response_mask
                total = part if total is None else total + part
            # verl semantics: whitened over the batch's valid tokens (its masked_whiten).
            advantages = verl_F.masked_whiten(total, response_mask) * response_mask
        return advantages, advantages

    return compute_gdpo_outcome_advantage


def _make_grpo_passk(original):
    def compute_grpo_passk_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                             norm_adv_by_std_in_grpo=True, config=None, **kwargs):
        args = (token_level_rewards, response_mask, index, epsilon, norm_adv_by_std_in_grpo, config)
        key = "verl.compute_grpo_passk_outcome_advantage"
        if config is None:
            return hand_back(key, "no config (verl asserts one)", original, *args, **kwargs)
        groups = _group_inverse(index, token_level_rewards.device)
        if bool(_alone(groups).any()):
            return hand_back(key, "a group of one (verl raises)", original, *args, **kwargs)
        # verl semantics: the flag is read from the config, the argument ignored.
        mode = "grpo_passk" if config.get("norm_adv_by_std_in_grpo", True) else "passk"
        with torch.no_grad():
            scores = token_level_rewards.sum(dim=-1)
            adv = rlhf_kernels.group_advantages(scores, group_ids=groups, mode=mode, eps=epsilon).to(scores.dtype)
            adv = adv.unsqueeze(-1) * response_mask
        return adv, adv

    return compute_grpo_passk_outcome_advantage


def _make_opo(original):
    def compute_opo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6, config=None,
                                      **kwargs):
        with torch.no_grad():
            scores = token_level_rewards.sum(dim=-1)
            lengths = response_mask.sum(dim=-1)
            groups = _group_inverse(index, scores.device)
            alone = _alone(groups)
            totals = torch.zeros(int(groups.max()) + 1 if groups.numel() else 0, dtype=torch.float64,
                                 device=scores.device).index_add_(0, groups, lengths.to(torch.float64))
            if bool(((totals[groups] == 0) & ~alone).any()):
                return hand_back("verl.compute_opo_outcome_advantage", "a group of responses of length 0 (verl's "
                                 "baseline is 0 / 0)", original, token_level_rewards, response_mask, index, epsilon,
                                 config, **kwargs)
            adv = rlhf_kernels.group_advantages(scores, group_ids=groups, mode="opo", lengths=lengths)
            # verl semantics: a group of one has the baseline 0 (it keeps its score); ours gives it 0.
            adv = torch.where(alone, scores, adv.to(scores.dtype)).unsqueeze(-1) * response_mask
        return adv, adv

    return compute_opo_outcome_advantage


def _make_remax(original):
    def compute_remax_outcome_advantage(token_level_rewards, reward_baselines, response_mask, config=None,
                                        **kwargs):
        with torch.no_grad():
            # verl semantics: the return is the reverse cumulative sum of the masked rewards
            # over every position (a hole's counts the later rewards): GAE with V = 0,
            # gamma = lam = 1 and no mask.
            masked = token_level_rewards * response_mask
            returns, _ = rlhf_kernels.compute_gae(masked, torch.zeros_like(masked), None, gamma=1.0, lam=1.0,
                                                  whiten=False)
            returns = returns.to(masked.dtype)
            advantages = returns - reward_baselines.unsqueeze(-1) * response_mask
        return advantages, returns

    return compute_remax_outcome_advantage


def _rloo(token_level_rewards, response_mask, index, alone_keeps_score: bool):
    with torch.no_grad():
        scores = token_level_rewards.sum(dim=-1)
        groups = _group_inverse(index, scores.device)
        adv = rlhf_kernels.group_advantages(scores, group_ids=groups, mode="rloo").to(scores.dtype)
        if alone_keeps_score:
            adv = torch.where(_alone(groups), scores, adv)
        adv = adv.unsqueeze(-1) * response_mask
    return adv, adv


def _make_rloo(original):
    def compute_rloo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                       config=None, **kwargs):
        # verl semantics: a group of one keeps its raw score; ours gives it 0.
        return _rloo(token_level_rewards, response_mask, index, alone_keeps_score=True)

    return compute_rloo_outcome_advantage


def _group_centred(scores: Tensor, index) -> Tensor:
    """score - its group's mean (group_advantages "dr_grpo"), a group of one
    keeping its score: verl's baselines give a lone response the mean 0."""
    groups = _group_inverse(index, scores.device)
    adv = rlhf_kernels.group_advantages(scores, group_ids=groups, mode="dr_grpo").to(scores.dtype)
    return torch.where(_alone(groups), scores, adv)


def _make_reinforce_pp_baseline(original):
    def compute_reinforce_plus_plus_baseline_outcome_advantage(token_level_rewards, response_mask, index,
                                                               epsilon=1e-6, config=None, **kwargs):
        import verl.utils.torch_functional as verl_F

        with torch.no_grad():
            centred = _group_centred(token_level_rewards.sum(dim=-1), index)
            scores = centred.unsqueeze(-1) * response_mask
            # verl semantics: whitened over the batch's valid tokens (its masked_whiten).
            scores = verl_F.masked_whiten(scores, response_mask) * response_mask
        return scores, scores

    return compute_reinforce_plus_plus_baseline_outcome_advantage


def _make_reinforce_pp(original):
    def compute_reinforce_plus_plus_outcome_advantage(token_level_rewards, response_mask, config=None, **kwargs):
        import verl.utils.torch_functional as verl_F

        if config is None:
            return hand_back("verl.compute_reinforce_plus_plus_outcome_advantage", "no config (verl asserts one)",
                             original, token_level_rewards, response_mask, config, **kwargs)
        with torch.no_grad():
            # The discounted return over the valid tokens: GAE with V = 0 and lam = 1
            # (a masked position's reward skipped, its return 0, as verl's loop).
            returns, _ = rlhf_kernels.compute_gae(token_level_rewards, torch.zeros_like(token_level_rewards),
                                                  response_mask.bool(), gamma=float(config.gamma), lam=1.0,
                                                  whiten=False)
            returns = returns.to(token_level_rewards.dtype)
            advantages = verl_F.masked_whiten(returns, response_mask) * response_mask
        return advantages, returns

    return compute_reinforce_plus_plus_outcome_advantage


def _make_gpg_estimator(original):
    def compute_gpg_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6, f_norm=1.0,
                                      alpha=1.0, config=None, **kwargs):
        with torch.no_grad():
            scores = token_level_rewards.sum(dim=-1)
            # verl semantics: alpha is the batch size over the number of nonzero
            # scores (the argument is overwritten).
            alpha = scores.shape[0] / torch.count_nonzero(scores).clamp(min=1)
            adv = alpha * _group_centred(scores, index) / f_norm
            adv = adv.unsqueeze(-1) * response_mask
        return adv, adv

    return compute_gpg_outcome_advantage


def _make_rloo_vectorized(original):
    def compute_rloo_vectorized_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                                  config=None, **kwargs):
        # verl semantics: the vectorized RLOO gives a group of one 0, as ours.
        return _rloo(token_level_rewards, response_mask, index, alone_keeps_score=False)

    return compute_rloo_vectorized_outcome_advantage

"""verl on rlhf_kernels: ``rlhf_kernels.integrations.verl.patch()``.

Replaces, in ``verl.utils.torch_functional`` / ``verl.trainer.ppo.core_algos``,
in the advantage-estimator and policy-loss registries the trainers look them
up in, and wherever verl's modules imported them:

- ``logprobs_from_logits``, ``entropy_from_logits`` -> ``logprobs_from_logits``;
- ``kl_penalty`` -> ``kl_penalty``;
- ``compute_gae_advantage_return`` -> ``compute_gae``;
- ``compute_grpo_outcome_advantage``, ``compute_rloo_outcome_advantage`` and
  their vectorized twins (registry names "grpo", "rloo", "grpo_vectorized",
  "rloo_vectorized"), and the group baselines of "reinforce_plus_plus_baseline"
  and "gpg" -> ``group_advantages``; "reinforce_plus_plus" -> ``compute_gae``
  (V = 0, lam = 1);
- ``compute_policy_loss_vanilla`` (registry name "vanilla") -> ``ppo_policy_loss``,
  float masks and ``rollout_is_weights`` (``token_weights``) included;
- ``compute_policy_loss_gspo`` ("gspo") -> ``ppo_policy_loss(ratio_level="sequence-token")``;
- ``compute_policy_loss_cispo`` / ``_sapo`` / ``_gpg`` / ``_dppo_tv`` /
  ``_dppo_kl`` / ``_dro`` (registry names "cispo", "sapo", "gpg", "dppo_tv",
  "dppo_kl", "dro") -> ``ppo_policy_loss(loss_type=...)``;
- ``compute_value_loss`` -> ``ppo_value_loss``;
- ``compute_rollout_correction_weights`` (``rollout_corr_helper``; TIS and
  IcePop, token and sequence levels) -> ``rollout_correction``, its metrics
  from verl's own ``compute_is_metrics``;
- ``agg_loss`` (which verl's other policy losses, its entropy and KL losses
  and its trainers' metrics call) -> the aggregation of our losses
  (``rlhf_kernels.agg_loss``, the same weights the fused kernels
  apply), with verl's dp_size / global-count normalisation around it.

The adapters keep verl's semantics; each "verl semantics" comment marks a
place where they differ from ours.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

import rlhf_kernels

from . import Patcher, _Target, _weights_ok, count_served, hand_back, served_call

TESTED_VERSIONS = frozenset({"0.9.1"})

_FUNCTIONAL = "verl.utils.torch_functional"
_CORE = "verl.trainer.ppo.core_algos"


def _float_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _make_logprobs_from_logits(original):
    def logprobs_from_logits(logits, labels, inplace_backward=True):
        import verl.utils.torch_functional as verl_F

        # verl semantics: the flash-attn cross-entropy path (float32 output, logits
        # consumed by an in-place backward) where verl would take it; else
        # log_softmax + gather in the logits' dtype.
        flash = verl_F.FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE and __import__("os").environ.get(
            "VERL_DISABLE_FLASH_ATTN_CE", "0"
        ) != "1"
        logp = rlhf_kernels.logprobs_from_logits(
            logits, labels, ignore_index=torch.iinfo(torch.int64).min,
            inplace_backward=bool(flash and inplace_backward),
        )
        return logp if flash else logp.to(logits.dtype)

    return logprobs_from_logits


def _make_entropy_from_logits(original):
    def entropy_from_logits(logits: Tensor) -> Tensor:
        labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
        _, entropy = rlhf_kernels.logprobs_from_logits(logits, labels, return_entropy=True)
        return entropy.to(logits.dtype)  # verl semantics: the logits' dtype

    return entropy_from_logits


_KL_NAMES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}


def _make_kl_penalty(original):
    def kl_penalty(logprob: Tensor, ref_logprob: Tensor, kl_penalty) -> Tensor:
        base = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
        if base not in _KL_NAMES:
            # "full" (a KL over the vocabulary) and unknown names (verl raises there)
            return hand_back("verl.kl_penalty", f"estimator {kl_penalty!r}", original, logprob, ref_logprob,
                             kl_penalty)
        out_dtype = _float_dtype(logprob, ref_logprob)
        forward = rlhf_kernels.kl_penalty(logprob, ref_logprob, estimator=_KL_NAMES[base]).to(out_dtype)
        if not kl_penalty.endswith("+") or base in ("mse", "k2"):
            return forward
        # verl semantics: "k1+" / "k3+" take the value of k1 / k3 and the gradient of k2
        # (straight-through), for an unbiased KL gradient.
        backward = 0.5 * (logprob - ref_logprob).square()
        return backward - backward.detach() + forward.detach()

    return kl_penalty


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


_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")


def _agg_args(mask: Tensor, agg: str, dp_size=1, batch_num_tokens=None, global_batch_size=None,
              loss_scale_factor=None):
    """Our (num_tokens, num_seqs) and the factor and NaN guard that turn our
    aggregate into verl's ``agg_loss``: verl multiplies by dp_size, divides
    seq-mean-token-sum-norm by loss_scale_factor (default T, as ours), and
    divides by a count of 0 (NaN) where ours returns 0."""
    if dp_size > 1 and agg == "token-mean" and batch_num_tokens is None:
        raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
    if dp_size > 1 and agg.startswith("seq-mean") and global_batch_size is None:
        raise ValueError("global_batch_size is required when dp_size > 1")
    scale = float(dp_size)
    if agg == "seq-mean-token-sum-norm" and loss_scale_factor is not None:
        scale *= mask.shape[-1] / float(loss_scale_factor)
    num_tokens = float(batch_num_tokens) if batch_num_tokens is not None and agg == "token-mean" else None
    num_seqs = float(global_batch_size) if global_batch_size is not None and agg.startswith("seq-mean") else None
    if agg == "token-mean":
        count = mask.sum() if num_tokens is None else torch.tensor(num_tokens)
    elif agg.startswith("seq-mean"):
        count = (mask.sum(-1) > 0).sum() if num_seqs is None else torch.tensor(num_seqs)
    else:
        count = None
    # our kernels reject a count of 0; verl then divides by it
    if num_tokens == 0.0 or num_seqs == 0.0:
        num_tokens = num_seqs = None
    return num_tokens, num_seqs, scale, count


def _zero_count(dp_size=1, batch_num_tokens=None, global_batch_size=None, **_) -> bool:
    """A global count of 0 (verl divides by it: inf / NaN, as its own code gives)."""
    return any(c is not None and not isinstance(c, Tensor) and c == 0 for c in (batch_num_tokens, global_batch_size))


def _finish(loss: Tensor, scale: float, count, dtype, agg: str) -> Tensor:
    loss = loss * scale if scale != 1.0 else loss
    if count is not None:
        loss = torch.where(count.to(loss.device) > 0, loss, loss.new_tensor(float("nan")))
    # verl semantics: the seq-mean modes weight sequences by a float32 mask, so
    # bf16 / fp16 inputs give a float32 loss; the token modes keep the dtype.
    return loss.to(torch.promote_types(dtype, torch.float32) if agg.startswith("seq-mean") else dtype)


def _policy_loss_hand_back(old_log_prob, advantages, response_mask, loss_agg_mode, config) -> str | None:
    """Why verl's own policy loss must run this call, or None."""
    if config is None:
        return "no config (verl asserts one)"
    if loss_agg_mode not in _AGG_MODES:
        return f"loss_agg_mode {loss_agg_mode!r} is not one of verl's modes (verl raises)"
    if old_log_prob.requires_grad or advantages.requires_grad:
        return "old_log_prob or advantages require a gradient (ours treats them as data)"
    if _zero_count(**config.global_batch_info):
        return "a global token or sequence count of 0 (verl divides by it)"
    if not _weights_ok(response_mask):
        return "response_mask holds negative or non-finite weights"
    return None


def _rollout_weights(rollout_is_weights, mask: Tensor):
    """verl's rollout importance-sampling weights as our token_weights (0 at
    the masked positions, which verl's aggregation drops), and whether every
    valid token's weight is > 0 (else the clip statistics, which verl counts
    unweighted, are computed here: ours count a weight-0 token as unclipped).
    None where they are negative or non-finite at a valid token."""
    if rollout_is_weights is None:
        return None, True
    valid = mask != 0
    weights = torch.where(valid, rollout_is_weights.detach(), 0.0)
    if not _weights_ok(weights):
        return None, False
    return weights, bool((weights > 0)[valid].all())


def _eager_clip_stats(log_ratio, advantages, response_mask, clip_low, clip_high, clip_ratio_c):
    """verl's pg_clipfrac and pg_clipfrac_lower, as verl computes them from
    the (clamped, token or sequence) log-ratio."""
    import verl.utils.torch_functional as verl_F

    with torch.no_grad():
        ratio = torch.exp(log_ratio)
        loss1 = -advantages * ratio
        loss2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
        clipfrac = verl_F.masked_mean(torch.gt(loss2, loss1).float(), response_mask)
        if clip_ratio_c is None:
            return clipfrac, torch.zeros_like(clipfrac)
        lower = torch.gt(torch.maximum(loss1, loss2), -advantages * clip_ratio_c) * (advantages < 0).float()
        return clipfrac, verl_F.masked_mean(lower, response_mask)


def _clip_bounds(config) -> tuple[float, float]:
    clip_ratio = config.clip_ratio
    clip_low = config.clip_ratio_low if config.clip_ratio_low is not None else clip_ratio
    clip_high = config.clip_ratio_high if config.clip_ratio_high is not None else clip_ratio
    return clip_low, clip_high


def _policy_loss_call(name: str, original, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                      config, rollout_is_weights, *, dual_clip, ratio_level, loss_type="clip",
                      clip_bounds=None, **objective):
    """verl's ``compute_policy_loss_<name>`` on ``ppo_policy_loss``: the loss and
    verl's metrics dict, or a hand-back to verl's code. ``loss_type`` and
    ``objective`` (tau_pos / tau_neg) select the objective; ``clip_bounds``
    (clip_low, clip_high) default to the config's clip ratios."""
    key = f"verl.compute_policy_loss_{name}"
    args = (old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
    reason = _policy_loss_hand_back(old_log_prob, advantages, response_mask, loss_agg_mode, config)
    if reason is not None:
        return hand_back(key, reason, original, *args)
    token_weights, all_weighted = _rollout_weights(rollout_is_weights, response_mask)
    if rollout_is_weights is not None and token_weights is None:
        return hand_back(key, "rollout_is_weights negative or non-finite at a valid token", original, *args)
    import verl.utils.torch_functional as verl_F

    clip_low, clip_high = clip_bounds or _clip_bounds(config)
    with torch.no_grad():
        log_ratio = log_prob - old_log_prob
        if ratio_level == "token":
            log_ratio = log_ratio.clamp(min=-20.0, max=20.0)
        else:
            counts = response_mask.sum(-1).clamp(min=1)
            log_ratio = ((log_ratio * response_mask).sum(-1) / counts).unsqueeze(-1).expand_as(log_prob)
    # verl semantics: GSPO clamps the sequence log-ratio at 10 (ours at 20); past
    # it verl's loss is constant, ours is not.
    if ratio_level != "token" and bool((log_ratio > 10.0).any()):
        return hand_back(key, "a sequence log-ratio above verl's GSPO clamp of 10", original, *args)
    num_tokens, num_seqs, scale, count = _agg_args(response_mask, loss_agg_mode, **config.global_batch_info)
    # Ours differentiates log_prob only; old_log_prob and advantages are data
    # (verl's trainers pass them detached). A float mask weights each token,
    # as verl's weighted means do.
    options = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=loss_agg_mode,
                   num_tokens=num_tokens, num_seqs=num_seqs, ratio_level=ratio_level, loss_type=loss_type,
                   **objective)
    loss, stats = rlhf_kernels.ppo_policy_loss(log_prob, old_log_prob, advantages, response_mask,
                                               token_weights=token_weights, **options)
    loss = _finish(loss, scale, count, _float_dtype(old_log_prob, log_prob, advantages), loss_agg_mode)
    if loss_type == "gpg" and name == "gpg":
        return loss, {}  # verl semantics: GPG reports no metrics
    if loss_type == "kl_cov":
        # verl semantics: KL-Cov reports the mean |log-ratio| only.
        with torch.no_grad():
            return loss, {"actor/ppo_kl": verl_F.masked_mean((log_prob - old_log_prob).abs(), response_mask).item()}
    if loss_type == "clip_cov":
        # verl semantics: Clip-Cov's pg_clipfrac is the share its selection detached; no pg_clipfrac_lower.
        with torch.no_grad():
            return loss, {"actor/pg_clipfrac": stats["clipfrac"].item(),
                          "actor/ppo_kl": verl_F.masked_mean(old_log_prob - log_prob, response_mask).item()}
    if loss_type in ("dro", "gpg"):
        # verl semantics: DRO and REINFORCE report the mean of the unclamped log-ratio only.
        with torch.no_grad():
            return loss, {"actor/ppo_kl": verl_F.masked_mean(old_log_prob - log_prob, response_mask).item()}
    if all_weighted:
        clipfrac, clipfrac_lower = stats["clipfrac"], stats["clipfrac_lower"]
    elif loss_type == "clip":
        clipfrac, clipfrac_lower = _eager_clip_stats(log_ratio, advantages, response_mask, clip_low, clip_high,
                                                     dual_clip)
    else:
        # verl counts the statistics unweighted (ours take a weight-0 token's A as 0).
        with torch.no_grad():
            _, unweighted = rlhf_kernels.ppo_policy_loss(log_prob, old_log_prob, advantages, response_mask,
                                                         **options)
        clipfrac, clipfrac_lower = unweighted["clipfrac"], unweighted["clipfrac_lower"]
    with torch.no_grad():
        # verl semantics: ppo_kl is the masked mean of the token log-ratio, clamped in
        # the token-level losses (ours is unclamped), unclamped in GSPO.
        token_log_ratio = log_ratio if ratio_level == "token" else log_prob - old_log_prob
        ppo_kl = verl_F.masked_mean(-token_log_ratio, response_mask)
    metrics = {
        "actor/pg_clipfrac": clipfrac.item(),
        "actor/ppo_kl": ppo_kl.item(),
        "actor/pg_clipfrac_lower": clipfrac_lower.item() if dual_clip is not None else 0.0,
    }
    return loss, metrics


def _make_policy_loss(original):
    def compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                    config=None, rollout_is_weights=None):
        clip_ratio_c = config.get("clip_ratio_c", 3.0) if config is not None else 3.0
        assert clip_ratio_c > 1.0, (
            "The lower bound of the clip_ratio_c for dual-clip PPO should be greater than 1.0,"
            + f" but get the value: {clip_ratio_c}."
        )
        # verl semantics: the dual clip is always on (clip_ratio_c, default 3);
        # rollout_is_weights multiply the policy term (our token_weights).
        return _policy_loss_call("vanilla", original, old_log_prob, log_prob, advantages, response_mask,
                                 loss_agg_mode, config, rollout_is_weights, dual_clip=clip_ratio_c,
                                 ratio_level="token")

    return compute_policy_loss_vanilla


def _needs_actor_config(key: str, config, original, *args):
    """A hand-back where verl asserts a real ActorConfig, else None."""
    from verl.workers.config import ActorConfig

    if isinstance(config, ActorConfig):
        return None
    return hand_back(key, "config is not an ActorConfig (verl asserts one)", original, *args)


def _make_policy_loss_gspo(original):
    def compute_policy_loss_gspo(old_log_prob, log_prob, advantages, response_mask,
                                 loss_agg_mode="seq-mean-token-mean", config=None, rollout_is_weights=None):
        args = (old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
        refused = _needs_actor_config("verl.compute_policy_loss_gspo", config, original, *args)
        if refused is not None:
            return refused
        # verl semantics: GSPO-token (each token's gradient through its own
        # log-prob, the ratio the sequence's), no dual clip, pg_clipfrac_lower 0.
        return _policy_loss_call("gspo", original, *args, dual_clip=None, ratio_level="sequence-token")

    return compute_policy_loss_gspo


def _make_policy_loss_cispo(original):
    def compute_policy_loss_cispo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                  config=None, rollout_is_weights=None):
        args = (old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
        refused = _needs_actor_config("verl.compute_policy_loss_cispo", config, original, *args)
        if refused is not None:
            return refused
        # verl semantics: pg_clipfrac counts ratio != clip(ratio) (a NaN ratio
        # too; ours counts the ratio outside the range), pg_clipfrac_lower 0.
        return _policy_loss_call("cispo", original, *args, dual_clip=None, ratio_level="token", loss_type="cispo")

    return compute_policy_loss_cispo


def _make_policy_loss_sapo(original):
    def compute_policy_loss_sapo(old_log_prob, log_prob, advantages, response_mask,
                                 loss_agg_mode="seq-mean-token-mean", config=None, rollout_is_weights=None):
        args = (old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
        refused = _needs_actor_config("verl.compute_policy_loss_sapo", config, original, *args)
        if refused is not None:
            return refused
        # verl semantics: SAPO aggregates by seq-mean-token-mean whatever
        # loss_agg_mode says; its clip fractions are 0.
        return _policy_loss_call("sapo", original, old_log_prob, log_prob, advantages, response_mask,
                                 "seq-mean-token-mean", config, rollout_is_weights, dual_clip=None,
                                 ratio_level="token", loss_type="sapo", clip_bounds=(0.2, 0.2),
                                 tau_pos=float(config.tau_pos), tau_neg=float(config.tau_neg))

    return compute_policy_loss_sapo


def _make_policy_loss_gpg(original):
    def compute_policy_loss_gpg(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                config=None, rollout_is_weights=None):
        return _policy_loss_call("gpg", original, old_log_prob, log_prob, advantages, response_mask,
                                 loss_agg_mode, config, rollout_is_weights, dual_clip=None, ratio_level="token",
                                 loss_type="gpg", clip_bounds=(0.2, 0.2))

    return compute_policy_loss_gpg


def _make_policy_loss_dppo(loss_type: str):
    def make(original):
        def compute_policy_loss_dppo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                     config=None, rollout_is_weights=None):
            # verl semantics: the thresholds are the clip ratios, the cap of the
            # stopped ratio is clip_ratio_c (20 where the config has none).
            cap = config.get("clip_ratio_c", 20.0) if config is not None else 20.0
            return _policy_loss_call(loss_type, original, old_log_prob, log_prob, advantages, response_mask,
                                     loss_agg_mode, config, rollout_is_weights, dual_clip=float(cap),
                                     ratio_level="token", loss_type=loss_type)

        compute_policy_loss_dppo.__name__ = compute_policy_loss_dppo.__qualname__ = \
            f"compute_policy_loss_{loss_type}"
        return compute_policy_loss_dppo

    return make


def _make_policy_loss_dro(original):
    def compute_policy_loss_dro(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                config=None, rollout_is_weights=None):
        args = (old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
        key = "verl.compute_policy_loss_dro"
        beta = getattr(getattr(config, "policy_loss", None), "dro_beta", None)
        if beta is None or beta <= 0:
            return hand_back(key, "no positive policy_loss.dro_beta (verl raises)", original, *args)
        if rollout_is_weights is not None:
            # verl semantics: the weights multiply the log-ratio penalty too; ours scale A.
            return hand_back(key, "rollout_is_weights (verl weights the log-ratio penalty too)", original, *args)
        return _policy_loss_call("dro", original, *args, dual_clip=None, ratio_level="token", loss_type="dro",
                                 clip_bounds=(0.2, 0.2), dro_beta=float(beta))

    return compute_policy_loss_dro


def _make_policy_loss_geo_mean(original):
    def compute_policy_loss_geo_mean(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                     config=None, rollout_is_weights=None):
        args = (old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
        key = "verl.compute_policy_loss_geo_mean"
        refused = _needs_actor_config(key, config, original, *args)
        if refused is not None:
            return refused
        if old_log_prob.requires_grad or advantages.requires_grad:
            return hand_back(key, "old_log_prob or advantages require a gradient (ours treats them as data)",
                             original, *args)
        if not _weights_ok(response_mask):
            return hand_back(key, "response_mask holds negative or non-finite weights", original, *args)
        rows = log_prob[..., 0].numel() if log_prob.dim() else 0
        if rows == 0:
            return hand_back(key, "no sequence (verl's mean over none is NaN)", original, *args)
        import verl.utils.torch_functional as verl_F

        token_weights = None
        if rollout_is_weights is not None:
            # verl semantics: each sequence's loss times the geometric mean of its
            # valid tokens' weights (+ 1e-10 in the log), as constant token weights.
            with torch.no_grad():
                m = response_mask.to(torch.float64)
                log_w = (torch.log(rollout_is_weights.detach().to(torch.float64) + 1e-10) * m).sum(-1)
                seq_w = torch.exp(log_w / (m.sum(-1) + 1e-8))
            if not bool(torch.isfinite(seq_w).all()):
                return hand_back(key, "rollout_is_weights negative or non-finite", original, *args)
            token_weights = seq_w.unsqueeze(-1).expand(log_prob.shape).to(torch.float32)
        clip_low, clip_high = _clip_bounds(config)
        # verl semantics: the mean of the sequence losses over every row, whatever
        # loss_agg_mode and the global batch say (ours: seq-mean-token-mean over all rows).
        loss, stats = rlhf_kernels.ppo_policy_loss(
            log_prob, old_log_prob, advantages, response_mask, token_weights=token_weights, loss_type="geo_mean",
            clip_low=clip_low, clip_high=clip_high, agg="seq-mean-token-mean", num_seqs=float(rows))
        with torch.no_grad():
            ppo_kl = verl_F.masked_mean(old_log_prob - log_prob, response_mask)
        metrics = {"actor/pg_clipfrac": stats["clipfrac"].item(), "actor/ppo_kl": ppo_kl.item(),
                   "actor/pg_clipfrac_lower": stats["clipfrac_lower"].item()}
        return loss.to(_float_dtype(old_log_prob, log_prob, advantages)), metrics

    return compute_policy_loss_geo_mean


def _make_policy_loss_cov(loss_type: str):
    def make(original):
        def compute_policy_loss_cov(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                    config=None, rollout_is_weights=None):
            args = (old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
            key = f"verl.compute_policy_loss_{loss_type}"
            refused = _needs_actor_config(key, config, original, *args)
            if refused is not None:
                return refused
            policy = config.policy_loss
            ratio = getattr(policy, f"{loss_type}_ratio", None)
            ratio = 0.0002 if ratio is None else ratio
            if not 0 < ratio <= 1:
                return hand_back(key, f"{loss_type}_ratio outside (0, 1] (verl asserts > 0)", original, *args)
            # verl semantics: its ratio is unclamped (ours clamps the log-ratio at +-20 as every objective).
            with torch.no_grad():
                beyond = ((log_prob - old_log_prob).abs() > 20.0) & (response_mask != 0)
            if bool(beyond.any()):
                return hand_back(key, "a log-ratio beyond +-20 (verl's ratio is unclamped there)", original, *args)
            if loss_type == "clip_cov":
                # verl semantics: the random choice is torch.randperm on the default generator,
                # over the candidates in row-major order: ours draws the same.
                lb = 1.0 if policy.clip_cov_lb is None else policy.clip_cov_lb
                ub = 5.0 if policy.clip_cov_ub is None else policy.clip_cov_ub
                if not lb < ub:
                    return hand_back(key, "clip_cov_lb >= clip_cov_ub (no token can be chosen)", original, *args)
                objective = dict(cov_bounds=(lb, ub))
            else:
                coef = 1.0 if policy.ppo_kl_coef is None else policy.ppo_kl_coef
                objective = dict(kl_cov_coef=float(coef))
            return _policy_loss_call(loss_type, original, *args, dual_clip=None, ratio_level="token",
                                     loss_type=loss_type, cov_ratio=float(ratio), **objective)

        compute_policy_loss_cov.__name__ = compute_policy_loss_cov.__qualname__ = f"compute_policy_loss_{loss_type}"
        return compute_policy_loss_cov

    return make


def _make_policy_loss_reinforce(original):
    def compute_policy_loss_reinforce(rollout_log_prob, log_prob, advantages, response_mask,
                                      loss_agg_mode="seq-mean-token-sum", config=None, rollout_is_weights=None):
        # verl semantics: -A logp times the (stopped) IS weights: our gpg objective
        # with token_weights; its one metric the mean unclamped log-ratio.
        return _policy_loss_call("reinforce", original, rollout_log_prob, log_prob, advantages, response_mask,
                                 loss_agg_mode, config, rollout_is_weights, dual_clip=None, ratio_level="token",
                                 loss_type="gpg", clip_bounds=(0.2, 0.2))

    return compute_policy_loss_reinforce


def _make_policy_loss_bypass_mode(original):
    def compute_policy_loss_bypass_mode(old_log_prob, log_prob, advantages, response_mask,
                                        loss_agg_mode="token-mean", config=None, rollout_is_weights=None):
        # verl's own function runs: its rollout correction (compute_rollout_correction_weights,
        # patched) and its policy loss, compute_policy_loss_vanilla or _reinforce (both
        # patched). Served when that policy loss was.
        args = (old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
        policy = getattr(config, "policy_loss", None)
        correction = policy.get("rollout_correction", None) if policy is not None else None
        loss_type = correction.get("loss_type", "ppo_clip") if correction is not None else None
        inner = {"ppo_clip": "vanilla", "reinforce": "reinforce"}.get(loss_type)
        if inner is None:
            return hand_back("verl.compute_policy_loss_bypass_mode", "no rollout_correction or an unknown "
                             "loss_type (verl raises)", original, *args)
        out, served = served_call(f"verl.compute_policy_loss_{inner}", original, *args)
        if not served:
            return hand_back("verl.compute_policy_loss_bypass_mode",
                             f"its compute_policy_loss_{inner} call was handed back", lambda *_: out)
        return out

    return compute_policy_loss_bypass_mode


def _value_loss_hand_back(returns, values, response_mask, cliprange_value, loss_agg_mode, batch_num_tokens,
                          global_batch_size) -> str | None:
    """Why verl's own value loss must run this call, or None."""
    if loss_agg_mode not in _AGG_MODES:
        return f"loss_agg_mode {loss_agg_mode!r} is not one of verl's modes (verl raises)"
    if not cliprange_value > 0:
        return "cliprange_value <= 0 (ours clips with a positive range)"
    if returns.requires_grad or values.requires_grad:
        return "returns or values require a gradient (ours treats them as targets)"
    if _zero_count(batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size):
        return "a global token or sequence count of 0 (verl divides by it)"
    if not _weights_ok(response_mask):
        return "response_mask holds negative or non-finite weights"
    return None


def _make_value_loss(original):
    def compute_value_loss(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode="token-mean",
                           dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
        reason = _value_loss_hand_back(returns, values, response_mask, cliprange_value, loss_agg_mode,
                                       batch_num_tokens, global_batch_size)
        if reason is not None:
            return hand_back("verl.compute_value_loss", reason, original, vpreds, returns, values, response_mask,
                             cliprange_value, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size,
                             loss_scale_factor)
        num_tokens, num_seqs, scale, count = _agg_args(
            response_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor
        )
        # Ours differentiates vpreds only; returns and the old values are targets.
        loss, stats = rlhf_kernels.ppo_value_loss(
            vpreds, values, returns, response_mask, clip=cliprange_value, agg=loss_agg_mode,
            num_tokens=num_tokens, num_seqs=num_seqs,
        )
        loss = _finish(loss, scale, count, _float_dtype(vpreds, returns, values), loss_agg_mode)
        return loss, stats["vf_clipfrac"].to(torch.float32)

    return compute_value_loss


def _agg_loss_hand_back(loss_mat, loss_mask, loss_agg_mode, counts_given) -> str | None:
    """Why verl's own agg_loss must run this call, or None."""
    if loss_agg_mode not in _AGG_MODES:
        return f"loss_agg_mode {loss_agg_mode!r} is not one of verl's modes (verl raises)"
    if not isinstance(loss_mat, Tensor) or not loss_mat.is_floating_point():
        return "loss_mat is not a floating tensor"
    if loss_mat.is_nested or loss_mask.is_nested:
        return "nested tensors"
    if loss_mat.dim() == 0 or loss_mat.shape != loss_mask.shape:
        return "loss_mat and loss_mask differ in shape (verl broadcasts)"
    if any(isinstance(c, Tensor) for c in counts_given if c is not None):
        return "a global count given as a tensor"
    if any(c == 0 for c in counts_given if c is not None):
        return "a global count of 0 (verl divides by it)"
    if not _weights_ok(loss_mask):
        return "loss_mask holds negative or non-finite weights"
    return None


_RC_KEY = "verl.compute_rollout_correction_weights"


def _make_rollout_correction_weights(original):
    def compute_rollout_correction_weights(log_ratio, response_mask, rollout_is="token", rollout_is_threshold=2.0,
                                           rollout_is_batch_normalize=False):
        import verl.trainer.ppo.rollout_corr_helper as helper

        args = (log_ratio, response_mask, rollout_is, rollout_is_threshold, rollout_is_batch_normalize)
        if rollout_is not in ("token", "sequence"):
            return hand_back(_RC_KEY, f"rollout_is {rollout_is!r}", original, *args)  # verl raises
        if log_ratio.dim() != 2 or response_mask.shape != log_ratio.shape or not log_ratio.is_floating_point():
            return hand_back(_RC_KEY, "not a (B, T) float log_ratio with a mask of its shape", original, *args)
        if rollout_is_batch_normalize and torch.distributed.is_available() and torch.distributed.is_initialized():
            return hand_back(_RC_KEY, "batch normalisation across ranks", original, *args)
        # verl semantics: the token weight is multiplied by the mask value, ours
        # is not: a float mask is served when it is 0/1 (and has a valid token,
        # where verl's metrics raise).
        binary = response_mask.dtype == torch.bool or bool(((response_mask == 0) | (response_mask == 1)).all())
        if not binary or not bool(response_mask.any()):
            return hand_back(_RC_KEY, "a mask not 0/1, or no valid token", original, *args)
        upper, lower = helper._parse_rollout_is_threshold(rollout_is_threshold)  # verl's errors
        mask = response_mask if response_mask.dtype == torch.bool else response_mask.to(log_ratio.dtype)
        zero = torch.zeros_like(log_ratio)
        with torch.no_grad():
            raw = rlhf_kernels.rollout_correction(log_ratio, zero, mask, level=rollout_is, upper=None).weights
            corr = rlhf_kernels.rollout_correction(log_ratio, zero, mask, level=rollout_is,
                                                   mode="truncate" if lower is None else "mask", lower=lower,
                                                   upper=upper)
        dtype = _float_dtype(log_ratio, response_mask)
        weights, raw = corr.weights.to(dtype), raw.to(dtype)
        lr_for_metrics = log_ratio if rollout_is == "token" else (log_ratio * mask).sum(-1, keepdim=True)
        # verl semantics: its own statistics of the weights (the metrics' keys and
        # definitions stay verl's).
        metrics = helper.compute_is_metrics(
            rollout_is_weights=weights, raw_rollout_is_weights=raw, log_ratio_for_metrics=lr_for_metrics,
            response_mask=response_mask, rollout_is=rollout_is, rollout_is_threshold=upper,
            rollout_is_threshold_lower=lower,
        )
        if lower is not None:
            metrics["rollout_is_oob_ratio"] = corr.stats["correction/out_of_band_frac"].item()
        if rollout_is_batch_normalize:
            if rollout_is == "token":
                mean = corr.stats["correction/weight_mean"]
            else:  # verl semantics: the mean over the sequences with a valid token
                import verl.utils.torch_functional as verl_F

                seq_weights = verl_F.masked_mean(weights, response_mask, axis=-1)
                valid = (response_mask.sum(dim=-1) > 0).to(dtype)
                mean = (seq_weights * valid).sum() / valid.sum().clamp_min(1e-8)
            if mean > 1e-8:
                weights = weights / mean.to(dtype)
                metrics["rollout_is_batch_norm_factor"] = mean.item()
            else:
                metrics["rollout_is_batch_norm_factor"] = 1.0
        return weights, metrics

    return compute_rollout_correction_weights


def _make_agg_loss(original):
    our_agg_loss = rlhf_kernels.agg_loss

    def agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                 loss_scale_factor=None):
        reason = _agg_loss_hand_back(loss_mat, loss_mask, loss_agg_mode,
                                     (batch_num_tokens, global_batch_size, loss_scale_factor))
        if reason is not None:
            return hand_back("verl.agg_loss", reason, original, loss_mat, loss_mask, loss_agg_mode, dp_size,
                             batch_num_tokens, global_batch_size, loss_scale_factor)
        num_tokens, num_seqs, scale, count = _agg_args(
            loss_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor
        )
        seq_mode = loss_agg_mode.startswith("seq-mean")
        work = loss_mat.float() if loss_mat.dtype in (torch.bfloat16, torch.float16) else loss_mat
        # A float (or integer) mask weights each token, as verl's weighted sums.
        loss = our_agg_loss(work, loss_mask, loss_agg_mode, num_tokens=num_tokens, num_seqs=num_seqs)
        if seq_mode:
            # verl semantics: the seq-mean modes multiply by the mask (the token modes
            # select), so inf / NaN at a masked position of a sequence with a valid
            # token makes the loss NaN; its gradients stay finite, as here (detached).
            with torch.no_grad():
                valid = loss_mask != 0
                # 0, or NaN where a masked token is not finite (x * 0)
                leak = torch.where(valid.any(-1), (loss_mat * 0).masked_fill(valid, 0).sum(-1), 0)
                leak = leak.sum().to(loss.dtype)
            loss = loss + leak
        # verl semantics: times dp_size, and 0 / 0 = NaN for a micro-batch without a
        # valid token (ours returns 0).
        return _finish(loss, scale, count, loss_mat.dtype, loss_agg_mode)

    return agg_loss


def _make_fused_linear_for_ppo(original):
    class FusedLinearForPPO(original):
        """verl's fused LM head (``hidden @ weight.T / temperature`` -> float32
        log-probs, entropy in the hidden dtype) on ``logprobs_from_hidden``:
        tiles through our row kernels, no logits kept. Liger's backend
        (``impl_backend="liger"`` with Liger installed) stays verl's."""

        def forward(self, hidden_states, vocab_weights, input_ids, temperature=1.0):
            from verl.utils.experimental import torch_functional as tf

            if self.impl_backend == "liger" and tf._LIGER_FUSED_LINEAR_SCALED_CROSS_ENTROPY is not None:
                return hand_back("verl.FusedLinearForPPO", "impl_backend='liger'", super().forward, hidden_states,
                                 vocab_weights, input_ids, temperature)
            if hidden_states.ndim not in (2, 3):
                raise ValueError(f"hidden_states: expected 2 or 3 dims, got shape {tuple(hidden_states.shape)}")
            count_served("verl.FusedLinearForPPO")
            logp, entropy = rlhf_kernels.logprobs_from_hidden(
                hidden_states, vocab_weights, input_ids.to(torch.int64), temperature=temperature,
                return_entropy=True, ignore_index=-(2**63))  # verl ignores no token
            return logp, entropy.to(hidden_states.dtype)

    FusedLinearForPPO.__qualname__ = "FusedLinearForPPO"
    return FusedLinearForPPO


_patcher = Patcher(
    framework="verl",
    distribution="verl",
    tested_versions=TESTED_VERSIONS,
    targets=[
        _Target(_FUNCTIONAL, "logprobs_from_logits", _make_logprobs_from_logits),
        _Target(_FUNCTIONAL, "entropy_from_logits", _make_entropy_from_logits),
        _Target(_CORE, "kl_penalty", _make_kl_penalty),
        _Target(_CORE, "compute_gae_advantage_return", _make_compute_gae),
        _Target(_CORE, "compute_grpo_outcome_advantage", _make_grpo),
        _Target(_CORE, "compute_rloo_outcome_advantage", _make_rloo),
        # verl's vectorized GRPO: its grpo's maths (unbiased group std, a group of one
        # keeps its score over 1 + eps) in float32 group sums.
        _Target(_CORE, "compute_grpo_vectorized_outcome_advantage", _make_grpo),
        _Target(_CORE, "compute_rloo_vectorized_outcome_advantage", _make_rloo_vectorized),
        _Target(_CORE, "compute_reinforce_plus_plus_baseline_outcome_advantage", _make_reinforce_pp_baseline),
        _Target(_CORE, "compute_reinforce_plus_plus_outcome_advantage", _make_reinforce_pp),
        _Target(_CORE, "compute_gpg_outcome_advantage", _make_gpg_estimator),
        _Target(_CORE, "compute_gdpo_outcome_advantage", _make_gdpo),
        _Target(_CORE, "compute_grpo_passk_outcome_advantage", _make_grpo_passk),
        _Target(_CORE, "compute_opo_outcome_advantage", _make_opo),
        _Target(_CORE, "compute_remax_outcome_advantage", _make_remax),
        _Target(_CORE, "compute_policy_loss_vanilla", _make_policy_loss),
        _Target(_CORE, "compute_policy_loss_gspo", _make_policy_loss_gspo),
        _Target(_CORE, "compute_policy_loss_cispo", _make_policy_loss_cispo),
        _Target(_CORE, "compute_policy_loss_sapo", _make_policy_loss_sapo),
        _Target(_CORE, "compute_policy_loss_gpg", _make_policy_loss_gpg),
        _Target(_CORE, "compute_policy_loss_dppo_tv", _make_policy_loss_dppo("dppo_tv")),
        _Target(_CORE, "compute_policy_loss_dppo_kl", _make_policy_loss_dppo("dppo_kl")),
        _Target(_CORE, "compute_policy_loss_dro", _make_policy_loss_dro),
        _Target(_CORE, "compute_policy_loss_geo_mean", _make_policy_loss_geo_mean),
        _Target(_CORE, "compute_policy_loss_clip_cov", _make_policy_loss_cov("clip_cov")),
        _Target(_CORE, "compute_policy_loss_kl_cov", _make_policy_loss_cov("kl_cov")),
        _Target(_CORE, "compute_policy_loss_reinforce", _make_policy_loss_reinforce),
        _Target(_CORE, "compute_policy_loss_bypass_mode", _make_policy_loss_bypass_mode),
        _Target(_CORE, "compute_value_loss", _make_value_loss),
        _Target(_CORE, "agg_loss", _make_agg_loss),
        _Target("verl.trainer.ppo.rollout_corr_helper", "compute_rollout_correction_weights",
                _make_rollout_correction_weights),
        _Target("verl.utils.experimental.torch_functional", "FusedLinearForPPO", _make_fused_linear_for_ppo),
    ],
    consumers=(
        "verl.workers.utils.losses",
        "verl.trainer.distillation.losses",
        "verl.trainer.ppo.v1.trainer_base",
        "verl.experimental.separation.ray_trainer",
        "verl.trainer.ppo.ray_trainer",
        "verl.trainer.ppo.rollout_corr_helper",
        "verl.trainer.ppo.metric_utils",
        "verl.workers.engine.fsdp.transformer_impl",
        "verl.workers.rollout.hf_rollout",
        "verl.models.transformers.dense_common",
    ),
)

patch = _patcher.patch
unpatch = _patcher.unpatch
patched = _patcher.patched
patched_names = _patcher.patched_names
version = _patcher.version

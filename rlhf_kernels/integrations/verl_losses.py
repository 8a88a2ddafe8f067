"""verl's policy and value losses on rlhf_kernels (the makers ``verl.patch()``
installs, see verl.py): ``compute_policy_loss_<name>`` for verl's registered
policy losses -> ``ppo_policy_loss`` (``loss_type`` / ``ratio_level``),
``rollout_is_weights`` as ``token_weights``; ``compute_value_loss`` ->
``ppo_value_loss``; with verl's dp_size / global-count normalisation around
our aggregation (``_agg_args``, ``_finish``). Each keeps verl's semantics; a
"verl semantics" comment marks where they differ from ours.
"""

from __future__ import annotations

import torch
from torch import Tensor

import rlhf_kernels

from . import _weights_ok, hand_back, served_call
from .verl_advantages import _float_dtype


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

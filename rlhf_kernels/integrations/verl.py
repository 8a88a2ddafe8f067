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
place where they differ from ours. The estimators' adapters are in
verl_advantages.py, the policy and value losses' in verl_losses.py; this file
has the rest and the patcher.
"""

from __future__ import annotations

import torch
from torch import Tensor

import rlhf_kernels

from . import Patcher, _Target, _weights_ok, count_served, hand_back
from .verl_advantages import (
    _make_compute_gae, _make_gdpo, _make_gpg_estimator, _make_grpo, _make_grpo_passk, _make_opo, _make_reinforce_pp,
    _make_reinforce_pp_baseline, _make_remax, _make_rloo, _make_rloo_vectorized, _float_dtype,
)
from .verl_losses import (
    _AGG_MODES, _agg_args, _finish, _make_policy_loss, _make_policy_loss_bypass_mode, _make_policy_loss_cispo,
    _make_policy_loss_cov, _make_policy_loss_dppo, _make_policy_loss_dro, _make_policy_loss_geo_mean,
    _make_policy_loss_gpg, _make_policy_loss_gspo, _make_policy_loss_reinforce, _make_policy_loss_sapo,
    _make_value_loss,
)

TESTED_VERSIONS = frozenset({"0.9.1"})

_FUNCTIONAL = "verl.utils.torch_functional"
_CORE = "verl.trainer.ppo.core_algos"


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

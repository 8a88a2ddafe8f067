"""OpenRLHF on rlhf_kernels: ``rlhf_kernels.integrations.openrlhf.patch()``.

Replaces, in ``openrlhf.models.utils`` and wherever OpenRLHF's modules
imported them (the actor, the PPO actor, the experience maker):

- ``log_probs_from_logits``, ``compute_entropy`` -> ``logprobs_from_logits``;
- ``compute_approx_kl`` -> ``kl_penalty``;
- ``RemoteExperienceMaker.get_advantages_and_returns`` (its GAE) -> ``compute_gae``;
- ``PolicyLoss.forward`` (the PPO actor's loss; the class is what the PPO
  actor instantiates, so its method is the one lookup) -> ``ppo_policy_loss``;
- ``ValueLoss.forward`` (the critic's loss) -> ``ppo_value_loss``.

Served: bool, integer and float (weighting) action masks, GSPO (a sequence
ratio, ``ratio_level="sequence"``) and the train/rollout importance-sampling
correction (its coefficients as ``token_weights``). The variants our kernels
do not compute stay OpenRLHF's own code, counted in
``rlhf_kernels.integrations.report()``: an unclipped value loss, no mask,
inputs other than the first that require a gradient, GSPO with fractional
mask weights or a sequence log-ratio beyond +-20.

``patch()`` imports ``openrlhf.models``, which imports DeepSpeed (installs
and imports on CPU) and flash-attn (CUDA only), and the Ray trainer modules,
which import vLLM: it works where OpenRLHF's own install does. The tests run
it on CPU with a test-only stand-in for flash-attn and vLLM.
"""

from __future__ import annotations

import torch
from torch import Tensor

import rlhf_kernels

from . import Patcher, _Target, _weights_ok, hand_back

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


def _dtype(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _aggregation(mask: Tensor, token_level_loss: bool, dp_size, batch_num_tokens, global_batch_size):
    """Our (agg, num_tokens, num_seqs, scale) for OpenRLHF's ``aggregate_loss``,
    or None where it is not ours to compute (a count of 0 or a multi-element one).
    OpenRLHF's trainer passes its global counts as 0-dim float32 device tensors
    (``get_loss_batch_info``): our losses divide by them on the device."""
    given = batch_num_tokens if token_level_loss else global_batch_size
    if given is not None and (given.numel() != 1 if isinstance(given, Tensor) else given == 0):
        return None
    # OpenRLHF semantics: token-level is token-mean, sample-level is
    # seq-mean-token-mean; the global count replaces the local one, and dp_size
    # multiplies only when a global count is given.
    agg = "token-mean" if token_level_loss else "seq-mean-token-mean"
    scale = float(dp_size) if given is not None else 1.0
    return agg, (given if token_level_loss else None), (None if token_level_loss else given), scale


def _loss_dtype(dtype: torch.dtype, token_level_loss: bool, given) -> torch.dtype:
    """OpenRLHF semantics: the inputs' dtype at token level, float32 at least for
    its sample-level per-sequence means (a float32 divisor); a count given as a
    tensor promotes with its dtype (it divides the sum)."""
    if not token_level_loss:
        dtype = torch.promote_types(dtype, torch.float32)
    return torch.promote_types(dtype, given.dtype) if isinstance(given, Tensor) else dtype


def _nan_if_empty(x: Tensor, mask: Tensor, token_level_loss: bool, given) -> Tensor:
    """OpenRLHF semantics: masked means divide by the local count, so no valid
    token (or sequence) gives 0 / 0 = NaN where ours gives 0. Difference: its
    gradients are then NaN too (except where a clamp stops them); ours are 0."""
    if given is not None:
        return x
    return torch.where(mask.any(), x, x.new_tensor(float("nan")))


def _policy_loss_hand_back(loss_fn, log_probs, old_log_probs, advantages, action_mask, rollout_log_probs):
    """Why OpenRLHF's own PolicyLoss must run this call, or None."""
    if loss_fn.policy_loss_type not in ("ppo", "gspo"):
        return f"policy_loss_type {loss_fn.policy_loss_type!r} (OpenRLHF raises)"
    if action_mask is None:
        return "no action_mask"
    if old_log_probs.requires_grad or advantages.requires_grad:
        return "old_log_probs or advantages require a gradient (ours treats them as data)"
    if log_probs.shape != action_mask.shape:
        return "action_mask broadcasts against log_probs"
    if loss_fn.is_correction_level != "off" and rollout_log_probs is None:
        return "IS correction without rollout_log_probs (OpenRLHF raises)"
    if not _weights_ok(action_mask):
        return "action_mask holds negative or non-finite weights"
    if loss_fn.policy_loss_type == "gspo" and action_mask.dtype != torch.bool and bool(
            ((action_mask != 0) & (action_mask != 1)).any()):
        return "GSPO with fractional mask weights (OpenRLHF multiplies the ratio by them)"
    return None


def _is_correction(loss_fn, old_log_probs: Tensor, rollout_log_probs: Tensor, action_mask: Tensor):
    """OpenRLHF's train/rollout IS correction of the PPO loss, as it computes it:
    (coef, filtered, vllm_kl, is_filter_ratio); the loss is coef * loss."""
    from openrlhf.models.utils import masked_mean

    low, high = loss_fn.is_correction_threshold
    seq_level = loss_fn.is_correction_level == "seq"
    is_log_ratio = (old_log_probs - rollout_log_probs).detach()  # log(pi_train / pi_rollout)
    token_is = is_log_ratio.exp()
    if loss_fn.is_correction_gating == "ratio":
        stat = masked_mean(is_log_ratio, action_mask, dim=-1).unsqueeze(-1) if seq_level else is_log_ratio
        stat = stat.exp()
    else:
        p = rollout_log_probs.detach().exp().clamp(1e-6, 1 - 1e-6)
        q = old_log_probs.detach().exp().clamp(1e-6, 1 - 1e-6)
        if loss_fn.is_correction_gating == "binary_kl":
            stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
        else:  # tv
            stat = (p - q).abs()
        if seq_level:
            stat = masked_mean(stat, action_mask, dim=-1).unsqueeze(-1)
    if loss_fn.is_correction_mode == "clip":
        coef = stat.clamp(min=low, max=high)
        filtered = (stat < low) | (stat > high)
    else:  # mask: out-of-band units dropped, survivors keep their per-token IS weight
        keep = (stat >= low) & (stat <= high)
        coef = torch.where(keep, token_is, 0.0)
        filtered = ~keep
    coef = coef.expand_as(old_log_probs)
    is_filter_ratio = filtered.float().mean() if seq_level else masked_mean(filtered.float(), action_mask, dim=None)
    vllm_kl = masked_mean(rollout_log_probs - old_log_probs, action_mask, dim=None)
    return coef, is_filter_ratio, vllm_kl


def _make_policy_loss_forward(original):
    def forward(self, log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, action_mask=None,
                rollout_log_probs=None, dp_size: int = 1, batch_num_tokens=None, global_batch_size=None):
        from openrlhf.models.utils import masked_mean

        args = (self, log_probs, old_log_probs, advantages, action_mask, rollout_log_probs, dp_size,
                batch_num_tokens, global_batch_size)
        key = "openrlhf.PolicyLoss.forward"
        reason = _policy_loss_hand_back(self, log_probs, old_log_probs, advantages, action_mask, rollout_log_probs)
        if reason is not None:
            return hand_back(key, reason, original, *args)
        agg = _aggregation(action_mask, self.token_level_loss, dp_size, batch_num_tokens, global_batch_size)
        if agg is None:
            return hand_back(key, "a global count of 0 or of more than one element", original, *args)
        mode, num_tokens, num_seqs, scale = agg
        gspo = self.policy_loss_type == "gspo"
        correcting = self.is_correction_level != "off"
        valid = action_mask != 0
        token_weights = vllm_kl = is_filter_ratio = None
        # OpenRLHF semantics: GSPO with the IS correction on takes the ratio
        # against the rollout policy, and applies no IS weight.
        old = rollout_log_probs if gspo and correcting else old_log_probs
        if gspo:
            with torch.no_grad():
                counts = action_mask.sum(-1).clamp(min=1)
                seq_log_ratio = ((log_probs - old) * action_mask).sum(-1) / counts
            # OpenRLHF semantics: GSPO's sequence log-ratio is not clamped (ours at +-20).
            if bool((seq_log_ratio.abs() > 20.0).any()):
                return hand_back(key, "a GSPO sequence log-ratio beyond +-20 (ours clamps there)", original, *args)
        elif correcting:
            coef, is_filter_ratio, vllm_kl = _is_correction(self, old_log_probs, rollout_log_probs, action_mask)
            token_weights = torch.where(valid, coef, 0.0)
            if not _weights_ok(token_weights):
                return hand_back(key, "IS coefficients non-finite at a valid token", original, *args)
        # OpenRLHF semantics = ours: ratio = exp(clamp(log-ratio, -20, 20)),
        # loss max(-A r, -A clip(r)), dual clip min(., -c A) for A < 0; the IS
        # coefficient multiplies the loss (our token_weights); GSPO's ratio is the
        # sequence's geometric mean, its gradient through the sequence mean.
        # Difference: OpenRLHF multiplies by the mask, so a non-finite value at a
        # masked position makes its loss NaN; ours selects it away.
        loss, stats = rlhf_kernels.ppo_policy_loss(
            log_probs, old, advantages, action_mask, clip_low=self.clip_eps_low, clip_high=self.clip_eps_high,
            dual_clip=self.dual_clip, agg=mode, num_tokens=num_tokens, num_seqs=num_seqs,
            token_weights=token_weights, ratio_level="sequence" if gspo else "token",
        )
        given = batch_num_tokens if self.token_level_loss else global_batch_size
        loss = loss * scale if scale != 1.0 else loss
        loss = _nan_if_empty(loss, valid, self.token_level_loss, given)
        dtype = _dtype(log_probs, old_log_probs, advantages)
        loss = loss.to(_loss_dtype(dtype, self.token_level_loss, given))
        # clip_ratio (share with l2 > l1) and ppo_kl (mean of the unclamped
        # old - new log-ratio) are our clipfrac / approx_kl; NaN without a token.
        # OpenRLHF counts the clipped tokens unweighted by the IS coefficient
        # (ours counts a weight-0 token unclipped), and its ppo_kl is against
        # old_log_probs: computed here where those differ.
        if token_weights is not None and not bool((token_weights > 0)[valid].all()):
            with torch.no_grad():
                ratio = (log_probs - old_log_probs).clamp(min=-20.0, max=20.0).exp()
                clipped = ratio.clamp(1 - self.clip_eps_low, 1 + self.clip_eps_high) * advantages < ratio * advantages
                clip_ratio = masked_mean(clipped.float(), action_mask, dim=None)
        else:
            clip_ratio = _nan_if_empty(stats["clipfrac"], valid, True, None).to(torch.float32)
        if gspo and correcting:
            ppo_kl = masked_mean(-(log_probs - old_log_probs).detach(), action_mask, dim=None)
        else:
            ppo_kl = _nan_if_empty(stats["approx_kl"], valid, True, None).to(_dtype(log_probs, old_log_probs))
        return loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio

    return forward


def _value_loss_hand_back(loss_fn, values, old_values, returns, action_mask) -> str | None:
    """Why OpenRLHF's own ValueLoss must run this call, or None."""
    if loss_fn.clip_eps is None or not loss_fn.clip_eps > 0:
        return "no value clip (a plain squared error)"
    if action_mask is None:
        return "no action_mask"
    if old_values.requires_grad or returns.requires_grad:
        return "old_values or returns require a gradient (ours treats them as targets)"
    if values.shape != action_mask.shape:
        return "action_mask broadcasts against values"
    if not _weights_ok(action_mask):
        return "action_mask holds negative or non-finite weights"
    return None


def _make_value_loss_forward(original):
    def forward(self, values: Tensor, old_values: Tensor, returns: Tensor, action_mask=None, dp_size: int = 1,
                batch_num_tokens=None, global_batch_size=None):
        args = (self, values, old_values, returns, action_mask, dp_size, batch_num_tokens, global_batch_size)
        key = "openrlhf.ValueLoss.forward"
        reason = _value_loss_hand_back(self, values, old_values, returns, action_mask)
        if reason is not None:
            return hand_back(key, reason, original, *args)
        agg = _aggregation(action_mask, self.token_level_loss, dp_size, batch_num_tokens, global_batch_size)
        if agg is None:
            return hand_back(key, "a global count of 0 or of more than one element", original, *args)
        mode, num_tokens, num_seqs, scale = agg
        # OpenRLHF semantics = ours: 0.5 * agg(max((v - R)^2, (v_clip - R)^2)),
        # a float mask weighting each token.
        loss, _ = rlhf_kernels.ppo_value_loss(values, old_values, returns, action_mask, clip=self.clip_eps,
                                              agg=mode, num_tokens=num_tokens, num_seqs=num_seqs)
        given = batch_num_tokens if self.token_level_loss else global_batch_size
        loss = loss * scale if scale != 1.0 else loss
        loss = _nan_if_empty(loss, action_mask != 0, self.token_level_loss, given)
        dtype = _dtype(values, old_values, returns)
        return loss.to(_loss_dtype(dtype, self.token_level_loss, given))

    return forward


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
        _Target("openrlhf.models.loss", "PolicyLoss.forward", _make_policy_loss_forward),
        _Target("openrlhf.models.loss", "ValueLoss.forward", _make_value_loss_forward),
    ],
    consumers=(
        "openrlhf.models.actor",
        "openrlhf.trainer.ray.ppo_actor",
        "openrlhf.trainer.ppo_utils.experience_maker",
        "openrlhf.trainer.ray.ppo_critic",
    ),
)

patch = _patcher.patch
unpatch = _patcher.unpatch
patched = _patcher.patched
patched_names = _patcher.patched_names
version = _patcher.version

"""The PPO loss keywords, checked once: ``PPOLossOptions`` (built by
``PPOLossOptions.checked`` from the public functions' keywords and passed
through the composition and the fused paths of ``ops/ppo_loss.py`` and
``ops/lm_head.py``), and the one text of their Args (``fill_args``)."""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from .._validation import (
    check_agg, check_clip, check_estimator, check_finite, check_positive, check_ratio_level,
)

Count = Union[float, Tensor, None]

# The per-token objectives, by their code in the kernels (PolicyForm in
# csrc/include/rlhf_kernels/ppo_math.h), and the policy objectives: verl's
# policy-loss names ("clip" for verl's "vanilla"). "geo_mean" (GMPO) is the
# kernels' per-sequence sums, then its loss in PyTorch; "clip_cov" and
# "kl_cov" select tokens over the batch, then run the clip kernels
# (ops/policy_objectives.py: _geo_mean_loss, _cov_selected). TRL's "luspo"
# is clip on GSPO's sequence ratio; TRL's "vespo" is gpg on advantages times
# a per-sequence weight of the log-ratio's sum (_vespo_advantages).
KERNEL_FORMS = ("clip", "cispo", "sapo", "gpg", "dppo_tv", "dppo_kl", "dro", "geo_mean")
LOSS_TYPES = KERNEL_FORMS + ("clip_cov", "kl_cov", "luspo", "vespo")
# The objectives whose token terms need a whole sequence or the whole batch.
BATCH_FORMS = ("geo_mean", "clip_cov", "kl_cov", "vespo")
# The kernel form each composed objective runs.
COMPOSED_FORMS = {"clip_cov": "clip", "kl_cov": "clip", "luspo": "clip", "vespo": "gpg"}
VESPO_PARAMS = (2.0, 3.0, 3.0, 2.0)  # TRL's vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg
UNCLIPPED_HIGH = 1e30  # kl_cov's clip kernels: a ratio range no ratio leaves (<= e^20 after the clamp)
DPPO_CAP = 20.0  # the cap of DPPO's stopped ratio when dual_clip is None (verl's clip_ratio_c default there)


def _form_numbers(loss_type: str, clip_low: float, clip_high: float | None, dual_clip: float | None,
                  tau_pos: float, tau_neg: float, dro_beta: float | None,
                  ratio_level: str) -> tuple[float, float, float, float, float]:
    """(clip_low, clip_high, dual_clip, ratio_low, ratio_high) of a checked
    objective: the kernels' three numbers (PolicyParams) are ratio_low,
    ratio_high and dual_clip."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: unknown objective {loss_type!r}; expected one of {LOSS_TYPES}")
    if loss_type == "luspo" and ratio_level not in ("token", "sequence"):
        raise ValueError(f"ratio_level: loss_type='luspo' takes the sequence ratio, not {ratio_level!r}")
    if loss_type not in ("clip", "luspo") and ratio_level != "token":
        raise ValueError(f"ratio_level: {ratio_level!r} is for loss_type='clip' (GSPO); {loss_type!r} takes "
                         "token ratios")
    if loss_type in ("clip", "luspo"):
        low, high, dual = check_clip(clip_low, clip_high, dual_clip)
        return low, high, dual, 1.0 - low, 1.0 + high
    low = check_positive("clip_low", clip_low)
    high = low if clip_high is None else check_positive("clip_high", clip_high)
    if loss_type.startswith("dppo"):
        cap = DPPO_CAP if dual_clip is None else check_positive("dual_clip", dual_clip)
        return low, high, cap, low, high
    if dual_clip is not None:
        raise ValueError(f"dual_clip: for loss_type 'clip' (the dual clip) or 'dppo_*' (the ratio's cap), "
                         f"not {loss_type!r}")
    if loss_type == "sapo":
        return low, high, 0.0, check_positive("tau_neg", tau_neg), check_positive("tau_pos", tau_pos)
    if loss_type == "geo_mean":  # the log-ratio's bounds
        return low, high, 0.0, -low, high
    if loss_type == "clip_cov":
        return low, high, 0.0, 1.0 - low, 1.0 + high
    if loss_type == "kl_cov":  # -A r unclipped: the clip kernels with a range no ratio leaves
        return low, high, 0.0, 0.0, UNCLIPPED_HIGH
    if loss_type == "dro":
        if dro_beta is None:
            raise ValueError("dro_beta: required with loss_type='dro' (verl's policy_loss.dro_beta), > 0")
        return low, high, 0.0, check_positive("dro_beta", dro_beta), 0.0
    return low, high, 0.0, 1.0 - low, 1.0 + high  # cispo's range; gpg uses none


def _vespo_params(loss_type: str, params) -> Optional[tuple[float, float, float, float]]:
    if loss_type != "vespo":
        return None
    try:
        k_pos, lambda_pos, k_neg, lambda_neg = (float(p) for p in params)
    except (TypeError, ValueError):
        raise ValueError(f"vespo_params: expected (k_pos, lambda_pos, k_neg, lambda_neg), got {params!r}") from None
    for name, value in (("k_pos", k_pos), ("lambda_pos", lambda_pos), ("k_neg", k_neg), ("lambda_neg", lambda_neg)):
        check_finite(f"vespo_params ({name})", value)
    return k_pos, lambda_pos, k_neg, lambda_neg


class CovSelection(NamedTuple):
    """clip_cov's / kl_cov's checked selection keywords (see POLICY_ARGS)."""

    ratio: float
    low: float
    high: float
    kl_coef: float
    generator: Optional[torch.Generator]


def _cov_selection(loss_type: str, cov_ratio: float, cov_bounds, kl_cov_coef: float,
                   generator) -> Optional[CovSelection]:
    if loss_type not in ("clip_cov", "kl_cov"):
        return None
    ratio = check_positive("cov_ratio", cov_ratio)
    if ratio > 1:
        raise ValueError(f"cov_ratio: the share of valid tokens selected, in (0, 1], got {ratio}")
    try:
        low, high = (float(b) for b in cov_bounds)
    except (TypeError, ValueError):
        raise ValueError(f"cov_bounds: expected (low, high), got {cov_bounds!r}") from None
    if not low < high:
        raise ValueError(f"cov_bounds: expected low < high, got {cov_bounds!r}")
    coef = check_finite("kl_cov_coef", kl_cov_coef)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    return CovSelection(ratio, low, high, coef, generator)


class PPOLossOptions(NamedTuple):
    """The checked PPO loss keywords (see ``POLICY_ARGS`` for their meaning),
    immutable. A NamedTuple: it is built on every loss call, and a frozen
    dataclass of 17 fields cost ~9 us more per call there
    (``python -m benchmarks.bench_overhead --only ppo_policy_loss``).

    ``num_tokens`` / ``num_seqs`` are kept as given (a 1-element tensor is a
    count on the device); ``agg_code``, ``kernel_num_tokens``,
    ``kernel_num_seqs`` and ``divisor`` are what the kernels take (a tensor
    count becomes 1.0 and the divisor of the loss: no host synchronisation).
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float = 0.0  # 0: no dual clip
    agg: str = "token-mean"
    num_tokens: Count = None
    num_seqs: Count = None
    ratio_level: str = "token"
    temperature: float = 1.0
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    backend: Optional[str] = None
    agg_code: int = 0
    kernel_num_tokens: Optional[float] = None
    kernel_num_seqs: Optional[float] = None
    divisor: Optional[Tensor] = None
    kl_code: int = 3
    loss_type: str = "clip"
    loss_code: int = 0
    ratio_low: float = 0.8  # the kernels' numbers of the objective (_form_numbers)
    ratio_high: float = 1.2
    cov: Optional[CovSelection] = None  # clip_cov / kl_cov
    vespo: Optional[tuple[float, float, float, float]] = None  # (k_pos, lambda_pos, k_neg, lambda_neg)

    @property
    def sequence_terms(self) -> bool:
        """Whether the objective needs each sequence whole before a token's
        term (GSPO's ratio, GMPO): a pass over the log-probs before the token
        kernels, so the fused logits / hidden gradients do not apply."""
        return self.ratio_level != "token" or self.loss_type in BATCH_FORMS

    @classmethod
    def checked(cls, device: torch.device, *, clip_low: float = 0.2, clip_high: float | None = None,
                dual_clip: float | None = None, agg: str = "token-mean", num_tokens: Count = None,
                num_seqs: Count = None, ratio_level: str = "token", temperature: float | None = None,
                kl_coef: float | None = None, kl_estimator: str | None = None, entropy_coef: float | None = None,
                loss_type: str = "clip", tau_pos: float = 1.0, tau_neg: float = 1.05,
                dro_beta: float | None = None, cov_ratio: float = 2e-4, cov_bounds=(1.0, 5.0),
                kl_cov_coef: float = 1.0, generator=None, vespo_params=VESPO_PARAMS,
                backend: str | None = None) -> "PPOLossOptions":
        """The options of a call on tensors of ``device``; ValueError naming a
        bad keyword. The penalty keywords left at None keep their defaults
        unchecked (the policy-only losses take none of them)."""
        ratio_level = check_ratio_level(ratio_level)
        clip_low, clip_high, dual, ratio_low, ratio_high = _form_numbers(
            loss_type, clip_low, clip_high, dual_clip, tau_pos, tau_neg, dro_beta, ratio_level)
        cov = _cov_selection(loss_type, cov_ratio, cov_bounds, kl_cov_coef, generator)
        vespo = _vespo_params(loss_type, vespo_params)
        if loss_type == "luspo":
            ratio_level = "sequence"
        agg_code, kernel_tokens, kernel_seqs, divisor = check_agg(agg, num_tokens, num_seqs, device)
        penalty = {}
        if temperature is not None:
            penalty["temperature"] = check_positive("temperature", temperature)
        if kl_coef is not None:
            penalty["kl_coef"] = check_finite("kl_coef", kl_coef)
        if kl_estimator is not None:
            penalty["kl_code"] = check_estimator(kl_estimator, "kl_estimator")
            penalty["kl_estimator"] = kl_estimator
        if entropy_coef is not None:
            penalty["entropy_coef"] = check_finite("entropy_coef", entropy_coef)
        return cls(
            clip_low=clip_low, clip_high=clip_high, dual_clip=dual, agg=agg, num_tokens=num_tokens,
            num_seqs=num_seqs, ratio_level=ratio_level, backend=backend, agg_code=agg_code,
            kernel_num_tokens=kernel_tokens, kernel_num_seqs=kernel_seqs, divisor=divisor, loss_type=loss_type,
            loss_code=KERNEL_FORMS.index(COMPOSED_FORMS.get(loss_type, loss_type)), ratio_low=ratio_low,
            ratio_high=ratio_high, cov=cov, vespo=vespo, **penalty,
        )


# The Args of the PPO loss keywords, written once; ``fill_args`` puts each
# where a docstring names it as ``{name}`` on a line of its own.
POLICY_ARGS = """\
        mask: (B, T) bool, or per-token weights of any other dtype (float
            0/1 masks, fractional weights; finite, >= 0, nonzero = valid):
            each token's loss, gradient and statistics count times its
            weight, and every count (the token-mean denominator, a
            sequence's length) is the sum of the weights: verl's and
            OpenRLHF's weighted means, ``sum(w * l) / sum(w)``.
        token_weights: (B, T) float, >= 0, or None: multiply each token's
            policy loss and gradient but not the counts, the statistics or
            the KL and entropy terms (verl's rollout importance-sampling
            weights, OpenRLHF's IS correction); not differentiated.
        ratio_level: "token" (PPO), "sequence" (GSPO, Zheng et al., 2025;
            OpenRLHF's "gspo") or "sequence-token" (GSPO-token; verl's
            "gspo"): every token of a sequence takes the ratio exp(mean over
            its valid tokens of logp - old_logp); its gradient flows through
            that mean ("sequence") or through the token's own logp
            ("sequence-token"); the two agree when the advantage is constant
            over the sequence. ratio_max / ratio_min are then sequence ratios.
        loss_type: the per-token objective (r the ratio, A the advantage,
            sg a stop-gradient): "clip" (PPO, the default), "cispo" (-A
            sg(clip(r, 1 - clip_low, 1 + clip_high)) logp; MiniMax-M1),
            "sapo" (-A (4 / tau) sigmoid(tau (r - 1)), tau = tau_pos where
            A > 0, else tau_neg; Gao et al., 2025), "gpg" (-A logp; GPG,
            REINFORCE), "dppo_tv" / "dppo_kl" (-A sg(min(r, dual_clip)) logp
            on the tokens whose probability moved by less than clip_high
            (A > 0) or clip_low (A <= 0) in total variation / binary KL, 0
            elsewhere; DPPO, arXiv 2602.04879), "dro" (-(A logp - dro_beta / 2
            (logp - old_logp)^2), the log-ratio unclamped; verl's dro),
            "geo_mean" (GMPO, arXiv 2507.20673: -A_t R_b, R_b = exp of the
            sequence's mean log-ratio, each token's clipped to <= clip_high
            where A > 0, >= -clip_low where A < 0, 0 where A = 0, unclamped;
            the kernels' per-sequence sums, then the loss of B numbers; with agg
            "seq-mean-token-mean" and num_seqs = B it is verl's geo_mean),
            "clip_cov" (clip without a dual clip, the loss and gradient of a
            random subset of the tokens removed: of the valid, unclipped
            tokens whose covariance (A - mean A)(logp - mean logp) lies in
            cov_bounds, max(1, int(cov_ratio * sum of the mask)) chosen by
            torch.randperm over them in row-major order with ``generator``
            (the default generator when None), so a seeded generator
            reproduces it; Cui et al., 2025), "kl_cov" (-A r unclipped, plus
            kl_cov_coef |logp - old_logp| on the max(1, int(cov_ratio * valid
            tokens)) tokens of largest covariance, ties to the lower row-major
            index; the means over the valid tokens unweighted, as verl). Both
            take the means over the whole batch and read one count on the
            host (their selection sizes); their clipfrac is the share of
            valid tokens selected. Each
            as verl's policy loss of that name (verl's "vanilla" for "clip").
            TRL's "luspo" (clip on the sequence ratio of ratio_level
            "sequence"; TRL's LUSPO aggregates with agg
            "seq-mean-token-sum") and "vespo" (-A sg(phi_b) logp, phi_b =
            e^lambda w^k e^(-lambda w) for the sequence's w = exp(clamp(sum over
            its valid tokens of clamp(logp - old_logp, -20, 20), log 1e-8,
            20)), (k, lambda) by A's sign from vespo_params; with
            token_weights (the sampler's importance ratio) their clamped logs
            join that sum instead of scaling the loss, as TRL's
            importance_sampling_ratio, over the valid tokens). The others
            take token ratios only (ratio_level "token").
            token_weights scale A, so a weight-0 token takes dppo's A <= 0
            branch in the statistics; not with "dro" (its penalty is not
            proportional to A).
        clip_low, clip_high: > 0; the ratio is clipped to
            [1 - clip_low, 1 + clip_high] (clip; cispo's weight); dppo's
            thresholds; clip_high defaults to clip_low.
        dual_clip: None or c > 1 (clip); dppo: the cap of the stopped ratio
            (verl's clip_ratio_c; default 20); not for the other objectives.
        tau_pos, tau_neg: > 0, sapo's temperatures (verl's tau_pos /
            tau_neg, TRL's sapo_temperature_pos / _neg; defaults 1.0 / 1.05).
        dro_beta: > 0, dro's weight of the squared log-ratio (required there).
        cov_ratio: in (0, 1], the share of tokens clip_cov / kl_cov select
            (verl's clip_cov_ratio / kl_cov_ratio, default 2e-4).
        cov_bounds: (low, high), clip_cov's open covariance interval (verl's
            clip_cov_lb / clip_cov_ub, default (1, 5)).
        kl_cov_coef: kl_cov's weight of |logp - old_logp| (verl's
            ppo_kl_coef, default 1).
        generator: a torch.Generator (on the CPU) for clip_cov's random
            choice, or None for torch's default one.
        vespo_params: vespo's (k_pos, lambda_pos, k_neg, lambda_neg), finite
            (TRL's vespo_k_pos, vespo_lambda_pos, vespo_k_neg,
            vespo_lambda_neg; default (2, 3, 3, 2)); each lambda is used
            clamped at >= 1e-4, as TRL.
        agg: "token-mean" | "token-sum" | "seq-mean-token-sum" |
            "seq-mean-token-mean" | "seq-mean-token-sum-norm" (seq-mean-token-sum / T).
        num_tokens: token-mean denominator instead of the number of valid
            tokens (global normalisation under data parallelism).
        num_seqs: the number of sequences the seq-mean modes divide by,
            instead of the number with >= 1 valid token. Either count may be a
            1-element tensor on the inputs' device (e.g. all-reduced there): it
            then divides the loss on the device, with no host synchronisation
            (and no check that it is > 0)."""

PENALTY_ARGS = """\
        ref_logp: (B, T) float, the reference policy's logp, or None; adds
            the KL penalty ``kl_coef * agg(kl(logp, ref_logp))`` (estimator
            ``kl_estimator``: "k1" | "abs" | "k2" | "mse" | "k3" |
            "low_var_kl"); not differentiated.
        entropy_coef: weight of the entropy bonus (subtracted); the entropy's
            gradient is taken only when it is not 0."""

PACKED_ARGS = """\
        cu_seqlens: None, or (S + 1,) int32 offsets of S packed sequences
            (``rlhf_kernels.packing``): the per-token tensors are then (N,),
            N = cu_seqlens[-1], and the sequence-level terms run per packed
            sequence; the same results as the padded (S, T) layout.
        max_seqlen: with cu_seqlens, the T of that layout (default: the
            longest sequence; seq-mean-token-sum-norm divides by it); given,
            nothing is read on the host."""

BACKEND_ARG = """\
        backend: "triton" | "cuda" | "cpu" | "eager"; default by device."""

COMBINED_RETURNS = """\
        (loss, stats): the 0-dim loss (float32; float64 for float64 inputs)
        and 0-dim stats (no host synchronisation): the ``ppo_policy_loss``
        stats plus pg_loss (the policy term), kl (the aggregated penalty, 0
        without ref_logp) and entropy (aggregated)."""

_FRAGMENTS = {"policy_args": POLICY_ARGS, "penalty_args": PENALTY_ARGS, "packed_args": PACKED_ARGS,
              "backend_arg": BACKEND_ARG,
              "combined_returns": COMBINED_RETURNS}


def fill_args(fn):
    """Replace each line ``{name}`` of fn's docstring by the fragment ``name``."""
    doc = fn.__doc__
    for name, text in _FRAGMENTS.items():
        doc = doc.replace(" " * 8 + "{" + name + "}", text)
    fn.__doc__ = doc
    return fn

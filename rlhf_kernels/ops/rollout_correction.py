"""rollout_correction: the sampler / trainer mismatch of rollouts from an
inference engine, corrected in one pass: importance weights of the trainer's
log-probs against the sampler's (token, sequence or geometric level; truncated
or masked), the rejection of tokens and sequences by divergence thresholds,
and the mismatch statistics, as device tensors (no host synchronisation).

Per sequence the kernels read the two log-probs and the mask once into cache
and make two sweeps: the sums of the sequence rules and levels, then each
token's weight and verdict (csrc/include/rlhf_kernels/rollout_correction_math.h).
The statistics are per-sequence partial sums, reduced by torch (one launch
each); normalising the weights to mean 1 is one more elementwise pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from .._dispatch import implementation, native_extension_loaded, register, triton_installed
from .._launch import acc_dtype
from .._validation import FLOAT_DTYPES, check_mask, check_positive, check_same_device, check_tensor
from ..eager import rollout_correction as _eager
from ..packing import from_rows, packed_rows
from ._op import undifferentiated

if triton_installed():
    from ..triton import rollout_correction as _triton  # noqa: F401  (defines rlhf_kernels::rollout_correction_triton)

LEVELS = {"token": 0, "sequence": 1, "geometric": 2}
MODES = {None: 0, "truncate": 1, "mask": 2}
# Rejection options (verl's names): aggregation_estimator -> kernel code
# aggregation * 3 + estimator (rollout_correction_math.h).
_AGGREGATIONS = ("token", "seq_sum", "seq_mean", "seq_max")
REJECTION_OPTIONS = {f"{agg}_{est}": a * 3 + e for a, agg in enumerate(_AGGREGATIONS)
                     for e, est in enumerate(("k1", "k2", "k3")) if (agg, est) != ("seq_max", "k1")}
MAX_RULES = 8
STAT_COLUMNS = 9


def _fake(logp, rollout_logp, mask, level, mode, lower, upper, rule_kinds, rule_lo, rule_hi):
    acc = acc_dtype(logp.dtype)
    return (logp.new_empty(logp.shape, dtype=acc), logp.new_empty(logp.shape, dtype=torch.bool),
            logp.new_empty((logp.shape[0], STAT_COLUMNS), dtype=acc))


def _register(backends: tuple[str, ...], op) -> None:
    torch.library.register_fake(op)(_fake)
    register("rollout_correction", backends, undifferentiated(op))


if native_extension_loaded():
    _register(("cpu", "cuda"), torch.ops.rlhf_kernels.rollout_correction.default)
if triton_installed():
    _register(("triton",), torch.ops.rlhf_kernels.rollout_correction_triton.default)
register("rollout_correction", ("eager",), _eager.rollout_correction)


class RolloutCorrection(NamedTuple):
    """weights: (B, T) importance weights (0 where the mask is 0), for the
    losses' ``token_weights``; mask: the input mask with the rejected tokens
    zeroed (same dtype); stats: 0-dim tensors on the inputs' device."""

    weights: Tensor
    mask: Tensor
    stats: dict[str, Tensor]


def parse_rejection(rejection: Mapping[str, object] | None) -> list[tuple[str, float, float]]:
    """``{option: threshold}`` -> [(option, lo, hi)] on the option's statistic.

    k1 options take ratio bounds, ``(lower, upper)`` or one ``upper`` meaning
    ``(1 / upper, upper)``, compared in log space as verl does; k2 / k3 options
    take one upper bound. ValueError naming the option otherwise."""
    if rejection is None:
        return []
    if not isinstance(rejection, Mapping):
        raise ValueError(f"rejection: expected a mapping option -> threshold, got {type(rejection).__name__}")
    if len(rejection) > MAX_RULES:
        raise ValueError(f"rejection: at most {MAX_RULES} options, got {len(rejection)}")
    rules = []
    for option, threshold in rejection.items():
        if option not in REJECTION_OPTIONS:
            raise ValueError(f"rejection: unknown option {option!r}; expected one of {tuple(REJECTION_OPTIONS)}")
        name = f"rejection[{option!r}]"
        if option.endswith("k1"):
            if isinstance(threshold, (tuple, list)):
                if len(threshold) != 2:
                    raise ValueError(f"{name}: expected (lower, upper) ratio bounds, got {threshold!r}")
                lo, hi = check_positive(name, threshold[0]), check_positive(name, threshold[1])
            else:
                hi = check_positive(name, threshold)
                lo = 1.0 / hi
            if lo > hi:
                raise ValueError(f"{name}: lower bound {lo} > upper bound {hi}")
            rules.append((option, math.log(lo), math.log(hi)))
        else:
            if isinstance(threshold, (tuple, list)):
                raise ValueError(f"{name}: a {option[-2:]} option takes one upper bound, got {threshold!r}")
            rules.append((option, -math.inf, check_positive(name, threshold)))
    return rules


def _verl_bounds(name: str, spec: object) -> tuple[float | None, float]:
    """verl's threshold spelling: a number (an upper bound) or "lower_upper"."""
    if isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
        raise ValueError(f"{name}: expected a number or a 'lower_upper' string, got {spec!r}")
    if isinstance(spec, str) and "_" in spec:
        lo, _, hi = spec.partition("_")
        try:
            return float(lo), float(hi)
        except ValueError:
            raise ValueError(f"{name}: cannot read {spec!r} as 'lower_upper'") from None
    try:
        return None, float(spec)
    except ValueError:
        raise ValueError(f"{name}: cannot read {spec!r} as a number") from None


def from_verl_config(rollout_is: str | None = None, rollout_is_threshold: object = 2.0,
                     rollout_is_batch_normalize: bool = False, rollout_rs: str | None = None,
                     rollout_rs_threshold: object = None) -> dict:
    """``rollout_correction``'s keywords from verl's RolloutCorrectionConfig
    fields: ``rollout_is`` "token" | "sequence" (and our "geometric") or None;
    ``rollout_is_threshold`` a number (truncate, TIS) or "lower_upper" (mask,
    IcePop); ``rollout_rs`` comma-separated options with
    ``rollout_rs_threshold`` one spec shared by all or one per option (comma
    separated; a k1 option's spec a ratio bound or "lower_upper").
    ValueError naming the field."""
    kwargs: dict = dict(mode=None, upper=None, lower=None, normalize=bool(rollout_is_batch_normalize))
    if rollout_is is not None:
        if rollout_is not in LEVELS:
            raise ValueError(f"rollout_is: expected one of {tuple(LEVELS)} or None, got {rollout_is!r}")
        lower, upper = _verl_bounds("rollout_is_threshold", rollout_is_threshold)
        kwargs.update(level=rollout_is, mode="truncate" if lower is None else "mask", lower=lower, upper=upper)
    if rollout_rs is not None:
        options = [o.strip() for o in str(rollout_rs).split(",") if o.strip()]
        if rollout_rs_threshold is None:
            raise ValueError("rollout_rs_threshold: required with rollout_rs")
        specs = [t.strip() for t in rollout_rs_threshold.split(",")] if isinstance(rollout_rs_threshold, str) \
            else [rollout_rs_threshold]
        if len(specs) == 1:
            specs = specs * len(options)
        if len(specs) != len(options):
            raise ValueError(f"rollout_rs_threshold: {len(specs)} thresholds for {len(options)} options")
        rejection = {}
        for option, spec in zip(options, specs):
            lower, upper = _verl_bounds(f"rollout_rs_threshold ({option})", spec)
            if lower is not None and not option.endswith("k1"):
                raise ValueError(f"rollout_rs_threshold ({option}): a k2 / k3 option takes one upper bound")
            rejection[option] = (lower, upper) if lower is not None else upper
        parse_rejection(rejection)  # the options and bounds checked here, before any training
        kwargs["rejection"] = rejection
    return kwargs


def rollout_correction(
    logp: Tensor,
    rollout_logp: Tensor,
    mask: Tensor,
    *,
    level: str = "token",
    mode: str | None = "truncate",
    upper: float | None = 2.0,
    lower: float | None = None,
    rejection: Mapping[str, object] | None = None,
    normalize: bool = False,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    backend: str | None = None,
) -> RolloutCorrection:
    """Importance weights and rejection for rollouts whose log-probs came from
    another implementation of the policy (an inference engine).

    With ``lr = logp - rollout_logp`` per token, each valid token's raw weight
    is ``exp(clamp(x, -20, 20))`` with x = lr (``level="token"``), the
    sequence's sum of ``w * lr`` (``"sequence"``: the product of its ratios)
    or that sum over the sequence's ``sum w`` (``"geometric"``: their
    geometric mean), w the token's mask value. ``mode="truncate"`` clamps it to
    ``[lower, upper]`` (TIS; verl's single-threshold ``rollout_is_threshold``,
    TRL's ``*_truncate``), ``"mask"`` zeroes it outside ``[lower, upper]``
    (IcePop; verl's ``"lower_upper"`` threshold, TRL's ``*_mask``,
    OpenRLHF's ``mask``), None gives weight 1 (rejection only). ``rejection``
    rejects tokens or whole sequences by thresholds on k1 = -lr,
    k2 = lr^2 / 2 or k3 = exp(lr) - 1 - lr (lr clamped to +-20), per token or
    per sequence as the (weighted) sum, mean or max: verl's ``rollout_rs``
    options and thresholds (all must pass). The weights are not
    differentiated.

    Args:
        logp: (B, T) float, the trainer's log-probs of the sampled tokens
            (the old log-probs of the update).
        rollout_logp: (B, T) float of logp's dtype, the sampler's.
        mask: (B, T) bool, or per-token weights of any other dtype (finite,
            >= 0, nonzero = valid); the sums above weight each token by it.
        level: "token" | "sequence" | "geometric".
        mode: "truncate" | "mask" | None.
        upper: > 0, or None (no upper bound).
        lower: > 0, or None (0).
        rejection: None or ``{option: threshold}``, option one of
            ``token_k1`` ``token_k2`` ``token_k3`` ``seq_sum_k1`` ... ``seq_mean_k3``
            ``seq_max_k2`` ``seq_max_k3`` (at most 8); a k1 threshold is a
            ratio bound, ``(lower, upper)`` or ``upper`` for ``(1 / upper,
            upper)``; a k2 / k3 threshold is one upper bound.
        normalize: divide the weights by their mean over the valid tokens
            (token level) or sequences (sequence and geometric levels) when
            that mean is > 1e-8 (verl's ``rollout_is_batch_normalize``).
        cu_seqlens: None, or (S + 1,) int32 offsets of S packed sequences
            (``rlhf_kernels.packing``): logp, rollout_logp and mask are then
            (N,), and so are the weights and the mask returned; the
            sequence levels, rejections and statistics run per packed
            sequence, as on the padded (S, T) layout.
        max_seqlen: with cu_seqlens, the longest sequence's length or more
            (given, nothing is read on the host).
        backend: "triton" | "cuda" | "cpu" | "eager"; default by device.

    Returns:
        RolloutCorrection(weights (B, T) float32 (float64 for float64 inputs),
        mask (B, T) like ``mask`` with the rejected tokens zeroed, stats): the
        stats are 0-dim tensors, means over the valid tokens weighted by the
        mask: ``mismatch/k1`` (mean -lr), ``mismatch/k3``,
        ``mismatch/abs_diff_mean``, ``mismatch/abs_diff_max``,
        ``correction/weight_mean`` (before normalising),
        ``correction/out_of_band_frac`` (the share of tokens whose raw weight
        was outside [lower, upper]: truncated or masked),
        ``correction/rejected_token_frac``, ``correction/rejected_seq_frac``
        (sequences with a rejected token, over those with a valid token) and,
        with ``normalize``, ``correction/norm_factor``. An all-masked batch
        gives zeros, never NaN.
    """
    if cu_seqlens is not None:
        p, rows = packed_rows(cu_seqlens, max_seqlen, logp=logp, rollout_logp=rollout_logp, mask=mask)
        out = rollout_correction(*rows, level=level, mode=mode, upper=upper, lower=lower, rejection=rejection,
                                 normalize=normalize, backend=backend)
        return RolloutCorrection(from_rows(out.weights, p), from_rows(out.mask, p), out.stats)
    if max_seqlen is not None:
        raise ValueError("max_seqlen: only with cu_seqlens")
    check_tensor("logp", logp, FLOAT_DTYPES)
    check_tensor("rollout_logp", rollout_logp, FLOAT_DTYPES)
    check_same_device(logp=logp, rollout_logp=rollout_logp, mask=mask)
    check_mask(mask)
    if logp.dim() != 2:
        raise ValueError(f"logp: expected shape (B, T), got {tuple(logp.shape)}")
    for name, t in (("rollout_logp", rollout_logp), ("mask", mask)):
        if t.shape != logp.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match logp {tuple(logp.shape)}")
    if rollout_logp.dtype != logp.dtype:
        raise ValueError(f"rollout_logp: dtype {rollout_logp.dtype} does not match logp's {logp.dtype}")
    if level not in LEVELS:
        raise ValueError(f"level: expected one of {tuple(LEVELS)}, got {level!r}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {tuple(MODES)}, got {mode!r}")
    upper_value = math.inf if upper is None else check_positive("upper", upper)
    lower_value = 0.0 if lower is None else check_positive("lower", lower)
    if lower_value > upper_value:
        raise ValueError(f"lower: {lower_value} > upper {upper_value}")
    rules = parse_rejection(rejection)
    acc = acc_dtype(logp.dtype)
    kernel_mask = mask if mask.dtype == torch.bool else mask.to(acc)
    weights, keep, rows = implementation("rollout_correction", backend, logp.device)(
        logp, rollout_logp, kernel_mask, LEVELS[level], MODES[mode], lower_value, upper_value,
        [REJECTION_OPTIONS[o] for o, _, _ in rules], [lo for _, lo, _ in rules], [hi for _, _, hi in rules],
    )
    totals = rows.sum(0)
    n = totals[0].clamp_min(torch.finfo(acc).tiny)
    seqs = (rows[:, 0] > 0).sum().to(acc).clamp_min(1)
    stats = {
        "mismatch/k1": totals[1] / n,
        "mismatch/k3": totals[2] / n,
        "mismatch/abs_diff_mean": totals[3] / n,
        "mismatch/abs_diff_max": rows[:, 4].amax() if rows.shape[0] > 0 else totals[4],
        "correction/weight_mean": totals[5] / n,
        "correction/out_of_band_frac": totals[6] / n,
        "correction/rejected_token_frac": totals[7] / n,
        "correction/rejected_seq_frac": totals[8] / seqs,
    }
    if normalize:
        if level == "token":
            mean = stats["correction/weight_mean"]
        else:  # each valid sequence's weight: its weighted mean weight
            per_seq = rows[:, 5] / rows[:, 0].clamp_min(torch.finfo(acc).tiny)
            mean = torch.where(rows[:, 0] > 0, per_seq, 0.0).sum() / seqs
        factor = torch.where(mean > 1e-8, mean, torch.ones_like(mean))
        weights = weights / factor
        stats["correction/norm_factor"] = factor
    kept = keep if mask.dtype == torch.bool else mask * keep
    return RolloutCorrection(weights, kept, stats)


__all__ = ["REJECTION_OPTIONS", "RolloutCorrection", "from_verl_config", "parse_rejection", "rollout_correction"]

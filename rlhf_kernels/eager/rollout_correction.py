"""rollout_correction in plain torch ops (the "eager" backend): the
reference formulas in the accumulation dtype, returning what the kernels
return."""

from __future__ import annotations

from .. import reference
from .._launch import acc_dtype

LEVEL_NAMES = ("token", "sequence", "geometric")
MODE_NAMES = (None, "truncate", "mask")
# Kernel code -> verl's option name (aggregation * 3 + estimator).
OPTION_NAMES = {a * 3 + e: f"{agg}_{est}" for a, agg in enumerate(("token", "seq_sum", "seq_mean", "seq_max"))
                for e, est in enumerate(("k1", "k2", "k3"))}


def rollout_correction(logp, rollout_logp, mask, level, mode, lower, upper, rule_kinds, rule_lo, rule_hi):
    acc = acc_dtype(logp.dtype)
    rules = tuple((OPTION_NAMES[k], lo, hi) for k, lo, hi in zip(rule_kinds, rule_lo, rule_hi))
    return reference.rollout_correction(logp.to(acc), rollout_logp.to(acc), mask, level=LEVEL_NAMES[level],
                                        mode=MODE_NAMES[mode], lower=lower, upper=upper, rules=rules)

"""The CUDA kernels of csrc/cuda, run on the CPU under a small CUDA emulation.

``build.build`` compiles csrc/cuda/*.cu with g++ against the shim headers of
this folder (cuda_emu.h and friends); ``Emulator`` loads the library with
ctypes and offers one method per native op with the arguments and outputs of
``torch.ops.rlhf_kernels.<op>_native``, doing in Python what
csrc/cuda/*_glue.cpp does in C++ (layouts, output allocation, the reduction of
per-chunk partials).

Every tensor a kernel sees lives in a buffer whose other elements are poison
(NaN, or an out-of-range value for integers): outputs start as poison, so an
element a kernel forgets shows; inputs are surrounded by it, so a read outside
a row shows as NaN in the results; after each launch the poison outside every
output must be intact (no write out of bounds).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .build import CXX, build, compiler_available  # noqa: F401

GUARD = 64  # poisoned elements before and after each tensor (a multiple of 16 bytes)
TAGS = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}
_BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}

_SIGNATURES = {
    "emu_logprobs_fwd": "p i64 i64 i64 p i64 i64 d i64 p p p p p",
    "emu_logprobs_bwd": "p p p i64 i64 i64 p p p p i64 i64 d i64 p i64 i64 p",
    "emu_truncation_threshold": "p i64 i64 i64 i64 i64 d i64 d d i32 p",
    "emu_ppo_logits_grad": "p i64 i64 i64 p p p p p i64 i64 d i64 d d d i64 d i32 d p p p p p i64 i64 i64",
    "emu_kl_penalty_fwd": "p p i32 p i64",
    "emu_scale_unless_one": "p p p i64",
    "emu_kl_penalty_bwd": "p p p i32 p p i64",
    "emu_advantages": "p p p i64 i64 p p p p p d i32 d d p p p p p i64",
    "emu_ppo_policy_fwd": "p p p p p p p i64 i64 d d d i64 d i32 p p",
    "emu_ppo_value_fwd": "p p p p p i64 i64 d p p",
    "emu_ppo_sequence_clip": "p i64 i64 i32 d d d d d p p p",
    "emu_scale_by_sign": "p p p i64 i64 p",
    "emu_rollout_correction": "p p p p i64 i64 i32 i32 d d i32 p p p p p p",
    "emu_selftest_shuffle": "p p i32 i32 i32 i32",
    "emu_selftest_bad": "i32 p i32",
    "emu_selftest_index": "p u32 u32 u32 u32 u32 u32",
}
_CTYPES = {"p": ctypes.c_void_p, "i64": ctypes.c_int64, "i32": ctypes.c_int, "u32": ctypes.c_uint,
           "d": ctypes.c_double}

# Columns of the statistics (rlhf_kernels/ppo_math.h).
POLICY_STATS, VALUE_STATS, ADVANTAGE_STATS = 9, 3, 4
RC_STATS = 9  # kRcStatColumns (rlhf_kernels/rollout_correction_math.h)
RATIO_MAX, RATIO_MIN = 5, 6


class EmulatedLaunchError(RuntimeError):
    """A launch the emulator refused or stopped (bad configuration, or UB)."""


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _poison(dtype: torch.dtype):
    if dtype.is_floating_point:
        return float("nan")
    if dtype == torch.bool:
        return True
    if dtype == torch.int32:
        return 0x5A5A5A5A
    return 0x5A5A5A5A5A5A5A5A


def _bits(t: Tensor) -> Tensor:
    return t.view(_BITS[t.element_size()]) if t.dtype != torch.bool else t.view(torch.uint8)


def _span(shape, stride) -> int:
    if any(n == 0 for n in shape):
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(shape, stride))


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


class Arena:
    """Tensors placed inside poisoned buffers, checked after a launch."""

    def __init__(self):
        self._items: list[tuple[Tensor, Tensor, str]] = []

    def _buffer(self, shape, stride, dtype, shift: int, name: str) -> Tensor:
        assert all(s >= 0 for s in stride)
        buf = torch.full((_span(shape, stride) + 2 * GUARD + shift,), _poison(dtype), dtype=dtype)
        view = buf.as_strided(tuple(shape), tuple(stride), GUARD + shift)
        self._items.append((buf, view, name))
        return view

    def place(self, t: Optional[Tensor], name: str, shift: int = 0) -> Optional[Tensor]:
        """A copy of t with t's strides, at `shift` elements past a 16-byte boundary."""
        if t is None:
            return None
        view = self._buffer(t.shape, t.stride(), t.dtype, shift, name)
        view.copy_(t)
        return view

    def empty(self, shape, dtype: torch.dtype, name: str, shift: int = 0) -> Tensor:
        """A poisoned contiguous output."""
        return self._buffer(tuple(shape), _contiguous_strides(shape), dtype, shift, name)

    def check(self) -> None:
        """Every element outside every placed view still holds its poison."""
        for buf, view, name in self._items:
            poison = _bits(torch.tensor([_poison(buf.dtype)], dtype=buf.dtype))
            start = view.storage_offset()
            if view.is_contiguous():
                outside = torch.cat([_bits(buf[:start]), _bits(buf[start + view.numel():])])
                changed = (outside != poison).nonzero().reshape(-1)
                changed = torch.where(changed < start, changed, changed + view.numel())
            else:
                index = torch.arange(buf.numel()).as_strided(view.shape, view.stride(), start)
                is_outside = torch.ones(buf.numel(), dtype=torch.bool)
                is_outside[index.reshape(-1)] = False
                changed = ((_bits(buf) != poison) & is_outside).nonzero().reshape(-1)
            if changed.numel():
                raise AssertionError(f"{name}: the kernel wrote outside the tensor, at buffer elements "
                                     f"{changed[:8].tolist()} (the tensor spans {start}..)")


def _ptr(x):
    if x is None:
        return None
    if isinstance(x, Tensor):
        return x.data_ptr() if x.numel() > 0 else None
    return x


class Emulator:
    """The emulated CUDA kernels, one method per native op (see the module docstring)."""

    def __init__(self, library: Path):
        self.lib = ctypes.CDLL(str(library))
        self.lib.cuda_emu_take_error.restype = ctypes.c_char_p
        self.lib.cuda_emu_set_schedule.argtypes = [ctypes.c_int, ctypes.c_ulonglong]
        self.lib.emu_ppo_chunks.argtypes = [ctypes.c_int64]
        self.lib.emu_ppo_chunks.restype = ctypes.c_int64
        for name in ("emu_float_to_half", "emu_half_to_float", "emu_float_to_bf16", "emu_bf16_to_float"):
            getattr(self.lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        self._functions = {}

    def _function(self, name: str):
        if name not in self._functions:
            fn = getattr(self.lib, name)
            base = next(b for b in _SIGNATURES if name == b or name.startswith(b + "_"))
            fn.argtypes = [_CTYPES[c] for c in _SIGNATURES[base].split()]
            fn.restype = ctypes.c_int
            self._functions[name] = fn
        return self._functions[name]

    def call(self, name: str, *args) -> None:
        """Run one C entry point; raise EmulatedLaunchError if a launch failed."""
        rc = self._function(name)(*[_ptr(a) for a in args])
        message = self.lib.cuda_emu_take_error().decode()
        if rc != 0 or message:
            raise EmulatedLaunchError(f"cudaError {rc}: {message}")

    def set_schedule(self, mode: int, seed: int = 0) -> None:
        """Order of resuming a block's fibers: round robin by thread index (0),
        reversed (1), shuffled per block (2, seeded); or always the first
        runnable fiber by thread index (3) or reversed (4): a warp runs ahead."""
        self.lib.cuda_emu_set_schedule(mode, seed)

    def ppo_chunks(self, seq_len: int) -> int:
        return self.lib.emu_ppo_chunks(seq_len)

    def convert(self, name: str, x: Tensor, out_dtype: torch.dtype) -> Tensor:
        x = x.contiguous()
        out = torch.empty(x.shape, dtype=out_dtype)
        getattr(self.lib, name)(x.data_ptr(), out.data_ptr(), x.numel())
        return out

    # --- logprobs (csrc/cuda/logprobs_glue.cpp) -------------------------------------------

    def logprobs_fwd(self, logits, labels, inner_rows, outer_stride, inner_stride, inv_temperature,
                     ignore_index, compute_entropy, min_logit=None, *, shift=0):
        """As logprobs_fwd_native: (logp, entropy or empty, row_max, log_sum). `logits` is the
        tensor the layout describes; it is placed `shift` elements off alignment. min_logit:
        (N,) per-row thresholds of the accumulation dtype, or None."""
        arena = Arena()
        x = arena.place(logits, "logits", shift)
        labels = arena.place(labels, "labels")
        assert labels.dtype == torch.int64 and labels.dim() == 1
        n_rows, vocab = labels.numel(), logits.shape[-1]
        acc = acc_dtype(logits.dtype)
        logp = arena.empty((n_rows,), acc, "logp")
        row_max = arena.empty((n_rows,), acc, "row_max")
        log_sum = arena.empty((n_rows,), acc, "log_sum")
        entropy = arena.empty((n_rows if compute_entropy else 0,), acc, "entropy")
        self.call(f"emu_logprobs_fwd_{TAGS[logits.dtype]}", x, inner_rows, outer_stride, inner_stride,
                  labels, n_rows, vocab, inv_temperature, ignore_index, logp,
                  entropy if compute_entropy else None, row_max, log_sum,
                  self._min_logit(arena, min_logit, n_rows, acc))
        arena.check()
        return logp, entropy, row_max, log_sum

    def logprobs_bwd(self, grad_logp, grad_entropy, logits, labels, row_max, log_sum, entropy,
                     inner_rows, in_outer_stride, in_inner_stride, out_outer_stride, out_inner_stride,
                     inv_temperature, ignore_index, min_logit=None, *, inplace=False, shift=0, out_shift=0):
        """As logprobs_bwd_native; returns grad_logits: a new contiguous tensor
        (placed `out_shift` elements off alignment), or with `inplace` the
        placed logits themselves, overwritten (out strides = in strides).
        min_logit as in logprobs_fwd."""
        arena = Arena()
        x = arena.place(logits, "logits", shift)
        if inplace:
            assert (out_outer_stride, out_inner_stride) == (in_outer_stride, in_inner_stride)
            out = x
        else:
            out = arena.empty(logits.shape, logits.dtype, "grad_logits", out_shift)
        n_rows, vocab = labels.numel(), logits.shape[-1]
        args = [arena.place(t, n) for t, n in ((grad_logp, "grad_logp"), (grad_entropy, "grad_entropy"))]
        self.call(f"emu_logprobs_bwd_{TAGS[logits.dtype]}", *args, x, inner_rows, in_outer_stride,
                  in_inner_stride, arena.place(labels, "labels"), arena.place(row_max, "row_max"),
                  arena.place(log_sum, "log_sum"), arena.place(entropy, "entropy"), n_rows, vocab,
                  inv_temperature, ignore_index, out, out_outer_stride, out_inner_stride,
                  self._min_logit(arena, min_logit, n_rows, acc_dtype(logits.dtype)))
        arena.check()
        return out

    @staticmethod
    def _min_logit(arena, min_logit, n_rows, acc):
        """The placed per-row thresholds (glue/logprobs.h threshold_data's checks), or None."""
        if min_logit is None:
            return None
        assert min_logit.dtype == acc and min_logit.shape == (n_rows,) and min_logit.is_contiguous()
        return arena.place(min_logit, "min_logit")

    def truncation_threshold(self, logits, temperature, top_k, top_p, min_p, min_p_first, *, shift=0):
        """As truncation_threshold: (N,) thresholds of the accumulation dtype, the
        rows read in place where row_layout can (placed `shift` elements off alignment)."""
        from rlhf_kernels._launch import row_layout  # the Python twin of glue/logprobs.h logits_rows

        tensor, inner_rows, outer, inner = row_layout(logits)
        arena = Arena()
        x = arena.place(tensor, "logits", shift)
        vocab = tensor.shape[-1]
        n_rows = tensor.numel() // vocab
        out = arena.empty((n_rows,), acc_dtype(logits.dtype), "threshold")
        self.call(f"emu_truncation_threshold_{TAGS[logits.dtype]}", x, inner_rows, outer, inner, n_rows, vocab,
                  1.0 / temperature, top_k, top_p, min_p, int(min_p_first), out)
        arena.check()
        return out

    def ppo_logits_grad(self, logits, labels, old_logp, advantages, row_weight, ref_logp, inner_rows,
                        in_outer_stride, in_inner_stride, inv_temperature, ignore_index, ratio_low, ratio_high,
                        dual_clip, loss_type, kl_coef, kl_estimator, entropy_coef, *, shift=0, out_shift=0,
                        max_blocks=0):
        """As ppo_logits_grad_native with a new contiguous gradient buffer:
        (logp, entropy, row_max, log_sum, grad_logits). loss_type: the PolicyForm code
        (rlhf_kernels/ppo_math.h), ratio_low / ratio_high / dual_clip that form's numbers."""
        arena = Arena()
        x = arena.place(logits, "logits", shift)
        out = arena.empty(logits.shape, logits.dtype, "grad_logits", out_shift)
        n_rows, vocab = labels.numel(), logits.shape[-1]
        acc = acc_dtype(logits.dtype)
        logp, entropy, row_max, log_sum = (arena.empty((n_rows,), acc, name)
                                           for name in ("logp", "entropy", "row_max", "log_sum"))
        # The output's row layout: contiguous rows of the flattened leading dims.
        out_outer, out_inner = inner_rows * vocab, vocab
        self.call(f"emu_ppo_logits_grad_{TAGS[logits.dtype]}", x, inner_rows, in_outer_stride, in_inner_stride,
                  arena.place(labels, "labels"), arena.place(old_logp, "old_logp"),
                  arena.place(advantages, "advantages"), arena.place(row_weight, "row_weight"),
                  arena.place(ref_logp, "ref_logp"), n_rows, vocab, inv_temperature, ignore_index,
                  ratio_low, ratio_high, dual_clip, loss_type, kl_coef, kl_estimator, entropy_coef, logp, entropy,
                  row_max, log_sum, out, out_outer, out_inner, max_blocks)
        arena.check()
        return logp, entropy, row_max, log_sum, out

    def scale_unless_one(self, x, scale: float, applied: float):
        """As launch_scale_unless_one: x * (scale / applied) in the accumulation
        dtype, x untouched when that is 1; returns the placed (modified) copy."""
        arena = Arena()
        acc = acc_dtype(x.dtype)
        out = arena.place(x, "x")
        self.call(f"emu_scale_unless_one_{TAGS[x.dtype]}", out, arena.place(torch.tensor([scale], dtype=acc), "scale"),
                  arena.place(torch.tensor([applied], dtype=acc), "applied"), x.numel())
        arena.check()
        return out

    # --- KL penalty and advantages (csrc/cuda/advantages_glue.cpp) ------------------------

    def kl_penalty_fwd(self, logp, ref_logp, estimator):
        arena = Arena()
        kl = arena.empty(logp.shape, acc_dtype(logp.dtype), "kl")
        self.call(f"emu_kl_penalty_fwd_{TAGS[logp.dtype]}", arena.place(logp, "logp"),
                  arena.place(ref_logp, "ref_logp"), estimator, kl, logp.numel())
        arena.check()
        return kl

    def kl_penalty_bwd(self, grad, logp, ref_logp, estimator):
        arena = Arena()
        grad_logp = arena.empty(logp.shape, logp.dtype, "grad_logp")
        grad_ref = arena.empty(logp.shape, logp.dtype, "grad_ref")
        self.call(f"emu_kl_penalty_bwd_{TAGS[logp.dtype]}", arena.place(grad, "grad"),
                  arena.place(logp, "logp"), arena.place(ref_logp, "ref_logp"), estimator, grad_logp,
                  grad_ref, logp.numel())
        arena.check()
        return grad_logp, grad_ref

    def advantages(self, values, mask, cu_seqlens, token_rewards, scores, logp, ref_logp, kl_coef_scale,
                   kl_coef, estimator, gamma, lam):
        """As advantages_native: (advantages, returns, token_rewards, kl, stats)."""
        if cu_seqlens is not None:
            assert values.dim() == 1
            num_seqs, seq_len = cu_seqlens.numel() - 1, 0
        else:
            assert values.dim() == 2
            num_seqs, seq_len = values.shape
        shaping = token_rewards is None
        acc = acc_dtype(values.dtype)
        arena = Arena()
        shaped = values.shape if shaping else (0,)
        out = [arena.empty(values.shape, acc, "advantages"), arena.empty(values.shape, acc, "returns"),
               arena.empty(shaped, acc, "token_rewards"), arena.empty(shaped, acc, "kl"),
               arena.empty((num_seqs, ADVANTAGE_STATS), torch.float64, "stats")]
        self.call(
            f"emu_advantages_{TAGS[values.dtype]}", arena.place(values, "values"),
            arena.place(mask, "mask"), arena.place(cu_seqlens, "cu_seqlens"), seq_len, num_seqs,
            arena.place(token_rewards, "token_rewards"), arena.place(scores, "scores") if shaping else None,
            arena.place(logp, "logp"), arena.place(ref_logp, "ref_logp"),
            arena.place(kl_coef_scale, "kl_coef_scale"), kl_coef, estimator, gamma, lam, *out[:2],
            out[2] if shaping else None, out[3] if shaping else None, out[4], values.numel(),
        )
        arena.check()
        return tuple(out)

    # --- PPO losses (csrc/cuda/ppo_loss_glue.cpp) -----------------------------------------

    @staticmethod
    def reduce_partials(partial: Tensor, max_col: int, min_col: int) -> Tensor:
        """(B, C, K) per-chunk partials -> (B, K), as the glue's reduce_partials."""
        if partial.shape[1] == 1:
            return partial[:, 0].contiguous()
        stats = partial.sum(1)
        if max_col >= 0:
            stats[:, max_col] = partial[:, :, max_col].amax(1)
            stats[:, min_col] = partial[:, :, min_col].amin(1)
        return stats

    @staticmethod
    def _mask_args(arena, mask):
        """(mask, weight) as the PPO kernels take them: a bool mask's bytes, or
        per-token weights (any other dtype), the other pointer null."""
        if mask.dtype == torch.bool:
            return arena.place(mask, "mask"), None
        return None, arena.place(mask, "weight")

    def ppo_policy_fwd(self, logp, old_logp, advantages, mask, ref_logp, entropy, seq_len, ratio_low,
                       ratio_high, dual_clip, loss_type, kl_coef, kl_estimator, need_grad, *, raw_partials=False):
        """The policy token pass (csrc policy_partials, partials reduced): (grad or empty, (B, 9) stats).
        loss_type: the PolicyForm code (rlhf_kernels/ppo_math.h), ratio_low / ratio_high / dual_clip
        that form's numbers."""
        n = logp.numel()
        seqs = n // seq_len if seq_len > 0 else 0
        arena = Arena()
        grad = arena.empty((n if need_grad else 0,), logp.dtype, "grad")
        chunks = self.ppo_chunks(seq_len)
        partial = arena.empty((seqs, chunks, POLICY_STATS), logp.dtype, "partial")
        self.call(
            f"emu_ppo_policy_fwd_{TAGS[logp.dtype]}", arena.place(logp, "logp"),
            arena.place(old_logp, "old_logp"), arena.place(advantages, "advantages"),
            *self._mask_args(arena, mask), arena.place(ref_logp, "ref_logp"), arena.place(entropy, "entropy"),
            seqs, seq_len, ratio_low, ratio_high, dual_clip, loss_type, kl_coef, kl_estimator,
            grad if need_grad else None, partial,
        )
        arena.check()
        if raw_partials:
            return grad, partial
        return grad, self.reduce_partials(partial, RATIO_MAX, RATIO_MIN)

    def ppo_value_fwd(self, values, old_values, returns, mask, seq_len, clip, need_grad, *,
                      raw_partials=False):
        """The value token pass (csrc value_partials, partials reduced): (grad or empty, (B, 3) stats)."""
        n = values.numel()
        seqs = n // seq_len if seq_len > 0 else 0
        arena = Arena()
        grad = arena.empty((n if need_grad else 0,), values.dtype, "grad")
        partial = arena.empty((seqs, self.ppo_chunks(seq_len), VALUE_STATS), values.dtype, "partial")
        self.call(
            f"emu_ppo_value_fwd_{TAGS[values.dtype]}", arena.place(values, "values"),
            arena.place(old_values, "old_values"), arena.place(returns, "returns"),
            *self._mask_args(arena, mask), seqs, seq_len, clip, grad if need_grad else None, partial,
        )
        arena.check()
        if raw_partials:
            return grad, partial
        return grad, self.reduce_partials(partial, -1, -1)

    def ppo_sequence_clip(self, rows, ratio_low, ratio_high, dual_clip, agg, num_tokens, num_seqs, seq_len):
        """As ppo_sequence_clip (csrc/ops.cpp): (loss, coef (B,), stats (5,)) from contiguous (B, 9) rows."""
        arena = Arena()
        loss = arena.empty((), rows.dtype, "loss")
        coef = arena.empty((rows.shape[0],), rows.dtype, "coef")
        stats = arena.empty((5,), rows.dtype, "stats")
        self.call(f"emu_ppo_sequence_clip_{TAGS[rows.dtype]}", arena.place(rows.contiguous(), "rows"), rows.shape[0],
                  seq_len, agg, num_tokens or 0.0, num_seqs or 0.0, ratio_low, ratio_high, dual_clip, loss, coef,
                  stats)
        arena.check()
        return loss, coef, stats

    def scale_by_sign(self, x, pos, neg):
        """As scale_by_sign (csrc/ops.cpp) on contiguous (R, T) x and (R,) pos / neg."""
        arena = Arena()
        y = arena.empty(x.shape, x.dtype, "y")
        self.call(f"emu_scale_by_sign_{TAGS[x.dtype]}", arena.place(x.contiguous(), "x"), arena.place(pos, "pos"),
                  arena.place(neg, "neg"), x.numel(), x.shape[-1], y)
        arena.check()
        return y

    # --- rollout correction (csrc/cuda/rollout_correction_glue.cpp) -----------------------

    def rollout_correction(self, logp, rollout_logp, mask, level, mode, lower, upper, rule_kinds, rule_lo,
                           rule_hi):
        """As rollout_correction (csrc/ops.cpp): (weights, keep, (B, 9) stats); inputs read
        contiguous, the mask bool or of the accumulation dtype."""
        assert logp.dim() == 2 and rollout_logp.shape == logp.shape and mask.shape == logp.shape
        num_seqs, seq_len = logp.shape
        acc = acc_dtype(logp.dtype)
        assert rollout_logp.dtype == logp.dtype and mask.dtype in (torch.bool, acc)
        assert len(rule_kinds) == len(rule_lo) == len(rule_hi)
        arena = Arena()
        weights = arena.empty(logp.shape, acc, "weights")
        keep = arena.empty(logp.shape, torch.bool, "keep")
        stats = arena.empty((num_seqs, RC_STATS), acc, "stats")
        rules = [arena.place(torch.tensor(list(values), dtype=dtype), name) for values, dtype, name in
                 ((rule_kinds, torch.int64, "rule_kinds"), (rule_lo, torch.float64, "rule_lo"),
                  (rule_hi, torch.float64, "rule_hi"))]
        self.call(f"emu_rollout_correction_{TAGS[logp.dtype]}", arena.place(logp.contiguous(), "logp"),
                  arena.place(rollout_logp.contiguous(), "rollout_logp"),
                  *self._mask_args(arena, mask.contiguous()), num_seqs, seq_len, level, mode, lower, upper,
                  len(rule_kinds), *rules, weights, keep, stats)
        arena.check()
        return weights, keep, stats


__all__ = ["Arena", "Emulator", "EmulatedLaunchError", "build", "compiler_available", "acc_dtype"]

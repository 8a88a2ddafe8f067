"""TRL on rlhf_kernels: ``rlhf_kernels.integrations.trl.patch()``.

Replaces, in ``trl.trainer.utils`` and wherever TRL's modules imported them:

- ``selective_log_softmax`` and ``entropy_from_logits`` (the CPO, ORPO, A2PO,
  SDPO and SDFT trainers), and the fused helper
  ``selective_log_softmax_and_entropy`` (TPO): one ``logprobs_from_logits``
  pass instead of a log-softmax per row;
- ``ChunkedLogProbFunction``, the fused LM head through which the GRPO and
  RLOO trainers get their per-token log-probs and entropies (``add_fused_lm_head``):
  the LM head projection still runs in token chunks, and each chunk's logits
  go through ``logprobs_from_logits`` (forward and backward). Calls that ask
  for the outputs our op does not produce (``log_sum_sq_probs``,
  ``mean_logits``, ``is_top1``) go to TRL's own function.

The adapters keep TRL's semantics, including where they differ from ours (see
the comments marked "TRL semantics").
"""

from __future__ import annotations

import torch
from torch import Tensor

import rlhf_kernels
from rlhf_kernels._dispatch import resolve_backend
from rlhf_kernels.ops import lm_head_plan, lm_head_tiles

from . import Patcher, _Target, count_served, hand_back

TESTED_VERSIONS = frozenset({"1.16.0"})

# A label no vocabulary reaches: the positions TRL's row_mask drops.
_SKIP = -100


def _uses_trl_kernel(logits: Tensor, index: Tensor | None = None, row_mask: Tensor | None = None) -> bool:
    """Whether TRL itself would run its Triton kernel here (CUDA/XPU), whose
    outputs are float32; its eager path returns the logits' dtype."""
    from trl.trainer import utils

    return bool(utils.is_triton_available() and utils._supports_trl_loss_kernel(logits, index, row_mask))


def _labels_with_skips(index: Tensor, row_mask: Tensor | None) -> Tensor:
    if row_mask is None:
        return index
    return index.masked_fill(row_mask == 0, _SKIP)


def _make_selective_log_softmax(original):
    def selective_log_softmax(
        logits: Tensor,
        index: Tensor,
        temperature: float = 1.0,
        row_mask: Tensor | None = None,
    ) -> Tensor:
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        if index.ndim == logits.ndim:
            # TRL semantics: an (..., K) index gathers K log-probs per row (top-K);
            # our op takes one label per row, so TRL's own code runs.
            return hand_back("trl.selective_log_softmax", "an (..., K) index (K log-probs per row)", original,
                             logits, index, temperature, row_mask)
        out_dtype = torch.float32 if _uses_trl_kernel(logits, index, row_mask) else logits.dtype
        # TRL semantics: rows where row_mask == 0 give 0 (and no gradient): we skip them.
        logp = rlhf_kernels.logprobs_from_logits(
            logits, _labels_with_skips(index, row_mask), temperature=temperature, ignore_index=_SKIP
        )
        # TRL semantics: the eager path returns the logits' dtype (bf16 stays bf16);
        # ours is float32, rounded here (so it is at least as accurate).
        return logp.to(out_dtype)

    return selective_log_softmax


def _make_entropy_from_logits(original):
    def entropy_from_logits(logits: Tensor, chunk_size: int = 128) -> Tensor:
        # chunk_size bounded TRL's peak memory; our kernel never holds (N, V) at all.
        out_dtype = torch.float32 if _uses_trl_kernel(logits) else logits.dtype
        labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
        _, entropy = rlhf_kernels.logprobs_from_logits(logits, labels, return_entropy=True)
        return entropy.to(out_dtype)

    return entropy_from_logits


def _make_selective_log_softmax_and_entropy(original):
    def selective_log_softmax_and_entropy(
        logits: Tensor,
        index: Tensor,
        entropy_requires_grad: bool = True,
        temperature: float = 1.0,
        row_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        out_dtype = torch.float32 if _uses_trl_kernel(logits, index, row_mask) else logits.dtype
        logp, entropy = rlhf_kernels.logprobs_from_logits(
            logits,
            _labels_with_skips(index, row_mask),
            temperature=temperature,
            ignore_index=_SKIP,
            return_entropy=True,
        )
        entropy = entropy.to(out_dtype)
        # TRL semantics: entropy_requires_grad=False returns it detached (a logged metric).
        return logp.to(out_dtype), entropy if entropy_requires_grad else entropy.detach()

    return selective_log_softmax_and_entropy


# Rows of logits materialised at once by the LM-head adapter: TRL tiles the
# vocabulary too, our op needs whole rows, so the token chunk is sized to keep
# one chunk's logits near 256 MiB.
_LM_HEAD_CHUNK_BYTES = 256 << 20


def _lm_head_rows(vocab: int, itemsize: int) -> int:
    return max(1, min(4096, _LM_HEAD_CHUNK_BYTES // max(1, vocab * itemsize)))


def _head_logits(hidden_chunk, weight, bias, compute_dtype, logit_scale, softcap):
    # TRL semantics: the projection runs in the compute dtype (the autocast dtype
    # or the hidden dtype), then z = softcap * tanh(scale * x / softcap) in float32,
    # then / temperature (done by our op).
    logits = hidden_chunk.to(compute_dtype) @ weight.to(compute_dtype).t()
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    if logit_scale != 1.0 or softcap is not None:
        logits = logits.float() * logit_scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
    return logits


def _make_chunked_logprob(original):
    class ChunkedLogProbFunction(torch.autograd.Function):
        """TRL's fused LM head (``hidden @ weight.T`` -> per-token log-prob and
        entropy), with each token chunk's logits through ``logprobs_from_logits``.
        Same ``apply`` arguments and 5-tuple result as TRL's."""

        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size,
                    final_logit_softcapping=None, logit_scale=1.0, outputs=("entropy",)):
            ctx.set_materialize_grads(False)
            device = hidden.device
            compute_dtype = (
                torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
            )
            want_entropy = "entropy" in outputs
            n_tokens, vocab = hidden.shape[0], weight.shape[0]
            rows = _lm_head_rows(vocab, 4)
            logp = torch.empty(n_tokens, device=device, dtype=torch.float32)
            entropy = torch.empty_like(logp) if want_entropy else None
            with torch.autocast(device.type, enabled=False):
                for start in range(0, n_tokens, rows):
                    end = min(start + rows, n_tokens)
                    logits = _head_logits(hidden[start:end], weight, bias, compute_dtype,
                                          logit_scale, final_logit_softcapping)
                    out = rlhf_kernels.logprobs_from_logits(
                        logits, targets[start:end], temperature=temperature, return_entropy=want_entropy
                    )
                    if want_entropy:
                        logp[start:end], entropy[start:end] = out
                    else:
                        logp[start:end] = out
            ctx.save_for_backward(hidden, weight, bias, targets)
            ctx.args = (compute_dtype, temperature, final_logit_softcapping, logit_scale, want_entropy)
            return logp, entropy, None, None, None

        @staticmethod
        def backward(ctx, grad_logp, grad_entropy, *_):
            # TRL semantics: a backward that recomputes from the head's weight
            # enters maybe_gather_lm_head_ctx again (under DeepSpeed ZeRO-3 the
            # weight is an empty shard outside it; elsewhere a null context).
            from trl.trainer.utils import maybe_gather_lm_head_ctx

            with maybe_gather_lm_head_ctx(*ctx.saved_tensors[1:3]):
                return ChunkedLogProbFunction._backward(ctx, grad_logp, grad_entropy)

        @staticmethod
        def _backward(ctx, grad_logp, grad_entropy):
            hidden, weight, bias, targets = ctx.saved_tensors
            compute_dtype, temperature, softcap, logit_scale, want_entropy = ctx.args
            need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
            n_tokens, vocab = hidden.shape[0], weight.shape[0]
            # TRL semantics: the weight/bias/hidden gradients accumulate in float32
            # across chunks and are cast to the parameters' dtypes at the end.
            grad_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32) if need_hidden else None
            grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_weight else None
            grad_bias = torch.zeros(bias.shape, device=bias.device, dtype=torch.float32) if need_bias else None
            rows = _lm_head_rows(vocab, 4)
            w = weight.to(compute_dtype)
            for start in range(0, n_tokens, rows):
                end = min(start + rows, n_tokens)
                h = hidden[start:end].to(compute_dtype)
                with torch.enable_grad(), torch.autocast(hidden.device.type, enabled=False):
                    raw = (h @ w.t()).detach().requires_grad_(True)
                    x = raw + bias.to(compute_dtype) if bias is not None else raw
                    if logit_scale != 1.0 or softcap is not None:
                        x = x.float() * logit_scale
                        if softcap is not None:
                            x = softcap * torch.tanh(x / softcap)
                    out = rlhf_kernels.logprobs_from_logits(
                        x, targets[start:end], temperature=temperature, return_entropy=want_entropy
                    )
                    outs, grads = [], []
                    pieces = out if want_entropy else (out,)
                    for value, grad in zip(pieces, (grad_logp, grad_entropy)):
                        if grad is not None:
                            outs.append(value)
                            grads.append(grad[start:end].float())
                    if not outs:
                        continue
                    (grad_logits,) = torch.autograd.grad(outs, raw, grads)
                grad_logits = grad_logits.float()
                if grad_hidden is not None:
                    grad_hidden[start:end].addmm_(grad_logits, w.float())
                if grad_weight is not None:
                    grad_weight.addmm_(grad_logits.t(), h.float())
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0)
            return (
                grad_hidden.to(hidden.dtype) if grad_hidden is not None else None,
                grad_weight.to(weight.dtype) if grad_weight is not None else None,
                grad_bias.to(bias.dtype) if grad_bias is not None else None,
                None, None, None, None, None, None,
            )

    class HiddenStateFunction(torch.autograd.Function):
        """TRL's ChunkedLogProbFunction on ``logprobs_from_hidden``'s tiles (our
        row kernels between BLAS / cuBLAS products, no logits kept), every
        output TRL computes: logp, entropy, log_sum_sq_probs, mean_logits,
        is_top1. The logit scale is folded into the temperature."""

        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, temperature, logit_scale, outputs, rows):
            ctx.set_materialize_grads(False)
            device = hidden.device
            compute_dtype = (
                torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
            )
            cast = lambda t: None if t is None else t.to(compute_dtype)  # noqa: E731
            h, w, b = cast(hidden), cast(weight), cast(bias)
            want_entropy = "entropy" in outputs
            want_extras = bool(set(outputs) - {"log_probs", "entropy"})
            inv_scale_t = temperature / logit_scale
            chunk_bytes = lm_head_plan.default_chunk_bytes(h.shape[0], w.shape[0])
            with torch.autocast(device.type, enabled=False):
                out = lm_head_tiles.forward_tiles(h, w, b, targets.to(torch.int64), inv_scale_t, _SKIP, want_entropy,
                                                chunk_bytes, rows, extras=want_extras)
            logp, entropy, row_max, log_sum = out[:4]
            stats = out[4] if want_extras else {}
            ctx.save_for_backward(hidden, weight, bias, targets, row_max, log_sum, entropy if want_entropy else None)
            ctx.args = (compute_dtype, inv_scale_t, chunk_bytes, rows)
            extra = tuple(stats[k] if k in outputs else None for k in ("log_sum_sq_probs", "mean_logits", "is_top1"))
            ctx.mark_non_differentiable(*(x for x in extra if x is not None))
            return (logp, entropy if want_entropy else None) + extra

        @staticmethod
        def backward(ctx, grad_logp, grad_entropy, *_):
            from trl.trainer.utils import maybe_gather_lm_head_ctx

            hidden, weight, bias, targets, row_max, log_sum, entropy = ctx.saved_tensors
            compute_dtype, inv_scale_t, chunk_bytes, rows = ctx.args
            need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
            with maybe_gather_lm_head_ctx(weight, bias):
                cast = lambda t: None if t is None else t.to(compute_dtype)  # noqa: E731
                grads = lm_head_tiles.backward_tiles(
                    grad_logp, grad_entropy if entropy is not None else None, cast(hidden), cast(weight), cast(bias),
                    targets.to(torch.int64), row_max, log_sum, entropy, inv_scale_t, _SKIP, chunk_bytes, rows,
                    need_hidden, need_weight, need_bias and bias is not None)
            grad_hidden, grad_weight, grad_bias = (
                None if g is None else g.to(x.dtype) for g, x in zip(grads, (hidden, weight, weight)))
            return grad_hidden, grad_weight, grad_bias, None, None, None, None, None

    class _Dispatch:
        """What TRL calls: ``ChunkedLogProbFunction.apply(...)``."""

        OURS = HiddenStateFunction

        @staticmethod
        def apply(hidden, weight, bias, targets, temperature, chunk_size,
                  final_logit_softcapping=None, logit_scale=1.0, outputs=None):
            if outputs is None:
                from trl.kernels.chunked_logprob import OPTIONAL_OUTPUTS as outputs
            outputs = tuple(outputs)
            backend = resolve_backend(None, hidden.device, "logprobs_from_hidden")
            key = "trl.ChunkedLogProbFunction"
            if final_logit_softcapping is None and backend != "eager":
                rows = "triton" if backend == "triton" else "native"
                count_served(key)
                return HiddenStateFunction.apply(hidden, weight, bias, targets, temperature, logit_scale, outputs,
                                                 rows)
            if backend == "eager":
                return hand_back(key, "no native or Triton kernels on this device", original.apply, hidden, weight,
                                 bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale,
                                 outputs)
            if set(outputs) - {"log_probs", "entropy"}:
                return hand_back(key, "soft-capped logits with log_sum_sq_probs / mean_logits / is_top1",
                                 original.apply, hidden, weight, bias, targets, temperature, chunk_size,
                                 final_logit_softcapping, logit_scale, outputs)
            count_served(key)
            # Soft-capped logits: row chunks of logits (tanh applied) through logprobs_from_logits.
            return ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                                final_logit_softcapping, logit_scale, outputs)

    _Dispatch.__name__ = _Dispatch.__qualname__ = "ChunkedLogProbFunction"
    return _Dispatch


_patcher = Patcher(
    framework="trl",
    distribution="trl",
    tested_versions=TESTED_VERSIONS,
    targets=[
        _Target("trl.trainer.utils", "selective_log_softmax", _make_selective_log_softmax),
        _Target("trl.trainer.utils", "entropy_from_logits", _make_entropy_from_logits),
        _Target("trl.trainer.utils", "selective_log_softmax_and_entropy", _make_selective_log_softmax_and_entropy),
        _Target("trl.kernels.chunked_logprob", "ChunkedLogProbFunction", _make_chunked_logprob),
    ],
    consumers=(
        "trl.trainer.grpo_trainer",
        "trl.trainer.rloo_trainer",
        "trl.experimental.cpo.cpo_trainer",
        "trl.experimental.orpo.orpo_trainer",
        "trl.experimental.tpo.tpo_trainer",
        "trl.experimental.a2po.a2po_trainer",
        "trl.experimental.sdpo.sdpo_trainer",
        "trl.experimental.sdpo.loss_utils",
        "trl.experimental.sdft.sdft_trainer",
        "trl.experimental.sdft.loss_utils",
    ),
)

TESTED_VERSIONS = _patcher.tested_versions
patch = _patcher.patch
unpatch = _patcher.unpatch
patched = _patcher.patched
patched_names = _patcher.patched_names
version = _patcher.version

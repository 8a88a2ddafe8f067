"""logprobs_from_hidden and ppo_loss_from_hidden: the log-probabilities (and
entropy, and the PPO loss) of the sampled tokens straight from the last hidden
state and the LM head, never building the (N, V) logits.

The contract (checks, the registered op, its fake and autograd, the public
functions) lives here; the tiles that compute it (forward, backward, the
three-GEMM loss path) in ``ops/lm_head_tiles.py``, with the algorithm; the
tile budget in ``ops/lm_head_plan.py``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .._dispatch import (
    checks_enabled, implementation, native_extension_loaded, register, resolve_backend, triton_installed,
)
from .._launch import acc_dtype
from .._validation import (
    FLOAT_DTYPES, INDEX_DTYPES, check_int, check_labels_in_range, check_positive, check_same_device, check_tensor,
    check_tokens,
)
from ..aggregation import token_weights
from ..eager import lm_head as _eager
from ._op import differentiable
from .advantages import kl_penalty
from .lm_head_plan import (
    MIN_LOSS_ROW_BLOCK, default_chunk_bytes, loss_chunk_bytes, row_block, tile_bytes, tile_plan,
)
from . import lm_head_tiles
from .lm_head_tiles import ROWS, PrecomputedGrad, backward_tiles, forward_tiles
from .policy_objectives import policy_loss
from .ppo_loss import _check_policy_inputs, _combined_loss, _logprobs_loss
from .ppo_options import VESPO_PARAMS, PPOLossOptions, fill_args
from .truncation import kept_threshold


# --- the ops ------------------------------------------------------------------
# rlhf_kernels::logprobs_from_hidden(hidden (N, H), weight (V, H), bias (V,)?,
# labels (N,) int64, ...) -> (logp, entropy, row_max, log_sum), each (N,) in
# the accumulation dtype (entropy empty unless compute_entropy); rows names
# the row kernels ("native": the extension's CPU or CUDA kernels; "triton").


@torch.library.custom_op("rlhf_kernels::logprobs_from_hidden", mutates_args=())
def _logprobs_from_hidden_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                             temperature: float, ignore_index: int, compute_entropy: bool, chunk_bytes: int,
                             rows: str, min_logit: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return forward_tiles(hidden, weight, bias, labels, temperature, ignore_index, compute_entropy, chunk_bytes,
                         rows, min_logit=min_logit)


@_logprobs_from_hidden_op.register_fake
def _(hidden, weight, bias, labels, temperature, ignore_index, compute_entropy, chunk_bytes, rows, min_logit=None):
    acc = acc_dtype(hidden.dtype)
    n = hidden.shape[0]
    return (hidden.new_empty(n, dtype=acc), hidden.new_empty(n if compute_entropy else 0, dtype=acc),
            hidden.new_empty(n, dtype=acc), hidden.new_empty(n, dtype=acc))


@torch.library.custom_op("rlhf_kernels::logprobs_from_hidden_backward", mutates_args=())
def _logprobs_from_hidden_backward_op(
        grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor], hidden: Tensor, weight: Tensor,
        bias: Optional[Tensor], labels: Tensor, row_max: Tensor, log_sum: Tensor, entropy: Optional[Tensor],
        temperature: float, ignore_index: int, chunk_bytes: int, rows: str, need_hidden: bool, need_weight: bool,
        need_bias: bool, min_logit: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    grads = backward_tiles(grad_logp, grad_entropy, hidden, weight, bias, labels, row_max, log_sum, entropy,
                           temperature, ignore_index, chunk_bytes, rows, need_hidden, need_weight, need_bias,
                           min_logit=min_logit)
    like = (hidden, weight, weight)
    return tuple(hidden.new_empty(0) if grad is None else grad.to(x.dtype) for grad, x in zip(grads, like))


@_logprobs_from_hidden_backward_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, labels, row_max, log_sum, entropy, temperature, ignore_index,
      chunk_bytes, rows, need_hidden, need_weight, need_bias, min_logit=None):
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            weight.new_empty((weight.shape[0],) if need_bias else (0,)))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, ignore_index, compute_entropy, chunk_bytes, rows, min_logit = inputs
    _, entropy, row_max, log_sum = output
    ctx.mark_non_differentiable(row_max, log_sum)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, weight, bias, labels, row_max, log_sum, entropy if compute_entropy else None,
                          min_logit)
    ctx.params = (temperature, ignore_index, compute_entropy, chunk_bytes, rows)


def _backward(ctx, grad_logp, grad_entropy, _grad_row_max, _grad_log_sum):
    hidden, weight, bias, labels, row_max, log_sum, entropy, min_logit = ctx.saved_tensors
    temperature, ignore_index, compute_entropy, chunk_bytes, rows = ctx.params
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_bias = need_bias and bias is not None
    if grad_logp is None and (grad_entropy is None or not compute_entropy):
        return (None,) * 10
    grads = _logprobs_from_hidden_backward_op(
        grad_logp, grad_entropy if compute_entropy else None, hidden, weight, bias, labels, row_max, log_sum,
        entropy, temperature, ignore_index, chunk_bytes, rows, need_hidden, need_weight, need_bias, min_logit)
    grad_hidden, grad_weight, grad_bias = (g if need else None
                                           for g, need in zip(grads, (need_hidden, need_weight, need_bias)))
    return (grad_hidden, grad_weight, grad_bias) + (None,) * 7


_caller = differentiable(torch.ops.rlhf_kernels.logprobs_from_hidden.default, _setup_context, _backward)


def _kernel_backend(rows: str) -> Callable:
    def logprobs(hidden, weight, bias, labels, temperature, ignore_index, compute_entropy, chunk_bytes,
                 min_logit=None):
        logp, entropy, _, _ = _caller(hidden, weight, bias, labels, temperature, ignore_index, compute_entropy,
                                      chunk_bytes, rows, min_logit)
        return logp, entropy

    return logprobs


if native_extension_loaded():
    register("logprobs_from_hidden", ("cpu", "cuda"), _kernel_backend("native"))
if triton_installed():
    register("logprobs_from_hidden", ("triton",), _kernel_backend("triton"))
register("logprobs_from_hidden", ("eager",), _eager.logprobs_from_hidden)


# --- public functions -----------------------------------------------------------


def _check_head(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor) -> None:
    check_tensor("hidden", hidden, FLOAT_DTYPES)
    check_tensor("weight", weight, FLOAT_DTYPES)
    check_tensor("labels", labels, INDEX_DTYPES)
    if bias is not None:
        check_tensor("bias", bias, FLOAT_DTYPES)
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    if hidden.dim() < 1:
        raise ValueError("hidden: expected shape (..., H) with at least one dimension")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: expected shape (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight: the vocabulary dimension V must be > 0")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels: shape {tuple(labels.shape)} does not match hidden.shape[:-1] "
                         f"{tuple(hidden.shape[:-1])}")
    if (hidden.dtype == torch.float64) != (weight.dtype == torch.float64):
        raise ValueError(f"weight: dtype {weight.dtype} with hidden {hidden.dtype}: float64 goes with float64 only")


def _check_chunk_bytes(chunk_bytes: Optional[int], n_rows: int, vocab: int) -> int:
    if chunk_bytes is None:
        return default_chunk_bytes(n_rows, vocab)
    chunk_bytes = check_int("chunk_bytes", chunk_bytes)
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes: must be > 0, got {chunk_bytes}")
    return chunk_bytes


def logprobs_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    chunk_bytes: int | None = None,
    min_logit: float | Tensor | None = None,
    vocab_parallel_group=None,
    vocab_start: int | None = None,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probabilities of ``labels`` under ``softmax((hidden @ weight.T + bias) / temperature)``,
    without building the logits.

    The same values and gradients as
    ``logprobs_from_logits(hidden @ weight.T + bias, labels, ...)``, computed
    a (token block x vocabulary block) tile at a time into one float32 buffer
    of at most ``chunk_bytes``: extra memory is that buffer plus O(N * H)
    (see the module docstring), not the (N, V) logits. Differentiable with
    respect to hidden, weight (possibly tied to the input embedding) and
    bias; the backward makes each tile again (no logits are kept).

    Args:
        hidden: (..., H) float32 | bfloat16 | float16 (float64 for gradcheck),
            the last hidden state.
        weight: (V, H), the LM head (any float dtype; float64 with float64 hidden).
        labels: (...) int64 | int32, the sampled token ids in [0, V) or
            ``ignore_index`` (logp = entropy = 0 and a zero gradient there).
            On CPU an id out of range raises ValueError; on a GPU it gives NaN
            unless ``RLHF_KERNELS_CHECK=1``.
        bias: (V,) or None.
        temperature: > 0, the logits are divided by it.
        return_entropy: also return the entropy of each position (costs
            nothing more when not asked; differentiable when it is).
        ignore_index: label value that marks positions to skip.
        chunk_bytes: budget of the tile buffer; default
            ``default_chunk_bytes(N, V)`` = N * V * 4 / 32 within [8, 256] MiB.
        min_logit: a float or a tensor of the labels' shape: the sampler's
            kept set, the logits (raw, before the temperature) >= it, as in
            ``logprobs_from_logits``: logp and entropy of the renormalised
            kept set, no gradient through the others (top_k / top_p / min_p
            need the whole row: take them from ``truncation_threshold`` on
            the sampler's logits). Not with vocab_parallel_group.
        vocab_parallel_group: a ``torch.distributed`` process group whose
            ranks each hold a vocabulary shard of the head: ``weight`` (V_r, H)
            and ``bias`` (V_r,) are this rank's rows, ``labels`` global ids
            (the same on every rank, as is ``hidden``). One all_gather of
            per-row partials in the forward; in the backward none for the
            head rows, one all_reduce for hidden's gradient, which comes back
            complete on every rank (every rank must backpropagate the same
            gradients). The results are the whole vocabulary's, on every rank
            (``ops/vocab_parallel.py``).
        vocab_start: the shard's first global id; default rank x V_r.
        backend: "cpu" | "cuda" | "triton" (the row kernels; GEMMs are BLAS /
            cuBLAS) | "eager" (plain PyTorch, with the logits); default as
            for every op.

    Returns:
        logp: (...) float32 (float64 for float64 hidden); with
        ``return_entropy`` the tuple (logp, entropy).
    """
    _check_head(hidden, weight, bias, labels)
    temperature = check_positive("temperature", temperature)
    ignore_index = check_int("ignore_index", ignore_index)
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"ignore_index: must fit in int64, got {ignore_index}")
    vocab = weight.shape[0]
    if vocab_parallel_group is None and vocab_start is not None:
        raise ValueError("vocab_start: only with vocab_parallel_group")
    if labels.is_cuda and checks_enabled() and vocab_parallel_group is None:
        check_labels_in_range(labels, vocab, ignore_index)
    shape = labels.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1).to(torch.int64)
    chunk_bytes = _check_chunk_bytes(chunk_bytes, flat_labels.numel(), vocab)
    if vocab_parallel_group is not None:
        from .vocab_parallel import logprobs_from_hidden_vp

        if min_logit is not None:
            raise ValueError("min_logit: not with vocab_parallel_group")
        logp, entropy = logprobs_from_hidden_vp(flat_hidden, weight, bias, flat_labels, vocab_parallel_group,
                                                vocab_start, temperature, ignore_index, bool(return_entropy),
                                                chunk_bytes, backend)
    else:
        thr = kept_threshold(hidden, shape, temperature, None, None, None, min_logit, "hf", backend)
        logp, entropy = implementation("logprobs_from_hidden", backend, hidden.device)(
            flat_hidden, weight, bias, flat_labels, temperature, ignore_index, bool(return_entropy), chunk_bytes,
            thr)
    logp = logp.view(shape)
    return (logp, entropy.view(shape)) if return_entropy else logp


@fill_args
def ppo_loss_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    old_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    loss_type: str = "clip",
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    dro_beta: float | None = None,
    cov_ratio: float = 2e-4,
    cov_bounds: tuple[float, float] = (1.0, 5.0),
    kl_cov_coef: float = 1.0,
    generator: torch.Generator | None = None,
    vespo_params: tuple[float, float, float, float] = VESPO_PARAMS,
    agg: str = "token-mean",
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    ref_logp: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    token_weights: Tensor | None = None,
    ratio_level: str = "token",
    chunk_bytes: int | None = None,
    grad_in_forward: bool | None = None,
    min_logit: float | Tensor | None = None,
    vocab_parallel_group=None,
    vocab_start: int | None = None,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    return_logp: bool = False,
    backend: str | None = None,
) -> tuple[Tensor, dict[str, Tensor]] | tuple[Tensor, dict[str, Tensor], Tensor]:
    """The PPO policy loss, KL penalty and entropy bonus of ``ppo_loss_from_logits``
    straight from the last hidden state and the LM head, never building the logits.

    ``logp, H = logprobs_from_hidden(hidden, weight, labels, bias=bias,
    temperature=temperature, return_entropy=True)``, then
    ``ppo_loss_from_logprobs(logp, H, ...)``: the same value, gradients and
    stats as ``ppo_loss_from_logits(hidden @ weight.T + bias, ...)``. Extra
    memory is logprobs_from_hidden's (one tile buffer + O(B * T * H)); the
    entropy's gradient is computed only when ``entropy_coef != 0``.

    With a gradient wanted, at ratio_level "token", when a token block's
    whole-vocabulary tile fits ``chunk_bytes`` (default here:
    ``lm_head_plan.loss_chunk_bytes``, 1/16 of the float32 logits within
    [16, 512] MiB: blocks of N / 16 tokens, ``row_block``; on a CPU, for a
    float32/float64 head, at least 128 tokens a block or all of them), and
    outside ``torch.compile``:
    the gradient is computed during the forward, three GEMMs in all (each
    token block's logits once, d hidden, d weight: the loss's per-token
    gradient is known as soon as the block's log-probs are, the aggregation
    being linear) and kept until the backward, which scales it (one backward
    per forward). The weight's gradient (V x H; float32 for a bf16/fp16
    weight over several token blocks) is then held from the forward on.
    Otherwise the backward makes each tile again (four GEMMs). Each token
    block of the three-GEMM path streams the weight and its gradient once
    more, so on a CPU, with a given ``chunk_bytes``, it runs by default only
    where the tokens make one block or blocks of at least
    ``lm_head_plan.MIN_LOSS_ROW_BLOCK`` (80 tokens): below that the four
    GEMMs are faster (N=512, H=256, V=151936 float32, blocks of 31: 1.53 s
    against 2.20 s; benchmarks/bench_lm_head.py --loss). The CPU default
    budget's blocks of 128 tokens cost a fixed 128 x V x 4 bytes (74 MiB at
    V=151936) and take 0.73-0.85x the four GEMMs' time at N=256..1024 (H=256),
    with less extra peak memory.
    A bf16/fp16 head's budget must also hold a float32 V x H buffer (its
    weight gradient's product or accumulator, ``V * H * 4`` bytes; twice that
    where the CPU multiplies float32 copies): at the default budget and a
    real vocabulary it does not, and the four-GEMM path runs, which writes
    the weight gradient in place, rounded once. ``chunk_bytes`` of
    ``V * H * 4`` plus the rows' tiles chooses the three GEMMs, which is
    slower at such budgets: the float32 V x H gradient is read and written
    once per token block (N=1024, H=512, V=151936 bf16 on a 2-core AMX CPU:
    2.0 s and 0.59x the float32 logits in extra peak, against 0.65 s and
    0.20x for the four GEMMs).

    Args:
        hidden: (B, T, H) (or (..., T, H); (N, H) with cu_seqlens); weight
            (V, H); bias (V,) or None.
        labels: (B, T) int64 | int32 (``-100``: ignored, logp = entropy = 0).
        old_logp, advantages: (B, T), as in ``ppo_policy_loss``. old_logp
            None: the log-probs this call computes, detached (on-policy, one
            optimiser step per rollout: every ratio 1, its gradient that of
            logp; TRL's ``old_per_token_logps`` at
            num_iterations=1, Liger's ``old_per_token_logps=None``), which
            saves the caller a pass of the head before the loss.
        temperature: > 0, the logits are divided by it.
        {policy_args}
        {penalty_args}
        chunk_bytes: as in ``logprobs_from_hidden``.
        grad_in_forward: None: the three-GEMM path above where it applies
            and, on a CPU, is faster; True: wherever it applies, whatever the
            block; False: always the four-GEMM backward.
        min_logit: the sampler's kept set, as in ``logprobs_from_hidden``
            (then always logprobs_from_hidden and ppo_loss_from_logprobs).
        vocab_parallel_group, vocab_start: a vocabulary-sharded head, as in
            ``logprobs_from_hidden`` (then always logprobs_from_hidden and
            ppo_loss_from_logprobs, the gradient in the backward).
        {packed_args}
            hidden (N, H) and labels (N,) packed alike; then
            logprobs_from_hidden and ppo_loss_from_logprobs (the gradient in
            the backward).
        return_logp: also return the log-probs of the labels, detached
            (labels' shape; float32, float64 for float64 input): the old
            log-probs where old_logp is None.
        {backend_arg}

    Returns:
        {combined_returns}
        With return_logp, (loss, stats, logp).
    """
    _check_head(hidden, weight, bias, labels)
    if grad_in_forward not in (None, True, False):
        raise ValueError(f"grad_in_forward: expected None, True or False, got {grad_in_forward!r}")
    o = PPOLossOptions.checked(hidden.device, temperature=temperature, clip_low=clip_low, clip_high=clip_high,
                               dual_clip=dual_clip, loss_type=loss_type, tau_pos=tau_pos, tau_neg=tau_neg,
                               dro_beta=dro_beta, cov_ratio=cov_ratio, cov_bounds=cov_bounds,
                               kl_cov_coef=kl_cov_coef, generator=generator, vespo_params=vespo_params, agg=agg,
                               num_tokens=num_tokens, num_seqs=num_seqs, ratio_level=ratio_level, kl_coef=kl_coef,
                               kl_estimator=kl_estimator, entropy_coef=entropy_coef, backend=backend)
    if cu_seqlens is not None:
        if hidden.dim() != 2:
            raise ValueError(f"hidden: expected shape (N, H) with cu_seqlens, got {tuple(hidden.shape)}")
        logp, entropy = logprobs_from_hidden(hidden, weight, labels, bias=bias, temperature=o.temperature,
                                             return_entropy=True, chunk_bytes=chunk_bytes, min_logit=min_logit,
                                             vocab_parallel_group=vocab_parallel_group, vocab_start=vocab_start,
                                             backend=backend)
        loss, stats = _logprobs_loss(logp, entropy, logp.detach() if old_logp is None else old_logp, advantages,
                                     mask, ref_logp, token_weights, cu_seqlens, max_seqlen, o)
        return (loss, stats, logp.detach()) if return_logp else (loss, stats)
    if max_seqlen is not None:
        raise ValueError("max_seqlen: only with cu_seqlens")
    if hidden.dim() < 3:
        raise ValueError("hidden: expected shape (B, T, H) (or (..., T, H); (N, H) with cu_seqlens)")
    _check_policy_inputs("labels", labels.shape, old_logp, advantages, mask, ref_logp, old_optional=True)
    if token_weights is not None:
        check_tensor("token_weights", token_weights, FLOAT_DTYPES)
        check_tokens("labels", labels.shape, token_weights=token_weights)
    plan = None if vocab_parallel_group is not None or min_logit is not None else \
        _grad_in_forward_plan(hidden, weight, bias, labels, o, chunk_bytes, grad_in_forward)
    if plan is None:
        logp, entropy = logprobs_from_hidden(hidden, weight, labels, bias=bias, temperature=o.temperature,
                                             return_entropy=True, chunk_bytes=chunk_bytes, min_logit=min_logit,
                                             vocab_parallel_group=vocab_parallel_group, vocab_start=vocab_start,
                                             backend=backend)
        loss, stats = _combined_loss(logp, entropy, logp.detach() if old_logp is None else old_logp, advantages,
                                     mask, ref_logp, token_weights, o)
    else:
        loss, stats, logp = _ppo_loss_grad_in_forward(hidden, weight, bias, labels, old_logp, advantages, mask,
                                                      ref_logp, token_weights, o, *plan)
    return (loss, stats, logp.detach()) if return_logp else (loss, stats)


def _grad_in_forward_plan(hidden, weight, bias, labels, o: PPOLossOptions, chunk_bytes,
                          grad_in_forward) -> Optional[tuple[str, int]]:
    """(the row kernels, "native" | "triton", and the budget) of the
    three-GEMM path, or None where it does not apply (see ppo_loss_from_hidden)."""
    wanted = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if grad_in_forward is False or not wanted or o.sequence_terms or torch.compiler.is_compiling():
        return None
    rows = {"cpu": "native", "cuda": "native", "triton": "triton"}.get(
        resolve_backend(o.backend, hidden.device, "logprobs_from_hidden"))
    n_rows = labels.numel()
    if rows not in ROWS or n_rows == 0:
        return None
    operand_bytes = tile_bytes(hidden, weight)
    budget = loss_chunk_bytes(n_rows, weight.shape[0], hidden.device.type, *operand_bytes) \
        if chunk_bytes is None else _check_chunk_bytes(chunk_bytes, n_rows, weight.shape[0])
    block = row_block(n_rows, weight.shape[0], budget, *operand_bytes)
    if block == 0:
        return None
    if grad_in_forward is None and hidden.device.type == "cpu" and block < min(n_rows, MIN_LOSS_ROW_BLOCK):
        return None
    return rows, budget


def _ppo_loss_grad_in_forward(hidden, weight, bias, labels, old_logp, advantages, mask, ref_logp, tw,
                              o: PPOLossOptions, rows, chunk_bytes):
    """ppo_loss_from_hidden's three-GEMM path: the loss and stats of the
    composition (``_combined_loss`` on the forward's logp and entropy), the
    gradient from ``loss_grad_in_forward``, and the logp (old_logp None:
    the old log-probs too)."""
    shape = labels.shape
    flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
    acc = acc_dtype(hidden.dtype)
    weights = flat(token_weights(mask, o.agg, o.num_tokens, o.num_seqs, acc))
    old, adv, ref, tw_flat = (flat(t) for t in (old_logp, advantages, ref_logp, tw))
    # Each token's policy term alone: summed ("token-sum", no count), weighted below.
    token_options = o._replace(agg="token-sum", agg_code=1, kernel_num_tokens=None, kernel_num_seqs=None,
                              divisor=None)

    def token_grads(t0: int, t1: int, logp: Tensor, entropy: Tensor):
        # loss = sum_t w_t * loss_t(logp_t) - entropy_coef * sum_t w_t * H_t: each
        # token's term depends on its own logp only.
        x = logp.detach()[None].requires_grad_(True)
        with torch.enable_grad():
            old_block = x.detach() if old is None else old[None, t0:t1]
            total, _ = policy_loss(x, old_block, adv[None, t0:t1], torch.ones_like(x, dtype=torch.bool),
                                   None if tw_flat is None else tw_flat[None, t0:t1], token_options)
            if ref is not None and o.kl_coef != 0:
                total = total + o.kl_coef * kl_penalty(x, ref[None, t0:t1].detach(), estimator=o.kl_estimator,
                                                       backend=o.backend).sum()
            (g,) = torch.autograd.grad(total, x)
        w = weights[t0:t1]
        g = torch.where(w != 0, w * g[0].to(acc), torch.zeros((), dtype=acc, device=w.device))
        return g, (-o.entropy_coef * w if o.entropy_coef != 0 else None)

    need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    with torch.no_grad():
        logp, entropy, gh, gw, gb = lm_head_tiles.loss_grad_in_forward(
            hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1).to(torch.int64), o.temperature,
            -100, chunk_bytes, rows, token_grads, need)
        logp = logp.view(shape)
        loss, stats = _combined_loss(logp, entropy.view(shape), logp if old_logp is None else old_logp, advantages,
                                     mask, ref_logp, tw, o)
    pairs = [(None if gh is None else gh.view(hidden.shape), hidden), (gw, weight)]
    if bias is not None:
        pairs.append((gb, bias))
    return PrecomputedGrad.apply(loss, tuple(pairs), *(x for _, x in pairs)), stats, logp


__all__ = ["default_chunk_bytes", "logprobs_from_hidden", "ppo_loss_from_hidden", "row_block", "tile_plan"]

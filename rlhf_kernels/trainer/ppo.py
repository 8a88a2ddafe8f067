"""PPO for language models with a per-token KL penalty to a frozen reference
policy and the pretraining mix (InstructGPT's PPO-ptx), on transformers models.

One iteration: sample prompts -> generate responses -> no-grad passes for the
rollout log-probs, reference log-probs and values (`logprobs_from_hidden`:
from the last hidden state and the LM head, no (B, T, V) logits) ->
scores (reward model or a Python function) -> KL shaping + GAE + whitening
(`ppo_advantages`) and the adaptive KL coefficient -> `ppo_epochs` over shuffled
mini-batches with gradient accumulation: the clipped policy loss straight from
the hidden state (`ppo_loss_from_hidden`; `ppo_loss_from_logits` with
``fused_lm_head=False`` or the eager backend), the clipped value loss (`ppo_value_loss`),
the entropy bonus and `ptx_coef * mean(log pi(x))` on pretraining batches;
gradient clipping, AdamW and a learning-rate schedule.

Data parallel: under torchrun the policy and critic are wrapped in DDP, and
loss normalisation (global valid-token counts) and advantage whitening
(`process_group`) are global across ranks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import (
    AdaptiveKLController, group_advantages, logprobs_from_hidden, logprobs_from_logits, ppo_advantages,
    ppo_loss_from_hidden, ppo_loss_from_logits, ppo_loss_from_logprobs, ppo_value_loss, rollout_correction,
)
from .._dispatch import canonical_backend
from .config import PPOConfig, adv_estimator, correction_kwargs, objective, truncated, validate_ppo
from .data import (
    Batch, decode_responses, encode_prompts, encode_responses, lm_targets, make_batch,
    response_mask_from_generation,
)
from . import checkpoint, fsdp
from .fsdp import unwrapped as _unwrap
from .models import (
    LMHead, ScalarHeadModel, is_peft, packed_response_hidden, response_logits, sequence_scores,
    with_response_hidden,
)
from .utils import (
    Timer, all_reduce_max, all_reduce_mean, all_reduce_sum, disable_dropout, float32_master, make_optimizer,
    process_group,
)

# (prompt texts, response texts, stopped flags) -> (B,) scores
RewardFn = Callable[[list[str], list[str], list[bool]], Tensor]


@dataclass
class Rollout:
    batch: Batch
    prompts: list[str]
    responses: list[str]
    stopped: list[bool]
    old_logp: Optional[Tensor]  # (B, R) rollout policy log-probs; None: the update's own (old_logp_from_update)
    ref_logp: Tensor  # (B, R)
    old_values: Tensor  # (B, R)
    scores: Tensor  # (B,)
    advantages: Tensor  # (B, R)
    returns: Tensor  # (B, R)
    stats: dict
    # config.rollout_correction: the sampler's log-probs (B, R), the importance
    # weights (the policy loss's token_weights) and the policy loss's mask
    # (the response mask less the rejected tokens); None without it.
    sampler_logp: Optional[Tensor] = None
    is_weights: Optional[Tensor] = None
    loss_mask: Optional[Tensor] = None
    # old_logp None: the update's own log-probs (B, R), detached, written as
    # its micro-batches run; the rollout's statistics of them follow the update.
    update_logp: Optional[Tensor] = None


def _seq_kl(old_logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """(B,) each response's summed k1 KL of the old policy to the reference."""
    return ((old_logp - ref_logp) * mask).sum(1)


def _over_ranks(correction_stats: dict) -> dict:
    """rollout_correction's statistics over the ranks: the largest
    |difference| by max, the means by mean."""
    return {key: all_reduce_max(value) if key == "mismatch/abs_diff_max" else all_reduce_mean(value)
            for key, value in correction_stats.items()}


@contextlib.contextmanager
def _adapters_off(model):
    """``model`` (a PEFT model) with its adapters disabled inside, in eval
    mode (its dropout off), as the frozen reference is."""
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter(), torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def _enable_gradient_checkpointing(model) -> None:
    """transformers' activation checkpointing on a causal LM or on a
    ScalarHeadModel's trunk (non-reentrant: it works with frozen inputs)."""
    target = model.trunk if isinstance(model, ScalarHeadModel) else model
    if not getattr(target, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing: {type(target).__name__} does not support it")
    if hasattr(target, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        target.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _reduce_over_ranks(stats: dict[str, float], shares: set[str], world_size: int, device) -> dict[str, float]:
    """Each rank's update statistics -> global ones, in one all-reduce: the
    `shares` (losses normalised by global counts: each rank holds its share)
    add up over ranks; the other statistics average."""
    if world_size == 1:
        return stats
    keys = sorted(stats)
    packed = torch.tensor([stats[k] * (1.0 if k in shares else 1.0 / world_size) for k in keys],
                          dtype=torch.float64, device=device)
    return dict(zip(keys, all_reduce_sum(packed).tolist()))


logger = logging.getLogger(__name__)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every end-of-sequence id of the model and its tokenizer (an instruct
    checkpoint's generation config often lists several, e.g. <|im_end|> and
    <|endoftext|>), tokenizer's first."""
    ids = [tokenizer.eos_token_id]
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        found = getattr(source, "eos_token_id", None)
        ids += found if isinstance(found, (list, tuple)) else [found]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def sampling_config(model, tokenizer, *, temperature: float, greedy: bool, max_new_tokens: int, top_k: int = 0,
                    top_p: float = 1.0, min_p: float = 0.0):
    """A fresh GenerationConfig that samples exactly from softmax(logits / T)
    of the policy, truncated by top_k / top_p / min_p if given (or takes its
    argmax): none of the logits processors a checkpoint's generation config
    may ship (repetition penalty, min length, its own top-k / top-p, bad
    words, ...), since the old log-probs and the KL are computed for this
    sampler; every EOS id of the model kept."""
    from transformers import GenerationConfig

    sample = dict(do_sample=True, temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                  min_p=float(min_p) if min_p else None) if not greedy else dict(do_sample=False)
    return GenerationConfig(**sample, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=eos_token_ids(model, tokenizer), bos_token_id=tokenizer.bos_token_id)


@contextlib.contextmanager
def _generation_config(model, config):
    """``model.generation_config`` replaced by ``config`` for one generate():
    generate() merges the model's own config into one passed as an argument
    (so a checkpoint's repetition_penalty or min_new_tokens would still
    apply); as the model's config nothing else is merged in."""
    saved = model.generation_config
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = saved


class PPOTrainer:
    """PPO with a separate critic (``config.algo="ppo"``), or GRPO / RLOO
    (group sampling, outcome advantages, no critic).

    Args:
        policy: causal LM being trained (or a PEFT LoRA model of one). ref_policy:
            frozen copy (the SFT model); None with a LoRA policy (its reference: the
            same model with its adapters off).
        value_model: ScalarHeadModel critic (PPO); None for GRPO / RLOO.
        tokenizer: with pad and eos tokens.
        prompt_sampler: ``(n, rng) -> list of prompt texts``.
        reward_model / reward_fn: one of them gives the scores.
        ptx_sampler: ``(n, rng) -> list of (prompt, response)`` pretraining texts,
            used when ``config.ptx_coef > 0``.
        backend: forwarded to every op (``"eager"``: plain PyTorch).
        rollout_engine: a ``VLLMEngine`` (trainer/rollout_engine.py) of the
            policy's checkpoint, with ``config.rollout_engine="vllm"``: it samples
            the policy's rollouts (not the reference's, nor evaluation's), and
            takes the policy's weights before the first rollout and after every
            update.
    """

    def __init__(self, policy, ref_policy, value_model: Optional[ScalarHeadModel], tokenizer, config: PPOConfig, *,
                 prompt_sampler: Callable[[int, random.Random], list[str]],
                 reward_model: Optional[ScalarHeadModel] = None, reward_fn: Optional[RewardFn] = None,
                 ptx_sampler: Optional[Callable[[int, random.Random], list[tuple[str, str]]]] = None,
                 device: str = "cpu", backend: Optional[str] = None, rank: int = 0, world_size: int = 1,
                 rollout_engine=None):
        validate_ppo(config, world_size)
        self.lora = is_peft(policy)
        if self.lora != (ref_policy is None):
            raise ValueError("ref_policy: None exactly when the policy is a PEFT (LoRA) model: its reference is "
                             "the policy with its adapters off")
        if (rollout_engine is None) != (config.rollout_engine == "hf"):
            raise ValueError(f"rollout_engine: config.rollout_engine={config.rollout_engine!r} "
                             f"{'needs an engine' if rollout_engine is None else 'takes none'}")
        if (reward_model is None) == (reward_fn is None):
            raise ValueError("give exactly one of reward_model and reward_fn")
        if config.ptx_coef > 0 and ptx_sampler is None:
            raise ValueError("ptx_coef > 0 needs a ptx_sampler (pretraining batches)")
        if (value_model is None) != (config.algo != "ppo"):
            need = "takes none" if value_model is not None else "needs one"
            raise ValueError(f"value_model: algo {config.algo!r} {need} (PPO has a critic, GRPO and RLOO do not)")
        self.config = config
        self.device = torch.device(device)
        self.backend = canonical_backend(backend)
        self.tokenizer = tokenizer
        self.rank, self.world_size = rank, world_size
        self.prompt_sampler, self.ptx_sampler = prompt_sampler, ptx_sampler
        self.reward_model, self.reward_fn = reward_model, reward_fn
        # Float32 master weights for the models trained.
        self.policy = float32_master(policy, "policy").to(self.device)
        self.value_model = float32_master(value_model, "critic").to(self.device) if value_model is not None else None
        if config.gradient_checkpointing:
            for model in self._trained():
                _enable_gradient_checkpointing(model)
                # It runs only in train mode: the update's dropout goes off
                # instead, unless asked for.
                if not config.dropout_in_update:
                    disable_dropout(model)
        # The frozen models: offloaded ones stay in CPU memory (config.offload).
        self.sharded = config.strategy == "fsdp"
        home = lambda name: torch.device("cpu") if name in config.offload and not self.sharded else self.device  # noqa: E731
        self.ref_policy = None if self.lora else ref_policy.to(home("ref")).eval().requires_grad_(False)
        if reward_model is not None:
            self.reward_model = reward_model.to(home("reward")).eval().requires_grad_(False)
        if self.sharded:
            # FSDP2 on every model: the optimizers below see the sharded
            # parameters. bf16: MixedPrecisionPolicy (bf16 compute, float32
            # gradient reduction and master weights).
            offloaded = {"ref": self.ref_policy, "reward": self.reward_model}
            for model in (self.policy, self.value_model, self.ref_policy, self.reward_model):
                if isinstance(model, torch.nn.Module) and fsdp.decoder_layers(model):
                    fsdp.shard(model, bf16=config.precision == "bf16",
                               offload=any(offloaded[name] is model for name in config.offload))
        elif world_size > 1:
            self.policy = DDP(self.policy)
            if self.value_model is not None:
                self.value_model = DDP(self.value_model)
        steps = config.iterations * config.ppo_epochs * (config.rollout_batch_size // config.mini_batch_size)
        self.policy_opt, self.policy_sched = make_optimizer(self.policy.parameters(), config.policy_optim, steps)
        self.value_opt = self.value_sched = None
        if self.value_model is not None:
            self.value_opt, self.value_sched = make_optimizer(self.value_model.parameters(), config.value_optim,
                                                              steps)
        self.kl_ctl = AdaptiveKLController(config.init_kl_coef, config.target_kl, config.kl_horizon) \
            if config.target_kl is not None else None
        # Each rank draws its own prompts and sampling noise (rank 0 keeps the
        # single-process streams); their states are checkpointed per rank.
        self.data_rng = random.Random(config.seed * 1000 + rank)
        if rank > 0:
            torch.manual_seed(config.seed * 1000 + rank)
        self.iteration = 0
        self._score_moments = torch.zeros(3, dtype=torch.float64)  # count, sum, sum of squares of the scores
        self.timer = Timer()
        self._heads_checked: dict[int, bool] = {}  # id(model) -> fused LM head usable
        # The engine samples for this model only (reference_as_policy swaps
        # self.policy: the reference then samples with its own generate()).
        self._packing_checked = False  # padding_free: the first packed forward is checked against the padded one
        self.rollout_engine, self._engine_policy = rollout_engine, self.policy
        self._engine_stale = rollout_engine is not None  # its weights: the checkpoint's, or a resumed policy's

    # --- rollout -------------------------------------------------------------------

    def _autocast(self):
        """bf16 autocast of the forward passes with ``precision="bf16"`` (under
        FSDP the MixedPrecisionPolicy casts instead)."""
        return fsdp.autocast(self.device, self.config.precision, self.sharded)

    def _frozen(self, name: str):
        """The reference policy ("ref") or the reward model ("reward") on the
        device for the passes inside (config.offload: from CPU memory, and back);
        with LoRA the reference is the policy with its adapters off."""
        if name == "ref" and self.lora:
            return _adapters_off(_unwrap(self.policy))
        model = self.ref_policy if name == "ref" else self.reward_model
        return fsdp.on_device(model, self.device, enabled=name in self.config.offload)

    @contextlib.contextmanager
    def reference_as_policy(self):
        """The reference policy in the policy's place (generate, evaluate: the
        SFT policy's samples and scores), on the device."""
        saved = self.policy
        with self._frozen("ref") as ref:
            self.policy = ref
            try:
                yield
            finally:
                self.policy = saved

    def _trained(self) -> list:
        """The models the update trains: the policy, and the critic (PPO)."""
        return [m for m in (self.policy, self.value_model) if m is not None]

    @property
    def kl_coef(self) -> float | Tensor:
        return self.kl_ctl.value if self.kl_ctl is not None else self.config.init_kl_coef

    @torch.no_grad()
    def generate(self, prompts: list[str], *, temperature: float | None = None, greedy: bool = False,
                 sampler_logp: bool = False, seed: Optional[int] = None):
        """Sample responses: (batch of prompt + response, response texts,
        stopped), and with ``sampler_logp`` the sampler's log-prob of each
        sampled token (B, R), 0 past the response (from generate's processed
        scores, softmax(logits / T): what the sampler drew from). ``seed``: the
        vLLM engine's sampling seed (default: drawn from the data stream); HF
        generate() samples from torch's RNG."""
        cfg = self.config
        model = _unwrap(self.policy)
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, prompts)
        prompt_ids, prompt_mask = prompt_ids.to(self.device), prompt_mask.to(self.device)
        was_training = model.training
        model.eval()
        sampling = sampling_config(model, self.tokenizer, temperature=temperature or cfg.temperature, greedy=greedy,
                                   max_new_tokens=cfg.max_new_tokens, top_k=cfg.top_k, top_p=cfg.top_p,
                                   min_p=cfg.min_p)
        if self.rollout_engine is not None and self.policy is self._engine_policy:
            return self._engine_generate(prompt_ids, prompt_mask, sampling, greedy, sampler_logp, seed)
        with _generation_config(model, sampling), fsdp.gathered(model):
            extra = dict(output_scores=True, return_dict_in_generate=True) if sampler_logp else {}
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **extra)
        model.train(was_training)
        sequences = out.sequences if sampler_logp else out
        responses = sequences[:, prompt_ids.shape[1]:]
        logp = None
        if sampler_logp:
            # The scores are the processed logits: logits / T, then top-k / top-p / min-p as -inf
            # (sampling_config adds no other processor).
            logp = logprobs_from_logits(torch.stack(out.scores, 1).float(), responses, backend=self.backend)
        return self._sampled_batch(prompt_ids, prompt_mask, responses, sampling.eos_token_id, logp)

    def _sampled_batch(self, prompt_ids: Tensor, prompt_mask: Tensor, responses: Tensor, eos_ids: list[int],
                       logp: Optional[Tensor]):
        """generate()'s result from the sampled responses (B, R), either
        sampler's: tokens after the first EOS padded, the batch, the texts, the
        stopped flags and, with the sampler's log-probs ``logp``, those (0 past
        each response)."""
        response_mask, stopped = response_mask_from_generation(responses, eos_ids)
        responses = torch.where(response_mask.bool(), responses, self.tokenizer.pad_token_id)
        batch = make_batch(prompt_ids, prompt_mask, responses, response_mask)
        texts = decode_responses(self.tokenizer, responses.cpu(), response_mask.cpu())
        if logp is None:
            return batch, texts, stopped.tolist()
        return batch, texts, stopped.tolist(), logp * response_mask


    def sync_rollout_engine(self) -> None:
        """The policy's current weights into the rollout engine, if an update
        (or a resume) changed them since it last took them."""
        if self.rollout_engine is not None and self._engine_stale:
            with self.timer.phase("weight_sync", self.device):
                self.rollout_engine.wake_up()
                self.rollout_engine.load_weights(_unwrap(self._engine_policy))
            self._engine_stale = False

    def _engine_generate(self, prompt_ids: Tensor, prompt_mask: Tensor, sampling, greedy: bool, sampler_logp: bool,
                         seed: Optional[int]):
        """generate() through the vLLM engine: the same sampling (temperature,
        max new tokens, every EOS id, nothing from the checkpoint's generation
        config), the responses right-padded as generate() pads them."""
        self.sync_rollout_engine()
        self.rollout_engine.wake_up()
        prompts = [ids[m.bool()].tolist() for ids, m in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        completions = self.rollout_engine.generate(
            prompts, max_new_tokens=sampling.max_new_tokens, temperature=0.0 if greedy else sampling.temperature,
            eos_token_ids=sampling.eos_token_id, seed=self.data_rng.getrandbits(62) if seed is None else seed,
            top_k=self.config.top_k, top_p=self.config.top_p, min_p=self.config.min_p)
        self.rollout_engine.sleep()  # its memory to the log-prob passes and the update (sleep_mode)
        width = max(1, max(len(c.token_ids) for c in completions))
        responses = torch.full((len(prompts), width), self.tokenizer.pad_token_id, dtype=torch.long)
        logp = torch.zeros(len(prompts), width)
        for row, c in enumerate(completions):
            responses[row, :len(c.token_ids)] = torch.tensor(c.token_ids, dtype=torch.long)
            logp[row, :len(c.logprobs)] = torch.tensor(c.logprobs)
        return self._sampled_batch(prompt_ids, prompt_mask, responses.to(self.device), sampling.eos_token_id,
                                   logp.to(self.device) if sampler_logp else None)

    def _truncation(self) -> dict:
        """The sampler's truncation as the log-prob ops take it ({} when off):
        each row's kept set found in the kernels, in the engine's order."""
        cfg = self.config
        if not truncated(cfg):
            return {}
        return dict(top_k=cfg.top_k or None, top_p=cfg.top_p, min_p=cfg.min_p or None,
                    truncation_order="vllm" if self.rollout_engine is not None else "hf")

    def _head(self, model) -> tuple[Optional[LMHead], bool]:
        """(the model's LM head for the fused ops or None: the logits path,
        whether this is its first use: check it). A truncating sampler takes
        the logits path: the kept set needs each whole row."""
        if not self.config.fused_lm_head or self.backend == "eager" or truncated(self.config):
            return None, False
        key = id(model)
        if self._heads_checked.get(key) is False:
            return None, False
        head, reason = LMHead.of(model)
        if head is None:
            logger.warning("fused LM head off for %s: %s; the (B, T, V) logits are built instead",
                           type(_unwrap(model)).__name__, reason)
        first = key not in self._heads_checked
        self._heads_checked[key] = head is not None
        return head, first

    def _token_logprobs(self, model, input_ids: Tensor, attention_mask: Tensor, prompt_len: int, labels: Tensor,
                        temperature: float = 1.0, return_entropy: bool = False):
        """logprobs_from_hidden on the last hidden state, or logprobs_from_logits."""
        head, first = self._head(model)
        if head is None:
            logits = response_logits(model, input_ids, attention_mask, prompt_len)
            return logprobs_from_logits(logits, labels, temperature=temperature, return_entropy=return_entropy,
                                        backend=self.backend, **self._truncation())
        return with_response_hidden(
            model, input_ids, attention_mask, prompt_len, check=first,
            op=lambda hidden, head: logprobs_from_hidden(
                hidden, head.weight, labels, bias=head.bias, temperature=temperature / head.logit_scale,
                return_entropy=return_entropy, backend=self.backend))

    @torch.no_grad()
    def _logprobs(self, model, batch: Batch) -> Tensor:
        return self._token_logprobs(model, batch.input_ids, batch.attention_mask, batch.prompt_len,
                                    batch.response_labels, temperature=self.config.temperature)

    @torch.no_grad()
    def _values(self, batch: Batch) -> Tensor:
        values = _unwrap(self.value_model)(batch.input_ids, batch.attention_mask)
        # The value of the state before each response token.
        return values[:, batch.prompt_len - 1 : -1] * batch.response_mask

    @torch.no_grad()
    def score(self, batch: Batch, prompts: list[str], responses: list[str], stopped: list[bool]) -> Tensor:
        """(B,) float32 scores of the responses: the reward function's or the
        reward model's, minus config.reward_bias, minus
        config.missing_eos_penalty where a response has no EOS."""
        cfg = self.config
        if self.reward_fn is not None:
            scores = torch.as_tensor(self.reward_fn(prompts, responses, stopped)).to(self.device, torch.float32)
            if scores.shape != (len(responses),):
                raise ValueError(f"reward function: returned shape {tuple(scores.shape)}, expected "
                                 f"({len(responses)},), one score per response")
        else:
            with self._frozen("reward") as rm:
                scores = self._in_rows(lambda b: sequence_scores(rm, b.input_ids, b.attention_mask), batch)
        if cfg.reward_bias:
            scores = scores - cfg.reward_bias
        if cfg.reward_running_whiten:
            scores = self._running_whiten(scores)
        if cfg.missing_eos_penalty:
            cut = ~torch.tensor(stopped, dtype=torch.bool, device=scores.device)
            scores = scores - cfg.missing_eos_penalty * cut.to(scores.dtype)
        return scores

    def _running_whiten(self, scores: Tensor) -> Tensor:
        """(s - mean) / std with the running moments of every score so far,
        this batch's included (all ranks'; float64, one all-reduce)."""
        batch = torch.stack([torch.tensor(float(scores.numel()), device=scores.device, dtype=torch.float64),
                             scores.double().sum(), scores.double().square().sum()])
        self._score_moments = self._score_moments.to(scores.device) + all_reduce_sum(batch)
        count, total, total_sq = self._score_moments
        mean = total / count
        var = (total_sq / count - mean * mean).clamp(min=0) * count / (count - 1).clamp(min=1)
        return ((scores.double() - mean) / torch.sqrt(var + 1e-8)).float()

    def _in_rows(self, fn: Callable[[Batch], Tensor], batch: Batch) -> Tensor:
        """fn over row chunks of ``forward_batch_size`` sequences (default: the
        update's micro-batch), concatenated: the no-grad passes never hold the
        activations of the whole rollout batch."""
        cfg = self.config
        rows = cfg.forward_batch_size or cfg.mini_batch_size // cfg.grad_accum_steps
        n = batch.input_ids.shape[0]
        if n <= rows:
            return fn(batch)
        return torch.cat([fn(batch.select(torch.arange(i, min(i + rows, n), device=batch.input_ids.device)))
                          for i in range(0, n, rows)])

    def _eval_mode(self) -> None:
        """Rollout and evaluation without dropout: the old log-probs and values
        the update compares against, and the reference log-probs, all come from
        deterministic passes."""
        for model in self._trained():
            model.eval()

    @torch.no_grad()
    def rollout(self) -> Rollout:
        cfg = self.config
        self._eval_mode()
        with self.timer.phase("rollout", self.device), self._autocast():
            if cfg.algo == "ppo":
                prompts = self.prompt_sampler(cfg.rollout_batch_size, self.data_rng)
            else:  # group sampling: each prompt group_size times, consecutive
                drawn = self.prompt_sampler(cfg.rollout_batch_size // cfg.group_size, self.data_rng)
                prompts = [p for p in drawn for _ in range(cfg.group_size)]
            rc = cfg.rollout_correction
            sampler_logp = None
            if rc.enabled() or self.rollout_engine is not None:
                batch, responses, stopped, sampler_logp = self.generate(prompts, sampler_logp=True)
            else:
                batch, responses, stopped = self.generate(prompts)
            if rc.bypass_mode:  # the sampler's log-probs stand for the policy's: no recompute forward
                old_logp = sampler_logp
            elif self.old_logp_from_update():
                old_logp = None
            else:
                old_logp = self._in_rows(lambda b: self._logprobs(_unwrap(self.policy), b), batch)
            with self._frozen("ref") as ref:
                ref_logp = self._in_rows(lambda b: self._logprobs(ref, b), batch)
            old_values = self._in_rows(self._values, batch) if self.value_model is not None else \
                torch.zeros_like(ref_logp)
        with self.timer.phase("scoring", self.device):
            scores = self.score(batch, prompts, responses, stopped)
        with self.timer.phase("advantages", self.device):
            if cfg.algo == "ppo":
                adv = ppo_advantages(
                    scores, old_logp, ref_logp, old_values, batch.response_mask, kl_coef=self.kl_coef,
                    estimator=cfg.kl_estimator, gamma=cfg.gamma, lam=cfg.lam, whiten=cfg.whiten_advantages,
                    process_group=process_group(), backend=self.backend,
                )
                advantages, returns, kl_sum_mean = adv.advantages, adv.returns, adv.kl_sum_mean
            else:
                advantages, kl_sum_mean = self._outcome_advantages(scores, old_logp, ref_logp, batch.response_mask)
                returns = torch.zeros_like(advantages)
        kl_coef_used = float(self.kl_coef)
        if self.kl_ctl is not None:
            self.kl_ctl.update(kl_sum_mean, cfg.rollout_batch_size * self.world_size)
        lengths = batch.response_mask.sum(1)
        stats = {
            "reward": all_reduce_mean(scores.mean()),
            "kl": kl_sum_mean,
            "kl_coef": kl_coef_used,
            "response_length": all_reduce_mean(lengths.mean()),
            "stopped_frac": all_reduce_mean(torch.tensor(sum(stopped) / len(stopped), device=self.device)),
            "tokens": all_reduce_sum(lengths.sum()),
        }
        is_weights = loss_mask = None
        if sampler_logp is not None and old_logp is not None:
            # The trainer's old log-probs against the sampler's (in bypass mode the
            # same tensor: the statistics are then 0 and the weights 1).
            with self.timer.phase("rollout_correction", self.device):
                corr = self._correction(old_logp, sampler_logp, batch.response_mask)
            if rc.rollout_is is not None:
                is_weights = corr.weights
            if rc.rollout_rs is not None:
                loss_mask = corr.mask.to(batch.response_mask.dtype)
            stats.update(_over_ranks(corr.stats))
        return Rollout(batch, prompts, responses, stopped, old_logp, ref_logp, old_values, scores,
                       advantages, returns, stats, sampler_logp, is_weights, loss_mask)

    def _outcome_advantages(self, scores: Tensor, old_logp: Tensor, ref_logp: Tensor, mask: Tensor):
        """GRPO / RLOO: one advantage per response, from its group of
        group_size consecutive responses, on every token of the response.
        GRPO: (s - mean) / (std + eps) of the scores; its KL to the reference
        is a k3 term of the loss (Shao et al., 2024). RLOO: the score minus
        kl_coef times the response's summed k1 KL, minus the mean of the
        group's other members (Ahmadian et al., 2024). Returns (advantages,
        the mean summed k1 KL per response, over ranks)."""
        cfg = self.config
        # old_logp None (old_logp_from_update, GRPO): the KL statistic comes from the update.
        seq_kl = None if old_logp is None else _seq_kl(old_logp, ref_logp, mask)
        if cfg.algo == "rloo":
            scores = scores - float(self.kl_coef) * seq_kl
        mode = adv_estimator(cfg)
        outcome = group_advantages(scores, cfg.group_size, mode=mode,
                                   lengths=mask.sum(1).to(scores.dtype) if mode == "opo" else None)
        return outcome.unsqueeze(1) * mask, None if seq_kl is None else all_reduce_mean(seq_kl.mean())

    def _correction(self, old_logp: Tensor, sampler_logp: Tensor, mask: Tensor):
        """rollout_correction of the old log-probs against the sampler's, as configured."""
        return rollout_correction(old_logp, sampler_logp, mask.bool(), backend=self.backend,
                                  **correction_kwargs(self.config.rollout_correction))

    def old_logp_from_update(self) -> bool:
        """Whether the update's own log-probs, detached, stand for the old
        ones (config.old_logp_from_update; the conditions under which they are
        the same values)."""
        cfg, rc = self.config, self.config.rollout_correction
        return (cfg.old_logp_from_update and cfg.algo == "grpo" and cfg.ppo_epochs == 1
                and cfg.mini_batch_size == cfg.rollout_batch_size
                and self.kl_ctl is None and not cfg.dropout_in_update
                and not rc.bypass_mode and rc.rollout_is is None and rc.rollout_rs is None)

    # --- update --------------------------------------------------------------------

    def _ptx_loss(self) -> Tensor:
        """-ptx_coef * mean log pi(x) over the tokens of a pretraining batch."""
        cfg = self.config
        examples = self.ptx_sampler(cfg.ptx_batch_size, self.data_rng)
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, [p for p, _ in examples])
        resp_ids, resp_mask = encode_responses(self.tokenizer, [r for _, r in examples], [True] * len(examples))
        batch = make_batch(prompt_ids, prompt_mask, resp_ids, resp_mask).to(self.device)
        # Every real token after a row's first is predicted (prompt and response alike).
        ids, attn = batch.input_ids, batch.attention_mask
        labels, mask = lm_targets(ids, attn)
        logp = self._token_logprobs(_unwrap(self.policy), ids, attn, 1, labels)
        return -cfg.ptx_coef * (logp * mask).sum() / mask.sum().clamp_min(1)

    def _micro_step(self, r: Rollout, idx: Tensor, counts: dict, with_ptx: bool) -> dict:
        """counts: the global normalisers of this step, policy loss ("num_tokens",
        "num_seqs": over its mask) and value loss ("value_tokens", "value_seqs")."""
        cfg = self.config
        batch = r.batch.select(idx)
        # The policy loss's mask: the response mask less the rejected tokens
        # (config.rollout_correction.rollout_rs); the value loss keeps every token.
        mask = batch.response_mask if r.loss_mask is None else r.loss_mask[idx]
        num_tokens, num_seqs = counts["num_tokens"], counts["num_seqs"]
        # DDP averages gradients over ranks; the losses are normalised by global
        # counts, so scale by the world size to get their gradient sum.
        scale = float(self.world_size)
        loss_type, agg = objective(cfg)
        common = dict(clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip, agg=agg,
                      loss_type=loss_type, tau_pos=cfg.tau_pos, tau_neg=cfg.tau_neg,
                      vespo_params=tuple(cfg.vespo_params), dro_beta=cfg.dro_beta, num_tokens=num_tokens,
                      num_seqs=num_seqs, backend=self.backend,
                      token_weights=None if r.is_weights is None else r.is_weights[idx])
        # GRPO: the KL to the reference as a k3 term of the loss (PPO and RLOO
        # put it in the rewards).
        kl_term = dict(ref_logp=r.ref_logp[idx], kl_coef=float(self.kl_coef), kl_estimator="k3") \
            if cfg.algo == "grpo" else {}
        head, first = self._head(self.policy) if cfg.fused_loss else (None, False)
        stats = {}
        own_old = r.old_logp is None  # old_logp_from_update: the policy has not moved since the rollout
        if cfg.padding_free:
            if head is None:
                raise ValueError("padding_free: needs the fused LM head (fused_loss and fused_lm_head on, a "
                                 "Linear head, a backend other than eager)")
            packed = packed_response_hidden(self.policy, batch.input_ids, batch.attention_mask, batch.prompt_len,
                                            check=not self._packing_checked)
            self._packing_checked = True
            v = packed.valid
            packed_common = dict(common, token_weights=None if r.is_weights is None else r.is_weights[idx][v])
            packed_kl = {**kl_term, "ref_logp": kl_term["ref_logp"][v]} if kl_term else {}
            pg_loss, pg_stats, *own = ppo_loss_from_hidden(
                packed.hidden, head.weight, batch.response_labels[v], None if own_old else r.old_logp[idx][v],
                r.advantages[idx][v], mask[v], bias=head.bias, temperature=cfg.temperature / head.logit_scale,
                entropy_coef=cfg.entropy_coef, cu_seqlens=packed.cu_seqlens, max_seqlen=v.shape[1],
                return_logp=own_old, **packed_kl, **packed_common)
            if own_old:
                rows = torch.zeros_like(r.update_logp[idx])
                rows[v] = own[0].to(rows.dtype)
                r.update_logp[idx] = rows
            stats["padding_free/tokens_saved_frac"] = 1.0 - packed.tokens / batch.input_ids.numel()
        elif head is not None:  # own_old: the op's own log-probs, detached, as the old ones
            pg_loss, pg_stats, *own = with_response_hidden(
                self.policy, batch.input_ids, batch.attention_mask, batch.prompt_len, check=first,
                op=lambda hidden, head: ppo_loss_from_hidden(
                    hidden, head.weight, batch.response_labels, None if own_old else r.old_logp[idx],
                    r.advantages[idx], mask, bias=head.bias, temperature=cfg.temperature / head.logit_scale,
                    entropy_coef=cfg.entropy_coef, return_logp=own_old, **kl_term, **common))
            if own_old:
                r.update_logp[idx] = own[0].to(r.update_logp.dtype)
        elif cfg.fused_loss and not own_old:
            logits = response_logits(self.policy, batch.input_ids, batch.attention_mask, batch.prompt_len)
            pg_loss, pg_stats = ppo_loss_from_logits(
                logits, batch.response_labels, r.old_logp[idx], r.advantages[idx], mask,
                temperature=cfg.temperature, entropy_coef=cfg.entropy_coef,
                inplace_backward=cfg.logits_grad_inplace, **kl_term, **common, **self._truncation(),
            )
        else:
            logp, entropy = self._token_logprobs(self.policy, batch.input_ids, batch.attention_mask,
                                                 batch.prompt_len, batch.response_labels,
                                                 temperature=cfg.temperature, return_entropy=True)
            old_logp = logp.detach() if own_old else r.old_logp[idx]
            pg_loss, pg_stats = ppo_loss_from_logprobs(logp, entropy, old_logp, r.advantages[idx], mask,
                                                       entropy_coef=cfg.entropy_coef, **kl_term, **common)
            if own_old:
                r.update_logp[idx] = old_logp.to(r.update_logp.dtype)
        total = pg_loss * scale
        if with_ptx:
            # Through the unwrapped model: one backward (and one gradient
            # all-reduce) covers both terms; DDP's average of the local ptx
            # means is the global mean.
            ptx = self._ptx_loss()
            total = total + ptx
            stats["ptx_loss"] = ptx.detach()
        total.backward()
        stats.update(policy_loss=pg_loss.detach())
        if self.value_model is not None:
            values = self.value_model(batch.input_ids, batch.attention_mask)[:, batch.prompt_len - 1 : -1]
            vf_loss, vf_stats = ppo_value_loss(values, r.old_values[idx], r.returns[idx], batch.response_mask,
                                               clip=cfg.value_clip, agg=cfg.loss_agg,
                                               num_tokens=counts["value_tokens"], num_seqs=counts["value_seqs"],
                                               backend=self.backend)
            (cfg.vf_coef * vf_loss * scale).backward()
            stats.update(value_loss=vf_loss.detach(), **{k: v.detach() for k, v in vf_stats.items()})
        # The loss's own "kl" (its KL term, unused here: the KL penalty is in the
        # rewards) must not shadow the rollout's KL.
        stats.update({("kl_loss" if k == "kl" else k): v.detach() for k, v in pg_stats.items()})
        return stats

    def _rollout_stats_from_update(self, r: Rollout) -> None:
        """The rollout's statistics of the old log-probs (its KL to the
        reference; with a sampler's log-probs, the mismatch to them), from the
        update's own (old_logp_from_update: r.update_logp, every row written
        once by the one optimiser step's micro-batches), into r.stats."""
        old_logp, mask = r.update_logp, r.batch.response_mask
        r.stats["kl"] = all_reduce_mean(_seq_kl(old_logp, r.ref_logp, mask).mean())
        if r.sampler_logp is not None:
            r.stats.update(_over_ranks(self._correction(old_logp, r.sampler_logp, mask).stats))

    def update(self, r: Rollout) -> dict:
        """ppo_epochs passes over the rollout in shuffled mini-batches, one
        optimiser step each, accumulating gradients over micro-batches."""
        cfg = self.config
        n = r.batch.input_ids.shape[0]
        micro = cfg.mini_batch_size // cfg.grad_accum_steps
        shuffle = torch.Generator().manual_seed(self.data_rng.randrange(2**62))
        # Losses add up over the micro-batches of a step (they are normalised by
        # the step's global counts; so are the policy loss's entropy and KL
        # terms); statistics average.
        summed = {"policy_loss", "value_loss", "ptx_loss", "entropy", "kl_loss"}
        totals: dict[str, float] = {}
        steps = 0
        model_state_mb = None
        # Dropout off by default (ratio exactly 1 before the first step, as TRL's
        # disable_dropout); config.dropout_in_update turns it on. Gradient
        # checkpointing runs only in train mode (its models' dropout is off).
        train_mode = cfg.dropout_in_update or cfg.gradient_checkpointing
        for model in self._trained():
            model.train(train_mode)
        if r.old_logp is None:
            r.update_logp = torch.full_like(r.ref_logp, math.nan)
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(n, generator=shuffle).to(self.device)
            for start in range(0, n, cfg.mini_batch_size):
                mb = perm[start : start + cfg.mini_batch_size]
                # Global normalisers of this optimiser step (over micro-batches and ranks).
                counts = {}
                for prefix, m in (("num", r.batch.response_mask if r.loss_mask is None else r.loss_mask),
                                  ("value", r.batch.response_mask)):
                    counts[f"{prefix}_tokens"] = float(all_reduce_sum(m[mb].sum()))
                    counts[f"{prefix}_seqs"] = float(all_reduce_sum((m[mb].sum(1) > 0).sum().float()))
                for k in range(cfg.grad_accum_steps):
                    idx = mb[k * micro : (k + 1) * micro]
                    last = k == cfg.grad_accum_steps - 1
                    with self._maybe_no_sync(not last), self._autocast():
                        stats = self._micro_step(r, idx, counts, with_ptx=cfg.ptx_coef > 0 and k == 0)
                    for key, v in stats.items():
                        weight = 1.0 if key in summed else 1.0 / cfg.grad_accum_steps
                        totals[key] = totals.get(key, 0.0) + float(v) * weight
                grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.policy_optim.max_grad_norm)
                if self.value_model is not None:
                    torch.nn.utils.clip_grad_norm_(self.value_model.parameters(), cfg.value_optim.max_grad_norm)
                if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
                    grad_norm = grad_norm.full_tensor()
                totals["grad_norm"] = totals.get("grad_norm", 0.0) + float(grad_norm)
                optimizers = [o for o in (self.policy_opt, self.value_opt) if o is not None]
                for opt in optimizers:
                    opt.step()
                if model_state_mb is None:
                    # This rank's parameters, gradients and optimizer state, every model it trains.
                    model_state_mb = fsdp.model_state_mb(self._trained(), optimizers)
                for opt, sched in zip(optimizers, (s for s in (self.policy_sched, self.value_sched) if s is not None)):
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                steps += 1
        if r.old_logp is None:
            self._rollout_stats_from_update(r)
        # ptx_loss is each rank's own mean: it averages over ranks.
        totals = {k: v / steps for k, v in totals.items()}
        totals["memory/model_state_mb"] = model_state_mb
        return _reduce_over_ranks(totals, summed - {"ptx_loss"},
                                  self.world_size, self.device)

    def _maybe_no_sync(self, skip_sync: bool):
        """No gradient all-reduce (DDP's no_sync) or reduce-scatter (FSDP) for
        all but the last micro-batch."""
        stack = contextlib.ExitStack()
        if self.sharded:
            for model in self._trained():
                fsdp.set_gradient_sync(model, not skip_sync)
        elif skip_sync and self.world_size > 1:
            for model in self._trained():
                stack.enter_context(model.no_sync())
        return stack

    # --- driver --------------------------------------------------------------------

    def step(self) -> dict:
        start = time.perf_counter()
        r = self.rollout()
        with self.timer.phase("update", self.device):
            update_stats = self.update(r)
        self._engine_stale = self.rollout_engine is not None
        elapsed = time.perf_counter() - start
        stats = {k: float(v) for k, v in r.stats.items()}
        metrics = {"iteration": self.iteration, "adv_estimator": adv_estimator(self.config),
                   "loss_type": self.config.loss_type, **stats, **update_stats,
                   "tokens_per_s": stats["tokens"] / elapsed, "time_s": elapsed,
                   **self.timer.pop(),
                   "lr": self.policy_sched.get_last_lr()[0]}
        self.iteration += 1
        return metrics

    @torch.no_grad()
    def evaluate(self, prompts: list[str], true_score: Callable[[list[str], list[str], list[bool]], Tensor],
                 seed: int = 1234) -> dict:
        """Mean true score of sampled responses on `prompts`, and the KL to the
        reference policy (mean over sequences of the summed k1 estimate)."""
        self._eval_mode()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            batch, texts, stopped = self.generate(prompts, seed=seed)
        logp = self._logprobs(_unwrap(self.policy), batch)
        with self._frozen("ref") as ref_policy:
            ref = self._logprobs(ref_policy, batch)
        kl = ((logp - ref) * batch.response_mask).sum(1).mean()
        return {"true_score": float(true_score(prompts, texts, stopped).mean()), "kl_to_ref": float(kl)}

    # --- checkpoints (checkpoint.py) ------------------------------------------------

    def state_dict(self) -> dict:
        """Everything to resume, DDP or one process (a collective: every rank
        calls it; rank 0 writes it). FSDP trainers checkpoint with ``save``."""
        return checkpoint.state_dict(self)

    def load_state_dict(self, state: dict) -> None:
        """``state_dict``'s inverse (DDP or one process; FSDP: ``load``)."""
        checkpoint.load_state_dict(self, state)

    def save(self, path, extra: dict) -> None:
        """Write a checkpoint (a collective: every rank calls it); see
        ``checkpoint.save`` for the files."""
        checkpoint.save(self, path, extra)

    def load(self, path) -> dict:
        """Resume from ``save``'s checkpoint; returns its ``extra``."""
        return checkpoint.load(self, path)

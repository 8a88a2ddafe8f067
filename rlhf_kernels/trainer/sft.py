"""Supervised fine-tuning: next-token loss on the response tokens only."""

from __future__ import annotations

import random
from typing import Callable

import torch

from .. import logprobs_from_logits
from .._dispatch import canonical_backend
from .config import SFTConfig
from .data import encode_prompts, encode_responses, make_batch
from .models import response_logits
from .fsdp import autocast, data_parallel
from .utils import MetricsLogger, all_reduce_sum, float32_master, make_optimizer, progress_bar


class SFTTrainer:
    """Trains a causal LM on (prompt, response) text pairs; the loss is the mean
    negative log-likelihood of the response tokens (and the EOS that ends them),
    computed by `logprobs_from_logits`. Data-parallel over ``world_size``
    ranks (``strategy`` "ddp" or "fsdp"): each rank draws its own examples,
    and the loss is the mean over every rank's response tokens."""

    def __init__(self, model, tokenizer, config: SFTConfig, *, device: str = "cpu",
                 backend: str | None = None, logger: MetricsLogger | None = None, verbose: bool = True,
                 should_stop: Callable[[], bool] | None = None, rank: int = 0, world_size: int = 1,
                 strategy: str = "ddp"):
        self.rank, self.world_size = rank, world_size
        self.model = data_parallel(float32_master(model, "policy").to(device), strategy, world_size,
                                   config.precision)
        self.sharded = strategy == "fsdp"
        self.tokenizer = tokenizer
        self.config = config
        self.device = torch.device(device)
        self.backend = canonical_backend(backend)
        self.logger = logger
        self.verbose = verbose
        self.should_stop = should_stop or (lambda: False)
        self.optimizer, self.scheduler = make_optimizer(self.model.parameters(), config.optim, config.steps)

    def loss(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, prompts)
        resp_ids, resp_mask = encode_responses(self.tokenizer, responses, [True] * len(responses))
        batch = make_batch(prompt_ids, prompt_mask, resp_ids, resp_mask).to(self.device)
        with autocast(self.device, self.config.precision, self.sharded):
            logits = response_logits(self.model, batch.input_ids, batch.attention_mask, batch.prompt_len)
        logp = logprobs_from_logits(logits, batch.response_labels, backend=self.backend)
        # The global mean: this rank's share of every rank's tokens (the
        # gradient average over ranks then divides by world_size: undone here).
        tokens = batch.response_mask.sum()
        if self.world_size > 1:
            tokens = all_reduce_sum(tokens)
        return -(logp * batch.response_mask).sum() / tokens.clamp_min(1) * self.world_size

    def train(self, sample: Callable[[random.Random], tuple[str, str]]) -> list[dict]:
        """Runs config.steps steps on examples drawn by `sample(rng)`."""
        cfg = self.config
        # Each rank its own examples; rank 0 keeps the single-process stream.
        rng = random.Random(cfg.seed if self.rank == 0 else cfg.seed * 1000 + self.rank)
        self.model.train()
        history = []
        bar = progress_bar(cfg.steps, "sft", self.verbose)
        for step in range(cfg.steps):
            if self.should_stop():
                break
            examples = [sample(rng) for _ in range(cfg.batch_size)]
            loss = self.loss([p for p, _ in examples], [r for _, r in examples])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            global_loss = all_reduce_sum(loss.detach()) / self.world_size if self.world_size > 1 else loss.detach()
            record = {"stage": "sft", "step": step, "loss": float(global_loss)}
            history.append(record)
            if self.logger is not None:
                self.logger.log(record)
            bar.update()
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                bar.set_postfix(loss=f"{record['loss']:.3f}")
        bar.close()
        self.model.eval()
        return history

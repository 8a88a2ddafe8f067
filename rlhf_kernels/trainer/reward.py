"""Reward model on ranked comparisons (InstructGPT): for each prompt, K ranked
responses give all K-choose-2 (winner, loser) pairs in one batch, and the loss
is -mean(log sigmoid(r_w - r_l))."""

from __future__ import annotations

import itertools
import random
from typing import Callable

import torch
import torch.nn.functional as F

from .config import RewardConfig
from .data import encode_prompts, encode_responses, make_batch
from .models import ScalarHeadModel, sequence_scores
from .fsdp import autocast, data_parallel
from .utils import MetricsLogger, all_reduce_mean, float32_master, make_optimizer, progress_bar


def pairwise_loss(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards: (n, K) for K responses per prompt, best first. Returns the mean
    of -log sigmoid(r_w - r_l) over all K-choose-2 pairs of every prompt, and
    the share of pairs ranked right."""
    k = rewards.shape[1]
    pairs = torch.tensor(list(itertools.combinations(range(k), 2)), device=rewards.device)
    diff = rewards[:, pairs[:, 0]] - rewards[:, pairs[:, 1]]
    return -F.logsigmoid(diff).mean(), (diff > 0).float().mean()


class RewardTrainer:
    """The pairwise loss over ranked responses. Data-parallel over
    ``world_size`` ranks (``strategy`` "ddp" or "fsdp"): each rank draws its
    own prompts, the same number per rank, so the gradient average over
    ranks is the global mean's."""

    def __init__(self, model: ScalarHeadModel, tokenizer, config: RewardConfig, *, device: str = "cpu",
                 logger: MetricsLogger | None = None, verbose: bool = True,
                 should_stop: Callable[[], bool] | None = None, rank: int = 0, world_size: int = 1,
                 strategy: str = "ddp"):
        self.rank, self.world_size = rank, world_size
        self.model = data_parallel(float32_master(model, "reward model").to(device), strategy, world_size,
                                   config.precision)
        self.sharded = strategy == "fsdp"
        self.tokenizer = tokenizer
        self.config = config
        self.device = torch.device(device)
        self.logger = logger
        self.verbose = verbose
        self.should_stop = should_stop or (lambda: False)
        self.optimizer, self.scheduler = make_optimizer(self.model.parameters(), config.optim, config.steps)

    def rewards(self, examples: list[tuple[str, list[tuple[str, bool]]]]) -> torch.Tensor:
        """(n, K) reward of each ranked response."""
        k = len(examples[0][1])
        prompts = [p for p, ranked in examples for _ in ranked]
        texts = [t for _, ranked in examples for t, _ in ranked]
        stopped = [s for _, ranked in examples for _, s in ranked]
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, prompts)
        resp_ids, resp_mask = encode_responses(self.tokenizer, texts, stopped)
        batch = make_batch(prompt_ids, prompt_mask, resp_ids, resp_mask).to(self.device)
        with autocast(self.device, self.config.precision, self.sharded):
            scores = sequence_scores(self.model, batch.input_ids, batch.attention_mask)
        return scores.view(len(examples), k)

    def train(self, sample: Callable[[int, random.Random], tuple[str, list[tuple[str, bool]]]]) -> list[dict]:
        """config.steps steps; `sample(k, rng)` gives a prompt and k responses, best first."""
        cfg = self.config
        # Each rank its own examples; rank 0 keeps the single-process stream.
        rng = random.Random(cfg.seed if self.rank == 0 else cfg.seed * 1000 + self.rank)
        self.model.train()
        history = []
        bar = progress_bar(cfg.steps, "reward model", self.verbose)
        for step in range(cfg.steps):
            if self.should_stop():
                break
            examples = [sample(cfg.responses_per_prompt, rng) for _ in range(cfg.prompts_per_batch)]
            loss, accuracy = pairwise_loss(self.rewards(examples))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            if self.world_size > 1:
                loss, accuracy = all_reduce_mean(loss.detach()), all_reduce_mean(accuracy)
            record = {"stage": "reward", "step": step, "loss": float(loss.detach()), "pair_accuracy": float(accuracy)}
            history.append(record)
            if self.logger is not None:
                self.logger.log(record)
            bar.update()
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['pair_accuracy']:.2f}")
        bar.close()
        self.model.eval()
        return history

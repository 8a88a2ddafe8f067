"""Text <-> padded token tensors for prompts (left-padded, for generation) and
responses (right-padded, ending with the end-of-sequence token when they stop)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100


@dataclass
class Batch:
    """Prompt + response sequences. The prompt occupies [0, prompt_len) (left
    padded), the response [prompt_len, prompt_len + response_len) (right padded)."""

    input_ids: Tensor  # (B, P + R)
    attention_mask: Tensor  # (B, P + R)
    prompt_len: int
    response_mask: Tensor  # (B, R) float32: 1 on response tokens

    @property
    def responses(self) -> Tensor:
        return self.input_ids[:, self.prompt_len :]

    @property
    def response_labels(self) -> Tensor:
        """Response tokens with IGNORE_INDEX at padding."""
        return torch.where(self.response_mask.bool(), self.responses, torch.full_like(self.responses, IGNORE_INDEX))

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.prompt_len,
                     self.response_mask.to(device))

    def select(self, index: Tensor) -> "Batch":
        return Batch(self.input_ids[index], self.attention_mask[index], self.prompt_len, self.response_mask[index])


def check_tokenizer(tokenizer) -> None:
    """Stop at start-up on a tokenizer the trainers cannot use."""
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "tokenizer: it has no pad token; set one (e.g. tokenizer.pad_token = tokenizer.eos_token) "
            "before training"
        )
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer: it has no end-of-sequence (eos) token")


def encode_prompts(tokenizer, texts: list[str]) -> tuple[Tensor, Tensor]:
    """(B, P) ids and mask, left-padded, each prompt starting with BOS if the
    tokenizer has one (once: a prompt rendered by a chat template that writes
    the BOS itself keeps just that one)."""
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = tokenizer.bos_token_id
        if bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        rows.append(ids)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


def encode_responses(tokenizer, texts: list[str], stopped: list[bool], width: int | None = None) -> tuple[Tensor, Tensor]:
    """(B, R) ids and mask, right-padded; EOS appended to the responses that stopped."""
    rows = []
    for text, stop in zip(texts, stopped):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        rows.append(ids + ([tokenizer.eos_token_id] if stop else []))
    width = max(width or 0, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        r = r[:width]
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def make_batch(prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor) -> Batch:
    return Batch(
        input_ids=torch.cat([prompt_ids, response_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask], dim=1),
        prompt_len=prompt_ids.shape[1],
        response_mask=response_mask.float(),
    )


def response_mask_from_generation(responses: Tensor, eos_ids: int | list[int]) -> tuple[Tensor, Tensor]:
    """(mask, stopped) for generated responses: tokens up to and including the
    first EOS (any of ``eos_ids``; or all tokens when none), and whether an EOS
    was produced."""
    eos = torch.tensor([eos_ids] if isinstance(eos_ids, int) else list(eos_ids), device=responses.device)
    is_eos = torch.isin(responses, eos)
    stopped = is_eos.any(dim=1)
    # Position of the first EOS (or R when none).
    positions = torch.arange(responses.shape[1], device=responses.device)
    first_eos = torch.where(is_eos, positions, responses.shape[1]).min(dim=1).values
    # generate() pads a finished sequence after its EOS; without an EOS every
    # generated token is part of the response.
    mask = positions.unsqueeze(0) <= first_eos.unsqueeze(1)
    return mask.long(), stopped


def decode_responses(tokenizer, responses: Tensor, mask: Tensor) -> list[str]:
    texts = []
    for ids, m in zip(responses.tolist(), mask.tolist()):
        kept = [t for t, keep in zip(ids, m) if keep and t != tokenizer.eos_token_id]
        texts.append(tokenizer.decode(kept, skip_special_tokens=True))
    return texts


def lm_targets(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Next-token targets of a (left-padded) batch: (labels (B, L-1), mask (B, L-1)).
    Position t predicts input_ids[t + 1] when both t and t + 1 are real tokens:
    a row's first real token is never a target (nothing real precedes it)."""
    predicted = (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()
    labels = torch.where(predicted, input_ids[:, 1:], torch.full_like(input_ids[:, 1:], IGNORE_INDEX))
    return labels, predicted.float()


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)

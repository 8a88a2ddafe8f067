"""Text <-> padded token tensors for prompts (left-padded, for generation) and
responses (right-padded, ending with the end-of-sequence token when they stop);
the JSON-lines readers of the commands' data (prompts, SFT examples, rankings,
pretraining texts)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

import torch
from torch import Tensor

from .config import ConfigError

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


# --- the data of the sft / rm / ppo commands ----------------------------------------
# Each source is a JSON-lines file (read here, line by line), or through
# Hugging Face `datasets`: a folder written by save_to_disk, a Parquet / JSON(L)
# file, or a folder of such files. ``columns`` renames the source's columns to
# the keys below ({"chosen": "preferred", ...}: --chosen-column preferred).

DATA_KEYS = ("prompt", "response", "messages", "chosen", "rejected", "responses", "text")
_DATASET_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".arrow": "arrow", ".csv": "csv"}


class Rows(NamedTuple):
    """A source's rows, each with where it sits ("FILE line N", "DIR row N")."""

    rows: list[dict]
    where: list[str]


def _jsonl(path: Path, name: str) -> Rows:
    rows, where = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{name}: {path} line {number} is not JSON: {exc}") from exc
        if not isinstance(row, dict):
            raise ConfigError(f"{name}: {path} line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
        where.append(f"{path} line {number}")
    return Rows(rows, where)


def _dataset(path: Path, name: str, split: str):
    """A `datasets.Dataset` from a save_to_disk folder, a data file or a folder of them."""
    try:
        import datasets
    except ImportError as exc:
        raise ConfigError(f"{name}: {path} is not a JSON-lines file, and reading it needs the `datasets` "
                          "package (pip install datasets)") from exc
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            data = datasets.load_from_disk(str(path))
        else:
            files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.suffix in _DATASET_FORMATS)
            formats = {_DATASET_FORMATS.get(f.suffix) for f in files}
            if not files or len(formats) != 1 or None in formats:
                raise ConfigError(f"{name}: {path}: expected a JSON-lines, JSON, Parquet, Arrow or CSV file, a "
                                  "folder of one of those, or a save_to_disk folder")
            data = datasets.load_dataset(formats.pop(), data_files=[str(f) for f in files])
    except ConfigError:
        raise
    except Exception as exc:  # the reader's own errors: a bad file
        raise ConfigError(f"{name}: {path}: `datasets` could not read it ({type(exc).__name__}: {exc})") from exc
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ConfigError(f"{name}: {path} has no split {split!r} (splits: {', '.join(data)}; --split)")
        data = data[split]
    return data


def read_rows(path: str, name: str, split: str = "train", columns: dict | None = None,
              keys: tuple[str, ...] = DATA_KEYS) -> Rows:
    """The rows of a data source (see above), with the ``columns`` of our
    ``keys`` (those this source is read for) renamed; ConfigError naming the
    flag, the source and, for a missing column, the columns there are."""
    source = Path(path)
    if not source.exists():
        raise ConfigError(f"{name}: {path} does not exist")
    columns = {k: v for k, v in (columns or {}).items() if v and k in keys}
    if source.is_file() and source.suffix == ".jsonl":
        found = _jsonl(source, name)
        if columns:
            missing = sorted({c for c in columns.values() if not any(c in r for r in found.rows)})
            if missing:
                raise ConfigError(f"{name}: {path} has no column {missing[0]!r} on any line")
    else:
        data = _dataset(source, name, split)
        missing = sorted(c for c in columns.values() if c not in data.column_names)
        if missing:
            raise ConfigError(f"{name}: {path} has no column {missing[0]!r} (columns: "
                              f"{', '.join(data.column_names)})")
        found = Rows([dict(r) for r in data], [f"{path} row {i}" for i in range(1, len(data) + 1)])
    if not found.rows:
        raise ConfigError(f"{name}: {path} holds no example")
    if columns:
        found = Rows([{**{k: v for k, v in r.items() if k not in columns.values()},
                       **{key: r.get(col) for key, col in columns.items()}} for r in found.rows], found.where)
    return found


def load_prompts(path: str, tokenizer, split: str = "train", columns: dict | None = None) -> list[str]:
    """Prompt texts from rows of {"prompt": str} or {"messages": [...]}
    (rendered with the tokenizer's chat template, generation prompt added)."""
    data = read_rows(path, "--prompts", split, columns, ("prompt", "messages"))
    return [_prompt_of(row, tokenizer, where, "--prompts") for row, where in zip(*data)]


def _prompt_of(row: dict, tokenizer, where: str, name: str, messages: list | None = None) -> str:
    """A row's prompt: its "prompt" string, or its messages rendered with the
    chat template (generation prompt added)."""
    messages = row.get("messages") if messages is None else messages
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    if isinstance(messages, list):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"{name}: {where} has messages but the tokenizer has no chat template")
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ConfigError(f"{name}: {where}: expected a \"prompt\" string or a \"messages\" list, "
                      f"got columns {sorted(row)}")


def load_sft_data(path: str, tokenizer, split: str = "train", columns: dict | None = None) -> list[tuple[str, str]]:
    """(prompt, response) pairs from {"prompt", "response"} or {"messages"}
    rows (the last message is the response)."""
    examples = []
    for row, where in zip(*read_rows(path, "--data", split, columns, ("prompt", "response", "messages"))):
        if isinstance(row.get("messages"), list) and not isinstance(row.get("response"), str):
            messages = row["messages"]
            last = messages[-1] if messages else None
            if not isinstance(last, dict) or last.get("role") != "assistant":
                raise ConfigError(f"--data: {where}: the last message must be the assistant's response")
            examples.append((_prompt_of({}, tokenizer, where, "--data", messages[:-1]), last["content"]))
        elif isinstance(row.get("response"), str):
            examples.append((_prompt_of(row, tokenizer, where, "--data"), row["response"]))
        else:
            raise ConfigError(f"--data: {where}: expected \"prompt\" and \"response\" strings or a "
                              f"\"messages\" list, got columns {sorted(row)}")
    return examples


def load_rm_data(path: str, tokenizer, split: str = "train",
                 columns: dict | None = None) -> list[tuple[str, list[str]]]:
    """(prompt, responses best first) from {"chosen", "rejected"} or
    {"responses": [...]} rows, every row with the same number."""
    examples = []
    keys = ("prompt", "messages", "chosen", "rejected", "responses")
    for row, where in zip(*read_rows(path, "--data", split, columns, keys)):
        prompt = _prompt_of(row, tokenizer, where, "--data")
        if isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str):
            ranked = [row["chosen"], row["rejected"]]
        elif isinstance(row.get("responses"), list) and all(isinstance(r, str) for r in row["responses"]):
            ranked = row["responses"]
        else:
            missing = [k for k in ("chosen", "rejected") if not isinstance(row.get(k), str)]
            raise ConfigError(f"--data: {where}: expected \"chosen\" and \"rejected\" strings or a "
                              f"\"responses\" list, best first (missing {', '.join(missing)})")
        if len(ranked) < 2:
            raise ConfigError(f"--data: {where}: {len(ranked)} response; a ranking needs at least 2")
        if examples and len(ranked) != len(examples[0][1]):
            raise ConfigError(f"--data: {where} ranks {len(ranked)} responses, the first row "
                              f"{len(examples[0][1])}; every row must rank the same number")
        examples.append((prompt, ranked))
    return examples


def load_texts(path: str, split: str = "train", columns: dict | None = None) -> list[str]:
    """Pretraining texts from rows of {"text": str}."""
    rows, where = read_rows(path, "--ptx-data", split, columns, ("text",))
    bad = [w for row, w in zip(rows, where) if not isinstance(row.get("text"), str)]
    if bad:
        raise ConfigError(f"--ptx-data: {bad[0]}: expected a \"text\" string")
    return [row["text"] for row in rows]

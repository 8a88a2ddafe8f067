"""The commands' data as users keep it: a `datasets` save_to_disk folder
(with splits), a Parquet file, a folder of JSON files, JSON lines, each with
columns renamed by the --<key>-column flags; read end to end through the sft,
rm and ppo commands; bad sources and rows named in the error."""

from __future__ import annotations

import json

import pytest

from rlhf_kernels import cli
from rlhf_kernels.trainer.config import ConfigError
from rlhf_kernels.trainer.data import load_prompts, load_rm_data, load_sft_data, load_texts, read_rows

from qwen_checkpoint import build_checkpoints  # python_tests/trainer is on pytest's sys.path

datasets = pytest.importorskip("datasets")

SFT = {"question": [f"count {i}" for i in range(6)], "answer": ["one two three"] * 6}
RM = {"prompt": [f"q {i}" for i in range(6)], "preferred": ["the sea"] * 6, "worse": ["digits"] * 6}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("data_sources")
    sft = datasets.DatasetDict({"train": datasets.Dataset.from_dict(SFT),
                                "test": datasets.Dataset.from_dict({k: v[:2] for k, v in SFT.items()})})
    sft.save_to_disk(str(root / "sft_disk"))
    datasets.Dataset.from_dict(RM).to_parquet(str(root / "rm.parquet"))
    (root / "prompts").mkdir()
    for part in range(2):
        (root / "prompts" / f"part{part}.json").write_text(
            "".join(json.dumps({"instruction": f"prompt {part}.{i}"}) + "\n" for i in range(2)))
    (root / "ptx.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in ("one two", "three four")))
    return root


class _Tok:
    chat_template = None


def test_every_source_form_reads_with_renamed_columns(sources):
    sft = load_sft_data(str(sources / "sft_disk"), _Tok(), "test", {"prompt": "question", "response": "answer"})
    assert sft == [("count 0", "one two three"), ("count 1", "one two three")]
    rm = load_rm_data(str(sources / "rm.parquet"), _Tok(), columns={"chosen": "preferred", "rejected": "worse"})
    assert rm[0] == ("q 0", ["the sea", "digits"]) and len(rm) == 6
    prompts = load_prompts(str(sources / "prompts"), _Tok(), columns={"prompt": "instruction"})
    assert sorted(prompts) == ["prompt 0.0", "prompt 0.1", "prompt 1.0", "prompt 1.1"]
    assert load_texts(str(sources / "ptx.jsonl"), columns={"text": "body"}) == ["one two", "three four"]


def test_bad_sources_and_rows_are_named(sources, tmp_path):
    cases = [
        (lambda: read_rows(str(tmp_path / "nowhere"), "--data"), "--data: .*nowhere does not exist"),
        (lambda: load_sft_data(str(sources / "sft_disk"), _Tok(), "validation"),
         "has no split 'validation' \\(splits: train, test; --split\\)"),
        (lambda: load_rm_data(str(sources / "rm.parquet"), _Tok(), columns={"chosen": "best"}),
         "rm.parquet has no column 'best' \\(columns: prompt, preferred, worse\\)"),
        (lambda: load_rm_data(str(sources / "rm.parquet"), _Tok()),
         "rm.parquet row 1: expected \"chosen\" and \"rejected\" strings .* \\(missing chosen, rejected\\)"),
        (lambda: load_sft_data(str(sources / "sft_disk"), _Tok()), "sft_disk row 1: expected \"prompt\""),
    ]
    for call, match in cases:
        with pytest.raises(ConfigError, match=match):
            call()


def test_sft_rm_and_ppo_commands_read_datasets(sources, tmp_path):
    paths = build_checkpoints(tmp_path / "ckpt")
    assert cli.main(["sft", "--model", str(paths["policy"]), "--data", str(sources / "sft_disk"), "--split", "test",
                     "--prompt-column", "question", "--response-column", "answer", "--out", str(tmp_path / "sft"),
                     "--steps", "1", "--batch-size", "2"]) == 0
    assert cli.main(["rm", "--model", str(paths["policy"]), "--data", str(sources / "rm.parquet"),
                     "--chosen-column", "preferred", "--rejected-column", "worse", "--out", str(tmp_path / "rm"),
                     "--steps", "1", "--batch-size", "2"]) == 0
    assert cli.main(["ppo", "--policy", str(paths["policy"]), "--reward-model", str(tmp_path / "rm"), "--prompts",
                     str(sources / "prompts"), "--prompt-column", "instruction", "--ptx-data",
                     str(sources / "ptx.jsonl"), "--text-column", "body", "--ptx-coef", "0.1", "--out",
                     str(tmp_path / "ppo"), "--iterations", "1", "--rollout-batch-size", "4",
                     "--max-new-tokens", "3"]) == 0
    assert len((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()) == 1

"""The main-job command and the logprobs benchmark run end to end (tiny shapes)."""

import json

from rlhf_kernels import cli


def test_bench_logprobs_quick_writes_results(tmp_path, capsys):
    assert cli.main(["bench", "--quick", "--only", "logprobs", "--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    files = list(tmp_path.glob("*.jsonl"))
    assert len(files) == 1
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    providers = {r["provider"] for r in rows}
    assert {"eager (TRL/verl)", "torch.compile(reference)", "rlhf_kernels[cpu]"} <= providers
    for row in rows:
        assert row["op"] == "logprobs" and row["median_ms"] > 0 and row["gbps"] > 0
        assert row["device"] and row["torch"] and "git_commit" in row
    assert "provider" in capsys.readouterr().out  # the printed table


def test_info_and_bad_arguments(capsys):
    assert cli.main(["info"]) == 0
    assert "available backends" in capsys.readouterr().out
    try:
        cli.main(["bench", "--only", "nonsense"])
    except SystemExit as exc:
        assert "unknown benchmark" in str(exc)
    else:
        raise AssertionError("an unknown benchmark name must be refused")


def test_bench_trainer_quick(tmp_path, capsys):
    assert cli.main(["bench", "--quick", "--only", "trainer", "--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    rows = [json.loads(line) for f in tmp_path.glob("*.jsonl") for line in f.read_text().splitlines()]
    assert {r["provider"] for r in rows} == {"backend=eager", "backend=kernels"}
    assert {r["mode"] for r in rows} == {"rollout", "scoring", "advantages", "update"}
    assert all(r["median_ms"] > 0 and r["peak_mem_bytes"] > 0 for r in rows)
    assert "speed-up" in capsys.readouterr().out

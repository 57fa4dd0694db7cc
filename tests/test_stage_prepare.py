"""Stage prepare: output contract, schemas, disjoint splits, SFT targets."""

from __future__ import annotations

import json

import polars as pl
import pytest
from stages import prepare

from conftest import params_file
from tracerl.pipeline.artifacts import is_complete, read_metrics
from tracerl.rewards.math_answers import extract_boxed
from tracerl.schemas import read_parquet


def test_prepare_writes_disjoint_splits_and_sft_targets(tmp_path):
    params = params_file(tmp_path / "params.yaml",
                         data={"train_size": 300, "heldout_size": 60, "sft_size": 200,
                               "min_difficulty": 1, "max_difficulty": 3},
                         curriculum={"start_level": 1})
    out = tmp_path / "prepare"
    assert prepare.main(["--params", str(params), "--out", str(out)]) == 0
    assert is_complete(out)
    train = read_parquet(out / "train.parquet", "task")
    held = read_parquet(out / "heldout.parquet", "task")
    assert train.height == 300 and held.height == 60
    assert set(train["split"]) == {"train"} and set(held["split"]) == {"heldout"}
    assert not set(train["prompt"]) & set(held["prompt"])  # disjoint problems
    assert set(train["difficulty"]) <= {1, 2, 3} and set(held["difficulty"]) <= {1, 2, 3}
    sft = pl.read_parquet(out / "sft.parquet")
    assert sft.height == 200 and not set(sft["prompt"]) & set(held["prompt"])
    # every SFT target ends with the boxed true answer of its problem
    for prompt, sol in zip(sft["prompt"], sft["reference_solution"]):
        expr = prompt.removeprefix("What is ").removesuffix("?")
        assert extract_boxed(sol) == str(eval(expr))  # noqa: S307 - generated arithmetic only
    m = read_metrics(out)
    assert m["heldout_tasks"] == 60 and m["sft_examples"] == 200
    assert sum(m[f"heldout_level_{lv}"] for lv in (1, 2, 3)) == 60
    assert m["skipped_no_answer"] == 0 and (out / "skipped.jsonl").read_text() == ""


def test_prepare_mixes_answer_only_targets_by_fraction(tmp_path):
    params = params_file(tmp_path / "params.yaml",
                         data={"train_size": 50, "heldout_size": 20, "sft_size": 400,
                               "min_difficulty": 1, "max_difficulty": 1,
                               "sft_style": "worked", "sft_answer_fraction": 0.25},
                         curriculum={"start_level": 1})
    out = tmp_path / "prepare"
    assert prepare.main(["--params", str(params), "--out", str(out)]) == 0
    sft = pl.read_parquet(out / "sft.parquet")
    answer = sft.filter(pl.col("style") == "answer")
    worked = sft.filter(pl.col("style") == "worked")
    assert answer.height + worked.height == 400 and 70 <= answer.height <= 130
    assert all(s.startswith("\\boxed{") for s in answer["reference_solution"])
    # level 1 worked targets go column by column: units, then tens with the carry
    assert all(s.count("=") == 2 and not s.startswith("\\boxed") for s in worked["reference_solution"])
    assert read_metrics(out)["sft_answer_only"] == answer.height


def _task_files(tmp_path):
    """A train JSONL with every kind of bad record, and a clean held-out JSONL."""
    good = [{"task_id": f"t{i}", "prompt": f"What is {i}+{i}?", "answer": str(2 * i)}
            for i in range(12)]
    lines = [json.dumps(r).encode() for r in good]
    lines.insert(3, b'{"task_id": "latin1", "prompt": "caf\xe9?", "answer": "1"}')
    lines.insert(5, json.dumps({"task_id": "no-answer", "prompt": "What is 1+2?"}).encode())
    lines.insert(7, json.dumps({"task_id": "long", "prompt": "What is " + "1+" * 300 + "1?",
                                "answer": "301"}).encode())
    lines.insert(9, json.dumps({"task_id": "leak", "prompt": "What is 50+50?",
                                "answer": "100"}).encode())
    (tmp_path / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    held = [{"task_id": f"h{i}", "prompt": f"What is {i}*{i}?", "answer": str(i * i)}
            for i in range(5)] + [{"task_id": "h-leak", "prompt": "What is 50+50?", "answer": "100"}]
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))


def test_prepare_reads_task_files_and_skips_bad_records_by_task_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths: from the folder the pipeline runs in
    _task_files(tmp_path)
    data = {"generator": "file", "train_file": "train.jsonl", "heldout_file": "heldout.jsonl",
            "train_size": 100, "heldout_size": 100, "sft_size": 8, "max_skip_fraction": 0.25}
    params = params_file(tmp_path / "params.yaml", data=data)
    out = tmp_path / "prepare"
    assert prepare.main(["--params", str(params), "--out", str(out)]) == 0
    train = read_parquet(out / "train.parquet", "task")
    held = read_parquet(out / "heldout.parquet", "task")
    # the over-long prompt stays (later stages skip it under the budget then in force)
    assert train["task_id"].to_list() == [f"t{i}" for i in range(5)] + ["long"] + [
        f"t{i}" for i in range(5, 12)]
    assert held.height == 6 and set(held["split"]) == {"heldout"}
    sft = pl.read_parquet(out / "sft.parquet")
    assert sft.height == 8 and set(sft["task_id"]) <= {"long", *(f"t{i}" for i in range(12))}
    for prompt, sol in zip(sft["prompt"], sft["reference_solution"]):
        assert extract_boxed(sol) == str(eval(prompt[8:-1]))  # noqa: S307 - our digits
    m = read_metrics(out)
    assert (m["skipped_not_utf8"], m["skipped_no_answer"], m["skipped_in_heldout"],
            m["train_tasks"]) == (1, 1, 1, 13)
    assert "skipped_too_long" not in m  # kept here; rollout and evaluate skip and count it
    skipped = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert {(e["reason"], e["task_id"]) for e in skipped} == {
        ("not_utf8", None), ("no_answer", "no-answer"), ("in_heldout", "leak")}
    assert next(e for e in skipped if e["reason"] == "not_utf8")["where"] == "train.jsonl line 4"

    # past the threshold the stage fails before writing anything, naming file and ids
    params_file(tmp_path / "params.yaml", data={**data, "max_skip_fraction": 0.1})
    with pytest.raises(ValueError) as e:
        prepare.main(["--params", str(params), "--out", str(tmp_path / "p2")])
    msg = str(e.value)
    assert "train.jsonl" in msg and "skipped 4 of 22 records" in msg and "long (too_long" in msg
    assert not (tmp_path / "p2").exists()


def test_prepare_names_an_empty_task_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _task_files(tmp_path)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    params = params_file(tmp_path / "params.yaml", data={
        "generator": "file", "train_file": "train.jsonl", "heldout_file": "blank.jsonl"})
    with pytest.raises(ValueError, match="task file blank.jsonl is empty"):
        prepare.main(["--params", str(params), "--out", str(tmp_path / "p")])

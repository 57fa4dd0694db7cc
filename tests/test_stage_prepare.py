"""Stage prepare: output contract, schemas, disjoint splits, SFT targets."""

from __future__ import annotations

import polars as pl
import yaml
from stages import prepare

from tracerl.pipeline.artifacts import is_complete, read_metrics
from tracerl.rewards.math_answers import extract_boxed
from tracerl.schemas import read_parquet


def test_prepare_writes_disjoint_splits_and_sft_targets(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"train_size": 300, "heldout_size": 60,
                                               "sft_size": 200, "min_difficulty": 1,
                                               "max_difficulty": 3},
                                      "curriculum": {"start_level": 1}}))
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


def test_prepare_mixes_answer_only_targets_by_fraction(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"train_size": 50, "heldout_size": 20,
                                               "sft_size": 400, "min_difficulty": 1,
                                               "max_difficulty": 1, "sft_style": "worked",
                                               "sft_answer_fraction": 0.25},
                                      "curriculum": {"start_level": 1}}))
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

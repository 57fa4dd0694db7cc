"""Evaluation: pass@k / avg@k by hand, and the evaluate stage's output contract."""

from __future__ import annotations

import json

import polars as pl
import pytest

from conftest import params_file
from tracerl.evaluation import pass_at_k, summarize


def test_pass_at_k_hand_values():
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(3, 1, 1) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        pass_at_k(2, 3, 1)


def test_summarize_avg_and_pass_at_k():
    # task a: 1 of 2 correct, task b: 0 of 2 -> avg@2 = 1/4; pass@1 = (1/2 + 0)/2; pass@2 = (1+0)/2
    df = pl.DataFrame({"task_id": ["a", "a", "b", "b"], "correct": [True, False, False, False],
                       "response_len": [3, 5, 7, 9], "finish_reason": ["eos"] * 3 + ["length"],
                       "num_forward": [3, 3, 4, 4]})
    m = summarize(df, [1, 2])
    assert m["forward_per_token"] == pytest.approx(14 / 24)  # forwards / response tokens
    assert m["accuracy"] == pytest.approx(0.25)
    assert m["pass@1"] == pytest.approx(0.25) and m["pass@2"] == pytest.approx(0.5)
    assert m["mean_response_tokens"] == 6 and m["length_cut_fraction"] == 0.25


def test_evaluate_stage_records_decoding_config(tmp_path):
    from stages import evaluate, prepare

    params = params_file(
        tmp_path / "params.yaml",
        data={"train_size": 20, "heldout_size": 6, "sft_size": 10},
        rollout={"max_tokens": 8, "batch_size": 8},
        evaluate={"heldout_size": 3, "responses_per_task": 2, "pass_k": [1, 2]})
    prep = tmp_path / "prepare"
    assert prepare.main(["--params", str(params), "--out", str(prep)]) == 0
    out = tmp_path / "eval"
    assert evaluate.main(["--params", str(params), "--out", str(out), "--input", f"data={prep}",
                          "--input", "policy=tiny"]) == 0
    ev = json.loads((out / "eval.json").read_text())["results"]["heldout"]
    assert set(ev) == {"low_confidence_static", "low_confidence_dynamic"}
    for strategy, res in ev.items():
        assert res["decoding"]["strategy"] == strategy  # the config next to its score
        assert res["decoding"]["max_tokens"] == 8 and res["decoding"]["block_size"] == 4
        assert res["tasks"] == 3 and res["responses"] == 6 and 0 <= res["accuracy"] <= 1
        samples = pl.read_parquet(out / f"samples_heldout_{strategy}.parquet")
        assert samples.height == 6 and "correct" in samples.columns
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] == ev["low_confidence_static"]["accuracy"]
    assert "heldout.low_confidence_dynamic.pass@2" in metrics
    # accuracy per difficulty level: the levels of the scored tasks, weighted back to the total
    held = pl.read_parquet(prep / "heldout.parquet").head(3)
    samples = pl.read_parquet(out / "samples_heldout_low_confidence_static.parquet").join(
        held.select("task_id", "difficulty"), on="task_id")
    res = ev["low_confidence_static"]
    by_level = {f"level{d}_accuracy": g["correct"].mean()
                for (d,), g in samples.group_by("difficulty")}
    assert {k: res[k] for k in res if k.startswith("level")} == pytest.approx(by_level)
    assert metrics.keys() >= {f"heldout.low_confidence_static.{k}" for k in by_level}


def test_evaluate_stage_skips_an_overlong_prompt_by_task_id(tmp_path):
    from stages import evaluate

    from tracerl.data import TaskRecord, tasks_to_frame
    from tracerl.schemas import write_parquet

    prep = tmp_path / "prepare"
    prep.mkdir()
    held = [TaskRecord("h0", "What is 1+1?", "arithmetic", "2", split="heldout"),
            TaskRecord("h-long", "What is " + "1+" * 60 + "1?", "arithmetic", "61",
                       split="heldout"),
            TaskRecord("h1", "What is 2+2?", "arithmetic", "4", split="heldout")]
    write_parquet(tasks_to_frame(held), prep / "heldout.parquet", "task")
    small = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
             "intermediate_size": 64, "max_position_embeddings": 96}
    argv = ["--input", f"data={prep}", "--input", "policy=tiny"]
    params = params_file(tmp_path / "params.yaml", model=small, rollout={"max_tokens": 8},
                         data={"max_difficulty": 0, "max_skip_fraction": 0.5},
                         evaluate={"strategies": ["low_confidence_static"]})
    out = tmp_path / "eval"
    assert evaluate.main(["--params", str(params), "--out", str(out), *argv]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["heldout.skipped_too_long"] == 1 and m["heldout.low_confidence_static.tasks"] == 2
    (entry,) = [json.loads(x) for x in (out / "skipped_heldout.jsonl").read_text().splitlines()]
    assert entry["task_id"] == "h-long"
    params_file(params, model=small, rollout={"max_tokens": 8},
                data={"max_difficulty": 0, "max_skip_fraction": 0.2})
    with pytest.raises(ValueError, match=r"(?s)evaluate heldout: skipped 1 of 3 .*- h-long"):
        evaluate.main(["--params", str(params), "--out", str(tmp_path / "e2"), *argv])


def test_evaluate_stage_at_extra_block_sizes(tmp_path):
    """evaluate.block_sizes: the same tasks decoded at block 8 as well (static, 4 steps per
    block): keys tagged b8, the config recorded, half the denoising forwards per block."""
    from stages import evaluate, prepare

    params = params_file(
        tmp_path / "params.yaml",
        data={"train_size": 20, "heldout_size": 6, "sft_size": 10},
        rollout={"max_tokens": 16, "batch_size": 8},
        evaluate={"heldout_size": 3, "strategies": ["low_confidence_static"],
                  "block_sizes": [4, 8]})
    prep = tmp_path / "prepare"
    assert prepare.main(["--params", str(params), "--out", str(prep)]) == 0
    out = tmp_path / "eval"
    assert evaluate.main(["--params", str(params), "--out", str(out), "--input", f"data={prep}",
                          "--input", "policy=tiny"]) == 0
    ev = json.loads((out / "eval.json").read_text())["results"]["heldout"]
    assert set(ev) == {"low_confidence_static", "b8.low_confidence_static"}  # 4 is in force
    assert ev["b8.low_confidence_static"]["decoding"]["block_size"] == 8
    assert ev["low_confidence_static"]["decoding"]["block_size"] == 4
    m = json.loads((out / "metrics.json").read_text())
    assert m["accuracy"] == ev["low_confidence_static"]["accuracy"]
    assert "heldout.b8.low_confidence_static.forward_per_token" in m
    # block 4 is in force and listed: its scores under the b4 tag too (not decoded twice)
    assert m["heldout.b4.low_confidence_static.accuracy"] == m["accuracy"]
    s4 = pl.read_parquet(out / "samples_heldout_low_confidence_static.parquet")
    s8 = pl.read_parquet(out / "samples_heldout_b8_low_confidence_static.parquet")
    assert (s8["block_size"] == 8).all() and (s4["block_size"] == 4).all()
    # responses that ran to the budget: 16 tokens in 4 blocks x 4 steps vs 2 blocks x 4 steps
    both = s4.join(s8, on=["task_id", "sample_index"], suffix="_8").filter(
        (pl.col("finish_reason") == "length") & (pl.col("finish_reason_8") == "length"))
    assert both.height > 0
    assert (both["num_forward_8"] < both["num_forward"]).all()


def test_evaluate_block_sizes_are_checked_at_load(tmp_path):
    from tracerl.config import ConfigError, load_params

    with pytest.raises(ConfigError, match=r"evaluate: the token budget 40 is not a multiple of "
                                          r"block size 16"):
        load_params(params_file(tmp_path / "p.yaml", evaluate={"block_sizes": [8, 16]}))
    # a fixed evaluation budget must suit the rollout's block too
    with pytest.raises(ConfigError, match=r"the token budget 44 is not a multiple of block "
                                          r"size 8"):
        load_params(params_file(tmp_path / "p.yaml", evaluate={"block_sizes": [8],
                                                               "max_tokens": 44}))
    assert load_params(params_file(tmp_path / "p.yaml", evaluate={"block_sizes": [8, 16],
                                                                  "max_tokens": 48}))

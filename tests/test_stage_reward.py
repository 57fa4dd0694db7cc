"""Reward stage: output contract, metrics, bad input, every group filtered."""

from __future__ import annotations

import json

import polars as pl
import pytest
import yaml
from stages.reward import main

from conftest import params_file
from tracerl.data import TaskRecord, tasks_to_frame
from tracerl.pipeline.artifacts import is_complete, read_metrics
from tracerl.rewards import sandbox
from tracerl.rewards.sandbox import SandboxUnavailable, isolation_problems
from tracerl.schemas import read_parquet, write_parquet

DECODING = {"attention": "block", "block_size": 4, "steps_per_block": 4, "max_tokens": 8,
            "strategy": "low_confidence_static", "dynamic_threshold": 0.9,
            "entropy_bound": 0.35, "temperature": 1.0, "top_k": 0, "top_p": 1.0}

needs_sandbox = pytest.mark.skipif(
    bool(isolation_problems()),
    reason="the code sandbox's isolation is missing here: " + "; ".join(isolation_problems()))


def _rollouts(rows):
    """rows: (task_id, text, finish_reason, n_tokens)."""
    return pl.DataFrame({
        "task_id": [r[0] for r in rows],
        "sample_index": [i % 4 for i in range(len(rows))],
        "prompt_ids": [[1, 2, 3]] * len(rows),
        # id lists run to the end of the last block (2 positions past EOS here)
        "response_ids": [list(range(r[3] + 2)) for r in rows],
        "decode_steps": [list(range(1, r[3] + 3)) for r in rows],
        "logprobs": [[-0.1] * (r[3] + 2) for r in rows],
        "response_len": [r[3] for r in rows],
        "finish_reason": [r[2] for r in rows],
        "num_forward": [4] * len(rows),
        **{k: [v] * len(rows) for k, v in DECODING.items()},
        "policy_id": ["p0"] * len(rows),
        "response_text": [r[1] for r in rows],
    })


def _write(tmp_path, rollouts, tasks, params="reward:\n  group_filter: zero_variance\n"):
    params_file(tmp_path / "params.yaml", **yaml.safe_load(params))
    write_parquet(rollouts, tmp_path / "rollouts.parquet", "rollout")
    write_parquet(tasks_to_frame(tasks), tmp_path / "tasks.parquet", "task")
    return ["--params", str(tmp_path / "params.yaml"), "--rollouts", str(tmp_path / "rollouts.parquet"),
            "--tasks", str(tmp_path / "tasks.parquet"), "--out", str(tmp_path / "reward")]


TASKS = [
    TaskRecord("a", "What is 2+2?", "arithmetic", "4", difficulty=0),
    TaskRecord("b", "What is 3*3?", "arithmetic", "9", difficulty=4),
    TaskRecord("c", "Write add", "local", tests={"method": "function",
                                                  "tests": ["assert add(1, 2) == 3"]}),
    TaskRecord("bad", "no answer", "local", answer=None),  # neither answer nor tests
]
ADD = "```python\ndef add(a, b):\n    return a + b\n```"


@needs_sandbox
def test_stage_scores_and_writes_the_contract(tmp_path):
    rows = [("a", "2+2=4 \\boxed{4}", "eos", 6)] * 4  # all correct: zero variance
    rows += [("b", "\\boxed{9}", "eos", 4), ("b", "\\boxed{9}", "length", 8),  # overlong: wrong
             ("b", "", "eos", 0), ("b", "\ufffd\ufffd", "eos", 2)]  # empty, undecodable bytes
    rows += [("c", ADD, "eos", 10), ("c", "import sys\nsys.exit(0)", "eos", 5),
             ("c", "```python\nimport os\nos._exit(0)\n```", "eos", 5), ("c", ADD, "eos", 10)]
    rows += [("bad", "\\boxed{1}", "eos", 3), ("ghost", "\\boxed{1}", "eos", 3)]
    assert main(_write(tmp_path, _rollouts(rows), TASKS)) == 0
    out = tmp_path / "reward"
    assert is_complete(out)
    df = read_parquet(out / "scored.parquet", "scored")
    assert df["correct"].to_list() == [True] * 4 + [True, False, False, False] + \
        [True, False, False, True] + [False, False]
    assert df["reward"].to_list()[8:12] == [1.0, 0.0, 0.0, 1.0]
    # group b: rewards [1, 0, 0, 0] -> z = [1.7321, -0.5774, -0.5774, -0.5774]
    assert df["advantage"].to_list()[4:8] == pytest.approx([3**0.5, -(3**-0.5), -(3**-0.5), -(3**-0.5)], abs=1e-5)
    assert df["kept"].to_list() == [False] * 4 + [True] * 8 + [False, False]
    m = read_metrics(out)
    assert m["accuracy"] == pytest.approx(7 / 12)
    assert m["mean_response_tokens"] == pytest.approx(sum(r[3] for r in rows) / len(rows))
    assert m["filtered_group_fraction"] == pytest.approx(1 / 3)
    assert m["zero_variance_fraction"] == pytest.approx(1 / 3)
    assert (m["skipped_invalid_task"], m["skipped_unknown_task"]) == (1, 1)
    assert (m["overlong_responses"], m["empty_responses"]) == (1, 1)
    assert json.loads((out / "manifest.json").read_text())["stage"] == "reward"


def test_every_group_filtered_flows_through(tmp_path):
    rows = [("a", "\\boxed{4}", "eos", 3)] * 4 + [("b", "\\boxed{1}", "eos", 3)] * 4
    assert main(_write(tmp_path, _rollouts(rows), TASKS[:2])) == 0
    df = read_parquet(tmp_path / "reward" / "scored.parquet", "scored")
    train = df.filter(pl.col("kept"))
    assert train.height == 0 and train.schema == df.schema  # an empty, well-typed batch
    m = read_metrics(tmp_path / "reward")
    assert m["filtered_group_fraction"] == 1.0 and m["kept_responses"] == 0


def test_viewer_shows_tasks_answers_and_rewards(tmp_path):
    """trajectory.html: a few tasks (partly right first), each with its gold answer and
    every response's decode order, reward and correctness; the decoding settings."""
    import re

    rows = [("a", "\\boxed{4}", "eos", 3), ("a", "\\boxed{5}", "eos", 3)] * 2
    rows += [("b", "\\boxed{1}", "length", 3)] * 4
    assert main(_write(tmp_path, _rollouts(rows), TASKS[:2])) == 0
    page = (tmp_path / "reward" / "trajectory.html").read_text()
    data = json.loads(re.search(r"const data = (.*);\n", page).group(1))
    assert [(d["task"], d["title"]) for d in data] == [
        ("a", "#0"), ("a", "#1"), ("a", "#2"), ("a", "#3"),  # partly right: shown first
        ("b", "#0"), ("b", "#1"), ("b", "#2"), ("b", "#3")]
    assert [d["correct"] for d in data[:4]] == [True, False, True, False]
    assert [d["reward"] for d in data[:2]] == [1.0, 0.0]
    assert {d["answer"] for d in data} == {"4", "9"} and data[4]["finish"] == "length"
    assert all(len(d["tokens"]) == len(d["steps"]) == 3 for d in data)
    assert "strategy low_confidence_static" in page and 'value="wrong"' in page


def test_accuracy_band_filter_from_params(tmp_path):
    rows = [("a", "\\boxed{4}", "eos", 3)] * 3 + [("a", "\\boxed{5}", "eos", 3)]
    args = _write(tmp_path, _rollouts(rows), TASKS[:1],
                  "reward:\n  group_filter: accuracy_band\n  filter_low: 0.2\n  filter_high: 0.7\n")
    assert main(args) == 0  # accuracy 0.75 > 0.7: dropped
    assert read_metrics(tmp_path / "reward")["filtered_groups"] == 1


def test_bad_params_and_missing_inputs_fail_clearly(tmp_path):
    from tracerl.config import ConfigError

    args = _write(tmp_path, _rollouts([("a", "x", "eos", 1)]), TASKS[:1],
                  "reward:\n  group_filter: sometimes\n")
    with pytest.raises(ConfigError, match="group_filter"):
        main(args)
    params_file(tmp_path / "params.yaml")
    with pytest.raises(FileNotFoundError):
        main(["--params", str(tmp_path / "params.yaml"), "--rollouts", str(tmp_path / "nope.parquet"),
              "--tasks", str(tmp_path / "tasks.parquet"), "--out", str(tmp_path / "o")])


def test_flow_input_contract(tmp_path):
    """The flow passes folders: --input rollout=DIR (rollouts.parquet), --input data=DIR."""
    rows = [("a", "\\boxed{4}", "eos", 4), ("a", "\\boxed{5}", "eos", 4)]
    params_file(tmp_path / "params.yaml", reward={"group_filter": "none"})
    write_parquet(_rollouts(rows), tmp_path / "roll" / "rollouts.parquet", "rollout")
    write_parquet(tasks_to_frame(TASKS[:1]), tmp_path / "prep" / "train.parquet", "task")
    assert main(["--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "reward"),
                 "--input", f"rollout={tmp_path / 'roll'}", "--input", f"data={tmp_path / 'prep'}"]) == 0
    df = read_parquet(tmp_path / "reward" / "scored.parquet", "scored")
    assert df["correct"].to_list() == [True, False]


def test_code_grading_fails_closed_without_isolation(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "isolation_problems", lambda: ("root privileges",))
    rows = [("c", ADD, "eos", 10), ("c", "```python\ndef add(a, b):\n    return 0\n```", "eos", 10)]
    args = _write(tmp_path, _rollouts(rows), TASKS[2:3])
    with pytest.raises(SandboxUnavailable, match="root privileges.*unsafe_allow_unsandboxed_code"):
        main(args)
    params_file(tmp_path / "params.yaml", reward={"unsafe_allow_unsandboxed_code": True})
    assert main(args) == 0
    df = read_parquet(tmp_path / "reward" / "scored.parquet", "scored")
    assert df["correct"].to_list() == [True, False]

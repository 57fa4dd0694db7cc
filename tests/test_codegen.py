"""The ``code`` task generator: prompts, reference programs and hidden tests, graded in
the project's sandbox exactly as real code tasks are."""

from __future__ import annotations

import pytest

from tracerl.data import codegen, generate_tasks, reference_solution
from tracerl.rewards.code import score_code_batch
from tracerl.rewards.sandbox import SandboxLimits, isolation_problems

LIM = SandboxLimits(wall_s=5, cpu_s=4)
needs_sandbox = pytest.mark.skipif(
    bool(isolation_problems()),
    reason="the code sandbox's isolation is missing here: " + "; ".join(isolation_problems()))


@pytest.mark.parametrize(("prompt", "program", "tests"), [
    ("Write a Python function f(x) that returns x*3+2.", "x*3+2", None),
    ("Write a Python function f(s) that returns the last 4 characters of s.", "s[-4:]", None),
    ("Write a Python function f(s) that returns the number of times 'c' appears in s.",
     "s.count('c')", None),
    ("Write a Python function f(xs) that returns xs with each element multiplied by 7.",
     "[v*7 for v in xs]", None),
    ("Write a Python function f(x) that returns x-3 if x is greater than 5, else x+2.",
     "x-3 if x>5 else x+2", ["assert f(6) == 3", "assert f(5) == 7"]),
])
def test_reference_programs_by_hand(prompt, program, tests):
    arg = prompt.split("f(")[1].split(")")[0]
    assert codegen.solution(prompt) == f"```python\ndef f({arg}):\n    return {program}\n```"
    if tests:  # the hand-checked boundary: 5 is not greater than 5
        f = eval(f"lambda {arg}: {program}")  # noqa: S307 - test's own expression
        for t in tests:
            exec(t, {"f": f})  # noqa: S102


def test_tasks_levels_splits_and_hidden_tests():
    for level in codegen.LEVELS:
        tasks = generate_tasks("code", 30, difficulty=level, seed=4)
        assert len(tasks) == 30 and len({t.task_id for t in tasks}) == 30
        for t in tasks:
            assert t.difficulty == level and t.source == "code" and t.answer is None
            assert t.tests["entry_point"] == "f" and len(t.tests["tests"]) == 5
            assert reference_solution(t, "answer") == reference_solution(t) == \
                codegen.solution(t.prompt)
    train = {t.prompt for s in range(3) for t in generate_tasks("code", 200, list(range(5)), s)}
    held = {t.prompt for s in range(3)
            for t in generate_tasks("code", 60, list(range(5)), s, split="heldout")}
    assert train and held and not train & held
    assert generate_tasks("code", 20, [0, 4], 7) == generate_tasks("code", 20, [0, 4], 7)
    with pytest.raises(ValueError, match="code difficulty must be in 0..4"):
        generate_tasks("code", 1, 5)
    assert codegen.solution("What is 2+2?") is None


@needs_sandbox
def test_every_reference_program_passes_its_hidden_tests_and_wrong_ones_fail():
    """Graded by the reward path (extract the fenced program, run the hidden assertions in
    the sandbox): every reference program passes; another task's program, an off-by-one
    constant and a response without code fail."""
    tasks = [t for lv in codegen.LEVELS for t in generate_tasks("code", 8, lv, seed=2)]
    good = [f"Sure.\n{reference_solution(t)}\n" for t in tasks]
    shuffled = [reference_solution(tasks[(i + 9) % len(tasks)]) for i in range(len(tasks))]
    tests = [t.tests for t in tasks]
    scores = score_code_batch(good + shuffled + ["no code here"], tests * 2 + [tests[0]], LIM,
                              workers=4)
    n = len(tasks)
    assert [s.correct for s in scores[:n]] == [True] * n, [
        (t.prompt, s.result) for t, s in zip(tasks, scores) if not s.correct][:3]
    assert sum(s.correct for s in scores[n:2 * n]) <= 2  # another task's program (rarely equal)
    assert not scores[-1].correct and scores[-1].result is None
    wrong = score_code_batch([reference_solution(t).replace("return ", "return 1+", 1)
                              for t in tasks if t.difficulty in (0, 1, 4)],
                             [t.tests for t in tasks if t.difficulty in (0, 1, 4)], LIM, workers=4)
    assert not any(s.correct for s in wrong)


def test_prepare_stage_with_the_code_generator(tmp_path):
    import json

    import polars as pl
    from stages import prepare

    from conftest import params_file
    from tracerl.schemas import read_parquet

    params = params_file(tmp_path / "params.yaml",
                         data={"generator": "code", "min_difficulty": 0, "max_difficulty": 4,
                               "train_size": 40, "heldout_size": 10, "sft_size": 20},
                         rollout={"max_tokens": 64})
    assert prepare.main(["--params", str(params), "--out", str(tmp_path / "p")]) == 0
    sft = pl.read_parquet(tmp_path / "p" / "sft.parquet")
    assert (sft["style"] == "program").all()
    assert sft["reference_solution"].to_list() == [codegen.solution(p) for p in sft["prompt"]]
    train = read_parquet(tmp_path / "p" / "train.parquet", "task")
    held = read_parquet(tmp_path / "p" / "heldout.parquet", "task")
    assert not set(train["prompt"]) & set(held["prompt"])
    tests = json.loads(train["tests"][0])
    assert tests["entry_point"] == "f" and len(tests["tests"]) == 5
    metrics = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert metrics["sft_answer_only"] == 0 and metrics["train_tasks"] == 40


@needs_sandbox
def test_mixed_pool_generates_both_domains_and_scores_them_apart():
    import polars as pl

    from tracerl.rewards.scoring import score_rollouts

    tasks = generate_tasks("mix:arithmetic+code", 9, difficulty=[0, 1], seed=3)
    assert sorted(t.source for t in tasks) == ["arithmetic"] * 5 + ["code"] * 4
    assert tasks == generate_tasks("mix:arithmetic+code", 9, difficulty=[0, 1], seed=3)
    with pytest.raises(ValueError, match="two or more generators"):
        generate_tasks("mix:code", 2)
    # every arithmetic response right, every code response wrong (a program for another
    # task): the per-domain accuracies say so, the total mixes them
    right = {t.task_id: reference_solution(t, "worked") for t in tasks if t.source == "arithmetic"}
    code = [t for t in tasks if t.source == "code"]
    wrong = {t.task_id: "```python\ndef f(x):\n    return 'nope'\n```" for t in code}
    texts = {**right, **wrong}
    frame = pl.DataFrame({"task_id": list(texts), "response_text": list(texts.values()),
                          "finish_reason": ["eos"] * len(texts),
                          "response_len": [10] * len(texts)})
    _, m = score_rollouts(frame, {t.task_id: t for t in tasks}, group_filter="none",
                          code_limits=LIM, code_workers=2)
    assert m["accuracy_arithmetic"] == 1.0 and m["accuracy_code"] == 0.0
    assert m["accuracy"] == pytest.approx(5 / 9) and m["grade_seconds"] > 0

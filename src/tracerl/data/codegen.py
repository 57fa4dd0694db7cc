"""``code``: small procedural programming tasks with hidden tests (offline, deterministic).

Each task asks for a one-line Python function ``f`` and is graded by running hidden
assertions in the project's sandbox (:mod:`tracerl.rewards.sandbox`), exactly as real code
tasks are (``tests = {"method": "function", "tests": [...], "entry_point": "f"}``). The
prompt states the behaviour in words; the tests check it on inputs the prompt never shows.
Levels of increasing difficulty:

| level | form | example prompt (``Write a Python function f(x) that returns ...``) |
|---|---|---|
| 0 | one operation with a constant | ``x+7`` -> ``return x+7`` |
| 1 | two operations | ``x*3+2`` -> ``return x*3+2`` |
| 2 | strings | ``s reversed`` -> ``return s[::-1]`` |
| 3 | lists | ``the largest number in xs`` -> ``return max(xs)`` |
| 4 | a condition | ``x-3 if x is greater than 5, else x+2`` -> ``return x-3 if x>5 else x+2`` |

The reference program (:func:`solution`, the SFT target) is a function of the prompt
alone, like the arithmetic generator's worked solutions. Splits are decided by a hash of
the prompt (about 20 % held out), so held-out problems never appear in training.
"""

from __future__ import annotations

import hashlib
import random
import re

from tracerl.data.records import TaskRecord, draw_distinct

LEVELS = range(5)
HELDOUT_PERCENT = 20
_HEAD = "Write a Python function f({arg}) that returns {what}."
_OPS = {"+": "plus", "-": "minus", "*": "times"}
_LETTERS = "abcdefgh"
_CMP = {">": "greater than", "<": "less than"}

# (prompt text, program body) templates of the string and list levels; {k} is a number,
# {c} a letter
_STRINGS = [
    ("s reversed", "s[::-1]"),
    ("s in upper case", "s.upper()"),
    ("the length of s", "len(s)"),
    ("s repeated {k} times", "s*{k}"),
    ("the first {k} characters of s", "s[:{k}]"),
    ("the last {k} characters of s", "s[-{k}:]"),
    ("the number of times '{c}' appears in s", "s.count('{c}')"),
    ("s followed by '{c}'", "s+'{c}'"),
]
_LISTS = [
    ("the largest number in xs", "max(xs)"),
    ("the smallest number in xs", "min(xs)"),
    ("the sum of xs", "sum(xs)"),
    ("xs sorted", "sorted(xs)"),
    ("the last element of xs", "xs[-1]"),
    ("the number of times {k} appears in xs", "xs.count({k})"),
    ("xs with {k} added to each element", "[v+{k} for v in xs]"),
    ("xs with each element multiplied by {k}", "[v*{k} for v in xs]"),
    ("the first element of xs", "xs[0]"),
]


def _draw(level: int, rng: random.Random) -> tuple[str, str, str]:
    """``(argument, prompt's 'what', program expression)`` of one task at ``level``."""
    r = rng.randint
    if level == 0:
        op = rng.choice(list(_OPS))
        expr = f"x{op}{r(1, 20)}"
        return "x", expr, expr
    if level == 1:
        expr = f"x{rng.choice(list(_OPS))}{r(1, 9)}{rng.choice(list(_OPS))}{r(1, 9)}"
        return "x", expr, expr
    if level == 2:
        what, body = rng.choice(_STRINGS)
        k, c = r(2, 9), rng.choice(_LETTERS)
        return "s", what.format(k=k, c=c), body.format(k=k, c=c)
    if level == 3:
        what, body = rng.choice(_LISTS)
        k = r(1, 9)
        return "xs", what.format(k=k), body.format(k=k)
    if level == 4:
        cmp = rng.choice(list(_CMP))
        t, a, b = r(0, 9), r(1, 9), r(1, 9)
        o1, o2 = rng.choice("+-"), rng.choice("+-")
        what = f"x{o1}{a} if x is {_CMP[cmp]} {t}, else x{o2}{b}"
        return "x", what, f"x{o1}{a} if x{cmp}{t} else x{o2}{b}"
    raise ValueError(f"code difficulty must be in {LEVELS[0]}..{LEVELS[-1]}, got {level}")


_PROMPT_RE = re.compile(r"^Write a Python function f\((x|s|xs)\) that returns (.+)\.$")


def _program(arg: str, what: str) -> str | None:
    """The expression ``f`` returns for the prompt's ``what`` (inverse of :func:`_draw`)."""
    if arg == "x":
        m = re.fullmatch(r"x([+\-])(\d+) if x is (greater|less) than (\d+), else x([+\-])(\d+)",
                         what)
        if m:
            cmp = ">" if m.group(3) == "greater" else "<"
            return (f"x{m.group(1)}{m.group(2)} if x{cmp}{m.group(4)} "
                    f"else x{m.group(5)}{m.group(6)}")
        return what if re.fullmatch(r"x(?:[+\-*]\d+){1,2}", what) else None
    for text, body in _STRINGS if arg == "s" else _LISTS:
        pattern = (re.escape(text).replace(re.escape("{k}"), r"(?P<k>\d+)")
                   .replace(re.escape("{c}"), r"(?P<c>[a-h])"))
        m = re.fullmatch(pattern, what)
        if m:
            return body.format(**m.groupdict())
    return None


def solution(prompt: str) -> str | None:
    """The reference program of a prompt of this generator as a fenced Python block (the
    SFT target); ``None`` if the prompt is not one of this generator's.

    >>> print(solution("Write a Python function f(s) that returns s repeated 3 times."))
    ```python
    def f(s):
        return s*3
    ```
    """
    m = _PROMPT_RE.match(prompt.strip()) if isinstance(prompt, str) else None
    body = _program(m.group(1), m.group(2)) if m else None
    if body is None:
        return None
    return f"```python\ndef f({m.group(1)}):\n    return {body}\n```"


def _inputs(arg: str, rng: random.Random, n: int) -> list:
    if arg == "x":
        return [rng.randint(-20, 30) for _ in range(n)]
    if arg == "s":
        return ["".join(rng.choice(_LETTERS) for _ in range(rng.randint(1, 7)))
                for _ in range(n)]
    return [[rng.randint(0, 9) for _ in range(rng.randint(1, 6))] for _ in range(n)]


def hidden_tests(prompt: str, n: int = 5) -> list[str]:
    """``n`` assertions on inputs the prompt never shows, from a seed of the prompt text
    (the expected values come from the reference program, evaluated here on plain data).

    >>> hidden_tests("Write a Python function f(x) that returns x+7.", 2)
    ['assert f(16) == 23', 'assert f(13) == 20']
    """
    m = _PROMPT_RE.match(prompt.strip())
    if m is None:
        raise ValueError(f"not a code-generator prompt: {prompt!r}")
    arg, body = m.group(1), _program(m.group(1), m.group(2))
    rng = random.Random(f"code-tests|{prompt}")
    ref = eval(f"lambda {arg}: {body}")  # noqa: S307 - the generator's own expression
    out = []
    for v in _inputs(arg, rng, n):
        out.append(f"assert f({v!r}) == {ref(v)!r}")
    return out


def split_of(text: str) -> str:
    """``heldout`` for about 20 % of prompts (by hash), else ``train``."""
    h = int(hashlib.sha256(f"code|{text}".encode()).hexdigest()[:8], 16)
    return "heldout" if h % 100 < HELDOUT_PERCENT else "train"


def generate(n: int, difficulty: int | list[int] = 0, seed: int = 0,
             split: str = "train") -> list[TaskRecord]:
    """``n`` code tasks of the given level(s) from ``split``; deterministic in the
    arguments. Prompts are distinct while the level has enough of them (the string and
    list levels have a few dozen: asking for more repeats them under new ids).

    >>> t = generate(3, [0, 2, 3], seed=1)
    >>> all(x.tests["entry_point"] == "f" and len(x.tests["tests"]) == 5 for x in t)
    True
    """
    def draw(level, rng):
        arg, what, _ = _draw(level, rng)
        return _HEAD.format(arg=arg, what=what), None

    return draw_distinct(
        "code", n, difficulty, LEVELS, seed, split, draw, split_of,
        lambda tid, prompt, _, level: TaskRecord(
            task_id=tid, prompt=prompt, source="code",
            tests={"method": "function", "tests": hidden_tests(prompt), "entry_point": "f"},
            difficulty=level, split=split))


def longest_prompt(levels: int | list[int]) -> str:
    """The longest prompt text at ``levels`` (templates at their widest numbers)."""
    levels = [levels] if isinstance(levels, int) else list(levels)
    longest = {0: "x*20", 1: "x*9*9",
               2: max((w.format(k=9, c="a") for w, _ in _STRINGS), key=len),
               3: max((w.format(k=9) for w, _ in _LISTS), key=len),
               4: "x-9 if x is greater than 9, else x-9"}
    return max((_HEAD.format(arg="xs" if lv == 3 else "s" if lv == 2 else "x", what=longest[lv])
                for lv in levels), key=len)

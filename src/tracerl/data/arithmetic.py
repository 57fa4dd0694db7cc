"""``arithmetic``: the embedded default task generator (offline, deterministic).

Short integer problems that a tiny character-level diffusion LM trained from scratch on
CPU can partly learn, in six levels of increasing hardness:

| level | form | operands | example |
|---|---|---|---|
| 0 | a+b | 0..9 | ``What is 3+5?`` |
| 1 | a+b | 10..99 | ``What is 47+38?`` |
| 2 | a+b-c | 1..20 | ``What is 7+12-5?`` |
| 3 | a-b (may be negative) | 10..99 | ``What is 23-58?`` |
| 4 | a*b | 2..9 | ``What is 6*7?`` |
| 5 | a*b+c | a, b 2..12, c 1..20 | ``What is 4*7+3?`` |
| 6 | a+b+c | 10..99 | ``What is 23+45+17?`` |
| 7 | a+b+c+d | 10..99 | ``What is 23+45+17+38?`` |
| 8 | a+b+c+d+e | 10..99 | ``What is 23+45+17+38+52?`` |

Levels 6-8 are the **long tier**: chained sums whose worked solution
(:func:`worked_solution`) adds column by column, one running total at a time, so it
needs several times the tokens of levels 0-5 (about 45, 70 and 95 characters against 15
to 30) while every step stays a two- or three-digit column sum a tiny model can learn.
A level-8 problem is solved only if all four column additions are right: the tier for a
token-budget curriculum (``curriculum.max_tokens_by_level``).

Splits are decided by a hash of the problem text (about 20 % ``heldout``), so train and
held-out problems are disjoint whatever the seed or the number asked for. Within one call
problems are distinct while the level has enough of them (level 0 has only 100).
"""

from __future__ import annotations

import hashlib
import random
import re

from tracerl.data.records import TaskRecord, draw_distinct

LEVELS = range(9)
LONG_TIER = range(6, 9)
HELDOUT_PERCENT = 20
_PROMPT = "What is {}?"
_EXPR_RE = re.compile(r"^What is ([0-9+\-*]+)\?$")


def _draw(level: int, rng: random.Random) -> str:
    r = rng.randint
    if level == 0:
        return f"{r(0, 9)}+{r(0, 9)}"
    if level == 1:
        return f"{r(10, 99)}+{r(10, 99)}"
    if level == 2:
        return f"{r(1, 20)}+{r(1, 20)}-{r(1, 20)}"
    if level == 3:
        return f"{r(10, 99)}-{r(10, 99)}"
    if level == 4:
        return f"{r(2, 9)}*{r(2, 9)}"
    if level == 5:
        return f"{r(2, 12)}*{r(2, 12)}+{r(1, 20)}"
    if level in LONG_TIER:
        return "+".join(str(r(10, 99)) for _ in range(level - 3))
    raise ValueError(f"arithmetic difficulty must be in {LEVELS[0]}..{LEVELS[-1]}, got {level}")


class _Largest:
    """A stand-in random source that always draws the top of the range."""

    @staticmethod
    def randint(a: int, b: int) -> int:
        return b


def longest_prompt(levels: int | list[int]) -> str:
    """The longest prompt text the generator writes at ``levels`` (every operand range
    is positive and ascending, so the top of each range has the most digits).

    Example:
        >>> longest_prompt([0, 1])
        'What is 99+99?'
    """
    levels = [levels] if isinstance(levels, int) else list(levels)
    return max((_PROMPT.format(_draw(lv, _Largest())) for lv in levels), key=len)


def split_of(text: str) -> str:
    """``heldout`` for about 20 % of problem texts (by hash), else ``train``."""
    h = int(hashlib.sha256(f"arithmetic|{text}".encode()).hexdigest()[:8], 16)
    return "heldout" if h % 100 < HELDOUT_PERCENT else "train"


def _steps(expr: str) -> tuple[list[str], int]:
    """Left-to-right evaluation with ``*`` first; returns worked steps and the value."""
    m = re.fullmatch(r"(\d+)\*(\d+)([+-]\d+)?", expr)
    if m:
        prod = int(m.group(1)) * int(m.group(2))
        if m.group(3) is None:
            return [f"{expr}={prod}"], prod
        val = prod + int(m.group(3))
        return [f"{m.group(1)}*{m.group(2)}={prod}", f"{prod}{m.group(3)}={val}"], val
    toks = re.findall(r"[+-]?\d+", expr)
    val, steps = int(toks[0]), []
    if len(toks) == 2:
        val += int(toks[1])
        return [f"{expr}={val}"], val
    for t in toks[1:]:
        new = val + int(t)
        steps.append(f"{val}{t if t[0] in '+-' else '+' + t}={new}")
        val = new
    return steps, val


def generate(n: int, difficulty: int | list[int] = 0, seed: int = 0,
             split: str = "train") -> list[TaskRecord]:
    """``n`` arithmetic tasks of the given level(s) from ``split`` (``train``/``heldout``).

    Levels given as a list are drawn uniformly per task. Deterministic in
    ``(n, difficulty, seed, split)``.

    Example:
        >>> t = generate(2, difficulty=4, seed=0)
        >>> [(x.prompt, x.answer, x.split) for x in t]  # doctest: +SKIP
        [('What is 8*8?', '64', 'train'), ...]
        >>> all(split_of(x.prompt) == "train" for x in generate(50, [0, 5], seed=1))
        True
    """
    def draw(level, rng):
        expr = _draw(level, rng)
        return _PROMPT.format(expr), expr

    return draw_distinct(
        "arithmetic", n, difficulty, LEVELS, seed, split, draw, split_of,
        lambda tid, prompt, expr, level: TaskRecord(
            task_id=tid, prompt=prompt, source="arithmetic", answer=str(_steps(expr)[1]),
            difficulty=level, split=split))


def _column_add(a: int, b: int) -> list[str]:
    """Column-wise steps of ``a+b`` for two-digit ``a``, ``b``: units, then tens + carry."""
    u = a % 10 + b % 10
    carry = "+1" if u >= 10 else ""
    return [f"{a % 10}+{b % 10}={u}", f"{a // 10}+{b // 10}{carry}={a // 10 + b // 10 + u // 10}"]


def _column_sub(x: int, y: int) -> list[str]:
    """Column-wise steps of ``x-y`` for two-digit ``x >= y``: units (borrowing), tens."""
    ux, uy = x % 10, y % 10
    borrow = ux < uy
    units = f"{10 + ux if borrow else ux}-{uy}={(10 if borrow else 0) + ux - uy}"
    return [units, f"{x // 10}-{y // 10}{'-1' if borrow else ''}={x // 10 - y // 10 - borrow}"]


def _columns(a: int, b: int) -> list[str]:
    """Column sums of ``a+b`` (any sizes) from the units up, each with the carry in:
    ``68+17`` -> ``8+7=15``, ``6+1+1=8``; a column past the shorter number adds a 0
    (``133+99`` -> ``3+9=12``, ``3+9+1=13``, ``1+0+1=2``). A final carry-only column is
    included (``0+0+1=1``); :func:`_chain_sum` drops it, the column before shows it."""
    out, carry = [], 0
    while a or b or carry:
        da, db = a % 10, b % 10
        total = da + db + carry
        out.append(f"{da}+{db}" + ("+1" if carry else "") + f"={total}")
        carry, a, b = total // 10, a // 10, b // 10
    return out


def _chain_sum(expr: str) -> str:
    """Worked solution of a chained sum ``a+b+c(+...)``: one running total at a time,
    each worked by columns, then the boxed answer.

    >>> _chain_sum("68+17+38")
    '68+17: 8+7=15, 6+1+1=8, =85; 85+38: 5+8=13, 8+3+1=12, =123 \\\\boxed{123}'
    """
    terms = [int(t) for t in expr.split("+")]
    total, parts = terms[0], []
    for t in terms[1:]:
        cols = _columns(total, t)
        if len(cols) > max(len(str(total)), len(str(t))):  # the last carry is its own digit
            cols = cols[:-1]
        total += t
        parts.append(f"{total - t}+{t}: " + ", ".join(cols) + f", ={total}")
    return "; ".join(parts) + f" \\boxed{{{total}}}"


def worked_solution(prompt: str) -> str | None:
    """Column-wise worked solution: two-digit sums and differences digit by digit,
    longer expressions step by step; ``None`` if the prompt is not this generator's.

    Short, local steps (single-digit facts plus a carry or borrow) are what a tiny model
    gets right; the answer then only copies digits. A negative difference is worked as
    ``-(larger-smaller)``.

    Example:
        >>> worked_solution("What is 47+38?")
        '7+8=15, 4+3+1=8 \\\\boxed{85}'
        >>> worked_solution("What is 23-58?")
        '-(58-23): 8-3=5, 5-2=3 \\\\boxed{-35}'
        >>> worked_solution("What is 52-47?")
        '12-7=5, 5-4-1=0 \\\\boxed{5}'
    """
    m = _EXPR_RE.match(prompt.strip()) if isinstance(prompt, str) else None
    if not m:
        return None
    expr = m.group(1)
    chain = re.fullmatch(r"\d+(?:\+\d+){2,}", expr)
    if chain:
        return _chain_sum(expr)
    two = re.fullmatch(r"(\d\d)([+-])(\d\d)", expr)
    if not two:
        return solution(prompt)
    a, op, b = int(two.group(1)), two.group(2), int(two.group(3))
    if op == "+":
        return ", ".join(_column_add(a, b)) + f" \\boxed{{{a + b}}}"
    head = "" if a >= b else f"-({b}-{a}): "
    return head + ", ".join(_column_sub(max(a, b), min(a, b))) + f" \\boxed{{{a - b}}}"


def solution(prompt: str) -> str | None:
    """Worked solution of an arithmetic prompt, ending with ``\\boxed{answer}``; ``None``
    if the prompt is not one of this generator's.

    Example:
        >>> solution("What is 17+25?"), solution("What is 4*7+3?")
        ('17+25=42 \\\\boxed{42}', '4*7=28, 28+3=31 \\\\boxed{31}')
        >>> solution("What is 7+12-5?")
        '7+12=19, 19-5=14 \\\\boxed{14}'
    """
    m = _EXPR_RE.match(prompt.strip()) if isinstance(prompt, str) else None
    if not m:
        return None
    steps, val = _steps(m.group(1))
    return ", ".join(steps) + f" \\boxed{{{val}}}"

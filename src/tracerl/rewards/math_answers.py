"""Math answers: extraction from a response and equivalence with the ground truth.

The reference extracts the last ``\\boxed{...}`` and compares with hand-written string
normalisation plus a sympy fallback ("legacy" mode of ``reward/math_utils.py:is_equal``,
spec section 3.1); its ``math_verify`` mode exists but is unused. Here the comparison is
math-verify (Hugging Face's verifier, the field's standard), preceded by an exact fast
path for plain numbers, and always under a timeout: math-verify's own timeout uses
``signal.alarm`` and so works only in the main thread, so elsewhere (Prefect runs tasks
in worker threads) the check runs in a helper process that is killed on timeout.

No false positives from normalisation: decimal points and spaces between digits are kept
(``1.5x`` is not ``15x``, ``\\text{2.5 cm}`` not ``\\text{25 cm}``), and an equation is
an answer only when every side without a variable equals the ground truth (``5 = 4`` is
not ``4``; ``x = 4`` and ``2+2 = 4`` are).

Extraction (:func:`extract_answer`, :func:`extract_boxed`) lives in
:mod:`tracerl.data.answers`, shared with the data sources. A response cut off by the
token budget counts as wrong (spec 3.2 step 1), whatever it contains. Nothing here
raises on model output.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import math
import multiprocessing as mp
import re
import threading
from dataclasses import dataclass
from fractions import Fraction

from tracerl.data.answers import extract_answer, extract_boxed

__all__ = ["MathScore", "extract_answer", "extract_boxed", "score_math", "verify_answer"]

# --------------------------------------------------------------------------- equivalence

_NUM_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(e[+-]?\d+)?$", re.IGNORECASE)


def _plain_number(s: str) -> Fraction | None:
    """Exact value of a plain decimal/integer/simple fraction string, else None."""
    t = s.strip().strip("$").replace("\\!", "").replace("{,}", "").strip()
    if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?", t):
        t = t.replace(",", "")
    if _NUM_RE.match(t):
        try:
            return Fraction(t)
        except (ValueError, ZeroDivisionError):
            return None
    m = re.fullmatch(r"([+-]?\d+)\s*/\s*(\d+)", t) or re.fullmatch(
        r"([+-]?)\\[dt]?frac\{(\d+)\}\{(\d+)\}", t)
    if m and len(m.groups()) == 2:
        return Fraction(int(m.group(1)), int(m.group(2))) if int(m.group(2)) else None
    if m:
        sign = -1 if m.group(1) == "-" else 1
        return sign * Fraction(int(m.group(2)), int(m.group(3))) if int(m.group(3)) else None
    return None


def _strip_percent(s: str) -> str:
    """``"10\\%"`` -> ``"10"``: a trailing percent sign is dropped (the reference's
    ``_strip_string`` does the same), so "10%" matches "10" but not "0.1"."""
    t = s.strip()
    for suffix in ("\\%", "%"):
        if t.endswith(suffix):
            return t[: -len(suffix)].strip()
    return t


def _norm_text(s: str) -> str:
    """Text-level normal form: ``\\text{...}``-style wrappers, ``$`` and a final period
    removed, lower case, spaces dropped except between two digits (``1 5`` stays apart
    from ``15``). Decimal points are kept: ``2.5`` never normalises to ``25``."""
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:mathrm|textbf|mathbf)\{([^{}]*)\}", r"\1", s)
    s = s.replace("$", "").strip().rstrip(".").strip()
    s = re.sub(r"(?<=\d)\s+(?=\d)", " ", s)
    return re.sub(r"(?<!\d)\s+|\s+(?!\d)", "", s).lower()


_LATEX_CMD_RE = re.compile(r"\\[A-Za-z]+")


def _has_variable(s: str) -> bool:
    """A letter outside LaTeX command names (``x``, ``f(t)``; not ``\\frac{1}{2}``)."""
    return re.search(r"[A-Za-z]", _LATEX_CMD_RE.sub("", s)) is not None


def _equation_sides(pred: str, gold: str) -> list[str] | None:
    """The sides of ``pred`` when it is an equation and ``gold`` is not, else None.
    ``=`` inside ``\\leq``/``\\geq``, ``<=``/``>=``/``!=``/``==`` does not split."""
    if "=" not in pred or "=" in gold or re.search(r"[<>!=]=", pred):
        return None
    sides = [p.strip() for p in pred.split("=")]
    return sides if len(sides) > 1 and all(sides) else None


def _mv_check(pred: str, gold: str, timeout: int | None) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    cfg = [LatexExtractionConfig(), ExprExtractionConfig()]
    g = parse("$" + gold + "$", extraction_config=cfg, parsing_timeout=timeout)
    if not g:
        g = parse(gold, extraction_config=cfg, parsing_timeout=timeout)
    p = parse("\\boxed{" + pred + "}", extraction_config=cfg, parsing_timeout=timeout)
    if not p:
        p = parse("$" + pred + "$", extraction_config=cfg, parsing_timeout=timeout)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=timeout))


def _mv_worker(pred: str, gold: str) -> bool:
    try:
        return _mv_check(pred, gold, None)
    except Exception:  # noqa: BLE001
        return False


_pool: cf.ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


def _get_pool() -> cf.ProcessPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = cf.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"))
        return _pool


def _reset_pool() -> None:
    global _pool
    with _pool_lock:
        if _pool is not None:
            for p in list(getattr(_pool, "_processes", {}).values()):
                p.kill()
            _pool.shutdown(wait=False, cancel_futures=True)
            _pool = None


atexit.register(_reset_pool)


def verify_answer(pred: str | None, gold: str, timeout_s: float = 5.0) -> bool:
    """True when ``pred`` is mathematically equivalent to ``gold``.

    Plain numbers compare exactly (``"1,000" == "1000"``, ``"0.5" == "1/2"``); anything
    else goes through math-verify (fractions, radicals, intervals, sets, matrices, units
    and ``\\text``), bounded by ``timeout_s`` (a timeout is a wrong answer). Never raises.

    Example:
        >>> verify_answer("\\\\frac{1}{2}", "0.5"), verify_answer("2\\\\sqrt{2}", "\\\\sqrt{8}")
        (True, True)
        >>> verify_answer("3", "4"), verify_answer(None, "4")
        (False, False)
    """
    try:
        if not isinstance(pred, str) or not isinstance(gold, str) or not pred.strip():
            return False
        pred, gold = _strip_percent(pred), _strip_percent(gold)
        a, b = _plain_number(pred), _plain_number(gold)
        if a is not None and b is not None:
            return a == b
        if _norm_text(pred) == _norm_text(gold):
            return True
        if len(pred) > 2000:  # degenerate output; do not hand it to a parser
            return False
        sides = _equation_sides(pred, gold)
        if sides is not None:  # "x = 4" answers 4; "5 = 4" does not (every constant side must)
            check = [s for s in sides[:-1] if not _has_variable(s)] + [sides[-1]]
            return all(verify_answer(s, gold, timeout_s) for s in check)
        if threading.current_thread() is threading.main_thread():
            return _mv_check(pred, gold, max(1, math.ceil(timeout_s)))
        fut = _get_pool().submit(_mv_worker, pred, gold)
        try:
            return bool(fut.result(timeout=timeout_s + 5.0))  # + process start on first use
        except cf.TimeoutError:
            _reset_pool()
            return False
    except Exception:  # noqa: BLE001 - a reward never raises on model output
        return False


@dataclass(frozen=True)
class MathScore:
    """``correct``; ``extracted`` answer or None; ``reason``: ``ok``, ``wrong``,
    ``no_answer``, ``overlong`` or ``no_reference``."""

    correct: bool
    extracted: str | None
    reason: str


def score_math(response: str | bytes | None, answer: str | None, *, truncated: bool = False,
               overlong_is_wrong: bool = True, timeout_s: float = 5.0) -> MathScore:
    """Score one math response against the ground-truth ``answer``.

    ``truncated`` (finish reason "length") makes it wrong when ``overlong_is_wrong``
    (the reference's overlong penalty, spec 3.2). Bytes that are not UTF-8 are decoded
    with replacement; an empty response has no answer.

    Example:
        >>> score_math("7*6=42 \\\\boxed{42}", "42")
        MathScore(correct=True, extracted='42', reason='ok')
        >>> score_math("7*6=42 \\\\boxed{42}", "42", truncated=True).reason
        'overlong'
    """
    if isinstance(response, bytes | bytearray):
        response = bytes(response).decode("utf-8", "replace")
    if not isinstance(answer, str) or not answer.strip():
        return MathScore(False, None, "no_reference")
    extracted = extract_answer(response) if isinstance(response, str) else None
    if truncated and overlong_is_wrong:
        return MathScore(False, extracted, "overlong")
    if extracted is None:
        return MathScore(False, None, "no_answer")
    ok = verify_answer(extracted, answer, timeout_s)
    return MathScore(ok, extracted, "ok" if ok else "wrong")

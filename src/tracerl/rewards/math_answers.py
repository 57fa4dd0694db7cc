"""Math answers: extraction from a response and equivalence with the ground truth.

The reference extracts the last ``\\boxed{...}`` and compares with hand-written string
normalisation plus a sympy fallback ("legacy" mode of ``reward/math_utils.py:is_equal``,
spec section 3.1); its ``math_verify`` mode exists but is unused. Here the comparison is
math-verify (Hugging Face's verifier, the field's standard), preceded by an exact fast
path for plain numbers, and always under a timeout: math-verify's own timeout uses
``signal.alarm`` and so works only in the main thread, so elsewhere (Prefect runs tasks
in worker threads) the check runs in a helper process that is killed on timeout.

Extraction (:func:`extract_answer`), in order:
1. the content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (brace-balanced; also
   ``\\boxed 5``);
2. fallback: the text after the last ``####`` (GSM8K's format);
3. fallback: the text after the last "final answer is" / "answer is" / "answer:".
A response cut off by the token budget counts as wrong (spec 3.2 step 1), whatever it
contains. Nothing here raises on model output.
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

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*")
_ANSWER_IS_RE = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*:?\s*(.+)", re.IGNORECASE)


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox``), brace-balanced; ``None`` if
    there is none or it is unclosed.

    Example:
        >>> extract_boxed(r"so \\boxed{\\frac{1}{2}} and then \\boxed{x^{2}}")
        'x^{2}'
        >>> extract_boxed(r"\\boxed 7.") is None, extract_boxed(r"\\boxed{3")
        (False, None)
    """
    if not isinstance(text, str):
        return None
    matches = list(_BOX_RE.finditer(text))
    limit = len(text)  # an earlier box can only close before a later unclosed one starts
    for m in reversed(matches):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < limit:
                c = text[j]
                if c == "\\" and j + 1 < len(text):
                    j += 2
                    continue
                if c == "{":
                    depth += 1
                elif c == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j].strip()
                j += 1
            limit = m.start()
            continue  # unclosed: try an earlier box
        tok = re.match(r"([^\s$]+)", text[i:])
        if tok and m.group(0).endswith(" "):
            return tok.group(1).rstrip(".,;")
    return None


def extract_answer(text: str) -> str | None:
    """Final answer of a response (see the module docstring for the fallbacks).

    Example:
        >>> extract_answer("12+30=42 \\\\boxed{42}"), extract_answer("so #### 1,000")
        ('42', '1,000')
        >>> extract_answer("The final answer is $7$."), extract_answer("no idea")
        ('7', None)
    """
    if not isinstance(text, str) or not text.strip():
        return None
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip().splitlines()
        if tail and tail[0].strip():
            return tail[0].strip()
    hits = _ANSWER_IS_RE.findall(text)
    if hits:
        ans = hits[-1].strip().splitlines()[0].strip().rstrip(".").strip()
        ans = ans.strip("$").strip()
        return ans or None
    return None


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
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:mathrm|textbf|mathbf)\{([^{}]*)\}", r"\1", s)
    return re.sub(r"[\s$.]", "", s).lower()


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

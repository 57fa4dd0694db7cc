"""Answer extraction: the final answer of a math response or of a reference solution.

One home for both users: :mod:`tracerl.data.sources` reads reference answers out of
dataset solutions with it, :mod:`tracerl.rewards.math_answers` reads model answers with it
(``data`` never imports ``rewards``).

Extraction (:func:`extract_answer`), in order:
1. the content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (brace-balanced; also
   ``\\boxed 5``);
2. fallback: the text after the last ``####`` (GSM8K's format);
3. fallback: the text after the last "final answer is" / "answer is" / "answer:".
Nothing here raises on model output.
"""

from __future__ import annotations

import re

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

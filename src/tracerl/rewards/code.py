"""Code rewards: extract the program from a response and grade it in the sandbox.

Reference (``reward/rl_code_reward.py``, spec 3.3): the last fenced python block (of
``prefix + text`` for function tests); reward = number of passed tests. Here the reward
is the *fraction* of tests passed (comparable across tasks with different test counts)
and ``correct`` means every test passed. Grading goes through
:func:`tracerl.rewards.sandbox.run_jobs`; nothing here raises on model output.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tracerl.rewards.sandbox import CodeJob, ProgramResult, SandboxLimits, run_jobs

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(text: str | None) -> str | None:
    """The last fenced code block (python-tagged preferred), else ``None``.

    Example:
        >>> extract_code("x\\n```python\\ndef f():\\n    return 1\\n```\\nbye")
        'def f():\\n    return 1\\n'
    """
    if not isinstance(text, str):
        return None
    blocks = _FENCE_RE.findall(text)
    if not blocks:
        return None
    py = [b for lang, b in blocks if lang.lower() in ("python", "py", "python3")]
    code = (py or [b for _, b in blocks])[-1]
    return code if code.strip() else None


def build_job(response: str | None, tests: dict[str, Any]) -> CodeJob | None:
    """A sandbox job for one response, or ``None`` when no code could be extracted."""
    code = extract_code(response)
    if code is None:
        return None
    if tests.get("method", "function") == "stdio":
        return CodeJob(code=code, method="stdio", inputs=tuple(map(str, tests["inputs"])),
                       outputs=tuple(map(str, tests["outputs"])))
    entry = tests.get("entry_point")
    if entry and tests.get("prefix") and not re.search(rf"\bdef\s+{re.escape(entry)}\s*\(", code):
        code = tests["prefix"] + code  # a completion of the given signature
    if tests.get("setup"):
        code = tests["setup"] + "\n" + code
    # the task's own code also runs in the judge: its helpers (HumanEval's ``poly``) are
    # the task's, never the program's; the entry point always comes from the program
    trusted = "\n".join(t for t in (tests.get("setup"), tests.get("prefix")) if t)
    return CodeJob(code=code, method="function", tests=tuple(tests["tests"]), trusted=trusted,
                   entry_point=entry or None)


@dataclass(frozen=True)
class CodeScore:
    correct: bool
    reward: float  # fraction of tests passed
    result: ProgramResult | None  # None: no code in the response


def score_code_batch(responses: Sequence[str | None], tests: Sequence[dict[str, Any]],
                     limits: SandboxLimits | None = None, workers: int = 4, *,
                     allow_unsandboxed: bool = False) -> list[CodeScore]:
    """Grade ``responses[i]`` against ``tests[i]`` in parallel (bounded pool). Raises
    :class:`~tracerl.rewards.sandbox.SandboxUnavailable` when the sandbox's isolation is
    missing, unless ``allow_unsandboxed`` (unsafe)."""
    jobs = [build_job(r, t) for r, t in zip(responses, tests)]
    real = [j for j in jobs if j is not None]
    results = iter(run_jobs(real, limits, workers, allow_unsandboxed=allow_unsandboxed)
                   if real else [])
    out = []
    for j in jobs:
        if j is None:
            out.append(CodeScore(False, 0.0, None))
        else:
            r = next(results)
            out.append(CodeScore(r.all_passed, r.fraction, r))
    return out

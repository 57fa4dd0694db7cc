"""Prompts as token ids, and reference solutions for SFT data.

Token ids, not text, cross every boundary (DESIGN.md): :func:`render_prompt` applies the
tokenizer's chat template once and returns ids; nothing downstream re-tokenises text.
"""

from __future__ import annotations

from typing import Any

from tracerl.data import arithmetic
from tracerl.data.records import TaskRecord


def render_prompt(tokenizer: Any, task_prompt: str) -> list[int]:
    """Chat-template a single user message (``add_generation_prompt=True``) into ids.

    Raises:
        ValueError: the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; set tokenizer.chat_template "
                         "(the default tokenizer of tracerl.models ships one)")
    out = tokenizer.apply_chat_template([{"role": "user", "content": task_prompt}],
                                        add_generation_prompt=True, tokenize=True)
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    if out and isinstance(out[0], list):
        out = out[0]
    return [int(i) for i in out]


def reference_solution(task: TaskRecord) -> str:
    """A short worked solution ending with ``\\boxed{answer}`` (SFT targets).

    Arithmetic tasks get their worked steps (``"17+25=42 \\boxed{42}"``); other math
    tasks get just ``\\boxed{answer}``.

    Raises:
        ValueError: a code task, or a task without an answer.
    """
    if task.source == "arithmetic":
        sol = arithmetic.solution(task.prompt)
        if sol is not None:
            return sol
    if task.answer is None or not str(task.answer).strip():
        raise ValueError(f"task {task.task_id!r} has no answer to build a solution from")
    return f"\\boxed{{{task.answer}}}"

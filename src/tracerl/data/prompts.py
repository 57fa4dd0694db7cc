"""Prompts as token ids, and reference solutions for SFT data.

Token ids, not text, cross every boundary (DESIGN.md): :func:`render_prompt` applies the
tokenizer's chat template once and returns ids; nothing downstream re-tokenises text.
"""

from __future__ import annotations

from typing import Any

from tracerl.data import arithmetic, codegen
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


SOLUTION_STYLES = ("steps", "worked", "answer")


def reference_solution(task: TaskRecord, style: str = "steps") -> str:
    """A short solution ending with ``\\boxed{answer}`` (SFT targets).

    Styles for arithmetic tasks: ``steps`` restates each operation
    (``"17+25=42 \\boxed{42}"``), ``worked`` goes column by column
    (``"7+5=12, 1+2+1=4 \\boxed{42}"``, :func:`tracerl.data.arithmetic.worked_solution`),
    ``answer`` is the boxed answer alone. Other math tasks always get ``\\boxed{answer}``.

    Raises:
        ValueError: an unknown style, a code task not of the code generator, or a task
            without an answer. Tasks of the ``code`` generator get their reference
            program (:func:`tracerl.data.codegen.solution`) whatever the style.
    """
    if task.source == "code":  # the generator's reference program, whatever the style
        program = codegen.solution(task.prompt)
        if program is None:
            raise ValueError(f"task {task.task_id!r}: not a code-generator prompt")
        return program
    if style not in SOLUTION_STYLES:
        raise ValueError(f"solution style must be one of {SOLUTION_STYLES}, got {style!r}")
    if task.source == "arithmetic" and style != "answer":
        sol = (arithmetic.worked_solution if style == "worked" else arithmetic.solution)(
            task.prompt)
        if sol is not None:
            return sol
    if task.answer is None or not str(task.answer).strip():
        raise ValueError(f"task {task.task_id!r} has no answer to build a solution from")
    return f"\\boxed{{{task.answer}}}"

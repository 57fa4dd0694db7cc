"""Bad records are skipped and counted by task id, never all-or-nothing.

A stage collects what it leaves out in a :class:`Skipped` (reason, task id, where in
which file), reports ``skipped_<reason>`` counts as metrics and every entry in
``skipped.jsonl`` of its output, and fails with :class:`SkipError` (listing the ids) when
it skips more than ``data.max_skip_fraction`` of the records it considered.

Reasons: ``not_utf8`` / ``not_json`` (a JSONL line that cannot be read), ``no_answer``
(neither an answer nor tests), ``invalid`` (other record problems), ``too_long`` (the
prompt and the generation budget do not fit the model's context), ``in_heldout`` (a
train prompt that is also held out).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REASONS = ("not_utf8", "not_json", "no_answer", "invalid", "too_long", "in_heldout")
RECORD_REASONS = tuple(r for r in REASONS if r != "too_long")  # what a record itself lacks
SKIPPED_FILE = "skipped.jsonl"


class SkipError(ValueError):
    """A stage skipped more records than ``data.max_skip_fraction`` allows."""


@dataclass
class Skipped:
    """What a stage left out. ``considered`` counts the records it looked at."""

    reasons: tuple[str, ...] = REASONS
    considered: int = 0
    entries: list[dict[str, Any]] = field(default_factory=list)

    def add(self, reason: str, task_id: str | None, where: str = "", problem: str = "") -> None:
        if reason not in self.reasons:
            raise ValueError(f"unknown skip reason {reason!r}; valid: {', '.join(self.reasons)}")
        self.entries.append({"reason": reason, "task_id": task_id, "where": where,
                             "problem": problem})

    def __len__(self) -> int:
        return len(self.entries)

    def ids(self, reason: str | None = None) -> list[str]:
        """Task ids (or, without one, the place in the file) of the skipped records."""
        return [e["task_id"] or e["where"] for e in self.entries
                if reason is None or e["reason"] == reason]

    def metrics(self, prefix: str = "") -> dict[str, int]:
        """``{prefix}skipped_<reason>`` for every reason of this stage."""
        return {f"{prefix}skipped_{r}": sum(e["reason"] == r for e in self.entries)
                for r in self.reasons}

    def check(self, max_fraction: float, what: str) -> None:
        """Raise :class:`SkipError` when more than ``max_fraction`` was skipped (or all)."""
        n = len(self.entries)
        if n == 0:
            return
        if n > max_fraction * self.considered or n >= self.considered:
            by = ", ".join(f"{k} {v}" for k, v in self.metrics().items() if v)
            shown = "\n".join(
                f"  - {e['task_id'] or '-'} ({e['reason']}{', ' + e['where'] if e['where'] else ''}"
                f"{': ' + e['problem'] if e['problem'] else ''})" for e in self.entries[:20])
            more = f"\n  ... and {n - 20} more" if n > 20 else ""
            raise SkipError(
                f"{what}: skipped {n} of {self.considered} records ({by}), more than "
                f"data.max_skip_fraction = {max_fraction}; fix the data (or the model's "
                f"context / rollout.max_tokens for too_long), or raise "
                f"data.max_skip_fraction:\n{shown}{more}")

    def write(self, path: str | os.PathLike) -> Path:
        """Every entry as one JSON line (an empty file when nothing was skipped)."""
        p = Path(path)
        p.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in self.entries))
        return p


def skip_too_long(prompt_lens: list[int], task_ids: list[str], context: int | None,
                  budgets: list[tuple[int, int]], log: Skipped) -> list[int]:
    """Record every prompt that does not fit ``context`` under ``budgets`` as
    ``too_long`` (by task id) and return the indices of those that do."""
    from tracerl.limits import longest_canvas, too_long

    log.considered += len(prompt_lens)
    bad = set(too_long(prompt_lens, context, budgets))
    for i in sorted(bad):
        log.add("too_long", task_ids[i], "",
                f"{prompt_lens[i]} prompt ids need {longest_canvas(prompt_lens[i], budgets)} "
                f"positions with (block size, max_tokens) {budgets}, the context is {context}")
    return [i for i in range(len(prompt_lens)) if i not in bad]

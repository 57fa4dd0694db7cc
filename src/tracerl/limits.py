"""What fits, known before any work: light checks shared by params validation, the
prepare and rollout stages and the sampler. No torch or transformers here, so that
params load (and fail) in well under a second.

- **Canvas.** A prompt of ``P`` tokens decoded with block size ``b`` and budget ``M``
  needs ``floor(P/b)*b + M`` positions of the model's context (the sampler's absolute
  block alignment, :mod:`tracerl.sampling.generate`).
- **Budgets of a run.** ``(block size, max tokens)`` at iteration 0 and from every
  iteration where a curriculum schedule changes one of them; a prompt must fit all.
- **The embedded default's prompt length** without building its tokenizer: the
  tokenizer is character-level, so a chat-templated user message is its characters plus
  a fixed overhead (tests pin it to the real tokenizer).
- **What ``model.init`` names**: ``tiny`` (the embedded default), a hub id ``org/name``,
  or a local folder. Rule: a value that exists on disk, starts with ``.``, ``/`` or
  ``~``, or is not of the form ``org/name`` is a local path and must exist; an
  ``org/name`` that is not on disk is a hub id, fetched into the Hugging Face cache when
  the model loads (offline: it must already be there).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

# Tokens the embedded default's chat template adds around one user message:
# <|im_start|> "user\n" ... <|im_end|> "\n" <|im_start|> "assistant\n" (one token per
# character, one per special token). tests/test_limits.py pins it to render_prompt.
DEFAULT_CHAT_OVERHEAD = 1 + len("user\n") + 1 + len("\n") + 1 + len("assistant\n")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def canvas_length(prompt_len: int, block_size: int, max_tokens: int) -> int:
    """Context positions the sampler needs for a prompt of ``prompt_len`` tokens.

    >>> canvas_length(10, 4, 32)  # prompt blocks 0..1 prefilled, tail opens the budget
    40
    """
    return prompt_len // block_size * block_size + max_tokens


def run_budgets(block_size: int, max_tokens: int, block_size_schedule: Sequence = (),
                max_tokens_schedule: Sequence = ()) -> list[tuple[int, int]]:
    """Every ``(block_size, max_tokens)`` a run decodes with (rollout and evaluation).

    >>> run_budgets(4, 32, [[5, 8]], [[10, 64]])
    [(4, 32), (8, 32), (8, 64)]
    """
    from tracerl.curriculum import value_at

    starts = {0} | {int(e[0]) for e in [*block_size_schedule, *max_tokens_schedule]
                    if len(e) == 2}
    out = []
    for it in sorted(starts):
        pair = (value_at(block_size_schedule, it, block_size),
                value_at(max_tokens_schedule, it, max_tokens))
        if pair not in out:
            out.append(pair)
    return out


def longest_canvas(prompt_len: int, budgets: Sequence[tuple[int, int]]) -> int:
    """The largest canvas a prompt of ``prompt_len`` tokens needs over ``budgets``."""
    return max(canvas_length(prompt_len, b, m) for b, m in budgets if b >= 1)


def default_prompt_tokens(text: str) -> int:
    """Prompt ids of ``text`` under the embedded default's tokenizer and chat template."""
    return len(text) + DEFAULT_CHAT_OVERHEAD


def is_hub_id(text: str) -> bool:
    """``org/name`` that is not a local path (see the module docstring).

    >>> is_hub_id("Gen-Verse/TraDo-4B-Instruct"), is_hub_id("./ckpt"), is_hub_id("ckpt")
    (True, False, False)
    """
    return (bool(_HUB_ID.match(text)) and not text.startswith((".", "/", "~"))
            and not Path(text).expanduser().exists())


def init_kind(init: str) -> Literal["tiny", "hub", "path"]:
    """What ``model.init`` names: ``tiny``, a ``hub`` id or a local ``path``."""
    if init == "tiny":
        return "tiny"
    return "hub" if is_hub_id(init) else "path"


def init_problem(init: str) -> str | None:
    """Why ``model.init`` cannot be used (None when it can, as far as is knowable
    without loading: hub ids are only resolved when the model loads)."""
    if init_kind(init) != "path":
        return None
    p = Path(init).expanduser()
    if not p.exists():
        return (f"model.init {init!r} is not 'tiny', not a hub id 'org/name' and not an "
                f"existing folder (looked in {os.getcwd()}): fix the path, or use 'tiny' "
                "for the embedded default")
    if not p.is_dir():
        return f"model.init {init!r} is a file; give the checkpoint folder that holds it"
    return None


def too_long(prompt_lens: Sequence[int], context: int | None,
             budgets: Sequence[tuple[int, int]]) -> list[int]:
    """Indices of prompts whose canvas exceeds ``context`` under some budget (none when
    the context is unknown).

    >>> too_long([10, 30], 64, [(4, 32)])  # 8 + 32 = 40 fits, 28 + 32 = 60 fits
    []
    >>> too_long([10, 36], 64, [(4, 32)])  # 36 + 32 = 68 does not
    [1]
    """
    if context is None:
        return []
    return [i for i, n in enumerate(prompt_lens) if longest_canvas(n, budgets) > context]


def prompt_fit(init: str, max_position_embeddings: int,
               budgets: Sequence[tuple[int, int]]):
    """``fits(prompt_text) -> bool`` for the model ``model.init`` names, or None where the
    context is not knowable before loading (a hub id: the rollout skips what does not fit).

    The embedded default needs no tokenizer; a local checkpoint folder (or a stage folder
    holding ``checkpoint/`` or ``model/``) is measured with its own tokenizer and the
    context of its config.json.
    """
    kind = init_kind(init)
    if kind == "tiny":
        return lambda text: longest_canvas(default_prompt_tokens(text),
                                           budgets) <= max_position_embeddings
    if kind == "hub":
        return None
    import json

    from tracerl.data.prompts import render_prompt
    from tracerl.models import checkpoint_dir, load_tokenizer

    folder = checkpoint_dir(init)
    cfg = json.loads((folder / "config.json").read_text())
    context = cfg.get("max_position_embeddings") or cfg.get("max_sequence_length")
    if not context:
        return None
    tok = load_tokenizer(folder)
    return lambda text: longest_canvas(len(render_prompt(tok, text)), budgets) <= context

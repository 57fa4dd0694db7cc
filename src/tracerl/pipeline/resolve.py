"""What a stage resolves from params and its inputs: the policy to load, the curriculum
decision in force. Shared by the rollout, evaluate and SFT stages (pipeline plumbing: it
sees :class:`~tracerl.config.Params`; the library below it takes flat arguments)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tracerl.config import Params
from tracerl.curriculum import CurriculumDecision, CurriculumRule, initial_decision


def policy_from_params(source: str | os.PathLike, p: Params, *, cached: bool = True):
    """``(model, tokenizer)`` for ``source``: the embedded default built from ``model.*``
    sizes (seeded by ``run.seed``) for ``"tiny"``, else a checkpoint (or stage) folder or
    hub id. ``cached`` reuses a loaded model across in-process stages; a stage that trains
    must pass ``cached=False`` (the cached model is shared and must not change)."""
    from tracerl.models import build_default_tokenizer, build_for_tokenizer, load_model
    from tracerl.sampling import load_policy

    m = p.model
    dtype = getattr(torch, m.dtype)
    if str(source) == "tiny":
        tok = build_default_tokenizer()
        model = build_for_tokenizer(
            tok, m.family, block_size=m.block_size, hidden_size=m.hidden_size,
            num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
            intermediate_size=m.intermediate_size,
            max_position_embeddings=m.max_position_embeddings, seed=p.run.seed, dtype=dtype)
        return model.to(p.run.device), tok
    load = load_policy if cached else load_model  # both find a stage folder's checkpoint/
    return load(source, family=m.family, dtype=dtype, device=p.run.device,
                block_size=m.block_size)


def curriculum_decision(p: Params, folder: Path | None) -> CurriculumDecision:
    """The decision in ``folder/decision.json``, or the initial one (iteration 0)."""
    if folder is not None:
        return CurriculumDecision.from_dict(json.loads((folder / "decision.json").read_text()))
    c = p.curriculum
    rule = CurriculumRule(raise_above=c.raise_above, lower_below=c.lower_below, step=c.step,
                          min_level=p.data.min_difficulty, max_level=p.data.max_difficulty,
                          cumulative=c.cumulative)
    return initial_decision(level=c.start_level, rule=rule,
                            policy=c.policy if c.enabled else "fixed",
                            block_size=p.model.block_size, max_tokens=p.rollout.max_tokens,
                            block_size_schedule=c.block_size_schedule,
                            max_tokens_schedule=c.max_tokens_schedule)

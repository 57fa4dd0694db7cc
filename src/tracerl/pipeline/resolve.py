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


def device_and_dtype(p: Params) -> tuple[torch.device, torch.dtype]:
    """``run.device`` and ``model.dtype``, checked here before any work (a device this
    machine lacks, or a dtype it cannot run, is one clear error:
    :class:`tracerl.devices.DeviceError`)."""
    from tracerl.devices import resolve_device, resolve_dtype

    device = resolve_device(p.run.device)
    return device, resolve_dtype(p.model.dtype, device)


def policy_from_params(source: str | os.PathLike, p: Params, *, cached: bool = True):
    """``(model, tokenizer)`` for ``source``: the embedded default built from ``model.*``
    sizes (seeded by ``run.seed``) for ``"tiny"``, else a checkpoint (or stage) folder or
    hub id. ``cached`` reuses a loaded model across in-process stages; a stage that trains
    must pass ``cached=False`` (the cached model is shared and must not change)."""
    from tracerl.models import build_default_tokenizer, build_for_tokenizer, load_model
    from tracerl.sampling import load_policy

    m = p.model
    device, dtype = device_and_dtype(p)
    if str(source) == "tiny":
        tok = build_default_tokenizer()
        model = build_for_tokenizer(
            tok, m.family, block_size=m.block_size, hidden_size=m.hidden_size,
            num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
            intermediate_size=m.intermediate_size,
            max_position_embeddings=m.max_position_embeddings, seed=p.run.seed, dtype=dtype)
        return model.to(device), tok
    load = load_policy if cached else load_model  # both find a stage folder's checkpoint/
    return load(source, family=m.family, dtype=dtype, device=device, block_size=m.block_size)


def curriculum_policy(p: Params) -> str:
    """The curriculum policy in force: ``curriculum.policy``, or ``fixed`` when disabled."""
    return p.curriculum.policy if p.curriculum.enabled else "fixed"


def curriculum_rule(p: Params) -> CurriculumRule:
    """The one translation of ``params.curriculum`` (and the data's level range) into the
    library's :class:`~tracerl.curriculum.CurriculumRule`."""
    c = p.curriculum
    return CurriculumRule(raise_above=c.raise_above, lower_below=c.lower_below, step=c.step,
                          min_level=p.data.min_difficulty, max_level=p.data.max_difficulty,
                          window=c.window, retire_above=c.retire_above if c.enabled else None,
                          cumulative=c.cumulative, patience=c.patience)


def schedule_shape(p: Params) -> dict:
    """Block size and token budget with their schedules, for the curriculum library."""
    c = p.curriculum
    return dict(block_size=p.model.block_size, max_tokens=p.rollout.max_tokens,
                block_size_schedule=c.block_size_schedule,
                max_tokens_schedule=c.max_tokens_schedule,
                train_block_size_schedule=c.train_block_size_schedule,
                max_tokens_by_level=c.max_tokens_by_level)


def curriculum_decision(p: Params, folder: Path | None) -> CurriculumDecision:
    """The decision in ``folder/decision.json``, or the initial one (iteration 0)."""
    if folder is not None:
        return CurriculumDecision.from_dict(json.loads((folder / "decision.json").read_text()))
    return initial_decision(level=p.curriculum.start_level, rule=curriculum_rule(p),
                            policy=curriculum_policy(p), **schedule_shape(p))


def sampling_config(p: Params, decision: CurriculumDecision, block_size: int | None = None,
                    **overrides):
    """The one :class:`~tracerl.sampling.SamplingConfig` of rollout and evaluation:
    ``params.rollout`` with the block size and token budget the curriculum decision puts
    in force, or ``block_size`` when given (evaluation at more block sizes); steps per
    block are capped at that block size. Then ``overrides`` (evaluation's strategy,
    temperature, top-k, top-p, budget)."""
    from tracerl.sampling import SamplingConfig

    r, b = p.rollout, block_size or decision.schedule.block_size
    cfg = dict(block_size=b, steps_per_block=min(r.steps_per_block, b),
               max_tokens=decision.schedule.max_tokens, strategy=r.strategy,
               dynamic_threshold=r.dynamic_threshold, entropy_bound=r.entropy_bound,
               temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, batch_size=r.batch_size,
               full_cache=r.full_cache)
    return SamplingConfig(**{**cfg, **overrides})

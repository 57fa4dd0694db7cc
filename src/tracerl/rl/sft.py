"""Supervised fine-tuning of a diffusion LM (reference spec 7): block SFT, trace SFT and
full-attention random-masking SFT, on the same step loop as the RL updates
(:func:`~tracerl.rl.engine.run_steps`), with fresh masks every step.

SFT data is not a rollout: it has no decoding record, so its rows use the model's own
block size (the block size the model is being taught to decode with).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tracerl.devices import HOST
from tracerl.models import DiffusionLM
from tracerl.rl.builders import SFT_ROW_BUILDERS
from tracerl.rl.configs import SFTConfig
from tracerl.rl.engine import (
    lm_of,
    padded_len,
    rows_per_step,
    run_steps,
    step_normalizers,
    summarize,
)
from tracerl.rl.losses import sft_loss
from tracerl.rl.rows import Batch, Row, RowStats, TraceSample, check_sample
from tracerl.rl.trainer import Trainer


def sft_rows(samples: Sequence[TraceSample], cfg: SFTConfig, lm: DiffusionLM,
             generator: torch.Generator) -> tuple[list[Row], RowStats]:
    """Rows of one SFT batch for ``cfg.method`` (a name of ``SFT_ROW_BUILDERS``, spec 7)."""
    block = lm.block_size if lm.family.attention == "block" else None
    return SFT_ROW_BUILDERS.get(cfg.method)(samples, block, lm.tokens.mask_id, cfg, generator)


def sft_train(trainer: Trainer, samples: Sequence[TraceSample], cfg: SFTConfig, steps: int, *,
              progress: bool = False) -> dict[str, float]:
    """``steps`` optimizer steps of SFT, ``micro_batch * grad_accum * world`` examples each,
    cycling through ``samples`` in a fresh random order per pass, fresh masks per step."""
    lm = lm_of(trainer)
    for i, s in enumerate(samples):
        check_sample(s, i)
    if not samples:
        raise ValueError("SFT needs at least one example")
    per_step = rows_per_step(trainer)
    skipped = 0

    def step_rows():
        nonlocal skipped
        order: list[int] = []
        for _ in range(steps):
            while len(order) < per_step:
                order += torch.randperm(len(samples), generator=trainer.generator,
                                        device=trainer.generator.device).tolist()
            take, order = order[:per_step], order[per_step:]
            rows, st = sft_rows([samples[i] for i in take], cfg, lm, trainer.generator)
            skipped += st.skipped_too_long
            for r in rows:
                r.tokens["mask"] = torch.ones(r.num_targets, device=HOST)
            if rows:
                yield rows

    padded = padded_len(samples)

    def make(rows: list[Row]):
        num_tokens, num_rows = step_normalizers(rows)

        def loss_fn(out, b: Batch):
            logp, _ = out
            return sft_loss(logp[None], b.tokens["mask"][None], normalize=cfg.normalize,
                            num_tokens=num_tokens, num_rows=num_rows, padded_len=padded)

        return loss_fn

    history = run_steps(trainer, step_rows(), make, lm.tokens.pad_id, progress=progress,
                        total=steps)
    trainer.counters["updates"] += 1
    return {**summarize(history), "rows/skipped_too_long": float(skipped)}

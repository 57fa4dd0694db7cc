"""Row builders by name: how an update turns trajectories into training rows.

Two registries (:class:`tracerl.registry.Registry`), selected from params:

- :data:`ROW_BUILDERS` (``policy.method``): ``trace_rl`` (TraceRL, spec 4.4 / 5),
  ``random_masking`` and ``coupled`` (the baselines of spec 4.9);
- :data:`SFT_ROW_BUILDERS` (``sft.method``): ``semi_ar`` (the states of block-by-block
  decoding: block SFT, spec 7.1, for block models; one decoding state per row for
  full-attention models), ``trace`` (TraceRL rounds from given step maps) and
  ``random_masking`` (full-attention SFT, spec 7.2).

A builder maps ``(samples, block_size, mask_id, cfg, generator)`` to
``(rows, RowStats)``; ``block_size`` is None for full-attention models. The caller
chooses the block size (the records' for RL updates, see
:func:`~tracerl.rl.rows.records_block_size`; the model's for SFT data).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from tracerl.registry import Registry
from tracerl.rl.rows import Row, RowStats, TraceSample, build_masked_rows, build_trace_rows

RowBuilder = Callable[[Sequence[TraceSample], "int | None", int, Any, torch.Generator],
                      tuple[list[Row], RowStats]]

ROW_BUILDERS: Registry[RowBuilder] = Registry("policy method")
SFT_ROW_BUILDERS: Registry[RowBuilder] = Registry("sft method")


def trace_rows(samples, block_size, mask_id, cfg, generator):
    """TraceRL rows: each token in the block state it was unmasked from (spec 4.4 / 5)."""
    return build_trace_rows(samples, block_size=block_size, mask_id=mask_id, shrink=cfg.shrink,
                            copies_per_row=cfg.copies_per_row, max_len=cfg.max_len)


def masked_rows(coupled: bool) -> RowBuilder:
    """Random-masking rows (spec 4.9 / 7); ``coupled`` adds each copy's complement."""

    def build(samples, block_size, mask_id, cfg, generator):
        return build_masked_rows(samples, block_size=block_size, mask_id=mask_id,
                                 lower=cfg.lower_p, upper=cfg.upper_p, generator=generator,
                                 coupled=coupled, times=cfg.mask_times, max_len=cfg.max_len)

    return build


def _only_for(attention: str, refusal: str, builder: RowBuilder) -> RowBuilder:
    """``builder``, refusing models of the other attention kind with ``refusal``."""

    def build(samples, block_size, mask_id, cfg, generator):
        if (block_size is not None) != (attention == "block"):
            raise ValueError(refusal)
        return builder(samples, block_size, mask_id, cfg, generator)

    return build


ROW_BUILDERS.add("trace_rl", trace_rows)
ROW_BUILDERS.add("random_masking", masked_rows(False))
ROW_BUILDERS.add("coupled", masked_rows(True))

def semi_ar_rows(samples, block_size, mask_id, cfg, generator):
    """SFT on the states of semi-autoregressive (block-by-block) decoding: block models
    train every block at once (block SFT, spec 7.1); full-attention models one state per
    row (:func:`~tracerl.rl.rows.build_masked_rows` with ``decode_block``, the decoding
    block ``cfg.decode_block``)."""
    full = block_size is None
    if full and cfg.decode_block < 1:
        raise ValueError("sft method 'semi_ar' on a full-attention model needs the decoding "
                         "block size (SFTConfig.decode_block, from model.block_size)")
    return build_masked_rows(samples, block_size=block_size, mask_id=mask_id, lower=cfg.lower_p,
                             upper=cfg.upper_p, generator=generator, times=cfg.mask_times,
                             max_len=cfg.max_len, decode_block=cfg.decode_block if full else 0)


SFT_ROW_BUILDERS.add("semi_ar", semi_ar_rows)
SFT_ROW_BUILDERS.add("trace", trace_rows)
SFT_ROW_BUILDERS.add("random_masking", _only_for(
    "full", "sft method 'random_masking' is for full-attention models; use 'semi_ar' (block "
    "SFT) or 'trace' for block models", masked_rows(False)))

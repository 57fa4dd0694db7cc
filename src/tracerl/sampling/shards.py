"""A rollout split into shards that merge back bit-identical to the unsharded rollout.

A rollout's prompts are decoded in the batches of :func:`tracerl.sampling.plan_batches`
(sorted by length, cut every ``batch_size``), each sequence from its own seed drawn up
front in prompt order (:func:`tracerl.sampling.prompt_seeds`). A shard decodes whole
batches of that one plan (:func:`shard_batches`), so each batch has the prompts, padding
and seeds it has in the unsharded run, and the merge (:func:`merge_shards`) puts the
rows back in prompt order: the merged output is the unsharded output, bit for bit,
whether or not the backend's matmuls depend on batch composition.

Each shard records a :class:`ShardInfo` beside its rows (``shard.json``); the merge
refuses a set of shards that is incomplete, overlapping, from different plans or sampled
by different weights.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

SHARD_FILE = "shard.json"


def shard_batches(num_batches: int, shards: int, index: int) -> list[int]:
    """The batches shard ``index`` (0-based) of ``shards`` decodes: every ``shards``-th
    batch from ``index`` (round robin: the plan's batches grow in prompt length, so each
    shard gets short and long ones). A shard past the number of batches gets none.

    >>> [shard_batches(5, 2, i) for i in range(2)], shard_batches(2, 3, 2)
    ([[0, 2, 4], [1, 3]], [])
    """
    if shards < 1 or not 0 <= index < shards:
        raise ValueError(f"shard index {index} of {shards} shards: need 0 <= index < shards")
    return list(range(index, num_batches, shards))


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/3"`` (1-based, as in the label ``shard2of3``) -> ``(1, 3)`` (0-based index).

    >>> parse_shard("1/2")
    (0, 2)
    """
    k, sep, n = text.partition("/")
    if not (sep and k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
        raise ValueError(f"--shard expects K/N with 1 <= K <= N, got {text!r}")
    return int(k) - 1, int(n)


@dataclass
class ShardInfo:
    """What one shard decoded and from what (``shard.json``).

    Attributes:
        index: 0-based shard index; ``shards``: how many shards the rollout has.
        num_prompts: responses of the whole rollout; ``num_batches``: its batches.
        batches: the batches this shard decoded; ``rows``: their prompt indices, in the
            order of this shard's ``rollouts.parquet``.
        policy_digest: the checkpoint digest the shard verified before loading.
        policy_id: the weights digest of the loaded model (the ``policy_id`` column).
        plan: what every shard of one rollout must agree on (metrics of the plan,
            sampling settings, skipped tasks).
        seconds: wall time of the shard's decoding.
    """

    index: int
    shards: int
    num_prompts: int
    num_batches: int
    batches: list[int]
    rows: list[int]
    policy_digest: str
    policy_id: str
    plan: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def write(self, folder: Path) -> None:
        (Path(folder) / SHARD_FILE).write_text(json.dumps(asdict(self), indent=2,
                                                          sort_keys=True))

    @classmethod
    def read(cls, folder: Path) -> ShardInfo:
        return cls(**json.loads((Path(folder) / SHARD_FILE).read_text()))


def merge_shards(parts: Sequence[tuple[ShardInfo, pl.DataFrame]],
                 expect_digest: str | None = None) -> pl.DataFrame:
    """The rows of every shard in prompt order: the unsharded rollout's frame.

    Raises:
        ValueError: listing every problem: shards missing or repeated, shards of
            different plans or weights, rows missing or overlapping, a row count that
            differs from ``shard.json``, a checkpoint digest other than ``expect_digest``.
    """
    if not parts:
        raise ValueError("no shards to merge")
    infos = [i for i, _ in parts]
    p: list[str] = []
    first = infos[0]
    n = first.shards
    for info in infos[1:]:
        for attr in ("shards", "num_prompts", "num_batches", "policy_digest", "policy_id",
                     "plan"):
            if getattr(info, attr) != getattr(first, attr):
                p.append(f"shard {info.index + 1} has {attr} {getattr(info, attr)!r}, shard "
                         f"{first.index + 1} {getattr(first, attr)!r}: they are not shards of "
                         "one rollout")
    idx = sorted(i.index for i in infos)
    if idx != list(range(n)):
        p.append(f"expected shards 1..{n} once each, got {[i + 1 for i in idx]}")
    if expect_digest is not None:
        p += [f"shard {i.index + 1} sampled from checkpoint {i.policy_digest}, the rollout was "
              f"planned from {expect_digest}" for i in infos if i.policy_digest != expect_digest]
    for info, df in parts:
        if df.height != len(info.rows):
            p.append(f"shard {info.index + 1}: {df.height} rows, shard.json lists "
                     f"{len(info.rows)}")
    rows = [r for i in infos for r in i.rows]
    if sorted(rows) != list(range(first.num_prompts)):
        p.append(f"the shards' rows do not cover 0..{first.num_prompts - 1} once each "
                 f"({len(rows)} rows, {len(set(rows))} distinct)")
    if p:
        raise ValueError("cannot merge the rollout shards:\n" + "\n".join(f"  - {m}" for m in p))
    frame = pl.concat([df for _, df in parts], how="vertical")
    order = sorted(range(len(rows)), key=rows.__getitem__)
    return frame[order].rechunk()

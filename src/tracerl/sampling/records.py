"""Trajectories -> the versioned ROLLOUT parquet schema (:data:`tracerl.schemas.ROLLOUT`)."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from tracerl.sampling.generate import SamplingConfig, Trajectory
from tracerl.schemas import DECODING, ROLLOUT, conform


def trajectories_to_frame(
    trajs: Sequence[Trajectory],
    task_ids: Sequence[str],
    sample_indices: Sequence[int],
    policy_id: str,
    tokenizer,
    train_block_size: int | None = None,
) -> pl.DataFrame:
    """One ROLLOUT row per trajectory (write it with :func:`tracerl.schemas.write_parquet`).

    ``response_text`` decodes ``response_ids[:response_len]`` with special tokens skipped.
    The DECODING columns (attention, block size and sampling settings) come from each
    trajectory's own record, so they are what it was decoded with. ``train_block_size``
    (the curriculum's training block, a multiple of the decoding block) is recorded
    beside them; None = train at the decoding block.

    Raises:
        ValueError: the argument lists differ in length.
    """
    n = len(trajs)
    if not len(task_ids) == len(sample_indices) == n:
        raise ValueError(
            f"{n} trajectories but {len(task_ids)} task ids and {len(sample_indices)} "
            "sample indices; pass one of each per trajectory"
        )
    records = [decoding(t) for t in trajs]
    texts = tokenizer.batch_decode(
        [t.response_ids[: t.response_len] for t in trajs], skip_special_tokens=True
    ) if n else []
    df = pl.DataFrame(
        {
            "task_id": [str(x) for x in task_ids],
            "sample_index": [int(x) for x in sample_indices],
            "prompt_ids": [t.prompt_ids for t in trajs],
            "response_ids": [t.response_ids for t in trajs],
            "decode_steps": [t.decode_steps for t in trajs],
            "logprobs": [t.logprobs for t in trajs],
            "response_len": [t.response_len for t in trajs],
            "finish_reason": [t.finish_reason for t in trajs],
            "num_forward": [t.num_forward for t in trajs],
            **{c: [d[c] for d in records] for c in DECODING},
            "train_block_size": [train_block_size] * n,
            "policy_id": [policy_id] * n,
            "response_text": texts,
        },
        schema=ROLLOUT,
    )
    return conform(df, "rollout")


def decoding(t: Trajectory) -> dict:
    """The DECODING record of a trajectory (:data:`tracerl.schemas.DECODING` columns)."""
    c = t.sampling
    return {"attention": t.attention, "block_size": t.block_size,
            "steps_per_block": c.steps_per_block, "max_tokens": c.max_tokens,
            "strategy": c.strategy, "dynamic_threshold": c.dynamic_threshold,
            "entropy_bound": c.entropy_bound, "temperature": c.temperature, "top_k": c.top_k,
            "top_p": c.top_p, "full_cache": c.full_cache}


def frame_to_trajectories(df: pl.DataFrame) -> list[Trajectory]:
    """The inverse of :func:`trajectories_to_frame` (for tests and the trainer)."""
    return [
        Trajectory(
            prompt_ids=list(r["prompt_ids"]),
            response_ids=list(r["response_ids"]),
            decode_steps=list(r["decode_steps"]),
            logprobs=list(r["logprobs"]),
            response_len=r["response_len"],
            finish_reason=r["finish_reason"],
            num_forward=r["num_forward"],
            block_size=r["block_size"],
            attention=r["attention"],
            sampling=SamplingConfig(**{k: r[k] for k in DECODING
                                       if k != "attention" and r[k] is not None}),
        )
        for r in df.iter_rows(named=True)
    ]

"""Trajectories -> the versioned ROLLOUT parquet schema (:data:`tracerl.schemas.ROLLOUT`)."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from tracerl.sampling.generate import Trajectory
from tracerl.schemas import ROLLOUT, conform


def trajectories_to_frame(
    trajs: Sequence[Trajectory],
    task_ids: Sequence[str],
    sample_indices: Sequence[int],
    policy_id: str,
    tokenizer,
    *,
    block_size: int | None = None,
) -> pl.DataFrame:
    """One ROLLOUT row per trajectory (write it with :func:`tracerl.schemas.write_parquet`).

    ``response_text`` decodes ``response_ids[:response_len]`` with special tokens skipped.
    ``block_size`` defaults to each trajectory's own.

    Raises:
        ValueError: the argument lists differ in length, or no block size is known.
    """
    n = len(trajs)
    if not len(task_ids) == len(sample_indices) == n:
        raise ValueError(
            f"{n} trajectories but {len(task_ids)} task ids and {len(sample_indices)} "
            "sample indices; pass one of each per trajectory"
        )
    sizes = [block_size or t.block_size for t in trajs]
    if any(s < 1 for s in sizes):
        raise ValueError("a trajectory has no block_size; pass block_size=...")
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
            "block_size": sizes,
            "policy_id": [policy_id] * n,
            "response_text": texts,
        },
        schema=ROLLOUT,
    )
    return conform(df, "rollout")


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
        )
        for r in df.iter_rows(named=True)
    ]

"""Declared, versioned schemas of the records that cross stage boundaries.

Every artifact a stage hands to the next is a parquet file with one of these schemas
and a ``schema_version`` key in its parquet metadata. Token ids (never re-tokenised
text) cross every boundary: the reference implementation re-encodes decoded text and
so can misalign its per-token trajectories (Gen-Verse/dLLM-RL, ``train/rl_trado.py``).

Readers call :func:`read_parquet`, which checks the version and the columns and says
what is wrong; writers call :func:`write_parquet`, which casts to the schema and writes
through a temporary file renamed on success.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import polars as pl

SCHEMA_VERSION_KEY = "tracerl_schema"

# One row per task. ``answer`` for verifiable math, ``tests`` (JSON) for code.
TASK = {
    "task_id": pl.String,
    "source": pl.String,  # generator or dataset name, e.g. "arith", "gsm8k", "humaneval"
    "prompt": pl.String,  # the user message (no chat template applied)
    "answer": pl.String,  # ground-truth answer for math tasks, null for code
    "tests": pl.String,  # JSON: {"method": "function"|"stdio", ...}, null for math
    "difficulty": pl.Int32,  # generator level (0 = easiest); -1 where unknown
    "split": pl.String,  # "train" | "heldout" | "eval"
}

# How a response was decoded: the trainer's contract. The trainer rebuilds every
# decoding context from these (attention and block size decide the rows and the block
# mask), never from params; the rest records the behaviour policy's sampling settings
# (the fields of tracerl.sampling.SamplingConfig that shape the distribution).
DECODING = {
    "attention": pl.String,  # "block" (block diffusion, KV-cached) | "full" (LLaDA/Dream)
    "block_size": pl.Int32,  # b of the absolute block alignment (semi-AR block for "full")
    "steps_per_block": pl.Int32,  # T
    "max_tokens": pl.Int32,  # the generation budget
    "strategy": pl.String,  # remasking strategy (tracerl.sampling.strategies.STRATEGIES)
    "dynamic_threshold": pl.Float64,
    "entropy_bound": pl.Float64,
    "temperature": pl.Float64,  # 0 = greedy
    "top_k": pl.Int32,
    "top_p": pl.Float64,
    # full attention: "none" (exact) or "prefix" (approximate prefix KV cache: the
    # recorded log-probs are not the model's, the trainer recomputes them)
    "full_cache": pl.String,
}

# One row per sampled response (k rows per task). Written by the rollout stage.
ROLLOUT = {
    "task_id": pl.String,
    "sample_index": pl.Int32,  # 0..k-1 within the task's group
    "prompt_ids": pl.List(pl.Int32),  # chat-formatted prompt, unpadded
    # The three lists below cover every decoded position up to the END OF THE LAST BLOCK,
    # including positions after EOS in that block: they were visible context when the
    # tokens before them were unmasked, so the trainer needs them to rebuild the exact
    # context. Only the first ``response_len`` tokens (through EOS) are the response.
    "response_ids": pl.List(pl.Int32),
    "decode_steps": pl.List(pl.Int32),  # 1-based global decode step per position
    "logprobs": pl.List(pl.Float32),  # log p(token) under the raw model distribution when unmasked
    "response_len": pl.Int32,  # tokens that count, through EOS (== len(lists) when cut by length)
    "finish_reason": pl.String,  # "eos" | "length"
    "num_forward": pl.Int32,  # model forward passes spent on this response (incl. its share of prefill)
    **DECODING,
    # the block size the policy update trains this trajectory at: a multiple of block_size
    # (the curriculum's training block; null = block_size, the decoding block)
    "train_block_size": pl.Int32,
    "policy_id": pl.String,  # identifies the weights that sampled (checkpoint digest)
    "response_text": pl.String,  # decoded response_ids[:response_len], special tokens removed
}

# The rollout record plus what the reward stage adds.
SCORED = {
    **ROLLOUT,
    "correct": pl.Boolean,
    "reward": pl.Float32,  # raw reward (1/0 for math; fraction of tests passed for code)
    "advantage": pl.Float32,  # group-normalised sequence advantage
    "kept": pl.Boolean,  # False when the group was filtered out of training
    "token_rewards": pl.List(pl.Float32),  # optional process reward per response token (null if none)
}

SCHEMAS: dict[str, dict[str, pl.DataType]] = {
    "task": TASK,
    "rollout": ROLLOUT,
    "scored": SCORED,
}
# rollout/scored 2: DECODING columns; 3: train_block_size, full_cache
VERSIONS: dict[str, int] = {"task": 1, "rollout": 3, "scored": 3}


class SchemaError(ValueError):
    """An artifact does not match its declared schema."""


def _version_tag(kind: str) -> str:
    return f"{kind}/v{VERSIONS[kind]}"


def conform(df: pl.DataFrame, kind: str) -> pl.DataFrame:
    """Select and cast ``df`` to the schema ``kind``; missing nullable-by-design columns
    (``token_rewards``, ``answer``, ``tests``, ``train_block_size``, ``full_cache``: null =
    "none") are added as nulls. Raises SchemaError
    listing every missing column."""
    schema = SCHEMAS[kind]
    optional = {"token_rewards", "answer", "tests", "train_block_size", "full_cache"}
    missing = [c for c in schema if c not in df.columns and c not in optional]
    if missing:
        raise SchemaError(
            f"{kind} records lack columns {missing}; expected columns {list(schema)} "
            f"(see tracerl.schemas.{kind.upper()})"
        )
    cols = []
    for name, dtype in schema.items():
        if name in df.columns:
            cols.append(pl.col(name).cast(dtype))
        else:
            cols.append(pl.lit(None, dtype=dtype).alias(name))
    return df.select(cols)


def write_parquet(df: pl.DataFrame, path: str | os.PathLike, kind: str) -> Path:
    """Write ``df`` conformed to schema ``kind`` atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = conform(df, kind)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    out.write_parquet(tmp, metadata={SCHEMA_VERSION_KEY: _version_tag(kind)})
    os.replace(tmp, path)
    return path


def read_parquet(path: str | os.PathLike, kind: str) -> pl.DataFrame:
    """Read a parquet artifact and check its schema version and columns."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{kind} artifact not found: {path}")
    meta: Mapping[str, str] = pl.read_parquet_metadata(path)
    tag = meta.get(SCHEMA_VERSION_KEY)
    if tag != _version_tag(kind):
        raise SchemaError(
            f"{path} has schema tag {tag!r}, expected {_version_tag(kind)!r}; "
            "re-run the stage that writes it with this version of tracerl"
        )
    df = pl.read_parquet(path)
    want = SCHEMAS[kind]
    problems = [
        f"{c}: {df.schema.get(c)} != {t}" for c, t in want.items() if df.schema.get(c) != t
    ]
    if problems:
        raise SchemaError(f"{path} does not match schema {kind}: " + "; ".join(problems))
    return df

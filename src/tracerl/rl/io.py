"""Records on disk <-> :class:`~tracerl.rl.rows.TraceSample` (token ids only, no re-tokenising).

- SCORED parquet (:data:`tracerl.schemas.SCORED`) -> samples for the policy/value updates.
- Token advantages of the value stage: a parquet with ``task_id``, ``sample_index``,
  ``token_advantages`` and ``token_returns`` (``response_len`` floats each).
- SFT data: a parquet with either token ids (``prompt_ids``: chat-formatted prompt,
  ``response_ids``: response ending with EOS, optional ``decode_steps`` for trace SFT) or
  text (``prompt``: the user message, ``response`` or ``reference_solution``), which is
  chat-formatted and encoded here once, with EOS appended.
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl

from tracerl.models.model import CHECKPOINT_SUBDIRS, checkpoint_dir
from tracerl.rl.rows import TraceSample
from tracerl.schemas import read_parquet

__all__ = ["ADV_SCHEMA", "checkpoint_dir", "pick", "read_scored", "read_sft_samples",
           "read_token_advantages", "sample_from_trajectory", "samples_from_frame",
           "trainer_state_dir", "write_token_advantages"]

ADV_SCHEMA = {
    "task_id": pl.String,
    "sample_index": pl.Int32,
    "token_advantages": pl.List(pl.Float32),
    "token_returns": pl.List(pl.Float32),
}


def samples_from_frame(df: pl.DataFrame, *, kept_only: bool = True,
                       token_advantages: dict[tuple[str, int], list[float]] | None = None
                       ) -> tuple[list[TraceSample], dict[str, float]]:
    """Samples of a SCORED frame (rows with ``kept`` False are dropped and counted).

    ``token_advantages`` (from :func:`read_token_advantages`) replaces the sequence
    advantage of the samples it covers; a kept sample it lacks is an error.
    """
    n_all = df.height
    if kept_only and "kept" in df.columns:
        df = df.filter(pl.col("kept").fill_null(False))
    out = []
    missing = []
    has = set(df.columns)
    for r in df.iter_rows(named=True):
        key = (r["task_id"], int(r["sample_index"]))
        tok_adv = None
        if token_advantages is not None:
            tok_adv = token_advantages.get(key)
            if tok_adv is None:
                missing.append(key)
        out.append(TraceSample(
            prompt_ids=r["prompt_ids"], response_ids=r["response_ids"],
            decode_steps=r["decode_steps"], response_len=int(r["response_len"]),
            advantage=float(r["advantage"]) if r.get("advantage") is not None else 0.0,
            logprobs=r.get("logprobs"), token_advantages=tok_adv,
            token_rewards=r.get("token_rewards") if "token_rewards" in has else None,
            policy_id=r.get("policy_id"), sample_id=f"{key[0]}/{key[1]}",
            attention=r.get("attention"), block_size=r.get("block_size"),
            train_block_size=r.get("train_block_size"),
            exact_logprobs=r.get("full_cache") in (None, "none")))
    if missing:
        raise ValueError(
            f"{len(missing)} kept samples have no token advantages (e.g. {missing[:3]}); the "
            "value stage must run on the same scored records as the policy stage"
        )
    return out, {"samples/total": float(n_all), "samples/filtered": float(n_all - len(out))}


def sample_from_trajectory(traj, *, advantage: float = 0.0, policy_id: str | None = None,
                           sample_id: str = "", token_rewards=None) -> TraceSample:
    """A :class:`TraceSample` of a :class:`tracerl.sampling.Trajectory` (in-memory loops):
    the ids, steps, log-probs and decoding record (attention, block size) as sampled."""
    return TraceSample(
        prompt_ids=traj.prompt_ids, response_ids=traj.response_ids,
        decode_steps=traj.decode_steps, response_len=traj.response_len, advantage=advantage,
        logprobs=traj.logprobs, token_rewards=token_rewards, policy_id=policy_id,
        sample_id=sample_id, attention=traj.attention, block_size=traj.block_size)


def read_scored(path: str | os.PathLike,
                token_advantages: dict[tuple[str, int], list[float]] | None = None
                ) -> tuple[list[TraceSample], list[tuple[str, int]], dict[str, float]]:
    """Read a SCORED parquet: ``(kept samples, their keys (task_id, sample_index), counts)``."""
    df = read_parquet(path, "scored")
    total = df.height
    df = df.filter(pl.col("kept").fill_null(False))
    samples, _ = samples_from_frame(df, kept_only=False, token_advantages=token_advantages)
    keys = list(zip(df["task_id"].to_list(), df["sample_index"].to_list()))
    return samples, keys, {"samples/total": float(total),
                           "samples/filtered": float(total - len(samples))}


def write_token_advantages(path: str | os.PathLike, keys: list[tuple[str, int]],
                           advantages: list[list[float] | None],
                           returns: list[list[float] | None]) -> Path:
    """Write the value stage's per-token advantages and returns (skipped samples omitted)."""
    rows = [(k[0], k[1], a, r) for k, a, r in zip(keys, advantages, returns) if a is not None]
    df = pl.DataFrame(rows, schema=ADV_SCHEMA, orient="row")
    path = Path(path)
    df.write_parquet(path)
    return path


def read_token_advantages(path: str | os.PathLike) -> dict[tuple[str, int], list[float]]:
    df = pl.read_parquet(path)
    bad = [c for c, t in ADV_SCHEMA.items() if df.schema.get(c) != t]
    if bad:
        raise ValueError(f"{path}: not a token-advantage file (columns {bad} missing or mistyped)")
    return {(t, int(i)): list(a) for t, i, a in
            zip(df["task_id"], df["sample_index"], df["token_advantages"])}


def read_sft_samples(path: str | os.PathLike, tokenizer=None, *, eos_id: int | None = None,
                     pad_id: int | None = None, block_size: int | None = None,
                     fill_to: int | None = None,
                     file_name: str = "sft.parquet") -> list[TraceSample]:
    """SFT examples from a parquet (or a folder holding ``file_name``).

    Block models get the response right-padded with ``pad_id`` to the end of its last
    block (the sampler decodes whole blocks); pads are context, never trained.

    ``fill_to`` (full-attention models): the response right-padded with EOS to ``fill_to``
    tokens, and the EOS tokens trained, as LLaDA's SFT does (Nie et al. 2025, "Large
    Language Diffusion Models", arXiv 2502.09992, section 2.3). The sampler decodes a
    canvas of ``max_tokens`` masks after the prompt, and a bidirectional model sees how
    many masks follow; trained on unpadded responses it reads the canvas's end as the
    response's end and writes a response as long as the canvas.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / file_name).is_file():
            raise FileNotFoundError(
                f"no {file_name} in {path} (it holds {sorted(p.name for p in path.iterdir())}); "
                "pass the SFT parquet itself or a folder with sft.parquet")
        path = path / file_name
    if not path.is_file():
        raise FileNotFoundError(f"SFT data not found: {path}")
    df = pl.read_parquet(path)
    if "prompt_ids" not in df.columns:
        resp_col = next((c for c in ("response", "reference_solution") if c in df.columns), None)
        if "prompt" not in df.columns or resp_col is None or tokenizer is None:
            raise ValueError(
                f"{path}: SFT data needs columns prompt_ids + response_ids (token ids), or "
                f"prompt + response/reference_solution (text, with a tokenizer); got {df.columns}"
            )
        from tracerl.data import render_prompt

        eos = eos_id if eos_id is not None else tokenizer.eos_token_id
        p_ids, r_ids = [], []
        for prompt, resp in zip(df["prompt"], df[resp_col]):
            p_ids.append(render_prompt(tokenizer, prompt))
            r_ids.append(list(tokenizer.encode(resp, add_special_tokens=False)) + [eos])
        df = pl.DataFrame({"prompt_ids": p_ids, "response_ids": r_ids})
    steps = df["decode_steps"].to_list() if "decode_steps" in df.columns else [None] * df.height
    fill_id = eos_id if eos_id is not None else getattr(tokenizer, "eos_token_id", None)
    if fill_to and fill_id is None:
        raise ValueError("fill_to pads with EOS: pass eos_id (or a tokenizer)")
    out = []
    for i, (p, r, st) in enumerate(zip(df["prompt_ids"], df["response_ids"], steps)):
        p, r = list(p), list(r)
        if fill_to and st is None and len(r) < fill_to:
            r = r + [fill_id] * (fill_to - len(r))
        n = len(r)
        if block_size and pad_id is not None and st is None:
            r = r + [pad_id] * ((-(len(p) + n)) % block_size)
        out.append(TraceSample(prompt_ids=p, response_ids=r, decode_steps=st, response_len=n,
                               sample_id=f"sft/{i}"))
    return out


def trainer_state_dir(path: str | os.PathLike) -> Path:
    """Where the trainer state of the stage folder (or checkpoint folder) ``path`` lives."""
    path = Path(path)
    if (path / "trainer_state").is_dir():
        return path / "trainer_state"
    return path.parent / "trainer_state" if path.name in CHECKPOINT_SUBDIRS else path / "trainer_state"


def pick(cls, section, **overrides):
    """Build dataclass ``cls`` from the same-named fields of ``section`` (a params section)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: getattr(section, k) for k in names if hasattr(section, k)}
    kw.update(overrides)
    return cls(**kw)

"""Rollouts -> scored rows: correctness, reward, group advantage, kept flag, metrics.

What the reward stage computes (spec section 3.2/3.3, with the fixes of DESIGN.md):
math responses are verified with math-verify, a response that hit the token budget
(``finish_reason == "length"``) is wrong when ``overlong_is_wrong``; code responses run in
the sandbox (reward = fraction of tests passed). Advantages are group z-scores per task
(:mod:`tracerl.rewards.advantages`). Rows whose task is unknown or has neither answer
nor tests are kept in the table (``kept = False``, reward 0) and counted, never a crash.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import polars as pl

from tracerl.data.records import TaskRecord
from tracerl.rewards.advantages import compute_group_advantages
from tracerl.rewards.code import score_code_batch
from tracerl.rewards.math_answers import score_math
from tracerl.rewards.process import Judge, process_rewards
from tracerl.rewards.sandbox import SandboxLimits, limits_from


def score_rollouts(
    rollouts: pl.DataFrame,
    tasks: dict[str, TaskRecord],
    *,
    group_filter: str = "zero_variance",
    filter_low: float = 0.2,
    filter_high: float = 0.8,
    overlong_is_wrong: bool = True,
    verify_timeout_s: float = 5.0,
    code_limits: SandboxLimits | None = None,
    code_workers: int = 4,
    code_allow_unsandboxed: bool = False,
    estimator: str = "zscore",
    judge: Judge | None = None,
    decode: Callable[[Sequence[int]], str] | None = None,
    process_chunk_len: int = 200,
) -> tuple[pl.DataFrame, dict[str, float]]:
    """Score every rollout row and compute group advantages.

    Args:
        rollouts: rows in the ROLLOUT schema (``task_id``, ``response_text``,
            ``response_ids``, ``finish_reason``, ...).
        tasks: task records by ``task_id``.
        code_allow_unsandboxed: grade code without the sandbox's isolation where it is
            missing (unsafe; otherwise :class:`~tracerl.rewards.sandbox.SandboxUnavailable`).
        judge, decode: the process reward (LLM judge) and the policy's id -> text
            decoder; with a judge, ``token_rewards`` holds each valid response's per-token
            process reward over its ``response_len`` tokens (the value model's GAE reads
            it instead of the outcome reward), else it is null.

    Returns:
        ``(scored, metrics)``: ``scored`` is ``rollouts`` plus ``correct``, ``reward``,
        ``advantage``, ``kept`` and ``token_rewards``; metrics are ``accuracy``,
        ``mean_response_tokens``, ``filtered_group_fraction``, ``zero_variance_fraction``
        and counts (``num_responses``, ``num_groups``, ``kept_responses``,
        ``overlong_responses``, ``empty_responses``, ``no_answer_responses``,
        ``skipped_unknown_task``, ``skipped_invalid_task``).
    """
    n = rollouts.height
    ids = rollouts["task_id"].to_list()
    texts = rollouts["response_text"].to_list()
    finish = rollouts["finish_reason"].to_list()
    correct = np.zeros(n, dtype=bool)
    reward = np.zeros(n, dtype=np.float64)
    valid = np.zeros(n, dtype=bool)
    counts = dict.fromkeys(("skipped_unknown_task", "skipped_invalid_task", "overlong_responses",
                            "empty_responses", "no_answer_responses"), 0)
    code_rows: list[int] = []
    t_grade = time.perf_counter()
    for i in range(n):
        task = tasks.get(ids[i])
        text = texts[i] if isinstance(texts[i], str) else ""
        counts["empty_responses"] += int(not text.strip())
        counts["overlong_responses"] += int(finish[i] == "length")
        if task is None:
            counts["skipped_unknown_task"] += 1
            continue
        if task.problems():
            counts["skipped_invalid_task"] += 1
            continue
        valid[i] = True
        if task.tests is not None:
            code_rows.append(i)
            continue
        s = score_math(text, task.answer, truncated=finish[i] == "length",
                       overlong_is_wrong=overlong_is_wrong, timeout_s=verify_timeout_s)
        counts["no_answer_responses"] += int(s.reason == "no_answer")
        correct[i], reward[i] = s.correct, float(s.correct)
    if code_rows:
        scores = score_code_batch([texts[i] for i in code_rows],
                                  [tasks[ids[i]].tests for i in code_rows],  # type: ignore[misc]
                                  code_limits, code_workers,
                                  allow_unsandboxed=code_allow_unsandboxed)
        for i, s in zip(code_rows, scores):
            correct[i], reward[i] = s.correct, s.reward
            counts["no_answer_responses"] += int(s.result is None)
    grade_seconds = time.perf_counter() - t_grade
    vidx = np.flatnonzero(valid)
    g = compute_group_advantages(reward[vidx], np.asarray(ids, dtype=object)[vidx].astype(str),
                                 correct[vidx], estimator=estimator, group_filter=group_filter,
                                 low=filter_low, high=filter_high)
    adv = np.zeros(n)
    kept = np.zeros(n, dtype=bool)
    adv[vidx], kept[vidx] = g.advantages, g.kept
    # response_len counts the tokens through EOS (the id lists run to the end of the block)
    lengths = (rollouts["response_len"] if "response_len" in rollouts.columns
               else rollouts["response_ids"].list.len()).to_numpy() if n else np.zeros(0)
    tok_rewards: list[list[float] | None] = [None] * n
    if judge is not None and vidx.size:
        if decode is None:
            raise ValueError("a process-reward judge needs decode (the policy's ids -> text)")
        tok_rewards = _process_token_rewards(rollouts, tasks, vidx, correct, judge, decode,
                                             process_chunk_len, tok_rewards)
    scored = rollouts.with_columns(
        pl.Series("correct", correct, dtype=pl.Boolean),
        pl.Series("reward", reward, dtype=pl.Float32),
        pl.Series("advantage", adv, dtype=pl.Float32),
        pl.Series("kept", kept, dtype=pl.Boolean),
        pl.Series("token_rewards", tok_rewards, dtype=pl.List(pl.Float32)),
    )
    metrics = {
        "accuracy": float(correct[vidx].mean()) if vidx.size else 0.0,
        "mean_reward": float(reward[vidx].mean()) if vidx.size else 0.0,
        "mean_response_tokens": float(lengths.mean()) if n else 0.0,
        "num_responses": n,
        # wall seconds of grading (math verification and the code sandbox)
        "grade_seconds": grade_seconds,
        **g.metrics,
        **counts,
    }
    # per task source (arithmetic, code, ...): the per-domain curves of a mixed pool
    src = np.asarray([tasks[t].source if t in tasks else "" for t in ids], dtype=object)
    for name in sorted({x for x in src[vidx]}):
        rows = vidx[src[vidx] == name]
        metrics[f"accuracy_{source_key(name)}"] = float(correct[rows].mean())
    return scored, metrics


def grading_options(reward) -> dict:
    """:func:`score_rollouts`'s grading arguments from the reward params (``params.reward``,
    the keys of :data:`tracerl.config.GRADING_PARAMS`): how correctness is decided, the
    same for training rewards, held-out evaluation and SFT validation."""
    return dict(overlong_is_wrong=reward.overlong_is_wrong,
                verify_timeout_s=reward.verify_timeout_s,
                code_limits=limits_from(reward.code_timeout_s, reward.code_memory_mb),
                code_workers=reward.code_workers,
                code_allow_unsandboxed=reward.unsafe_allow_unsandboxed_code)


def source_key(source: str) -> str:
    """A task source as a metric-key suffix (``rg:chain_sum`` -> ``rg_chain_sum``)."""
    return "".join(c if c.isalnum() or c == "_" else "_" for c in source)


def _process_token_rewards(rollouts: pl.DataFrame, tasks: dict[str, TaskRecord], vidx: np.ndarray,
                           correct: np.ndarray, judge: Judge,
                           decode: Callable[[Sequence[int]], str], chunk_len: int,
                           out: list[list[float] | None]) -> list[list[float] | None]:
    """Per-token process rewards of the valid rows (over their ``response_len`` tokens)."""
    rows = [int(i) for i in vidx]
    ids = rollouts["task_id"].to_list()
    resp = rollouts["response_ids"].to_list()
    steps = rollouts["decode_steps"].to_list()
    lens = (rollouts["response_len"].to_list() if "response_len" in rollouts.columns
            else [len(r) for r in resp])
    blocks = (rollouts["block_size"].to_list() if "block_size" in rollouts.columns
              else [1] * rollouts.height)
    r = process_rewards(
        judge, [tasks[ids[i]].prompt for i in rows], [tasks[ids[i]].answer or "" for i in rows],
        [resp[i][:lens[i]] for i in rows], [steps[i][:lens[i]] for i in rows],
        [bool(correct[i]) for i in rows], [ids[i] for i in rows], decode,
        chunk_len=chunk_len, block_size=[int(blocks[i]) for i in rows])
    for i, tr in zip(rows, r):
        out[i] = tr if lens[i] > 0 else None
    return out

"""Benchmark evaluation with the decoding configuration locked next to every score.

dLLM scores move with block size, steps, threshold, remasking strategy, temperature and
token budget (static vs dynamic decoding in the TraceRL paper's tables, Wang et al. 2025,
Table 2). :func:`evaluate_tasks` therefore returns each score together with the exact
:class:`~tracerl.sampling.SamplingConfig` that produced it.

Metrics:

- ``avg@k``: mean correctness over all k responses of all tasks (the reference's
  ``acc``, spec section 9);
- ``pass@k``: the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language
  Models Trained on Code"), ``1 - C(n-c, k) / C(n, k)`` per task, averaged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from math import comb

import polars as pl
import torch

from tracerl.data import TaskRecord, render_prompt
from tracerl.sampling import SamplingConfig, generate, trajectories_to_frame


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one task with ``n`` samples of which ``c`` are correct.

    Example:
        >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 4), pass_at_k(4, 0, 2)
        (0.25, 1.0, 0.0)
        >>> round(pass_at_k(4, 1, 2), 4)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        0.5
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def summarize(scored: pl.DataFrame, pass_ks: Sequence[int]) -> dict[str, float]:
    """avg@k, pass@k and lengths of a scored frame (``task_id``, ``correct``, ``response_len``)."""
    per_task = scored.group_by("task_id").agg(
        pl.len().alias("n"), pl.col("correct").fill_null(False).sum().alias("c"))
    out = {
        "accuracy": float(scored["correct"].fill_null(False).mean() or 0.0),  # avg@k
        "tasks": float(per_task.height),
        "responses": float(scored.height),
        "mean_response_tokens": float(scored["response_len"].mean() or 0.0),
        "length_cut_fraction": float((scored["finish_reason"] == "length").mean() or 0.0),
        # forward passes per response token (through EOS): what larger blocks and dynamic
        # decoding save; block-tail positions after EOS are not counted as output
        "forward_per_token": float(scored["num_forward"].sum()
                                   / max(int(scored["response_len"].sum()), 1)),
    }
    for k in pass_ks:
        vals = [pass_at_k(int(n), int(c), k) for n, c in per_task.select("n", "c").iter_rows()]
        out[f"pass@{k}"] = float(sum(vals) / max(len(vals), 1))
    return out


def _accuracy_by(scored: pl.DataFrame, label: dict[str, str]) -> dict[str, float]:
    """avg@k per group of tasks: ``{label: accuracy}`` over the rows whose task has one."""
    if not label or scored.height == 0:
        return {}
    df = scored.select("task_id", pl.col("correct").fill_null(False)).with_columns(
        label=pl.col("task_id").replace_strict(label, default=None, return_dtype=pl.String))
    per = df.filter(pl.col("label").is_not_null()).group_by("label").agg(pl.col("correct").mean())
    return {k: float(a) for k, a in sorted(per.iter_rows())}


def accuracy_by_level(scored: pl.DataFrame, tasks: Sequence[TaskRecord]) -> dict[str, float]:
    """avg@k per task difficulty level: ``{"level<d>_accuracy": ...}`` (levels >= 0 only).

    >>> df = pl.DataFrame({"task_id": ["a", "a", "b"], "correct": [True, False, True]})
    >>> accuracy_by_level(df, [TaskRecord("a", "p", "s", "1", difficulty=6),
    ...                        TaskRecord("b", "q", "s", "2", difficulty=7)])
    {'level6_accuracy': 0.5, 'level7_accuracy': 1.0}
    """
    return _accuracy_by(scored, {t.task_id: f"level{t.difficulty}_accuracy" for t in tasks
                                 if t.difficulty is not None and t.difficulty >= 0})


def accuracy_by_source(scored: pl.DataFrame, tasks: Sequence[TaskRecord]) -> dict[str, float]:
    """avg@k per task source when the tasks come from more than one (a mixed pool):
    ``{"accuracy_<source>": ...}``; ``{}`` for a single source.

    >>> df = pl.DataFrame({"task_id": ["a", "b", "b"], "correct": [True, False, True]})
    >>> accuracy_by_source(df, [TaskRecord("a", "p", "arithmetic", "1"),
    ...                         TaskRecord("b", "q", "code", None, tests={"tests": []})])
    {'accuracy_arithmetic': 1.0, 'accuracy_code': 0.5}
    """
    from tracerl.rewards.scoring import source_key

    if len({t.source for t in tasks}) < 2:
        return {}
    return _accuracy_by(scored, {t.task_id: f"accuracy_{source_key(t.source)}" for t in tasks})


def evaluate_tasks(
    model,
    tokenizer,
    tasks: Sequence[TaskRecord],
    cfg: SamplingConfig,
    *,
    k: int,
    pass_ks: Sequence[int],
    score: Callable[[pl.DataFrame], pl.DataFrame],
    seed: int = 0,
    policy_id: str = "",
) -> tuple[dict, pl.DataFrame]:
    """Sample ``k`` responses per task with ``cfg`` and score them.

    Args:
        score: adds a boolean ``correct`` column to a ROLLOUT frame (e.g. a partial of
            :func:`tracerl.rewards.scoring.score_rollouts` returning the frame).

    Returns:
        ``(result, scored)``: ``result`` holds the metrics of :func:`summarize` and
        ``decoding`` (the full config as a dict); ``scored`` is the scored frame.
    """
    if not tasks:
        raise ValueError("no tasks to evaluate")
    prompts, ids, idx = [], [], []
    for t in tasks:
        p = render_prompt(tokenizer, t.prompt)
        for j in range(k):
            prompts.append(p)
            ids.append(t.task_id)
            idx.append(j)
    with torch.no_grad():
        trajs = generate(model, prompts, cfg, generator=torch.Generator().manual_seed(seed))
    frame = trajectories_to_frame(trajs, ids, idx, policy_id, tokenizer)
    scored = score(frame)
    result = summarize(scored, pass_ks)
    result["k"] = k
    result["decoding"] = dataclasses.asdict(cfg)
    return result, scored

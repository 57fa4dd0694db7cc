"""Stage ``curriculum``: pass rates of the last iterations -> pool and schedule of the next.

Inputs: ``data`` (prepare's ``train.parquet``, for task difficulties), ``scored`` (the
reward folders of the last ``curriculum.window`` iterations, oldest first, each with
``scored.parquet``), ``curriculum`` (the previous decision; absent at iteration 0).
Output: ``decision.json`` (a :class:`tracerl.curriculum.CurriculumDecision`), which the
next iteration's rollout reads for its difficulty levels, excluded tasks, block size and
token budget.
"""

from __future__ import annotations

import json
import sys

import polars as pl

from tracerl.curriculum import TaskResult, plan_next
from tracerl.pipeline.artifacts import stage_output
from tracerl.pipeline.resolve import (
    curriculum_decision,
    curriculum_policy,
    curriculum_rule,
    schedule_shape,
)
from tracerl.pipeline.stage_cli import load_stage_params, parse_stage_args
from tracerl.schemas import read_parquet

DECISION = "decision.json"


def task_results(scored: pl.DataFrame, tasks: pl.DataFrame) -> list[TaskResult]:
    """Per-task ``passed``/``total`` of one iteration, with difficulties from ``tasks``."""
    g = (scored.group_by("task_id")
         .agg(pl.col("correct").fill_null(False).sum().alias("passed"), pl.len().alias("total"))
         .join(tasks.select("task_id", "difficulty"), on="task_id", how="left")
         .sort("task_id"))
    return [TaskResult(r["task_id"], int(r["difficulty"] if r["difficulty"] is not None else -1),
                       int(r["passed"]), int(r["total"])) for r in g.iter_rows(named=True)]


def main(argv: list[str] | None = None) -> int:
    args = parse_stage_args(argv, "curriculum")
    p = load_stage_params(args.params, "curriculum")
    it = args.iteration or 0
    policy, rule, shape = curriculum_policy(p), curriculum_rule(p), schedule_shape(p)
    prev_dir = args.input("curriculum")
    prev = curriculum_decision(p, prev_dir)
    tasks = read_parquet(args.require("data") / "train.parquet", "task")
    history = [task_results(read_parquet(d / "scored.parquet", "scored"), tasks)
               for d in args.inputs.get("scored", [])]
    decision = plan_next(policy, history, iteration=it, level=prev.level, rule=rule,
                         exclude=prev.exclude, held=prev.held, **shape)
    with stage_output(args.out, stage="curriculum") as out:
        (out.dir / DECISION).write_text(json.dumps(decision.to_dict(), indent=2))
        out.metrics.update({
            "pass_rate": decision.pass_rate, "level": decision.level,
            "block_size": decision.schedule.block_size,
            "max_tokens": decision.schedule.max_tokens, "retired": len(decision.exclude),
        })
    print(f"curriculum[{it}] -> iteration {decision.iteration}: level {decision.level} "
          f"({decision.reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Reward stage: rollouts.parquet + tasks.parquet -> scored.parquet (+ metrics).

    python -m stages.reward --params params.yaml --rollouts R.parquet --tasks T.parquet --out DIR

Reads ``params.reward``; the library (:func:`tracerl.rewards.score_rollouts`) computes.
"""

from __future__ import annotations

import argparse
import sys

from tracerl.config import load_params
from tracerl.data import tasks_from_frame
from tracerl.pipeline.artifacts import stage_output
from tracerl.rewards import limits_from, score_rollouts
from tracerl.schemas import read_parquet, write_parquet


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="stages.reward", description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--rollouts", required=True, help="rollouts.parquet (ROLLOUT schema)")
    ap.add_argument("--tasks", required=True, help="tasks.parquet (TASK schema)")
    ap.add_argument("--out", required=True, help="output folder")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    p = load_params(args.params).reward
    rollouts = read_parquet(args.rollouts, "rollout")
    tasks = {t.task_id: t for t in tasks_from_frame(read_parquet(args.tasks, "task"))}
    scored, metrics = score_rollouts(
        rollouts, tasks,
        group_filter=p.group_filter, filter_low=p.filter_low, filter_high=p.filter_high,
        overlong_is_wrong=p.overlong_is_wrong, verify_timeout_s=p.verify_timeout_s,
        code_limits=limits_from(p.code_timeout_s, p.code_memory_mb), code_workers=p.code_workers,
    )
    with stage_output(args.out, stage="reward") as o:
        write_parquet(scored, o.dir / "scored.parquet", "scored")
        o.metrics.update(metrics)
    print(f"reward: accuracy={metrics['accuracy']:.3f} responses={metrics['num_responses']} "
          f"kept={metrics['kept_responses']} filtered_groups={metrics['filtered_groups']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stage ``prepare``: task sources -> RL train pool, held-out set, SFT data.

    python -m stages.prepare --params params.yaml --out DIR

Reads ``params.data`` and ``run.seed``. Writes into ``--out``:

- ``train.parquet``: the RL task pool (schema ``task``, split ``train``), drawn over the
  difficulty levels ``data.min_difficulty..max_difficulty``;
- ``heldout.parquet``: ``data.heldout_size`` held-out tasks (split ``heldout``; the
  generator keeps it disjoint from the train split) over the same levels;
- ``sft.parquet``: ``prompt`` (user message) + ``reference_solution`` (ending with
  ``\\boxed{}``, in ``style`` = ``data.sft_style``, or the boxed answer alone for a
  ``data.sft_answer_fraction`` of the examples) for SFT, from train-split tasks drawn
  with another seed;
- metrics: counts per split and per level.
"""

from __future__ import annotations

import random
import sys

import polars as pl

from tracerl.data import generate_tasks, reference_solution, tasks_to_frame, validate_tasks
from tracerl.pipeline.artifacts import stage_output
from tracerl.pipeline.stage_cli import load_stage_params, parse_stage_args
from tracerl.schemas import write_parquet


def main(argv: list[str] | None = None) -> int:
    a = parse_stage_args(argv, "prepare")
    params = load_stage_params(a.params, "prepare")
    d, seed = params.data, params.run.seed
    levels = list(range(d.min_difficulty, d.max_difficulty + 1))
    train = generate_tasks(d.generator, d.train_size, difficulty=levels, seed=seed, split="train")
    heldout = generate_tasks(d.generator, d.heldout_size, difficulty=levels, seed=seed,
                             split="heldout")
    sft = generate_tasks(d.generator, d.sft_size, difficulty=levels, seed=seed + 1, split="train")
    for tasks in (train + heldout, sft):  # SFT and the RL pool may share train problems
        validate_tasks(tasks)
    pick = random.Random(f"sft-style|{seed}")
    styles = ["answer" if pick.random() < d.sft_answer_fraction else d.sft_style for _ in sft]
    with stage_output(a.out, stage="prepare") as o:
        write_parquet(tasks_to_frame(train), o.dir / "train.parquet", "task")
        write_parquet(tasks_to_frame(heldout), o.dir / "heldout.parquet", "task")
        pl.DataFrame({
            "task_id": [t.task_id for t in sft],
            "prompt": [t.prompt for t in sft],
            "reference_solution": [reference_solution(t, s) for t, s in zip(sft, styles)],
            "style": styles,
            "difficulty": [t.difficulty for t in sft],
        }).write_parquet(o.dir / "sft.parquet")
        o.metrics.update({"train_tasks": len(train), "heldout_tasks": len(heldout),
                          "sft_examples": len(sft),
                          "sft_answer_only": sum(s == "answer" for s in styles)})
        for lv in levels:
            o.metrics[f"heldout_level_{lv}"] = sum(t.difficulty == lv for t in heldout)
    print(f"prepare: {len(train)} train, {len(heldout)} held-out, {len(sft)} SFT examples "
          f"-> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

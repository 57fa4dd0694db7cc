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
- ``skipped.jsonl``: every record left out (reason, task id, file and line), empty when
  none was;
- metrics: counts per split and per level, ``skipped_<reason>`` counts.

``data.generator: file`` reads ``data.train_file`` / ``data.heldout_file`` instead of a
generator. Bad records (unreadable, no answer, train prompt also held out) are skipped
and counted. Prompts too long for ``model`` with the run's ``rollout.max_tokens`` and
curriculum schedules stay in the outputs (which depend on ``data`` and ``run.seed``
only; rollout and evaluate skip and count them) but are checked here: past
``data.max_skip_fraction``, skipped now or later, the stage fails naming the files and
task ids, before any training (:mod:`tracerl.data.prepare`).
"""

from __future__ import annotations

import sys

import polars as pl

from tracerl.config import decoding_budgets
from tracerl.data import reference_solution, tasks_to_frame
from tracerl.data.prepare import prepare_tasks
from tracerl.data.skips import SKIPPED_FILE
from tracerl.limits import prompt_fit
from tracerl.pipeline.artifacts import stage_output
from tracerl.pipeline.stage_cli import load_stage_params, parse_stage_args
from tracerl.schemas import write_parquet


def main(argv: list[str] | None = None) -> int:
    a = parse_stage_args(argv, "prepare")
    params = load_stage_params(a.params, "prepare")
    d, seed, m = params.data, params.run.seed, params.model
    levels = list(range(d.min_difficulty, d.max_difficulty + 1))
    budgets = decoding_budgets(params)
    prep = prepare_tasks(
        d.generator, train_size=d.train_size, heldout_size=d.heldout_size,
        sft_size=d.sft_size, levels=levels, seed=seed, sft_style=d.sft_style,
        sft_answer_fraction=d.sft_answer_fraction, max_skip_fraction=d.max_skip_fraction,
        train_file=d.train_file, heldout_file=d.heldout_file,
        fits=prompt_fit(m.init, m.max_position_embeddings, budgets))
    train, heldout, sft, styles = prep.train, prep.heldout, prep.sft, prep.sft_styles
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
        prep.skipped.write(o.dir / SKIPPED_FILE)
        o.metrics.update({"train_tasks": len(train), "heldout_tasks": len(heldout),
                          "sft_examples": len(sft),
                          "sft_answer_only": sum(s == "answer" for s in styles),
                          **prep.skipped.metrics()})
        for lv in levels:
            o.metrics[f"heldout_level_{lv}"] = sum(t.difficulty == lv for t in heldout)
    if prep.too_long:
        print(f"prepare: {len(prep.too_long)} prompts do not fit the model's context with "
              f"the run's budget; rollout and evaluate will skip them: "
              f"{', '.join(prep.too_long[:10])}{' ...' if len(prep.too_long) > 10 else ''}")
    print(f"prepare: {len(train)} train, {len(heldout)} held-out, {len(sft)} SFT examples, "
          f"{len(prep.skipped)} records skipped -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

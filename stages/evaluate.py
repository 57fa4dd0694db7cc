"""Stage ``evaluate``: held-out benchmarks of a policy, static and dynamic decoding.

    python -m stages.evaluate --params params.yaml --out DIR [--iteration I]
        --input data=PREPARE_DIR --input policy=CHECKPOINT_OR_STAGE_DIR [--input curriculum=DIR]

Reads ``params.evaluate`` (benchmarks, k, pass@k, strategies, temperature) with the block
size, steps and budget of ``model``/``rollout`` (or the curriculum's schedule at this
iteration; ``evaluate.max_tokens`` fixes the budget). Writes ``eval.json`` (every score next to its full decoding config),
``samples_<benchmark>_<strategy>.parquet`` (scored responses) and metrics: ``accuracy``
(held-out avg@k of the first strategy, the headline) and ``<benchmark>.<strategy>.<metric>``.
Each size of ``evaluate.block_sizes`` adds ``<benchmark>.b<size>.<strategy>.<metric>``
(the one in force is not decoded twice: its scores are repeated under its tag) and, other
than the one in force, ``samples_<benchmark>_b<size>_<strategy>.parquet``.
A task whose prompt does not fit the model's context with the budget is skipped and
counted by task id (``<benchmark>.skipped_too_long``, ``skipped_<benchmark>.jsonl``);
past ``data.max_skip_fraction`` of a benchmark the stage fails.
"""

from __future__ import annotations

import json
import sys

from tracerl.data import (
    HF_DATASETS,
    humaneval_tasks,
    load_hf_tasks,
    render_prompt,
    tasks_from_frame,
)
from tracerl.data.skips import Skipped, skip_too_long
from tracerl.evaluation import accuracy_by_level, accuracy_by_source, evaluate_tasks
from tracerl.models import weights_digest
from tracerl.pipeline.artifacts import stage_output
from tracerl.pipeline.resolve import curriculum_decision, policy_from_params, sampling_config
from tracerl.pipeline.stage_cli import load_stage_params, parse_stage_args
from tracerl.rewards.scoring import grading_options, score_rollouts
from tracerl.schemas import read_parquet, write_parquet


def main(argv: list[str] | None = None) -> int:
    a = parse_stage_args(argv, "evaluate")
    p = load_stage_params(a.params, "evaluate")
    e = p.evaluate
    dec = curriculum_decision(p, a.input("curriculum"))
    model, tok = policy_from_params(a.input("policy") or p.model.init, p)
    suites = {}
    if "heldout" in e.benchmarks:
        held = read_parquet(a.require("data") / "heldout.parquet", "task")
        suites["heldout"] = tasks_from_frame(held.head(e.heldout_size))
    if "humaneval" in e.benchmarks:
        suites["humaneval"] = humaneval_tasks()
    for name in e.benchmarks:
        if name in HF_DATASETS:  # hub benchmarks (MATH500, GSM8K, ...): online only
            suites[name] = load_hf_tasks(name)[0]

    def score(frame, tasks):
        by_id = {t.task_id: t for t in tasks}
        scored, _ = score_rollouts(frame, by_id, group_filter="none",
                                   **grading_options(p.reward))
        return scored

    # tasks whose prompt does not fit the model's context are skipped and counted by id
    max_tokens = e.max_tokens or dec.schedule.max_tokens  # a fixed budget when set
    budget = [(b, max_tokens) for b in [dec.schedule.block_size, *e.block_sizes]]
    context = getattr(model.config, "max_position_embeddings", None)
    skipped = {}
    for name, tasks in suites.items():
        skipped[name] = Skipped(reasons=("too_long",))
        keep = skip_too_long([len(render_prompt(tok, t.prompt)) for t in tasks],
                             [t.task_id for t in tasks], context, budget, skipped[name])
        skipped[name].check(p.data.max_skip_fraction, f"evaluate {name}")
        suites[name] = [tasks[j] for j in keep]

    results: dict = {}
    pid = weights_digest(model)
    with stage_output(a.out, stage="evaluate") as o:
        for name, tasks in suites.items():
            o.metrics.update(skipped[name].metrics(f"{name}."))
            skipped[name].write(o.dir / f"skipped_{name}.jsonl")
            # the block in force first (its keys carry no block tag), then the extra sizes
            for b in [None, *(x for x in e.block_sizes if x != dec.schedule.block_size)]:
                tag = "" if b is None else f"b{b}"
                for strategy in e.strategies:
                    cfg = sampling_config(p, dec, block_size=b, strategy=strategy,
                                          temperature=e.temperature, top_k=e.top_k,
                                          top_p=e.top_p, max_tokens=max_tokens)
                    res, scored = evaluate_tasks(
                        model, tok, tasks, cfg, k=e.responses_per_task, pass_ks=e.pass_k,
                        score=lambda f, t=tasks: score(f, t), seed=p.run.seed, policy_id=pid)
                    res.update(accuracy_by_level(scored, tasks))
                    res.update(accuracy_by_source(scored, tasks))
                    key = ".".join(filter(None, [tag, strategy]))
                    results.setdefault(name, {})[key] = res
                    write_parquet(scored, o.dir / f"samples_{name}_{key.replace('.', '_')}.parquet",
                                  "scored")
                    # a listed size that is the one in force: its scores under its tag too,
                    # so every evaluation of a run has the same b<size> keys
                    tags = [key] + ([f"b{dec.schedule.block_size}.{strategy}"]
                                    if b is None and dec.schedule.block_size in e.block_sizes
                                    else [])
                    for k_, val in res.items():
                        if isinstance(val, (int, float)):
                            for t in tags:
                                o.metrics[f"{name}.{t}.{k_}"] = float(val)
                    print(f"evaluate[{name}/{key}]: avg@{e.responses_per_task} "
                          f"{res['accuracy']:.3f} over {int(res['tasks'])} tasks, "
                          f"{res['forward_per_token']:.2f} forwards/token")
        first = next(iter(results))
        o.metrics["accuracy"] = results[first][e.strategies[0]]["accuracy"]
        (o.dir / "eval.json").write_text(json.dumps(
            {"policy_id": pid, "iteration": a.iteration, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())


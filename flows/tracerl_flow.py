"""The Prefect flow ``tracerl`` (deployment ``iterate``): the whole TraceRL pipeline.

    prepare -> sft -> evaluate(SFT baseline)
    for i in iterations: rollout -> reward -> [value] -> policy -> curriculum
                         evaluate every run.eval_every iterations
    evaluate(final policy); register the final policy in the MLflow model registry

Each stage is a Prefect task that hands a planned :class:`StageCall` to the
:class:`Orchestrator` (resume, MLflow child run, runner, metrics). The flow only
sequences: it never touches tensors, tasks return artifact paths and numbers.

With ``rollout.shards`` > 1 the rollout runs as shard tasks submitted together (each
retried ``rollout.shard_retries`` times by Prefect), then a merge task writes the ordinary
rollout folder, bit-identical to one unsharded rollout (``docs/pipeline.md``).

Re-running after a crash continues at the first unfinished stage: a stage whose output
folder has a manifest stamped with the current plan's key is skipped. One MLflow parent
run per pipeline run (reopened on resume).

Entry points:

- ``prefect deployment run tracerl/iterate`` (see ``prefect.yaml``),
- ``python -m flows.tracerl_flow`` (runs the flow here; ``--stage rl`` runs one coarse
  DVC stage, ``--no-prefect`` runs the same sequence without Prefect).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

from tracerl.config import ConfigError, Params, load_params
from tracerl.pipeline.console import guard_console
from tracerl.pipeline.driver import Orchestrator, StageResult
from tracerl.pipeline.layout import Planner, RunLayout, StageCall, is_done, plan_all
from tracerl.pipeline.lock import RunLocked
from tracerl.pipeline.operator import current_restarts, restarts_exceeded
from tracerl.pipeline.registry import DVC_PARTS, STAGES, resource
from tracerl.pipeline.runners import make_runner
from tracerl.recipes import RecipeError
from tracerl.tracking import make_tracker

PARTS = ("all", *DVC_PARTS)  # "all" or one coarse DVC stage

Submit = Callable[[StageCall], StageResult]
SubmitMany = Callable[[list[StageCall], int], list[StageResult]]  # calls, retries


@task(cache_policy=NO_CACHE, retries=0)
def run_stage(orch: Orchestrator, call: StageCall) -> StageResult:
    """One stage invocation (skipped when its output is already complete)."""
    result = orch.run_call(call)
    get_run_logger().info(
        "%s %s -> %s (%.1f s)", call.label, "skipped (done)" if result.skipped else "ran",
        result.out, result.seconds,
    )
    return result


def _prefect_submit(orch: Orchestrator) -> Submit:
    def submit(call: StageCall) -> StageResult:
        return run_stage.with_options(task_run_name=call.label)(orch, call)

    return submit


def _prefect_submit_shards(orch: Orchestrator) -> SubmitMany:
    """Shards as concurrent Prefect tasks on the flow's task runner (threads; each shard's
    runner isolates it in its own process or container), each retried by Prefect."""
    def submit_many(calls: list[StageCall], retries: int) -> list[StageResult]:
        futures = [run_stage.with_options(task_run_name=c.label, retries=retries,
                                          retry_delay_seconds=0).submit(orch, c)
                   for c in calls]
        wait(futures)  # every shard ends (retries included) before a failure is raised
        return [f.result() for f in futures]

    return submit_many


def _serial_shards(submit: Submit) -> SubmitMany:
    """Without Prefect: the shards one after another (no retries)."""
    def submit_many(calls: list[StageCall], retries: int) -> list[StageResult]:
        return [submit(c) for c in calls]

    return submit_many


def run_rollout(orch: Orchestrator, planner: Planner, call: StageCall, submit: Submit,
                submit_many: SubmitMany) -> StageResult:
    """The rollout ``call``, split into ``rollout.shards`` shards run by ``submit_many``,
    then merged by ``submit`` (skipped as a whole when its merged output is done)."""
    spec = STAGES.get(call.stage)
    n = resource(spec, "shards", orch.params)
    if n <= 1 or orch.why_run(call) is None:
        return submit(call)
    t0 = time.perf_counter()
    shards, merge = planner.shards(call, n)
    submit_many(shards, resource(spec, "shard_retries", orch.params))
    res = submit(merge)
    res.seconds = time.perf_counter() - t0  # the shards ran side by side: wall time
    return res


def run_pipeline(orch: Orchestrator, planner: Planner, part: str, submit: Submit,
                 submit_many: SubmitMany | None = None) -> dict[str, Any]:
    """Run ``part`` of the pipeline by handing each planned call to ``submit``, in
    dependency order (the shards of a sharded rollout to ``submit_many``: default, one
    after another). Shared by the Prefect flow and the plain (``--no-prefect``) path.

    Returns a summary: the run folder, the final evaluation's metrics, the curves file.
    """
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; valid: {', '.join(PARTS)}")
    L, n = planner.layout, orch.params.run.iterations
    summary: dict[str, Any] = {"run_dir": str(L.root)}
    prep, sft = planner.prepare(), planner.sft()
    if part in ("all", "prepare"):
        submit(prep)
        orch.write_stage_metrics("prepare", prep.out)
    if part in ("all", "sft"):
        submit(sft)
        orch.write_stage_metrics("sft", sft.out)
    baseline = planner.evaluate(None)
    iter_calls = []
    for i in range(n):  # plan every iteration (keys chain through them)
        calls = planner.iteration(i)
        iter_calls.append((calls, planner.evaluate(i) if planner.eval_after(i) else None))
    if part in ("rl", "evaluate"):
        _require_done(part, [prep, sft])
    if part in ("all", "rl"):
        submit(baseline)
        for i, (calls, ev) in enumerate(iter_calls):
            t0 = time.perf_counter()
            results = [run_rollout(orch, planner, c, submit, submit_many or _serial_shards(submit))
                       if c.stage == "rollout" else submit(c) for c in calls]
            wall = time.perf_counter() - t0
            if ev is not None:
                submit(ev)
            fresh = not any(r.skipped for r in results)
            work = sum(r.seconds for r in results)
            row = orch.record_iteration(i, wall if fresh else None, work)
            summary["last_iteration"] = row
        orch.write_curves()
        orch.register_final(L.stage_dir("policy", n - 1))
    final = planner.evaluate(n - 1, final=True)
    if part == "evaluate":
        _require_done(part, [c for calls, _ in iter_calls for c in calls])
    if part in ("all", "evaluate"):
        res = submit(final)
        summary["heldout_accuracy"] = orch.write_final_metrics(final.out)
        summary["final_eval"] = res.metrics
    summary["curves"] = str(L.curves)
    summary["metrics"] = str(L.headline)
    summary["parent_run_id"] = orch.parent_run_id
    return summary


def _require_done(part: str, calls: list[StageCall]) -> None:
    missing = [c.label for c in calls if not is_done(c)]
    if missing:
        raise RuntimeError(
            f"cannot run part '{part}': upstream stages {missing} are not done for these "
            "params; run the earlier parts first (`dvc repro` runs them in order)"
        )


def build(params_path: str | Path = "params.yaml", run_name: str | None = None,
          iterations: int | None = None, runner: str | None = None,
          project_root: str | Path | None = None,
          package: str = "stages", recipe: str | None = None,
          seed: int | None = None) -> tuple[Params, Orchestrator, Planner, str]:
    """Load params (with a recipe's and the orchestration overrides), build layout,
    runner, tracker, planner.

    Returns ``(params, orchestrator, planner, plan_key)``; ``plan_key`` identifies the
    whole pipeline run (the key of its final evaluation).
    """
    root = Path(project_root or Path.cwd()).resolve()
    params_path = Path(params_path)
    if not params_path.is_absolute():
        params_path = root / params_path
    params = load_params(params_path, run_overrides(root, run_name, iterations, runner,
                                                    recipe, seed))
    layout = RunLayout.from_params(params, base=root)
    # shards run side by side: an in-process runner's shards run in subprocesses
    shard_kind = "subprocess" if params.run.runner == "inprocess" else params.run.runner
    orch = Orchestrator(params, params_path, layout,
                        make_runner(params.run.runner, project_root=root, params=params,
                                    package=package),
                        make_tracker(params.run.tracker, root),
                        shard_runner=make_runner(shard_kind, project_root=root, params=params,
                                                 package=package))
    plan_key = plan_all(params, layout)[-1].key
    return params, orch, Planner(params, layout), plan_key


def run_overrides(root: Path, run_name: str | None = None, iterations: int | None = None,
                  runner: str | None = None, recipe: str | None = None,
                  seed: int | None = None) -> dict[str, Any] | None:
    """The overrides of ``params.yaml`` a launch asks for: a recipe's
    (:mod:`tracerl.recipes`), a seed, then the run's name, iterations and runner. A recipe
    names the run after itself (``<recipe>``, ``<recipe>-s<seed>``) unless it or
    ``run_name`` says otherwise."""
    from tracerl.recipes import load_recipe, merge, seeded

    over: dict[str, Any] = load_recipe(recipe, root) if recipe else {}
    if seed is not None:
        over = merge(over, seeded(seed))
    run: dict[str, Any] = {}
    if recipe and "name" not in over.get("run", {}):
        run["name"] = recipe if seed is None else f"{recipe}-s{seed}"
    for key, val in (("name", run_name), ("iterations", iterations), ("runner", runner)):
        if val is not None:
            run[key] = val
    return merge(over, {"run": run}) if run or over else None


@flow(name="tracerl", log_prints=True)
def tracerl(params_path: str = "params.yaml", run_name: str | None = None,
            iterations: int | None = None, runner: str | None = None, part: str = "all",
            project_root: str | None = None, package: str = "stages",
            recipe: str | None = None, seed: int | None = None,
            max_restarts: int = 3) -> dict[str, Any]:
    """TraceRL pipeline: prepare -> sft -> RL iterations -> evaluate; see the module doc.

    Args:
        params_path: the ``params.yaml`` every stage reads.
        run_name: overrides ``run.name`` (the folder ``<runs_dir>/<run_name>``).
        iterations: overrides ``run.iterations``.
        runner: overrides ``run.runner`` (``inprocess``, ``subprocess``, ``container``).
        part: ``all`` or one coarse stage (``prepare``, ``sft``, ``rl``, ``evaluate``).
        project_root: the project folder (default: the working directory).
        package: the package of stage modules (``stages``; tests pass fakes).
        recipe: a named experiment, ``recipes/<recipe>.yaml`` (overrides of the params).
        seed: the run's seeds (``run``, ``sft``, ``policy``, ``value``).
        max_restarts: how often a deployment run whose process died may be restarted
            (``tracerl operator setup``'s automation restarts it; see
            :mod:`tracerl.pipeline.operator`).
    """
    guard_console()  # a killed worker (the reader of this console) must not end the run
    refused = restarts_exceeded(current_restarts(), max_restarts)
    if refused:
        raise RuntimeError(refused)
    _, orch, planner, plan_key = build(params_path, run_name, iterations, runner,
                                       project_root, package, recipe, seed)
    with orch.parent_run(plan_key, part=part):
        summary = run_pipeline(orch, planner, part, _prefect_submit(orch),
                               _prefect_submit_shards(orch))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.tracerl_flow", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--stage", default="all", choices=PARTS, help="pipeline part to run")
    ap.add_argument("--run-name", default=None)
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--runner", default=None, choices=["inprocess", "subprocess", "container"])
    ap.add_argument("--recipe", default=None, help="a named experiment (recipes/NAME.yaml)")
    ap.add_argument("--seed", type=int, default=None, help="run, sft, policy and value seed")
    ap.add_argument("--no-prefect", action="store_true",
                    help="run the same sequence without Prefect (no server needed)")
    # the package of stage modules; tests point it at fakes (also through the environment,
    # for commands DVC runs)
    ap.add_argument("--package", default=os.environ.get("TRACERL_STAGES_PACKAGE", "stages"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    try:
        # fail on bad params before any work (and before Prefect)
        load_params(a.params, run_overrides(Path.cwd(), recipe=a.recipe, seed=a.seed))
        if a.no_prefect:
            _, orch, planner, plan_key = build(a.params, a.run_name, a.iterations, a.runner,
                                               package=a.package, recipe=a.recipe, seed=a.seed)
            with orch.parent_run(plan_key, part=a.stage):
                summary = run_pipeline(orch, planner, a.stage, orch.run_call)
        else:
            summary = tracerl(a.params, a.run_name, a.iterations, a.runner, a.stage,
                              package=a.package, recipe=a.recipe, seed=a.seed)
    except (ConfigError, RecipeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunLocked as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    print_where_to_look(summary)
    return 0


def print_where_to_look(summary: dict[str, Any]) -> None:
    print("\n".join([
        "",
        f"run folder      {summary['run_dir']}",
        f"headline        {summary['metrics']}   (dvc metrics show)",
        f"learning curves {summary['curves']}   (tracerl plots: one offline page)",
        f"MLflow          parent run {summary.get('parent_run_id')}   "
        "(mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1)",
    ]))
    if "final_eval" in summary:
        print(f"final eval      {summary['final_eval']}")


if __name__ == "__main__":
    sys.exit(main())

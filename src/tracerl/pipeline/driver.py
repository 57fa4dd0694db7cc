"""Run planned stage calls: resume, tracking, timing, DVC metrics and learning curves.

The :class:`Orchestrator` is plain Python. The Prefect flow (``flows/tracerl_flow.py``)
wraps each :meth:`Orchestrator.run_call` in a task; the DVC stages call the same code
through the flow module's CLI. It never touches tensors: a call's result is its output
folder and the numbers of its ``metrics.json``.

For each call it

1. skips the call when its output is complete, stamped with the call's key, every file
   matches its manifest (size and sha256), and none of its inputs was written again in
   this run (resume); a damaged output is named and its stage runs again, and so does
   everything computed from it;
2. opens an MLflow child run of the pipeline's parent run (``mlflow.parentRunId``) and
   logs the stage's ``params.yaml`` sections;
3. runs the stage through the runner, passing the run ids in the environment;
4. checks the manifest and the declared outputs exist (the stage registry), stamps the key
   and the runner's wall time, logs ``metrics.json`` (to the child at
   ``step=iteration``, and to the parent as ``<stage>.<metric>``), the stage's seconds,
   the manifest, any ``*.html`` page (trajectory viewer) and checkpoint folders;
5. ends the child run FINISHED, or FAILED when the stage failed.

While the parent run is open the orchestrator holds the run folder's writer lock
(:mod:`tracerl.pipeline.lock`); child runs a killed stage left RUNNING are closed as
KILLED when the parent run is reopened.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracerl.pipeline.artifacts import MANIFEST, METRICS, is_complete, read_manifest, read_metrics
from tracerl.pipeline.layout import (
    DAMAGED,
    SECONDS_FIELD,
    UNREADABLE,
    RunLayout,
    StageCall,
    not_done_reason,
    params_read,
    stamp_key,
)
from tracerl.pipeline.lock import pid_alive, writer_lock
from tracerl.pipeline.registry import (
    DVC_PARTS,
    ITERATION_STAGES,
    STAGES,
    missing_metrics,
    missing_outputs,
)
from tracerl.pipeline.runners import InProcessRunner, Runner, StageFailed, SubprocessRunner
from tracerl.tracking import (
    PARENT_RUN_ENV,
    PARENT_TAG,
    RUN_ID_ENV,
    TRACKING_URI_ENV,
    MlflowTracker,
    Tracker,
    flatten_params,
    numeric_metrics,
)

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    """What a task returns: paths and numbers, never tensors."""

    label: str
    out: str
    skipped: bool
    seconds: float  # wall time of the runner call (0 when skipped)
    metrics: dict[str, Any] = field(default_factory=dict)


def git_sha(cwd: str | os.PathLike | None = None) -> str:
    """The project's commit (read-only ``git rev-parse``), or ``unknown``."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _clean_temp(out: Path) -> None:
    """Remove temp folders a killed stage left beside ``out`` (``.<name>.tmp-<pid>``):
    only those of this process or of a process that no longer runs (their writer)."""
    if out.parent.is_dir():
        for tmp in out.parent.glob(f".{out.name}.tmp-*"):
            pid = tmp.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
                continue
            shutil.rmtree(tmp, ignore_errors=True)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float))
    os.replace(tmp, path)


PART_TAG = "tracerl.part"
DVC_EXP_ENV = "DVC_EXP_NAME"  # set by `dvc exp run` for the commands of its stages
NOTE_TAG = "mlflow.note.content"  # a run's description: the top of its page in the MLflow UI
# params a registered policy version is tagged with (what a reader compares versions by)
REGISTRY_PARAMS = ("policy.method", "policy.lr", "policy.use_value", "policy.beta",
                   "rollout.strategy", "rollout.responses_per_task", "rollout.max_tokens")


def parts_label(parts: set[str]) -> str:
    """The parts of a pipeline run under one parent run, in order; ``all`` when complete.

    >>> parts_label({"sft", "prepare"}), parts_label({"all"}), parts_label(set(DVC_PARTS))
    ('prepare+sft', 'all', 'all')
    """
    if "all" in parts or parts >= set(DVC_PARTS):
        return "all"
    return "+".join(p for p in DVC_PARTS if p in parts)


def parent_run_name(run: str, plan_key: str, experiment: str = "") -> str:
    """The MLflow name of a pipeline's parent run: the run folder's name, the DVC
    experiment when ``dvc exp run`` runs it, and the plan key's first 8 characters (which
    params and code planned it), so the runs of different experiments differ by name.

    >>> parent_run_name("default", "3f2a1b9c77d0e1aa"), parent_run_name("default", "3f2a1b9c", "brisk-lynx")
    ('default 3f2a1b9c', 'default/brisk-lynx 3f2a1b9c')
    """
    return f"{run}/{experiment} {plan_key[:8]}" if experiment else f"{run} {plan_key[:8]}"


def headline(sft: Mapping[str, Any], final: Mapping[str, Any]) -> dict[str, Any]:
    """The result of a run in a few numbers: held-out accuracy of the SFT model and of the
    final policy, and the gain; then per benchmark and decoding strategy (the evaluate
    stage's ``<benchmark>.<strategy>.accuracy``, and ``<benchmark>.b<size>.<strategy>``
    at the extra block sizes) the same pair. ``sft`` or ``final`` may
    be empty (a run whose baseline is missing): its numbers are left out.

    >>> headline({"accuracy": 0.4, "heldout.static.accuracy": 0.4},
    ...          {"accuracy": 0.5, "heldout.static.accuracy": 0.5, "heldout.static.tasks": 9})
    {'heldout_accuracy': {'sft': 0.4, 'final_rl': 0.5, 'gain': 0.1}, 'accuracy': {'heldout': {'static': {'sft': 0.4, 'final_rl': 0.5}}}}
    """
    def pair(key: str) -> dict[str, float]:
        return {name: float(m[key]) for name, m in (("sft", sft), ("final_rl", final))
                if isinstance(m.get(key), (int, float))}

    top = pair("accuracy")
    if len(top) == 2:
        top["gain"] = round(top["final_rl"] - top["sft"], 6)
    per: dict[str, dict[str, dict[str, float]]] = {}
    for key in sorted({*sft, *final}):
        parts = key.split(".")
        if len(parts) >= 3 and parts[-1] == "accuracy":  # <bench>[.b<size>].<strategy>
            per.setdefault(parts[0], {})[".".join(parts[1:-1])] = pair(key)
    return {"heldout_accuracy": top, "accuracy": per}


def headline_markdown(head: Mapping[str, Any]) -> str:
    """The headline as a small markdown table (the parent run's and the model version's
    description).

    >>> print(headline_markdown({"heldout_accuracy": {"sft": 0.4, "final_rl": 0.5,
    ...                          "gain": 0.1}, "accuracy": {}}))
    held-out accuracy: SFT 0.400 -> final policy 0.500 (+0.100)
    <BLANKLINE>
    | benchmark | decoding | SFT | final |
    |---|---|---|---|
    """
    def fmt(x: Any) -> str:
        return f"{x:.3f}" if isinstance(x, (int, float)) else "-"

    top = head.get("heldout_accuracy", {})
    lines = [f"held-out accuracy: SFT {fmt(top.get('sft'))} -> final policy "
             f"{fmt(top.get('final_rl'))} ({top['gain']:+.3f})" if "gain" in top else
             f"held-out accuracy: SFT {fmt(top.get('sft'))}, final policy "
             f"{fmt(top.get('final_rl'))}", "", "| benchmark | decoding | SFT | final |",
             "|---|---|---|---|"]
    for bench, per in head.get("accuracy", {}).items():
        for strategy, pair in per.items():
            lines.append(f"| {bench} | {strategy} | {fmt(pair.get('sft'))} | "
                         f"{fmt(pair.get('final_rl'))} |")
    return "\n".join(lines)


def eval_curve(layout: RunLayout) -> list[dict[str, Any]]:
    """Held-out accuracy over the run, one row per finished evaluation, ``x`` = RL
    iterations done when it was evaluated: 0 for the SFT baseline, ``i + 1`` after
    iteration ``i``, the run's last for the final evaluation. ``model`` says which
    (``sft``, ``iter_<i>``, ``final``); the columns are the evaluate stage's accuracies."""
    found: list[tuple[int, str, Path]] = [(0, "sft", layout.baseline_eval)]
    for i in layout.iterations_done():
        found.append((i + 1, f"iter_{i}", layout.stage_dir("evaluate", i)))
    done = layout.iterations_done()
    if done:
        found.append((done[-1] + 1, "final", layout.evaluate))
    rows = []
    for x, model, d in found:
        if is_complete(d):
            m = numeric_metrics(read_metrics(d))
            rows.append({"iteration": x, "model": model,
                         **{k: v for k, v in m.items() if k.endswith("accuracy")}})
    return rows


class Orchestrator:
    """Executes :class:`StageCall` s of one pipeline run.

    Args:
        params: validated ``tracerl.config.Params``.
        params_path: the ``params.yaml`` the stages read.
        layout: the run's folders.
        runner: where stages run.
        tracker: where runs are recorded (the parent run must be current while calls
            run: use :meth:`parent_run`).
        shard_runner: where the shards of a sharded stage run; they run side by side, so
            it must isolate them (default: ``runner``, or a subprocess runner in the
            project when ``runner`` runs stages in this process: that one sets
            ``os.environ`` and torch's thread count for the whole process, and stage
            modules keep loaded models).
    """

    def __init__(self, params: Any, params_path: str | os.PathLike, layout: RunLayout,
                 runner: Runner, tracker: Tracker, shard_runner: Runner | None = None):
        self.params = params
        self.params_dict = params.to_dict()
        self.params_path = Path(params_path)
        self.layout = layout
        self.runner = runner
        self.tracker = tracker
        if shard_runner is None and isinstance(runner, InProcessRunner):
            shard_runner = SubprocessRunner(runner.package)
        self.shard_runner = shard_runner or runner
        self.parent_run_id: str | None = None
        # outputs (re)written by this orchestrator: a damaged output that runs again
        # invalidates what was computed from it, even under an unchanged key
        self.rewritten: set[Path] = set()

    # ------------------------------------------------------------------ parent run
    def parent_run(self, plan_key: str, part: str = "all",
                   tags: Mapping[str, Any] | None = None):
        """Context manager: open the pipeline's parent run, or reopen the one recorded in
        ``tracking.json`` for the same ``plan_key`` (a resumed or continued run, or the
        next DVC stage of the same pipeline).

        The run is named by :func:`parent_run_name` and tagged ``tracerl.part`` with the
        parts run under it so far (``prepare+sft``, ..., ``all`` once every part ran)."""
        import contextlib

        @contextlib.contextmanager
        def cm():
            existing, parts = None, {part}
            if self.layout.tracking.is_file():
                rec = json.loads(self.layout.tracking.read_text())
                if rec.get("plan_key") == plan_key and rec.get("tracking_uri") == self._uri():
                    existing = rec.get("parent_run_id")
            if existing and isinstance(self.tracker, MlflowTracker):
                try:
                    run = self.tracker.client.get_run(existing)
                    parts.update(run.data.tags.get(PART_TAG, "").split("+"))
                    self.tracker.client.update_run(existing, status="RUNNING")
                except Exception:  # deleted run, other backend: start a new one
                    existing, parts = None, {part}
            exp = os.environ.get(DVC_EXP_ENV, "")
            all_tags = {"tracerl.run": self.layout.root.name, "tracerl.runner": self.runner.name,
                        "tracerl.plan_key": plan_key, "mlflow.source.git.commit": git_sha(),
                        PART_TAG: parts_label(parts),
                        **({"tracerl.dvc_experiment": exp} if exp else {}), **(tags or {})}
            name = parent_run_name(self.layout.root.name, plan_key, exp)
            if existing:
                ctx = self.tracker.start_run(name, run_id=existing, end_on_exit=True)
            else:
                ctx = self.tracker.start_run(name, tags=all_tags)
            with writer_lock(self.layout.root), ctx as rid:
                self.freeze_params()
                self.parent_run_id = rid
                if existing:
                    self._close_zombies(existing)
                    self.tracker.set_tags(all_tags)
                if not existing:
                    self.tracker.log_params(self.params_dict)
                    _write_json(self.layout.tracking, {"parent_run_id": rid, "plan_key": plan_key,
                                                       "tracking_uri": self._uri()})
                try:
                    yield rid
                finally:
                    self.parent_run_id = None

        return cm()

    def _uri(self) -> str:
        return getattr(self.tracker, "tracking_uri", "")

    def freeze_params(self) -> Path:
        """Write the params this run is planned with to ``<run>/params.yaml`` (under the
        writer lock) and point every stage at that file: editing the live params.yaml
        mid-run changes nothing until the next launch, which re-plans with new keys and
        says which values changed."""
        import yaml

        frozen = self.layout.frozen_params
        if self.params_path.resolve() == frozen.resolve():  # launched from the record
            return frozen
        if frozen.is_file():
            before = flatten_params(yaml.safe_load(frozen.read_text()) or {})
            now = flatten_params(self.params_dict)
            changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}"
                       for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
            if changed:
                print(f"[tracerl] params differ from the last launch of {self.layout.root.name}"
                      f" (the stages that read them run again): {'; '.join(changed)}",
                      flush=True)
        frozen.parent.mkdir(parents=True, exist_ok=True)
        tmp = frozen.with_name(f".{frozen.name}.tmp")
        tmp.write_text("# the params this run was launched with (written by the flow; "
                       "every stage reads this file)\n"
                       + yaml.safe_dump(self.params_dict, sort_keys=False))
        os.replace(tmp, frozen)
        self.params_path = frozen
        return frozen

    def _close_zombies(self, parent_id: str) -> None:
        """Child runs still RUNNING under a reopened parent belong to killed stages (the
        writer lock rules out a live one): mark them KILLED."""
        if not isinstance(self.tracker, MlflowTracker):
            return
        c = self.tracker.client
        for r in c.search_runs([self.tracker.experiment_id], max_results=10000,
                               filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' "
                                             "and attributes.status = 'RUNNING'"):
            c.set_terminated(r.info.run_id, status="KILLED")
            log.warning("closed child run %s (%s) of a killed stage as KILLED",
                        r.info.run_name, r.info.run_id)

    # ------------------------------------------------------------------ one call
    def why_run(self, call: StageCall) -> str | None:
        """Why ``call`` must run: :func:`not_done_reason`, or an input of it written again
        by this orchestrator; None when it is done."""
        reason = not_done_reason(call)
        stale_input = self._stale_input(call)
        if reason is None and stale_input is not None:
            reason = f"its input {stale_input} was written again"
        return reason

    def _stale_input(self, call: StageCall) -> Path | None:
        return next((p for paths in call.inputs.values() for p in paths
                     if p in self.rewritten), None)

    def run_call(self, call: StageCall) -> StageResult:
        """Run ``call`` unless it is already done; see the module docstring."""
        reason = not_done_reason(call)
        stale_input = self._stale_input(call)
        if reason is None and stale_input is None:
            return StageResult(call.label, str(call.out), True, 0.0, read_metrics(call.out))
        # say why a finished output is redone (not a fresh stage whose input is new)
        redone = reason is None or reason.startswith((DAMAGED, UNREADABLE))
        if reason is None:
            reason = f"its input {stale_input} was written again"
        if redone:
            log.warning("%s runs again: %s", call.label, reason)
            print(f"[tracerl] {call.label} runs again: {reason}", flush=True)
        _clean_temp(call.out)
        runner = self.shard_runner if call.shard is not None else self.runner
        tags = {"tracerl.stage": call.stage, "tracerl.runner": runner.name,
                "tracerl.key": call.key}
        if call.iteration is not None:
            tags["tracerl.iteration"] = call.iteration
        if call.shard is not None:
            tags["tracerl.shard"] = f"{call.shard[0] + 1}/{call.shard[1]}"
        with self.tracker.start_run(call.label, parent_run_id=self.parent_run_id,
                                    tags=tags) as child:
            self.tracker.log_params(params_read(call.stage, self.params_dict))
            env = {RUN_ID_ENV: child, "TRACERL_TRACKER": self.params.run.tracker}
            if self.parent_run_id and self.params.run.tracker != "null":
                env[PARENT_RUN_ENV] = self.parent_run_id
            if self._uri():
                env[TRACKING_URI_ENV] = self._uri()
            t0 = time.perf_counter()
            runner.run(call, self.params_path, env)
            seconds = time.perf_counter() - t0
            if not is_complete(call.out):
                raise StageFailed(call, f"it exited 0 but wrote no {MANIFEST}")
            lacking = missing_outputs(call.stage, call.out)
            if lacking:
                raise StageFailed(call, f"it wrote none of its declared outputs {lacking}")
            metrics = read_metrics(call.out)
            absent = missing_metrics(call.stage, metrics)
            if absent:  # e.g. an update with no trainable rows: a gap in the curves
                log.warning("%s: declared metrics %s absent from metrics.json", call.label,
                            absent)
            stamp_key(call, seconds)
            step = call.iteration if call.iteration is not None else 0
            self.tracker.log_metrics({**metrics, "seconds": seconds}, step=step)
            self._log_outputs(call)
        if self.parent_run_id and call.shard is None:  # a shard's numbers stay in its child
            self.tracker.log_metrics(
                {f"{call.stage}.{k}": v for k, v in {**metrics, "seconds": seconds}.items()},
                step=step,
            )
        self.rewritten.add(call.out)  # what reads it must run again too
        return StageResult(call.label, str(call.out), False, seconds, metrics)

    def _log_outputs(self, call: StageCall) -> None:
        for name in (MANIFEST, METRICS):
            if (call.out / name).is_file():
                self.tracker.log_artifact(call.out / name)
        for page in sorted(call.out.glob("*.html")):
            self.tracker.log_artifact(page)
        for d in STAGES.get(call.stage).checkpoints:
            if (call.out / d).is_dir():
                self.tracker.log_artifact(call.out / d, artifact_path=d)

    # ------------------------------------------------------------------ summaries
    def record_iteration(self, i: int, wall_seconds: float | None,
                         stage_seconds: float | None = None) -> dict[str, Any]:
        """After iteration ``i``: write its timing, rebuild the learning curves and the
        rl DVC metrics; log iteration-level metrics to the parent run. Returns the row.

        ``wall_seconds`` is the orchestrator-side wall time of the iteration (None when
        it was entirely skipped on resume: the recorded timing is kept); ``stage_seconds``
        the summed time inside the stages' runners (``StageResult.seconds``). The rest,
        ``1 - stage/wall``, is orchestration overhead: Prefect task machinery, MLflow
        logging, key stamping.
        """
        timing = self.layout.iteration(i) / "timing.json"
        if wall_seconds is not None:
            work = stage_seconds if stage_seconds is not None else 0.0
            _write_json(timing, {"wall_seconds": wall_seconds, "stage_seconds": work,
                                 "overhead_fraction": max(0.0, 1 - work / wall_seconds)
                                 if wall_seconds > 0 else 0.0})
        rows = self.write_curves()
        row = next((r for r in rows if r["iteration"] == i), {"iteration": i})
        if self.parent_run_id and wall_seconds is not None:
            self.tracker.log_metrics(
                {k: v for k, v in row.items() if k.startswith("iteration.")}, step=i
            )
        return row

    def curve_row(self, i: int) -> dict[str, Any]:
        row: dict[str, Any] = {"iteration": i}
        for s in (*ITERATION_STAGES, "evaluate"):
            d = self.layout.stage_dir(s, i)
            if is_complete(d):
                for k, v in numeric_metrics(read_metrics(d)).items():
                    row[f"{s}.{k}"] = v
                # the runner's wall time of the stage (stamped by run_call)
                row[f"{s}.seconds"] = read_manifest(d).get(SECONDS_FIELD, float("nan"))
        t = self.layout.iteration(i) / "timing.json"
        if t.is_file():
            for k, v in json.loads(t.read_text()).items():
                row[f"iteration.{k}"] = v
        return row

    def write_curves(self) -> list[dict[str, Any]]:
        """Rebuild ``plots/rl_curves.json`` and ``metrics/rl.json`` from the finished
        iterations (idempotent, so a resumed run writes the same files)."""
        rows = [self.curve_row(i) for i in self.layout.iterations_done()]
        _write_json(self.layout.curves, rows)
        summary: dict[str, Any] = {"iterations": len(rows)}
        if rows:
            summary.update({k: v for k, v in rows[-1].items() if k != "iteration"})
        if is_complete(self.layout.baseline_eval):
            summary["baseline"] = numeric_metrics(read_metrics(self.layout.baseline_eval))
        _write_json(self.layout.dvc_metrics("rl"), summary)
        return rows

    def write_stage_metrics(self, dvc_stage: str, out: Path) -> None:
        """Copy a coarse stage's ``metrics.json`` to ``metrics/<dvc_stage>.json``."""
        _write_json(self.layout.dvc_metrics(dvc_stage), read_metrics(out))

    def write_final_metrics(self, out: Path) -> dict[str, Any]:
        """``metrics/evaluate.json`` (the final evaluation's metrics, a plain output) and
        ``metrics/headline.json`` (the one DVC metrics file: :func:`headline`), then the
        evaluation curve ``plots/eval_curve.json``. The headline also goes to the parent
        run (metrics, and its description, which heads the run's page) and to the
        registered policy's version. Returns the headline."""
        final = read_metrics(out)
        _write_json(self.layout.dvc_metrics("evaluate"), final)
        sft = (read_metrics(self.layout.baseline_eval)
               if is_complete(self.layout.baseline_eval) else {})
        head = headline(sft, final)
        _write_json(self.layout.headline, head)
        _write_json(self.layout.eval_curve, eval_curve(self.layout))
        if self.parent_run_id:
            text = headline_markdown(head)
            self.tracker.log_metrics(head)
            self.tracker.set_tags({NOTE_TAG: text})
            reg = self._registered()
            if reg:
                self.tracker.update_model_version(
                    reg["name"], reg["version"], description=f"{self._about_final()}\n\n{text}",
                    tags={f"tracerl.{k}": v for k, v in numeric_metrics(head).items()})
        return head

    def _registered(self) -> dict[str, Any] | None:
        """The model version registered under the current parent run, if any."""
        marker = self.layout.registered
        if marker.is_file():
            rec = json.loads(marker.read_text())
            if rec.get("parent_run_id") == self.parent_run_id:
                return rec
        return None

    def _about_final(self) -> str:
        return (f"final policy of run {self.layout.root.name} "
                f"({self.params.run.iterations} TraceRL iterations)")

    def register_final(self, policy_dir: Path) -> str | None:
        """Register the final policy's checkpoint in the model registry (once per parent
        run; ``run.registered_model: ""`` disables it), tagged with the run, its plan key
        (which params and code made it), the git commit and the RL part of the params.
        Returns the version. The final evaluation adds the headline later."""
        name = self.params.run.registered_model
        if not name or not self.parent_run_id:
            return None
        rec = self._registered()
        if rec:
            return rec.get("version")
        from tracerl.models import checkpoint_dir

        folder = checkpoint_dir(policy_dir)
        plan = json.loads(self.layout.tracking.read_text()).get("plan_key", "")
        tags = {"tracerl.run": self.layout.root.name, "tracerl.plan_key": plan,
                "tracerl.parent_run_id": self.parent_run_id, "git_commit": git_sha(),
                "tracerl.iterations": self.params.run.iterations,
                **{f"params.{k}": v for k, v in flatten_params(
                    {s: self.params_dict[s] for s in ("policy", "rollout")}).items()
                   if k in REGISTRY_PARAMS}}
        version = self.tracker.register_model(
            folder, name, tags=tags,
            description=self._about_final())
        self.tracker.set_tags({"tracerl.registered_model": f"{name}/{version}"})
        _write_json(self.layout.registered,
                    {"parent_run_id": self.parent_run_id, "name": name, "version": version})
        return version

"""Where every stage's output lives, and the plan of stage calls of a pipeline run.

One folder per pipeline run, ``<runs_dir>/<run.name>/``::

    prepare/                       train / held-out task sets, SFT data   (dvc stage prepare)
    sft/                           the SFT policy                          (dvc stage sft)
    rl/                            everything of the RL loop               (dvc stage rl)
      baseline/evaluate/           the SFT policy scored before any RL
      iter_<i>/rollout/            rollouts.parquet
      iter_<i>/rollout_shards/     shard<k>of<n>/: the shards of a sharded rollout
      iter_<i>/reward/             scored.parquet
      iter_<i>/value/              value model + token advantages (policy.use_value only)
      iter_<i>/policy/             policy_{i+1}
      iter_<i>/curriculum/         decision.json: pool and schedule of iteration i+1
      iter_<i>/evaluate/           every run.eval_every iterations (not after the last)
    evaluate/                      the final policy scored                 (dvc stage evaluate)
    metrics/headline.json          the DVC metrics: held-out accuracy of SFT and final policy
    metrics/<dvc stage>.json       every metric of each coarse stage (plain DVC outputs)
    plots/rl_curves.json           DVC plots: one row per RL iteration
    plots/eval_curve.json          DVC plots: held-out accuracy per evaluation
    plots/index.html               the curves as one offline page (`tracerl plots`)
    tracking.json                  the MLflow parent run, reused when a run resumes
    params.yaml                    the params of the launch (frozen; stages read this)
    .writer.lock                   held by the one process writing the run

Every stage folder is written by :func:`tracerl.pipeline.artifacts.stage_output` (temp
folder renamed on success, manifest last). The orchestrator then stamps the manifest
with the call's **key**: a digest of the stage, its iteration, the ``params.yaml``
sections it reads (declared once, in :mod:`tracerl.pipeline.registry`) and the keys of
its inputs (a Merkle chain), and the **content** of any local file or folder those params
name (:data:`PATH_PARAMS`: a checkpoint retrained in place under the same path changes
the key of every stage that loads it). A folder counts as done
only when its manifest carries the key of the current plan and every file still has the
size and sha256 the manifest recorded, so a resumed run continues at the first unfinished
(or damaged) stage, and a changed parameter re-runs exactly the stages downstream
of it (the same rule DVC applies to the coarse stages).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tracerl.pipeline.artifacts import (
    MANIFEST,
    is_complete,
    manifest_digest,
    read_manifest,
    verify_outputs,
)
from tracerl.pipeline.registry import STAGES, placement_keys

VIEWER_STAGE, VIEWER_FILE = "reward", "trajectory.html"  # the trajectory viewer's page
KEY_FIELD = "tracerl_key"  # manifest field stamped by the orchestrator
SECONDS_FIELD = "tracerl_wall_seconds"  # the runner's wall time of the call, stamped too
# not_done_reason's words for a finished output that can no longer be trusted (the
# orchestrator says so when it redoes one; a fresh or re-planned stage needs no notice)
DAMAGED, UNREADABLE = "output damaged", "unreadable manifest"


@dataclass(frozen=True)
class StageCall:
    """One invocation of a stage CLI.

    ``inputs`` maps an input name to one or more artifact folders; ``iteration`` is None
    for stages outside the RL loop. ``key`` identifies the call's parameters and inputs.
    ``role`` names what a call is when its iteration does not say it (``sft``: the
    evaluation of the SFT model; ``final``: of the final policy); it is no part of the key.

    A sharded stage (:meth:`Planner.shards`) runs as ``shard`` = ``(index, count)`` calls
    (0-based index) into their own folders, then one merge call: the stage's ordinary
    call with ``merge`` = the shards' folders (passed as ``--input shard=DIR``; no part of
    its key, which is the unsharded call's). ``policy_digest`` is the checkpoint digest
    the shards and the merge must find (``--policy-digest``).
    """

    stage: str
    out: Path
    iteration: int | None = None
    inputs: Mapping[str, tuple[Path, ...]] = field(default_factory=dict)
    key: str = ""
    role: str = ""
    shard: tuple[int, int] | None = None
    merge: tuple[Path, ...] = ()
    policy_digest: str = ""

    @property
    def label(self) -> str:
        """``rollout[3]``, ``sft``, ``evaluate[sft]``, ``evaluate[final]``,
        ``rollout[3].shard1of2``: the task name in Prefect and the run name in MLflow."""
        if self.role:
            base = f"{self.stage}[{self.role}]"
        else:
            base = self.stage if self.iteration is None else f"{self.stage}[{self.iteration}]"
        if self.shard is not None:
            base += f".shard{self.shard[0] + 1}of{self.shard[1]}"
        return base

    def argv(self, params_path: str | os.PathLike, path_map=None) -> list[str]:
        """The stage CLI's arguments (see :mod:`tracerl.pipeline.stage_cli`).

        ``path_map`` rewrites host paths (the container runner maps them into the
        container's file system).
        """
        m = path_map or (lambda p: str(p))
        argv = ["--params", m(Path(params_path)), "--out", m(self.out)]
        if self.iteration is not None:
            argv += ["--iteration", str(self.iteration)]
        for name, paths in self.inputs.items():
            for p in paths:
                argv += ["--input", f"{name}={m(p)}"]
        for p in self.merge:
            argv += ["--input", f"shard={m(p)}"]
        if self.shard is not None:
            argv += ["--shard", f"{self.shard[0] + 1}/{self.shard[1]}"]
        if self.policy_digest:
            argv += ["--policy-digest", self.policy_digest]
        return argv


@dataclass(frozen=True)
class RunLayout:
    """Paths of one pipeline run, rooted at ``<runs_dir>/<name>``."""

    root: Path

    @classmethod
    def from_params(cls, params: Any, base: str | os.PathLike | None = None,
                    name: str | None = None) -> RunLayout:
        """``base/<params.run.runs_dir>/<name or params.run.name>`` (base: cwd)."""
        runs = Path(params.run.runs_dir)
        if not runs.is_absolute() and base is not None:
            runs = Path(base) / runs
        return cls(runs / (name or params.run.name))

    @property
    def prepare(self) -> Path:
        return self.root / "prepare"

    @property
    def sft(self) -> Path:
        return self.root / "sft"

    @property
    def rl(self) -> Path:
        return self.root / "rl"

    @property
    def evaluate(self) -> Path:
        return self.root / "evaluate"

    @property
    def baseline_eval(self) -> Path:
        return self.rl / "baseline" / "evaluate"

    def iteration(self, i: int) -> Path:
        return self.rl / f"iter_{i}"

    def stage_dir(self, stage: str, iteration: int | None = None) -> Path:
        if iteration is None:
            return self.root / stage
        return self.iteration(iteration) / stage

    def dvc_metrics(self, dvc_stage: str) -> Path:
        return self.root / "metrics" / f"{dvc_stage}.json"

    @property
    def headline(self) -> Path:
        """The run's result in a few numbers: the one file ``dvc metrics show`` lists."""
        return self.root / "metrics" / "headline.json"

    @property
    def curves(self) -> Path:
        return self.root / "plots" / "rl_curves.json"

    @property
    def plots_page(self) -> Path:
        """Every curve as one offline page (:mod:`tracerl.pipeline.plots`)."""
        return self.root / "plots" / "index.html"

    @property
    def eval_curve(self) -> Path:
        """Held-out accuracy per evaluation (SFT baseline, every k iterations, final)."""
        return self.root / "plots" / "eval_curve.json"

    @property
    def frozen_params(self) -> Path:
        """The params the run was launched with; every stage of the run reads them."""
        return self.root / "params.yaml"

    @property
    def tracking(self) -> Path:
        return self.root / "tracking.json"

    @property
    def registered(self) -> Path:
        """The model version registered for the run's parent run (the registry's record)."""
        return self.root / "registered.json"

    def latest_viewer(self) -> tuple[int, Path] | None:
        """``(i, page)``: the trajectory viewer of the latest finished iteration ``i``
        (iterations in numeric order: ``iter_10`` comes after ``iter_9``), or None."""
        for i in reversed(self.iterations_done()):
            page = self.stage_dir(VIEWER_STAGE, i) / VIEWER_FILE
            if page.is_file():
                return i, page
        return None

    def iterations_done(self) -> list[int]:
        """Iterations whose curriculum stage finished (sorted)."""
        done = []
        if self.rl.is_dir():
            for d in self.rl.glob("iter_*"):
                suffix = d.name.removeprefix("iter_")
                if suffix.isdigit() and is_complete(d / "curriculum"):
                    done.append(int(suffix))
        return sorted(done)


# ---------------------------------------------------------------------- keys
def fingerprint(obj: Any) -> str:
    """A short, stable digest of a JSON-able value (keys, resume fingerprints)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# params whose value may name a local file or folder: a stage that reads one depends on
# what is there, not on the name (learning comparisons retrain an SFT checkpoint in place)
PATH_PARAMS = ("model.init", "data.train_file", "data.heldout_file", "reward.process_judge")
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256


def path_content(value: str) -> str | None:
    """A digest of what the local path ``value`` holds (every file under it: relative
    name and sha256), or None when ``value`` names no local file or folder (empty,
    ``tiny``, a hub id). Each file is hashed once per process while its size and mtime
    stay the same."""
    from tracerl.pipeline.artifacts import sha256_file

    if not value or not (root := Path(value).expanduser()).exists():
        return None
    files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        memo = (str(f.resolve()), st.st_size, st.st_mtime_ns)
        if memo not in _FILE_DIGESTS:
            _FILE_DIGESTS[memo] = sha256_file(f)
        h.update(f"{f.relative_to(root) if f != root else f.name}\0{_FILE_DIGESTS[memo]}\n"
                 .encode())
    return h.hexdigest()[:16]


def path_contents(read: Mapping[str, Any]) -> dict[str, str]:
    """``{param: content digest}`` of the :data:`PATH_PARAMS` in ``read`` (the output of
    :func:`params_read`) that name a local file or folder."""
    out = {}
    for name in PATH_PARAMS:
        sec, _, key = name.partition(".")
        value = read.get(sec, {}).get(key)
        if isinstance(value, str) and (digest := path_content(value)) is not None:
            out[name] = digest
    return out


def params_read(stage: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The values of the params a stage declares it reads (registry ``reads``):
    whole sections, or single keys as ``{"run": {"seed": 0}}``; without the placement
    keys (:func:`tracerl.pipeline.registry.placement_keys`), which change no output."""
    out: dict[str, Any] = {}
    skip = placement_keys()  # where it runs, not what it writes (e.g. rollout.shards)
    for r in STAGES.get(stage).reads:
        sec, _, key = r.partition(".")
        if key:
            out.setdefault(sec, {})[key] = params[sec][key]
        else:
            out[sec] = {k: v for k, v in params[sec].items() if f"{sec}.{k}" not in skip}
    return out


def stage_key(stage: str, iteration: int | None, params: Mapping[str, Any],
              input_keys: Iterable[str]) -> str:
    """Digest of what a call's output depends on: stage, iteration, the params it reads
    (``params`` is ``Params.to_dict()``; the registry's ``reads``), the content of the
    local paths among them (:func:`path_contents`) and its inputs' keys."""
    read = params_read(stage, params)
    key = [stage, iteration, read, sorted(input_keys)]
    contents = path_contents(read)
    return fingerprint(key + [contents] if contents else key)


def not_done_reason(call: StageCall) -> str | None:
    """Why ``call`` must run (None when its output is complete, stamped with
    ``call.key`` and every file matches the manifest's size and sha256)."""
    if not is_complete(call.out):
        return "no finished output"
    try:
        key = read_manifest(call.out).get(KEY_FIELD)
    except (OSError, ValueError) as e:
        return f"{UNREADABLE} ({e})"
    if key != call.key:
        return "its params or inputs changed" if key else "not stamped by the orchestrator"
    damaged = verify_outputs(call.out)
    if damaged:
        return f"{DAMAGED}: " + "; ".join(damaged)
    return None


def is_done(call: StageCall) -> bool:
    """True when ``call.out`` finished, carries ``call.key`` and is intact."""
    return not_done_reason(call) is None


def first_unfinished(calls: Sequence[StageCall]) -> int | None:
    """Index of the first call that is not done (None when all are): where a resumed run
    starts. Later calls depend on it, so they run again too.

    >>> first_unfinished([]) is None
    True
    """
    for i, c in enumerate(calls):
        if not is_done(c):
            return i
    return None


# ---------------------------------------------------------------------- the plan
class Planner:
    """Builds the :class:`StageCall` of each stage of a run, chaining keys.

    Calls must be requested in dependency order (prepare, sft, then iterations in order),
    which is the order the flow runs them in.

    Args:
        params: a validated ``tracerl.config.Params``.
        layout: where the run's folders live.
    """

    def __init__(self, params: Any, layout: RunLayout):
        self.params = params
        self.p = params.to_dict()
        self.layout = layout
        self.keys: dict[Path, str] = {}

    def _call(self, stage: str, iteration: int | None, out: Path,
              inputs: Mapping[str, Sequence[Path]], role: str = "") -> StageCall:
        undeclared = sorted(set(inputs) - set(STAGES.get(stage).inputs))
        assert not undeclared, f"{stage}: inputs {undeclared} are not declared in its registry entry"
        ins = {k: tuple(v) for k, v in inputs.items() if v}
        missing = [str(p) for v in ins.values() for p in v if p not in self.keys]
        assert not missing, f"{stage}: inputs planned out of order: {missing}"
        key = stage_key(stage, iteration, self.p, [self.keys[p] for v in ins.values() for p in v])
        self.keys[out] = key
        return StageCall(stage, out, iteration, ins, key, role)

    def prepare(self) -> StageCall:
        return self._call("prepare", None, self.layout.prepare, {})

    def sft(self) -> StageCall:
        return self._call("sft", None, self.layout.sft, {"data": [self.layout.prepare]})

    def policy_before(self, i: int) -> Path:
        """The policy that samples iteration ``i``: SFT for 0, else iteration i-1's update."""
        return self.layout.sft if i == 0 else self.layout.stage_dir("policy", i - 1)

    def iteration(self, i: int) -> list[StageCall]:
        """rollout -> reward -> [value] -> policy -> curriculum of iteration ``i``."""
        L, pol = self.layout, self.policy_before(i)
        prev_cur = [L.stage_dir("curriculum", i - 1)] if i > 0 else []
        calls = [
            self._call("rollout", i, L.stage_dir("rollout", i),
                       {"data": [L.prepare], "policy": [pol], "curriculum": prev_cur}),
            self._call("reward", i, L.stage_dir("reward", i),
                       {"data": [L.prepare], "rollout": [L.stage_dir("rollout", i)]}),
        ]
        value = []
        if self.params.policy.use_value:
            prev_value = [L.stage_dir("value", i - 1)] if i > 0 else []
            calls.append(self._call("value", i, L.stage_dir("value", i),
                                    {"scored": [L.stage_dir("reward", i)], "policy": [pol],
                                     "value": prev_value}))
            value = [L.stage_dir("value", i)]
        calls.append(self._call("policy", i, L.stage_dir("policy", i),
                                {"scored": [L.stage_dir("reward", i)], "policy": [pol],
                                 "reference": [L.sft], "value": value}))
        window = self.params.curriculum.window
        history = [L.stage_dir("reward", j) for j in range(max(0, i - window + 1), i + 1)]
        calls.append(self._call("curriculum", i, L.stage_dir("curriculum", i),
                                {"data": [L.prepare], "scored": history,
                                 "curriculum": prev_cur}))
        return calls

    def shards(self, call: StageCall, n: int) -> tuple[list[StageCall], StageCall]:
        """``call`` (a rollout) as ``n`` shard calls and the merge call; planned when the
        call is about to run, since the shards must find the policy checkpoint its stage
        finished with: the digest its manifest records (:func:`manifest_digest`).

        The shards write ``<iteration>/<stage>_shards/shard<k>of<n>/``; each shard's key
        is the call's key with its index, count and the checkpoint digest. The merge call
        keeps the call's key and output folder, so downstream keys do not depend on ``n``.
        """
        if n < 1:
            raise ValueError(f"{call.label}: shards must be >= 1, got {n}")
        [policy] = call.inputs["policy"]
        sub = STAGES.get(read_manifest(policy)["stage"]).checkpoints[0]
        digest = manifest_digest(policy, sub)
        folder = call.out.with_name(f"{call.out.name}_shards")
        shards = [
            replace(call, out=folder / f"shard{k + 1}of{n}", shard=(k, n),
                    policy_digest=digest, key=fingerprint([call.key, "shard", k, n, digest]))
            for k in range(n)
        ]
        return shards, replace(call, merge=tuple(s.out for s in shards), policy_digest=digest)

    def evaluate(self, after: int | None, final: bool = False) -> StageCall:
        """Evaluate the policy after iteration ``after`` (None: the SFT policy, i.e. the
        baseline). ``final`` writes to the run's top-level ``evaluate/`` (dvc stage)."""
        L = self.layout
        if after is None:
            policy, cur, out, role = L.sft, [], L.baseline_eval, "sft"
        else:
            policy, cur = L.stage_dir("policy", after), [L.stage_dir("curriculum", after)]
            out = L.evaluate if final else L.stage_dir("evaluate", after)
            role = "final" if final else ""
        return self._call("evaluate", after, out,
                          {"data": [L.prepare], "policy": [policy], "curriculum": cur}, role)

    def eval_after(self, i: int) -> bool:
        """Periodic evaluation inside the loop: every ``run.eval_every`` iterations, but
        not after the last one (the final evaluation covers it)."""
        n, k = self.params.run.iterations, self.params.run.eval_every
        return (i + 1) % k == 0 and i + 1 < n


def plan_all(params: Any, layout: RunLayout) -> list[StageCall]:
    """Every call of a full run, in execution order (the flow runs this order)."""
    pl = Planner(params, layout)
    calls = [pl.prepare(), pl.sft(), pl.evaluate(None)]
    for i in range(params.run.iterations):
        calls += pl.iteration(i)
        if pl.eval_after(i):
            calls.append(pl.evaluate(i))
    calls.append(pl.evaluate(params.run.iterations - 1, final=True))
    return calls


def stamp_key(call: StageCall, seconds: float | None = None) -> None:
    """Record ``call.key`` (and the runner's wall ``seconds``) in the finished output's
    manifest (atomic rewrite)."""
    m = read_manifest(call.out)
    m[KEY_FIELD] = call.key
    if seconds is not None:
        m[SECONDS_FIELD] = seconds
    tmp = call.out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(m, indent=2, sort_keys=True, default=str))
    os.replace(tmp, call.out / MANIFEST)

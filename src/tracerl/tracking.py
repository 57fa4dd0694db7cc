"""Experiment tracking behind a small interface: MLflow in pipelines, a no-op in tests.

MLflow records *what happened* (DVC decides whether a stage re-runs, Prefect where it
runs). One pipeline execution is one **parent run**; every stage invocation is a
**child run** linked to it by the ``mlflow.parentRunId`` tag, so ``mlflow ui`` shows
the iterations of a run as a tree. The adapter talks to MLflow through ``MlflowClient``
with explicit run ids, never through the fluent ``mlflow.start_run`` stack: it works when
a run is already active in the process (a notebook, a test, another library) and leaves
that run alone. (torchtune's ``MLFlowLogger`` calls the fluent API and breaks there.)

Storage: by default a SQLite backend ``mlflow.db`` and an artifact folder
``mlartifacts/`` inside the project root (the current directory), which ``mlflow ui
--backend-store-uri sqlite:///mlflow.db`` opens. ``MLFLOW_TRACKING_URI`` (an MLflow
server, another database) overrides it; endpoints never live in ``params.yaml``.

Stages started by a runner find their run through environment variables (so the same
code works in-process, in a subprocess and in a container):

- ``TRACERL_PARENT_RUN_ID``: the pipeline's parent run,
- ``TRACERL_RUN_ID``: the child run the orchestrator opened for this stage invocation,
- ``MLFLOW_TRACKING_URI``: the backend, resolved to an absolute URI by the runner.

Example:
    >>> t = NullTracker()
    >>> with t.start_run("demo") as run_id:
    ...     t.log_metrics({"reward": 1.0}, step=0)
    >>> run_id
    'null'
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

PARENT_RUN_ENV = "TRACERL_PARENT_RUN_ID"
RUN_ID_ENV = "TRACERL_RUN_ID"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "tracerl"
PARENT_TAG = "mlflow.parentRunId"

_MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
_BATCH = 100  # params per log_batch call (MLflow's limit)


@runtime_checkable
class Tracker(Protocol):
    """What the pipeline needs from an experiment tracker.

    ``start_run`` opens a run and makes it the tracker's *current* run until the context
    exits; the other methods log into the current run. On an exception the run ends with
    status ``FAILED`` and the exception propagates.
    """

    def start_run(
        self,
        name: str,
        *,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        end_on_exit: bool | None = None,
    ) -> contextlib.AbstractContextManager[str]:
        """Open (or, with ``run_id``, resume) a run; yields its id. The run is ended on
        exit if it was created here (or ``end_on_exit``); always on an exception."""
        ...

    @property
    def run_id(self) -> str | None:
        """The current run's id, or None outside ``start_run``."""
        ...

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params; nested mappings are flattened to ``a.b.c`` keys."""
        ...

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric metrics at ``step``; non-numeric values are skipped."""
        ...

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Log a file or a whole folder."""
        ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def register_model(self, path: str | os.PathLike, name: str, *,
                       tags: Mapping[str, Any] | None = None, description: str = "") -> str:
        """Log the model folder ``path`` and register it as a new version of ``name``
        with ``tags`` and ``description``; returns the version."""
        ...

    def update_model_version(self, name: str, version: str, *, description: str = "",
                             tags: Mapping[str, Any] | None = None) -> None:
        """Replace a registered version's description (when given) and add ``tags``."""
        ...


_INVALID_KEY_CHARS = re.compile(r"[^\w\-. :/]")


def mlflow_key(key: str) -> str:
    """A metric/param name MLflow accepts (alphanumerics, ``_ - . : /`` and spaces).

    >>> mlflow_key("heldout.static.pass@1"), mlflow_key("rows/total")
    ('heldout.static.pass_at_1', 'rows/total')
    """
    return _INVALID_KEY_CHARS.sub("_", key.replace("@", "_at_"))


def flatten_params(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings to dotted keys.

    >>> flatten_params({"rollout": {"k": 8, "s": {"t": 1}}, "seed": 0})
    {'rollout.k': 8, 'rollout.s.t': 1, 'seed': 0}
    """
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten_params(v, key))
        else:
            out[key] = v
    return out


def numeric_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Keep the finite-or-nan numbers of a (nested) metrics dict, flattened; bools count
    as 0/1, strings and lists are dropped (they belong in the metrics JSON, not MLflow).

    >>> numeric_metrics({"a": 1, "b": {"c": 0.5}, "d": "x", "e": True})
    {'a': 1.0, 'b.c': 0.5, 'e': 1.0}
    """
    out: dict[str, float] = {}
    for k, v in flatten_params(metrics, prefix).items():
        if isinstance(v, bool | int | float) and not (isinstance(v, float) and math.isinf(v)):
            out[k] = float(v)
    return out


class NullTracker:
    """A tracker that records nothing (tests, ``--no-track``). Runs have id ``"null"``."""

    def __init__(self) -> None:
        self._run: str | None = None

    @contextlib.contextmanager
    def start_run(self, name, *, parent_run_id=None, tags=None, run_id=None,
                  end_on_exit=None) -> Iterator[str]:
        prev, self._run = self._run, run_id or "null"
        try:
            yield self._run
        finally:
            self._run = prev

    @property
    def run_id(self) -> str | None:
        return self._run

    def log_params(self, params) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_artifact(self, path, artifact_path=None) -> None:
        pass

    def set_tags(self, tags) -> None:
        pass

    def register_model(self, path, name, *, tags=None, description="") -> str:
        return "0"

    def update_model_version(self, name, version, *, description="", tags=None) -> None:
        pass


def default_tracking_uri(root: str | os.PathLike | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<root>/mlflow.db`` (absolute)."""
    env = os.environ.get(TRACKING_URI_ENV)
    if env:
        return env
    root = Path(root or Path.cwd()).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


class MlflowTracker:
    """:class:`Tracker` on MLflow through ``MlflowClient`` (no fluent global run stack).

    Args:
        root: project folder holding ``mlflow.db`` and ``mlartifacts/`` when no
            ``tracking_uri`` / ``MLFLOW_TRACKING_URI`` is given. Default: the current
            directory.
        tracking_uri: explicit backend URI; wins over the environment.
        experiment: experiment name (default ``$MLFLOW_EXPERIMENT_NAME`` or ``tracerl``).
            Created on first use, with artifacts under ``<root>/mlartifacts`` for a
            local SQLite backend.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        *,
        tracking_uri: str | None = None,
        experiment: str | None = None,
    ) -> None:
        from mlflow import MlflowClient

        self.root = Path(root or Path.cwd()).resolve()
        self.tracking_uri = tracking_uri or default_tracking_uri(self.root)
        self.experiment_name = experiment or os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        self._experiment_id: str | None = None
        # open runs, per thread (the flow runs shards' child runs side by side in Prefect's
        # worker threads); a thread with none open logs to the creating thread's current run
        self._stacks: dict[int, list[str]] = {}
        self._home = threading.get_ident()

    @property
    def _stack(self) -> list[str]:
        """This thread's open runs; when it has none, the creating thread's (its parent
        run stays current for worker threads)."""
        mine = self._stacks.setdefault(threading.get_ident(), [])
        return mine if mine else self._stacks.get(self._home, mine)

    def _own_stack(self) -> list[str]:
        return self._stacks.setdefault(threading.get_ident(), [])

    # ------------------------------------------------------------------ runs
    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment_name)
            if exp is not None:
                self._experiment_id = exp.experiment_id
            else:
                location = None
                if self.tracking_uri.startswith("sqlite:"):
                    location = (self.root / "mlartifacts").as_uri()
                self._experiment_id = self.client.create_experiment(
                    self.experiment_name, artifact_location=location
                )
        return self._experiment_id

    @property
    def run_id(self) -> str | None:
        return self._stack[-1] if self._stack else None

    @contextlib.contextmanager
    def start_run(
        self,
        name: str,
        *,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        end_on_exit: bool | None = None,
    ) -> Iterator[str]:
        """Open a run (a child of ``parent_run_id`` when given) or resume ``run_id``.

        The run ends ``FINISHED``, or ``FAILED`` when the body raises (``KILLED`` on
        KeyboardInterrupt). A resumed run (``run_id``) is left running on success unless
        ``end_on_exit``: its opener ends it.
        """
        if run_id is not None:
            self.client.get_run(run_id)  # fails clearly if the id is unknown
            owned = bool(end_on_exit)
        else:
            all_tags = {str(k): str(v) for k, v in (tags or {}).items()}
            if parent_run_id:
                all_tags[PARENT_TAG] = parent_run_id
            run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
            run_id = run.info.run_id
            owned = end_on_exit is not False
        stack = self._own_stack()
        stack.append(run_id)
        try:
            yield run_id
        except KeyboardInterrupt:
            self.client.set_terminated(run_id, status="KILLED")
            raise
        except BaseException:
            self.client.set_terminated(run_id, status="FAILED")
            raise
        else:
            if owned:
                self.client.set_terminated(run_id, status="FINISHED")
        finally:
            stack.pop()

    def _current(self) -> str:
        if not self._stack:
            raise RuntimeError("no current run: call inside `with tracker.start_run(...)`")
        return self._stack[-1]

    # ------------------------------------------------------------------ logging
    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten_params(params)
        items = [Param(mlflow_key(k), str(v)[:_MAX_PARAM_CHARS]) for k, v in sorted(flat.items())]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self._current(), params=items[i : i + _BATCH])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(mlflow_key(k), v, ts, step or 0)
                 for k, v in sorted(numeric_metrics(metrics).items())]
        for i in range(0, len(items), _BATCH * 10):
            self.client.log_batch(self._current(), metrics=items[i : i + _BATCH * 10])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self._current(), str(p), artifact_path=artifact_path)
        elif p.is_file():
            self.client.log_artifact(self._current(), str(p), artifact_path=artifact_path)
        else:
            raise FileNotFoundError(f"artifact to log does not exist: {p}")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)) for k, v in tags.items()]
        self.client.log_batch(self._current(), tags=items)

    def register_model(self, path: str | os.PathLike, name: str, *,
                       tags: Mapping[str, Any] | None = None, description: str = "") -> str:
        """Log folder ``path`` under artifact path ``model`` of the current run and
        register it as a new version of the registered model ``name``, with ``tags`` and
        ``description``."""
        run_id = self._current()
        self.log_artifact(path, artifact_path="model")
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as e:
            if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
                raise
        source = f"{self.client.get_run(run_id).info.artifact_uri}/model"
        mv = self.client.create_model_version(
            name, source=source, run_id=run_id, description=description or None,
            tags={str(k): str(v) for k, v in (tags or {}).items()})
        return str(mv.version)

    def update_model_version(self, name: str, version: str, *, description: str = "",
                             tags: Mapping[str, Any] | None = None) -> None:
        if description:
            self.client.update_model_version(name, version, description=description)
        for k, v in (tags or {}).items():
            self.client.set_model_version_tag(name, version, str(k), str(v))


# ---------------------------------------------------------------------- stage side
def make_tracker(kind: str = "mlflow", root: str | os.PathLike | None = None) -> Tracker:
    """Build a tracker by name: ``"mlflow"`` or ``"null"``."""
    if kind == "mlflow":
        return MlflowTracker(root)
    if kind == "null":
        return NullTracker()
    raise ValueError(f"unknown tracker {kind!r}; valid: 'mlflow', 'null'")


def step_logger(tracker: Tracker, prefix: str = "step"):
    """A trainer step hook (``Trainer.step_hooks``) that logs each optimizer step's
    numeric metrics (loss, KL, clip fraction, ratio max, entropy, grad norm, lr, ...) to
    the tracker's current run as ``<prefix>.<name>`` at the trainer's step count (which runs
    on across iterations, so one curve spans the whole run)."""

    def hook(step: int, metrics: Mapping[str, Any]) -> None:
        tracker.log_metrics(numeric_metrics(metrics, prefix), step=step)

    return hook


@contextlib.contextmanager
def stage_run(
    stage: str,
    tracker: Tracker | None = None,
    *,
    iteration: int | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Iterator[Tracker]:
    """The run a stage CLI logs into, found from the environment a runner set.

    - ``TRACERL_RUN_ID`` set: the orchestrator opened a child run for this invocation;
      log into it (it is ended by the orchestrator).
    - else ``TRACERL_PARENT_RUN_ID`` set: open a child run of that parent.
    - else (a stage started by hand or by ``dvc repro``): open a top-level run.

    Yields the tracker with the run current. ``TRACERL_TRACKER=null`` disables tracking.
    """
    if tracker is None:
        tracker = make_tracker(os.environ.get("TRACERL_TRACKER", "mlflow"))
    name = stage if iteration is None else f"{stage}/iter_{iteration}"
    all_tags: dict[str, Any] = {"tracerl.stage": stage}
    if iteration is not None:
        all_tags["tracerl.iteration"] = iteration
    all_tags.update(tags or {})
    own = os.environ.get(RUN_ID_ENV)
    if own:
        with tracker.start_run(name, run_id=own):
            yield tracker
    else:
        with tracker.start_run(name, parent_run_id=os.environ.get(PARENT_RUN_ENV), tags=all_tags):
            yield tracker

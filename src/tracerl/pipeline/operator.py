"""Operator commands for the deployment ``tracerl/iterate``, through Prefect's own API.

What survives what (``docs/benchmarks.md``, "Operator: crashes" has the timings):

- **worker killed, flow alive**: the flow keeps running and finishes the run; its console
  goes through :mod:`tracerl.pipeline.console`, so the worker's broken pipe cannot end it.
- **flow process killed, worker alive**: the worker records ``Crashed``; the automation
  :func:`crashed_automation` moves the run to ``Scheduled`` (``AwaitingRetry``) after it
  stayed ``Crashed`` for one heartbeat period, and the worker starts it again.
- **worker and flow killed** (machine reboot, OOM killer, ``kill -9``): the flow run
  sends heartbeat events (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` in ``prefect.yaml``'s job
  variables); the automation :func:`missed_heartbeats_automation` sees none for two
  periods and moves the run to ``Scheduled`` (``AwaitingRetry``). That transition releases
  the deployment's concurrency slot (Prefect's ``ReleaseFlowConcurrencySlots`` rule; the
  slot's lease would otherwise live up to 300 s), and the next worker of the pool picks
  the same run up again. The flow resumes at the first unfinished stage (the
  orchestrator skips stages whose outputs are complete). The flow refuses to start a run
  that was restarted more than ``max_restarts`` times, so a run whose process keeps
  dying does not loop. A stage that fails (an exception, a non-zero exit) fails the run:
  that is not restarted.
- **cancel**: :func:`cancel` asks Prefect to cancel (``Cancelling``: a live worker that
  runs the flow stops it); when no worker does so within a grace period (the worker is
  dead, the flow process an orphan), it terminates the flow process on this host and
  records ``Cancelled``.

``tracerl operator setup`` creates (or updates) both automations; it is idempotent.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

DEPLOYMENT = "tracerl/iterate"
TAG = "tracerl"  # the deployment's tag: its flow runs carry it, and so do their events
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
MISSED_HEARTBEATS = 2  # heartbeat periods without any event of a run before it is restarted
RESTART_STATE = "AwaitingRetry"
AUTOMATION_NAME = "tracerl: restart runs whose heartbeats stopped"
CRASHED_AUTOMATION_NAME = "tracerl: restart crashed runs"


class OperatorError(RuntimeError):
    """An operator command could not do what was asked (the message says why)."""


def heartbeat_seconds(prefect_yaml: str | os.PathLike, deployment: str = "iterate") -> int:
    """The heartbeat period of ``deployment`` in ``prefect.yaml`` (its job variables' env)."""
    spec = yaml.safe_load(Path(prefect_yaml).read_text())
    for d in spec.get("deployments", []):
        if d.get("name") == deployment:
            env = ((d.get("work_pool") or {}).get("job_variables") or {}).get("env") or {}
            if HEARTBEAT_ENV in env:
                return int(env[HEARTBEAT_ENV])
            raise OperatorError(
                f"{prefect_yaml}: deployment {deployment!r} sets no {HEARTBEAT_ENV} in "
                "work_pool.job_variables.env; without heartbeats a killed run cannot be "
                "told from a running one")
    raise OperatorError(f"{prefect_yaml}: no deployment named {deployment!r}")


def missed_heartbeats_automation(heartbeat_s: int) -> Any:
    """The automation that restarts a run whose process died: after a
    ``prefect.flow-run.heartbeat`` of a run tagged ``tracerl``, no event of that run
    (heartbeat or state change) for ``MISSED_HEARTBEATS`` periods -> the run goes to
    ``Scheduled``/``AwaitingRetry``. A run that finished, was cancelled or crashed sent a
    state-change event after its last heartbeat, so it is never touched."""

    within = MISSED_HEARTBEATS * heartbeat_s
    return _restart_automation(
        AUTOMATION_NAME,
        f"A tracerl flow run that sent no event for {within} s after a heartbeat (its "
        "process was killed) is scheduled again: a worker resumes it at the first "
        "unfinished stage, and its deployment concurrency slot is released.",
        "prefect.flow-run.heartbeat", within,
        f"no heartbeat for {within} s (the flow process died)")


def _restart_automation(name: str, description: str, after: str, within: int,
                        why: str) -> Any:
    """An automation that sends a tracerl flow run (tagged ``TAG``) back to ``Scheduled``
    (``RESTART_STATE``) when no other event of it follows ``after`` within ``within``
    seconds: a worker of the pool then resumes it at the first unfinished stage."""
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    return AutomationCore(
        name=name,
        description=description,
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.id": f"prefect.tag.{TAG}"},
            after={after},
            expect={"prefect.flow-run.*"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within),
        ),
        actions=[ChangeFlowRunState(
            state="SCHEDULED", name=RESTART_STATE, force=True,
            message=f"{RESTART_MESSAGE}: {why}; a worker resumes it at the first "
                    "unfinished stage")],
    )


def crashed_automation(quiet_s: int) -> Any:
    """The automation that restarts a run Prefect recorded as ``Crashed`` (its worker saw
    the flow process die, e.g. ``kill -9`` or the OOM killer, or the engine caught an
    interruption) once the run stayed ``Crashed`` for ``quiet_s`` seconds: the run goes
    to ``Scheduled``/``AwaitingRetry`` and the pool's worker starts it again. The flow's
    ``max_restarts`` bounds how often.

    Not at once: a Prefect 3.9 process worker reports one dead flow process twice (its
    runner, then the worker's own exit check seconds later, ``workers/base.py``
    ``_submit_run_and_capture_errors``); restarted in between, the second report would
    mark the new attempt ``Crashed`` while its process runs, and it would be started a
    third time. Each report re-arms the wait."""
    return _restart_automation(
        CRASHED_AUTOMATION_NAME,
        f"A tracerl flow run that stayed Crashed for {quiet_s} s is scheduled again: a "
        "worker resumes it at the first unfinished stage (at most max_restarts times).",
        "prefect.flow-run.Crashed", quiet_s, "the run crashed")


def automations(prefect_yaml: str | os.PathLike = "prefect.yaml") -> list[Any]:
    """The project's automations (see the module doc)."""
    beat = heartbeat_seconds(prefect_yaml)
    return [missed_heartbeats_automation(beat), crashed_automation(quiet_s=beat)]


def setup(prefect_yaml: str | os.PathLike = "prefect.yaml") -> dict[str, str]:
    """Create or update the project's automations; returns ``{name: id}``."""
    from prefect.client.orchestration import get_client

    wanted = automations(prefect_yaml)
    out = {}
    with get_client(sync_client=True) as client:
        for a in wanted:
            existing = client.read_automations_by_name(a.name)
            if existing:
                client.update_automation(existing[0].id, a)
                for extra in existing[1:]:
                    client.delete_automation(extra.id)
                out[a.name] = str(existing[0].id)
            else:
                out[a.name] = str(client.create_automation(a))
    return out


def _local_pid(infrastructure_pid: str | None) -> int | None:
    """The pid in Prefect's ``<host>:<pid>`` when the host is this one."""
    if not infrastructure_pid:
        return None
    host, _, pid = infrastructure_pid.rpartition(":")
    if host and host != socket.gethostname():
        return None
    return int(pid) if pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not reaped) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def cancel(run_id: str, grace_s: float = 15.0, poll_s: float = 0.5) -> str:
    """Cancel flow run ``run_id`` and wait until it is ``Cancelled``; returns its final
    state name.

    1. ``Cancelling`` (what ``prefect flow-run cancel`` does): a live worker that started
       the flow stops it and records ``Cancelled``;
    2. after ``grace_s`` without that (no worker owns the process any more), ``Cancelled``
       is recorded through the API (forced: nobody else will), then the flow process, when
       it runs on this host, is killed with SIGKILL (its process group when it leads one,
       so a stage's subprocess goes too). Not SIGTERM: a Prefect 3.9 engine terminated
       that way reports ``Crashed`` over the ``Cancelled`` state, and a crashed run is
       restarted (:func:`crashed_automation`). What a killed stage leaves (a temp folder,
       the writer lock, an MLflow child run) the next run of that folder cleans up.
    """
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Cancelling

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        if run.state is not None and run.state.is_final():
            return run.state.name
        if run.state is None or not run.state.is_cancelling():
            client.set_flow_run_state(run_id, Cancelling(
                message="cancel requested (tracerl operator cancel)"))
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                return run.state.name
            time.sleep(poll_s)
        pid = _local_pid(run.infrastructure_pid)
        alive = pid is not None and _alive(pid)
        how = f"killed its process {pid}" if alive else "no process of it runs on this host"
        client.set_flow_run_state(run_id, Cancelled(
            message=f"cancelled by tracerl operator cancel: no worker stopped it in "
                    f"{grace_s:.0f} s; {how}"), force=True)
        if alive:
            try:
                if os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return client.read_flow_run(run_id).state.name


RESTART_MESSAGE = "restarted by tracerl"  # how the automations' states begin


def restarts(states: list[Any]) -> int:
    """How often the automations restarted a flow run, from its state history (Prefect's
    ``run_count`` counts every proposed ``Running``, more than the starts)."""
    return sum(1 for s in states if s.type.value == "SCHEDULED"
               and (s.message or "").startswith(RESTART_MESSAGE))


def restarts_exceeded(restarted: int, max_restarts: int) -> str | None:
    """Why a flow run must not start again (``None`` when it may): a run restarted more
    than ``max_restarts`` times keeps dying, and restarting it again would loop.

    >>> restarts_exceeded(0, 3) is None, restarts_exceeded(3, 3) is None
    (True, True)
    >>> restarts_exceeded(4, 3)
    'this flow run was restarted 4 times (> max_restarts=3): its process keeps dying; look at its logs, fix the cause, then start a new run (it resumes at the first unfinished stage)'
    """
    if restarted <= max_restarts:
        return None
    return (f"this flow run was restarted {restarted} times (> max_restarts={max_restarts}):"
            " its process keeps dying; look at its logs, fix the cause, then start a new run"
            " (it resumes at the first unfinished stage)")


def current_restarts() -> int:
    """:func:`restarts` of the flow run this process runs (0 outside a flow run)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if not flow_run.id:
        return 0
    with get_client(sync_client=True) as client:
        return restarts(client.read_flow_run_states(flow_run.id))


def runs(limit: int = 10) -> list[dict[str, Any]]:
    """The latest flow runs of the deployment: id, name, state, start, run count."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    name = DEPLOYMENT.split("/", 1)[1]
    with get_client(sync_client=True) as client:
        found = client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])),
            sort=FlowRunSort.START_TIME_DESC, limit=limit)
    return [{"id": str(r.id), "name": r.name,
             "state": r.state.name if r.state else "-",
             "start": r.start_time.isoformat(timespec="seconds") if r.start_time else "-",
             "run_count": r.run_count} for r in found]

"""prefect.yaml declares deployment `iterate` of the flow `tracerl`, and its entrypoint
loads that flow; crash drills on a real server and workers (slow)."""

from __future__ import annotations

import inspect
import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from prefect_live import LivePrefect, wait_for
from test_flow import final_numbers
from test_flow_fakes import write_fake_stages, write_params
from tracerl.config import load_params
from tracerl.pipeline.layout import RunLayout, is_done, plan_all

REPO = Path(__file__).resolve().parents[1]


def test_deployment_iterate_points_at_flow_tracerl():
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (dep,) = [d for d in spec["deployments"] if d["name"] == "iterate"]
    assert dep["work_pool"]["name"] == "tracerl-local"
    path, _, name = dep["entrypoint"].partition(":")
    flow = load_flow_from_entrypoint(str(REPO / path) + ":" + name)
    assert flow.name == "tracerl"
    accepted = set(inspect.signature(flow.fn).parameters)
    assert set(dep["parameters"]) <= accepted
    assert {"params_path", "run_name", "iterations", "runner", "part"} <= accepted
    assert "127.0.0.1" in (REPO / "prefect.yaml").read_text()  # documented local commands


# ---------------------------------------------------------------------- crash drills
# A real Prefect server, `prefect deploy` of prefect.yaml, `tracerl operator setup`, process
# workers; the pipeline is the fake-stage one (test_flow_fakes), held at policy[0] while
# the test kills processes.

FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    base = tmp_path_factory.mktemp("live")
    proj = base / "proj"
    write_fake_stages(proj)
    write_params(proj / "params.yaml")
    lp = LivePrefect(base / "prefect", proj, {"FAKE_HOLD": "policy[0]"})
    try:
        lp.start_server()
        lp.deploy()
        out = lp.tracerl("operator", "setup")
        assert "restart runs whose heartbeats stopped" in out
        assert lp.tracerl("operator", "setup").split()[1] == out.split()[1]  # idempotent
        yield lp
    finally:
        lp.stop_all()


@pytest.fixture(autouse=True)
def _no_worker_left(request):
    """Each drill starts its own workers; none outlives it (a leftover worker would take
    the next drill's run)."""
    yield
    if "live" in request.fixturenames:
        request.getfixturevalue("live").kill_workers()


def wait_final(lp: LivePrefect, run_id: str, timeout: float,
               final: tuple[str, ...] = FINAL) -> tuple[str, str]:
    return wait_for(f"flow run {run_id} to end",
                    lambda: (s := lp.state(run_id))[0] in final and s, timeout)


DONE = ("COMPLETED", "FAILED", "CANCELLED")  # Crashed is not the end: it is restarted


def worker_for(lp: LivePrefect, name: str, log) -> None:
    lp.env["FAKE_LOG"] = str(log)
    lp.start_worker(name)


def held_run(lp: LivePrefect, worker: str, name: str, run_name: str):
    """A deployment run on a new worker ``worker``, held at policy[0] (the fake stages wait
    there while ``<name>.log.hold`` exists): ``(run id, its stage log, the hold file)``."""
    log = lp.project / f"{name}.log"
    hold = lp.project / f"{name}.log.hold"
    hold.touch()
    worker_for(lp, worker, log)
    run = lp.run_deployment(run_name=run_name)
    wait_for("policy[0] to start", (lp.project / f"{name}.log.held").exists, 300)
    return run, log, hold


def manifests(run_dir) -> dict[str, int]:
    return {str(m.parent.relative_to(run_dir)): m.stat().st_mtime_ns
            for m in run_dir.rglob("manifest.json") if "/." not in str(m)}


@pytest.fixture(scope="module")
def clean(live):
    """An uninterrupted deployment run (run folder ``clean``): the reference."""
    worker_for(live, "w-clean", live.project / "clean.log")
    run = live.run_deployment(run_name="clean")
    assert wait_final(live, run, 300) == ("COMPLETED", "Completed")
    live.kill("w-clean")
    return run


@pytest.mark.slow
def test_killed_worker_and_flow_resume_on_a_new_worker(live, clean):
    proj = live.project

    # the same pipeline, killed at policy[0]: SIGKILL the flow process and the worker
    crash, log, hold = held_run(live, "w-1", "crash", "crash")
    done_before = manifests(proj / "runs" / "crash")
    assert "rl/iter_0/value" in done_before and "rl/iter_0/policy" not in done_before
    os.kill(live.flow_process(crash), signal.SIGKILL)
    live.kill("w-1")
    killed = time.monotonic()
    hold.unlink()
    assert live.state(crash)[0] == "RUNNING"  # nobody told Prefect

    # a new worker, and a second run asked for at once (one concurrency slot)
    worker_for(live, "w-2", log)
    second = live.run_deployment(run_name="second")
    left = wait_for("the killed run to be rescheduled",
                    lambda: live.state(crash)[0] != "RUNNING" and time.monotonic(), 200)
    heartbeat = 30
    assert left - killed < 2 * heartbeat + 45  # missed heartbeats, not the 300 s lease
    assert wait_final(live, crash, 300, DONE) == ("COMPLETED", "Completed")
    assert wait_final(live, second, 300, DONE) == ("COMPLETED", "Completed")
    states = live.request("GET", f"/flow_run_states/?flow_run_id={crash}")
    restarted = [s for s in states if s["name"] == "AwaitingRetry"]
    assert len(restarted) == 1, json.dumps(states)[:3000]  # the same flow run, once more
    assert "no heartbeat" in restarted[0]["message"]
    wait_for("the restarted run to log its skipped stages",  # logs trail the state
             lambda: "prepare skipped (done)" in "\n".join(live.run_logs(crash)), 60)

    # finished stages were skipped (their outputs untouched), the rest ran; the results
    # equal the uninterrupted run's
    after = manifests(proj / "runs" / "crash")
    assert {k: after[k] for k in done_before} == done_before
    params = load_params(proj / "params.yaml", {"run": {"name": "crash"}})
    calls = plan_all(params, RunLayout.from_params(params, base=proj))
    assert all(is_done(c) for c in calls)
    assert final_numbers(proj, "crash") == final_numbers(proj, "clean")
    live.kill("w-2")


@pytest.mark.slow
def test_killed_worker_alone_does_not_end_the_run(live, clean):
    """The flow process outlives its worker (whose pipes it wrote its console to) and
    finishes the run itself, every stage once."""
    proj = live.project
    run, log, hold = held_run(live, "w-o", "orphan", "orphan")
    live.kill("w-o")
    hold.unlink()
    assert wait_final(live, run, 300) == ("COMPLETED", "Completed")
    states = live.request("GET", f"/flow_run_states/?flow_run_id={run}")
    assert not [s for s in states if s["name"] in ("AwaitingRetry", "Crashed")]
    assert log.read_text().split() == (proj / "clean.log").read_text().split()
    # every stage's task ran once and completed. (Checked on task runs, not on log lines:
    # the API log handler drops a batch the server does not answer in time, and under
    # CI load one did, losing "policy[0] ran".)
    expected = len(live.task_runs(clean))
    tasks = wait_for("the task runs to be recorded",
                     lambda: (t := live.task_runs(run)) and len(t) == expected and t, 60)
    names = [name for name, _ in tasks]
    assert "policy[0]" in names and len(names) == len(set(names)), tasks
    assert {state for _, state in tasks} == {"COMPLETED"}, tasks
    assert "runs again" not in "\n".join(live.run_logs(run))  # a fresh run says nothing
    assert final_numbers(proj, "orphan") == final_numbers(proj, "clean")


@pytest.mark.slow
def test_killed_flow_process_restarts_on_its_worker(live, clean):
    proj = live.project
    run, log, hold = held_run(live, "w-f", "flowkill", "flowkill")
    done_before = manifests(proj / "runs" / "flowkill")
    os.kill(live.flow_process(run), signal.SIGKILL)  # the worker sees it die: Crashed
    hold.unlink()
    assert wait_final(live, run, 300, DONE) == ("COMPLETED", "Completed")
    states = live.request("GET", f"/flow_run_states/?flow_run_id={run}")
    history = [(s["timestamp"][11:19], s["name"], (s["message"] or "")[:80])
               for s in sorted(states, key=lambda s: s["timestamp"])]
    names = [h[1] for h in history]
    assert "Crashed" in names and names.index("AwaitingRetry") > names.index("Crashed")
    assert names.count("AwaitingRetry") == 1, "\n".join(map(str, history))
    after = manifests(proj / "runs" / "flowkill")
    assert {k: after[k] for k in done_before} == done_before
    assert final_numbers(proj, "flowkill") == final_numbers(proj, "clean")
    live.kill("w-f")


@pytest.mark.slow
def test_cancel_completes_when_the_worker_is_gone(live):
    run, _, hold = held_run(live, "w-c", "cancel", "cancelled")
    pid = live.flow_process(run)
    live.kill("w-c")  # the flow process stays, nobody owns it
    t0 = time.monotonic()
    out = live.tracerl("operator", "cancel", run, "--grace", "5")
    took = time.monotonic() - t0
    assert out.strip().endswith("Cancelled") and live.state(run) == ("CANCELLED", "Cancelled")
    assert took < 60
    states = live.request("GET", f"/flow_run_states/?flow_run_id={run}")
    assert not [s for s in states if s["type"] == "CRASHED"]  # nothing to restart
    wait_for("the flow process to exit", lambda: not os.path.exists(f"/proc/{pid}")
             or open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z", 30)
    hold.unlink()
    time.sleep(45)  # longer than the crash automation's quiet period: still Cancelled
    assert live.state(run) == ("CANCELLED", "Cancelled")

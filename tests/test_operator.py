"""Operator pieces that need no Prefect server: the console guard against a killed
worker's broken pipe, stage failures that say why, the automation's definition, the
restart bound. The drills with a real server and workers are in test_flow_deployment.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import stage_package
from tracerl.pipeline.layout import StageCall
from tracerl.pipeline.operator import (
    AUTOMATION_NAME,
    CRASHED_AUTOMATION_NAME,
    OperatorError,
    automations,
    crashed_automation,
    heartbeat_seconds,
    missed_heartbeats_automation,
    restarts_exceeded,
)
from tracerl.pipeline.runners import InProcessRunner, StageFailed, SubprocessRunner

REPO = Path(__file__).resolve().parents[1]

# A process whose stdout/stderr reader goes away (as a killed worker's does) and which
# then logs through Prefect's console handler (rich): without the guard rich raises
# SystemExit(1) on the broken pipe.
CHILD = textwrap.dedent('''
    import logging, sys, time
    from pathlib import Path
    from tracerl.pipeline.console import console_lost, console_tail, guard_console
    if sys.argv[1] == "guard":
        guard_console()
    from prefect.logging.handlers import PrefectConsoleHandler
    log = logging.getLogger("drill")
    log.addHandler(PrefectConsoleHandler(stream=sys.stderr))
    log.setLevel(logging.INFO)
    print("ready", flush=True)
    sys.stdin.readline()          # the parent closed the reading end of our pipes
    for i in range(50):
        log.info("line %d after the reader died", i)
        print("stdout line", i, flush=True)
    Path(sys.argv[2]).write_text(f"survived lost={console_lost()} tail={console_tail()[-1:]}")
''')


@pytest.mark.parametrize("mode", ["guard", "bare"])
def test_console_guard_survives_a_dead_reader(tmp_path, mode):
    marker = tmp_path / "survived"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    p = subprocess.Popen([sys.executable, "-c", CHILD, mode, str(marker)], env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    assert p.stdout.readline().strip() == b"ready"
    p.stdout.close()  # the reader dies
    p.stdin.write(b"go\n")
    p.stdin.close()
    rc = p.wait(timeout=120)
    if mode == "guard":
        assert rc == 0
        text = marker.read_text()
        assert "survived lost=True" in text and "after the reader died" in text
    else:  # the failure the guard exists for: rich's SystemExit(1) on EPIPE
        assert rc == 1 and not marker.exists()


def _call(tmp_path: Path) -> StageCall:
    return StageCall("rollout", tmp_path / "runs" / "r" / "rl" / "iter_0" / "rollout", 0, {})


STAGE = textwrap.dedent('''
    import sys

    def main(argv=None):
        mode = __import__("os").environ["MODE"]
        print("loading the policy", file=sys.stderr)
        if mode == "return":
            print("error: the checkpoint is missing", file=sys.stderr)
            return 2
        if mode == "pipe":
            try:
                raise BrokenPipeError(32, "Broken pipe")
            except BrokenPipeError:
                raise SystemExit(1)
        if mode == "raise":
            raise ValueError("bad block size")
        return 0

    if __name__ == "__main__":
        sys.exit(main())
''')


@pytest.fixture
def failing_pkg(tmp_path, monkeypatch):
    yield from stage_package(tmp_path, monkeypatch, "failing_stages", STAGE)


def test_inprocess_failures_say_why(failing_pkg, monkeypatch, capsys):
    r, c = InProcessRunner("failing_stages"), _call(failing_pkg)
    monkeypatch.setenv("MODE", "return")
    with pytest.raises(StageFailed) as e:
        r.run(c, Path("p.yaml"), {})
    assert "rollout[0] failed (main returned 2)" in str(e.value)
    assert e.value.tail == ["loading the policy", "error: the checkpoint is missing"]
    assert "  | error: the checkpoint is missing" in str(e.value)
    assert "error: the checkpoint is missing" in capsys.readouterr().err  # still printed
    monkeypatch.setenv("MODE", "pipe")
    with pytest.raises(StageFailed, match=r"sys.exit\(1\) while handling BrokenPipeError.*"
                                          r"killed Prefect worker"):
        r.run(c, Path("p.yaml"), {})
    monkeypatch.setenv("MODE", "raise")
    with pytest.raises(StageFailed, match="it raised ValueError: bad block size") as e:
        r.run(c, Path("p.yaml"), {})
    assert isinstance(e.value.__cause__, ValueError)
    monkeypatch.setenv("MODE", "ok")
    r.run(c, Path("p.yaml"), {})


def test_subprocess_failure_quotes_stderr(failing_pkg):
    r, c = SubprocessRunner("failing_stages", cwd=failing_pkg), _call(failing_pkg)
    with pytest.raises(StageFailed, match=r"exit status 2") as e:
        r.run(c, Path("p.yaml"), {"MODE": "return"})
    assert e.value.tail == ["loading the policy", "error: the checkpoint is missing"]
    with pytest.raises(StageFailed) as e:
        r.run(c, Path("p.yaml"), {"MODE": "raise"})
    assert e.value.tail[-1] == "ValueError: bad block size"


def test_automation_restarts_after_two_missed_heartbeats():
    hb = heartbeat_seconds(REPO / "prefect.yaml")
    assert hb == 30  # prefect.yaml's job variables (Prefect's minimum)
    a = missed_heartbeats_automation(hb)
    assert a.name == AUTOMATION_NAME
    t = a.trigger
    assert t.posture == "Proactive" and t.within.total_seconds() == 60
    assert t.after == {"prefect.flow-run.heartbeat"} and t.expect == {"prefect.flow-run.*"}
    assert t.for_each == {"prefect.resource.id"}
    assert a.model_dump(mode="json")["trigger"]["match_related"] == {
        "prefect.resource.id": "prefect.tag.tracerl"}
    (act,) = a.actions
    assert (act.type, act.state.value, act.name, act.force) == (
        "change-flow-run-state", "SCHEDULED", "AwaitingRetry", True)
    c = crashed_automation(quiet_s=hb)
    assert c.name == CRASHED_AUTOMATION_NAME and c.trigger.posture == "Proactive"
    assert c.trigger.after == {"prefect.flow-run.Crashed"}  # then quiet for a period
    assert c.trigger.expect == {"prefect.flow-run.*"} and c.trigger.within.total_seconds() == 30
    assert c.model_dump(mode="json")["trigger"]["match_related"] == {
        "prefect.resource.id": "prefect.tag.tracerl"}
    assert c.actions[0].state.value == "SCHEDULED" and c.actions[0].force
    assert [x.name for x in automations(REPO / "prefect.yaml")] == [AUTOMATION_NAME,
                                                                   CRASHED_AUTOMATION_NAME]


def test_heartbeat_must_be_configured(tmp_path):
    f = tmp_path / "prefect.yaml"
    f.write_text("deployments:\n  - name: iterate\n    work_pool: {name: p}\n")
    with pytest.raises(OperatorError, match="PREFECT_FLOWS_HEARTBEAT_FREQUENCY"):
        heartbeat_seconds(f)
    with pytest.raises(OperatorError, match="no deployment named 'other'"):
        heartbeat_seconds(f, "other")


def test_restart_bound():
    from prefect.states import Completed, Crashed, Running, Scheduled

    from tracerl.pipeline.operator import RESTART_MESSAGE, restarts

    history = [Scheduled(), Running(), Crashed(),
               Scheduled(name="AwaitingRetry", message=f"{RESTART_MESSAGE}: the run crashed"),
               Running(), Scheduled(message="Retried via CLI"), Running(), Completed()]
    assert restarts(history) == 1  # only the automations' restarts count
    assert restarts_exceeded(0, 0) is None and restarts_exceeded(1, 1) is None
    assert "restarted 2 times (> max_restarts=1)" in restarts_exceeded(2, 1)

"""The Prefect flow ``tracerl`` end to end on fake stages: a real Prefect flow run
(prefect_test_harness), a real MLflow SQLite backend, the real curriculum stage.

- 2 RL iterations in-process: every artifact, MLflow run, metric and the registered model.
- a crash in the middle of iteration 1, then a re-run: it resumes at the unfinished
  stage and ends with the same final metrics as the uninterrupted run.
- a kill -9 of the CLI mid-stage, then a re-run: same.
- a changed policy param re-runs exactly the stages downstream of it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stage_contract import assert_run_meets_contract
from test_flow_fakes import write_fake_stages, write_params
from tracerl.config import load_params
from tracerl.pipeline.layout import RunLayout, is_done, plan_all
from tracerl.tracking import PARENT_TAG, MlflowTracker

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder with params.yaml and the fake stage package, importable."""
    root = tmp_path_factory.mktemp("proj")
    write_fake_stages(root)
    write_params(root / "params.yaml")
    sys.path.insert(0, str(root))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("TRACERL_RUN_ID", raising=False)
        mp.delenv("TRACERL_PARENT_RUN_ID", raising=False)
        yield root
    sys.path.remove(str(root))
    for m in [m for m in sys.modules if m.startswith("fake_stages")]:
        del sys.modules[m]


def run_flow(project: Path, run_name: str, log: Path, **env) -> dict:
    from flows.tracerl_flow import tracerl

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FAKE_LOG", str(log))
        for k, v in env.items():
            mp.setenv(k, v)
        return tracerl(params_path="params.yaml", run_name=run_name,
                       project_root=str(project), package="fake_stages")


def final_numbers(project: Path, run_name: str) -> dict:
    """The run's results, without wall-clock timings (they differ between runs)."""
    root = project / "runs" / run_name
    curves = json.loads((root / "plots" / "rl_curves.json").read_text())
    drop = ("seconds", "iteration.")
    curves = [{k: v for k, v in r.items() if not any(d in k for d in drop)} for r in curves]
    ev = json.loads((root / "metrics" / "evaluate.json").read_text())
    decision = json.loads((root / "rl" / "iter_1" / "curriculum" / "decision.json").read_text())
    return {"curves": curves, "evaluate": ev, "decision": decision}


def labels(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


@pytest.fixture(scope="module")
def clean_run(project, prefect_harness):
    log = project / "clean.log"
    summary = run_flow(project, "clean", log)
    return summary, log


def test_two_iterations_end_to_end(project, clean_run):
    summary, log = clean_run
    params = load_params(project / "params.yaml", {"run": {"name": "clean"}})
    layout = RunLayout.from_params(params, base=project)
    calls = plan_all(params, layout)
    # every planned stage ran once, in order, and its output is complete and stamped
    assert labels(log) == [c.label for c in calls]
    assert all(is_done(c) for c in calls)
    assert_run_meets_contract(calls, layout)  # the same contract the real stages meet
    assert [c.label for c in calls][3:8] == ["rollout[0]", "reward[0]", "value[0]",
                                             "policy[0]", "curriculum[0]"]
    # DVC metrics, learning curves, summary
    for s in ("prepare", "sft", "rl", "evaluate"):
        assert (layout.dvc_metrics(s)).is_file()
    curves = json.loads(layout.curves.read_text())
    assert [r["iteration"] for r in curves] == [0, 1]
    for key in ("reward.accuracy", "rollout.response_length", "rollout.tokens_per_s",
                "policy.kl", "policy.clip_fraction", "value.value_loss", "curriculum.level",
                "policy.seconds", "iteration.wall_seconds", "iteration.overhead_fraction",
                "evaluate.accuracy"):
        assert key in curves[0], key
    for r in curves:  # stage time is the runners' time, never more than the iteration's wall
        assert 0 < r["iteration.stage_seconds"] <= r["iteration.wall_seconds"]
        assert 0 <= r["iteration.overhead_fraction"] < 1
    assert summary["final_eval"]["accuracy"] == pytest.approx(0.5)  # weights 1 + 2 updates
    # MLflow: one parent, one child per stage call, linked; metrics and artifacts
    tracker = MlflowTracker(project)
    c = tracker.client
    parent_id = json.loads(layout.tracking.read_text())["parent_run_id"]
    parent = c.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["policy.lr"] == str(params.policy.lr)
    children = c.search_runs([tracker.experiment_id],
                             filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                             max_results=1000)
    assert sorted(r.info.run_name for r in children) == sorted(x.label for x in calls)
    assert all(r.info.status == "FINISHED" for r in children)
    hist = c.get_metric_history(parent_id, "reward.accuracy")
    assert [m.step for m in hist] == [0, 1]
    assert {m.step for m in c.get_metric_history(parent_id, "iteration.wall_seconds")} == {0, 1}
    by_name = {r.info.run_name: r for r in children}
    pol = by_name["policy[1]"]
    assert pol.data.tags["tracerl.iteration"] == "1"
    assert [m.step for m in c.get_metric_history(pol.info.run_id, "train_loss")] == [0, 1, 2]
    assert "checkpoint" in {a.path for a in c.list_artifacts(pol.info.run_id)}
    scored = by_name["reward[0]"].info.run_id
    assert "trajectory.html" in {a.path for a in c.list_artifacts(scored)}
    assert "rollout.max_tokens" in by_name["rollout[0]"].data.params
    # the final policy is registered, with the run, the params and the headline
    mv = c.get_model_version(params.run.registered_model, "1")
    assert mv.run_id == parent_id
    plan_key = json.loads(layout.tracking.read_text())["plan_key"]
    assert mv.tags["tracerl.run"] == "clean" and mv.tags["tracerl.plan_key"] == plan_key
    assert mv.tags["params.policy.lr"] == str(params.policy.lr)
    assert mv.tags["tracerl.heldout_accuracy.final_rl"] == "0.5"
    assert "SFT 0.300 -> final policy 0.500 (+0.200)" in mv.description


def test_mlflow_names_and_tags_tell_runs_apart(project, clean_run):
    """The parent run is named after the run (and plan key), tagged with the part(s) it
    covers, leads with the headline; evaluations are named by the model they score."""
    from tracerl.pipeline.driver import parent_run_name

    params = load_params(project / "params.yaml", {"run": {"name": "clean"}})
    layout = RunLayout.from_params(params, base=project)
    c = MlflowTracker(project).client
    rec = json.loads(layout.tracking.read_text())
    parent = c.get_run(rec["parent_run_id"])
    assert parent.info.run_name == f"clean {rec['plan_key'][:8]}"
    assert parent.data.tags["tracerl.part"] == "all"
    assert parent.data.tags["tracerl.plan_key"] == rec["plan_key"]
    assert parent.data.metrics["heldout_accuracy.final_rl"] == pytest.approx(0.5)
    assert parent.data.metrics["heldout_accuracy.gain"] == pytest.approx(0.2)
    assert parent.data.tags["mlflow.note.content"].startswith("held-out accuracy: SFT 0.300")
    names = {r.info.run_name for r in c.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")}
    assert {"evaluate[sft]", "evaluate[0]", "evaluate[final]"} <= names
    assert "evaluate" not in names and "evaluate[1]" not in names
    # the DVC way: one part per command, under `dvc exp run` (DVC_EXP_NAME): one parent,
    # named after the experiment, whose part tag grows with the parts run under it
    log = project / "parts.log"
    for part, tag in (("prepare", "prepare"), ("sft", "prepare+sft"), ("rl", "prepare+sft+rl"),
                      ("evaluate", "all")):
        rc, _, err = _main(project, log, "--stage", part, "--run-name", "parts",
                           DVC_EXP_NAME="brisk-lynx")
        assert rc == 0, err
        rec = json.loads((project / "runs" / "parts" / "tracking.json").read_text())
        run = c.get_run(rec["parent_run_id"])
        assert run.data.tags["tracerl.part"] == tag, part
    assert run.info.run_name == parent_run_name("parts", rec["plan_key"], "brisk-lynx")
    assert run.info.run_name.startswith("parts/brisk-lynx ")
    assert run.data.tags["tracerl.dvc_experiment"] == "brisk-lynx"


def test_crash_mid_iteration_resumes(project, clean_run, prefect_harness):
    log = project / "crash.log"
    with pytest.raises(RuntimeError, match=r"policy\[1\]"):
        run_flow(project, "crashy", log, FAKE_CRASH="policy[1]")
    root = project / "runs" / "crashy"
    assert (root / "rl" / "iter_1" / "value" / "manifest.json").is_file()
    assert not (root / "rl" / "iter_1" / "policy").exists()
    assert not list((root / "rl" / "iter_1").glob(".policy.tmp-*"))
    parent_id = json.loads((root / "tracking.json").read_text())["parent_run_id"]
    assert MlflowTracker(project).client.get_run(parent_id).info.status == "FAILED"
    before = labels(log)
    run_flow(project, "crashy", log)
    resumed = labels(log)[len(before):]
    assert resumed == ["policy[1]", "curriculum[1]", "evaluate[final]"]
    assert final_numbers(project, "crashy") == final_numbers(project, "clean")
    # the same parent run was reopened and finished
    assert json.loads((root / "tracking.json").read_text())["parent_run_id"] == parent_id
    assert MlflowTracker(project).client.get_run(parent_id).info.status == "FINISHED"


def test_kill_9_mid_stage_resumes(project, clean_run):
    """A real kill: SIGKILL the CLI while a stage is inside its output temp folder."""
    log = project / "kill.log"
    env = {**os.environ, "FAKE_LOG": str(log), "FAKE_HANG": "reward[1]",
           # the repository's own tracerl (src), not whichever one the environment installed
           "PYTHONPATH": os.pathsep.join([str(project), str(REPO / "src"), str(REPO)])}
    cmd = [sys.executable, "-m", "flows.tracerl_flow", "--no-prefect", "--run-name", "killed",
           "--package", "fake_stages"]
    proc = subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    hang = Path(str(log) + ".hang")
    deadline = time.time() + 300  # a liveness bound: CI machines can be heavily loaded
    while not hang.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "stage never reached the hang point"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    iter1 = project / "runs" / "killed" / "rl" / "iter_1"
    assert list(iter1.glob(".reward.tmp-*")) and not (iter1 / "reward").exists()
    before = labels(log)
    from flows.tracerl_flow import main

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        mp.setenv("FAKE_LOG", str(log))
        assert main(["--no-prefect", "--run-name", "killed", "--package", "fake_stages"]) == 0
    assert labels(log)[len(before):][:2] == ["reward[1]", "value[1]"]
    assert not list(iter1.glob(".reward.tmp-*"))
    assert final_numbers(project, "killed") == final_numbers(project, "clean")
    # the killed stage's child run was closed as KILLED when the parent run reopened
    tracker = MlflowTracker(project)
    parent_id = json.loads((project / "runs" / "killed" / "tracking.json").read_text())[
        "parent_run_id"]
    children = tracker.client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
        max_results=1000)
    status = sorted((r.info.run_name, r.info.status) for r in children
                    if r.info.run_name == "reward[1]")
    assert status == [("reward[1]", "FINISHED"), ("reward[1]", "KILLED")]
    assert all(r.info.status != "RUNNING" for r in children)


def test_changed_param_reruns_only_downstream(project, clean_run):
    from flows.tracerl_flow import main

    log = project / "lr.log"
    params = project / "params_lr.yaml"
    write_params(params, policy={"use_value": True, "lr": 1e-3})
    # same run folder as the clean run, different policy.lr
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        mp.setenv("FAKE_LOG", str(log))
        assert main(["--no-prefect", "--params", "params_lr.yaml", "--run-name", "clean",
                     "--package", "fake_stages"]) == 0
    # curriculum[0] reads only data and rewards, so it is still valid; everything that
    # depends on policy[0] runs again
    ran = labels(log)
    assert "prepare" not in ran and "sft" not in ran and "rollout[0]" not in ran
    assert "curriculum[0]" not in ran and "evaluate[sft]" not in ran
    assert ran == ["policy[0]", "evaluate[0]", "rollout[1]", "reward[1]", "value[1]",
                   "policy[1]", "curriculum[1]", "evaluate[final]"]
    ev = json.loads((project / "runs" / "clean" / "evaluate" / "metrics.json").read_text())
    assert ev["accuracy"] == pytest.approx(0.5)


def test_bad_params_fail_before_any_work(project, capsys):
    from flows.tracerl_flow import main

    write_params(project / "bad.yaml", run={"iterations": 0, "nmae": "x"},
                 rollout={"responses_per_task": 1})
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        assert main(["--no-prefect", "--params", "bad.yaml", "--run-name", "bad"]) == 2
    err = capsys.readouterr().err
    assert "3 problem(s)" in err and "did you mean 'name'" in err
    assert not (project / "runs" / "bad").exists()


def test_part_needs_its_upstream(project):
    from flows.tracerl_flow import build, run_pipeline

    _, orch, planner, key = build(project / "params.yaml", run_name="fresh",
                                  project_root=project, package="fake_stages")
    with pytest.raises(RuntimeError, match=r"upstream stages \['prepare', 'sft'\]"):
        run_pipeline(orch, planner, "rl", orch.run_call)


def _main(project: Path, log: Path, *args: str, **env: str) -> tuple[int, str, str]:
    """Run the flow CLI without Prefect; returns (exit code, stdout, stderr). Output is
    captured here, not with capsys: the module's Prefect harness must never be set up
    under a test's capture (its log handlers would outlive the captured streams)."""
    import contextlib
    import io

    from flows.tracerl_flow import main

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        mp.chdir(project)
        mp.setenv("FAKE_LOG", str(log))
        for k, v in env.items():
            mp.setenv(k, v)
        rc = main(["--no-prefect", "--package", "fake_stages", *args])
    return rc, out.getvalue(), err.getvalue()


def test_damaged_artifacts_are_detected_and_rerun(project, clean_run):
    """Flipped bytes and a truncated file: the stage that wrote them runs again, and so
    does everything computed from them; the result equals the clean run's."""
    import shutil

    shutil.copytree(project / "runs" / "clean", project / "runs" / "damaged")
    (project / "runs" / "damaged" / ".writer.lock").unlink(missing_ok=True)
    # the params the copied run was last launched with (an earlier test may change them)
    shutil.copy(project / "runs" / "clean" / "params.yaml", project / "params_damaged.yaml")
    iter0 = project / "runs" / "damaged" / "rl" / "iter_0"
    roll = iter0 / "rollout" / "rollouts.parquet"
    data = bytearray(roll.read_bytes())
    data[100:164] = bytes(b ^ 0xFF for b in data[100:164])  # 64 flipped bytes, same size
    roll.write_bytes(bytes(data))
    scored = project / "runs" / "damaged" / "rl" / "iter_1" / "reward" / "scored.parquet"
    scored.write_bytes(scored.read_bytes()[:50])  # truncated
    log = project / "damaged.log"
    rc, out, _ = _main(project, log, "--params", "params_damaged.yaml", "--run-name", "damaged")
    assert rc == 0
    assert f"rollout[0] runs again: output damaged: {roll}: content differs" in out
    assert f"{scored}: 50 bytes, the manifest says" in out
    ran = labels(log)
    assert ran[0] == "rollout[0]" and "reward[0]" in ran and "reward[1]" in ran
    assert "prepare" not in ran and "sft" not in ran and "evaluate[sft]" not in ran  # kept
    assert final_numbers(project, "damaged") == final_numbers(project, "clean")


def test_params_are_frozen_per_run(project, clean_run):
    """Editing params.yaml mid-run changes nothing in that run; the next launch says what
    changed and re-plans."""
    import yaml

    params = project / "params_edit.yaml"
    write_params(params, policy={"use_value": True, "lr": 1e-3})
    log = project / "edit.log"
    rc, _, _ = _main(project, log, "--params", str(params), "--run-name", "edited",
                     FAKE_EDIT=f"reward[0]|{params}|lr: 0.001|lr: 0.005")
    assert rc == 0 and "lr: 0.005" in params.read_text()  # the user's edit happened
    for i in (0, 1):  # both updates ran with the launch value
        m = json.loads((project / "runs" / "edited" / "rl" / f"iter_{i}" / "policy" /
                        "metrics.json").read_text())
        assert m["lr"] == pytest.approx(1e-3)
    frozen = yaml.safe_load((project / "runs" / "edited" / "params.yaml").read_text())
    assert frozen["policy"]["lr"] == pytest.approx(1e-3)
    rc, out, _ = _main(project, log, "--params", str(params), "--run-name", "edited")
    assert rc == 0 and "policy.lr: 0.001 -> 0.005" in out
    m = json.loads((project / "runs" / "edited" / "rl" / "iter_0" / "policy" /
                    "metrics.json").read_text())
    assert m["lr"] == pytest.approx(5e-3)


def test_one_writer_per_run_folder(project, clean_run):
    """A second writer is refused with the holder named; a dead holder's lock is stale;
    a live writer's temp folder is never cleaned by another process."""
    root = project / "runs" / "clean"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom tracerl.pipeline.lock import writer_lock\n"
         f"with writer_lock({str(root)!r}):\n    print('held', flush=True)\n    time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    try:
        assert holder.stdout.readline().strip() == "held"
        live_tmp = root / "rl" / "iter_1" / f".policy.tmp-{holder.pid}"
        live_tmp.mkdir()
        log = project / "lock.log"
        rc, _, err = _main(project, log, "--run-name", "clean")
        assert rc == 3
        assert f"is being written by pid {holder.pid}" in err and "another run name" in err
        assert labels(log) == []
    finally:
        holder.kill()
        holder.wait()
    (root / "rl" / "iter_1" / "policy" / "manifest.json").unlink()  # a stage to redo
    assert _main(project, log, "--run-name", "clean")[0] == 0  # the dead holder's lock: stale
    assert not live_tmp.exists()  # its writer is gone now: cleaned
    assert not (root / ".writer.lock").exists()  # released on exit

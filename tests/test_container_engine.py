"""One RL iteration with ``run.runner: container`` in the real CPU image (podman or Docker
through the docker SDK) equals the in-process run, file by file.

Opt-in: ``pytest -m container tests/test_container_engine.py``. Needs an engine answering
on ``DOCKER_HOST`` and the image ``tracerl-cpu:<run.image_tag>``; set them up with
``bash scripts/containers.sh all`` and ``eval "$(bash scripts/containers.sh env)"``
(docs/containers.md). Skipped, with the missing piece named, otherwise.

What must be equal: every parquet table and every safetensors checkpoint (bit for bit),
the trainer states, every JSON output (metrics, decisions, evaluations, the headline)
except wall-clock timings and throughputs; the MLflow child runs are written from inside
the containers to the host's SQLite backend; every file in the runs folder is the host
user's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import params_file
from test_flow_real import TINY
from tracerl.pipeline.compare import DIFFERS, IDENTICAL, SAME_CONTENT, compare_runs, summary_table

pytestmark = [pytest.mark.container, pytest.mark.filterwarnings("ignore")]

REPO = Path(__file__).resolve().parents[1]
# one RL iteration (prepare, sft, evaluate[sft], rollout, reward, policy, curriculum,
# evaluate[final]) on the tiny model of tests/test_flow_real.py, without the value model
ONE_ITERATION = {**{k: v for k, v in TINY.items() if k != "value"},
                 "run": {**TINY["run"], "name": "eq", "iterations": 1},
                 "policy": {"micro_batch": 4}}
# JSON keys that measure the machine, not the computation (wall seconds, throughputs,
# start times), and the identity of the MLflow store (each run has its own backend)
TIMING_KEY = re.compile(r"(^|[._])(\w*seconds|\w*per_s|overhead_fraction|started)$")
RUN_IDENTITY = {"parent_run_id", "tracking_uri"}


def _engine_or_skip(tag: str):
    try:
        import docker
    except ImportError:  # pragma: no cover - docker is a pinned dependency
        pytest.skip("the docker SDK is not installed")
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        pytest.skip("no container engine: set DOCKER_HOST to a Docker API socket "
                    "(`bash scripts/containers.sh service`, docs/containers.md)")
    try:
        client = docker.from_env()
        client.ping()
    except Exception as e:
        pytest.skip(f"no container engine answers on {os.environ.get('DOCKER_HOST')}: {e}")
    try:
        client.images.get(f"tracerl-cpu:{tag}")
    except Exception:
        pytest.skip(f"image tracerl-cpu:{tag} missing: `bash scripts/containers.sh base "
                    "wheels build` (docs/containers.md)")
    return client


def _run_flow(root: Path, runner: str) -> float:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "TRACERL_RUN_ID", "TRACERL_PARENT_RUN_ID")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]),
               MLFLOW_DISABLE_TELEMETRY="true", HF_HUB_OFFLINE="1", DO_NOT_TRACK="1",
               TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.tracerl_flow", "--params",
                           "params.yaml", "--no-prefect", "--runner", runner],
                          cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return time.perf_counter() - t0


def test_one_iteration_in_container_equals_inprocess(tmp_path, request):
    if "container" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("opt-in (minutes of CPU): run with -m container")
    _engine_or_skip("0.1.0")
    roots = {r: tmp_path / r for r in ("inprocess", "container")}
    for root in roots.values():
        root.mkdir()
        params_file(root / "params.yaml", **ONE_ITERATION)
    wall = {r: _run_flow(root, r) for r, root in roots.items()}
    print(f"\nwall seconds: {wall}")
    a, b = (roots[r] / "runs" / "eq" for r in ("inprocess", "container"))
    assert_same_run(a, b)
    # files written by the containers are the host user's
    owners = {(p.stat().st_uid, p.stat().st_gid) for p in b.rglob("*")}
    assert owners == {(os.getuid(), os.getgid())}
    assert_same_tracking(roots["inprocess"], roots["container"])


def assert_same_run(a: Path, b: Path) -> None:
    """The run folders ``a`` (in-process) and ``b`` (container) hold the same results."""
    verdicts = compare_runs(a, b)
    print(summary_table(verdicts))
    assert {v.path for v in verdicts if v.verdict not in (IDENTICAL, SAME_CONTENT, DIFFERS)} \
        == set(), "a file is in one run only"
    by_path = {v.path: v for v in verdicts}
    for v in verdicts:
        if v.path == "params.yaml":  # the frozen params: they differ in run.runner only
            pa, pb = (yaml.safe_load((r / v.path).read_text()) for r in (a, b))
            assert (pa["run"].pop("runner"), pb["run"].pop("runner")) == ("inprocess",
                                                                           "container")
            assert pa == pb
        elif not v.path.endswith(".json"):  # tables, weights, trainer states, pages
            assert v.verdict in (IDENTICAL, SAME_CONTENT), (v.path, v.detail)
        elif v.verdict == DIFFERS:  # JSON: only timings may differ
            assert v.keys, (v.path, v.detail)
            for k in v.keys:
                if k.startswith("files.") and v.path.endswith("manifest.json"):
                    # a manifest's hash of a file that itself differs only in timings
                    listed = k.removeprefix("files.").rsplit(".", 1)[0]
                    sibling = v.path.rsplit("/", 1)[0] + "/" + listed
                    assert by_path[sibling].verdict == DIFFERS, k
                    assert all(TIMING_KEY.search(x) for x in by_path[sibling].keys), k
                else:
                    assert TIMING_KEY.search(k) or k in RUN_IDENTITY, (v.path, k)
    # every stage ran: its checkpoint / table is there, bit-identical
    weights = [v for v in verdicts if v.path.endswith("model.safetensors")]
    assert {v.path.split("/checkpoint")[0] for v in weights} == {"sft", "rl/iter_0/policy"}
    assert any(v.path == "rl/iter_0/rollout/rollouts.parquet" for v in verdicts)


def assert_same_tracking(in_root: Path, ct_root: Path) -> None:
    """MLflow from inside the containers: the stages' own step metrics reached the host's
    SQLite backend, in the child runs the host opened, with the in-process values."""
    from tracerl.tracking import PARENT_TAG, MlflowTracker

    losses = {}
    for runner, root in (("inprocess", in_root), ("container", ct_root)):
        tracker = MlflowTracker(root)
        parent = json.loads((root / "runs" / "eq" / "tracking.json").read_text())
        children = tracker.client.search_runs(
            [tracker.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent['parent_run_id']}'")
        by_name = {c.info.run_name: c for c in children}
        assert set(by_name) == {"prepare", "sft", "evaluate[sft]", "rollout[0]", "reward[0]",
                                "policy[0]", "curriculum[0]", "evaluate[final]"}, runner
        assert all(c.info.status == "FINISHED" for c in children)
        assert all(c.data.tags.get("tracerl.runner") == runner for c in children)
        losses[runner] = {
            label: [(m.step, m.value) for m in tracker.client.get_metric_history(
                by_name[label].info.run_id, "step.loss")] for label in ("sft", "policy[0]")}
        assert all(losses[runner].values()), runner
    assert losses["container"] == losses["inprocess"]


def _stage_containers(client, root: Path, stage: str) -> list:
    return [c for c in client.containers.list(all=True, filters={"label": f"tracerl.stage={stage}"})
            if c.labels.get("tracerl.out", "").startswith(str(root))]


def _start_flow_until(client, root: Path, stage: str, timeout: float = 600):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO)])
    proc = subprocess.Popen([sys.executable, "-m", "flows.tracerl_flow", "--params",
                             "params.yaml", "--no-prefect", "--runner", "container"],
                            cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while not any(c.status == "running" for c in _stage_containers(client, root, stage)):
        assert proc.poll() is None, "the flow ended before the stage started"
        assert time.monotonic() - t0 < timeout, f"no {stage} container after {timeout} s"
        time.sleep(0.5)
    return proc


def test_interrupted_or_killed_flow_leaves_no_writer(tmp_path, request):
    """Ctrl-C in the flow removes the running stage's container; after a SIGKILL of the
    flow (no cleanup possible) the next run of the call removes the orphan before it
    starts, so no old container writes into the folder the new run fills."""
    import signal

    if "container" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("opt-in (minutes of CPU): run with -m container")
    client = _engine_or_skip("0.1.0")
    params_file(tmp_path / "params.yaml", **ONE_ITERATION)
    # Ctrl-C while sft runs in its container
    proc = _start_flow_until(client, tmp_path, "sft")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) != 0
    assert _stage_containers(client, tmp_path, "sft") == []
    # SIGKILL: the container outlives the flow
    proc = _start_flow_until(client, tmp_path, "sft")
    proc.kill()
    proc.wait(timeout=60)
    (orphan,) = _stage_containers(client, tmp_path, "sft")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO)])
    run = subprocess.run([sys.executable, "-m", "flows.tracerl_flow", "--params", "params.yaml",
                          "--no-prefect", "--runner", "container", "--stage", "sft"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert f"removing container {orphan.short_id} left by an earlier run of sft" in run.stdout
    assert _stage_containers(client, tmp_path, "sft") == []
    assert (tmp_path / "runs" / "eq" / "sft" / "checkpoint" / "model.safetensors").is_file()

"""Runners: in-process and subprocess with the tracking env, and the container spec
(checked without a Docker engine)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from docker.types import DeviceRequest

from conftest import stage_package
from tracerl.pipeline.layout import StageCall
from tracerl.pipeline.runners import (
    ContainerRunner,
    InProcessRunner,
    StageFailed,
    SubprocessRunner,
    make_runner,
)

ECHO = textwrap.dedent('''
    import json, os, sys
    from tracerl.pipeline.stage_cli import parse_stage_args

    def main(argv=None):
        a = parse_stage_args(argv)
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "seen.json").write_text(json.dumps({
            "argv": argv if argv is not None else sys.argv[1:],
            "run_id": os.environ.get("TRACERL_RUN_ID")}))
        return 3 if os.environ.get("ECHO_FAIL") else 0

    if __name__ == "__main__":
        sys.exit(main())
''')


@pytest.fixture
def pkg(tmp_path, monkeypatch):
    yield from stage_package(tmp_path, monkeypatch, "echo_stages", ECHO)


def call(tmp_path: Path) -> StageCall:
    return StageCall("rollout", tmp_path / "runs" / "r" / "rl" / "iter_1" / "rollout", 1,
                     {"policy": (tmp_path / "runs" / "r" / "sft",)})


def test_inprocess_runner(pkg, monkeypatch):
    import json

    monkeypatch.delenv("TRACERL_RUN_ID", raising=False)
    c = call(pkg)
    InProcessRunner("echo_stages").run(c, Path("params.yaml"), {"TRACERL_RUN_ID": "abc"})
    seen = json.loads((c.out / "seen.json").read_text())
    assert seen["run_id"] == "abc" and "--iteration" in seen["argv"]
    import os

    assert "TRACERL_RUN_ID" not in os.environ  # restored
    monkeypatch.setenv("ECHO_FAIL", "1")
    with pytest.raises(StageFailed, match=r"rollout\[1\] failed \(main returned 3\)"):
        InProcessRunner("echo_stages").run(c, Path("params.yaml"), {})


def test_subprocess_runner(pkg):
    import json

    c = call(pkg)
    r = SubprocessRunner("echo_stages", cwd=pkg)
    assert r.command(c, Path("p.yaml"))[1:3] == ["-m", "echo_stages.rollout"]
    r.run(c, Path("p.yaml"), {"TRACERL_RUN_ID": "xyz"})
    assert json.loads((c.out / "seen.json").read_text())["run_id"] == "xyz"
    with pytest.raises(StageFailed, match="exit status 3"):
        r.run(c, Path("p.yaml"), {"ECHO_FAIL": "1"})


def test_container_spec_gpu_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "params.yaml").write_text("{}")
    r = ContainerRunner(tmp_path, "runs", image_tag="1.2.3", gpu=True, gpus=2)
    env = {"TRACERL_PARENT_RUN_ID": "p1", "TRACERL_RUN_ID": "c1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    s = r.spec(call(tmp_path), tmp_path / "params.yaml", env)
    assert s["image"] == "tracerl-rollout-gpu:1.2.3"
    assert s["command"][:3] == ["python", "-m", "stages.rollout"]
    cmd = s["command"]
    assert cmd[cmd.index("--params") + 1] == "/workspace/params.yaml"
    assert cmd[cmd.index("--out") + 1] == "/workspace/runs/r/rl/iter_1/rollout"
    assert "policy=/workspace/runs/r/sft" in cmd
    assert cmd[cmd.index("--iteration") + 1] == "1"
    assert not any(a.startswith("--lr") for a in cmd)  # never hyperparameters as flags
    v = s["volumes"]
    assert v[str(tmp_path / "params.yaml")] == {"bind": "/workspace/params.yaml", "mode": "ro"}
    assert v[str(tmp_path / "runs")] == {"bind": "/workspace/runs", "mode": "rw"}
    assert v[str(tmp_path / "mlflow.db")]["mode"] == "rw"  # local SQLite backend mounted
    assert s["working_dir"] == "/workspace"
    e = s["environment"]
    assert e["TRACERL_PARENT_RUN_ID"] == "p1" and e["TRACERL_RUN_ID"] == "c1"
    assert e["HF_HUB_OFFLINE"] == "1" and e["PYTHONUNBUFFERED"] == "1"
    (dr,) = s["device_requests"]
    assert isinstance(dr, DeviceRequest)
    assert dr["Count"] == 2 and dr["Capabilities"] == [["gpu"]]
    assert s["detach"] is True and "shm_size" in s
    assert s["labels"] == {"tracerl.stage": "rollout", "tracerl.iteration": "1",
                           "tracerl.out": str(call(tmp_path).out)}


def test_container_spec_cpu_stage_and_server(tmp_path):
    r = ContainerRunner(tmp_path, "runs", gpu=True)
    c = StageCall("reward", tmp_path / "runs" / "r" / "rl" / "iter_0" / "reward", 0, {})
    s = r.spec(c, tmp_path / "params.yaml", {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"})
    assert s["image"] == "tracerl-cpu:0.1.0"
    assert "device_requests" not in s
    assert s["network_mode"] == "host"  # reach the host's loopback MLflow server
    assert s["environment"]["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    cpu_only = ContainerRunner(tmp_path, "runs", gpu=False)
    s = cpu_only.spec(call(tmp_path), tmp_path / "params.yaml", {})
    assert s["image"] == "tracerl-cpu:0.1.0" and "device_requests" not in s
    assert ContainerRunner(tmp_path, "runs", images={"rollout": "x/y:1"}).image("rollout") == "x/y:1"


def test_container_spec_outside_project(tmp_path):
    outside = tmp_path / "big_disk"
    r = ContainerRunner(tmp_path / "proj", outside)
    s = r.spec(StageCall("prepare", outside / "r" / "prepare"), tmp_path / "proj" / "p.yaml", {})
    assert s["volumes"][str(outside)] == {"bind": str(outside), "mode": "rw"}
    assert str(outside / "r" / "prepare") in s["command"]


def test_make_runner():
    assert make_runner("inprocess").name == "inprocess"
    with pytest.raises(ValueError, match="valid: inprocess, subprocess, container"):
        make_runner("k8s")


# ------------------------------------------------ the container runner against an engine
# A fake docker SDK client: records what the runner asks of the engine (no engine here).
class FakeContainer:
    def __init__(self, engine, spec, logs=(b"hello\n",), status=0, interrupt=False):
        self.engine, self.spec, self._logs = engine, spec, logs
        self.status, self.interrupt, self.removed = status, interrupt, False
        self.short_id = f"c{len(engine.started)}"

    def logs(self, stream, follow):
        assert stream and follow
        yield from self._logs
        if self.interrupt:
            raise KeyboardInterrupt

    def wait(self):
        return {"StatusCode": self.status}

    def remove(self, force=False):
        assert force
        self.removed = True
        self.engine.removed.append(self.short_id)


class FakeEngine:
    def __init__(self, *, rootless=False, podman=True, status=0, interrupt=False, stale=()):
        self.rootless, self.podman = rootless, podman
        self.status, self.interrupt = status, interrupt
        self.started, self.removed, self.filters = [], [], []
        self.stale = list(stale)
        self.containers = self

    # client.containers.*
    def run(self, **spec):
        c = FakeContainer(self, spec, status=self.status, interrupt=self.interrupt)
        self.started.append(c)
        return c

    def list(self, all=False, filters=None):
        self.filters.append(filters)
        return self.stale

    # client.info / client.version
    def info(self):
        return {"SecurityOptions": ["name=seccomp,profile=default"]
                + (["name=rootless"] if self.rootless else [])}

    def version(self):
        name = "Podman Engine" if self.podman else "Engine"
        return {"Components": [{"Name": name, "Version": "4.3.1"}]}


def _runner_with(tmp_path, engine, **kw):
    r = ContainerRunner(tmp_path, "runs", gpu=False, **kw)
    r._client = engine
    from tracerl.pipeline.runners import engine_kind

    r._engine = engine_kind(engine)
    return r


def test_container_spec_entrypoint_user_home_and_out_label(tmp_path, monkeypatch):
    import os

    monkeypatch.delenv("HOME", raising=False)
    r = ContainerRunner(tmp_path, "runs", gpu=False)
    c = call(tmp_path)
    s = r.spec(c, tmp_path / "params.yaml", {})
    # the images' ENTRYPOINT is `python -m`: the command names its program, so none in front
    assert s["entrypoint"] == [""] and s["command"][:2] == ["python", "-m"]
    assert s["user"] == f"{os.getuid()}:{os.getgid()}"
    assert "userns_mode" not in s  # rootful engine (or docker): the uid is the host uid
    assert s["environment"]["HOME"] == "/tmp"
    assert s["labels"]["tracerl.out"] == str(c.out)


def test_rootless_engines_keep_files_the_host_users(tmp_path):
    import os

    from tracerl.pipeline.runners import engine_kind

    assert engine_kind(FakeEngine(rootless=True)) == (True, True)
    assert engine_kind(FakeEngine(rootless=False)) == (True, False)
    assert engine_kind(FakeEngine(rootless=True, podman=False)) == (False, True)

    class Down:
        def info(self):
            raise ConnectionError("no engine")

    assert engine_kind(Down()) == (False, False)
    host = f"{os.getuid()}:{os.getgid()}"
    # rootless podman: the host uid, mapped to itself
    s = _runner_with(tmp_path, FakeEngine(rootless=True)).spec(
        call(tmp_path), tmp_path / "params.yaml", {})
    assert s["userns_mode"] == "keep-id" and s["user"] == host
    # rootless Docker: its container root is the host user
    s = _runner_with(tmp_path, FakeEngine(rootless=True, podman=False)).spec(
        call(tmp_path), tmp_path / "params.yaml", {})
    assert s["user"] == "0:0" and "userns_mode" not in s
    # rootful podman or Docker: the host uid as it is
    for podman in (True, False):
        s = _runner_with(tmp_path, FakeEngine(podman=podman)).spec(
            call(tmp_path), tmp_path / "params.yaml", {})
        assert s["user"] == host and "userns_mode" not in s


def test_container_run_streams_cleans_up_and_fails(tmp_path, capsys):
    sqlite = f"sqlite:///{tmp_path / 'mlflow.db'}"
    stale = FakeContainer(FakeEngine(), {})
    engine = FakeEngine(stale=[stale])
    r = _runner_with(tmp_path, engine)
    c = call(tmp_path)
    assert not (tmp_path / "runs").exists()
    r.run(c, tmp_path / "params.yaml", {"MLFLOW_TRACKING_URI": sqlite})
    # the writable mounts exist before the engine is asked (podman refuses missing ones)
    assert (tmp_path / "runs").is_dir() and (tmp_path / "mlartifacts").is_dir()
    assert engine.filters == [{"label": f"tracerl.out={c.out}"}]
    assert stale.removed  # a container of an earlier run of this call is ended first
    (started,) = engine.started
    assert started.removed and "hello" in capsys.readouterr().out
    assert started.spec["labels"]["tracerl.out"] == str(c.out)

    failing = _runner_with(tmp_path, FakeEngine(status=2))
    with pytest.raises(StageFailed, match="container exit status 2"):
        failing.run(c, tmp_path / "params.yaml", {})
    assert failing._client.started[0].removed

    interrupted = _runner_with(tmp_path, FakeEngine(interrupt=True))
    with pytest.raises(KeyboardInterrupt):
        interrupted.run(c, tmp_path / "params.yaml", {})
    assert interrupted._client.started[0].removed  # no orphan container left running

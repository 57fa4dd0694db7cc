"""A real Prefect server, work pool, deployment and workers for operator tests and the
crash benchmark (``bench/operator_crash.py``): every process is started the way the
README's deployment section starts it (``prefect server start``, ``prefect deploy``,
``prefect worker start``), in its own session so a test can SIGKILL exactly one of them.

The deployment is the repository's ``prefect.yaml`` (``TRACERL_ROOT`` = the repository);
a run is pointed at a tiny project folder (fake stages, see ``test_flow_fakes``) through
the flow's parameters ``params_path``, ``project_root`` and ``package``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float, every: float = 0.5) -> Any:
    """Poll ``check()`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class LivePrefect:
    """One Prefect server (own ``PREFECT_HOME`` and port) and the processes around it.

    Args:
        folder: where the server's database, logs and the processes' output go.
        project: the tiny project folder (importable: it holds the fake stage package).
        env: extra environment for every process (e.g. ``FAKE_LOG``).
        repo: the project whose ``prefect.yaml`` and flow are deployed (the benchmark
            points it at an older commit to measure "before").
    """

    def __init__(self, folder: Path, project: Path, env: dict[str, str] | None = None,
                 repo: Path = REPO):
        self.repo = Path(repo)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.project = Path(project)
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(self.folder / "prefect_home"),
            "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "TRACERL_ROOT": str(self.repo),
            "PYTHONPATH": os.pathsep.join([str(project), str(self.repo / "src"),
                                           str(self.repo)]),
            **(env or {}),
        }
        for k in ("MLFLOW_TRACKING_URI", "TRACERL_RUN_ID", "TRACERL_PARENT_RUN_ID"):
            self.env.pop(k, None)
        self.procs: dict[str, subprocess.Popen] = {}

    # ---------------------------------------------------------------- processes
    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        """Start ``prefect <args>`` as process ``name`` (own session, output to a file)."""
        out = open(self.folder / f"{name}.log", "ab")  # noqa: SIM115 (closed by the child)
        p = subprocess.Popen([PREFECT, *args], cwd=self.repo, env=self.env, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        f = self.folder / f"{name}.log"
        return f.read_text(errors="replace") if f.exists() else ""

    def cli(self, *args: str, check: bool = True, timeout: float = 180) -> str:
        """Run ``prefect <args>`` against this server; its output."""
        r = subprocess.run([PREFECT, *args], cwd=self.repo, env=self.env, capture_output=True,
                           text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)} failed ({r.returncode}):\n"
                               f"{r.stdout}\n{r.stderr}")
        return r.stdout + r.stderr

    def start_server(self, timeout: float = 240, **settings: str) -> None:
        if settings:
            self.env.update(settings)
        self.spawn("server", "server", "start", "--host", "127.0.0.1", "--port",
                   str(self.port))
        wait_for("the Prefect server", self.healthy, timeout)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.api + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def tracerl(self, *args: str, timeout: float = 300) -> str:
        """Run the project command ``tracerl <args>`` against this server; its output."""
        r = subprocess.run([sys.executable, "-m", "tracerl.cli", *args], cwd=self.repo,
                           env=self.env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"tracerl {' '.join(args)} failed ({r.returncode}):\n"
                               f"{r.stdout}\n{r.stderr}")
        return r.stdout

    def start_worker(self, name: str = "worker") -> subprocess.Popen:
        return self.spawn(name, "worker", "start", "--pool", "tracerl-local", "--name", name)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal process ``name`` only (not its children)."""
        p = self.procs[name]
        if p.poll() is None:
            os.kill(p.pid, sig)
            p.wait(timeout=30)

    def flow_processes(self) -> list[int]:
        """Pids of the flow processes that talk to this server (any run)."""
        found = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                environ = (d / "environ").read_bytes().split(b"\0")
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if b"prefect.engine" in cmd and f"PREFECT_API_URL={self.api}".encode() in environ:
                found.append(int(d.name))
        return found

    def kill_workers(self) -> None:
        """SIGKILL every worker started here and every flow process of this server."""
        for name in [n for n in self.procs if n.startswith("w")]:
            self.kill(name)
        for pid in self.flow_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop_all(self) -> None:
        """Stop every process started here and the flow processes they started (their
        process groups, also when the leader was killed before)."""
        for pid in self.flow_processes():  # flows may run in sessions of their own
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in reversed(list(self.procs.values())):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)  # the process and the flows it started
                except ProcessLookupError:
                    break
                try:
                    p.wait(timeout=20)
                    deadline = time.monotonic() + 10
                    while time.monotonic() < deadline:  # the rest of the group
                        os.killpg(p.pid, 0)
                        time.sleep(0.2)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue

    # ---------------------------------------------------------------- the API
    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.api + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def flow_run(self, run_id: str) -> dict:
        return self.request("GET", f"/flow_runs/{run_id}")

    def state(self, run_id: str) -> tuple[str, str]:
        s = self.flow_run(run_id)["state"]
        return s["type"], s["name"]

    def run_logs(self, run_id: str) -> list[str]:
        rows = self.request("POST", "/logs/filter", {
            "logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200})
        return [r["message"] for r in rows]

    def task_runs(self, run_id: str) -> list[tuple[str, str]]:
        """``(name, state type)`` of each task run of flow run ``run_id``. Task run states
        reach the server as events, so they may trail the flow run's final state."""
        rows = self.request("POST", "/task_runs/filter", {
            "flow_runs": {"id": {"any_": [run_id]}}, "limit": 200})
        return sorted((r["name"], (r.get("state") or {}).get("type", "")) for r in rows)

    def flow_process(self, run_id: str) -> int | None:
        """The pid of the process running flow run ``run_id`` (``prefect.engine``)."""
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                environ = (d / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"PREFECT__FLOW_RUN_ID={run_id}".encode() in environ:
                cmd = (d / "cmdline").read_bytes()
                if b"prefect.engine" in cmd:
                    return int(d.name)
        return None

    # ---------------------------------------------------------------- the deployment
    def deploy(self) -> None:
        """Create the work pool and the deployment ``tracerl/iterate`` from prefect.yaml."""
        self.cli("work-pool", "create", "tracerl-local", "--type", "process")
        self.cli("deploy", "--name", "iterate", "--prefect-file",
                 str(self.repo / "prefect.yaml"))

    def run_deployment(self, **parameters: Any) -> str:
        """``prefect deployment run tracerl/iterate`` with the tiny project's parameters;
        the new flow run's id."""
        params = {"params_path": str(self.project / "params.yaml"),
                  "project_root": str(self.project), "package": "fake_stages", **parameters}
        args = ["deployment", "run", "tracerl/iterate"]
        for k, v in params.items():
            args += ["-p", f"{k}={v}"]
        out = self.cli(*args)
        for line in out.splitlines():
            if "UUID:" in line:
                return line.split("UUID:")[1].strip()
        raise RuntimeError(f"no flow run id in:\n{out}")

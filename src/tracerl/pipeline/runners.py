"""Where a stage runs: in this process, in a subprocess, or in a container.

Prefect decides *where and how* a stage runs; a runner is the "how". All three start the
same stage CLI (:mod:`tracerl.pipeline.stage_cli`) with the same arguments and the same
tracking environment (``TRACERL_PARENT_RUN_ID``, ``TRACERL_RUN_ID``,
``MLFLOW_TRACKING_URI``), so a stage cannot tell them apart:

- :class:`InProcessRunner` imports ``stages.<name>`` and calls ``main(argv)``. The
  embedded default: no interpreter start-up per stage, and a stage module may keep its
  model in memory between calls (e.g. rollout and evaluate sharing a loaded policy).
- :class:`SubprocessRunner` runs ``python -m stages.<name> ...``: isolation (a crashing
  or leaking stage cannot take the flow with it), same machine.
- :class:`ContainerRunner` runs the stage in its image through the docker SDK: paths,
  the iteration and a read-only ``params.yaml`` mount, never hyperparameters as flags;
  GPU stages get ``device_requests``. :meth:`ContainerRunner.spec` is the exact
  ``containers.run(**spec)`` call, testable without a Docker engine. Docker and podman
  (``podman system service``, the Docker API on a socket: ``DOCKER_HOST``) both drive it;
  ``scripts/containers.sh`` sets podman and the images up, docs/containers.md has the
  details.

A call of a stage that runs multi-rank (its registry ranks key above 1 in the params
file, :mod:`tracerl.pipeline.launch`) starts through torchrun in the subprocess and
container runners; the in-process runner hands such a call to a subprocess runner.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Protocol
from urllib.parse import urlparse

from tracerl.pipeline.launch import call_ranks, stage_command
from tracerl.pipeline.layout import StageCall
from tracerl.pipeline.registry import STAGES, stage_module
from tracerl.tracking import TRACKING_URI_ENV

TAIL_LINES = 20  # lines of a failed stage's stderr quoted in its error


class StageFailed(RuntimeError):
    """A stage exited non-zero (or raised); the message says why: the exit status, the
    exception that ended it, and the last lines of its stderr."""

    def __init__(self, call: StageCall, detail: str, tail: Sequence[str] = ()):
        self.call = call
        self.tail = list(tail)
        msg = f"stage {call.label} failed ({detail}); output folder {call.out}"
        if self.tail:
            msg += "\nlast lines of its stderr:\n" + "\n".join(f"  | {t}" for t in self.tail)
        super().__init__(msg)


class _TailWriter:
    """A text stream that passes writes on to ``stream`` and keeps the last lines."""

    def __init__(self, stream: Any, keep: int = TAIL_LINES):
        self._stream = stream
        self._lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._partial = ""

    def write(self, s: str) -> int:
        parts = (self._partial + s).split("\n")
        self._partial = parts.pop()
        self._lines.extend(p.rstrip("\r").rsplit("\r", 1)[-1] for p in parts)
        return self._stream.write(s)

    def lines(self) -> list[str]:
        return [*self._lines, *([self._partial] if self._partial.strip() else [])][-self._lines.maxlen:]

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding, ...
        return getattr(self._stream, name)


def _exit_cause(e: BaseException) -> str:
    """Why a stage's ``SystemExit`` happened: its code and the exception it replaced
    (``rich`` turns a broken console pipe into ``SystemExit(1)``)."""
    code = e.code if isinstance(e, SystemExit) else None
    text = f"it called sys.exit({code!r})"
    ctx = e.__cause__ or e.__context__
    if ctx is not None:
        text += f" while handling {type(ctx).__name__}: {ctx}"
        if isinstance(ctx, BrokenPipeError):
            text += (" (the process reading this console went away, e.g. a killed "
                     "Prefect worker)")
    return text


class Runner(Protocol):
    """Runs one stage call to completion; raises :class:`StageFailed` on failure."""

    name: str

    def run(self, call: StageCall, params_path: Path, env: Mapping[str, str]) -> None: ...


@contextlib.contextmanager
def _environ(extra: Mapping[str, str]) -> Iterator[None]:
    """Set ``extra`` in ``os.environ`` for the duration (stages run one at a time)."""
    old = {k: os.environ.get(k) for k in extra}
    os.environ.update({k: str(v) for k, v in extra.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class InProcessRunner:
    """Import ``<package>.<stage>`` and call its ``main(argv) -> int``.

    Args:
        package: the package holding the stage modules (``stages``; tests inject fakes).
    """

    name = "inprocess"

    def __init__(self, package: str = "stages"):
        self.package = package

    def run(self, call: StageCall, params_path: Path, env: Mapping[str, str]) -> None:
        if call_ranks(call.stage, params_path) > 1:  # ranks are processes: torchrun
            SubprocessRunner(self.package).run(call, params_path, env)
            return
        module = importlib.import_module(stage_module(call.stage, self.package))
        main = getattr(module, "main", None)
        if main is None:
            raise StageFailed(call, f"{module.__name__} has no main(argv)")
        tail = _TailWriter(sys.stderr)
        cause = ""
        with _environ(env), contextlib.redirect_stderr(tail):
            try:
                rc = main(call.argv(params_path))
            except SystemExit as e:  # argparse errors, sys.exit in a stage
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                cause = _exit_cause(e)
            except Exception as e:
                raise StageFailed(call, f"it raised {type(e).__name__}: {e}",
                                  tail.lines()) from e
        if rc not in (0, None):
            raise StageFailed(call, cause or f"main returned {rc}", tail.lines())


class SubprocessRunner:
    """Run ``python -m <package>.<stage> <argv>`` in ``cwd`` with the tracking env added.

    Output streams to this process's stdout/stderr (so Prefect's logs show it).
    """

    name = "subprocess"

    def __init__(self, package: str = "stages", cwd: str | os.PathLike | None = None,
                 python: str | None = None):
        self.package = package
        self.cwd = Path(cwd or Path.cwd())
        self.python = python or sys.executable

    def command(self, call: StageCall, params_path: Path,
                env: Mapping[str, str] | None = None) -> list[str]:
        """``python -m <package>.<stage> <argv>``, through torchrun for a multi-rank call
        (rendezvous from ``env``, default this process's environment)."""
        return stage_command(self.python, stage_module(call.stage, self.package),
                             call.argv(params_path), call_ranks(call.stage, params_path), env)

    def run(self, call: StageCall, params_path: Path, env: Mapping[str, str]) -> None:
        full_env = {**os.environ, **{k: str(v) for k, v in env.items()}}
        # the project root first on the path, so `stages` and `flows` import from it
        full_env["PYTHONPATH"] = os.pathsep.join(
            [str(self.cwd), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        # stderr passes through this process (kept: the last lines go into the error)
        proc = subprocess.Popen(self.command(call, params_path, full_env), cwd=self.cwd,
                                env=full_env,
                                stderr=subprocess.PIPE)
        tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace")
            tail.append(line.rstrip("\n").rsplit("\r", 1)[-1])
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(line)
                sys.stderr.flush()
        rc = proc.wait()
        if rc != 0:
            what = f"exit status {rc}" if rc > 0 else f"killed by signal {-rc}"
            raise StageFailed(call, what, list(tail))


# ---------------------------------------------------------------------- containers
WORKDIR = PurePosixPath("/workspace")
# host environment variables forwarded into containers (never secrets by default)
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY",
                 "MLFLOW_DISABLE_TELEMETRY", "MLFLOW_EXPERIMENT_NAME", "DO_NOT_TRACK",
                 "TOKENIZERS_PARALLELISM", "TRACERL_TRACKER")


class ContainerRunner:
    """Run each stage in its image through the docker SDK.

    The project root is the container's working directory ``/workspace``; paths under it
    map to ``/workspace/<relative path>``, other paths keep their absolute path.

    Args:
        project_root: host folder of the project (holds ``params.yaml``).
        runs_dir: host folder of pipeline artifacts, mounted read-write.
        image_tag: images are ``tracerl-<kind>:<tag>``, kind from the stage's registry
            entry (``resources.image``).
        gpu: request GPUs for the stages whose ``resources.gpu`` is set; when False every
            stage runs in the
            CPU image without device requests.
        gpus: GPUs per GPU stage (-1 = all).
        images: per-stage image overrides (``{"rollout": "myreg/rollout:1.2"}``).
        extra_volumes: more ``{host_path: {"bind": path, "mode": "ro"|"rw"}}`` mounts
            (e.g. a local checkpoint folder or a hub cache).
        shm_size: ``/dev/shm`` of GPU stages (PyTorch data loaders and NCCL need room).
    """

    name = "container"

    def __init__(self, project_root: str | os.PathLike, runs_dir: str | os.PathLike, *,
                 image_tag: str = "0.1.0", gpu: bool = True, gpus: int = -1,
                 images: Mapping[str, str] | None = None,
                 extra_volumes: Mapping[str, Mapping[str, str]] | None = None,
                 shm_size: str = "8g", base_url: str | None = None):
        self.project_root = Path(project_root).resolve()
        self.runs_dir = (self.project_root / runs_dir).resolve()
        self.image_tag = image_tag
        self.gpu = gpu
        self.gpus = gpus
        self.images = dict(images or {})
        self.extra_volumes = {str(k): dict(v) for k, v in (extra_volumes or {}).items()}
        self.shm_size = shm_size
        self.base_url = base_url  # None: DOCKER_HOST (docker.from_env)
        self._client = None
        self._engine: tuple[bool, bool] = (False, False)  # (podman, rootless), asked once

    def image(self, stage: str) -> str:
        if stage in self.images:
            return self.images[stage]
        kind = STAGES.get(stage).resources.image if self.gpu else "cpu"
        return f"tracerl-{kind}:{self.image_tag}"

    def container_path(self, host: str | os.PathLike) -> str:
        p = (self.project_root / host).resolve()
        if p.is_relative_to(self.project_root):
            return str(WORKDIR / p.relative_to(self.project_root).as_posix())
        return str(p)

    def _tracking(self, env: Mapping[str, str]) -> tuple[dict[str, str], dict[str, Any], bool]:
        """Tracking env, mounts for a local SQLite backend, and whether the container
        needs the host network (an MLflow server on the host's loopback)."""
        uri = env.get(TRACKING_URI_ENV) or os.environ.get(TRACKING_URI_ENV, "")
        out_env, vols, host_net = {}, {}, False
        if not uri:
            return out_env, vols, host_net
        parsed = urlparse(uri)
        if parsed.scheme == "sqlite" and uri.startswith("sqlite:////"):
            db = Path(uri.removeprefix("sqlite:///"))
            # same absolute paths inside: the experiment's artifact location is absolute.
            # SQLite locks the database file itself (POSIX locks hold across the bind
            # mount); its short-lived rollback journal lands beside it in the container.
            vols[str(db)] = {"bind": str(db), "mode": "rw"}
            arts = db.parent / "mlartifacts"
            vols[str(arts)] = {"bind": str(arts), "mode": "rw"}
        elif parsed.hostname in ("127.0.0.1", "localhost", "::1"):
            host_net = True
        out_env[TRACKING_URI_ENV] = uri
        return out_env, vols, host_net

    def writable_folders(self, env: Mapping[str, str]) -> list[Path]:
        """Host folders mounted read-write: the runs folder and, for a local SQLite
        tracking backend, its artifact folder."""
        folders = [self.runs_dir]
        _, vols, _ = self._tracking(env)
        folders += [Path(h) for h in vols if Path(h).name == "mlartifacts"]
        return folders

    def spec(self, call: StageCall, params_path: Path, env: Mapping[str, str]) -> dict[str, Any]:
        """Keyword arguments of ``docker.from_env().containers.run(**spec)``."""
        from docker.types import DeviceRequest

        params_in = str(WORKDIR / "params.yaml")
        # multi-rank: torchrun inside the container, rendezvous from the host's scheduler env
        command = stage_command("python", STAGES.get(call.stage).module,
                                call.argv(params_path, path_map=self.container_path),
                                call_ranks(call.stage, params_path), os.environ)
        # argv's --params must point at the read-only mount
        command[command.index("--params") + 1] = params_in
        track_env, track_vols, host_net = self._tracking(env)
        environment = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        environment.update({k: str(v) for k, v in env.items()})
        environment.update(track_env)
        environment["PYTHONUNBUFFERED"] = "1"
        # the host uid may have no passwd entry in the image (HOME would be "/", read-only)
        environment.setdefault("HOME", "/tmp")
        volumes: dict[str, dict[str, str]] = {
            str(Path(params_path).resolve()): {"bind": params_in, "mode": "ro"},
            str(self.runs_dir): {"bind": self.container_path(self.runs_dir), "mode": "rw"},
            **track_vols,
            **self.extra_volumes,
        }
        spec: dict[str, Any] = {
            "image": self.image(call.stage),
            # the command names its program: no image ENTRYPOINT (ours is `python -m`) in
            # front of it. [""] is the Docker API's documented reset (ContainerCreate:
            # "exactly one empty string"); podman's compat API ignores an empty list
            "entrypoint": [""],
            "command": command,
            "working_dir": str(WORKDIR),
            "volumes": volumes,
            "environment": environment,
            "labels": {"tracerl.stage": call.stage,
                       "tracerl.iteration": "" if call.iteration is None else str(call.iteration),
                       OUT_LABEL: str(call.out)},
            "detach": True,
        }
        if hasattr(os, "getuid"):  # files in the runs dir stay the host user's
            spec["user"] = f"{os.getuid()}:{os.getgid()}"
            podman, rootless = self._engine
            # a rootless engine maps the host user to the container's root and other
            # container uids to subordinate ids: podman's keep-id maps the host uid to
            # itself; rootless Docker has no such mode, its container root is the host user
            if rootless and podman:
                spec["userns_mode"] = "keep-id"
            elif rootless:
                spec["user"] = "0:0"
        if host_net:
            spec["network_mode"] = "host"
        if self.gpu and STAGES.get(call.stage).resources.gpu:
            spec["device_requests"] = [DeviceRequest(count=self.gpus, capabilities=[["gpu"]])]
            spec["shm_size"] = self.shm_size
        return spec

    def client(self):
        """The docker SDK client (``base_url``, else ``DOCKER_HOST``); asks the engine
        once whether it is podman and rootless."""
        if self._client is None:
            import docker

            self._client = (docker.DockerClient(base_url=self.base_url) if self.base_url
                            else docker.from_env())
            self._engine = engine_kind(self._client)
        return self._client

    def run(self, call: StageCall, params_path: Path, env: Mapping[str, str]) -> None:
        client = self.client()
        # a container of an earlier, killed run of this call may still be writing into
        # the output folder the orchestrator just cleaned: end it first
        for old in client.containers.list(all=True, filters={"label": f"{OUT_LABEL}={call.out}"}):
            print(f"[tracerl] removing container {old.short_id} left by an earlier run of "
                  f"{call.label}", flush=True)
            with contextlib.suppress(Exception):
                old.remove(force=True)
        spec = self.spec(call, params_path, env)
        # a bind mount of a missing host folder is an error on podman (docker creates it
        # root-owned): create the writable folders as the host user
        for folder in self.writable_folders(env):
            folder.mkdir(parents=True, exist_ok=True)
        container = client.containers.run(**spec)
        tail = _TailWriter(sys.stdout)
        try:
            for chunk in container.logs(stream=True, follow=True):
                tail.write(chunk.decode(errors="replace"))
                tail.flush()
            status = container.wait().get("StatusCode", 1)
        finally:  # also on KeyboardInterrupt or an error in this process: no orphan left
            with contextlib.suppress(Exception):
                container.remove(force=True)
        if status != 0:
            raise StageFailed(call, f"container exit status {status}", tail.lines())


OUT_LABEL = "tracerl.out"  # container label: the host output folder of the stage call


def engine_kind(client: Any) -> tuple[bool, bool]:
    """``(podman, rootless)`` of the engine behind ``client``: ``/version`` names the
    ``Podman Engine`` component, ``/info`` lists ``name=rootless`` among the security
    options (Docker and podman alike)."""
    try:
        info, version = client.info(), client.version()
    except Exception:  # an engine that does not answer: keep the plain spec
        return False, False
    podman = any("podman" in str(c.get("Name", "")).lower()
                 for c in version.get("Components") or [])
    rootless = any("rootless" in str(o) for o in info.get("SecurityOptions") or [])
    return podman, rootless


def make_runner(kind: str, *, project_root: str | os.PathLike | None = None,
                params: Any = None, package: str = "stages") -> Runner:
    """Build a runner by name (``inprocess``, ``subprocess``, ``container``)."""
    root = Path(project_root or Path.cwd())
    if kind == "inprocess":
        return InProcessRunner(package)
    if kind == "subprocess":
        return SubprocessRunner(package, cwd=root)
    if kind == "container":
        run = params.run if params is not None else None
        return ContainerRunner(
            root, run.runs_dir if run else "runs",
            image_tag=run.image_tag if run else "0.1.0",
            gpu=bool(run and run.device.startswith("cuda")),
            gpus=run.gpus if run else -1,
        )
    raise ValueError(f"unknown runner {kind!r}; valid: inprocess, subprocess, container")

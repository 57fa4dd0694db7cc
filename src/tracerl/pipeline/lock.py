"""One writer per run folder.

The flow holds ``<run>/.writer.lock`` while it runs stages of that run. The lock records
who holds it (host, pid, the process's start time, the command); a second writer gets a
clear error naming the holder. A lock whose holder died (same host, no such process, or
the pid now belongs to a process started later) is stale and taken over. The file is
created with ``O_EXCL``, so two processes can never both take it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".writer.lock"


class RunLocked(RuntimeError):
    """Another live process is writing this run folder."""


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), or None when
    there is no such process (or it cannot be known)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return "unknown"
        return "unknown"


def pid_alive(pid: int, started: str | None = None) -> bool:
    """True when ``pid`` runs and (if known) is the process that started at ``started``."""
    now = process_start(pid)
    if now is None:
        return False
    return started in (None, "unknown") or now in ("unknown", started)


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "start": process_start(os.getpid()), "since": time.time(),
            "command": " ".join(sys.argv)[:500]}


@contextlib.contextmanager
def writer_lock(root: str | os.PathLike) -> Iterator[Path]:
    """Hold the writer lock of run folder ``root`` for the duration (re-entrant within
    one process)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    me = _holder()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                held = {}
            if held.get("host") == me["host"] and held.get("pid") == me["pid"]:
                yield path  # this process holds it already
                return
            if held and held.get("host") != me["host"]:
                raise RunLocked(
                    f"run folder {root} is locked by pid {held.get('pid')} on host "
                    f"{held.get('host')} ({held.get('command')!r}); if that host's run is "
                    f"gone, delete {path}") from None
            if held and pid_alive(int(held.get("pid", 0)), held.get("start")):
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held["since"]))
                raise RunLocked(
                    f"run folder {root} is being written by pid {held['pid']} since {since} "
                    f"({held.get('command')!r}): wait for it to finish, stop it, or use "
                    "another run name (run.name / --run-name)") from None
            # stale: its holder died; take it over (only one taker wins the next O_EXCL)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        try:
            yield path
        finally:
            with contextlib.suppress(OSError, ValueError):
                if json.loads(path.read_text()).get("pid") == me["pid"]:
                    path.unlink()
        return
    raise RunLocked(f"could not take the writer lock {path}: it keeps reappearing")

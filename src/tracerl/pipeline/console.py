"""Keep a flow alive when the process that reads its console dies.

A Prefect process worker starts the flow with stdout and stderr piped into the worker,
which copies them to its own terminal. When the worker is killed, the pipes lose their
reader and the next write to them fails with ``EPIPE``. Prefect's console log handler
writes through ``rich``, whose ``Console`` turns that ``BrokenPipeError`` into
``SystemExit(1)`` (``rich.console.Console.on_broken_pipe``): the stage being logged at
that moment "returns 1" and the flow crashes, although nothing was wrong with the stage.

:func:`guard_console` puts a pipe of this process between file descriptors 1/2 and the
worker's pipes; a thread copies everything through and, once the reader is gone, stops
copying (keeping the last lines, :func:`console_tail`) instead of failing. Every writer
(Python, C code, a stage's subprocess) writes into a pipe that always has a reader. The
Prefect API log handler, not the console, is where a run's log lives, so nothing an
operator reads is lost.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import os
import stat
import sys
import threading

_lock = threading.Lock()
_guards: dict[int, _Guard] = {}


class _Guard:
    """Forward one file descriptor through a pipe of this process."""

    def __init__(self, fd: int, keep: int):
        self.fd = fd
        self.target = os.dup(fd)  # the original destination (the worker's pipe)
        r, w = os.pipe()
        os.dup2(w, fd)
        os.close(w)
        self.read_end = r
        self.target_alive = True
        self.tail: collections.deque[bytes] = collections.deque(maxlen=keep)
        self.thread = threading.Thread(target=self._pump, name=f"console-guard-{fd}",
                                       daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        while True:
            try:
                chunk = os.read(self.read_end, 65536)
            except OSError:
                return
            if not chunk:
                return
            self.tail.extend(chunk.splitlines(keepends=True))
            if self.target_alive:
                try:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(self.target, view):]
                except OSError:  # EPIPE: the reader (a killed worker) is gone
                    self.target_alive = False

    def restore(self, timeout: float = 2.0) -> None:
        """Point the descriptor at its original destination again and drain the pipe."""
        os.dup2(self.target, self.fd)  # closes this process's write end of the pipe
        self.thread.join(timeout)  # EOF once no child holds the write end any more
        os.close(self.target)
        if not self.thread.is_alive():
            os.close(self.read_end)


def _is_pipe(fd: int) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False


def guard_console(fds: tuple[int, ...] = (1, 2), keep: int = 200) -> list[int]:
    """Guard the descriptors of ``fds`` that are pipes (a worker's, a ``| tee``); once
    per process. Returns the descriptors guarded by this call."""
    done = []
    with _lock:
        for fd in fds:
            if fd in _guards or not _is_pipe(fd):
                continue
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            _guards[fd] = _Guard(fd, keep)
            done.append(fd)
    if done and len(_guards) == len(done):
        atexit.register(release_console)
    return done


def release_console() -> None:
    """Undo :func:`guard_console` (at exit: forwards what is still in the pipes)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with _lock:
        for fd in list(_guards):
            _guards.pop(fd).restore()


def console_lost() -> bool:
    """True once a guarded descriptor's reader went away."""
    return any(not g.target_alive for g in _guards.values())


def console_tail(fd: int = 2, lines: int = 20) -> list[str]:
    """The last ``lines`` lines written to guarded descriptor ``fd``."""
    g = _guards.get(fd)
    if g is None:
        return []
    return [b.decode(errors="replace").rstrip("\n") for b in list(g.tail)[-lines:]]

"""Sandboxed execution of generated programs against function (assert) and stdio tests.

The reference runs model code with plain ``exec`` in child processes, without resource,
filesystem or network limits, and counts ``SystemExit`` as a passed test
(Gen-Verse/dLLM-RL ``reward/rl_execute.py``; spec section 3.3 and 12.1.6). A reward that
can be fooled teaches the policy to fool it, so here:

- **one fresh process per program** (per stdio case), started with a clean environment,
  ``start_new_session`` and, where available (root, or unprivileged user namespaces),
  inside new network, PID and mount namespaces (``unshare``): no network at all, every
  descendant dies with the sandbox (PID-namespace init), private tmpfs over ``/tmp`` and
  the other world-writable folders, a fresh working folder;
- **resource limits** set in the child: ``RLIMIT_CPU``, ``RLIMIT_AS``, ``RLIMIT_FSIZE``,
  ``RLIMIT_NOFILE``, ``RLIMIT_NPROC``, no core files; a **wall-clock limit** enforced by
  the host, which kills the whole process group;
- as root, the program runs as an **unprivileged uid, one per pool slot**, so
  ``RLIMIT_NPROC`` really bounds a fork bomb (root is exempt from it) and the host's
  files are out of reach;
- **an unforgeable verdict**: pass/fail travels over a pipe the host opened, tagged
  with a random nonce; a function test passes only when the harness records it after the
  test statement returned. ``SystemExit``, ``os._exit``, killing the parent, printing
  "passed" or rebinding harness names never produce a pass. Stdio outputs are compared
  by the host; expected outputs never enter the sandbox; test sources never touch disk.

Limitations (documented, not hidden): function tests necessarily run in the program's
interpreter, so a program that deliberately inspects interpreter memory (frames, ``gc``)
could find the nonce, and an object whose ``__eq__`` always returns True satisfies
``assert f(x) == y``; ``ctypes`` is blocked and trace/profile hooks void the verdict to
make such attacks costly. Without ``unshare`` (containers without user namespaces) the
network is blocked only inside Python (``socket`` replaced) and a non-root
``RLIMIT_NPROC`` counts all of the user's processes, so the host adds the current count;
run the reward stage in its container image there. :func:`isolation_mode` says which
mode is active.
"""

from __future__ import annotations

import ast
import functools
import json
import math
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

_HARNESS = (Path(__file__).with_name("_harness.py")).read_text()
_UNSHARE = ["--net", "--pid", "--mount", "--fork", "--kill-child"]


@dataclass(frozen=True)
class SandboxLimits:
    """Per-process limits. ``wall_s`` is enforced by the host, the rest in the child."""

    wall_s: float = 5.0
    cpu_s: int = 5
    memory_mb: int = 512
    nproc: int = 16  # processes/threads the sandbox uid may hold
    fsize_mb: int = 16  # largest file the program may write (also the tmpfs size)
    nofile: int = 64
    max_output_bytes: int = 1 << 20  # stdout kept for comparison
    uid_base: int = 1_900_000  # root only: programs run as uids above this (sandbox_uid)

    def problems(self) -> list[str]:
        p = []
        for k in ("wall_s", "cpu_s", "memory_mb", "nproc", "fsize_mb", "nofile"):
            if getattr(self, k) <= 0:
                p.append(f"SandboxLimits.{k} must be > 0")
        return p


@dataclass(frozen=True)
class ProgramResult:
    """Outcome of one program.

    ``passed`` has one bool per test. ``status``: ``ok`` (ran to the end), ``error``
    (the program raised or exited before the tests), ``timeout``, ``killed`` (died of a
    signal or without the harness's final record), ``invalid`` (nothing to run).
    """

    passed: tuple[bool, ...]
    status: str
    seconds: float = 0.0
    detail: str = ""
    outputs: tuple[str, ...] = field(default=(), repr=False)

    @property
    def fraction(self) -> float:
        return sum(self.passed) / len(self.passed) if self.passed else 0.0

    @property
    def all_passed(self) -> bool:
        return bool(self.passed) and all(self.passed)


# --------------------------------------------------------------------------- isolation


@functools.lru_cache(maxsize=1)
def isolation_mode() -> Literal["namespaces", "userns", "none"]:
    """``namespaces`` (root: net/pid/mount namespaces + uid drop), ``userns`` (non-root
    with user namespaces: net/pid/mount, same uid) or ``none`` (limits and Python-level
    socket blocking only). Probed once per process."""
    exe = shutil.which("unshare")
    if exe is None:
        return "none"
    tries = [("namespaces", [])] if os.geteuid() == 0 else []
    tries.append(("userns", ["--map-root-user"]))
    for name, extra in tries:
        try:
            r = subprocess.run([exe, *extra, *_UNSHARE, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0:
            return name  # type: ignore[return-value]
    return "none"


def _needs_expose(path: str) -> bool:
    """True if an unprivileged user cannot traverse to ``path``."""
    p = Path(path)
    for d in [*reversed(p.parents), p]:
        try:
            if not d.stat().st_mode & 0o001:
                return True
        except OSError:
            return True
    return False


@functools.lru_cache(maxsize=1)
def _expose_roots() -> tuple[str, ...]:
    roots = []
    for r in {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}:
        if _needs_expose(r):
            roots.append(r)
    return tuple(sorted(roots))


def _clean_env() -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _user_process_count() -> int:
    uid = os.getuid()
    n = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.stat(f"/proc/{d}").st_uid == uid:
                    n += 1
            except OSError:
                pass
    return n


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


def _kill_uid(uid: int) -> None:
    """Kill every process of a sandbox uid (fallback sweep; namespaces make it moot)."""
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.stat(f"/proc/{d}").st_uid == uid:
                    os.kill(int(d), signal.SIGKILL)
            except OSError:
                pass


# --------------------------------------------------------------------------- one process


UIDS_PER_PROCESS = 256


def sandbox_uid(limits: SandboxLimits, slot: int, pid: int | None = None) -> int:
    """The unprivileged uid a program of pool ``slot`` runs as (root only).

    Distinct per grading process *and* per slot (``uid_base + (pid mod 65536) * 256 +
    slot``), so concurrent graders (two reward stages, parallel test workers) never share
    a uid: they would otherwise share one RLIMIT_NPROC budget and each other's kill sweeps.
    """
    pid = os.getpid() if pid is None else pid
    return limits.uid_base + (pid % 65536) * UIDS_PER_PROCESS + slot % UIDS_PER_PROCESS


def _run_process(mode: str, code: str, tests: Sequence[str], stdin_text: str | None,
                 limits: SandboxLimits, slot: int) -> tuple[list[str], str, str, int | None, bool, float]:
    """Run the harness once. Returns (result lines with nonce stripped, stdout, stderr tail,
    returncode, timed_out, seconds)."""
    iso = isolation_mode()
    root = os.geteuid() == 0
    uid = sandbox_uid(limits, slot) if (iso == "namespaces" and root) else None
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="tracerl-sbx-") as host_dir:
        workdir = os.path.join(host_dir, "work")
        os.mkdir(workdir, 0o700)
        nproc = limits.nproc if uid is not None else limits.nproc + _user_process_count()
        payload = {
            "mode": mode, "code": code, "tests": list(tests), "nonce": nonce,
            "limits": {"cpu_s": limits.cpu_s, "memory_mb": limits.memory_mb,
                       "fsize_mb": limits.fsize_mb, "nofile": limits.nofile},
            "nproc": nproc, "uid": uid, "isolate_fs": iso == "namespaces" and root,
            "expose": list(_expose_roots()) if uid is not None else [],
            "workdir": workdir, "env": _clean_env(),
        }
        pr, pw = os.pipe()  # payload: host -> harness
        rr, rw = os.pipe()  # results: harness -> host
        os.set_blocking(rr, False)
        out_path = os.path.join(host_dir, "stdout")
        err_path = os.path.join(host_dir, "stderr")
        cmd = [sys.executable, "-I", "-c", _HARNESS, str(pr)]
        if iso == "namespaces":
            cmd = ["unshare", *_UNSHARE, *cmd]
        elif iso == "userns":
            cmd = ["unshare", "--map-root-user", *_UNSHARE, *cmd]
        t0 = time.monotonic()
        proc = None
        timed_out = False
        try:
            with open(out_path, "wb") as fout, open(err_path, "wb") as ferr, \
                    tempfile.TemporaryFile() as fin:
                fin.write((stdin_text or "").encode("utf-8", "replace"))
                fin.seek(0)
                payload["result_fd"] = rw
                data = json.dumps(payload).encode()
                proc = subprocess.Popen(
                    cmd, stdin=fin, stdout=fout, stderr=ferr, pass_fds=(pr, rw),
                    env=_clean_env(), cwd=workdir, start_new_session=True,
                )
                os.close(pr)
                os.close(rw)
                pr = rw = -1
                writer = threading.Thread(target=_write_all, args=(pw, data), daemon=True)
                pw = -1  # owned (and closed) by the writer from here on
                writer.start()
                try:
                    proc.wait(timeout=limits.wall_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                _kill_group(proc)
                proc.wait()
                writer.join()  # returns: the reader is gone, so a pending write fails fast
            if uid is not None and iso != "namespaces":
                _kill_uid(uid)
            lines = _read_results(rr, nonce)
            with open(out_path, "rb") as f:
                stdout = f.read(limits.max_output_bytes).decode("utf-8", "replace")
            with open(err_path, "rb") as f:
                f.seek(max(0, os.path.getsize(err_path) - 2000))
                stderr = f.read().decode("utf-8", "replace")
        finally:
            for fd in (pr, rw, rr, pw):
                if fd >= 0:
                    _close(fd)
            if proc is not None and proc.poll() is None:
                _kill_group(proc)
                proc.wait()
        rc = proc.returncode if proc is not None else None
        return lines, stdout, stderr, rc, timed_out, time.monotonic() - t0


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _write_all(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    except OSError:
        pass
    finally:
        os.close(fd)  # EOF for the harness; the caller never touches fd again


def _read_results(fd: int, nonce: str) -> list[str]:
    chunks = []
    while True:
        try:
            b = os.read(fd, 1 << 16)
        except BlockingIOError:
            break
        if not b:
            break
        chunks.append(b)
        if sum(map(len, chunks)) > 1 << 20:
            break
    tag = nonce + " "
    return [ln[len(tag):] for ln in b"".join(chunks).decode("ascii", "replace").splitlines()
            if ln.startswith(tag)]


# --------------------------------------------------------------------------- public API


def _slots(workers: int) -> queue.Queue[int]:
    q: queue.Queue[int] = queue.Queue()
    for i in range(workers):
        q.put(i)
    return q


_default_slots = _slots(1)


def run_function_tests(code: str, tests: Sequence[str], limits: SandboxLimits | None = None,
                       *, slot: int = 0) -> ProgramResult:
    """Run ``code`` and then each test statement (``assert ...`` or ``check(fn)``).

    A test passes only if its statement ran to completion after the whole program did.
    Never raises on model output.

    Example:
        >>> r = run_function_tests("def add(a, b):\\n    return a + b",
        ...                        ["assert add(1, 2) == 3", "assert add(1, 1) == 3"])
        >>> r.passed, r.status
        ((True, False), 'ok')
    """
    limits = limits or SandboxLimits()
    if not isinstance(code, str) or not code.strip() or not tests:
        return ProgramResult(tuple(False for _ in tests), "invalid", detail="no code or no tests")
    code = _safe_text(code)
    split = [split_assert(_safe_text(t)) for t in tests]
    try:
        lines, _, err, rc, timed_out, secs = _run_process(
            "function", code, [(k, src) for k, src, _ in split], None, limits, slot)
    except OSError as e:  # host-side failure (e.g. out of pids): never a pass
        return ProgramResult(tuple(False for _ in tests), "killed", detail=f"spawn failed: {e}")
    passed = [False] * len(tests)
    for ln in lines:
        parts = ln.split()
        if len(parts) == 2 and parts[0] == "pass" and parts[1].isdigit():
            i = int(parts[1])
            if 0 <= i < len(tests) and split[i][0] == "stmt":
                passed[i] = True
        elif len(parts) >= 2 and parts[0] == "value" and parts[1].isdigit():
            i = int(parts[1])
            if 0 <= i < len(tests) and split[i][0] == "expr":
                rest = ln.split(" ", 2)[2] if len(parts) > 2 else ""
                passed[i] = _literal_equal(rest, split[i][2])
    if timed_out:
        status = "timeout"
    elif "program_error" in lines:
        status, passed = "error", [False] * len(tests)
    elif "done" in lines:
        status = "ok"
    else:
        status = "killed"
    return ProgramResult(tuple(passed), status, secs, detail=f"returncode={rc}; stderr: {err[-500:]}")


def run_stdio_tests(code: str, inputs: Sequence[str], outputs: Sequence[str],
                    limits: SandboxLimits | None = None, *, slot: int = 0) -> ProgramResult:
    """Run ``code`` once per case with ``inputs[k]`` on stdin (a fresh sandbox each).

    A case passes when the program ran to completion with exit status 0 and its stdout
    equals ``outputs[k]`` up to whitespace (tokens joined by single spaces, as the
    reference compares). Expected outputs stay on the host.
    """
    limits = limits or SandboxLimits()
    if len(inputs) != len(outputs) or not inputs or not isinstance(code, str) or not code.strip():
        return ProgramResult(tuple(False for _ in outputs), "invalid",
                             detail="no code, no cases, or inputs/outputs of unequal length")
    code = _safe_text(code)
    passed, got, statuses, total = [], [], [], 0.0
    for inp, exp in zip(inputs, outputs):
        try:
            lines, out, _, _, timed_out, secs = _run_process("stdio", code, [], inp, limits, slot)
        except OSError:
            lines, out, timed_out, secs = [], "", False, 0.0
        total += secs
        ok_exit = "exit 0" in lines
        passed.append(ok_exit and not timed_out and _norm(out) == _norm(exp))
        got.append(out)
        statuses.append("timeout" if timed_out else "ok" if lines else "killed")
    status = "timeout" if "timeout" in statuses else "killed" if "killed" in statuses else "ok"
    return ProgramResult(tuple(passed), status, total, outputs=tuple(got))


_MISSING = object()


def split_assert(test: str) -> tuple[str, str, object]:
    """Split ``assert <expr> == <literal>`` into ``("expr", "<expr>", literal)`` so that the
    expected value never enters the sandbox: the harness returns ``repr(<expr>)`` and the
    host compares literals (defeats reading the tests from interpreter memory and
    ``__eq__``-always-True objects). Any other statement is ``("stmt", test, None)`` and
    runs as a whole inside the sandbox.

    Example:
        >>> split_assert("assert add(1, 2) == 3")
        ('expr', 'add(1, 2)', 3)
        >>> split_assert("assert abs(f(1.0) - 2) < 1e-6")[0]
        'stmt'
    """
    try:
        tree = ast.parse(test)
    except (SyntaxError, ValueError):
        return ("stmt", test, None)
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        return ("stmt", test, None)
    t = tree.body[0].test
    if not (isinstance(t, ast.Compare) and len(t.ops) == 1 and isinstance(t.ops[0], ast.Eq)):
        return ("stmt", test, None)
    for expr, lit in ((t.left, t.comparators[0]), (t.comparators[0], t.left)):
        value = _literal(lit)
        if value is not _MISSING and _literal(expr) is _MISSING:
            return ("expr", ast.unparse(expr), value)
    return ("stmt", test, None)


def _literal(node: ast.AST) -> object:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _MISSING


def _literal_equal(text: str, expected: object) -> bool:
    """``repr`` text from the sandbox equals ``expected`` (both plain Python literals)."""
    if len(text) > 100_000:
        return False
    try:
        value = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    try:
        return bool(value == expected)
    except Exception:  # noqa: BLE001
        return False


def _norm(s: str) -> str:
    return " ".join(str(s).split())


def _safe_text(s: str) -> str:
    return s.encode("utf-8", "replace").decode("utf-8", "replace")


@dataclass(frozen=True)
class CodeJob:
    """One program and its tests: ``method`` is ``function`` (``tests`` are statements)
    or ``stdio`` (``inputs``/``outputs``)."""

    code: str
    method: Literal["function", "stdio"] = "function"
    tests: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()


def run_jobs(jobs: Sequence[CodeJob], limits: SandboxLimits | None = None,
             workers: int = 4) -> list[ProgramResult]:
    """Grade many programs in parallel through a bounded pool of ``workers`` threads,
    each launching one sandbox at a time (so at most ``workers`` sandboxes run at once).
    Results are in job order."""
    limits = limits or SandboxLimits()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    slots = _slots(workers)

    def one(job: CodeJob) -> ProgramResult:
        slot = slots.get()
        try:
            if job.method == "stdio":
                return run_stdio_tests(job.code, job.inputs, job.outputs, limits, slot=slot)
            return run_function_tests(job.code, job.tests, limits, slot=slot)
        except Exception as e:  # noqa: BLE001 - grading never raises on model output
            n = len(job.tests) if job.method == "function" else len(job.outputs)
            return ProgramResult((False,) * n, "killed", detail=f"host error: {e!r}")
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tracerl-sbx") as ex:
        return list(ex.map(one, jobs))


def limits_from(timeout_s: float, memory_mb: int) -> SandboxLimits:
    """Limits from the reward params: CPU time rounds the wall limit up."""
    return SandboxLimits(wall_s=float(timeout_s), cpu_s=max(1, math.ceil(timeout_s)),
                         memory_mb=int(memory_mb))

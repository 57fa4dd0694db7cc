"""Sandboxed execution of generated programs against function (statement) and stdio tests.

The reference runs model code with plain ``exec`` in child processes, without resource,
filesystem or network limits, and counts ``SystemExit`` as a passed test
(Gen-Verse/dLLM-RL ``reward/rl_execute.py``; spec sections 3.3 and 12.1.6). An RL run
optimises whatever the reward lets through, so the grader is built against a program
that actively tries to forge its verdict or read around it.

Threat model
------------
*Adversary*: the program text (model output), arbitrary Python, run with full knowledge
of this module. *Trusted*: the host (this module), the dataset's tests and prompt prefix,
the harness (:mod:`tracerl.rewards._harness`, run from the host's copy of its text), the
kernel. *Goal of the adversary*: a test recorded as passed that the program does not
pass; reading or writing anything outside its sandbox; outliving the grading; slowing or
crashing the host.

Design
------
- **No verdict channel in the untrusted interpreter.** Each program runs in a fresh PID,
  mount, network, IPC and UTS namespace. Its init (PID 1) forks before reading any test:
  the child, the *candidate*, runs the program; the parent, the *judge*, only then reads
  the tests and runs them in its own interpreter, where the program's functions are
  proxies. A call ships its arguments to the candidate and gets back plain data only
  (``None``, bools, numbers, strings, bytes, lists/tuples/dicts/sets of them, decoded
  strictly), so an ``assert`` and a HumanEval ``check(candidate)`` both compare values the
  judge built itself: an ``__eq__`` that always returns True never crosses the pipe, and
  statement tests are exactly as hard to forge as equality tests. The judge holds the
  only descriptor to the host; the candidate never has it, never sees the tests or the
  expected values (not even in memory: the fork happens before they are read), runs
  under another uid, and the judge is non-dumpable and hidden from it (``hidepid=2``).
  ``SystemExit``, ``os._exit``, signals, printing "passed", patching builtins or walking
  frames and ``gc`` can only change what the candidate answers, never what the judge
  records. Helpers of the prompt prefix (e.g. HumanEval's ``poly``) are run by the judge
  from the task, not taken from the program.
- **It sees only what it needs.** The file-system view is a read-only minimal root: the
  interpreter's installation, the shared libraries, ``/dev/{null,zero,random,urandom}``,
  a private ``/proc`` and size-bounded private ``/tmp`` and ``/dev/shm``; the host's tree
  is detached (``pivot_root``). No project, task, home or data folder exists in it.
- **No network of any kind**: an empty network namespace, and a seccomp filter that
  refuses ``socket``/``socketpair`` for every family except ``AF_UNIX`` (whose only
  peers are inside the sandbox) plus the escape hatches (``io_uring``, ``bpf``,
  ``ptrace``, ``process_vm_*``, mount and namespace calls, new namespaces via ``clone``,
  ``clone3``, keyrings, kernel modules); x32 and foreign-architecture calls are refused.
- **Every process reaped**: when the judge (the namespace's init) exits, the kernel kills
  everything left in the namespace; the host kills the whole process group at the wall
  limit, so no daemon outlives the grading.
- **Limits** in the candidate: ``RLIMIT_CPU``, ``RLIMIT_AS``, ``RLIMIT_FSIZE``,
  ``RLIMIT_NOFILE``, ``RLIMIT_NPROC`` (exact: a uid per grading process and slot), no core
  files; the host's wall-clock limit; replies capped at 1 MiB.
- **Fail closed**: :func:`isolation_problems` lists what is missing (root, ``unshare``,
  a seccomp table for the machine, a working probe). Grading refuses to run with
  :class:`SandboxUnavailable` naming it, unless the caller passes
  ``allow_unsandboxed=True`` (params: ``reward.unsafe_allow_unsandboxed_code``), which
  runs with limits and the judge/candidate split only, and says so loudly.

Limitations (documented, not hidden): functions that mutate their arguments in place,
or tests that pass callables to the program, cannot be graded through plain-data calls
(those tests fail); results that are not plain data come back as opaque proxies that
compare by identity; the program sees the standard library only (no site-packages).
The sandbox needs root with CAP_SYS_ADMIN (a plain root shell, or a container granted
that capability) because it mounts and switches uids; elsewhere it fails closed.
"""

from __future__ import annotations

import functools
import logging
import marshal
import math
import os
import queue
import shutil
import signal
import struct
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
_log = logging.getLogger(__name__)

# Test-only: protections switched off, to show that each adversarial test can fail.
# "fork" (program and tests share one interpreter, the verdict fd reachable), "host_root",
# "host_proc", "tmpfs" (the host's /tmp and /dev/shm), "pidns", "netns", "uid" (the
# program keeps root), "seccomp", "rlimits". Never set outside tests.
WEAKEN_KNOBS = frozenset({"fork", "host_root", "host_proc", "tmpfs", "pidns", "netns", "uid",
                          "seccomp", "rlimits"})
_WEAKEN: frozenset[str] = frozenset()


class SandboxUnavailable(RuntimeError):
    """The isolation the sandbox needs is missing; grading untrusted code is refused."""


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
    uid_base: int = 1_900_000  # programs and judges run as uids above this (sandbox_uid)

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

# syscall numbers: Linux include/uapi/asm-generic/unistd.h (aarch64) and
# arch/x86/entry/syscalls/syscall_64.tbl (x86_64), checked against the installed headers.
_DENY = ("ptrace", "mount", "umount2", "pivot_root", "chroot", "unshare", "setns",
         "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf", "perf_event_open",
         "userfaultfd", "keyctl", "add_key", "request_key", "process_vm_readv",
         "process_vm_writev", "kexec_load", "kexec_file_load", "init_module", "finit_module",
         "delete_module", "open_by_handle_at", "name_to_handle_at", "open_tree", "move_mount",
         "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr")
_ARCHES = {"x86_64": (0xC000003E, 0), "aarch64": (0xC00000B7, 1)}  # AUDIT_ARCH_*, column
_NR = {  # name: (x86_64, aarch64)
    "socket": (41, 198), "socketpair": (53, 199), "clone": (56, 220), "clone3": (435, 435),
    "ptrace": (101, 117), "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41),
    "chroot": (161, 51), "unshare": (272, 97), "setns": (308, 268),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "process_vm_readv": (310, 270), "process_vm_writev": (311, 271), "kexec_load": (246, 104),
    "kexec_file_load": (320, 294), "init_module": (175, 105), "finit_module": (313, 273),
    "delete_module": (176, 106), "open_by_handle_at": (304, 265),
    "name_to_handle_at": (303, 264), "open_tree": (428, 428), "move_mount": (429, 429),
    "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),
    "mount_setattr": (442, 442),
}
_CLONE_NEW = 0x7E020000  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
_EPERM, _ENOSYS, _AF_UNIX = 1, 38, 1


def seccomp_filter(machine: str | None = None) -> bytes | None:
    """The classic-BPF seccomp program (``struct sock_filter[]``) for ``machine``, or None
    for a machine without a table. Allows everything except: ``socket``/``socketpair`` of
    any family but ``AF_UNIX``, the calls in ``_DENY``, ``clone`` with namespace flags
    (EPERM), ``clone3`` (ENOSYS, so libc falls back to ``clone``), x32 calls and calls
    of another architecture (the process is killed)."""
    machine = machine or os.uname().machine
    if machine not in _ARCHES:
        return None
    arch, col = _ARCHES[machine]
    nr = {name: nums[col] for name, nums in _NR.items()}
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill = 0x7FFF0000, 0x80000000
    errno = lambda e: 0x00050000 | e  # noqa: E731 - SECCOMP_RET_ERRNO
    prog: list[tuple[int, object, object, int]] = [
        (ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill), (ld, 0, 0, 0)]
    if machine == "x86_64":
        prog.append((jge, "deny", 0, 0x40000000))  # x32 ABI
    prog += [(jeq, "deny", 0, nr[name]) for name in _DENY]
    prog += [(jeq, "sock", 0, nr["socket"]), (jeq, "sock", 0, nr["socketpair"]),
             (jeq, "clone", 0, nr["clone"]), (jeq, "nosys", 0, nr["clone3"]),
             (ret, 0, 0, allow)]
    labels = {"sock": len(prog)}
    prog += [(ld, 0, 0, 16), (jeq, "allow", "deny", _AF_UNIX)]
    labels["clone"] = len(prog)
    prog += [(ld, 0, 0, 16), (jset, "deny", "allow", _CLONE_NEW)]
    labels["nosys"] = len(prog)
    prog.append((ret, 0, 0, errno(_ENOSYS)))
    labels["deny"] = len(prog)
    prog.append((ret, 0, 0, errno(_EPERM)))
    labels["allow"] = len(prog)
    prog.append((ret, 0, 0, allow))
    out = b""
    for i, (code, jt, jf, k) in enumerate(prog):
        rel = [labels[j] - i - 1 if isinstance(j, str) else j for j in (jt, jf)]
        out += struct.pack("<HBBI", code, rel[0], rel[1], k)
    return out


def _ro_binds() -> tuple[list[str], list[tuple[str, str]]]:
    """Read-only bind mounts (the interpreter's installation, the shared libraries) and
    the symlinks to recreate (``/lib -> usr/lib`` on merged-/usr systems)."""
    want = [os.path.realpath(sys.base_prefix), "/usr/lib", "/usr/lib64", "/lib", "/lib64",
            "/etc/ld.so.cache"]
    binds: list[str] = []
    links: list[tuple[str, str]] = []
    for w in want:
        if os.path.islink(w):
            links.append((w, os.readlink(w)))
        elif os.path.exists(w) and not any(w == b or w.startswith(b + "/") for b in binds):
            binds = [b for b in binds if not b.startswith(w + "/")] + [w]
    return sorted(binds), links


@functools.lru_cache(maxsize=1)
def _traversable() -> bool:
    """True if an unprivileged user can reach the interpreter's installation."""
    p = Path(os.path.realpath(sys.base_prefix))
    try:
        return all(d.stat().st_mode & 0o001 for d in [*p.parents, p])
    except OSError:
        return False


def _interpreter() -> str:
    """The base interpreter (not a venv's wrapper): the sandbox holds its tree only."""
    for cand in (getattr(sys, "_base_executable", None), sys.executable):
        if cand and os.path.realpath(cand).startswith(os.path.realpath(sys.base_prefix) + "/"):
            return os.path.realpath(cand)
    return os.path.realpath(sys.executable)


@functools.lru_cache(maxsize=1)
def isolation_problems() -> tuple[str, ...]:
    """What this machine lacks for the full sandbox (empty: everything is there).
    Probed once per process by grading one tiny program inside the real sandbox."""
    problems = []
    if not sys.platform.startswith("linux"):
        return (f"Linux namespaces and seccomp (this platform is {sys.platform})",)
    if os.geteuid() != 0:
        problems.append("root privileges, to mount the sandbox's file-system view and run "
                        "programs under their own uids (run the reward stage as root with "
                        "CAP_SYS_ADMIN, the capability to create namespaces and mount)")
    if shutil.which("unshare") is None:
        problems.append("the `unshare` program (util-linux), to create the namespaces")
    if seccomp_filter() is None:
        problems.append(f"a seccomp syscall table for machine {os.uname().machine!r} "
                        f"(tables exist for {', '.join(sorted(_ARCHES))})")
    if problems:
        return tuple(problems)
    try:
        lines, _, err, rc, _, _ = _run_process(
            "function", "def f():\n    return 1\n", ["assert f() == 1"], None,
            SandboxLimits(wall_s=20, cpu_s=10), 0, isolated=True, weaken=frozenset())
    except OSError as e:
        return (f"a working sandbox: starting it failed ({e})",)
    if lines != ["pass 0", "done"]:
        return (f"a working sandbox: the probe program was not graded (exit {rc}; "
                f"stderr: {err.strip()[-400:]!r})",)
    return ()


def _require(allow_unsandboxed: bool) -> bool:
    """True to run fully isolated; False to run unsandboxed (allowed and needed); raises
    :class:`SandboxUnavailable` when isolation is missing and not explicitly waived."""
    problems = isolation_problems()
    if not problems:
        return True
    if not allow_unsandboxed:
        raise SandboxUnavailable(
            "refusing to run untrusted code: the code sandbox needs "
            + "; ".join(problems)
            + ". Fix that, or set reward.unsafe_allow_unsandboxed_code: true (params.yaml) / "
              "allow_unsandboxed=True to grade WITHOUT isolation (unsafe).")
    _warn_unsafe(problems)
    return False


@functools.lru_cache(maxsize=1)
def _warn_unsafe(problems: tuple[str, ...]) -> None:
    _log.warning("UNSAFE: grading untrusted code WITHOUT the sandbox (missing: %s); a "
                 "program can read host files, use the network and outlive the grader",
                 "; ".join(problems))


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


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


def _uid_alive(uids: Sequence[int]) -> bool:
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.stat(f"/proc/{d}").st_uid in uids:
                    return True
            except OSError:
                pass
    return False


def _stop(proc: subprocess.Popen, uids: Sequence[int]) -> None:
    """At the wall limit: kill the sandbox's init first, so that ``unshare`` reaps it only
    after the kernel has emptied the namespace; then the group; then wait until no
    process of the sandbox's uids is left (bounded)."""
    try:
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            for c in f.read().split():
                os.kill(int(c), signal.SIGKILL)
        proc.wait(timeout=5)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        pass
    _kill_group(proc)
    proc.wait()
    deadline = time.monotonic() + 5
    while uids and _uid_alive(uids) and time.monotonic() < deadline:
        time.sleep(0.01)


def _kill_uids(uids: Sequence[int]) -> None:
    """Kill every process of the given uids (without a PID namespace only)."""
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.stat(f"/proc/{d}").st_uid in uids:
                    os.kill(int(d), signal.SIGKILL)
            except OSError:
                pass


# --------------------------------------------------------------------------- one process


UIDS_PER_PROCESS = 256


def sandbox_uid(limits: SandboxLimits, slot: int, pid: int | None = None) -> int:
    """The unprivileged uid the program of pool ``slot`` runs as (its judge: this + 1).

    Distinct per grading process *and* per slot (``uid_base + (pid mod 65536) * 256 +
    2 * slot``), so concurrent graders (two reward stages, parallel test workers) never
    share a uid: they would otherwise share one RLIMIT_NPROC budget.
    """
    pid = os.getpid() if pid is None else pid
    return limits.uid_base + (pid % 65536) * UIDS_PER_PROCESS + (2 * slot) % UIDS_PER_PROCESS


def _run_process(mode: str, code: str, tests: Sequence[str], stdin_text: str | None,
                 limits: SandboxLimits, slot: int, *, isolated: bool, trusted: str = "",
                 entry_point: str | None = None, weaken: frozenset[str] | None = None,
                 ) -> tuple[list[str], str, str, int | None, bool, float]:
    """Run the harness once. Returns (result lines, stdout, stderr tail, returncode,
    timed_out, seconds)."""
    weaken = _WEAKEN if weaken is None else weaken
    root = os.geteuid() == 0
    # unsandboxed, another uid can only run the interpreter if its tree is reachable
    uid = sandbox_uid(limits, slot) if root and (isolated or _traversable()) else None
    binds, links = _ro_binds()
    machine = os.uname().machine
    with tempfile.TemporaryDirectory(prefix="tracerl-sbx-") as host_dir:
        os.chmod(host_dir, 0o711)  # unsandboxed: the program's uid must reach its workdir
        workdir = os.path.join(host_dir, "work")
        os.mkdir(workdir, 0o700)
        os.mkdir(os.path.join(host_dir, "root"), 0o700)
        bpf = seccomp_filter()
        cand = {
            "mode": mode, "code": code, "weaken": sorted(weaken), "mounts": isolated,
            "limits": {"cpu_s": limits.cpu_s, "memory_mb": limits.memory_mb,
                       "fsize_mb": limits.fsize_mb, "nofile": limits.nofile,
                       "nproc": limits.nproc},
            "uid_candidate": uid, "uid_judge": None if uid is None else uid + 1,
            "root": os.path.join(host_dir, "root"), "workdir": workdir,
            "ro_binds": binds, "links": links, "env": _clean_env(),
            "bpf": bpf.hex() if bpf else "",
            "pivot_root_nr": _NR["pivot_root"][_ARCHES[machine][1]] if machine in _ARCHES else -1,
        }
        judge = {"tests": list(tests), "trusted": trusted, "entry_point": entry_point}
        cr, cw = os.pipe()  # candidate payload: host -> sandbox init
        jr, jw = os.pipe()  # judge payload: read by the judge after the fork only
        rr, rw = os.pipe()  # results: judge -> host
        os.set_blocking(rr, False)
        out_path = os.path.join(host_dir, "stdout")
        err_path = os.path.join(host_dir, "stderr")
        cmd = [_interpreter(), "-I", "-S", "-c", _HARNESS, str(cr), str(jr), str(rw)]
        if isolated:
            ns = ["--mount", "--ipc", "--uts", "--fork", "--kill-child"]
            ns += [] if "netns" in weaken else ["--net"]
            ns += [] if "pidns" in weaken else ["--pid"]
            cmd = ["unshare", *ns, *cmd]
        t0 = time.monotonic()
        proc = None
        timed_out = False
        try:
            with open(out_path, "wb") as fout, open(err_path, "wb") as ferr, \
                    tempfile.TemporaryFile() as fin:
                fin.write((stdin_text or "").encode("utf-8", "replace"))
                fin.seek(0)
                proc = subprocess.Popen(
                    cmd, stdin=fin, stdout=fout, stderr=ferr, pass_fds=(cr, jr, rw),
                    env=_clean_env(), cwd=workdir, start_new_session=True,
                )
                for fd in (cr, jr, rw):
                    os.close(fd)
                cr = jr = rw = -1
                writer = threading.Thread(
                    target=_write_all,
                    args=((cw, marshal.dumps(cand)), (jw, marshal.dumps(judge))),
                    daemon=True)
                cw = jw = -1  # owned (and closed) by the writer from here on
                writer.start()
                try:
                    proc.wait(timeout=limits.wall_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    _stop(proc, () if uid is None else (uid, uid + 1))
                _kill_group(proc)
                proc.wait()
                writer.join()  # returns: the readers are gone, so a pending write fails fast
            if uid is not None and not isolated:  # no PID namespace reaped them
                _kill_uids((uid, uid + 1))
            lines = _read_results(rr)
            with open(out_path, "rb") as f:
                stdout = f.read(limits.max_output_bytes).decode("utf-8", "replace")
            with open(err_path, "rb") as f:
                f.seek(max(0, os.path.getsize(err_path) - 2000))
                stderr = f.read().decode("utf-8", "replace")
        finally:
            for fd in (cr, cw, jr, jw, rr, rw):
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


def _write_all(*items: tuple[int, bytes]) -> None:
    for fd, data in items:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            pass
        finally:
            os.close(fd)  # EOF for the reader; the caller never touches fd again


def _read_results(fd: int) -> list[str]:
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
    return b"".join(chunks).decode("ascii", "replace").splitlines()


# --------------------------------------------------------------------------- public API


def _slots(workers: int) -> queue.Queue[int]:
    q: queue.Queue[int] = queue.Queue()
    for i in range(workers):
        q.put(i)
    return q


def run_function_tests(code: str, tests: Sequence[str], limits: SandboxLimits | None = None,
                       *, slot: int = 0, trusted: str = "", entry_point: str | None = None,
                       allow_unsandboxed: bool = False) -> ProgramResult:
    """Run ``code``, then each test statement (``assert ...``, ``check(fn)``) in the judge.

    A test passes only if its statement ran to completion in the judge, against the
    program's answers (plain data). ``trusted`` (the task's prompt prefix / setup) runs in
    the judge, so its helpers are the task's, not the program's; ``entry_point`` always
    comes from the program. Never raises on model output; raises
    :class:`SandboxUnavailable` when isolation is missing and not waived.

    Example:
        >>> r = run_function_tests("def add(a, b):\\n    return a + b",
        ...                        ["assert add(1, 2) == 3", "assert add(1, 1) == 3"])
        >>> r.passed, r.status
        ((True, False), 'ok')
    """
    limits = limits or SandboxLimits()
    isolated = _require(allow_unsandboxed)
    if not isinstance(code, str) or not code.strip() or not tests:
        return ProgramResult(tuple(False for _ in tests), "invalid", detail="no code or no tests")
    try:
        lines, _, err, rc, timed_out, secs = _run_process(
            "function", _safe_text(code), [_safe_text(t) for t in tests], None, limits, slot,
            isolated=isolated, trusted=_safe_text(trusted or ""), entry_point=entry_point)
    except OSError as e:  # host-side failure (e.g. out of pids): never a pass
        return ProgramResult(tuple(False for _ in tests), "killed", detail=f"spawn failed: {e}")
    passed = [False] * len(tests)
    for ln in lines:
        parts = ln.split()
        if len(parts) == 2 and parts[0] == "pass" and parts[1].isdigit():
            i = int(parts[1])
            if 0 <= i < len(tests):
                passed[i] = True
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
                    limits: SandboxLimits | None = None, *, slot: int = 0,
                    allow_unsandboxed: bool = False) -> ProgramResult:
    """Run ``code`` once per case with ``inputs[k]`` on stdin (a fresh sandbox each).

    A case passes when the program exited with status 0, as the judge observed it
    (``waitpid``; ``sys.exit(0)`` and ``os._exit(0)`` after printing count as exit 0, a
    signal or another status does not), and its stdout equals ``outputs[k]`` up to
    whitespace (tokens joined by single spaces, as the reference compares). Expected
    outputs never leave the host.
    """
    limits = limits or SandboxLimits()
    isolated = _require(allow_unsandboxed)
    if len(inputs) != len(outputs) or not inputs or not isinstance(code, str) or not code.strip():
        return ProgramResult(tuple(False for _ in outputs), "invalid",
                             detail="no code, no cases, or inputs/outputs of unequal length")
    code = _safe_text(code)
    passed, got, statuses, total = [], [], [], 0.0
    for inp, exp in zip(inputs, outputs):
        try:
            lines, out, _, _, timed_out, secs = _run_process("stdio", code, [], inp, limits, slot,
                                                             isolated=isolated)
        except OSError:
            lines, out, timed_out, secs = [], "", False, 0.0
        total += secs
        passed.append("exit 0" in lines and not timed_out and _norm(out) == _norm(exp))
        got.append(out)
        statuses.append("timeout" if timed_out else "ok" if lines else "killed")
    status = "timeout" if "timeout" in statuses else "killed" if "killed" in statuses else "ok"
    return ProgramResult(tuple(passed), status, total, outputs=tuple(got))


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
    trusted: str = ""  # task code the judge runs itself (prompt prefix, setup)
    entry_point: str | None = None  # the name the program must define


def run_jobs(jobs: Sequence[CodeJob], limits: SandboxLimits | None = None,
             workers: int = 4, *, allow_unsandboxed: bool = False) -> list[ProgramResult]:
    """Grade many programs in parallel through a bounded pool of ``workers`` threads,
    each launching one sandbox at a time (so at most ``workers`` sandboxes run at once).
    Results are in job order. Raises :class:`SandboxUnavailable` (before running anything)
    when isolation is missing and ``allow_unsandboxed`` is False."""
    limits = limits or SandboxLimits()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers > UIDS_PER_PROCESS // 2:
        raise ValueError(f"workers must be <= {UIDS_PER_PROCESS // 2}, got {workers}")
    _require(allow_unsandboxed)
    slots = _slots(workers)

    def one(job: CodeJob) -> ProgramResult:
        slot = slots.get()
        try:
            if job.method == "stdio":
                return run_stdio_tests(job.code, job.inputs, job.outputs, limits, slot=slot,
                                       allow_unsandboxed=allow_unsandboxed)
            return run_function_tests(job.code, job.tests, limits, slot=slot, trusted=job.trusted,
                                      entry_point=job.entry_point,
                                      allow_unsandboxed=allow_unsandboxed)
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

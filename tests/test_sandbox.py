"""Adversarial suite against the code sandbox, by attack class.

Every class has: the attacks (reward 0, no surviving process, nothing written outside,
bounded time), an honest program in the same setting that still passes, and the same
attack against a sandbox with that class's protection switched off (``sandbox._WEAKEN``,
test-only), where it must succeed: so each test can fail.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

from tracerl.rewards import sandbox
from tracerl.rewards.sandbox import (
    UIDS_PER_PROCESS,
    CodeJob,
    SandboxLimits,
    isolation_problems,
    run_function_tests,
    run_jobs,
    run_stdio_tests,
    sandbox_uid,
    seccomp_filter,
)

FAST = SandboxLimits(wall_s=4.0, cpu_s=2, memory_mb=256, nproc=8)
ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
CHECK_TESTS = ["def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(2, 2) == 4\n"
               "\ncheck(add)\n"]

needs_sandbox = pytest.mark.skipif(
    bool(isolation_problems()),
    reason="the code sandbox's isolation is missing here: " + "; ".join(isolation_problems()))
pytestmark = needs_sandbox


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE}


_BEFORE: set[int] = set()


@pytest.fixture(autouse=True)
def _snapshot_children():
    """Helpers started by other tests (e.g. the math-verify worker) are not strays."""
    _BEFORE.clear()
    _BEFORE.update(_children())
    yield
    sandbox._WEAKEN = frozenset()


def _sandbox_procs() -> list[int]:
    base = sandbox_uid(SandboxLimits(), 0)
    return [p.pid for p in psutil.process_iter(["uids"])
            if p.info["uids"] and base <= p.info["uids"].real < base + UIDS_PER_PROCESS]


def _no_strays():
    """No new descendant of this test process survives, no sandbox-uid process exists."""
    assert _children() - _BEFORE == set()
    assert _sandbox_procs() == []


def _settle():
    """After a weakened run (no PID namespace): let its processes finish exiting."""
    deadline = time.monotonic() + 5
    while _sandbox_procs() and time.monotonic() < deadline:
        time.sleep(0.02)


def grade(code, tests, weaken=(), limits=FAST, settle=True, **kw):
    """Grade with the given protections off; the wall limit bounds the time."""
    sandbox._WEAKEN = frozenset(weaken)
    t0 = time.monotonic()
    try:
        r = run_function_tests(code, tests, limits, **kw)
    finally:
        sandbox._WEAKEN = frozenset()
        if weaken and settle:
            _settle()
    assert time.monotonic() - t0 < limits.wall_s + 10  # (+ start-up margin under load)
    return r


def _marker() -> str:
    return uuid.uuid4().hex[:12]


def _host_process(tag: str) -> subprocess.Popen:
    """A host process the program will look for or signal (root, outside the sandbox)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", tag])


def _kill_tagged(tag: str) -> list[int]:
    """Kill (and return) every process whose command line holds ``tag``."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if p.info["cmdline"] and any(tag in a for a in p.info["cmdline"]):
            found.append(p.pid)
            try:
                p.kill()
            except psutil.Error:
                pass
    return found


def test_weaken_knobs_are_known():
    assert {"fork", "host_root", "host_proc", "tmpfs", "pidns", "netns", "uid", "seccomp",
            "rlimits"} == sandbox.WEAKEN_KNOBS


# --------------------------------------------------------------------------- 1. verdict forgery

FORGE_FDS = (
    "import os\n"
    "def add(a, b):\n    return 0\n"
    "for fd in range(0, 256):\n"
    "    try:\n        os.write(fd, b'pass 0\\npass 1\\ndone\\n')\n"
    "    except OSError:\n        pass\n"
)
EQ_ALWAYS_TRUE = (
    "class A:\n    def __eq__(self, o):\n        return True\n    __hash__ = object.__hash__\n"
    "def add(a, b):\n    return A()\n"
)
INTROSPECT = r'''
import gc, os, sys
found = []
f = sys._getframe()
while f is not None:
    found.append(f.f_globals)
    f = f.f_back
for o in gc.get_objects():
    if isinstance(o, dict) and ("tests" in o or "nonce" in o or "result_fd" in o):
        found.append(o)
for d in found:
    for k in ("rfd", "result_fd"):
        if isinstance(d.get(k), int):
            os.write(d[k], b"pass 0\npass 1\ndone\n")
def add(a, b):
    return None
'''


@pytest.mark.parametrize("tests", [ADD_TESTS, CHECK_TESTS], ids=["assert", "check"])
def test_verdict_honest_program_passes(tests):
    r = grade(ADD, tests)
    assert r.all_passed and r.status == "ok"
    assert not grade("def add(a, b):\n    return a - b\n", tests).passed[0]
    _no_strays()


@pytest.mark.parametrize("name,code", [
    ("forge_fds", FORGE_FDS),
    ("introspection", INTROSPECT),
    ("eq_always_true", EQ_ALWAYS_TRUE),
    ("sys_exit", "import sys\ndef add(a, b):\n    return a + b\nsys.exit(0)\n"),
    ("os_exit", "import os\nos._exit(0)\n"),
    ("exit_in_test", "def add(a, b):\n    raise SystemExit(0)\n"),
    ("os_exit_in_test", "import os\ndef add(a, b):\n    os._exit(0)\n"),
    ("print_passed", "print('pass 0\\npass 1\\ndone\\nPASSED')\ndef add(a, b):\n    return 7\n"),
    ("keyboard_interrupt", "def add(a, b):\n    raise KeyboardInterrupt\n"),
    ("patch_builtins",
     "import builtins, os\nbuiltins.exec = lambda *a, **k: None\nbuiltins.eval = lambda *a, **k: 3\n"
     "builtins.AssertionError = type('X', (BaseException,), {})\n"
     "os.write = lambda fd, b: len(b)\ndef add(a, b):\n    return None\n"),
    ("shadow_builtin", "def abs(x):\n    return 0\ndef add(a, b):\n    return 99\n"),
    ("stop_iteration", "def add(a, b):\n    raise StopIteration\n"),
    ("opaque_object", "def add(a, b):\n    return object()\n"),
    ("settrace", "import sys\ndef t(frame, event, arg):\n    return t\nsys.settrace(t)\n"
                 "def add(a, b):\n    return None\n"),
    ("kill_parent", "import os, signal\nfor pid in (os.getppid(), 1):\n    try:\n"
                    "        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
                    "def add(a, b):\n    return None\n"),
])
@pytest.mark.parametrize("tests", [ADD_TESTS + ["assert abs(add(0.5, 0.25) - 0.75) < 1e-9"],
                                   CHECK_TESTS], ids=["assert", "check"])
def test_verdict_forgery_fails(name, code, tests):
    r = grade(code, tests)
    assert not any(r.passed), (name, r)
    _no_strays()


def test_iterator_and_truthiness_tricks_fail():
    """A StopIteration would silently end ``map`` in the test, an object is truthy and
    unequal to everything: neither reaches the judge as such."""
    tests = ["assert all(map(lambda x: add(x, 1) > x, [1, 2]))", "assert add(1, 2)",
             "assert add(1, 2) != 4"]
    assert grade("def add(a, b):\n    raise StopIteration\n", tests[:1]).passed == (False,)
    assert grade("def add(a, b):\n    return object()\n", tests).passed == (False, False, False)
    assert grade(ADD, tests).passed == (True, True, True)
    assert grade("def add(a, b):\n    raise StopIteration\n", tests[:1], weaken={"fork"}).passed == (True,)


@pytest.mark.parametrize("code", [FORGE_FDS, EQ_ALWAYS_TRUE], ids=["forge_fds", "eq_always_true"])
@pytest.mark.parametrize("tests", [ADD_TESTS, CHECK_TESTS], ids=["assert", "check"])
def test_verdict_forgery_succeeds_in_a_shared_interpreter(code, tests):
    """Program and tests in one interpreter (the design replaced here): both forge."""
    assert grade(code, tests, weaken={"fork"}).all_passed


def test_tests_and_expected_values_never_reach_the_program():
    """The program hunts for the expected value everywhere it can look."""
    code = r'''
import gc, os, sys, glob, re
def hunt():
    blobs = []
    for p in (glob.glob("/tmp/**", recursive=True) + glob.glob("/dev/shm/**", recursive=True)
              + glob.glob("/*") + glob.glob("/etc/**", recursive=True)):
        try:
            blobs.append(open(p, errors="ignore").read(1 << 16))
        except Exception:
            pass
    for fd in range(64):
        try:
            os.set_blocking(fd, False)
            blobs.append(os.read(fd, 1 << 16).decode(errors="ignore"))
        except Exception:
            pass
    for p in glob.glob("/proc/*/cmdline") + glob.glob("/proc/*/environ"):
        try:
            blobs.append(open(p, "rb").read().decode(errors="ignore"))
        except Exception:
            pass
    f = sys._getframe()
    while f is not None:
        blobs.append(repr(f.f_code.co_consts) + repr(f.f_locals)[:10000])
        f = f.f_back
    for o in gc.get_objects():
        try:
            blobs.append(repr(o)[:10000])
        except Exception:
            pass
    for b in blobs:
        for m in re.findall(r"9182\d\d", b):
            return int(m)
    return -1
def secret():
    return hunt()
'''
    lim = SandboxLimits(wall_s=15, cpu_s=10, memory_mb=512)
    assert grade(code, ["assert secret() == 918273"], limits=lim).passed == (False,)
    assert grade(code, ["def check(c):\n    assert c() == 918273\ncheck(secret)"],
                 limits=lim).passed == (False,)
    _no_strays()


def test_task_helpers_come_from_the_task_not_the_program():
    """HumanEval's ``poly`` is the prompt's: a program redefining it cannot fake a root."""
    prefix = "def poly(xs, x):\n    return sum(c * x ** i for i, c in enumerate(xs))\n\n" \
             "def find_zero(xs):\n    \"\"\"A zero of poly.\"\"\"\n"
    tests = ["def check(candidate):\n    assert abs(poly([-2, 1], candidate([-2, 1]))) < 1e-6\n"
             "check(find_zero)\n"]
    honest = prefix + "    return -xs[0] / xs[1]\n"
    cheat = "def poly(xs, x):\n    return 0\n\ndef find_zero(xs):\n    return 123\n"
    assert grade(honest, tests, trusted=prefix, entry_point="find_zero").passed == (True,)
    assert grade(cheat, tests, trusted=prefix, entry_point="find_zero").passed == (False,)
    # without the trusted prefix the program's own helper would be used: the cheat passes
    assert grade(cheat, tests).passed == (True,)


def test_plain_data_round_trips_and_objects_stay_opaque():
    code = ("import math, cmath as cm\n"
            "def f():\n    return [1, 2.5, 'x', None, True, (1, 2), {'a': {3}}, frozenset({1}),"
            " b'\\x00', 1j, float('inf'), 10 ** 50]\n"
            "def g(*a, **k):\n    return [a, k]\n"
            "def gen(n):\n    yield from range(n)\n"
            "class C:\n    v = 7\n    def m(self, x):\n        return x * 2\n"
            "def err():\n    raise ValueError('no')\n")
    tests = [
        "assert f() == [1, 2.5, 'x', None, True, (1, 2), {'a': {3}}, frozenset({1}), b'\\x00', 1j,"
        " float('inf'), 10 ** 50]",
        "assert g(1, [2], k={'z': (3,)}) == [(1, [2]), {'k': {'z': (3,)}}]",
        "assert list(gen(3)) == [0, 1, 2]",
        "assert C().m(4) == 8 and C.v == 7",
        "try:\n    err()\nexcept ValueError as e:\n    assert str(e) == 'no'\nelse:\n    assert False",
        "assert type(f()[0]) is int and type(f()) is list",
        "assert math.floor(f()[1]) == 2 and cm.sqrt(-1) == 1j",  # the program's imports
    ]
    assert grade(code, tests).passed == (True,) * len(tests)


# --------------------------------------------------------------------------- 2. host files


@pytest.fixture()
def host_secret():
    """A world-readable file outside the sandbox holding the expected answer."""
    d = tempfile.mkdtemp(prefix="tracerl-secret-", dir="/tmp")
    os.chmod(d, 0o755)
    f = Path(d) / "answer.txt"
    f.write_text("918273")
    os.chmod(f, 0o644)
    yield f
    shutil.rmtree(d, ignore_errors=True)


def _reader(path) -> str:
    return f"def secret():\n    return int(open({str(path)!r}).read())\n"


def test_host_files_are_out_of_sight(host_secret):
    me = Path(__file__).resolve()
    for target in (host_secret, me, Path(sys.prefix) / "pyvenv.cfg", "/etc/hostname",
                   Path.home() / ".bashrc", Path(__file__).resolve().parents[1] / "params.yaml"):
        code = f"def secret():\n    open({str(target)!r}).read()\n    return 918273\n"
        assert grade(code, ["assert secret() == 918273"]).passed == (False,), target
    listing = ("import os\ndef ls():\n    return sorted(os.listdir('/'))\n"
               "def ok():\n    import json, random, fractions\n    return 1\n")
    binds, links = sandbox._ro_binds()  # the interpreter's tree and the shared libraries
    top = sorted({"dev", "proc", "tmp"} | {Path(x).parts[1] for x in binds + [lk for lk, _ in links]})
    r = grade(listing, [f"assert ls() == {top!r}", "assert ok() == 1"])
    assert r.passed == (True, True), (top, r)
    _no_strays()


def test_host_files_honest_program_uses_its_own_folders():
    code = ("import os, tempfile\ndef io():\n    open('a.txt', 'w').write('x' * 1000)\n"
            "    with tempfile.NamedTemporaryFile('w+') as f:\n        f.write('yz'); f.flush()\n"
            "        f.seek(0); t = f.read()\n    return len(open('a.txt').read()), t\n")
    assert grade(code, ["assert io() == (1000, 'yz')"]).passed == (True,)


def test_host_files_readable_without_the_minimal_root(host_secret):
    assert grade(_reader(host_secret), ["assert secret() == 918273"]).passed == (False,)
    assert grade(_reader(host_secret), ["assert secret() == 918273"],
                 weaken={"host_root"}).passed == (True,)


# --------------------------------------------------------------------------- 3. /proc snooping

SNOOP = r'''
import os, re
def snoop():
    for pid in os.listdir("/proc"):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="ignore")
        except OSError:
            continue
        m = re.search(r"tracerl-marker-(\d+)", cmd)
        if m:
            return int(m.group(1))
    return -1
def pids():
    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
def judge_fds():
    return os.listdir("/proc/1/fd")
'''


def test_proc_shows_only_the_sandbox():
    victim = _host_process("tracerl-marker-918273")
    try:
        r = grade(SNOOP, ["assert snoop() == 918273", "assert len(pids()) >= 10",
                          "assert judge_fds() != []"])
        assert r.passed == (False, False, False)
        # honest: its own /proc entries work, and it sees only itself (the judge is hidden)
        r = grade(SNOOP + "def me():\n    return open('/proc/self/status').read()[:5]\n",
                  ["assert me() == 'Name:'", "assert len(pids()) == 1"])
        assert r.passed == (True, True)
        assert grade(SNOOP, ["assert snoop() == 918273"], weaken={"host_proc"}).passed == (True,)
    finally:
        victim.kill()
        victim.wait()
    _no_strays()


# --------------------------------------------------------------------------- 4. signals


def _killer(pid: int) -> str:
    return (f"import os, signal\ndef hit():\n    os.kill({pid}, signal.SIGKILL)\n    return 1\n"
            "def spray():\n    for p in range(1, 4096):\n        try:\n"
            "            os.kill(p, signal.SIGKILL) if p != os.getpid() else None\n"
            "        except OSError:\n            pass\n    return 1\n")


def test_signals_reach_no_other_process():
    victim = _host_process(f"tracerl-victim-{_marker()}")
    try:
        r = grade(_killer(victim.pid), ["assert hit() == 1", "assert spray() == 1"])
        assert r.passed[0] is False
        assert victim.poll() is None  # alive
        # honest: a program signals its own child
        own = ("import os, signal, time\ndef own():\n    pid = os.fork()\n    if pid == 0:\n"
               "        time.sleep(30)\n        os._exit(0)\n    os.kill(pid, signal.SIGKILL)\n"
               "    return os.waitpid(pid, 0)[1] & 0x7f\n")
        assert grade(own, ["assert own() == 9"]).passed == (True,)
        # one protection alone suffices: the PID namespace hides it, the uid may not signal it
        assert grade(_killer(victim.pid), ["assert hit() == 1"], weaken={"pidns"}).passed == (False,)
        assert grade(_killer(victim.pid), ["assert hit() == 1"], weaken={"uid"}).passed == (False,)
        assert victim.poll() is None
        # both off: the program kills a host process
        assert grade(_killer(victim.pid), ["assert hit() == 1"],
                     weaken={"pidns", "uid"}).passed == (True,)
        victim.wait(timeout=10)
        assert victim.returncode == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    _settle()
    _no_strays()


# --------------------------------------------------------------------------- 5. daemons


def _daemon(tag: str) -> str:
    return ("import os, sys, time\n"
            "def spawn():\n"
            "    if os.fork() == 0:\n"
            "        os.setsid()\n"
            "        if os.fork() == 0:\n"
            f"            os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)', {tag!r}])\n"
            "        os._exit(0)\n"
            "    time.sleep(0.3)\n"
            "    return 0\n"
            "spawn()\n"
            "def add(a, b):\n    return -5\n")


def test_daemons_die_with_the_grading():
    tag = f"tracerl-daemon-{_marker()}"
    r = grade(_daemon(tag), ADD_TESTS)
    assert r.passed == (False, False)
    time.sleep(0.2)
    assert _kill_tagged(tag) == []
    _no_strays()
    # honest: a program that starts workers and waits for them
    code = ("import os\ndef work():\n    pids = [os.fork() or os._exit(7) for _ in range(3)]\n"
            "    return sorted(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids)\n")
    assert grade(code, ["assert work() == [7, 7, 7]"]).passed == (True,)
    _no_strays()


def test_daemons_survive_without_a_pid_namespace():
    tag = f"tracerl-daemon-{_marker()}"
    grade(_daemon(tag), ADD_TESTS, weaken={"pidns"}, settle=False)
    time.sleep(0.2)
    survivors = _kill_tagged(tag)
    _settle()
    assert survivors != []


# --------------------------------------------------------------------------- 6. shared folders


def _filler(tag: str, extra: str = "") -> str:
    return (f"import os\ndef fill():\n    total = 0\n"
            f"    for d in ['/tmp', '/dev/shm', '.', {extra!r}]:\n"
            f"        try:\n            with open(os.path.join(d, {tag!r}), 'wb') as f:\n"
            "                for _ in range(64):\n                    f.write(b'0' * (1 << 20))\n"
            "                    total += 1 << 20\n"
            "        except OSError:\n            pass\n"
            "    return total\n")


def test_shared_folders_are_not_filled(tmp_path):
    tag = f"tracerl-fill-{_marker()}"
    outside = tmp_path / "open"
    outside.mkdir()
    os.chmod(outside, 0o777)
    os.chmod(tmp_path, 0o755)
    r = grade(_filler(tag, str(outside)), [f"assert fill() == {4 * (64 << 20)}", "assert fill() > 0"])
    assert r.passed == (False, True)  # writes inside, bounded: fsize and tmpfs size
    for d in ("/tmp", "/dev/shm", str(outside)):
        assert not os.path.exists(os.path.join(d, tag)), d
    _no_strays()


def test_shared_folders_filled_without_private_tmpfs():
    tag = f"tracerl-fill-{_marker()}"
    works = set(glob.glob("/tmp/tracerl-work-*"))
    try:
        grade(_filler(tag), ["assert fill() > 0"], weaken={"tmpfs"})
        assert os.path.exists(os.path.join("/tmp", tag))
    finally:
        for d in ("/tmp", "/dev/shm"):
            try:
                os.remove(os.path.join(d, tag))
            except OSError:
                pass
        for w in set(glob.glob("/tmp/tracerl-work-*")) - works:
            shutil.rmtree(w, ignore_errors=True)


# --------------------------------------------------------------------------- 7. network

NET = r'''
import socket
def families():
    ok = []
    for fam in list(socket.AddressFamily) + [40]:
        if int(fam) == socket.AF_UNIX:
            continue
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_RAW):
            try:
                socket.socket(fam, kind).close()
                ok.append(int(fam))
            except OSError:
                pass
    return sorted(set(ok))
def raw_families():
    import ctypes
    libc = ctypes.CDLL(None)
    return [f for f in (2, 10, 16, 17, 40) if libc.socket(f, 1, 0) >= 0 or libc.socket(f, 2, 0) >= 0]
def tcp(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=1)
    s.sendall(b"leak")
    return "leak"
def unix(path):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(b"leak")
    return "leak"
def pair():
    a, b = socket.socketpair()
    a.sendall(b"hi")
    return b.recv(2)
'''


@pytest.fixture()
def listeners():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.3)
    d = tempfile.mkdtemp(prefix="tracerl-sock-", dir="/tmp")
    os.chmod(d, 0o777)
    path = os.path.join(d, "s")
    usrv = socket.socket(socket.AF_UNIX)
    usrv.bind(path)
    os.chmod(path, 0o777)
    usrv.listen(4)
    usrv.settimeout(0.3)
    yield srv, usrv, path
    srv.close()
    usrv.close()
    shutil.rmtree(d, ignore_errors=True)


def _connected(srv) -> bool:
    try:
        srv.accept()[0].close()
        return True
    except (TimeoutError, OSError):
        return False


def test_no_socket_family_reaches_out(listeners):
    srv, usrv, path = listeners
    port = srv.getsockname()[1]
    r = grade(NET, [f"assert tcp({port}) == 'leak'", f"assert unix({path!r}) == 'leak'",
                    "assert families() != []", "assert raw_families() != []",
                    "assert pair() == b'hi'"])
    assert r.passed == (False, False, False, False, True)  # AF_UNIX pairs inside still work
    assert not _connected(srv) and not _connected(usrv)
    _no_strays()


def test_network_protections_each_suffice_and_both_off_leaks(listeners):
    srv, _, _ = listeners
    port = srv.getsockname()[1]
    t = [f"assert tcp({port}) == 'leak'", "assert families() != []"]
    assert grade(NET, t, weaken={"netns"}).passed == (False, False)  # seccomp: no AF_INET
    assert grade(NET, t, weaken={"seccomp"}).passed == (False, True)  # sockets, no route
    assert not _connected(srv)
    assert grade(NET, t, weaken={"netns", "seccomp"}).passed == (True, True)
    assert _connected(srv)


def test_seccomp_filter_is_well_formed():
    prog = seccomp_filter("x86_64")
    assert prog is not None and len(prog) % 8 == 0 and len(prog) // 8 < 256
    assert seccomp_filter("sparc") is None


# --------------------------------------------------------------------------- 8. resources

FORKS = ("import os, time\ndef forks(n=50):\n    kids = []\n    for _ in range(n):\n"
         "        try:\n            pid = os.fork()\n        except OSError:\n            break\n"
         "        if pid == 0:\n            time.sleep(1)\n            os._exit(0)\n"
         "        kids.append(pid)\n    for k in kids:\n        os.kill(k, 9)\n"
         "        os.waitpid(k, 0)\n    return len(kids)\n")


@pytest.mark.parametrize("name,code,tests", [
    ("cpu_loop", "def add(a, b):\n    while True:\n        pass\n", ADD_TESTS),
    ("sleep", "import time\ntime.sleep(100)\n", ["assert True"]),
    ("memory", "x = []\nwhile True:\n    x.append(bytearray(50 << 20))\n", ["assert True"]),
    ("memory_in_call", "def add(a, b):\n    return len(' ' * (10 ** 10))\n", ["assert add(1, 2) > 0"]),
    ("fork_bomb", FORKS + "def add(a, b):\n    return forks()\n", ["assert add(1, 2) == 50"]),
    ("fork_bomb_daemons", "import os, time\nfor _ in range(200):\n    try:\n        if os.fork() == 0:\n"
                          "            os.setsid(); time.sleep(60)\n    except OSError:\n        pass\n"
                          "while True:\n    pass\n", ["assert True"]),
    ("file_size", "def add(a, b):\n    open('big', 'wb').write(b'0' * (64 << 20))\n    return 1\n",
     ["assert add(1, 2) == 1"]),
    ("fds", "import os\ndef add(a, b):\n    return len([os.open('/dev/null', 0) for _ in range(500)])\n",
     ["assert add(1, 2) == 500"]),
    ("huge_reply", "def add(a, b):\n    return 'x' * (8 << 20)\n", ["assert len(add(1, 2)) == 8 << 20"]),
    ("stdout_flood", "import sys\ndef add(a, b):\n    while True:\n        sys.stdout.write('x' * 65536)\n",
     ["assert add(1, 2) == 3"]),
    ("recursion", "import sys\nsys.setrecursionlimit(10 ** 6)\ndef add(a, b):\n    return add(a, b)\n",
     ["assert add(1, 2) == 3"]),
])
def test_resource_exhaustion_is_bounded(name, code, tests):
    r = grade(code, tests, limits=SandboxLimits(wall_s=3, cpu_s=2, memory_mb=256, nproc=8))
    assert not any(r.passed), (name, r)
    time.sleep(0.1)
    _no_strays()


def test_resource_honest_program_within_limits():
    code = ("import os\ndef work():\n    data = bytearray(50 << 20)\n    pids = [os.fork() or os._exit(0)"
            " for _ in range(3)]\n    [os.waitpid(p, 0) for p in pids]\n"
            "    open('f', 'wb').write(b'1' * (4 << 20))\n    return len(data) + os.path.getsize('f')\n")
    assert grade(code, [f"assert work() == {(50 << 20) + (4 << 20)}"]).passed == (True,)


def test_resource_limits_off_lets_the_fork_bomb_through():
    t = ["assert forks() == 50"]
    assert grade(FORKS, t).passed == (False,)
    assert grade(FORKS, t, weaken={"rlimits"}).passed == (True,)


# --------------------------------------------------------------------------- stdio, misc


def test_stdio_tests_compare_on_the_host():
    code = "a, b = map(int, input().split())\nprint(a + b)\n"
    r = run_stdio_tests(code, ["1 2\n", "5 5\n"], ["3\n", "11"], FAST)
    assert r.passed == (True, False)
    # the exit status is observed by the judge (waitpid): os._exit(0) after printing the
    # right output is a correct program; a non-zero status or a signal is not
    assert run_stdio_tests("import os\nprint(3, flush=True)\nos._exit(0)\n", ["1 2"], ["3"], FAST).passed == (True,)
    assert run_stdio_tests("import sys\nprint(3)\nsys.exit(1)\n", ["1 2"], ["3"], FAST).passed == (False,)
    assert run_stdio_tests("import os\nprint(3, flush=True)\nos.kill(os.getpid(), 9)\n", ["1"], ["3"],
                           FAST).passed == (False,)
    assert run_stdio_tests("print(3)\n", ["x"], [], FAST).status == "invalid"
    _no_strays()


def test_bad_program_text_never_raises():
    assert run_function_tests("", ["assert True"], FAST).status == "invalid"
    assert run_function_tests("def f(:\n", ["assert True"], FAST).passed == (False,)
    assert run_function_tests("x = '\udcff'\n", ["assert x"], FAST).passed == (True,)
    assert run_function_tests("x = 1", [], FAST).passed == ()


def test_200_programs_in_parallel_no_leaks():
    me = psutil.Process()
    fds_before = me.num_fds()
    jobs = []
    for i in range(200):
        code = {0: f"def f():\n    return {i}\n", 1: f"def f():\n    return {i + 1}\n",
                2: "import os\nos._exit(0)\n",
                3: f"def f():\n    return {i}\nimport sys\nsys.exit(0)\n"}[i % 4]
        jobs.append(CodeJob(code=code, tests=(f"assert f() == {i}",)))
    t0 = time.monotonic()
    res = run_jobs(jobs, SandboxLimits(wall_s=10, cpu_s=5), workers=8)
    assert [r.passed for r in res] == [(i % 4 == 0,) for i in range(200)]
    assert time.monotonic() - t0 < 60
    _no_strays()
    assert me.num_fds() <= fds_before + 2


def test_honest_programs_may_use_processes_threads_and_the_stdlib():
    code = ("import multiprocessing as mp, threading, sqlite3, hashlib\n"
            "def sq(x):\n    return x * x\n"
            "def f():\n    with mp.Pool(2) as p:\n        a = p.map(sq, range(5))\n"
            "    t = threading.Thread(target=a.append, args=(-1,))\n    t.start()\n    t.join()\n"
            "    c = sqlite3.connect(':memory:')\n"
            "    return a, c.execute('select 7').fetchone()[0], hashlib.sha256(b'').hexdigest()[:4]\n")
    r = grade(code, ["assert f() == ([0, 1, 4, 9, 16, -1], 7, 'e3b0')"],
              limits=SandboxLimits(wall_s=15, cpu_s=10, memory_mb=512, nproc=16))
    assert r.passed == (True,), r
    _no_strays()

"""Adversarial programs against the code sandbox: reward 0, host unharmed, all reaped."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import psutil
import pytest

from tracerl.rewards.sandbox import (
    UIDS_PER_PROCESS,
    CodeJob,
    SandboxLimits,
    isolation_mode,
    run_function_tests,
    run_jobs,
    run_stdio_tests,
    sandbox_uid,
    split_assert,
)

FAST = SandboxLimits(wall_s=3.0, cpu_s=2, memory_mb=256, nproc=8)
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE}


_BEFORE: set[int] = set()


@pytest.fixture(autouse=True)
def _snapshot_children():
    """Helpers started by other tests (e.g. the math-verify worker) are not strays."""
    _BEFORE.clear()
    _BEFORE.update(_children())


def _no_strays():
    """No new descendant of this test process survives, and no sandbox-uid process exists."""
    kids = _children() - _BEFORE
    assert kids == set(), kids
    if os.geteuid() == 0:  # this process's sandbox uids (other graders may run meanwhile)
        base = sandbox_uid(SandboxLimits(), 0)
        strays = [p.pid for p in psutil.process_iter(["uids"])
                  if p.info["uids"] and base <= p.info["uids"].real < base + UIDS_PER_PROCESS]
        assert strays == []


def test_correct_program_passes_and_wrong_fails():
    ok = run_function_tests("def add(a, b):\n    return a + b\n", ADD_TESTS, FAST)
    assert ok.passed == (True, True) and ok.status == "ok"
    bad = run_function_tests("def add(a, b):\n    return a - b\n", ADD_TESTS, FAST)
    assert bad.passed == (False, False)
    # a statement test (not split) also passes only when it ran to completion
    st = run_function_tests("def add(a, b):\n    return a + b\n",
                            ["assert abs(add(0.1, 0.2) - 0.3) < 1e-9", "assert add(1, 1) > 5"], FAST)
    assert st.passed == (True, False)


def test_split_assert_keeps_expected_value_on_host():
    assert split_assert("assert f(2) == [1, 'a']") == ("expr", "f(2)", [1, "a"])
    assert split_assert("assert 7 == g(1)") == ("expr", "g(1)", 7)
    assert split_assert("assert f(x) == y")[0] == "stmt"
    assert split_assert("not python (")[0] == "stmt"


@pytest.mark.parametrize("name,code", [
    ("sys_exit", "import sys\nsys.exit(0)\ndef add(a, b):\n    return a + b\n"),
    ("os_exit", "import os\nos._exit(0)\n"),
    ("exit_in_test", "def add(a, b):\n    raise SystemExit(0)\n"),
    ("os_exit_in_test", "import os\ndef add(a, b):\n    os._exit(0)\n"),
    ("print_passed", "print('passed\\nPASSED all tests OK')\ndef add(a, b):\n    return 7\n"),
    ("keyboard_interrupt", "def add(a, b):\n    raise KeyboardInterrupt\n"),
    ("eq_always_true",
     "class A:\n    def __eq__(self, o):\n        return True\n    def __repr__(self):\n"
     "        return '<A>'\ndef add(a, b):\n    return A()\n"),
    ("patch_harness",
     "import builtins, os\nbuiltins.exec = lambda *a, **k: None\nbuiltins.eval = lambda *a, **k: 3\n"
     "os.write = lambda fd, b: len(b)\ndef add(a, b):\n    return None\n"),
    ("settrace_jump",
     "import sys\ndef t(frame, event, arg):\n    return t\nsys.settrace(t)\n"
     "def add(a, b):\n    return None\n"),
    ("kill_parent",
     "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(-1, signal.SIGKILL)\n"
     "os.killpg(0, signal.SIGKILL)\ndef add(a, b):\n    return a + b\n"),
])
def test_cheats_never_pass(name, code):
    t0 = time.monotonic()
    r = run_function_tests(code, ADD_TESTS, FAST)
    assert r.passed == (False, False), (name, r)
    assert time.monotonic() - t0 < FAST.wall_s + 10  # bounded by the wall limit (+ load margin)
    _no_strays()


def test_read_the_tests_finds_nothing():
    # the program hunts for the expected value 918273 everywhere it can look
    code = r'''
import gc, os, sys, glob
def hunt():
    blobs = []
    try:
        blobs.append(sys.stdin.read())
    except Exception:
        pass
    for p in glob.glob("/tmp/**", recursive=True) + glob.glob("./**", recursive=True):
        try:
            blobs.append(open(p, errors="ignore").read())
        except Exception:
            pass
    for fd in range(64):
        try:
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
        blobs.append(repr(f.f_code.co_consts) + repr(f.f_locals))
        f = f.f_back
    for o in gc.get_objects():
        try:
            blobs.append(repr(o)[:10000])
        except Exception:
            pass
    import re
    for b in blobs:
        for m in re.findall(r"9182\d\d", b):
            return int(m)
    return -1
def secret():
    return hunt()
'''
    r = run_function_tests(code, ["assert secret() == 918273"],
                           SandboxLimits(wall_s=10, cpu_s=8, memory_mb=512))
    assert r.passed == (False,), r


def test_infinite_loop_times_out_within_limits():
    lim = SandboxLimits(wall_s=1.5, cpu_s=1)
    for code in ("while True:\n    pass\n", "import time\ntime.sleep(100)\n"):
        t0 = time.monotonic()
        r = run_function_tests(code, ["assert True"], lim)
        assert r.passed == (False,) and r.status in ("timeout", "killed")
        # killed at the wall limit, far before the program would end by itself (100 s);
        # the margin absorbs start-up under a loaded machine
        assert time.monotonic() - t0 < lim.wall_s + 10
    _no_strays()


def test_fork_bomb_is_bounded_and_reaped():
    code = (
        "import os, time\n"
        "for _ in range(200):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            os.setsid()\n"
        "            time.sleep(60)\n"
        "    except OSError:\n"
        "        pass\n"
        "def add(a, b):\n    return a + b\n"
        "while True:\n    pass\n"
    )
    t0 = time.monotonic()
    r = run_function_tests(code, ADD_TESTS, SandboxLimits(wall_s=2, cpu_s=2, nproc=8))
    assert r.passed == (False, False)
    assert time.monotonic() - t0 < 2 + 10  # bounded by the wall limit (+ load margin)
    time.sleep(0.2)
    _no_strays()  # includes: no process of any sandbox uid is left anywhere on the host


def test_memory_bomb_fails_and_host_survives():
    code = "x = []\nwhile True:\n    x.append(bytearray(50 * 1024 * 1024))\n"
    r = run_function_tests(code, ["assert True"], SandboxLimits(wall_s=5, memory_mb=256))
    assert r.passed == (False,)
    code2 = "def add(a, b):\n    return len(' ' * (10 ** 10))\n"
    assert run_function_tests(code2, ["assert add(1, 2) > 0"], FAST).passed == (False,)


def test_filesystem_writes_and_deletes_do_not_reach_the_host(tmp_path):
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    os.chmod(tmp_path, 0o777)
    os.chmod(sentinel, 0o666)
    repo_file = Path(__file__).resolve()
    outside = tmp_path / "evil.txt"
    code = f'''
import os, shutil
hits = 0
for p in [{str(outside)!r}, {str(repo_file.parent / "evil.txt")!r}, "/evil.txt"]:
    try:
        open(p, "w").write("x"); hits += 1
    except Exception:
        pass
for p in [{str(sentinel)!r}, {str(repo_file)!r}]:
    try:
        os.remove(p); hits += 1
    except Exception:
        pass
shutil.rmtree({str(repo_file.parent)!r}, ignore_errors=True)
big = 0
try:
    open("big.bin", "wb").write(b"0" * (64 << 20)); big = 1
except Exception:
    pass
def add(a, b):
    return hits + big
'''
    r = run_function_tests(code, ["assert add(1, 2) == 0", "assert add(1, 2) > 0"], FAST)
    assert sentinel.read_text() == "keep me"
    assert repo_file.exists() and not outside.exists()
    assert not (repo_file.parent / "evil.txt").exists() and not Path("/evil.txt").exists()
    if isolation_mode() == "namespaces":
        assert r.passed == (True, False)  # every attempt failed inside the sandbox


def test_sockets_cannot_reach_the_host():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.5)
    port = srv.getsockname()[1]
    code = f'''
def add(a, b):
    import socket
    s = socket.create_connection(("127.0.0.1", {port}), timeout=1)
    s.sendall(b"leak")
    return a + b
'''
    try:
        r = run_function_tests(code, ADD_TESTS, FAST)
        assert r.passed == (False, False)
        with pytest.raises(TimeoutError):
            srv.accept()
    finally:
        srv.close()


def test_stdio_tests_compare_on_the_host():
    code = "a, b = map(int, input().split())\nprint(a + b)\n"
    r = run_stdio_tests(code, ["1 2\n", "5 5\n"], ["3\n", "11"], FAST)
    assert r.passed == (True, False)
    # correct output, then os._exit before the harness records completion: not a pass
    r = run_stdio_tests("import os\nprint(3, flush=True)\nos._exit(0)\n", ["1 2"], ["3"], FAST)
    assert r.passed == (False,)
    r = run_stdio_tests("import sys\nprint(3)\nsys.exit(1)\n", ["1 2"], ["3"], FAST)
    assert r.passed == (False,)
    assert run_stdio_tests("print(3)\n", ["x"], [], FAST).status == "invalid"


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
        if i % 4 == 0:
            code = f"def f():\n    return {i}\n"
        elif i % 4 == 1:
            code = f"def f():\n    return {i + 1}\n"
        elif i % 4 == 2:
            code = "import os\nos._exit(0)\n"
        else:
            code = f"def f():\n    return {i}\nimport sys\nsys.exit(0)\n"
        jobs.append(CodeJob(code=code, tests=(f"assert f() == {i}",)))
    t0 = time.monotonic()
    res = run_jobs(jobs, SandboxLimits(wall_s=10, cpu_s=5), workers=8)
    elapsed = time.monotonic() - t0
    assert [r.passed for r in res] == [(i % 4 == 0,) for i in range(200)]
    assert elapsed < 40
    _no_strays()
    assert me.num_fds() <= fds_before + 2


def test_fallback_without_namespaces_still_grades_honestly(monkeypatch):
    """Where ``unshare`` is unavailable: limits + Python-level blocking only (documented)."""
    from tracerl.rewards import sandbox

    monkeypatch.setattr(sandbox, "isolation_mode", lambda: "none")
    ok = run_function_tests("def add(a, b):\n    return a + b\n", ADD_TESTS, FAST)
    assert ok.passed == (True, True)
    for code in ("import os\nos._exit(0)\n", "import sys\nsys.exit(0)\n",
                 "import socket\nsocket.socket()\ndef add(a, b):\n    return a + b\n"):
        assert run_function_tests(code, ADD_TESTS, FAST).passed == (False, False)
    assert run_function_tests("while True:\n    pass\n", ["assert True"],
                              SandboxLimits(wall_s=1.5, cpu_s=1)).passed == (False,)
    _no_strays()

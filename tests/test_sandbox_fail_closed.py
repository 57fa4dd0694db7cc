"""Fail closed: without the sandbox's isolation, grading untrusted code is refused unless
the caller explicitly opts into running it unsafely. Runs on every machine."""

from __future__ import annotations

import pytest

from tracerl.rewards import sandbox

FAST = sandbox.SandboxLimits(wall_s=4.0, cpu_s=2, memory_mb=256, nproc=8)
ADD = "def add(a, b):\n    return a + b\n"
TESTS = ["assert add(1, 2) == 3", "def check(c):\n    assert c(-1, 1) == 0\ncheck(add)"]
# cheats: write pass records to every open descriptor; exit before the tests; fake equality
CHEATS = [
    "import os\nfor fd in os.listdir('/proc/self/fd'):\n    try:\n"
    "        os.write(int(fd), b'pass 0\\npass 1\\ndone\\n')\n    except OSError:\n        pass\n"
    "def add(a, b):\n    return None\n",
    "import os\nos._exit(0)\n",
    "class A:\n    def __eq__(s, o):\n        return True\ndef add(a, b):\n    return A()\n",
]


def test_missing_isolation_refuses_unless_explicitly_unsafe(monkeypatch):
    monkeypatch.setattr(sandbox, "isolation_problems", lambda: ("the `unshare` program",))
    job = sandbox.CodeJob(ADD, tests=tuple(TESTS))
    for call in (lambda **k: sandbox.run_function_tests(ADD, TESTS, FAST, **k),
                 lambda **k: sandbox.run_stdio_tests("print(3)", ["x"], ["3"], FAST, **k),
                 lambda **k: sandbox.run_jobs([job], FAST, **k)):
        with pytest.raises(sandbox.SandboxUnavailable,
                           match="unshare.*unsafe_allow_unsandboxed_code"):
            call()
    # explicitly unsafe: runs (limits and the judge/program split only), and says so
    assert sandbox.run_function_tests(ADD, TESTS, FAST, allow_unsandboxed=True).passed == (True, True)
    for code in CHEATS:
        assert sandbox.run_function_tests(code, TESTS, FAST,
                                          allow_unsandboxed=True).passed == (False, False)


def test_isolation_problems_name_what_is_missing(monkeypatch):
    sandbox.isolation_problems.cache_clear()
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(sandbox, "_ARCHES", {})
    try:
        problems = " | ".join(sandbox.isolation_problems())
    finally:
        sandbox.isolation_problems.cache_clear()
    assert "root privileges" in problems and "unshare" in problems and "seccomp" in problems

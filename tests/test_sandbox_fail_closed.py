"""Fail closed: without the sandbox's isolation, grading untrusted code is refused unless
the caller explicitly opts into running it unsafely. Runs on every machine."""

from __future__ import annotations

import pytest

from tracerl.rewards import sandbox
from tracerl.rewards.sandbox import (
    CodeJob,
    SandboxLimits,
    SandboxUnavailable,
    run_function_tests,
    run_jobs,
    run_stdio_tests,
)

FAST = SandboxLimits(wall_s=4.0, cpu_s=2, memory_mb=256, nproc=8)
ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
FORGE_FDS = (
    "import os\n"
    "def add(a, b):\n    return 0\n"
    "for fd in range(0, 256):\n"
    "    try:\n        os.write(fd, b'pass 0\\npass 1\\ndone\\n')\n"
    "    except OSError:\n        pass\n"
)


def test_missing_isolation_refuses_unless_explicitly_unsafe(monkeypatch):
    monkeypatch.setattr(sandbox, "isolation_problems", lambda: ("the `unshare` program",))
    for call in (lambda **k: run_function_tests(ADD, ADD_TESTS, FAST, **k),
                 lambda **k: run_stdio_tests("print(3)", ["x"], ["3"], FAST, **k),
                 lambda **k: run_jobs([CodeJob(ADD, tests=tuple(ADD_TESTS))], FAST, **k)):
        with pytest.raises(SandboxUnavailable, match="unshare.*unsafe_allow_unsandboxed_code"):
            call()
    # explicitly unsafe: runs (limits and the judge/candidate split only)
    assert run_function_tests(ADD, ADD_TESTS, FAST, allow_unsandboxed=True).passed == (True, True)
    for code in (FORGE_FDS, "import os\nos._exit(0)\n",
                 "class A:\n    def __eq__(s, o):\n        return True\ndef add(a, b):\n    return A()\n"):
        assert run_function_tests(code, ADD_TESTS, FAST, allow_unsandboxed=True).passed == (False, False)


def test_isolation_problems_name_what_is_missing(monkeypatch):
    sandbox.isolation_problems.cache_clear()
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(sandbox, "_SYSCALLS", {})
    try:
        problems = " | ".join(sandbox.isolation_problems())
    finally:
        sandbox.isolation_problems.cache_clear()
    assert "root privileges" in problems and "unshare" in problems and "seccomp" in problems

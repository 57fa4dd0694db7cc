"""Code-sandbox grading throughput: programs per second through ``run_jobs``.

    PYTHONPATH=src python bench/bench_sandbox.py                # 200 programs, 8 workers
    PYTHONPATH=src python bench/bench_sandbox.py --n 400 --workers 4 --repeats 3

The job mix is the one of tests/test_sandbox.py's 200-program test: a quarter correct,
a quarter wrong, a quarter ``os._exit(0)``, a quarter ``sys.exit(0)`` after defining the
function; plus (``--statement``) HumanEval-style ``check(candidate)`` statement tests.
Prints one line per repeat and the best, with the CPU time the sandboxes used per
program (user + system of the reaped children: less sensitive to a shared machine's
load than wall time). Results: docs/benchmarks.md, "Code sandbox".
"""

from __future__ import annotations

import argparse
import os
import resource
import time

from tracerl.rewards.sandbox import CodeJob, SandboxLimits, run_jobs

CHECK = ("def check(candidate):\n    assert candidate(2) == {v}\n    assert candidate(3) == {w}\n"
         "    assert abs(candidate(0.5) - {x}) < 1e-9\n")


def jobs(n: int, statement: bool) -> tuple[list[CodeJob], list[bool]]:
    out, want = [], []
    for i in range(n):
        k = i % 4
        body = ("    return x + {i}\n" if k == 0 else "    return x + {i} + 1\n").format(i=i)
        code = "def f(x):\n" + body
        if k == 2:
            code = "import os\nos._exit(0)\n"
        elif k == 3:
            code += "import sys\nsys.exit(0)\n"
        if statement:
            tests = (CHECK.format(v=2 + i, w=3 + i, x=0.5 + i) + "check(f)",)
        else:
            tests = (f"assert f(2) == {2 + i}",)
        out.append(CodeJob(code=code, tests=tests))
        want.append(k == 0)
    return out, want


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--statement", action="store_true", help="check(candidate) tests")
    a = ap.parse_args()
    js, want = jobs(a.n, a.statement)
    lim = SandboxLimits(wall_s=10, cpu_s=5)
    best, cpu = float("inf"), []
    for r in range(a.repeats):
        c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        res = run_jobs(js, lim, workers=a.workers)
        dt = time.perf_counter() - t0
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append((c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime) / a.n * 1000)
        got = [x.all_passed for x in res]
        assert got == want, f"wrong verdicts: {sum(g != w for g, w in zip(got, want))} differ"
        best = min(best, dt)
        print(f"repeat {r}: {a.n} programs in {dt:.2f} s ({a.n / dt:.0f}/s)")
    print(f"best: {a.n} programs, {a.workers} workers, {os.cpu_count()} cpus: {best:.2f} s "
          f"({a.n / best:.0f} programs/s); sandbox CPU {min(cpu):.0f} ms/program")


if __name__ == "__main__":
    main()

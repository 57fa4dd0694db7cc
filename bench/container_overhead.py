"""Per-stage wall time of two runs of the same params (e.g. in-process vs container runner):
the runner's wall seconds each orchestrator stamps in a stage's manifest
(``tracerl_wall_seconds``), the stage's own ``seconds`` beside it, and the difference.

    python bench/container_overhead.py A/runs/<name> B/runs/<name> [--compare]
    python bench/container_overhead.py --startup 5 [--image tracerl-cpu:0.1.0]

Prints a markdown table (docs/benchmarks.md, "Containers"); with ``--compare`` also the
file-by-file verdicts of :func:`tracerl.pipeline.compare.compare_runs`. ``--startup N``
splits a container stage's fixed cost: N times a container that runs ``python -c pass``
through the runner's own docker SDK calls (create+start, stream logs, wait, remove) vs the
same on the host, and a container / host interpreter importing the stage modules.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tracerl.pipeline.compare import compare_runs, summary_table
from tracerl.pipeline.layout import MANIFEST, SECONDS_FIELD


def stage_walls(run: Path) -> dict[str, tuple[float, float]]:
    """``{relative stage folder: (runner wall seconds, stage's own seconds)}``."""
    out = {}
    for m in sorted(run.rglob(MANIFEST)):
        data = json.loads(m.read_text())
        if SECONDS_FIELD in data:
            rel = m.parent.relative_to(run).as_posix()
            out[rel] = (float(data[SECONDS_FIELD]), float(data.get("seconds", 0.0)))
    return out


IMPORTS = "import stages.sft, stages.policy, stages.rollout, stages.evaluate, mlflow"


def _container_seconds(client, image: str, code: str) -> float:
    t0 = time.perf_counter()
    c = client.containers.run(image=image, entrypoint=[""], command=["python", "-c", code],
                              environment={"HOME": "/tmp"}, detach=True)
    try:
        for _ in c.logs(stream=True, follow=True):
            pass
        assert c.wait()["StatusCode"] == 0
    finally:
        c.remove(force=True)
    return time.perf_counter() - t0


def _host_seconds(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t0


def startup(n: int, image: str) -> None:
    import docker

    client = docker.from_env()
    rows = [("container: python -c pass", lambda: _container_seconds(client, image, "pass")),
            ("host: python -c pass", lambda: _host_seconds("pass")),
            ("container: import the stage modules + mlflow",
             lambda: _container_seconds(client, image, IMPORTS)),
            ("host: import the stage modules + mlflow", lambda: _host_seconds(IMPORTS))]
    print(f"| what (n={n}) | median s | min s | max s |")
    print("| --- | ---: | ---: | ---: |")
    for name, fn in rows:
        xs = [fn() for _ in range(n)]
        print(f"| {name} | {statistics.median(xs):.2f} | {min(xs):.2f} | {max(xs):.2f} |",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, nargs="?")
    ap.add_argument("b", type=Path, nargs="?")
    ap.add_argument("--compare", action="store_true")
    ap.add_argument("--startup", type=int, default=0, metavar="N")
    ap.add_argument("--image", default="tracerl-cpu:0.1.0")
    a = ap.parse_args(argv)
    if a.startup:
        startup(a.startup, a.image)
        return 0
    if a.a is None or a.b is None:
        ap.error("two run folders, or --startup N")
    wa, wb = stage_walls(a.a), stage_walls(a.b)
    print(f"| stage | {a.a.parts[-3] if len(a.a.parts) > 2 else 'a'} wall s "
          f"| {a.b.parts[-3] if len(a.b.parts) > 2 else 'b'} wall s | difference s |")
    print("| --- | ---: | ---: | ---: |")
    ta = tb = 0.0
    for stage in sorted(wa.keys() & wb.keys()):
        ta, tb = ta + wa[stage][0], tb + wb[stage][0]
        print(f"| {stage} | {wa[stage][0]:.1f} | {wb[stage][0]:.1f} | "
              f"{wb[stage][0] - wa[stage][0]:+.1f} |")
    n = len(wa.keys() & wb.keys())
    print(f"| all {n} stages | {ta:.1f} | {tb:.1f} | {tb - ta:+.1f} "
          f"({(tb - ta) / max(n, 1):+.1f} per stage) |")
    if a.compare:
        print()
        print(summary_table(compare_runs(a.a, a.b)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

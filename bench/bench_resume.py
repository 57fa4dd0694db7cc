"""What verified resume costs: checking every finished stage of a run against its manifest.

    source scripts/env.sh && python bench/bench_resume.py [--params params.yaml] [--repeats 3]

Plans the run of ``params.yaml`` (its folder must exist: run the pipeline first), then
times the check a resumed run makes before it skips a stage (the manifest's key, and every
file's size and sha256: :func:`tracerl.pipeline.layout.not_done_reason`) over all planned
calls, and reports the bytes hashed, the seconds and the throughput. The first repeat
reads from disk (or the page cache, if the run is recent); later ones from the cache.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tracerl.config import load_params
from tracerl.pipeline.artifacts import is_complete, read_manifest
from tracerl.pipeline.layout import RunLayout, not_done_reason, plan_all


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    params = load_params(a.params)
    layout = RunLayout.from_params(params, base=Path.cwd())
    calls = [c for c in plan_all(params, layout) if is_complete(c.out)]
    if not calls:
        print(f"no finished stage under {layout.root}: run the pipeline first")
        return 1
    size = sum(f["bytes"] for c in calls for f in read_manifest(c.out)["files"].values())
    files = sum(len(read_manifest(c.out)["files"]) for c in calls)
    print(f"{layout.root}: {len(calls)} finished stage calls, {files} files, "
          f"{size / 2**20:.1f} MiB")
    for r in range(a.repeats):
        t0 = time.perf_counter()
        reasons = [not_done_reason(c) for c in calls]
        dt = time.perf_counter() - t0
        bad = sum(x is not None for x in reasons)
        print(f"  check {r + 1}: {dt:.3f} s ({size / 2**20 / dt:.0f} MiB/s), "
              f"{len(calls) - bad} intact, {bad} to re-run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

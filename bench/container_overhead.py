"""Per-stage wall time of two runs of the same params (e.g. in-process vs container runner):
the runner's wall seconds each orchestrator stamps in a stage's manifest
(``tracerl_wall_seconds``), the stage's own ``seconds`` beside it, and the difference.

    python bench/container_overhead.py A/runs/<name> B/runs/<name>

Prints a markdown table (docs/benchmarks.md, "Containers"); with ``--compare`` also the
file-by-file verdicts of :func:`tracerl.pipeline.compare.compare_runs`.
"""

from __future__ import annotations

import argparse
import json
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--compare", action="store_true")
    a = ap.parse_args(argv)
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

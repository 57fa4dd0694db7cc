"""The offline ``dvc plots show`` page: how long DVC takes to write it, how big it gets,
how long headless Chromium takes to draw it, per run length.

    PYTHONPATH=src python bench/dvc_plots_page.py                    # 30 and 300 iterations
    PYTHONPATH=src python bench/dvc_plots_page.py --iterations 6 30 300 --repeats 2

Builds a DVC project in a temporary folder from the repository's dvc.yaml, params.yaml and
plot template, with curve files shaped like a real run's (one row per iteration with
``--keys`` numeric keys, as the RL part writes ~90; evaluations every 5 iterations), and
the page of tracerl.pipeline.dvc_page over web/vega/node_modules (run ``npm ci`` there
first: ``source scripts/env.sh``). Per size it times ``dvc plots show`` and, when Chromium
is on PATH, Chromium with no network until the plots are drawn (``--dump-dom`` after the
scripts ran), and checks that every plot drew. Results: docs/benchmarks.md, "dvc plots
show offline".
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tracerl.pipeline import dvc_page
from tracerl.pipeline.registry import EVAL_PLOTS, PLOTS

REPO = Path(__file__).resolve().parents[1]
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>")


def project(root: Path, iterations: int, n_keys: int) -> None:
    for f in ("dvc.yaml", "params.yaml", ".dvc/config", ".dvc/plots/iterations.json"):
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / f, root / f)
    run = yaml.safe_load((REPO / "params.yaml").read_text())["run"]
    plots = root / run["runs_dir"] / run["name"] / "plots"
    plots.mkdir(parents=True)
    keys = [k for ks in PLOTS.values() for k in ks]
    keys += [f"other.metric_{j}" for j in range(max(0, n_keys - len(keys)))]
    rows = [{"iteration": i, **{k: (i * 7 + j) % 13 / 13 for j, k in enumerate(keys)}}
            for i in range(iterations)]
    evals = [{"iteration": i, "accuracy": i / (iterations + 1)}
             for i in [*range(0, iterations, 5), iterations]]
    (plots / "rl_curves.json").write_text(json.dumps(rows))
    (plots / "eval_curve.json").write_text(json.dumps(evals))
    (root / dvc_page.JS_DIR).mkdir(parents=True)
    (root / dvc_page.JS_DIR / "node_modules").symlink_to(REPO / dvc_page.JS_DIR / "node_modules")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc_page.install(root)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, nargs="+", default=[30, 300])
    ap.add_argument("--keys", type=int, default=90, help="numeric keys per curve row")
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args()
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    chromium = shutil.which("chromium") or shutil.which("google-chrome")
    t0 = time.perf_counter()
    dvc_page.build(REPO / dvc_page.JS_DIR / "node_modules")
    print(f"page template built in {time.perf_counter() - t0:.2f} s")
    for n in a.iterations:
        for rep in range(a.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                root = Path(tmp)
                project(root, n, a.keys)
                t0 = time.perf_counter()
                subprocess.run([dvc, "plots", "show"], cwd=root, check=True,
                               capture_output=True)
                show = time.perf_counter() - t0
                page = root / "dvc_plots" / "index.html"
                line = (f"{n:4d} iterations, repeat {rep}: dvc plots show {show:.2f} s, "
                        f"page {page.stat().st_size / 2**20:.2f} MiB")
                if chromium:
                    t0 = time.perf_counter()
                    dom = subprocess.run(
                        [chromium, *FLAGS, f"--user-data-dir={root / 'profile'}",
                         "--virtual-time-budget=60000", "--dump-dom", page.as_uri()],
                        capture_output=True, text=True, check=True, timeout=600).stdout
                    drawn = len(re.findall(r'<g class="mark-line role-mark layer_1_marks"',
                                           dom))
                    line += (f", Chromium drew it in {time.perf_counter() - t0:.2f} s "
                             f"({drawn} line groups, {len(PLOTS) + len(EVAL_PLOTS)} plots)")
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

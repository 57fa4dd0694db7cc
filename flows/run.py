"""The README's run command: the whole pipeline on the embedded default, then where to look.

    bash scripts/run.sh [--params params.yaml] [--no-dvc]

1. Loads ``params.yaml`` (every problem listed before any work).
2. Runs ``dvc repro``: prepare -> sft -> rl -> evaluate, where ``rl`` is the Prefect flow
   ``tracerl`` restricted to the RL loop. DVC skips what is up to date, so a second run
   does nothing. Outside a git/DVC checkout (or with ``--no-dvc``) it runs the Prefect
   flow for the whole pipeline directly.
3. Writes the learning curves as one offline page (``plots/index.html``), prints the
   held-out accuracy of the SFT model and of the final RL model, and where to look:
   ``dvc metrics show``, ``dvc exp show``, the curves, the MLflow UI, the trajectory viewer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tracerl.config import ConfigError, load_params


def _dvc_ready(root: Path) -> bool:
    return (root / ".dvc").is_dir() and (root / ".git").exists() and shutil.which("dvc") is not None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bash scripts/run.sh", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--no-dvc", action="store_true", help="run the Prefect flow directly")
    a = ap.parse_args(argv)
    root = Path.cwd()
    try:
        params = load_params(a.params)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    if not a.no_dvc and _dvc_ready(root) and a.params == "params.yaml":
        print("[tracerl] dvc repro  (prepare -> sft -> rl (Prefect flow) -> evaluate)", flush=True)
        rc = subprocess.call(["dvc", "repro"], cwd=root)
    else:
        print("[tracerl] running the Prefect flow `tracerl` (no DVC)", flush=True)
        rc = subprocess.call([sys.executable, "-m", "flows.tracerl_flow", "--params", a.params],
                             cwd=root)
    if rc != 0:
        print(f"[tracerl] pipeline failed (exit {rc}); re-run the same command to resume at "
              "the first unfinished stage", file=sys.stderr)
        return rc
    run_dir = root / params.run.runs_dir / params.run.name
    print(f"\n[tracerl] done in {time.time() - t0:.0f} s")
    from tracerl.pipeline.layout import RunLayout
    from tracerl.pipeline.plots import write_plots_page

    write_plots_page(RunLayout(run_dir))
    print_summary(run_dir)
    return 0


def print_summary(run_dir: Path) -> None:
    from tracerl.pipeline.layout import RunLayout

    L = RunLayout(run_dir)
    head = json.loads(L.headline.read_text()) if L.headline.is_file() else {}
    acc = head.get("heldout_accuracy", {})
    for label, key in (("SFT model", "sft"), ("final RL model", "final_rl"), ("gain", "gain")):
        if acc.get(key) is not None:
            print(f"  held-out accuracy, {label:15s} {acc[key]:+.3f}" if key == "gain" else
                  f"  held-out accuracy, {label:15s} {acc[key]:.3f}")
    print("\nwhere to look:")
    print("  dvc metrics show              (the headline: SFT vs final policy, per decoding)")
    print("  dvc exp show --only-changed   (experiments side by side)")
    print(f"  {L.plots_page}   (every learning curve, offline; "
          "`tracerl plots` rewrites it)")
    print("  mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1")
    print("                                (one parent run, child runs per stage, checkpoints)")
    viewer = L.latest_viewer()
    if viewer:
        print(f"  {viewer[1]}   (trajectory viewer of iteration {viewer[0]}, the latest)")
    print(f"  {run_dir}   (every artifact, with manifests)")


if __name__ == "__main__":
    sys.exit(main())

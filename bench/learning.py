"""Does the embedded default learn? SFT, then TraceRL and baselines on the same budget.

    source scripts/env.sh && python bench/learning.py [--seeds 0 1 2] [--iterations 30]
        [--methods trace_rl trace_rl_value random_masking coupled] [--out docs/results]
    python bench/learning.py --recipes block4 block_ref block_tstar --out docs/results/blocks

For each seed: one SFT run of the pipeline (prepare + sft + the SFT model's held-out
evaluation), then, for each method, the RL part of the pipeline started from that SFT
checkpoint (``model.init`` = the checkpoint, ``sft.steps: 0``), with the same number of
iterations, tasks and responses per iteration. Every run is a real flow run (stages,
manifests, an MLflow parent run named ``learn-s<seed>-<method>``), so the methods sit side
by side in the MLflow UI. Prints a table of held-out accuracy (greedy, static decoding,
``evaluate.heldout_size`` tasks) and writes ``<out>/learning.json`` and
``<out>/learning.png`` (held-out accuracy per iteration, per method).

Parameters not set here come from ``params.yaml``; ``--set section.key=value`` overrides
any of them for every run (e.g. ``--set policy.lr=1e-4``). ``--recipes`` compares named
experiments (``recipes/<name>.yaml``, :mod:`tracerl.recipes`) instead of methods: the arms
must agree on the SFT model (``model``, ``sft``, ``data``), which is trained once per seed.
Besides the held-out curve, each arm records the final and SFT evaluations' metrics (per
block size, per level) and the curriculum level per iteration.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tracerl.recipes import merge, seeded

METHODS = {
    "trace_rl": {"policy": {"method": "trace_rl", "use_value": False}},
    "trace_rl_value": {"policy": {"method": "trace_rl", "use_value": True}},
    "random_masking": {"policy": {"method": "random_masking", "use_value": False}},
    "coupled": {"policy": {"method": "coupled", "use_value": False}},
}


def parse_set(items: list[str]) -> dict:
    over: dict = {}
    for item in items:
        key, _, raw = item.partition("=")
        node = over
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = yaml.safe_load(raw)
    return over


def sft_run(seed: int, recipe: str | None) -> str:
    """The run name of a seed's SFT model: the default data's, or a recipe's own."""
    return f"learn-s{seed}-sft" + (f"-{recipe}" if recipe else "")


def run_flow(params: dict, folder: Path, part: str = "all") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{params['run']['name']}.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    cmd = [sys.executable, "-m", "flows.tracerl_flow", "--params", str(path), "--stage", part]
    # its own process group: on unwind the flow goes with everything it started (its
    # stage subprocesses and Prefect's temporary API server, which a terminated flow
    # process alone leaves running)
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, start_new_session=True) as proc:
        try:
            rc = proc.wait()
        except BaseException:  # Ctrl-C or SIGTERM here: the flow (and its stage) stops too
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # what is left of the group
            except ProcessLookupError:
                pass
            raise
    if rc:
        raise subprocess.CalledProcessError(rc, cmd)


def levels(run_dir: Path) -> list[int]:
    """The curriculum level each iteration sampled at (the rollout's ``level``)."""
    rows = json.loads((run_dir / "plots" / "rl_curves.json").read_text())
    return [int(r["rollout.level"]) for r in rows if "rollout.level" in r]


# the per-iteration metrics bench/learning_report.py reads (time shares, the equal-time
# budget, per-domain curves, the training plots), kept in learning.json so that seeds run
# on other machines or in other sessions can be reported together without their run folders
ITERATION_KEYS = ("iteration", "iteration.wall_seconds", "rollout.seconds", "reward.seconds",
                  "policy.seconds", "value.seconds", "reward.grade_seconds",
                  "reward.mean_response_tokens", "rollout.max_tokens", "rollout.level")


def iteration_rows(run_dir: Path) -> list[dict]:
    """The run's per-iteration metrics that the report needs (:data:`ITERATION_KEYS`, and
    the rollouts' and evaluations' accuracies, overall and per domain)."""
    rows = json.loads((run_dir / "plots" / "rl_curves.json").read_text())
    return [{k: v for k, v in r.items() if k in ITERATION_KEYS
             or k.startswith(("reward.accuracy", "evaluate.accuracy"))} for r in rows]


def curve(run_dir: Path) -> list[tuple[int, float]]:
    rows = json.loads((run_dir / "plots" / "rl_curves.json").read_text())
    pts = [(r["iteration"] + 1, r["evaluate.accuracy"]) for r in rows if "evaluate.accuracy" in r]
    final = json.loads((run_dir / "metrics" / "evaluate.json").read_text())["accuracy"]
    return pts + [(len(rows), final)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--recipes", nargs="+", default=None,
                    help="compare these recipes (recipes/NAME.yaml) instead of --methods")
    ap.add_argument("--iterations", type=int, default=None, help="default: run.iterations")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    ap.add_argument("--sft-init-from", default=None, metavar="RECIPE",
                    help="start each seed's SFT from the SFT model another invocation trained "
                         "for RECIPE ('default': the default data's), e.g. the long tier from "
                         "the default SFT model with --set sft.steps=500")
    a = ap.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so a killed comparison does not leave its flow running
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    base = merge(yaml.safe_load(Path("params.yaml").read_text()), parse_set(a.set))
    if a.iterations:
        base["run"]["iterations"] = a.iterations
    arms = METHODS
    sft_of_recipe = None  # the SFT model's run is learn-s<seed>-sft[-<recipe>]
    if a.recipes:
        from tracerl.recipes import load_recipe

        arms = {r: load_recipe(r) for r in a.recipes}
        a.methods = list(arms)
        sft_of = {r: {k: merge(base, o).get(k) for k in ("model", "sft", "data")}
                  for r, o in arms.items()}
        if len({json.dumps(v, sort_keys=True) for v in sft_of.values()}) > 1:
            ap.error("the recipes differ in model/sft/data: they cannot share an SFT model; "
                     "compare them in separate invocations")
        shared = next(iter(sft_of.values()))
        if any(shared.get(k) != base.get(k) for k in shared):
            # an SFT model of its own (other data or model): its own run folder, so the
            # default SFT model of the same seed is neither overwritten nor re-trained
            sft_of_recipe = a.recipes[0]
        base = merge(base, dict(shared))
    work = Path(base["run"]["runs_dir"]) / "learning-params"
    results: dict = {"params": base, "seeds": {}}
    prior = a.out / "learning.json"
    if prior.exists():  # seeds of an earlier invocation with the same params are kept
        old = json.loads(prior.read_text())
        if json.dumps(old.get("params"), sort_keys=True) == json.dumps(
                json.loads(json.dumps(base)), sort_keys=True):
            results["seeds"] = {k: v for k, v in old.get("seeds", {}).items()
                                if k not in {str(s) for s in a.seeds}}
    for seed in a.seeds:
        t0 = time.time()
        seeds = seeded(seed)
        # the first arm's params whole (they are valid together: e.g. a curriculum start
        # level inside the recipe's difficulty range); the arms share what the SFT part reads
        first = arms[a.methods[0]] if a.recipes else {}
        sft_p = merge(merge(merge(base, seeds), first),
                      {"run": {"name": sft_run(seed, sft_of_recipe), "iterations": 1}})
        if a.sft_init_from:  # continue from another SFT model of the same seed
            other = None if a.sft_init_from == "default" else a.sft_init_from
            init = Path(base["run"]["runs_dir"]) / sft_run(seed, other) / "sft" / "checkpoint"
            if not (init / "config.json").is_file():
                ap.error(f"--sft-init-from {a.sft_init_from}: no SFT model at {init}; train it "
                         f"first (bench/learning.py --recipes {a.sft_init_from} --seeds {seed})")
            sft_p = merge(sft_p, {"model": {"init": str(init.resolve())}})
        for part in ("prepare", "sft"):
            run_flow(sft_p, work, part)
        sft_dir = Path(base["run"]["runs_dir"]) / sft_p["run"]["name"]
        ckpt = sft_dir / "sft" / "checkpoint"
        per: dict = {"sft_seconds": time.time() - t0}
        sft_m = json.loads((sft_dir / "sft" / "metrics.json").read_text())
        per["sft_steps"] = {k: sft_m[k] for k in ("steps", "val_accuracy", "val_step",
                                                  "stopped_early") if k in sft_m}
        for m in a.methods:
            t1 = time.time()
            p = merge(merge(base, seeds), merge(arms[m], {
                "run": {"name": f"learn-s{seed}-{m}", "seed": seed},
                "model": {"init": str(ckpt.resolve())},
                "sft": {"steps": 0},
            }))
            run_flow(p, work)
            rd = Path(base["run"]["runs_dir"]) / p["run"]["name"]
            sft_acc = json.loads((rd / "metrics" / "rl.json").read_text())["baseline"]["accuracy"]
            per[m] = {"sft_accuracy": sft_acc, "curve": curve(rd),
                      "final_accuracy": curve(rd)[-1][1], "seconds": time.time() - t1,
                      "levels": levels(rd), "iterations": iteration_rows(rd),
                      "final_metrics": json.loads((rd / "metrics" / "evaluate.json").read_text()),
                      "sft_metrics": json.loads((rd / "metrics" / "rl.json").read_text())
                      .get("baseline", {})}
            print(f"seed {seed} {m:15s} SFT {sft_acc:.3f} -> RL {per[m]['final_accuracy']:.3f} "
                  f"({per[m]['seconds']:.0f} s)", flush=True)
            results["seeds"][str(seed)] = per
            a.out.mkdir(parents=True, exist_ok=True)  # written as it goes: nothing lost
            (a.out / "learning.json").write_text(json.dumps(results, indent=2))
    print_table(results, a.methods)
    plot(results, a.methods, a.out / "learning.png")
    return 0


def print_table(results: dict, methods: list[str]) -> None:
    print("\n| method | SFT held-out | final held-out | gain (points) | spread of gain |")
    print("|---|---:|---:|---:|---:|")
    for m in methods:
        sft = [s[m]["sft_accuracy"] for s in results["seeds"].values()]
        fin = [s[m]["final_accuracy"] for s in results["seeds"].values()]
        gains = [100 * (f - s) for f, s in zip(fin, sft)]
        spread = f"{min(gains):+.1f} .. {max(gains):+.1f}"
        print(f"| {m} | {statistics.mean(sft):.3f} | {statistics.mean(fin):.3f} | "
              f"{statistics.mean(gains):+.1f} | {spread} |")


def plot(results: dict, methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for m in methods:
        seeds = list(results["seeds"].values())
        its = [x for x, _ in seeds[0][m]["curve"]]
        mean = [statistics.mean(s[m]["curve"][i][1] for s in seeds) for i in range(len(its))]
        sft = statistics.mean(s[m]["sft_accuracy"] for s in seeds)
        ax.plot([0, *its], [sft, *mean], marker="o", label=m)
    ax.set_xlabel("RL iteration")
    ax.set_ylabel("held-out accuracy (greedy, static)")
    ax.set_title(f"embedded default, mean of {len(results['seeds'])} seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())

"""One iteration's rollout, unsharded vs split into shards side by side, on this machine.

    python bench/bench_shards.py [--configs 1:0 1:1 2:0] [--repeats 3] [--tasks 32]

A configuration ``N:T`` is N shards with ``run.threads: T`` (0: an unsharded rollout
keeps torch's default, every core; a shard takes ``cpu_count // N``).

Runs the real rollout stage the way the flow runs it with the default in-process runner:
the unsharded call in this process (``run.threads: 0``: torch's default, every core), or
``n`` shard processes started together (each ``cpu_count // n`` threads, the
orchestrator's subprocess ``shard_runner``), then the merge in this process. The shard
processes are started by threads here as the flow's Prefect ``ThreadPoolTaskRunner``
starts them (one ``SubprocessRunner`` call per task); the bench leaves Prefect itself
out, so the figures are the rollout's, not the orchestrator's. Wall time counts from the
call to the merged folder (a shard's interpreter start and model load included; the
in-process call loads the model too: the policy cache is cleared). Configurations
alternate, repeated ``--repeats`` times; every ``rollouts.parquet`` is checked
byte-identical to the first.

Model: the embedded default (``params.yaml`` sizes), random weights saved as a checkpoint;
tasks: the prepare stage's arithmetic set; ``rollout`` params as in ``params.yaml``
(``--tasks`` tasks x 8 responses, batches of 64).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_THREADS = __import__("torch").get_num_threads()


def setup(work: Path, tasks: int, threads: int) -> Path:
    from stages.prepare import main as prepare

    from tracerl.config import load_params
    from tracerl.models import save_model
    from tracerl.pipeline.artifacts import stage_output
    from tracerl.pipeline.resolve import policy_from_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["rollout"]["tasks_per_iter"] = tasks
    raw["run"]["threads"] = threads
    params = work / f"params_t{threads}.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    if (work / "sft").is_dir():
        return params
    assert prepare(["--params", str(params), "--out", str(work / "prepare")]) == 0
    model, tok = policy_from_params("tiny", load_params(params))
    with stage_output(work / "sft", stage="sft") as o:
        save_model(model, tok, o.dir / "checkpoint")
    return params


def run_once(work: Path, params: Path, n: int, tag: str) -> dict:
    import torch

    from tracerl.config import load_params
    from tracerl.pipeline.layout import Planner, RunLayout, StageCall
    from tracerl.pipeline.runners import InProcessRunner, SubprocessRunner
    from tracerl.sampling import clear_policy_cache

    runner, here = SubprocessRunner(cwd=ROOT), InProcessRunner()
    clear_policy_cache()
    torch.set_num_threads(DEFAULT_THREADS)  # a run.threads of an earlier run stays set
    out = work / tag / "rollout"
    call = StageCall("rollout", out, 0, {"data": (work / "prepare",), "policy": (work / "sft",)},
                     key=tag)
    t0 = time.perf_counter()
    if n == 1:
        here.run(call, params, {"TRACERL_TRACKER": "null"})
        shard_s: list[float] = []
    else:
        shards, merge = Planner(load_params(params), RunLayout(work)).shards(call, n)
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(lambda c: runner.run(c, params, {"TRACERL_TRACKER": "null"}), shards))
        here.run(merge, params, {"TRACERL_TRACKER": "null"})
        shard_s = json.loads((out / "metrics.json").read_text())["shard_seconds"]
    wall = time.perf_counter() - t0
    m = json.loads((out / "metrics.json").read_text())
    return {"shards": n, "wall_s": wall, "decode_s": m["seconds"], "shard_decode_s": shard_s,
            "responses": m["num_responses"], "out": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["1:0", "1:1", "2:0"],
                    help="N:T = N shards, run.threads T")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=32)
    a = ap.parse_args()
    from tracerl.pipeline.artifacts import sha256_file

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
          f"({len(os.sched_getaffinity(0))} usable), python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        configs = [tuple(map(int, c.split(":"))) for c in a.configs]
        params = {t: setup(work, a.tasks, t) for _, t in configs}
        import stages.rollout  # noqa: F401  (the flow process has it imported already)
        rows: dict[tuple, list[dict]] = {c: [] for c in configs}
        for r in range(a.repeats):
            for n, t in configs:
                rows[(n, t)].append(run_once(work, params[t], n, f"r{r}_n{n}_t{t}"))
        ref = sha256_file(rows[configs[0]][0]["out"] / "rollouts.parquet")
        same = all(sha256_file(x["out"] / "rollouts.parquet") == ref
                   for v in rows.values() for x in v)
        print(f"\n{rows[configs[0]][0]['responses']} responses; every output "
              f"byte-identical to the first run: {same}")
        print("| shards | run.threads | wall s (each run) | median wall s | decode s (median) "
              "| shards' decode s (last run) |")
        print("|---|---|---|---|---|---|")
        for (n, t), v in rows.items():
            walls = [x["wall_s"] for x in v]
            print(f"| {n} | {t} | {', '.join(f'{w:.1f}' for w in walls)} | "
                  f"{statistics.median(walls):.1f} | "
                  f"{statistics.median(x['decode_s'] for x in v):.1f} | "
                  f"{', '.join(f'{s:.1f}' for s in v[-1]['shard_decode_s']) or '-'} |")


if __name__ == "__main__":
    main()

"""Kill the pipeline at random points and check the resumed result is bit-identical.

    source scripts/env.sh && python bench/fault_injection.py [--kills 10] [--seed 0]

Runs the REAL stages on a tiny configuration (a few seconds per full run) in a temporary
folder: first one uninterrupted run (the reference), then a second run folder that is
started, SIGKILLed after a random delay, restarted, killed again, ... ``--kills`` times,
and finally run to completion. Every data artifact of the two runs (task and rollout
parquet files, checkpoints, trainer states, advantages, curriculum decisions, evaluation
scores) is compared byte for byte. Timing fields (manifests, metrics with seconds or
tokens/s, the trajectory viewer page) are excluded: they differ run to run by nature.

Prints one line per kill (delay, which stage was running) and the number of differing
files; exits 1 when any file differs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "run": {"iterations": 3, "eval_every": 2, "tracker": "null", "registered_model": ""},
    "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
              "intermediate_size": 64, "max_position_embeddings": 128},
    "data": {"train_size": 60, "heldout_size": 8, "sft_size": 32, "max_difficulty": 1},
    "sft": {"steps": 20, "batch_size": 8, "warmup_steps": 2},
    "rollout": {"tasks_per_iter": 4, "responses_per_task": 4, "max_tokens": 16,
                "batch_size": 16},
    "reward": {"group_filter": "none"},
    "policy": {"use_value": True, "micro_batch": 4},
    "value": {"micro_batch": 4},
    "evaluate": {"heldout_size": 4},
}
DATA_SUFFIXES = (".parquet", ".safetensors", ".pt", ".bin")
DATA_NAMES = ("decision.json", "config.json", "eval.json")


def params_file(folder: Path) -> Path:
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        base[section].update(values)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def command(folder: Path, run: str) -> list[str]:
    return [sys.executable, "-m", "flows.tracerl_flow", "--no-prefect", "--params",
            str(folder / "params.yaml"), "--run-name", run]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}


def digests(run_dir: Path) -> dict[str, str]:
    out = {}
    for p in sorted(run_dir.rglob("*")):
        if p.is_file() and (p.suffix in DATA_SUFFIXES or p.name in DATA_NAMES) \
                and not any(part.startswith(".") for part in p.relative_to(run_dir).parts):
            out[str(p.relative_to(run_dir))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def progress(run_dir: Path) -> str:
    """How far the killed run had got: finished stage folders, and a half-written one."""
    done = sum(1 for _ in run_dir.rglob("manifest.json")) if run_dir.exists() else 0
    tmps = list(run_dir.rglob(".*.tmp-*")) if run_dir.exists() else []
    writing = f", while writing {tmps[-1].relative_to(run_dir)}" if tmps else ""
    return f"{done} stage folders finished{writing}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    rng = random.Random(a.seed)
    with tempfile.TemporaryDirectory(prefix="tracerl-faults-") as tmp:
        folder = Path(tmp)
        params_file(folder)
        t0 = time.perf_counter()
        subprocess.run(command(folder, "reference"), cwd=folder, env=env(), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        clean = time.perf_counter() - t0
        print(f"uninterrupted run: {clean:.1f} s")
        run_dir = folder / "runs" / "faulty"
        kills = 0
        while kills < a.kills:
            delay = rng.uniform(0.5, clean)
            proc = subprocess.Popen(command(folder, "faulty"), cwd=folder, env=env(),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                proc.wait(timeout=delay)
                print(f"  run finished before the kill at {delay:.1f} s; starting over")
                import shutil

                shutil.rmtree(run_dir)
                continue
            except subprocess.TimeoutExpired:
                where = progress(run_dir)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                print(f"  kill {kills}: SIGKILL at {delay:.1f} s, {where}")
        rc = subprocess.run(command(folder, "faulty"), cwd=folder, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if rc.returncode != 0:
            print(rc.stderr[-3000:])
            return 1
        ref, got = digests(folder / "runs" / "reference"), digests(run_dir)
        differ = sorted(k for k in set(ref) | set(got) if ref.get(k) != got.get(k))
        print(f"{a.kills} kills, {len(ref)} data files compared, {len(differ)} differ")
        for k in differ[:20]:
            print(f"  differs: {k}")
        return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())

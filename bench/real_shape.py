"""One RL iteration at a real model's shapes, on CPU, through the real stages.

    source scripts/env.sh && python bench/real_shape.py [--shape qwen3-0.6b] [--out DIR]
        [--threads 2] [--tasks 8] [--responses 4] [--max-tokens 128]

A block-diffusion model with Qwen3-0.6B's shapes (hidden 1024, 28 layers, 16 query / 8 KV
heads, head dim 128, intermediate 3072) and the real SDAR tokenizer and chat template
(``tests/fixtures/sdar-4b-chat-release``, 151,936-entry vocabulary, untied embeddings as
in that release), random weights saved in the release layout
(:func:`tracerl.models.release.random_release_checkpoint`) and loaded through
``load_model`` from that folder. Then the pipeline's own plan for one iteration runs,
each stage as its own process (the subprocess runner's command): prepare, sft (0 steps:
the checkpoint as the policy), rollout (8 tasks x 4 responses, up to 128 new tokens,
block 4), reward, policy (TraceRL update), curriculum.

Per stage: wall seconds, peak RSS (the stage process's own, from ``wait4``), and the
stage's tokens/s. The policy update's peak RSS is set against parameters + gradients +
AdamW moments (16 bytes per fp32 parameter): training must not materialise
full-vocabulary logits for untrained positions, so the peak should stay within 2.5x of
that. ``--shape small`` runs the same plumbing at a toy size in seconds (a check of the
script, not a figure).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RELEASE = ROOT / "tests" / "fixtures" / "sdar-4b-chat-release"
SHAPES = {
    "qwen3-0.6b": dict(layers=28, hidden=1024, heads=16, kv_heads=8, head_dim=128,
                       intermediate=3072),
    "small": dict(layers=2, hidden=64, heads=2, kv_heads=1, head_dim=32, intermediate=128),
}
STAGES = ("prepare", "sft", "rollout", "reward", "policy", "curriculum")


def run_stage(cmd: list[str], env: dict) -> tuple[float, float, int]:
    """``(seconds, peak RSS in GiB, exit status)`` of one stage process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t0, usage.ru_maxrss / 2**20, proc.returncode  # KiB -> GiB


def count_params(ckpt: Path) -> int:
    """Parameters of a safetensors checkpoint, from the shard headers (no weights read)."""
    from safetensors import safe_open

    total = 0
    for shard in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():
                n = 1
                for d in f.get_slice(k).get_shape():
                    n *= d
                total += n
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-0.6b", choices=list(SHAPES))
    ap.add_argument("--out", type=Path, default=Path("runs/real-shape"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--responses", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=4)
    a = ap.parse_args(argv)
    sys.path[:0] = [str(ROOT), str(ROOT / "src")]
    from tracerl.config import load_params
    from tracerl.models.release import random_release_checkpoint
    from tracerl.pipeline.layout import RunLayout, plan_all
    from tracerl.pipeline.runners import SubprocessRunner

    out = a.out.resolve()
    ckpt = out / "checkpoint"
    t0 = time.perf_counter()
    if not (ckpt / "model.safetensors.index.json").is_file():
        # in a child process: this one stays small, so the stage processes it forks do not
        # start from (and ru_maxrss does not count) the checkpoint's tensors
        import multiprocessing as mp

        build = mp.get_context("spawn").Process(
            target=random_release_checkpoint, args=(RELEASE, ckpt), kwargs=SHAPES[a.shape])
        build.start()
        build.join()
        if build.exitcode != 0:
            print(f"building the checkpoint failed (exit {build.exitcode})", file=sys.stderr)
            return 1
    build_s = time.perf_counter() - t0
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    over = {
        "run": {"name": f"real-shape-{a.shape}", "runs_dir": str(out / "runs"), "iterations": 1,
                "threads": a.threads, "tracker": "null"},
        "model": {"init": str(ckpt), "block_size": 4},
        "data": {"train_size": 64, "heldout_size": 8, "sft_size": 8, "max_difficulty": 3},
        "sft": {"steps": 0},
        "rollout": {"tasks_per_iter": a.tasks, "responses_per_task": a.responses,
                    "max_tokens": a.max_tokens, "batch_size": a.tasks * a.responses},
        "reward": {"group_filter": "none"},
        "policy": {"micro_batch": a.micro_batch},
        "evaluate": {"heldout_size": 8},
    }
    for section, values in over.items():
        raw[section].update(values)
    params_path = out / "params.yaml"
    params_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(params_path)
    layout = RunLayout.from_params(params, base=ROOT)
    calls = [c for c in plan_all(params, layout) if c.stage in STAGES]
    runner = SubprocessRunner(cwd=ROOT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")]),
           "OMP_NUM_THREADS": str(a.threads)}
    rows = []
    for call in calls:
        if (call.out / "manifest.json").is_file():
            print(f"{call.label}: done before (delete {out} to re-run)")
        seconds, rss, rc = run_stage(runner.command(call, params_path), env)
        if rc != 0:
            print(f"{call.label} failed (exit {rc})", file=sys.stderr)
            return 1
        m = json.loads((call.out / "metrics.json").read_text())
        rows.append((call.label, seconds, rss, m))
    n_params = count_params(ckpt)
    print(f"\nmodel: {a.shape} {SHAPES[a.shape]}, vocabulary 151,936 (SDAR release), fp32; "
          f"checkpoint built in {build_s:.0f} s; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {a.threads} torch threads, torch "
          f"{__import__('torch').__version__}\n")
    print("| stage | seconds | peak RSS (GiB) | tokens/s |")
    print("|---|---:|---:|---:|")
    for label, seconds, rss, m in rows:
        tps = m.get("tokens_per_s")
        print(f"| {label} | {seconds:.1f} | {rss:.2f} | {'' if tps is None else f'{tps:.0f}'} |")
    if n_params:  # noqa: SIM102
        state = 16 * n_params / 2**30  # fp32 weights, gradients, two AdamW moments
        peak = next(rss for label, _, rss, _ in rows if label.startswith("policy"))
        print(f"\npolicy update: {n_params / 1e6:.0f}M parameters; weights + gradients + AdamW "
              f"= {state:.2f} GiB; peak RSS {peak:.2f} GiB = {peak / state:.2f}x (bound 2.5x)")
    (out / "real_shape.json").write_text(json.dumps(
        {"shape": a.shape, "rows": [{"stage": r[0], "seconds": r[1], "peak_rss_gib": r[2],
                                     "metrics": r[3]} for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

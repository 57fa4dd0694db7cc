"""Benchmark: multi-rank policy stage (torchrun + DeepSpeed ZeRO-2, gloo) vs one process.

    python bench/bench_ranks.py [--params params.yaml] [--repeats 3] [--threads 2]
        [--micro-batch 8] [--grad-accum 2] [--json out.json]

Runs the real ``stages/policy.py`` through the subprocess runner (as the flow does) on the
embedded default model (``model.*`` of params.yaml, random weights) and one default
iteration of scored rollouts (``rollout.tasks_per_iter`` x ``responses_per_task``
responses sampled from that model, alternating advantages +-1). Variants, interleaved
(one run of each per repeat, medians reported) so that each sees the same machine load:

- ``plain``: 1 process, plain torch (``zero_stage 0``), ``--threads`` torch threads;
- ``zero2-1``: 1 process, DeepSpeed ZeRO-2 on a one-rank gloo group, ``--threads`` threads;
- ``zero2-2``: 2 ranks through torchrun, ZeRO-2, ``--threads / 2`` threads per rank.

Every variant has the same global batch (``--micro-batch`` x ``--grad-accum`` rows per
optimizer step). Two batches: ``empty`` (every response filtered out: no optimizer step,
so the wall time is start-up, model load, DeepSpeed initialisation and saving: the launch
overhead) and ``update`` (one full policy update). Reported per variant: the stage's wall
time (process start to exit) and the update's own seconds (``metrics.json`` ``seconds``:
the optimizer steps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import polars as pl
import torch
import yaml

from tracerl.config import load_params
from tracerl.data import render_prompt
from tracerl.devices import cpu_model
from tracerl.models import build_default_tokenizer, build_for_tokenizer, save_model
from tracerl.pipeline.artifacts import read_metrics
from tracerl.pipeline.layout import StageCall
from tracerl.pipeline.runners import SubprocessRunner
from tracerl.schemas import write_parquet

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"plain": (1, 0), "zero2-1": (1, 2), "zero2-2": (2, 2)}  # name -> (ranks, zero)


def make_inputs(p, work: Path, seed: int = 0) -> tuple[Path, Path, Path]:
    """The default policy (random weights) and scored rollouts of it: full and empty."""
    from tracerl.sampling import SamplingConfig, generate, trajectories_to_frame

    m, r = p.model, p.rollout
    tok = build_default_tokenizer()
    model = build_for_tokenizer(
        tok, m.family, block_size=m.block_size, hidden_size=m.hidden_size,
        num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
        intermediate_size=m.intermediate_size,
        max_position_embeddings=m.max_position_embeddings, seed=seed)
    policy = work / "policy"
    save_model(model, tok, policy / "checkpoint")
    g = torch.Generator().manual_seed(seed)
    tasks = [f"t{i}" for i in range(r.tasks_per_iter) for _ in range(r.responses_per_task)]
    idx = [j for _ in range(r.tasks_per_iter) for j in range(r.responses_per_task)]
    prompts = []
    for _ in range(r.tasks_per_iter):
        x, y = (int(v) for v in torch.randint(10, 999, (2,), generator=g))
        prompts += [render_prompt(tok, f"What is {x}+{y}? Put the answer in \\boxed{{}}.")] \
            * r.responses_per_task
    cfg = SamplingConfig(block_size=m.block_size, steps_per_block=r.steps_per_block,
                         max_tokens=r.max_tokens, strategy=r.strategy, batch_size=r.batch_size)
    trajs = generate(model, prompts, cfg, generator=g)
    df = trajectories_to_frame(trajs, tasks, idx, "bench", tok)
    n = len(df)
    good = [i % 2 == 0 for i in range(n)]
    df = df.with_columns(correct=pl.Series(good), reward=pl.Series([float(x) for x in good]),
                         advantage=pl.Series([1.0 if x else -1.0 for x in good]),
                         kept=pl.lit(True))
    full, empty = work / "scored", work / "empty"
    full.mkdir()
    empty.mkdir()
    write_parquet(df, full / "scored.parquet", "scored")
    write_parquet(df.with_columns(kept=pl.lit(False)), empty / "scored.parquet", "scored")
    return policy, full, empty


def variant_params(base: Path, work: Path, name: str, mb: int, ga: int) -> Path:
    raw = yaml.safe_load(base.read_text())
    ranks, zero = VARIANTS[name]
    raw["policy"].update(micro_batch=mb, grad_accum=ga, ranks=ranks, zero_stage=zero)
    out = work / f"params-{name}.yaml"
    out.write_text(yaml.safe_dump(raw))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the whole stage")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--workdir", default="", help="keep (and reuse) the inputs here")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    variants = a.variants.split(",")
    p = load_params(a.params)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_ranks-"))
    work.mkdir(parents=True, exist_ok=True)
    if (work / "empty" / "scored.parquet").is_file():
        policy, full, empty = work / "policy", work / "scored", work / "empty"
    else:
        t = time.perf_counter()
        policy, full, empty = make_inputs(p, work)
        print(f"inputs: {time.perf_counter() - t:.1f} s in {work}")
    params = {v: variant_params(Path(a.params), work, v, a.micro_batch, a.grad_accum)
              for v in variants}
    runner = SubprocessRunner(cwd=ROOT)
    res: dict = {v: {"empty_wall": [], "update_wall": [], "update_seconds": []}
                 for v in variants}
    for rep in range(a.repeats):
        for batch, scored in (("empty", empty), ("update", full)):
            for v in variants:
                ranks = VARIANTS[v][0]
                env = {"TRACERL_TRACKER": "null",
                       "OMP_NUM_THREADS": str(max(1, a.threads // ranks))}
                out = work / "out" / f"{v}-{batch}-{rep}"
                call = StageCall("policy", out, 0, {"policy": (policy,), "scored": (scored,)})
                t = time.perf_counter()
                runner.run(call, params[v], env)
                wall = time.perf_counter() - t
                res[v][f"{batch}_wall"].append(wall)
                if batch == "update":
                    m = read_metrics(out)
                    res[v]["update_seconds"].append(m["seconds"])
                    res[v].setdefault("steps", m["steps"])
                    res[v].setdefault("loss", m["loss"])
                print(f"rep {rep} {batch:6s} {v:8s} wall {wall:6.1f} s", flush=True)
    summary = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "threads": a.threads,
        "samples": p.rollout.tasks_per_iter * p.rollout.responses_per_task,
        "rows_per_step": a.micro_batch * a.grad_accum,
        "variants": {v: {**{k: statistics.median(x) for k, x in r.items()
                            if isinstance(x, list)},
                         "all": {k: x for k, x in r.items() if isinstance(x, list)},
                         "steps": r.get("steps"), "loss": r.get("loss")}
                     for v, r in res.items()},
    }
    print(json.dumps(summary, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Rollout stage: policy + task pool -> rollouts.parquet (k responses per task, with traces).

    python -m stages.rollout --params params.yaml --out DIR [--iteration I]
        (--input data=PREPARE_DIR | --tasks TASKS.parquet)
        [--input policy=DIR | --policy CHECKPOINT_DIR|tiny] [--input curriculum=DIR] [--seed S]

Reads ``params.model``, ``params.rollout`` and ``data.max_skip_fraction``. Samples
``rollout.tasks_per_iter`` tasks (seeded by ``run.seed`` and the iteration) from the pool
the curriculum decision allows (difficulty levels, retired tasks, block size and budget;
``curriculum.start_level`` and the schedules at iteration 0), renders each prompt with
the chat template, and samples ``rollout.responses_per_task`` responses each with
:func:`tracerl.sampling.generate`.
A sampled task whose prompt does not fit the model's context with this iteration's
budget is skipped and counted by task id (metric ``skipped_too_long``, ``skipped.jsonl``);
past ``data.max_skip_fraction`` of the sampled tasks the stage fails.

Sharded (``rollout.shards`` > 1; the flow plans the calls, :mod:`tracerl.sampling.shards`):

    ... --shard K/N --policy-digest D     decode shard K of N of the batches into --out
                                          (rollouts.parquet with its rows, shard.json)
    ... --input shard=DIR (one per shard) --policy-digest D
                                          merge: the ordinary rollout folder, bit-identical
                                          to the unsharded rollout

``--policy-digest`` (the checkpoint digest the planner recorded) makes the stage refuse a
policy checkpoint whose files changed since the plan. With ``run.threads: 0`` a shard
uses ``cpu_count // N`` threads (N shards share the machine).
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch
from tqdm import tqdm

from tracerl.data import render_prompt
from tracerl.data.skips import SKIPPED_FILE, Skipped, skip_too_long
from tracerl.models import checkpoint_dir, weights_digest
from tracerl.pipeline.artifacts import folder_digest, sha256_file, stage_output
from tracerl.pipeline.resolve import curriculum_decision, policy_from_params, sampling_config
from tracerl.pipeline.stage_cli import load_stage_params, stage_argparser
from tracerl.sampling import generate_batches, plan_batches, trajectories_to_frame
from tracerl.sampling.shards import ShardInfo, merge_shards, parse_shard, shard_batches
from tracerl.schemas import read_parquet, write_parquet


class StalePolicy(RuntimeError):
    """The policy checkpoint on disk is not the one the rollout was planned from."""


def main(argv: list[str] | None = None) -> int:
    ap = stage_argparser("rollout")
    ap.add_argument("--tasks", type=Path, help="tasks parquet (default: <data>/train.parquet)")
    ap.add_argument("--policy", help="checkpoint folder or 'tiny' (default: --input policy, "
                                     "else model.init)")
    ap.add_argument("--seed", type=int, help="override run.seed")
    ap.add_argument("--shard", type=parse_shard, metavar="K/N",
                    help="decode only shard K of N (1-based) of the rollout's batches")
    ap.add_argument("--policy-digest", help="the planned checkpoint digest: refuse another")
    args = ap.parse_args(argv)
    inputs: dict[str, list[str]] = {}
    for item in args.input:
        name, sep, path = item.partition("=")
        if not (sep and name and path):
            ap.error(f"--input expects NAME=PATH, got {item!r}")
        inputs.setdefault(name, []).append(path)
    if len(inputs.get("policy", [])) > 1:
        ap.error("--input policy given more than once")
    p = load_stage_params(args.params, "rollout")
    if "shard" in inputs:
        if args.shard is not None:
            ap.error("--shard decodes one shard; --input shard=DIR merges shards: not both")
        return merge(p, args, [Path(d) for d in inputs["shard"]])
    return sample(p, args, {k: v[0] for k, v in inputs.items()}, ap)


@dataclass
class Plan:
    """What every shard of one rollout computes the same way."""

    prompts: list[list[int]]
    task_ids: list[str]
    sample_index: list[int]
    metrics: dict
    sampling: dict
    skipped: Skipped


def sample(p, args, inputs: dict[str, str], ap) -> int:
    r, it = p.rollout, args.iteration or 0
    seed = p.run.seed if args.seed is None else args.seed
    shard, shards = args.shard or (0, 1)
    threads = p.run.threads or (max(1, (os.cpu_count() or 1) // shards) if shards > 1 else 0)
    if threads:
        torch.set_num_threads(threads)

    # 1. The task pool of this iteration and the sampled tasks.
    tasks_path = args.tasks or (Path(inputs["data"]) / "train.parquet" if "data" in inputs else None)
    if tasks_path is None:
        ap.error("pass --tasks TASKS.parquet or --input data=PREPARE_DIR")
    tasks = read_parquet(tasks_path, "task")
    dec = curriculum_decision(p, Path(inputs["curriculum"]) if "curriculum" in inputs else None)
    pool = tasks.filter(~tasks["task_id"].is_in(list(dec.exclude)))
    leveled = pool.filter(pool["difficulty"].is_in(list(dec.levels)) | (pool["difficulty"] < 0))
    pool = leveled if leveled.height else pool  # no task at these levels: the whole pool
    if pool.height == 0:
        raise ValueError(f"{tasks_path}: no tasks left to sample (all retired?)")
    rng = random.Random(f"rollout:{seed}:{it}")
    rows = sorted(rng.sample(range(pool.height), min(r.tasks_per_iter, pool.height)))
    chosen = pool[rows]

    # 2. Policy (the planned checkpoint only) and prompts.
    source = args.policy or inputs.get("policy") or p.model.init
    digest = check_policy(source, args.policy_digest)
    model, tok = policy_from_params(source, p)
    cfg = sampling_config(p, dec)
    k = r.responses_per_task
    rendered = [render_prompt(tok, text) for text in chosen["prompt"].to_list()]
    chosen_ids = chosen["task_id"].to_list()
    # a prompt too long for the model is skipped and counted by task id, not fatal
    skipped = Skipped(reasons=("too_long",))
    keep = skip_too_long([len(x) for x in rendered], chosen_ids,
                         getattr(model.config, "max_position_embeddings", None),
                         [(cfg.block_size, cfg.max_tokens)], skipped)
    skipped.check(p.data.max_skip_fraction, f"rollout[{it}] of {tasks_path}")
    rendered, chosen_ids = [rendered[j] for j in keep], [chosen_ids[j] for j in keep]
    plan = Plan(
        prompts=[ids for ids in rendered for _ in range(k)],
        task_ids=[t for t in chosen_ids for _ in range(k)],
        sample_index=list(range(k)) * len(rendered),
        metrics={"num_tasks": len(rendered), "block_size": cfg.block_size,
                 "train_block_size": dec.schedule.train_block,
                 "steps_per_block": cfg.steps_per_block, "max_tokens": cfg.max_tokens,
                 "level": dec.level, **skipped.metrics()},
        sampling={**cfg.__dict__, "seed": seed, "iteration": it},
        skipped=skipped,
    )

    # 3. Sample: every batch of the plan, or this shard's (each sequence has its own seed,
    #    drawn from one generator in prompt order: tracerl.sampling.shards).
    batches = plan_batches(plan.prompts, cfg.batch_size)
    mine = shard_batches(len(batches), shards, shard)
    if args.shard and not mine:
        print(f"rollout[{it}] shard {shard + 1}/{shards}: no batch to decode (the rollout has "
              f"{len(batches)} batches of {cfg.batch_size}); it writes no rows", flush=True)
    todo = [i for j in mine for i in batches[j]]
    gen = torch.Generator().manual_seed(seed * 1_000_003 + it)
    t0 = time.perf_counter()
    desc = f"rollout[{it}]" + (f".shard{shard + 1}of{shards}" if args.shard else "")
    with tqdm(total=len(todo), desc=desc, unit="seq") as bar:
        done = generate_batches(model, plan.prompts, cfg, gen, mine, progress=bar.update,
                                compile=p.rollout.compile)
    seconds = time.perf_counter() - t0
    if not args.shard:  # prompt order (a shard keeps its batches' order: shard.json rows)
        todo = sorted(todo)
    trajs = [done[i] for i in todo]

    # 4. Write rollouts.parquet and metrics.
    pid = weights_digest(model)
    df = trajectories_to_frame(trajs, [plan.task_ids[i] for i in todo],
                               [plan.sample_index[i] for i in todo], pid, tok,
                               train_block_size=dec.schedule.train_block_size or None)
    with stage_output(args.out, stage="rollout") as o:
        write_parquet(df, o.dir / "rollouts.parquet", "rollout")
        plan.skipped.write(o.dir / SKIPPED_FILE)
        o.metrics.update({**rollout_metrics(df, seconds), **plan.metrics})
        o.info["sampling"] = plan.sampling
        if args.shard:
            info = ShardInfo(index=shard, shards=shards, num_prompts=len(plan.prompts),
                             num_batches=len(batches), batches=mine, rows=todo,
                             policy_digest=digest, policy_id=pid,
                             plan={"metrics": plan.metrics, "sampling": plan.sampling,
                                   "skipped_sha256": sha256_file(o.dir / SKIPPED_FILE)},
                             seconds=seconds)
            info.write(o.dir)
            o.metrics.update(shard=shard + 1, shards=shards, batches=len(mine))
    report(f"{desc}", o.metrics)
    return 0


def check_policy(source, expect: str | None) -> str:
    """The digest of the policy checkpoint's files on disk; :class:`StalePolicy` when it
    is not ``expect`` (the digest the planner recorded from the policy stage's manifest).
    ``""`` for the embedded ``tiny`` model (no files)."""
    if str(source) == "tiny":
        if expect:
            raise StalePolicy(f"--policy-digest {expect} given, but the policy is 'tiny'")
        return ""
    folder = checkpoint_dir(source)
    found = folder_digest(folder)
    if expect and found != expect:
        raise StalePolicy(
            f"policy checkpoint {folder} has digest {found}, but this rollout was planned from "
            f"{expect}: the checkpoint changed after the plan (rewritten or replaced); re-run "
            "the flow so it plans from the checkpoint that is there now")
    return found


def merge(p, args, shard_dirs: list[Path]) -> int:
    """The ordinary rollout folder from the shards' folders (bit-identical rows)."""
    parts = [(ShardInfo.read(d), read_parquet(d / "rollouts.parquet", "rollout"))
             for d in shard_dirs]
    df = merge_shards(parts, args.policy_digest)
    first_info, first_dir = min(zip([i for i, _ in parts], shard_dirs), key=lambda x: x[0].index)
    skipped = {sha256_file(d / SKIPPED_FILE) for d in shard_dirs}
    if skipped != {first_info.plan["skipped_sha256"]}:
        raise ValueError(f"the shards' {SKIPPED_FILE} differ from what shard.json records")
    seconds = max(i.seconds for i, _ in parts)  # the shards ran side by side
    it = args.iteration or 0
    with stage_output(args.out, stage="rollout") as o:
        write_parquet(df, o.dir / "rollouts.parquet", "rollout")
        shutil.copyfile(first_dir / SKIPPED_FILE, o.dir / SKIPPED_FILE)
        o.metrics.update({**rollout_metrics(df, seconds), **first_info.plan["metrics"],
                          "shards": first_info.shards,
                          "shard_seconds": [i.seconds for i, _ in sorted(
                              parts, key=lambda x: x[0].index)]})
        o.info["sampling"] = first_info.plan["sampling"]
    report(f"rollout[{it}] ({first_info.shards} shards merged)", o.metrics)
    return 0


def rollout_metrics(df: pl.DataFrame, seconds: float) -> dict:
    """The rollout's metrics from its rows (``seconds``: the decoding wall time)."""
    n = max(df.height, 1)
    lens = df["response_len"].to_list()
    decoded = sum(df["response_ids"].list.len().to_list())
    finish = df["finish_reason"].to_list()
    return {
        "num_responses": df.height,
        "response_length": sum(lens) / n,
        "tokens_per_s": decoded / max(seconds, 1e-9),
        "forward_per_token": sum(df["num_forward"].to_list()) / max(decoded, 1),
        "finish_eos": sum(f == "eos" for f in finish) / n,
        "finish_length": sum(f == "length" for f in finish) / n,
        "seconds": seconds,
    }


def report(what: str, m: dict) -> None:
    print(f"{what}: {m['num_responses']} responses, mean length "
          f"{m['response_length']:.1f}, {m['tokens_per_s']:.0f} tok/s, eos {m['finish_eos']:.2f}")


if __name__ == "__main__":
    sys.exit(main())

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
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from tracerl.data import render_prompt
from tracerl.data.skips import SKIPPED_FILE, Skipped, skip_too_long
from tracerl.models import weights_digest
from tracerl.pipeline.artifacts import stage_output
from tracerl.pipeline.resolve import curriculum_decision, policy_from_params, sampling_config
from tracerl.pipeline.stage_cli import load_stage_params, stage_argparser
from tracerl.sampling import generate, trajectories_to_frame
from tracerl.schemas import read_parquet, write_parquet


def main(argv: list[str] | None = None) -> int:
    ap = stage_argparser("rollout")
    ap.add_argument("--tasks", type=Path, help="tasks parquet (default: <data>/train.parquet)")
    ap.add_argument("--policy", help="checkpoint folder or 'tiny' (default: --input policy, "
                                     "else model.init)")
    ap.add_argument("--seed", type=int, help="override run.seed")
    args = ap.parse_args(argv)
    inputs = {}
    for item in args.input:
        name, sep, path = item.partition("=")
        if not (sep and name and path):
            ap.error(f"--input expects NAME=PATH, got {item!r}")
        inputs[name] = path
    p = load_stage_params(args.params, "rollout")
    r, it = p.rollout, args.iteration or 0
    seed = p.run.seed if args.seed is None else args.seed
    if p.run.threads:
        torch.set_num_threads(p.run.threads)

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

    # 2. Policy and prompts.
    model, tok = policy_from_params(args.policy or inputs.get("policy") or p.model.init, p)
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
    prompts = [ids for ids in rendered for _ in range(k)]
    task_ids = [t for t in chosen_ids for _ in range(k)]

    # 3. Sample.
    gen = torch.Generator().manual_seed(seed * 1_000_003 + it)
    t0 = time.perf_counter()
    with tqdm(total=len(prompts), desc=f"rollout[{it}]", unit="seq") as bar:
        trajs = generate(model, prompts, cfg, gen, progress=bar.update, compile=r.compile)
    seconds = time.perf_counter() - t0

    # 4. Write rollouts.parquet and metrics.
    df = trajectories_to_frame(trajs, task_ids, list(range(k)) * len(rendered),
                               weights_digest(model), tok,
                               train_block_size=dec.schedule.train_block_size or None)
    decoded = sum(len(t.response_ids) for t in trajs)
    with stage_output(args.out, stage="rollout") as o:
        write_parquet(df, o.dir / "rollouts.parquet", "rollout")
        skipped.write(o.dir / SKIPPED_FILE)
        o.metrics.update({
            "num_tasks": len(rendered),
            "num_responses": len(trajs),
            "response_length": sum(t.response_len for t in trajs) / len(trajs),
            "tokens_per_s": decoded / max(seconds, 1e-9),
            "forward_per_token": sum(t.num_forward for t in trajs) / max(decoded, 1),
            "finish_eos": sum(t.finish_reason == "eos" for t in trajs) / len(trajs),
            "finish_length": sum(t.finish_reason == "length" for t in trajs) / len(trajs),
            "seconds": seconds,
            "block_size": cfg.block_size,
            "train_block_size": dec.schedule.train_block,
            "steps_per_block": cfg.steps_per_block,
            "max_tokens": cfg.max_tokens,
            "level": dec.level,
            **skipped.metrics(),
        })
        o.info["sampling"] = {**cfg.__dict__, "seed": seed, "iteration": it}
    m = o.metrics
    print(f"rollout[{it}]: {m['num_responses']} responses, mean length "
          f"{m['response_length']:.1f}, {m['tokens_per_s']:.0f} tok/s, eos {m['finish_eos']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""SFT stage: supervised fine-tuning of the initial policy (block, trace or random-masking SFT).

    python -m stages.sft --params params.yaml --data SFT.parquet|PREPARE_DIR --out DIR

(or the flow's ``--input data=PREPARE_DIR``). Reads ``params.model`` and ``params.sft``.
The initial model is the embedded default built from ``model.*`` sizes (seeded by
``run.seed``) when ``model.init == "tiny"``, else the checkpoint ``model.init``.
SFT data: a parquet (or a folder holding ``sft.parquet``) with ``prompt_ids`` +
``response_ids`` (response ending with EOS; optional ``decode_steps`` for trace SFT), or
text ``prompt`` + ``response``/``reference_solution``. Writes ``checkpoint/``,
``trainer_state/`` and metrics. With ``sft.ranks`` > 1 the runners start it through
torchrun: every rank reads the data and runs its share of each optimizer step, rank 0
writes (mid-run checkpoints: every rank saves its DeepSpeed partition). With
``sft.lora.rank > 0`` only LoRA adapters train, ``checkpoint/`` holds the merged weights
and ``adapter/`` the adapter (peft's layout). With ``sft.val_every`` > 0 (needs the prepare
folder as data) the model is scored every so many steps on ``sft.val_tasks``
tasks of its ``train.parquet`` (greedy, graded like the reward stage grades), logged as
``sft.val_accuracy``; ``sft.stop_at`` ends the run when it is reached.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import polars as pl
import torch

from tracerl.distributed import stage_ranks
from tracerl.limits import is_hub_id
from tracerl.models.lora import apply_lora, parameter_report, save_trained
from tracerl.pipeline.artifacts import sha256_file
from tracerl.pipeline.layout import fingerprint
from tracerl.pipeline.resolve import device_and_dtype, policy_from_params
from tracerl.pipeline.stage_cli import (
    bind_inputs,
    load_stage_params,
    rank_output,
    rank_tracker,
    stage_argparser,
)
from tracerl.rewards.scoring import grading_options
from tracerl.rl import (
    SFTCheckpoints,
    SFTConfig,
    TokenScorer,
    TrainConfig,
    Trainer,
    per_rank,
    pick,
    read_sft_samples,
    sft_train,
)
from tracerl.tracking import stage_run, step_logger


def parse_args(argv):
    ap = stage_argparser("sft")
    ap.add_argument("--data", type=Path, default=None)
    ns = bind_inputs(ap.parse_args(argv))
    if ns.data is None:
        ap.error("--data (or --input data=PREPARE_DIR) is required")
    return ns


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    params = load_stage_params(a.params, "sft")
    device, _ = device_and_dtype(params)
    with stage_ranks(device, zero_stage=params.sft.zero_stage) as ranks:
        return _train(a, params, ranks)


def validation_frame(pool: pl.DataFrame, n: int, pick: str, seed: int) -> pl.DataFrame:
    """The validation tasks: the pool's first ``n`` (``pick`` "first") or a ``seed`` sample
    of ``n`` without replacement ("sample"); the whole pool when it has fewer."""
    n = min(n, pool.height)
    return pool.head(n) if pick == "first" else pool.sample(n, seed=seed)


def validator(data: Path, params, model, tok, tracker, grading: dict):
    """``validate(step) -> accuracy``: greedy static decoding (one token per step) of
    ``sft.val_tasks`` tasks of the RL pool (its first ones, or a ``run.seed`` sample with
    ``sft.val_pick: sample``), graded as the reward stage grades; or None when
    ``sft.val_every`` is 0."""
    s = params.sft
    if not s.val_every:
        return None
    from tracerl.data.records import tasks_from_frame
    from tracerl.evaluation import evaluate_tasks
    from tracerl.rewards.scoring import score_rollouts
    from tracerl.sampling import SamplingConfig
    from tracerl.schemas import read_parquet

    pool = data / "train.parquet"
    if not pool.is_file():
        raise SystemExit(f"sft.val_every needs the prepare folder as data (its train.parquet "
                         f"holds the validation tasks); {data} has no train.parquet")
    tasks = tasks_from_frame(validation_frame(read_parquet(pool, "task"), s.val_tasks,
                                              s.val_pick, params.run.seed))
    by_id = {t.task_id: t for t in tasks}
    b = model.block_size or params.model.block_size  # full attention: the decoding block
    cfg = SamplingConfig(block_size=b, steps_per_block=b,
                         max_tokens=s.val_max_tokens, temperature=0.0)

    def validate(step: int) -> float:
        was = model.training
        model.eval()
        try:
            res, _ = evaluate_tasks(model, tok, tasks, cfg, k=1, pass_ks=[1],
                                    score=lambda f: score_rollouts(
                                        f, by_id, group_filter="none",
                                        **grading)[0],
                                    seed=params.run.seed)
        finally:
            model.train(was)
        tracker.log_metrics({"sft.val_accuracy": res["accuracy"]}, step=step)
        return res["accuracy"]

    return validate


def _train(a, params, ranks) -> int:
    s, m = params.sft, params.model
    torch.manual_seed(s.seed)
    model, tok = policy_from_params(m.init, params, cached=False)  # trained: not the cache
    model = model.to(ranks.device(model.device))  # CUDA: this rank's GPU
    lora = s.lora.spec()
    if lora.enabled:  # only the adapters train (and hold optimizer state)
        apply_lora(model, lora, "sft.lora")
    # full attention: responses EOS-filled to the sampler's canvas (read_sft_samples); the
    # declared reads are read whatever the model and the validation (the key covers them)
    canvas, grading = params.rollout.max_tokens, grading_options(params.reward)
    fill = canvas if model.family.attention == "full" else None
    samples = read_sft_samples(a.data, tok, eos_id=model.tokens.eos_id, pad_id=model.tokens.pad_id,
                               block_size=model.block_size, fill_to=fill)
    # batch_size examples per step: grad_accum micro-batches, split across the ranks
    cfg = pick(TrainConfig, s, micro_batch=s.batch_size // s.grad_accum, total_steps=max(s.steps, 1))
    trainer = Trainer(TokenScorer(model), per_rank(cfg, ranks.world), kind="sft")
    # mid-run checkpoints beside the output, valid only for these params and this data
    data_file = a.data / "sft.parquet" if a.data.is_dir() else a.data
    ckpts = SFTCheckpoints(a.out.parent / f".{a.out.name}.resume", fingerprint(
        [dataclasses.asdict(s), dataclasses.asdict(m), fill, params.run.seed,
         sha256_file(data_file)]))
    resume = ckpts.restore(trainer)
    if resume is not None and ranks.main:
        print(f"sft: resuming at step {resume.done} of {s.steps} from {ckpts.folder}")
    with stage_run("sft", rank_tracker(ranks)) as tracker:
        trainer.step_hooks.append(step_logger(tracker))  # per-step curves
        metrics = sft_train(trainer, samples, pick(SFTConfig, s, decode_block=m.block_size),
                            s.steps, progress=ranks.main,
                            resume=resume, checkpoint_every=s.checkpoint_every,
                            on_checkpoint=lambda state: ckpts.save(trainer, state),
                            validate=validator(a.data, params, model, tok, tracker, grading),
                            validate_every=s.val_every, stop_at=s.stop_at)
    with rank_output(a.out, stage="sft", ranks=ranks) as o:
        o.metrics.update(parameter_report(trainer.module, trainer.optimizer))
        with trainer.gathered():  # ZeRO-3: full weights on every rank (collective)
            if o.main:  # merged weights in checkpoint/ (+ adapter/ with LoRA)
                save_trained(model, tok, o.dir, lora,
                             base_model=m.init if is_hub_id(m.init) else None)
        trainer.save(o.dir / "trainer_state")  # every rank: DeepSpeed saves its partition
        o.metrics.update(metrics)
        o.metrics.update(examples=float(len(samples)), ranks=float(ranks.world))
    ckpts.clear(trainer)
    if not ranks.main:
        return 0
    val = (f", validation {metrics['val_accuracy']:.3f} at step {metrics['val_step']:.0f}"
           + (" (stopped: sft.stop_at reached)" if metrics["stopped_early"] else "")
           if "val_accuracy" in metrics else "")
    print(f"sft: {metrics.get('steps', 0):.0f} of {s.steps} steps, "
          f"nll={metrics.get('nll', float('nan')):.4f}, "
          f"tokens/s={metrics.get('tokens_per_s', 0):.0f}{val}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

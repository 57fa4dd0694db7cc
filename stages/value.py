"""Value stage: token advantages by GAE over decode steps, then the value-model update.

    python -m stages.value --params params.yaml --value CKPT_DIR|none --policy CKPT_DIR
        --scored SCORED.parquet --out DIR [--iteration I]

(or the flow's ``--input policy=DIR --input scored=DIR [--input value=DIR]``). Reads
``params.model`` and ``params.value`` (the block size comes from the scored records).
Without a value checkpoint the value model starts
from the policy's backbone with a zero head (spec 6.1). Advantages use the pre-update
values (spec 6.5); the value model trains every ``value.train_every`` iterations. Writes
``checkpoint/`` (value model), ``trainer_state/``, ``advantages.parquet`` (per-token
advantages and returns for the policy stage) and metrics. With ``value.ranks`` > 1 the
runners start it through torchrun: every rank reads the inputs and runs its share of each
optimizer step, rank 0 writes. With ``value.lora.rank > 0`` fresh LoRA adapters train on
the backbone (the head in full), are merged into ``checkpoint/`` and written alone to
``adapter/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tracerl.distributed import stage_ranks
from tracerl.models import ValueModel, load_model, load_tokenizer
from tracerl.models.lora import apply_lora, has_lora, merge_lora, parameter_report, save_adapter
from tracerl.pipeline.resolve import device_and_dtype
from tracerl.pipeline.stage_cli import (
    bind_inputs,
    load_stage_params,
    rank_output,
    rank_tracker,
    stage_argparser,
)
from tracerl.rl import (
    TrainConfig,
    Trainer,
    ValueConfig,
    ValueScorer,
    checkpoint_dir,
    per_rank,
    pick,
    read_scored,
    trainer_state_dir,
    value_update,
    write_token_advantages,
)
from tracerl.tracking import stage_run, step_logger


def parse_args(argv):
    ap = stage_argparser("value")
    for flag in ("--value", "--policy", "--scored"):
        ap.add_argument(flag, default=None)
    ns = bind_inputs(ap.parse_args(argv), convert=str)  # --value may be "none"
    if ns.policy is None or ns.scored is None:
        ap.error("--policy and --scored (or --input policy=... --input scored=...) are required")
    return ns


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    params = load_stage_params(a.params, "value")
    device, dtype = device_and_dtype(params)
    with stage_ranks(device, zero_stage=params.value.zero_stage) as ranks:
        return _update(a, params, ranks, ranks.device(device), dtype)


def _update(a, params, ranks, device, dtype) -> int:
    v, m = params.value, params.model
    torch.manual_seed(v.seed + (a.iteration or 0))
    if a.value in (None, "none", ""):
        # no block size from params: the update trains at the block size of the records
        policy, tok = load_model(checkpoint_dir(a.policy), family=m.family, dtype=dtype,
                                 device=device)
        vm, state = ValueModel(policy), None  # the policy's backbone, a zero head
    else:
        vm = ValueModel.load(checkpoint_dir(a.value), dtype=dtype, device=device)
        state = trainer_state_dir(a.value)
        tok = load_tokenizer(checkpoint_dir(a.value))
    lora = v.lora.spec()
    if lora.enabled:  # fresh adapters on the backbone; the head stays fully trainable
        apply_lora(vm.lm, lora, "value.lora")
    # params' grad_accum: micro-batches of the whole step, split across the ranks
    trainer = Trainer(ValueScorer(vm), per_rank(pick(TrainConfig, v), ranks.world), kind="value")
    # with LoRA the saved moments belong to the previous (merged) adapters: not restored
    resumed = (trainer.load(state, restore_optimizer=not lora.enabled) if state is not None
               else False)
    scored = Path(a.scored)
    samples, keys, counts = read_scored(scored / "scored.parquet" if scored.is_dir() else scored)
    train = (a.iteration or 0) % v.train_every == 0
    with stage_run("value", rank_tracker(ranks), iteration=a.iteration) as tracker:
        trainer.step_hooks.append(step_logger(tracker))  # per-step curves
        advs, rets, metrics = value_update(trainer, samples, pick(ValueConfig, v), train=train,
                                           progress=ranks.main)
    with rank_output(a.out, stage="value", ranks=ranks) as o:
        o.metrics.update(parameter_report(trainer.module, trainer.optimizer))
        with trainer.gathered():  # ZeRO-3: full weights on every rank (collective)
            if has_lora(vm.lm):  # the adapter alone, then the merged backbone (every rank)
                if o.main:
                    save_adapter(vm.lm, o.dir / "adapter", lora)
                merge_lora(vm.lm)
            if o.main:
                vm.save(o.dir / "checkpoint", tok)
        trainer.save(o.dir / "trainer_state")  # every rank: DeepSpeed saves its partition
        if o.main:
            write_token_advantages(o.dir / "advantages.parquet", keys, advs, rets)
        o.metrics.update(counts)
        o.metrics.update(metrics)
        o.metrics.update(trained=float(train), resumed=float(resumed), ranks=float(ranks.world))
    if not ranks.main:
        return 0
    print(f"value: loss={metrics.get('value_loss', float('nan')):.4f} "
          f"explained_var={metrics.get('explained_var', float('nan')):.3f} trained={train}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

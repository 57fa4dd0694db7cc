"""Policy stage: one TraceRL update of the policy on an iteration's scored rollouts.

    python -m stages.policy --params params.yaml --policy CKPT_DIR --scored SCORED.parquet
        [--value-advantages ADV.parquet] [--reference CKPT_DIR] --out DIR [--iteration I]

(or the flow's ``--input policy=DIR --input scored=DIR [--input value=DIR]
[--input reference=DIR]``). Reads ``params.model`` and ``params.policy``; the block size
comes from the scored records (what the rollout decoded with), not from params. Resumes the
optimizer, LR schedule, counters and RNG saved next to the input policy (when they are a
policy trainer's), and writes ``checkpoint/`` (the updated policy), ``trainer_state/`` and
the update's metrics. With ``policy.ranks`` > 1 the runners start it through torchrun:
every rank reads the inputs and runs its share of each optimizer step, rank 0 writes.
With ``policy.lora.rank > 0`` the update trains LoRA adapters on the frozen reference
weights (``--reference``, the flow's SFT model): the first update puts fresh adapters on
it, each later one loads the previous update's ``adapter/`` back onto it and trains on
(optimizer moments, schedule, counters and RNG all carried over). It writes the merged
policy to ``checkpoint/`` and the adapter to ``adapter/``. The KL reference is then the
model with its adapters switched off: no second copy of the weights. An input policy
that is neither (a full checkpoint other than the reference) gets fresh adapters on its
own weights, without its previous moments.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tracerl.distributed import stage_ranks
from tracerl.models import load_model
from tracerl.models.lora import load_adapted, parameter_report, save_trained
from tracerl.pipeline.resolve import device_and_dtype
from tracerl.pipeline.stage_cli import (
    bind_inputs,
    load_stage_params,
    rank_output,
    rank_tracker,
    stage_argparser,
)
from tracerl.rl import (
    PolicyConfig,
    TokenScorer,
    TrainConfig,
    Trainer,
    checkpoint_dir,
    per_rank,
    pick,
    policy_update,
    read_scored,
    read_token_advantages,
    trainer_state_dir,
)
from tracerl.tracking import stage_run, step_logger


def parse_args(argv):
    ap = stage_argparser("policy")
    for flag in ("--policy", "--scored", "--value-advantages", "--reference"):
        ap.add_argument(flag, type=Path, default=None)
    ns = bind_inputs(ap.parse_args(argv), {"value": "value_advantages"})
    if ns.policy is None or ns.scored is None:
        ap.error("--policy and --scored (or --input policy=... --input scored=...) are required")
    return ns


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    params = load_stage_params(a.params, "policy")
    device, dtype = device_and_dtype(params)
    with stage_ranks(device, zero_stage=params.policy.zero_stage) as ranks:
        return _update(a, params, ranks, ranks.device(device), dtype)


def _update(a, params, ranks, device, dtype) -> int:
    p, m = params.policy, params.model
    torch.manual_seed(p.seed + (a.iteration or 0))
    # no block size from params: the update trains at the block size of the records
    load_kw = dict(family=m.family, dtype=dtype, device=device)
    lora, adapted = p.lora.spec(), None
    if lora.enabled:  # adapters on the reference's weights (or, failing that, the policy's)
        adapted = load_adapted(a.policy, a.reference, lora, "policy.lora", **load_kw)
        model, tok = adapted.model, adapted.tokenizer
    else:
        model, tok = load_model(checkpoint_dir(a.policy), **load_kw)
    # params' grad_accum: micro-batches of the whole step, split across the ranks
    trainer = Trainer(TokenScorer(model), per_rank(pick(TrainConfig, p), ranks.world),
                      kind="policy")
    # fresh adapters: the saved moments belong to other (merged) adapters, not restored
    resumed = trainer.load(trainer_state_dir(a.policy),
                           restore_optimizer=adapted is None or adapted.continued)
    adv = None
    if p.use_value:
        if a.value_advantages is None:
            raise ValueError("policy.use_value is set: pass --value-advantages (value stage output)")
        f = a.value_advantages
        adv = read_token_advantages(f / "advantages.parquet" if f.is_dir() else f)
    scored = a.scored / "scored.parquet" if a.scored.is_dir() else a.scored
    samples, _, counts = read_scored(scored, token_advantages=adv)
    ref, ref_off = None, adapted is not None and adapted.base_is_reference
    if p.beta > 0 and p.kl_target == "reference" and not ref_off:
        if a.reference is None:
            raise ValueError("policy.kl_target 'reference' with beta > 0 needs --reference CKPT")
        ref = load_model(checkpoint_dir(a.reference), **load_kw)[0]
    with stage_run("policy", rank_tracker(ranks), iteration=a.iteration) as tracker:
        trainer.step_hooks.append(step_logger(tracker))  # per-step curves
        metrics = policy_update(trainer, samples, pick(PolicyConfig, p), ref_model=ref,
                                ref_adapters_off=ref_off, progress=ranks.main)
    with rank_output(a.out, stage="policy", ranks=ranks) as o:
        o.metrics.update(parameter_report(trainer.module, trainer.optimizer))
        if adapted is not None:
            o.metrics.update({"lora/continued": float(adapted.continued),
                              "lora/base_is_reference": float(adapted.base_is_reference)})
        with trainer.gathered():  # ZeRO-3: full weights on every rank (collective)
            if o.main:  # merged weights (+ adapter/ with LoRA)
                save_trained(model, tok, o.dir, lora,
                             base_digest=adapted.base_digest if adapted else None)
        trainer.save(o.dir / "trainer_state")  # every rank: DeepSpeed saves its partition
        o.metrics.update(counts)
        o.metrics.update(metrics)
        o.metrics.update(resumed=float(resumed), ranks=float(ranks.world),
                         **{f"trainer/{k}": float(v) for k, v in trainer.counters.items()})
    if not ranks.main:
        return 0
    print(f"policy: loss={metrics.get('loss', float('nan')):.4f} "
          f"steps={metrics.get('steps', 0):.0f} tokens/s={metrics.get('tokens_per_s', 0):.0f} "
          f"empty={metrics['empty_batch']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Policy stage: one TraceRL update of the policy on an iteration's scored rollouts.

    python -m stages.policy --params params.yaml --policy CKPT_DIR --scored SCORED.parquet
        [--value-advantages ADV.parquet] [--reference CKPT_DIR] --out DIR [--iteration I]

(or the flow's ``--input policy=DIR --input scored=DIR [--input value=DIR]
[--input reference=DIR]``). Reads ``params.model`` and ``params.policy``; the block size
comes from the scored records (what the rollout decoded with), not from params. Resumes the
optimizer, LR schedule, counters and RNG saved next to the input policy (when they are a
policy trainer's), and writes ``checkpoint/`` (the updated policy), ``trainer_state/`` and
the update's metrics. With ``policy.lora.rank > 0`` the update trains fresh LoRA adapters
on the input policy, writes the merged policy to ``checkpoint/`` and this update's adapter
to ``adapter/``; the optimizer's moments are not carried over (the previous adapters are
merged), the schedule, counters and RNG are.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tracerl.models import load_model
from tracerl.models.lora import apply_lora, parameter_report, save_trained
from tracerl.pipeline.artifacts import stage_output
from tracerl.pipeline.resolve import device_and_dtype
from tracerl.pipeline.stage_cli import bind_inputs, load_stage_params, stage_argparser
from tracerl.rl import (
    PolicyConfig,
    TokenScorer,
    TrainConfig,
    Trainer,
    checkpoint_dir,
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
    p, m = params.policy, params.model
    device, dtype = device_and_dtype(params)
    torch.manual_seed(p.seed + (a.iteration or 0))
    # no block size from params: the update trains at the block size of the records
    model, tok = load_model(checkpoint_dir(a.policy), family=m.family, dtype=dtype, device=device)
    lora = p.lora.spec()
    if lora.enabled:  # fresh adapters (B = 0) on the input policy's merged weights
        apply_lora(model, lora, "policy.lora")
    trainer = Trainer(TokenScorer(model), pick(TrainConfig, p), kind="policy")
    # with LoRA the saved moments belong to the previous (merged) adapters: not restored
    resumed = trainer.load(trainer_state_dir(a.policy), restore_optimizer=not lora.enabled)
    adv = None
    if p.use_value:
        if a.value_advantages is None:
            raise ValueError("policy.use_value is set: pass --value-advantages (value stage output)")
        f = a.value_advantages
        adv = read_token_advantages(f / "advantages.parquet" if f.is_dir() else f)
    scored = a.scored / "scored.parquet" if a.scored.is_dir() else a.scored
    samples, _, counts = read_scored(scored, token_advantages=adv)
    ref = None
    if p.beta > 0 and p.kl_target == "reference":
        if a.reference is None:
            raise ValueError("policy.kl_target 'reference' with beta > 0 needs --reference CKPT")
        ref = load_model(checkpoint_dir(a.reference), family=m.family, dtype=dtype,
                         device=device)[0]
    with stage_run("policy", iteration=a.iteration) as tracker:  # per-step curves
        trainer.step_hooks.append(step_logger(tracker))
        metrics = policy_update(trainer, samples, pick(PolicyConfig, p), ref_model=ref,
                                progress=True)
    with stage_output(a.out, stage="policy") as o:
        o.metrics.update(parameter_report(trainer.module, trainer.optimizer))
        save_trained(model, tok, o.dir, lora)  # merged weights (+ adapter/ with LoRA)
        trainer.save(o.dir / "trainer_state")
        o.metrics.update(counts)
        o.metrics.update(metrics)
        o.metrics.update(resumed=float(resumed), **{f"trainer/{k}": float(v)
                                                     for k, v in trainer.counters.items()})
    print(f"policy: loss={metrics.get('loss', float('nan')):.4f} "
          f"steps={metrics.get('steps', 0):.0f} tokens/s={metrics.get('tokens_per_s', 0):.0f} "
          f"empty={metrics['empty_batch']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

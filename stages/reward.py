"""Reward stage: rollouts.parquet + tasks.parquet -> scored.parquet (+ metrics).

    python -m stages.reward --params params.yaml --out DIR
        (--input rollout=ROLLOUT_DIR | --rollouts R.parquet) (--input data=PREPARE_DIR | --tasks T.parquet)

Reads ``params.reward``; the library (:func:`tracerl.rewards.score_rollouts`) computes.
With ``reward.process_reward`` on, the LLM judge's per-token rewards fill
``token_rewards`` (decoded with the policy's tokenizer, ``model.init``). Writes the
trajectory viewer ``trajectory.html``: a few tasks with their gold answers and every
response's decode order, reward and correctness (:mod:`tracerl.pipeline.viewer`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tracerl.data import tasks_from_frame
from tracerl.pipeline.artifacts import stage_output
from tracerl.pipeline.stage_cli import load_stage_params, stage_argparser
from tracerl.pipeline.viewer import scored_viewer
from tracerl.rewards import grading_options, score_rollouts
from tracerl.rewards.process import build_judge
from tracerl.schemas import read_parquet, write_parquet


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = stage_argparser("reward")
    ap.add_argument("--rollouts", type=Path, help="rollouts.parquet (default: <rollout>/rollouts.parquet)")
    ap.add_argument("--tasks", type=Path, help="tasks.parquet (default: <data>/train.parquet)")
    ns = ap.parse_args(argv)
    inputs = dict(item.partition("=")[::2] for item in ns.input)
    if ns.rollouts is None and "rollout" in inputs:
        ns.rollouts = Path(inputs["rollout"]) / "rollouts.parquet"
    if ns.tasks is None and "data" in inputs:
        ns.tasks = Path(inputs["data"]) / "train.parquet"
    if ns.rollouts is None or ns.tasks is None:
        ap.error("pass --rollouts and --tasks, or --input rollout=DIR --input data=DIR")
    return ns


def _policy_tokenizer(init: str):
    """The policy's tokenizer (the embedded one for ``tiny``)."""
    from tracerl.models import build_default_tokenizer, checkpoint_dir
    from tracerl.models.model import load_tokenizer

    return build_default_tokenizer() if init == "tiny" else load_tokenizer(checkpoint_dir(init))


def _policy_decoder(init: str):
    """ids -> text with the policy's tokenizer."""
    tok = _policy_tokenizer(init)
    return lambda ids: tok.decode(list(ids), skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = load_stage_params(args.params, "reward")
    p = params.reward
    rollouts = read_parquet(args.rollouts, "rollout")
    tasks = {t.task_id: t for t in tasks_from_frame(read_parquet(args.tasks, "task"))}
    judge = decode = None
    # the judge's settings are part of this stage's key whether or not a judge runs; they
    # are resolved (and a missing device refused) only when one does
    init, device, dtype = params.model.init, params.run.device, params.model.dtype
    if p.process_reward != "none":
        from tracerl.devices import resolve_device, resolve_dtype

        device = resolve_device(device)
        judge = build_judge(p.process_reward, p.process_judge, k_sample=p.process_k_sample,
                            device=device, dtype=resolve_dtype(dtype, device))
        decode = _policy_decoder(init)
    scored, metrics = score_rollouts(
        rollouts, tasks,
        estimator=p.advantage, group_filter=p.group_filter,
        filter_low=p.filter_low, filter_high=p.filter_high,
        **grading_options(p), judge=judge, decode=decode, process_chunk_len=p.process_chunk_len,
    )
    with stage_output(args.out, stage="reward") as o:
        write_parquet(scored, o.dir / "scored.parquet", "scored")
        answers = {t.task_id: t.answer for t in tasks.values()}
        (o.dir / "trajectory.html").write_text(scored_viewer(
            scored, answers, _policy_tokenizer(params.model.init),
            title=f"iteration {args.iteration or 0}"))
        o.metrics.update(metrics)
    print(f"reward: accuracy={metrics['accuracy']:.3f} responses={metrics['num_responses']} "
          f"kept={metrics['kept_responses']} filtered_groups={metrics['filtered_groups']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

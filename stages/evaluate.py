"""Stage ``evaluate``: held-out benchmarks of a policy, static and dynamic decoding.

    python -m stages.evaluate --params params.yaml --out DIR [--iteration I]
        --input data=PREPARE_DIR --input policy=CHECKPOINT_OR_STAGE_DIR [--input curriculum=DIR]

Reads ``params.evaluate`` (benchmarks, k, pass@k, strategies, temperature) with the block
size, steps and budget of ``model``/``rollout`` (or the curriculum's schedule at this
iteration). Writes ``eval.json`` (every score next to its full decoding config),
``samples_<benchmark>_<strategy>.parquet`` (scored responses) and metrics: ``accuracy``
(held-out avg@k of the first strategy, the headline) and ``<benchmark>.<strategy>.<metric>``.
"""

from __future__ import annotations

import json
import sys

from tracerl.config import load_params
from tracerl.data import humaneval_tasks, tasks_from_frame
from tracerl.evaluation import evaluate_tasks
from tracerl.models import weights_digest
from tracerl.pipeline.artifacts import stage_output
from tracerl.pipeline.resolve import curriculum_decision, policy_from_params
from tracerl.pipeline.stage_cli import parse_stage_args
from tracerl.rewards.sandbox import limits_from
from tracerl.rewards.scoring import score_rollouts
from tracerl.sampling import SamplingConfig
from tracerl.schemas import read_parquet, write_parquet


def main(argv: list[str] | None = None) -> int:
    a = parse_stage_args(argv, "evaluate")
    p = load_params(a.params)
    e, r = p.evaluate, p.rollout
    dec = curriculum_decision(p, a.input("curriculum"))
    model, tok = policy_from_params(a.input("policy") or p.model.init, p)
    suites = {}
    if "heldout" in e.benchmarks:
        held = read_parquet(a.require("data") / "heldout.parquet", "task")
        suites["heldout"] = tasks_from_frame(held.head(e.heldout_size))
    if "humaneval" in e.benchmarks:
        suites["humaneval"] = humaneval_tasks()

    def score(frame, tasks):
        by_id = {t.task_id: t for t in tasks}
        scored, _ = score_rollouts(frame, by_id, group_filter="none",
                                   overlong_is_wrong=p.reward.overlong_is_wrong,
                                   verify_timeout_s=p.reward.verify_timeout_s,
                                   code_limits=limits_from(p.reward.code_timeout_s,
                                                           p.reward.code_memory_mb),
                                   code_workers=p.reward.code_workers,
                                   code_allow_unsandboxed=p.reward.unsafe_allow_unsandboxed_code)
        return scored

    results: dict = {}
    pid = weights_digest(model)
    with stage_output(a.out, stage="evaluate") as o:
        for name, tasks in suites.items():
            for strategy in e.strategies:
                b = dec.schedule.block_size
                cfg = SamplingConfig(
                    block_size=b, steps_per_block=min(r.steps_per_block, b),
                    max_tokens=dec.schedule.max_tokens, strategy=strategy,
                    dynamic_threshold=r.dynamic_threshold, entropy_bound=r.entropy_bound,
                    temperature=e.temperature, top_k=e.top_k, top_p=e.top_p,
                    batch_size=r.batch_size)
                res, scored = evaluate_tasks(
                    model, tok, tasks, cfg, k=e.responses_per_task, pass_ks=e.pass_k,
                    score=lambda f, t=tasks: score(f, t), seed=p.run.seed, policy_id=pid)
                results.setdefault(name, {})[strategy] = res
                write_parquet(scored, o.dir / f"samples_{name}_{strategy}.parquet", "scored")
                for key, val in res.items():
                    if isinstance(val, (int, float)):
                        o.metrics[f"{name}.{strategy}.{key}"] = float(val)
                print(f"evaluate[{name}/{strategy}]: avg@{e.responses_per_task} "
                      f"{res['accuracy']:.3f} over {int(res['tasks'])} tasks")
        first = next(iter(results))
        o.metrics["accuracy"] = results[first][e.strategies[0]]["accuracy"]
        (o.dir / "eval.json").write_text(json.dumps(
            {"policy_id": pid, "iteration": a.iteration, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())


"""The Prefect flow ``tracerl`` with the REAL stages on a tiny model: 2 RL iterations
in-process (value model on), a real Prefect flow run, a real MLflow SQLite backend.

Checks every artifact (schemas, checkpoints, manifests, the trajectory viewer), one MLflow
child run per stage call under one parent, per-iteration metrics, and the registered
final policy. (tests/test_flow.py covers resume and re-planning on fast fake stages.)
"""

from __future__ import annotations

import json

import pytest

from conftest import params_file
from stage_contract import assert_run_meets_contract
from tracerl.config import load_params
from tracerl.pipeline.layout import RunLayout, is_done, plan_all
from tracerl.schemas import read_parquet
from tracerl.tracking import PARENT_TAG, MlflowTracker

pytestmark = pytest.mark.filterwarnings("ignore")

TINY = {
    "run": {"name": "real", "iterations": 2, "eval_every": 1, "registered_model": "tiny-policy"},
    "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
              "intermediate_size": 64, "max_position_embeddings": 128},
    "data": {"train_size": 40, "heldout_size": 6, "sft_size": 32, "max_difficulty": 1},
    "sft": {"steps": 4, "batch_size": 8, "warmup_steps": 1},
    "rollout": {"tasks_per_iter": 4, "responses_per_task": 2, "max_tokens": 16,
                "batch_size": 8},
    "reward": {"group_filter": "none"},
    "policy": {"use_value": True, "micro_batch": 4},
    "value": {"micro_batch": 4},
    "evaluate": {"heldout_size": 3},
}


def run_real(tmp_path, monkeypatch, params: dict) -> RunLayout:
    """The whole pipeline with the real stages in-process (no Prefect) on ``params``
    written to ``tmp_path/params.yaml``; returns the run's layout."""
    from flows.tracerl_flow import build, run_pipeline

    params_file(tmp_path / "params.yaml", **params)
    monkeypatch.chdir(tmp_path)
    _, orch, planner, key = build("params.yaml", project_root=tmp_path)
    with orch.parent_run(key, part="all"):
        run_pipeline(orch, planner, "all", orch.run_call)
    return RunLayout.from_params(load_params(tmp_path / "params.yaml"), base=tmp_path)


def test_real_stages_two_iterations(tmp_path, monkeypatch):
    from flows.tracerl_flow import tracerl
    from prefect.testing.utilities import prefect_test_harness

    params_file(tmp_path / "params.yaml", **TINY)
    for var in ("MLFLOW_TRACKING_URI", "TRACERL_RUN_ID", "TRACERL_PARENT_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    with prefect_test_harness(server_startup_timeout=180):
        summary = tracerl(params_path="params.yaml", project_root=str(tmp_path))

    params = load_params(tmp_path / "params.yaml")
    layout = RunLayout.from_params(params, base=tmp_path)
    calls = plan_all(params, layout)
    assert all(is_done(c) for c in calls)
    assert_run_meets_contract(calls, layout)  # the same contract the fake stages meet
    # artifacts, in their declared schemas
    assert read_parquet(layout.prepare / "heldout.parquet", "task").height == 6
    for i in range(2):
        roll = read_parquet(layout.stage_dir("rollout", i) / "rollouts.parquet", "rollout")
        assert roll.height == 8
        scored = read_parquet(layout.stage_dir("reward", i) / "scored.parquet", "scored")
        assert scored.height == 8 and scored["kept"].all()
        assert (layout.stage_dir("policy", i) / "checkpoint" / "config.json").is_file()
        assert (layout.stage_dir("value", i) / "advantages.parquet").is_file()
        assert "gold answer" in (layout.stage_dir("reward", i) / "trajectory.html").read_text()
        assert (layout.stage_dir("curriculum", i) / "decision.json").is_file()
    # learning curves and DVC metrics
    curves = json.loads(layout.curves.read_text())
    assert [r["iteration"] for r in curves] == [0, 1]
    for key in ("reward.accuracy", "rollout.tokens_per_s", "policy.kl", "policy.clip_fraction",
                "value.value_loss", "curriculum.level", "iteration.overhead_fraction"):
        assert all(key in r for r in curves), key
    assert "evaluate.accuracy" in curves[0]  # eval_every=1; the last one is the final evaluate
    assert 0 <= summary["final_eval"]["accuracy"] <= 1
    for s in ("prepare", "sft", "rl", "evaluate"):
        assert layout.dvc_metrics(s).is_file()
    # `dvc metrics show` (the headline file) says which accuracy is the SFT model's and
    # which the final policy's, with the gain, and the same per decoding strategy
    head = json.loads(layout.headline.read_text())
    baseline = json.loads((layout.baseline_eval / "metrics.json").read_text())
    final = summary["final_eval"]
    assert head["heldout_accuracy"] == pytest.approx({
        "sft": baseline["accuracy"], "final_rl": final["accuracy"],
        "gain": final["accuracy"] - baseline["accuracy"]})
    assert sorted(head["accuracy"]["heldout"]) == sorted(params.evaluate.strategies)
    for s in params.evaluate.strategies:
        assert head["accuracy"]["heldout"][s] == {
            "sft": baseline[f"heldout.{s}.accuracy"], "final_rl": final[f"heldout.{s}.accuracy"]}
    # MLflow: one parent, a finished child per stage call, metrics, the registered policy
    tracker = MlflowTracker(tmp_path)
    parent_id = json.loads(layout.tracking.read_text())["parent_run_id"]
    children = tracker.client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
        max_results=1000)
    assert sorted(r.info.run_name for r in children) == sorted(c.label for c in calls)
    assert all(r.info.status == "FINISHED" for r in children)
    # per optimizer step curves in the training stages' child runs, one curve across
    # iterations (the trainer's step count runs on)
    by_name = {r.info.run_name: r for r in children}
    for label in ("policy[0]", "policy[1]", "value[1]", "sft"):
        rid = by_name[label].info.run_id
        for key in ("step.loss", "step.grad_norm", "step.lr"):
            assert tracker.client.get_metric_history(rid, key), (label, key)
    for key in ("step.kl", "step.clip_fraction", "step.ratio_max", "step.entropy"):
        assert tracker.client.get_metric_history(by_name["policy[1]"].info.run_id, key), key
    first = tracker.client.get_metric_history(by_name["policy[0]"].info.run_id, "step.loss")
    second = tracker.client.get_metric_history(by_name["policy[1]"].info.run_id, "step.loss")
    assert max(m.step for m in first) < min(m.step for m in second)
    hist = tracker.client.get_metric_history(parent_id, "policy.kl")
    assert sorted(m.step for m in hist) == [0, 1]
    versions = tracker.client.search_model_versions("name='tiny-policy'")
    assert len(versions) == 1


def test_block_size_curriculum_through_the_real_stages(tmp_path, monkeypatch):
    """A schedule change on the real stages (no Prefect): iteration 0 rolls out at block 4
    and trains at 8 (the reference's manner), iteration 1 rolls out and trains at 8,
    iteration 2 rolls out at 8 and trains at 16. The trajectories record it and the
    trainer's rows follow the records, never model.block_size (4 throughout); the
    evaluations decode at blocks 4, 8 and 16 under the same keys every time."""
    tiny = {**TINY, "run": {**TINY["run"], "name": "blocks", "iterations": 3, "eval_every": 3,
                            "tracker": "null"},
            "policy": {"use_value": False, "micro_batch": 4},
            "curriculum": {"block_size_schedule": [[1, 8]],
                           "train_block_size_schedule": [[0, 8], [2, 16]]},
            "rollout": {**TINY["rollout"], "steps_per_block": 16},
            "evaluate": {"heldout_size": 3, "block_sizes": [4, 8, 16],
                         "strategies": ["low_confidence_dynamic"]}}
    L = run_real(tmp_path, monkeypatch, tiny)
    want = [(4, 8, 8), (8, None, 8), (8, 16, 16)]  # (decoded at, recorded train block, rows)
    for i, (b, train, rows) in enumerate(want):
        roll = read_parquet(L.stage_dir("rollout", i) / "rollouts.parquet", "rollout")
        assert set(roll["block_size"]) == {b} and set(roll["train_block_size"]) == {train}
        pm = json.loads((L.stage_dir("policy", i) / "metrics.json").read_text())
        assert pm["rows/block_size"] == rows, i
        # the sampler's log-probs are the old ones only when training at the decoding block
        assert pm["old_logprobs_recorded"] == (1.0 if rows == b else 0.0), i
    for ev in (L.baseline_eval, L.evaluate):
        m = json.loads((ev / "metrics.json").read_text())
        for size in (4, 8, 16):
            assert f"heldout.b{size}.low_confidence_dynamic.forward_per_token" in m
    head = json.loads(L.headline.read_text())["accuracy"]["heldout"]
    assert {"b4.low_confidence_dynamic", "b8.low_confidence_dynamic",
            "b16.low_confidence_dynamic"} <= set(head)


def test_full_attention_family_with_value_model_through_the_real_stages(tmp_path, monkeypatch):
    """A LLaDA-style model (bidirectional, its own mask token) through the same pipeline:
    random-masking SFT, rollouts with the approximate prefix cache, TraceRL with
    full-attention rows and the value model on, evaluation. The records say full
    attention; the trainer recomputes the old log-probs (the sampler's cache is
    approximate) and the value stage writes token advantages."""
    tiny = {**TINY, "run": {**TINY["run"], "name": "llada", "iterations": 2, "tracker": "null"},
            "model": {**TINY["model"], "family": "llada"},
            "sft": {**TINY["sft"], "method": "random_masking"},
            "rollout": {**TINY["rollout"], "full_cache": "prefix"}}
    L = run_real(tmp_path, monkeypatch, tiny)
    for i in range(2):
        roll = read_parquet(L.stage_dir("rollout", i) / "rollouts.parquet", "rollout")
        assert set(roll["attention"]) == {"full"} and set(roll["full_cache"]) == {"prefix"}
        pm = json.loads((L.stage_dir("policy", i) / "metrics.json").read_text())
        assert pm["old_logprobs_recorded"] == 0.0 and pm["rows/block_size"] == 0.0
        assert (L.stage_dir("value", i) / "advantages.parquet").is_file()
    final = json.loads((L.evaluate / "metrics.json").read_text())
    assert final["heldout.low_confidence_static.tasks"] == 3.0


def test_lora_policy_update_through_the_real_stages(tmp_path, monkeypatch):
    """policy.lora on the real stages (no Prefect): two iterations train one adapter on the
    frozen SFT model (the second loads the first's back, with its optimizer moments), the
    KL reference is that model with its adapters off, and the merged policies the rollouts
    decode with differ from the SFT model only in the adapted layers."""
    pytest.importorskip("peft")
    import torch

    from tracerl.models import load_model, weights_digest
    from tracerl.models.lora import DEFAULT_TARGETS

    tiny = {**TINY, "run": {**TINY["run"], "name": "lora", "eval_every": 2, "tracker": "null"},
            "policy": {"use_value": False, "micro_batch": 4, "beta": 0.1,
                       "kl_target": "reference", "lora": {"rank": 4, "alpha": 8.0}}}
    # the untrained tiny model never answers right, and all-zero rewards give the adapters
    # no gradient: here (in-process stages) a response counts as right by its text's parity
    import tracerl.rewards.scoring as scoring
    from tracerl.rewards.math_answers import MathScore

    monkeypatch.setattr(scoring, "score_math", lambda text, answer, **kw: MathScore(
        sum(map(ord, text or "")) % 2 == 0, None, "parity"))
    L = run_real(tmp_path, monkeypatch, tiny)
    rewards = read_parquet(L.stage_dir("reward", 0) / "scored.parquet", "scored")["reward"]
    assert 0 < rewards.sum() < rewards.len()  # the stub gave a signal
    pm = [json.loads((L.stage_dir("policy", i) / "metrics.json").read_text()) for i in (0, 1)]
    assert [m["lora/continued"] for m in pm] == [0.0, 1.0]
    assert all(m["lora/base_is_reference"] == 1.0 for m in pm)
    assert all(m["params/trainable"] < m["params/total"] / 5 for m in pm)
    assert pm[1]["kl"] > 0  # KL to the base (adapters off): the policy has moved from it
    sft = load_model(L.sft / "checkpoint")[0].state_dict()
    for i in (0, 1):
        assert (L.stage_dir("policy", i) / "adapter" / "adapter_model.safetensors").is_file()
        w = load_model(L.stage_dir("policy", i) / "checkpoint")[0].state_dict()
        changed = {n for n, p in w.items() if not torch.equal(p, sft[n])}
        assert changed and all(n.rsplit(".", 2)[-2] in DEFAULT_TARGETS for n in changed), i
    # the second rollout decoded with the first update's merged policy
    roll = read_parquet(L.stage_dir("rollout", 1) / "rollouts.parquet", "rollout")
    p0 = load_model(L.stage_dir("policy", 0) / "checkpoint")[0]
    assert set(roll["policy_id"]) == {weights_digest(p0)}

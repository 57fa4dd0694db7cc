"""Sharded rollout: shards decode whole batches of one plan and merge bit-identical to the
unsharded rollout; a changed policy checkpoint is refused; ``rollout.shards`` changes no
cache key (the flow-level tests, with Prefect retries and resume, are in
``test_rollout_shards_flow.py``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl
import pytest
import torch

from conftest import params_file
from tracerl.config import ConfigError, load_params
from tracerl.pipeline.artifacts import (
    folder_digest,
    manifest_digest,
    read_manifest,
    sha256_file,
    stage_output,
)
from tracerl.pipeline.layout import Planner, RunLayout, StageCall, params_read, plan_all
from tracerl.pipeline.registry import placement_keys
from tracerl.sampling import SamplingConfig, generate, generate_batches, plan_batches
from tracerl.sampling.shards import SHARD_FILE, shard_batches
from tracerl.schemas import read_parquet, write_parquet

PARAMS = {
    "run": {"seed": 5, "threads": 1},
    "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
              "intermediate_size": 64, "max_position_embeddings": 128},
    # 5 tasks x 2 responses = 10 sequences in batches of 3: 4 batches, the last of 1
    "rollout": {"tasks_per_iter": 5, "responses_per_task": 2, "max_tokens": 12,
                "batch_size": 3},
    "curriculum": {"enabled": False},
}


def _write_policy(folder: Path, params: Path, bump: float = 0.0) -> None:
    """A policy stage folder (checkpoint/ + manifest) holding the tiny model."""
    from tracerl.models import save_model
    from tracerl.pipeline.resolve import policy_from_params

    model, tok = policy_from_params("tiny", load_params(params))
    if bump:
        with torch.no_grad():
            next(model.parameters()).add_(bump)
    with stage_output(folder, stage="sft") as o:
        save_model(model, tok, o.dir / "checkpoint")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    params_file(root / "params.yaml", **PARAMS)
    n = 12
    tasks = pl.DataFrame({
        "task_id": [f"t{i}" for i in range(n)], "source": ["arithmetic"] * n,
        # prompt lengths differ, so the plan's length sort matters
        "prompt": [f"{i}+{i * 37}=?" + " and" * (i % 4) for i in range(n)],
        "answer": [str(i + i * 37) for i in range(n)], "tests": [None] * n,
        "difficulty": [0] * n, "split": ["train"] * n,
    })
    write_parquet(tasks, root / "prepare" / "train.parquet", "task")
    _write_policy(root / "sft", root / "params.yaml")
    return root


def _call(root: Path, out: Path) -> StageCall:
    return StageCall("rollout", out, 0, {"data": (root / "prepare",), "policy": (root / "sft",)},
                     key="k")


def _run(call: StageCall, root: Path) -> None:
    from stages.rollout import main

    assert main(call.argv(root / "params.yaml")) == 0


def _sharded(root: Path, n: int, name: str) -> Path:
    """Run the n shards of a planned rollout call one by one, then the merge."""
    shards, merge = Planner(load_params(root / "params.yaml"), RunLayout(root)).shards(
        _call(root, root / name / "rollout"), n)
    for s in shards:
        _run(s, root)
    _run(merge, root)
    return merge.out


@pytest.fixture(scope="module")
def unsharded(project):
    out = project / "plain" / "rollout"
    _run(_call(project, out), project)
    return out


def test_plan_batches_and_shards():
    assert plan_batches([[1, 2], [1], [1, 2, 3], [1]], 3) == [[1, 3, 0], [2]]
    assert [shard_batches(4, 3, k) for k in range(3)] == [[0, 3], [1], [2]]
    assert shard_batches(4, 6, 5) == []
    with pytest.raises(ValueError, match="need 0 <= index < shards"):
        shard_batches(4, 2, 2)


def test_generate_batches_union_is_generate():
    """The library: decoding the plan's batches in any split gives generate's records."""
    from tracerl.models import tiny_model

    model, tok = tiny_model()
    cfg = SamplingConfig(block_size=4, steps_per_block=4, max_tokens=8, batch_size=2)
    prompts = [tok.encode(f"{i}+{i * 13}=" + "?" * (i % 3)) for i in range(7)]
    whole = generate(model, prompts, cfg, torch.Generator().manual_seed(3))
    parts: dict = {}
    for batches in ([3, 0], [2], [1]):
        parts.update(generate_batches(model, prompts, cfg, torch.Generator().manual_seed(3),
                                      batches))
    assert [parts[i] for i in range(len(prompts))] == whole


@pytest.mark.parametrize("n", [1, 2, 3])
def test_merged_shards_equal_unsharded_bit_for_bit(project, unsharded, n):
    merged = _sharded(project, n, f"sharded{n}")
    for f in ("rollouts.parquet", "skipped.jsonl"):
        assert sha256_file(merged / f) == sha256_file(unsharded / f), f
    a = read_parquet(merged / "rollouts.parquet", "rollout")
    assert a.height == 10 and a.equals(read_parquet(unsharded / "rollouts.parquet", "rollout"))
    assert read_manifest(merged)["sampling"] == read_manifest(unsharded)["sampling"]
    m = json.loads((merged / "metrics.json").read_text())
    plain = json.loads((unsharded / "metrics.json").read_text())
    for k in ("num_responses", "response_length", "forward_per_token", "finish_eos",
              "block_size", "max_tokens", "num_tasks"):
        assert m[k] == plain[k], k
    assert m["shards"] == n and len(m["shard_seconds"]) == n
    # each shard decoded whole batches, round robin (uneven for n=3: 2+1+1 batches)
    infos = [json.loads((merged.parent / "rollout_shards" / f"shard{k + 1}of{n}" /
                         SHARD_FILE).read_text()) for k in range(n)]
    assert [i["batches"] for i in infos] == [shard_batches(4, n, k) for k in range(n)]
    assert sorted(r for i in infos for r in i["rows"]) == list(range(10))


def test_more_shards_than_batches(project, unsharded, capsys):
    """6 shards for 4 batches: shards 5 and 6 decode nothing, the merge is unchanged."""
    merged = _sharded(project, 6, "sharded6")
    assert "shard 5/6: no batch to decode" in capsys.readouterr().out
    empty = read_parquet(merged.parent / "rollout_shards" / "shard6of6" / "rollouts.parquet",
                         "rollout")
    assert empty.height == 0
    assert sha256_file(merged / "rollouts.parquet") == sha256_file(unsharded / "rollouts.parquet")


def test_merge_refuses_a_missing_shard(project):
    shards, merge = Planner(load_params(project / "params.yaml"), RunLayout(project)).shards(
        _call(project, project / "missing" / "rollout"), 2)
    _run(shards[0], project)
    from stages.rollout import main

    argv = merge.argv(project / "params.yaml")
    drop = argv.index(f"shard={shards[1].out}")
    with pytest.raises(ValueError, match=r"expected shards 1\.\.2 once each, got \[1\]"):
        main(argv[:drop - 1] + argv[drop + 1:])
    assert not (merge.out / "manifest.json").exists()


def test_stale_checkpoint_is_refused(project, tmp_path):
    """Rewrite the policy checkpoint between the plan and the shard run: the shard fails."""
    from stages.rollout import StalePolicy, main

    policy = tmp_path / "policy"
    _write_policy(policy, project / "params.yaml")
    call = StageCall("rollout", tmp_path / "rollout", 0,
                     {"data": (project / "prepare",), "policy": (policy,)}, key="k")
    shards, _ = Planner(load_params(project / "params.yaml"), RunLayout(tmp_path)).shards(call, 2)
    planned = manifest_digest(policy, "checkpoint")
    assert shards[0].policy_digest == planned == folder_digest(policy / "checkpoint")
    assert "--policy-digest" in shards[0].argv(project / "params.yaml")
    # another update rewrites the weights in place after the plan
    weights = policy / "checkpoint" / "model.safetensors"
    before = weights.read_bytes()
    _write_policy(tmp_path / "other", project / "params.yaml", bump=1e-3)
    os.replace(tmp_path / "other" / "checkpoint" / "model.safetensors", weights)
    assert weights.read_bytes() != before
    with pytest.raises(StalePolicy, match=f"rollout was planned from {planned}: the "
                                          "checkpoint changed after the plan"):
        main(shards[0].argv(project / "params.yaml"))
    assert not (shards[0].out / "manifest.json").exists()


def test_shard_calls_labels_keys_and_folders(project):
    params = load_params(project / "params.yaml")
    call = _call(project, project / "x" / "rollout")
    shards, merge = Planner(params, RunLayout(project)).shards(call, 2)
    assert [s.label for s in shards] == ["rollout[0].shard1of2", "rollout[0].shard2of2"]
    assert [s.out.name for s in shards] == ["shard1of2", "shard2of2"]
    assert len({s.key for s in shards} | {call.key}) == 3  # a shard has its own key
    assert merge.key == call.key and merge.out == call.out and merge.label == "rollout[0]"
    assert merge.argv(project / "params.yaml")[-6:] == [
        "--input", f"shard={shards[0].out}", "--input", f"shard={shards[1].out}",
        "--policy-digest", shards[0].policy_digest]


def test_shards_change_no_cache_key(tmp_path):
    """rollout.shards says where the rollout runs, not what it writes: every planned key
    (rollout, reward, policy, curriculum, evaluate) is the same for 1 and 2 shards, and
    DVC does not list it."""
    from tracerl.pipeline.dvcgen import dvc_stages

    one = load_params(params_file(tmp_path / "a.yaml", run={"iterations": 2}))
    two = load_params(params_file(tmp_path / "b.yaml", run={"iterations": 2},
                                  rollout={"shards": 2, "shard_retries": 3}))
    layout = RunLayout(tmp_path / "run")
    assert [c.key for c in plan_all(one, layout)] == [c.key for c in plan_all(two, layout)]
    assert placement_keys() == {"rollout.shards", "rollout.shard_retries"}
    assert "shards" not in params_read("rollout", two.to_dict())["rollout"]
    assert "tasks_per_iter" in params_read("rollout", two.to_dict())["rollout"]
    changed = load_params(params_file(tmp_path / "c.yaml", run={"iterations": 2},
                                      rollout={"batch_size": 7}))
    assert plan_all(changed, layout)[3].key != plan_all(one, layout)[3].key  # still keyed
    for name, stage in dvc_stages().items():
        assert not placement_keys() & set(stage["params"]), name
        if name == "rl":
            assert "rollout.batch_size" in stage["params"] and "rollout" not in stage["params"]


def test_bad_shards_are_refused(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_params(params_file(tmp_path / "p.yaml", rollout={"shards": 0, "shard_retries": -1}))
    assert "rollout.shards must be >= 1" in str(e.value)
    assert "rollout.shard_retries must be >= 0" in str(e.value)


def test_tracker_runs_are_per_thread(tmp_path):
    """Shards' child runs open side by side in Prefect's worker threads: each thread logs
    to its own child run, and a thread with none open logs to the parent run."""
    import threading

    from tracerl.tracking import MlflowTracker

    t = MlflowTracker(tmp_path, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    both_open, logged = threading.Barrier(2), threading.Barrier(2)
    children: dict[int, str] = {}

    def shard(k: int) -> None:
        with t.start_run(f"shard{k}", parent_run_id=parent) as rid:
            children[k] = rid
            both_open.wait(timeout=60)  # both children open: one stack would mix them
            t.log_metrics({"k": float(k)})
            logged.wait(timeout=60)
        t.log_metrics({f"after{k}": 1.0})  # no run of its own open: the parent's

    with t.start_run("parent") as parent:
        threads = [threading.Thread(target=shard, args=(k,)) for k in (1, 2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert t.run_id == parent
    for k, rid in children.items():
        assert t.client.get_run(rid).data.metrics == {"k": float(k)}
    assert t.client.get_run(parent).data.metrics == {"after1": 1.0, "after2": 1.0}

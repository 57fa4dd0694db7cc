"""Multi-rank training stages: ranks declared in params and the registry, launched
through torchrun by the runners, rank-aware stage CLIs (gloo on CPU, one torch thread per
rank): a 2-rank policy stage equals the 1-rank one, and a 2-rank ZeRO-2 SFT killed after
its first checkpoint resumes to the weights of an uninterrupted 2-rank run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from test_stage_train import _params, _scored, _sft_data
from tracerl.config import ConfigError, load_params
from tracerl.models import load_model
from tracerl.pipeline.artifacts import is_complete, read_metrics
from tracerl.pipeline.launch import ranks_of, rendezvous_args, torchrun_command
from tracerl.pipeline.layout import StageCall
from tracerl.pipeline.registry import STAGES
from tracerl.pipeline.runners import ContainerRunner, InProcessRunner, SubprocessRunner

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, "-m", "torch.distributed.run"]


def _yaml(tmp: Path, name: str = "params.yaml", **sections) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for k, v in sections.items():
        raw[k].update(v)
    p = tmp / name
    p.write_text(yaml.safe_dump(raw))
    return p


def _policy_call(tmp: Path) -> StageCall:
    return StageCall("policy", tmp / "runs" / "r" / "rl" / "iter_0" / "policy", 0,
                     {"policy": (tmp / "runs" / "r" / "sft",)})


# ---------------------------------------------------------------------- declarations
def test_registry_names_the_ranks_keys():
    keys = {n: s.resources.ranks for n, s in STAGES.items() if s.resources.ranks}
    assert keys == {"sft": "sft.ranks", "value": "value.ranks", "policy": "policy.ranks"}
    p = load_params(ROOT / "params.yaml")
    assert {n: ranks_of(n, p) for n in STAGES.names()} == dict.fromkeys(STAGES.names(), 1)


def test_bad_ranks_settings_are_listed_with_their_fix(tmp_path):
    bad = _yaml(tmp_path, policy={"ranks": 2, "zero_stage": 0, "grad_accum": 3},
                sft={"ranks": 0}, value={"ranks": 4, "zero_stage": 2, "grad_accum": 2})
    with pytest.raises(ConfigError) as e:
        load_params(bad)
    msgs = e.value.problems
    assert ("policy.ranks = 2 needs policy.zero_stage 2 or 3 (DeepSpeed ZeRO runs the update "
            "across ranks): set policy.zero_stage: 2, or policy.ranks: 1") in msgs
    assert any(m.startswith("policy.grad_accum (3) must be a multiple of policy.ranks (2)")
               and "set policy.grad_accum: 4" in m for m in msgs)
    assert "sft.ranks must be >= 1 (processes of the sft stage per node)" in msgs
    assert any(m.startswith("value.grad_accum (2) must be a multiple of value.ranks (4)")
               and "set value.grad_accum: 4" in m for m in msgs)
    assert not any(m.startswith("value.ranks") for m in msgs)  # zero_stage 2 is fine
    good = _yaml(tmp_path, "good.yaml", policy={"ranks": 2, "zero_stage": 2, "grad_accum": 2})
    assert ranks_of("policy", load_params(good)) == 2


# ---------------------------------------------------------------------- commands
def test_torchrun_single_node_and_multi_node_from_env(tmp_path):
    params = _yaml(tmp_path, policy={"ranks": 2, "zero_stage": 2, "grad_accum": 2})
    c = _policy_call(tmp_path)
    argv = c.argv(params)
    r = SubprocessRunner(cwd=tmp_path, python=sys.executable)
    # single node: torchrun's own rendezvous on a free local port
    assert r.command(c, params, env={}) == [
        *RUN, "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
        "-m", "stages.policy", *argv]
    # multi-node: the rendezvous a scheduler set in the environment
    env = {"MASTER_ADDR": "node0.cluster", "MASTER_PORT": "23456", "NODE_RANK": "2",
           "NNODES": "4"}
    assert r.command(c, params, env=env) == [
        *RUN, "--nnodes", "4", "--node-rank", "2", "--master-addr", "node0.cluster",
        "--master-port", "23456", "--nproc-per-node", "2", "-m", "stages.policy", *argv]
    # Kubeflow's PyTorchJob convention: WORLD_SIZE nodes, RANK the node's index
    assert rendezvous_args({"MASTER_ADDR": "a", "MASTER_PORT": "1", "WORLD_SIZE": "3",
                            "RANK": "1"}) == [
        "--nnodes", "3", "--node-rank", "1", "--master-addr", "a", "--master-port", "1"]
    with pytest.raises(ValueError, match="node rank 4 is not below the number of nodes 4"):
        rendezvous_args({**env, "NODE_RANK": "4"})
    with pytest.raises(ValueError, match="NNODES/WORLD_SIZE='x' is not an integer"):
        rendezvous_args({**env, "NNODES": "x"})
    # one rank, or a stage without a ranks key: a plain process
    one = _yaml(tmp_path, "one.yaml")
    assert r.command(c, one, env=env) == [sys.executable, "-m", "stages.policy", *c.argv(one)]
    roll = StageCall("rollout", tmp_path / "o", 0, {})
    assert r.command(roll, params, env=env)[1:3] == ["-m", "stages.rollout"]
    assert torchrun_command("py", "m", [], 3, env={})[-4:] == ["--nproc-per-node", "3", "-m", "m"]


def test_container_spec_runs_torchrun(tmp_path, monkeypatch):
    for k in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "NNODES"):
        monkeypatch.delenv(k, raising=False)
    params = _yaml(tmp_path, policy={"ranks": 2, "zero_stage": 2, "grad_accum": 2})
    s = ContainerRunner(tmp_path, "runs").spec(_policy_call(tmp_path), params, {})
    cmd = s["command"]
    assert cmd[:9] == ["python", "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                       "--nproc-per-node", "2", "-m"]
    assert cmd[9] == "stages.policy"
    assert cmd[cmd.index("--params") + 1] == "/workspace/params.yaml"
    assert cmd[cmd.index("--out") + 1] == "/workspace/runs/r/rl/iter_0/policy"


def test_inprocess_runner_hands_multi_rank_calls_to_a_subprocess(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(SubprocessRunner, "run", lambda self, call, p, env: seen.append(
        (self.package, call.stage, p, dict(env))))
    params = _yaml(tmp_path, policy={"ranks": 2, "zero_stage": 2, "grad_accum": 2})
    InProcessRunner().run(_policy_call(tmp_path), params, {"TRACERL_RUN_ID": "r1"})
    assert seen == [("stages", "policy", params, {"TRACERL_RUN_ID": "r1"})]


# ---------------------------------------------------------------------- real stages
POLICY = {"grad_accum": 2, "micro_batch": 1, "shuffle": True}  # 4 rows: 2 steps of 2


def _policy_inputs(tmp: Path) -> tuple[Path, dict]:
    """One-rank params, an SFT checkpoint and rollouts scored from it (recorded by other
    weights: the old log-probs are recomputed, on 2 ranks each rank its share)."""
    from stages import sft as sft_stage

    one = _params(tmp, sft={"steps": 2}, policy=POLICY)
    sft_stage.main(["--params", str(one), "--input", f"data={_sft_data(tmp)}",
                    "--out", str(tmp / "sft")])
    scored = _scored(tmp, tmp / "sft" / "checkpoint", policy_id="other-weights")
    return one, {"policy": (tmp / "sft",), "scored": (scored,)}


def _ranks_params(tmp: Path, name: str, **policy) -> Path:
    d = tmp / name
    d.mkdir()
    return _params(d, sft={"steps": 2}, policy={**POLICY, **policy})


def _env(tmp: Path) -> dict[str, str]:
    return {"TRACERL_TRACKER": "null", "OMP_NUM_THREADS": "1"}  # one torch thread per rank


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return dict(load_model(folder / "checkpoint")[0].named_parameters())


@pytest.mark.slow
def test_two_rank_policy_stage_equals_one_rank(tmp_path, monkeypatch):
    from stages import policy as policy_stage

    monkeypatch.setenv("TRACERL_TRACKER", "null")
    one, inputs = _policy_inputs(tmp_path)
    scored = inputs["scored"][0]
    # one rank, plain torch, in this process
    InProcessRunner().run(StageCall("policy", tmp_path / "p1", 0, inputs), one, {})
    # two ranks, ZeRO-2, the same global batch (2 micro-batches of 1 row per step)
    two = _ranks_params(tmp_path, "two", ranks=2, zero_stage=2)
    SubprocessRunner(cwd=ROOT).run(StageCall("policy", tmp_path / "p2", 0, inputs), two,
                                   _env(tmp_path))
    assert is_complete(tmp_path / "p2")
    m1, m2 = read_metrics(tmp_path / "p1"), read_metrics(tmp_path / "p2")
    assert m1["ranks"] == 1.0 and m2["ranks"] == 2.0
    assert m1["old_logprobs_recorded"] == m2["old_logprobs_recorded"] == 0.0
    assert m1["steps"] == m2["steps"] >= 2  # Adam's moments are used by a second step
    timing = {"seconds", "tokens_per_s", "ranks"}
    assert set(m1) == set(m2)
    # ZeRO-2 partitions the optimizer state: rank 0 holds about half of it
    part = "optimizer/state_bytes"
    assert m2[part] == pytest.approx(m1[part] / 2, rel=0.01)
    for k in sorted(set(m1) - timing - {part}):
        assert m2[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-6), k
    w1, w2, w0 = _weights(tmp_path / "p1"), _weights(tmp_path / "p2"), _weights(tmp_path / "sft")
    for n, p in w1.items():
        assert (w2[n] - p).abs().max().item() <= 1e-5, n
    # ZeRO-2 on one plain process (a one-rank group, in this process): the same update
    z = _ranks_params(tmp_path, "z", zero_stage=2)
    InProcessRunner().run(StageCall("policy", tmp_path / "pz", 0, inputs), z, {})
    assert read_metrics(tmp_path / "pz")["loss"] == pytest.approx(m1["loss"], rel=1e-5)
    wz = _weights(tmp_path / "pz")
    assert max((wz[n] - p).abs().max().item() for n, p in w1.items()) <= 1e-5
    assert not torch.distributed.is_initialized()  # the group is gone with the stage
    assert max((w1[n] - w0[n]).abs().max().item() for n in w0) > 1e-4  # it did train
    # the trainer state of 2 ranks: counters by rank 0, one optimizer partition per rank
    state = tmp_path / "p2" / "trainer_state"
    assert (state / "trainer_state.pt").is_file()
    parts = sorted(p.name for p in (state / "deepspeed" / "state").glob("*optim_states.pt"))
    assert len(parts) == 2, parts
    manifest = json.loads((tmp_path / "p2" / "manifest.json").read_text())
    assert "trainer_state/deepspeed/state/mp_rank_00_model_states.pt" in manifest["files"]
    # iteration 1 resumes the ZeRO state on 2 ranks (DeepSpeed's load on every rank)
    SubprocessRunner(cwd=ROOT).run(StageCall("policy", tmp_path / "p3", 1, {
        "policy": (tmp_path / "p2",), "scored": (scored,)}), two, _env(tmp_path))
    m3 = read_metrics(tmp_path / "p3")
    assert m3["resumed"] == 1.0
    assert m3["trainer/optimizer_steps"] == 2 * m2["trainer/optimizer_steps"]
    # a plain one-rank trainer refuses the ZeRO state, saying why
    with pytest.raises(ValueError, match="saved by DeepSpeed ZeRO training"):
        policy_stage.main(["--params", str(one), "--input", f"policy={tmp_path / 'p2'}",
                           "--input", f"scored={scored}", "--out", str(tmp_path / "p4")])


@pytest.mark.slow
def test_two_rank_zero3_policy_stage_equals_one_rank(tmp_path, monkeypatch):
    """ZeRO-3 partitions the weights themselves: the stage gathers them to save the
    checkpoint (a collective), and the ranks score in lockstep."""
    monkeypatch.setenv("TRACERL_TRACKER", "null")
    one, inputs = _policy_inputs(tmp_path)
    InProcessRunner().run(StageCall("policy", tmp_path / "p1", 0, inputs), one, {})
    three = _ranks_params(tmp_path, "three", ranks=2, zero_stage=3)
    SubprocessRunner(cwd=ROOT).run(StageCall("policy", tmp_path / "p3", 0, inputs), three,
                                   _env(tmp_path))
    m1, m3 = read_metrics(tmp_path / "p1"), read_metrics(tmp_path / "p3")
    assert m3["loss"] == pytest.approx(m1["loss"], rel=1e-5) and m3["steps"] == m1["steps"]
    w1, w3 = _weights(tmp_path / "p1"), _weights(tmp_path / "p3")
    for n, p in w1.items():
        assert p.shape == w3[n].shape and (w3[n] - p).abs().max().item() <= 1e-5, n


@pytest.mark.slow
def test_two_rank_value_stage_equals_one_rank(tmp_path, monkeypatch):
    """The value stage on 2 ranks: rank 0 alone writes the advantages (computed from the
    pre-update values every rank scored its share of), the value model trains the same."""
    import polars as pl

    from tracerl.models import ValueModel

    monkeypatch.setenv("TRACERL_TRACKER", "null")
    value = {"grad_accum": 2, "micro_batch": 1}
    one = _params(tmp_path, sft={"steps": 2}, value=value)
    from stages import sft as sft_stage

    sft_stage.main(["--params", str(one), "--input", f"data={_sft_data(tmp_path)}",
                    "--out", str(tmp_path / "sft")])
    inputs = {"policy": (tmp_path / "sft",),
              "scored": (_scored(tmp_path, tmp_path / "sft" / "checkpoint"),)}
    InProcessRunner().run(StageCall("value", tmp_path / "v1", 0, inputs), one, {})
    d = tmp_path / "two"
    d.mkdir()
    two = _params(d, sft={"steps": 2}, value={**value, "ranks": 2, "zero_stage": 2})
    SubprocessRunner(cwd=ROOT).run(StageCall("value", tmp_path / "v2", 0, inputs), two,
                                   _env(tmp_path))
    m1, m2 = read_metrics(tmp_path / "v1"), read_metrics(tmp_path / "v2")
    assert m1["steps"] == m2["steps"] == 2.0 and m1["trained"] == m2["trained"] == 1.0
    for k in ("value_loss", "value_mean", "explained_var", "grad_norm"):
        assert m2[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-6), k
    a1 = pl.read_parquet(tmp_path / "v1" / "advantages.parquet")
    a2 = pl.read_parquet(tmp_path / "v2" / "advantages.parquet")
    assert a1.equals(a2)  # from the values before the update: the same weights, same rows
    s1 = ValueModel.load(tmp_path / "v1" / "checkpoint").state_dict()
    s2 = ValueModel.load(tmp_path / "v2" / "checkpoint").state_dict()
    assert max((s1[k] - s2[k]).abs().max().item() for k in s1) <= 1e-5


@pytest.mark.slow
def test_two_rank_sft_killed_after_a_checkpoint_resumes_to_the_same_weights(tmp_path):
    """SIGKILL of the launcher's whole process group (the launcher and both ranks: a lost
    node) after the first mid-run checkpoint; the re-run resumes from it."""
    data = _sft_data(tmp_path)
    params = _params(tmp_path, sft={"steps": 30, "checkpoint_every": 3, "batch_size": 4,
                                    "grad_accum": 2, "ranks": 2, "zero_stage": 2})
    runner = SubprocessRunner(cwd=ROOT)
    env = {**os.environ, **_env(tmp_path)}

    def call(out: str) -> StageCall:
        return StageCall("sft", tmp_path / out, None, {"data": (data,)})

    runner.run(call("clean"), params, _env(tmp_path))
    assert read_metrics(tmp_path / "clean")["ranks"] == 2.0

    latest = tmp_path / ".resumed.resume" / "latest.json"
    proc = subprocess.Popen(runner.command(call("resumed"), params, env), cwd=ROOT, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not latest.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = json.loads(latest.read_text())["step"]
    assert 3 <= killed_at < 30 and not (tmp_path / "resumed").exists()

    runner.run(call("resumed"), params, _env(tmp_path))
    assert not latest.parent.exists()  # cleared once the output is written
    a, b = _weights(tmp_path / "clean"), _weights(tmp_path / "resumed")
    for n, p in a.items():
        assert torch.equal(p, b[n]), n  # bit-identical (see docs/benchmarks.md)
    ma, mb = read_metrics(tmp_path / "clean"), read_metrics(tmp_path / "resumed")
    assert ma["steps"] == mb["steps"] == 30.0
    assert ma["nll"] == mb["nll"] and ma["loss"] == mb["loss"]


def test_a_stage_inside_a_multi_node_job_is_one_process_unless_launched(monkeypatch):
    """A scheduler's per-node rendezvous variables (Kubeflow PyTorchJob: RANK, WORLD_SIZE,
    MASTER_*) do not make a plain stage process join a group: only a launcher's workers
    (LOCAL_RANK set too) do; ZeRO alone gets a one-rank group, gone at exit."""
    from tracerl.distributed import Ranks, stage_ranks

    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "10.9.9.9",
                 "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with stage_ranks(torch.device("cpu")) as r:
        assert r == Ranks() and not torch.distributed.is_initialized()
    monkeypatch.delenv("MASTER_ADDR")
    with stage_ranks(torch.device("cpu"), zero_stage=2) as r:
        assert r.world == 1 and r.main and torch.distributed.get_world_size() == 1
        assert os.environ["MASTER_ADDR"] == "127.0.0.1"
    assert not torch.distributed.is_initialized()
    assert "MASTER_ADDR" not in os.environ and os.environ["RANK"] == "1"  # restored

"""The process reward wired into the reward stage: per-token judge rewards land in
``scored.token_rewards`` and from there in the value model's GAE over decode steps."""

from __future__ import annotations

import math

import polars as pl
import pytest
import torch
from stages.reward import main

from conftest import params_file
from tracerl.config import ConfigError, load_params
from tracerl.data import TaskRecord, tasks_to_frame
from tracerl.models import ValueModel
from tracerl.rewards import score_rollouts
from tracerl.rl import TrainConfig, Trainer, ValueConfig, ValueScorer, step_gae, value_update
from tracerl.rl.io import samples_from_frame
from tracerl.schemas import read_parquet, write_parquet

VOCAB = {i: f"t{i} " for i in range(100)}
VOCAB.update({50: "good ", 51: "bad "})


class ScriptedJudge:
    """\\boxed{1} when the excerpt to grade ends with 'good', \\boxed{-1} otherwise."""

    def complete(self, prompts):
        excerpts = [p.split("Excerpt to grade:\n")[1].split("\n\n")[0] for p in prompts]
        return [["\\boxed{1}" if e.rstrip().endswith("good") else "\\boxed{-1}"] * 3
                for e in excerpts]


def _frame(responses, task_ids, block_size=4):
    """Rollout rows: prompt of 4 tokens, one response token per decode step."""
    n = len(responses)
    return pl.DataFrame({
        "task_id": task_ids,
        "sample_index": list(range(n)),
        "prompt_ids": [[1, 2, 3, 4]] * n,
        "response_ids": [list(r) for r in responses],
        "decode_steps": [list(range(1, len(r) + 1)) for r in responses],
        "logprobs": [[-0.1] * len(r) for r in responses],
        "response_len": [len(r) for r in responses],
        "finish_reason": ["eos"] * n,
        "num_forward": [len(resp) for resp in responses],
        "attention": ["block"] * n, "block_size": [block_size] * n,
        "steps_per_block": [block_size] * n, "max_tokens": [8] * n,
        "strategy": ["low_confidence_static"] * n, "dynamic_threshold": [0.9] * n,
        "entropy_bound": [0.35] * n, "temperature": [1.0] * n, "top_k": [0] * n,
        "top_p": [1.0] * n,
        "policy_id": ["p0"] * n,
        "response_text": ["".join(VOCAB[i] for i in resp) + " \\boxed{4}" * (k % 2)
                          for k, resp in enumerate(responses)],
    })


TASKS = {"a": TaskRecord("a", "What is 2+2?", "arithmetic", "4")}


def test_judge_rewards_fill_token_rewards():
    # two responses of group "a"; chunks of 4 tokens; one token per step, block 4
    rollouts = _frame([[10, 11, 12, 50, 13, 14, 15, 51], [10, 11, 12, 51, 13, 14, 15, 50]], ["a", "a"])
    scored, _ = score_rollouts(rollouts, TASKS, judge=ScriptedJudge(),
                               decode=lambda ids: "".join(VOCAB[i] for i in ids), process_chunk_len=4)
    tr = scored["token_rewards"].to_list()
    # chunk 0 (ends at 4): "good" -> 1 / "bad" -> -1, z-scored over the group -> 1 / -1, at the
    # window's latest step (position 3); final chunk: -1 / 1 at the last step (position 7)
    assert tr[0] == pytest.approx([0, 0, 0, 1, 0, 0, 0, -1])
    assert tr[1] == pytest.approx([0, 0, 0, -1, 0, 0, 0, 1])
    plain, _ = score_rollouts(rollouts, TASKS)
    assert plain["token_rewards"].to_list() == [None, None]


def test_step_rewards_reach_the_value_models_gae(tiny_sdar):
    model, _ = tiny_sdar
    rollouts = _frame([[10, 11, 12, 50, 13, 14, 15, 51], [10, 11, 12, 51, 13, 14, 15, 50]], ["a", "a"])
    scored, _ = score_rollouts(rollouts, TASKS, judge=ScriptedJudge(), group_filter="none",
                               decode=lambda ids: "".join(VOCAB[i] for i in ids), process_chunk_len=4)
    samples, _ = samples_from_frame(scored)
    assert [list(s.token_rewards) for s in samples] == scored["token_rewards"].to_list()
    trainer = Trainer(ValueScorer(ValueModel.from_policy(model)), TrainConfig(lr=1e-2, micro_batch=4))
    advs, _, _ = value_update(trainer, samples, ValueConfig(gamma=1.0, lam=1.0), train=False)
    # zero-initialised value head (V = 0), gamma = lam = 1: the advantage of a token is the
    # sum of the step rewards from its step on; the outcome reward alone would be flat
    for s, a in zip(samples, advs):
        r = torch.tensor(list(s.token_rewards))
        want = step_gae(r[None], torch.zeros(1, len(r)), torch.arange(1, len(r) + 1)[None],
                        gamma=1.0, lam=1.0)[1][0]
        assert a == pytest.approx(want.tolist(), abs=1e-5)
    assert advs[0][:4] == pytest.approx([0.0] * 4, abs=1e-5)  # 1 then -1: the steps cancel
    assert advs[0][4:] == pytest.approx([-1.0] * 4, abs=1e-5)
    assert advs[1][4:] == pytest.approx([1.0] * 4, abs=1e-5)


def _run_stage(tmp_path, rollouts):
    params_file(tmp_path / "params.yaml", reward={
        "group_filter": "none", "process_reward": "hf", "process_judge": "tiny",
        "process_chunk_len": 4, "process_k_sample": 2})
    write_parquet(rollouts, tmp_path / "rollouts.parquet", "rollout")
    write_parquet(tasks_to_frame(list(TASKS.values())), tmp_path / "tasks.parquet", "task")
    assert main(["--params", str(tmp_path / "params.yaml"), "--rollouts", str(tmp_path / "rollouts.parquet"),
                 "--tasks", str(tmp_path / "tasks.parquet"), "--out", str(tmp_path / "reward")]) == 0
    return read_parquet(tmp_path / "reward" / "scored.parquet", "scored")["token_rewards"].to_list()


def test_stage_switch_wires_the_judge(tmp_path, monkeypatch):
    import stages.reward

    rollouts = _frame([[10, 11, 12, 50, 13, 14, 15, 51], [10, 11, 12, 51, 13, 14, 15, 50],
                       [20, 21, 22]], ["a", "a", "ghost"])
    made = []
    monkeypatch.setattr(stages.reward, "build_judge",
                        lambda kind, model, k_sample, device, dtype:
                        made.append((kind, model, k_sample, str(device), dtype)) or ScriptedJudge())
    monkeypatch.setattr(stages.reward, "_policy_decoder",
                        lambda init: lambda ids: "".join(VOCAB[i] for i in ids))
    tr = _run_stage(tmp_path, rollouts)
    assert made == [("hf", "tiny", 2, "cpu", torch.float32)]  # run.device, model.dtype
    assert tr[0] == pytest.approx([0, 0, 0, 1, 0, 0, 0, -1]) and tr[2] is None  # unknown task


def test_stage_runs_the_cpu_test_judge(tmp_path):
    """The real tiny transformers judge end to end (it answers noise: every verdict is 0)."""
    tr = _run_stage(tmp_path, _frame([[10, 11, 12, 13, 14, 15], [10, 11, 12, 13]], ["a", "a"]))
    assert [len(t) for t in tr] == [6, 4]
    assert all(math.isfinite(x) for t in tr for x in t)


def test_process_reward_params_are_checked(tmp_path):
    p = params_file(tmp_path / "params.yaml", reward={
        "process_reward": "vllm", "process_judge": "tiny", "process_chunk_len": 0})
    with pytest.raises(ConfigError) as e:
        load_params(p)
    assert "process_chunk_len" in str(e.value) and "'tiny' is the transformers CPU test judge" in str(e.value)
    params_file(p, reward={"process_reward": "sometimes"})
    with pytest.raises(ConfigError, match="process_reward"):
        load_params(p)

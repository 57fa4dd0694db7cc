"""Optional process reward: an LLM judge scores chunks of a response; the chunk scores
become per-token rewards aligned to decode steps.

Reference (spec section 3.4; ``sample/llm_process_reward.py``, ``reward/rl_process_reward.py``):
a response of ``L`` tokens is cut into ``n = max(1, floor((L-1)/C)+1)`` chunks of ``C``
tokens; the judge sees the question, the ground truth, whether the response is correct,
the whole response and the prefix up to the end of chunk ``k``, and answers
``\\boxed{1}`` or ``\\boxed{-1}``; it is sampled ``k_sample`` times and any other answer
counts 0. If all samples agree their score is the chunk's, else ``2*correct - 1``. Each
chunk index is then z-scored across the task's responses that have it. Token rewards are
zero except, for a non-final chunk, at the positions of the window
``[max(0, end - block_size), end)`` whose decode step equals the window's latest step,
and for the final chunk at every position of the response's latest step.

The judge sits behind the :class:`Judge` protocol: :class:`VLLMJudge` serves it with vLLM
on GPU (imported lazily; the reference hard-codes GPU groups, here tensor parallelism is
an argument), :class:`HFJudge` runs a small local transformers model (CPU tests).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class JudgeRequest:
    question: str
    ground_truth: str
    solution: str  # the whole response
    excerpt: str  # the response up to the end of the chunk being judged
    correct: bool


class Judge(Protocol):
    """Returns, per request, ``k_sample`` raw judge completions."""

    def complete(self, prompts: Sequence[str]) -> list[list[str]]: ...


def judge_prompt(r: JudgeRequest) -> str:
    verdict = "correct" if r.correct else "incorrect"
    return (
        "You are grading a step of a math solution.\n"
        f"Question: {r.question}\nReference answer: {r.ground_truth}\n"
        f"Full solution (final answer is {verdict}):\n{r.solution}\n\n"
        f"Excerpt to grade:\n{r.excerpt}\n\n"
        "Is the reasoning in the excerpt correct and useful? Answer \\boxed{1} for yes, "
        "\\boxed{-1} for no."
    )


_VERDICT_RE = re.compile(r"\\boxed\{\s*(-?1)\s*\}")


def parse_verdict(text: str) -> float:
    """``\\boxed{1}`` -> 1, ``\\boxed{-1}`` -> -1 (the last one counts), anything else 0."""
    hits = _VERDICT_RE.findall(text or "")
    return float(hits[-1]) if hits else 0.0


def aggregate(scores: Sequence[float], correct: bool) -> float:
    """Unanimous samples give their score; otherwise ``2*correct - 1`` (reference rule)."""
    if scores and all(s == scores[0] for s in scores):
        return float(scores[0])
    return 2.0 * float(correct) - 1.0


def chunk_ends(n_tokens: int, chunk_len: int) -> list[int]:
    """End index (exclusive) of each chunk.

    Example:
        >>> chunk_ends(450, 200), chunk_ends(1, 200), chunk_ends(400, 200)
        ([200, 400, 450], [1], [200, 400])
    """
    if chunk_len < 1:
        raise ValueError("chunk_len must be >= 1")
    n = max(1, (max(n_tokens, 1) - 1) // chunk_len + 1)
    return [min(n_tokens, (k + 1) * chunk_len) for k in range(n)]


def normalize_chunks(per_response: Sequence[Sequence[float]]) -> list[list[float]]:
    """Z-score each chunk index across the responses that have it (population std; a
    lone value is kept as is, an all-equal column becomes 0)."""
    out = [list(map(float, r)) for r in per_response]
    width = max((len(r) for r in out), default=0)
    for k in range(width):
        rows = [i for i, r in enumerate(out) if len(r) > k]
        if len(rows) < 2:
            continue
        v = np.array([out[i][k] for i in rows])
        std = v.std()
        z = (v - v.mean()) / std if std > 1e-12 else np.zeros_like(v)
        for i, x in zip(rows, z):
            out[i][k] = float(x)
    return out


def token_rewards(decode_steps: Sequence[int], chunk_rewards: Sequence[float], chunk_len: int,
                  block_size: int) -> list[float]:
    """Per-token rewards [L] from chunk rewards, placed at decode steps (see module doc).

    Example:
        >>> token_rewards([1, 2, 2, 3, 4, 4], [0.5, -1.0], chunk_len=4, block_size=2)
        [0.0, 0.0, 0.0, 0.5, -1.0, -1.0]
    """
    steps = np.asarray(decode_steps)
    r = np.zeros(len(steps))
    if not len(steps):
        return []
    ends = chunk_ends(len(steps), chunk_len)
    for k, (end, v) in enumerate(zip(ends, chunk_rewards)):
        if k == len(ends) - 1:
            r[steps == steps.max()] = v
        else:
            lo = max(0, end - block_size)
            win = steps[lo:end]
            r[lo:end][win == win.max()] = v
    return r.tolist()


def process_rewards(
    judge: Judge,
    questions: Sequence[str],
    ground_truths: Sequence[str],
    response_ids: Sequence[Sequence[int]],
    decode_steps: Sequence[Sequence[int]],
    correct: Sequence[bool],
    group_ids: Sequence[str],
    decode: Callable[[Sequence[int]], str],
    *,
    chunk_len: int = 200,
    block_size: int | Sequence[int] = 4,
) -> list[list[float]]:
    """Per-token process rewards for every response (one list [L_j] per response).

    Excerpts are decoded from token-id prefixes (ids cross the boundary; the text is only
    what the judge reads). ``block_size`` is one value or one per response (each
    trajectory carries its own).
    """
    sizes = [block_size] * len(response_ids) if isinstance(block_size, int) else list(block_size)
    requests, owner = [], []
    for j, ids in enumerate(response_ids):
        sol = decode(list(ids))
        for end in chunk_ends(len(ids), chunk_len):
            requests.append(JudgeRequest(questions[j], ground_truths[j], sol,
                                         decode(list(ids[:end])), bool(correct[j])))
            owner.append(j)
    completions = judge.complete([judge_prompt(r) for r in requests]) if requests else []
    raw: list[list[float]] = [[] for _ in response_ids]
    for j, req, outs in zip(owner, requests, completions):
        raw[j].append(aggregate([parse_verdict(o) for o in outs], req.correct))
    out: list[list[float]] = [[] for _ in response_ids]
    for g in set(group_ids):
        members = [j for j, x in enumerate(group_ids) if x == g]
        for j, z in zip(members, normalize_chunks([raw[j] for j in members])):
            out[j] = token_rewards(decode_steps[j], z, chunk_len, sizes[j])
    return out


JUDGES = ("none", "hf", "vllm")


def build_judge(kind: str, model: str, *, k_sample: int = 3, seed: int = 0,
                device: Any = "cpu", dtype: Any = None) -> Judge:
    """The judge of ``reward.process_reward``: ``hf`` loads ``model`` (a local folder or
    hub id) with transformers, or builds the CPU test judge for ``model == "tiny"`` (a
    2-layer random Qwen2 on the embedded tokenizer: it answers noise, so every chunk gets
    the ``2*correct - 1`` fallback or a random unanimous verdict; for wiring tests and
    laptops); ``vllm`` serves ``model`` with vLLM on GPU. An ``hf`` judge runs on ``device``
    in ``dtype`` (default float32), like the policy."""
    if kind == "vllm":
        return VLLMJudge(model, k_sample=k_sample)
    if kind != "hf":
        raise ValueError(f"judge kind must be one of {JUDGES[1:]}, got {kind!r}")
    import torch

    from tracerl.devices import on_host

    dtype = dtype or torch.float32
    if model == "tiny":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        from tracerl.models import build_default_tokenizer

        tok = build_default_tokenizer()
        cfg = Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
        torch.manual_seed(seed)
        lm = on_host(Qwen2ForCausalLM)(cfg)  # the same weights on every device
        return HFJudge(lm.to(device=device, dtype=dtype).eval(), tok, k_sample=k_sample,
                       max_new_tokens=8, seed=seed)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = on_host(AutoModelForCausalLM.from_pretrained)(model, dtype=dtype)
    return HFJudge(lm.to(device).eval(), AutoTokenizer.from_pretrained(model), k_sample=k_sample,
                   seed=seed)


class HFJudge:
    """A local transformers causal LM as judge (small models, CPU tests)."""

    def __init__(self, model: Any, tokenizer: Any, *, k_sample: int = 3, max_new_tokens: int = 32,
                 temperature: float = 1.0, seed: int = 0):
        self.model, self.tokenizer = model, tokenizer
        self.k_sample, self.max_new_tokens = k_sample, max_new_tokens
        self.temperature, self.seed = temperature, seed

    def complete(self, prompts: Sequence[str]) -> list[list[str]]:
        import torch

        torch.manual_seed(self.seed)
        out = []
        for p in prompts:
            ids = self.tokenizer(p, return_tensors="pt")["input_ids"].to(self.model.device)
            gen = self.model.generate(
                ids, do_sample=self.temperature > 0, temperature=max(self.temperature, 1e-5),
                max_new_tokens=self.max_new_tokens, num_return_sequences=self.k_sample,
                pad_token_id=self.tokenizer.pad_token_id or 0)
            out.append([self.tokenizer.decode(g[ids.shape[1]:], skip_special_tokens=True)
                        for g in gen])
        return out


class VLLMJudge:
    """A judge served by vLLM on GPU (``pip install '.[gpu]'``)."""

    def __init__(self, model: str, *, tensor_parallel_size: int = 1, k_sample: int = 3,
                 temperature: float = 0.8, top_p: float = 0.95, max_tokens: int = 512):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as e:
            raise ImportError("VLLMJudge needs vllm on a CUDA machine: pip install '.[gpu]'") from e
        self.llm = LLM(model=model, tensor_parallel_size=tensor_parallel_size)
        self.params = SamplingParams(n=k_sample, temperature=temperature, top_p=top_p,
                                     max_tokens=max_tokens, stop=["</answer>", "User:", "<|im_end|>"])

    def complete(self, prompts: Sequence[str]) -> list[list[str]]:
        outs = self.llm.generate(list(prompts), self.params)
        return [[c.text for c in o.outputs] for o in outs]

"""Benchmark: training tokens/s and MFU of one TraceRL update on the embedded default model.

    python bench/bench_train.py [--params params.yaml] [--threads 2] [--bf16 | --fp32]
                                [--samples 256] [--micro-batch 16] [--repeats 3]

The batch has the shape of one default RL iteration (``rollout.tasks_per_iter`` x
``rollout.responses_per_task`` responses of ``rollout.max_tokens`` tokens, block size and
steps per block from params.yaml, chat-formatted arithmetic prompts). Old log-probs are
recomputed (the worst case: the bf16 path always recomputes them).

Model FLOPs are counted strictly: linear layers over real (non-pad) positions, attention
over *visible* (query, key) pairs only, the LM head over trained positions, x3 for
forward + backward of the training steps and x1 for the old-log-prob forward. The peak is
this machine's measured bf16 matmul throughput (4096^2 matmuls) with the same threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tracerl.config import load_params
from tracerl.data import render_prompt
from tracerl.models import build_default_tokenizer, build_for_tokenizer
from tracerl.rl import PolicyConfig, TokenScorer, TraceSample, TrainConfig, Trainer, policy_update
from tracerl.rl.rows import build_trace_rows, collate


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """Best observed FLOP/s of an ``n x n`` matmul in ``dtype``."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def make_batch(p, tok, n: int, seed: int = 0) -> list[TraceSample]:
    """Trajectories shaped like one default iteration (static decoding: one token per
    step per block, a random order within each block)."""
    g = torch.Generator().manual_seed(seed)
    b, T, R0 = p.model.block_size, p.rollout.steps_per_block, p.rollout.max_tokens
    out = []
    for i in range(n):
        x, y = (int(v) for v in torch.randint(10, 999, (2,), generator=g))
        prompt = render_prompt(tok, f"What is {x}+{y}? Put the answer in \\boxed{{}}.")
        P = len(prompt)
        R = -(-(P + R0) // b) * b - P
        steps, s, j = [], 0, 0
        while j < R:
            nb = b - (P + j) % b
            t = min(nb, T)
            k = torch.cat([torch.arange(t), torch.randint(0, t, (nb - t,), generator=g)])
            steps += (s + 1 + k[torch.randperm(nb, generator=g)]).tolist()
            s, j = s + t, j + nb
        resp = torch.randint(4, len(tok) - 4, (R,), generator=g).tolist()
        out.append(TraceSample(prompt, resp, steps, R, advantage=1.0 if i % 2 else -1.0,
                               attention="block", block_size=b))
    return out


def model_flops(lm, samples, micro_batch: int) -> tuple[float, int]:
    """(forward FLOPs of one pass over the rows, trained tokens)."""
    c = lm.config
    d, inter, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    hd = getattr(c, "head_dim", None) or d // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    per_pos = L * 2 * (d * q + 2 * d * kv + q * d + 3 * d * inter)
    rows, st = build_trace_rows(samples, block_size=lm.block_size, mask_id=lm.tokens.mask_id)
    flops = 0.0
    for i in range(0, len(rows), micro_batch):
        bt = collate(rows[i:i + micro_batch], lm.tokens.pad_id)
        real = sum(len(r) for r in rows[i:i + micro_batch])
        pairs = int(bt.visible.sum())
        flops += per_pos * real + L * 4 * pairs * q + 2 * bt.num_targets * d * c.vocab_size
    return flops, st.targets


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fp32", action="store_true", help="train in fp32 (default bf16 autocast)")
    ap.add_argument("--samples", type=int, default=0, help="default: one iteration's responses")
    ap.add_argument("--micro-batch", type=int, default=0, help="default: policy.micro_batch")
    ap.add_argument("--copies-per-row", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    p = load_params(a.params)
    tok = build_default_tokenizer()
    m = p.model
    lm = build_for_tokenizer(tok, m.family, block_size=m.block_size, hidden_size=m.hidden_size,
                             num_layers=m.num_layers, num_heads=m.num_heads,
                             num_kv_heads=m.num_kv_heads, intermediate_size=m.intermediate_size,
                             max_position_embeddings=m.max_position_embeddings)
    n = a.samples or p.rollout.tasks_per_iter * p.rollout.responses_per_task
    mb = a.micro_batch or p.policy.micro_batch
    samples = make_batch(p, tok, n)
    fwd, tokens = model_flops(lm, samples, mb)
    total_flops = 4 * fwd  # old-log-prob forward + training forward/backward (x3)
    cfg = PolicyConfig(copies_per_row=a.copies_per_row)
    trainer = Trainer(TokenScorer(lm), TrainConfig(lr=1e-5, micro_batch=mb, bf16=not a.fp32))
    policy_update(trainer, samples[: mb], cfg)  # warm-up
    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        policy_update(trainer, samples, cfg)
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    peak16, peak32 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
    res = {
        "threads": a.threads, "dtype": "fp32" if a.fp32 else "bf16", "samples": n,
        "micro_batch": mb, "trained_tokens": tokens, "seconds": sec,
        "tokens_per_s": tokens / sec, "model_tflops_per_update": total_flops / 1e12,
        "achieved_gflops": total_flops / sec / 1e9, "peak_bf16_gflops": peak16 / 1e9,
        "peak_fp32_gflops": peak32 / 1e9, "mfu_vs_bf16_peak": total_flops / sec / peak16,
    }
    print(json.dumps(res, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: training tokens/s and MFU of one TraceRL update on the embedded default model,
in each precision, side by side.

    python bench/bench_train.py [--params params.yaml] [--threads 2] [--samples 256]
        [--micro-batch 16] [--repeats 3] [--variants fp32,autocast,bf16]
        [--hidden-size H --num-layers L --intermediate-size I]

Variants (``model.dtype`` x the stage's ``bf16`` flag, see :mod:`tracerl.devices`):
``fp32`` (fp32 weights), ``autocast`` (fp32 weights, bf16 autocast) and ``bf16`` (bf16
weights, fp32 master weights and AdamW moments). A shared machine's speed drifts from
minute to minute, so the variants run interleaved (one update of each per repeat, the
median reported) and the fp32 and bf16 matmul peaks are measured interleaved in the same
run; MFU is quoted against the faster of the two peaks.

The batch has the shape of one default RL iteration (``rollout.tasks_per_iter`` x
``rollout.responses_per_task`` responses of ``rollout.max_tokens`` tokens, block size and
steps per block from params.yaml, chat-formatted arithmetic prompts). Old log-probs are
recomputed (the worst case: the bf16 paths always recompute them).

Model FLOPs are counted strictly: linear layers over real (non-pad) positions, attention
over *visible* (query, key) pairs only, the LM head over trained positions, x3 for
forward + backward of the training steps and x1 for the old-log-prob forward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tracerl.config import load_params
from tracerl.data import render_prompt
from tracerl.devices import cpu_has_fast_bf16, cpu_model
from tracerl.models import build_default_tokenizer, build_for_tokenizer
from tracerl.rl import PolicyConfig, TokenScorer, TraceSample, TrainConfig, Trainer, policy_update
from tracerl.rl.rows import build_trace_rows, collate

PEAK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_peaks(n: int = 2048, reps: int = 5) -> dict[str, float]:
    """Best observed FLOP/s of an ``n x n`` matmul per dtype, the dtypes interleaved (one
    matmul of each per round) so that both see the same machine load."""
    mats = {k: (torch.randn(n, n).to(d), torch.randn(n, n).to(d)) for k, d in PEAK_DTYPES.items()}
    best = dict.fromkeys(mats, 0.0)
    for r in range(reps + 2):
        for k, (a, b) in mats.items():
            t = time.perf_counter()
            a @ b
            if r >= 2:  # two warm-up rounds
                best[k] = max(best[k], 2 * n**3 / (time.perf_counter() - t))
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


VARIANTS = {  # name -> (weight dtype, autocast)
    "fp32": (torch.float32, False),
    "autocast": (torch.float32, True),
    "bf16": (torch.bfloat16, False),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="fp32,autocast,bf16",
                    help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--samples", type=int, default=0, help="default: one iteration's responses")
    ap.add_argument("--micro-batch", type=int, default=0, help="default: policy.micro_batch")
    ap.add_argument("--copies-per-row", type=int, default=0)
    ap.add_argument("--hidden-size", type=int, default=0, help="default: model.hidden_size")
    ap.add_argument("--num-layers", type=int, default=0, help="default: model.num_layers")
    ap.add_argument("--intermediate-size", type=int, default=0,
                    help="default: model.intermediate_size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peak-n", type=int, default=2048,
                    help="matmul size of the peaks (1024 where bf16 is emulated and slow)")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    variants = a.variants.split(",")
    if bad := [v for v in variants if v not in VARIANTS]:
        ap.error(f"unknown variants {bad}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(a.threads)
    p = load_params(a.params)
    tok = build_default_tokenizer()
    m = p.model
    hidden = a.hidden_size or m.hidden_size
    sizes = dict(block_size=m.block_size, hidden_size=hidden,
                 num_layers=a.num_layers or m.num_layers, num_heads=m.num_heads,
                 num_kv_heads=m.num_kv_heads,
                 intermediate_size=a.intermediate_size or m.intermediate_size,
                 max_position_embeddings=m.max_position_embeddings)
    n = a.samples or p.rollout.tasks_per_iter * p.rollout.responses_per_task
    mb = a.micro_batch or p.policy.micro_batch
    samples = make_batch(p, tok, n)
    cfg = PolicyConfig(copies_per_row=a.copies_per_row)
    trainers, times = {}, {v: [] for v in variants}
    for v in variants:
        dtype, autocast = VARIANTS[v]
        lm = build_for_tokenizer(tok, m.family, dtype=dtype, **sizes)
        trainers[v] = Trainer(TokenScorer(lm), TrainConfig(lr=1e-5, micro_batch=mb, bf16=autocast))
        policy_update(trainers[v], samples[: mb], cfg)  # warm-up
    fwd, tokens = model_flops(trainers[variants[0]].module.lm, samples, mb)
    total_flops = 4 * fwd  # old-log-prob forward + training forward/backward (x3)
    peaks = {k: 0.0 for k in PEAK_DTYPES}
    for _ in range(a.repeats):  # interleaved: each variant sees the same load
        for v in variants:
            t = time.perf_counter()
            policy_update(trainers[v], samples, cfg)
            times[v].append(time.perf_counter() - t)
        for k, f in matmul_peaks(a.peak_n).items():
            peaks[k] = max(peaks[k], f)
    fastest = max(peaks, key=peaks.get)
    res = {
        "cpu": cpu_model(), "fast_bf16": cpu_has_fast_bf16(), "threads": a.threads,
        "samples": n, "micro_batch": mb, "trained_tokens": tokens,
        "model": {k: v for k, v in sizes.items() if k != "max_position_embeddings"},
        "model_tflops_per_update": total_flops / 1e12,
        **{f"peak_{k}_gflops": f / 1e9 for k, f in peaks.items()}, "peak_dtype": fastest,
        "variants": {},
    }
    for v in variants:
        sec = statistics.median(times[v])
        res["variants"][v] = {
            "seconds": sec, "seconds_all": times[v], "tokens_per_s": tokens / sec,
            "achieved_gflops": total_flops / sec / 1e9,
            "mfu_vs_fastest_peak": total_flops / sec / peaks[fastest],
        }
    print(json.dumps(res, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

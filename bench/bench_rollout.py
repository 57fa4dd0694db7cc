"""Rollout throughput: cached vs uncached, static vs dynamic, batch 1 and 64.

    python bench/bench_rollout.py [--tokens 256] [--batches 1 64] [--threads 1] [--repeats 2]
    python bench/bench_rollout.py --device cuda --trado   # GPU row: TraDo-4B-sized, random weights
        [--tokens 512 --batches 128 --cached-only]   # the GPU check's row (bench/gpu_check.sh)
    python bench/bench_rollout.py --family llada --tokens 64 --batches 16   # full attention

Model: the embedded default (``ModelParams`` sizes: hidden 128, 4 layers, the
character-level tokenizer), random weights, fp32, with the final RMSNorm gain multiplied
by ``--gain`` (default 40) so that its confidences resemble a trained model's: at
threshold 0.9, dynamic decoding then unmasks ~2.4 tokens per step instead of 1 (with
raw random weights every confidence is ~0.02 and dynamic degenerates to static).
Every sequence decodes exactly ``--tokens`` positions (``ignore_eos``), block size 4,
4 steps per block, temperature 1. Prompts: chat-rendered arithmetic questions of mixed
lengths (29-40 tokens). Timing: best of ``--repeats`` runs after a warm-up
(uncached batch-64 runs once: it is the slow reference).

Columns: tokens/s = decoded positions per second over all sequences; fwd/token = forward
passes each sequence took part in, per decoded token (the trajectories' ``num_forward``);
tokens/step = decoded tokens per denoising step.

``--family llada`` (full attention, LLaDA-style): "cache" is ``full_cache: prefix``, the
approximate prefix cache, against the exact sampler that runs the whole canvas every
step; ``same tokens`` is the share of decoded tokens equal to the exact sampler's with the
same seeds (the approximation's footprint; 1.00 for the exact block-model cache).
"""

from __future__ import annotations

import argparse
import platform
import random
import time

import torch

from tracerl.config import ModelParams
from tracerl.data import render_prompt
from tracerl.models import build_default_tokenizer, build_for_tokenizer
from tracerl.sampling import SamplingConfig, generate


def default_model(gain: float, device: str, dtype: torch.dtype, family: str = "sdar"):
    m = ModelParams()
    tok = build_default_tokenizer()
    model = build_for_tokenizer(
        tok, family, block_size=m.block_size, hidden_size=m.hidden_size,
        num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
        intermediate_size=m.intermediate_size, max_position_embeddings=m.max_position_embeddings,
        dtype=dtype)
    with torch.no_grad():
        model.backbone.model.norm.weight.mul_(gain)
    return model.to(device), tok


def trado_model(device: str, dtype: torch.dtype):
    """TraDo-4B shapes (Qwen3-4B: hidden 2560, 36 layers, 32/8 heads, head_dim 128,
    intermediate 9728, vocab 151936), random weights, with the default tokenizer's ids
    for the special tokens (sampling never looks at the text)."""
    from tracerl.models import build_model
    from tracerl.models.model import SpecialTokens

    tok = build_default_tokenizer()
    tokens = SpecialTokens(mask_id=tok.mask_token_id, pad_id=tok.pad_token_id,
                           stop_ids=(tok.eos_token_id,))
    with torch.device(device):
        model = build_model("sdar", vocab_size=151936, tokens=tokens, block_size=4,
                            hidden_size=2560, num_layers=36, num_heads=32, num_kv_heads=8,
                            intermediate_size=9728, max_position_embeddings=4096,
                            tie_word_embeddings=False, dtype=dtype)
    return model.to(device), tok


def prompts_for(tok, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = (rng.randint(1, 10 ** rng.randint(1, 6)) for _ in range(2))
        out.append(render_prompt(tok, f"What is {a}+{b}?"))
    return out


def measure(model, prompts, cfg, repeats: int, sync) -> dict:
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        trajs = generate(model, prompts, cfg, torch.Generator().manual_seed(0))
        sync()
        best = min(best, time.perf_counter() - t0)
    toks = sum(len(t.response_ids) for t in trajs)
    return {
        "tok_s": toks / best,
        "fwd_tok": sum(t.num_forward for t in trajs) / toks,
        "tok_step": toks / sum(t.num_steps for t in trajs),
        "seconds": best,
        "ids": [t.response_ids for t in trajs],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gain", type=float, default=40.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--trado", action="store_true", help="TraDo-4B-sized random model (GPU)")
    ap.add_argument("--family", default="sdar", choices=["sdar", "llada"])
    ap.add_argument("--cached-only", action="store_true",
                    help="skip the uncached rows (too slow at TraDo-4B size, batch 128)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if args.trado:
        model, tok = trado_model(args.device, torch.bfloat16)
        name = "TraDo-4B-sized (36 layers, hidden 2560), random, bf16"
    else:
        model, tok = default_model(args.gain, args.device, torch.float32, args.family)
        name = (f"embedded default (4 layers, hidden 128, {args.family}), random x gain "
                f"{args.gain:g}, fp32")
    model.eval()
    machine = (torch.cuda.get_device_name() if cuda else
               f"{platform.processor() or platform.machine()}, {args.threads} torch thread(s)")
    print(f"model: {name}; device: {machine}; torch {torch.__version__}; "
          f"{args.tokens} tokens, b=4, T=4\n")
    generate(model, prompts_for(tok, 2), SamplingConfig(max_tokens=8, ignore_eos=True),
             torch.Generator().manual_seed(0))  # warm-up
    full = args.family != "sdar"
    print("| batch | strategy | cache | tokens/s | fwd/token | tokens/step | seconds | cached "
          "speed-up | same tokens |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for bs in args.batches:
        prompts = prompts_for(tok, max(bs, 2) if bs == 1 else bs)
        for strategy in ("low_confidence_static", "low_confidence_dynamic"):
            res = {}
            for use_cache in (True,) if args.cached_only else (True, False):
                cache = ({"full_cache": "prefix" if use_cache else "none"} if full
                         else {"use_cache": use_cache})
                cfg = SamplingConfig(block_size=4, steps_per_block=4, max_tokens=args.tokens,
                                     strategy=strategy, dynamic_threshold=0.9, batch_size=bs,
                                     ignore_eos=True, **cache)
                reps = 1 if (not use_cache and bs > 8) else args.repeats
                res[use_cache] = r = measure(model, prompts, cfg, reps, sync)
                speed = same = ""
                if not use_cache:
                    speed = f"{res[True]['tok_s'] / r['tok_s']:.1f}x"
                    pairs = [(x, y) for a, b in zip(res[True]["ids"], r["ids"])
                             for x, y in zip(a, b)]
                    same = f"{sum(x == y for x, y in pairs) / max(len(pairs), 1):.2f}"
                print(f"| {bs} | {strategy.removeprefix('low_confidence_')} | "
                      f"{('prefix' if full else 'yes') if use_cache else 'no'} | "
                      f"{r['tok_s']:.0f} | {r['fwd_tok']:.2f} | {r['tok_step']:.2f} | "
                      f"{r['seconds']:.1f} | {speed} | {same} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""LoRA vs full fine-tuning on the embedded default: trainable parameters, optimizer-state
bytes, seconds per SFT step and peak RSS, side by side in one run.

    python bench/bench_lora.py [--ranks 8 32] [--steps 10] [--threads 1]

Each configuration runs in its own child process (peak RSS is per process): the embedded
default model (``ModelParams`` sizes: hidden 128, 4 layers, the character tokenizer,
seed 0), ``sft`` settings of params.yaml (block SFT, batch 32, AdamW, lr 2e-3), LoRA on
the seven projections of every layer (``DEFAULT_TARGETS``, alpha 16). Data: 256
chat-rendered arithmetic prompts with a short worked answer. Timing: mean of ``--steps``
optimizer steps after 2 warm-up steps. optimizer state = the bytes of AdamW's tensors
after the steps (two fp32 moments per trainable parameter, plus step counters).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import subprocess
import sys
import time

import torch


def child(rank: int, steps: int, threads: int) -> dict:
    from tracerl.config import ModelParams, SFTParams
    from tracerl.data import render_prompt
    from tracerl.models import build_default_tokenizer, build_for_tokenizer
    from tracerl.models.lora import LoraSpec, apply_lora, parameter_report
    from tracerl.rl import SFTConfig, TokenScorer, TrainConfig, Trainer, sft_train
    from tracerl.rl.rows import TraceSample

    torch.set_num_threads(threads)
    m, s = ModelParams(), SFTParams()
    tok = build_default_tokenizer()
    model = build_for_tokenizer(
        tok, "sdar", block_size=m.block_size, hidden_size=m.hidden_size,
        num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
        intermediate_size=m.intermediate_size, max_position_embeddings=m.max_position_embeddings,
        seed=0)
    if rank:
        apply_lora(model, LoraSpec(rank=rank, alpha=16.0))
    rng = random.Random(0)
    samples = []
    for _ in range(256):
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        resp = tok.encode(f"{a}+{b}={a + b}. The answer is \\boxed{{{a + b}}}") + [tok.eos_token_id]
        samples.append(TraceSample(prompt_ids=render_prompt(tok, f"What is {a}+{b}?"),
                                   response_ids=resp, decode_steps=None, response_len=len(resp)))
    cfg = TrainConfig(lr=s.lr, micro_batch=s.batch_size, warmup_steps=0, seed=0)
    trainer = Trainer(TokenScorer(model), cfg, kind="sft")
    sft_cfg = SFTConfig(method=s.method, lower_p=s.lower_p, upper_p=s.upper_p)
    sft_train(trainer, samples, sft_cfg, 2)  # warm-up
    t0 = time.perf_counter()
    out = sft_train(trainer, samples, sft_cfg, steps)
    dt = (time.perf_counter() - t0) / steps
    rep = parameter_report(trainer.module, trainer.optimizer)
    return {"rank": rank, "s_per_step": dt, "nll": out.get("nll", float("nan")),
            "trainable": rep["params/trainable"], "total": rep["params/total"],
            "opt_bytes": rep["optimizer/state_bytes"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.steps, args.threads)))
        return 0
    print(f"embedded default, block SFT batch 32; {platform.processor() or platform.machine()}, "
          f"{args.threads} torch thread(s); torch {torch.__version__}; mean of {args.steps} "
          "steps\n")
    print("| fine-tuning | trainable params | of total | optimizer state | s/step | "
          "peak RSS | nll |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for rank in [0, *args.ranks]:
        res = subprocess.run([sys.executable, __file__, "--child", str(rank), "--steps",
                              str(args.steps), "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        name = "full" if rank == 0 else f"LoRA r={rank}"
        print(f"| {name} | {r['trainable']:,.0f} | {r['trainable'] / r['total']:.1%} | "
              f"{r['opt_bytes'] / 2**20:.2f} MiB | {r['s_per_step']:.3f} | "
              f"{r['peak_rss_mb']:.0f} MiB | {r['nll']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

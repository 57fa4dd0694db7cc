"""LoRA vs full fine-tuning on the embedded default: trainable parameters, optimizer-state
bytes, seconds per SFT step and peak RSS, side by side in one run.

    python bench/bench_lora.py [--ranks 8 32] [--steps 10] [--threads 1]
    python bench/bench_lora.py --kl [--hidden 768 --layers 12] [--threads 1]

``--kl``: a LoRA policy update with a KL penalty to the reference (``beta > 0``,
``kl_target: reference``) on a larger model (``--hidden``, ``--layers``), with the
reference as a second copy of the weights (``ref_model``) and as the same model with its
adapters switched off (``ref_adapters_off``, what the policy stage does): peak RSS and
seconds per update of each, in its own process, and whether the two give the same loss.

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


def child_kl(mode: str, hidden: int, layers: int, threads: int) -> dict:
    from tracerl.models import build_default_tokenizer, build_for_tokenizer
    from tracerl.models.lora import LoraSpec, apply_lora
    from tracerl.rl import PolicyConfig, TokenScorer, TrainConfig, Trainer, policy_update
    from tracerl.rl.rows import TraceSample

    torch.set_num_threads(threads)
    tok = build_default_tokenizer()

    def build():
        return build_for_tokenizer(tok, "sdar", block_size=4, hidden_size=hidden,
                                   num_layers=layers, num_heads=hidden // 64,
                                   num_kv_heads=hidden // 128, intermediate_size=3 * hidden,
                                   max_position_embeddings=256, seed=0)

    model = build()
    weight_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    ref = build() if mode == "copy" else None
    torch.manual_seed(0)  # peft draws A from the global RNG: the same adapters in both modes
    apply_lora(model, LoraSpec(rank=16, alpha=32.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a policy that has moved from the reference (B != 0)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    rng = random.Random(0)
    samples = [TraceSample(prompt_ids=[rng.randint(5, 90) for _ in range(24)],
                           response_ids=[rng.randint(5, 90) for _ in range(32)],
                           decode_steps=None, response_len=32, attention="block", block_size=4,
                           advantage=rng.choice([-1.0, 1.0])) for _ in range(16)]
    trainer = Trainer(TokenScorer(model), TrainConfig(lr=1e-4, micro_batch=8, seed=0),
                      kind="policy")
    cfg = PolicyConfig(method="random_masking", beta=0.05, kl_target="reference")
    t0 = time.perf_counter()
    m = policy_update(trainer, samples, cfg, ref_model=ref, ref_adapters_off=ref is None)
    return {"mode": mode, "seconds": time.perf_counter() - t0, "loss": m["loss"],
            "kl": m["kl"], "weight_mb": weight_mb,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main_kl(args) -> int:
    print(f"LoRA r=16 policy update with a KL penalty to the reference; hidden {args.hidden}, "
          f"{args.layers} layers; {platform.processor() or platform.machine()}, "
          f"{args.threads} torch thread(s); torch {torch.__version__}\n")
    print("| KL reference | weights | peak RSS | s/update | loss | kl |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode in ("copy", "adapters_off"):
        res = subprocess.run([sys.executable, __file__, "--kl-child", mode, "--hidden",
                              str(args.hidden), "--layers", str(args.layers), "--threads",
                              str(args.threads)], capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        name = "second copy" if mode == "copy" else "adapters off"
        print(f"| {name} | {r['weight_mb']:.0f} MiB | {r['peak_rss_mb']:.0f} MiB | "
              f"{r['seconds']:.1f} | {r['loss']:.6f} | {r['kl']:.6f} |", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kl", action="store_true", help="KL reference: second copy vs adapters off")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--kl-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.steps, args.threads)))
        return 0
    if args.kl_child is not None:
        print(json.dumps(child_kl(args.kl_child, args.hidden, args.layers, args.threads)))
        return 0
    if args.kl:
        return main_kl(args)
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

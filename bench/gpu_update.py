"""One TraceRL policy update at TraDo-4B's shapes on a GPU: seconds and peak memory,
full fine-tuning and LoRA, side by side in one run (issue 12's GPU check).

    python bench/gpu_update.py [--device cuda] [--shape trado-4b] [--samples 32]
        [--max-tokens 512] [--lora-rank 64] [--micro-batch 4]
    python bench/gpu_update.py --device cpu --shape small   # a check of the script

The model is ``bench_rollout.trado_model`` (Qwen3-4B shapes: hidden 2560, 36 layers,
32/8 heads, intermediate 9728, vocabulary 151,936; random weights) in bf16, trained with
fp32 master weights and AdamW moments (the trainer's bf16 path) and gradient
checkpointing. The update's data: ``--samples`` trajectories decoded by the model itself
(static low-confidence decoding, block 4, ``--max-tokens`` new tokens, ``ignore_eos``),
with advantages +1 / -1 alternating, so every trajectory trains. Each mode in its own
process, so its peak memory is its own: ``torch.cuda.max_memory_allocated`` on CUDA,
peak RSS on CPU. ``--kl``: a KL penalty to the reference (``beta 0.05``): a second copy
for full fine-tuning, the base with adapters off for LoRA.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build(shape: str, device: str):
    if shape == "trado-4b":
        from bench_rollout import trado_model

        return trado_model(device, torch.bfloat16)
    from tracerl.models import build_default_tokenizer, build_for_tokenizer

    tok = build_default_tokenizer()
    model = build_for_tokenizer(tok, "sdar", block_size=4, hidden_size=64, num_layers=2,
                                num_heads=2, num_kv_heads=1, intermediate_size=128,
                                max_position_embeddings=1024, dtype=torch.bfloat16, seed=0)
    return model.to(device), tok


def child(mode: str, a) -> dict:
    from bench_rollout import prompts_for
    from tracerl.models.lora import LoraSpec, apply_lora, parameter_report
    from tracerl.rl import PolicyConfig, TokenScorer, TrainConfig, Trainer, policy_update
    from tracerl.rl.io import sample_from_trajectory
    from tracerl.sampling import SamplingConfig, generate

    cuda = a.device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    model, tok = build(a.shape, a.device)
    cfg = SamplingConfig(block_size=4, steps_per_block=4, max_tokens=a.max_tokens,
                         batch_size=a.samples, ignore_eos=True)
    sync()
    t0 = time.perf_counter()
    trajs = generate(model, prompts_for(tok, a.samples), cfg, torch.Generator().manual_seed(0))
    sync()
    decode_s = time.perf_counter() - t0
    samples = [sample_from_trajectory(t, advantage=1.0 if i % 2 else -1.0)
               for i, t in enumerate(trajs)]
    ref = None
    if mode == "lora":
        torch.manual_seed(0)
        apply_lora(model, LoraSpec(rank=a.lora_rank, alpha=2.0 * a.lora_rank))
    elif a.kl:
        ref = build(a.shape, a.device)[0]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(TokenScorer(model), TrainConfig(
        lr=1e-6, micro_batch=a.micro_batch, grad_accum=max(1, a.samples // a.micro_batch),
        gradient_checkpointing=True, seed=0), kind="policy")
    pcfg = PolicyConfig(beta=0.05 if a.kl else 0.0, kl_target="reference",
                        max_len=a.max_tokens + 64)
    sync()
    t0 = time.perf_counter()
    m = policy_update(trainer, samples, pcfg, ref_model=ref,
                      ref_adapters_off=a.kl and mode == "lora")
    sync()
    update_s = time.perf_counter() - t0
    rep = parameter_report(trainer.module, trainer.optimizer)
    peak = (torch.cuda.max_memory_allocated() / 2**30 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return {"mode": mode, "decode_s": decode_s,
            "decode_tok_s": sum(len(t.response_ids) for t in trajs) / decode_s,
            "update_s": update_s, "peak_gib": peak, "steps": m.get("steps", 0.0),
            "tokens": m.get("tokens", 0.0), "loss": m.get("loss", float("nan")),
            "trainable": rep["params/trainable"], "total": rep["params/total"],
            "opt_gib": rep["optimizer/state_bytes"] / 2**30}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="trado-4b", choices=["trado-4b", "small"])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--kl", action="store_true", help="with a KL penalty to the reference")
    ap.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available here (use --device cpu --shape small "
                 "to check the script)")
    if a.child:
        print(json.dumps(child(a.child, a)))
        return 0
    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else "CPU"
    print(f"{a.shape}, bf16 weights + fp32 master/AdamW, gradient checkpointing; {dev}; "
          f"torch {torch.__version__}; {a.samples} trajectories x {a.max_tokens} tokens"
          f"{', KL to the reference' if a.kl else ''}\n")
    print("| update | trainable | optimizer state | decode tok/s | update s | tokens/s | "
          "peak memory | loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode in a.modes:
        cmd = [sys.executable, __file__, "--child", mode, *(argv if argv is not None
                                                            else sys.argv[1:])]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"| {mode} | failed: {res.stderr.strip().splitlines()[-1:]} |", flush=True)
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        name = "full" if mode == "full" else f"LoRA r={a.lora_rank}"
        print(f"| {name} | {r['trainable'] / 1e6:,.2f}M of {r['total'] / 1e6:,.2f}M | "
              f"{r['opt_gib']:.2f} GiB | {r['decode_tok_s']:.0f} | {r['update_s']:.1f} | "
              f"{r['tokens'] / r['update_s']:.0f} | {r['peak_gib']:.2f} GiB | "
              f"{r['loss']:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Compiled vs eager decode step (``rollout.compile``), side by side in one run.

    python bench/bench_compile.py [--tokens 64] [--batches 1 16] [--threads 1] [--repeats 2]
    python bench/bench_compile.py --device cuda --trado   # GPU row: TraDo-4B-sized, random

Model: the embedded default (hidden 128, 4 layers), random weights x ``--gain`` on the
final norm (as ``bench/bench_rollout.py``), fp32, KV-cached block decoding (b=4, T=4,
static), every sequence decodes exactly ``--tokens`` positions (``ignore_eos``).
For each batch size: eager (best of ``--repeats`` after a warm-up), then compiled: the
first compiled run (compile time included), then best of ``--repeats``. compile s = the
first compiled run minus the steady compiled run. graphs = graphs Dynamo compiled for that
row (``torch._dynamo`` counters). same ids/steps: compiled and eager trajectories have
identical token ids and step maps; logprob max |diff| is their largest log-prob gap.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rollout import default_model, prompts_for, trado_model  # noqa: E402
from tracerl.sampling import SamplingConfig, generate  # noqa: E402


def timed(model, prompts, cfg, compile: bool, sync):
    sync()
    t0 = time.perf_counter()
    trajs = generate(model, prompts, cfg, torch.Generator().manual_seed(0), compile=compile)
    sync()
    return time.perf_counter() - t0, trajs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gain", type=float, default=40.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--trado", action="store_true", help="TraDo-4B-sized random model (GPU)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import torch._dynamo as dynamo

    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if args.trado:
        model, tok = trado_model(args.device, torch.bfloat16)
        name = "TraDo-4B-sized (36 layers, hidden 2560), random, bf16"
    else:
        model, tok = default_model(args.gain, args.device, torch.float32)
        name = f"embedded default (4 layers, hidden 128), random x gain {args.gain:g}, fp32"
    model.eval()
    machine = (torch.cuda.get_device_name() if cuda else
               f"{platform.processor() or platform.machine()}, {args.threads} torch thread(s)")
    print(f"model: {name}; device: {machine}; torch {torch.__version__}; "
          f"{args.tokens} tokens, b=4, T=4, static, KV cache\n")
    print("| batch | eager tok/s | compiled tok/s | speed-up | compile s | graphs | "
          "same ids/steps | logprob max abs diff |")
    print("|---:|---:|---:|---:|---:|---:|---|---:|")
    for bs in args.batches:
        prompts = prompts_for(tok, bs)
        cfg = SamplingConfig(block_size=4, steps_per_block=4, max_tokens=args.tokens,
                             batch_size=bs, ignore_eos=True)
        timed(model, prompts[:1], SamplingConfig(max_tokens=8, ignore_eos=True), False, sync)
        eager = min(timed(model, prompts, cfg, False, sync)[0] for _ in range(args.repeats))
        _, ref = timed(model, prompts, cfg, False, sync)
        dynamo.reset()  # compile this row from scratch (and drop the previous row's graphs)
        model.__dict__.pop("_tracerl_compiled", None)
        dynamo.utils.counters.clear()
        first, out = timed(model, prompts, cfg, True, sync)
        graphs = dynamo.utils.counters["stats"]["unique_graphs"]
        steady = min(timed(model, prompts, cfg, True, sync)[0] for _ in range(args.repeats))
        toks = sum(len(t.response_ids) for t in ref)
        same = all(a.response_ids == b.response_ids and a.decode_steps == b.decode_steps
                   for a, b in zip(ref, out))
        gap = max(abs(x - y) for a, b in zip(ref, out) for x, y in zip(a.logprobs, b.logprobs))
        print(f"| {bs} | {toks / eager:.0f} | {toks / steady:.0f} | {eager / steady:.2f}x | "
              f"{first - steady:.0f} | {graphs} | {'yes' if same else 'NO'} | {gap:.1e} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

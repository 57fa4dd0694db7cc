"""Training tokens/s of the embedded default's SFT-shaped step, for thread-policy comparisons.

    source scripts/env.sh && python bench/bench_threads.py                 # alone
    python bench/bench_threads.py & python bench/bench_threads.py; wait    # two at once
    GOMP_SPINCOUNT=100000 python bench/bench_threads.py                    # another spin bound

15 steps of forward + backward + AdamW on a batch of 32 x 96 tokens (hidden 128, 4 layers).
Results: docs/benchmarks.md, "CPU threads".
"""

import time

import torch

from tracerl.models import build_default_tokenizer, build_for_tokenizer


def main(steps: int = 15) -> None:
    tok = build_default_tokenizer()
    m = build_for_tokenizer(tok, "sdar", hidden_size=128, num_layers=4, num_heads=4,
                            num_kv_heads=2, intermediate_size=384)
    opt = torch.optim.AdamW(m.parameters(), 1e-3)
    ids = torch.randint(4, 90, (32, 96), generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    for _ in range(steps):
        loss = m(ids).logits.logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    print(f"{steps * ids.numel() / (time.perf_counter() - t):.0f} tok/s "
          f"({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()

"""The compiled decode step (``rollout.compile``): torch.compile of the sampler's forwards
gives the eager sampler's trajectories.

Token ids and step maps must be identical. Log-probs may differ by float reassociation:
inductor fuses and reorders the fp32 reductions (matmul blocking, RMSNorm, logsumexp over
the vocabulary), a few ulp of the logits' scale: fp32's 6e-8 relative times logits of
order 100 (a sharpened model) is ~1e-5, and bench/bench_compile.py measured 1.3e-5 on the
embedded default with gain 40. The bound 1e-4 leaves room for that and is still far
below what matters for a PPO ratio (exp(1e-4) - 1 = 1e-4 against a clip range of 0.2).
Compiling takes minutes on 2 shared CPU cores, hence one small case.
"""

from __future__ import annotations

import pytest
import torch

from tracerl.models import tiny_model
from tracerl.sampling import SamplingConfig, generate

TINY = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
            max_position_embeddings=128)


@pytest.mark.slow
def test_compiled_decode_gives_the_eager_trajectories():
    import torch._dynamo as dynamo

    model, tok = tiny_model(seed=0, block_size=4, **TINY)
    model.eval()
    with torch.no_grad():  # sharper confidences: low-confidence choices that mean something
        model.backbone.model.norm.weight.mul_(20.0)
    # prompts inside the first block (no prefill graph to compile), tails of 2 and 3 tokens;
    # three blocks: a first denoise, then denoise + commit of the previous block
    prompts = [tok.encode(x) for x in ("3=", "41=", "5=", "97=")]
    cfg = SamplingConfig(block_size=4, steps_per_block=4, max_tokens=12, batch_size=4,
                         ignore_eos=True)
    eager = generate(model, prompts, cfg, torch.Generator().manual_seed(0))
    dynamo.reset()
    dynamo.utils.counters.clear()
    compiled = generate(model, prompts, cfg, torch.Generator().manual_seed(0), compile=True)
    graphs = dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 1  # it really ran compiled (a silent fallback would compile nothing)
    assert len(set(map(len, prompts))) > 1
    for e, c in zip(eager, compiled, strict=True):
        assert c.response_ids == e.response_ids
        assert c.decode_steps == e.decode_steps
        assert c.num_forward == e.num_forward
        assert max(abs(x - y) for x, y in zip(e.logprobs, c.logprobs)) <= 1e-4
    assert len({s for t in eager for s in t.decode_steps}) > 1
    # a second decode reuses the graphs: compiled once per process and model
    again = generate(model, prompts, cfg, torch.Generator().manual_seed(0), compile=True)
    assert dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert [t.response_ids for t in again] == [t.response_ids for t in compiled]

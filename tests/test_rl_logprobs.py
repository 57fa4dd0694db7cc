"""Rollout and training agree: the trainer's log-probs equal the sampler's (fp32, <= 1e-4).

``reference_sample`` is a deliberately plain, uncached block-diffusion sampler written
from the sampling contract (a token unmasked at global step s was predicted from the
block state in which exactly the positions of its block with step < s were unmasked,
clean earlier blocks as context). When ``tracerl.sampling`` exists, the real engine is
checked the same way.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tracerl.models import block_visibility
from tracerl.rl import TraceSample, sample_from_trajectory, trajectory_logprobs


def reference_sample(model, prompt: list[int], *, max_tokens: int = 8, steps_per_block: int = 2,
                     seed: int = 0) -> TraceSample:
    """Low-confidence-static block diffusion, one sequence, no cache; records steps and
    raw-distribution log-probs. Positions after EOS in its block are decoded too."""
    b, mask = model.block_size, model.tokens.mask_id
    g = torch.Generator().manual_seed(seed)
    P = len(prompt)
    total = -(-(P + max_tokens) // b) * b
    x = torch.tensor(prompt + [mask] * (total - P))
    step_of = torch.zeros(total, dtype=torch.long)
    logp_of = torch.zeros(total)
    k = b // steps_per_block
    s_global = 0
    for bs in range(P - P % b, total, b):
        for _ in range(steps_per_block):
            masked = [i for i in range(bs, bs + b) if i >= P and step_of[i] == 0]
            if not masked:
                break
            s_global += 1
            pos = torch.arange(bs + b)
            blk, noisy = pos // b, pos >= bs
            vis = block_visibility(blk[None], noisy[None], blk[None], noisy[None],
                                   torch.ones(1, bs + b, dtype=torch.bool))
            with torch.no_grad():
                logits = model(x[None, :bs + b], visible=vis, position_ids=pos[None]).logits[0, bs:]
            logp = torch.log_softmax(logits.float(), -1)
            probs = logp.exp().clone()
            probs[:, mask] = 0
            tok = torch.multinomial(probs, 1, generator=g).squeeze(-1)
            conf = probs.gather(-1, tok[:, None]).squeeze(-1)
            cand = torch.tensor(masked) - bs
            chosen = cand[conf[cand].topk(min(k, len(cand))).indices]
            for c in chosen.tolist():
                x[bs + c] = tok[c]
                step_of[bs + c] = s_global
                logp_of[bs + c] = logp[c, tok[c]]
        eos = [i for i in range(max(bs, P), bs + b) if x[i].item() in model.tokens.stop_ids]
        if eos:
            total = bs + b
            break
    resp = x[P:total].tolist()
    stop = [i for i, t in enumerate(resp) if t in model.tokens.stop_ids]
    rlen = stop[0] + 1 if stop else len(resp)
    return TraceSample(prompt_ids=prompt, response_ids=resp,
                       decode_steps=step_of[P:total].tolist(), response_len=rlen,
                       logprobs=logp_of[P:total].tolist(), attention="block", block_size=b)


@pytest.mark.parametrize("P", [4, 5, 7])
@pytest.mark.parametrize("copies_per_row", [0, 1])
def test_trainer_logprobs_equal_sampler_logprobs(tiny_sdar, P, copies_per_row):
    model, _ = tiny_sdar
    prompts = [torch.randint(4, 90, (P + d,), generator=torch.Generator().manual_seed(P + d)).tolist()
               for d in (0, 2)]  # two prompt lengths in one batch: padding across rows
    samples = [reference_sample(model, p, max_tokens=8, steps_per_block=2, seed=i)
               for i, p in enumerate(prompts)]
    # steps are shared by 2 tokens each (b=4, T=2) and grow across blocks
    assert samples[0].decode_steps[: 4 - P % 4][0] == 1
    got = trajectory_logprobs(model, samples, copies_per_row=copies_per_row, micro_batch=2)
    for s, lp in zip(samples, got):
        want = torch.tensor(s.logprobs[: s.response_len])
        assert lp.shape == want.shape and not torch.isnan(lp).any()
        assert (lp - want).abs().max().item() <= 1e-4


def test_wrong_alignment_would_be_caught(tiny_sdar):
    """The check can fail: scoring with a shuffled step map gives other log-probs."""
    model, _ = tiny_sdar
    s = reference_sample(model, list(range(10, 15)), max_tokens=8, steps_per_block=4, seed=3)
    bad = replace(s, decode_steps=list(reversed(s.decode_steps)))
    lp = trajectory_logprobs(model, [bad])[0]
    assert (lp - torch.tensor(s.logprobs[: s.response_len])).abs().max().item() > 1e-3


def test_real_sampler_logprobs_match(tiny_sdar):
    sampling = pytest.importorskip("tracerl.sampling")
    model, _ = tiny_sdar
    cfg = sampling.SamplingConfig(block_size=4, steps_per_block=2, max_tokens=8,
                                  strategy="low_confidence_static", temperature=1.0,
                                  batch_size=4, use_cache=True)
    prompts = [list(range(10, 10 + n)) for n in (4, 5, 7)]
    trajs = sampling.generate(model, prompts, cfg, generator=torch.Generator().manual_seed(0))
    samples = [sample_from_trajectory(t) for t in trajs]
    for s, lp in zip(samples, trajectory_logprobs(model, samples)):
        assert (lp - torch.tensor(list(s.logprobs[: s.response_len]))).abs().max().item() <= 1e-4

"""The sampler on the real tiny model (2 layers, hidden 32, fp32): cache equivalence,
recorded log-probs against an independent re-scoring, batched == one by one, trajectory
invariants, records."""

from __future__ import annotations

import dataclasses

import polars as pl
import pytest
import torch

from tracerl.models import block_visibility, build_for_tokenizer
from tracerl.models.masks import full_visibility
from tracerl.sampling import (
    SamplingConfig,
    frame_to_trajectories,
    generate,
    trajectories_to_frame,
    transfer_schedule,
)
from tracerl.schemas import DECODING, ROLLOUT, SCORED, read_parquet, write_parquet

LENGTHS = [3, 9, 14, 4, 17, 6]  # mixed P mod 4


def _prompts(n_lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 90, (n,), generator=g).tolist() for n in n_lengths]


def _gen(model, prompts, seed=0, **kw):
    cfg = SamplingConfig(**{"max_tokens": 16, **kw})
    return generate(model, prompts, cfg, torch.Generator().manual_seed(seed))


class Recorder:
    """Wraps a model and keeps the logits of every forward that returns them."""

    def __init__(self, model):
        self.model = model
        self.logits: list[torch.Tensor] = []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        if out.logits is not None:
            self.logits.append(out.logits.clone())
        return out


def _same(a, b, tol=1e-5):
    assert [t.response_ids for t in a] == [t.response_ids for t in b]
    assert [t.decode_steps for t in a] == [t.decode_steps for t in b]
    assert [(t.response_len, t.finish_reason) for t in a] == [(t.response_len, t.finish_reason) for t in b]
    for x, y in zip(a, b):
        assert max(abs(u - v) for u, v in zip(x.logprobs, y.logprobs)) <= tol


# ------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("P", [5, 8, 11])
def test_cached_logits_equal_uncached(tiny_sdar, P):
    model, _ = tiny_sdar
    [prompt] = _prompts([P], seed=P)
    runs = {}
    for use_cache in (True, False):
        rec = Recorder(model)
        runs[use_cache] = (_gen(rec, [prompt], seed=1, use_cache=use_cache,
                                strategy="low_confidence_dynamic", dynamic_threshold=0.02),
                           rec.logits)
    (tc, lc), (tu, lu) = runs[True], runs[False]
    assert len(lc) == len(lu) > 0  # one logits tensor per denoising step
    assert max((a - b).abs().max().item() for a, b in zip(lc, lu)) <= 1e-5
    _same(tc, tu)


def test_cached_equals_uncached_batched_mixed_lengths(tiny_sdar):
    model, _ = tiny_sdar
    prompts = _prompts()
    for strategy in ("low_confidence_static", "entropy_bounded"):
        _same(_gen(model, prompts, strategy=strategy, entropy_bound=2.0),
              _gen(model, prompts, strategy=strategy, entropy_bound=2.0, use_cache=False))


def _rescore_block_model(model, t):
    """Log-probs of every response token, recomputed from the trace alone: for a token
    unmasked at step v, its block holds the tokens with step < v (and the prompt tail),
    masks elsewhere, over the clean prefix, in one uncached forward."""
    b, P, mask = t.block_size, len(t.prompt_ids), model.tokens.mask_id
    seq = torch.tensor(t.prompt_ids + t.response_ids)
    steps = torch.tensor([0] * P + t.decode_steps)
    out = []
    for q in range(P, len(seq)):
        s0 = q // b * b
        block = seq[s0:s0 + b].clone()
        block[steps[s0:s0 + b] >= steps[q]] = mask
        ids = torch.cat([seq[:s0], block])
        pos = torch.arange(len(ids))
        noisy = pos >= s0
        vis = block_visibility((pos // b)[None], noisy[None], (pos // b)[None], noisy[None],
                               torch.ones(1, len(ids), dtype=torch.bool))
        logits = model(ids[None], visible=vis, position_ids=pos[None]).logits[0, q]
        out.append(torch.log_softmax(logits.float(), -1)[seq[q]].item())
    return out


def test_recorded_logprobs_match_an_independent_rescoring(tiny_sdar):
    model, _ = tiny_sdar
    trajs = _gen(model, _prompts([7, 12]), seed=3, strategy="low_confidence_dynamic",
                 dynamic_threshold=0.02, top_k=20, top_p=0.9, temperature=0.8)
    for t in trajs:
        ref = _rescore_block_model(model, t)
        assert max(abs(a - b) for a, b in zip(ref, t.logprobs)) <= 1e-5


def test_full_attention_logprobs_match_rescoring(default_tokenizer):
    model = build_for_tokenizer(default_tokenizer, "llada", seed=1)
    [t] = _gen(model, _prompts([6]), seed=2, max_tokens=12)
    P, mask = len(t.prompt_ids), model.tokens.mask_id
    seq = torch.tensor(t.prompt_ids + t.response_ids)
    steps = torch.tensor([0] * P + t.decode_steps)
    for q in range(P, P + t.response_len):
        ids = seq.clone()
        ids[steps >= steps[q]] = mask  # the whole canvas as it was at that step
        vis = full_visibility(torch.ones(1, len(ids), dtype=torch.bool), len(ids))
        logits = model(ids[None], visible=vis, position_ids=torch.arange(len(ids))[None]).logits
        lp = torch.log_softmax(logits[0, q], -1)[seq[q]].item()
        assert abs(lp - t.logprobs[q - P]) <= 1e-5


def test_full_attention_prefix_cache(default_tokenizer):
    """full_cache='prefix' (Fast-dLLM's approximate prefix cache): a block's first step
    runs the whole canvas, so with one step per block it is the exact sampler bit for bit;
    with more steps, tokens unmasked at a block's first step keep the exact log-prob
    (re-scored independently on the canvas as it was), later ones are approximate, and
    the cached sampler runs fewer canvas columns."""
    model = build_for_tokenizer(default_tokenizer, "llada", seed=1)
    prompts = _prompts([6, 9, 3])
    kw = dict(max_tokens=16, strategy="low_confidence_static", batch_size=3)
    one = dict(kw, steps_per_block=1, block_size=2)
    _same(_gen(model, prompts, seed=4, **one), _gen(model, prompts, seed=4, full_cache="prefix",
                                                     **one))
    cols = []
    real = model.forward

    def counting(ids, *a, **k):
        cols.append(ids.shape[1])
        return real(ids, *a, **k)

    model.forward = counting
    trajs = _gen(model, prompts, seed=5, full_cache="prefix", **kw)
    cached_cols, cols[:] = sum(cols), []
    _gen(model, prompts, seed=5, **kw)
    assert cached_cols < 0.8 * sum(cols)
    model.forward = real
    mask, first_step = model.tokens.mask_id, 0
    for t in trajs:
        assert t.sampling.full_cache == "prefix"
        P = len(t.prompt_ids)
        seq = torch.tensor(t.prompt_ids + t.response_ids)
        steps = torch.tensor([0] * P + t.decode_steps)
        # the first step of block j of this row: the smallest step of its block
        blocks = [(P + j) // 4 for j in range(len(t.decode_steps))]
        block_first = {b: min(s for s, bb in zip(t.decode_steps, blocks) if bb == b)
                       for b in set(blocks)}
        for q in range(P, P + t.response_len):
            if t.decode_steps[q - P] != block_first[blocks[q - P]]:
                assert torch.isfinite(torch.tensor(t.logprobs[q - P]))
                continue
            ids = seq.clone()
            ids[steps >= steps[q]] = mask
            vis = full_visibility(torch.ones(1, len(ids), dtype=torch.bool), len(ids))
            logits = model(ids[None], visible=vis, position_ids=torch.arange(len(ids))[None]).logits
            lp = torch.log_softmax(logits[0, q], -1)[seq[q]].item()
            assert abs(lp - t.logprobs[q - P]) <= 1e-5
            first_step += 1
    assert first_step >= 3
    with pytest.raises(ValueError, match="full_cache must be one of none, prefix"):
        SamplingConfig(full_cache="dual")


# -------------------------------------------------------------------- determinism


@pytest.mark.parametrize("family", ["sdar", "dream"])
def test_batched_equals_one_by_one_mixed_lengths(default_tokenizer, family):
    model = build_for_tokenizer(default_tokenizer, family, seed=0)
    prompts = _prompts()
    kw = dict(strategy="low_confidence_dynamic", dynamic_threshold=0.02, top_k=30, top_p=0.95)
    batched = _gen(model, prompts, batch_size=len(prompts), **kw)
    # one by one: each prompt alone, fed the same per-prompt seed stream
    g = torch.Generator().manual_seed(0)
    seeds = torch.randint(0, 2**62, (len(prompts),), generator=g).tolist()
    from tracerl.sampling import decode_batch

    cfg = SamplingConfig(max_tokens=16, **kw)
    single = [decode_batch(model, [p], [s], cfg)[0] for p, s in zip(prompts, seeds)]
    _same(batched, single)
    _same(batched, _gen(model, prompts, batch_size=2, **kw))  # other groupings


def test_seeded_reproducible_and_seed_sensitive(tiny_sdar):
    model, _ = tiny_sdar
    prompts = _prompts([5, 5])
    a, b = _gen(model, prompts, seed=7), _gen(model, prompts, seed=7)
    assert [t.response_ids for t in a] == [t.response_ids for t in b]
    assert a[0].response_ids != a[1].response_ids  # same prompt, own random streams
    assert _gen(model, prompts, seed=8)[0].response_ids != a[0].response_ids
    g1 = _gen(model, prompts, temperature=0.0)
    assert g1 == _gen(model, prompts, seed=99, temperature=0.0)  # greedy ignores the seed


# --------------------------------------------------------------------- invariants


def _check_invariants(t, cfg, mask_id, stop_ids):
    b, P = cfg.block_size, len(t.prompt_ids)
    n = len(t.response_ids)
    assert n == len(t.decode_steps) == len(t.logprobs)
    assert (P + n) % b == 0  # records end on a block boundary
    assert mask_id not in t.response_ids
    assert all(s >= 1 for s in t.decode_steps)  # each response token has exactly one step
    assert all(lp <= 0 for lp in t.logprobs)
    stops = [k for k, x in enumerate(t.response_ids) if x in stop_ids]
    if t.finish_reason == "eos":
        assert t.response_len == stops[0] + 1 and (P + stops[0]) // b == (P + n - 1) // b
    else:
        assert t.response_len == n == cfg.max_tokens - P % b and not stops
    blocks: dict[int, list[int]] = {}
    for k, s in enumerate(t.decode_steps):
        blocks.setdefault((P + k) // b, []).append(s)
    prev_max = 0
    sched = transfer_schedule(b, cfg.steps_per_block)
    for j in sorted(blocks):
        steps = blocks[j]
        assert min(steps) == prev_max + 1  # steps continue across blocks, non-decreasing
        distinct = sorted(set(steps))
        assert distinct == list(range(min(steps), max(steps) + 1))  # >= 1 token per step
        assert len(distinct) <= cfg.steps_per_block
        counts = [steps.count(s) for s in distinct]
        if cfg.strategy in ("low_confidence_static", "sequential"):
            rem, want = len(steps), []
            for c in sched:
                if rem == 0:
                    break
                want.append(min(c, rem))
                rem -= want[-1]
            assert counts == want, (counts, want)
        prev_max = max(steps)
    assert t.num_forward >= prev_max


@pytest.mark.parametrize("strategy,T", [("low_confidence_static", 4), ("low_confidence_static", 3),
                                        ("low_confidence_dynamic", 4), ("entropy_bounded", 2),
                                        ("sequential", 2)])
def test_trajectory_invariants(tiny_sdar, strategy, T):
    model, _ = tiny_sdar
    cfg = SamplingConfig(max_tokens=24, steps_per_block=T, strategy=strategy,
                         dynamic_threshold=0.03, entropy_bound=9.0)
    for seed in range(3):
        trajs = generate(model, _prompts(seed=seed), cfg, torch.Generator().manual_seed(seed))
        for t in trajs:
            _check_invariants(t, cfg, model.tokens.mask_id, model.tokens.stop_ids)


class BoostStop(Recorder):
    """Adds ``delta`` to the stop token's logit, so that a random model ends responses."""

    def __init__(self, model, delta):
        super().__init__(model)
        self.delta = delta

    def __call__(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        if out.logits is not None:
            out.logits[..., self.model.tokens.stop_ids[0]] += self.delta
        return out


def test_eos_responses_occur_and_are_cut(tiny_sdar):
    model = BoostStop(tiny_sdar[0], 3.0)
    cfg = SamplingConfig(max_tokens=32)
    trajs = generate(model, _prompts() * 3, cfg, torch.Generator().manual_seed(0))
    eos = [t for t in trajs if t.finish_reason == "eos"]
    assert eos, "the boosted stop token should end some responses"
    for t in trajs:
        _check_invariants(t, cfg, model.tokens.mask_id, model.tokens.stop_ids)
    short = min(eos, key=lambda t: len(t.response_ids))
    assert len(short.response_ids) < cfg.max_tokens - len(short.prompt_ids) % 4


def test_full_attention_invariants(default_tokenizer):
    model = build_for_tokenizer(default_tokenizer, "llada", seed=3)
    cfg = SamplingConfig(max_tokens=16, strategy="low_confidence_static")
    for t in generate(model, _prompts(), cfg, torch.Generator().manual_seed(0)):
        if t.finish_reason == "length":
            _check_invariants(t, cfg, model.tokens.mask_id, model.tokens.stop_ids)
        assert len(t.prompt_ids) + len(t.response_ids) == len(t.prompt_ids) // 4 * 4 + 16


# ------------------------------------------------------------------------ records


def test_frame_roundtrip_through_parquet(tiny_sdar, tmp_path):
    model, tok = tiny_sdar
    trajs = _gen(model, [tok.encode("<|im_start|>user\n1+2<|im_end|>\n")] * 2)
    df = trajectories_to_frame(trajs, ["t0", "t0"], [0, 1], "abc123", tok)
    path = write_parquet(df, tmp_path / "rollouts.parquet", "rollout")
    back = read_parquet(path, "rollout")
    assert back.height == 2 and back["block_size"].to_list() == [4, 4]
    assert back["response_text"][0] == tok.decode(trajs[0].response_ids[: trajs[0].response_len],
                                                  skip_special_tokens=True)
    again = frame_to_trajectories(back)
    assert [t.response_ids for t in again] == [t.response_ids for t in trajs]
    assert again[0].logprobs == pytest.approx(trajs[0].logprobs, abs=1e-6)
    with pytest.raises(ValueError, match="task ids"):
        trajectories_to_frame(trajs, ["t0"], [0, 1], "abc", tok)
    assert isinstance(trajectories_to_frame([], [], [], "x", tok), pl.DataFrame)


@pytest.mark.parametrize("family", ["sdar", "llada"])
def test_records_carry_the_decoding_contract(default_tokenizer, tmp_path, family):
    """Every ROLLOUT/SCORED row records how it was decoded (schemas.DECODING): attention,
    block size and the sampling settings, as given to the sampler, surviving parquet."""
    model = build_for_tokenizer(default_tokenizer, family, seed=0)
    cfg = SamplingConfig(block_size=8, steps_per_block=3, max_tokens=16,
                         strategy="low_confidence_dynamic", dynamic_threshold=0.7,
                         temperature=0.9, top_k=5, top_p=0.95, batch_size=2)
    trajs = generate(model, [[5, 6, 7], [8, 9]], cfg, torch.Generator().manual_seed(0))
    assert all(t.sampling == cfg and t.block_size == 8 for t in trajs)
    df = trajectories_to_frame(trajs, ["t0", "t1"], [0, 0], "w", default_tokenizer)
    assert set(DECODING) <= set(ROLLOUT) and set(DECODING) <= set(SCORED)
    back = read_parquet(write_parquet(df, tmp_path / "r.parquet", "rollout"), "rollout")
    attention = "block" if family == "sdar" else "full"
    want = {"attention": attention, "block_size": 8, "steps_per_block": 3, "max_tokens": 16,
            "strategy": "low_confidence_dynamic", "dynamic_threshold": 0.7,
            "entropy_bound": 0.35, "temperature": 0.9, "top_k": 5, "top_p": 0.95,
            "full_cache": "none"}
    assert set(want) == set(DECODING)
    for col, v in want.items():
        assert back[col].to_list() == [v, v], col
    again = frame_to_trajectories(back)  # execution settings (batch size) are not recorded
    decoded_with = dataclasses.replace(cfg, batch_size=SamplingConfig().batch_size)
    assert [(t.attention, t.sampling) for t in again] == [(attention, decoded_with)] * 2

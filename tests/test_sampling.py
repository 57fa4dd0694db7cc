"""Sampler unit and property tests on pure functions and a mock model with fixed logits.

The mock's logits depend only on the position, so with greedy decoding (temperature 0,
confidence = softmax at temperature 1) the unmasking order of every strategy can be
derived by hand. Vocabulary of the mock: 16 ids; pad 0, stop 2, mask 3; the candidate at
every position is id 10 with logit ``L`` (all other ids 0), so its confidence is
``e^L / (e^L + 14)`` (the mask id is excluded from the distribution).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tracerl.models.model import FAMILIES, ModelOutput, SpecialTokens
from tracerl.sampling import SamplingConfig, generate, process_logits, transfer_schedule
from tracerl.sampling.strategies import (
    STRATEGIES,
    draw_tokens,
    entropy_bounded,
    low_confidence_dynamic,
    low_confidence_static,
    sequential,
    top_ranked,
)

V, PAD, STOP, MASK, CAND = 16, 0, 2, 3, 10


class FixedLogits:
    """A stand-in for DiffusionLM whose logits at position p are ``table[p]``."""

    def __init__(self, levels: dict[int, float], family: str = "sdar", n_pos: int = 64,
                 tokens: dict[int, int] | None = None):
        self.table = torch.zeros(n_pos, V)
        for p in range(n_pos):
            self.table[p, (tokens or {}).get(p, CAND)] = levels.get(p, 0.0)
        self.family = FAMILIES[family]
        self.tokens = SpecialTokens(mask_id=MASK, pad_id=PAD, stop_ids=(STOP,))
        self.block_size = 4
        self.config = SimpleNamespace(num_hidden_layers=1, num_key_value_heads=1, head_dim=1,
                                      hidden_size=1, num_attention_heads=1,
                                      max_position_embeddings=n_pos, vocab_size=V)
        self.device = torch.device("cpu")
        self.calls: list[tuple[int, bool]] = []  # (query length, returned logits)

    def compute_dtype(self):
        return torch.float32

    def __call__(self, input_ids, *, visible=None, position_ids=None, cache=None, keep=None,
                 return_logits=True):
        assert visible.shape[:2] == input_ids.shape and visible.dtype == torch.bool
        self.calls.append((input_ids.shape[1], return_logits))
        if not return_logits:
            return ModelOutput(None, None)
        logits = self.table[position_ids]
        return ModelOutput(logits if keep is None else logits[:, keep], None)


def run(model, prompt_len=4, greedy=True, **kw):
    cfg = SamplingConfig(**{"max_tokens": 8, "temperature": 0.0 if greedy else 1.0, **kw})
    prompt = [5 + i % 4 for i in range(prompt_len)]
    return generate(model, [prompt], cfg, torch.Generator().manual_seed(0))[0]


# ------------------------------------------------------------------- pure functions


def test_transfer_schedule_hand_derived():
    assert transfer_schedule(4, 4) == [1, 1, 1, 1]
    assert transfer_schedule(4, 2) == [2, 2]
    assert transfer_schedule(5, 3) == [2, 2, 1]  # floor(5/3)=1, 5 mod 3 = 2 extra
    assert transfer_schedule(8, 3) == [3, 3, 2]
    assert transfer_schedule(3, 5) == [1, 1, 1, 0, 0]


def test_process_logits_mask_temperature_topk_topp():
    z = torch.tensor([1.0, 2.0, 0.0, 9.0])  # id 3 = mask: never sampled
    p = process_logits(z, mask_id=3)
    assert p[3] == 0 and math.isclose(p.sum().item(), 1.0, rel_tol=1e-6)
    e = [math.e ** 1, math.e ** 2, 1.0]
    assert math.isclose(p[1].item(), e[1] / sum(e), rel_tol=1e-6)
    # temperature 2: logits halved
    p2 = process_logits(z, mask_id=3, temperature=2.0)
    e2 = [math.e ** 0.5, math.e ** 1, 1.0]
    assert math.isclose(p2[0].item(), e2[0] / sum(e2), rel_tol=1e-6)
    # top-k 1 keeps only id 1 (the mask does not count)
    assert process_logits(z, mask_id=3, top_k=1).tolist() == [0.0, 1.0, 0.0, 0.0]
    # top-p: probs (0.245, 0.665, 0.090): 0.5 keeps id 1 only; 0.8 keeps ids 1 and 0
    assert (process_logits(z, 3, top_p=0.5) > 0).tolist() == [False, True, False, False]
    assert (process_logits(z, 3, top_p=0.8) > 0).tolist() == [True, True, False, False]
    assert z.tolist() == [1.0, 2.0, 0.0, 9.0]  # the input is not modified


def test_draw_tokens_follows_the_distribution():
    p = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0])
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    draws = torch.cat([draw_tokens(p.expand(2, 1000, 5), gens, greedy=False).flatten()
                       for _ in range(10)])  # 20000 draws
    freq = torch.bincount(draws, minlength=5) / draws.numel()
    assert freq[1] == 0 and freq[4] == 0  # zero-mass ids never drawn
    assert (freq - p).abs().max() < 0.015  # 4 sigma at n=20000
    # each row's draws come from its own generator only
    one = draw_tokens(p.expand(1, 4, 5), [torch.Generator().manual_seed(7)], greedy=False)
    two = draw_tokens(p.expand(2, 4, 5), [torch.Generator().manual_seed(3),
                                          torch.Generator().manual_seed(7)], greedy=False)
    assert torch.equal(one[0], two[1])


def test_strategies_on_hand_tensors():
    conf = torch.tensor([[0.95, 0.20, 0.91, 0.50]])
    masked = torch.tensor([[True, True, True, True]])
    probs = torch.zeros(1, 4, 3)
    # static: the n most confident masked positions
    assert low_confidence_static(conf, probs, masked, 2, 0.9, 0.35).tolist() == [[True, False, True, False]]
    # dynamic: both above 0.9 even though n = 1
    assert low_confidence_dynamic(conf, probs, masked, 1, 0.9, 0.35).tolist() == [[True, False, True, False]]
    # dynamic, nothing above 0.99: falls back to the top n = 1 (at least one per step)
    assert low_confidence_dynamic(conf, probs, masked, 1, 0.99, 0.35).tolist() == [[True, False, False, False]]
    # sequential ignores confidence
    partly = torch.tensor([[False, True, True, True]])
    assert sequential(conf, probs, partly, 2, 0.9, 0.35).tolist() == [[False, True, True, False]]
    # fewer masked than scheduled: only the masked one, never an unmasked position
    one = torch.tensor([[False, False, True, False]])
    assert low_confidence_static(conf, probs, one, 3, 0.9, 0.35).tolist() == [[False, False, True, False]]
    assert top_ranked(conf, one, torch.tensor([4])).tolist() == [[False, False, True, False]]


def test_entropy_bounded_hand_derived():
    # entropies: one-hot rows (H=0), uniform over 2 (ln 2 = 0.693), uniform over 4 (1.386)
    rows = [[1, 0, 0, 0], [0.5, 0.5, 0, 0], [0.25] * 4, [1, 0, 0, 0]]
    probs = torch.tensor([rows])
    conf = torch.zeros(1, 4)
    masked = torch.ones(1, 4, dtype=torch.bool)
    # sorted H = [0, 0, 0.693, 1.386]; cumsum < 0.35 for the first two -> k = 2
    assert entropy_bounded(conf, probs, masked, 1, 0.9, 0.35).tolist() == [[True, False, False, True]]
    # bound 0.8: cumsum [0, 0, 0.693, 2.08] -> k = 3
    assert entropy_bounded(conf, probs, masked, 1, 0.9, 0.8).tolist() == [[True, True, False, True]]
    # nothing below the bound: still one (the lowest entropy)
    only_high = torch.tensor([[False, True, True, False]])
    assert entropy_bounded(conf, probs, only_high, 1, 0.9, 0.35).tolist() == [[False, True, False, False]]


def test_unknown_strategy_lists_valid_ones():
    with pytest.raises(ValueError, match="low_confidence_dynamic"):
        STRATEGIES.get("greedy_magic")


# ------------------------------------------------------------ mock-model schedules


def test_static_unmasks_exactly_the_schedule():
    # P=4, b=4: block 1 = positions 4..7, block 2 = 8..11. Levels order the confidences.
    model = FixedLogits({4: 1, 5: 4, 6: 2, 7: 3, 8: 0.5, 9: 3, 10: 2, 11: 1})
    t = run(model, steps_per_block=4)
    # T=4, one per step, most confident first: block 1 -> 5,7,6,4; block 2 -> 9,10,11,8
    assert t.decode_steps == [4, 1, 3, 2, 8, 5, 6, 7]
    assert t.response_ids == [CAND] * 8 and t.finish_reason == "length" and t.response_len == 8
    t2 = run(model, steps_per_block=2)  # schedule [2, 2]: {5,7} then {4,6}; {9,10} then {8,11}
    assert t2.decode_steps == [2, 1, 2, 1, 4, 3, 3, 4]
    # forwards: 1 prefill + 2 denoising steps per block; block 1's commit rides along
    # with block 2's first step, and the last block is never committed
    assert t2.num_forward == 1 + 2 * 2


def test_static_first_block_with_prompt_tail():
    # P=6, b=4: the first block holds 2 tail tokens and 2 response slots (positions 6, 7)
    model = FixedLogits({6: 1, 7: 2, 8: 0, 9: 3, 10: 2, 11: 1})
    t = run(model, prompt_len=6, steps_per_block=4)
    # budget 8 = two whole blocks: 2 + 4 response positions; first block takes 2 steps
    assert len(t.response_ids) == 6
    assert t.decode_steps == [2, 1, 6, 3, 4, 5]
    # P=7 (tail 3), T=2, schedule [2, 2]: one masked slot -> min(2, 1) = 1 token at step 1
    t = run(FixedLogits({}), prompt_len=7, steps_per_block=2)
    assert t.decode_steps[:1] == [1] and sorted(t.decode_steps[1:]) == [2, 2, 3, 3]


def test_dynamic_threshold_and_at_least_one():
    # confidence e^L/(e^L+14) > 0.9 iff L > ln(126) = 4.84
    model = FixedLogits({4: 6, 5: 6, 6: 1, 7: 6, 8: 1, 9: 2, 10: 3, 11: 0})
    t = run(model, strategy="low_confidence_dynamic", dynamic_threshold=0.9)
    # block 1: {4,5,7} above the threshold at step 1, then 6; block 2: none above -> top-1
    assert t.decode_steps == [1, 1, 2, 1, 5, 4, 3, 6]
    steps = t.decode_steps
    assert all(steps.count(s) >= 1 for s in range(1, max(steps) + 1))


def test_entropy_bounded_order_and_last_step_flush():
    # L=100: near one-hot (H ~ 0); L=0: uniform over 15 ids (H = ln 15 = 2.71)
    model = FixedLogits({4: 100, 5: 100, 6: 0, 7: 100})
    t = run(model, strategy="entropy_bounded", entropy_bound=0.35)
    # block 1: cumsum [0, 0, 0, 2.7] < 0.35 -> k=3 {4,5,7}; then 6. block 2: all H equal ->
    # one per step, ties to the leftmost position
    assert t.decode_steps == [1, 1, 2, 1, 3, 4, 5, 6]
    # T=2: one at step 1, then the last step unmasks everything left (no mask is committed)
    t = run(FixedLogits({}), strategy="entropy_bounded", steps_per_block=2)
    assert t.decode_steps == [1, 2, 2, 2, 3, 4, 4, 4]
    assert MASK not in t.response_ids


def test_sequential_left_to_right():
    model = FixedLogits({4: 5, 5: 1, 6: 9, 7: 0})
    assert run(model, strategy="sequential").decode_steps == [1, 2, 3, 4, 5, 6, 7, 8]
    assert run(model, strategy="sequential", steps_per_block=2).decode_steps == [1, 1, 2, 2, 3, 3, 4, 4]


def test_eos_stops_and_keeps_the_whole_block():
    model = FixedLogits({9: 5}, tokens={9: STOP})  # the stop token wins position 9
    t = run(model, max_tokens=16)
    assert t.finish_reason == "eos"
    assert len(t.response_ids) == 8  # positions 4..11: through the end of the EOS block
    assert t.response_len == 6  # positions 4..9
    assert t.response_ids[5] == STOP
    # 1 prefill + 2 blocks x 4 denoising steps; blocks 3 and 4 never run
    assert t.num_forward == 9
    assert len(model.calls) == 9


def test_stop_token_in_prompt_tail_does_not_end_the_response():
    model = FixedLogits({})
    cfg = SamplingConfig(max_tokens=8, temperature=0.0)
    prompt = [5, 6, 7, 8, STOP, 5]  # P=6: the tail (positions 4, 5) holds a stop id
    [t] = generate(model, [prompt], cfg, torch.Generator().manual_seed(0))
    assert t.finish_reason == "length" and t.response_len == len(t.response_ids) == 6


def test_ignore_eos():
    model = FixedLogits({9: 5}, tokens={9: STOP})
    t = run(model, max_tokens=16, ignore_eos=True)
    assert t.finish_reason == "length" and len(t.response_ids) == 16


def test_mask_token_never_emitted():
    model = FixedLogits({p: 50.0 for p in range(64)}, tokens={p: MASK for p in range(64)})
    for kw in ({"greedy": True}, {"greedy": False}, {"greedy": False, "top_k": 1}):
        t = run(model, max_tokens=16, **kw)
        assert MASK not in t.response_ids and all(s >= 1 for s in t.decode_steps)
        # the recorded log-prob is of the raw distribution, where the mask holds ~all mass
        assert max(t.logprobs) < -40


def test_cached_path_never_reencodes_the_prefix():
    model = FixedLogits({})
    cfg = SamplingConfig(max_tokens=12, temperature=0.0)
    generate(model, [[5] * 9], cfg, torch.Generator().manual_seed(0))
    # prefill of the 8 whole prompt tokens once, then only the b=4 block per forward, or
    # 2b=8 when the previous block is committed in the same forward (first step of a block)
    assert model.calls[0] == (8, False)
    assert [n for n, _ in model.calls[1:]] == [4] * 3 + [8, 4, 4, 4] * 2
    assert all(returned for _, returned in model.calls[1:])
    unc = FixedLogits({})
    generate(unc, [[5] * 9], SamplingConfig(max_tokens=12, temperature=0.0, use_cache=False),
             torch.Generator().manual_seed(0))
    assert [n for n, _ in unc.calls] == [12] * 3 + [16] * 4 + [20] * 4  # [prefix | block]


def test_full_attention_record_covers_the_canvas():
    model = FixedLogits({9: 5}, family="llada", tokens={9: STOP})
    t = run(model, max_tokens=16)
    assert t.finish_reason == "eos" and t.response_len == 6
    assert len(t.response_ids) == 16  # whole canvas
    assert t.response_ids[8:] == [PAD] * 8
    assert t.decode_steps[8:] == [9] * 8  # never decoded: masked during steps 1..8
    assert sorted(t.decode_steps[:8]) == list(range(1, 9))
    assert all(n == 20 for n, _ in model.calls)  # the whole canvas every step


# --------------------------------------------------------------------- bad input


def test_config_errors_are_clear_and_complete():
    with pytest.raises(ValueError) as e:
        SamplingConfig(block_size=4, max_tokens=30, strategy="nope", top_p=0.0)
    msg = str(e.value)
    assert "multiple of block_size" in msg and "strategy 'nope' is unknown" in msg
    assert "low_confidence_static" in msg and "top_p" in msg
    with pytest.raises(ValueError, match="steps_per_block .* > block_size"):
        SamplingConfig(block_size=4, steps_per_block=8)
    SamplingConfig(block_size=4, steps_per_block=8, strategy="low_confidence_dynamic")


def test_prompt_errors_are_clear():
    model = FixedLogits({}, n_pos=32)
    cfg = SamplingConfig(max_tokens=16)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[5], []], cfg, g)
    with pytest.raises(ValueError, match="canvas needs 36 positions > the model's context of 32"):
        generate(model, [[5] * 20], cfg, g)
    with pytest.raises(ValueError, match="mask token"):
        generate(model, [[5, MASK]], cfg, g)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[5, V + 3]], cfg, g)
    assert generate(model, [], cfg, g) == []

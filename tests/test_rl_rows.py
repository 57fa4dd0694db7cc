"""Training rows: hand-derived two-block example, shrink, loop vs vectorised, bad input."""

from __future__ import annotations

import pytest
import torch

from tracerl.models import block_visibility, training_layout
from tracerl.rl import (
    TraceSample,
    TrajectoryError,
    block_row,
    build_masked_rows,
    build_trace_rows,
    collate,
    packed_visibility,
    rounds_from_ranks,
    rounds_loop,
    shrink_steps,
    step_ranks,
)
from tracerl.rl.rows import response_blocks

M = 99  # mask id in these hand examples

# Two-block example, b=4, P=6: prompt positions 0..5, so the prompt tail (positions 4, 5)
# shares block 1 with response tokens j0, j1 (positions 6, 7); j2..j5 (positions 8..11)
# form block 2. Steps: block 1 decoded at steps 2, 1; block 2 with two tokens sharing
# step 4 (dynamic decoding), EOS at j4 (response_len 5), j5 decoded after EOS at step 5.
PROMPT = [10, 11, 12, 13, 14, 15]
RESP = [20, 21, 22, 23, 24, 25]
STEPS = [2, 1, 4, 3, 4, 5]
SAMPLE = TraceSample(PROMPT, RESP, STEPS, response_len=5, advantage=1.0)


def test_ranks_and_shrink_hand_derived():
    blocks = response_blocks(6, 6, 4)
    assert blocks.tolist() == [1, 1, 2, 2, 2, 2]
    steps = torch.tensor(STEPS)
    # block 1 distinct {1, 2}: j0 (2) -> 1, j1 (1) -> 0;
    # block 2 distinct {3, 4, 5}: j2 (4) -> 1, j3 (3) -> 0, j4 (4) -> 1, j5 (5) -> 2
    assert step_ranks(steps, blocks).tolist() == [1, 0, 1, 0, 1, 2]
    # shrink 2: block 1 {1,2} -> 2; block 2 {3,4} -> 4, {5} -> 5
    assert shrink_steps(steps, blocks, 2).tolist() == [2, 2, 4, 4, 4, 5]
    # shrink 3: block 2 {3,4,5} -> 5
    assert shrink_steps(steps, blocks, 3).tolist() == [2, 2, 5, 5, 5, 5]
    assert shrink_steps(steps, blocks, 1).tolist() == STEPS


def test_two_block_rows_hand_derived():
    rows, stats = build_trace_rows([SAMPLE], block_size=4, mask_id=M)
    # round 0 trains rank 0 (j1, j3), round 1 rank 1 (j0, j2, j4); round 2 would train only
    # j5, which is after EOS: dropped. One packed row with 2 copies.
    assert (stats.rows, stats.copies, stats.targets) == (1, 2, 5)
    (r,) = rows
    copy0 = [14, 15, M, M, M, M, M, M]          # tail + everything masked (rank >= 0)
    copy1 = [14, 15, M, 21, M, 23, M, M]        # rank >= 1 masked: j1, j3 visible
    assert r.input_ids.tolist() == PROMPT + RESP + copy0 + copy1
    assert r.position_ids.tolist() == list(range(12)) + list(range(4, 12)) * 2
    assert r.segment.tolist() == [0] * 12 + [1] * 8 + [2] * 8
    # copy 0 starts at 12, response j at 12 + 2 + j; copy 1 at 20 + 2 + j
    assert r.target_index.tolist() == [15, 17, 22, 24, 26]
    assert r.labels.tolist() == [21, 23, 20, 22, 24]
    assert r.resp_pos.tolist() == [1, 3, 0, 2, 4] and r.round.tolist() == [0, 0, 1, 1, 1]

    vis = packed_visibility((r.position_ids // 4)[None], r.segment[None],
                            torch.ones(1, len(r), dtype=torch.bool))[0]
    seen = lambda q: set(torch.nonzero(vis[q]).flatten().tolist())  # noqa: E731
    # j0 in copy 1 (index 22, block 1): clean block 0 (indices 0..3) + its copy's block 1
    assert seen(22) == {0, 1, 2, 3} | {20, 21, 22, 23}
    # j2 in copy 1 (index 24, block 2): clean blocks 0, 1 (indices 0..7) + own block 2
    assert seen(24) == set(range(8)) | {24, 25, 26, 27}
    # the same state in copy 0 never sees copy 1
    assert seen(16) == set(range(8)) | {16, 17, 18, 19}
    # clean response j0 (index 6) sees clean blocks 0, 1 only
    assert seen(6) == set(range(8))


def test_shrink_rows_hand_derived():
    rows, stats = build_trace_rows([SAMPLE], block_size=4, mask_id=M, shrink=2)
    # shrunk steps [2,2,4,4,4,5] -> ranks [0,0,0,0,0,1]: one round trains j0..j4
    (r,) = rows
    assert stats.copies == 1
    assert r.input_ids.tolist()[12:] == [14, 15, M, M, M, M, M, M]
    assert r.resp_pos.tolist() == [0, 1, 2, 3, 4]


def test_reference_layout_and_full_attention_rows():
    rows, _ = build_trace_rows([SAMPLE], block_size=4, mask_id=M, copies_per_row=1)
    assert len(rows) == 2 and all(len(r) == 20 for r in rows)  # P + R + (tail + R)
    # one copy reduces to the model layer's training layout and block_visibility
    pos, blk, noisy = training_layout(6, 6, 4)
    assert torch.equal(rows[1].position_ids, pos)
    valid = torch.ones(1, 20, dtype=torch.bool)
    assert torch.equal(packed_visibility(blk[None], rows[1].segment[None], valid),
                       block_visibility(blk[None], noisy[None], blk[None], noisy[None], valid))
    # full attention: ranks over the whole response: steps 1,2,3,4,5 -> 5 rounds, the last
    # (step 5, j5 only) untrainable; one [prompt | noisy response] row per round
    full, st = build_trace_rows([SAMPLE], block_size=None, mask_id=M)
    assert st.rows == 4 and [r.resp_pos.tolist() for r in full] == [[1], [0], [3], [2, 4]]
    assert full[2].input_ids.tolist() == PROMPT + [20, 21, M, M, M, M]


def _random_steps(g: torch.Generator, P: int, R: int, b: int, steps_per_block: int):
    """Step maps as a sampler makes them: per block, 1..T steps, contiguous, increasing."""
    blocks = response_blocks(P, R, b)
    out, s = [], 0
    for blk in blocks.unique().tolist():
        n = int((blocks == blk).sum())
        t = int(torch.randint(1, min(n, steps_per_block) + 1, (1,), generator=g))
        k = torch.cat([torch.arange(t), torch.randint(0, t, (n - t,), generator=g)])
        out += (s + 1 + k[torch.randperm(n, generator=g)]).tolist()
        s += t
    return torch.tensor(out), blocks


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shrink", [1, 2, 3])
def test_loop_and_vectorised_rounds_agree(seed, shrink):
    g = torch.Generator().manual_seed(seed)
    P, R, b = int(torch.randint(1, 9, (1,), generator=g)), 13, 4
    steps, blocks = _random_steps(g, P, R, b, 4)
    shrunk = shrink_steps(steps, blocks, shrink)
    loop = rounds_loop(shrunk, blocks)
    vec = rounds_from_ranks(step_ranks(shrunk, blocks))
    assert len(loop) == len(vec)
    for (ml, tl), (mv, tv) in zip(loop, vec):
        assert torch.equal(ml, mv) and torch.equal(tl, tv)
    # and the reference's per-round rows equal block_row of the loop's rounds
    s = TraceSample(list(range(30, 30 + P)), list(range(40, 40 + R)), steps.tolist(), R)
    rows, _ = build_trace_rows([s], block_size=b, mask_id=M, shrink=shrink, copies_per_row=1)
    prompt, resp = torch.tensor(s.prompt_ids), torch.tensor(s.response_ids)
    for row, (m, t) in zip(rows, loop):
        ref = block_row(prompt, resp, [(m, t)], b, M)
        assert torch.equal(row.input_ids, ref.input_ids)
        assert torch.equal(row.target_index, ref.target_index)


def test_collate_pads_and_hides_pads():
    s2 = TraceSample([1, 2, 3], [5, 6, 7, 8, 9], [1, 2, 3, 3, 4], 5)
    rows, _ = build_trace_rows([SAMPLE, s2], block_size=4, mask_id=M)
    b = collate(rows, pad_id=0)
    n0, n1 = len(rows[0]), len(rows[1])
    assert b.input_ids.shape == (2, max(n0, n1))
    short = 0 if n0 < n1 else 1
    n = min(n0, n1)
    assert not b.visible[short, :, n:].any()  # nobody sees the padding
    assert b.target_row.tolist() == [0] * rows[0].num_targets + [1] * rows[1].num_targets
    assert (b.input_ids[b.target_row, b.target_col] == M).all()  # targets are masked inputs


def test_random_and_coupled_masks():
    g = torch.Generator().manual_seed(0)
    rows, st = build_masked_rows([SAMPLE], block_size=4, mask_id=M, lower=0.3, upper=0.7,
                                 generator=g, coupled=True)
    (r,) = rows
    # coupled: the two copies train complementary sets that cover the trainable j0..j4
    assert sorted(r.resp_pos.tolist()) == [0, 1, 2, 3, 4]
    a, c = set(r.resp_pos[r.round == 0].tolist()), set(r.resp_pos[r.round == 1].tolist())
    assert not a & c
    # full attention, mask_times rows
    rows, st = build_masked_rows([SAMPLE], block_size=None, mask_id=M, lower=0.5, upper=0.5,
                                 generator=g, times=3)
    assert st.samples == 1 and 1 <= len(rows) <= 3


def test_semi_ar_states_of_a_full_attention_model():
    """Each state: blocks before k clean, block k partly masked (at least one), all after
    masked; every block is drawn; lower = upper = 1 masks block k whole."""
    from tracerl.rl.rows import semi_ar_state_mask

    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        m = semi_ar_state_mask(10, 4, 0.1, 0.9, g)  # blocks [0, 4), [4, 8), [8, 10)
        s0 = int(m.nonzero()[0]) // 4 * 4
        s1 = min(s0 + 4, 10)
        seen.add(s0)
        assert not m[:s0].any() and m[s0:s1].any() and m[s1:].all()
    assert seen == {0, 4, 8}
    whole = semi_ar_state_mask(10, 4, 1.0, 1.0, g)
    k0 = int(whole.nonzero()[0])
    assert k0 % 4 == 0 and whole.tolist() == [False] * k0 + [True] * (10 - k0)
    # rows: the state's masked positions are mask tokens; those before response_len train
    rows, st = build_masked_rows([SAMPLE], block_size=None, mask_id=M, lower=1.0, upper=1.0,
                                 generator=torch.Generator().manual_seed(1), times=6,
                                 decode_block=4)
    assert st.samples == 1 and len(rows) == st.copies
    for r in rows:
        assert r.attention == "full"
        resp = r.input_ids[len(PROMPT):]
        first = int((resp == M).nonzero()[0])
        assert first % 4 == 0 and (resp[first:] == M).all()
        assert resp[:first].tolist() == RESP[:first]
        assert r.resp_pos.tolist() == [j for j in range(first, 5)]  # response_len 5
        assert r.labels.tolist() == RESP[first:5]
    with pytest.raises(ValueError, match="full-attention rows"):
        build_masked_rows([SAMPLE], block_size=4, mask_id=M, lower=0.5, upper=0.5,
                          generator=torch.Generator(), decode_block=4)


def test_bad_input_is_an_error_or_a_counted_skip():
    bad = TraceSample(PROMPT, RESP, STEPS[:-1], 5, sample_id="t/3")
    with pytest.raises(TrajectoryError, match=r"t/3.*decode_steps has 5 entries.*response_ids has 6"):
        build_trace_rows([bad], block_size=4, mask_id=M)
    with pytest.raises(TrajectoryError, match="response_len"):
        build_trace_rows([TraceSample(PROMPT, RESP, STEPS, 7)], block_size=4, mask_id=M)
    with pytest.raises(TrajectoryError, match="token_advantages"):
        build_trace_rows([TraceSample(PROMPT, RESP, STEPS, 5, token_advantages=[0.0])],
                         block_size=4, mask_id=M)
    rows, st = build_trace_rows([SAMPLE], block_size=4, mask_id=M, max_len=11)
    assert rows == [] and st.skipped_too_long == 1 and st.samples == 0
    rows, st = build_trace_rows([], block_size=4, mask_id=M)
    assert rows == [] and st.rows == 0


def test_records_block_size_is_the_records_and_refuses_mismatches():
    from dataclasses import replace

    from tracerl.rl import TrajectoryError, records_block_size

    s8 = replace(SAMPLE, attention="block", block_size=8, sample_id="t/0")
    assert records_block_size([s8, replace(s8, sample_id="t/1")], "block") == 8
    assert records_block_size([replace(s8, attention="full")], "full") is None
    assert records_block_size([], "block") is None
    with pytest.raises(TrajectoryError, match=r"do not record how they were decoded"):
        records_block_size([SAMPLE], "block")
    with pytest.raises(TrajectoryError, match=r"block_size 4: 1 samples \(e.g. t/2\); "
                                              r"block_size 8: 1 samples"):
        records_block_size([s8, replace(s8, block_size=4, sample_id="t/2")], "block")
    with pytest.raises(TrajectoryError, match="decoded with block attention but the model uses "
                                              "full attention"):
        records_block_size([s8], "full", "the model")
    with pytest.raises(TrajectoryError, match="mixes trajectories decoded with block and full"):
        records_block_size([s8, replace(s8, attention="full")], "block")


def test_training_block_of_2b_over_rollout_blocks_of_b_follows_global_step_order():
    """Block-size adaptation (reference: ``training.block_size = 2b`` over rollouts at b).

    P=2, decoded at b=2: response positions 2..7 form decoding blocks [1,1,2,2,3,3] with
    global decode steps [2,1 | 3,4 | 6,5]. Trained at B=4: positions 0..3 (prompt + j0, j1)
    are training block 0, positions 4..7 (j2..j5) training block 1, which holds two decoding
    blocks. Ranks within a training block follow the global steps: block 0 {1, 2} -> j1:0,
    j0:1; block 1 {3, 4, 5, 6} -> j2:0, j3:1, j5:2, j4:3. At b=2 the ranks would be
    [1,0 | 0,1 | 1,0] (two rounds); at B=4 the four rounds are
      round 0: masks all, trains j1 (step 1), j2 (step 3)
      round 1: masks j0, j3, j4, j5, trains j0 (step 2), j3 (step 4)
      round 2: masks j4, j5, trains j5 (step 5)
      round 3: masks j4, trains j4 (step 6)
    """
    from dataclasses import replace

    from tracerl.rl import records_block_size

    s = TraceSample([10, 11], [20, 21, 22, 23, 24, 25], [2, 1, 3, 4, 6, 5], response_len=6,
                    attention="block", block_size=2, train_block_size=4, sample_id="t/0")
    assert records_block_size([s], "block") == 4
    steps = torch.tensor(s.decode_steps)
    assert step_ranks(steps, response_blocks(2, 6, 2)).tolist() == [1, 0, 0, 1, 1, 0]
    assert step_ranks(steps, response_blocks(2, 6, 4)).tolist() == [1, 0, 0, 1, 3, 2]

    (row,), stats = build_trace_rows([s], block_size=records_block_size([s], "block"),
                                     mask_id=M)
    assert row.block_size == 4 and stats.copies == 4
    # prompt tail P mod 4 = 2 tokens (10, 11) then the noisy response, per copy
    want_noisy = [[M, M, M, M, M, M], [M, 21, 22, M, M, M], [20, 21, 22, 23, M, M],
                  [20, 21, 22, 23, M, 25]]
    ids = row.input_ids.tolist()
    assert ids[:8] == [10, 11, 20, 21, 22, 23, 24, 25]
    for c, noisy in enumerate(want_noisy):
        assert ids[8 + 8 * c: 16 + 8 * c] == [10, 11, *noisy]
    trained = {}
    for j, k in zip(row.resp_pos.tolist(), row.round.tolist()):
        trained.setdefault(k, []).append(j)
    assert trained == {0: [1, 2], 1: [0, 3], 2: [5], 3: [4]}
    # every copy token sits at its clean position (the noisy copy reuses positions)
    assert row.position_ids[8:16].tolist() == list(range(8))

    # the training block must hold whole decoding blocks; one update, one training block
    with pytest.raises(TrajectoryError, match="not a multiple of the block they were decoded"):
        records_block_size([replace(s, train_block_size=3)], "block")
    with pytest.raises(TrajectoryError, match="different block sizes"):
        records_block_size([s, replace(s, train_block_size=None, sample_id="t/1")], "block")

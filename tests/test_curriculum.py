"""Curriculum policies on hand-worked examples (the arithmetic is in the comments)."""

from __future__ import annotations

import pytest

from tracerl.config import ConfigError, params_from_dict
from tracerl.curriculum import (
    POLICIES,
    CurriculumDecision,
    CurriculumRule,
    TaskResult,
    initial_decision,
    plan_next,
    pool_pass_rate,
    retired_tasks,
    schedule_problems,
    value_at,
)

RULE = CurriculumRule(raise_above=0.8, lower_below=0.2, min_level=0, max_level=3, window=1)


def results(*rates: tuple[str, int, int], level: int = 1, k: int = 4) -> list[TaskResult]:
    return [TaskResult(t, level, passed, k) for t, passed, k in [(r[0], r[1], k) for r in rates]]


def plan(history, level, rule=RULE, **kw):
    kw.setdefault("block_size", 4)
    kw.setdefault("max_tokens", 32)
    return plan_next("pass_rate_band", history, iteration=len(history) - 1, level=level,
                     rule=rule, **kw)


def test_level_up_down_keep():
    # pass rates 4/4 and 3/4 -> mean (1 + 0.75) / 2 = 0.875 > 0.8 -> up
    assert plan([results(("a", 4), ("b", 3))], level=1).level == 2
    # 0/4 and 1/4 -> mean 0.125 < 0.2 -> down
    assert plan([results(("a", 0), ("b", 1))], level=1).level == 0
    # 2/4 and 2/4 -> 0.5 in band -> keep
    d = plan([results(("a", 2), ("b", 2))], level=1)
    assert (d.level, d.levels, d.pass_rate) == (1, (1,), 0.5)
    assert "kept" in d.reason


def test_bounds_clamp():
    assert plan([results(("a", 4))], level=3).level == 3  # already at max_level
    assert plan([results(("a", 0))], level=0).level == 0  # already at min_level
    big = CurriculumRule(min_level=0, max_level=3, step=2)
    assert plan([results(("a", 4))], level=2, rule=big).level == 3  # 2 + 2 clamped to 3


def test_cumulative_pool_keeps_easier_levels_and_moves_on_the_frontier():
    cum = CurriculumRule(raise_above=0.8, lower_below=0.2, min_level=0, max_level=3,
                         cumulative=True)
    # the level-0 task is solved (4/4) but the level-1 frontier is at 2/4 each: the
    # decision reads the frontier (0.5, in band), while the pool's rate is 2/3
    mixed = [TaskResult("easy", 0, 4, 4), TaskResult("f1", 1, 2, 4), TaskResult("f2", 1, 2, 4)]
    d = plan([mixed], level=1, rule=cum)
    assert (d.level, d.levels, d.pass_rate) == (1, (0, 1), pytest.approx(2 / 3))
    assert "0.500" in d.reason  # the frontier's rate
    # frontier solved (4/4, 4/4) while the easy task slipped (0/4): level up, pool 0..2
    up = plan([[TaskResult("easy", 0, 0, 4), TaskResult("f1", 1, 4, 4),
                TaskResult("f2", 1, 4, 4)]], level=1, rule=cum)
    assert (up.level, up.levels) == (2, (0, 1, 2))
    # no result at the frontier yet: level kept
    assert plan([[TaskResult("easy", 0, 4, 4)]], level=2, rule=cum).level == 2
    first = initial_decision(level=1, rule=cum, policy="pass_rate_band", block_size=4,
                             max_tokens=32)
    assert first.levels == (0, 1)


def test_exact_threshold_keeps_level():
    # 0.8 is not > 0.8 and 0.2 is not < 0.2: strict comparisons keep the level
    r = CurriculumRule(raise_above=0.8, lower_below=0.2, min_level=0, max_level=3)
    assert plan([[TaskResult("a", 1, 4, 5)]], level=1, rule=r).level == 1
    assert plan([[TaskResult("a", 1, 1, 5)]], level=1, rule=r).level == 1


def test_window_pools_recent_iterations():
    old = results(("a", 4), ("b", 4))  # 1.0, ignored by window 2 once 3 iterations exist
    mid = results(("a", 0), ("b", 0))  # 0.0
    new = results(("a", 4), ("b", 2))  # 1.0, 0.5
    # window=2: (0 + 0 + 1 + 0.5) / 4 = 0.375 -> keep
    r = CurriculumRule(min_level=0, max_level=3, window=2)
    assert pool_pass_rate([old, mid, new], 2) == 0.375
    assert plan([old, mid, new], level=1, rule=r).level == 1
    # window=1 sees only the last: 0.75 -> keep; window=3: (2 + 0 + 1.5) / 6 = 0.5833
    assert pool_pass_rate([old, mid, new], 3) == pytest.approx(3.5 / 6)


def test_no_results_keeps_level():
    d = plan([[]], level=2)
    assert d.level == 2 and d.pass_rate is None


def test_fixed_spans_all_levels():
    d = plan_next("fixed", [results(("a", 4))], iteration=0, level=1, rule=RULE,
                  block_size=4, max_tokens=32)
    assert d.level == 1 and d.levels == (0, 1, 2, 3)


def test_retirement_accumulates():
    # a: (4 + 4) / 8 = 1.0 >= 0.9 retired; b: (4 + 2) / 8 = 0.75 kept
    r = CurriculumRule(min_level=0, max_level=3, window=2, retire_above=0.9)
    h = [results(("a", 4), ("b", 4)), results(("a", 4), ("b", 2))]
    assert retired_tasks(h, 2, 0.9) == ("a",)
    d = plan(h, level=1, rule=r, exclude=["z"])
    assert d.exclude == ("a", "z")
    assert retired_tasks(h, 2, None) == ()


def test_schedules():
    sched = [[0, 4], [2, 8], [5, 16]]
    assert [value_at(sched, i, 99) for i in range(7)] == [4, 4, 8, 8, 8, 16, 16]
    assert value_at([[3, 8]], 1, default=4) == 4  # before the first entry: default
    # decision after iteration 1 is for iteration 2: block 8, max_tokens 64
    d = plan([results(("a", 2))] * 2, level=1, block_size_schedule=sched,
             max_tokens_schedule=[[2, 64]])
    assert d.iteration == 2 and (d.schedule.block_size, d.schedule.max_tokens) == (8, 64)


def test_schedule_problems():
    assert schedule_problems([[0, 4], [3, 8]], "s") == []
    bad = schedule_problems([[3, 8], [1, 4], [2, 0], [1]], "s")
    assert any("strictly increasing" in b for b in bad)
    assert any("value >= 1" in b for b in bad)
    assert any("[from_iteration, value]" in b for b in bad)


def test_initial_decision_and_roundtrip():
    d = initial_decision(level=0, rule=RULE, policy="pass_rate_band", block_size=4,
                         max_tokens=32, block_size_schedule=[[0, 2]])
    assert (d.iteration, d.levels, d.schedule.block_size) == (0, (0,), 2)
    assert CurriculumDecision.from_dict(d.to_dict()) == d


def test_registry_and_rule_errors():
    assert {"fixed", "pass_rate_band"} <= set(POLICIES)
    with pytest.raises(ValueError, match="valid: fixed, pass_rate_band"):
        POLICIES.get("nope")
    with pytest.raises(ValueError, match="lower_below < raise_above"):
        CurriculumRule(raise_above=0.2, lower_below=0.5)


def test_params_cross_checks():
    with pytest.raises(ConfigError) as e:
        params_from_dict({
            "curriculum": {"start_level": 7, "block_size_schedule": [[2, 8]],
                           "max_tokens_schedule": [[3, 36]]},
        })
    msg = str(e.value)
    assert "curriculum.start_level (7)" in msg
    assert "from iteration 3" in msg and "max_tokens 36" in msg and "block size 8" in msg


def test_training_block_schedule_reference_and_tstar_manners():
    """Reference manner: train at 8 on rollouts at 4 from iteration 2, then roll out at 8
    from iteration 4 (the training block then equals the rollout's: recorded as 0)."""
    kw = dict(block_size_schedule=[[4, 8]], train_block_size_schedule=[[2, 8]])
    seen = [(d.schedule.block_size, d.schedule.train_block_size, d.schedule.train_block)
            for d in (plan([results(("a", 2))] * (i + 1), level=1, **kw) for i in range(5))]
    # decisions for iterations 1..5
    assert seen == [(4, 0, 4), (4, 8, 8), (4, 8, 8), (8, 0, 8), (8, 0, 8)]
    d = initial_decision(level=0, rule=RULE, policy="pass_rate_band", block_size=4,
                         max_tokens=32, train_block_size_schedule=[[0, 8]])
    assert (d.schedule.block_size, d.schedule.train_block) == (4, 8)
    assert CurriculumDecision.from_dict(d.to_dict()) == d
    # an old decision.json without the key still loads (train at the rollout's block)
    old = d.to_dict()
    del old["schedule"]["train_block_size"]
    assert CurriculumDecision.from_dict(old).schedule.train_block == 4


def test_training_block_must_hold_whole_rollout_blocks():
    with pytest.raises(ConfigError) as e:
        params_from_dict({"curriculum": {"block_size_schedule": [[3, 8]],
                                         "train_block_size_schedule": [[0, 6], [2, 8]],
                                         "max_tokens_schedule": [[0, 48]]}})
    msg = str(e.value)
    # iteration 0: 6 over rollout blocks of 4; iterations 2..: fine (8 over 4, then 8 over 8)
    assert "from iteration 0 the training block size 6 is not a multiple of the rollout " \
           "block size 4" in msg
    assert "from iteration 2" not in msg and "from iteration 3" not in msg
    assert params_from_dict({"curriculum": {"block_size_schedule": [[3, 8]],
                                            "train_block_size_schedule": [[0, 8]],
                                            "max_tokens_schedule": [[0, 48]]}})
    with pytest.raises(ConfigError, match="training block size 8 is not a multiple of the "
                                          "rollout block size 16"):
        params_from_dict({"curriculum": {"block_size_schedule": [[3, 16]],
                                         "train_block_size_schedule": [[0, 8]],
                                         "max_tokens_schedule": [[0, 48]]}})


def test_patience_moves_a_plateau_up_and_resets_on_a_move():
    """Pass rate 0.75 at the frontier (3 of 4 correct per task), just under raise_above 0.8:
    without patience the level is held forever; with patience 3 the third decision in a
    row inside the band moves up, and the count starts again at the new level."""
    plateau = results(("a", 3), ("b", 3), level=1)
    held, level = 0, 1
    for _ in range(5):
        d = plan([plateau], level=level, held=held)
        assert d.level == 1 and d.held == held + 1
        held = d.held
    rule = CurriculumRule(raise_above=0.8, lower_below=0.2, min_level=0, max_level=3,
                          patience=3, cumulative=True)
    levels, held, level = [], 0, 1
    for _ in range(4):
        d = plan([results(("a", 3), ("b", 3), level=level)], level=level, rule=rule, held=held)
        levels.append(d.level)
        held, level = d.held, d.level
    # decisions: kept (1), kept (2), third in the band -> 2 (held 0), kept at 2 (held 1)
    assert levels == [1, 1, 2, 2] and held == 1
    assert "patience 3" in plan([plateau], level=1, rule=rule, held=2).reason
    # below the band patience does nothing: the level goes down as before
    assert plan([results(("a", 0), level=1)], level=1, rule=rule, held=5).level == 0
    # at the top level patience cannot move it
    top = plan([results(("a", 3), level=3)], level=3, rule=rule, held=9)
    assert top.level == 3 and "level kept" in top.reason


def test_token_budget_follows_the_pool_top_level():
    """The long tier: budgets 80/128/160 for levels 6/7/8 unlock with the level; the
    iteration schedule still sets a floor."""
    rule = CurriculumRule(raise_above=0.8, lower_below=0.2, min_level=6, max_level=8,
                          cumulative=True)
    by_level = [[6, 80], [7, 128], [8, 160]]
    d0 = initial_decision(level=6, rule=rule, policy="pass_rate_band", block_size=4,
                          max_tokens=40, max_tokens_by_level=by_level)
    assert d0.levels == (6,) and d0.schedule.max_tokens == 80
    up = plan([results(("a", 4), level=6)], level=6, rule=rule, max_tokens_by_level=by_level)
    assert up.levels == (6, 7) and up.schedule.max_tokens == 128
    top = plan([results(("a", 4), level=7)], level=7, rule=rule, max_tokens_by_level=by_level)
    assert top.levels == (6, 7, 8) and top.schedule.max_tokens == 160
    floor = plan([results(("a", 4), level=6)], level=6, rule=rule, max_tokens_by_level=by_level,
                 max_tokens_schedule=[[0, 200]])
    assert floor.schedule.max_tokens == 200
    with pytest.raises(ConfigError, match="level 7's budget 130 is not a multiple of the "
                                          "rollout block size 4"):
        params_from_dict({"data": {"min_difficulty": 6, "max_difficulty": 8},
                          "curriculum": {"start_level": 6,
                                         "max_tokens_by_level": [[6, 80], [7, 130]]},
                          "model": {"max_position_embeddings": 512}})


@pytest.mark.parametrize("key,name", [("block_size_schedule", "from_iteration"),
                                      ("train_block_size_schedule", "from_iteration"),
                                      ("max_tokens_by_level", "level")])
def test_a_malformed_schedule_entry_is_listed_not_a_crash(key, name):
    with pytest.raises(ConfigError, match=rf"curriculum.{key}: entry \[6\] must be \[{name}, value\]"):
        params_from_dict({"curriculum": {key: [[6]]}})

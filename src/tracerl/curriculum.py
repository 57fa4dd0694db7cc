"""Curriculum: a pure policy from per-task pass rates and the iteration to the next pool.

Group-normalised RL learns only from groups whose responses disagree: a task the policy
always solves (or never solves) has zero advantage everywhere and costs rollout time for
nothing. The curriculum keeps the task pool where the signal is, by moving the
difficulty level up when the pool is mostly solved and down when it is mostly failed,
and by retiring tasks that are mastered. It also carries the *schedules* of the paper's
block-size adaptation and long-CoT runs (TraceRL, arXiv 2509.06949, Sec. 5: a larger
block size and a larger generation budget later in training), stated as
``[[from_iteration, value], ...]`` lists in ``params.yaml``.

Everything here is a pure function of its arguments (no I/O, no global state): the
``curriculum`` stage reads the scored rollouts of the last ``window`` iterations, turns
them into :class:`TaskResult` lists, calls :func:`plan_next` and writes the returned
:class:`CurriculumDecision` as JSON; the next iteration's rollout reads it.

Difficulty policies are registry entries selected by name (``curriculum.policy``):

- ``fixed``: never moves the level.
- ``pass_rate_band``: mean pass rate over the window ``> raise_above`` -> level up by
  ``step``; ``< lower_below`` -> down by ``step``; clamped to ``[min_level, max_level]``.

Example:
    >>> rule = CurriculumRule(raise_above=0.8, lower_below=0.2, min_level=0, max_level=3)
    >>> solved = [TaskResult("a", 1, passed=8, total=8), TaskResult("b", 1, passed=7, total=8)]
    >>> d = plan_next("pass_rate_band", [solved], iteration=0, level=1, rule=rule,
    ...               block_size=4, max_tokens=32)
    >>> d.level, d.iteration, d.schedule.block_size
    (2, 1, 4)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tracerl.registry import Registry


@dataclass(frozen=True)
class TaskResult:
    """Outcome of one task's group in one iteration: ``passed`` of ``total`` correct."""

    task_id: str
    difficulty: int
    passed: int
    total: int

    @property
    def pass_rate(self) -> float:
        return self.passed / self.total if self.total else 0.0


@dataclass(frozen=True)
class CurriculumRule:
    """Knobs of the difficulty policies (flat and typed; the stage fills it from params).

    Args:
        raise_above: pool pass rate above which the level goes up.
        lower_below: pool pass rate below which it goes down.
        step: levels moved per decision.
        min_level, max_level: the level stays in this range (the data's difficulties).
        window: how many of the most recent iterations the decision looks at.
        retire_above: tasks whose pass rate over the window is ``>=`` this are excluded
            from the next pool (``None`` keeps every task).
        cumulative: the pool spans ``min_level..level`` (easier levels stay in, so what
            was learnt there is rehearsed) and ``pass_rate_band`` moves on the pass rate
            of the tasks at ``level``; otherwise the pool is ``level`` alone.
        patience: ``pass_rate_band`` moves up after the level was kept this many decisions
            in a row with a pass rate inside the band (a plateau just under
            ``raise_above`` no longer holds the run at one level); None = wait for
            ``raise_above``.
    """

    raise_above: float = 0.8
    lower_below: float = 0.2
    step: int = 1
    min_level: int = 0
    max_level: int = 0
    window: int = 1
    retire_above: float | None = None
    cumulative: bool = False
    patience: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.patience is not None and self.patience < 1:
            problems.append("patience must be >= 1 or None")
        if not 0 <= self.lower_below < self.raise_above <= 1:
            problems.append("need 0 <= lower_below < raise_above <= 1")
        if self.min_level > self.max_level:
            problems.append("need min_level <= max_level")
        if self.step < 1 or self.window < 1:
            problems.append("step and window must be >= 1")
        if problems:
            raise ValueError("invalid CurriculumRule: " + "; ".join(problems))


@dataclass(frozen=True)
class Schedule:
    """Decoding/training shape for one iteration.

    ``train_block_size`` is the block size the policy update trains this iteration's
    trajectories at: 0 = the block size they were decoded with; a multiple ``m * b``
    adapts the model to larger blocks the way the reference's configuration allows
    (``training.block_size = 2b`` over rollouts at ``b``: each training block holds ``m``
    rollout blocks, trained in their global decode order; ``tracerl_reference.md`` 8).
    """

    block_size: int
    max_tokens: int
    train_block_size: int = 0

    @property
    def train_block(self) -> int:
        """The training block size in force (``train_block_size`` or ``block_size``)."""
        return self.train_block_size or self.block_size


@dataclass(frozen=True)
class CurriculumDecision:
    """What the next iteration (``iteration``) samples from, and with which shape.

    ``levels`` are the difficulty levels the pool draws from; ``exclude`` the task ids
    retired as mastered; ``pass_rate`` the window's mean per-task pass rate that drove
    the decision (``None`` with no results); ``reason`` a human-readable why.
    """

    iteration: int
    level: int
    levels: tuple[int, ...]
    exclude: tuple[str, ...]
    schedule: Schedule
    pass_rate: float | None
    reason: str
    held: int = 0  # decisions in a row that kept ``level`` (0: it just changed or started)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CurriculumDecision:
        return cls(
            iteration=int(d["iteration"]),
            level=int(d["level"]),
            levels=tuple(int(x) for x in d["levels"]),
            exclude=tuple(str(x) for x in d["exclude"]),
            schedule=Schedule(**d["schedule"]),
            pass_rate=None if d.get("pass_rate") is None else float(d["pass_rate"]),
            reason=str(d.get("reason", "")),
            held=int(d.get("held", 0)),
        )


# ---------------------------------------------------------------------- schedules
def value_at(schedule: Sequence[Sequence[int]], iteration: int, default: int) -> int:
    """Value of a ``[[from_iteration, value], ...]`` schedule at ``iteration``.

    The last entry whose ``from_iteration <= iteration`` wins; before the first entry
    (or with an empty schedule) ``default`` applies.

    >>> value_at([[0, 4], [3, 8]], 2, default=4), value_at([[0, 4], [3, 8]], 5, default=4)
    (4, 8)
    >>> value_at([], 7, default=16)
    16
    """
    value = default
    # entries that are not pairs are skipped: params validation names them (schedule_problems)
    for start, v in sorted((e for e in schedule if len(e) == 2), key=lambda e: e[0]):
        if start <= iteration:
            value = v
    return value


def schedule_at(iteration: int, *, block_size: int, max_tokens: int,
                block_size_schedule: Sequence[Sequence[int]] = (),
                max_tokens_schedule: Sequence[Sequence[int]] = (),
                train_block_size_schedule: Sequence[Sequence[int]] = (),
                max_tokens_by_level: Sequence[Sequence[int]] = (),
                levels: Sequence[int] = ()) -> Schedule:
    """The :class:`Schedule` in force at ``iteration`` (defaults before a schedule starts)
    for a pool drawing from ``levels``: the token budget is the iteration schedule's, or
    the budget of the pool's top level when larger (a token-budget curriculum: longer
    problems unlock with a longer budget).

    >>> schedule_at(3, block_size=4, max_tokens=40, block_size_schedule=[[5, 8]],
    ...             train_block_size_schedule=[[2, 8]])
    Schedule(block_size=4, max_tokens=40, train_block_size=8)
    >>> by_level = [[6, 80], [7, 128], [8, 160]]
    >>> [schedule_at(0, block_size=4, max_tokens=40, max_tokens_by_level=by_level,
    ...              levels=range(6, top + 1)).max_tokens for top in (5, 6, 7, 8)]
    [40, 80, 128, 160]
    """
    b = value_at(block_size_schedule, iteration, block_size)
    train = value_at(train_block_size_schedule, iteration, 0)
    budget = value_at(max_tokens_schedule, iteration, max_tokens)
    if max_tokens_by_level and levels:
        budget = max(budget, value_at(max_tokens_by_level, max(levels), budget))
    return Schedule(block_size=b, max_tokens=budget, train_block_size=0 if train == b else train)


def schedule_problems(schedule: Sequence[Sequence[int]], name: str,
                      key: str = "from_iteration") -> list[str]:
    """Problems of a ``[[from_iteration, value], ...]`` schedule (for params validation);
    ``key`` names the first field (``level`` for budgets by level)."""
    p = []
    starts = []
    for entry in schedule:
        if len(entry) != 2:
            p.append(f"{name}: entry {list(entry)} must be [{key}, value]")
            continue
        start, v = entry
        if start < 0 or v < 1:
            p.append(f"{name}: entry {list(entry)} needs {key} >= 0 and value >= 1")
        starts.append(start)
    if starts != sorted(set(starts)):
        p.append(f"{name}: {key} values must be strictly increasing, got {starts}")
    return p


# ---------------------------------------------------------------------- policies
def pool_pass_rate(history: Sequence[Sequence[TaskResult]], window: int,
                   level: int | None = None) -> float | None:
    """Mean per-task pass rate over the last ``window`` iterations (each task-iteration
    weighs the same), of the tasks at difficulty ``level`` only when given; ``None`` if
    there are no such results.

    >>> h = [[TaskResult("a", 0, 1, 2)], [TaskResult("b", 1, 4, 4)]]
    >>> pool_pass_rate(h, window=2), pool_pass_rate(h, window=2, level=0)
    (0.75, 0.5)
    """
    rows = [r for it in list(history)[-window:] for r in it
            if r.total > 0 and (level is None or r.difficulty == level)]
    return sum(r.pass_rate for r in rows) / len(rows) if rows else None


DifficultyPolicy = Callable[[Sequence[Sequence[TaskResult]], int, CurriculumRule, int],
                            tuple[int, str]]
"""``(history, level, rule, held) -> (next_level, reason)``; history is oldest first,
``held`` the decisions in a row that kept ``level`` before this one."""

POLICIES: Registry[DifficultyPolicy] = Registry("curriculum policy")
"""Difficulty policies by name (selected by ``curriculum.policy``)."""

register_policy = POLICIES.register  # decorator: ``@register_policy("name")``


@register_policy("fixed")
def fixed_level(history, level, rule, held=0):
    return level, "fixed policy"


@register_policy("pass_rate_band")
def pass_rate_band(history, level, rule, held=0):
    # a cumulative pool moves on the pass rate of its frontier (the current level's tasks)
    rate = pool_pass_rate(history, rule.window, level if rule.cumulative else None)
    if rate is None:
        return level, "no results: level kept"
    if rate > rule.raise_above:
        new = min(rule.max_level, level + rule.step)
        why = f"pass rate {rate:.3f} > {rule.raise_above}: level up"
    elif rate < rule.lower_below:
        new = max(rule.min_level, level - rule.step)
        why = f"pass rate {rate:.3f} < {rule.lower_below}: level down"
    elif rule.patience is not None and held + 1 >= rule.patience and level < rule.max_level:
        new = level + min(rule.step, rule.max_level - level)
        why = (f"pass rate {rate:.3f} within [{rule.lower_below}, {rule.raise_above}] for "
               f"{held + 1} decisions (patience {rule.patience}): level up")
    else:
        return level, f"pass rate {rate:.3f} within [{rule.lower_below}, {rule.raise_above}]: level kept"
    if new == level:
        why += " (already at the bound)"
    return new, why


def retired_tasks(history: Sequence[Sequence[TaskResult]], window: int,
                  retire_above: float | None) -> tuple[str, ...]:
    """Task ids whose pooled pass rate over the window is ``>= retire_above`` (sorted).

    >>> h = [[TaskResult("a", 0, 4, 4), TaskResult("b", 0, 1, 4)], [TaskResult("a", 0, 3, 4)]]
    >>> retired_tasks(h, window=2, retire_above=0.8)
    ('a',)
    """
    if retire_above is None:
        return ()
    passed: dict[str, int] = {}
    total: dict[str, int] = {}
    for it in list(history)[-window:]:
        for r in it:
            passed[r.task_id] = passed.get(r.task_id, 0) + r.passed
            total[r.task_id] = total.get(r.task_id, 0) + r.total
    return tuple(sorted(t for t in total if total[t] and passed[t] / total[t] >= retire_above))


def pool_levels(policy: str, level: int, rule: CurriculumRule) -> tuple[int, ...]:
    """The levels a pool at ``level`` draws from: all of them under ``fixed``,
    ``min_level..level`` when ``rule.cumulative``, else ``level`` alone.

    >>> rule = CurriculumRule(min_level=0, max_level=3, cumulative=True)
    >>> pool_levels("pass_rate_band", 2, rule), pool_levels("fixed", 2, rule)
    ((0, 1, 2), (0, 1, 2, 3))
    """
    if policy == "fixed":
        return tuple(range(rule.min_level, rule.max_level + 1))
    return tuple(range(rule.min_level, level + 1)) if rule.cumulative else (level,)


def plan_next(
    policy: str,
    history: Sequence[Sequence[TaskResult]],
    *,
    iteration: int,
    level: int,
    rule: CurriculumRule,
    block_size: int,
    max_tokens: int,
    block_size_schedule: Sequence[Sequence[int]] = (),
    max_tokens_schedule: Sequence[Sequence[int]] = (),
    train_block_size_schedule: Sequence[Sequence[int]] = (),
    max_tokens_by_level: Sequence[Sequence[int]] = (),
    exclude: Sequence[str] = (),
    held: int = 0,
) -> CurriculumDecision:
    """Decide the pool and schedule of iteration ``iteration + 1``.

    Args:
        policy: name of a registered difficulty policy (see :data:`POLICIES`).
        history: per-iteration task results, oldest first; the last entry is
            ``iteration``'s. Only the last ``rule.window`` entries are looked at.
        iteration: the iteration that just finished (0-based).
        level: the difficulty level iteration ``iteration`` sampled at.
        rule: thresholds and bounds.
        block_size, max_tokens: defaults (``model.block_size``, ``rollout.max_tokens``)
            that the schedules override from their first entry on.
        block_size_schedule, max_tokens_schedule, train_block_size_schedule:
            ``[[from_iteration, value], ...]`` (the training block defaults to the
            rollout's).
        max_tokens_by_level: ``[[level, max_tokens], ...]``: the budget of the pool's
            top level, when larger than the schedule's.
        exclude: task ids already retired; new retirements are added to them.
        held: decisions in a row that kept ``level`` before this one (the previous
            decision's ``held``).

    Returns:
        The decision for iteration ``iteration + 1``. With ``policy="fixed"`` and
        ``min_level < max_level`` the pool spans all levels.
    """
    fn = POLICIES.get(policy)
    new_level, reason = fn(history, level, rule, held)
    assert rule.min_level <= new_level <= rule.max_level, (
        f"policy {policy} returned level {new_level} outside [{rule.min_level}, {rule.max_level}]"
    )
    levels = pool_levels(policy, new_level, rule)
    nxt = iteration + 1
    schedule = schedule_at(nxt, block_size=block_size, max_tokens=max_tokens,
                           block_size_schedule=block_size_schedule,
                           max_tokens_schedule=max_tokens_schedule,
                           train_block_size_schedule=train_block_size_schedule,
                           max_tokens_by_level=max_tokens_by_level, levels=levels)
    retired = set(exclude) | set(retired_tasks(history, rule.window, rule.retire_above))
    return CurriculumDecision(
        iteration=nxt,
        level=new_level,
        levels=levels,
        exclude=tuple(sorted(retired)),
        schedule=schedule,
        pass_rate=pool_pass_rate(history, rule.window),
        reason=reason,
        held=held + 1 if new_level == level else 0,
    )


def initial_decision(
    *,
    level: int,
    rule: CurriculumRule,
    policy: str,
    block_size: int,
    max_tokens: int,
    block_size_schedule: Sequence[Sequence[int]] = (),
    max_tokens_schedule: Sequence[Sequence[int]] = (),
    train_block_size_schedule: Sequence[Sequence[int]] = (),
    max_tokens_by_level: Sequence[Sequence[int]] = (),
) -> CurriculumDecision:
    """The decision iteration 0 samples with (before any results exist)."""
    POLICIES.get(policy)
    levels = pool_levels(policy, level, rule)
    return CurriculumDecision(
        iteration=0,
        level=level,
        levels=levels,
        exclude=(),
        schedule=schedule_at(0, block_size=block_size, max_tokens=max_tokens,
                             block_size_schedule=block_size_schedule,
                             max_tokens_schedule=max_tokens_schedule,
                             train_block_size_schedule=train_block_size_schedule,
                             max_tokens_by_level=max_tokens_by_level, levels=levels),
        pass_rate=None,
        reason="initial",
    )

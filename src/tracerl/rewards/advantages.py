"""Group-normalised sequence advantages and group filters (pure functions, registries).

Reference (Gen-Verse/dLLM-RL ``reward/rl_reward.py``, spec section 3.2): per task with
k responses, ``advantage = (r - mean) / std`` with the **population** std (divide by k),
0 when the std is 0; training drops whole groups whose accuracy is outside
``[0.2, 0.8]`` (math) or whose rewards are all equal (code, ``rl_code_reward.py``). The
same group z-score is GRPO's outcome advantage (Shao et al., 2024, arXiv 2402.03300).

Filters, chosen by name:
- ``none``: keep every group (all-equal groups get advantage 0 and so no gradient);
- ``zero_variance``: drop groups whose rewards are all equal (nothing to learn);
- ``accuracy_band``: drop groups whose accuracy (mean correctness) is outside
  ``[low, high]``, the reference's math rule; note that with k = 8 and the default band
  it also drops groups with 1/8 or 7/8 correct.

Dropped rows stay in the scored table with ``kept = False`` so that metrics and the
curriculum still see them; a step where every group is dropped is valid (zero rows to
train on), never a crash (the reference crashes on an empty ``rl_data.json``, issue #20).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tracerl.registry import Registry

AdvantageFn = Callable[[np.ndarray], np.ndarray]  # rewards of one group [k] -> advantages [k]
GroupFilter = Callable[[np.ndarray, np.ndarray, float, float], bool]  # keep this group?

ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator")  # reward.advantage
GROUP_FILTERS: Registry[GroupFilter] = Registry("group filter")  # reward.group_filter
register_advantage = ADVANTAGES.register
register_filter = GROUP_FILTERS.register


@register_advantage("zscore")
def zscore(rewards: np.ndarray) -> np.ndarray:
    """``(r - mean) / std`` with the population std; all zeros when std == 0.

    Example:
        >>> zscore(np.array([1.0, 0.0, 0.0, 0.0])).round(4).tolist()
        [1.7321, -0.5774, -0.5774, -0.5774]
    """
    r = np.asarray(rewards, dtype=np.float64)
    std = r.std()  # ddof=0: population std, as the reference
    if r.size == 0 or std < 1e-12:
        return np.zeros_like(r)
    return (r - r.mean()) / std


@register_advantage("mean_center")
def mean_center(rewards: np.ndarray) -> np.ndarray:
    """``r - mean`` (no std scaling; Dr. GRPO, Liu et al., 2025, arXiv 2503.20783)."""
    r = np.asarray(rewards, dtype=np.float64)
    return r - r.mean() if r.size else r


@register_filter("none")
def keep_all(rewards: np.ndarray, correct: np.ndarray, low: float, high: float) -> bool:
    return True


@register_filter("zero_variance")
def drop_zero_variance(rewards: np.ndarray, correct: np.ndarray, low: float, high: float) -> bool:
    return bool(rewards.size) and float(np.ptp(rewards)) > 1e-12


@register_filter("accuracy_band")
def drop_outside_band(rewards: np.ndarray, correct: np.ndarray, low: float, high: float) -> bool:
    acc = float(np.mean(correct)) if correct.size else 0.0
    return low <= acc <= high


@dataclass(frozen=True)
class GroupAdvantages:
    """Per response: ``advantages`` [N] float, ``kept`` [N] bool; ``metrics`` per step."""

    advantages: np.ndarray
    kept: np.ndarray
    metrics: dict[str, float]


def compute_group_advantages(
    rewards: np.ndarray,
    group_ids: np.ndarray,
    correct: np.ndarray | None = None,
    *,
    estimator: str = "zscore",
    group_filter: str = "zero_variance",
    low: float = 0.2,
    high: float = 0.8,
) -> GroupAdvantages:
    """Advantages per response, normalised within each group (task), plus group filtering.

    Args:
        rewards: [N] float, one per response.
        group_ids: [N] hashable group key (task id) per response; any order.
        correct: [N] bool, used by ``accuracy_band`` (defaults to ``rewards > 0``).
        estimator: name in :data:`ADVANTAGES`; group_filter: name in :data:`GROUP_FILTERS`.
        low, high: the accuracy band for ``accuracy_band``.

    Returns:
        :class:`GroupAdvantages`; filtered rows keep their advantage value but
        ``kept = False``. Metrics: ``num_groups``, ``filtered_groups``,
        ``filtered_group_fraction``, ``zero_variance_groups``, ``zero_variance_fraction``,
        ``kept_responses``.

    Example:
        >>> g = compute_group_advantages(np.array([1., 0., 1., 1.]), np.array(["a", "a", "b", "b"]))
        >>> g.advantages.tolist(), g.kept.tolist(), g.metrics["filtered_groups"]
        ([1.0, -1.0, 0.0, 0.0], [True, True, False, False], 1)
    """
    adv_fn = ADVANTAGES.get(estimator)
    keep_fn = GROUP_FILTERS.get(group_filter)
    rewards = np.asarray(rewards, dtype=np.float64)
    group_ids = np.asarray(group_ids)
    if rewards.shape != group_ids.shape or rewards.ndim != 1:
        raise ValueError(f"rewards {rewards.shape} and group_ids {group_ids.shape} must be equal 1-D")
    correct = (rewards > 0) if correct is None else np.asarray(correct, dtype=bool)
    adv = np.zeros_like(rewards)
    kept = np.zeros(rewards.shape, dtype=bool)
    n_groups = n_filtered = n_zero_var = 0
    if rewards.size:
        uniq, inverse = np.unique(group_ids, return_inverse=True)
        for g in range(len(uniq)):
            idx = np.flatnonzero(inverse == g)
            r = rewards[idx]
            n_groups += 1
            n_zero_var += int(float(np.ptp(r)) <= 1e-12)
            adv[idx] = adv_fn(r)
            keep = keep_fn(r, correct[idx], low, high)
            kept[idx] = keep
            n_filtered += int(not keep)
    metrics = {
        "num_groups": n_groups,
        "filtered_groups": n_filtered,
        "filtered_group_fraction": n_filtered / n_groups if n_groups else 0.0,
        "zero_variance_groups": n_zero_var,
        "zero_variance_fraction": n_zero_var / n_groups if n_groups else 0.0,
        "kept_responses": int(kept.sum()),
    }
    return GroupAdvantages(adv, kept, metrics)

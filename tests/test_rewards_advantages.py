"""Group advantages and filters on hand examples."""

from __future__ import annotations

import numpy as np
import pytest

from tracerl.rewards.advantages import compute_group_advantages, zscore


def test_zscore_population_std_by_hand():
    # r = [1, 1, 0, 0]: mean 0.5, population std 0.5 -> [1, 1, -1, -1]
    assert zscore(np.array([1.0, 1.0, 0.0, 0.0])).tolist() == [1.0, 1.0, -1.0, -1.0]
    # r = [1, 0, 0]: mean 1/3, var = (4/9 + 1/9 + 1/9)/3 = 2/9, std = 0.4714
    # -> [(2/3)/0.4714, (-1/3)/0.4714, ...] = [1.4142, -0.7071, -0.7071]
    np.testing.assert_allclose(zscore(np.array([1.0, 0.0, 0.0])), [2**0.5, -(0.5**0.5), -(0.5**0.5)])
    assert zscore(np.array([3.0, 3.0])).tolist() == [0.0, 0.0]


def test_groups_are_normalised_separately_in_any_order():
    r = np.array([1.0, 0.0, 0.5, 1.0, 0.0, 0.5])
    g = np.array(["a", "b", "b", "a", "a", "b"])
    out = compute_group_advantages(r, g, group_filter="none")
    # group a = [1, 1, 0]: mean 2/3, std sqrt(2/9) -> [0.7071, 0.7071, -1.4142]
    np.testing.assert_allclose(out.advantages[[0, 3, 4]], [0.5**0.5, 0.5**0.5, -(2**0.5)])
    # group b = [0, 0.5, 0.5]: mirror image -> [-1.4142, 0.7071, 0.7071]
    np.testing.assert_allclose(out.advantages[[1, 2, 5]], [-(2**0.5), 0.5**0.5, 0.5**0.5])
    assert out.kept.all() and out.metrics["filtered_groups"] == 0


def test_zero_variance_filter_counts():
    r = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0], dtype=float)
    g = np.repeat(["a", "b", "c"], 4)
    out = compute_group_advantages(r, g, group_filter="zero_variance")
    assert out.kept.tolist() == [False] * 8 + [True] * 4
    assert out.metrics["filtered_groups"] == 2
    assert out.metrics["filtered_group_fraction"] == pytest.approx(2 / 3)
    assert out.metrics["zero_variance_fraction"] == pytest.approx(2 / 3)
    assert out.metrics["kept_responses"] == 4


def test_accuracy_band_filter_matches_reference_rule():
    # accuracies: a = 1/8 (dropped, < 0.2), b = 2/8 (kept), c = 7/8 (dropped, > 0.8), d = 6/8
    rows = {"a": 1, "b": 2, "c": 7, "d": 6}
    r = np.concatenate([[1.0] * k + [0.0] * (8 - k) for k in rows.values()])
    g = np.repeat(list(rows), 8)
    out = compute_group_advantages(r, g, r > 0, group_filter="accuracy_band", low=0.2, high=0.8)
    kept_groups = sorted(set(g[out.kept]))
    assert kept_groups == ["b", "d"]
    assert out.metrics["filtered_groups"] == 2 and out.metrics["zero_variance_groups"] == 0


def test_every_group_filtered_is_not_an_error():
    r = np.array([1.0, 1.0, 0.0, 0.0])
    out = compute_group_advantages(r, np.array(["a", "a", "b", "b"]))
    assert not out.kept.any() and out.metrics["filtered_group_fraction"] == 1.0
    empty = compute_group_advantages(np.array([]), np.array([]))
    assert empty.metrics["num_groups"] == 0 and empty.advantages.shape == (0,)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid: none, zero_variance, accuracy_band"):
        compute_group_advantages(np.ones(2), np.zeros(2), group_filter="bogus")
    with pytest.raises(ValueError, match="valid: zscore, mean_center"):
        compute_group_advantages(np.ones(2), np.zeros(2), estimator="bogus")

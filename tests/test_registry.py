"""The one registry helper: duplicate guard, lookup errors, order."""

import pytest

from tracerl.registry import Registry


def test_register_get_and_order():
    r: Registry[int] = Registry("thing")
    r.add("b", 2)

    @r.register("a")
    def a():
        return 1

    assert r.names() == ["b", "a"]
    assert r.get("b") == 2 and r["a"]() == 1
    assert "a" in r and "c" not in r and len(r) == 2


def test_duplicate_name_is_refused():
    r: Registry[int] = Registry("thing")
    r.add("x", 1)
    with pytest.raises(ValueError, match="'x' is registered twice"):
        r.add("x", 2)
    assert r.get("x") == 1  # the first entry is kept


def test_unknown_name_lists_valid_ones():
    r: Registry[int] = Registry("curriculum policy")
    r.add("fixed", 0)
    r.add("band", 1)
    with pytest.raises(KeyError, match="unknown curriculum policy 'bnad'; valid: fixed, band"):
        r.get("bnad")
    assert r.problem("bnad", "curriculum.policy") == (
        "curriculum.policy 'bnad' is unknown; valid: fixed, band")
    assert r.problem("band", "curriculum.policy") is None

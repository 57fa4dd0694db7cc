"""Recipes: named experiments as overrides of params.yaml (tracerl.recipes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tracerl.config import load_params
from tracerl.recipes import (
    RecipeError,
    available,
    dvc_set_params,
    load_recipe,
    main,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(available(ROOT))


def test_the_project_ships_the_experiment_recipes():
    assert {"block4", "block_ref", "block_tstar", "long_tier", "default", "no_patience"} <= set(RECIPES)
    assert all(available(ROOT).values()), "every recipe says what it shows (about:)"


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_gives_valid_params(name):
    from flows.tracerl_flow import run_overrides

    p = load_params(ROOT / "params.yaml", run_overrides(ROOT, recipe=name, seed=2))
    assert p.run.name == f"{name}-s2" and (p.run.seed, p.sft.seed, p.policy.seed) == (2, 2, 2)


def test_extends_applies_the_base_first_and_states_values_once():
    ref = load_recipe("block_ref", ROOT)
    base = load_recipe("block4", ROOT)
    assert ref["rollout"] == base["rollout"] and ref["evaluate"] == base["evaluate"]
    assert ref["curriculum"]["train_block_size_schedule"] == [[0, 8], [10, 16]]
    raw = (ROOT / "recipes" / "block_ref.yaml").read_text()
    assert "max_tokens" not in raw  # inherited, not restated
    p = load_params(ROOT / "params.yaml", ref)
    assert p.curriculum.block_size_schedule == [[5, 8], [15, 16]]
    assert p.sft == load_params(ROOT / "params.yaml").sft  # the arms share the SFT model


def test_bad_recipes_say_what_is_wrong(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "a.yaml").write_text("extends: b\nrun: {seed: 1}\n")
    (tmp_path / "recipes" / "b.yaml").write_text("extends: a\n")
    (tmp_path / "recipes" / "flat.yaml").write_text("seed: 3\n")
    with pytest.raises(RecipeError, match=r"'extends' loops \(a -> b -> a\)"):
        load_recipe("a", tmp_path)
    with pytest.raises(RecipeError, match=r"no recipe 'nope'.*recipes: a, b, flat"):
        load_recipe("nope", tmp_path)
    with pytest.raises(RecipeError, match=r"top-level keys \['seed'\] are not params sections"):
        load_recipe("flat", tmp_path)


def test_dvc_arguments_round_trip_through_yaml():
    import yaml

    over = load_recipe("block_ref", ROOT)
    args = dvc_set_params(over)
    assert args[0::2] == ["-S"] * (len(args) // 2)
    parsed = {}
    for item in args[1::2]:
        key, _, val = item.partition("=")
        parsed[key] = yaml.safe_load(val)
    assert parsed["curriculum.block_size_schedule"] == [[5, 8], [15, 16]]
    assert parsed["evaluate.block_sizes"] == [4, 8, 16]


def test_cli(capsys, monkeypatch):
    from tracerl.cli import main as cli

    monkeypatch.chdir(ROOT)
    assert cli(["recipes", "list"]) == 0
    assert "block_tstar" in capsys.readouterr().out
    assert main(["dvc", "no_patience", "--seed", "1"]) == 0
    assert capsys.readouterr().out.split() == ["-S", "curriculum.patience=null", "-S", "run.seed=1",
                                               "-S", "sft.seed=1", "-S", "policy.seed=1",
                                               "-S", "value.seed=1"]
    assert main(["show", "nope"]) == 1

"""The repository's params.yaml loads, states every key, and a bad one fails listing
every problem."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from tracerl.config import ConfigError, Params, load_params

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def test_params_yaml_loads():
    p = load_params(PARAMS)
    assert isinstance(p, Params)
    assert p.problems() == []


def test_params_yaml_states_every_key():
    """Every field of every section is written out: nothing hides in a default."""
    raw = yaml.safe_load(PARAMS.read_text())
    for f in dataclasses.fields(Params):
        assert f.name in raw, f"params.yaml lacks section {f.name}"
        want = {g.name for g in dataclasses.fields(f.type if isinstance(f.type, type)
                                                   else type(getattr(Params(), f.name)))}
        assert set(raw[f.name]) == want, f"section {f.name}: {set(raw[f.name]) ^ want}"


def test_params_yaml_has_no_interpolation():
    assert "${" not in "".join(
        line for line in PARAMS.read_text().splitlines() if not line.startswith("#")
    )


def test_bad_params_lists_every_problem(tmp_path):
    raw = yaml.safe_load(PARAMS.read_text())
    raw["run"]["iteratons"] = 3  # typo
    raw["rollout"]["responses_per_task"] = 1  # group of one
    raw["rollout"]["max_tokens"] = 30  # not a multiple of block size 4
    raw["policy"]["lr"] = "fast"  # wrong type
    raw["curriculum"]["policy"] = "zigzag"  # unknown registry name
    raw["evaluate"]["pass_k"] = [1, 8]  # k > responses_per_task
    raw["data"]["sft_style"] = "essay"  # unknown solution style
    raw["data"]["sft_answer_fraction"] = 1.5  # not a fraction
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_params(bad)
    probs = e.value.problems
    msg = str(e.value)
    assert len(probs) == 8, msg
    assert "unknown key 'run.iteratons'; did you mean 'iterations'?" in msg
    assert "rollout.responses_per_task must be >= 2" in msg
    assert "rollout.max_tokens (30) must be a multiple of model.block_size (4)" in msg
    assert "'policy.lr' = 'fast' has the wrong type: expected float" in msg
    assert "curriculum.policy 'zigzag' is unknown; valid: fixed, pass_rate_band" in msg
    assert "evaluate.pass_k [8]" in msg
    assert "data.sft_style must be one of steps, worked, answer (got 'essay')" in msg
    assert "data.sft_answer_fraction must be in [0, 1] (got 1.5)" in msg
    assert msg.startswith(f"{bad}: 8 problem(s):")


REGISTRY_KEYS = [  # (section, key, module, registry): params names an entry of a registry
    ("model", "family", "tracerl.models.model", "FAMILIES"),
    ("data", "generator", "tracerl.data.sources", "GENERATORS"),
    ("sft", "method", "tracerl.rl.builders", "SFT_ROW_BUILDERS"),
    ("rollout", "strategy", "tracerl.sampling.strategies", "STRATEGIES"),
    ("reward", "group_filter", "tracerl.rewards.advantages", "GROUP_FILTERS"),
    ("reward", "advantage", "tracerl.rewards.advantages", "ADVANTAGES"),
    ("policy", "method", "tracerl.rl.builders", "ROW_BUILDERS"),
    ("curriculum", "policy", "tracerl.curriculum", "POLICIES"),
]


@pytest.mark.parametrize("section,key,module,registry", REGISTRY_KEYS)
def test_registry_keys_are_checked_against_the_registry(tmp_path, monkeypatch, section, key,
                                                        module, registry):
    """The registry is the one list of valid names: an unknown name lists the registry's
    names, and a name registered later is accepted without touching config.py."""
    import importlib

    reg = getattr(importlib.import_module(module), registry)
    raw = yaml.safe_load(PARAMS.read_text())
    raw[section][key] = "not_registered"
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_params(bad)
    assert e.value.problems == [
        f"{section}.{key} 'not_registered' is unknown; valid: {', '.join(reg.names())}"]
    monkeypatch.setattr(reg, "_items", {**reg._items, "not_registered": object()})
    assert getattr(getattr(load_params(bad), section), key) == "not_registered"


def test_evaluate_strategies_use_the_strategy_registry(tmp_path):
    from tracerl.sampling import STRATEGIES

    raw = yaml.safe_load(PARAMS.read_text())
    raw["evaluate"]["strategies"] = ["low_confidence_static", "beam"]
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=f"use a non-empty list of: {', '.join(STRATEGIES)}"):
        load_params(bad)


def test_evaluate_benchmarks_include_the_hf_dataset_registry(tmp_path):
    from tracerl.data import HF_DATASETS

    raw = yaml.safe_load(PARAMS.read_text())
    raw["evaluate"]["benchmarks"] = ["heldout", "math500"]
    ok = tmp_path / "params.yaml"
    ok.write_text(yaml.safe_dump(raw))
    assert load_params(ok).evaluate.benchmarks == ["heldout", "math500"]
    raw["evaluate"]["benchmarks"] = ["mathh500"]
    ok.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=f"heldout, humaneval, {', '.join(HF_DATASETS)}"):
        load_params(ok)

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


def test_code_defaults_equal_params_yaml():
    """The dataclass defaults are params.yaml's values, key by key: a section left out of
    a programmatic Params (or stated as ``{}``) never runs on other values."""
    raw = yaml.safe_load(PARAMS.read_text())
    defaults = Params().to_dict()
    differ = [f"{s}.{k}: code {defaults[s][k]!r}, params.yaml {v!r}"
              for s, section in raw.items() for k, v in section.items()
              if defaults[s][k] != v or type(defaults[s][k]) is not type(v)
              and not (isinstance(v, int | float) and isinstance(defaults[s][k], float))]
    assert differ == []
    assert load_params(PARAMS) == Params()


def _write(tmp_path, raw, name="params.yaml"):
    p = tmp_path / name
    p.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return p


def _problems(path):
    with pytest.raises(ConfigError) as e:
        load_params(path)
    return e.value.problems, str(e.value)


def test_missing_sections_and_empty_file_do_not_run(tmp_path):
    raw = yaml.safe_load(PARAMS.read_text())
    del raw["policy"], raw["value"]
    probs, msg = _problems(_write(tmp_path, raw))
    assert len(probs) == 2, msg
    assert "section 'policy:' is missing; copy it from the repository's params.yaml" in msg
    assert "section 'value:' is missing" in msg
    for text in ("", "# nothing but a comment\n", "{}\n"):
        probs, msg = _problems(_write(tmp_path, text))
        assert probs == [probs[0]] and "the file is empty" in msg
    raw["policy"], raw["value"] = {}, {}  # stated on purpose: the embedded defaults
    assert load_params(_write(tmp_path, raw)) == Params()


def test_yaml_pitfalls_get_hints(tmp_path):
    text = PARAMS.read_text().replace("  lr: 1.0e-04\n", "  lr: 1e-4\n", 1)
    text = text.replace("  name: default\n", "  name: no\n", 1)
    text = text.replace("  steps: 2000\n", "  steps: 2e3\n", 1)
    text = text.replace("  image_tag: 0.1.0\n", "  image_tag: 0.1\n", 1)
    probs, msg = _problems(_write(tmp_path, text))
    assert len(probs) == 4, msg
    assert ("'policy.lr' = '1e-4' has the wrong type: expected float; YAML reads '1e-4' as "
            "text, not a number (a float needs a dot and a signed exponent): write 1.0e-4") in msg
    assert "'run.name' = False" in msg and "put the value in quotes" in msg
    assert "'sft.steps' = '2e3'" in msg and "write a plain integer: 2000" in msg
    assert "'run.image_tag' = 0.1" in msg and "put it in quotes, e.g. '0.1'" in msg
    fixed = text.replace("lr: 1e-4", "lr: 1.0e-4").replace("name: no", "name: 'no'")
    fixed = fixed.replace("steps: 2e3", "steps: 2000").replace("image_tag: 0.1\n", "image_tag: '0.1'\n")
    p = load_params(_write(tmp_path, fixed))
    assert (p.policy.lr, p.run.name, p.sft.steps, p.run.image_tag) == (1e-4, "no", 2000, "0.1")


def _with(**sections):
    raw = yaml.safe_load(PARAMS.read_text())
    for k, v in sections.items():
        raw[k].update(v)
    return raw


def test_model_init_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "weights.bin").write_text("x")
    for ok in ("tiny", "Gen-Verse/TraDo-4B-Instruct", "ckpt", "./ckpt", str(tmp_path / "ckpt")):
        assert load_params(_write(tmp_path, _with(model={"init": ok}))).model.init == ok
    for bad in ("./missing", "missing", "/no/such/folder", "a/b/c"):
        probs, msg = _problems(_write(tmp_path, _with(model={"init": bad})))
        assert len(probs) == 1 and f"model.init {bad!r} is not 'tiny', not a hub id" in msg
    probs, msg = _problems(_write(tmp_path, _with(model={"init": "weights.bin"})))
    assert "is a file; give the checkpoint folder" in msg


def test_context_must_hold_longest_prompt_plus_budget(tmp_path):
    # arithmetic levels 0..3: the longest prompt is 'What is 20+20-20?' (17 characters),
    # 36 ids with the chat template; block 4, max_tokens 40: 36 // 4 * 4 + 40 = 76
    assert load_params(_write(tmp_path, _with(model={"max_position_embeddings": 76})))
    probs, msg = _problems(_write(tmp_path, _with(model={"max_position_embeddings": 75})))
    assert len(probs) == 1, msg
    assert "model.max_position_embeddings (75) is below" in msg and ">= 76" in msg
    # a curriculum schedule that raises the budget later counts too
    probs, msg = _problems(_write(tmp_path, _with(
        model={"max_position_embeddings": 76}, curriculum={"max_tokens_schedule": [[4, 48]]})))
    assert ">= 84" in msg
    # level 0 only ('What is 9+9?', 31 ids): 28 + 40 = 68
    assert load_params(_write(tmp_path, _with(model={"max_position_embeddings": 68},
                                              data={"max_difficulty": 0})))


def test_task_files_are_checked_at_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text('{"prompt": "What is 1+1?", "answer": "2"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    p = load_params(_write(tmp_path, _with(data={"generator": "file", "train_file": "train.jsonl",
                                                 "heldout_file": "train.jsonl"})))
    assert p.data.train_file == "train.jsonl"
    probs, msg = _problems(_write(tmp_path, _with(
        data={"generator": "file", "train_file": "nope.jsonl", "heldout_file": "empty.jsonl"},
        model={"init": "./gone"}, policy={"lr": "1e-4"})))
    assert len(probs) == 4, msg  # all listed together
    assert "data.train_file 'nope.jsonl' does not exist" in msg
    assert "data.heldout_file 'empty.jsonl' is empty" in msg
    probs, msg = _problems(_write(tmp_path, _with(data={"generator": "file"})))
    assert "needs data.train_file" in msg and "needs data.heldout_file" in msg
    probs, msg = _problems(_write(tmp_path, _with(data={"generator": "csv"})))
    assert "data.generator 'csv' is unknown" in msg
    probs, msg = _problems(_write(tmp_path, _with(data={"max_difficulty": 9},
                                                  curriculum={"start_level": 0})))
    assert "must lie in 0..8 for the arithmetic generator" in msg


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
    (problem,) = e.value.problems  # data.generator adds: "; or 'file' (with ...)"
    assert problem.startswith(
        f"{section}.{key} 'not_registered' is unknown; valid: {', '.join(reg.names())}")
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

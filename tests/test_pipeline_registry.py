"""The stage registry is the one declaration of a stage: dvc.yaml, keys and runners derive
from it, stages cannot read undeclared params, and finished stages meet their declaration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tracerl.config import Params, load_params
from tracerl.pipeline import dvcgen
from tracerl.pipeline.layout import stage_key
from tracerl.pipeline.registry import (
    DVC_PARTS,
    EVAL_PLOTS,
    PLOTS,
    STAGES,
    missing_metrics,
    missing_outputs,
    placement_keys,
    problems,
)
from tracerl.pipeline.stage_cli import UndeclaredParamsRead, load_stage_params, params_reads

ROOT = Path(__file__).resolve().parents[1]


def test_declarations_are_consistent():
    assert problems() == []


def test_every_stage_module_exists_and_has_main():
    import importlib

    for name, spec in STAGES.items():
        assert (ROOT / "stages" / f"{name}.py").is_file(), name
        assert callable(importlib.import_module(spec.module).main), name


def test_dvc_yaml_is_generated_from_the_registry():
    """dvc.yaml equals what the registry generates (regenerate: dvcgen --write)."""
    assert (ROOT / "dvc.yaml").read_text() == dvcgen.render(), (
        "dvc.yaml is stale: python -m tracerl.pipeline.dvcgen --write")


def test_dvc_plots_template_has_integer_iterations():
    """The plots' template (written with dvc.yaml) is DVC's linear one with whole-number
    iteration ticks on every x encoding, and up to date."""
    tpl = json.loads((ROOT / ".dvc" / "plots" / f"{dvcgen.TEMPLATE}.json").read_text())
    assert tpl == dvcgen.iterations_template()
    xs = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("field") == "<DVC_METRIC_X>":
                xs.append(node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(tpl)
    assert xs and all(x["axis"] == {"tickMinStep": 1, "format": "d", "tickCount": {
        "expr": "min(ceil(width / 40), max(1, span(domain('x'))))"}} for x in xs)
    # drawn: tests/test_dvc_page_browser.py (each iteration label once, no 0.5 ticks)


def test_dvc_params_are_the_union_of_stage_reads():
    import yaml

    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for part, p in DVC_PARTS.items():
        want = {r for s in p.stages for r in STAGES.get(s).reads} | set(p.flow_reads)
        # a section holding a placement key (rollout.shards: where a stage runs) is listed
        # key by key without it
        for sec in {k.split(".")[0] for k in placement_keys()} & want:
            want = (want - {sec}) | {f"{sec}.{k}" for k in Params().to_dict()[sec]
                                     if f"{sec}.{k}" not in placement_keys()}
        got = set(dvc["stages"][part]["params"])
        # a whole section covers its keys
        assert {r for r in want if r.split(".")[0] not in got} <= got, part
        assert got <= want, part
        assert not got & placement_keys(), part
    # the reward section reaches evaluate (its key and DVC params), the curriculum the rollout
    assert "reward" in dvc["stages"]["evaluate"]["params"]
    assert "curriculum" in STAGES.get("rollout").reads
    plotted = {k for keys in (*PLOTS.values(), *EVAL_PLOTS.values()) for k in keys}
    assert plotted == {k for p in dvc["plots"] for v in p.values() for k in
                       next(iter(v["y"].values()))}


def test_code_closure_follows_lazy_imports(tmp_path):
    """Imports inside functions count; a package whose files are all needed is one dep."""
    (tmp_path / "stages").mkdir()
    pkg = tmp_path / "src" / "tracerl" / "pkg"
    pkg.mkdir(parents=True)
    (tmp_path / "src" / "tracerl" / "__init__.py").write_text('"""root"""\n')
    (pkg / "__init__.py").write_text("from tracerl.pkg.a import f\n")
    (pkg / "a.py").write_text("def f():\n    from tracerl.pkg import b\n    return 'run.py'\n")
    (pkg / "b.py").write_text("B = 1\n")
    (pkg / "run.py").write_text("R = 1\n")  # read by path (named in a.py)
    (tmp_path / "src" / "tracerl" / "other.py").write_text("O = 1\n")
    (tmp_path / "stages" / "__init__.py").write_text("")  # empty: never a dependency
    (tmp_path / "stages" / "s.py").write_text("import tracerl.pkg\n")
    (tmp_path / "stages" / "t.py").write_text("T = 1\n")
    files = dvcgen.code_closure(["stages.s"], tmp_path)
    assert Path("src/tracerl/pkg/b.py") in files and Path("src/tracerl/pkg/run.py") in files
    assert Path("src/tracerl/other.py") not in files
    assert Path("stages/__init__.py") not in files
    assert dvcgen.collapse(files, tmp_path) == [
        "src/tracerl/__init__.py", "src/tracerl/pkg", "stages/s.py"]


def test_guard_refuses_undeclared_reads_and_records_declared_ones():
    p = load_stage_params(ROOT / "params.yaml", "reward")
    assert p.reward.filter_low == load_params(ROOT / "params.yaml").reward.filter_low
    with pytest.raises(UndeclaredParamsRead, match="stage 'reward' read params 'policy'"):
        _ = p.policy
    q = load_stage_params(ROOT / "params.yaml", "prepare")
    assert q.run.seed == 0
    with pytest.raises(UndeclaredParamsRead, match="'run.iterations'"):
        _ = q.run.iterations
    _ = q.data.train_size
    assert params_reads("prepare") == ["data", "run.seed"]


def test_keys_change_only_with_declared_reads():
    p = load_params(ROOT / "params.yaml").to_dict()
    changed = json.loads(json.dumps(p))
    changed["policy"]["lr"] = 0.5
    for name, spec in STAGES.items():
        same = stage_key(name, 0, p, []) == stage_key(name, 0, changed, [])
        assert same == ("policy" not in spec.sections()), name


def test_missing_outputs_and_metrics_are_named(tmp_path):
    (tmp_path / "scored.parquet").write_bytes(b"x")
    assert missing_outputs("reward", tmp_path) == ["trajectory.html"]
    (tmp_path / "trajectory.html").write_text("<html>")
    assert missing_outputs("reward", tmp_path) == []
    assert missing_outputs("evaluate", tmp_path) == ["eval.json", "samples_*.parquet"]
    assert missing_metrics("reward", {"accuracy": 1.0}) == ["mean_reward", "kept_responses"]

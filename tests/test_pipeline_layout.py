"""Run layout, the plan of stage calls, key chaining and resume detection."""

from __future__ import annotations

from pathlib import Path

from tracerl.config import params_from_dict
from tracerl.pipeline.artifacts import read_manifest, stage_output
from tracerl.pipeline.layout import (
    KEY_FIELD,
    Planner,
    RunLayout,
    StageCall,
    first_unfinished,
    is_done,
    plan_all,
    stamp_key,
)
from tracerl.pipeline.stage_cli import parse_stage_args


def params(**sections):
    base = {"run": {"iterations": 3, "eval_every": 2}}
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return params_from_dict(base)


def test_paths(tmp_path):
    L = RunLayout.from_params(params(), base=tmp_path)
    assert L.root == tmp_path / "runs" / "default"
    assert L.stage_dir("rollout", 2) == L.root / "rl" / "iter_2" / "rollout"
    assert L.stage_dir("sft") == L.root / "sft"
    assert L.dvc_metrics("rl") == L.root / "metrics" / "rl.json"
    assert L.curves == L.root / "plots" / "rl_curves.json"


def test_plan_order_and_inputs(tmp_path):
    p = params()
    L = RunLayout.from_params(p, base=tmp_path)
    calls = plan_all(p, L)
    # value only with policy.use_value; eval after iteration 1 (every 2, not after the last)
    assert [c.label for c in calls] == [
        "prepare", "sft", "evaluate[sft]",
        "rollout[0]", "reward[0]", "policy[0]", "curriculum[0]",
        "rollout[1]", "reward[1]", "policy[1]", "curriculum[1]", "evaluate[1]",
        "rollout[2]", "reward[2]", "policy[2]", "curriculum[2]", "evaluate[final]",
    ]
    by = {(c.label, c.out): c for c in calls}
    r1 = next(c for c in calls if c.label == "rollout[1]")
    assert r1.inputs["policy"] == (L.stage_dir("policy", 0),)
    assert r1.inputs["curriculum"] == (L.stage_dir("curriculum", 0),)
    r0 = next(c for c in calls if c.label == "rollout[0]")
    assert r0.inputs["policy"] == (L.sft,) and "curriculum" not in r0.inputs
    assert calls[-1].out == L.evaluate and calls[2].out == L.baseline_eval
    assert len(by) == len(calls)
    with_value = plan_all(params(policy={"use_value": True}), L)
    pol = next(c for c in with_value if c.label == "policy[1]")
    assert pol.inputs["value"] == (L.stage_dir("value", 1),)


def test_curriculum_window_inputs(tmp_path):
    p = params(curriculum={"window": 2})
    pl = Planner(p, RunLayout(tmp_path))
    pl.prepare(), pl.sft()
    pl.iteration(0)
    cur = pl.iteration(1)[-1]
    assert cur.inputs["scored"] == (RunLayout(tmp_path).stage_dir("reward", 0),
                                    RunLayout(tmp_path).stage_dir("reward", 1))


def test_keys_chain(tmp_path):
    L = RunLayout(tmp_path)
    a = {c.label: c.key for c in plan_all(params(), L)}
    b = {c.label: c.key for c in plan_all(params(policy={"lr": 1e-3}), L)}
    same = {k for k in a if a[k] == b[k]}
    # a policy change keeps everything upstream of policy[0] and curriculum[0] (which
    # reads only data and rewards of iteration 0)
    assert same == {"prepare", "sft", "evaluate[sft]", "rollout[0]", "reward[0]", "curriculum[0]"}
    c = {c.label: c.key for c in plan_all(params(data={"train_size": 10}), L)}
    assert all(a[k] != c[k] for k in a)  # data feeds everything
    assert a == {c.label: c.key for c in plan_all(params(), L)}  # deterministic


def test_resume_detection(tmp_path):
    p = params()
    calls = plan_all(p, RunLayout(tmp_path))
    assert first_unfinished(calls) == 0
    for c in calls[:5]:
        with stage_output(c.out, stage=c.stage):
            pass
        stamp_key(c)
    assert read_manifest(calls[0].out)[KEY_FIELD] == calls[0].key
    assert first_unfinished(calls) == 5
    # a manifest written by another plan (stale key) does not count as done
    stale = StageCall(calls[1].stage, calls[1].out, None, {}, "other")
    assert not is_done(stale)
    # a folder without manifest (killed stage) does not count either
    (calls[5].out).mkdir(parents=True)
    assert first_unfinished(calls) == 5


def test_argv_roundtrip():
    c = StageCall("curriculum", Path("o"), 3, {"scored": (Path("a"), Path("b")),
                                                "data": (Path("d"),)})
    a = parse_stage_args(c.argv("params.yaml"))
    assert (a.out, a.iteration, a.params) == (Path("o"), 3, Path("params.yaml"))
    assert a.inputs == {"scored": [Path("a"), Path("b")], "data": [Path("d")]}
    assert a.require("data") == Path("d")


def test_a_checkpoint_retrained_in_place_is_not_done(tmp_path):
    """model.init names a local folder: the stages that load it depend on what it holds,
    not on its name (a learning comparison retrains its SFT checkpoint under the same
    path; before, the next run skipped its stages as done and scored the old weights)."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"weights v1")
    L = RunLayout(tmp_path / "run")
    p = params(model={"init": str(ckpt)}, sft={"steps": 0})
    a = {c.label: c.key for c in plan_all(p, L)}
    assert a == {c.label: c.key for c in plan_all(p, L)}  # same content: same keys
    (ckpt / "model.safetensors").write_bytes(b"weights v2")  # same name, other weights
    b = {c.label: c.key for c in plan_all(p, L)}
    # prepare does not read model.init's weights... but it reads the model section (the
    # context check), so every stage that reads model.init changes, and all downstream
    changed = {k for k in a if a[k] != b[k]}
    # prepare reads no model params and stays; sft loads model.init, and all after it chain
    assert changed == set(a) - {"prepare"}
    # the default (tiny, no path) keeps the keys it always had: no run re-runs for this
    plain = plan_all(params(), L)
    from tracerl.pipeline.layout import fingerprint, params_read
    sft = next(c for c in plain if c.label == "sft")
    prep = next(c for c in plain if c.label == "prepare")
    assert sft.key == fingerprint(["sft", None, params_read("sft", params().to_dict()),
                                   [prep.key]])

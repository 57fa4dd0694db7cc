"""The real dvc.yaml on fake stages: `dvc repro` runs prepare -> sft -> rl -> evaluate,
a second `dvc repro` does nothing, and changing an RL param marks only rl and evaluate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_flow_fakes import write_fake_stages, write_params
from tracerl.pipeline.registry import EVAL_PLOTS, PLOTS

REPO = Path(__file__).resolve().parents[1]
DVC = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))


def sh(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("dvcproj")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "src" / "tracerl", root / "src" / "tracerl", ignore=ignore)
    shutil.copytree(REPO / "flows", root / "flows", ignore=ignore)
    shutil.copytree(REPO / "stages", root / "stages", ignore=ignore)
    for dep in ("stages/prepare.py", "stages/sft.py", "stages/evaluate.py"):
        if not (root / dep).exists():  # deps of dvc.yaml the fakes stand in for
            (root / dep).write_text("")
    for d in ("src/tracerl/data", "src/tracerl/models", "src/tracerl/rl",
              "src/tracerl/sampling", "src/tracerl/rewards"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    write_params(root / "params.yaml", run={"tracker": "null"})  # MLflow: tested in test_flow
    write_fake_stages(root)
    env = {**os.environ, "TRACERL_STAGES_PACKAGE": "fake_stages", "DVC_NO_ANALYTICS": "1",
           "PYTHONPATH": os.pathsep.join([str(root), str(REPO / "src")]),
           "PREFECT_HOME": str(root / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MLFLOW_TRACKING_URI", None)
    sh(["git", "init", "-q"], root, env)
    sh([DVC, "init", "-q"], root, env)
    sh([DVC, "config", "core.analytics", "false"], root, env)
    (root / ".dvc" / "plots").mkdir(exist_ok=True)  # the template dvc.yaml's plots name
    shutil.copy(REPO / ".dvc" / "plots" / "iterations.json", root / ".dvc" / "plots")
    return root, env


@pytest.mark.slow
def test_repro_then_noop_then_param_change(dvc_project):
    root, env = dvc_project
    out = sh([DVC, "repro"], root, env)
    for stage in ("prepare", "sft", "rl", "evaluate"):
        assert f"Running stage '{stage}'" in out
        assert (root / "runs" / "test" / "metrics" / f"{stage}.json").is_file()
    assert (root / "dvc.lock").is_file()
    again = sh([DVC, "repro"], root, env)
    assert "Running stage" not in again, again
    # the headline only: a few columns, SFT vs final policy; the full files stay outputs
    metrics = sh([DVC, "metrics", "show", "--json"], root, env)
    shown = json.loads(metrics)[""]["data"]
    assert list(shown) == ["runs/test/metrics/headline.json"]
    head = shown["runs/test/metrics/headline.json"]["data"]
    assert head["heldout_accuracy"] == pytest.approx({"sft": 0.3, "final_rl": 0.5, "gain": 0.2})
    # `dvc plots show`: every declared plot, once (the curve files are plain outputs, not
    # stage-level plots drawn again), with data for each of its keys, whole iterations
    plots = json.loads(sh([DVC, "plots", "show", "--json"], root, env))["data"]
    assert list(plots) == [*PLOTS, *EVAL_PLOTS]
    for name, keys in {**PLOTS, **EVAL_PLOTS}.items():
        (plot,) = plots[name]
        values = plot["content"]["data"]["values"]
        fields = {v.get("field", keys[0]) for v in values}
        assert fields == set(keys), name
        assert all(isinstance(v["iteration"], int) for v in values), name
    # `dvc exp show` (needs a commit): the headline's columns, no metric named like a param
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "reference run"], root, env)
    # a committed revision's curves come from DVC's cache (runs/ is not in git)
    diff = json.loads(sh([DVC, "plots", "diff", "HEAD", "--json"], root, env))["data"]
    assert {r for (p,) in diff.values() for r in p["revisions"]} == {"HEAD", "workspace"}
    rows = len(json.loads((root / "runs" / "test" / "plots" / "rl_curves.json").read_text()))
    reward = diff["rl_reward"][0]["content"]["data"]["values"]
    assert sum(v["rev"] == "HEAD" for v in reward) == 2 * rows  # 2 keys x every iteration
    header = sh([DVC, "exp", "show", "--csv"], root, env).splitlines()[0].split(",")
    assert [c for c in header if "accuracy" in c] == [
        "heldout_accuracy.final_rl", "heldout_accuracy.gain", "heldout_accuracy.sft"]
    assert header.count("policy.lr") == 1  # the param; no metric of that name
    # an RL param changes: only rl and evaluate are out of date
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["policy"]["lr"] = params["policy"]["lr"] * 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = sh([DVC, "status"], root, env)
    assert "rl:" in status and "modified:           policy" in status
    assert "prepare:" not in status and "sft:" not in status
    dry = sh([DVC, "repro", "--dry"], root, env)
    assert "Stage 'prepare' didn't change" in dry and "Stage 'sft' didn't change" in dry
    assert "Running stage 'rl'" in dry
    # evaluate depends on rl's output, so it re-runs after rl
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    (rl_out,) = stages["rl"]["outs"][0]  # {path: {persist: true}}
    assert rl_out in stages["evaluate"]["deps"]

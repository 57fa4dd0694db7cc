"""The real dvc.yaml on fake stages: `dvc repro` runs prepare -> sft -> rl -> evaluate,
a second `dvc repro` does nothing, and changing an RL param marks only rl and evaluate."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_flow_fakes import write_fake_stages, write_params

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
    metrics = sh([DVC, "metrics", "show"], root, env)
    assert "runs/test/metrics/evaluate.json" in metrics and "accuracy" in metrics
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

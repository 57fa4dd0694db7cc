"""The ``tracerl`` console command (``[project.scripts]`` -> ``tracerl.cli:main``), run as
``python -m tracerl.cli`` (the installed script itself needs a reinstall to appear)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import params_file

ROOT = Path(__file__).resolve().parents[1]


def tracerl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}",
           "MLFLOW_TRACKING_URI": "sqlite:///somewhere/mlflow.db"}
    return subprocess.run([sys.executable, "-m", "tracerl.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_console_script_points_at_this_module():
    assert 'tracerl = "tracerl.cli:main"' in (ROOT / "pyproject.toml").read_text()


def test_params_check_prints_ok_or_every_problem(tmp_path):
    r = tracerl("params", "check", str(ROOT / "params.yaml"), cwd=tmp_path)
    assert r.returncode == 0 and "ok (run 'default', 30 iterations" in r.stdout, r.stderr
    bad = params_file(tmp_path / "bad.yaml", policy={"lr": "1e-4"}, model={"init": "./gone"})
    r = tracerl("params", "check", str(bad), cwd=tmp_path)
    assert r.returncode == 1 and "2 problem(s)" in r.stderr
    assert "write 1.0e-4" in r.stderr and "model.init './gone'" in r.stderr
    r = tracerl("params", "check", cwd=tmp_path)  # default: ./params.yaml, absent here
    assert r.returncode == 1 and "parameters file not found: params.yaml" in r.stderr
    assert tracerl("nonsense", cwd=tmp_path).returncode == 2


def test_where_lists_a_runs_results_with_the_latest_iteration(tmp_path):
    params_file(tmp_path / "params.yaml", run={"name": "demo", "iterations": 12})
    run = tmp_path / "runs" / "demo"
    for stage in ("prepare", "sft"):
        (run / stage).mkdir(parents=True)
        (run / stage / "manifest.json").write_text("{}")
    for i in range(11):  # iter_0 .. iter_10: the latest is 10 (not 9, as text order says)
        (run / "rl" / f"iter_{i}" / "curriculum").mkdir(parents=True)
        (run / "rl" / f"iter_{i}" / "curriculum" / "manifest.json").write_text("{}")
        (run / "rl" / f"iter_{i}" / "reward").mkdir()
        (run / "rl" / f"iter_{i}" / "reward" / "trajectory.html").write_text("<html>")
    (run / "metrics").mkdir()
    (run / "metrics" / "headline.json").write_text(json.dumps({"heldout_accuracy": {}}))
    r = tracerl("where", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines()}
    assert "runs/demo/sft  (done)" in lines["sft"]
    assert "(not finished)" in lines["evaluate"]
    assert "11 of 12 iterations done" in lines["rl"]
    assert "runs/demo/rl/iter_10/reward/trajectory.html" in lines["viewer"]
    assert "mlflow ui --backend-store-uri sqlite:///somewhere/mlflow.db" in lines["mlflow"]
    r = tracerl("where", "other", cwd=tmp_path)
    assert r.returncode == 1 and "no run folder runs/other yet; runs there: demo" in r.stderr

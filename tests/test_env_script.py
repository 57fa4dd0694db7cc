"""``source scripts/env.sh`` never changes the caller's shell options (issue 16): a
researcher's interactive shell keeps running after a failing command, whether the env
was set up, or its install step failed. The scripts that source it still stop on errors.

Runs the real scripts in a copy of the project layout whose ``.venv`` is a stand-in (a
``python`` that logs its arguments and fails), so no test ever installs anything."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def project(tmp_path):
    (tmp_path / "scripts").mkdir()
    for name in ("env.sh", "run.sh"):
        shutil.copy(ROOT / "scripts" / name, tmp_path / "scripts" / name)
    (tmp_path / "requirements").mkdir()
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (tmp_path / "requirements" / "cpu.lock").write_text("pyyaml==6.0.4\n")
    bin_ = tmp_path / ".venv" / "bin"
    bin_.mkdir(parents=True)
    (bin_ / "python").write_text(f'#!/bin/sh\necho "$@" >> "{tmp_path}/python.log"\nexit 3\n')
    (bin_ / "python").chmod(0o755)
    (bin_ / "activate").write_text(
        'export VIRTUAL_ENV="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"\n'
        'export PATH="$VIRTUAL_ENV/bin:$PATH"\n')
    want = hashlib.sha256((tmp_path / "pyproject.toml").read_bytes()
                          + (tmp_path / "requirements" / "cpu.lock").read_bytes()).hexdigest()
    (tmp_path / ".venv" / ".tracerl-install-stamp").write_text(want[:16] + "\n")
    return tmp_path


def _bash(project: Path, script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], cwd=project, capture_output=True,
                          text=True, timeout=60)


CHECK = """{options}
before="$-|$(set +o)"
source scripts/env.sh
rc=$?
after="$-|$(set +o)"
[ "$before" = "$after" ] && echo "options unchanged" || diff <(echo "$before") <(echo "$after")
echo "rc=$rc"
"""


@pytest.mark.parametrize("options", ["set +e +u +o pipefail", "set -u -o pipefail"])
def test_sourcing_the_env_keeps_the_callers_shell_options(project, options):
    r = _bash(project, CHECK.format(options=options) + 'false\necho "alive $VIRTUAL_ENV"\n')
    assert "options unchanged" in r.stdout and "rc=0" in r.stdout, r.stdout + r.stderr
    assert f"alive {project / '.venv'}" in r.stdout  # the env is active, the shell lives on
    assert not (project / "python.log").exists()  # the stamp matched: nothing installed


def test_a_failed_install_returns_non_zero_and_keeps_the_shell(project):
    (project / ".venv" / ".tracerl-install-stamp").unlink()  # install needed; python fails
    r = _bash(project, CHECK.format(options="set +e") + 'false\necho alive\n')
    assert "options unchanged" in r.stdout and "rc=1" in r.stdout and "alive" in r.stdout
    assert "installing the pinned dependencies failed" in r.stderr
    assert "-m pip install" in (project / "python.log").read_text()


def test_run_script_stops_at_a_failed_env_and_runs_when_it_is_ready(project):
    stamp = project / ".venv" / ".tracerl-install-stamp"
    good = stamp.read_text()
    stamp.unlink()
    r = subprocess.run(["bash", "scripts/run.sh"], cwd=project, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "installing the pinned dependencies failed" in r.stderr
    assert "flows.run" not in (project / "python.log").read_text()  # stopped before it
    stamp.write_text(good)
    r = subprocess.run(["bash", "scripts/run.sh", "--help"], cwd=project, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 3  # the stand-in python ran the pipeline entry point
    assert (project / "python.log").read_text().splitlines()[-1] == "-m flows.run --help"

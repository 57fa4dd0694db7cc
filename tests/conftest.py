"""Shared fixtures: tiny models built from config, the SDAR release layout, torch threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
SDAR_RELEASE = FIXTURES / "sdar-4b-chat-release"

# Stages run by tests log to MLflow like any stage: into a store of the test process's
# own, never the developer's mlflow.db (tests that need a particular store set their own).
# One store per process: xdist workers inherit the controller's environment, and two
# processes creating one SQLite store race in its schema migrations.
_owner = os.environ.get("TRACERL_TEST_MLFLOW_PID")
if "MLFLOW_TRACKING_URI" not in os.environ or _owner not in (None, str(os.getpid())):
    import tempfile

    os.environ["MLFLOW_TRACKING_URI"] = (
        f"sqlite:///{Path(tempfile.mkdtemp(prefix='tracerl-tests-mlflow-')) / 'mlflow.db'}")
    os.environ["TRACERL_TEST_MLFLOW_PID"] = str(os.getpid())

# Tests run two at a time (pytest-xdist) on small machines: one thread each.
torch.set_num_threads(int(os.environ.get("TRACERL_TEST_THREADS", "1")))

# Prefect binds its console log handler to the stream stderr is at the moment it first
# configures logging. Configure it now, under the session's own capture: if a test using
# capsys were first, the handler would keep that test's stream, closed after it.
from prefect.logging.configuration import setup_logging  # noqa: E402

setup_logging()


@pytest.fixture(scope="session")
def default_tokenizer():
    from tracerl.models import build_default_tokenizer

    return build_default_tokenizer()


@pytest.fixture()
def tiny_sdar(default_tokenizer):
    """The tiny block-diffusion test model (2 layers, hidden 32, fp32) and its tokenizer."""
    from tracerl.models import build_for_tokenizer

    return build_for_tokenizer(default_tokenizer, "sdar", seed=0), default_tokenizer


def build_release_checkpoint(out: Path, *, layers: int = 2, hidden: int = 16, heads: int = 2,
                             kv_heads: int = 1, head_dim: int = 8, intermediate: int = 32,
                             seed: int = 0) -> Path:
    """A checkpoint folder laid out like the SDAR-4B-Chat / TraDo release.

    config.json of model_type ``sdar`` (auto_map and all, shrunk to a few layers), the real
    Qwen tokenizer files with ``<|MASK|>``, and random weights saved as two safetensors
    shards under the parameter names of the release's weight index.
    """
    from tracerl.models.release import random_release_checkpoint

    return random_release_checkpoint(SDAR_RELEASE, out, layers=layers, hidden=hidden,
                                     heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                     intermediate=intermediate, seed=seed)


@pytest.fixture()
def release_checkpoint(tmp_path):
    return build_release_checkpoint(tmp_path / "sdar-release")


REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def params_file(path: Path, **sections) -> Path:
    """Write the repository's params.yaml (every section stated, as loading requires) with
    ``sections`` merged over it key by key; returns ``path``."""
    import yaml

    raw = yaml.safe_load(REPO_PARAMS.read_text())
    for name, values in sections.items():
        raw[name].update(values)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def stage_package(tmp_path: Path, monkeypatch, package: str, rollout_source: str):
    """A package of fake stages importable as ``package`` (its ``rollout`` module is
    ``rollout_source``), for runner tests; yields ``tmp_path`` (the package's parent) and
    forgets the package's modules afterwards. Use with ``yield from`` in a fixture."""
    import sys

    d = tmp_path / package
    d.mkdir()
    (d / "__init__.py").write_text("")
    (d / "rollout.py").write_text(rollout_source)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for m in [m for m in sys.modules if m.startswith(package)]:
        del sys.modules[m]

"""prefect.yaml declares deployment `iterate` of the flow `tracerl`, and its entrypoint
loads that flow."""

from __future__ import annotations

import inspect
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_deployment_iterate_points_at_flow_tracerl():
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (dep,) = [d for d in spec["deployments"] if d["name"] == "iterate"]
    assert dep["work_pool"]["name"] == "tracerl-local"
    path, _, name = dep["entrypoint"].partition(":")
    flow = load_flow_from_entrypoint(str(REPO / path) + ":" + name)
    assert flow.name == "tracerl"
    accepted = set(inspect.signature(flow.fn).parameters)
    assert set(dep["parameters"]) <= accepted
    assert {"params_path", "run_name", "iterations", "runner", "part"} <= accepted
    assert "127.0.0.1" in (REPO / "prefect.yaml").read_text()  # documented local commands

"""The contract every stage run must meet, checked alike on the real stages
(tests/test_flow_real.py) and on the fakes the flow tests use (tests/test_flow.py), so
fakes cannot pass where real stages fail."""

from __future__ import annotations

import json
import math

from tracerl.pipeline.artifacts import read_manifest, read_metrics
from tracerl.pipeline.layout import SECONDS_FIELD
from tracerl.pipeline.registry import EVAL_PLOTS, PLOTS, STAGES, missing_metrics, missing_outputs


def assert_run_meets_contract(calls, layout) -> None:
    """Each call wrote its declared outputs and metrics, read only declared params, has a
    real wall time; every plotted curve key is there with data; the evaluation curve runs
    from the SFT baseline (x = 0) to the final policy (x = iterations)."""
    observed: dict[str, set[str]] = {}
    for c in calls:
        assert missing_outputs(c.stage, c.out) == [], c.label
        metrics = read_metrics(c.out)
        assert missing_metrics(c.stage, metrics) == [], c.label
        for k in STAGES.get(c.stage).metrics:
            assert isinstance(metrics[k], (int, float)), (c.label, k, metrics[k])
        manifest = read_manifest(c.out)
        observed.setdefault(c.stage, set()).update(manifest["params_read"])
        assert manifest[SECONDS_FIELD] > 0, c.label
    for stage, reads in observed.items():
        assert reads <= set(STAGES.get(stage).reads), stage
    rows = json.loads(layout.curves.read_text())
    assert rows, "no learning-curve rows"
    for plot, keys in PLOTS.items():
        for key in keys:
            values = [r[key] for r in rows if key in r]
            if not key.startswith("evaluate."):  # evaluation runs every k iterations only
                assert len(values) == len(rows), (plot, key)
            assert any(isinstance(v, (int, float)) and math.isfinite(v) for v in values), (
                plot, key, values)
    evals = json.loads(layout.eval_curve.read_text())
    iterations = len(rows)
    assert [r["model"] for r in evals][0] == "sft" and evals[0]["iteration"] == 0
    assert evals[-1]["model"] == "final" and evals[-1]["iteration"] == iterations
    assert [r["iteration"] for r in evals] == sorted({r["iteration"] for r in evals})
    for plot, keys in EVAL_PLOTS.items():
        for key in keys:
            assert all(math.isfinite(r[key]) for r in evals), (plot, key)

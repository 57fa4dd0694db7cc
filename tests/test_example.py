"""The README's TraceRL loop (examples/trace_rl_loop.py) runs, learns, and is shown verbatim."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

from tracerl.models import tiny_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "trace_rl_loop.py"


def test_readme_shows_the_example_verbatim():
    body = EXAMPLE.read_text().split("# [loop:start]\n")[1].split("# [loop:end]")[0]
    readme = (ROOT / "README.md").read_text()
    marker = "<!-- examples/trace_rl_loop.py -->\n```python\n"
    assert marker in readme, "README lost the example block"
    shown = readme.split(marker)[1].split("```")[0]
    assert shown == body, "README's copy of examples/trace_rl_loop.py drifted: paste it again"
    assert len(body.splitlines()) <= 70


def test_example_runs_and_updates_the_policy():
    spec = importlib.util.spec_from_file_location("trace_rl_loop", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model, tok = tiny_model("sdar", seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = mod.main(model, tok, iterations=2)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(before[n], p)]
    assert not unchanged, f"parameters not updated: {unchanged}"
    assert metrics["empty_batch"] == 0.0 and metrics["steps"] >= 1
    for k in ("loss", "policy_loss", "kl", "clip_fraction", "ratio_max", "entropy",
              "grad_norm", "lr", "tokens_per_s"):
        assert math.isfinite(metrics[k]), (k, metrics[k])
    # the trainer used the records: their block size, their log-probs (same weights)
    assert metrics["rows/block_size"] == 4.0 and metrics["old_logprobs_recorded"] == 1.0

"""For every params section: change one value and re-run the REAL pipeline (tiny model,
one RL iteration, value model on). Exactly the stages that read the section re-run, with
everything downstream of them; every other stage is skipped.

"Reads" here is what the stages were observed to read (the ``params_read`` their guarded
params recorded in each manifest), not what the registry declares; the test also checks
that each stage's declaration equals what it was observed to read, so a declaration can
neither miss a read (the guard fails the stage) nor claim one it does not make.
"""

from __future__ import annotations

import pytest
import yaml

from conftest import params_file
from tracerl.pipeline.artifacts import read_manifest
from tracerl.pipeline.registry import STAGES

pytestmark = pytest.mark.filterwarnings("ignore")

TINY = {
    "run": {"name": "sections", "iterations": 1, "eval_every": 1, "tracker": "null",
            "registered_model": ""},
    "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
              "intermediate_size": 64, "max_position_embeddings": 128},
    "data": {"train_size": 40, "heldout_size": 6, "sft_size": 16, "max_difficulty": 1},
    "sft": {"steps": 2, "batch_size": 8, "warmup_steps": 1},
    "rollout": {"tasks_per_iter": 2, "responses_per_task": 2, "max_tokens": 8, "batch_size": 8},
    # the process-reward judge (the tiny CPU test judge) covers the reward stage's
    # conditional read of model.init
    "reward": {"group_filter": "none", "process_reward": "hf", "process_judge": "tiny",
               "process_chunk_len": 4, "process_k_sample": 1},
    "policy": {"use_value": True, "micro_batch": 4},
    "value": {"micro_batch": 4},
    "evaluate": {"heldout_size": 2, "strategies": ["low_confidence_static"]},
}

# one value per section, applied cumulatively (each run is compared with the one before)
CHANGES = [
    ("sft", "lr", 0.003),
    ("rollout", "temperature", 0.9),
    ("reward", "filter_low", 0.3),
    ("value", "lr", 0.0003),
    ("policy", "lr", 0.0003),
    ("curriculum", "raise_above", 0.7),
    ("evaluate", "temperature", 0.5),
    ("data", "train_size", 44),
    ("model", "intermediate_size", 48),
    ("run", "seed", 1),
]


def _run(tmp_path, raw):
    from flows.tracerl_flow import build, run_pipeline

    params_file(tmp_path / "params.yaml", **raw)
    _, orch, planner, plan_key = build("params.yaml", project_root=tmp_path)
    ran, calls = [], {}

    def submit(call):
        res = orch.run_call(call)
        calls[call.label] = call
        if not res.skipped:
            ran.append(call.label)
        return res

    with orch.parent_run(plan_key):
        run_pipeline(orch, planner, "all", submit)
    return ran, calls


def _downstream(calls, seeds):
    """Labels of ``seeds`` and of every call that consumes their outputs, transitively."""
    producer = {c.out: label for label, c in calls.items()}
    out, changed = set(seeds), True
    while changed:
        changed = False
        for label, c in calls.items():
            if label not in out and any(producer.get(p) in out
                                        for paths in c.inputs.values() for p in paths):
                out.add(label)
                changed = True
    return out


def test_each_section_reruns_exactly_its_readers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load(yaml.safe_dump(TINY))
    ran, calls = _run(tmp_path, raw)
    assert sorted(ran) == sorted(calls)  # a fresh run runs everything
    assert {c.stage for c in calls.values()} == set(STAGES)  # every stage is covered

    # observed reads, per stage (union over its calls), equal the declarations
    observed: dict[str, set[str]] = {}
    for c in calls.values():
        observed.setdefault(c.stage, set()).update(read_manifest(c.out)["params_read"])
    for stage, reads in observed.items():
        assert reads == set(STAGES.get(stage).reads), stage

    for section, key, value in CHANGES:
        raw.setdefault(section, {})[key] = value
        ran, calls = _run(tmp_path, raw)
        readers = {label for label, c in calls.items()
                   if section in observed[c.stage] or f"{section}.{key}" in observed[c.stage]}
        assert readers, f"no stage reads {section}.{key}"
        assert sorted(ran) == sorted(_downstream(calls, readers)), f"{section}.{key}"
        skipped = set(calls) - set(ran)
        if section not in ("data", "model", "run"):
            assert skipped, f"changing {section}.{key} re-ran everything"

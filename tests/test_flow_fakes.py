"""Fake stage modules for flow tests: the real stage CLI contract, no model.

:func:`write_fake_stages` writes a package ``fake_stages`` whose modules parse the real
stage arguments, load the real ``params.yaml``, check that their inputs are complete,
write real artifacts (task and scored parquet files with the declared schemas) through
``stage_output``, and produce deterministic metrics. The curriculum stage is the real
``stages.curriculum``. ``FAKE_LOG`` (a file) records every stage invocation;
``FAKE_CRASH=<label>`` makes that stage raise mid-way; ``FAKE_HANG=<label>`` makes it
touch ``<FAKE_LOG>.hang`` and sleep (for kill tests); ``FAKE_HOLD=<label>`` makes it touch
``<FAKE_LOG>.held`` and wait while ``<FAKE_LOG>.hold`` exists (a kill test's pause that a
resumed run no longer meets once the test removed the file); ``FAKE_EDIT=<label>|<file>|<old>|<new>``
makes it edit a file as a user would mid-run.
"""

from __future__ import annotations

from pathlib import Path

COMMON = r'''
import json, os, time
from pathlib import Path

import polars as pl

from tracerl.pipeline.artifacts import is_complete, read_metrics, stage_output
from tracerl.pipeline.stage_cli import load_stage_params, parse_stage_args
from tracerl.schemas import read_parquet, write_parquet
from tracerl.tracking import stage_run

N_TASKS = 8


def weight(policy_dir):
    return int((Path(policy_dir) / "checkpoint" / "weights.txt").read_text())


def checkpoint(out, name, value):
    for d in ("checkpoint", "trainer_state"):
        (out.dir / d).mkdir()
    (out.dir / "checkpoint" / name).write_text(str(value))
    (out.dir / "trainer_state" / "state.txt").write_text("0")


def prepare(a, p, out):
    df = pl.DataFrame({
        "task_id": [f"t{i}" for i in range(N_TASKS)], "source": ["fake"] * N_TASKS,
        "prompt": [f"{i}+1=" for i in range(N_TASKS)], "answer": [str(i + 1) for i in range(N_TASKS)],
        "difficulty": [i % 4 for i in range(N_TASKS)], "split": ["train"] * N_TASKS,
    })
    for name in ("train", "heldout", "sft"):
        write_parquet(df, out.dir / f"{name}.parquet", "task")
    (out.dir / "skipped.jsonl").write_text("")
    out.metrics.update(train_tasks=N_TASKS, heldout_tasks=N_TASKS, sft_examples=N_TASKS)


def sft(a, p, out):
    checkpoint(out, "weights.txt", 1)
    out.metrics.update(loss=1.0, nll=1.0, lr=1e-3, grad_norm=1.0, tokens_per_s=100.0)


def rollout(a, p, out):
    w, k = weight(a.require("policy")), p.rollout.responses_per_task
    rows = [{"task_id": f"t{t}", "sample_index": s, "prompt_ids": [1], "response_ids": [2],
             "decode_steps": [1], "logprobs": [-0.1], "response_len": 1, "finish_reason": "eos",
             "num_forward": 1, "attention": "block", "block_size": p.model.block_size,
             "steps_per_block": p.rollout.steps_per_block, "max_tokens": p.rollout.max_tokens,
             "strategy": p.rollout.strategy, "dynamic_threshold": p.rollout.dynamic_threshold,
             "entropy_bound": p.rollout.entropy_bound, "temperature": p.rollout.temperature,
             "top_k": p.rollout.top_k, "top_p": p.rollout.top_p, "policy_id": str(w),
             "response_text": "x"} for t in range(N_TASKS) for s in range(k)]
    write_parquet(pl.DataFrame(rows), out.dir / "rollouts.parquet", "rollout")
    out.metrics.update(response_length=10.0 + w, tokens_per_s=100.0, forward_per_token=1.0,
                       block_size=p.model.block_size, max_tokens=p.rollout.max_tokens, level=0)


def reward(a, p, out):
    df = read_parquet(a.require("rollout") / "rollouts.parquet", "rollout")
    w, k = int(df["policy_id"][0]), int(df["sample_index"].max()) + 1
    passed = [min(k, max(0, w + 1 - (int(t[1:]) % 4))) for t in df["task_id"]]  # easier pass more
    correct = [s < n for s, n in zip(df["sample_index"], passed)]
    df = df.with_columns(correct=pl.Series(correct), reward=pl.Series([float(c) for c in correct]),
                         advantage=pl.lit(0.0), kept=pl.lit(True))
    write_parquet(df, out.dir / "scored.parquet", "scored")
    (out.dir / "trajectory.html").write_text("<html><body>replay</body></html>")
    out.metrics.update(accuracy=float(df["correct"].mean()), mean_reward=float(df["reward"].mean()),
                       kept_responses=df.height)


def value(a, p, out):
    checkpoint(out, "value.txt", a.iteration)
    pl.DataFrame({"task_id": ["t0"], "sample_index": [0], "advantages": [[0.0]]}).write_parquet(
        out.dir / "advantages.parquet")
    out.metrics.update(value_loss=0.5 / (a.iteration + 1), value_mean=0.1, explained_var=0.0, grad_norm=1.0,
                       lr=p.value.lr)


def policy(a, p, out):
    w = weight(a.require("policy")) + 1
    checkpoint(out, "weights.txt", w)
    with stage_run("policy", iteration=a.iteration) as t:  # step-wise metrics, TRACERL_RUN_ID
        for step in range(3):
            t.log_metrics({"train_loss": 1.0 / (w + step)}, step=step)
    out.metrics.update(kl=0.01 * w, clip_fraction=0.1, loss=1.0 / w, lr=p.policy.lr,
                       ratio_max=1.1, entropy=1.0, grad_norm=1.0)


def evaluate(a, p, out):
    w = weight(a.require("policy"))
    cfg = {"strategy": p.evaluate.strategies[0], "temperature": p.evaluate.temperature}
    (out.dir / "eval.json").write_text(json.dumps([{"accuracy": 0.2 + 0.1 * w, **cfg}]))
    held = read_parquet(a.require("data") / "heldout.parquet", "task")
    held.write_parquet(out.dir / "samples_heldout.parquet")
    out.metrics.update(accuracy=0.2 + 0.1 * w)


def log_label(stage, argv):
    a = parse_stage_args(argv, stage)
    for name, paths in a.inputs.items():
        for d in paths:
            assert is_complete(d), f"{stage}: input {name}={d} is not complete"
    label = stage if a.iteration is None else f"{stage}[{a.iteration}]"
    if stage == "evaluate":  # the planner's roles: the SFT baseline, the final policy
        if a.iteration is None:
            label = "evaluate[sft]"
        elif Path(a.out).parent.name != f"iter_{a.iteration}":
            label = "evaluate[final]"
    log = os.environ.get("FAKE_LOG")
    if log:
        with open(log, "a") as f:
            f.write(label + "\n")
    return a, label, log


def run(stage, argv):
    a, label, log = log_label(stage, argv)
    p = load_stage_params(a.params, stage)
    with stage_output(a.out, stage=stage) as out:
        (out.dir / "partial.bin").write_bytes(b"0" * 16)
        if os.environ.get("FAKE_CRASH") == label:
            raise RuntimeError(f"injected crash in {label}")
        edit = os.environ.get("FAKE_EDIT", "").split("|")  # label|file|old|new: a user's edit
        if edit[0] == label:
            f = Path(edit[1])
            f.write_text(f.read_text().replace(edit[2], edit[3]))
        if os.environ.get("FAKE_HANG") == label:
            Path(log + ".hang").touch()
            time.sleep(600)
        if os.environ.get("FAKE_HOLD") == label:
            Path(log + ".held").touch()
            deadline = time.monotonic() + 600
            while Path(log + ".hold").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        globals()[stage](a, p, out)
    return 0
'''

STAGE = '''
from fake_stages._common import run


def main(argv=None):
    return run({stage!r}, argv)
'''

CURRICULUM = '''
from fake_stages._common import log_label
from stages.curriculum import main as real_main


def main(argv=None):
    log_label("curriculum", argv)
    return real_main(argv)
'''

STAGES = ("prepare", "sft", "rollout", "reward", "value", "policy", "evaluate")


def write_fake_stages(root: Path, package: str = "fake_stages") -> Path:
    """Write the fake stage package under ``root``; returns its folder."""
    pkg = root / package
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "_common.py").write_text(COMMON)
    for s in STAGES:
        (pkg / f"{s}.py").write_text(STAGE.format(stage=s))
    (pkg / "curriculum.py").write_text(CURRICULUM)
    return pkg


def write_params(path: Path, **sections) -> Path:
    """The repository's params.yaml (every key stated, as DVC's templating needs) with
    2 iterations, evaluation every iteration and the value model on."""
    import yaml

    repo_params = Path(__file__).resolve().parents[1] / "params.yaml"
    base = yaml.safe_load(repo_params.read_text())
    for k, v in {
        "run": {"name": "test", "iterations": 2, "eval_every": 1},
        "rollout": {"responses_per_task": 4},
        "policy": {"use_value": True},
        "curriculum": {"window": 2},
    }.items():
        base[k].update(v)
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    path.write_text(yaml.safe_dump(base))
    return path

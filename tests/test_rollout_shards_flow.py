"""The Prefect flow with a sharded rollout: shards as concurrent Prefect tasks (each in a
subprocess), one shard dying on its first attempt and retried by Prefect, resume after a
crash mid-shards, and ``rollout.shards`` 1 -> 2 re-running nothing.

The rollout is the real stage (tiny model, real checkpoint), wrapped to log each
invocation and to die on demand (``SHARD_CRASH=<label>``: once, or every time with
``SHARD_CRASH_ALWAYS``); the other stages are the fakes of ``test_flow_fakes`` with a
reward and an SFT stage that fit a real rollout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from test_flow_fakes import write_fake_stages, write_params
from tracerl.pipeline.artifacts import read_manifest, sha256_file
from tracerl.tracking import PARENT_TAG, MlflowTracker

pytestmark = pytest.mark.filterwarnings("ignore")

ROLLOUT = r'''
import os, sys
from pathlib import Path

from stages.rollout import main as real_main


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    label = f"rollout[{argv[argv.index('--iteration') + 1]}]"
    if "--shard" in argv:
        k, n = argv[argv.index("--shard") + 1].split("/")
        label += f".shard{k}of{n}"
    log = os.environ["FAKE_LOG"]
    with open(log, "a") as f:
        f.write(label + "\n")
    if os.environ.get("SHARD_CRASH") == label:
        marker = Path(f"{log}.{label}.crashed")
        if os.environ.get("SHARD_CRASH_ALWAYS") or not marker.exists():
            marker.touch()
            os._exit(9)  # dies like a killed worker: no clean-up, no output
    return real_main(argv)


if __name__ == "__main__":
    sys.exit(main())
'''

SFT = r'''
from fake_stages._common import log_label
from tracerl.config import load_params
from tracerl.models import save_model
from tracerl.pipeline.artifacts import stage_output
from tracerl.pipeline.resolve import policy_from_params


def main(argv=None):
    a, _, _ = log_label("sft", argv)
    model, tok = policy_from_params("tiny", load_params(a.params))
    with stage_output(a.out, stage="sft") as out:
        save_model(model, tok, out.dir / "checkpoint")
        (out.dir / "checkpoint" / "weights.txt").write_text("1")  # the fake evaluate's
        (out.dir / "trainer_state").mkdir()
        (out.dir / "trainer_state" / "state.txt").write_text("0")
        out.metrics.update(loss=1.0, nll=1.0, lr=1e-3, grad_norm=1.0, tokens_per_s=1.0)
    return 0
'''

REWARD = r'''
import polars as pl

from fake_stages._common import log_label
from tracerl.pipeline.artifacts import stage_output
from tracerl.schemas import read_parquet, write_parquet


def main(argv=None):
    a, _, _ = log_label("reward", argv)
    df = read_parquet(a.require("rollout") / "rollouts.parquet", "rollout")
    correct = [n % 2 == 0 for n in df["response_len"]]  # a function of the rollout
    df = df.with_columns(correct=pl.Series(correct),
                         reward=pl.Series([float(c) for c in correct]),
                         advantage=pl.lit(0.0), kept=pl.lit(True))
    with stage_output(a.out, stage="reward") as out:
        write_parquet(df, out.dir / "scored.parquet", "scored")
        (out.dir / "trajectory.html").write_text("<html></html>")
        out.metrics.update(accuracy=float(df["correct"].mean()),
                           mean_reward=float(df["reward"].mean()), kept_responses=df.height)
    return 0
'''


def _params(path: Path, shards: int, retries: int) -> Path:
    return write_params(
        path, run={"iterations": 1, "threads": 0},
        model={"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
               "intermediate_size": 64, "max_position_embeddings": 128},
        # 4 tasks x 2 responses in batches of 2: 4 batches
        rollout={"tasks_per_iter": 4, "responses_per_task": 2, "max_tokens": 8,
                 "batch_size": 2, "shards": shards, "shard_retries": retries},
        policy={"use_value": False}, curriculum={"window": 1, "enabled": False})


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("shardflow")
    pkg = write_fake_stages(root)
    (pkg / "rollout.py").write_text(ROLLOUT)
    (pkg / "sft.py").write_text(SFT)
    (pkg / "reward.py").write_text(REWARD)
    _params(root / "one.yaml", 1, 0)
    _params(root / "two.yaml", 2, 1)
    _params(root / "two_no_retry.yaml", 2, 0)
    sys.path.insert(0, str(root))
    with pytest.MonkeyPatch.context() as mp:
        for k in ("MLFLOW_TRACKING_URI", "TRACERL_RUN_ID", "TRACERL_PARENT_RUN_ID",
                  "SHARD_CRASH", "SHARD_CRASH_ALWAYS"):
            mp.delenv(k, raising=False)
        yield root
    sys.path.remove(str(root))
    for m in [m for m in sys.modules if m.startswith("fake_stages")]:
        del sys.modules[m]


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def run_flow(project: Path, params: str, run_name: str, log: Path, **env) -> dict:
    from flows.tracerl_flow import tracerl

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FAKE_LOG", str(log))
        for k, v in env.items():
            mp.setenv(k, v)
        return tracerl(params_path=params, run_name=run_name, project_root=str(project),
                       package="fake_stages")


def labels(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def it0(project: Path, run: str) -> Path:
    return project / "runs" / run / "rl" / "iter_0"


def same_results(project: Path, run: str, ref: str) -> None:
    """Byte-identical rollout and scores, and the same keys downstream."""
    a, b = it0(project, run), it0(project, ref)
    for f in ("rollout/rollouts.parquet", "rollout/skipped.jsonl", "reward/scored.parquet"):
        assert sha256_file(a / f) == sha256_file(b / f), f
    for stage in ("rollout", "reward", "policy", "curriculum"):
        assert read_manifest(a / stage)["tracerl_key"] == read_manifest(b / stage)["tracerl_key"]


@pytest.fixture(scope="module")
def unsharded(project, harness):
    run_flow(project, "one.yaml", "one", project / "one.log")
    assert "rollout[0]" in labels(project / "one.log")
    return "one"


def test_shard_dies_once_prefect_retries_it(project, unsharded):
    log = project / "two.log"
    run_flow(project, "two.yaml", "two", log, SHARD_CRASH="rollout[0].shard2of2")
    got = labels(log)
    assert got.count("rollout[0].shard1of2") == 1  # the other shard ran once
    assert got.count("rollout[0].shard2of2") == 2  # died, retried by Prefect
    assert got.count("rollout[0]") == 1  # the merge
    assert got.index("rollout[0]") > max(i for i, x in enumerate(got) if "shard" in x)
    same_results(project, "two", unsharded)
    shards = it0(project, "two") / "rollout_shards"
    assert sorted(p.name for p in shards.iterdir()) == ["shard1of2", "shard2of2"]
    # MLflow: child runs of this run's parent, named by the shard labels
    parent = json.loads((project / "runs" / "two" / "tracking.json").read_text())["parent_run_id"]
    t = MlflowTracker(project)
    runs = t.client.search_runs([t.experiment_id],
                                filter_string=f"tags.`{PARENT_TAG}` = '{parent}'")
    status = {}
    for r in runs:
        status.setdefault(r.info.run_name, []).append(r.info.status)
    assert status["rollout[0].shard1of2"] == ["FINISHED"]
    assert sorted(status["rollout[0].shard2of2"]) == ["FAILED", "FINISHED"]
    assert status["rollout[0]"] == ["FINISHED"]
    merged = [r for r in runs if r.info.run_name == "rollout[0]"][0]
    assert merged.data.metrics["shards"] == 2.0


def test_resume_after_a_crash_mid_shards(project, unsharded):
    log = project / "three.log"
    with pytest.raises(Exception, match=r"rollout\[0\]\.shard2of2 failed"):
        run_flow(project, "two_no_retry.yaml", "three", log,
                 SHARD_CRASH="rollout[0].shard2of2", SHARD_CRASH_ALWAYS="1")
    shards = it0(project, "three") / "rollout_shards"
    assert (shards / "shard1of2" / "manifest.json").is_file()
    assert not (shards / "shard2of2" / "manifest.json").exists()
    assert not (it0(project, "three") / "rollout").exists()
    before = len(labels(log))
    run_flow(project, "two_no_retry.yaml", "three", log)
    resumed = labels(log)[before:]
    assert "rollout[0].shard1of2" not in resumed  # finished shard kept
    assert resumed[:2] == ["rollout[0].shard2of2", "rollout[0]"]
    same_results(project, "three", unsharded)


def test_changing_shards_reruns_nothing(project, unsharded):
    """rollout.shards 1 -> 2 on a finished run: every key is unchanged, nothing runs."""
    log = project / "one.log"
    before = len(labels(log))
    run_flow(project, "two.yaml", "one", log)
    assert labels(log)[before:] == []

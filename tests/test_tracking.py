"""MlflowTracker against a real MLflow SQLite backend in tmp_path; NullTracker no-ops."""

from __future__ import annotations

import mlflow
import pytest

from tracerl.tracking import (
    PARENT_RUN_ENV,
    PARENT_TAG,
    RUN_ID_ENV,
    MlflowTracker,
    NullTracker,
    Tracker,
    default_tracking_uri,
    flatten_params,
    stage_run,
)


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    """One SQLite backend for the module (creating it runs MLflow's migrations, ~1 s)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield MlflowTracker(tmp_path_factory.mktemp("mlproj"), experiment="test")


def test_protocol_conformance(tracker):
    assert isinstance(tracker, Tracker)
    assert isinstance(NullTracker(), Tracker)


def test_default_backend_is_sqlite_inside_project(tracker):
    assert tracker.tracking_uri == f"sqlite:///{tracker.root / 'mlflow.db'}"
    with tracker.start_run("probe"):
        pass
    assert (tracker.root / "mlflow.db").is_file()


def test_env_uri_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert default_tracking_uri(tmp_path) == "sqlite:///elsewhere.db"


def test_parent_child_params_metrics_artifacts(tracker, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "w.bin").write_bytes(b"\0" * 8)
    (tmp_path / "viewer.html").write_text("<html></html>")
    with tracker.start_run("pipeline", tags={"tracerl.run": "r1"}) as parent:
        tracker.log_params({"rollout": {"k": 8}, "seed": 0})
        for step, r in enumerate([0.1, 0.4]):
            tracker.log_metrics({"reward": r, "note": "text dropped", "nested": {"kl": 0.01}}, step=step)
        with tracker.start_run("rollout/iter_0", parent_run_id=parent, tags={"tracerl.stage": "rollout"}) as child:
            assert tracker.run_id == child
            tracker.log_artifact(tmp_path / "viewer.html")
            tracker.log_artifact(tmp_path / "ckpt", artifact_path="checkpoint")
            tracker.set_tags({"tracerl.iteration": 0})
        assert tracker.run_id == parent
    c = tracker.client
    p, ch = c.get_run(parent), c.get_run(child)
    assert p.info.status == "FINISHED" and ch.info.status == "FINISHED"
    assert ch.data.tags[PARENT_TAG] == parent
    assert ch.data.tags["tracerl.iteration"] == "0"
    assert p.data.params == {"rollout.k": "8", "seed": "0"}
    hist = c.get_metric_history(parent, "reward")
    assert [(m.step, m.value) for m in hist] == [(0, 0.1), (1, 0.4)]
    assert "nested.kl" in p.data.metrics and "note" not in p.data.metrics
    arts = {a.path for a in c.list_artifacts(child)}
    assert arts == {"viewer.html", "checkpoint"}
    assert [a.path for a in c.list_artifacts(child, "checkpoint")] == ["checkpoint/w.bin"]


def test_failed_status_on_exception(tracker):
    with pytest.raises(ZeroDivisionError):
        with tracker.start_run("boom") as rid:
            1 / 0  # noqa: B018
    assert tracker.client.get_run(rid).info.status == "FAILED"
    assert tracker.run_id is None


def test_works_with_fluent_run_already_active(tracker):
    """The torchtune MLFlowLogger defect: an active fluent run must not break us."""
    mlflow.set_tracking_uri(tracker.tracking_uri)
    with mlflow.start_run(experiment_id=tracker.experiment_id) as outer:
        with tracker.start_run("inner") as rid:
            tracker.log_metrics({"x": 1.0}, step=3)
        assert mlflow.active_run().info.run_id == outer.info.run_id
    assert rid != outer.info.run_id
    assert tracker.client.get_run(rid).data.metrics["x"] == 1.0
    assert tracker.client.get_run(outer.info.run_id).data.metrics == {}


def test_register_model(tracker, tmp_path):
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "config.json").write_text("{}")
    with tracker.start_run("final"):
        v1 = tracker.register_model(tmp_path / "policy", "tracerl-policy")
        v2 = tracker.register_model(tmp_path / "policy", "tracerl-policy")
    assert (v1, v2) == ("1", "2")
    mv = tracker.client.get_model_version("tracerl-policy", "2")
    assert mv.source.endswith("/model")


def test_stage_run_uses_env(tracker, monkeypatch):
    with tracker.start_run("pipeline") as parent:
        monkeypatch.setenv(PARENT_RUN_ENV, parent)
        monkeypatch.delenv(RUN_ID_ENV, raising=False)
        with stage_run("reward", tracker, iteration=2) as t:
            child = t.run_id
            t.log_metrics({"accuracy": 0.5}, step=2)
        run = tracker.client.get_run(child)
        assert run.data.tags[PARENT_TAG] == parent
        assert run.data.tags["tracerl.stage"] == "reward"
        assert run.info.run_name == "reward/iter_2"
        # an orchestrator-opened run is resumed, not duplicated, and left running
        with tracker.start_run("policy/iter_2", parent_run_id=parent) as opened:
            monkeypatch.setenv(RUN_ID_ENV, opened)
            with stage_run("policy", tracker, iteration=2) as t:
                assert t.run_id == opened
            assert tracker.client.get_run(opened).info.status == "RUNNING"
        assert tracker.client.get_run(opened).info.status == "FINISHED"


def test_no_current_run_is_a_clear_error(tracker):
    with pytest.raises(RuntimeError, match="no current run"):
        tracker.log_metrics({"a": 1.0})


def test_flatten_params():
    assert flatten_params({"a": {"b": {"c": 1}}, "d": [1, 2]}) == {"a.b.c": 1, "d": [1, 2]}


def test_metric_names_mlflow_rejects_are_sanitised(tmp_path):
    """Stages emit keys like ``pass@1``; MLflow refuses '@', the tracker maps it."""
    from tracerl.tracking import MlflowTracker

    tr = MlflowTracker(tmp_path)
    with tr.start_run("names") as run_id:
        tr.log_metrics({"heldout.static.pass@1": 0.5, "rows/total": 3}, step=0)
    got = tr.client.get_run(run_id).data.metrics
    assert got == {"heldout.static.pass_at_1": 0.5, "rows/total": 3.0}

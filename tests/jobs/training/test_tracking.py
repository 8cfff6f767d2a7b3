"""MLflow tracking against a real `mlflow server`: logging survives the server going away.

The outages are made by a TCP proxy between the tracker and the session's server
(tests/support/proxy.py): down, it refuses and cuts every connection, as a stopped or
restarting server does, and the server's store is the same once it is back up."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from jobs.cluster.secrets import REDACTED
from jobs.training.tracking import Tracker, TrackingConfig, flatten
from tests.support.proxy import FlakyProxy


def test_flatten_nests_and_redacts():
    flat = flatten({"optim": {"lr": 0.1}, "storage": {"secret_key": "abc", "endpoint": "x"}})
    assert flat == {"optim.lr": "0.1", "storage.secret_key": REDACTED, "storage.endpoint": "x"}


def test_local_sqlite_store_records_params_metrics_and_artifacts(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(TrackingConfig(tracking_uri=uri, experiment="local"), run_name="r")
    tracker.log_params({"model": {"name": "tiny"}})
    for step in range(5):
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    report = tmp_path / "report.json"
    report.write_text("{}")
    tracker.log_artifact(report)
    assert tracker.close()
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"model.name": "tiny"}
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(5))
    assert [f.path for f in client.list_artifacts(run.info.run_id)] == ["report.json"]
    assert (tmp_path / "mlartifacts").is_dir(), "artifacts stay beside the database"


def test_an_artifact_logged_unless_present_is_uploaded_once(tmp_path):
    """What a resumed training start does with its first-batch sheet: the run's sheet is
    kept when it arrived; a plain log_artifact replaces it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sheets = []
    for text in ("first", "second", "third"):
        folder = tmp_path / text
        folder.mkdir()
        (folder / "first_batch.png").write_text(text)
        sheets.append(folder / "first_batch.png")
    tracker = Tracker(TrackingConfig(tracking_uri=uri, experiment="sheets"), run_name="r")
    tracker.log_artifact(sheets[0], "inspect", unless_present=True)  # none yet: uploaded
    tracker.log_artifact(sheets[1], "inspect", unless_present=True)  # present: skipped
    assert tracker.close()
    client = MlflowClient(tracking_uri=uri)

    def sheet() -> str:
        path = client.download_artifacts(tracker.run_id, "inspect/first_batch.png", str(tmp_path))
        return Path(path).read_text()

    assert [a.path for a in client.list_artifacts(tracker.run_id, "inspect")] == [
        "inspect/first_batch.png"
    ]
    assert sheet() == "first"
    again = Tracker(TrackingConfig(tracking_uri=uri, experiment="sheets"), run_id=tracker.run_id)
    again.log_artifact(sheets[2], "inspect")
    assert again.close()
    assert sheet() == "third"


def test_disabled_tracker_is_a_no_op(tmp_path):
    tracker = Tracker(TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'x.db'}", enabled=False))
    tracker.log_metrics({"loss": 1.0}, step=0)
    assert tracker.close()
    assert tracker.run_id is None
    assert not (tmp_path / "x.db").exists()


def test_resumed_run_with_changed_params_keeps_logging(tmp_path, caplog):
    """MLflow refuses to change a logged param: a run resumed with another config records the
    new values as tags and goes on delivering metrics (no retry loop, no stalled close)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = Tracker(TrackingConfig(tracking_uri=uri), run_name="r")
    first.log_params({"max_steps": 10, "lr": 0.1})
    first.log_metrics({"loss": 1.0}, step=1)
    assert first.close()

    with caplog.at_level(logging.WARNING, logger="jobs.training.tracking"):
        again = Tracker(TrackingConfig(tracking_uri=uri, retry_seconds=0.1), run_id=first.run_id)
        again.log_params({"max_steps": 20, "lr": 0.1, "seed": 3})
        again.log_metrics({"loss": 0.5}, step=2)
        start = time.monotonic()
        assert again.close(timeout=30)
    assert time.monotonic() - start < 10
    run = MlflowClient(tracking_uri=uri).get_run(first.run_id)
    assert run.data.params == {"max_steps": "10", "lr": "0.1", "seed": "3"}
    assert run.data.tags["changed_param.max_steps"] == "20"
    assert "changed_param.lr" not in run.data.tags
    history = MlflowClient(tracking_uri=uri).get_metric_history(first.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2]
    assert "changed_param.max_steps" in caplog.text
    assert "unreachable" not in caplog.text


@pytest.mark.slow
def test_server_outage_warns_keeps_going_and_delivers_after_return(mlflow_server, caplog):
    server = FlakyProxy(mlflow_server.port)
    server.up()
    try:
        cfg = TrackingConfig(tracking_uri=server.url, experiment="outage", retry_seconds=0.5)
        tracker = Tracker(cfg, run_name="outage")
        tracker.log_metrics({"loss": 0.0}, step=0)
        run_id = tracker.wait_for_run(timeout=60)
        assert run_id is not None
        server.down()
        with caplog.at_level(logging.WARNING, logger="jobs.training.tracking"):
            start = time.monotonic()
            for step in range(1, 51):
                tracker.log_metrics({"loss": float(step)}, step=step)
            assert time.monotonic() - start < 1.0, "logging must not block while MLflow is down"
            deadline = time.monotonic() + 60
            while "unreachable" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.2)
            assert "metrics are not being logged" in caplog.text
            server.up()
            assert tracker.close(timeout=120)
            assert "reachable again" in caplog.text
        history = MlflowClient(tracking_uri=server.url).get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == list(range(51))
    finally:
        server.down()


@pytest.mark.slow
def test_start_while_server_is_down_then_resume_existing_run(mlflow_server):
    server = FlakyProxy(mlflow_server.port)  # down until its first up()
    cfg = TrackingConfig(tracking_uri=server.url, experiment="late", retry_seconds=0.5)
    tracker = Tracker(cfg, run_name="late")
    tracker.log_metrics({"loss": 1.0}, step=0)
    assert tracker.wait_for_run(timeout=2) is None
    server.up()
    try:
        assert tracker.close(timeout=120)
        first = tracker.run_id
        resumed = Tracker(cfg, run_id=first)
        resumed.log_metrics({"loss": 0.5}, step=1)
        assert resumed.close(timeout=60)
        assert resumed.run_id == first
        steps = [
            m.step for m in MlflowClient(tracking_uri=server.url).get_metric_history(first, "loss")
        ]
        assert sorted(steps) == [0, 1]
    finally:
        server.down()

"""MLflow tracking that never stops a job: a background sender with a bounded buffer.

Training calls `tracker.log_metrics(...)` and moves on; a daemon thread sends
batches to MLflow. When the tracking server is unreachable, the thread warns
once, keeps what is pending (up to `max_pending` metrics; the oldest are
dropped past that, with a count), retries every `retry_seconds`, and says when
the server is back and how much it delivered. Runs are created lazily, so a
job can even start while MLflow is down; an existing run id (e.g. from a
checkpoint) is resumed instead of creating a new run.

    tracker = Tracker(TrackingConfig(experiment="gram"), run_name="train-1")
    tracker.log_params(flatten(config_dict))
    tracker.log_metrics({"loss": 1.2}, step=10)
    tracker.close()  # flushes, ends the run; returns False if something was never delivered
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from jobs.cluster.secrets import redact
from jobs.common.settings import default_tracking_uri

__all__ = ["Tracker", "TrackingConfig", "artifact_location", "flatten"]

log = logging.getLogger(__name__)

# A single MLflow HTTP call must not hang for minutes while the server is away; the
# tracker retries by itself. Users can still override these in the environment.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_MAX_PARAM_CHARS = 6000
_BATCH_METRICS = 1000
_BATCH_PARAMS = 100
# MLflow error codes no retry can fix (the server answered and said no): such a call is
# settled at once instead of being retried as if the server were away.
_REFUSED = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "BAD_REQUEST",
        "INVALID_STATE",
        "RESOURCE_ALREADY_EXISTS",
        "RESOURCE_DOES_NOT_EXIST",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
    }
)


@dataclass
class TrackingConfig:
    """Where and how a job logs to MLflow.

    tracking_uri: MLflow tracking URI; empty = $MLFLOW_TRACKING_URI, else a local
        sqlite store `sqlite:///<cwd>/mlflow.db` with artifacts beside it.
    experiment: experiment name (created when missing).
    enabled: False turns every call into a no-op.
    retry_seconds: pause between attempts while the server is unreachable, s.
    max_pending: metrics kept while the server is unreachable (oldest dropped first).
    flush_seconds: how long closing waits for the server to take what is pending, s.
    """

    tracking_uri: str = ""
    experiment: str = "gram"
    enabled: bool = True
    retry_seconds: float = 5.0
    max_pending: int = 100_000
    flush_seconds: float = 300.0


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {"a.b": "value"} with values as strings, secrets redacted."""
    out: dict[str, str] = {}
    for key, value in redact(data).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:_MAX_PARAM_CHARS]
    return out


@dataclass
class _Op:
    kind: Literal["metrics", "params", "tags", "artifact"]
    payload: Any


class Tracker:
    """Non-blocking, outage-tolerant MLflow logging for one run (use on rank 0 only).

    `uri` is the job's resolved tracking URI (`JobSettings.tracking_uri`); empty resolves
    `cfg.tracking_uri` here (`default_tracking_uri`).
    """

    def __init__(
        self,
        cfg: TrackingConfig,
        *,
        uri: str = "",
        run_name: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.uri = uri or default_tracking_uri(cfg.tracking_uri)
        self._run_name = run_name
        self._run_id = run_id
        self._run_checked = False
        self._tags = dict(tags or {})
        self._ops: collections.deque[_Op] = collections.deque()
        self._pending_metrics = 0
        self._dropped = 0
        self._delivered = 0
        self._cond = threading.Condition()
        self._closing = False
        self._abandoned = False
        self._status = "FINISHED"
        self._down_since: float | None = None
        self._thread: threading.Thread | None = None
        if cfg.enabled:
            for key, value in _HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)
            _quiet_retries(self.uri)
            self._thread = threading.Thread(target=self._loop, name="mlflow-tracker", daemon=True)
            self._thread.start()

    # -- public API: every call returns at once ---------------------------------------------

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, once the run exists (None while the server was never reached)."""
        return self._run_id

    def wait_for_run(self, timeout: float) -> str | None:
        """Block up to `timeout` s until the run exists; returns its id or None."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._run_id is None and self.cfg.enabled and time.monotonic() < deadline:
                self._cond.wait(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
        return self._run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._push(_Op("params", flatten(params)))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._push(_Op("tags", flatten(tags)))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        items = [(k, float(v), now, int(step)) for k, v in metrics.items()]
        self._push(_Op("metrics", items))

    def log_artifact(
        self,
        local_path: str | Path,
        artifact_path: str | None = None,
        *,
        unless_present: bool = False,
    ) -> None:
        """Upload a file under `artifact_path`; with `unless_present`, only when the run has
        no artifact of that name there yet (checked when it is sent)."""
        self._push(_Op("artifact", (str(local_path), artifact_path, unless_present)))

    def close(
        self,
        status: Literal["FINISHED", "FAILED", "KILLED"] = "FINISHED",
        timeout: float | None = None,
    ) -> bool:
        """Flush and end the run. True when everything logged was delivered."""
        if self._thread is None:
            return True
        with self._cond:
            self._status = status
            self._closing = True
            self._cond.notify_all()
        self._thread.join(self.cfg.flush_seconds if timeout is None else timeout)
        with self._cond:
            self._abandoned = True  # a sender still retrying gives up now
            self._cond.notify_all()
        undelivered = len(self._ops) + self._dropped
        if undelivered:
            log.warning(
                "MLflow at %s: %d logging call(s) and %d dropped metric(s) were never delivered",
                self.uri,
                len(self._ops),
                self._dropped,
            )
        return undelivered == 0 and not self._thread.is_alive()

    # -- background sender ------------------------------------------------------------------

    def _push(self, op: _Op) -> None:
        if not self.cfg.enabled:
            return
        with self._cond:
            self._ops.append(op)
            if op.kind == "metrics":
                self._pending_metrics += len(op.payload)
                while self._pending_metrics > self.cfg.max_pending and self._ops:
                    oldest = next((o for o in self._ops if o.kind == "metrics"), None)
                    if oldest is None:
                        break
                    self._ops.remove(oldest)
                    self._pending_metrics -= len(oldest.payload)
                    self._dropped += len(oldest.payload)
            self._cond.notify_all()

    def _loop(self) -> None:
        from mlflow import MlflowClient

        client = None
        while True:
            with self._cond:
                while not self._ops and not self._closing:
                    self._cond.wait(timeout=1.0)
                if self._abandoned:
                    return
                closing = self._closing
            try:
                if client is None:  # opening a store can fail too (a server down, a busy sqlite)
                    client = MlflowClient(tracking_uri=self.uri)
                self._ensure_run(client)
                self._drain(client)
                self._recovered()
                if closing and self._run_id is not None:  # all pushed before close() is sent
                    client.set_terminated(self._run_id, status=self._status)
                    return
            except Exception as exc:
                self._unreachable(exc)
                with self._cond:
                    self._cond.wait(timeout=self.cfg.retry_seconds)

    def _ensure_run(self, client: Any) -> None:
        from mlflow.exceptions import MlflowException

        if self._run_id is not None and not self._run_checked:
            try:
                client.get_run(self._run_id)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning(
                    "MLflow run %s not found at %s: starting a new run", self._run_id, self.uri
                )
                self._run_id = None
            self._run_checked = True
        if self._run_id is not None:
            return
        experiment = client.get_experiment_by_name(self.cfg.experiment)
        if experiment is None:
            exp_id = client.create_experiment(
                self.cfg.experiment,
                artifact_location=artifact_location(self.uri, self.cfg.experiment),
            )
        else:
            exp_id = experiment.experiment_id
        run = client.create_run(exp_id, run_name=self._run_name, tags=self._tags)
        with self._cond:
            self._run_id = run.info.run_id
            self._run_checked = True
            self._cond.notify_all()
        log.info(
            "MLflow run %s in experiment %r at %s", self._run_id, self.cfg.experiment, self.uri
        )

    def _drain(self, client: Any) -> None:
        from mlflow.exceptions import MlflowException

        while True:
            with self._cond:
                if not self._ops:
                    return
                op = self._ops[0]
            try:
                self._send(client, op)
            except MlflowException as exc:
                if exc.error_code not in _REFUSED:
                    raise
                self._refused(client, op, exc)
            with self._cond:
                self._ops.popleft()
                if op.kind == "metrics":
                    self._pending_metrics -= len(op.payload)
                self._delivered += 1

    def _send(self, client: Any, op: _Op) -> None:
        """Deliver one logging call (raises MlflowException when the server fails or refuses)."""
        from mlflow.entities import Metric, Param, RunTag

        if op.kind == "metrics":
            for i in range(0, len(op.payload), _BATCH_METRICS):
                batch = [
                    Metric(k, v, ts, st) for k, v, ts, st in op.payload[i : i + _BATCH_METRICS]
                ]
                client.log_batch(self._run_id, metrics=batch, synchronous=True)
        elif op.kind == "params":
            items = list(op.payload.items())
            for i in range(0, len(items), _BATCH_PARAMS):
                params = [Param(k, v) for k, v in items[i : i + _BATCH_PARAMS]]
                client.log_batch(self._run_id, params=params, synchronous=True)
        elif op.kind == "tags":
            client.log_batch(self._run_id, tags=[RunTag(k, v) for k, v in op.payload.items()])
        else:
            path, artifact_path, unless_present = op.payload
            if unless_present:
                target = "/".join(x for x in (artifact_path, Path(path).name) if x)
                if target in {a.path for a in client.list_artifacts(self._run_id, artifact_path)}:
                    return
            client.log_artifact(self._run_id, path, artifact_path)

    def _refused(self, client: Any, op: _Op, exc: Exception) -> None:
        """Settle a call the server refused. Params are the known case: MLflow never changes a
        logged param, so a run resumed with another config keeps the first values, gets the
        new keys, and records each changed value as a tag `changed_param.<key>`."""
        from mlflow.entities import Param, RunTag

        if op.kind != "params":
            log.warning("MLflow at %s refused a %s call, dropped: %s", self.uri, op.kind, exc)
            return
        logged = client.get_run(self._run_id).data.params
        new = [Param(k, v) for k, v in op.payload.items() if k not in logged]
        changed = {k: v for k, v in op.payload.items() if k in logged and logged[k] != v}
        for i in range(0, len(new), _BATCH_PARAMS):
            client.log_batch(self._run_id, params=new[i : i + _BATCH_PARAMS], synchronous=True)
        if changed:
            tags = [RunTag(f"changed_param.{k}", v) for k, v in changed.items()]
            client.log_batch(self._run_id, tags=tags, synchronous=True)
            log.warning(
                "MLflow run %s already holds other values for %s (a resumed run with a changed "
                "config): the params keep the first values, the new ones are tags %s",
                self._run_id,
                ", ".join(sorted(changed)),
                ", ".join(f"changed_param.{k}" for k in sorted(changed)),
            )

    def _unreachable(self, exc: Exception) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning(
                "MLflow at %s is unreachable (%s): the job goes on, metrics are not being "
                "logged and are kept (up to %d) until the server returns",
                self.uri,
                type(exc).__name__,
                self.cfg.max_pending,
            )

    def _recovered(self) -> None:
        if self._down_since is not None:
            log.warning(
                "MLflow at %s is reachable again after %.0f s; buffered metrics delivered%s",
                self.uri,
                time.monotonic() - self._down_since,
                f" ({self._dropped} oldest dropped)" if self._dropped else "",
            )
            self._down_since = None


class _DropRetryNoise(logging.Filter):
    """urllib3 warns on every retry; while a tracking server is away that floods the logs,
    and the tracker already says once that the server is unreachable."""

    def __init__(self, netloc: str) -> None:
        super().__init__()
        self.netloc = netloc

    def filter(self, record: logging.LogRecord) -> bool:
        return self.netloc not in record.getMessage()


def _quiet_retries(uri: str) -> None:
    netloc = urlsplit(uri).netloc
    if not netloc:
        return
    pool = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, _DropRetryNoise) and f.netloc == netloc for f in pool.filters):
        pool.addFilter(_DropRetryNoise(netloc))


def artifact_location(uri: str, experiment: str) -> str | None:
    """For a local sqlite store, keep artifacts beside the database (not in the cwd)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.parent / "mlartifacts" / experiment).resolve().as_uri()
    return None

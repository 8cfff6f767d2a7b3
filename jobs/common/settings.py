"""Where a job's services are: resolved once in the job's driver, the same in every process.

A setting can come from a config key or from its environment variable; the key wins:

    tracking.tracking_uri     MLFLOW_TRACKING_URI, else sqlite:///<working dir>/mlflow.db
    s3.endpoint_url           AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL (else AWS itself)
    s3.region                 AWS_REGION, AWS_DEFAULT_REGION
    s3.access_key_id, ...     AWS_ACCESS_KEY_ID, ... (the AWS chain: environment, ~/.aws, roles)
    (MLflow's S3 artifacts)   MLFLOW_S3_ENDPOINT_URL, else the S3 endpoint above
    (MLflow's credentials)    MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN (environment only)

    settings = JobSettings.resolve(cfg.tracking.tracking_uri, cfg.s3)    # in the driver
    with settings.applied():                  # here, and in every worker it is handed to
        MlflowClient(settings.tracking_uri) ...; storage.read_bytes(uri, s3=settings.s3)

The job's own clients take the settings explicitly. MLflow also reads the environment by
itself (a `models:/` URI is looked up in the registry of $MLFLOW_TRACKING_URI, a model is
registered there, artifacts on S3 use $MLFLOW_S3_ENDPOINT_URL and the AWS variables), so
`applied()` sets those variables for the duration of the work: a value given as a config
key then means exactly what the variable means, in the driver and in every worker.

Workers (Ray Train workers, Ray tasks) get the settings with their work, as an argument:
never through a Ray runtime env, whose contents Ray writes to its logs and the dashboard
shows. A worker enters `applied()` itself; MLflow credentials a worker's own node provides
win over the driver's.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from jobs.cluster.secrets import WORKER_CREDENTIAL_VARS
from pipelines.storage import S3Config

__all__ = ["JobSettings", "default_tracking_uri"]

_CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def default_tracking_uri(configured: str = "") -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else a sqlite store in the working dir."""
    if configured:
        return configured
    env = os.environ.get("MLFLOW_TRACKING_URI", "")
    return env or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


@dataclass(frozen=True)
class JobSettings:
    """A job's MLflow and S3 settings, resolved (see the module docstring).

    tracking_uri: the MLflow tracking (and registry) URI.
    s3: S3 settings with endpoint, region and (unless `s3.forward_credentials` is false)
        credentials filled in.
    artifacts_endpoint: the S3 endpoint MLflow's artifact store is reached at ('' = AWS).
    mlflow_credentials: the driver's MLflow credentials (WORKER_CREDENTIAL_VARS that are set).
    Credentials never show in a repr.
    """

    tracking_uri: str
    s3: S3Config
    artifacts_endpoint: str = ""
    mlflow_credentials: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def resolve(cls, tracking_uri: str, s3: S3Config) -> JobSettings:
        """The settings of a job whose config says `tracking_uri` and `s3`, completed from
        this process's environment (call it in the driver)."""
        resolved = s3.resolved()
        artifacts = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or resolved.endpoint_url or ""
        mlflow = {k: os.environ[k] for k in WORKER_CREDENTIAL_VARS if os.environ.get(k)}
        return cls(default_tracking_uri(tracking_uri), resolved, artifacts, mlflow)

    def environment(self) -> dict[str, str | None]:
        """The variables MLflow and boto3 read by themselves, as these settings say (None:
        unset it). Credentials only when they were resolved, so that they agree as a set."""
        env: dict[str, str | None] = {"MLFLOW_TRACKING_URI": self.tracking_uri}
        if self.artifacts_endpoint:
            env["MLFLOW_S3_ENDPOINT_URL"] = self.artifacts_endpoint
        if self.s3.region:
            env["AWS_REGION"] = env["AWS_DEFAULT_REGION"] = self.s3.region
        if self.s3.access_key_id:
            values = (self.s3.access_key_id, self.s3.secret_access_key, self.s3.session_token)
            env.update(zip(_CREDENTIAL_VARS, values, strict=True))
        return env

    @contextlib.contextmanager
    def applied(self) -> Iterator[JobSettings]:
        """This process's environment agrees with the settings inside the block (MLflow
        credentials already set here are kept); it is restored on leaving."""
        changes = self.environment()
        changes.update({k: v for k, v in self.mlflow_credentials.items() if k not in os.environ})
        saved = {k: os.environ.get(k) for k in changes}
        try:
            _set(changes)
            yield self
        finally:
            _set(saved)


def _set(values: dict[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value

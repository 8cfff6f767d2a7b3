"""Connecting to Ray and to the storage Ray Train writes checkpoints to."""

from __future__ import annotations

import logging
import os
from typing import Any

from pipelines import storage

__all__ = [
    "FORWARDED_ENV",
    "SECRET_ENV",
    "apply_secret_env",
    "init_ray",
    "secret_env",
    "storage_filesystem",
]

log = logging.getLogger(__name__)

FORWARDED_ENV = (
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
)
"""Non-secret storage and tracking settings a driver hands to its workers (in the job's
runtime environment) when it joins an existing cluster."""

SECRET_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
"""Credentials never go into a runtime environment: Ray's runtime-env agent writes those to
its log files. A driver that has them passes them to its own workers in-band, with the
work (`secret_env` / `apply_secret_env`); clusters can instead give their nodes the
credentials (Kubernetes Secrets, instance roles)."""


def secret_env() -> dict[str, str]:
    """The credentials in this process's environment, to hand to workers with the work."""
    return {k: os.environ[k] for k in SECRET_ENV if os.environ.get(k)}


def apply_secret_env(values: dict[str, str]) -> None:
    """In a worker: make the driver's credentials visible to boto3, pyarrow and MLflow."""
    for key, value in values.items():
        if key in SECRET_ENV:
            os.environ.setdefault(key, value)


def init_ray(address: str = "") -> None:
    """Join `address` (or $RAY_ADDRESS) if given, else start Ray on this machine."""
    import ray

    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or None
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)} if target else {}
    # Worker prints go to the driver once (Ray Train would also copy them to its logger).
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    ray.init(address=target, runtime_env={"env_vars": env}, log_to_driver=True)
    log.info("Ray %s at %s", "joined" if target else "started", target or "this machine")


def storage_filesystem(uri: str, s3: storage.S3Config) -> tuple[Any, str]:
    """(pyarrow filesystem or None, path) for Ray Train's `RunConfig` storage.

    Local paths are made absolute; `s3://` URIs get a filesystem with the
    configured endpoint (MinIO or any S3-compatible store) and a bucket/key path.
    """
    if storage.is_s3(uri):
        fs, path = storage.pyarrow_filesystem(uri, s3=s3)
        return fs, path
    return None, os.path.abspath(uri)

"""Connecting to Ray and to the storage Ray Train writes checkpoints to."""

from __future__ import annotations

import logging
import os
from typing import Any

from pipelines import storage

__all__ = ["FORWARDED_ENV", "init_ray", "storage_filesystem"]

log = logging.getLogger(__name__)

FORWARDED_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
"""Storage and tracking settings a driver hands to its workers when it joins an existing
cluster (workers started by `ray start` do not inherit the driver's environment). They travel
in the job's runtime environment, never on a command line; on managed clusters prefer setting
them on the nodes (e.g. Kubernetes Secrets) and leave them unset for the driver."""


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

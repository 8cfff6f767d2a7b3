"""Connecting to Ray and to the storage Ray Train writes checkpoints to.

Credentials never travel in the runtime env set here (see jobs.cluster.secrets): only the
non-secret FORWARDED_SETTINGS do.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from jobs.cluster.secrets import FORWARDED_SETTINGS
from pipelines import storage

__all__ = ["init_ray", "storage_filesystem"]

log = logging.getLogger(__name__)


def init_ray(address: str = "") -> None:
    """Join `address` (or $RAY_ADDRESS) if given, else start Ray on this machine."""
    import ray

    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or None
    env = {k: os.environ[k] for k in FORWARDED_SETTINGS if os.environ.get(k)} if target else {}
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

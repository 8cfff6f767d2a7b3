"""Joining Ray from a driver that `ray job submit` started: the job's runtime env is kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

DRIVER = """
import json, os, sys
import ray
from pipelines.ray_adapter import connect_ray

wanted = {"GRAM_SHARED": "from-the-driver", "GRAM_EXTRA": "extra"}
if sys.argv[1] == "plain":
    ray.init(runtime_env={"env_vars": wanted}, log_to_driver=False)
else:
    assert connect_ray(env_vars=wanted) is True
    assert connect_ray(env_vars=wanted) is False  # already connected

@ray.remote
def seen():
    return os.environ.get("GRAM_SHARED"), os.environ.get("GRAM_EXTRA")

print(json.dumps(ray.get(seen.remote())))
ray.shutdown()
"""


def _as_submitted(mode: str, address: str) -> subprocess.CompletedProcess[str]:
    """Run DRIVER with the environment a job supervisor gives an entrypoint."""
    job_config = {"runtime_env": {"env_vars": {"GRAM_SHARED": "from-the-job"}}, "metadata": {}}
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "RAY_ADDRESS": address,
        "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job_config),
    }
    return subprocess.run(
        [sys.executable, "-c", DRIVER, mode],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_connect_ray_keeps_the_submitted_jobs_runtime_env(ray_cluster):
    plain = _as_submitted("plain", ray_cluster.address)
    assert plain.returncode != 0
    assert "Failed to merge the Job's runtime env" in plain.stderr  # what connect_ray avoids
    joined = _as_submitted("connect_ray", ray_cluster.address)
    assert joined.returncode == 0, joined.stderr[-3000:]
    assert json.loads(joined.stdout.strip().splitlines()[-1]) == ["from-the-job", "extra"]

"""A real job with its output piped (not a terminal): it downloads a registered model from an
`mlflow server`, starts its own Ray and embeds on Ray tasks, and prints no progress bars, no
NumPy warning and Ray's token notice once, in the project's words."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from gram.config import load_config
from jobs import register
from jobs.common.console import RAY_AUTH_NOTICE
from tests.jobs.conftest import SYNTHETIC_CLASSES

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CLUSTER_ENV = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")
BAR_MARKS = ("Downloading artifacts", "it/s]", "%|")


def test_a_piped_job_prints_no_bars_no_warning_and_the_ray_notice_once(
    mlflow_server, checkpoints, eval_shards, tmp_path
):
    name = "gram-quiet"
    cfg = load_config(
        register.RegisterConfig,
        None,
        [f"checkpoint={checkpoints.good}", f"name={name}",
         f"tracking.tracking_uri={mlflow_server.url}"],
    )  # fmt: skip
    version = register.run(cfg)
    ray_tmp = tempfile.mkdtemp(prefix="gq", dir="/tmp")  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_ENV}
    env.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
    env.pop("XDG_CACHE_HOME", None)
    env.update(
        HOME=str(tmp_path / "home"), RAY_TMPDIR=ray_tmp, PYTHONPATH=str(REPO),
        RAY_USAGE_STATS_ENABLED="0",
    )  # fmt: skip

    def evaluate(run: str, **extra: str) -> str:
        res = subprocess.run(
            [sys.executable, "-m", "jobs.evaluate", f"model=models:/{name}/{version}",
             f"eval.shards={eval_shards}", f"output={tmp_path / run}", f"run_name={run}",
             f"tracking.tracking_uri={mlflow_server.url}", *SYNTHETIC_CLASSES],
            cwd=tmp_path,
            env={**env, **extra},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=600,
        )  # fmt: skip
        assert res.returncode == 0, res.stdout[-4000:]
        assert "Ray task(s)" in res.stdout  # embedded on Ray, not in process
        return res.stdout

    try:
        first = evaluate("first")
        second = evaluate("second", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="true")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    for mark in BAR_MARKS:
        assert mark not in first, mark
    assert "not writable" not in first + second
    assert "Token authentication is enabled for this Ray cluster" not in first + second
    assert first.count(RAY_AUTH_NOTICE) == 1
    assert RAY_AUTH_NOTICE not in second  # once per user
    assert (tmp_path / "home" / ".cache" / "gram" / "ray-token-notice").is_file()
    # A value the user exported is kept: the bars MLflow draws by default come back.
    assert "Downloading artifacts" in second

"""`tracking.tracking_uri` alone (no MLFLOW_TRACKING_URI anywhere) finds the registered model.

The report this guards: `gram promote name=M version=candidate eval.shards=...
tracking.tracking_uri=sqlite:////abs/mlflow.db` failed with "Registered Model with name=M not
found" and created `./mlflow.db`, because the registered version was looked up in MLflow's
default store instead of the configured one. (tests/jobs/test_settings_parity.py checks
every job and setting both ways; this is the reported case, exactly.)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gram.config import load_config
from jobs import register
from tests.jobs.conftest import SYNTHETIC_CLASSES, Checkpoints

pytestmark = pytest.mark.slow


def test_promote_finds_the_model_in_the_sqlite_store_its_config_names(
    tmp_path: Path, checkpoints: Checkpoints, eval_shards: str
) -> None:
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"  # sqlite:////abs/..., by path
    (tmp_path / "store").mkdir()
    register.run(
        load_config(
            register.RegisterConfig,
            None,
            [f"checkpoint={checkpoints.good}", "name=by-key", f"tracking.tracking_uri={uri}"],
        )
    )
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not re.match(r"(MLFLOW_|AWS_)", k)}
    res = subprocess.run(
        [
            str(Path(sys.executable).parent / "gram"), "promote",
            "name=by-key", "version=candidate", f"eval.shards={eval_shards}",
            "eval.parallel.local=true", f"tracking.tracking_uri={uri}", *SYNTHETIC_CLASSES,
        ],
        cwd=work, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "PROMOTED version 1 of 'by-key'" in res.stdout
    assert not (work / "mlflow.db").exists(), "MLflow's default store was opened instead"

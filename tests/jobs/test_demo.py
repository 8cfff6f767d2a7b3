"""`python -m jobs.demo` end to end on a local Ray it starts itself, as `make demo` runs it,
then re-run from its markers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.services import RAY_TEST_SETTINGS

REPO = Path(__file__).resolve().parents[2]
STEPS = ("clips", "shards", "train", "evaluate", "registry")
CLUSTER_ENV = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")


def _demo(output: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    # Not the session's cluster, even where this process knows it: no address or token.
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_ENV}
    return subprocess.run(
        [sys.executable, "-m", "jobs.demo", f"output={output}", *overrides],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO), **RAY_TEST_SETTINGS},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def test_demo_runs_every_step_shows_volume_beating_cosine_and_reuses_finished_steps(
    tmp_path: Path,
):
    from mlflow import MlflowClient

    out = tmp_path / "demo"
    # 100 steps (the demo's default is 400) already put the volume ~25 points ahead of cosine.
    first = _demo(out, "train_steps=100")
    assert first.returncode == 0, first.stderr[-4000:]
    for n, step in enumerate(("making", "preprocessing", "training", "evaluat", "register"), 1):
        assert f"[demo] {n}/5 {step}" in first.stdout, first.stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    # The captions need both what is seen and what is heard: one modality cannot rank them.
    assert m["volume_t2i_r1"] > m["cosine_video_t2i_r1"] + 5
    assert m["volume_t2i_r1"] > m["cosine_audio_t2i_r1"] + 5
    report = json.loads((out / "evaluation" / "report.json").read_text())
    assert report["metrics"]["volume_t2i_r1"] == m["volume_t2i_r1"]
    for split, clips in (("train", 192), ("eval", 96)):
        index = json.loads((out / "shards" / split / "index.json").read_text())
        assert sum(s["samples"] for s in index["shards"]) == clips

    client = MlflowClient(summary["tracking_uri"])
    version = client.get_model_version_by_alias("gram-demo", "candidate")
    assert str(version.version) == str(summary["registry"]["version"])
    aliases = client.get_registered_model("gram-demo").aliases
    assert ("champion" in aliases) == summary["registry"]["promoted"]
    assert "Open the MLflow UI" in first.stdout
    assert f"shards       {out / 'shards'}" in first.stdout

    again = _demo(out, "train_steps=100")
    assert again.returncode == 0, again.stderr[-4000:]
    for step in STEPS:
        assert f"[demo] {step}: already done" in again.stdout
    assert "[demo] 3/5" not in again.stdout
    assert json.loads((out / "summary.json").read_text())["metrics"] == m

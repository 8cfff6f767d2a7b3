"""`gram submit train` as a user runs it: the MLflow URI exported in the shell, the S3 endpoint
given to `gram submit`, two Ray Train workers on the session's two nodes, `--wait`.

The driver that `ray job submit` starts already runs in the job's runtime env, which carries
MLFLOW_TRACKING_URI and AWS_ENDPOINT_URL; joining Ray must not set them again (Ray refuses a
`ray.init` that repeats a key of the job's runtime env). One worker is SIGKILLed mid-run: it
is replaced, training resumes from the last checkpoint (not from the start) and ends at the
planned step, with every sample trained exactly once per epoch (the suite's test of Ray
Train's fault tolerance; a killed driver is in tests/jobs/training/test_train.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from gram.synthetic import SyntheticClips
from pipelines.samples_to_shards import write_sample_shards
from tests.support.audit import effective_keys, max_step, starts, wait_for
from tests.support.services import MlflowServer, RayCluster, S3Server

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
VENV_BIN = Path(sys.executable).parent


def _checkpoint_on_record(s3: object, bucket: str, run: str) -> bool:
    """Ray Train lists a reported checkpoint in its snapshot a moment after the report."""
    try:
        body = s3.get_object(  # type: ignore[attr-defined]
            Bucket=bucket, Key=f"runs/{run}/checkpoint_manager_snapshot.json"
        )["Body"].read()
        return bool(json.loads(body)["checkpoint_results"])
    except Exception:
        return False


def test_submitted_training_forwards_mlflow_and_s3_and_survives_a_killed_worker(
    tmp_path: Path, ray_cluster: RayCluster, s3_server: S3Server, mlflow_server: MlflowServer
) -> None:
    bucket = s3_server.make_bucket("submit-train")
    write_sample_shards(
        SyntheticClips(24, seed=3), f"s3://{bucket}/shards/train", samples_per_shard=6
    )
    audit = tmp_path / "audit"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_"))}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        MLFLOW_TRACKING_URI=mlflow_server.url,  # forwarded by gram submit, as from a user's shell
        AWS_ACCESS_KEY_ID=s3_server.access_key,
        AWS_SECRET_ACCESS_KEY=s3_server.secret_key,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(ray_cluster.token_path),
    )
    command = [
        str(VENV_BIN / "gram"), "submit", "train",
        "--address", ray_cluster.dashboard_url,
        "--wait",
        "--python", sys.executable,
        "--storage-endpoint", s3_server.endpoint_url,
        "--storage-region", s3_server.region,
        # The session's nodes may lack S3 credentials: the documented, explicit opt-in.
        "--forward-secret", "AWS_ACCESS_KEY_ID",
        "--forward-secret", "AWS_SECRET_ACCESS_KEY",
        "--config", "jobs/configs/train.yaml",
        "name=submitted",
        f"data.train=s3://{bucket}/shards/train",
        "data.eval=",
        f"checkpoint.storage=s3://{bucket}/runs",
        "scaling.workers=2",
        "data.batch_size=2",
        "epochs=4",  # 12 samples per rank: 6 steps an epoch, 24 in all
        "checkpoint.every_steps=4",
        "tracking.experiment=submitted",
        f"data.audit_dir={audit}",
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    s3 = s3_server.client()
    try:
        wait_for(lambda: max_step(audit, 1) >= 6, proc, "step 6 on rank 1")
        # Kill only once Ray Train has the checkpoint on record: there is one to resume from.
        wait_for(lambda: _checkpoint_on_record(s3, bucket, "submitted"), proc, "a checkpoint")
        victim = next(s["pid"] for s in starts(audit) if s["rank"] == 1)
        os.kill(int(str(victim)), signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-6000:]
    assert "Failed to merge the Job's runtime env" not in out
    assert "SUCCEEDED" in out

    started = starts(audit)
    assert len({s["node_id"] for s in started[:2]}) == 2, "the two workers run on two nodes"
    restarted = started[2:]
    assert len(restarted) >= 2, "both ranks start again after the failure"
    assert {s["step"] for s in restarted} <= {4, 8, 12, 16, 20}, "resumed from a checkpoint"
    assert min(s["step"] for s in restarted) >= 4, "... not from the start"
    assert "done: step 24" in out
    epochs = effective_keys(audit)
    assert sorted(epochs) == [0, 1, 2, 3]
    for keys in epochs.values():  # every sample once per epoch, redone steps counted once
        assert len(keys) == len(set(keys)) == 24

    final = next(x for x in out.splitlines() if x.strip().startswith("checkpoint:")).split()[-1]
    assert final.startswith(f"s3://{bucket}/runs/submitted/checkpoint_")
    key = final.removeprefix(f"s3://{bucket}/") + "/state.json"
    state = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    assert state["progress"]["step"] == 24

    # Rank 0, a Ray Train worker on the cluster, logged to the forwarded tracking URI.
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(state["progress"]["mlflow_run_id"])
    assert run.info.experiment_id == client.get_experiment_by_name("submitted").experiment_id
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == 24
    assert [a.path for a in client.list_artifacts(run.info.run_id, "inspect")] == [
        "inspect/first_batch.png"
    ]
    assert run.data.tags["final_checkpoint"] == final

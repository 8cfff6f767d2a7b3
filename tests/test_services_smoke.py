"""The shared real services come up and answer (a failure here explains many others)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_ray_cluster_has_two_nodes_and_enforces_tokens(ray_cluster):
    code = "import ray; ray.init(); print(len([n for n in ray.nodes() if n['Alive']]))"
    ok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.strip().splitlines()[-1] == "2"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    # One connection attempt instead of Ray's ~20 s of retries: the refusal is immediate.
    env["RAY_gcs_server_port_wait_time_s"] = "1"
    denied = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert denied.returncode != 0, "a client without the token must be refused"
    assert "InvalidAuthToken" in denied.stderr, denied.stderr[-2000:]


@pytest.mark.slow
def test_s3_server_round_trip(s3_server):
    s3 = s3_server.client()
    bucket = s3_server.make_bucket("smoke")
    s3.put_object(Bucket=bucket, Key="a/b.txt", Body=b"hello")
    assert s3.get_object(Bucket=bucket, Key="a/b.txt")["Body"].read() == b"hello"


@pytest.mark.slow
def test_mlflow_server_logs_a_run(mlflow_server):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    exp = client.create_experiment("smoke")
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "x", 1.5)
    assert client.get_run(run.info.run_id).data.metrics["x"] == 1.5

"""The training job on the real 2-node Ray cluster: data accounting, checkpoints, MLflow,
S3, an MLflow outage, gradient equivalence, explicit resume and a restarted job (a killed
worker is replaced in tests/jobs/cluster/test_submit_train.py).

Every run is the real entry point (`python -m jobs.train`) in a subprocess that joins the
session cluster (RAY_ADDRESS and the auth token come from the `ray_cluster` fixture), or,
where Ray Train is not what a test is about, runs the loop in its own process
(`scaling.workers=0`, local mode: none of Ray Train's start-up).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from gram.synthetic import SyntheticClips
from pipelines.samples_to_shards import write_sample_shards
from tests.support.audit import effective_keys, max_step, wait_for
from tests.support.proxy import FlakyProxy

REPO = Path(__file__).resolve().parents[3]
CONFIG = REPO / "jobs" / "configs" / "train.yaml"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    train = write_sample_shards(
        SyntheticClips(48, seed=1), str(root / "train"), samples_per_shard=10
    )
    write_sample_shards(SyntheticClips(24, seed=2), str(root / "eval"), samples_per_shard=12)
    return {"train": str(root / "train"), "eval": str(root / "eval"), "index": train}


def _cmd(tmp: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jobs.train",
        "--config",
        str(CONFIG),
        f"checkpoint.storage={tmp / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        "log_every_steps=1",
        "loss.kind=gram",  # the example config trains cosine; these tests read GRAM's metrics
        *overrides,
    ]


def _train(
    tmp: Path, *overrides: str, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        _cmd(tmp, *overrides), cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res


def _final_checkpoint(output: str) -> Path:
    line = next(x for x in output.splitlines() if x.strip().startswith("checkpoint:"))
    return Path(line.split("checkpoint:", 1)[1].strip())


def _run_id(output: str) -> str:
    line = next(x for x in output.splitlines() if x.strip().startswith("MLflow run:"))
    return line.split()[2]


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


def test_two_workers_on_two_nodes_train_checkpoint_and_log(tmp_path, ray_cluster, shards):
    res = _train(
        tmp_path,
        "name=local",
        f"data.train={shards['train']}",
        f"data.eval={shards['eval']}",
        f"data.audit_dir={tmp_path / 'audit'}",
        "data.batch_size=8",
        "epochs=2",
        "checkpoint.every_steps=2",
        "checkpoint.keep=2",
    )
    starts = [json.loads(x) for x in (tmp_path / "audit" / "starts.jsonl").read_text().splitlines()]
    assert sorted(s["rank"] for s in starts) == [0, 1]
    assert len({s["node_id"] for s in starts}) == 2, "the two workers must run on two nodes"

    epochs = effective_keys(tmp_path / "audit")
    assert sorted(epochs) == [0, 1]
    for keys in epochs.values():  # 48 samples, 2 ranks: nothing to drop
        assert len(keys) == len(set(keys)) == 48

    ckpt = _final_checkpoint(res.stdout)
    assert {"model.safetensors", "trainer.pt", "state.json"} <= {p.name for p in ckpt.iterdir()}
    state = json.loads((ckpt / "state.json").read_text())
    assert state["progress"]["step"] == 6  # 24 per rank / 8 = 3 steps x 2 epochs
    kept = [p for p in (tmp_path / "runs" / "local").glob("checkpoint_*") if p.is_dir()]
    assert 1 <= len(kept) <= 2  # keep=2

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(_run_id(res.stdout))
    assert state["progress"]["mlflow_run_id"] == run.info.run_id
    assert run.data.params["dataset_fingerprint"] == shards["index"]["input"]["fingerprint"]
    assert run.data.params["data.batch_size"] == "8"
    assert len(run.data.tags["git_commit"]) == 40
    assert run.data.tags["final_checkpoint"] == str(ckpt)
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == list(range(1, 7))
    for name in ("samples_per_s", "temperature", "positive_volume", "negative_volume", "lr"):
        assert name in run.data.metrics, name
    assert 0.0 <= run.data.metrics["eval_volume_t2i_r1"] <= 100.0
    assert run.data.metrics["eval_num_items"] == 24  # 24 eval clips over 2 ranks: none dropped
    logged = [a.path for a in client.list_artifacts(run.info.run_id, "inspect")]
    assert logged == ["inspect/first_batch.png"]  # drawn by rank 0, a Ray Train worker


def test_two_workers_with_half_batches_equal_one_worker_with_the_whole_batch(tmp_path, ray_cluster):
    data = tmp_path / "one-batch"
    write_sample_shards(
        SyntheticClips(16, seed=9, missing_audio=0.2), str(data), samples_per_shard=5
    )
    # AdamW's first step is lr * g / (|g| + eps): with a large eps it is ~ lr * g / eps, so the
    # parameter change shows the gradient itself instead of amplifying rounding in tiny ones.
    common = [
        f"data.train={data}",
        "data.eval=",
        "max_steps=1",
        "optim.warmup_steps=0",
        "optim.lr=1.0",
        "optim.eps=1.0",
        "optim.weight_decay=0.0",
    ]
    # The whole batch in one process (local mode: no Ray Train start-up for the reference),
    # then half of it on each of two Ray Train workers.
    one = _train(tmp_path / "w1", "name=w1", "scaling.workers=0", "data.batch_size=16", *common)
    two = _train(tmp_path / "w2", "name=w2", "scaling.workers=2", "data.batch_size=8", *common)
    w1, w2 = _weights(_final_checkpoint(one.stdout)), _weights(_final_checkpoint(two.stdout))
    init = _weights_at_init()
    assert set(w1) == set(w2)
    moved = 0
    for name, value in w1.items():
        step_one, step_two = value - init[name], w2[name] - init[name]
        torch.testing.assert_close(step_two, step_one, rtol=1e-4, atol=1e-7, msg=name)
        moved += int(step_one.abs().max() > 1e-5)
    assert moved > len(w1) // 2, "the step must actually change the parameters"


def _weights_at_init() -> dict[str, torch.Tensor]:
    from gram.model import build_model
    from gram.model_config import model_config

    torch.manual_seed(0)
    state = {k: v.detach() for k, v in build_model(model_config("tiny")).state_dict().items()}
    state["loss.log_temperature"] = torch.tensor(math.log(0.07))  # GramLoss's initial tau
    return state


def test_explicit_resume_continues_the_step_count_and_the_schedule(tmp_path, shards):
    """A new run started from another run's step-5 checkpoint ends at step 10 with the
    learning rates and the weights of the run that went to step 10 straight. Both run in
    local mode: `checkpoint.resume_from` is the same code with Ray Train workers (a run
    resumed by Ray Train itself is tested with a killed worker and a killed job)."""
    common = [
        f"data.train={shards['train']}",
        "data.eval=",
        "scaling.workers=0",
        "data.batch_size=4",
        "optim.warmup_steps=3",
        "max_steps=10",
    ]
    straight = _train(
        tmp_path, "name=straight", "checkpoint.every_steps=5", "checkpoint.keep=2", *common
    )
    at_step = {
        json.loads((p / "state.json").read_text())["progress"]["step"]: p
        for p in (tmp_path / "runs" / "straight").glob("checkpoint_*")
        if p.is_dir()
    }
    assert sorted(at_step) == [5, 10]
    resumed = _train(tmp_path, "name=resumed", f"checkpoint.resume_from={at_step[5]}", *common)
    assert "resumed at step 5" in resumed.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    lr_straight = {
        m.step: m.value for m in client.get_metric_history(_run_id(straight.stdout), "lr")
    }
    lr_resumed = {m.step: m.value for m in client.get_metric_history(_run_id(resumed.stdout), "lr")}
    assert sorted(lr_straight) == list(range(1, 11))
    assert sorted(lr_resumed) == list(range(6, 11))
    assert lr_straight[3] > lr_straight[10]  # warmup, then the cosine decay
    for step, value in lr_resumed.items():
        assert value == pytest.approx(lr_straight[step], rel=1e-9)
    a, b = _weights(at_step[10]), _weights(_final_checkpoint(resumed.stdout))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_killed_job_started_again_with_the_same_name_resumes(tmp_path, ray_cluster, shards):
    audit = tmp_path / "audit"
    args = [
        "name=restart",
        f"data.train={shards['train']}",
        "data.eval=",
        f"data.audit_dir={audit}",
        "data.batch_size=2",
        "epochs=2",
        "checkpoint.every_steps=4",
    ]
    proc = subprocess.Popen(
        _cmd(tmp_path, *args),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(lambda: max_step(audit, 0) >= 9, proc, "step 9 on rank 0")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    again = _train(tmp_path, *args)
    resumed = [x for x in again.stdout.splitlines() if "resumed at step" in x]
    assert resumed, again.stdout[-3000:]
    assert (
        int(resumed[0].split("resumed at step")[1].split()[0]) >= 4
    )  # a step-4 or later checkpoint
    state = json.loads((_final_checkpoint(again.stdout) / "state.json").read_text())
    assert state["progress"]["step"] == 24
    for keys in effective_keys(audit).values():
        assert len(keys) == len(set(keys)) == 48


def test_local_mode_trains_without_a_cluster_keeps_checkpoints_and_resumes(tmp_path, shards):
    """scaling.workers=0: the loop runs in the job's process (RAY_ADDRESS points nowhere, so
    any use of a cluster fails), persists its own checkpoints with `keep`, and the same name
    run again goes on from the latest one, in the same MLflow run."""
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}
    args = [
        "name=inproc",
        f"data.train={shards['train']}",
        "data.eval=",
        "data.batch_size=8",
        "scaling.workers=0",
        "checkpoint.every_steps=2",
        "checkpoint.keep=2",
        "schedule_steps=10",
    ]
    first = _train(tmp_path, *args, "max_steps=6", env=env)
    assert "in this process (local mode)" in first.stdout
    runs = tmp_path / "runs" / "inproc"
    kept = sorted(p for p in runs.glob("checkpoint_*") if p.is_dir())
    steps = [json.loads((p / "state.json").read_text())["progress"]["step"] for p in kept]
    assert steps == [4, 6]  # every 2 steps, keep=2
    assert _final_checkpoint(first.stdout) == kept[-1]

    again = _train(tmp_path, *args, "max_steps=10", env=env)
    assert "resumed at step 6" in again.stdout
    final = _final_checkpoint(again.stdout)
    assert json.loads((final / "state.json").read_text())["progress"]["step"] == 10
    assert len([p for p in runs.glob("checkpoint_*") if p.is_dir()]) == 2
    assert _run_id(again.stdout) == _run_id(first.stdout)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    losses = client.get_metric_history(_run_id(again.stdout), "loss")
    assert sorted(m.step for m in losses) == list(range(1, 11))
    (sheet,) = client.list_artifacts(_run_id(first.stdout), "inspect")  # the first batch, drawn
    assert sheet.path == "inspect/first_batch.png"
    assert sheet.file_size > 10_000


def test_s3_shards_and_checkpoints_an_mlflow_outage_and_no_secret_anywhere(
    tmp_path, ray_cluster, s3_server, mlflow_server
):
    """Shards and checkpoints on S3; metrics on the session's MLflow server behind a proxy
    that is taken down from step 3 to step 12 (to the job, a server that stopped and came
    back; see tests/support/proxy.py): training goes on and no metric is lost. Sentinel
    credentials (moto takes any) are in the environment and in the config: none of them may
    show up in the output, the checkpoints, the MLflow store or Ray's own logs."""
    # Made up per run, so no copy of this source (e.g. an uploaded working dir) holds them.
    key_id = "AKIA" + secrets.token_hex(8).upper()
    secret = f"SENTINEL/{secrets.token_urlsafe(12)}+key/{secrets.token_hex(6)}"
    bucket = s3_server.make_bucket("train-s3")
    write_sample_shards(
        SyntheticClips(48, seed=5), f"s3://{bucket}/shards/train", samples_per_shard=8
    )
    server = FlakyProxy(mlflow_server.port)
    server.up()
    audit = tmp_path / "audit"
    proc = subprocess.Popen(
        _cmd(
            tmp_path,
            "name=s3run",
            f"data.train=s3://{bucket}/shards/train",
            "data.eval=",
            f"data.audit_dir={audit}",
            "data.batch_size=2",
            "epochs=2",  # 24 samples per rank: 12 steps an epoch, 24 in all
            "checkpoint.every_steps=4",
            f"checkpoint.storage=s3://{bucket}/runs",
            f"tracking.tracking_uri={server.url}",
            "tracking.experiment=s3",
            "tracking.retry_seconds=1",
            f"s3.secret_access_key={secret}",
        ),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret},
    )
    try:
        wait_for(lambda: max_step(audit, 0) >= 3, proc, "step 3")
        server.down()
        wait_for(lambda: max_step(audit, 0) >= 12, proc, "step 12 while MLflow is down")
        server.up()
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.down()
    assert proc.returncode == 0, out[-4000:]
    assert "metrics are not being logged" in out
    assert "reachable again" in out
    uri = next(x for x in out.splitlines() if "checkpoint:" in x).split("checkpoint:")[1].strip()
    assert uri.startswith(f"s3://{bucket}/runs/s3run/checkpoint_")
    s3 = s3_server.client()
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="runs/")["Contents"]}
    prefix = uri.removeprefix(f"s3://{bucket}/")
    assert {f"{prefix}/model.safetensors", f"{prefix}/trainer.pt", f"{prefix}/state.json"} <= keys
    client = MlflowClient(tracking_uri=mlflow_server.url)
    run = client.get_run(_run_id(out))
    assert run.data.tags["final_checkpoint"] == uri
    assert run.data.metrics["loss"] > 0
    assert run.data.params["s3.secret_access_key"] == "***"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert steps == list(range(1, 25)), out[-6000:]  # nothing lost while the server was down

    sentinels = (key_id.encode(), secret.encode())
    leaks = ["output" for s in sentinels if s in out.encode()]
    for key in keys:
        data = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        leaks += [f"s3://{bucket}/{key}" for s in sentinels if s in data]
    for root in (tmp_path, ray_cluster.temp_dir, mlflow_server.root):
        for path in root.rglob("*"):
            if path.is_file() and path.stat().st_size < 50_000_000:
                data = path.read_bytes()
                leaks += [str(path) for s in sentinels if s in data]
    assert not leaks, f"secrets found in: {sorted(set(leaks))}"

"""A setting given as a config key means what its environment variable means, in every process.

Every job runs twice from the command line (the venv's `gram`), once with the MLflow and S3
settings as config keys and no such variable in its environment, once with the variables
and no keys, and both runs must come out the same:

    tracking.tracking_uri   MLFLOW_TRACKING_URI
    s3.endpoint_url         AWS_ENDPOINT_URL       (MLflow's artifacts follow it too)
    s3.region               AWS_DEFAULT_REGION
    s3.access_key_id, ...   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
    execution.ray_address   RAY_ADDRESS            (preprocessing; the other jobs join $RAY_ADDRESS)

The processes involved: preprocessing's shard tasks and the evaluation's embedding tasks on
the session's Ray cluster, the training loop (local mode), MLflow logging, registering and
loading models, the evaluation inside a promotion. The storage is a moto server of its own
behind a gate that admits one access key for one region (`tests/support/s3_gate.py`), so a
process that fell back to other credentials, another region or another endpoint fails. The
MLflow server is the session's; the experiments keep their artifacts on that storage, so
MLflow itself needs the S3 settings. The test process exports none of these variables to
the jobs, and no job may create a `mlflow.db` or `mlruns` in its working directory.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.support.s3_gate import S3Gate
from tests.support.services import MlflowServer, RayCluster, S3Server

pytestmark = pytest.mark.slow

GRAM = str(Path(sys.executable).parent / "gram")
REGION = "eu-west-3"
SETTINGS_VARS = re.compile(r"^(AWS_|MLFLOW_|RAY_ADDRESS$)")
MODES = ("keys", "env")


@dataclass(frozen=True)
class World:
    """The storage, the MLflow names and the environments of both modes."""

    store: S3Server
    gate: S3Gate
    mlflow: MlflowServer
    ray: RayCluster
    secret: str
    suffix: str
    root: Path

    @property
    def client(self) -> object:
        """boto3 S3 client straight to the store (no gate): for the test's own checks."""
        return self.store.client()

    def experiment(self, mode: str) -> str:
        return f"parity-{mode}-{self.suffix}"

    def model(self, mode: str) -> str:
        return f"parity-{mode}-{self.suffix}"

    def cwd(self, mode: str) -> Path:
        return self.root / mode

    def env(self, mode: str, *, ray_key: bool = False) -> dict[str, str]:
        """The job's environment: the session's, without any AWS, MLflow or Ray address
        variable; in `env` mode the settings as variables. `ray_key`: the job takes the
        Ray address as a key in `keys` mode."""
        base = {k: v for k, v in os.environ.items() if not SETTINGS_VARS.match(k)}
        base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        base["HOME"] = str(self.root / "home")  # no ~/.aws, no ~/.mlflow of the machine's
        if not (ray_key and mode == "keys"):
            base["RAY_ADDRESS"] = self.ray.address
        if mode == "env":
            base.update(
                MLFLOW_TRACKING_URI=self.mlflow.url,
                AWS_ENDPOINT_URL=self.gate.url,
                AWS_DEFAULT_REGION=REGION,
                AWS_ACCESS_KEY_ID=self.gate.access_key,
                AWS_SECRET_ACCESS_KEY=self.secret,
            )
        return base

    def keys(self, mode: str, *, tracking: bool = True, ray_key: bool = False) -> list[str]:
        """The settings as config keys (`keys` mode; none in `env` mode)."""
        if mode == "env":
            return []
        keys = [
            f"s3.endpoint_url={self.gate.url}",
            f"s3.region={REGION}",
            f"s3.access_key_id={self.gate.access_key}",
            f"s3.secret_access_key={self.secret}",
        ]
        if tracking:
            keys.append(f"tracking.tracking_uri={self.mlflow.url}")
        if ray_key:
            keys.append(f"execution.ray_address={self.ray.address}")
        return keys


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
    small_clips: Path,
    ray_cluster: RayCluster,
    mlflow_server: MlflowServer,
) -> Iterator[World]:
    store = S3Server().start()
    key = "AKIAPARITY" + secrets.token_hex(5).upper()
    gate = S3Gate(store.port, access_key=key, region=REGION).start()
    try:
        root = tmp_path_factory.mktemp("parity")
        suffix = secrets.token_hex(3)  # the MLflow server is the session's: names of our own
        w = World(store, gate, mlflow_server, ray_cluster, secrets.token_hex(12), suffix, root)
        s3 = store.client()
        for bucket in ("parity", "parity-mlflow"):
            s3.create_bucket(Bucket=bucket)
        for path in small_clips.iterdir():
            s3.upload_file(str(path), "parity", f"raw/{path.name}")
        client = MlflowClient(mlflow_server.url)
        for mode in MODES:
            client.create_experiment(
                w.experiment(mode), artifact_location=f"s3://parity-mlflow/{mode}"
            )
            (root / mode).mkdir()
        (root / "home").mkdir()
        yield w
    finally:
        gate.stop()
        store.stop()


def _both(
    world: World, job: str, args: Callable[[str], list[str]], *, ray_key: bool = False
) -> dict[str, subprocess.CompletedProcess[str]]:
    """`gram JOB ARGS` in both modes at the same time; returns each mode's result."""
    procs = {
        mode: subprocess.Popen(
            [GRAM, job, *args(mode)],
            cwd=world.cwd(mode),
            env=world.env(mode, ray_key=ray_key),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for mode in MODES
    }
    out = {}
    for mode, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=900)
        out[mode] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out


def _ok(world: World, results: dict[str, subprocess.CompletedProcess[str]], code: int = 0) -> None:
    for mode, res in results.items():
        assert res.returncode == code, (
            f"{mode} mode:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}\n"
            f"refused by the S3 gate: {world.gate.refused[-10:]}"
        )


def _keys(world: World, prefix: str) -> list[str]:
    listed = world.client.list_objects_v2(Bucket="parity", Prefix=prefix)  # type: ignore[attr-defined]
    return sorted(o["Key"].removeprefix(prefix) for o in listed.get("Contents", []))


def _read(world: World, key: str, bucket: str = "parity") -> bytes:
    return world.client.get_object(Bucket=bucket, Key=key)["Body"].read()  # type: ignore[attr-defined]


def _line(text: str, start: str) -> str:
    return next(x.strip() for x in text.splitlines() if x.strip().startswith(start))


def test_every_job_means_the_same_with_config_keys_and_with_environment_variables(
    world: World,
) -> None:
    mlflow = MlflowClient(world.mlflow.url)

    # preprocess: shard tasks on the cluster read and write through the gate
    res = _both(
        world,
        "preprocess",
        lambda m: [
            "--input", "s3://parity/raw/", "--output", f"s3://parity/{m}/shards",
            "execution.mode=ray", "frames.size=32", "frames.num_segments=4",
            "audio.max_seconds=1", "shards.samples_per_shard=4",
            *world.keys(m, tracking=False, ray_key=True),
        ],
        ray_key=True,
    )  # fmt: skip
    _ok(world, res)
    listed = {m: _keys(world, f"{m}/shards/") for m in MODES}
    assert listed["keys"] == listed["env"]
    assert {"index.json", "manifest.parquet", "shard-000000.tar", "shard-000001.tar"} <= set(
        listed["keys"]
    )
    for name in ("shard-000000.tar", "shard-000001.tar"):
        assert _read(world, f"keys/shards/{name}") == _read(world, f"env/shards/{name}")

    # inspect: reads the output and writes a contact sheet
    res = _both(
        world,
        "inspect",
        lambda m: [f"s3://parity/{m}/shards", "--out", f"s3://parity/{m}/sheet.png",
                   *world.keys(m, tracking=False)],
    )  # fmt: skip
    _ok(world, res)
    assert res["keys"].stdout.replace("/keys/", "/env/") == res["env"].stdout
    assert _read(world, "keys/sheet.png")[:4] == _read(world, "env/sheet.png")[:4] == b"\x89PNG"

    # train (local mode): checkpoints on S3, metrics and the first-batch sheet to MLflow
    res = _both(
        world,
        "train",
        lambda m: [
            f"data.train=s3://parity/{m}/shards", "data.eval=", "scaling.workers=0",
            "data.batch_size=4", "max_steps=4", "checkpoint.every_steps=2", "name=parity",
            f"checkpoint.storage=s3://parity/{m}/runs",
            f"tracking.experiment={world.experiment(m)}",
            *world.keys(m),
        ],
    )  # fmt: skip
    _ok(world, res)
    checkpoint = {m: _line(res[m].stdout, "checkpoint:").split()[-1] for m in MODES}
    for mode in MODES:
        assert checkpoint[mode].startswith(f"s3://parity/{mode}/runs/parity/checkpoint_")
    runs = {m: mlflow.get_run(_line(res[m].stdout, "MLflow run:").split()[2]) for m in MODES}
    for mode, run in runs.items():
        assert run.info.artifact_uri.startswith(f"s3://parity-mlflow/{mode}/")
        assert run.data.metrics["loss"] > 0
        assert _artifact_in_store(
            world, mode, f"{run.info.run_id}/artifacts/inspect/first_batch.png"
        )
    assert runs["keys"].data.metrics["loss"] == pytest.approx(runs["env"].data.metrics["loss"])

    # register: the pyfunc model's files go to the experiment's S3 artifact store
    res = _both(
        world,
        "register",
        lambda m: [f"checkpoint={checkpoint[m]}", f"name={world.model(m)}", *world.keys(m)],
    )
    _ok(world, res)
    for mode in MODES:
        version = mlflow.get_model_version_by_alias(world.model(mode), "candidate")
        assert version.version == "1"
        assert version.tags["training_run_id"] == runs[mode].info.run_id
        assert _artifact_in_store(world, mode, "MLmodel")

    # evaluate a checkpoint on S3: embedding tasks on the cluster, the report to S3 and MLflow
    res = _both(
        world,
        "evaluate",
        lambda m: [f"model={checkpoint[m]}", f"eval.shards=s3://parity/{m}/shards",
                   f"output=s3://parity/{m}/evaluation", *world.keys(m)],
    )  # fmt: skip
    _ok(world, res)
    reports = {m: json.loads(_read(world, f"{m}/evaluation/report.json")) for m in MODES}
    assert reports["keys"]["metrics"] == reports["env"]["metrics"]
    assert reports["keys"]["counts"]["clips"] == 8

    # promote: loads the registered version (models:/) and evaluates it on the cluster
    res = _both(
        world,
        "promote",
        lambda m: [f"name={world.model(m)}", "version=candidate",
                   f"eval.shards=s3://parity/{m}/shards", *world.keys(m)],
    )  # fmt: skip
    _ok(world, res)
    for mode in MODES:
        assert "PROMOTED version 1" in res[mode].stdout
        assert mlflow.get_model_version_by_alias(world.model(mode), "champion").version == "1"
        assert (world.cwd(mode) / "promote-output" / f"{world.model(mode)}-v1").is_dir()

    # rollback: nothing before the first champion, said the same way
    res = _both(world, "rollback", lambda m: [f"name={world.model(m)}", *world.keys(m)])
    _ok(world, res, code=1)
    assert "nothing to roll back to" in res["keys"].stdout
    assert res["keys"].stdout.replace("-keys-", "-env-") == res["env"].stdout

    assert world.gate.refused == [], "requests with other credentials, region or endpoint"
    for mode in MODES:
        strays = sorted(p.name for p in world.cwd(mode).iterdir())
        assert strays == ["promote-output"], f"{mode} mode left {strays} in its working dir"


def _artifact_in_store(world: World, mode: str, name: str) -> bool:
    """True when some artifact called `name` sits under the mode's MLflow artifact prefix."""
    listed = world.client.list_objects_v2(Bucket="parity-mlflow", Prefix=f"{mode}/")  # type: ignore[attr-defined]
    return any(o["Key"].endswith(f"/{name}") for o in listed.get("Contents", []))

"""Register, load, serve, promote, refuse, roll back and race, against real `mlflow server`s:
one with artifacts on local disk, one with artifacts on the S3-speaking test server."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

from gram.config import load_config
from gram.decode import DecodeConfig, collate, decode_sample
from gram.shards import iter_raw_samples
from gram.synthetic import SyntheticClips
from gram.volume import volume
from gram.weights import load_checkpoint
from jobs import evaluate, promote, register
from jobs.registry.lock import LockConfig, RegistryLock
from pipelines.config import PreprocessConfig
from pipelines.inputs import InputItem
from pipelines.samples_to_shards import write_sample_shards
from pipelines.stages import build_stages, process_item
from pipelines.tar_format import END_OF_ARCHIVE
from tests.jobs.conftest import EVAL_CLIPS, SYNTHETIC_CLASSES, checkpoint_of_run, training_run
from tests.support.services import MlflowServer, free_port, wait_for_http

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
VENV_BIN = Path(sys.executable).parent
TEXTS = ["a red square and a whistle", "a blue square and a hum"]

LOAD_AND_PREDICT = """
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
import gram
frame = pd.DataFrame({
    "text": [sys.argv[2], sys.argv[3], None],
    "video": [sys.argv[4], None, sys.argv[4]],
    "audio": [sys.argv[4], None, sys.argv[5]],
})
out = model.predict(frame, params={"volume": True})
print(json.dumps({"gram": gram.__file__, "ray": "ray" in sys.modules,
                  "columns": list(out.columns), "rows": out.to_dict(orient="records")}))
"""

HOLD_LOCK = """
import os, sys, time
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST
from jobs.registry.lock import LockConfig, RegistryLock
url, name, log, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
section = LockConfig(lease_seconds=float(sys.argv[5]), grace_seconds=0.5, wait_seconds=120,
                      margin_seconds=0.5)
client = MlflowClient(url)
for _ in range(rounds):
    lock = RegistryLock(client, name, section).acquire()
    with open(log, "a") as fh:
        fh.write(f"enter {os.getpid()}\\n")
    print("held", flush=True)
    time.sleep(0.3 if rounds > 1 else 600)
    with open(log, "a") as fh:
        fh.write(f"exit {os.getpid()}\\n")
    lock.check()
    lock.release()
"""


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


@pytest.fixture(scope="module")
def s3_mlflow(s3_server, tmp_path_factory):
    """An `mlflow server` whose artifacts live in a bucket of the S3 test server."""
    bucket = s3_server.make_bucket("mlflow-artifacts")
    server = MlflowServer(
        root=tmp_path_factory.mktemp("mlflow-s3"),
        artifacts_destination=f"s3://{bucket}/mlartifacts",
        extra_env=s3_server.env,
    ).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, str]:
    """A 2 s mp4 with video and a 1 kHz tone, and a 22.05 kHz wav (resampled when read)."""
    root = tmp_path_factory.mktemp("media")
    clip, tone = root / "clip.mp4", root / "tone.wav"
    lavfi = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi"]
    subprocess.run(
        [*lavfi, "-i", "testsrc=size=96x64:rate=10:duration=2", "-f", "lavfi", "-i",
         "sine=frequency=1000:sample_rate=16000:duration=2", "-c:v", "libx264",
         "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(clip)],
        check=True,
    )  # fmt: skip
    subprocess.run(
        [*lavfi, "-i", "sine=frequency=500:sample_rate=22050:duration=1.5", str(tone)], check=True
    )
    return {"clip": str(clip), "tone": str(tone)}


def _as_preprocessed(model, clip: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Video and audio embeddings of `clip` the way training data has it: the preprocessing
    stages (default config) -> a shard sample -> evaluation decoding -> the model."""
    result = process_item(
        build_stages(PreprocessConfig()),
        InputItem(0, 1, "clip", "clip", clip, None, ("a clip",)),
        timeout_s=120,
    )
    assert result.row["status"] == "ok", result.row
    (raw,) = iter_raw_samples(io.BytesIO(result.sample + END_OF_ARCHIVE), "clip.tar")
    batch = collate([decode_sample(raw, DecodeConfig.from_model(model.cfg), train=False)])
    with torch.no_grad():
        return model.encode("video", batch)[0], model.encode("audio", batch)[0]


def _register(url: str, name: str, checkpoint: Path, *extra: str) -> str:
    """jobs.register in this process (the subprocess path is tested once per server)."""
    cfg = load_config(
        register.RegisterConfig,
        None,
        [f"checkpoint={checkpoint}", f"name={name}", f"tracking.tracking_uri={url}", *extra],
    )
    return register.run(cfg)


def _promote_args(url: str, name: str, eval_shards: str, out: Path) -> list[str]:
    return [
        f"name={name}",
        f"tracking.tracking_uri={url}",
        f"eval.shards={eval_shards}",
        "eval.parallel.local=true",
        f"output={out}",
        "gate.at_least.volume_t2i_r1=50",
        "lock.wait_seconds=120",
        *SYNTHETIC_CLASSES,
    ]


def _audit(client: MlflowClient, name: str) -> list[dict]:
    tags = client.get_registered_model(name).tags
    keys = sorted(k for k in tags if k.startswith("gram.audit."))
    return [json.loads(tags[k]) for k in keys]


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    aliases = client.get_registered_model(name).aliases
    return aliases.get(alias)


@pytest.mark.parametrize("store", ["local", "s3"])
def test_register_then_load_by_alias_in_a_fresh_process_and_predict(
    store, request, mlflow_server, checkpoints, eval_shards, media, tmp_path
):
    server = mlflow_server if store == "local" else request.getfixturevalue("s3_mlflow")
    client = MlflowClient(server.url)
    name = f"gram-{store}"
    train_run = training_run(client, f"register-{store}", "runs/good")
    ckpt = checkpoint_of_run(checkpoints.good, tmp_path / "checkpoint", train_run)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.register",
            f"checkpoint={ckpt}",
            f"name={name}",
            f"tracking.tracking_uri={server.url}",
            f"eval.shards={eval_shards}",
            "eval.parallel.local=true",
            "description=tiny model, test run",
            *SYNTHETIC_CLASSES,
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    version = client.get_model_version_by_alias(name, "candidate")
    tags = version.tags
    assert tags["git_commit"] == "f" * 40  # the training run's commit
    assert re.fullmatch(r"[0-9a-f]{40}", tags["code_commit"])
    assert tags["training_run_id"] == train_run
    assert tags["dataset_fingerprint"] == "synthetic-seed1"
    assert tags["source_checkpoint"] == str(ckpt)
    (eval_key,) = [k for k in tags if k.startswith("gram.eval.") and not k.endswith(".run_id")]
    metrics = json.loads(tags[eval_key])
    assert metrics["volume_t2i_r1"] >= 60
    assert metrics["zeroshot_top1"] >= 50
    eval_run = client.get_run(tags[f"{eval_key}.run_id"])
    assert eval_run.data.tags["mlflow.parentRunId"] == train_run
    assert version.description == "tiny model, test run"
    if store == "s3":
        listed = (
            request.getfixturevalue("s3_server")
            .client()
            .list_objects_v2(Bucket="mlflow-artifacts", Prefix="mlartifacts/")
        )
        keys = [o["Key"] for o in listed.get("Contents", [])]
        assert any(k.endswith("artifacts/model.safetensors") for k in keys)
        assert any(k.endswith("code/gram/volume.py") for k in keys)

    shutil.rmtree(ckpt)  # loading must need nothing but the registered artifacts
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = server.url
    env["GRAM_SERVING_MEDIA_ROOTS"] = str(Path(media["clip"]).parent)  # paths must be allowed
    loaded = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT, f"models:/{name}@candidate", *TEXTS,
         media["clip"], media["tone"]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    out = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert not out["gram"].startswith((str(REPO), "/work/main")), out["gram"]
    assert "/code/gram/" in out["gram"]
    assert out["ray"] is False
    assert out["columns"] == ["text_embedding", "video_embedding", "audio_embedding", "volume"]
    full, text_only, media_only = out["rows"]

    model, _, _ = load_checkpoint(checkpoints.good / "model.safetensors")
    with torch.no_grad():
        expected = model.eval().encode("text", {"text": TEXTS})
    got = torch.tensor([full["text_embedding"], text_only["text_embedding"]])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    t, v, a = (torch.tensor([full[f"{m}_embedding"]]) for m in ("text", "video", "audio"))
    assert full["volume"] == pytest.approx(float(volume(t, v, a)[0]), abs=1e-5)
    assert torch.linalg.vector_norm(v) == pytest.approx(1.0, abs=1e-5)
    assert text_only["video_embedding"] is None
    assert text_only["volume"] is None
    assert media_only["text_embedding"] is None
    v2, a2 = (torch.tensor([media_only[f"{m}_embedding"]]) for m in ("video", "audio"))
    assert media_only["volume"] == pytest.approx(float(volume(v2, a2)[0]), abs=1e-5)
    torch.testing.assert_close(v2, v)  # same file, same frames
    # Served media goes through exactly what the training and eval shards went through.
    video_ref, audio_ref = _as_preprocessed(model, media["clip"])
    torch.testing.assert_close(v[0], video_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a[0], audio_ref, atol=1e-5, rtol=1e-4)


def test_promote_refuses_a_worse_model_and_rolls_back(
    s3_mlflow, checkpoints, eval_shards, tmp_path, capsys
):
    """On the S3-artifact server: promote (evaluating the version from its S3 artifacts),
    refuse an untrained model with the reason tagged, promote an equal model, roll back."""
    url, name = s3_mlflow.url, "gram-gate"
    client = MlflowClient(url)
    args = _promote_args(url, name, eval_shards, tmp_path / "out")

    v1 = _register(url, name, checkpoints.good)
    assert promote.main(args) == 0
    out = capsys.readouterr().out
    assert f"PROMOTED version {v1} of '{name}' (champion before: none" in out
    assert "ok   volume_t2i_r1 = " in out
    assert _alias_version(client, name, "champion") == v1
    assert "gram.promotion.decision" in client.get_model_version(name, v1).tags

    v2 = _register(url, name, checkpoints.untrained)
    assert promote.main(args) == promote.EXIT_REFUSED
    out = capsys.readouterr().out
    assert f"REFUSED version {v2}" in out
    assert "reason: volume_t2i_r1 = " in out
    tags = client.get_model_version(name, v2).tags
    assert tags["gram.promotion.decision"] == "refused"
    assert "volume_t2i_r1" in tags["gram.promotion.reason"]
    assert ">= 50 (at_least)" in tags["gram.promotion.reason"]
    assert "(max_regression; champion" in tags["gram.promotion.reason"]
    checks = json.loads(tags["gram.promotion.checks"])
    assert {c["kind"] for c in checks if not c["passed"]} == {"at_least", "max_regression"}
    assert _alias_version(client, name, "champion") == v1
    assert _alias_version(client, name, "previous") is None

    # Another eval set (same clips, other shards: another index fingerprint): the champion
    # has no metrics on it, so the promotion evaluates it too before comparing.
    other = str(tmp_path / "eval-b")
    write_sample_shards(SyntheticClips(EVAL_CLIPS, seed=2), other, samples_per_shard=18)
    args_b = [*args, f"eval.shards={other}"]
    v3 = _register(url, name, checkpoints.good)  # same weights: no regression
    assert promote.main([*args_b, f"version={v3}"]) == 0
    out = capsys.readouterr().out
    assert f"evaluating version {v1} of" in out
    assert f"evaluating version {v3} of" in out
    evals = [k for k in client.get_model_version(name, v1).tags if k.endswith(".run_id")]
    assert len(evals) == 2, "the champion was evaluated on both eval sets"
    assert _alias_version(client, name, "champion") == v3
    assert _alias_version(client, name, "previous") == v1
    assert client.get_model_version(name, v1).tags["gram.promotion.replaced_by"].startswith(v3)

    rollback = ["--rollback", f"name={name}", f"tracking.tracking_uri={url}", "note=test"]
    assert promote.main(rollback) == 0
    assert f"ROLLED BACK '{name}': champion is version {v1} again (was {v3})" in (
        capsys.readouterr().out
    )
    assert _alias_version(client, name, "champion") == v1
    assert _alias_version(client, name, "previous") is None
    assert "gram.promotion.rolled_back" in client.get_model_version(name, v3).tags
    assert promote.main(rollback) == promote.EXIT_REFUSED
    assert "nothing to roll back to" in capsys.readouterr().out

    audit = _audit(client, name)
    assert [(e["seq"], e["action"], e["version"]) for e in audit] == [
        (1, "promote", v1),
        (2, "refuse", v2),
        (3, "promote", v3),
        (4, "rollback", v1),
    ]
    assert [e["champion_after"] for e in audit] == [v1, v1, v3, v1]

    # `gram evaluate` against a registered baseline: its tags when it was evaluated on the
    # eval set (v1, by the promotions), else evaluated, logged and tagged (v2 on eval-b).
    def against(model: str, baseline: str, shards: str) -> str:
        args = [
            f"model=models:/{name}/{model}",
            f"baseline=models:/{name}/{baseline}",
            f"eval.shards={shards}",
            f"output={tmp_path / f'v{model}-against-v{baseline}'}",
            f"tracking.tracking_uri={url}",
            "eval.parallel.local=true",
            *SYNTHETIC_CLASSES,
        ]
        assert evaluate.main(args) == 0
        return capsys.readouterr().out

    out = against(v2, v1, eval_shards)
    assert f"against the baseline models:/{name}/{v1} (metrics from its tags):" in out
    assert "warning: text -> (video+audio) R@1, volume fell" in out
    out = against(v1, v2, other)
    assert f"against the baseline models:/{name}/{v2} (metrics evaluated now and tagged):" in out
    assert " fell " not in out, "v1 is the better model"
    evals = [k for k in client.get_model_version(name, v2).tags if k.endswith(".run_id")]
    assert len(evals) == 2, "the baseline's evaluation on eval-b is tagged on it"


def test_two_promotions_racing_end_with_one_champion_and_a_consistent_audit_trail(
    mlflow_server, checkpoints, eval_shards, tmp_path
):
    """Two real `python -m jobs.promote` processes, released at the same moment: the test
    holds the registry lock until both are waiting for it, then lets them race.

    However slow the machine, neither contender gives up, and nobody breaks the test's lock,
    before the test itself stops waiting: the contenders wait up to 900 s for the lock and
    the test's lock has a 900 s lease, against at most 2 x 240 s of waiting here."""
    url, name = mlflow_server.url, "gram-race"
    client = MlflowClient(url)
    args = [*_promote_args(url, name, eval_shards, tmp_path / "out"), "lock.wait_seconds=900"]
    evaluated = [f"eval.shards={eval_shards}", "eval.parallel.local=true", *SYNTHETIC_CLASSES]
    v1 = _register(url, name, checkpoints.good, *evaluated)
    assert promote.main(args) == 0
    contenders = [_register(url, name, checkpoints.good, *evaluated) for _ in range(2)]

    gate = RegistryLock(client, name, LockConfig(lease_seconds=900), purpose="test gate")
    gate.acquire()
    outputs: list[list[str]] = [[], []]
    waiting = [threading.Event(), threading.Event()]

    def follow(proc: subprocess.Popen[str], i: int) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            outputs[i].append(line)
            if "waiting for the promotion lock" in line:
                waiting[i].set()

    procs, readers = [], []
    try:
        for i, v in enumerate(contenders):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "jobs.promote", *args, f"version={v}"],
                    cwd=REPO,
                    env=_env(),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
            readers.append(threading.Thread(target=follow, args=(procs[-1], i), daemon=True))
            readers[-1].start()
        for event in waiting:
            assert event.wait(timeout=240), outputs
    finally:
        gate.release()
    for p in procs:
        p.wait(timeout=240)
    for r in readers:
        r.join(timeout=30)
    assert [p.returncode for p in procs] == [0, 0], outputs

    audit = _audit(client, name)
    assert [e["seq"] for e in audit] == [1, 2, 3]
    first, second = audit[1], audit[2]
    assert {first["version"], second["version"]} == set(contenders)
    assert first["lock_waited_s"] > 0  # both were held back by the test's lock
    assert second["lock_waited_s"] > 0
    # Serialised: the second saw the first's result, not the champion both started from.
    assert first["champion_before"] == v1
    assert second["champion_before"] == first["champion_after"] == first["version"]
    assert _alias_version(client, name, "champion") == second["version"]
    assert _alias_version(client, name, "previous") == first["version"]
    for entry in (first, second):
        tags = client.get_model_version(name, entry["version"]).tags
        assert tags["gram.promotion.champion_before"] == entry["champion_before"]
        assert tags["gram.promotion.audit"] == f"{entry['seq']:06d}"
    locks = client.search_registered_models(filter_string=f"name LIKE '{name}.promotion-lock%'")
    assert locks == [], "every lock was released"


def test_the_registry_lock_excludes_two_processes_and_a_crashed_holder_expires(
    mlflow_server, tmp_path
):
    url, name = mlflow_server.url, "lock-test"
    log = tmp_path / "events.log"
    script = [sys.executable, "-c", HOLD_LOCK, url, name, str(log)]
    procs = [
        subprocess.Popen([*script, "4", "30"], cwd=REPO, env=_env(), stdout=subprocess.DEVNULL)
        for _ in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=180) == 0
    events = log.read_text().split()
    pairs = list(zip(events[0::2], events[1::2], strict=True))
    assert len(pairs) == 16
    for i in range(0, 16, 2):  # enter A, exit A, enter B, exit B, ...: never two holders
        (e1, pid1), (e2, pid2) = pairs[i], pairs[i + 1]
        assert (e1, e2, pid1) == ("enter", "exit", pid2), pairs

    client = MlflowClient(url)
    crashed = subprocess.Popen(
        [*script, "1", "2"], cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert crashed.stdout is not None
        assert crashed.stdout.readline().strip() == "held"
        os.killpg(crashed.pid, signal.SIGKILL)
    finally:
        crashed.wait(timeout=30)
    section = LockConfig(lease_seconds=10, grace_seconds=0.5, wait_seconds=30, margin_seconds=1)
    start = time.monotonic()
    with RegistryLock(client, name, section, purpose="test") as lock:
        lock.check()
        held = client.get_registered_model(f"{name}.promotion-lock").tags
        assert held["gram.lock.owner"] == lock.token
    assert time.monotonic() - start >= 1.5  # waited for the 2 s lease (+ grace) to expire
    broken = client.search_registered_models(
        filter_string=f"name LIKE '{name}.promotion-lock.broken-%'"
    )
    assert len(broken) == 1
    assert "gram.lock.broken_by" in broken[0].tags


def test_a_create_that_meets_a_lock_being_released_is_a_lost_race_not_an_error(
    mlflow_server,
):
    """When the holder deletes the lock between a contender's failed insert and the server's
    look-up of that holder, the server answers the contender's create with
    RESOURCE_DOES_NOT_EXIST (two processes taking and releasing a lock in a loop on this
    server see it on about 2% of their creates). The window is inside the server, so the
    test gives that answer itself, once, right after the real holder has released: the
    contender must wait and take the lock, not fail the promotion."""
    url, name = mlflow_server.url, "lock-race"
    holder = RegistryLock(MlflowClient(url), name, purpose="holder").acquire()

    class ReleasedMeanwhile(MlflowClient):
        creates = 0

        def create_registered_model(self, *args, **kwargs):
            type(self).creates += 1
            if type(self).creates == 1:
                holder.release()
                raise MlflowException(
                    f"Registered Model with name={args[0]} not found",
                    error_code=RESOURCE_DOES_NOT_EXIST,
                )
            return super().create_registered_model(*args, **kwargs)

    config = LockConfig(wait_seconds=60)
    with RegistryLock(ReleasedMeanwhile(url), name, config, purpose="contender") as lock:
        lock.check()
        held = MlflowClient(url).get_registered_model(f"{name}.promotion-lock").tags
        assert held["gram.lock.owner"] == lock.token
    assert ReleasedMeanwhile.creates == 2
    assert (
        MlflowClient(url).search_registered_models(filter_string=f"name = '{name}.promotion-lock'")
        == []
    )


def test_mlflow_models_serve_answers_a_rest_request_for_text_embeddings(
    mlflow_server, checkpoints, tmp_path
):
    url, name = mlflow_server.url, "gram-serve"
    client = MlflowClient(url)
    version = _register(url, name, checkpoints.good)
    client.set_registered_model_alias(name, "champion", version)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(MLFLOW_TRACKING_URI=url, PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")
    server = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "models", "serve", "-m", f"models:/{name}@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=(tmp_path / "serve.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", timeout=180, proc=server)

        def post(payload: dict) -> tuple[int, dict]:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations",
                data=json.dumps(payload).encode(),
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=60) as resp:
                    return resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())

        status, body = post(
            {"dataframe_split": {"columns": ["text"], "data": [[t] for t in TEXTS]}}
        )
        assert status == 200, body
        got = torch.tensor([row["text_embedding"] for row in body["predictions"]])
        model, _, _ = load_checkpoint(checkpoints.good / "model.safetensors")
        with torch.no_grad():
            expected = model.eval().encode("text", {"text": TEXTS})
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)

        status, body = post({"inputs": {"text": TEXTS[:1]}, "params": {"volume": True}})
        assert status == 200
        assert body["predictions"][0]["volume"] is None
        status, body = post({"dataframe_split": {"columns": ["video"], "data": [["/no/clip.mp4"]]}})
        assert status == 400
        assert "/no/clip.mp4" in body["message"]
        status, body = post({"dataframe_split": {"columns": ["caption"], "data": [["x"]]}})
        assert status == 400
        assert "modality names" in body["message"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=20)

"""`checkpoint.init_from`: a new run from another model's weights, in the real training job
(Ray Train local mode, `scaling.workers=0`), from a checkpoint folder and from a registered
model on a real `mlflow server`; and the combined GRAM + cosine loss as the job logs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from gram.config import ConfigError, from_dict, load_config
from gram.synthetic import SyntheticClips
from gram.weights import read_metadata
from jobs.train import TrainConfig
from jobs.train import main as train_main
from jobs.train import run as train_run
from jobs.training.checkpoints import INIT_FROM_KEY, load_trainer_state
from pipelines.samples_to_shards import write_sample_shards
from tests.jobs.conftest import checkpoint_of_run, training_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def train_shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("init-shards") / "train"
    write_sample_shards(SyntheticClips(24, seed=3), str(out), samples_per_shard=8)
    return str(out)


def _config(tmp: Path, shards: str, tracking_uri: str, **overrides) -> TrainConfig:
    base = {
        "name": "child",
        "data": {"train": shards, "batch_size": 8, "cache_decoded": True},
        "scaling": {"workers": 0},
        "checkpoint": {"storage": str(tmp / "runs"), "every_steps": 100},
        "tracking": {"tracking_uri": tracking_uri, "experiment": "init-from"},
        "max_steps": 3,
        "log_every_steps": 1,
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            base.setdefault(key, {}).update(value)
        else:
            base[key] = value
    return from_dict(TrainConfig, base)


def _weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    state = load_file(str(Path(checkpoint) / "model.safetensors"))
    return {k: v for k, v in state.items() if not k.startswith("loss.")}


def test_lr_0_keeps_the_source_weights_counters_restart_and_lineage_is_recorded(
    tmp_path, checkpoints, train_shards
):
    """From a step-120 checkpoint with lr 0: the weights stay the source's exactly, the new
    run counts from step 0 with a fresh optimizer and schedule in a new MLflow run, and the
    source is named in state.json and in the run's tags. The loss is GRAM + 0.5 x cosine:
    both terms and both temperatures are logged."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    source = checkpoint_of_run(checkpoints.good, tmp_path / "source", "source-run-id")
    cfg = _config(
        tmp_path,
        train_shards,
        uri,
        checkpoint={"init_from": str(source)},
        optim={"lr": 0.0, "warmup_steps": 1},
        loss={"kind": "gram", "cosine_weight": 0.5},
    )
    result = train_run(cfg)
    assert result.final_step == 3
    new, old = _weights(result.checkpoint_uri), _weights(source)
    assert set(new) == set(old)
    for name, value in old.items():
        assert torch.equal(new[name], value), name

    state = json.loads((Path(result.checkpoint_uri) / "state.json").read_text())
    assert state["progress"]["step"] == 3
    trainer = load_trainer_state(Path(result.checkpoint_uri))
    assert trainer["scheduler"]["last_epoch"] == 3
    assert {int(s["step"]) for s in trainer["optimizer"]["state"].values()} == {3}
    lineage = state["progress"]["lineage"]
    assert lineage["init_from"] == str(source)
    assert lineage["source_step"] == "120"
    assert lineage["source_run_id"] == "source-run-id"
    assert lineage["modules"] == "all"
    weights = Path(result.checkpoint_uri) / "model.safetensors"
    assert read_metadata(weights)[INIT_FROM_KEY] == str(source), "the weights name their source"

    client = MlflowClient(uri)
    run = client.get_run(result.mlflow_run_id)
    assert result.mlflow_run_id != "source-run-id"
    assert run.data.tags["gram.init_from"] == str(source)
    assert run.data.tags["gram.init_from.source_step"] == "120"
    assert run.data.tags["gram.init_from.source_run_id"] == "source-run-id"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    metrics = run.data.metrics
    for name in ("loss_gram", "loss_cosine", "temperature", "cosine_temperature"):
        assert name in metrics, name
    assert metrics["loss"] == pytest.approx(metrics["loss_gram"] + 0.5 * metrics["loss_cosine"])
    assert metrics["cosine_temperature"] == pytest.approx(0.07)  # lr 0: still its start value


def test_init_from_a_registered_champion_takes_the_named_towers(
    tmp_path, mlflow_server, checkpoints, train_shards
):
    from jobs import register

    client = MlflowClient(mlflow_server.url)
    parent = training_run(client, "init-from-registry", "runs/good")
    ckpt = checkpoint_of_run(checkpoints.good, tmp_path / "registered", parent)
    version = register.run(
        load_config(
            register.RegisterConfig,
            None,
            [f"checkpoint={ckpt}", "name=gram-init", f"tracking.tracking_uri={mlflow_server.url}"],
        )
    )
    client.set_registered_model_alias("gram-init", "champion", version)
    cfg = _config(
        tmp_path,
        train_shards,
        mlflow_server.url,
        checkpoint={"init_from": "models:/gram-init@champion", "init_modules": ["video", "audio"]},
        optim={"lr": 0.0, "warmup_steps": 1},
    )
    result = train_run(cfg)
    new, old = _weights(result.checkpoint_uri), _weights(checkpoints.good)
    towers = ("encoders.video.", "projections.video.", "encoders.audio.", "projections.audio.")
    taken = [k for k in old if k.startswith(towers)]
    assert taken
    for name in taken:
        assert torch.equal(new[name], old[name]), name
    text = [k for k in old if k.startswith(("encoders.text.", "projections.text."))]
    assert any(not torch.equal(new[k], old[k]) for k in text), "the text tower starts fresh"

    state = json.loads((Path(result.checkpoint_uri) / "state.json").read_text())
    lineage = state["progress"]["lineage"]
    assert lineage["pinned"] == f"models:/gram-init/{version}"
    assert lineage["registered_version"] == version
    assert lineage["source_run_id"] == parent
    assert lineage["modules"] == "video,audio"
    weights = Path(result.checkpoint_uri) / "model.safetensors"
    assert read_metadata(weights)[INIT_FROM_KEY] == f"models:/gram-init/{version}"
    tags = client.get_run(result.mlflow_run_id).data.tags
    assert tags["gram.init_from"] == "models:/gram-init@champion"
    assert tags["gram.init_from.registered_model"] == "gram-init"
    assert tags["gram.init_from.registered_version"] == version


def test_a_source_that_does_not_fit_is_refused_before_any_work_naming_the_keys(
    tmp_path, capsys, checkpoints, train_shards
):
    code = train_main(
        [
            f"data.train={train_shards}",
            "scaling.workers=0",
            f"checkpoint.storage={tmp_path / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"checkpoint.init_from={checkpoints.good}",
            "model_overrides=[embed_dim=64]",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "checkpoint.init_from" in err
    assert "projections.text.weight: source (128, 64) vs model (64, 64)" in err
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="set one of them"):
        _config(
            tmp_path,
            train_shards,
            "sqlite://",
            checkpoint={"init_from": str(checkpoints.good), "resume_from": str(checkpoints.good)},
        )

"""The training job's logged loss curve and training-time noise, in the real job (Ray Train
local mode, `scaling.workers=0`) on synthetic shards: `loss_mean` averages every step since
the previous log, and `data.augment` changes what the model sees, reproducibly per seed."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from gram.config import from_dict
from gram.synthetic import SyntheticClips
from jobs.train import TrainConfig
from jobs.train import run as train_run
from pipelines.samples_to_shards import write_sample_shards

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def train_shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("window-shards") / "train"
    write_sample_shards(SyntheticClips(16, seed=5), str(out), samples_per_shard=8)
    return str(out)


def _losses(tmp: Path, shards: str, name: str, every: int, augment: dict) -> dict[str, dict]:
    """Run 4 steps from seed 0; the logged `loss` and `loss_mean` histories by step."""
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = from_dict(
        TrainConfig,
        {
            "name": name,
            "seed": 0,
            "data": {"train": shards, "batch_size": 4, "augment": augment},
            "scaling": {"workers": 0},
            "checkpoint": {"storage": str(tmp / "runs"), "every_steps": 100},
            "tracking": {"tracking_uri": uri, "experiment": "loss-window"},
            "max_steps": 4,
            "log_every_steps": every,
        },
    )
    run_id = train_run(cfg).mlflow_run_id
    client = MlflowClient(uri)
    return {
        key: {m.step: m.value for m in client.get_metric_history(run_id, key)}
        for key in ("loss", "loss_mean")
    }


def test_loss_mean_averages_every_step_since_the_last_log_and_augment_is_drawn_per_seed(
    tmp_path, train_shards
):
    noise = {"frame_occluder": 8, "frame_noise_std": 0.2, "audio_snr_db": 0.0}
    each = _losses(tmp_path, train_shards, "each", 1, noise)
    pairs = _losses(tmp_path, train_shards, "pairs", 2, noise)
    assert each["loss_mean"] == pytest.approx(each["loss"])  # a window of one step
    assert sorted(pairs["loss"]) == [2, 4]
    for step in (2, 4):
        assert pairs["loss"][step] == pytest.approx(each["loss"][step], rel=1e-5)
        window = (each["loss"][step - 1] + each["loss"][step]) / 2
        assert pairs["loss_mean"][step] == pytest.approx(window, rel=1e-5)
    clean = _losses(tmp_path, train_shards, "clean", 1, {})
    assert clean["loss"][1] != pytest.approx(each["loss"][1], rel=1e-4)

"""Training checkpoints without Ray: round trip, persisting with retention (local folders
and the S3 test server), and no code runs when loading one."""

from __future__ import annotations

import json
import pickle
import random

import pytest
import torch

from gram.loss import GramLoss
from gram.model import gram_tiny
from gram.steps import OptimConfig, build_optimizer, cosine_schedule
from jobs.train import TrainConfig
from jobs.training.checkpoints import (
    Progress,
    data_layout,
    load_trainer_state,
    persist_checkpoint,
    restore_checkpoint,
    resume_position,
    run_checkpoints,
    save_checkpoint_dir,
)
from jobs.training.loop import ProgressLine
from pipelines import storage
from pipelines.storage import S3Config


def _parts():
    torch.manual_seed(0)
    model, loss = gram_tiny(), GramLoss(temperature=0.05)
    cfg = OptimConfig(lr=1e-3, warmup_steps=2, total_steps=10)
    optimizer = build_optimizer(model, loss, cfg)
    return model, loss, optimizer, cosine_schedule(optimizer, cfg)


def test_checkpoint_folder_round_trip_restores_everything(tmp_path):
    model, loss, optimizer, scheduler = _parts()
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    progress = Progress(step=3, epoch=1, epoch_step=2, samples_seen=96, mlflow_run_id="abc")
    random.seed(5)
    save_checkpoint_dir(
        tmp_path / "ckpt", model, loss, optimizer, scheduler, progress, TrainConfig()
    )
    expected_draw = random.random()

    fresh_model, fresh_loss, fresh_opt, fresh_sched = _parts()
    with torch.no_grad():
        next(fresh_model.parameters()).add_(1.0)
    restored = restore_checkpoint(
        tmp_path / "ckpt", fresh_model, fresh_loss, fresh_opt, fresh_sched
    )
    assert restored == progress
    assert random.random() == expected_draw  # the RNG continues where it was saved
    for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(fresh_loss.temperature, torch.tensor(0.05))
    assert fresh_sched.last_epoch == 3
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])


class _Payload:
    def __reduce__(self):
        return (open, ("/tmp/gram-pwned-by-checkpoint", "w"))


def test_a_planted_malicious_pickle_is_refused_and_never_executed(tmp_path):
    target = "/tmp/gram-pwned-by-checkpoint"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    with (folder / "trainer.pt").open("wb") as fh:
        pickle.dump({"optimizer": _Payload()}, fh, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_trainer_state(folder)
    assert not __import__("os").path.exists(target)


def test_progress_line_reads_well():
    line = ProgressLine(total_steps=400, epochs=2, global_batch=64, start_step=0)
    rate = line.rate(120)
    text = line.line(120, 0, {"loss": 1.234, "temperature": 0.061, "lr": 1e-4}, rate, 0.03)
    assert text.startswith("step 120/400 (30%) epoch 1/2 | loss 1.2340 tau 0.0610 lr 1.00e-04")
    assert "samples/s | data wait 3% | ETA" in text


def test_resume_keeps_the_epoch_position_only_with_the_same_data_layout():
    shards = ["s3://b/train-000000.tar 64", "s3://b/train-000001.tar 64"]
    layout = data_layout(shards, workers=2, batch_size=8, accumulation=1, seed=0)
    assert layout == data_layout(list(shards), 2, 8, 1, 0)
    assert "2 workers x batch 8 x 1" in layout

    same = Progress(step=5, epoch=1, epoch_step=3, data_layout=layout)
    assert resume_position(same, layout) == ""
    assert (same.epoch, same.epoch_step) == (1, 3)

    for other in (
        data_layout(shards, 4, 8, 1, 0),  # more workers: another per-rank split
        data_layout(shards, 2, 16, 1, 0),  # another batch: another sample count per step
        data_layout(shards, 2, 8, 1, 1),  # another seed: another shuffle
        data_layout(shards[:1], 2, 8, 1, 0),  # other data
    ):
        assert other != layout
        moved = Progress(step=5, epoch=1, epoch_step=3, data_layout=layout)
        warning = resume_position(moved, other)
        assert "epoch 2 starts again" in warning
        assert "3 step(s)" in warning
        assert (moved.step, moved.epoch, moved.epoch_step) == (5, 1, 0)
        assert moved.data_layout == other

    unknown = Progress(step=5, epoch=1, epoch_step=3)  # a checkpoint that did not record it
    assert resume_position(unknown, layout) == ""
    assert unknown.epoch_step == 3
    assert unknown.data_layout == layout


@pytest.mark.parametrize("where", ["local", "s3"])
def test_persisted_checkpoints_keep_the_newest_and_ignore_a_half_copied_folder(
    where, tmp_path, request
):
    if where == "s3":
        server = request.getfixturevalue("s3_server")
        run_dir, s3 = f"s3://{server.make_bucket('persist')}/runs/job", S3Config().resolved()
    else:
        run_dir, s3 = str(tmp_path / "runs" / "job"), S3Config()
    model, loss, optimizer, scheduler = _parts()
    cfg = TrainConfig(name="job")
    made = []
    for step in (2, 4, 6):
        folder = save_checkpoint_dir(
            tmp_path / f"ckpt{step}", model, loss, optimizer, scheduler, Progress(step=step), cfg
        )
        made.append(persist_checkpoint(folder, run_dir, keep=2, s3=s3))
    # a copy cut short by a crash: files, but no state.json (it is always copied last)
    storage.put_bytes(
        storage.join(run_dir, "checkpoint_9999-12-31_00-00-00.000000", "x"), b"", s3=s3
    )
    storage.put_bytes(storage.join(run_dir, "other", "state.json"), b"{}", s3=s3)

    kept = run_checkpoints(run_dir, s3)
    assert kept == made[1:]  # keep=2: the oldest is gone, the newest last
    assert not [f for f in storage.list_files(run_dir, s3=s3) if f.uri.startswith(made[0])]
    steps = [
        json.loads(storage.read_bytes(storage.join(k, "state.json"), s3=s3))["progress"]["step"]
        for k in kept
    ]
    assert steps == [4, 6]
    names = {f.uri.rsplit("/", 1)[-1] for f in storage.list_files(kept[-1], s3=s3)}
    assert names == {"model.safetensors", "trainer.pt", "state.json"}
    assert run_checkpoints(storage.join(run_dir, "missing"), s3) == []

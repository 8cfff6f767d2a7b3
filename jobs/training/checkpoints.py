"""Training checkpoints: what one holds, where the run keeps them, and where training stands.

A checkpoint is a folder:
    model.safetensors  weights + loss temperature + model config (gram.weights format)
    trainer.pt         optimizer, scheduler, step, epoch, position in the epoch, RNG
                       states, MLflow run id (loaded with torch.load(weights_only=True))
    state.json         the same counters, human-readable, plus the full job config
                       (secrets redacted); written last, so its presence marks a complete one

The weights' metadata holds the step and, for a run started with `checkpoint.init_from`,
the pinned source (`INIT_FROM_KEY`), so a registered copy of the weights still names it.

A run keeps its checkpoints in `<checkpoint.storage>/<name>/checkpoint_<UTC time>/`, oldest
first by name (`run_checkpoints`), local or on S3. `Progress` is where training stands, and
`data_layout` / `resume_position` decide whether a resumed run may keep its place in an epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from gram.config import from_dict, to_dict
from gram.weights import load_weights, read_loss_state, save_checkpoint
from jobs.cluster.secrets import redact
from pipelines import storage
from pipelines.storage import S3Config

__all__ = [
    "CHECKPOINT_PREFIX",
    "INIT_FROM_KEY",
    "Progress",
    "data_layout",
    "download_checkpoint",
    "latest_run_id",
    "load_trainer_state",
    "persist_checkpoint",
    "restore_checkpoint",
    "resume_position",
    "run_checkpoints",
    "save_checkpoint_dir",
    "storage_filesystem",
]

INIT_FROM_KEY = "init_from"
"""Weights metadata: the model a `checkpoint.init_from` run started from (its pinned URI)."""


@dataclass
class Progress:
    """Where training stands; stored in every checkpoint."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0
    samples_seen: int = 0
    mlflow_run_id: str = ""
    data_layout: str = ""
    """What `epoch_step` counts in (`data_layout()`): the position is only meaningful with it."""
    lineage: dict[str, str] = field(default_factory=dict)
    """Where the run's first weights came from (`checkpoint.init_from`); empty otherwise."""


def data_layout(
    shards: list[str], workers: int, batch_size: int, accumulation: int, seed: int
) -> str:
    """The settings that decide which samples the first `epoch_step` steps of an epoch read
    (`shards`: one `"<uri> <count>"` per shard), e.g.
    `shards 3f2a9c01d4e5 (12) | 2 workers x batch 8 x 1 | seed 0`."""
    digest = hashlib.sha256("\n".join(shards).encode()).hexdigest()[:12]
    return (
        f"shards {digest} ({len(shards)}) | {workers} workers x batch {batch_size} x "
        f"{accumulation} | seed {seed}"
    )


def resume_position(progress: Progress, layout: str) -> str:
    """Keep `progress`'s place in its epoch when it was reached with `layout`; otherwise
    start that epoch again from its first batch (the shard order and the per-rank split are
    different, so no sample count can point at the same place). Returns a warning, or ''."""
    saved, progress.data_layout = progress.data_layout, layout
    if not saved or saved == layout or progress.epoch_step == 0:
        return ""
    done = progress.epoch_step
    progress.epoch_step = 0
    return (
        f"the data layout changed since the checkpoint ({saved} -> {layout}): epoch "
        f"{progress.epoch + 1} starts again from its first batch ({done} step(s) of it are "
        "trained twice)"
    )


def save_checkpoint_dir(
    folder: Path,
    model: torch.nn.Module,
    loss: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: Progress,
    config: Any,
) -> Path:
    """Write a complete, resumable checkpoint into `folder`; `config` is the job's config
    dataclass (recorded in state.json with its secrets redacted)."""
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"step": str(progress.step)}
    if progress.lineage:
        metadata[INIT_FROM_KEY] = progress.lineage["pinned"]
    save_checkpoint(folder / "model.safetensors", model, loss, metadata=metadata)
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "progress": to_dict(progress),
        "rng_torch": torch.get_rng_state(),
        "rng_python": random.getstate(),
    }
    torch.save(state, folder / "trainer.pt")
    (folder / "state.json").write_text(
        json.dumps({"progress": to_dict(progress), "config": redact(to_dict(config))}, indent=2)
    )
    return folder


def load_trainer_state(folder: Path) -> dict[str, Any]:
    """`trainer.pt` of a checkpoint folder, loaded without executing pickled code."""
    path = folder / "trainer.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a training checkpoint (no trainer.pt)")
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return state


def restore_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    loss: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> Progress:
    """Load a checkpoint folder into the training state (weights, temperature, optimizer,
    scheduler, RNGs) and return where it stood."""
    load_weights(model, folder / "model.safetensors")
    loss.load_state_dict(read_loss_state(folder / "model.safetensors"))
    state = load_trainer_state(folder)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_torch"])
    random.setstate(state["rng_python"])
    return from_dict(Progress, state["progress"])


CHECKPOINT_PREFIX = "checkpoint_"
"""Checkpoint folders in `<storage>/<name>/` are `checkpoint_<time>`, oldest first by name."""


def run_checkpoints(run_dir: str, s3: S3Config) -> list[str]:
    """URIs of the complete checkpoint folders of a run (those with a `state.json`, which is
    written last), oldest first; empty when the run has none yet."""
    try:
        files = storage.list_files(run_dir, s3=s3)
    except storage.StorageNotFoundError:
        return []
    base = storage.join(run_dir)  # normalised the way list_files spells its URIs
    folders = {storage.parent(f.uri) for f in files if f.uri.endswith("/state.json")}
    mine = [f for f in folders if storage.parent(f) == base]
    return sorted(f for f in mine if f.rsplit("/", 1)[-1].startswith(CHECKPOINT_PREFIX))


def latest_run_id(run_dir: str, s3: S3Config) -> str:
    """The MLflow run id recorded by the latest checkpoint of a run; empty when it has none."""
    saved = run_checkpoints(run_dir, s3)
    if not saved:
        return ""
    state = json.loads(storage.read_bytes(storage.join(saved[-1], "state.json"), s3=s3))
    return str(state["progress"]["mlflow_run_id"])


def persist_checkpoint(folder: Path, run_dir: str, keep: int, s3: S3Config) -> str:
    """Copy the checkpoint `folder` to a new `<run_dir>/checkpoint_<UTC time>` and delete
    all but the newest `keep` of the run's checkpoints; returns the new folder's URI.

    `state.json` is copied last and deleted first, so a folder cut short by a crash is
    never taken for a checkpoint (`run_checkpoints`). Ray Train does this for its
    workers; in local mode (`scaling.workers = 0`) the loop calls it itself.
    """
    stamp = datetime.now(UTC).strftime("%Y-%m-%d_%H-%M-%S.%f")
    dest = storage.join(run_dir, f"{CHECKPOINT_PREFIX}{stamp}")
    files = sorted((p for p in folder.rglob("*") if p.is_file()), key=_state_json_last)
    for path in files:
        storage.put_file(storage.join(dest, *path.relative_to(folder).parts), path, s3=s3)
    for old in run_checkpoints(run_dir, s3)[:-keep]:
        storage.delete(storage.join(old, "state.json"), s3=s3)
        if storage.is_s3(old):
            for f in storage.list_files(old, s3=s3):
                storage.delete(f.uri, s3=s3)
        else:
            shutil.rmtree(old, ignore_errors=True)
    return dest


def _state_json_last(path: Path) -> tuple[bool, str]:
    return path.name == "state.json", str(path)


def download_checkpoint(uri: str, s3: S3Config) -> Path:
    """A local copy of the checkpoint folder at `uri` (local folders are used in place)."""
    if not storage.is_s3(uri):
        folder = Path(uri)
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoint folder {uri!r} does not exist")
        return folder
    local = Path(tempfile.mkdtemp(prefix="gram-ckpt-"))
    files = storage.list_files(uri, s3=s3)
    if not files:
        raise FileNotFoundError(f"no checkpoint files under {uri!r}")
    for f in files:
        rel = f.uri[len(uri.rstrip("/")) + 1 :]
        storage.download(f.uri, local / rel, s3=s3)
    return local


def storage_filesystem(uri: str, s3: S3Config) -> tuple[Any, str]:
    """(pyarrow filesystem or None, path) for Ray Train's `RunConfig` storage.

    Local paths are made absolute; `s3://` URIs get a filesystem with the
    configured endpoint (MinIO or any S3-compatible store) and a bucket/key path.
    """
    if storage.is_s3(uri):
        fs, path = storage.pyarrow_filesystem(uri, s3=s3)
        return fs, path
    return None, os.path.abspath(uri)

"""The training job's typed config and its per-worker loop (run by Ray Train on every rank).

Each rank builds the model from a named config, wraps it for DDP, streams its
share of the shards (`gram.shards.ShardLoader`), and steps with `GramLoss`
gathering every modality's embeddings across ranks with gradient. Rank 0
writes checkpoints, logs to MLflow and prints progress; every rank reports to
Ray Train every `report_every_steps` steps (each report can block ~2 s).

A checkpoint is a folder:
    model.safetensors  weights + loss temperature + model config (gram.weights format)
    trainer.pt         optimizer, scheduler, step, epoch, position in the epoch, RNG
                       states, MLflow run id (loaded with torch.load(weights_only=True))
    state.json         the same counters, human-readable, plus the full job config
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from gram.config import ConfigError, to_dict
from gram.loss import LossKind
from gram.train import OptimConfig
from jobs.common.secrets import redact
from jobs.common.tracking import TrackingConfig
from pipelines import storage
from pipelines.storage import S3Config

log = logging.getLogger("gram.train")


@dataclass
class DataSection:
    """Shards to train on. URIs are folders holding `index.json` + `*.tar` (local or s3://).

    cache_decoded: keep every decoded sample in memory after the first epoch (frames and
    audio decoded; augmentation still runs every epoch), up to cache_mib MiB per worker
    and per data set, so later epochs neither read nor decode them: for data sets that
    fit in memory, and eval sets."""

    train: str = ""
    eval: str = ""
    batch_size: int = 32
    shuffle_buffer: int = 512
    decode_threads: int = 2
    prefetch_batches: int = 4
    eval_max_batches: int = 0
    audit_dir: str = ""
    cache_decoded: bool = False
    cache_mib: int = 1024

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1 (per worker), got {self.batch_size}")
        if self.decode_threads < 1 or self.prefetch_batches < 1:
            raise ConfigError("data.decode_threads and data.prefetch_batches must be >= 1")
        if self.cache_mib < 1:
            raise ConfigError(f"data.cache_mib must be >= 1, got {self.cache_mib}")


@dataclass
class LossSection:
    """kind: gram | cosine_anchor (text-video, text-audio) | cosine_all (every pair).
    cosine_weight: with kind gram, add this times the text-anchored cosine loss (its own
    learnable temperature); > 0 fixes the sign of the embeddings, which the volume
    cannot see. warmup_kind / warmup_steps: train with that loss for the first steps,
    then with `kind` (e.g. cosine_anchor, then gram: the two-stage regime in one run)."""

    kind: LossKind = "gram"
    temperature: float = 0.07
    learn_temperature: bool = True
    label_smoothing: float = 0.1
    cosine_weight: float = 0.0
    warmup_kind: LossKind | None = None
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.cosine_weight < 0:
            raise ConfigError(f"loss.cosine_weight must be >= 0, got {self.cosine_weight}")
        if self.cosine_weight and self.kind != "gram":
            raise ConfigError(
                f"loss.cosine_weight adds a cosine term to loss.kind=gram; {self.kind!r} is a "
                "cosine loss already (set loss.cosine_weight=0)"
            )
        if (self.warmup_kind is None) != (self.warmup_steps == 0) or self.warmup_steps < 0:
            raise ConfigError(
                "loss.warmup_kind and loss.warmup_steps go together: name the warm-up loss "
                "and give its steps (>= 1), or leave both unset"
            )


@dataclass
class ScalingSection:
    """Ray Train workers. On a 2-CPU machine keep cpus_per_worker * workers <= CPUs.

    workers = 0 is Ray Train's local mode: the loop runs in the calling process, with no
    Ray cluster and no actors to start (for debugging and small runs); checkpoints,
    resuming and MLflow work as with workers.
    """

    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    threads_per_worker: int = 1

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ConfigError(f"scaling.workers must be >= 0 (0 = local mode), got {self.workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"scaling.cpus_per_worker must be > 0, got {self.cpus_per_worker}")


@dataclass
class CheckpointSection:
    """storage: Ray Train storage path (local folder or s3://bucket/prefix); runs live in
    `<storage>/<name>`. resume_from: a checkpoint folder URI to continue (weights, optimizer,
    schedule and counters) when the run has no checkpoint of its own yet. init_from: start a
    new run from the weights of a checkpoint (folder or model.safetensors, local or s3://) or
    a registered model (models:/NAME@ALIAS, models:/NAME/VERSION), with a fresh optimizer,
    schedule, step counter, loss temperature and MLflow run; init_modules: the parts to take
    (all, or modality names such as [video, audio], or dam), the rest starts at random."""

    storage: str = "runs"
    every_steps: int = 100
    keep: int = 3
    resume_from: str = ""
    init_from: str = ""
    init_modules: list[str] = field(default_factory=lambda: ["all"])

    def __post_init__(self) -> None:
        if self.every_steps < 1 or self.keep < 1:
            raise ConfigError("checkpoint.every_steps and checkpoint.keep must be >= 1")
        if self.resume_from and self.init_from:
            raise ConfigError(
                "checkpoint.resume_from continues a run and checkpoint.init_from starts a new "
                "one from another model's weights: set one of them"
            )
        if not self.init_modules:
            raise ConfigError("checkpoint.init_modules must name at least one part (or all)")


@dataclass
class TrainConfig:
    """`python -m jobs.train --config FILE key=value ...`; re-running the same name resumes.

    Steps are optimizer steps of `optim.accumulation_steps` micro-batches of
    `data.batch_size` per worker. `max_steps` (0 = epochs x steps per epoch) is
    where training stops; `schedule_steps` (0 = the same) is the length of the
    learning-rate schedule (it sets `optim.total_steps`), e.g. to stop a run
    early and continue it later on the same schedule.
    """

    name: str = "gram"
    model: str = "tiny"
    model_overrides: list[str] = field(default_factory=list)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    s3: S3Config = field(default_factory=S3Config)
    epochs: int = 1
    max_steps: int = 0
    schedule_steps: int = 0
    log_every_steps: int = 10
    report_every_steps: int = 50
    eval_every_steps: int = 0
    max_failures: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        for key in ("max_steps", "schedule_steps", "eval_every_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0 (0 = off/automatic)")
        for key in ("log_every_steps", "report_every_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1")


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
    cfg: TrainConfig,
) -> Path:
    """Write a complete, resumable checkpoint into `folder`."""
    from gram.weights import save_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        folder / "model.safetensors", model, loss, metadata={"step": str(progress.step)}
    )
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "progress": to_dict(progress),
        "rng_torch": torch.get_rng_state(),
        "rng_python": random.getstate(),
    }
    torch.save(state, folder / "trainer.pt")
    (folder / "state.json").write_text(
        json.dumps({"progress": to_dict(progress), "config": redact(to_dict(cfg))}, indent=2)
    )
    return folder


def load_trainer_state(folder: Path) -> dict[str, Any]:
    """`trainer.pt` of a checkpoint folder, loaded without executing pickled code."""
    path = folder / "trainer.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a training checkpoint (no trainer.pt)")
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return state


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


class ProgressLine:
    """One progress line per logging step, e.g.

    `step 120/400 (30%) epoch 1/2 | loss 1.23 tau 0.061 | 85 samples/s | data wait 3% | ETA 3m12s`
    """

    def __init__(self, total_steps: int, epochs: int, global_batch: int, start_step: int) -> None:
        self.total = total_steps
        self.epochs = epochs
        self.global_batch = global_batch
        self.start_step = start_step
        self.t0 = time.perf_counter()
        self.last_t = self.t0
        self.last_step = start_step

    def rate(self, step: int) -> float:
        """Global samples/s since the last call."""
        now = time.perf_counter()
        rate = (step - self.last_step) * self.global_batch / max(now - self.last_t, 1e-9)
        self.last_t, self.last_step = now, step
        return rate

    def line(self, step: int, epoch: int, stats: dict[str, float], rate: float, wait: float) -> str:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        return (
            f"step {step}/{self.total} ({100 * step / self.total:.0f}%)"
            f" epoch {epoch + 1}/{self.epochs}"
            f" | loss {stats.get('loss', float('nan')):.4f} tau {stats.get('temperature', 0):.4f}"
            f" lr {stats.get('lr', 0):.2e} | {rate:.1f} samples/s | data wait {100 * wait:.0f}%"
            f" | ETA {int(eta // 60)}m{int(eta % 60):02d}s"
        )

"""The training loop every Ray Train worker runs, in named steps that read top to bottom:

    loop = TrainLoop(cfg, plan, settings, callbacks)
    loop.setup()     # model, loss, optimizer, schedule; `restore` a checkpoint; DDP, data, MLflow
    loop.train()     # optimizer steps, epoch after epoch: log, evaluate, `checkpoint` when due
    loop.finish()    # the final evaluation and checkpoint; close the data and the tracker

Each rank builds the model from a named config, wraps it for DDP, streams its share of the
shards (`gram.shards.ShardLoader`) and steps with `GramLoss` gathering every modality's
embeddings across ranks with gradient. Rank 0 writes checkpoints, logs to MLflow and
prints progress; every rank reports to Ray Train every `report_every_steps` steps (each
report can block ~2 s). `TrainCallback`s see every rank start, step and finish (the job
adds `SampleAudit` when `data.audit_dir` is set).

The loop receives the config as a plain dict (what Ray ships to every worker and what a
checkpoint records) and rebuilds the typed `TrainConfig` of jobs/training/config.py, so the
config class never has to be pickled.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist

from gram.config import from_dict
from gram.decode import (
    DecodeConfig,
    SampleError,
    augment_sample,
    collate,
    decode_sample,
    predecode,
)
from gram.loss import CurriculumLoss, build_loss
from gram.model import build_model
from gram.model_config import model_config
from gram.shards import DecodedCache, RawSample, ShardInfo, ShardLoader
from gram.steps import build_optimizer, cosine_schedule, train_step
from gram.steps import evaluate as retrieval_eval
from jobs.common.contact_sheet import first_batch_sheet
from jobs.common.settings import JobSettings
from jobs.training.checkpoints import (
    Progress,
    data_layout,
    download_checkpoint,
    persist_checkpoint,
    restore_checkpoint,
    resume_position,
    run_checkpoints,
    save_checkpoint_dir,
)
from jobs.training.config import TrainConfig
from jobs.training.init_from import InitSource, init_weights
from jobs.training.tracking import Tracker
from pipelines import storage

__all__ = ["RunPlan", "SampleAudit", "TrainCallback", "TrainLoop", "train_loop_per_worker"]

log = logging.getLogger(__name__)

_REPORTED = {"loss", "temperature", "lr", "positive_volume", "negative_volume"}
"""What goes to Ray Train with each report (everything goes to MLflow)."""


@dataclass
class RunPlan:
    """What the driver worked out once for all workers."""

    shards: list[ShardInfo]
    eval_shards: list[ShardInfo]
    total_steps: int
    steps_per_epoch: int
    mlflow_run_id: str
    init: InitSource | None = None
    """`checkpoint.init_from`, resolved by the driver: where the first weights come from."""


class TrainCallback:
    """Sees every rank start, step and finish; override what you need (each is a no-op).

    Callbacks are built on the driver and shipped to every worker (they must pickle), so
    open files and connections in `on_start`, not in `__init__`.
    """

    def on_start(self, rank: int, step: int) -> None:
        """Rank `rank` starts training at `step` (0, or where a checkpoint left off)."""

    def on_step(self, rank: int, step: int, epoch: int, keys: list[str]) -> None:
        """Rank `rank` made optimizer step `step` of `epoch` on the samples `keys`."""

    def on_finish(self, rank: int) -> None:
        """Rank `rank` is done training."""


class SampleAudit(TrainCallback):
    """Appends the keys of every step to `<folder>/rank<r>.jsonl` and every worker start to
    `<folder>/starts.jsonl` (rank, Ray node, pid, step): enough to prove exactly-once epochs
    across worker failures and restarts (`data.audit_dir`)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self._out: TextIO | None = None

    def on_start(self, rank: int, step: int) -> None:
        import ray

        self.folder.mkdir(parents=True, exist_ok=True)
        start = {
            "rank": rank,
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else "",
            "pid": os.getpid(),
            "step": step,
        }
        with (self.folder / "starts.jsonl").open("a") as fh:
            fh.write(json.dumps(start) + "\n")
        self._out = (self.folder / f"rank{rank}.jsonl").open("a")

    def on_step(self, rank: int, step: int, epoch: int, keys: list[str]) -> None:
        if self._out is not None:
            self._out.write(json.dumps({"step": step, "epoch": epoch, "keys": keys}) + "\n")
            self._out.flush()

    def on_finish(self, rank: int) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    """Ray Train's entry on every rank: `payload` = {"config": TrainConfig as a dict,
    "plan": RunPlan, "settings": the driver's JobSettings (MLflow and S3, credentials
    included: handed over with the work, never via a runtime env), "callbacks":
    [TrainCallback]}. The rank runs with the settings applied, as the driver does."""
    settings: JobSettings = payload["settings"]
    cfg = from_dict(TrainConfig, payload["config"])
    with settings.applied():
        TrainLoop(cfg, payload["plan"], settings, payload.get("callbacks", ())).run()


class TrainLoop:
    """One rank's training run; see the module docstring for the steps."""

    def __init__(
        self,
        cfg: TrainConfig,
        plan: RunPlan,
        settings: JobSettings,
        callbacks: Sequence[TrainCallback] = (),
    ) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.cfg, self.plan, self.settings, self.s3 = cfg, plan, settings, settings.s3
        self.callbacks = list(callbacks)
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.local = cfg.scaling.workers == 0  # local mode: no Ray Train storage, we persist
        root = cfg.checkpoint.storage  # this run's checkpoints go to <storage>/<name>
        self.run_dir = storage.join(
            root if storage.is_s3(root) else os.path.abspath(root), cfg.name
        )

    def run(self) -> None:
        """The whole run on this rank: setup (restoring a checkpoint), train, finish."""
        self.setup()
        self.train()
        self.finish()

    # -- setup ------------------------------------------------------------------------------

    def setup(self) -> None:
        """Threads, seeds, model, loss, optimizer and schedule; `restore`; then DDP, the data
        loader, the tracker (rank 0) and the callbacks."""
        import ray.train.torch as ray_torch

        cfg, plan = self.cfg, self.plan
        torch.set_num_threads(cfg.scaling.threads_per_worker)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed + self.rank)
        self.device = ray_torch.get_device()
        self.model_cfg = model_config(cfg.model, cfg.model_overrides)
        self.model = build_model(self.model_cfg)
        self.loss = build_loss(
            cfg.loss.kind,
            anchor=self.model_cfg.anchor,
            temperature=cfg.loss.temperature,
            learn_temperature=cfg.loss.learn_temperature,
            label_smoothing=cfg.loss.label_smoothing,
            cosine_weight=cfg.loss.cosine_weight,
            warmup_kind=cfg.loss.warmup_kind,
            warmup_steps=cfg.loss.warmup_steps,
        )
        schedule = cfg.schedule_steps or plan.total_steps
        self.optim_cfg = replace(
            cfg.optim, total_steps=schedule, warmup_steps=min(cfg.optim.warmup_steps, schedule)
        )
        self.optimizer = build_optimizer(self.model, self.loss, self.optim_cfg)
        self.scheduler = cosine_schedule(self.optimizer, self.optim_cfg)
        self.progress = self.restore()

        self.loss.to(self.device)
        self.ddp_model = ray_torch.prepare_model(self.model)
        self.decode_cfg = DecodeConfig.from_model(self.model_cfg)
        self.loader = self._loader(plan.shards, train=True)
        self.eval_loader = self._loader(plan.eval_shards, train=False)  # one for every evaluation
        self.tracker: Tracker | None = None
        self._sheets: tempfile.TemporaryDirectory[str] | None = None
        self._sheet_due = True
        if self.rank == 0:
            self.tracker = Tracker(
                cfg.tracking,
                uri=self.settings.tracking_uri,
                run_id=self.progress.mlflow_run_id or None,
                run_name=cfg.name,
            )
        for callback in self.callbacks:
            callback.on_start(self.rank, self.progress.step)

    def restore(self) -> Progress:
        """Where training stands: the run's latest checkpoint (Ray Train's after a worker was
        replaced; in local mode the run folder's own), else `checkpoint.resume_from`, else
        step 0. The position inside an epoch is kept only for the same data layout."""
        import ray.train

        cfg, plan = self.cfg, self.plan
        progress = Progress(mlflow_run_id=plan.mlflow_run_id)
        source = ""
        checkpoint = ray.train.get_checkpoint()
        saved = run_checkpoints(self.run_dir, self.s3) if self.local else []
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                progress = self._restore_from(Path(folder))
            source = "the run's latest checkpoint"
        elif saved:
            progress = self._restore_from(download_checkpoint(saved[-1], self.s3))
            source = "the run's latest checkpoint"
        elif cfg.checkpoint.resume_from:
            progress = self._restore_from(download_checkpoint(cfg.checkpoint.resume_from, self.s3))
            source = cfg.checkpoint.resume_from
        elif plan.init is not None:
            copied = init_weights(
                self.model, cfg, plan.init, tracking_uri=self.settings.tracking_uri, s3=self.s3
            )
            progress.lineage = plan.init.lineage
            if self.rank == 0:
                print(f"initialised {copied} weight tensors from {plan.init.uri}", flush=True)
        # The MLflow run is this run's (the driver's), also when starting from another run's.
        progress.mlflow_run_id = plan.mlflow_run_id or progress.mlflow_run_id
        layout = data_layout(
            [f"{s.url} {s.count}" for s in plan.shards], self.world, cfg.data.batch_size,
            cfg.optim.accumulation_steps, cfg.seed,
        )  # fmt: skip
        moved = resume_position(progress, layout)
        if self.rank == 0 and progress.step:
            print(
                f"resumed at step {progress.step} (epoch {progress.epoch + 1}) from {source}",
                flush=True,
            )
            if moved:
                print(f"warning: {moved}", flush=True)
        return progress

    def _restore_from(self, folder: Path) -> Progress:
        return restore_checkpoint(folder, self.model, self.loss, self.optimizer, self.scheduler)

    def _loader(self, shards: list[ShardInfo], *, train: bool) -> ShardLoader:
        cfg, s3, decode_cfg, tokenizer = self.cfg, self.s3, self.decode_cfg, self.model.tokenizer

        def open_shard(url: str) -> Any:
            return storage.open_read(url, s3=s3)

        prepare = functools.partial(predecode, cfg=decode_cfg)
        cache = DecodedCache(cfg.data.cache_mib, prepare) if cfg.data.cache_decoded else None

        augment = cfg.data.augment if train and cfg.data.augment.active else None

        def decode(raw: RawSample, rng: random.Random) -> Any:
            try:
                item = decode_sample(raw, decode_cfg, train=train, rng=rng)
                return augment_sample(item, augment, rng) if augment else item
            except SampleError as exc:
                log.warning("skipping a broken sample: %s", exc)
                return None

        return ShardLoader(
            shards,
            batch_size=cfg.data.batch_size,
            rank=self.rank,
            world_size=self.world,
            seed=cfg.seed,
            open_shard=open_shard,
            decode=decode,
            collate=lambda items: collate(items, tokenizer),
            shuffle_buffer=cfg.data.shuffle_buffer if train else 1,
            decode_threads=cfg.data.decode_threads,
            prefetch_batches=cfg.data.prefetch_batches,
            cache=cache,
        )

    # -- train ------------------------------------------------------------------------------

    def train(self) -> None:
        """Optimizer steps of `optim.accumulation_steps` micro-batches until the plan's total,
        epoch after epoch from where `restore` left off; each step is logged, evaluated,
        checkpointed and reported to Ray Train when due."""
        cfg, plan, progress = self.cfg, self.plan, self.progress
        accum = self.optim_cfg.accumulation_steps
        epochs = -(-plan.total_steps // plan.steps_per_epoch)  # what max_steps leaves of epochs
        global_batch = cfg.data.batch_size * self.world * accum
        self.progress_line = ProgressLine(plan.total_steps, epochs, global_batch, progress.step)
        self.stats: dict[str, float] = {}
        self._loss_sum, self._loss_steps = 0.0, 0  # since the last progress log: `loss_mean`
        self.last_saved = progress.step
        self._wait_mark, self._time_mark = self.loader.wait_seconds, time.perf_counter()
        while progress.step < plan.total_steps:
            skip = progress.epoch_step * accum * cfg.data.batch_size
            for micro in _grouped(self.loader.epoch(progress.epoch, skip=skip), accum):
                self._step(micro)
                if progress.step >= plan.total_steps:
                    break
            else:
                progress.epoch, progress.epoch_step = progress.epoch + 1, 0

    def _step(self, micro: list[Any]) -> None:
        """One optimizer step on the micro-batches `micro`, then what is due after it."""
        cfg, progress = self.cfg, self.progress
        if isinstance(self.loss, CurriculumLoss):
            self.loss.set_step(progress.step)
        self.stats = train_step(
            self.ddp_model,
            self.loss,
            self.optimizer,
            micro,
            scheduler=self.scheduler,
            grad_clip=self.optim_cfg.grad_clip,
        )
        self._loss_sum, self._loss_steps = self._loss_sum + self.stats["loss"], self._loss_steps + 1
        keys = [k for mb in micro for k in mb["keys"]]
        progress.step, progress.epoch_step = progress.step + 1, progress.epoch_step + 1
        progress.samples_seen += len(keys) * self.world
        step = progress.step
        for callback in self.callbacks:
            callback.on_step(self.rank, step, progress.epoch, keys)
        if self._sheet_due:
            self._sheet_due = False
            self._log_first_batch(micro[0], resumed=step > 1)
        if step % cfg.log_every_steps == 0 or step == self.plan.total_steps:
            self._log_progress(step)
        if cfg.eval_every_steps and step % cfg.eval_every_steps == 0:
            self.evaluate(step)
        if step % cfg.checkpoint.every_steps == 0:
            self.checkpoint(step, self.stats, save=True)
        elif step % cfg.report_every_steps == 0:
            self.checkpoint(step, self.stats, save=False)

    def _log_first_batch(self, batch: dict[str, Any], resumed: bool) -> None:
        """Rank 0 logs a contact sheet of the run's first batch to MLflow
        (`inspect/first_batch.png`): what the model sees. A resumed start logs its own first
        batch only when the run has no sheet yet (the run stopped before it was delivered).
        Drawing never stops training."""
        if self.tracker is None or not self.cfg.tracking.enabled:
            return
        self._sheets = tempfile.TemporaryDirectory(prefix="gram-sheet-")  # kept until uploaded
        sheet = first_batch_sheet(batch, Path(self._sheets.name))
        if sheet is not None:
            self.tracker.log_artifact(sheet, "inspect", unless_present=resumed)

    def _log_progress(self, step: int) -> None:
        """Loss, temperature, learning rate, throughput and data wait: MLflow and a line.

        `loss` and the other step statistics are the logging step's own; `loss_mean` is the
        mean loss over every step since the previous log, so that a curve logged every N
        steps still averages every step (what a plateau test over a window of steps needs)."""
        now = time.perf_counter()
        wait = (self.loader.wait_seconds - self._wait_mark) / max(now - self._time_mark, 1e-9)
        self._wait_mark, self._time_mark = self.loader.wait_seconds, now
        window = {"loss_mean": self._loss_sum / max(self._loss_steps, 1)}
        self._loss_sum, self._loss_steps = 0.0, 0
        shown = _global_mean({**self.stats, **window}, self.device)
        rate = self.progress_line.rate(step)
        if self.tracker is not None:
            extra = {"samples_per_s": rate, "data_wait": wait, "rss_mb": _rss_mb()}
            self.tracker.log_metrics({**shown, **extra}, step=step)
            print(self.progress_line.line(step, self.progress.epoch, shown, rate, wait), flush=True)

    def evaluate(self, step: int) -> dict[str, float]:
        """Retrieval metrics on the eval shards (every rank embeds its share), logged by rank 0."""
        if not self.plan.eval_shards:
            return {}
        limit = self.cfg.data.eval_max_batches or None
        with contextlib.closing(self.eval_loader.epoch(0)) as batches:
            found = retrieval_eval(self.ddp_model, batches, max_batches=limit)
        metrics = {f"eval_{k}": v for k, v in found.items()}
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step=step)
            print(
                f"eval at step {step}: text->(video+audio) R@1 "
                f"{metrics.get('eval_volume_t2i_r1', 0):.1f}"
                f" (cosine text->video {metrics.get('eval_cosine_video_t2i_r1', 0):.1f},"
                f" text->audio {metrics.get('eval_cosine_audio_t2i_r1', 0):.1f})",
                flush=True,
            )
        return metrics

    def checkpoint(self, step: int, metrics: dict[str, Any], *, save: bool) -> None:
        """Report `metrics` to Ray Train, with a checkpoint when `save` (rank 0 writes it; in
        local mode it is persisted to the run folder here, as Ray Train does for workers)."""
        import ray.train

        progress = self.progress
        progress.mlflow_run_id = (
            self.tracker.run_id if self.tracker else None
        ) or progress.mlflow_run_id
        metrics = {k: v for k, v in metrics.items() if k in _REPORTED or k.endswith("_t2i_r1")}
        metrics.update(step=step, epoch=progress.epoch, mlflow_run_id=progress.mlflow_run_id)
        if not save:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="gram-ckpt-") as tmp:
            ckpt = None
            if self.rank == 0:
                save_checkpoint_dir(
                    Path(tmp), self.ddp_model, self.loss, self.optimizer, self.scheduler,
                    progress, self.cfg,
                )  # fmt: skip
            if self.local:
                uri = persist_checkpoint(Path(tmp), self.run_dir, self.cfg.checkpoint.keep, self.s3)
                fs, path = storage.pyarrow_filesystem(uri, s3=self.s3)
                ckpt = ray.train.Checkpoint(path, filesystem=fs)
            elif self.rank == 0:
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
        self.last_saved = step

    # -- finish -----------------------------------------------------------------------------

    def finish(self) -> None:
        """Evaluate once more and checkpoint the final step (unless that step was just saved
        and there is no evaluation to record); close the data, the callbacks and the tracker."""
        step = self.progress.step
        final_eval = self.evaluate(step)
        if self.last_saved != step or final_eval:
            self.checkpoint(step, {**self.stats, **final_eval}, save=True)
        self.loader.close()
        self.eval_loader.close()
        for callback in self.callbacks:
            callback.on_finish(self.rank)
        if self.tracker is not None:
            self.tracker.log_metrics({"skipped_samples": float(self.loader.skipped)}, step=step)
            self.tracker.close()
        if self._sheets is not None:
            self._sheets.cleanup()


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


def _rss_mb() -> float:
    """This process's resident memory in MiB (Linux /proc; 0 where unavailable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _grouped(batches: Iterator[Any], n: int) -> Iterator[list[Any]]:
    """Micro-batches in groups of `n` (the last group may be shorter): one optimizer step each."""
    group: list[Any] = []
    for batch in batches:
        group.append(batch)
        if len(group) == n:
            yield group
            group = []
    if group:
        yield group


def _global_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar stats over ranks (each rank's loss is its share of the global batch)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t.tolist(), strict=True)}

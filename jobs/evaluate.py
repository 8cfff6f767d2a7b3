"""Evaluate a GRAM model on eval shards: retrieval, zero-shot classification, report, pictures.

    python -m jobs.evaluate --config jobs/configs/evaluate.yaml
    python -m jobs.evaluate model=models:/gram@champion eval.shards=s3://bucket/shards/eval
    python -m jobs.evaluate model=ckpt/model.safetensors eval.shards=shards/eval \\
        eval.parallel.local=true

`model` is a training checkpoint (folder or model.safetensors, local or s3://) or a
registered version (models:/NAME@ALIAS or models:/NAME/VERSION). Clips are embedded
by Ray tasks (joins $RAY_ADDRESS, else starts Ray here), scores are computed in
chunks. Writes `<output>/report.json` and PNG pictures, logs them with every metric
to a new MLflow run (a child of the model's training run, tagged with it), and for
a registered version also tags the version with the metrics (`gram.eval.<eval_id>`),
which is what `jobs.promote` compares. Exit status: 0 done, 2 configuration error.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from jobs.common.entry import EXIT_OK, job_main
from jobs.common.settings import JobSettings
from jobs.evaluation.scoring import EvalConfig, EvaluationResult, evaluate_files, sign_warnings
from jobs.registry.models import experiment_for, log_evaluation, resolve_model, tag_eval_metrics
from jobs.training.tracking import TrackingConfig
from pipelines import storage
from pipelines.storage import S3Config

log = logging.getLogger("gram.evaluate")

HEADLINE = (
    ("volume_t2i_r1", "text -> (video+audio) R@1, volume"),
    ("volume_i2t_r1", "(video+audio) -> text R@1, volume"),
    ("cosine_video_t2i_r1", "text -> video R@1, cosine"),
    ("cosine_audio_t2i_r1", "text -> audio R@1, cosine"),
    ("zeroshot_top1", "zero-shot classification top-1, volume"),
)


@dataclass
class EvaluateConfig:
    """`python -m jobs.evaluate --config FILE key=value ...`.

    model: checkpoint folder / model.safetensors (local or s3://) or models:/NAME@ALIAS.
    output: folder (local or s3://) for report.json and the pictures; empty = eval-output/<time>.
    run_name: name of the MLflow evaluation run (empty: evaluate-<time>).
    """

    model: str = ""
    output: str = ""
    run_name: str = ""
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    s3: S3Config = field(default_factory=S3Config)


def _publish(folder: Path, target: str, s3: S3Config) -> None:
    """Copy the report and pictures to an s3:// output (local outputs are written in place)."""
    for path in sorted(folder.iterdir()):
        storage.put_file(storage.join(target, path.name), path, s3=s3)


def run(cfg: EvaluateConfig) -> tuple[EvaluationResult, str]:
    """Evaluate, write the report, log to MLflow; returns the result and the MLflow run id."""
    from mlflow import MlflowClient

    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    output = cfg.output or f"eval-output/{stamp}"
    settings = JobSettings.resolve(cfg.tracking.tracking_uri, cfg.s3)
    tracking_uri, s3 = settings.tracking_uri, settings.s3
    with settings.applied(), tempfile.TemporaryDirectory(prefix="gram-evaluate-") as tmp:
        files = resolve_model(cfg.model, tracking_uri=tracking_uri, s3=s3, workdir=Path(tmp))
        local_out = Path(tmp) / "report" if storage.is_s3(output) else Path(output)
        result = evaluate_files(files, cfg.eval, s3, local_out)
        if storage.is_s3(output):
            _publish(local_out, output, s3)
        run_id = ""
        if cfg.tracking.enabled:
            client = MlflowClient(tracking_uri)
            experiment = experiment_for(client, files, cfg.tracking.experiment)
            run_id = log_evaluation(
                client, result, files, experiment, cfg.run_name or f"evaluate-{stamp}"
            )
            if files.registered_name:
                tag_eval_metrics(
                    client, files.registered_name, files.registered_version, result, run_id
                )
    counts = result.report["counts"]
    print(
        f"evaluated {files.source} on {cfg.eval.shards} (eval id {result.eval_id}): "
        f"{counts['clips']} clips, {counts['captions']} captions, missing "
        f"{counts['missing']}, skipped {counts['skipped_samples']}"
    )
    for key, label in HEADLINE:
        if key in result.metrics:
            print(f"  {label:<42} {result.metrics[key]:6.2f}")
    for line in sign_warnings(result.report["signs"]):
        log.warning("%s", line)
        print(f"  warning: {line}")
    print(f"  report: {storage.join(output, 'report.json')}")
    if run_id:
        print(f"  MLflow run: {run_id} at {tracking_uri}")
    return result, run_id


def _run(cfg: EvaluateConfig) -> int:
    run(cfg)
    return EXIT_OK


def main(argv: Sequence[str] | None = None, prog: str = "python -m jobs.evaluate") -> int:
    """Command-line entry point; returns the process exit code."""
    return job_main(argv, prog=prog, doc=__doc__, config=EvaluateConfig, run=_run)


if __name__ == "__main__":
    sys.exit(main())

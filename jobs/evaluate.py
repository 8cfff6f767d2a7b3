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
which is what `jobs.promote` compares.

`baseline=URI` compares with another model on the same eval set (a registered version's
tags when it was evaluated on it, else it is evaluated and tagged); `baseline=source` with the
model this one was initialised from (`checkpoint.init_from`). Every headline and
single-modality metric is printed before and after, stored in the report (`baseline`),
and each that fell by more than `drift_points` is warned about. Exit status: 0 done,
2 configuration error.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from gram.config import ConfigError
from jobs.common.entry import EXIT_OK, job_main
from jobs.common.settings import JobSettings
from jobs.evaluation.baseline import (
    Baseline,
    Delta,
    baseline_metrics,
    baseline_uri,
    compare,
    drift_warnings,
    metric_label,
)
from jobs.evaluation.scoring import (
    EvalConfig,
    EvaluationResult,
    evaluate_files,
    sign_warnings,
    write_report,
)
from jobs.registry.models import experiment_for, log_evaluation, resolve_model, tag_eval_metrics
from jobs.training.tracking import TrackingConfig
from pipelines import storage
from pipelines.storage import S3Config

log = logging.getLogger("gram.evaluate")

HEADLINE = (
    "volume_t2i_r1",
    "volume_i2t_r1",
    "cosine_video_t2i_r1",
    "cosine_audio_t2i_r1",
    "zeroshot_top1",
)


@dataclass
class EvaluateConfig:
    """`python -m jobs.evaluate --config FILE key=value ...`.

    model: checkpoint folder / model.safetensors (local or s3://) or models:/NAME@ALIAS.
    output: folder (local or s3://) for report.json and the pictures; empty = eval-output/<time>.
    run_name: name of the MLflow evaluation run (empty: evaluate-<time>).
    baseline: a model to compare with on the same eval set (checkpoint or models:/...), or
        `source`: the model this one was initialised from. Empty: no comparison.
    drift_points: warn when a compared metric falls by more than this (points of R@1/top-1).
    """

    model: str = ""
    output: str = ""
    run_name: str = ""
    baseline: str = ""
    drift_points: float = 5.0
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    s3: S3Config = field(default_factory=S3Config)

    def __post_init__(self) -> None:
        if self.drift_points < 0:
            raise ConfigError(f"drift_points must be >= 0 (points), got {self.drift_points}")


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
        against = baseline_uri(cfg.baseline, files) if cfg.baseline else ""
        local_out = Path(tmp) / "report" if storage.is_s3(output) else Path(output)
        result = evaluate_files(files, cfg.eval, s3, local_out)
        baseline: Baseline | None = None
        deltas: list[Delta] = []
        if against:
            baseline = baseline_metrics(
                against,
                cfg.eval,
                s3=s3,
                tracking_uri=tracking_uri,
                workdir=Path(tmp),
                experiment=cfg.tracking.experiment if cfg.tracking.enabled else None,
            )
            deltas = compare(result.metrics, baseline.metrics)
            result.report["baseline"] = {
                "uri": baseline.uri,
                "metrics_from": baseline.how,
                "drift_points": cfg.drift_points,
                "deltas": [d.to_json() for d in deltas],
            }
            write_report(result.report, result.report_path)
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
            if baseline is not None:
                client.set_tag(run_id, "gram.baseline", baseline.uri)
    counts = result.report["counts"]
    print(
        f"evaluated {files.source} on {cfg.eval.shards} (eval id {result.eval_id}): "
        f"{counts['clips']} clips, {counts['captions']} captions, missing "
        f"{counts['missing']}, skipped {counts['skipped_samples']}"
    )
    for key in HEADLINE:
        if key in result.metrics:
            print(f"  {metric_label(key):<42} {result.metrics[key]:6.2f}")
    warnings = sign_warnings(result.report["signs"])
    if baseline is not None:
        print(f"  against the baseline {baseline.uri} (metrics {baseline.how}):")
        for delta in deltas:
            print(f"    {delta.line()}")
        warnings += drift_warnings(deltas, drift_points=cfg.drift_points, baseline=baseline.uri)
    for line in warnings:
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

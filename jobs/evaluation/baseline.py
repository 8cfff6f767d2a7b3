"""Compare an evaluation with a baseline model's on the same eval set, and warn on drift.

    uri = baseline_uri("source", files)              # the model `files` was initialised from
    before = baseline_metrics(uri, config, ...)      # its tags for this eval set, or evaluated
    deltas = compare(result.metrics, before.metrics)
    warnings = drift_warnings(deltas, drift_points=5.0, baseline=uri)

A fine-tune can trade one ability for another: GRAM fine-tuning of a cosine-trained model
raises the volume metrics and may lower a tower's pairwise cosine with the text. The
comparison shows every headline and single-modality metric before and after (points of
R@1 / top-1), and a warning names each that fell by more than `drift_points`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gram.config import ConfigError
from gram.weights import read_metadata
from jobs.evaluation.scoring import EvalConfig, ModelFiles, evaluate_files
from jobs.registry.models import get_version, parse_model_uri, resolve_model
from jobs.registry.promotion import VersionMetrics
from jobs.training.checkpoints import INIT_FROM_KEY
from pipelines.storage import S3Config

__all__ = [
    "SOURCE",
    "Baseline",
    "Delta",
    "baseline_metrics",
    "baseline_uri",
    "compare",
    "drift_warnings",
    "metric_label",
]

SOURCE = "source"
"""`baseline=source`: the model the evaluated one was initialised from (`checkpoint.init_from`)."""

_LABELS = {
    "volume_t2i_r1": "text -> (video+audio) R@1, volume",
    "volume_i2t_r1": "(video+audio) -> text R@1, volume",
    "zeroshot_top1": "zero-shot classification top-1, volume",
}
_COSINE = re.compile(r"cosine_([a-z0-9]+)_(t2i|i2t)_r1")
_ZEROSHOT = re.compile(r"zeroshot_cosine_([a-z0-9]+)_top1")


def metric_label(key: str) -> str | None:
    """A readable name of a compared metric, None for the metrics not compared (the
    sign-aligned ones, R@5/10, ranks, counts)."""
    if key in _LABELS:
        return _LABELS[key]
    if found := _COSINE.fullmatch(key):
        tower, way = found.groups()
        return f"text -> {tower} R@1, cosine" if way == "t2i" else f"{tower} -> text R@1, cosine"
    if found := _ZEROSHOT.fullmatch(key):
        return f"zero-shot classification top-1, cosine ({found[1]})"
    return None


@dataclass(frozen=True)
class Delta:
    """One metric before (the baseline) and after (the evaluated model), in points."""

    metric: str
    before: float
    after: float

    @property
    def change(self) -> float:
        """after - before (points; negative: worse, for these higher-is-better metrics)."""
        return self.after - self.before

    def line(self) -> str:
        """`text -> audio R@1, cosine                  42.00 ->  24.00   -18.00`."""
        label = metric_label(self.metric) or self.metric
        return f"{label:<42} {self.before:6.2f} -> {self.after:6.2f}  {self.change:+7.2f}"

    def to_json(self) -> dict[str, Any]:
        """The delta as a JSON-ready dict (for report.json)."""
        return {"metric": self.metric, "before": self.before, "after": self.after}


@dataclass(frozen=True)
class Baseline:
    """The baseline's metrics on the eval set and how they were had (`how`: `from its tags`,
    a registered version already evaluated on this eval id; `evaluated now`; `evaluated
    now and tagged`)."""

    uri: str
    metrics: dict[str, float]
    how: str


def baseline_uri(baseline: str, files: ModelFiles) -> str:
    """`baseline` itself, or for `source` the pinned URI the weights in `files` record as
    the model their training run started from. ConfigError if they record none."""
    if baseline != SOURCE:
        return baseline
    source = read_metadata(files.weights).get(INIT_FROM_KEY, "")
    if not source:
        raise ConfigError(
            f"baseline={SOURCE}: {files.source} records no source model (it was not trained "
            "with checkpoint.init_from, or before its weights recorded it); give the "
            "baseline as a checkpoint or models:/NAME@ALIAS instead"
        )
    return source


def baseline_metrics(
    uri: str,
    config: EvalConfig,
    *,
    s3: S3Config,
    tracking_uri: str,
    workdir: Path,
    experiment: str | None,
) -> Baseline:
    """The metrics of model `uri` on the eval set of `config`. A registered version: its
    tags for this eval set, else evaluated now and, when `experiment` is given (tracking
    on), logged and tagged as a promotion does, so the next comparison or promotion reuses
    them. A checkpoint: evaluated now. Reports go under `workdir/baseline`."""
    parsed = parse_model_uri(uri)
    if parsed is not None:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri)
        version = get_version(client, *parsed)
        versions = VersionMetrics(
            client, config, s3, output=str(workdir / "baseline"), experiment=experiment or ""
        )
        known = versions.known(version)
        if known is not None:
            return Baseline(uri, known, "from its tags")
        if experiment is not None:
            return Baseline(uri, versions.metrics(version), "evaluated now and tagged")
    print(f"evaluating the baseline {uri} on {config.shards} ...")
    files = resolve_model(uri, tracking_uri=tracking_uri, s3=s3, workdir=workdir)
    result = evaluate_files(files, config, s3, workdir / "baseline")
    return Baseline(uri, result.metrics, "evaluated now")


def compare(after: dict[str, float], before: dict[str, float]) -> list[Delta]:
    """The compared metrics (`metric_label`) both evaluations have, headline first."""
    keys = [k for k in after if k in before and metric_label(k) is not None]
    order = list(_LABELS)
    keys.sort(key=lambda k: (order.index(k) if k in order else len(order), k))
    return [Delta(k, before[k], after[k]) for k in keys]


def drift_warnings(deltas: list[Delta], *, drift_points: float, baseline: str) -> list[str]:
    """A warning for every metric that fell by more than `drift_points` against `baseline`."""
    out = []
    for d in deltas:
        if d.change < -drift_points:
            label = metric_label(d.metric) or d.metric
            line = (
                f"{label} fell {-d.change:.1f} points against the baseline {baseline} "
                f"({d.before:.1f} -> {d.after:.1f}; more than drift_points={drift_points:g})"
            )
            if d.metric.startswith(("cosine_", "zeroshot_cosine_")):
                line += (
                    ": cosine search with this tower got worse. A GRAM-only fine-tune can "
                    "trade a tower's pairwise cosine with the text for volume; "
                    "loss.cosine_weight > 0 keeps a pairwise term"
                )
            out.append(line)
    return out

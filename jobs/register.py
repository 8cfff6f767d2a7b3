"""Register a training checkpoint as a new version of an MLflow pyfunc model, alias `candidate`.

    python -m jobs.register --config jobs/configs/register.yaml \\
        checkpoint=demo-output/runs/gram-tiny/checkpoint_000009
    python -m jobs.register checkpoint=s3://bucket/runs/x/checkpoint_000003 name=gram \\
        eval.shards=s3://bucket/shards/eval

The version holds the weights (model.safetensors), the model config, the tokenizer
file if the model has one, how media is decoded, and the project's gram/ and
pipelines/ code, so `mlflow.pyfunc.load_model("models:/NAME@candidate")` needs
nothing else (see docs/registry.md for the input/output contract). Version tags:
git_commit, training_run_id, dataset_fingerprint (from the training run; git_commit
falls back to this checkout's when the run is unknown), code_commit (the checkout
whose code ships with the model), source_checkpoint and, with eval.shards set, the
evaluation metrics.
The version gets the alias `candidate` last, once everything else is recorded.
Exit status: 0 registered, 2 configuration error.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from gram.config import ConfigError
from jobs.cluster.secrets import scrub
from jobs.common.entry import EXIT_OK, job_main
from jobs.common.git import git_commit
from jobs.common.settings import JobSettings
from jobs.evaluation.scoring import EvalConfig, evaluate_files
from jobs.registry.models import (
    experiment_for,
    log_evaluation,
    log_pyfunc_model,
    parse_model_uri,
    resolve_model,
    tag_eval_metrics,
    training_info,
)
from jobs.registry.pyfunc import InferenceConfig
from jobs.training.tracking import TrackingConfig
from pipelines.storage import S3Config


@dataclass
class RegisterConfig:
    """`python -m jobs.register --config FILE key=value ...`.

    checkpoint: training checkpoint folder or model.safetensors (local or s3://).
    name: registered model name. alias: set on the new version (empty: none).
    training_run_id: the run that trained it (empty: the checkpoint's state.json says).
    description: stored on the version. serving: how the served model decodes media.
    eval: with eval.shards set, evaluate now and tag the version with the metrics.
    """

    checkpoint: str = ""
    name: str = "gram"
    alias: str = "candidate"
    training_run_id: str = ""
    description: str = ""
    serving: InferenceConfig = field(default_factory=InferenceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    s3: S3Config = field(default_factory=S3Config)


def run(cfg: RegisterConfig) -> str:
    """Log, register, tag (and evaluate); returns the new version number."""
    if not cfg.checkpoint or parse_model_uri(cfg.checkpoint) is not None:
        raise ConfigError("checkpoint must be a training checkpoint folder or model.safetensors")
    settings = JobSettings.resolve(cfg.tracking.tracking_uri, cfg.s3)
    with settings.applied():
        return _register(cfg, settings)


def _register(cfg: RegisterConfig, settings: JobSettings) -> str:
    """`run` with the job's settings applied."""
    from mlflow import MlflowClient

    client = MlflowClient(settings.tracking_uri)
    s3 = settings.s3
    with tempfile.TemporaryDirectory(prefix="gram-register-") as tmp:
        files = resolve_model(
            cfg.checkpoint, tracking_uri=client.tracking_uri, s3=s3, workdir=Path(tmp)
        )
        files = replace(files, training_run_id=cfg.training_run_id or files.training_run_id)
        info = training_info(client, files.training_run_id)
        experiment = experiment_for(client, files, cfg.tracking.experiment)
        run_tags = {"gram.job": "register", "gram.source_checkpoint": cfg.checkpoint}
        if files.training_run_id:
            run_tags["mlflow.parentRunId"] = files.training_run_id
        run = client.create_run(experiment, run_name=f"register-{cfg.name}", tags=run_tags)
        run_id = str(run.info.run_id)
        with warnings.catch_warnings():  # the signature is explicit: no input example needed
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            version = log_pyfunc_model(client, files, cfg.name, run_id, cfg.serving, Path(tmp))
        code = git_commit()
        tags = {
            "git_commit": info.get("git_commit") or code,
            "code_commit": code,
            "training_run_id": files.training_run_id,
            "dataset_fingerprint": info.get("dataset_fingerprint", ""),
            "source_checkpoint": cfg.checkpoint,
        }
        for key, value in tags.items():
            client.set_model_version_tag(cfg.name, version, key, value)
        if cfg.description:
            client.update_model_version(cfg.name, version, description=scrub(cfg.description))
        if cfg.eval.shards:
            registered = replace(files, registered_name=cfg.name, registered_version=version)
            result = evaluate_files(registered, cfg.eval, s3, Path(tmp) / "evaluation")
            eval_run = log_evaluation(
                client, result, registered, experiment, f"evaluate-{cfg.name}-v{version}"
            )
            tag_eval_metrics(client, cfg.name, version, result, eval_run)
            print(
                f"evaluated on {cfg.eval.shards}: volume_t2i_r1 "
                f"{result.metrics.get('volume_t2i_r1', float('nan')):.2f} (run {eval_run})"
            )
        client.set_terminated(run_id)
    if cfg.alias:
        client.set_registered_model_alias(cfg.name, cfg.alias, version)
    print(
        f"registered {cfg.checkpoint} as version {version} of {cfg.name!r}"
        + (f" (alias {cfg.alias!r}: models:/{cfg.name}@{cfg.alias})" if cfg.alias else "")
        + f"\n  training run: {files.training_run_id or '(unknown)'}"
        f"\n  git commit: {tags['git_commit'] or '(unknown)'}"
        f"\n  MLflow: {client.tracking_uri}"
    )
    return version


def _run(cfg: RegisterConfig) -> int:
    run(cfg)
    return EXIT_OK


def main(argv: Sequence[str] | None = None, prog: str = "python -m jobs.register") -> int:
    """Command-line entry point; returns the process exit code."""
    return job_main(argv, prog=prog, doc=__doc__, config=RegisterConfig, run=_run)


if __name__ == "__main__":
    sys.exit(main())

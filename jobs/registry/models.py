"""MLflow side of evaluation, registration and promotion: model sources, the pyfunc model,
evaluation runs and the tags that carry metrics and decisions.

    files = resolve_model("models:/gram@champion", tracking_uri=uri, s3=s3, workdir=tmp)
    files = resolve_model("s3://bucket/runs/x/ckpt_3", tracking_uri=uri, s3=s3, workdir=tmp)
    version = log_pyfunc_model(MlflowClient(uri), files, "gram", run_id, InferenceConfig(), tmp)

Version tags written here:
    git_commit, training_run_id, dataset_fingerprint   (from the training run)
    code_commit                     the checkout whose gram/ + pipelines/ ship with the model
    source_checkpoint               the checkpoint the weights came from
    gram.eval.<eval_id>             JSON of that eval set's metrics (see jobs.evaluation.scoring)
    gram.eval.<eval_id>.run_id      the MLflow run holding the full evaluation (report, pictures)
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from gram.config import ConfigError, to_dict
from jobs.evaluation.scoring import EvaluationResult, ModelFiles
from pipelines import storage
from pipelines.storage import S3Config

__all__ = [
    "EVAL_TAG_PREFIX",
    "MODEL_URI_PREFIX",
    "eval_metrics_of",
    "experiment_for",
    "get_version",
    "log_evaluation",
    "log_pyfunc_model",
    "parse_model_uri",
    "resolve_model",
    "tag_eval_metrics",
    "training_info",
]

log = logging.getLogger(__name__)

MODEL_URI_PREFIX = "models:/"
EVAL_TAG_PREFIX = "gram.eval."
WEIGHTS_FILE = "model.safetensors"
_PYFUNC_FILE = Path(__file__).with_name("pyfunc.py")
_SERVING_PACKAGES = (
    "mlflow",
    "torch",
    "numpy",
    "pandas",
    "pillow",
    "soundfile",
    "safetensors",
    "tokenizers",
    "pyyaml",
    "ffmpeg-python",
    "imageio-ffmpeg",
    "av",
    "boto3",
)


def parse_model_uri(uri: str) -> tuple[str, str] | None:
    """`models:/name@alias` -> (name, "@alias"); `models:/name/3` -> (name, "3"); else None."""
    if not uri.startswith(MODEL_URI_PREFIX):
        return None
    rest = uri[len(MODEL_URI_PREFIX) :].strip("/")
    if "@" in rest:
        name, _, alias = rest.partition("@")
        ref = f"@{alias}"
    else:
        name, _, ref = rest.partition("/")
    if not name or ref in ("", "@") or not (ref.startswith("@") or ref.isdigit()):
        raise ConfigError(
            f"{uri!r}: use models:/NAME@ALIAS (e.g. models:/gram@champion) or models:/NAME/VERSION"
        )
    return name, ref


def get_version(client: Any, name: str, ref: str) -> Any:
    """The ModelVersion `ref` of `name`: a version number, or an alias with or without `@`."""
    from mlflow.exceptions import MlflowException

    try:
        if ref.isdigit():
            return client.get_model_version(name, ref)
        return client.get_model_version_by_alias(name, ref.removeprefix("@"))
    except MlflowException as exc:
        raise ConfigError(
            f"registered model {name!r} has no version {ref!r} ({exc.message.splitlines()[0]}); "
            "list versions and aliases in the MLflow UI or with MlflowClient.search_model_versions"
        ) from None


def _checkpoint_files(uri: str, s3: S3Config, workdir: Path) -> tuple[Path, str]:
    """Local model.safetensors of a checkpoint folder or file, and its training run id."""
    folder, weights = (
        (storage.parent(uri), uri)
        if uri.endswith(".safetensors")
        else (
            uri,
            storage.join(uri, WEIGHTS_FILE),
        )
    )
    if storage.is_s3(weights):
        local = workdir / "checkpoint" / WEIGHTS_FILE
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            storage.download(weights, local, s3=s3)
        except storage.StorageNotFoundError:
            raise ConfigError(f"{weights!r} does not exist: give a checkpoint folder") from None
    else:
        local = Path(weights)
        if not local.is_file():
            raise ConfigError(
                f"{weights!r} does not exist: give a training checkpoint folder (holding "
                "model.safetensors), a model.safetensors file or models:/NAME@ALIAS"
            )
    try:
        state = json.loads(storage.read_bytes(storage.join(folder, "state.json"), s3=s3))
        run_id = str(state.get("progress", {}).get("mlflow_run_id", ""))
    except (storage.StorageNotFoundError, ValueError):
        run_id = ""
    return local, run_id


def resolve_model(uri: str, *, tracking_uri: str, s3: S3Config, workdir: Path) -> ModelFiles:
    """Local files of a checkpoint (folder or file, local or s3://) or a registered version
    (downloaded from the registry at `tracking_uri` into `workdir`)."""
    if not uri:
        raise ConfigError("model is required: a checkpoint folder/file or models:/NAME@ALIAS")
    parsed = parse_model_uri(uri)
    if parsed is None:
        weights, run_id = _checkpoint_files(uri, s3, workdir)
        return ModelFiles(weights=weights, source=uri, training_run_id=run_id)
    import mlflow.artifacts
    from mlflow import MlflowClient
    from mlflow.models import Model

    name, ref = parsed
    client = MlflowClient(tracking_uri)
    version = get_version(client, name, ref)
    # Where the registry at `tracking_uri` keeps the version's files (a `models:/` URI would
    # be looked up in the registry of this process's environment instead).
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=client.get_model_version_download_uri(name, str(version.version)),
            dst_path=str(workdir / f"{name}-v{version.version}"),
            tracking_uri=tracking_uri,
        )
    )
    artifacts = Model.load(str(local)).flavors["python_function"].get("artifacts", {})
    tokenizer = artifacts.get("tokenizer")
    return ModelFiles(
        weights=local / artifacts["weights"]["path"],
        source=uri,
        tokenizer=local / tokenizer["path"] if tokenizer else None,
        training_run_id=version.tags.get("training_run_id", ""),
        registered_name=name,
        registered_version=str(version.version),
    )


def training_info(client: Any, run_id: str) -> dict[str, str]:
    """git_commit, dataset_fingerprint and experiment_id of a training run ({} if unknown)."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return {}
    try:
        run = client.get_run(run_id)
    except MlflowException:
        log.warning("training run %s is not on this tracking server", run_id)
        return {}
    return {
        "git_commit": run.data.tags.get("git_commit", ""),
        "dataset_fingerprint": run.data.params.get("dataset_fingerprint", ""),
        "experiment_id": run.info.experiment_id,
    }


def experiment_for(client: Any, files: ModelFiles, fallback: str) -> str:
    """The training run's experiment id, else the id of experiment `fallback` (created)."""
    info = training_info(client, files.training_run_id)
    if info.get("experiment_id"):
        return info["experiment_id"]
    from jobs.training.tracking import artifact_location

    found = client.get_experiment_by_name(fallback)
    if found is not None:
        return str(found.experiment_id)
    location = artifact_location(client.tracking_uri, fallback)
    return str(client.create_experiment(fallback, artifact_location=location))


def log_evaluation(
    client: Any, result: EvaluationResult, files: ModelFiles, experiment_id: str, run_name: str
) -> str:
    """A new run with the metrics, report.json and pictures; a child of the training run."""
    from mlflow.entities import Metric, Param

    tags = {
        "gram.job": "evaluate",
        "gram.model_source": files.source,
        "gram.eval_id": result.eval_id,
        "gram.eval_set": str(result.report["eval_set"]["uri"]),
    }
    if files.training_run_id:
        tags["mlflow.parentRunId"] = files.training_run_id
        tags["gram.evaluated_run_id"] = files.training_run_id
    if files.registered_name:
        tags["gram.registered_model"] = f"{files.registered_name}/{files.registered_version}"
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    run_id = str(run.info.run_id)
    params = [
        Param("eval_id", result.eval_id),
        Param("index_fingerprint", str(result.report["eval_set"]["index_fingerprint"])),
    ]
    metrics = [Metric(k, v, 0, 0) for k, v in sorted(result.metrics.items())]
    for i in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[i : i + 500], params=params if i == 0 else [])
    client.log_artifact(run_id, str(result.report_path), "evaluation")
    for picture in result.pictures:
        client.log_artifact(run_id, str(picture), "evaluation")
    client.set_terminated(run_id)
    return run_id


def tag_eval_metrics(
    client: Any, name: str, version: str, result: EvaluationResult, run_id: str
) -> None:
    """Store the metrics of one eval set on a model version (what the promotion gate reads)."""
    key = EVAL_TAG_PREFIX + result.eval_id
    client.set_model_version_tag(name, version, key, json.dumps(result.metrics, sort_keys=True))
    client.set_model_version_tag(name, version, f"{key}.run_id", run_id)


def eval_metrics_of(version: Any, eval_id: str) -> dict[str, float] | None:
    """The metrics a version was tagged with for `eval_id`, or None if never evaluated on it."""
    raw = version.tags.get(EVAL_TAG_PREFIX + eval_id)
    if not raw:
        return None
    data = json.loads(raw)
    return {str(k): float(v) for k, v in data.items() if math.isfinite(float(v))}


def _pip_requirements() -> list[str]:
    out = []
    for package in _SERVING_PACKAGES:
        try:
            version = metadata.version(package).split("+", 1)[0]
        except metadata.PackageNotFoundError:
            continue
        out.append(f"{package}=={version}")
    return out


def _signature(names: list[str]) -> Any:
    """Inputs: one optional string column per modality; outputs: embeddings (+ volume)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    columns: list[ColSpec | TensorSpec] = [ColSpec("string", n, required=False) for n in names]
    results: list[ColSpec | TensorSpec] = [
        ColSpec(Array("float"), f"{n}_embedding", required=False) for n in names
    ]
    results.append(ColSpec("double", "volume", required=False))
    inputs, outputs = Schema(columns), Schema(results)
    params = ParamSchema(
        [ParamSpec("volume", "boolean", False), ParamSpec("batch_size", "long", 16)]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def _stage_code(workdir: Path) -> list[str]:
    """Clean copies of the gram/ and pipelines/ packages this process runs, and of the
    served-input admission module as `jobs.registry.served_inputs` (shipped as code)."""
    import gram
    import pipelines
    from jobs.registry import served_inputs

    out = []
    for package in (gram, pipelines):
        source = Path(str(package.__file__)).parent
        target = workdir / "code" / source.name
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        out.append(str(target))
    jobs_code = workdir / "code" / "jobs"
    (jobs_code / "registry").mkdir(parents=True)
    (jobs_code / "__init__.py").write_text('"""What a served model needs of `jobs`."""\n')
    (jobs_code / "registry" / "__init__.py").write_text("")
    shutil.copyfile(str(served_inputs.__file__), jobs_code / "registry" / "served_inputs.py")
    out.append(str(jobs_code))
    return out


def log_pyfunc_model(
    client: Any,
    files: ModelFiles,
    name: str,
    run_id: str,
    inference: Any,
    workdir: Path,
) -> str:
    """Log the pyfunc model in run `run_id`, register it as a new version of `name`.

    MLflow logs and registers at the tracking URI of this process's environment: call it
    with the job's settings applied (`JobSettings.applied`), where that is `client`'s."""
    import mlflow
    import mlflow.pyfunc

    from gram.text import HFTokenizer
    from jobs.evaluation.embedding import load_model_files

    model = load_model_files(files.weights, files.tokenizer)
    cfg = to_dict(model.cfg)
    staged = workdir / "artifacts"
    staged.mkdir(parents=True, exist_ok=True)
    artifacts = {"weights": str(shutil.copyfile(files.weights, staged / WEIGHTS_FILE))}
    tokenizer = files.tokenizer
    if tokenizer is None and isinstance(model.tokenizer, HFTokenizer):
        tokenizer = model.tokenizer.path
    if tokenizer is not None:
        artifacts["tokenizer"] = str(shutil.copyfile(tokenizer, staged / "tokenizer.json"))
        cfg["text"].update(tokenizer="tokenizer.json", pretrained=None)
    (staged / "model_config.json").write_text(json.dumps(cfg, indent=2))
    (staged / "inference.json").write_text(json.dumps(asdict(inference), indent=2))
    artifacts["model_config"] = str(staged / "model_config.json")
    artifacts["inference"] = str(staged / "inference.json")
    if mlflow.get_tracking_uri() != client.tracking_uri:
        raise RuntimeError(
            f"MLflow points at {mlflow.get_tracking_uri()}, not {client.tracking_uri}: "
            "register within the job's settings (JobSettings.applied), in a process that "
            "has not called mlflow.set_tracking_uri"
        )
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(_PYFUNC_FILE),
            artifacts=artifacts,
            code_paths=_stage_code(workdir),
            pip_requirements=_pip_requirements(),
            signature=_signature(model.names),
            registered_model_name=name,
            await_registration_for=120,
        )
    version = info.registered_model_version
    if version is None:
        raise RuntimeError(f"MLflow did not register a version of {name!r}")
    return str(version)

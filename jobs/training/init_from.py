"""`checkpoint.init_from`: a new training run that starts from another model's weights.

    source = resolve_init_source(cfg, tracking_uri=uri, s3=s3)   # the driver, before any work
    lineage = init_weights(model, cfg, source.uri, ...)           # each worker, on a fresh start

A new run, not a resumed one (that is `checkpoint.resume_from`): the optimizer,
the learning-rate schedule, the step counter, the loss temperature(s) and the
MLflow run all start fresh; only model weights come from the source, all of them
or the towers named in `checkpoint.init_modules` (see `gram.warm_start`). The
source is a training checkpoint (folder or model.safetensors, local or s3://) or
a registered version (`models:/NAME@ALIAS` or `models:/NAME/VERSION`); an alias
is pinned to its version when the job starts, so every worker and every restart
loads the same weights. The lineage (source, its step, training run, registered
version, modules) is stored in every checkpoint of the run (`state.json`:
`progress.lineage`) and set as `gram.init_from*` tags on its MLflow run.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from gram.config import ConfigError
from gram.model import GramModel, build_model
from gram.model_config import model_config
from gram.warm_start import check_warm_start, warm_start
from gram.weights import read_metadata, read_state_dict
from jobs.registry.models import MODEL_URI_PREFIX, resolve_model
from jobs.training.config import TrainConfig
from pipelines.storage import S3Config

__all__ = ["InitSource", "init_weights", "lineage_tags", "resolve_init_source"]

TAG_PREFIX = "gram.init_from"


@dataclass(frozen=True)
class InitSource:
    """Where a run's first weights come from: `uri` pinned (a registered version by number)
    and its lineage, as stored in `state.json` (all values strings)."""

    uri: str
    lineage: dict[str, str]


def _lineage(
    uri: str, modules: list[str], tracking_uri: str, s3: S3Config, tmp: Path
) -> tuple[InitSource, Path]:
    files = resolve_model(uri, tracking_uri=tracking_uri, s3=s3, workdir=tmp)
    pinned = uri
    if files.registered_name:
        pinned = f"{MODEL_URI_PREFIX}{files.registered_name}/{files.registered_version}"
    lineage = {
        "init_from": uri,
        "pinned": pinned,
        "modules": ",".join(modules),
        "source_step": read_metadata(files.weights).get("step", ""),
        "source_run_id": files.training_run_id,
        "registered_model": files.registered_name,
        "registered_version": files.registered_version,
    }
    return InitSource(pinned, lineage), files.weights


def resolve_init_source(cfg: TrainConfig, *, tracking_uri: str, s3: S3Config) -> InitSource:
    """Find the source of `cfg.checkpoint.init_from`, pin it and check that the named modules
    fit the run's model (on the meta device: nothing is allocated). ConfigError otherwise."""
    uri, modules = cfg.checkpoint.init_from, list(cfg.checkpoint.init_modules)
    with tempfile.TemporaryDirectory(prefix="gram-init-") as tmp:
        source, weights = _lineage(uri, modules, tracking_uri, s3, Path(tmp))
        with torch.device("meta"):
            model = build_model(model_config(cfg.model, cfg.model_overrides), load_pretrained=False)
        try:
            check_warm_start(model, read_state_dict(weights), modules, source=repr(uri))
        except ValueError as exc:
            raise ConfigError(f"checkpoint.init_from: {exc}") from None
    return source


def init_weights(
    model: GramModel, cfg: TrainConfig, source: InitSource, *, tracking_uri: str, s3: S3Config
) -> int:
    """Copy the source's weights of `cfg.checkpoint.init_modules` into `model`; returns the
    number of tensors copied."""
    with tempfile.TemporaryDirectory(prefix="gram-init-") as tmp:
        files = resolve_model(source.uri, tracking_uri=tracking_uri, s3=s3, workdir=Path(tmp))
        state = read_state_dict(files.weights)
    loaded = warm_start(model, state, cfg.checkpoint.init_modules, source=repr(source.uri))
    return len(loaded)


def lineage_tags(lineage: dict[str, str]) -> dict[str, str]:
    """MLflow tags of a run's lineage: `gram.init_from` (the URI as given) and
    `gram.init_from.<field>` for the others that are set."""
    tags = {TAG_PREFIX: lineage["init_from"]}
    tags.update({f"{TAG_PREFIX}.{k}": v for k, v in lineage.items() if v and k != "init_from"})
    return tags

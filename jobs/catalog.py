"""Every job of gram-ray, in one list: what `gram` offers, what `gram submit` can run on a
cluster, and what the tests check (each job's help, each cluster job's example config).

    for job in JOBS:
        job.name, job.module, job.summary      # "train", "jobs.train", "GRAM training on ..."
    job_named("train").config_class()          # the TrainConfig that jobs/train.py declares

A job is the module `jobs/<name>.py` with a `main(argv, prog)` and the config dataclass named
here. Cluster jobs (`on_cluster`) are the ones `gram submit` sends to a Ray cluster; each has
an example config `jobs/configs/<name>.yaml`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["CLUSTER_JOBS", "JOBS", "Job", "job_named"]


@dataclass(frozen=True)
class Job:
    """One job: `python -m jobs.<name>`, also `gram <name>`."""

    name: str
    summary: str
    config: str
    """The name of the config dataclass the job's module declares (or imports)."""
    on_cluster: bool
    """`gram submit` runs it on a cluster; it has an example config jobs/configs/<name>.yaml."""

    @property
    def module(self) -> str:
        return f"jobs.{self.name}"

    def config_class(self) -> type:
        """The job's config dataclass (imports the job's module)."""
        cls: type = getattr(importlib.import_module(self.module), self.config)
        return cls


JOBS: tuple[Job, ...] = (
    Job(
        "demo",
        "generate clips, preprocess, train, evaluate, register, promote",
        "DemoConfig",
        on_cluster=False,
    ),
    Job(
        "preprocess",
        "clips in local/S3 storage -> WebDataset shards",
        "PreprocessConfig",
        on_cluster=True,
    ),
    Job(
        "inspect",
        "look at shards: status summary, or a contact sheet PNG",
        "InspectConfig",
        on_cluster=False,
    ),
    Job(
        "train",
        "GRAM training on Ray Train with global negatives",
        "TrainConfig",
        on_cluster=True,
    ),
    Job(
        "evaluate",
        "retrieval + zero-shot classification of a model",
        "EvaluateConfig",
        on_cluster=True,
    ),
    Job(
        "register",
        "log a checkpoint as an MLflow pyfunc model version",
        "RegisterConfig",
        on_cluster=True,
    ),
    Job("promote", "gated move of the 'champion' alias", "PromoteConfig", on_cluster=True),
    Job(
        "submit",
        "run any job on a Ray cluster through the Jobs API",
        "SubmitConfig",
        on_cluster=False,
    ),
)

CLUSTER_JOBS: tuple[str, ...] = tuple(job.name for job in JOBS if job.on_cluster)
"""The jobs `gram submit` can run on a cluster."""


def job_named(name: str) -> Job:
    """The job called `name` (KeyError when there is none)."""
    for job in JOBS:
        if job.name == name:
            return job
    raise KeyError(name)

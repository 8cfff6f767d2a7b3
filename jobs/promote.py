"""Promote a registered version to `champion` through a gate, or roll the champion back.

    python -m jobs.promote --config jobs/configs/promote.yaml name=gram version=candidate
    python -m jobs.promote name=gram version=7 gate.at_least.volume_t2i_r1=40
    python -m jobs.promote --rollback name=gram note="bad outputs in production"

Promotion: the candidate and the current champion are compared on the same eval
set (`eval.shards`, identified by its index fingerprint); versions not yet
evaluated on it are evaluated first (and tagged), outside the lock. Under the registry
lock (jobs/registry/lock.py) the gate decides; if it passes, the old champion gets the
alias `previous` and the candidate `champion`. Pass or refusal, the decision and
its numbers are printed, tagged on the version (`gram.promotion.*`) and appended
to the model's audit trail (`gram.audit.NNNNNN`). The gate, the aliases and the audit
trail are described in jobs/registry/promotion.py.

Rollback: `champion` goes back to the version aliased `previous`.

Exit status: 0 promoted / rolled back / already champion, 1 refused (or nothing to
roll back to), 2 configuration error, 3 lock not obtained or lost.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from jobs.common.entry import EXIT_FAILED, EXIT_OK, job_main
from jobs.common.settings import JobSettings
from jobs.evaluation.scoring import EvalConfig
from jobs.registry.lock import LockConfig, LockError, RegistryLock
from jobs.registry.models import get_version
from jobs.registry.promotion import (
    CHAMPION,
    PREVIOUS,
    GateConfig,
    Outcome,
    VersionMetrics,
    alias_version,
    decide,
    record_decision,
    record_rollback,
    version_of,
)
from jobs.training.tracking import TrackingConfig
from pipelines.storage import S3Config

__all__ = ["EXIT_LOCK", "EXIT_REFUSED", "PromoteConfig", "main", "promote", "rollback", "run"]

EXIT_REFUSED = EXIT_FAILED
EXIT_LOCK = 3
ATTEMPTS = 3
"""How often the champion may change under a promotion before it gives up."""


@dataclass
class PromoteConfig:
    """`python -m jobs.promote name=gram version=candidate [--rollback]`.

    version: the version number or alias to promote (ignored by rollback).
    note: free text stored with the decision (who/why); never put secrets here.
    output: local folder for the reports of evaluations the gate needs.
    """

    name: str = "gram"
    version: str = "candidate"
    rollback: bool = False
    note: str = ""
    output: str = "promote-output"
    eval: EvalConfig = field(default_factory=EvalConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    lock: LockConfig = field(default_factory=LockConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    s3: S3Config = field(default_factory=S3Config)


def promote(cfg: PromoteConfig, settings: JobSettings) -> Outcome:
    """Gate the version and, if it passes, make it the champion (see the module docstring)."""
    from mlflow import MlflowClient

    client = MlflowClient(settings.tracking_uri)
    candidate = get_version(client, cfg.name, cfg.version)
    version = str(candidate.version)
    metrics = VersionMetrics(
        client,
        cfg.eval,
        settings.s3,
        output=cfg.output,
        experiment=cfg.tracking.experiment,
    )
    candidate_metrics = metrics.metrics(candidate)
    for _ in range(ATTEMPTS):
        seen = alias_version(client, cfg.name, CHAMPION)
        if seen is not None and version_of(seen) != version:
            metrics.metrics(seen)  # evaluations happen outside the lock (and are tagged)
        with RegistryLock(client, cfg.name, cfg.lock, purpose=f"promote {version}") as lock:
            champion = alias_version(client, cfg.name, CHAMPION)
            before = version_of(champion)
            if before == version:
                return Outcome(
                    "noop",
                    True,
                    version,
                    before,
                    before,
                    metrics.eval_id,
                    message=f"version {version} is already the champion",
                )
            champion_metrics = metrics.known(champion) if champion is not None else None
            if champion is not None and champion_metrics is None:
                continue  # a new champion, never evaluated on this set, arrived meanwhile
            decision = decide(candidate_metrics, champion_metrics, cfg.gate)
            lock.check()
            if decision.passed:
                if before:
                    client.set_registered_model_alias(cfg.name, PREVIOUS, before)
                client.set_registered_model_alias(cfg.name, CHAMPION, version)
            seq = record_decision(
                client, cfg.name, cfg.note, version, before, decision, metrics.eval_id, lock.waited
            )
            return Outcome(
                "promote" if decision.passed else "refuse",
                decision.passed,
                version,
                before,
                version if decision.passed else before,
                metrics.eval_id,
                decision,
                audit_seq=seq,
            )
    raise RuntimeError(
        f"the champion of {cfg.name!r} changed {ATTEMPTS} times while this promotion ran: "
        "retry when the other promotions are done"
    )


def rollback(cfg: PromoteConfig, settings: JobSettings) -> Outcome:
    """Move `champion` back to the version aliased `previous` (one step), under the lock."""
    from mlflow import MlflowClient

    client = MlflowClient(settings.tracking_uri)
    with RegistryLock(client, cfg.name, cfg.lock, purpose="rollback") as lock:
        before = version_of(alias_version(client, cfg.name, CHAMPION))
        previous = alias_version(client, cfg.name, PREVIOUS)
        if previous is None:
            return Outcome(
                "rollback",
                False,
                "",
                before,
                before,
                message=f"{cfg.name!r} has no version aliased {PREVIOUS!r}: nothing to roll "
                "back to (promote a version explicitly instead)",
            )
        restored = str(previous.version)
        lock.check()
        client.set_registered_model_alias(cfg.name, CHAMPION, restored)
        client.delete_registered_model_alias(cfg.name, PREVIOUS)
        seq = record_rollback(client, cfg.name, cfg.note, restored, before)
    return Outcome("rollback", True, restored, before, restored, audit_seq=seq)


def run(cfg: PromoteConfig) -> Outcome:
    """Roll back when `cfg.rollback`, else promote `cfg.version`; print what happened.
    MLflow and S3 are reached as `JobSettings` resolves them, in every step."""
    settings = JobSettings.resolve(cfg.tracking.tracking_uri, cfg.s3)
    with settings.applied():
        outcome = rollback(cfg, settings) if cfg.rollback else promote(cfg, settings)
    print("\n".join(outcome.lines(cfg.name)))
    return outcome


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rollback",
        action="store_true",
        help="move champion back to the version aliased 'previous' (same as rollback=true)",
    )


def _apply(cfg: PromoteConfig, args: argparse.Namespace) -> PromoteConfig:
    return replace(cfg, rollback=True) if args.rollback else cfg


def _run(cfg: PromoteConfig) -> int:
    return EXIT_OK if run(cfg).passed else EXIT_REFUSED


def main(argv: Sequence[str] | None = None, prog: str = "python -m jobs.promote") -> int:
    """Command-line entry point; returns the process exit code."""
    return job_main(
        argv,
        prog=prog,
        doc=__doc__,
        config=PromoteConfig,
        run=_run,
        options=_options,
        apply=_apply,
        errors={LockError: EXIT_LOCK},
    )


if __name__ == "__main__":
    sys.exit(main())

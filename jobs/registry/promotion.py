"""Gated promotion of a registered model version to `champion`, and rollback.

    outcome = promote(cfg)     # evaluate if needed, lock, gate, move aliases, record
    outcome = rollback(cfg)    # lock, champion <- previous, record

The gate (`GateConfig`), on metrics of one eval set (same `eval_id` for both models):
    at_least[m]      candidate[m] >= value (e.g. volume_t2i_r1 >= 30)
    at_most[m]       candidate[m] <= value (e.g. volume_t2i_medr <= 2)
    max_regression[m]  candidate may be worse than the current champion by at most
                     this much: for rank metrics (names ending in medr / meanr, lower
                     is better) candidate <= champion + value, for the others
                     candidate >= champion - value. Skipped when there is no champion.
Every check is recorded with its numbers. A metric the evaluation did not produce
fails its check (a gate never passes on a missing number).

Aliases: `champion` is what serves; on promotion the replaced champion gets
`previous`; rollback moves `champion` back to `previous` and removes `previous`
(one step back; the audit trail keeps the whole history).

Audit trail: every decision is written, under the lock, as tags on the
candidate version (`gram.promotion.*`) and as one append-only entry on the
registered model (`gram.audit.NNNNNN`, JSON, numbered without gaps).
"""

from __future__ import annotations

import json
import logging
import socket
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gram.config import ConfigError
from jobs.evaluation.embedding import read_eval_set
from jobs.evaluation.scoring import EvalConfig, eval_id, evaluate_files
from jobs.registry.lock import LockConfig, RegistryLock
from jobs.registry.models import (
    eval_metrics_of,
    experiment_for,
    get_version,
    log_evaluation,
    resolve_model,
    tag_eval_metrics,
)
from jobs.training.tracking import TrackingConfig, default_tracking_uri
from pipelines.storage import S3Config

__all__ = [
    "Check",
    "Decision",
    "GateConfig",
    "Outcome",
    "PromoteConfig",
    "decide",
    "promote",
    "rollback",
]

log = logging.getLogger(__name__)

CHAMPION = "champion"
PREVIOUS = "previous"
AUDIT_PREFIX = "gram.audit."
DECISION_PREFIX = "gram.promotion."
_LOWER_IS_BETTER = ("_medr", "_meanr")
_ATTEMPTS = 3


@dataclass
class GateConfig:
    """Promotion gate; metric names as in the evaluation report (`volume_t2i_r1`, ...)."""

    at_least: dict[str, float] = field(default_factory=lambda: {"volume_t2i_r1": 0.0})
    at_most: dict[str, float] = field(default_factory=dict)
    max_regression: dict[str, float] = field(
        default_factory=lambda: {"volume_t2i_r1": 1.0, "volume_i2t_r1": 1.0}
    )

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.max_regression.items() if v < 0}
        if bad:
            raise ConfigError(f"gate.max_regression values must be >= 0, got {bad}")


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


@dataclass(frozen=True)
class Check:
    """One gate check: the candidate's `value` against `limit` (for a regression check the
    limit comes from the champion's value, `champion`). None = the number does not exist."""

    metric: str
    kind: str
    value: float | None
    limit: float | None
    passed: bool
    champion: float | None = None

    def line(self) -> str:
        """`ok   volume_t2i_r1 = 91.7 >= 90.7 (max_regression; champion 91.7)`."""
        lower = self.kind == "at_most" or (
            self.kind == "max_regression" and self.metric.endswith(_LOWER_IS_BETTER)
        )
        value = "missing" if self.value is None else f"{self.value:.4g}"
        limit = "(champion has no value)" if self.limit is None else f"{self.limit:.4g}"
        detail = f"{self.metric} = {value} {'<=' if lower else '>='} {limit} ({self.kind}"
        if self.champion is not None:
            detail += f"; champion {self.champion:.4g}"
        return f"{'ok  ' if self.passed else 'FAIL'} {detail})"

    def to_json(self) -> dict[str, Any]:
        """The check as a JSON-ready dict (for tags and the audit trail)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Decision:
    """The gate's verdict with every check."""

    checks: list[Check]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def reasons(self) -> list[str]:
        return [c.line().removeprefix("FAIL ") for c in self.checks if not c.passed]


def decide(
    candidate: dict[str, float], champion: dict[str, float] | None, gate: GateConfig
) -> Decision:
    """Apply the gate to the candidate's metrics (and the champion's, on the same eval set)."""
    checks = []
    for metric, limit in sorted(gate.at_least.items()):
        value = candidate.get(metric)
        checks.append(Check(metric, "at_least", value, limit, value is not None and value >= limit))
    for metric, limit in sorted(gate.at_most.items()):
        value = candidate.get(metric)
        checks.append(Check(metric, "at_most", value, limit, value is not None and value <= limit))
    if champion is not None:
        for metric, tolerance in sorted(gate.max_regression.items()):
            value, base = candidate.get(metric), champion.get(metric)
            if base is None:
                checks.append(Check(metric, "max_regression", value, None, False))
                continue
            lower = metric.endswith(_LOWER_IS_BETTER)
            limit = base + tolerance if lower else base - tolerance
            ok = value is not None and (value <= limit if lower else value >= limit)
            checks.append(Check(metric, "max_regression", value, limit, ok, champion=base))
    return Decision(checks)


@dataclass
class Outcome:
    """What a promotion or rollback did (printed by the job; `passed` sets the exit code)."""

    action: str
    passed: bool
    version: str
    champion_before: str
    champion_after: str
    eval_id: str = ""
    decision: Decision | None = None
    message: str = ""
    audit_seq: int = 0


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _alias(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _version_of(mv: Any | None) -> str:
    return str(mv.version) if mv is not None else ""


def _append_audit(client: Any, name: str, entry: dict[str, Any]) -> int:
    """Write the next numbered audit entry on the registered model (call under the lock)."""
    tags = client.get_registered_model(name).tags
    seqs = [int(k[len(AUDIT_PREFIX) :]) for k in tags if k.startswith(AUDIT_PREFIX)]
    seq = max(seqs, default=0) + 1
    entry = {"seq": seq, **entry}
    client.set_registered_model_tag(name, f"{AUDIT_PREFIX}{seq:06d}", json.dumps(entry))
    return seq


class _Evaluator:
    """Metrics of versions on the configured eval set, evaluating (and tagging) when missing."""

    def __init__(self, client: Any, cfg: PromoteConfig, s3: S3Config) -> None:
        self.client = client
        self.cfg = cfg
        self.s3 = s3
        self.eval_id = eval_id(read_eval_set(cfg.eval.shards, s3), cfg.eval)

    def known(self, mv: Any) -> dict[str, float] | None:
        """The version's metrics on this eval set from its tags (None: not evaluated yet)."""
        return eval_metrics_of(self.client.get_model_version(mv.name, mv.version), self.eval_id)

    def metrics(self, mv: Any) -> dict[str, float]:
        """The version's metrics on this eval set, evaluating and tagging it first if needed."""
        found = self.known(mv)
        if found is not None:
            return found
        print(f"evaluating version {mv.version} of {mv.name!r} on {self.cfg.eval.shards} ...")
        with tempfile.TemporaryDirectory(prefix="gram-promote-") as tmp:
            files = resolve_model(
                f"models:/{mv.name}/{mv.version}",
                tracking_uri=self.client.tracking_uri,
                s3=self.s3,
                workdir=Path(tmp),
            )
            out = Path(self.cfg.output) / f"{mv.name}-v{mv.version}"
            result = evaluate_files(files, self.cfg.eval, self.s3, out)
        experiment = experiment_for(self.client, files, self.cfg.tracking.experiment)
        run_id = log_evaluation(
            self.client, result, files, experiment, f"evaluate-{mv.name}-v{mv.version}"
        )
        tag_eval_metrics(self.client, mv.name, str(mv.version), result, run_id)
        return result.metrics


def _record_decision(
    client: Any,
    cfg: PromoteConfig,
    candidate: str,
    before: str,
    decision: Decision,
    ev_id: str,
    waited: float,
) -> int:
    passed = decision.passed
    checks = [c.to_json() for c in decision.checks]
    seq = _append_audit(
        client,
        cfg.name,
        {
            "action": "promote" if passed else "refuse",
            "version": candidate,
            "champion_before": before,
            "champion_after": candidate if passed else before,
            "previous_after": before if passed else "",
            "eval_id": ev_id,
            "checks": checks,
            "reasons": decision.reasons,
            "note": cfg.note,
            "time": _now(),
            "by": socket.gethostname(),
            "lock_waited_s": round(waited, 2),
        },
    )
    tags = {
        "decision": "promoted" if passed else "refused",
        "reason": "all checks passed" if passed else "; ".join(decision.reasons),
        "checks": json.dumps(checks),
        "eval_id": ev_id,
        "champion_before": before or "none",
        "time": _now(),
        "audit": f"{seq:06d}",
    }
    for key, value in tags.items():
        client.set_model_version_tag(cfg.name, candidate, DECISION_PREFIX + key, value)
    if passed and before:
        client.set_model_version_tag(
            cfg.name, before, DECISION_PREFIX + "replaced_by", f"{candidate} ({_now()})"
        )
    return seq


def promote(cfg: PromoteConfig) -> Outcome:
    """Gate the version and, if it passes, make it the champion (see the module docstring)."""
    from mlflow import MlflowClient

    client = MlflowClient(default_tracking_uri(cfg.tracking.tracking_uri))
    s3 = cfg.s3.resolved()
    candidate = get_version(client, cfg.name, cfg.version)
    version = str(candidate.version)
    evaluator = _Evaluator(client, cfg, s3)
    candidate_metrics = evaluator.metrics(candidate)
    for _ in range(_ATTEMPTS):
        seen = _alias(client, cfg.name, CHAMPION)
        if seen is not None and _version_of(seen) != version:
            evaluator.metrics(seen)  # evaluations happen outside the lock (and are tagged)
        with RegistryLock(client, cfg.name, cfg.lock, purpose=f"promote {version}") as lock:
            champion = _alias(client, cfg.name, CHAMPION)
            before = _version_of(champion)
            if before == version:
                return Outcome(
                    "noop",
                    True,
                    version,
                    before,
                    before,
                    evaluator.eval_id,
                    message=f"version {version} is already the champion",
                )
            champion_metrics = evaluator.known(champion) if champion is not None else None
            if champion is not None and champion_metrics is None:
                continue  # a new champion, never evaluated on this set, arrived meanwhile
            decision = decide(candidate_metrics, champion_metrics, cfg.gate)
            lock.check()
            if decision.passed:
                if before:
                    client.set_registered_model_alias(cfg.name, PREVIOUS, before)
                client.set_registered_model_alias(cfg.name, CHAMPION, version)
            seq = _record_decision(
                client, cfg, version, before, decision, evaluator.eval_id, lock.waited
            )
            return Outcome(
                "promote" if decision.passed else "refuse",
                decision.passed,
                version,
                before,
                version if decision.passed else before,
                evaluator.eval_id,
                decision,
                audit_seq=seq,
            )
    raise RuntimeError(
        f"the champion of {cfg.name!r} changed {_ATTEMPTS} times while this promotion ran: "
        "retry when the other promotions are done"
    )


def rollback(cfg: PromoteConfig) -> Outcome:
    """Move `champion` back to the version aliased `previous` (one step), under the lock."""
    from mlflow import MlflowClient

    client = MlflowClient(default_tracking_uri(cfg.tracking.tracking_uri))
    with RegistryLock(client, cfg.name, cfg.lock, purpose="rollback") as lock:
        champion = _alias(client, cfg.name, CHAMPION)
        previous = _alias(client, cfg.name, PREVIOUS)
        before = _version_of(champion)
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
        seq = _append_audit(
            client,
            cfg.name,
            {
                "action": "rollback",
                "version": restored,
                "champion_before": before,
                "champion_after": restored,
                "previous_after": "",
                "note": cfg.note,
                "time": _now(),
                "by": socket.gethostname(),
            },
        )
        client.set_model_version_tag(
            cfg.name, restored, DECISION_PREFIX + "decision", f"restored by rollback ({_now()})"
        )
        if before:
            client.set_model_version_tag(
                cfg.name, before, DECISION_PREFIX + "rolled_back", f"{_now()} (audit {seq:06d})"
            )
    return Outcome("rollback", True, restored, before, restored, audit_seq=seq)

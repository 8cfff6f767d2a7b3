"""The parts of a gated promotion to `champion` and of a rollback: the gate, the metrics it
compares, the aliases and the audit trail (`jobs/promote.py` puts them together under the
registry lock).

    decision = decide(candidate_metrics, champion_metrics, gate)   # every check, with numbers
    seq = record_decision(client, name, note, candidate, before, decision, eval_id, waited)
    seq = record_rollback(client, name, note, restored, before)

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
import socket
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gram.config import ConfigError
from jobs.evaluation.embedding import read_eval_set
from jobs.evaluation.scoring import EvalConfig, eval_id, evaluate_files
from jobs.registry.models import (
    eval_metrics_of,
    experiment_for,
    log_evaluation,
    resolve_model,
    tag_eval_metrics,
)
from pipelines.storage import S3Config

__all__ = [
    "CHAMPION",
    "PREVIOUS",
    "Check",
    "Decision",
    "GateConfig",
    "Outcome",
    "VersionMetrics",
    "alias_version",
    "decide",
    "record_decision",
    "record_rollback",
    "version_of",
]

CHAMPION = "champion"
PREVIOUS = "previous"
AUDIT_PREFIX = "gram.audit."
DECISION_PREFIX = "gram.promotion."
_LOWER_IS_BETTER = ("_medr", "_meanr")


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
    """What a promotion or rollback did (`lines()`: what the job prints; `passed` sets the
    exit code)."""

    action: str
    passed: bool
    version: str
    champion_before: str
    champion_after: str
    eval_id: str = ""
    decision: Decision | None = None
    message: str = ""
    audit_seq: int = 0

    def lines(self, name: str) -> list[str]:
        """The decision with every check and number, as the job prints it (`name`: the
        registered model)."""
        if self.action == "noop":
            return [self.message]
        if self.action == "rollback":
            if not self.passed:
                return [f"ROLLBACK REFUSED: {self.message}"]
            return [
                f"ROLLED BACK {name!r}: champion is version {self.champion_after} again "
                f"(was {self.champion_before}); audit entry {self.audit_seq}"
            ]
        verdict = "PROMOTED" if self.passed else "REFUSED"
        out = [
            f"{verdict} version {self.version} of {name!r} (champion before: "
            f"{self.champion_before or 'none'}, after: {self.champion_after or 'none'}) on "
            f"eval set {self.eval_id}; audit entry {self.audit_seq}"
        ]
        if self.decision is not None:
            out += [f"  {check.line()}" for check in self.decision.checks]
            if not self.passed:
                out.append("reason: " + "; ".join(self.decision.reasons))
        return out


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def alias_version(client: Any, name: str, alias: str) -> Any | None:
    """The version `name@alias` points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def version_of(mv: Any | None) -> str:
    """The version number of `mv` as a string, '' for None."""
    return str(mv.version) if mv is not None else ""


def _append_audit(client: Any, name: str, entry: dict[str, Any]) -> int:
    """Write the next numbered audit entry on the registered model (call under the lock)."""
    tags = client.get_registered_model(name).tags
    seqs = [int(k[len(AUDIT_PREFIX) :]) for k in tags if k.startswith(AUDIT_PREFIX)]
    seq = max(seqs, default=0) + 1
    entry = {"seq": seq, **entry}
    client.set_registered_model_tag(name, f"{AUDIT_PREFIX}{seq:06d}", json.dumps(entry))
    return seq


class VersionMetrics:
    """Metrics of registered versions on one eval set, evaluating (and tagging) when missing.

    Evaluations write their reports under `output` and log an evaluation run in the training
    run's experiment (else `experiment`).
    """

    def __init__(
        self, client: Any, config: EvalConfig, s3: S3Config, *, output: str, experiment: str
    ) -> None:
        self.client = client
        self.config = config
        self.s3 = s3
        self.output = output
        self.experiment = experiment
        self.eval_id = eval_id(read_eval_set(config.shards, s3), config)

    def known(self, mv: Any) -> dict[str, float] | None:
        """The version's metrics on this eval set from its tags (None: not evaluated yet)."""
        return eval_metrics_of(self.client.get_model_version(mv.name, mv.version), self.eval_id)

    def metrics(self, mv: Any) -> dict[str, float]:
        """The version's metrics on this eval set, evaluating and tagging it first if needed."""
        found = self.known(mv)
        if found is not None:
            return found
        print(f"evaluating version {mv.version} of {mv.name!r} on {self.config.shards} ...")
        with tempfile.TemporaryDirectory(prefix="gram-promote-") as tmp:
            files = resolve_model(
                f"models:/{mv.name}/{mv.version}",
                tracking_uri=self.client.tracking_uri,
                s3=self.s3,
                workdir=Path(tmp),
            )
            out = Path(self.output) / f"{mv.name}-v{mv.version}"
            result = evaluate_files(files, self.config, self.s3, out)
        experiment = experiment_for(self.client, files, self.experiment)
        run_id = log_evaluation(
            self.client, result, files, experiment, f"evaluate-{mv.name}-v{mv.version}"
        )
        tag_eval_metrics(self.client, mv.name, str(mv.version), result, run_id)
        return result.metrics


def record_decision(
    client: Any,
    name: str,
    note: str,
    candidate: str,
    before: str,
    decision: Decision,
    ev_id: str,
    waited: float,
) -> int:
    """Write the gate's decision on `candidate` (call under the lock): an audit entry on the
    registered model and `gram.promotion.*` tags on the version (and on the replaced
    champion); returns the audit entry's number."""
    passed = decision.passed
    checks = [c.to_json() for c in decision.checks]
    seq = _append_audit(
        client,
        name,
        {
            "action": "promote" if passed else "refuse",
            "version": candidate,
            "champion_before": before,
            "champion_after": candidate if passed else before,
            "previous_after": before if passed else "",
            "eval_id": ev_id,
            "checks": checks,
            "reasons": decision.reasons,
            "note": note,
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
        client.set_model_version_tag(name, candidate, DECISION_PREFIX + key, value)
    if passed and before:
        client.set_model_version_tag(
            name, before, DECISION_PREFIX + "replaced_by", f"{candidate} ({_now()})"
        )
    return seq


def record_rollback(client: Any, name: str, note: str, restored: str, before: str) -> int:
    """Write a rollback from `before` to `restored` (call under the lock): an audit entry and
    the versions' tags; returns the audit entry's number."""
    seq = _append_audit(
        client,
        name,
        {
            "action": "rollback",
            "version": restored,
            "champion_before": before,
            "champion_after": restored,
            "previous_after": "",
            "note": note,
            "time": _now(),
            "by": socket.gethostname(),
        },
    )
    client.set_model_version_tag(
        name, restored, DECISION_PREFIX + "decision", f"restored by rollback ({_now()})"
    )
    if before:
        client.set_model_version_tag(
            name, before, DECISION_PREFIX + "rolled_back", f"{_now()} (audit {seq:06d})"
        )
    return seq

"""Promote a registered version to `champion` through a gate, or roll the champion back.

    python -m jobs.promote --config jobs/configs/promote.yaml name=gram version=candidate
    python -m jobs.promote name=gram version=7 gate.at_least.volume_t2i_r1=40
    python -m jobs.promote --rollback name=gram note="bad outputs in production"

Promotion: the candidate and the current champion are compared on the same eval
set (`eval.shards`, identified by its index fingerprint); versions not yet
evaluated on it are evaluated first (and tagged). Under the registry lock
(jobs/registry/lock.py) the gate decides; if it passes, the old champion gets the
alias `previous` and the candidate `champion`. Pass or refusal, the decision and
its numbers are printed, tagged on the version (`gram.promotion.*`) and appended
to the model's audit trail (`gram.audit.NNNNNN`).

Rollback: `champion` goes back to the version aliased `previous`.

Exit status: 0 promoted / rolled back / already champion, 1 refused (or nothing to
roll back to), 2 configuration error, 3 lock not obtained or lost.
"""

from __future__ import annotations

import argparse
import logging
import sys

from gram.config import ConfigError, load_config
from jobs.cluster.secrets import install_log_scrubber
from jobs.common.entry import add_config_arguments, config_help
from jobs.registry.lock import LockError
from jobs.registry.promotion import Outcome, PromoteConfig, promote, rollback

EXIT_REFUSED = 1
EXIT_CONFIG = 2
EXIT_LOCK = 3


def report(outcome: Outcome, name: str) -> None:
    """Print the decision with every check and number."""
    if outcome.action == "noop":
        print(outcome.message)
        return
    if outcome.action == "rollback":
        if outcome.passed:
            print(
                f"ROLLED BACK {name!r}: champion is version {outcome.champion_after} again "
                f"(was {outcome.champion_before}); audit entry {outcome.audit_seq}"
            )
        else:
            print(f"ROLLBACK REFUSED: {outcome.message}")
        return
    verdict = "PROMOTED" if outcome.passed else "REFUSED"
    champion = outcome.champion_before or "none"
    print(
        f"{verdict} version {outcome.version} of {name!r} (champion before: {champion}, "
        f"after: {outcome.champion_after or 'none'}) on eval set {outcome.eval_id}; "
        f"audit entry {outcome.audit_seq}"
    )
    if outcome.decision is not None:
        for check in outcome.decision.checks:
            print(f"  {check.line()}")
        if not outcome.passed:
            print("reason: " + "; ".join(outcome.decision.reasons))


def run(cfg: PromoteConfig) -> Outcome:
    """Roll back when `cfg.rollback`, else promote `cfg.version`."""
    outcome = rollback(cfg) if cfg.rollback else promote(cfg)
    report(outcome, cfg.name)
    return outcome


def build_parser(prog: str = "python -m jobs.promote") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=config_help(PromoteConfig),
    )
    parser.add_argument(
        "--rollback",
        action="store_true",
        help="move champion back to the version aliased 'previous' (same as rollback=true)",
    )
    add_config_arguments(parser)
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m jobs.promote") -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    install_log_scrubber()
    overrides = [*args.overrides, *(["rollback=true"] if args.rollback else [])]
    try:
        outcome = run(load_config(PromoteConfig, args.config, overrides))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except LockError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_LOCK
    return 0 if outcome.passed else EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())

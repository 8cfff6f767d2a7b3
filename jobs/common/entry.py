"""The `main` every job shares: its command line, logging, log scrubber and exit codes.

A job file declares its config dataclass and a `run`, and hands both to `job_main`:

    def main(argv: Sequence[str] | None = None, prog: str = "python -m jobs.train") -> int:
        return job_main(argv, prog=prog, doc=__doc__, config=TrainConfig, run=_run)

so that every job reads `--config FILE` (YAML or JSON) and trailing `key=value` overrides
checked against its typed config (a wrong key names itself and the closest valid one),
lists every key with its default in `--help`, logs in one format with every known secret
value masked, and exits with the same codes:

    0  done (EXIT_OK)
    1  the work ran and failed, or was refused (EXIT_FAILED)
    2  bad options, config or input: the message says what to change (EXIT_USAGE)

A job may add options of its own (`options`, applied to the loaded config by `apply`) and map
its own exceptions to exit codes (`errors`, e.g. promotion's lock errors to 3).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from gram.config import ConfigError, load_config
from jobs.cluster.secrets import install_log_scrubber

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "add_config_arguments",
    "config_help",
    "job_main",
    "job_parser",
    "setup_logging",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

C = TypeVar("C")


_LIBRARY_LOGGERS = ("botocore", "boto3", "urllib3", "s3transfer")


def setup_logging() -> None:
    """INFO and above to stderr in the jobs' one format, with secret values masked."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    for chatty in _LIBRARY_LOGGERS:  # their INFO lines say nothing a user acts on
        logging.getLogger(chatty).setLevel(logging.WARNING)
    install_log_scrubber()


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config FILE` and trailing `key=value` overrides (validated against the typed config)."""
    parser.add_argument("--config", metavar="FILE", help="YAML/JSON config file (keys below)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override any config key, e.g. optim.lr=3e-4 scaling.workers=4",
    )


def _defaults(cls: type[Any], prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            rows += _defaults(tp, f"{name}.")
            continue
        if not f.repr:  # credentials: never shown, not even their defaults
            rows.append((name, "(from the environment / AWS chain; never shown)"))
            continue
        if f.default is not dataclasses.MISSING:
            value: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            rows.append((name, "(required)"))
            continue
        rows.append((name, str(value) if isinstance(value, tuple) else json.dumps(value)))
    return rows


def config_help(cls: type[Any]) -> str:
    """Every config key with its default, one per line, for an argparse epilog."""
    rows = _defaults(cls)
    width = max(len(k) for k, _ in rows)
    lines = [f"  {k:<{width}}  {v}" for k, v in rows]
    return "config keys (default):\n" + "\n".join(lines)


def job_parser(
    prog: str,
    doc: str,
    config: type[Any],
    options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.ArgumentParser:
    """The job's command line: its docstring, its own `options`, `--config`, overrides, and
    every config key with its default after the options."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=doc,
        epilog=config_help(config),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if options is not None:
        options(parser)
    add_config_arguments(parser)
    return parser


def job_main(
    argv: Sequence[str] | None,
    *,
    prog: str,
    doc: str,
    config: type[C],
    run: Callable[[C], int],
    options: Callable[[argparse.ArgumentParser], None] | None = None,
    apply: Callable[[C, argparse.Namespace], C] | None = None,
    errors: Mapping[type[Exception], int] | None = None,
) -> int:
    """Parse the command line, set up logging, load the config and `run` it; returns the exit
    code: `run`'s own, EXIT_USAGE for a ConfigError (printed as `error: ...`), or the code
    `errors` gives the exception raised (printed the same way)."""
    # Intermixed: a job's own options may stand between its positionals and the overrides
    # (`gram inspect SHARDS --out sheet.png s3.endpoint_url=...`).
    args = job_parser(prog, doc, config, options).parse_intermixed_args(argv)
    setup_logging()
    handled: dict[type[Exception], int] = {ConfigError: EXIT_USAGE, **(errors or {})}
    try:
        cfg = load_config(config, args.config, args.overrides)
        if apply is not None:
            cfg = apply(cfg, args)
        return run(cfg)
    except tuple(handled) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return next(code for kind, code in handled.items() if isinstance(exc, kind))

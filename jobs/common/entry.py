"""Shared command-line plumbing: `--config FILE`, `key=value` overrides, defaults in `--help`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import typing
from pathlib import Path
from typing import Any

__all__ = ["add_config_arguments", "config_help", "git_commit"]


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


def git_commit(folder: str | Path | None = None) -> str:
    """The git commit of the project checkout, or '' outside a git checkout."""
    where = Path(folder) if folder else Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""

"""The git commit of a checkout, for provenance tags (training runs, model versions, jobs)."""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["git_commit"]

_PROJECT = Path(__file__).resolve().parents[2]


def _git(folder: Path, *args: str) -> str | None:
    """Output of `git -C folder ARGS`, stripped; None when git fails or is missing."""
    try:
        out = subprocess.run(
            ["git", "-C", str(folder), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit(folder: str | Path | None = None, *, dirty: bool = False) -> str:
    """The commit checked out in `folder` (default: this project's checkout), or '' outside a
    git checkout. With `dirty`, `-dirty` is appended when tracked files have uncommitted
    changes (and '' is returned when that cannot be told)."""
    where = Path(folder) if folder else _PROJECT
    head = _git(where, "rev-parse", "HEAD") or ""
    if not head or not dirty:
        return head
    changes = _git(where, "status", "--porcelain", "--untracked-files=no")
    if changes is None:
        return ""
    return f"{head}-dirty" if changes else head

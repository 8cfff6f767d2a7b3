"""What every job process prints: clean logs when output is not a terminal.

`setup()` runs when the `jobs` package is imported, so it applies in every process
that runs job code: the job itself, the Ray tasks and Ray Train workers it starts
(they import `jobs` to run their functions) and any process those start.

- MLflow draws tqdm progress bars when it downloads or uploads artifacts (loading a
  registered model, logging a model). On a terminal they redraw one line; in a log file
  or CI output every redraw is appended, thousands of characters per line. When stdout
  is not a terminal, `MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false` turns them off for this
  process and its children. A value the user exported is left as it is.
- A Ray cluster started by a job (no `RAY_ADDRESS`) has token authentication on by
  default, and Ray says so with a warning on every start. The job says it once per user
  instead, in the project's words (`RAY_AUTH_NOTICE`), and remembers that it did in
  `$XDG_CACHE_HOME/gram/ray-token-notice` (default `~/.cache/gram/`). Exporting
  `RAY_AUTH_MODE` (`token` or `disabled`) is a deliberate choice: Ray says nothing then,
  and neither does the job.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TextIO

__all__ = [
    "PROGRESS_BAR_ENV",
    "RAY_AUTH_NOTICE",
    "install_ray_token_notice",
    "notice_marker",
    "quiet_progress_bars",
    "setup",
]

PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
"""MLflow 3's switch for its artifact upload/download progress bars (default on)."""

RAY_AUTH_NOTICE = (
    "note: the Ray cluster this job started has token authentication on (Ray's default). "
    "Clients of it (`ray status`, `ray job submit`, `gram submit`) need RAY_AUTH_MODE=token "
    "and the token Ray keeps in ~/.ray/auth_token. Export RAY_AUTH_MODE=token to keep it "
    "on, or RAY_AUTH_MODE=disabled for a cluster only you can reach. Shown once."
)

_RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
_RAY_AUTH_WARNING = "Token authentication is enabled for this Ray cluster"

log = logging.getLogger("gram.ray")


def quiet_progress_bars(stream: TextIO | None = None) -> bool:
    """Turn MLflow's artifact progress bars off unless `stream` (stdout) is a terminal.

    Returns True when the bars are off after the call. An exported value is kept.
    """
    out = sys.stdout if stream is None else stream
    if PROGRESS_BAR_ENV not in os.environ:
        try:
            terminal = out.isatty()
        except (AttributeError, ValueError):  # closed or replaced streams
            terminal = False
        if not terminal:
            os.environ[PROGRESS_BAR_ENV] = "false"
    return os.environ.get(PROGRESS_BAR_ENV, "true").strip().lower() in ("false", "0")


def notice_marker() -> Path:
    """The file whose presence means the Ray token notice was shown to this user."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "gram" / "ray-token-notice"


class _RayTokenNotice(logging.Filter):
    """Drops Ray's token-auth warning; says `RAY_AUTH_NOTICE` instead, once per user."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(_RAY_AUTH_WARNING):
            return True
        marker = notice_marker()
        if not marker.exists():
            log.warning(RAY_AUTH_NOTICE)
            try:
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(RAY_AUTH_NOTICE + "\n", encoding="utf-8")
            except OSError:  # a read-only home: the notice comes again next time
                pass
        return False


def install_ray_token_notice() -> None:
    """Put the notice filter on Ray's authentication logger (idempotent; imports no Ray)."""
    target = logging.getLogger(_RAY_AUTH_LOGGER)
    if not any(isinstance(f, _RayTokenNotice) for f in target.filters):
        target.addFilter(_RayTokenNotice())


def setup() -> None:
    """Both of the above, for this process (see the module docstring)."""
    quiet_progress_bars()
    install_ray_token_notice()

"""Credentials: which variables hold them, and how their values are kept out of everything that
is recorded or shown. The one place for both.

Keeping them out:
- values under secret-looking keys are replaced before anything is recorded (`redact`:
  MLflow params and tags, checkpoints' `state.json`, evaluation reports);
- secret values are replaced by `***` wherever they appear in text (`mask` for given values,
  `scrub` for the ones this process knows, `install_log_scrubber` for every log record).

Handing them over: credentials never go into a Ray runtime env (Ray's runtime-env agent
writes those to its log files, and the dashboard shows them). A driver resolves them once
and passes them to its workers with the work, as arguments (`jobs.common.settings.JobSettings`);
clusters can instead give their nodes the credentials (Kubernetes Secrets, instance roles).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "NOT_SECRET_VARS",
    "REDACTED",
    "SECRET_ENV_VARS",
    "TOKEN_FILE_SOURCE",
    "WORKER_CREDENTIAL_VARS",
    "install_log_scrubber",
    "is_secret_name",
    "mask",
    "read_token_file",
    "redact",
    "scrub",
    "secret_values",
    "token_file_value",
]

REDACTED = "***"

SECRET_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "RAY_AUTH_TOKEN",
)
"""Variables whose values are secrets: masked in every log line and printed output, and never
put in a job's entrypoint, metadata or runtime env. (Any variable whose name looks secret,
`is_secret_name`, is treated the same way when a job is submitted.)"""

WORKER_CREDENTIAL_VARS = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
"""MLflow's credentials, which a training worker needs to log and S3Config cannot carry (handed
over in `JobSettings.mlflow_credentials`). The username is a credential to hand over but not a
secret to mask: it names an account, and masking a short name would blot out ordinary words in
the logs."""

NOT_SECRET_VARS = frozenset(
    {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "SSH_AUTH_SOCK", "XAUTHORITY", "GIT_ASKPASS"}
)
"""Names that look secret (`is_secret_name`) but hold no secret: their values may be shown."""

TOKEN_FILE_SOURCE = "the file at RAY_AUTH_TOKEN_PATH"  # noqa: S105 (where a value comes from)
_MIN_MASKED_CHARS = 4
_SECRET_NAME = re.compile(
    r"(secret|passw(or)?d|token|credential|access_key|api_key|private_key|auth)", re.IGNORECASE
)


def is_secret_name(name: str) -> bool:
    """True for keys that hold credentials by their name (e.g. `aws_secret_access_key`)."""
    return bool(_SECRET_NAME.search(name))


def redact(data: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a nested mapping with every value under a secret-looking key replaced."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if is_secret_name(str(key)) and value not in (None, ""):
            out[key] = REDACTED
        elif isinstance(value, Mapping):
            out[key] = redact(value)
        else:
            out[key] = value
    return out


def read_token_file(path: str | Path) -> str:
    """The Ray auth token stored in the file at `path` (`~` expanded), without surrounding
    white space; raises OSError when the file cannot be read."""
    return Path(path).expanduser().read_text(encoding="utf-8", errors="replace").strip()


def token_file_value(environ: Mapping[str, str]) -> str:
    """The token in the file named by RAY_AUTH_TOKEN_PATH, or '' (no such file)."""
    path = environ.get("RAY_AUTH_TOKEN_PATH", "")
    if not path or not Path(path).expanduser().is_file():
        return ""
    try:
        return read_token_file(path)
    except OSError:
        return ""


def secret_values(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The secret values known to this process (`environ`: default os.environ), keyed by where
    each comes from: the set SECRET_ENV_VARS and the Ray token file. Values shorter than 4
    characters are left out (masking them would blot out ordinary text)."""
    environ = os.environ if environ is None else environ
    found = {name: environ.get(name, "") for name in SECRET_ENV_VARS}
    found[TOKEN_FILE_SOURCE] = token_file_value(environ)
    return {k: v for k, v in found.items() if len(v) >= _MIN_MASKED_CHARS}


def mask(text: str, values: Iterable[str]) -> str:
    """`text` with every one of `values` replaced by `***` (longest first)."""
    for value in sorted(set(values), key=len, reverse=True):
        if value:
            text = text.replace(value, REDACTED)
    return text


def scrub(text: str) -> str:
    """`text` with every secret value this process knows (`secret_values`) masked."""
    return mask(text, secret_values().values())


class _ScrubbingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def install_log_scrubber() -> None:
    """Scrub secret values from every record that reaches the root logger's handlers."""
    handlers = list(logging.getLogger().handlers)
    if logging.lastResort is not None:
        handlers.append(logging.lastResort)
    for handler in handlers:
        if not any(isinstance(f, _ScrubbingFilter) for f in handler.filters):
            handler.addFilter(_ScrubbingFilter())

"""Keep credentials out of logs, MLflow params/tags, reports and checkpoints.

Two defences: values under secret-looking keys are replaced before anything is
recorded (`redact`), and the values of known credential variables in the
environment are scrubbed from every log line and report text (`scrub`,
`install_log_scrubber`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["REDACTED", "install_log_scrubber", "is_secret_name", "redact", "scrub", "secret_values"]

REDACTED = "***"
SECRET_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "RAY_AUTH_TOKEN",
)
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


def secret_values() -> list[str]:
    """Current values of the known credential variables (at least 4 characters long)."""
    vals = {os.environ.get(name, "") for name in SECRET_ENV_VARS}
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if token_path and os.path.isfile(token_path):
        try:
            with open(token_path, encoding="utf-8") as fh:
                vals.add(fh.read().strip())
        except OSError:
            pass
    return sorted((v for v in vals if len(v) >= 4), key=len, reverse=True)


def scrub(text: str) -> str:
    """`text` with every known secret value replaced by `***`."""
    for value in secret_values():
        text = text.replace(value, REDACTED)
    return text


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

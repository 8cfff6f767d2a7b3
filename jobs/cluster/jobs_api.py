"""Talking to a Ray cluster's Jobs API safely: address, auth token, client, log following.

    address = resolve_address("http://127.0.0.1:8265", os.environ)
    token = find_token("", os.environ)              # None when no token is configured
    require_token(address, token)                   # fails clearly if the cluster needs one
    client = connect(address, token)                # a ray.job_submission.JobSubmissionClient
    info = follow(client, submission_id, sys.stdout, sys.stderr, secret_values)

Token lookup follows Ray's order (RAY_AUTH_TOKEN, then the file at RAY_AUTH_TOKEN_PATH,
then ~/.ray/auth_token), with an explicit file path first. The token is sent as a bearer
header only; its value never appears in a repr, a message or the logs we print. Every
failure is a `JobsApiError` whose message says how to fix it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from jobs.cluster.secrets import (
    NOT_SECRET_VARS,
    SECRET_ENV_VARS,
    TOKEN_FILE_SOURCE,
    is_secret_name,
    mask,
    read_token_file,
    token_file_value,
)
from jobs.common.entry import EXIT_USAGE

__all__ = [
    "EXIT_CLUSTER",
    "EXIT_USAGE",
    "JobsApiError",
    "Token",
    "client_secrets",
    "cluster_auth_mode",
    "connect",
    "find_token",
    "follow",
    "has_url_password",
    "require_token",
    "resolve_address",
    "translate_error",
]

EXIT_CLUSTER = 3
TOKEN_DOCS = "infra/README.md#tokens"  # noqa: S105 (a documentation link, not a token)

_MIN_SECRET_CHARS = 6
"""Shorter values are not looked for in what is sent (they would match by chance)."""
_URL_WITH_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@")
_FETCH_HINT = (
    "KubeRay: kubectl get secret gram-ray-auth -o jsonpath='{.data.auth_token}' | base64 -d "
    "> ~/.ray/gram-token; compose: infra/compose/secrets/ray_auth_token; `ray start` or "
    "cluster launcher: ~/.ray/auth_token on the head node (`ray get-auth-token` there)"
)


class JobsApiError(RuntimeError):
    """A request to the Jobs API cannot be made or was refused; `exit_code` is for the CLI."""

    def __init__(self, message: str, exit_code: int = EXIT_CLUSTER) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Token:
    """The cluster auth token and where it came from (the value never appears in repr)."""

    value: str = field(repr=False)
    source: str
    path: str = ""


def has_url_password(text: str) -> bool:
    """True when `text` holds a URL with a password in it (scheme://user:password@host)."""
    return bool(_URL_WITH_PASSWORD.search(text))


def client_secrets(environ: Mapping[str, str]) -> dict[str, str]:
    """Values that must not leave this machine unasked: credential variables and the token file.

    Keyed by where each value comes from, e.g. `AWS_SECRET_ACCESS_KEY`.
    """
    found = {
        name: value
        for name, value in environ.items()
        if name not in NOT_SECRET_VARS
        and len(value) >= _MIN_SECRET_CHARS
        and (name in SECRET_ENV_VARS or is_secret_name(name))
    }
    token = token_file_value(environ)
    if len(token) >= _MIN_SECRET_CHARS:
        found[TOKEN_FILE_SOURCE] = token
    return found


def resolve_address(address: str, environ: Mapping[str, str]) -> str:
    """The Jobs API URL: `address`, else $RAY_API_SERVER_ADDRESS, else an http(s) $RAY_ADDRESS."""
    source = "--address"
    if not address:
        for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            candidate = environ.get(name, "")
            if candidate.startswith(("http://", "https://")):
                address, source = candidate, f"${name}"
                break
    if not address:
        raise JobsApiError(
            "no Ray Jobs API address: pass --address http://HEAD:8265 (the dashboard URL). "
            "KubeRay: kubectl port-forward svc/<cluster>-head-svc 8265:8265, then "
            "--address http://127.0.0.1:8265; compose: http://127.0.0.1:8265",
            EXIT_USAGE,
        )
    parsed = urllib.parse.urlsplit(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise JobsApiError(
            f"{source} {address!r} is not a Jobs API URL: use the dashboard's http(s) URL, "
            "e.g. http://127.0.0.1:8265 (not the GCS address HOST:6379, not ray://)",
            EXIT_USAGE,
        )
    if parsed.username or parsed.password:
        raise JobsApiError(
            f"{source} must not carry credentials; the cluster token is read from "
            f"RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN (see {TOKEN_DOCS})",
            EXIT_USAGE,
        )
    return address.rstrip("/")


def _read_token(path: str, source: str) -> Token:
    p = Path(path).expanduser()
    try:
        value = read_token_file(p)
    except OSError as exc:
        raise JobsApiError(
            f"{source}: cannot read the token file {str(p)!r} ({exc.strerror}); point it at "
            f"the cluster's token ({_FETCH_HINT})",
            EXIT_USAGE,
        ) from None
    if not value:
        raise JobsApiError(f"{source}: the token file {str(p)!r} is empty", EXIT_USAGE)
    return Token(value=value, source=f"{source} ({p})", path=str(p))


def find_token(token_path: str, environ: Mapping[str, str]) -> Token | None:
    """The token: `token_path`, else $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if token_path:
        return _read_token(token_path, "--token-path")
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return Token(value=environ["RAY_AUTH_TOKEN"].strip(), source="$RAY_AUTH_TOKEN")
    if environ.get("RAY_AUTH_TOKEN_PATH", ""):
        return _read_token(environ["RAY_AUTH_TOKEN_PATH"], "$RAY_AUTH_TOKEN_PATH")
    default = Path(environ.get("HOME") or Path.home()) / ".ray" / "auth_token"
    if default.is_file() and read_token_file(default):
        return _read_token(str(default), "~/.ray/auth_token")
    return None


def missing_token_message(address: str) -> str:
    """What to do when the cluster needs a token and this client has none."""
    return (
        f"the Ray cluster at {address} requires an auth token and none was found. Export "
        "RAY_AUTH_TOKEN_PATH=<file holding the token> (or pass --token-path FILE; "
        f"RAY_AUTH_TOKEN and ~/.ray/auth_token work too). Get it: {_FETCH_HINT}. "
        f"See {TOKEN_DOCS}"
    )


def rejected_token_message(address: str, token: Token | None) -> str:
    """What to do when the cluster refuses the token this client sent."""
    source = token.source if token else "(none sent)"
    return (
        f"the Ray cluster at {address} rejected the auth token from {source}: it is not this "
        f"cluster's token (rotated, or another cluster's). Fetch the current one: "
        f"{_FETCH_HINT}. See {TOKEN_DOCS}"
    )


def cluster_auth_mode(address: str, timeout: float = 15.0) -> str:
    """`token`, `disabled` or `unknown` (Ray < 2.52), from the cluster's public endpoint."""
    url = f"{address}/api/authentication_mode"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (http/https only)
            body = json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return "unknown"
        raise JobsApiError(f"the Ray Jobs API at {address} answered {exc.code} to {url}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise JobsApiError(
            f"cannot reach the Ray Jobs API at {address} ({reason}). Is the cluster up and its "
            "dashboard port reachable from here? KubeRay: kubectl port-forward "
            "svc/<cluster>-head-svc 8265:8265; cluster launcher: ray dashboard "
            "infra/cluster/aws.yaml; compose: docker compose -f infra/compose/compose.yaml ps"
        ) from None
    except ValueError:
        return "unknown"
    mode = body.get("authentication_mode") if isinstance(body, dict) else None
    return str(mode) if mode else "unknown"


def require_token(address: str, token: Token | None) -> Token | None:
    """The token to send: fails when the cluster needs one we lack, None when it needs none."""
    mode = cluster_auth_mode(address)
    if mode == "token" and token is None:
        raise JobsApiError(missing_token_message(address))
    return None if mode == "disabled" else token


@contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def connect(address: str, token: Token | None) -> Any:
    """A JobSubmissionClient for exactly `address`, sending `token` as a bearer header.

    Ray lets $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS override the address a client is given;
    here the address the user chose wins.
    """
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token.value}"} if token else {}
    try:
        with _environ({"RAY_API_SERVER_ADDRESS": address}):
            return JobSubmissionClient(address, headers=headers)
    except Exception as exc:
        raise translate_error(exc, address, token) from None


def translate_error(exc: Exception, address: str, token: Token | None) -> JobsApiError:
    """A Ray SDK failure as a JobsApiError that says what to do."""
    text = str(exc)
    if "Authentication required" in text or "status code 401" in text:
        return JobsApiError(missing_token_message(address))
    if "Authentication failed" in text or "status code 403" in text:
        return JobsApiError(rejected_token_message(address, token))
    if isinstance(exc, ConnectionError):
        return JobsApiError(f"lost the connection to the Ray Jobs API at {address}: {text}")
    if isinstance(exc, ValueError) and "exceeds" in text:
        return JobsApiError(
            f"the working dir is too large to upload ({text}); add --exclude PATTERN for big "
            "files, or list them in .gitignore",
            EXIT_USAGE,
        )
    return JobsApiError(f"the Ray Jobs API at {address} refused the request: {text}")


class _LineWriter:
    """Writes streamed text line by line with secret values masked, also across chunks."""

    def __init__(self, out: TextIO, secret_values: Sequence[str]) -> None:
        self.out = out
        self.secret_values = secret_values
        self.pending = ""
        self.received = 0

    def write(self, chunk: str) -> None:
        self.received += len(chunk)
        head, sep, self.pending = (self.pending + chunk).rpartition("\n")
        if sep:
            self.out.write(mask(head + sep, self.secret_values))
            self.out.flush()

    def close(self) -> None:
        if self.pending:
            self.out.write(mask(self.pending, self.secret_values) + "\n")
            self.out.flush()
            self.pending = ""


def follow(
    client: Any,
    submission_id: str,
    out: TextIO,
    err: TextIO,
    secret_values: Sequence[str],
    poll_s: float = 1.0,
) -> Any:
    """Stream a job's logs to `out` (secrets masked) until it ends; returns its final JobInfo."""
    from ray.job_submission import JobStatus

    writer = _LineWriter(out, secret_values)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            writer.write(chunk)

    broken = False
    try:
        asyncio.run(tail())
    except (RuntimeError, OSError) as exc:
        broken = True
        err.write(f"warning: the log stream broke ({exc}); waiting for the job to end\n")
    while not JobStatus((info := client.get_job_info(submission_id)).status).is_terminal():
        time.sleep(poll_s)
    if broken:
        writer.write(client.get_job_logs(submission_id)[writer.received :])
    writer.close()
    return info

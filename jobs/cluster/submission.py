"""What `gram submit` sends to a cluster, and the checks before anything is sent.

`prepare()` turns the submit job's config (`jobs.cluster.submit_config.SubmitConfig`) into
a `Submission`, refusing anything that would put a credential where the dashboard shows it
(entrypoint, metadata, runtime env, submission id).
"""

from __future__ import annotations

import datetime
import getpass
import json
import os
import secrets
import shlex
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gram.config import read_config_file
from jobs.cluster.jobs_api import (
    EXIT_USAGE,
    JobsApiError,
    Token,
    client_secrets,
    has_url_password,
    resolve_address,
)
from jobs.cluster.secrets import REDACTED, SECRET_ENV_VARS, is_secret_name
from jobs.cluster.submit_config import SubmitConfig
from jobs.common.git import git_commit

__all__ = [
    "DEFAULT_EXCLUDES",
    "Submission",
    "client_env_prefix",
    "locality_warnings",
    "prepare",
]


DEFAULT_EXCLUDES: tuple[str, ...] = (
    # Version control, virtualenvs, caches and build output: large and useless on the cluster.
    ".git",
    ".venv",
    "venv",
    "**/__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    ".hypothesis",
    "/build",
    "/dist",
    "*.egg-info",
    # Data and outputs live in object storage, not in the job's code package.
    "/data",
    "/demo-output",
    "/results",
    "/runs",
    "/mlruns",
    "/mlartifacts",
    "*.db",
    # Credential files never travel with the code.
    ".env",
    ".env.*",
    "*.pem",
    "*.key",
    "auth_token",
    "infra/compose/secrets",
)
"""Never uploaded (gitignore patterns, relative to the working dir); `.gitignore` applies too."""

# Settings the cluster needs that are safe to show in the dashboard: config key -> variables.
_SETTING_VARS: dict[str, tuple[str, ...]] = {
    "storage_endpoint": ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"),
    "storage_region": ("AWS_DEFAULT_REGION",),
    "tracking_uri": ("MLFLOW_TRACKING_URI",),
}
_FLAG_WORDS = frozenset({"true", "false", "yes", "no", "on", "off", "0", "1", ""})
"""Values of a secret-named option that are switches, not credentials."""


def _refused(message: str) -> JobsApiError:
    return JobsApiError(message, EXIT_USAGE)


@dataclass(frozen=True)
class Submission:
    """Exactly what is sent to the cluster; no secret outside `runtime_env["env_vars"]`."""

    address: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    submission_id: str
    entrypoint_num_cpus: float
    entrypoint_num_gpus: float
    forwarded: tuple[str, ...]
    """Names of the variables forwarded with --forward-secret (their values are never shown)."""

    def shown_env_vars(self) -> dict[str, str]:
        """The runtime env variables with forwarded secret values masked."""
        env_vars: dict[str, str] = self.runtime_env.get("env_vars", {})
        return {k: REDACTED if k in self.forwarded else v for k, v in env_vars.items()}

    def ray_job_submit_command(self, auth_env: str, wait: bool, cwd: Path) -> str:
        """The equivalent plain `ray job submit` command (forwarded secret values masked)."""
        runtime_env = {k: v for k, v in self.runtime_env.items() if k != "working_dir"}
        if "env_vars" in runtime_env:
            runtime_env["env_vars"] = self.shown_env_vars()
        workdir = Path(self.runtime_env["working_dir"])
        shown_dir = workdir.relative_to(cwd).as_posix() if workdir.is_relative_to(cwd) else workdir
        words = ["ray", "job", "submit", "--address", self.address]
        words += ["--submission-id", self.submission_id, "--working-dir", str(shown_dir)]
        words += ["--runtime-env-json", json.dumps(runtime_env, separators=(",", ":"))]
        words += ["--metadata-json", json.dumps(self.metadata, separators=(",", ":"))]
        if self.entrypoint_num_cpus:
            words += ["--entrypoint-num-cpus", f"{self.entrypoint_num_cpus:g}"]
        if self.entrypoint_num_gpus:
            words += ["--entrypoint-num-gpus", f"{self.entrypoint_num_gpus:g}"]
        if not wait:
            words.append("--no-wait")
        command = shlex.join([*words, "--", *shlex.split(self.entrypoint)])
        return f"{auth_env} {command}".strip()


def _working_dir(cfg: SubmitConfig, cwd: Path) -> Path:
    workdir = (cwd / cfg.working_dir).resolve()
    if not workdir.is_dir():
        raise _refused(f"working_dir {str(workdir)!r} is not a folder")
    if not (workdir / "jobs" / f"{cfg.job}.py").is_file():
        raise _refused(
            f"jobs/{cfg.job}.py is not in the working dir {str(workdir)!r}: run from the "
            "project root or pass --working-dir PROJECT_ROOT"
        )
    return workdir


def _job_config(cfg: SubmitConfig, cwd: Path, workdir: Path) -> str:
    """The job config's path relative to the working dir, after checking that it parses."""
    path = (cwd / cfg.config).resolve()
    if not path.is_relative_to(workdir):
        raise _refused(
            f"config {cfg.config!r} is outside the working dir {str(workdir)!r}, so the cluster "
            "would not have it: copy it into the project (e.g. jobs/configs/) and pass that path"
        )
    read_config_file(path)
    return path.relative_to(workdir).as_posix()


def _check_override(item: str) -> None:
    key, _, value = (part.strip() for part in item.partition("="))
    if is_secret_name(key) and value.lower() not in _FLAG_WORDS:
        raise _refused(
            f"override {key}=... looks like a credential, and the dashboard shows the job's "
            "entrypoint to everyone with access. Leave it out: the cluster reads credentials "
            "from its own environment (Kubernetes Secrets, compose .env, instance roles)"
        )
    if has_url_password(value):
        raise _refused(
            f"override {key}=... holds a URL with a password; put the credentials in the "
            "cluster's environment (e.g. MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD)"
        )


def _check_job_args(args: Sequence[str]) -> None:
    for i, arg in enumerate(args):
        if has_url_password(arg):
            raise _refused(
                f"job argument {i + 1} holds a URL with a password; put the credentials in the "
                "cluster's environment instead"
            )
        if not arg.startswith("--"):
            continue
        name, sep, value = arg[2:].partition("=")
        if not sep:
            following = args[i + 1] if i + 1 < len(args) else ""
            value = "" if following.startswith("-") else following
        if is_secret_name(name) and value.lower() not in _FLAG_WORDS:
            raise _refused(
                f"job argument --{name} looks like a credential, and the dashboard shows the "
                "job's entrypoint to everyone with access; give the job its credentials through "
                "the cluster's environment instead"
            )


def _env_vars(cfg: SubmitConfig, environ: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """Runtime env variables: non-secret settings, then the opted-in forwarded secrets."""
    env: dict[str, str] = {}
    for key, names in _SETTING_VARS.items():
        value = str(getattr(cfg, key)) or (environ.get(names[0], "") if cfg.env_from_client else "")
        if has_url_password(value):
            raise _refused(
                f"{key} ({names[0]}) holds a URL with a password; put the credentials in the "
                "cluster's environment instead (e.g. MLFLOW_TRACKING_USERNAME/PASSWORD)"
            )
        if value:
            env.update(dict.fromkeys(names, value))
    for name, value in cfg.env.items():
        if name in SECRET_ENV_VARS or is_secret_name(name):
            raise _refused(
                f"--env {name}=... looks like a credential and would be shown in the dashboard; "
                f"let the cluster provide it, or forward it deliberately: --forward-secret {name}"
            )
        if has_url_password(value):
            raise _refused(f"--env {name} holds a URL with a password")
        env[name] = value
    forwarded = list(dict.fromkeys(cfg.forward_secrets))
    for name in forwarded:
        if name.startswith("RAY_AUTH"):
            raise _refused(f"--forward-secret {name}: the cluster has its own token; never send it")
        if name not in environ:
            raise _refused(f"--forward-secret {name}: {name} is not set in this shell")
        env[name] = environ[name]
    return env, forwarded


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _refuse_leaks(submission: Submission, environ: Mapping[str, str]) -> None:
    """Last line of defence: no client secret in what the dashboard shows to everyone."""
    shown = {
        "the entrypoint": submission.entrypoint,
        "the job metadata": json.dumps(submission.metadata),
        "the runtime env": json.dumps(submission.shown_env_vars()),
        "the submission id": submission.submission_id,
    }
    for name, value in client_secrets(environ).items():
        if name in submission.forwarded:
            continue
        for where, text in shown.items():
            if value in text:
                raise _refused(
                    f"the value of {name} appears in {where}, which the dashboard shows to "
                    "everyone with access: remove it (the cluster must get credentials from its "
                    "own environment; --forward-secret is the deliberate exception)"
                )


def prepare(
    cfg: SubmitConfig, environ: Mapping[str, str] | None = None, cwd: Path | None = None
) -> Submission:
    """Check `cfg` and build what will be sent; raises JobsApiError/ConfigError naming the fix."""
    environ = os.environ if environ is None else environ
    cwd = (cwd or Path.cwd()).resolve()
    address = resolve_address(cfg.address, environ)
    workdir = _working_dir(cfg, cwd)
    config = _job_config(cfg, cwd, workdir) if cfg.config else ""
    for item in cfg.overrides:
        _check_override(item)
    _check_job_args(cfg.job_args)
    env_vars, forwarded = _env_vars(cfg, environ)

    command = [*shlex.split(cfg.python), "-m", f"jobs.{cfg.job}"]
    command += ["--config", config] if config else []
    runtime_env: dict[str, Any] = {
        "working_dir": str(workdir),
        "excludes": list(dict.fromkeys([*DEFAULT_EXCLUDES, *cfg.excludes])),
    }
    if env_vars:
        runtime_env["env_vars"] = env_vars
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    submission = Submission(
        address=address,
        entrypoint=shlex.join([*command, *cfg.overrides, *cfg.job_args]),
        runtime_env=runtime_env,
        metadata={
            "gram.job": cfg.job,
            "gram.config": config,
            "gram.git_commit": git_commit(workdir, dirty=True) or "unknown",
            "gram.submitted_by": _user(),
        },
        submission_id=cfg.submission_id or f"gram-{cfg.job}-{stamp}-{secrets.token_hex(3)}",
        entrypoint_num_cpus=cfg.entrypoint_num_cpus,
        entrypoint_num_gpus=cfg.entrypoint_num_gpus,
        forwarded=tuple(forwarded),
    )
    _refuse_leaks(submission, environ)
    return submission


def locality_warnings(env_vars: Mapping[str, str]) -> list[str]:
    """Settings that name this machine: on the cluster they mean the node running the job."""
    found = []
    for name in ("AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"):
        value = env_vars.get(name, "")
        parsed = urllib.parse.urlsplit(value)
        if value and parsed.scheme in ("", "file", "sqlite"):
            found.append(
                f"{name}={value} is a local store: the job writes it on the cluster node that "
                "runs it, not on this machine"
            )
        elif parsed.hostname in ("127.0.0.1", "localhost", "::1"):
            found.append(
                f"{name}={value} points at localhost, which on the cluster is the node itself "
                "(right only for a cluster on this machine)"
            )
    return found


def client_env_prefix(address: str, token: Token | None, environ: Mapping[str, str]) -> str:
    """Variables the plain `ray job ...` commands need in this shell (no secret values)."""
    words = ["RAY_AUTH_MODE=token"]
    if token is not None and token.path:
        words.append(f"RAY_AUTH_TOKEN_PATH={shlex.quote(token.path)}")
    # Ray lets these variables override --address; make the printed commands immune to that.
    if any(
        environ.get(name, address) != address for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
    ):
        words.append(f"RAY_API_SERVER_ADDRESS={shlex.quote(address)}")
    return " ".join(words)

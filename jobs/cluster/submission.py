"""What `gram submit` sends to a cluster, and the checks before anything is sent.

`SubmitConfig` is the typed config (command line, `--profile` file); `prepare()` turns it
into a `Submission`, refusing anything that would put a credential where the dashboard shows
it (entrypoint, metadata, runtime env, submission id); `build_parser()` and
`config_from_args()` are the command line of `jobs/submit.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import getpass
import json
import os
import re
import secrets
import shlex
import subprocess
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from gram.config import ConfigError, from_dict, read_config_file
from jobs.cluster.jobs_api import (
    EXIT_USAGE,
    JobsApiError,
    Token,
    client_secrets,
    has_url_password,
    resolve_address,
)
from jobs.cluster.secrets import REDACTED, SECRET_ENV_VARS, is_secret_name

__all__ = [
    "DEFAULT_EXCLUDES",
    "JOBS",
    "Submission",
    "SubmitConfig",
    "build_parser",
    "client_env_prefix",
    "config_from_args",
    "locality_warnings",
    "prepare",
]

JobName = Literal["preprocess", "train", "evaluate", "register", "promote"]
JOBS: tuple[str, ...] = get_args(JobName)


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
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SUBMISSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_FLAG_WORDS = frozenset({"true", "false", "yes", "no", "on", "off", "0", "1", ""})


def _refused(message: str) -> JobsApiError:
    return JobsApiError(message, EXIT_USAGE)


@dataclass
class SubmitConfig:
    """How and where one job is submitted. Every key can also come from a `--profile` file."""

    job: JobName
    """Job to run: `python -m jobs.<job>` on the cluster."""
    address: str = ""
    """Ray Jobs API (dashboard) URL, e.g. http://127.0.0.1:8265; empty = $RAY_API_SERVER_ADDRESS,
    else $RAY_ADDRESS when it is an http(s) URL."""
    config: str = ""
    """The job's config file (YAML/JSON), inside the working dir; passed as `--config`."""
    overrides: list[str] = field(default_factory=list)
    """`key=value` overrides for the job's config, passed after `--config`."""
    job_args: list[str] = field(default_factory=list)
    """Further arguments for the job, passed verbatim (e.g. `--input`/`--output`)."""
    wait: bool = False
    """Stream the job's logs until it ends and exit with its status."""
    working_dir: str = "."
    """Project folder uploaded as the job's working dir (must hold jobs/<job>.py)."""
    excludes: list[str] = field(default_factory=list)
    """More patterns never uploaded, on top of DEFAULT_EXCLUDES and `.gitignore`."""
    python: str = "python"
    """Python command on the cluster nodes."""
    storage_endpoint: str = ""
    """S3-compatible endpoint as the cluster reaches it (AWS_ENDPOINT_URL and
    MLFLOW_S3_ENDPOINT_URL)."""
    storage_region: str = ""
    """S3 region (AWS_DEFAULT_REGION)."""
    tracking_uri: str = ""
    """MLflow tracking URI as the cluster reaches it (MLFLOW_TRACKING_URI)."""
    env_from_client: bool = True
    """Fill empty storage_endpoint/storage_region/tracking_uri from this shell's
    AWS_ENDPOINT_URL, AWS_DEFAULT_REGION and MLFLOW_TRACKING_URI."""
    env: dict[str, str] = field(default_factory=dict)
    """More non-secret environment variables for the job."""
    forward_secrets: list[str] = field(default_factory=list)
    """Variables copied from this shell into the job's runtime env (opt-in: their values
    become visible in the dashboard)."""
    submission_id: str = ""
    """Ray submission id; empty = gram-<job>-<UTC time>-<random>."""
    entrypoint_num_cpus: float = 0.0
    """CPUs reserved for the job's driver process."""
    entrypoint_num_gpus: float = 0.0
    """GPUs reserved for the job's driver process."""
    token_path: str = ""
    """File holding the cluster's auth token; empty = Ray's lookup (RAY_AUTH_TOKEN, ...)."""
    dry_run: bool = False
    """Check everything and print the equivalent `ray job submit` command; submit nothing."""

    def __post_init__(self) -> None:
        for item in self.overrides:
            key, sep, _ = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(
                    f"overrides: {item!r} must look like key=value; arguments for the job "
                    "itself go after `--` (e.g. -- --input s3://bucket/raw/)"
                )
        for name in [*self.env, *self.forward_secrets]:
            if not _ENV_NAME.fullmatch(name):
                raise ConfigError(f"{name!r} is not a valid environment variable name")
        if self.submission_id and not _SUBMISSION_ID.fullmatch(self.submission_id):
            raise ConfigError(
                "submission_id: use 1-128 characters of A-Z a-z 0-9 _ . - starting with a "
                f"letter or digit, got {self.submission_id!r}"
            )
        if self.entrypoint_num_cpus < 0 or self.entrypoint_num_gpus < 0:
            raise ConfigError("entrypoint_num_cpus / entrypoint_num_gpus must be >= 0")
        if not self.python.strip():
            raise ConfigError("python: name the Python command on the cluster, e.g. python")


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


def _git_commit(workdir: Path) -> str:
    """The working dir's git commit (+ `-dirty` with uncommitted changes), or `unknown`."""
    try:
        git = ["git", "-C", str(workdir)]
        head = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        changes = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}-dirty" if changes else head


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
            "gram.git_commit": _git_commit(workdir),
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


_HELP = {
    "address": "Ray Jobs API URL, e.g. http://HEAD:8265",
    "config": "the job's config file, inside the working dir (passed as --config)",
    "wait": "stream logs until the job ends and exit with its status",
    "working_dir": "project folder uploaded as the job's working dir",
    "excludes": "extra pattern never uploaded (repeatable)",
    "python": "Python command on the cluster nodes",
    "storage_endpoint": "S3 endpoint as the cluster sees it (AWS_ENDPOINT_URL)",
    "storage_region": "S3 region (AWS_DEFAULT_REGION)",
    "tracking_uri": "MLflow tracking URI as the cluster sees it (MLFLOW_TRACKING_URI)",
    "env_from_client": "fill empty storage/tracking settings from this shell's "
    "AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, MLFLOW_TRACKING_URI",
    "env": "extra non-secret environment variable for the job (repeatable)",
    "forward_secrets": "copy this shell's variable NAME into the job; opt-in, the value is "
    "shown in the dashboard (repeatable)",
    "submission_id": "Ray submission id",
    "entrypoint_num_cpus": "CPUs reserved for the job's driver",
    "entrypoint_num_gpus": "GPUs reserved for the job's driver",
    "token_path": "file holding the cluster's auth token",
    "dry_run": "check, print the equivalent `ray job submit` command, submit nothing",
}
_SHOWN_DEFAULTS = {
    "address": "$RAY_API_SERVER_ADDRESS, else an http(s) $RAY_ADDRESS",
    "submission_id": "gram-<job>-<UTC time>-<random>",
    "token_path": "$RAY_AUTH_TOKEN, else $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token",
}


def _help(key: str) -> str:
    """Help text for a config key, with its real default."""
    f = SubmitConfig.__dataclass_fields__[key]
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    shown = _SHOWN_DEFAULTS.get(key) or ("none" if default in ("", [], {}) else json.dumps(default))
    return f"{_HELP[key]} (default: {shown})"


_EPILOG = """\
job arguments: everything after `--` goes to the job verbatim, e.g.
  ... submit preprocess --address http://127.0.0.1:8265 --wait -- --input s3://b/raw/ --output s3://b/shards/

profile: --profile FILE is a YAML file with any of the config keys (address, tracking_uri,
  storage_endpoint, token_path, env, forward_secrets, ...); options given here win, and
  repeatable options add to the profile's lists (see infra/compose/submit-profile.yaml).

credentials: never in the entrypoint, metadata or output. The cluster reads S3/MLflow
  credentials from its own environment (K8s Secrets, compose .env, instance roles); only
  non-secret settings are sent. --forward-secret NAME is the visible, explicit exception.

environment: RAY_API_SERVER_ADDRESS, RAY_ADDRESS (address); RAY_AUTH_TOKEN,
  RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token (token); AWS_ENDPOINT_URL, AWS_DEFAULT_REGION,
  MLFLOW_TRACKING_URI (settings, unless --no-env-from-client).

exit codes: 0 submitted / SUCCEEDED, 1 FAILED or STOPPED, 2 bad options, 3 cluster
  unreachable or refused, 130 interrupted (the job keeps running).
"""


def build_parser(prog: str = "python -m jobs.submit") -> argparse.ArgumentParser:
    """The command-line parser. Unset options stay absent, so a profile can fill them."""
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=f"{prog} JOB [options] [key=value ...] [-- JOB_ARGS ...]",
        description="Submit a gram-ray job to a Ray cluster through the Ray Jobs API.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    add = parser.add_argument
    add("job", choices=JOBS, help="job to run on the cluster: python -m jobs.<JOB>")
    add("overrides", nargs="*", metavar="key=value", help="overrides for the job's config")
    add("--profile", metavar="FILE", help="YAML file with submit settings (config keys)")
    add("--address", metavar="URL", help=_help("address"))
    add("--config", metavar="FILE", help=_help("config"))
    add("--wait", action=argparse.BooleanOptionalAction, help=_help("wait"))
    add("--working-dir", metavar="DIR", help=_help("working_dir"))
    add("--exclude", dest="excludes", action="append", metavar="PATTERN", help=_help("excludes"))
    add("--python", metavar="CMD", help=_help("python"))
    add("--storage-endpoint", metavar="URL", help=_help("storage_endpoint"))
    add("--storage-region", metavar="REGION", help=_help("storage_region"))
    add("--tracking-uri", metavar="URI", help=_help("tracking_uri"))
    add("--env-from-client", action=argparse.BooleanOptionalAction, help=_help("env_from_client"))
    add("--env", action="append", metavar="KEY=VALUE", help=_help("env"))
    add(
        "--forward-secret",
        dest="forward_secrets",
        action="append",
        metavar="NAME",
        help=_help("forward_secrets"),
    )
    add("--submission-id", metavar="ID", help=_help("submission_id"))
    add("--entrypoint-num-cpus", type=float, metavar="N", help=_help("entrypoint_num_cpus"))
    add("--entrypoint-num-gpus", type=float, metavar="N", help=_help("entrypoint_num_gpus"))
    add("--token-path", metavar="FILE", help=_help("token_path"))
    add("--dry-run", action="store_true", help=_help("dry_run"))
    return parser


def config_from_args(args: argparse.Namespace, job_args: Sequence[str] = ()) -> SubmitConfig:
    """SubmitConfig defaults <- profile file <- options; repeatable options add to the profile."""
    given = dict(vars(args))
    profile = given.pop("profile", None)
    data: dict[str, Any] = read_config_file(profile) if profile else {}
    if "env" in given:
        pairs = [item.partition("=") for item in given["env"]]
        bad = [f"{k}{s}{v}" for k, s, v in pairs if not s]
        if bad:
            raise ConfigError(f"--env {bad[0]!r} must look like KEY=VALUE")
        given["env"] = {**data.get("env", {}), **{k.strip(): v for k, _, v in pairs}}
    for key in ("overrides", "excludes", "forward_secrets"):
        if key in given and isinstance(data.get(key), list):
            given[key] = [*data[key], *given[key]]
    data.update(given)
    if job_args:
        data["job_args"] = [*data.get("job_args", []), *job_args]
    return from_dict(SubmitConfig, data)

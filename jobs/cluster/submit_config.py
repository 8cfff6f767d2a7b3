"""The submit command's config and command line: `SubmitConfig`, from a `--profile` file and
options.

    args, unknown = build_parser("gram submit").parse_known_intermixed_args(argv)
    cfg = config_from_args(args, job_args)   # defaults <- profile <- options

Every key of `SubmitConfig` can come from a profile (YAML) and most from an option; options
win, and repeatable options (`--env`, `--exclude`, `--forward-secret`, overrides) add to the
profile's lists. What the config then sends is decided in `jobs.cluster.submission`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gram.config import ConfigError, from_dict, read_config_file
from jobs.catalog import CLUSTER_JOBS

__all__ = ["SubmitConfig", "build_parser", "config_from_args"]

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SUBMISSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass
class SubmitConfig:
    """How and where one job is submitted. Every key can also come from a `--profile` file."""

    job: str
    """Job to run: `python -m jobs.<job>` on the cluster (one of `jobs.catalog.CLUSTER_JOBS`)."""
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
        if self.job not in CLUSTER_JOBS:
            raise ConfigError(
                f"job: must be one of {', '.join(map(repr, CLUSTER_JOBS))}, got {self.job!r}"
            )
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
    add("job", choices=CLUSTER_JOBS, help="job to run on the cluster: python -m jobs.<JOB>")
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

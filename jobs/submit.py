"""Submit a gram-ray job to a Ray cluster through the Ray Jobs API, optionally waiting for it.

    python -m jobs.submit train --address http://127.0.0.1:8265 --wait \\
        --config jobs/configs/train.yaml workers=2
    python -m jobs.submit preprocess --address http://127.0.0.1:8265 --wait -- \\
        --input s3://bucket/raw/ --output s3://bucket/shards/v1/
    python -m jobs.submit train --profile infra/compose/submit-profile.yaml --dry-run

JOB runs on the cluster as `python -m jobs.<JOB> [--config FILE] [key=value ...] [ARGS after --]`
in a copy of this project (the Ray runtime env `working_dir`, minus virtualenvs, caches,
data/output folders and credential files); the cluster's image provides the dependencies.

Credentials policy. Nothing secret goes into the entrypoint, the job metadata or what this
command prints: the dashboard shows the first two to anyone who can open it. The cluster reads
S3 and MLflow credentials from its own environment (KubeRay: Kubernetes Secrets via `envFrom`;
compose: the stack's `.env`; cloud VMs: instance roles). Only non-secret settings travel as
runtime env variables (AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, MLFLOW_TRACKING_URI, ...).
`--forward-secret NAME` is the explicit opt-in to copy a variable from this shell into the
job's runtime env: its value is then stored by the cluster, shown in the dashboard's job
details and written to Ray's runtime-env agent log files, so use it only on a cluster whose
dashboard and logs only you can reach. A request that would
put a credential in the entrypoint (a secret-named override, a URL with a password, the value
of a credential variable) is refused with a message naming the fix.

What is sent, and the checks before anything is: jobs/cluster/submission.py. Token
authentication: jobs/cluster/jobs_api.py; the cluster's mode is read from its public
`/api/authentication_mode` endpoint, and in token mode the token must be configured here.
This job has a command line of its own (the job to run, options that fill `SubmitConfig`,
a `--profile` file, the job's own arguments after `--`), with the logging, log scrubber and
exit codes of every job (jobs/common/entry.py).

Exit codes: 0 submitted (with --wait: SUCCEEDED); 1 the job FAILED or was STOPPED; 2 bad
options or config; 3 the cluster is unreachable or refused the request; 130 interrupted while
waiting (the job keeps running).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from gram.config import ConfigError, from_dict, read_config_file
from jobs.catalog import CLUSTER_JOBS
from jobs.cluster.jobs_api import (
    JobsApiError,
    client_secrets,
    connect,
    find_token,
    follow,
    require_token,
    translate_error,
)
from jobs.cluster.secrets import mask
from jobs.cluster.submission import client_env_prefix, locality_warnings, prepare
from jobs.common.entry import EXIT_FAILED, EXIT_OK, EXIT_USAGE, setup_logging

__all__ = ["SubmitConfig", "build_parser", "config_from_args", "main", "run"]

EXIT_JOB_FAILED = EXIT_FAILED
EXIT_INTERRUPTED = 130
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


def run(
    cfg: SubmitConfig,
    *,
    environ: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Submit `cfg.job` (with `cfg.wait`, follow it to the end); returns the exit code."""
    environ = os.environ if environ is None else environ
    out, err = out or sys.stdout, err or sys.stderr
    hidden = list(client_secrets(environ).values())

    def say(line: str) -> None:
        err.write(mask(line, hidden) + "\n")
        err.flush()

    try:
        cwd = Path.cwd().resolve()
        submission = prepare(cfg, environ, cwd)
        token = find_token(cfg.token_path, environ)
        if token is not None:
            hidden.append(token.value)
        auth_env = client_env_prefix(submission.address, token, environ)
        say(f"job:         {cfg.job} -> {submission.entrypoint}")
        say(f"cluster:     {submission.address}")
        say(f"working dir: {submission.runtime_env['working_dir']}")
        say(f"env vars:    {json.dumps(submission.shown_env_vars())}")
        for warning in locality_warnings(submission.runtime_env.get("env_vars", {})):
            say(f"warning: {warning}")
        if submission.forwarded:
            say(
                f"warning: forwarding {', '.join(submission.forwarded)} into the job's runtime "
                "env: the cluster stores the values and the dashboard shows them"
            )
        say("equivalent:  " + submission.ray_job_submit_command(auth_env, cfg.wait, cwd))
        if cfg.dry_run:
            say("dry run:     nothing submitted")
            return EXIT_OK

        token = require_token(submission.address, token)
        if token is None:
            say(
                f"warning: {submission.address} does not require a token: anyone who can reach "
                "its dashboard port can run code there (see infra/README.md#security)"
            )
        client = connect(submission.address, token)
        try:
            submission_id = client.submit_job(
                entrypoint=submission.entrypoint,
                runtime_env=submission.runtime_env,
                metadata=submission.metadata,
                submission_id=submission.submission_id,
                entrypoint_num_cpus=submission.entrypoint_num_cpus or None,
                entrypoint_num_gpus=submission.entrypoint_num_gpus or None,
            )
        except Exception as exc:
            raise translate_error(exc, submission.address, token) from None
        say(f"submitted:   {submission_id}")
        stop = f"{auth_env} ray job stop {submission_id} --address {submission.address}"
        if not cfg.wait:
            logs = (
                f"{auth_env} ray job logs --follow {submission_id} --address {submission.address}"
            )
            say(f"follow:      {logs}")
            say(f"stop:        {stop}")
            return EXIT_OK
        try:
            info = follow(client, submission_id, out, err, hidden)
        except KeyboardInterrupt:
            say(f"interrupted: the job keeps running; stop it with: {stop}")
            return EXIT_INTERRUPTED
        except Exception as exc:
            raise translate_error(exc, submission.address, token) from None
        if str(info.status) == "SUCCEEDED":
            say(f"job {submission_id} SUCCEEDED")
            return EXIT_OK
        say(f"job {submission_id} {info.status}: {info.message or '(no message)'}")
        return EXIT_JOB_FAILED
    except ConfigError as exc:
        say(f"error: {exc}")
        return EXIT_USAGE
    except JobsApiError as exc:
        say(f"error: {exc}")
        return exc.exit_code


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


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m jobs.submit") -> int:
    """Command-line entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    job_args: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, job_args = argv[:split], argv[split + 1 :]
    parser = build_parser(prog)
    args, unknown = parser.parse_known_intermixed_args(argv)
    if unknown:
        parser.error(
            f"unrecognized arguments: {' '.join(unknown)} (arguments for the job itself go "
            "after `--`, e.g. -- --input s3://bucket/raw/ --output s3://bucket/shards/)"
        )
    setup_logging()
    try:
        cfg = config_from_args(args, job_args)
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_USAGE
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())

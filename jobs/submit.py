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
a `--profile` file, the job's own arguments after `--`: jobs/cluster/submit_config.py), with
the logging, log scrubber and exit codes of every job (jobs/common/entry.py).

Exit codes: 0 submitted (with --wait: SUCCEEDED); 1 the job FAILED or was STOPPED; 2 bad
options or config; 3 the cluster is unreachable or refused the request; 130 interrupted while
waiting (the job keeps running).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

from gram.config import ConfigError
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
from jobs.cluster.submit_config import SubmitConfig, build_parser, config_from_args
from jobs.common.entry import EXIT_FAILED, EXIT_OK, EXIT_USAGE, setup_logging

__all__ = ["SubmitConfig", "main", "run"]

EXIT_JOB_FAILED = EXIT_FAILED
EXIT_INTERRUPTED = 130


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

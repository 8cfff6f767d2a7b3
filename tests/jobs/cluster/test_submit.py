"""`jobs.submit`: offline checks, then real submissions to the session's 2-node Ray cluster.

The cluster runs a probe (written as jobs/evaluate.py into a copy of the project) that prints,
as one JSON line, what it sees there: where `gram` was imported from, its arguments and its
environment. Sentinel credentials sit in the client's environment the whole time; they must
never show up in the entrypoint, the job metadata or anything the command prints.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gram.config import ConfigError
from jobs.cluster.jobs_api import EXIT_CLUSTER, EXIT_USAGE, JobsApiError, connect, find_token
from jobs.cluster.submission import DEFAULT_EXCLUDES, prepare
from jobs.cluster.submit_config import SubmitConfig, build_parser, config_from_args
from jobs.submit import main, run

REPO = Path(__file__).resolve().parents[3]
NONCE = "probe-nonce-5d1e0c"
SENTINELS = {
    "AWS_SECRET_ACCESS_KEY": "sentinel-aws-secret-4f1c9a",
    "MLFLOW_TRACKING_PASSWORD": "sentinel-mlflow-pw-77ad2b",
}
FORWARDED_NAME, FORWARDED_VALUE = "GRAM_PROBE_API_KEY", "sentinel-forwarded-9b2e61"

PROBE = f'''"""Stand-in job for the tests: prints what it sees on the cluster as one JSON line."""
import json
import os
import sys

import gram

args = sys.argv[1:]
names = ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "GRAM_PROBE_SETTING")
decoys = (".env", ".venv", "results", "infra/compose/secrets", "jobs/configs/probe.yaml")
report = {{
    "nonce": "{NONCE}",
    "gram_file": gram.__file__,
    "args": args,
    "env": {{name: os.environ.get(name) for name in names}},
    "forwarded_chars": len(os.environ.get("{FORWARDED_NAME}", "")),
    "present": sorted(p for p in decoys if os.path.exists(p)),
}}
print("PROBE " + json.dumps(report), flush=True)
print("forwarded value: " + os.environ.get("{FORWARDED_NAME}", "-"), flush=True)
if "--fail" in args:
    print("probe failing on purpose", file=sys.stderr, flush=True)
    sys.exit(3)
'''


def make_project(root: Path, *, probe: bool = True) -> Path:
    """A copy of the project's code (+ the probe as jobs/evaluate.py and decoy secret files)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("gram", "jobs"):
        shutil.copytree(REPO / name, root / name, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    (root / "jobs" / "configs").mkdir(exist_ok=True)
    (root / "jobs" / "configs" / "probe.yaml").write_text("steps: 3\n")
    if probe:
        (root / "jobs" / "evaluate.py").write_text(PROBE)
    (root / ".env").write_text(f"AWS_SECRET_ACCESS_KEY={SENTINELS['AWS_SECRET_ACCESS_KEY']}\n")
    (root / ".venv").mkdir()
    (root / ".venv" / "marker").write_text("not for the cluster\n")
    (root / "results").mkdir()
    (root / "results" / "big.bin").write_bytes(bytes(4096))
    (root / "infra" / "compose" / "secrets").mkdir(parents=True)
    (root / "infra" / "compose" / "secrets" / "ray_auth_token").write_text("decoy-token-file\n")
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_project(tmp_path_factory.mktemp("project"))


@pytest.fixture
def client_env(ray_cluster) -> dict[str, str]:
    """This shell as a user would have it: cluster token configured, credentials exported."""
    return {
        **os.environ,
        **ray_cluster.env,
        **SENTINELS,
        FORWARDED_NAME: FORWARDED_VALUE,
        "MLFLOW_TRACKING_URI": "http://mlflow.internal:5000",
    }


def submit_cli(cwd: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m jobs.submit ARGS` from `cwd`, as a user runs it from the project root."""
    return subprocess.run(
        [sys.executable, "-m", "jobs.submit", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def probe_report(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("PROBE ")]
    assert len(lines) == 1, f"expected one probe report in the streamed logs:\n{stdout[-3000:]}"
    return json.loads(lines[0].removeprefix("PROBE "))


def jobs_client(ray_cluster):
    return connect(ray_cluster.dashboard_url, find_token("", ray_cluster.env))


def assert_no_secrets(text: str, *extra: str) -> None:
    for value in [*SENTINELS.values(), FORWARDED_VALUE, *extra]:
        assert value not in text, f"secret value {value[:12]}... leaked"


# --- offline: parsing, checks and what would be sent ------------------------------------


@pytest.fixture
def mini(tmp_path: Path) -> Path:
    """A minimal project: jobs/train.py and its config."""
    (tmp_path / "jobs" / "configs").mkdir(parents=True)
    (tmp_path / "jobs" / "train.py").write_text("")
    (tmp_path / "jobs" / "configs" / "train.yaml").write_text("workers: 2\n")
    return tmp_path


def test_help_lists_jobs_options_and_real_defaults():
    text = " ".join(build_parser().format_help().split())  # undo line wrapping
    for job in ("preprocess", "train", "evaluate", "register", "promote"):
        assert job in text
    for shown in ('(default: "python")', '(default: ".")', "(default: false)", "(default: true)"):
        assert shown in text
    assert "--forward-secret" in text
    assert "exit codes" in text


def test_prepare_builds_exactly_what_is_sent(mini: Path):
    cfg = SubmitConfig(
        job="train",
        address="http://head.internal:8265/",
        config="jobs/configs/train.yaml",
        overrides=["workers=4", "optim.lr=3e-4"],
        job_args=["--note", "two words"],
        working_dir=str(mini),
        storage_endpoint="http://minio:9000",
        env={"GRAM_FLAG": "1"},
        excludes=["*.mp4"],
        submission_id="gram-train-test",
        entrypoint_num_cpus=0.5,
    )
    environ = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "RAY_ADDRESS": "10.0.0.1:6379"}
    sub = prepare(cfg, environ, cwd=mini)
    assert sub.address == "http://head.internal:8265"
    assert sub.entrypoint == (
        "python -m jobs.train --config jobs/configs/train.yaml workers=4 optim.lr=3e-4 "
        "--note 'two words'"
    )
    assert sub.runtime_env["working_dir"] == str(mini.resolve())
    assert sub.runtime_env["excludes"] == [*DEFAULT_EXCLUDES, "*.mp4"]
    assert sub.runtime_env["env_vars"] == {
        "AWS_ENDPOINT_URL": "http://minio:9000",
        "MLFLOW_S3_ENDPOINT_URL": "http://minio:9000",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "GRAM_FLAG": "1",
    }
    assert sub.metadata["gram.job"] == "train"
    assert sub.metadata["gram.config"] == "jobs/configs/train.yaml"
    command = sub.ray_job_submit_command("RAY_AUTH_MODE=token", wait=False, cwd=mini.resolve())
    assert command.startswith("RAY_AUTH_MODE=token ray job submit --address http://head.internal")
    assert "--working-dir . " in command
    assert "--entrypoint-num-cpus 0.5" in command
    assert command.endswith("--no-wait -- " + sub.entrypoint)

    no_client_env = SubmitConfig(job="train", address="http://h:8265", working_dir=str(mini))
    no_client_env.env_from_client = False
    assert "env_vars" not in prepare(no_client_env, environ, cwd=mini).runtime_env


def test_dry_run_prints_the_plan_and_warns_about_local_settings(mini: Path, tmp_path: Path):
    cfg = SubmitConfig(job="train", address="http://127.0.0.1:9", working_dir=str(mini))
    cfg.dry_run = True
    environ = {
        "HOME": str(tmp_path),
        "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db",
        "AWS_ENDPOINT_URL": "http://localhost:9000",
    }
    err = io.StringIO()
    assert run(cfg, environ=environ, out=io.StringIO(), err=err) == 0  # nothing contacted
    text = err.getvalue()
    assert "MLFLOW_TRACKING_URI=sqlite:///mlflow.db is a local store" in text
    assert "AWS_ENDPOINT_URL=http://localhost:9000 points at localhost" in text
    assert "equivalent:  RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:9" in text
    assert "nothing submitted" in text


def test_profile_then_options_with_lists_added(tmp_path: Path):
    profile = tmp_path / "profile.yaml"
    profile.write_text(
        "address: http://127.0.0.1:8265\nexcludes: ['*.mp4']\nenv: {A: '1'}\nwait: true\n"
    )
    args, _ = build_parser().parse_known_intermixed_args(
        ["train", "--profile", str(profile), "--exclude", "*.wav", "--env", "B=2", "--no-wait"]
    )
    cfg = config_from_args(args, ["--input", "x"])
    assert cfg.address == "http://127.0.0.1:8265"
    assert cfg.excludes == ["*.mp4", "*.wav"]
    assert cfg.env == {"A": "1", "B": "2"}
    assert cfg.wait is False
    assert cfg.job_args == ["--input", "x"]

    profile.write_text("adress: http://127.0.0.1:8265\n")
    args, _ = build_parser().parse_known_intermixed_args(["train", "--profile", str(profile)])
    with pytest.raises(ConfigError, match="did you mean 'address'"):
        config_from_args(args)


@pytest.mark.parametrize(
    ("change", "environ", "fix"),
    [
        ({"overrides": ["s3.secret_access_key=abc123"]}, {}, "looks like a credential"),
        ({"job_args": ["--db-password", "hunter22"]}, {}, "looks like a credential"),
        ({"tracking_uri": "http://bob:pw123@mlflow:5000"}, {}, "URL with a password"),
        ({"overrides": ["tracking.uri=https://u:p4ss@x"]}, {}, "URL with a password"),
        ({"env": {"AWS_SECRET_ACCESS_KEY": "x"}}, {}, "--forward-secret AWS_SECRET_ACCESS_KEY"),
        ({"forward_secrets": ["RAY_AUTH_TOKEN"]}, {"RAY_AUTH_TOKEN": "t0ken-value"}, "own token"),
        ({"forward_secrets": ["GRAM_UNSET_SECRET"]}, {}, "not set in this shell"),
        ({"job_args": ["--input", "s3://b/sentinel-aws-secret-4f1c9a"]}, SENTINELS, "appears in"),
        ({"env": {"NOTE": "sentinel-mlflow-pw-77ad2b"}}, SENTINELS, "appears in the runtime env"),
        ({"config": "../outside.yaml"}, {}, "outside the working dir"),
        ({"working_dir": "nowhere"}, {}, "is not a folder"),
        ({"job": "promote"}, {}, "jobs/promote.py is not in the working dir"),
        ({"address": ""}, {}, "pass --address http://HEAD:8265"),
        ({"address": "127.0.0.1:6379"}, {}, "not a Jobs API URL"),
        ({"address": "http://user:pw@h:8265"}, {}, "must not carry credentials"),
    ],
)
def test_refusals_name_the_fix(mini: Path, change: dict, environ: dict, fix: str):
    (mini.parent / "outside.yaml").write_text("a: 1\n")
    cfg = SubmitConfig(job="train", address="http://h:8265", working_dir=str(mini))
    for key, value in change.items():
        setattr(cfg, key, value)
    with pytest.raises(JobsApiError) as info:
        prepare(cfg, environ, cwd=mini)
    assert fix in str(info.value)
    assert info.value.exit_code == EXIT_USAGE
    for value in SENTINELS.values():
        assert value not in str(info.value)


def test_flag_overrides_that_only_mention_credentials_are_allowed(mini: Path):
    cfg = SubmitConfig(job="train", address="http://h:8265", working_dir=str(mini))
    cfg.overrides = ["s3.forward_credentials=false"]
    cfg.job_args = ["--use-auth-cache"]
    assert "s3.forward_credentials=false" in prepare(cfg, {}, cwd=mini).entrypoint


def test_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match="key=value"):
        SubmitConfig(job="train", overrides=["--input"])
    with pytest.raises(ConfigError, match="submission_id"):
        SubmitConfig(job="train", submission_id="has spaces")
    with pytest.raises(ConfigError, match=">= 0"):
        SubmitConfig(job="train", entrypoint_num_gpus=-1)


def test_token_lookup_order_and_unreadable_files(tmp_path: Path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home-dir\n")
    given = tmp_path / "given"
    given.write_text("from-option\n")
    env_file = tmp_path / "env-file"
    env_file.write_text("from-env-path\n")
    environ = {
        "HOME": str(home),
        "RAY_AUTH_TOKEN": "from-env",
        "RAY_AUTH_TOKEN_PATH": str(env_file),
    }
    assert find_token(str(given), environ).value == "from-option"
    assert find_token("", environ).value == "from-env"
    assert find_token("", {**environ, "RAY_AUTH_TOKEN": ""}).value == "from-env-path"
    assert find_token("", {"HOME": str(home)}).value == "from-home-dir"
    assert find_token("", {"HOME": str(tmp_path)}) is None
    assert "from-env" not in repr(find_token("", environ))
    with pytest.raises(JobsApiError, match="cannot read the token file"):
        find_token("", {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})


def test_job_options_before_the_double_dash_are_explained(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--address", "http://h:8265", "--input", "s3://b/raw/"])
    assert info.value.code == 2
    assert "go after `--`" in capsys.readouterr().err


# --- against the real cluster -----------------------------------------------------------


@pytest.mark.slow
def test_wait_streams_logs_forwards_settings_and_keeps_secrets_out(
    ray_cluster, project: Path, client_env: dict[str, str]
):
    sid = "gram-test-probe-ok"
    res = submit_cli(
        project,
        "evaluate",
        "--address", ray_cluster.dashboard_url,
        "--wait",
        "--python", sys.executable,
        "--config", "jobs/configs/probe.yaml",
        "--storage-endpoint", "http://minio.internal:9000",
        "--env", "GRAM_PROBE_SETTING=on",
        "--forward-secret", FORWARDED_NAME,
        "--submission-id", sid,
        "steps=5",
        "--", "--input", "s3://bucket/raw/",
        env=client_env,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    report = probe_report(res.stdout)
    assert report["nonce"] == NONCE
    assert "working_dir_files" in report["gram_file"], "gram must come from the uploaded copy"
    assert not report["gram_file"].startswith((str(project), str(REPO)))
    assert report["args"] == [
        "--config", "jobs/configs/probe.yaml", "steps=5", "--input", "s3://bucket/raw/"
    ]  # fmt: skip
    assert report["env"] == {
        "AWS_ENDPOINT_URL": "http://minio.internal:9000",
        "MLFLOW_S3_ENDPOINT_URL": "http://minio.internal:9000",
        "MLFLOW_TRACKING_URI": "http://mlflow.internal:5000",
        "GRAM_PROBE_SETTING": "on",
    }
    assert report["forwarded_chars"] == len(FORWARDED_VALUE)
    assert report["present"] == ["jobs/configs/probe.yaml"], "credential/data files uploaded"
    assert "forwarded value: ***" in res.stdout, "secret values in streamed logs must be masked"
    assert f"job {sid} SUCCEEDED" in res.stderr
    assert f"warning: forwarding {FORWARDED_NAME}" in res.stderr
    token = ray_cluster.token_path.read_text().strip()
    assert_no_secrets(res.stdout + res.stderr, token)

    info = jobs_client(ray_cluster).get_job_info(sid)
    assert str(info.status) == "SUCCEEDED"
    assert info.metadata["gram.job"] == "evaluate"
    assert info.metadata["gram.config"] == "jobs/configs/probe.yaml"
    assert_no_secrets(info.entrypoint + json.dumps(info.metadata), token)
    env_vars = info.runtime_env["env_vars"]
    assert env_vars[FORWARDED_NAME] == FORWARDED_VALUE, "the explicit opt-in is forwarded"
    for value in [*SENTINELS.values(), token]:
        assert value not in json.dumps(info.runtime_env)


@pytest.mark.slow
def test_failing_job_exits_nonzero_with_its_message(
    ray_cluster, project: Path, client_env: dict[str, str]
):
    sid = "gram-test-probe-fail"
    res = submit_cli(
        project,
        "evaluate",
        "--address", ray_cluster.dashboard_url,
        "--wait",
        "--python", sys.executable,
        "--submission-id", sid,
        "--", "--fail",
        env=client_env,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr[-3000:]
    assert "probe failing on purpose" in res.stdout
    assert f"job {sid} FAILED" in res.stderr
    assert "exit code 3" in res.stderr
    assert_no_secrets(res.stdout + res.stderr)


@pytest.mark.slow
def test_client_without_token_is_refused_clearly(ray_cluster, project: Path, tmp_path: Path):
    url = ray_cluster.dashboard_url
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(f"{url}/api/jobs/", timeout=10)
    assert raw.value.code == 401, "the cluster itself must refuse unauthenticated requests"

    environ = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    environ["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    cfg = SubmitConfig(
        job="evaluate",
        address=url,
        working_dir=str(project),
        python=sys.executable,
        submission_id="gram-test-no-token",
    )
    err = io.StringIO()
    assert run(cfg, environ=environ, out=io.StringIO(), err=err) == EXIT_CLUSTER
    text = err.getvalue()
    assert "requires an auth token and none was found" in text
    assert "RAY_AUTH_TOKEN_PATH" in text
    assert "kubectl get secret gram-ray-auth" in text
    ids = [job.submission_id for job in jobs_client(ray_cluster).list_jobs()]
    assert "gram-test-no-token" not in ids


@pytest.mark.slow
def test_wrong_token_is_refused_clearly(ray_cluster, project: Path):
    wrong = "wrong-token-0123456789abcdef"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=wrong)
    cfg = SubmitConfig(
        job="evaluate",
        address=ray_cluster.dashboard_url,
        working_dir=str(project),
        python=sys.executable,
        submission_id="gram-test-wrong-token",
    )
    err = io.StringIO()
    assert run(cfg, environ=environ, out=io.StringIO(), err=err) == EXIT_CLUSTER
    text = err.getvalue()
    assert "rejected the auth token from $RAY_AUTH_TOKEN" in text
    assert wrong not in text


@pytest.mark.slow
def test_printed_ray_job_submit_command_works(
    ray_cluster, project: Path, client_env: dict[str, str]
):
    res = submit_cli(
        project,
        "evaluate",
        "--address", ray_cluster.dashboard_url,
        "--wait",
        "--dry-run",
        "--python", sys.executable,
        "--config", "jobs/configs/probe.yaml",
        "--submission-id", "gram-test-plain-cli",
        "steps=7",
        env=client_env,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "nothing submitted" in res.stderr
    command = next(
        line.removeprefix("equivalent:").strip()
        for line in res.stderr.splitlines()
        if line.startswith("equivalent:")
    )
    assert_no_secrets(command)
    env = {**client_env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    plain = subprocess.run(
        ["bash", "-c", command],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert plain.returncode == 0, (plain.stdout + plain.stderr)[-3000:]
    assert probe_report(plain.stdout)["args"] == ["--config", "jobs/configs/probe.yaml", "steps=7"]


@pytest.mark.slow
def test_real_preprocessing_job_writes_shards_to_s3(ray_cluster, s3_server, tmp_path: Path):
    if not (REPO / "jobs" / "preprocess.py").is_file():
        pytest.skip("jobs/preprocess.py is not in this tree yet (built by the pipelines part)")
    from pipelines.synthetic import make_demo_dataset

    bucket = s3_server.make_bucket("gram-submit-e2e")
    make_demo_dataset(tmp_path / "raw", count=4)
    client = s3_server.client()
    for path in (tmp_path / "raw").iterdir():
        client.upload_file(str(path), bucket, f"raw/{path.name}")
    # The session cluster's own environment may lack S3 credentials (it can start before the
    # S3 server), so this test uses the documented opt-in; the endpoint comes from the shell.
    env = {**os.environ, **ray_cluster.env, **s3_server.env}
    res = submit_cli(
        REPO,
        "preprocess",
        "--address", ray_cluster.dashboard_url,
        "--wait",
        "--python", sys.executable,
        "--forward-secret", "AWS_ACCESS_KEY_ID",
        "--forward-secret", "AWS_SECRET_ACCESS_KEY",
        "--", "--input", f"s3://{bucket}/raw/", "--output", f"s3://{bucket}/shards/",
        "execution.mode=ray",  # shard tasks on the cluster, joined from the submitted driver
        env=env,
    )  # fmt: skip
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "ray)" in res.stdout + res.stderr  # the summary names where the shards ran
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert {"shards/index.json", "shards/manifest.parquet"} <= keys
    assert any(k.startswith("shards/") and k.endswith(".tar") for k in keys)
    assert s3_server.secret_key not in res.stdout + res.stderr

"""Real services for tests: a 2-node Ray cluster, an S3-speaking server, an MLflow server.

Each runs as real processes on 127.0.0.1 with its own temp folder and ports,
and is stopped by killing exactly the processes it started (never `ray stop`,
which would stop every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_http(
    url: str, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll `url` until it answers with a status < 500, or fail with a clear error."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:  # answering, e.g. 401 behind token auth
                return
            last = exc
        except Exception as exc:
            last = exc
        time.sleep(0.25)
    raise TimeoutError(f"{url} did not come up within {timeout:.0f}s (last error: {last})")


def kill_tree(pids: list[int], timeout: float = 10.0) -> None:
    """SIGTERM the given processes and all their descendants, SIGKILL what is left."""
    procs: dict[int, psutil.Process] = {}
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            p = psutil.Process(pid)
            procs[p.pid] = p
            for child in p.children(recursive=True):
                procs[child.pid] = child
    for p in procs.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(list(procs.values()), timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=timeout)


def _own_pids(folder: str, port_suffix: str) -> list[int]:
    """Processes whose arguments contain `folder` or end with `port_suffix`."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        args = p.info.get("cmdline") or []
        if any(folder in a or a.endswith(port_suffix) for a in args):
            found.append(p.info["pid"])
    return [pid for pid in found if pid != os.getpid()]


RAY_TEST_SETTINGS = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
"""Settings for every Ray the tests start, the session's cluster or a job's local Ray.

RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: Ray Train's controller polls its workers every 2 s by
default, and a `ray.train.report` waits until the previous report was collected, so short
test runs that checkpoint every few steps spend much of their time waiting for polls; a
driver hands the setting on to its controller and workers."""


@dataclass
class RayCluster:
    """A Ray cluster of `nodes` raylets on this machine, started with `ray start`.

    Token authentication is on (the secure default): the token lives in the
    cluster's temp folder and `env` carries RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH
    for every client (drivers, `ray job submit`, the Jobs SDK).
    """

    nodes: int = 2
    cpus_per_node: int = 1
    memory_per_node: int = 4 * 1024**3
    object_store_per_node: int = 300 * 1024**2
    temp_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="gr", dir="/tmp")))
    port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)

    @property
    def address(self) -> str:
        """GCS address for `ray.init(address=...)` and `ray start --address`."""
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """Jobs API / dashboard URL for `ray job submit --address`."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def token_path(self) -> Path:
        return self.temp_dir / "auth_token"

    @property
    def env(self) -> dict[str, str]:
        """Environment entries a client needs to reach this cluster: its address and token,
        and RAY_TEST_SETTINGS."""
        return {
            "RAY_ADDRESS": self.address,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            **RAY_TEST_SETTINGS,
        }

    def _ray(self, *args: str) -> None:
        # RAY_ADDRESS reaches every process the nodes start: Ray's own helpers that look the
        # cluster up by themselves (Ray Train's placement group cleaner) would otherwise
        # find every other cluster on this machine too and fail.
        env = {**os.environ, **self.env}
        cmd = [str(VENV_BIN / "ray"), "start", *args, "--disable-usage-stats"]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, check=False)
        if res.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
            )

    def _node_ports(self) -> list[str]:
        # Every per-node port is chosen here, so two clusters (or two nodes) on one
        # machine never fight over Ray's fixed defaults (10001, 52365, ...).
        return [
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--num-cpus={self.cpus_per_node}",
            f"--memory={self.memory_per_node}",
            f"--object-store-memory={self.object_store_per_node}",
        ]

    def start(self) -> RayCluster:
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        try:
            self._ray(
                "--head",
                f"--port={self.port}",
                f"--ray-client-server-port={free_port()}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--temp-dir={self.temp_dir}",
                *self._node_ports(),
            )
            for n in range(1, self.nodes):
                # Each node its own temp folder, as on separate machines (sharing one, every
                # node's log monitor would forward every worker's output to the drivers).
                self._ray(
                    f"--address={self.address}",
                    f"--temp-dir={self.temp_dir / f'node{n}'}",
                    *self._node_ports(),
                )
            wait_for_http(f"{self.dashboard_url}/api/version", timeout=60)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        # Our processes name our temp folder or our GCS port (`--address=IP:PORT`). On
        # SIGTERM the raylets take ~10 s to shut down and the GCS and the autoscaler monitor
        # do not exit at all; this cluster's state is thrown away, so after a short grace
        # whatever is left is killed.
        kill_tree(_own_pids(str(self.temp_dir), f":{self.port}"), timeout=2.0)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@dataclass
class S3Server:
    """moto's standalone S3-speaking server on 127.0.0.1 (data lives in its memory)."""

    port: int = field(default_factory=free_port)
    access_key: str = "gram-test-access"
    secret_key: str = "gram-test-secret"
    region: str = "us-east-1"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Standard AWS environment for clients of this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
        }

    def start(self) -> S3Server:
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for_http(f"{self.endpoint_url}/moto-api/", timeout=30, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            kill_tree([self.proc.pid])
            self.proc = None

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (idempotent) and return it."""
        s3 = self.client()
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=name)
        return name


@dataclass
class MlflowServer:
    """A real `mlflow server` with a sqlite backend and proxied artifacts.

    Artifacts go to `artifacts_destination` (e.g. `s3://bucket/prefix` on the S3 test
    server, with its AWS environment in `extra_env`), by default `<root>/artifacts`.

    MLflow's server-side job runner is off (`MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`,
    unless `extra_env` says otherwise): it serves GenAI features (scorers, trace rollups)
    that gram-ray does not use, and it is 8 more processes per server (`huey_consumer`s)
    that take ~20 CPU-seconds to start, most of it after the server already answers, while
    the tests run on the same 2 cores.
    """

    root: Path
    port: int = field(default_factory=free_port)
    extra_env: dict[str, str] = field(default_factory=dict)
    artifacts_destination: str = ""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        log = (self.root / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [
                str(VENV_BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--backend-store-uri",
                f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination",
                self.artifacts_destination or str(self.root / "artifacts"),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **self.extra_env},
            start_new_session=True,
        )
        wait_for_http(f"{self.url}/health", timeout=120, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
            self.proc = None


@contextlib.contextmanager
def patched_environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

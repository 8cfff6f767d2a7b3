"""Session-wide real services, started once and shared by every test that asks for them.

- `ray_cluster`: a 2-node Ray cluster (1 CPU each, token auth on) via `ray start`;
  its client environment (RAY_ADDRESS, token) is exported for the session, so
  subprocesses and in-process `ray.init()` both reach it.
- `s3_server`: moto's standalone S3 server on 127.0.0.1 with the standard AWS
  environment exported (fake credentials only).
- `mlflow_server`: a real `mlflow server` (sqlite backend, proxied artifacts).
- `shared_data`: the folder $GRAM_SHARED_DATA names (default: shared/data beside the
  project) when present; tests that need it skip otherwise.
- `small_clips`: eight tiny generated clips and their `captions.jsonl`, the raw input of
  the tests that run whole jobs from the command line.

Every test starts from the same global random state (`random`, numpy, torch), so its
draws do not depend on which tests ran before it.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.synthetic import make_demo_dataset
from tests.support.services import MlflowServer, RayCluster, S3Server

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GRAM_SHARED_DATA", REPO.parent / "shared" / "data"))
RAY_GROUP = "ray-cluster"
"""The `xdist_group` of every test on the session's Ray cluster."""


@pytest.fixture(autouse=True)
def _seeded() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"real media not available: {SHARED_DATA} does not exist (set GRAM_SHARED_DATA)"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server().start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    if shutil.which("ffmpeg") is None:
        pytest.fail("ffmpeg is not installed: run `make setup` (it installs ffmpeg)")
    cluster = RayCluster().start()
    saved = {k: os.environ.get(k) for k in cluster.env}
    os.environ.update(cluster.env)
    try:
        yield cluster
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        cluster.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def ray_session(ray_cluster: RayCluster) -> Iterator[RayCluster]:
    """The test process itself connected to the session cluster as a driver."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster.address, log_to_driver=False)
    return ray_cluster


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(root=tmp_path_factory.mktemp("mlflow-server")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def small_clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 8 demo clips (64x48 px, 1 s, 8 fps, a tone or noise) and `captions.jsonl`
    naming them (ids demo_0000..demo_0007, two captions each): preprocessing input small
    enough to run every job on it in seconds."""
    folder = tmp_path_factory.mktemp("small-clips")
    make_demo_dataset(folder, count=8, width=64, height=48, fps=8.0, duration=1.0)
    return folder


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test on the session's Ray cluster goes to one test process (`make test` runs
    `pytest -n 2 --dist loadgroup`): one cluster of 2 CPUs, never two Ray Train runs at once;
    the other tests run in the second process meanwhile. First among the hooks, so that
    pytest-xdist's own hook (which names each test's group in its id) sees the mark."""
    for item in items:
        if {"ray_cluster", "ray_session"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group(RAY_GROUP))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """In a `--dist loadgroup` test process, a Ray-cluster test fails unless pytest-xdist put it
    in its group (it adds `@group` to the test's id; with a pytest it does not fit it adds
    nothing, and the group's tests run in every process at once)."""
    grouped = item.get_closest_marker("xdist_group") is None or "@" in item.nodeid
    if getattr(item.config.option, "loadgroup", False) and not grouped:
        pytest.fail(
            f"pytest-xdist did not group this test under pytest {pytest.__version__}: the "
            "Ray-cluster tests would run in both test processes at once; install the pytest "
            "that pyproject.toml allows (`make setup`)",
            pytrace=False,
        )

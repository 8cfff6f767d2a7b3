"""The S3 endpoint goes away mid-run and comes back: retries carry the run through.

A small TCP proxy (tests/support/proxy.py) stands between the pipeline and the real moto
server; taking it down refuses and cuts every connection (what a restarting MinIO looks
like to clients) while the stored data survives, so the output can be compared with a run
that saw no outage.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import replace

import pytest

from jobs.preprocess import run
from pipelines import storage
from pipelines.config import PreprocessConfig
from pipelines.storage import S3Config, StorageError
from tests.support.proxy import FlakyProxy, reachable

pytestmark = pytest.mark.slow


@pytest.fixture
def proxy(s3_server):
    p = FlakyProxy(s3_server.port)
    p.up()
    yield p
    p.down()


def _tree(output: str, s3: S3Config) -> dict[str, bytes]:
    return {
        f.uri[len(output) :]: storage.read_bytes(f.uri, s3=s3)
        for f in storage.list_files(output, s3=s3)
    }


def test_outage_mid_run_is_survived_and_output_is_unchanged(
    ray_session, s3_server, proxy, media_dir, tmp_path
):
    bucket = s3_server.make_bucket("outage")
    direct = S3Config().resolved()
    rows = []
    for n in range(8):
        name = ["h264_aac.mp4", "short.mp4", "h264_noaudio.mp4", "tall.mp4"][n % 4]
        storage.put_file(f"s3://{bucket}/in/{n}_{name}", media_dir[name].path, s3=direct)
        rows.append({"id": f"c{n}", "video": f"{n}_{name}", "captions": [f"c{n}"]})
    storage.put_bytes(
        f"s3://{bucket}/in/m.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode(), s3=direct
    )

    def config(output: str, s3: S3Config) -> PreprocessConfig:
        cfg = PreprocessConfig(input=f"s3://{bucket}/in/m.jsonl", output=output, s3=s3)
        cfg.shards.samples_per_shard = 2
        cfg.execution.mode = "ray"  # shard tasks write to the store through the outage
        cfg.execution.max_tasks_in_flight = 2
        return cfg

    run(config(f"s3://{bucket}/reference", direct))

    flaky = replace(direct, endpoint_url=proxy.url, max_attempts=8, backoff_s=0.5)
    output = f"s3://{bucket}/flaky"

    def outage() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait for the first committed shard
            if storage.exists(f"{output}/_state/shard-000000.json", s3=direct):
                break
            time.sleep(0.05)
        proxy.down()
        # Down for real, and while the run still had shards to fetch, make and write.
        outage_seen.append(not reachable(proxy.port))
        outage_seen.append(not storage.exists(f"{output}/_state/shard-000003.json", s3=direct))
        time.sleep(3.0)
        proxy.up()

    outage_seen: list[bool] = []
    thread = threading.Thread(target=outage)
    thread.start()
    summary = run(config(output, flaky))
    thread.join()
    assert outage_seen == [True, True]
    assert (summary.ok, summary.failed) == (8, 0)
    assert _tree(output, direct) == _tree(f"s3://{bucket}/reference", direct)


def test_outage_longer_than_the_retries_names_the_object(s3_server, proxy, tmp_path):
    bucket = s3_server.make_bucket("outage2")
    cfg = replace(S3Config().resolved(), endpoint_url=proxy.url, max_attempts=3, backoff_s=0.1)
    storage.put_bytes(f"s3://{bucket}/a.bin", b"data", s3=cfg)
    proxy.down()
    with pytest.raises(StorageError, match=r"read s3://outage2/a\.bin failed after 3 attempt"):
        storage.read_bytes(f"s3://{bucket}/a.bin", s3=cfg)
    src = tmp_path / "shard.tar"
    shutil.copyfile(__file__, src)
    with pytest.raises(StorageError, match=r"upload s3://outage2/b\.tar failed after 3 attempt"):
        storage.put_file(f"s3://{bucket}/b.tar", src, s3=cfg)
    proxy.up()
    assert not storage.exists(f"s3://{bucket}/b.tar", s3=cfg)  # nothing half-written
    assert storage.read_bytes(f"s3://{bucket}/a.bin", s3=cfg) == b"data"

"""Preprocessing at scale: shard tasks write their own output, inputs stream in chunks,
duplicate ids are found in bounded memory, and one output takes one job at a time."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from gram.config import ConfigError
from jobs.preprocess import main, run
from pipelines import storage, writer
from pipelines.config import InputsConfig, PreprocessConfig
from pipelines.disk_index import DiskIndex
from pipelines.inputs import ManifestError, iter_inputs, read_inputs
from pipelines.lease import Lease, LeaseHeldError, LeaseRecord, LeaseTimes, StorageLeaseStore
from pipelines.preprocess import OutputBusyError
from pipelines.stages import ClipResult, failed_row
from pipelines.storage import S3Config
from pipelines.writer import commit_shard, write_manifest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def clip_set(media_dir, tmp_path_factory) -> Path:
    """14 inputs: good clips, broken ones, a missing file, a duplicate id, no captions."""
    folder = tmp_path_factory.mktemp("scale-inputs")
    names = ["h264_aac.mp4", "short.mp4", "h264_noaudio.mp4", "broken_text.mp4", "tall.mp4"]
    rows = []
    for n in range(11):
        name = names[n % len(names)]
        shutil.copyfile(media_dir[name].path, folder / f"{n:02d}_{name}")
        rows.append({"id": f"clip.{n:02d}", "video": f"{n:02d}_{name}", "captions": [f"c{n}"]})
    rows.append({"id": "clip.03", "video": "00_h264_aac.mp4", "captions": ["duplicate id"]})
    rows.append({"id": "gone", "video": "missing.mp4", "captions": ["missing file"]})
    rows.append({"id": "quiet", "video": "00_h264_aac.mp4", "captions": [" "]})
    path = folder / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(inputs: Path, out: Path, mode: str, per: int) -> PreprocessConfig:
    cfg = PreprocessConfig(input=str(inputs), output=str(out))
    cfg.frames.size = 64
    cfg.shards.samples_per_shard = per
    cfg.execution.mode = mode  # type: ignore[assignment]
    cfg.execution.clips_per_task = 2
    return cfg


@pytest.mark.parametrize("per", [3, 100], ids=["a-task-per-shard", "one-shard-spread-over-tasks"])
def test_ray_shard_tasks_write_the_same_bytes_as_the_local_run(
    ray_session, clip_set, tmp_path, per
):
    local = run(_config(clip_set, tmp_path / "local", "local", per))
    on_ray = run(_config(clip_set, tmp_path / "ray", "ray", per))
    assert (local.mode, on_ray.mode) == ("local", "ray")
    assert (on_ray.inputs, on_ray.ok, on_ray.failed) == (14, 9, 5)
    assert on_ray.failed_by_reason == {
        "duplicate_id": 1, "no_captions": 1, "not_found": 1, "unreadable": 2,
    }  # fmt: skip
    tree = _tree(tmp_path / "ray")
    assert tree == _tree(tmp_path / "local")
    assert not any(name.startswith("_staging") for name in tree)  # tasks cleaned up after them
    assert "_state/lease.json" not in tree  # released

    # The manifest: a Parquet dataset of one part per shard, and the same rows compacted.
    root = tmp_path / "ray"
    compact = pq.read_table(root / "manifest.parquet")
    parts = sorted((root / "manifest").glob("*.parquet"))
    assert len(parts) == -(-14 // per)
    assert pads.dataset(root / "manifest").to_table().equals(compact)
    assert pd.read_parquet(root / "manifest").equals(compact.to_pandas())
    import ray

    from_ray = ray.data.read_parquet(str(root / "manifest")).to_pandas()
    assert sorted(from_ray["index"]) == list(range(14))
    assert compact.column("index").to_pylist() == list(range(14))


def _rows(count: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for i in range(count):
        rows.append({"id": f"r{i:03d}", "video": f"v/{i}.mp4", "captions": [f"caption {i}"]})
    rows[30]["id"] = "r001"  # a duplicate of a row several chunks before
    rows[31]["captions"] = [""]  # no captions: fails, claims nothing
    rows[32]["id"] = "r031"  # so this one is not a duplicate
    rows[40]["id"] = "a.b"
    rows[45]["id"] = "a_b"  # another id, but not the same safe key: fine
    return rows


def _write(rows: list[dict[str, object]], folder: Path, fmt: str) -> Path:
    path = folder / f"m.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, ["id", "video", "captions"])
        writer.writeheader()
        writer.writerows({**r, "captions": json.dumps(r["captions"])} for r in rows)
        path.write_text(buf.getvalue())
    else:
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=16)
    return path


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_manifests_larger_than_a_chunk_are_streamed(request, tmp_path, fmt, where):
    rows = _rows(60)
    path = _write(rows, tmp_path, fmt)
    uri, s3 = str(path), None
    if where == "s3":
        bucket = request.getfixturevalue("s3_server").make_bucket("stream")
        s3 = S3Config().resolved()
        uri = f"s3://{bucket}/in/{path.name}"
        storage.put_file(uri, path, s3=s3)
        if fmt != "parquet":  # ranged reads: lines cut across ranges come out whole
            lines = list(storage.iter_lines(uri, s3=s3, chunk_bytes=100))
            assert lines == path.read_bytes().splitlines(keepends=True)
    with DiskIndex(tmp_path, cache_mb=1) as index:
        items = list(iter_inputs(uri, InputsConfig(), s3=s3, index=index, chunk_rows=7))
    assert [i.index for i in items] == list(range(60))
    assert [i.id for i in items] == [str(r["id"]) for r in rows]
    line0 = 2 if fmt == "csv" else 1
    assert [i.line for i in items] == list(range(line0, line0 + 60))
    reasons = {i.index: i.reason for i in items if i.reason}
    assert reasons == {30: "duplicate_id", 31: "no_captions"}
    assert f"already used at line {line0 + 1}" in items[30].error
    base = storage.parent(uri)
    assert items[5].video == storage.join(base, "v/5.mp4")


def test_a_prefix_of_more_than_a_listing_page_is_streamed(s3_server, tmp_path):
    bucket = s3_server.make_bucket("listing")
    s3 = S3Config().resolved()
    names = [f"v/{i:04d}.mp4" for i in range(1005)] + ["v/notes.txt"]
    for _ in storage.map_io(
        lambda n: storage.put_bytes(f"s3://{bucket}/{n}", b"x", s3=s3), names, workers=16
    ):
        pass
    captions = "".join(
        json.dumps({"id": f"{i:04d}", "captions": [f"c{i}"]}) + "\n" for i in range(1005)
    )
    storage.put_bytes(f"s3://{bucket}/v/captions.jsonl", captions.encode(), s3=s3)
    with DiskIndex(tmp_path) as index:
        items = list(
            iter_inputs(f"s3://{bucket}/v/", InputsConfig(), s3=s3, index=index, chunk_rows=100)
        )
    assert [i.id for i in items] == [f"{i:04d}" for i in range(1005)]
    assert items[1004].captions == ("c1004",)
    assert all(i.reason is None for i in items)


def test_duplicate_ids_are_found_in_bounded_memory(tmp_path):
    """The ids seen so far live in the on-disk index (1 MB of cache here, far less than
    the ids): the Python heap stays flat from 5,000 to 40,000 rows."""

    def peak_kib(count: int) -> tuple[int, list[str | None]]:
        path = tmp_path / f"m{count}.jsonl"
        with path.open("w") as fh:
            for i in range(count):
                rid = f"id-{(i * 7919) % (count - 100):08d}"  # the last 100 rows repeat earlier ids
                fh.write(json.dumps({"id": rid, "video": f"{i}.mp4", "captions": ["c"]}) + "\n")
        folder = tmp_path / f"index{count}"
        folder.mkdir()
        tracemalloc.start()
        try:
            with DiskIndex(folder, cache_mb=1) as index:
                reasons = [
                    item.reason
                    for item in iter_inputs(str(path), InputsConfig(), index=index, chunk_rows=500)
                ]
            return tracemalloc.get_traced_memory()[1] // 1024, reasons
        finally:
            tracemalloc.stop()

    small, reasons = peak_kib(5_000)
    assert reasons.count("duplicate_id") == 100
    large, reasons = peak_kib(40_000)
    assert reasons.count("duplicate_id") == 100
    assert reasons[:-100].count("duplicate_id") == 0
    folder_size = (tmp_path / "index40000" / "index.sqlite").stat().st_size
    assert folder_size > 2**20  # the index outgrew its 1 MB cache
    print(f"\nheap peak {small} KiB at 5k rows, {large} KiB at 40k; index {folder_size >> 10} KiB")
    assert large - small < 1024, f"the heap grew {large - small} KiB for 8x the rows"


def test_duplicate_ids_can_be_refused_in_a_later_chunk(tmp_path):
    rows = [{"id": f"r{i}", "video": f"{i}.mp4", "captions": ["c"]} for i in range(30)]
    rows[25]["id"] = "r2"
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with (
        DiskIndex(tmp_path) as index,
        pytest.raises(ManifestError, match=r"m\.jsonl:26: id 'r2' already used at line 3"),
    ):
        list(iter_inputs(str(path), InputsConfig(duplicate_ids="error"), index=index, chunk_rows=4))
    assert [i.reason for i in read_inputs(str(path), InputsConfig())].count("duplicate_id") == 1


def _start_job(inputs: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable, "-m", "jobs.preprocess", "--input", str(inputs), "--output", str(out),
        "execution.mode=local", "frames.size=32", *extra,
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0][-2000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_a_second_job_on_the_same_output_is_refused_and_a_dead_holder_is_replaced(
    media_dir, tmp_path, capsys
):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copyfile(media_dir["long.mp4"].path, folder / "long.mp4")
    rows = [{"id": f"l{i}", "video": "long.mp4", "captions": ["x"]} for i in range(12)]
    (folder / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"

    first = _start_job(folder / "m.jsonl", out, "shards.samples_per_shard=2")
    _wait_for(out / "_state" / "lease.json", first)
    assert main(["--input", str(folder / "m.jsonl"), "--output", str(out), "execution.mode=local",
                 "frames.size=32", "shards.samples_per_shard=2"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert f"the output {out} is held by" in err
    assert "use another output" in err
    assert first.wait(timeout=300) == 0, first.communicate()[0][-2000:]
    reference = _tree(out)
    assert len(json.loads((out / "index.json").read_text())["shards"]) == 6

    # A holder killed mid-run leaves its lease behind; on the same machine the next run
    # sees that its process is gone and takes over at once.
    again = tmp_path / "again"
    killed = _start_job(folder / "m.jsonl", again, "shards.samples_per_shard=2")
    _wait_for(again / "_state" / "shard-000000.json", killed)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)
    assert (again / "_state" / "lease.json").exists()
    cfg = PreprocessConfig(input=str(folder / "m.jsonl"), output=str(again))
    cfg.frames.size, cfg.shards.samples_per_shard, cfg.execution.mode = 32, 2, "local"
    start = time.monotonic()
    summary = run(cfg)
    assert summary.processed < 12  # resumed, not redone
    assert time.monotonic() - start < cfg.execution.lease_seconds  # did not wait for expiry
    assert _tree(again) == reference


def _lease(uri: str, s3: S3Config | None, **times: float) -> Lease:
    return Lease(
        StorageLeaseStore(uri, s3=s3),
        LeaseTimes(**{"lease_seconds": 30, "grace_seconds": 0, "wait_seconds": 0, **times}),
        what=f"the output {uri}",
        break_dead_holders=True,
    )


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_output_lease_excludes_others_until_released_or_expired(request, tmp_path, where):
    if where == "s3":
        bucket = request.getfixturevalue("s3_server").make_bucket("lease")
        uri, s3 = f"s3://{bucket}/out/_state/lease.json", S3Config().resolved()
    else:
        uri, s3 = str(tmp_path / "out" / "_state" / "lease.json"), None
    first = _lease(uri, s3).acquire()
    first.keep_alive()
    with pytest.raises(LeaseHeldError, match="is held by"):
        _lease(uri, s3).acquire()
    first.renew()
    first.check()
    first.release()
    assert not storage.exists(uri, s3=s3)

    # A holder on another machine (unknown process) that stopped renewing: refused until
    # its lease has expired, then broken and taken over.
    foreign = LeaseRecord(owner="f00", holder="elsewhere:1", expires=time.time() + 1.0)
    store = StorageLeaseStore(uri, s3=s3)
    foreign = store.create(foreign)
    assert foreign is not None
    with pytest.raises(LeaseHeldError, match="elsewhere:1"):
        _lease(uri, s3).acquire()
    time.sleep(1.2)
    second = _lease(uri, s3).acquire()
    assert store.read().owner == second.token
    assert store.renew(foreign, time.time() + 60) is None  # the broken holder cannot renew
    second.release()


def test_a_lease_time_too_short_is_refused():
    with pytest.raises(ConfigError, match=r"execution\.lease_seconds"):
        PreprocessConfig().execution.__class__(lease_seconds=1)


def test_a_busy_output_is_its_own_error(tmp_path):
    out = tmp_path / "out"
    holder = _lease(str(out / "_state" / "lease.json"), None, lease_seconds=60).acquire()
    try:
        (tmp_path / "m.jsonl").write_text(
            json.dumps({"id": "a", "video": "a.mp4", "captions": ["x"]})
        )
        with pytest.raises(OutputBusyError, match="is held by"):
            run(PreprocessConfig(input=str(tmp_path / "m.jsonl"), output=str(out)))
        assert not (out / "_state" / "run.json").exists()  # nothing written
    finally:
        holder.release()


def test_the_compacted_manifest_groups_whole_shards_past_its_row_group_cap(tmp_path, monkeypatch):
    """One row group per shard up to the cap (the layout of every earlier run), several
    whole shards per row group beyond it, with the same rows either way."""
    rows = [{"id": f"r{i}", "video": f"{i}.mp4", "captions": ["c"]} for i in range(10)]
    items = read_inputs(str(_write(rows, tmp_path, "jsonl")), InputsConfig())
    out = str(tmp_path / "out")
    for shard in range(5):
        results = (
            ClipResult(i.index, b"", failed_row(i, "not_found", f"no {i.video}"))
            for i in items[2 * shard : 2 * shard + 2]
        )
        commit_shard(out, "shard", shard, results, s3=None)
    per_shard = pq.ParquetFile(write_manifest(out, "shard", range(5), s3=None)[0])
    assert per_shard.metadata.num_row_groups == 5
    rows = per_shard.read().to_pylist()
    monkeypatch.setattr(writer, "MANIFEST_MAX_ROW_GROUPS", 2)
    uri, totals = write_manifest(out, "shard", range(5), s3=None)
    grouped = pq.ParquetFile(uri)
    groups = [grouped.metadata.row_group(g).num_rows for g in range(grouped.num_row_groups)]
    assert groups == [6, 4]  # 3 shards, then 2
    assert grouped.read().to_pylist() == rows
    assert (totals.ok, totals.failed) == (0, 10)

"""End to end on the shared 2-node Ray cluster: local paths, real S3 (moto), real media.

Outputs are read back with the `webdataset` library, `ray.data.read_webdataset`
and `tar`, and checked sample by sample against the inputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile
import webdataset as wds
from PIL import Image

from gram.schema import ClipMeta, frame_suffix, validate_key
from jobs.preprocess import main, run
from pipelines import storage
from pipelines.config import PreprocessConfig
from pipelines.index import read_listing
from pipelines.preprocess import FailureRateError
from pipelines.storage import S3Config
from tests.pipelines.conftest import SHELL_NAME

pytestmark = pytest.mark.slow

GOOD = {  # id -> fixture clip
    "h264": "h264_aac.mp4",
    "noaudio": "h264_noaudio.mp4",
    "webm": "vp9_opus.webm",
    "avi": "mpeg4_mp3.avi",
    "mkv": "vp8_vorbis.mkv",
    "rotated": "rotated90.mp4",
    "vfr": "vfr.mp4",
    "short": "short.mp4",
    "tall": "tall.mp4",
    "shell": SHELL_NAME,
    "dotted.id/with slash ü": "h264_aac.mp4",
}
BAD = {  # id -> (fixture clip or None for a missing file, expected reason)
    "zero": ("broken_empty.mp4", "empty_file"),
    "truncated": ("broken_truncated.mp4", "unreadable"),
    "text": ("broken_text.mp4", "unreadable"),
    "image": ("broken_image.mp4", "not_a_video"),
    "audio_only": ("broken_audio_only.mp4", "no_video"),
    "missing": (None, "not_found"),
}


def _build_inputs(media_dir, folder: Path) -> Path:
    """Copy fixture clips into `folder` and write `inputs.jsonl` (relative paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for rid, name in GOOD.items():
        shutil.copyfile(media_dir[name].path, folder / name)
        rows.append({"id": rid, "video": name, "captions": [f"caption of {rid}", "second"]})
    rows.append(
        {
            "id": "sep_audio",
            "video": "h264_noaudio.mp4",
            "audio": "sep.m4a",
            "captions": ["video with a separate audio file"],
        }
    )
    shutil.copyfile(media_dir["broken_audio_only.mp4"].path, folder / "sep.m4a")
    for rid, (name, _) in BAD.items():
        if name is not None:
            shutil.copyfile(media_dir[name].path, folder / name)
        rows.append({"id": rid, "video": name or "does-not-exist.mp4", "captions": [rid]})
    rows.append({"id": "h264", "video": "h264_aac.mp4", "captions": ["duplicate id"]})
    rows.append({"id": "nocaption", "video": "h264_aac.mp4", "captions": [""]})
    path = folder / "inputs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def _config(inp: str, out: str, **groups) -> PreprocessConfig:
    cfg = PreprocessConfig(input=inp, output=out)
    cfg.shards.samples_per_shard = 5
    cfg.execution.clips_per_task = 2
    cfg.execution.progress_interval_s = 1.0
    for group, values in groups.items():
        for key, value in values.items():
            setattr(getattr(cfg, group), key, value)
    return cfg


def _local_copy(output: str, s3: S3Config | None, dest: Path) -> Path:
    """The output tree as local files (downloaded when on S3)."""
    if not storage.is_s3(output):
        return Path(output)
    for f in storage.list_files(output, s3=s3):
        target = dest / f.uri[len(output.rstrip("/")) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        storage.download(f.uri, target, s3=s3)
    return dest


def _check_output(root: Path, inputs: Path, media_dir) -> None:
    """Every input accounted for; every sample equal to what its input says."""
    index = json.loads((root / "index.json").read_text())
    manifest = pq.read_table(root / "manifest.parquet").to_pylist()
    rows = [json.loads(line) for line in inputs.read_text("utf-8").splitlines()]
    assert len(manifest) == len(rows)
    assert [m["index"] for m in manifest] == list(range(len(rows)))
    by_id = {m["id"]: m for m in manifest if m["status"] == "ok"}
    statuses = [m["status"] for m in manifest]
    assert statuses.count("ok") + statuses.count("failed") == len(rows)
    assert index["totals"]["ok"] == statuses.count("ok") == len(GOOD) + 1
    reasons = {m["id"]: m["reason"] for m in manifest if m["status"] == "failed"}
    for rid, (_, reason) in BAD.items():
        assert reasons[rid] == reason, (rid, [m for m in manifest if m["id"] == rid])
    failed_rows = [m for m in manifest if m["status"] == "failed"]
    assert sorted(m["reason"] for m in failed_rows if m["id"] in ("h264", "nocaption")) == [
        "duplicate_id",
        "no_captions",
    ]
    assert all(m["error"] for m in failed_rows)

    shards = sorted(root.glob("*.tar"))
    assert [s.name for s in shards] == [s["name"] for s in index["shards"]]
    for entry in index["shards"]:
        data = (root / entry["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(data) == entry["bytes"]
        listed = subprocess.run(
            ["tar", "-tf", str(root / entry["name"])], capture_output=True, text=True, check=True
        ).stdout.split()
        assert len({n.split(".", 1)[0] for n in listed}) == entry["samples"]

    samples = list(wds.WebDataset([str(s) for s in shards], shardshuffle=False, empty_check=False))
    assert len(samples) == len(by_id)
    captions_of = {r["id"]: r["captions"] for r in reversed(rows)}  # the first row of an id
    for sample in samples:
        meta = ClipMeta.from_json(json.loads(sample["json"]))
        row = by_id[meta.id]
        validate_key(sample["__key__"])
        assert sample["__key__"] == row["key"]
        assert row["shard"] == Path(sample["__url__"]).name
        assert json.loads(sample["captions.json"]) == captions_of[meta.id]
        assert meta.config_hash == index["config_hash"]
        assert len(meta.frame_times) == 8
        for i in range(8):
            assert Image.open(io.BytesIO(sample[frame_suffix(i)])).size == (224, 224)
        clip = GOOD.get(meta.id)
        if clip is not None:
            spec = media_dir[clip].spec
            assert meta.duration == pytest.approx(spec.duration, abs=0.25)
            assert meta.has_audio == (spec.audio_codec is not None)
        if meta.id == "sep_audio":
            assert meta.has_audio
            assert meta.audio_source.endswith("sep.m4a")
        assert row["has_audio"] == meta.has_audio
        if meta.has_audio:
            pcm, rate = soundfile.read(io.BytesIO(sample["flac"]), dtype="int16")
            assert rate == 16_000
            assert pcm.shape == (round(min(meta.duration, 10.0) * 16_000),)
            assert meta.audio_samples == pcm.shape[0]
            assert np.abs(pcm.astype(float)).mean() > 100
        else:
            assert "flac" not in sample


def test_local_folder_end_to_end(ray_session, media_dir, tmp_path):
    inputs = _build_inputs(media_dir, tmp_path / "in")
    out = tmp_path / "out"
    summary = run(_config(str(inputs), str(out)))
    assert summary.inputs == len(GOOD) + 1 + len(BAD) + 2
    assert summary.ok + summary.failed == summary.inputs
    assert summary.failed_by_reason["duplicate_id"] == 1
    _check_output(out, inputs, media_dir)

    import ray

    ds = ray.data.read_webdataset(str(out), file_extensions=["tar"], decoder=False)
    keys = sorted(r["__key__"] for r in ds.iter_rows())
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert keys == sorted(m["key"] for m in manifest if m["status"] == "ok")

    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("*.tar")}
    again = run(_config(str(inputs), str(out)))  # idempotent: nothing redone
    assert (again.processed, again.shards_written, again.ok) == (0, 0, summary.ok)
    assert before == {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("*.tar")}


def test_s3_end_to_end(ray_session, s3_server, media_dir, tmp_path):
    bucket = s3_server.make_bucket("e2e")
    s3 = S3Config().resolved()
    local_inputs = _build_inputs(media_dir, tmp_path / "in")
    for path in local_inputs.parent.iterdir():
        storage.put_file(f"s3://{bucket}/raw/{path.name}", path, s3=s3)
    output = f"s3://{bucket}/shards/run1"
    summary = run(_config(f"s3://{bucket}/raw/inputs.jsonl", output))
    assert summary.ok == len(GOOD) + 1
    root = _local_copy(output, s3, tmp_path / "copy")
    _check_output(root, local_inputs, media_dir)
    missing = next(
        m for m in pq.read_table(root / "manifest.parquet").to_pylist() if m["id"] == "missing"
    )
    assert "s3://e2e/raw/does-not-exist.mp4" in missing["error"]

    import ray

    fs, path = storage.pyarrow_filesystem(output, s3=s3)
    ds = ray.data.read_webdataset(path, filesystem=fs, file_extensions=["tar"], decoder=False)
    assert ds.count() == summary.ok


def test_real_media_clips(ray_session, shared_data, tmp_path):
    manifest = shared_data / "media" / "captions.jsonl"
    out = tmp_path / "out"
    summary = run(_config(str(manifest), str(out)))
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert summary.ok == len(rows) == 6, [r["error"] for r in rows]
    by_id = {r["id"]: r for r in rows}
    assert by_id["video9771"]["has_audio"] is False
    assert all(r["has_audio"] for k, r in by_id.items() if k != "video9771")
    samples = {
        s["__key__"]: s
        for s in wds.WebDataset(
            [str(p) for p in sorted(out.glob("*.tar"))], shardshuffle=False, empty_check=False
        )
    }
    assert json.loads(samples["big_buck_bunny_0_30"]["captions.json"]) == [
        "an animated forest scene with a large rabbit",
        "cartoon animals in a meadow",
    ]
    bunny = ClipMeta.from_json(json.loads(samples["big_buck_bunny_0_30"]["json"]))
    assert bunny.audio_samples == 160_000  # 30 s clip, audio.max_seconds = 10


def test_too_many_failures_abort_with_a_manifest_but_no_index(ray_session, media_dir, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rows = []
    for n, name in enumerate(["broken_empty.mp4", "broken_text.mp4", "h264_aac.mp4"]):
        shutil.copyfile(media_dir[name].path, folder / name)
        rows.append({"id": f"c{n}", "video": name, "captions": ["x"]})
    (folder / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(FailureRateError, match=r"2 of 3 inputs failed") as err:
        run(_config(str(folder / "m.jsonl"), str(tmp_path / "out")))
    assert err.value.summary.failed_by_reason == {"empty_file": 1, "unreadable": 1}
    assert len(pq.read_table(tmp_path / "out" / "manifest.parquet")) == 3
    assert not (tmp_path / "out" / "index.json").exists()
    lenient = _config(
        str(folder / "m.jsonl"), str(tmp_path / "out"), execution={"max_failure_rate": 0.9}
    )
    assert run(lenient).index_uri is not None


def test_rerun_with_another_config_is_refused(ray_session, media_dir, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copyfile(media_dir["short.mp4"].path, folder / "a.mp4")
    (folder / "m.jsonl").write_text(json.dumps({"id": "a", "video": "a.mp4", "captions": ["x"]}))
    cfg = _config(str(folder / "m.jsonl"), str(tmp_path / "out"))
    run(cfg)
    other = dataclasses.replace(cfg, frames=dataclasses.replace(cfg.frames, size=112))
    from pipelines.writer import OutputConflictError

    with pytest.raises(OutputConflictError, match=r"frames\.size: was 224, now 112"):
        run(other)


def test_s3_prefix_of_real_clips_read_back_by_streaming(
    ray_session, s3_server, shared_data, tmp_path
):
    """A prefix of videos plus captions.jsonl keyed by stem, as users keep them in MinIO/S3."""
    bucket = s3_server.make_bucket("prefix")
    s3 = S3Config().resolved()
    for path in sorted((shared_data / "media").iterdir()):
        storage.put_file(f"s3://{bucket}/videos/{path.name}", path, s3=s3)
    output = f"s3://{bucket}/shards"
    summary = run(_config(f"s3://{bucket}/videos/", output))
    assert (summary.inputs, summary.ok) == (6, 6)
    keys = []
    for shard in read_listing(output, s3=s3).shards:  # what a training job does: no copy
        stream = storage.open_read(shard.url, s3=s3)
        with stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            keys += [
                m.name.split(".", 1)[0]
                for m in tar
                if m.name.endswith(".json") and not m.name.endswith(".captions.json")
            ]
    assert sorted(keys) == sorted(
        ["video9770", "video9771", "chaplin", "fire2", "big_buck_bunny_0_30", "ucf101_sample"]
    )


def test_secrets_never_reach_logs_or_outputs(ray_session, media_dir, tmp_path, capfd):
    sentinel_key, sentinel_secret = "AKIASENTINEL0KEY0ID", "sentinel/secret+value/0123456789"
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copyfile(media_dir["short.mp4"].path, folder / "a.mp4")
    (folder / "m.jsonl").write_text(json.dumps({"id": "a", "video": "a.mp4", "captions": ["x"]}))
    out = tmp_path / "out"
    code = main(
        [
            "--input",
            str(folder / "m.jsonl"),
            "--output",
            str(out),
            f"s3.access_key_id={sentinel_key}",
            f"s3.secret_access_key={sentinel_secret}",
            "execution.progress_interval_s=0.1",
        ]
    )
    assert code == 0
    captured = capfd.readouterr()
    texts = [captured.out, captured.err]
    texts += [p.read_bytes().decode("utf-8", "replace") for p in out.rglob("*") if p.is_file()]
    for text in texts:
        assert sentinel_key not in text
        assert sentinel_secret not in text

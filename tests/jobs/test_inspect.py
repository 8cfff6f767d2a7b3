"""`gram inspect` on real preprocessing outputs (generated clips and the real media of
$GRAM_SHARED_DATA), local and on the S3 test server: the summary, the contact sheet, and the
retrieval picture's content."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from gram.shards import ShardInfo
from jobs.common.contact_sheet import retrieval_rows
from jobs.inspect import sheet_entries
from pipelines.config import PreprocessConfig
from pipelines.output import read_output
from pipelines.preprocess import preprocess
from pipelines.samples_to_shards import write_sample_shards
from pipelines.storage import S3Config
from pipelines.synthetic import ClipSpec, make_broken, make_clip

REPO = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"
RED = "color=c=red:size=160x120:rate=25"


def _preprocess(rows: list[dict], folder: Path, per_shard: int = 2) -> Path:
    (folder / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = PreprocessConfig(input=str(folder / "in.jsonl"), output=str(folder / "out"))
    cfg.shards.samples_per_shard = per_shard
    cfg.execution.mode = "local"  # in this process: no Ray needed to make the fixture
    preprocess(cfg)
    return folder / "out"


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """A red clip with a tone, a blue one without audio, a text file named .mp4 and a missing
    file: 2 ok, 2 failed rows."""
    root = tmp_path_factory.mktemp("inspect")
    make_clip(ClipSpec(duration=2.0, video_source=RED, width=160, height=120), root / "red.mp4")
    make_clip(
        ClipSpec(duration=3.0, fps=10, audio_codec=None, width=160, height=120,
                 video_source="color=c=blue:size=160x120:rate=10"),
        root / "blue.mp4",
    )  # fmt: skip
    make_broken("text", root / "notes.mp4")
    rows = [
        {"id": "red", "video": str(root / "red.mp4"), "captions": ["a red screen and a tone"]},
        {"id": "blue", "video": str(root / "blue.mp4"), "captions": ["a silent blue screen"]},
        {"id": "notes", "video": str(root / "notes.mp4"), "captions": ["a text file"]},
        {"id": "gone", "video": str(root / "gone.mp4"), "captions": ["nothing"]},
    ]
    return _preprocess(rows, root)


def _inspect(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`gram inspect ...` through the `gram` command's job list, output piped (not a TTY)."""
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", "inspect", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_summary_counts_statuses_reasons_missing_audio_and_histograms(generated):
    res = _inspect(str(generated))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert f"{generated}: 4 inputs, from manifest.parquet" in out
    assert "index: 1 shards, 2 samples" in out  # the second shard's inputs all failed
    assert "status: ok 2, failed 2" in out
    assert "  not_found " in out
    assert "  unreadable " in out
    assert "e.g. 'notes': not a readable media file" in out
    assert "missing modalities (of 2 ok inputs): audio 1, video 0, text 0" in out
    assert "duration of ok inputs: min 2.00 s, median 2.50 s, max 3.00 s" in out
    assert "10.00 fps |" in out
    assert "25.00 fps |" in out
    assert res.stderr.strip() == ""


def test_contact_sheet_draws_frames_audio_and_the_failed_rows(generated, tmp_path):
    sheet = tmp_path / "sheet.png"
    res = _inspect(str(generated), "--samples", "10", "--out", str(sheet))
    assert res.returncode == 0, res.stderr
    assert "contact sheet of 4 inputs (2 failed)" in res.stdout
    assert sheet.read_bytes().startswith(PNG)
    pixels = np.asarray(Image.open(sheet).convert("RGB")).astype(int)  # [H, W, 3]
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    blue = (pixels[..., 2] > 200) & (pixels[..., 0] < 60) & (pixels[..., 1] < 60)
    assert red.sum() > 5000
    assert blue.sum() > 5000

    entries = sheet_entries(read_output(str(generated), S3Config()), 10, 0, S3Config())
    by_key = {e.key: e for e in entries}
    assert [e.status for e in entries] == ["ok", "ok", "failed", "failed"]  # input order
    assert len(by_key["red"].frames) == 8
    assert by_key["red"].frames[0].shape == (224, 224, 3)
    assert by_key["red"].audio is not None
    assert by_key["red"].audio.shape == (32000,)
    assert by_key["blue"].audio is None
    assert "no audio track" in by_key["blue"].detail
    assert by_key["red"].captions == ["a red screen and a tone"]
    failed = [e for e in entries if e.status == "failed"]
    assert failed[0].detail.startswith("unreadable: ")
    assert failed[0].frames == []
    assert failed[1].detail.startswith("not_found: ")
    assert failed[1].source.endswith("gone.mp4")
    two = sheet_entries(read_output(str(generated), S3Config()), 2, 0, S3Config())
    assert len(two) == 2


def test_an_s3_output_reads_like_a_local_one(generated, s3_server, tmp_path):
    bucket = s3_server.make_bucket("inspect")
    client = s3_server.client()
    for path in generated.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"out/{path.relative_to(generated)}")
    local = _inspect(str(generated)).stdout.splitlines()
    remote = _inspect(f"s3://{bucket}/out", env={**os.environ, **s3_server.env})
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout.splitlines()[1:] == local[1:]
    res = _inspect(f"s3://{bucket}/out", "--out", f"s3://{bucket}/sheets/sheet.png")
    assert res.returncode == 0, res.stderr
    body = client.get_object(Bucket=bucket, Key="sheets/sheet.png")["Body"].read()
    assert body.startswith(PNG)


def test_real_clips_with_and_without_audio_and_a_failed_row(shared_data, tmp_path):
    media = shared_data / "media"
    rows = [
        {"id": "video9770", "video": str(media / "video9770.mp4"), "captions": ["with sound"]},
        {"id": "video9771", "video": str(media / "video9771.mp4"), "captions": ["silent"]},
        {"id": "bad", "video": str(tmp_path / "bad.mp4"), "captions": ["broken"]},
    ]
    make_broken("truncated", tmp_path / "bad.mp4", source=media / "fire2.mp4")
    out = _preprocess(rows, tmp_path, per_shard=3)
    res = _inspect(str(out))
    assert res.returncode == 0, res.stderr
    assert "status: ok 2, failed 1" in res.stdout
    assert "missing modalities (of 2 ok inputs): audio 1" in res.stdout
    line = next(x for x in res.stdout.splitlines() if x.startswith("duration of ok inputs"))
    low, _, high = (float(v) for v in re.findall(r"(\d+\.\d+) s", line))
    assert (low, high) == (pytest.approx(11.0, abs=0.1), pytest.approx(14.0, abs=0.1))
    entries = sheet_entries(read_output(str(out), S3Config()), 3, 0, S3Config())
    speech, silent, bad = entries
    assert speech.audio is not None
    assert np.abs(speech.audio).max() > 0.05
    assert silent.audio is None
    assert silent.status == "ok"
    assert bad.status == "failed"
    assert bad.detail.split(":")[0] in ("unreadable", "decode_failed")
    assert np.std(speech.frames[0]) > 10  # a real picture, not a flat colour
    sheet = tmp_path / "sheet.png"
    assert _inspect(str(out), "--out", str(sheet)).returncode == 0
    assert Image.open(sheet).size[1] > 300


def test_outputs_without_a_manifest_or_without_an_index(generated, tmp_path):
    from gram.synthetic import SyntheticClips

    write_sample_shards(SyntheticClips(6, seed=3), str(tmp_path / "synthetic"), samples_per_shard=4)
    res = _inspect(str(tmp_path / "synthetic"))
    assert res.returncode == 0, res.stderr
    assert "6 inputs, from the samples' metadata (no manifest)" in res.stdout
    assert "status: ok 6, failed 0" in res.stdout

    unfinished = shutil.copytree(generated, tmp_path / "unfinished")
    (unfinished / "index.json").unlink()
    res = _inspect(str(unfinished), "--out", str(tmp_path / "u.png"))
    assert res.returncode == 0, res.stderr
    assert "contact sheet of 4 inputs (2 failed)" in res.stdout

    res = _inspect(str(tmp_path / "nothing"))
    assert res.returncode == 2
    assert "neither index.json nor manifest.parquet" in res.stderr


def test_retrieval_rows_rank_each_caption_and_mark_its_own_clip(tmp_path):
    """Caption i lies in the span of clip i's video and audio (volume ~0) and leans towards
    clip i + 1: the rows name clip i first, marked as the match, with its caption read back
    from the shards."""
    from gram.synthetic import SyntheticClips

    clips = SyntheticClips(6, seed=4)
    write_sample_shards(clips, str(tmp_path / "eval"), samples_per_shard=4)
    keys = sorted(clips[i]["__key__"] for i in range(6))
    e, e_next = torch.eye(8)[:6], torch.roll(torch.eye(8), -1, dims=0)[:6]  # [6, 8] each
    unit = torch.nn.functional.normalize
    emb = SimpleNamespace(
        keys=keys,
        items={"video": e, "audio": unit(e + 0.2 * e_next, dim=1)},
        present=torch.ones(6, 2, dtype=torch.bool),
        text=unit(e + 0.3 * e_next, dim=1),
        text_to_item=torch.arange(6),
    )
    shards = [ShardInfo(str(tmp_path / "eval" / f"shard-00000{i}.tar"), 0) for i in range(2)]
    rows = retrieval_rows(emb, shards, None, queries=3, k=2)
    assert [r.key for r in rows] == [keys[0], keys[2], keys[5]]
    for row in rows:
        assert row.results[0].key == row.key
        assert row.results[0].match
        assert not row.results[1].match
        assert row.results[0].score < row.results[1].score
        assert row.results[0].frame is not None
        assert row.results[0].frame.ndim == 3
        own = next(clips[i] for i in range(6) if clips[i]["__key__"] == row.key)
        assert row.caption == json.loads(own["captions.json"])[0]

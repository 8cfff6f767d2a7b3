"""Each per-clip stage on its own, then the chain's failure rows, on real ffmpeg-made media.

One class per stage (Fetch, Probe, Decode, Pack): a stage gets a `ClipTask`
holding what the stages before it would have set, and its outputs (or the
MediaError it raises) are checked. `TestProcessItem` checks that every
failure becomes exactly one failed row with its reason.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from gram.schema import SAMPLE_RATE, ClipMeta
from pipelines import PIPELINE_VERSION
from pipelines.config import PreprocessConfig
from pipelines.inputs import InputItem
from pipelines.media import MediaError
from pipelines.stages import (
    ClipTask,
    DecodeStage,
    FetchStage,
    PackStage,
    ProbeStage,
    build_stages,
    process_item,
)
from pipelines.storage import S3Config, StorageNotFoundError


def _item(video: str, *, audio: str | None = None, **kw) -> InputItem:
    fields = {"index": 3, "line": 4, "id": "clip/one", "key": "clip_one", "captions": ("a", "b")}
    return InputItem(video=video, audio=audio, **{**fields, **kw})


def _task(tmp_path: Path, item: InputItem, **kw) -> ClipTask:
    return ClipTask(item=item, workdir=tmp_path, deadline=time.monotonic() + 60, **kw)


def _probed(tmp_path: Path, path: Path, *, audio: str = "") -> ClipTask:
    """A task as Fetch and Probe leave it."""
    task = _task(tmp_path, _item(str(path), audio=audio or None))
    task.video_path, task.audio_path = str(path), audio
    ProbeStage(num_segments=8, frames_per_segment=1).process(task)
    return task


def _decode_stage(**kw) -> DecodeStage:
    args = {"size": 224, "jpeg_quality": 90, "seek_above_s": 60.0, "max_seconds": 10.0}
    return DecodeStage(**{**args, **kw})


class TestFetchStage:
    def test_local_files_are_used_in_place(self, media_dir, tmp_path):
        video, audio = media_dir["h264_aac.mp4"].path, media_dir["vp9_opus.webm"].path
        task = _task(tmp_path, _item(str(video), audio=str(audio)))
        FetchStage(s3=S3Config()).process(task)
        assert (task.video_path, task.audio_path) == (str(video), str(audio))
        assert list(tmp_path.iterdir()) == []  # nothing copied

    def test_s3_objects_are_downloaded_into_the_clip_workdir(self, s3_server, media_dir, tmp_path):
        bucket = s3_server.make_bucket("stages")
        data = media_dir["h264_aac.mp4"].path.read_bytes()
        s3_server.client().put_object(Bucket=bucket, Key="in/a.mp4", Body=data)
        task = _task(tmp_path, _item(f"s3://{bucket}/in/a.mp4"))
        FetchStage(s3=S3Config()).process(task)
        assert Path(task.video_path).parent == tmp_path
        assert Path(task.video_path).suffix == ".mp4"
        assert Path(task.video_path).read_bytes() == data

    def test_empty_s3_object_is_empty_file(self, s3_server, tmp_path):
        bucket = s3_server.make_bucket("stages")
        s3_server.client().put_object(Bucket=bucket, Key="in/empty.mp4", Body=b"")
        with pytest.raises(MediaError) as err:
            FetchStage(s3=S3Config()).process(_task(tmp_path, _item(f"s3://{bucket}/in/empty.mp4")))
        assert err.value.reason == "empty_file"

    @pytest.mark.parametrize(
        ("name", "reason"),
        [("broken_empty.mp4", "empty_file"), (".", "not_a_file")],
    )
    def test_empty_file_or_folder_raise_their_reason(self, media_dir, tmp_path, name, reason):
        target = media_dir["broken_empty.mp4"].path.parent / name
        with pytest.raises(MediaError) as err:
            FetchStage(s3=S3Config()).process(_task(tmp_path, _item(str(target))))
        assert err.value.reason == reason

    def test_missing_file_is_not_found_and_named(self, tmp_path):
        with pytest.raises(StorageNotFoundError, match=r"missing\.mp4"):
            FetchStage(s3=S3Config()).process(_task(tmp_path, _item(str(tmp_path / "missing.mp4"))))

    def test_a_bad_separate_audio_file_fails_too(self, media_dir, tmp_path):
        task = _task(
            tmp_path, _item(str(media_dir["h264_aac.mp4"].path), audio=str(tmp_path / "no.wav"))
        )
        with pytest.raises(StorageNotFoundError):
            FetchStage(s3=S3Config()).process(task)


class TestProbeStage:
    def test_sets_the_clip_info_and_the_segment_midpoints(self, media_dir, tmp_path):
        fx = media_dir["h264_aac.mp4"]
        task = _probed(tmp_path, fx.path)
        assert task.info is not None
        assert task.info.duration == pytest.approx(fx.spec.duration, abs=0.05)
        assert (task.info.width, task.info.height, task.info.has_audio) == (320, 240, True)
        assert task.info.fps == pytest.approx(25.0)
        segment = task.info.duration / 8
        assert task.times == pytest.approx([segment * (k + 0.5) for k in range(8)], abs=1e-6)

    def test_frames_per_segment_spreads_times_inside_each_segment(self, media_dir, tmp_path):
        task = _task(tmp_path, _item(str(media_dir["h264_aac.mp4"].path)))
        task.video_path = str(media_dir["h264_aac.mp4"].path)
        ProbeStage(num_segments=2, frames_per_segment=2).process(task)
        assert task.info is not None
        quarter = task.info.duration / 4
        assert task.times == pytest.approx([quarter * (k + 0.5) for k in range(4)], abs=1e-6)

    def test_rotated_clip_reports_its_displayed_size(self, media_dir, tmp_path):
        task = _probed(tmp_path, media_dir["rotated90.mp4"].path)
        assert task.info is not None
        assert task.info.rotation in (90, 270)
        assert (task.info.width, task.info.height) == (180, 320)

    @pytest.mark.parametrize(
        ("name", "reason"),
        [
            ("broken_truncated.mp4", "unreadable"),
            ("broken_text.mp4", "unreadable"),
            ("broken_image.mp4", "not_a_video"),
            ("broken_audio_only.mp4", "no_video"),
        ],
    )
    def test_bad_media_raise_their_reason(self, media_dir, tmp_path, name, reason):
        with pytest.raises(MediaError) as err:
            _probed(tmp_path, media_dir[name].path)
        assert err.value.reason == reason


class TestDecodeStage:
    def test_frames_and_audio_of_exactly_the_clip_length(self, media_dir, tmp_path):
        task = _probed(tmp_path, media_dir["h264_aac.mp4"].path)
        _decode_stage().process(task)
        assert len(task.frames) == 8
        assert {Image.open(io.BytesIO(j)).size for j in task.frames} == {(224, 224)}
        assert task.has_audio
        pcm, rate = soundfile.read(io.BytesIO(task.flac), dtype="int16")
        assert rate == SAMPLE_RATE
        assert task.audio_samples == pcm.shape[0] == round(2.0 * SAMPLE_RATE)
        assert np.abs(pcm.astype(float)).mean() > 1000  # the 440 Hz tone

    def test_audio_is_cut_at_max_seconds(self, media_dir, tmp_path):
        task = _probed(tmp_path, media_dir["h264_aac.mp4"].path)
        _decode_stage(max_seconds=0.5).process(task)
        assert task.audio_samples == SAMPLE_RATE // 2
        assert soundfile.info(io.BytesIO(task.flac)).frames == SAMPLE_RATE // 2

    def test_clip_without_audio_has_frames_only(self, media_dir, tmp_path):
        task = _probed(tmp_path, media_dir["h264_noaudio.mp4"].path)
        _decode_stage().process(task)
        assert len(task.frames) == 8
        assert (task.has_audio, task.audio_samples, task.flac) == (False, 0, b"")

    def test_a_separate_audio_file_replaces_the_track(self, media_dir, tmp_path):
        wav = tmp_path / "speech.wav"
        noise = np.random.default_rng(0).integers(-8000, 8000, 3 * SAMPLE_RATE).astype(np.int16)
        soundfile.write(wav, noise, SAMPLE_RATE)
        task = _probed(tmp_path, media_dir["h264_noaudio.mp4"].path, audio=str(wav))
        _decode_stage().process(task)
        assert task.has_audio
        pcm, _ = soundfile.read(io.BytesIO(task.flac), dtype="int16")
        assert task.info is not None
        assert pcm.shape == (round(task.info.duration * SAMPLE_RATE),)  # the video's length
        assert np.array_equal(pcm, noise[: pcm.shape[0]])  # 16 kHz mono in: samples unchanged

    def test_a_separate_file_without_audio_is_no_audio(self, media_dir, tmp_path):
        silent = str(media_dir["h264_noaudio.mp4"].path)
        task = _probed(tmp_path, media_dir["h264_aac.mp4"].path, audio=silent)
        with pytest.raises(MediaError) as err:
            _decode_stage().process(task)
        assert err.value.reason == "no_audio"

    def test_long_clip_seeks_and_gives_distinct_frames(self, media_dir, tmp_path):
        task = _probed(tmp_path, media_dir["long.mp4"].path)
        _decode_stage(seek_above_s=60.0).process(task)
        assert len(set(task.frames)) == 8

    def test_without_probe_it_is_an_internal_error(self, media_dir, tmp_path):
        task = _task(tmp_path, _item(str(media_dir["h264_aac.mp4"].path)))
        with pytest.raises(MediaError) as err:
            _decode_stage().process(task)
        assert err.value.reason == "internal_error"


def _members(sample: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(sample)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


class TestPackStage:
    def test_sample_holds_frames_audio_captions_and_metadata(self, media_dir, tmp_path):
        task = _probed(tmp_path, media_dir["h264_aac.mp4"].path)
        _decode_stage().process(task)
        PackStage(config_hash="abc123", num_segments=8, frames_per_segment=1).process(task)
        members = _members(task.sample)
        frames = [f"clip_one.f{i:03d}.jpg" for i in range(8)]
        assert list(members) == [
            *frames,
            "clip_one.flac",
            "clip_one.captions.json",
            "clip_one.json",
        ]
        assert [members[f] for f in frames] == task.frames
        assert members["clip_one.flac"] == task.flac
        assert json.loads(members["clip_one.captions.json"]) == ["a", "b"]
        meta = ClipMeta.from_json(json.loads(members["clip_one.json"]))
        assert task.info is not None
        assert (meta.id, meta.source, meta.has_audio) == ("clip/one", task.item.video, True)
        assert meta.frame_times == task.times
        assert meta.duration == pytest.approx(task.info.duration)
        assert (meta.config_hash, meta.pipeline_version) == ("abc123", PIPELINE_VERSION)
        assert meta.audio_samples == task.audio_samples

    def test_no_audio_member_without_audio(self, media_dir, tmp_path):
        task = _probed(tmp_path, media_dir["h264_noaudio.mp4"].path)
        _decode_stage().process(task)
        PackStage(config_hash="x", num_segments=8, frames_per_segment=1).process(task)
        names = list(_members(task.sample))
        assert "clip_one.flac" not in names
        assert len(names) == 8 + 2
        meta = ClipMeta.from_json(json.loads(_members(task.sample)["clip_one.json"]))
        assert (meta.has_audio, meta.audio_samples) == (False, 0)


@pytest.fixture(scope="module")
def stages():
    return build_stages(PreprocessConfig())


class TestProcessItem:
    def test_a_good_clip_gives_a_sample_and_an_ok_row(self, stages, media_dir):
        result = process_item(stages, _item(str(media_dir["vp8_vorbis.mkv"].path)), timeout_s=60)
        assert result.index == 3
        row = result.row
        assert (row["status"], row["reason"], row["frames"], row["has_audio"]) == (
            "ok",
            None,
            8,
            True,
        )
        assert row["sample_bytes"] == len(result.sample) > 0
        assert (row["width"], row["height"]) == (320, 240)

    @pytest.mark.parametrize(
        ("target", "reason"),
        [
            ("missing.mp4", "not_found"),
            ("broken_empty.mp4", "empty_file"),
            ("broken_truncated.mp4", "unreadable"),
            ("broken_text.mp4", "unreadable"),
            ("broken_image.mp4", "not_a_video"),
            ("broken_audio_only.mp4", "no_video"),
        ],
    )
    def test_each_failure_is_one_failed_row_with_its_reason(
        self, stages, media_dir, target, reason
    ):
        path = media_dir["h264_aac.mp4"].path.parent / target
        result = process_item(stages, _item(str(path)), timeout_s=60)
        assert result.sample == b""
        row = result.row
        assert (row["status"], row["reason"], row["index"], row["id"]) == (
            "failed",
            reason,
            3,
            "clip/one",
        )
        assert row["error"]
        assert row["frames"] == 0

    def test_a_clip_past_its_deadline_is_a_timeout(self, stages, media_dir):
        result = process_item(stages, _item(str(media_dir["long.mp4"].path)), timeout_s=1e-3)
        assert (result.row["status"], result.row["reason"]) == ("failed", "timeout")

    def test_a_row_that_failed_on_input_does_no_media_work(self, stages, media_dir, tmp_path):
        item = _item(str(tmp_path / "never-read.mp4"), reason="duplicate_id", error="seen at 1")
        result = process_item(stages, item, timeout_s=60)
        assert (result.row["reason"], result.row["error"]) == ("duplicate_id", "seen at 1")

    def test_the_clip_workdir_is_removed(self, stages, media_dir, tmp_path):
        process_item(
            stages, _item(str(media_dir["h264_aac.mp4"].path)), timeout_s=60, tmp_root=str(tmp_path)
        )
        process_item(
            stages, _item(str(tmp_path / "gone.mp4")), timeout_s=60, tmp_root=str(tmp_path)
        )
        assert list(tmp_path.iterdir()) == []

"""Media operations as plain functions on real ffmpeg-made clips (no Ray)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import soundfile
from PIL import Image

from gram.schema import SAMPLE_RATE
from pipelines import media
from pipelines.media import MediaError
from pipelines.synthetic import ClipSpec, make_clip
from tests.pipelines.conftest import SHELL_NAME

REPO = Path(__file__).resolve().parents[2]


def _frames(path, info, **kw):
    times = media.frame_times(info.duration, 8)
    return media.decode_clip(str(path), times, duration=info.duration, fps=info.fps, **kw).frames


@pytest.mark.parametrize(
    "name",
    [
        "h264_aac.mp4",
        "h264_noaudio.mp4",
        "vp9_opus.webm",
        "mpeg4_mp3.avi",
        "vp8_vorbis.mkv",
        "vfr.mp4",
        "tall.mp4",
        SHELL_NAME,
    ],
)
def test_probe_and_decode_every_codec_and_container(media_dir, name):
    fx = media_dir[name]
    info = media.probe(str(fx.path), timeout_s=30)
    assert info.duration == pytest.approx(fx.spec.duration, abs=0.25)
    assert (info.width, info.height) == (fx.spec.width, fx.spec.height)
    assert info.has_audio == (fx.spec.audio_codec is not None)
    frames = _frames(fx.path, info)
    assert len(frames) == 8
    for jpg in frames:
        img = Image.open(io.BytesIO(jpg))
        assert img.format == "JPEG"
        assert img.size == (224, 224)
        assert img.mode == "RGB"


def test_shell_metacharacters_in_file_names_are_plain_arguments(media_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    info = media.probe(str(media_dir[SHELL_NAME].path), timeout_s=30)
    pcm = media.extract_audio(str(media_dir[SHELL_NAME].path), num_samples=16_000, timeout_s=30)
    assert info.has_audio
    assert pcm.shape == (16_000,)
    assert not (tmp_path / "pwned").exists()


def test_frame_times_are_segment_midpoints_inside_the_clip():
    assert media.frame_times(8.0, 4) == [1.0, 3.0, 5.0, 7.0]
    assert media.frame_times(4.0, 2, frames_per_segment=2) == [0.5, 1.5, 2.5, 3.5]
    short = media.frame_times(0.3, 8)
    assert len(short) == 8
    assert max(short) < 0.3
    assert short == sorted(short)
    with pytest.raises(ValueError, match="duration"):
        media.frame_times(0.0, 8)


def _pixels(jpg):
    return np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"), dtype=float)  # [H, W, 3]


def _halves(jpg):
    rgb = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"), dtype=float)  # [H, W, 3]
    left, right = rgb[:, :100].mean((0, 1)), rgb[:, 124:].mean((0, 1))
    top, bottom = rgb[:100].mean((0, 1)), rgb[124:].mean((0, 1))
    return left, right, top, bottom


def test_rotation_metadata_is_applied_so_frames_are_upright(media_dir):
    up = media.probe(str(media_dir["upright.mp4"].path), timeout_s=30)
    rot = media.probe(str(media_dir["rotated90.mp4"].path), timeout_s=30)
    assert up.rotation == 0
    assert rot.rotation in (90, 270)
    assert (rot.width, rot.height) == (180, 320)  # displayed size
    left, right, top, bottom = _halves(_frames(media_dir["upright.mp4"].path, up)[0])
    assert left[0] > 200 > left[2]
    assert right[2] > 200 > right[0]
    left, right, top, bottom = _halves(_frames(media_dir["rotated90.mp4"].path, rot)[0])
    assert abs(top[0] - bottom[0]) > 150  # turned: the halves are now above each other
    assert abs(left[0] - right[0]) < 50


def test_one_pass_and_seeking_decode_give_the_same_frames(media_dir):
    path = media_dir["h264_aac.mp4"].path
    info = media.probe(str(path), timeout_s=30)
    one_pass = _frames(path, info, seek_above_s=1e9)
    seeking = _frames(path, info, seek_above_s=0.0)
    assert one_pass == seeking


def test_the_keyframe_index_picks_one_pass_or_seeking_whichever_decodes_less(
    media_dir, tmp_path, monkeypatch
):
    small = {"width": 64, "height": 48, "fps": 10, "audio_codec": None}
    dense = make_clip(ClipSpec(duration=20, keyframe_s=1, **small), tmp_path / "dense.mp4")
    sparse = make_clip(ClipSpec(duration=70, keyframe_s=100, **small), tmp_path / "sparse.mp4")
    commands: list[list[str]] = []
    run = media.run_command

    def recorded(args: list[str], **kw):
        commands.append(args)
        return run(args, **kw)

    monkeypatch.setattr(media, "run_command", recorded)
    # 20 s with a keyframe every second: seeking, though it is under seek_above_s (60 s);
    # 70 s with one keyframe: one pass, though it is over seek_above_s.
    for path, keyframes, seeks in ((dense, 20, True), (sparse, 1, False)):
        info = media.probe(str(path), timeout_s=30)
        assert len(info.keyframes) == keyframes
        commands.clear()
        times = media.frame_times(info.duration, 8)
        chosen = media.decode_clip(
            str(path), times, duration=info.duration, fps=info.fps, keyframes=info.keyframes
        ).frames
        assert ("-ss" in commands[0]) == seeks
        assert chosen == _frames(path, info, seek_above_s=1e9 if seeks else 0.0)
        assert len(set(chosen)) == 8
    # Indexes that list only some keyframes (Matroska's cues, or built while demuxing)
    # are not used: the duration decides.
    assert media.probe(str(media_dir["vp9_opus.webm"].path), timeout_s=30).keyframes == ()


def test_video_track_shorter_than_the_audio_is_sampled_where_there_is_video(tmp_path):
    clip = tmp_path / "short_video.mp4"
    lavfi = ["-f", "lavfi", "-i"]
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", *lavfi, "testsrc2=size=160x120:rate=10:duration=2",
         *lavfi, "sine=duration=5", "-c:v", "libx264", "-c:a", "aac", str(clip)],
        check=True,
    )  # fmt: skip
    info = media.probe(str(clip), timeout_s=30)
    assert info.duration == pytest.approx(2.0, abs=0.05)  # the container says 5 s
    assert len(set(_frames(clip, info))) == 8


def test_clip_shorter_than_the_frame_count_repeats_frames(media_dir):
    info = media.probe(str(media_dir["short.mp4"].path), timeout_s=30)  # 3 frames at 10 fps
    frames = _frames(media_dir["short.mp4"].path, info)
    assert len(frames) == 8
    assert len(set(frames)) == 3


def test_long_clip_seeks_to_sampled_frames_only(media_dir):
    info = media.probe(str(media_dir["long.mp4"].path), timeout_s=30)
    assert info.duration == pytest.approx(90.0, abs=0.5)
    assert info.keyframes == tuple(10.0 * k for k in range(9))  # the mp4 index: every 10 s
    frames = _frames(media_dir["long.mp4"].path, info, seek_above_s=60.0)
    assert len(frames) == 8
    assert len(set(frames)) == 8


_DECODE_AND_MEASURE = """
import json, sys, threading, psutil
from pipelines import media
me, peak, done = psutil.Process(), {"ffmpeg": 0, "self": 0}, threading.Event()
def watch():
    while not done.is_set():
        try:
            kids = sum(c.memory_info().rss for c in me.children(recursive=True))
        except psutil.Error:
            kids = 0
        peak["ffmpeg"] = max(peak["ffmpeg"], kids)
        peak["self"] = max(peak["self"], me.memory_info().rss)
        done.wait(0.01)
watcher = threading.Thread(target=watch)
watcher.start()
info = media.probe(sys.argv[1], timeout_s=30)
times = media.frame_times(info.duration, 8)
frames = media.decode_clip(sys.argv[1], times, duration=info.duration, fps=info.fps).frames
done.set()
watcher.join()
print(json.dumps({"size": [info.width, info.height], "frames": len(frames),
                  "ffmpeg_mib": peak["ffmpeg"] / 2**20, "self_mib": peak["self"] / 2**20}))
"""


def test_4k_clip_decodes_without_blowing_memory(media_dir):
    # Peak RSS sampled every 10 ms in a fresh process: the kernel's own peak counters
    # (getrusage) start from the forking parent's size, which a long test session inflates.
    res = subprocess.run(
        [sys.executable, "-c", _DECODE_AND_MEASURE, str(media_dir["uhd.mp4"].path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    peak = json.loads(res.stdout.strip().splitlines()[-1])
    assert peak["size"] == [3840, 2160]
    assert peak["frames"] == 8
    assert peak["ffmpeg_mib"] > 0, "the watcher saw no ffmpeg process"
    # One decoded 4K frame is 24 MiB: a decode that buffered the clip would need gigabytes.
    assert peak["ffmpeg_mib"] < 600
    assert peak["self_mib"] < 600


@pytest.mark.parametrize(
    "name", ["h264_aac.mp4", "vp9_opus.webm", "mpeg4_mp3.avi", "vp8_vorbis.mkv"]
)
def test_audio_is_16k_mono_and_exactly_as_long_as_asked(media_dir, name):
    fx = media_dir[name]
    info = media.probe(str(fx.path), timeout_s=30)
    n = media.audio_length(info.duration, 10.0)
    pcm = media.extract_audio(str(fx.path), num_samples=n, timeout_s=30)
    assert pcm.dtype == np.int16
    assert pcm.shape == (n,)
    assert np.abs(pcm[: n // 2].astype(float)).mean() > 1000  # a 440 Hz tone, not silence
    cut = media.extract_audio(str(fx.path), num_samples=4000, timeout_s=30)
    assert cut.shape == (4000,)
    padded = media.extract_audio(str(fx.path), num_samples=n + 8000, timeout_s=30)
    assert padded.shape == (n + 8000,)
    assert not padded[-4000:].any()


def test_separate_audio_files_are_checked_in_process(media_dir, tmp_path, monkeypatch):
    tone = (np.sin(np.arange(8000) / 3.0) * 9000).astype(np.int16)
    with monkeypatch.context() as no_tools:
        no_tools.setenv("PATH", str(tmp_path))  # no program can be started: all in process
        for name in ("sep.wav", "sep.flac"):
            soundfile.write(tmp_path / name, tone, SAMPLE_RATE)
            assert media.has_audio_stream(str(tmp_path / name), timeout_s=30)
        # Containers libsndfile does not read go to FFmpeg's demuxers: with and without audio.
        assert media.has_audio_stream(str(media_dir["h264_aac.mp4"].path), timeout_s=30)
        assert not media.has_audio_stream(str(media_dir["h264_noaudio.mp4"].path), timeout_s=30)
    with pytest.raises(MediaError) as err:
        media.has_audio_stream(str(media_dir["broken_text.mp4"].path), timeout_s=30)
    assert err.value.reason == "unreadable"


def test_media_duration_of_audio_only_files_is_read_in_process(media_dir, tmp_path, monkeypatch):
    tone = (np.sin(np.arange(24_000) / 3.0) * 9000).astype(np.int16)  # 1.5 s at 16 kHz
    soundfile.write(tmp_path / "tone.wav", tone, SAMPLE_RATE)
    with monkeypatch.context() as no_tools:
        no_tools.setenv("PATH", str(tmp_path))  # no ffprobe or ffmpeg can be started
        m4a = media.media_duration(str(media_dir["broken_audio_only.mp4"].path), timeout_s=30)
        wav = media.media_duration(str(tmp_path / "tone.wav"), timeout_s=30)
        clip = media.media_duration(str(media_dir["h264_aac.mp4"].path), timeout_s=30)
    assert m4a == pytest.approx(1.0, abs=0.05)  # 1 s of AAC (plus its priming)
    assert wav == pytest.approx(1.5, abs=1e-3)
    assert clip == pytest.approx(2.0, abs=0.05)
    for name, reason in (("broken_text.mp4", "unreadable"), ("broken_empty.mp4", "unreadable")):
        with pytest.raises(MediaError) as err:
            media.media_duration(str(media_dir[name].path), timeout_s=30)
        assert err.value.reason == reason


def test_flac_round_trip_is_lossless():
    pcm = (np.sin(np.arange(16_000) / 5.0) * 20_000).astype(np.int16)
    data, rate = soundfile.read(io.BytesIO(media.encode_flac(pcm)), dtype="int16")
    assert rate == SAMPLE_RATE
    assert np.array_equal(data, pcm)
    assert media.encode_flac(pcm) == media.encode_flac(pcm)  # deterministic bytes


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("broken_empty.mp4", "unreadable"),
        ("broken_truncated.mp4", "unreadable"),
        ("broken_text.mp4", "unreadable"),
        ("broken_image.mp4", "not_a_video"),
        ("broken_audio_only.mp4", "no_video"),
    ],
)
def test_bad_files_get_a_clear_reason(media_dir, name, reason):
    with pytest.raises(MediaError) as err:
        media.probe(str(media_dir[name].path), timeout_s=30)
    assert err.value.reason == reason
    assert err.value.message


def test_timeout_kills_the_process_and_its_children(tmp_path):
    marker = tmp_path / "child.pid"
    script = f"sleep 60 & echo $! > '{marker}'; wait"
    start = time.monotonic()
    with pytest.raises(MediaError) as err:
        media.run_command(["sh", "-c", script], timeout_s=1.0)
    assert err.value.reason == "timeout"
    assert time.monotonic() - start < 30
    child = int(marker.read_text())
    for _ in range(50):
        # Killed and not yet reaped (a zombie, whose parent was killed too) counts as gone:
        # reaping orphans is up to the machine's init, which may be slow or absent.
        if not _running(child):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the child of the timed-out process is still alive")


def _running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_fifo_is_refused_at_once_instead_of_blocking_the_probe(tmp_path):
    fifo = tmp_path / "hang.mp4"
    os.mkfifo(fifo)  # nobody writes: opening it would block the worker
    start = time.monotonic()
    with pytest.raises(MediaError) as err:
        media.probe(str(fifo), timeout_s=30.0)
    assert err.value.reason == "not_a_file"
    assert time.monotonic() - start < 5


def test_probe_past_its_deadline_is_a_timeout_not_a_bad_file(media_dir):
    # FFmpeg's interrupt callback stops the read; whatever error the demuxer then
    # reports, the clip is recorded as timed out.
    with pytest.raises(MediaError) as err:
        media.probe(str(media_dir["long.mp4"].path), timeout_s=1e-6)
    assert err.value.reason == "timeout"
    assert media.probe(str(media_dir["long.mp4"].path), timeout_s=30).duration > 0


def test_missing_file_is_unreadable(tmp_path):
    with pytest.raises(MediaError) as err:
        media.probe(str(tmp_path / "gone.mp4"), timeout_s=30)
    assert err.value.reason == "unreadable"


@pytest.fixture
def fresh_ffmpeg_exe():
    """`ffmpeg_exe()` resolved anew in the test and again afterwards."""
    media.ffmpeg_exe.cache_clear()
    yield media.ffmpeg_exe
    media.ffmpeg_exe.cache_clear()


def test_decoding_uses_the_static_ffmpeg_of_the_wheel_by_default(fresh_ffmpeg_exe, monkeypatch):
    import imageio_ffmpeg

    monkeypatch.delenv(media.FFMPEG_ENV, raising=False)
    exe = fresh_ffmpeg_exe()
    assert exe == imageio_ffmpeg.get_ffmpeg_exe()
    assert exe != shutil.which("ffmpeg")
    version = subprocess.run([exe, "-version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("ffmpeg version")


def test_gram_ffmpeg_chooses_the_binary_and_a_wrong_one_is_a_clear_failure(
    fresh_ffmpeg_exe, media_dir, tmp_path, monkeypatch
):
    path = str(media_dir["h264_aac.mp4"].path)
    info = media.probe(path, timeout_s=30)
    monkeypatch.setenv(media.FFMPEG_ENV, "ffmpeg")  # the system's build, from PATH
    assert fresh_ffmpeg_exe() == shutil.which("ffmpeg")
    system = [_pixels(jpg) for jpg in _frames(path, info)]
    media.ffmpeg_exe.cache_clear()
    monkeypatch.delenv(media.FFMPEG_ENV)
    static = [_pixels(jpg) for jpg in _frames(path, info)]
    assert len(static) == len(system) == 8
    for a, b in zip(static, system, strict=True):  # two FFmpeg versions, the same frames
        assert np.abs(a - b).mean() < 2.0
    media.ffmpeg_exe.cache_clear()
    monkeypatch.setenv(media.FFMPEG_ENV, str(tmp_path / "no-such-ffmpeg"))
    with pytest.raises(MediaError) as err:
        _frames(path, info)
    assert err.value.reason == "no_ffmpeg"
    assert media.FFMPEG_ENV in err.value.message


def test_ffmpeg_errors_name_the_program_not_the_binary_file(media_dir):
    with pytest.raises(MediaError) as err:
        media.extract_audio(str(media_dir["h264_noaudio.mp4"].path), num_samples=100, timeout_s=30)
    assert err.value.reason == "decode_failed"
    assert err.value.message.startswith("audio: ffmpeg: ")


@pytest.mark.parametrize("seek_above_s", [1e9, 0.0])
def test_one_ffmpeg_run_gives_the_same_frames_and_audio_as_separate_runs(
    media_dir, tmp_path, seek_above_s
):
    path = str(media_dir["h264_aac.mp4"].path)
    info = media.probe(path, timeout_s=30)
    times = media.frame_times(info.duration, 8)
    n = media.audio_length(info.duration, 10.0)
    both = media.decode_clip(
        path,
        times,
        duration=info.duration,
        fps=info.fps,
        audio_from=path,
        audio_samples=n,
        seek_above_s=seek_above_s,
        workdir=str(tmp_path),
    )
    assert both.frames == _frames(media_dir["h264_aac.mp4"].path, info, seek_above_s=seek_above_s)
    assert np.array_equal(both.pcm, media.extract_audio(path, num_samples=n, timeout_s=30))
    assert list(tmp_path.iterdir()) == []  # the temp audio file is gone

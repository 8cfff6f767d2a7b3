"""The served model's input admission on real files, FIFOs, symlinks, ffmpeg and the S3 test
server: what a client may name is opened, everything else is refused before anything outside
the allowed roots is opened."""

from __future__ import annotations

import base64
import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gram.config import ConfigError
from jobs.registry.served_inputs import (
    FFMPEG_INPUT_OPTIONS,
    RefusedInputError,
    RowBudget,
    ServingPolicy,
    admit_rows,
    describe_cell,
    fetch_media,
    media_failure,
)
from pipelines import media
from pipelines.media import MediaError
from pipelines.synthetic import ClipSpec, make_broken, make_clip


class FifoWatch:
    """FIFOs that record whether anyone opened them for reading.

    A reader that opens a FIFO blocks until a writer comes, so the watcher, which tries to
    open each FIFO for writing (non-blocking) every few milliseconds, always sees it.
    """

    def __init__(self, folder: Path, names: list[str]) -> None:
        self.paths = {name: folder / name for name in names}
        for path in self.paths.values():
            os.mkfifo(path)
        self.opened: set[str] = set()

    def _watch(self, stop: threading.Event) -> None:
        while not stop.is_set():
            for name, path in self.paths.items():
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                except OSError:  # ENXIO: nobody has it open for reading
                    continue
                self.opened.add(name)
                os.close(fd)  # the reader gets end-of-file
            time.sleep(0.005)

    @contextlib.contextmanager
    def running(self) -> Iterator[FifoWatch]:
        stop = threading.Event()
        thread = threading.Thread(target=self._watch, args=(stop,), daemon=True)
        thread.start()
        try:
            yield self
        finally:
            time.sleep(0.1)
            stop.set()
            thread.join()


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(
        ClipSpec(width=64, height=48, fps=10, duration=1.0),
        tmp_path_factory.mktemp("clip") / "clip.mp4",
    )


@pytest.fixture
def layout(tmp_path, clip):
    """root/ (allowed): a clip, links in and out, a directory, a FIFO, an HLS playlist
    named .mp4; outside/: FIFOs standing for files a client must never make us open."""
    root, outside, work = tmp_path / "root", tmp_path / "outside", tmp_path / "work"
    for folder in (root, outside, work):
        folder.mkdir()
    (root / "clip.mp4").write_bytes(clip.read_bytes())
    (root / "sub").mkdir()
    watch = FifoWatch(outside, ["secret.ts", "secret.mp4"])
    (root / "link-out.mp4").symlink_to(outside / "secret.mp4")
    (root / "link-in.mp4").symlink_to(root / "clip.mp4")
    os.mkfifo(root / "pipe.mp4")
    (root / "evil.mp4").write_text(
        f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{outside / 'secret.ts'}\n#EXT-X-ENDLIST\n"
    )
    policy = ServingPolicy(media_roots=(str(root),), max_media_bytes=200_000)
    return root, outside, work, watch, policy


def _refusal(value: str, policy: ServingPolicy, folder: Path) -> str:
    with pytest.raises(RefusedInputError) as info:
        fetch_media(value, policy, folder)
    return str(info.value)


def test_paths_under_a_root_are_copied_and_everything_else_is_refused_unopened(layout, clip):
    root, outside, work, watch, policy = layout
    with watch.running():
        for ok in (root / "clip.mp4", f"file://{root}/clip.mp4", root / "link-in.mp4"):
            copy = fetch_media(str(ok), policy, work)
            assert copy.parent == work
            assert copy.read_bytes() == clip.read_bytes()
        outside_message = _refusal("/etc/passwd", policy, work)
        assert outside_message == "refused: not a path under a media root of this server"
        refused = [
            "/etc/no-such-file",
            str(outside / "secret.mp4"),
            f"{root}/../outside/secret.mp4",
            f"{root}/sub/../../outside/secret.ts",
            str(root / "link-out.mp4"),
            f"file://{outside}/secret.ts",
            str(root) + "-sibling/clip.mp4",
        ]
        for value in refused:  # the same words, whether the file exists or not
            assert _refusal(value, policy, work) == outside_message, value
        for value in ("clip.mp4", "http://127.0.0.1:1/clip.mp4", "concat:a|b", "subfile:x"):
            assert "a media cell is data:" in _refusal(value, policy, work)
        for value in (root / "sub", root / "pipe.mp4", root / "missing.mp4"):
            assert _refusal(str(value), policy, work) == "not a readable file under the media roots"
    assert watch.opened == set()
    no_roots = _refusal(str(root / "clip.mp4"), ServingPolicy(), work)
    assert "serving.media_roots is empty" in no_roots


def test_files_and_inline_bytes_over_the_size_limit_are_refused(layout, clip):
    root, _, work, _, _ = layout
    data = clip.read_bytes()
    small = ServingPolicy(media_roots=(str(root),), max_media_bytes=len(data) - 1)
    assert "max_media_bytes" in _refusal(str(root / "clip.mp4"), small, work)
    inline = "data:video/mp4;base64," + base64.b64encode(data).decode()
    assert "max_media_bytes" in _refusal(inline, small, work)
    assert "max_media_bytes" in _refusal("data:;base64," + "A" * 10_000_000, small, work)
    exact = ServingPolicy(max_media_bytes=len(data))
    assert fetch_media(inline, exact, work).read_bytes() == data
    wrapped = "data:;base64," + "\n".join(inline[22:][i : i + 76] for i in range(0, 10_000, 76))
    assert len(fetch_media(wrapped, exact, work).read_bytes()) > 0  # MIME line breaks are fine
    assert "not valid base64" in _refusal("data:;base64,@@@@", exact, work)
    assert "data:[<type>];base64" in _refusal("data:video/mp4,rawbytes", exact, work)
    assert describe_cell(inline) == f"data: URI ({len(inline)} characters)"


def test_an_hls_playlist_named_mp4_is_not_followed_by_the_probe_or_ffmpeg(layout):
    root, _, work, watch, policy = layout
    copy = fetch_media(str(root / "evil.mp4"), policy, work)
    with watch.running():
        with pytest.raises(MediaError) as info:
            media.probe(str(copy), timeout_s=20, input_options=FFMPEG_INPUT_OPTIONS)
        assert info.value.reason == "unreadable"
        with pytest.raises(MediaError) as duration:
            media.media_duration(str(copy), timeout_s=20, input_options=FFMPEG_INPUT_OPTIONS)
        assert duration.value.reason == "unreadable"
        with pytest.raises(MediaError):
            media.extract_audio(
                str(copy), num_samples=1600, timeout_s=20, input_options=FFMPEG_INPUT_OPTIONS
            )
    assert watch.opened == set()
    assert "secret" not in media_failure(info.value.reason)
    # The attack is real: without the options, an FFmpeg that follows a playlist named .mp4
    # (the system's ffprobe, FFmpeg 5.1) opens the file it names.
    with watch.running(), pytest.raises(MediaError):
        media.run_command(["ffprobe", "-v", "error", "-show_format", str(copy)], timeout_s=20)
    assert watch.opened == {"secret.ts"}


def test_served_options_still_read_real_containers(layout, clip, tmp_path, monkeypatch):
    info = media.probe(str(clip), timeout_s=20, input_options=FFMPEG_INPUT_OPTIONS)
    assert info.duration == pytest.approx(1.0, abs=0.1)
    audio_only = make_broken("audio_only", tmp_path / "tone.m4a")  # 1 s of AAC, no video
    with monkeypatch.context() as no_tools:
        no_tools.setenv("PATH", str(tmp_path))  # the served model needs no ffprobe binary
        seconds = media.media_duration(
            str(audio_only), timeout_s=20, input_options=FFMPEG_INPUT_OPTIONS
        )
    assert seconds == pytest.approx(1.0, abs=0.05)
    times = media.frame_times(info.duration, 4)
    frames = media.decode_clip(
        str(clip), times, size=32, timeout_s=20, duration=info.duration, fps=info.fps,
        input_options=FFMPEG_INPUT_OPTIONS,
    ).frames  # fmt: skip
    assert len(frames) == 4
    pcm = media.extract_audio(
        str(clip), num_samples=8000, timeout_s=20, input_options=FFMPEG_INPUT_OPTIONS
    )
    assert pcm.shape == (8000,)
    assert abs(pcm.astype(float)).max() > 1000  # the 440 Hz tone


def test_s3_objects_only_under_an_allowed_prefix(s3_server, tmp_path, clip):
    bucket = s3_server.make_bucket("served-inputs")
    s3 = s3_server.client()
    for key in ("media/clip.mp4", "media-old/clip.mp4", "private/clip.mp4"):
        s3.put_object(Bucket=bucket, Key=key, Body=clip.read_bytes())
    policy = ServingPolicy(s3_prefixes=(f"s3://{bucket}/media",))
    copy = fetch_media(f"s3://{bucket}/media/clip.mp4", policy, tmp_path)
    assert copy.read_bytes() == clip.read_bytes()
    outside = "refused: not an s3:// URI under a prefix this server allows (serving.s3_prefixes)"
    for uri in (
        f"s3://{bucket}/private/clip.mp4",
        f"s3://{bucket}/media-old/clip.mp4",
        f"s3://{bucket}/media/../private/clip.mp4",
        f"s3://{bucket}/media//clip.mp4",
        f"s3://{bucket}/private/missing.mp4",
        "s3://other-bucket/media/clip.mp4",
    ):
        assert _refusal(uri, policy, tmp_path) == outside, uri
    missing = _refusal(f"s3://{bucket}/media/missing.mp4", policy, tmp_path)
    assert missing == "not a readable object under the allowed s3:// prefixes"
    small = ServingPolicy(s3_prefixes=policy.s3_prefixes, max_media_bytes=1000)
    assert "max_media_bytes" in _refusal(f"s3://{bucket}/media/clip.mp4", small, tmp_path)
    assert "s3_prefixes is empty" in _refusal(
        f"s3://{bucket}/media/clip.mp4", ServingPolicy(), tmp_path
    )


def test_rows_and_media_seconds_per_row_are_bounded():
    policy = ServingPolicy(max_rows=3, max_media_seconds=10)
    admit_rows(3, policy)
    with pytest.raises(RefusedInputError, match="at most 3"):
        admit_rows(4, policy)
    budget = RowBudget(policy)
    budget.spend(0, 6.0)
    budget.spend(1, 6.0)  # rows are counted apart
    with pytest.raises(RefusedInputError, match=r"12\.0 s of media in one row"):
        budget.spend(0, 6.0)


def test_the_policy_comes_from_registration_then_the_serving_environment(tmp_path):
    registered = ServingPolicy(media_roots=("/data/clips",), max_rows=8)
    assert ServingPolicy.configured(registered, {}) == registered
    env = {
        "GRAM_SERVING_MEDIA_ROOTS": f"{tmp_path}, /srv/more",
        "GRAM_SERVING_S3_PREFIXES": "s3://bucket/clips/",
        "GRAM_SERVING_MAX_MEDIA_SECONDS": "30",
    }
    policy = ServingPolicy.configured(registered, env)
    assert policy.media_roots == (str(tmp_path), "/srv/more")
    assert policy.s3_prefixes == ("s3://bucket/clips/",)
    assert (policy.max_rows, policy.max_media_seconds) == (8, 30.0)
    assert ServingPolicy.configured(registered, {"GRAM_SERVING_MEDIA_ROOTS": ""}).media_roots == ()
    with pytest.raises(ConfigError, match="GRAM_SERVING_MAX_ROWS"):
        ServingPolicy.configured(registered, {"GRAM_SERVING_MAX_ROWS": "many"})
    with pytest.raises(ConfigError, match="not an absolute path"):
        ServingPolicy(media_roots=("clips",))
    with pytest.raises(ConfigError, match="s3://bucket/prefix"):
        ServingPolicy(s3_prefixes=("bucket/clips",))

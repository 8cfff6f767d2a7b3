"""Per-clip media operations: plain functions over local files, no Ray.

    info = probe("clip.mp4", timeout_s=30)
    times = frame_times(info.duration, num_segments=8)
    jpegs = decode_clip("clip.mp4", times, size=224, quality=90, timeout_s=60).frames
    pcm = extract_audio("clip.mp4", num_samples=audio_length(info.duration, 10.0), timeout_s=60)
    flac = encode_flac(pcm)

Probing reads the container's headers in process with PyAV (FFmpeg's own
demuxers, ~1-2 ms a clip instead of ~60-90 ms of CPU to start an ffprobe).
Decoding runs `ffmpeg_exe()`: the static build that the imageio-ffmpeg wheel
ships (its start-up costs ~0.01 s of CPU against ~0.06-0.09 s for a distribution's
dynamically linked build), `$GRAM_FFMPEG` to choose another one. ffmpeg
always gets an argument list (never a shell, so any file name is safe), reads
the media from a seekable local path (never a whole mp4 through stdin: files
with the index at the end fail that way), runs in its own process group, and
is killed with its children when `timeout_s` passes. Every failure is a
`MediaError` with a short `reason` code for counting and a message for people.

Frames are decoded in one pass from the start, or by seeking to each sampled
time (only the stretch from the keyframe before it is decoded), whichever
decodes less by the keyframe index that `probe` reads (`ProbeInfo.keyframes`);
without one, by the clip's duration (`seek_above_s`).

`input_options` (probe, media_duration, decode_clip, extract_audio) are FFmpeg
options put before every input, e.g. `{"protocol_whitelist": "file,pipe"}` for
untrusted files; the in-process probes pass them to FFmpeg's demuxer the same way.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import io
import itertools
import math
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import ffmpeg
import numpy as np
import soundfile
from PIL import Image

from gram.schema import SAMPLE_RATE

__all__ = [
    "FFMPEG_ENV",
    "Decoded",
    "MediaError",
    "ProbeInfo",
    "audio_length",
    "decode_clip",
    "encode_flac",
    "encode_jpeg",
    "extract_audio",
    "ffmpeg_exe",
    "frame_times",
    "has_audio_stream",
    "media_duration",
    "probe",
    "run_command",
]

FFMPEG_ENV = "GRAM_FFMPEG"
"""Environment variable naming the ffmpeg binary to decode with (a path or a name on PATH)."""

# Demuxers that mean "a still image", not a video, even though they report a video stream.
_IMAGE_FORMATS = {
    "image2",
    "png_pipe",
    "jpeg_pipe",
    "bmp_pipe",
    "gif",
    "webp_pipe",
    "tiff_pipe",
    "pam_pipe",
    "ppm_pipe",
    "pgm_pipe",
    "svg_pipe",
    "jpegls_pipe",
    "qoi_pipe",
}
_IMAGE_CODECS = {"png", "mjpeg", "bmp", "tiff", "webp", "gif", "ppm", "pgm", "pam", "qoi"}


class MediaError(Exception):
    """A clip could not be processed. `reason` is a short code, `message` says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ProbeInfo:
    """What the container says about a file. Times in seconds, sizes in pixels (as displayed)."""

    duration: float
    fps: float
    width: int
    height: int
    rotation: int
    """Display rotation, degrees counter-clockwise mod 360 (0, 90, 180, 270); frames come out
    upright."""
    has_audio: bool
    video_codec: str
    audio_codec: str | None
    format_name: str
    audio_channels: int = 0
    audio_rate: int = 0
    keyframes: tuple[float, ...] = ()
    """Times of the video's keyframes in seconds from the start (as `-ss` counts them),
    from an mp4/mov index that lists every sample; empty otherwise."""


def _tail(stderr: bytes, limit: int = 300) -> str:
    lines = [ln.strip() for ln in stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    return (lines[-1] if lines else "no error output")[:limit]


@functools.cache
def ffmpeg_exe() -> str:
    """The ffmpeg binary to decode with, resolved once per process.

    `$GRAM_FFMPEG` (a path, or a name on PATH) when set; else the static
    build that the imageio-ffmpeg wheel ships; else `ffmpeg` on PATH.
    Raises MediaError `no_ffmpeg` saying how to get one.
    """
    override = os.environ.get(FFMPEG_ENV, "").strip()
    if override:
        found = shutil.which(override)
        if found is None:
            raise MediaError(
                "no_ffmpeg",
                f"{FFMPEG_ENV}={override!r} is not an executable: point it at an ffmpeg binary "
                "or unset it to use the one the imageio-ffmpeg package ships",
            )
        return found
    try:
        import imageio_ffmpeg

        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError):
        pass
    found = shutil.which("ffmpeg")
    if found is None:
        raise MediaError(
            "no_ffmpeg",
            "no ffmpeg found: install the imageio-ffmpeg package (pip install imageio-ffmpeg), "
            f"put ffmpeg on PATH, or set {FFMPEG_ENV}",
        )
    return found


def run_command(args: list[str], *, timeout_s: float, name: str = "") -> bytes:
    """Run `args` (no shell) and return its stdout.

    The process gets its own process group; on timeout the whole group
    (ffmpeg and any children) is SIGKILLed and `MediaError("timeout")` raised.
    A non-zero exit raises `MediaError("ffmpeg_failed")` with the last stderr line.
    Messages call the program `name` (default: the file name of `args[0]`).
    """
    name = name or os.path.basename(args[0])
    if timeout_s <= 0:
        raise MediaError("timeout", f"no time left to run {name}")
    proc = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise MediaError(
            "timeout", f"{name} ran longer than {timeout_s:.1f}s and was killed"
        ) from None
    except BaseException:
        _kill_group(proc)
        raise
    if proc.returncode != 0:
        raise MediaError("ffmpeg_failed", f"{name}: {_tail(err)}")
    return out


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def _local_url(path: str) -> str:
    """`path` as FFmpeg must see it: absolute, so no part of a name is read as a
    protocol (`data:`, `concat:`, ...) and `-` never means stdin."""
    return os.path.abspath(path)


def _seconds(value: Fraction | float | None) -> float:
    """A positive finite number of seconds (or frames per second), else 0."""
    if value is None:
        return 0.0
    out = float(value)
    return out if math.isfinite(out) and out > 0 else 0.0


def _open(
    path: str, timeout_s: float, what: str, options: Mapping[str, str] | None = None
) -> tuple[Any, float]:
    """An open PyAV input container for a regular local file, and the deadline
    (time.monotonic()) that `timeout_s` sets; MediaError otherwise.

    `timeout_s` bounds opening and every read (FFmpeg's interrupt callback).
    """
    import av

    if timeout_s <= 0:
        raise MediaError("timeout", f"no time left to probe {what}")
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise MediaError("unreadable", f"{what}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):  # a FIFO or device would block the worker, not a process
        raise MediaError("not_a_file", f"{what} is not a regular file")
    deadline = time.monotonic() + timeout_s
    try:
        container = av.open(
            _local_url(path),
            timeout=timeout_s,
            metadata_errors="replace",
            options=dict(options or {}),
        )
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise _probe_error(
            exc, deadline, timeout_s, "unreadable", "not a readable media file"
        ) from None
    return container, deadline


def _probe_error(
    exc: Exception, deadline: float, timeout_s: float, reason: str, what: str
) -> MediaError:
    """`timeout` when the deadline passed (an interrupted read can surface as any error,
    e.g. "invalid data"), else `reason` with FFmpeg's error."""
    if time.monotonic() >= deadline:
        return MediaError("timeout", f"probing took longer than {timeout_s:.3g}s")
    return MediaError(reason, f"{what} ({exc})")


def _first_frame_rotation(container: Any, video: Any, deadline: float, timeout_s: float) -> int:
    """Display rotation (degrees mod 360, multiples of 90) of the first decoded frame.

    FFmpeg hands the container's display matrix to the decoder's frames; PyAV
    reads it back only from a frame, so one frame is decoded (single-threaded).
    """
    import av

    video.codec_context.thread_count = 1
    try:
        frame = next(container.decode(video), None)
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise _probe_error(
            exc, deadline, timeout_s, "decode_failed", "the first frame does not decode"
        ) from None
    if frame is None:
        raise MediaError("decode_failed", "the video stream has no decodable frame")
    return int(round(float(frame.rotation) / 90.0) * 90) % 360


def probe(
    path: str, *, timeout_s: float, input_options: Mapping[str, str] | None = None
) -> ProbeInfo:
    """Probe a local media file: duration, fps, displayed size, rotation, audio presence.

    Reads the headers (and decodes the first frame, for the rotation) in
    process. Raises MediaError with reason `unreadable` (not a media file,
    truncated, missing), `not_a_file` (a FIFO, device or folder), `not_a_video`
    (a still image), `no_video` (audio only), `no_duration`, `decode_failed`
    (no first frame) or `timeout`.
    """
    import av

    container, deadline = _open(path, timeout_s, "the file", input_options)
    with container:
        format_name = str(container.format.name or "")
        video = [
            s
            for s in container.streams.video
            if not s.disposition & av.stream.Disposition.attached_pic
        ]
        audio = list(container.streams.audio)
        if not video:
            if audio:
                raise MediaError("no_video", "file has audio but no video stream (audio-only file)")
            raise MediaError(
                "unreadable", f"no video or audio stream (format {format_name or '?'})"
            )
        v = video[0]
        codec = str(v.codec_context.name or "?")
        container_s = _seconds(
            Fraction(container.duration, av.time_base) if container.duration else None
        )
        stream_s = _seconds(v.duration * v.time_base if v.duration and v.time_base else None)
        if format_name in _IMAGE_FORMATS or (
            codec in _IMAGE_CODECS and not container_s and not stream_s
        ):
            raise MediaError(
                "not_a_video", f"file is a still image ({format_name}/{codec}), not a video"
            )
        duration = (
            min(d for d in (container_s, stream_s) if d) if (container_s or stream_s) else 0.0
        )
        if duration <= 0:
            raise MediaError("no_duration", "the container reports no duration for the video")
        rotation = _first_frame_rotation(container, v, deadline, timeout_s)
        width, height = int(v.codec_context.width or 0), int(v.codec_context.height or 0)
        if rotation in (90, 270):
            width, height = height, width
        fps = _seconds(v.average_rate) or _seconds(v.base_rate)
        keyframes = _keyframes(container, v, duration) if "mov" in format_name.split(",") else ()
        a = audio[0].codec_context if audio else None
        return ProbeInfo(
            duration=duration,
            fps=fps,
            width=width,
            height=height,
            rotation=rotation,
            has_audio=bool(audio),
            video_codec=codec,
            audio_codec=str(a.name) if a is not None and a.name else None,
            format_name=format_name,
            audio_channels=int(a.channels or 0) if a is not None else 0,
            audio_rate=int(a.sample_rate or 0) if a is not None else 0,
            keyframes=keyframes,
        )


def _keyframes(container: Any, video: Any, duration: float) -> tuple[float, ...]:
    """The video's keyframe times (s from the file's start) from the container's index, or
    () unless the index reaches the clip's last second (an mp4's sample tables list every
    sample; an index that demuxing builds as it reads would end early)."""
    entries = video.index_entries
    base = float(video.time_base or 0)
    start = container.start_time / 1e6 if container.start_time else 0.0  # AV_TIME_BASE units
    count = len(entries)
    if not count or not base or entries[count - 1].timestamp * base - start < duration - 1.0:
        return ()
    return tuple(round(e.timestamp * base - start, 6) for e in entries if e.is_keyframe)


def media_duration(
    path: str, *, timeout_s: float, input_options: Mapping[str, str] | None = None
) -> float:
    """Duration in seconds of a local media file of any kind, audio-only ones too: the
    container's (what `ffprobe -show_entries format=duration` prints), read in process.

    Raises MediaError `unreadable` (not a media file), `not_a_file`, `no_duration` or
    `timeout`.
    """
    import av

    container, _ = _open(path, timeout_s, "the file", input_options)
    with container:
        seconds = _seconds(
            Fraction(container.duration, av.time_base) if container.duration else None
        )
    if not seconds:
        raise MediaError("no_duration", "the container reports no duration")
    return seconds


def has_audio_stream(path: str, *, timeout_s: float) -> bool:
    """True if the local file has an audio stream (for separate audio files).

    WAV, FLAC, OGG and the other formats libsndfile reads are checked by
    libsndfile; anything else (m4a, mp3, mp4, ...) by FFmpeg's demuxers (PyAV),
    both in process. Raises MediaError `unreadable` for a file neither can read.
    """
    try:
        return bool(soundfile.info(path).channels > 0)
    except (RuntimeError, TypeError, ValueError):  # libsndfile errors are RuntimeErrors
        pass
    container, _ = _open(path, timeout_s, "the audio file")
    with container:
        return bool(container.streams.audio)


def frame_times(duration: float, num_segments: int, frames_per_segment: int = 1) -> list[float]:
    """Sampling times in seconds: `num_segments` equal segments of [0, duration), and
    `frames_per_segment` evenly spaced points inside each (1 = the segment midpoint).

    Times stay just inside the clip (at most `duration` - 1 ms). Rounded to
    the microsecond.
    """
    if duration <= 0 or num_segments < 1 or frames_per_segment < 1:
        raise ValueError(
            f"need duration > 0 and at least one segment and frame, got {duration}, "
            f"{num_segments}, {frames_per_segment}"
        )
    last = max(0.0, duration - 1e-3)
    seg = duration / num_segments
    return [
        round(min(last, seg * (s + (j + 0.5) / frames_per_segment)), 6)
        for s in range(num_segments)
        for j in range(frames_per_segment)
    ]


@dataclass(frozen=True)
class Decoded:
    """What one ffmpeg run produced: JPEG frames in order, and audio if it was asked for."""

    frames: list[bytes]
    pcm: np.ndarray | None
    """16 kHz mono int16, shape [audio_samples]; None when no audio was asked for."""


def decode_clip(
    path: str,
    times: list[float],
    *,
    size: int = 224,
    quality: int = 90,
    timeout_s: float = 120.0,
    threads: int = 1,
    seek_above_s: float = 60.0,
    duration: float = 0.0,
    fps: float = 0.0,
    keyframes: Sequence[float] = (),
    audio_from: str | None = None,
    audio_samples: int = 0,
    workdir: str | None = None,
    input_options: Mapping[str, str] | None = None,
) -> Decoded:
    """JPEG frames (RGB, `size` x `size`) shown at ascending `times` seconds, and
    optionally the audio of `audio_from` (the clip or a separate file), in one ffmpeg run.

    With the clip's `fps` known, the frame shown at t is the first one that
    starts after t - 1/fps (without it: the first starting at or after t).
    The short side is scaled to `size`, the centre cropped, rotation metadata
    applied (frames come out upright); Pillow encodes the raw RGB at JPEG
    `quality` (1-95). Frames come from one pass that stops after the last
    sampled frame, or from seeking to each time (`-ss` before `-i`: only the
    stretch from the keyframe before each time is decoded), whichever decodes
    less by the clip's ascending `keyframes` (seconds, `ProbeInfo.keyframes`);
    without them, clips up to `seek_above_s` seconds long (`duration`) take
    one pass and longer ones seek. If the one-pass decode yields fewer frames
    (several times inside one frame: very short clips), the seeking decode is
    used. Audio is 16 kHz mono,
    exactly `audio_samples` long (see `extract_audio`), written by the same
    ffmpeg to a temp file in `workdir`. Raises MediaError `decode_failed`
    when frames are missing.
    """
    if not times or any(b < a for a, b in itertools.pairwise(times)):
        raise ValueError(f"frame times must be a non-empty ascending list, got {times}")
    shift = 1.0 / fps - 1e-4 if fps > 0 else 0.0
    query = [round(max(0.0, t - shift), 6) for t in times]
    unique = sorted(set(query))  # equal times (very short clips) decode once
    with tempfile.TemporaryDirectory(prefix="gram-audio-", dir=workdir) as tmp:
        opts = dict(input_options or {})
        audio = _AudioOut(audio_from, audio_samples, os.path.join(tmp, "audio.s16le"), opts)
        frames: list[bytes] | None = None
        if keyframes:
            one_pass = _one_pass_is_cheaper(unique, keyframes)
        else:
            one_pass = 0 < duration <= seek_above_s
        if one_pass:
            args = _finish(
                _one_pass(path, unique, size, threads, opts), len(unique), audio, path, threads
            )
            frames = _decode_frames(args, len(unique), size, quality, timeout_s, allow_short=True)
        if frames is None:
            graph = _seeking(path, unique, size, threads, opts)
            args = _finish(graph, len(unique), audio, None, threads)
            frames = _decode_frames(args, len(unique), size, quality, timeout_s, allow_short=False)
        if frames is None:  # pragma: no cover (allow_short=False raises instead)
            raise MediaError("decode_failed", "no frames decoded")
        by_time = dict(zip(unique, frames, strict=True))
        return Decoded([by_time[q] for q in query], audio.read())


SEEK_COST_S = 0.5
"""What one seek costs besides decoding, as seconds of video decoded: the seeking
decode opens and probes the file once per sampled time (~4 ms of CPU each, about
half a second of 640x360 h264)."""


def _one_pass_is_cheaper(times: list[float], keyframes: Sequence[float]) -> bool:
    """Whether one pass up to the last of `times` decodes less video than seeking to each
    (from the keyframe at or before it, plus `SEEK_COST_S`); times in seconds, ascending."""
    seeking = 0.0
    for t in times:
        before = bisect.bisect_right(keyframes, t) - 1
        seeking += t - (keyframes[before] if before >= 0 else 0.0) + SEEK_COST_S
    return times[-1] <= seeking


@dataclass(frozen=True)
class _AudioOut:
    source: str | None
    samples: int
    file: str
    options: dict[str, str]

    def output(self, same_input: Any) -> Any:
        inp = same_input
        if inp is None:
            inp = ffmpeg.input(_local_url(self.source or ""), **self.options)
        seconds = self.samples / SAMPLE_RATE + 0.5  # a margin, then trim exactly
        return inp["a:0"].output(
            self.file, format="s16le", acodec="pcm_s16le", ac=1, ar=SAMPLE_RATE, t=f"{seconds:.3f}"
        )

    def read(self) -> np.ndarray | None:
        if self.source is None:
            return None
        with open(self.file, "rb") as fh:
            return _exact_length(fh.read(), self.samples)


def _exact_length(raw: bytes, num_samples: int) -> np.ndarray:
    pcm = np.frombuffer(raw[: len(raw) // 2 * 2], dtype="<i2")
    out = np.zeros(num_samples, dtype=np.int16)  # [num_samples]
    n = min(num_samples, pcm.shape[0])
    out[:n] = pcm[:n]
    return out


def _resize_crop(stream: Any, size: int) -> Any:
    stream = stream.filter(
        "scale", size, size, force_original_aspect_ratio="increase", flags="bilinear"
    )
    return stream.filter("crop", size, size).filter("setsar", 1)


def _finish(
    graph: tuple[Any, Any], count: int, audio: _AudioOut, path: str | None, threads: int
) -> list[str]:
    video, inp = graph
    outs = [
        video.output(
            "pipe:",
            format="rawvideo",
            pix_fmt="rgb24",
            fps_mode="passthrough",
            **{"frames:v": count},
        )
    ]
    if audio.source is not None:
        outs.append(audio.output(inp if audio.source == path else None))
    return list(
        ffmpeg.merge_outputs(*outs)
        .global_args("-nostdin", "-v", "error", "-filter_threads", str(threads))
        .compile(cmd=ffmpeg_exe(), overwrite_output=True)  # overwrite: a too-short first pass
    )


def _one_pass(
    path: str, times: list[float], size: int, threads: int, options: dict[str, str]
) -> tuple[Any, Any]:
    # Select the first frame at/after each time: t >= T_k while the last selected frame is < T_k.
    terms = [f"gte(t,{times[0]:.6f})*isnan(prev_selected_t)"]
    terms += [f"gte(t,{t:.6f})*lt(prev_selected_t,{t:.6f})" for t in times[1:]]
    inp = ffmpeg.input(_local_url(path), threads=threads, **options)
    return _resize_crop(inp.video.filter("select", "+".join(terms)), size), inp


def _seeking(
    path: str, times: list[float], size: int, threads: int, options: dict[str, str]
) -> tuple[Any, Any]:
    branches = []
    for t in times:
        stream = ffmpeg.input(_local_url(path), ss=f"{t:.6f}", threads=threads, **options).video
        branches.append(_resize_crop(stream.trim(end_frame=1).setpts("PTS-STARTPTS"), size))
    joined = branches[0] if len(branches) == 1 else ffmpeg.concat(*branches, v=1, a=0)
    return joined, None


def _decode_frames(
    args: list[str], count: int, size: int, quality: int, timeout_s: float, *, allow_short: bool
) -> list[bytes] | None:
    try:
        raw = run_command(args, timeout_s=timeout_s, name="ffmpeg")
    except MediaError as exc:
        if exc.reason == "ffmpeg_failed":
            raise MediaError("decode_failed", exc.message) from None
        raise
    frame_bytes = size * size * 3
    got = len(raw) // frame_bytes
    if got < count:
        if allow_short:
            return None
        raise MediaError(
            "decode_failed", f"decoded {got} of {count} frames (file truncated or corrupt?)"
        )
    return [
        encode_jpeg(raw[i * frame_bytes : (i + 1) * frame_bytes], size, quality)
        for i in range(count)
    ]


def encode_jpeg(rgb: bytes, size: int, quality: int) -> bytes:
    """Encode `size` x `size` raw RGB bytes as a baseline JPEG at `quality` (1-95)."""
    buf = io.BytesIO()
    Image.frombytes("RGB", (size, size), rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def audio_length(duration: float, max_seconds: float) -> int:
    """Number of 16 kHz samples stored for a clip: min(duration, max_seconds) * rate."""
    return round(min(duration, max_seconds) * SAMPLE_RATE)


def extract_audio(
    path: str,
    *,
    num_samples: int,
    timeout_s: float = 120.0,
    input_options: Mapping[str, str] | None = None,
) -> np.ndarray:
    """The first audio stream as 16 kHz mono int16, exactly `num_samples` long.

    Decoded audio is trimmed (AAC priming and rounding make it a few hundred
    samples too long) or zero-padded (a track shorter than the video).
    Shape [num_samples].
    """
    seconds = num_samples / SAMPLE_RATE + 0.5  # a margin, then trim exactly
    args = (
        ffmpeg.input(_local_url(path), **dict(input_options or {}))
        .output(
            "pipe:",
            format="s16le",
            acodec="pcm_s16le",
            ac=1,
            ar=SAMPLE_RATE,
            map="0:a:0",
            t=f"{seconds:.3f}",
            vn=None,
        )
        .global_args("-nostdin", "-v", "error")
        .compile(cmd=ffmpeg_exe())
    )
    try:
        raw = run_command(args, timeout_s=timeout_s, name="ffmpeg")
    except MediaError as exc:
        if exc.reason == "ffmpeg_failed":
            raise MediaError("decode_failed", f"audio: {exc.message}") from None
        raise
    return _exact_length(raw, num_samples)


def encode_flac(pcm: np.ndarray) -> bytes:
    """Lossless 16-bit FLAC bytes of mono int16 samples at 16 kHz."""
    buf = io.BytesIO()
    soundfile.write(buf, pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()

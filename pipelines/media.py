"""Per-clip media operations: plain functions over local files, no Ray.

    info = probe("clip.mp4", timeout_s=30)
    times = frame_times(info.duration, num_segments=8)
    jpegs = extract_frames("clip.mp4", times, size=224, quality=90, timeout_s=60)
    pcm = extract_audio("clip.mp4", num_samples=audio_length(info.duration, 10.0), timeout_s=60)
    flac = encode_flac(pcm)

ffmpeg and ffprobe always get an argument list (never a shell, so any file
name is safe), read the media from a seekable local path (never a whole mp4
through stdin: files with the index at the end fail that way), run in their
own process group, and are killed with their children when `timeout_s`
passes. Every failure is a `MediaError` with a short `reason` code for
counting and a message for people.

`input_options` (probe, decode_clip, extract_audio) are ffmpeg/ffprobe options put
before every input, e.g. `{"protocol_whitelist": "file,pipe"}` for untrusted files.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import signal
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ffmpeg
import numpy as np
import soundfile
from PIL import Image

from gram.schema import SAMPLE_RATE

__all__ = [
    "Decoded",
    "MediaError",
    "ProbeInfo",
    "audio_length",
    "decode_clip",
    "encode_flac",
    "encode_jpeg",
    "extract_audio",
    "extract_frames",
    "frame_times",
    "has_audio_stream",
    "probe",
    "run_command",
]

# Demuxers that mean "a still image", not a video, even when ffprobe reports a video stream.
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
    """What ffprobe says about a file. Times in seconds, sizes in pixels (as displayed)."""

    duration: float
    fps: float
    width: int
    height: int
    rotation: int
    """ffprobe's display rotation, degrees mod 360 (0, 90, 180, 270); frames come out upright."""
    has_audio: bool
    video_codec: str
    audio_codec: str | None
    format_name: str
    audio_channels: int = 0
    audio_rate: int = 0


def _tail(stderr: bytes, limit: int = 300) -> str:
    lines = [ln.strip() for ln in stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    return (lines[-1] if lines else "no error output")[:limit]


def run_command(args: list[str], *, timeout_s: float) -> bytes:
    """Run `args` (no shell) and return its stdout.

    The process gets its own process group; on timeout the whole group
    (ffmpeg and any children) is SIGKILLed and `MediaError("timeout")` raised.
    A non-zero exit raises `MediaError("ffmpeg_failed")` with the last stderr line.
    """
    if timeout_s <= 0:
        raise MediaError("timeout", f"no time left to run {os.path.basename(args[0])}")
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
            "timeout",
            f"{os.path.basename(args[0])} ran longer than {timeout_s:.1f}s and was killed",
        ) from None
    except BaseException:
        _kill_group(proc)
        raise
    if proc.returncode != 0:
        raise MediaError("ffmpeg_failed", f"{os.path.basename(args[0])}: {_tail(err)}")
    return out


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def _ratio(text: str | None) -> float:
    if not text or text in ("0/0", "N/A"):
        return 0.0
    num, _, den = text.partition("/")
    try:
        value = float(num) / float(den or 1)
    except (ValueError, ZeroDivisionError):
        return 0.0
    return value if math.isfinite(value) and value > 0 else 0.0


def _float(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return 0.0
    return out if math.isfinite(out) and out > 0 else 0.0


def _rotation(stream: dict[str, Any]) -> int:
    angle = 0.0
    for side in stream.get("side_data_list", []) or []:
        if "rotation" in side:
            angle = float(side["rotation"])
    if not angle and "rotate" in (stream.get("tags") or {}):
        angle = float(stream["tags"]["rotate"])
    return int(round(angle / 90.0) * 90) % 360


def _option_args(options: Mapping[str, str] | None) -> list[str]:
    return [arg for k, v in (options or {}).items() for arg in (f"-{k}", str(v))]


def probe(
    path: str, *, timeout_s: float, input_options: Mapping[str, str] | None = None
) -> ProbeInfo:
    """Probe a local media file: duration, fps, displayed size, rotation, audio presence.

    Raises MediaError with reason `unreadable` (not a media file or
    truncated), `not_a_video` (a still image), `no_video` (audio only) or
    `no_duration`.
    """
    ffprobe = ["ffprobe", "-v", "error", *_option_args(input_options)]
    try:
        out = run_command(
            [*ffprobe, "-show_format", "-show_streams", "-of", "json", path], timeout_s=timeout_s
        )
    except MediaError as exc:
        if exc.reason == "ffmpeg_failed":
            raise MediaError("unreadable", f"not a readable media file ({exc.message})") from None
        raise
    try:
        data = json.loads(out.decode("utf-8", "replace"))
    except json.JSONDecodeError:
        raise MediaError("unreadable", "ffprobe returned no parsable description") from None
    streams = data.get("streams", []) or []
    fmt = data.get("format", {}) or {}
    format_name = str(fmt.get("format_name", ""))
    video = [
        s
        for s in streams
        if s.get("codec_type") == "video" and not (s.get("disposition") or {}).get("attached_pic")
    ]
    audio = [s for s in streams if s.get("codec_type") == "audio"]
    if not video:
        if audio:
            raise MediaError("no_video", "file has audio but no video stream (audio-only file)")
        raise MediaError("unreadable", f"no video or audio stream (format {format_name or '?'})")
    v = video[0]
    codec = str(v.get("codec_name", "?"))
    if format_name in _IMAGE_FORMATS or (
        codec in _IMAGE_CODECS and not _float(fmt.get("duration")) and not _float(v.get("duration"))
    ):
        raise MediaError(
            "not_a_video", f"file is a still image ({format_name}/{codec}), not a video"
        )
    container = _float(fmt.get("duration"))
    stream = _float(v.get("duration"))
    duration = min(d for d in (container, stream) if d) if (container or stream) else 0.0
    if duration <= 0:
        raise MediaError("no_duration", "ffprobe reports no duration for the video")
    rotation = _rotation(v)
    width, height = int(v.get("width", 0) or 0), int(v.get("height", 0) or 0)
    if rotation in (90, 270):
        width, height = height, width
    fps = _ratio(v.get("avg_frame_rate")) or _ratio(v.get("r_frame_rate"))
    a = audio[0] if audio else {}
    return ProbeInfo(
        duration=duration,
        fps=fps,
        width=width,
        height=height,
        rotation=rotation,
        has_audio=bool(audio),
        video_codec=codec,
        audio_codec=str(a["codec_name"]) if a.get("codec_name") else None,
        format_name=format_name,
        audio_channels=int(a.get("channels", 0) or 0),
        audio_rate=int(a.get("sample_rate", 0) or 0),
    )


def has_audio_stream(path: str, *, timeout_s: float) -> bool:
    """True if the local file has an audio stream (for separate audio files).

    WAV, FLAC, OGG and the other formats libsndfile reads are checked in-process (starting
    ffprobe costs ~0.1 s of CPU, as much as the rest of a short clip's work); anything else
    (m4a, mp3, mp4, ...) goes to ffprobe. A file libsndfile cannot read is never refused
    here: ffprobe decides.
    """
    try:
        return bool(soundfile.info(path).channels > 0)
    except (RuntimeError, TypeError, ValueError):  # libsndfile errors are RuntimeErrors
        pass
    try:
        out = run_command(
            [
                "ffprobe",
                "-v",
                "error",
                "-select_streams",
                "a",
                "-show_entries",
                "stream=codec_type",
                "-of",
                "json",
                path,
            ],
            timeout_s=timeout_s,
        )
    except MediaError as exc:
        if exc.reason == "ffmpeg_failed":
            raise MediaError("unreadable", f"audio file: {exc.message}") from None
        raise
    return bool(json.loads(out.decode("utf-8", "replace")).get("streams"))


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


def extract_frames(
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
) -> list[bytes]:
    """JPEG frames only; see `decode_clip`."""
    return decode_clip(
        path,
        times,
        size=size,
        quality=quality,
        timeout_s=timeout_s,
        threads=threads,
        seek_above_s=seek_above_s,
        duration=duration,
        fps=fps,
    ).frames


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
    `quality` (1-95). Clips up to `seek_above_s` seconds long (`duration`)
    are decoded in one pass that stops after the last sampled frame
    (cheapest when keyframes are sparse); longer ones seek to each time (`-ss`
    before `-i`), so only the GOP around each frame is decoded. If the
    one-pass decode yields fewer frames (several times inside one frame:
    very short clips), the seeking decode is used. Audio is 16 kHz mono,
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
        if 0 < duration <= seek_above_s:
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


@dataclass(frozen=True)
class _AudioOut:
    source: str | None
    samples: int
    file: str
    options: dict[str, str]

    def output(self, same_input: Any) -> Any:
        inp = same_input if same_input is not None else ffmpeg.input(self.source, **self.options)
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
        .compile(overwrite_output=True)  # the temp audio file of a first, too-short pass
    )


def _one_pass(
    path: str, times: list[float], size: int, threads: int, options: dict[str, str]
) -> tuple[Any, Any]:
    # Select the first frame at/after each time: t >= T_k while the last selected frame is < T_k.
    terms = [f"gte(t,{times[0]:.6f})*isnan(prev_selected_t)"]
    terms += [f"gte(t,{t:.6f})*lt(prev_selected_t,{t:.6f})" for t in times[1:]]
    inp = ffmpeg.input(path, threads=threads, **options)
    return _resize_crop(inp.video.filter("select", "+".join(terms)), size), inp


def _seeking(
    path: str, times: list[float], size: int, threads: int, options: dict[str, str]
) -> tuple[Any, Any]:
    branches = []
    for t in times:
        stream = ffmpeg.input(path, ss=f"{t:.6f}", threads=threads, **options).video
        branches.append(_resize_crop(stream.trim(end_frame=1).setpts("PTS-STARTPTS"), size))
    joined = branches[0] if len(branches) == 1 else ffmpeg.concat(*branches, v=1, a=0)
    return joined, None


def _decode_frames(
    args: list[str], count: int, size: int, quality: int, timeout_s: float, *, allow_short: bool
) -> list[bytes] | None:
    try:
        raw = run_command(args, timeout_s=timeout_s)
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
        ffmpeg.input(path, **dict(input_options or {}))
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
        .compile()
    )
    try:
        raw = run_command(args, timeout_s=timeout_s)
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

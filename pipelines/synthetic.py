"""Real media made with ffmpeg, for tests, benchmarks and the demo.

    make_clip(ClipSpec(width=640, height=360, fps=25, duration=5), "a.mp4")
    manifest = make_demo_dataset("demo/", count=48)     # tri-modal clips + captions.jsonl
    make_broken("truncated", "bad.mp4", source="a.mp4")

`ClipSpec` picks size, frame rate, duration, codecs, container, audio
(channels, tone or noise, none), rotation metadata, variable frame rate and
whether the mp4 index goes first. Demo clips pair a visual pattern (colour,
shape, motion) with a sound (tone pitch or noise colour) and are made for
every combination, so a caption names both: text alone matches several
clips by what is seen or by what is heard, and only both identify one.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "DEMO_COLOURS",
    "DEMO_MOTIONS",
    "DEMO_SHAPES",
    "DEMO_SOUNDS",
    "ClipSpec",
    "DemoClip",
    "demo_clips",
    "demo_specs",
    "make_broken",
    "make_clip",
    "make_demo_dataset",
    "write_jsonl",
]

VideoCodec = Literal["h264", "vp8", "vp9", "mpeg4"]
AudioCodec = Literal["aac", "opus", "vorbis", "mp3", "pcm", "flac"]
Container = Literal["mp4", "mov", "mkv", "webm", "avi"]

_VIDEO_ARGS: dict[str, list[str]] = {
    "h264": ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"],
    "vp8": ["-c:v", "libvpx", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "400k"],
    "vp9": ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "400k"],
    "mpeg4": ["-c:v", "mpeg4", "-q:v", "5"],
}
_AUDIO_ARGS: dict[str, list[str]] = {
    "aac": ["-c:a", "aac", "-b:a", "96k"],
    "opus": ["-c:a", "libopus", "-b:a", "64k"],
    "vorbis": ["-c:a", "libvorbis", "-q:a", "3"],
    "mp3": ["-c:a", "libmp3lame", "-b:a", "96k"],
    "pcm": ["-c:a", "pcm_s16le"],
    "flac": ["-c:a", "flac"],
}

DEMO_COLOURS = {"red": "red", "green": "lime", "blue": "blue", "yellow": "yellow"}
DEMO_SHAPES = ("square", "bar")
DEMO_MOTIONS = ("left to right", "top to bottom", "standing still")
DEMO_SOUNDS = {
    "a low hum": "sine=frequency=110",
    "a high beep": "sine=frequency=1760",
    "white noise hiss": "anoisesrc=color=white:amplitude=0.3",
    "a deep brown noise rumble": "anoisesrc=color=brown:amplitude=0.5",
}


@dataclass(frozen=True)
class ClipSpec:
    """A clip to make. Sizes in pixels, times in seconds, audio rate in Hz."""

    width: int = 320
    height: int = 240
    fps: float = 25.0
    duration: float = 2.0
    video_codec: VideoCodec = "h264"
    audio_codec: AudioCodec | None = "aac"
    """None makes a clip without an audio track."""
    container: Container = "mp4"
    audio_channels: int = 2
    sample_rate: int = 44_100
    audio_source: str = "sine=frequency=440"
    """An ffmpeg lavfi audio source (tone or noise)."""
    video_source: str = ""
    """An ffmpeg lavfi video graph; empty = the `testsrc2` pattern."""
    rotation: int = 0
    """Display rotation metadata in degrees (mp4/mov only)."""
    variable_fps: bool = False
    """First second at `fps`, the rest at a third of it (timestamps, not duplicated frames)."""
    faststart: bool = False
    """mp4/mov: index (moov) first; False leaves it at the end, as most cameras do."""
    keyframe_s: float = 10.0
    """Seconds between keyframes (the encoder's GOP, x264's default 250 frames at 25 fps)."""

    def __post_init__(self) -> None:
        if self.width % 2 or self.height % 2 or self.width < 16 or self.height < 16:
            raise ValueError(
                f"width and height must be even and >= 16, got {self.width}x{self.height}"
            )
        if self.duration <= 0 or self.fps <= 0 or self.keyframe_s <= 0:
            raise ValueError("duration, fps and keyframe_s must be > 0")
        if self.rotation % 90:
            raise ValueError(f"rotation must be a multiple of 90, got {self.rotation}")


def _run(args: list[str], timeout_s: float) -> None:
    res = subprocess.run(args, capture_output=True, timeout=timeout_s, check=False)
    if res.returncode != 0:
        tail = res.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
        raise RuntimeError(f"ffmpeg failed making a clip: {' | '.join(tail)}")


def make_clip(spec: ClipSpec, path: str | Path, *, timeout_s: float = 300.0) -> Path:
    """Encode `spec` into `path` (any file name; passed as an argument, never through a shell)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = f"{spec.width}x{spec.height}"
    video = spec.video_source or f"testsrc2=size={size}:rate={spec.fps}"
    args = [
        "ffmpeg",
        "-nostdin",
        "-v",
        "error",
        "-y",
        "-f",
        "lavfi",
        "-i",
        f"{video},trim=duration={spec.duration}",
    ]
    if spec.audio_codec is not None:
        src = f"{spec.audio_source}:sample_rate={spec.sample_rate}:duration={spec.duration}"
        args += ["-f", "lavfi", "-i", src]
    vf = ["format=yuv420p"]
    if spec.variable_fps:
        fps = spec.fps
        vf.append(f"select='lt(n\\,{fps})+not(mod(n\\,3))'")
        vf.append(f"setpts='if(lt(N\\,{fps})\\,N/{fps}\\,1+(N-{fps})*3/{fps})/TB'")
        args += ["-fps_mode", "vfr"]
    args += [
        "-vf",
        ",".join(vf),
        *_VIDEO_ARGS[spec.video_codec],
        "-g",
        str(max(1, int(spec.fps * spec.keyframe_s))),
    ]
    if spec.audio_codec is not None:
        args += [*_AUDIO_ARGS[spec.audio_codec], "-ac", str(spec.audio_channels)]
    if spec.container in ("mp4", "mov") and spec.faststart:
        args += ["-movflags", "+faststart"]
    args += [
        "-t",
        f"{spec.duration}",
        "-f",
        {"mkv": "matroska"}.get(spec.container, spec.container),
    ]
    if not spec.rotation:
        _run([*args, str(out)], timeout_s)
        return out
    with tempfile.TemporaryDirectory(prefix="gram-synth-") as tmp:
        plain = Path(tmp) / f"plain.{spec.container}"
        _run([*args, str(plain)], timeout_s)
        _run(
            [
                "ffmpeg",
                "-nostdin",
                "-v",
                "error",
                "-y",
                "-i",
                str(plain),
                "-map",
                "0",
                "-c",
                "copy",
                "-metadata:s:v:0",
                f"rotate={spec.rotation}",
                str(out),
            ],
            timeout_s,
        )
    return out


def make_broken(
    kind: Literal["empty", "truncated", "text", "image", "audio_only"],
    path: str | Path,
    *,
    source: str | Path | None = None,
) -> Path:
    """A bad input named like a video: `empty` (0 bytes), `truncated` (first 40% of
    `source`), `text`, `image` (a PNG), `audio_only` (m4a audio, no video)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if kind == "empty":
        out.write_bytes(b"")
    elif kind == "truncated":
        if source is None:
            raise ValueError("truncated needs a source clip")
        data = Path(source).read_bytes()
        out.write_bytes(data[: int(len(data) * 0.4)])
    elif kind == "text":
        out.write_text("this is not a video, just text in a file named like one\n" * 20)
    elif kind == "image":
        _run(
            [
                "ffmpeg",
                "-nostdin",
                "-v",
                "error",
                "-y",
                "-f",
                "lavfi",
                "-i",
                "testsrc2=size=64x48",
                "-frames:v",
                "1",
                "-f",
                "image2",
                "-c:v",
                "png",
                str(out),
            ],
            60,
        )
    elif kind == "audio_only":
        _run(
            [
                "ffmpeg",
                "-nostdin",
                "-v",
                "error",
                "-y",
                "-f",
                "lavfi",
                "-i",
                "sine=frequency=440:duration=1",
                "-c:a",
                "aac",
                "-f",
                "mp4",
                str(out),
            ],
            60,
        )
    else:
        raise ValueError(f"unknown broken kind {kind!r}")
    return out


@dataclass(frozen=True)
class DemoClip:
    """One demo clip: how to make it, its captions and what it shows and sounds like."""

    spec: ClipSpec
    captions: list[str]
    attributes: dict[str, str]


def demo_specs(
    *, width: int = 160, height: int = 120, fps: float = 10.0, duration: float = 2.0
) -> list[tuple[ClipSpec, list[str]]]:
    """Every colour x shape x motion x sound combination as (spec, captions)."""
    return [(c.spec, c.captions) for c in demo_clips(width, height, fps, duration)]


def demo_clips(
    width: int = 160, height: int = 120, fps: float = 10.0, duration: float = 2.0
) -> list[DemoClip]:
    """Every colour x shape x motion x sound combination, with captions and attributes."""
    out = []
    for (colour, ffcolour), shape, motion, (sound, source) in itertools.product(
        DEMO_COLOURS.items(), DEMO_SHAPES, DEMO_MOTIONS, DEMO_SOUNDS.items()
    ):
        bw, bh = (height // 3, height // 3) if shape == "square" else (width // 2, height // 8)
        x = {
            "left to right": f"(iw-{bw})*t/{duration}",
            "top to bottom": f"(iw-{bw})/2",
            "standing still": f"(iw-{bw})/2",
        }[motion]
        y = {
            "left to right": f"(ih-{bh})/2",
            "top to bottom": f"(ih-{bh})*t/{duration}",
            "standing still": f"(ih-{bh})/2",
        }[motion]
        video = (
            f"color=c=black:size={width}x{height}:rate={fps},"
            f"drawbox=x='{x}':y='{y}':w={bw}:h={bh}:color={ffcolour}:t=fill"
        )
        spec = ClipSpec(
            width=width,
            height=height,
            fps=fps,
            duration=duration,
            audio_source=source,
            video_source=video,
            audio_channels=1,
            sample_rate=16_000,
        )
        moving = "standing still" if motion == "standing still" else f"moving {motion}"
        captions = [
            f"a {colour} {shape} {moving} with {sound}",
            f"{sound} while a {colour} {shape} is {moving} on black",
        ]
        attributes = {"colour": colour, "shape": shape, "motion": motion, "sound": sound}
        out.append(DemoClip(spec, captions, attributes))
    return out


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write rows as a JSONL manifest (UTF-8, one object per line)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out


def make_demo_dataset(folder: str | Path, *, count: int | None = None, **size: Any) -> Path:
    """Make demo clips (the first `count` combinations; all 96 by default) and
    `captions.jsonl` in `folder`; returns the manifest path."""
    root = Path(folder)
    clips = demo_clips(**size)[:count]
    rows = []
    for i, clip in enumerate(clips):
        name = f"demo_{i:04d}.mp4"
        make_clip(clip.spec, root / name)
        rows.append(
            {"id": f"demo_{i:04d}", "video": name, "captions": clip.captions, **clip.attributes}
        )
    return write_jsonl(rows, root / "captions.jsonl")

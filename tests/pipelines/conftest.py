"""Media fixtures made once per session with real ffmpeg (small, so the suite stays fast)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipelines.synthetic import ClipSpec, make_broken, make_clip

SPLIT_VIDEO = "color=c=red:size={w}x{h}:rate={fps},drawbox=x=iw/2:y=0:w=iw/2:h=ih:color=blue:t=fill"
"""Left half red, right half blue: shows which way a frame was turned."""

SHELL_NAME = "weird name; $(touch pwned) `id` 'q' & |.mp4"


@dataclass(frozen=True)
class Fixture:
    """A made clip and what it should decode to."""

    path: Path
    spec: ClipSpec | None


def _specs() -> dict[str, ClipSpec]:
    return {
        "h264_aac.mp4": ClipSpec(duration=2.0, audio_channels=2),
        "h264_noaudio.mp4": ClipSpec(duration=1.5, audio_codec=None, width=256, height=144),
        "vp9_opus.webm": ClipSpec(
            video_codec="vp9",
            audio_codec="opus",
            container="webm",
            duration=1.0,
            audio_channels=1,
            sample_rate=48_000,
        ),
        "mpeg4_mp3.avi": ClipSpec(
            video_codec="mpeg4", audio_codec="mp3", container="avi", duration=1.2, fps=15
        ),
        "vp8_vorbis.mkv": ClipSpec(
            video_codec="vp8", audio_codec="vorbis", container="mkv", duration=1.0, fps=30
        ),
        "rotated90.mp4": ClipSpec(
            duration=1.0,
            rotation=90,
            width=320,
            height=180,
            video_source=SPLIT_VIDEO.format(w=320, h=180, fps=25),
        ),
        "upright.mp4": ClipSpec(
            duration=1.0,
            width=320,
            height=180,
            video_source=SPLIT_VIDEO.format(w=320, h=180, fps=25),
        ),
        "vfr.mp4": ClipSpec(duration=3.0, variable_fps=True),
        "short.mp4": ClipSpec(duration=0.3, fps=10, width=160, height=120),
        "long.mp4": ClipSpec(duration=90.0, fps=5, width=64, height=48, audio_codec=None),
        "tall.mp4": ClipSpec(duration=1.0, width=180, height=320),
        "uhd.mp4": ClipSpec(duration=0.4, fps=5, width=3840, height=2160, audio_codec=None),
    }


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Fixture]:
    """Every fixture clip by name (good ones with their spec, broken ones with None)."""
    if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
        pytest.fail("ffmpeg/ffprobe are not installed: run `make setup`")
    root = tmp_path_factory.mktemp("media")
    out: dict[str, Fixture] = {}
    for name, spec in _specs().items():
        out[name] = Fixture(make_clip(spec, root / name), spec)
    out[SHELL_NAME] = Fixture(root / SHELL_NAME, _specs()["h264_aac.mp4"])
    shutil.copyfile(out["h264_aac.mp4"].path, out[SHELL_NAME].path)
    for kind in ("empty", "truncated", "text", "image", "audio_only"):
        name = f"broken_{kind}.mp4"
        out[name] = Fixture(make_broken(kind, root / name, source=out["h264_aac.mp4"].path), None)
    return out

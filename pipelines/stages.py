"""Per-clip stages: small dataclasses with declared resources and a `process()` method.

    stages = build_stages(config)
    result = process_item(stages, item, timeout_s=300)   # never raises for a bad clip

A `ClipTask` flows through Fetch -> Probe -> Decode -> Pack. A stage
that fails raises `MediaError`/`StorageError`; `process_item` records the
reason on the result (a failed manifest row) and skips the rest, so one
corrupt clip never stops a run. No stage imports Ray: `ray_adapter` runs the
chain inside Ray tasks, and the benchmark runs it in a process pool.
The stages share the clip's local temp file, so they run together in one
task, which declares the largest of their CPU needs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gram.schema import AUDIO_SUFFIX, CAPTIONS_SUFFIX, META_SUFFIX, ClipMeta, frame_suffix
from pipelines import PIPELINE_VERSION, media, storage
from pipelines.config import PreprocessConfig
from pipelines.inputs import InputItem
from pipelines.media import MediaError, ProbeInfo
from pipelines.storage import S3Config, StorageError, StorageNotFoundError
from pipelines.tar_format import json_bytes, sample_bytes

__all__ = [
    "ClipResult",
    "ClipTask",
    "DecodeStage",
    "FetchStage",
    "PackStage",
    "ProbeStage",
    "Resources",
    "Stage",
    "build_stages",
    "failed_row",
    "process_item",
]


@dataclass(frozen=True)
class Resources:
    """What one running stage needs: CPU cores (fractions allowed)."""

    cpus: float = 1.0


@dataclass
class ClipTask:
    """One clip on its way through the stages (all times in seconds)."""

    item: InputItem
    workdir: Path
    deadline: float
    """time.monotonic() value after which the clip is abandoned."""
    video_path: str = ""
    audio_path: str = ""
    info: ProbeInfo | None = None
    times: list[float] = field(default_factory=list)
    frames: list[bytes] = field(default_factory=list)
    has_audio: bool = False
    audio_samples: int = 0
    flac: bytes = b""
    sample: bytes = b""

    def remaining(self) -> float:
        """Seconds left before the clip's deadline."""
        return self.deadline - time.monotonic()


class Stage(Protocol):
    """A step of the per-clip chain."""

    name: str
    resources: Resources

    def process(self, task: ClipTask) -> None:
        """Advance `task`; raise MediaError/StorageError when the clip cannot go on."""


def _fetch(uri: str, workdir: Path, stem: str, s3: S3Config) -> str:
    """A local, seekable path for `uri`: local files are used in place, objects downloaded."""
    if storage.is_s3(uri):
        suffix = Path(uri.rsplit("/", 1)[-1]).suffix[:8]
        local = storage.download(uri, workdir / f"{stem}{suffix}", s3=s3)
        if local.stat().st_size == 0:
            raise MediaError("empty_file", f"{uri} is empty (0 bytes)")
        return str(local)
    path = Path(uri)
    if not path.exists():
        raise StorageNotFoundError(f"read {uri}: no such file")
    if not path.is_file():
        raise MediaError("not_a_file", f"{uri} is not a regular file")
    if path.stat().st_size == 0:
        raise MediaError("empty_file", f"{uri} is empty (0 bytes)")
    return str(path)


@dataclass
class FetchStage:
    """Make the clip's video (and separate audio, if any) readable as local files."""

    s3: S3Config
    name: str = "fetch"
    resources: Resources = Resources(cpus=0.1)

    def process(self, task: ClipTask) -> None:
        """Set `video_path` (and `audio_path`)."""
        task.video_path = _fetch(task.item.video, task.workdir, "video", self.s3)
        if task.item.audio:
            task.audio_path = _fetch(task.item.audio, task.workdir, "audio", self.s3)


@dataclass
class ProbeStage:
    """Read the video's duration, frame rate, size and rotation (in process); choose the frame
    times."""

    num_segments: int
    frames_per_segment: int
    name: str = "probe"
    resources: Resources = Resources(cpus=1.0)

    def process(self, task: ClipTask) -> None:
        """Set `info` and `times`."""
        task.info = media.probe(task.video_path, timeout_s=task.remaining())
        task.times = media.frame_times(
            task.info.duration, self.num_segments, self.frames_per_segment
        )


@dataclass
class DecodeStage:
    """Decode the sampled frames (JPEG) and the audio (16 kHz mono FLAC of exactly
    min(duration, max_seconds)) in one ffmpeg process per clip."""

    size: int
    jpeg_quality: int
    seek_above_s: float
    max_seconds: float
    threads: int = 1
    name: str = "decode"
    resources: Resources = Resources(cpus=1.0)

    def process(self, task: ClipTask) -> None:
        """Set `frames`, and `has_audio`, `audio_samples`, `flac` when there is audio."""
        info = _need_info(task)
        source: str | None = task.video_path if info.has_audio else None
        if task.audio_path:
            if not media.has_audio_stream(task.audio_path, timeout_s=task.remaining()):
                raise MediaError("no_audio", f"{task.item.audio} has no audio stream")
            source = task.audio_path
        samples = media.audio_length(info.duration, self.max_seconds) if source else 0
        out = media.decode_clip(
            task.video_path,
            task.times,
            size=self.size,
            quality=self.jpeg_quality,
            timeout_s=task.remaining(),
            threads=self.threads,
            seek_above_s=self.seek_above_s,
            duration=info.duration,
            fps=info.fps,
            keyframes=info.keyframes,
            audio_from=source,
            audio_samples=samples,
            workdir=str(task.workdir),
        )
        task.frames = out.frames
        if out.pcm is not None:
            task.flac = media.encode_flac(out.pcm)
            task.audio_samples = samples
            task.has_audio = True


@dataclass
class PackStage:
    """Serialise the sample's tar members: frames, audio, captions, metadata."""

    config_hash: str
    num_segments: int
    frames_per_segment: int
    name: str = "pack"
    resources: Resources = Resources(cpus=0.1)

    def process(self, task: ClipTask) -> None:
        """Set `sample`."""
        info = _need_info(task)
        item = task.item
        meta = ClipMeta(
            id=item.id,
            source=item.video,
            duration=round(info.duration, 6),
            fps=round(info.fps, 6),
            has_audio=task.has_audio,
            frame_times=task.times,
            num_segments=self.num_segments,
            frames_per_segment=self.frames_per_segment,
            width=info.width,
            height=info.height,
            rotation=info.rotation,
            audio_source=item.audio if task.has_audio and item.audio else None,
            audio_samples=task.audio_samples if task.has_audio else 0,
            pipeline_version=PIPELINE_VERSION,
            config_hash=self.config_hash,
            extra=dict(item.extra),
        )
        members = [(frame_suffix(i), jpg) for i, jpg in enumerate(task.frames)]
        if task.has_audio:
            members.append((AUDIO_SUFFIX, task.flac))
        members.append((CAPTIONS_SUFFIX, json_bytes(list(item.captions))))
        members.append((META_SUFFIX, json_bytes(meta.to_json())))
        task.sample = sample_bytes(item.key, members)


def _need_info(task: ClipTask) -> ProbeInfo:
    if task.info is None:
        raise MediaError("internal_error", "stage order: probe must run before this stage")
    return task.info


def build_stages(config: PreprocessConfig) -> list[Stage]:
    """The per-clip chain for `config` (S3 credentials as given: resolve them first)."""
    f = config.frames
    return [
        FetchStage(s3=config.s3),
        ProbeStage(num_segments=f.num_segments, frames_per_segment=f.frames_per_segment),
        DecodeStage(
            size=f.size,
            jpeg_quality=f.jpeg_quality,
            seek_above_s=f.seek_above_s,
            max_seconds=config.audio.max_seconds,
            threads=config.execution.ffmpeg_threads,
        ),
        PackStage(
            config_hash=config.hash(),
            num_segments=f.num_segments,
            frames_per_segment=f.frames_per_segment,
        ),
    ]


@dataclass
class ClipResult:
    """What one input produces: its sample's tar bytes (empty if failed) and its manifest row."""

    index: int
    sample: bytes
    row: dict[str, Any]


def failed_row(item: InputItem, reason: str, error: str) -> dict[str, Any]:
    """The manifest row of an input that produced no sample."""
    return {
        "index": item.index,
        "line": item.line,
        "id": item.id,
        "key": item.key,
        "uri": item.video,
        "audio_uri": item.audio,
        "status": "failed",
        "reason": reason,
        "error": error[:2000],
        "shard": None,
        "duration": None,
        "fps": None,
        "width": None,
        "height": None,
        "rotation": None,
        "has_audio": None,
        "frames": 0,
        "num_captions": len(item.captions),
        "sample_bytes": 0,
    }


def _ok_row(task: ClipTask) -> dict[str, Any]:
    info = _need_info(task)
    row = failed_row(task.item, "", "")
    row.update(
        status="ok",
        reason=None,
        error=None,
        duration=round(info.duration, 6),
        fps=round(info.fps, 6),
        width=info.width,
        height=info.height,
        rotation=info.rotation,
        has_audio=task.has_audio,
        frames=len(task.frames),
        sample_bytes=len(task.sample),
    )
    return row


def process_item(
    stages: list[Stage],
    item: InputItem,
    *,
    timeout_s: float,
    tmp_root: str | None = None,
    workdir: Path | None = None,
) -> ClipResult:
    """Run the chain on one input; every failure becomes a failed row, never an exception.

    The clip's files go to a new temp folder (under `tmp_root`), removed after it; or to
    `workdir`, an empty folder the caller reuses clip after clip, emptied after each one
    (making and removing a folder per clip costs ~2 ms on some disks).
    """
    if item.reason is not None:
        return ClipResult(item.index, b"", failed_row(item, item.reason, item.error or item.reason))
    work = workdir or Path(tempfile.mkdtemp(prefix="gram-clip-", dir=tmp_root))
    task = ClipTask(item=item, workdir=work, deadline=time.monotonic() + timeout_s)
    try:
        for stage in stages:
            if task.remaining() <= 0:
                raise MediaError(
                    "timeout",
                    f"clip took longer than {timeout_s:.0f}s "
                    f"(execution.clip_timeout_s) before stage {stage.name}",
                )
            stage.process(task)
    except MediaError as exc:
        return ClipResult(item.index, b"", failed_row(item, exc.reason, exc.message))
    except StorageNotFoundError as exc:
        return ClipResult(item.index, b"", failed_row(item, "not_found", str(exc)))
    except StorageError as exc:
        return ClipResult(item.index, b"", failed_row(item, "storage_error", str(exc)))
    except Exception as exc:
        where = traceback.extract_tb(exc.__traceback__)[-1]
        message = f"{type(exc).__name__}: {exc} (at {Path(where.filename).name}:{where.lineno})"
        return ClipResult(item.index, b"", failed_row(item, "internal_error", message))
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            _empty(workdir)
    return ClipResult(item.index, task.sample, _ok_row(task))


def _empty(folder: Path) -> None:
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                Path(entry.path).unlink(missing_ok=True)

"""`PreprocessConfig`: every knob of the preprocessing job, typed, with defaults.

Loaded with `gram.config.load_config(PreprocessConfig, "jobs/configs/preprocess.yaml",
["frames.num_segments=16"])`; a wrong key or value raises `ConfigError` naming it.
Only the groups that change the shard bytes (`frames`, `audio`, `shards`,
`inputs`) enter the config hash; where to run, timeouts and credentials do not.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from gram.config import ConfigError, to_dict
from pipelines import PIPELINE_VERSION
from pipelines.storage import S3Config

__all__ = [
    "AudioConfig",
    "ExecutionConfig",
    "FramesConfig",
    "InputsConfig",
    "PreprocessConfig",
    "ShardsConfig",
]


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass
class FramesConfig:
    """Video frames stored per clip."""

    num_segments: int = 8
    """The clip is cut into this many equal segments."""
    frames_per_segment: int = 1
    """Frames per segment, evenly spaced (1 = the midpoint; more = training-time choice)."""
    size: int = 224
    """Output frames are size x size pixels: short side scaled to it, centre crop."""
    jpeg_quality: int = 90
    """JPEG quality, 1-95 (Pillow's scale)."""
    seek_above_s: float = 60.0
    """Clips longer than this (seconds) seek to each frame instead of one decode pass, when
    the container has no complete keyframe index; with one (mp4/mov), the way that decodes
    less is taken."""

    def __post_init__(self) -> None:
        _check(self.num_segments >= 1, "frames.num_segments", "must be >= 1")
        _check(self.frames_per_segment >= 1, "frames.frames_per_segment", "must be >= 1")
        _check(
            self.num_segments * self.frames_per_segment <= 1000,
            "frames.num_segments",
            "num_segments * frames_per_segment must be <= 1000",
        )
        _check(16 <= self.size <= 4096, "frames.size", "must be in [16, 4096] pixels")
        _check(1 <= self.jpeg_quality <= 95, "frames.jpeg_quality", "must be in [1, 95]")
        _check(self.seek_above_s >= 0, "frames.seek_above_s", "must be >= 0 seconds")


@dataclass
class AudioConfig:
    """Audio stored per clip: 16 kHz mono FLAC of exactly min(duration, max_seconds)."""

    max_seconds: float = 10.0
    """Longest audio kept, in seconds, from the start of the clip."""

    def __post_init__(self) -> None:
        _check(self.max_seconds > 0, "audio.max_seconds", "must be > 0 seconds")


@dataclass
class ShardsConfig:
    """Output shard layout: `{prefix}-{index:06d}.tar`."""

    prefix: str = "shard"
    samples_per_shard: int = 1000
    """Inputs per shard (failed inputs leave a gap): ~0.3 MB per 10 s clip at the defaults."""

    def __post_init__(self) -> None:
        _check(
            bool(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.prefix)),
            "shards.prefix",
            "must be 1-64 characters of A-Z a-z 0-9 _ -",
        )
        _check(self.samples_per_shard >= 1, "shards.samples_per_shard", "must be >= 1")


@dataclass
class InputsConfig:
    """How inputs are read and checked."""

    captions_file: str = ""
    """Prefix input only: captions keyed by file stem (JSON object or JSONL with id/captions);
    relative to the prefix; empty = `captions.jsonl` or `captions.json` there."""
    video_extensions: list[str] = field(
        default_factory=lambda: [".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v"]
    )
    """Prefix input only: files with these endings are videos."""
    duplicate_ids: Literal["fail", "error"] = "fail"
    """`fail`: later rows with an id already seen become failed rows; `error`: refuse the input."""
    max_caption_chars: int = 4096
    """A longer caption fails its clip (reason caption_too_long)."""

    def __post_init__(self) -> None:
        _check(self.max_caption_chars >= 1, "inputs.max_caption_chars", "must be >= 1")
        _check(
            all(e.startswith(".") for e in self.video_extensions),
            "inputs.video_extensions",
            "entries must start with a dot, e.g. .mp4",
        )


@dataclass
class ExecutionConfig:
    """Where and how the work runs (not part of the config hash)."""

    mode: Literal["auto", "ray", "local"] = "auto"
    """`local`: every shard in this process, no Ray; `ray`: shard tasks on Ray; `auto`: local
    when at most `local_max_inputs` inputs are left to process, else Ray."""
    local_max_inputs: int = 16
    """`mode=auto` runs in this process up to this many inputs left to process."""
    ray_address: str = ""
    """Ray cluster to join; empty = $RAY_ADDRESS if set, else start a local Ray."""
    local_num_cpus: int = 0
    """CPUs of a locally started Ray; 0 = all cores."""
    cpus_per_task: float = 0.0
    """CPUs declared by each task; 0 = the largest need declared by the stages (1)."""
    max_tasks_in_flight: int = 0
    """Shard tasks submitted and not yet finished; 0 = twice the cluster's CPUs."""
    clips_per_task: int = 4
    """When there are fewer shards left than CPUs, each shard task spreads its clips over
    sub-tasks of this many clips (so small runs use every CPU)."""
    read_chunk_rows: int = 10_000
    """Input rows read and checked at a time (bounds the driver's memory)."""
    index_cache_mb: int = 8
    """Memory for the on-disk index of ids and captions that checks the whole input."""
    lease_seconds: float = 60.0
    """The job holds its output with a lease renewed every third of this; another job on
    the same output is refused meanwhile; a crashed job's lease expires after this
    (at once when it ran on the same machine)."""
    ffmpeg_threads: int = 1
    """Decoder/filter threads per ffmpeg process."""
    clip_timeout_s: float = 300.0
    """Wall-clock limit per clip in seconds (fetch + probe + decode); ffmpeg is killed after it."""
    max_failure_rate: float = 0.5
    """The run fails (no index.json) when more than this fraction of inputs failed."""
    progress_interval_s: float = 10.0
    """Seconds between progress lines."""
    spool_dir: str = ""
    """Local folder for the checked inputs and for shards being assembled; empty = the
    system temp folder."""

    def __post_init__(self) -> None:
        _check(
            self.mode in ("auto", "ray", "local"),
            "execution.mode",
            "must be one of auto, ray, local",
        )
        _check(self.local_max_inputs >= 0, "execution.local_max_inputs", "must be >= 0")
        _check(self.local_num_cpus >= 0, "execution.local_num_cpus", "must be >= 0")
        _check(self.cpus_per_task >= 0, "execution.cpus_per_task", "must be >= 0")
        _check(self.max_tasks_in_flight >= 0, "execution.max_tasks_in_flight", "must be >= 0")
        _check(self.clips_per_task >= 1, "execution.clips_per_task", "must be >= 1")
        _check(self.read_chunk_rows >= 1, "execution.read_chunk_rows", "must be >= 1")
        _check(self.index_cache_mb >= 1, "execution.index_cache_mb", "must be >= 1")
        _check(self.lease_seconds >= 5, "execution.lease_seconds", "must be >= 5 seconds")
        _check(self.ffmpeg_threads >= 1, "execution.ffmpeg_threads", "must be >= 1")
        _check(self.clip_timeout_s > 0, "execution.clip_timeout_s", "must be > 0 seconds")
        _check(
            0.0 <= self.max_failure_rate <= 1.0, "execution.max_failure_rate", "must be in [0, 1]"
        )
        _check(self.progress_interval_s > 0, "execution.progress_interval_s", "must be > 0")


@dataclass
class PreprocessConfig:
    """The preprocessing job: `input` manifest or prefix -> `output` folder/prefix of shards."""

    input: str = ""
    """Manifest (.jsonl, .csv, .parquet) or folder/prefix of videos; local path or s3://."""
    output: str = ""
    """Folder or s3:// prefix for shards, index.json and manifest.parquet."""
    frames: FramesConfig = field(default_factory=FramesConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    inputs: InputsConfig = field(default_factory=InputsConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    s3: S3Config = field(default_factory=S3Config)

    def require_paths(self) -> None:
        """Raise ConfigError unless `input` and `output` are set."""
        _check(bool(self.input), "input", "is required (--input URI or input=...)")
        _check(bool(self.output), "output", "is required (--output URI or output=...)")

    def hashed(self) -> dict[str, Any]:
        """The settings that determine the shard bytes, plus the pipeline version."""
        out: dict[str, Any] = {
            k: to_dict(getattr(self, k)) for k in ("frames", "audio", "shards", "inputs")
        }
        out["pipeline_version"] = PIPELINE_VERSION
        return out

    def hash(self) -> str:
        """16-hex-digit hash of `hashed()`."""
        canon = json.dumps(self.hashed(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    def public(self) -> dict[str, Any]:
        """Every setting except credentials (for index.json, logs and summaries)."""
        out: dict[str, Any] = {
            k: to_dict(getattr(self, k))
            for k in ("frames", "audio", "shards", "inputs", "execution")
        }
        out.update(input=self.input, output=self.output, s3=self.s3.public())
        return out

"""The shard contract between preprocessing and training.

One WebDataset sample per clip. Tar members are `{key}.{suffix}`:

    {key}.f000.jpg ... {key}.fNNN.jpg   frames in time order (JPEG, RGB)
    {key}.flac                          16 kHz mono audio (absent when has_audio is false)
    {key}.captions.json                 list[str], every caption of the clip
    {key}.json                          ClipMeta as a JSON object

Frames are `num_segments * frames_per_segment` JPEGs: the clip is cut into
`num_segments` equal segments and `frames_per_segment` frames are taken evenly
inside each one (1 = the segment midpoint). Training may pick any frame of a
segment; evaluation takes the middle one.

Keys contain only ASCII letters, digits, `_` and `-` (WebDataset splits the
member name on its first dot, and `/` would make a path). `safe_key` maps any
input id to such a key; the mapping is recorded in the manifest.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "AUDIO_SUFFIX",
    "CAPTIONS_SUFFIX",
    "META_SUFFIX",
    "SAMPLE_RATE",
    "SCHEMA_VERSION",
    "ClipMeta",
    "frame_suffix",
    "is_frame_suffix",
    "safe_key",
    "validate_key",
    "validate_member_name",
]

SCHEMA_VERSION = 1
SAMPLE_RATE = 16_000
"""Audio sample rate in the shards, Hz."""

AUDIO_SUFFIX = "flac"
CAPTIONS_SUFFIX = "captions.json"
META_SUFFIX = "json"

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_FRAME_RE = re.compile(r"^f(\d{3})\.jpg$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def frame_suffix(index: int) -> str:
    """Member suffix of frame `index` (0-based, time order): `f000.jpg`."""
    if not 0 <= index < 1000:
        raise ValueError(f"frame index must be in [0, 1000), got {index}")
    return f"f{index:03d}.jpg"


def is_frame_suffix(suffix: str) -> int | None:
    """The frame index if `suffix` names a frame member, else None."""
    m = _FRAME_RE.match(suffix)
    return int(m.group(1)) if m else None


def validate_key(key: str) -> None:
    """Raise ValueError unless `key` is a valid sample key."""
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(
            f"invalid sample key {key!r}: keys are 1-128 characters of A-Z a-z 0-9 _ - "
            "(no dots, slashes or spaces); map input ids with gram.schema.safe_key()"
        )


def safe_key(raw_id: str) -> str:
    """Map any input id to a valid, stable, collision-resistant sample key.

    Ids that are already valid keys are returned unchanged. Others keep their
    safe characters and get a short hash of the original id appended, so
    `a.b` and `a_b` stay distinct.
    """
    if _KEY_RE.match(raw_id):
        return raw_id
    digest = hashlib.sha256(raw_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    cleaned = _UNSAFE.sub("_", raw_id).strip("_")[:100]
    return f"{cleaned}_{digest}" if cleaned else f"id_{digest}"


def validate_member_name(name: str) -> None:
    """Refuse tar member names that could escape a folder or hide control characters."""
    if (
        not name
        or name.startswith(("/", "\\"))
        or ".." in name.replace("\\", "/").split("/")
        or any(ord(ch) < 32 or ord(ch) == 127 for ch in name)
    ):
        raise ValueError(f"unsafe tar member name {name!r}")


@dataclass
class ClipMeta:
    """Per-clip metadata stored as `{key}.json`. Times in seconds."""

    id: str
    source: str
    duration: float
    fps: float
    has_audio: bool
    frame_times: list[float]
    num_segments: int
    frames_per_segment: int = 1
    width: int = 0
    height: int = 0
    rotation: int = 0
    audio_source: str | None = None
    audio_samples: int = 0
    sample_rate: int = SAMPLE_RATE
    pipeline_version: str = ""
    config_hash: str = ""
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.frame_times) != self.num_segments * self.frames_per_segment:
            raise ValueError(
                f"ClipMeta {self.id!r}: {len(self.frame_times)} frame_times for "
                f"{self.num_segments} segments x {self.frames_per_segment} frames"
            )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the `json` member)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClipMeta:
        """Parse the `json` member; unknown keys go to `extra` (forward compatible)."""
        known = {f for f in cls.__dataclass_fields__}
        extra = {k: v for k, v in data.items() if k not in known}
        args = {k: v for k, v in data.items() if k in known}
        args.setdefault("extra", {}).update(extra)
        return cls(**args)

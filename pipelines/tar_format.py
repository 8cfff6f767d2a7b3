"""Deterministic tar bytes for WebDataset samples and shards.

A sample is serialised once, where it is made, as a run of tar members
(header + data + padding) without the end-of-archive marker; a shard is the
concatenation of its samples in input order plus `END_OF_ARCHIVE`. Headers
carry fixed owner, mode and mtime, so equal content gives equal bytes.
"""

from __future__ import annotations

import json
import tarfile
from typing import Any

from gram.schema import validate_key, validate_member_name

__all__ = ["END_OF_ARCHIVE", "archive_padding", "json_bytes", "sample_bytes", "shard_name"]

_BLOCK = 512
_RECORD = 20 * _BLOCK
END_OF_ARCHIVE = b"\0" * (2 * _BLOCK)
"""Two zero blocks end a tar archive."""
MTIME = 0
"""Fixed member mtime (seconds since the epoch): shard bytes depend only on content."""


def shard_name(prefix: str, index: int) -> str:
    """`{prefix}-{index:06d}.tar`."""
    return f"{prefix}-{index:06d}.tar"


def json_bytes(obj: Any) -> bytes:
    """Canonical UTF-8 JSON (sorted keys, no extra spaces)."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def _member(name: str, data: bytes) -> bytes:
    validate_member_name(name)
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    header = info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")
    pad = (-len(data)) % _BLOCK
    return header + data + b"\0" * pad


def sample_bytes(key: str, members: list[tuple[str, bytes]]) -> bytes:
    """Tar members `{key}.{suffix}` for one sample, in the given order (no end marker)."""
    validate_key(key)
    return b"".join(_member(f"{key}.{suffix}", data) for suffix, data in members)


def archive_padding(length: int) -> bytes:
    """Zero bytes rounding an archive of `length` bytes (end marker included) to 10 KiB records."""
    return b"\0" * ((-length) % _RECORD)

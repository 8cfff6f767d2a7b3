"""What the served model opens: the admission of every media cell of a request.

A served model runs with the server's identity, so a media cell is never handed to
ffmpeg as the client wrote it. It is admitted in one of three forms, and becomes a
private copy in the request's temp folder:

- `data:[<type>];base64,<bytes>`: the media itself, at most `max_media_bytes` once
  decoded. Always accepted.
- an absolute path (or `file://` URI) inside one of `media_roots`. `..` segments and
  symbolic links are resolved first; the file is opened without following a last link,
  checked again on the open file (so a link swapped in after the first check does not
  count), must be a regular file of at most `max_media_bytes`, and is copied.
- `s3://bucket/key` under one of `s3_prefixes` (a prefix is a folder: `s3://b/media`
  admits `s3://b/media/x.mp4`, not `s3://b/media-old/x.mp4`; keys with empty, `.` or
  `..` segments are refused), at most `max_media_bytes`, downloaded with the server's
  AWS credentials.

Anything else is refused (`RefusedInputError`) with a message that states the rule and
nothing about the file: the same words whether it exists, is a directory or cannot be
read. No roots and no prefixes by default: only inline bytes are accepted.

ffmpeg and the in-process probes (`pipelines.media`, FFmpeg's demuxers through PyAV)
read only those copies, with `FFMPEG_INPUT_OPTIONS`: the `file` and `pipe` protocols
only, container formats from a fixed list (no playlists such as HLS or concat, which
make ffmpeg open other files or URLs named inside the media), and a bounded probe. A
request has at most `max_rows` rows, each row's media at most `max_media_seconds` of
duration (`RowBudget`); media failures are reported by their reason code
(`media_failure`), never with ffmpeg's own output.

Where the limits come from: the `serving.*` keys given at registration (stored with the
model version), each overridden by the serving process's environment, `ENV_PREFIX` +
the key in capitals (e.g. `GRAM_SERVING_MEDIA_ROOTS=/data/clips,/data/more`,
`GRAM_SERVING_S3_PREFIXES=s3://bucket/clips/`, lists separated by commas).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import stat
import tempfile
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import IO, Any

from gram.config import ConfigError

__all__ = [
    "ENV_PREFIX",
    "FFMPEG_INPUT_OPTIONS",
    "RefusedInputError",
    "RowBudget",
    "ServingPolicy",
    "admit_rows",
    "describe_cell",
    "fetch_media",
    "media_failure",
]

ENV_PREFIX = "GRAM_SERVING_"

FFMPEG_INPUT_OPTIONS: dict[str, str] = {
    "protocol_whitelist": "file,pipe",
    # Demuxers by name: `mov` is mp4/m4a/3gp/mov, `matroska` is mkv/webm.
    "format_whitelist": "mov,matroska,avi,mpegts,mpeg,flv,ogg,asf,wav,w64,flac,mp3,aac,aiff",
    "probesize": "5000000",  # bytes read to identify streams
    "analyzeduration": "5000000",  # microseconds of media read to identify streams
}
"""FFmpeg options before every served input, in ffmpeg and in the in-process probes
(`pipelines.media` `input_options`)."""

_CHUNK = 1 << 20

_MEDIA_FAILURES = {
    "unreadable": "not a media file this server reads (containers: mp4/mov, mkv/webm, avi, "
    "mpeg-ts/ps, flv, ogg, asf, wav, flac, mp3, aac, aiff)",
    "not_a_video": "a still image, not a video",
    "no_video": "has no video stream",
    "no_duration": "has no duration",
    "decode_failed": "could not be decoded",
    "timeout": "took longer than the server's media time limit (serving.media_timeout_s)",
}


class RefusedInputError(ValueError):
    """A cell or request the server does not take; the message is safe to show a client."""


@dataclass(frozen=True)
class ServingPolicy:
    """What a served model accepts (see the module docstring).

    media_roots: folders whose files clients may name by path (absolute; none by default).
    s3_prefixes: `s3://bucket/prefix/` folders clients may name (none by default).
    max_rows: rows per request.
    max_media_bytes: size of one media cell: decoded inline bytes, a file or an object.
    max_media_seconds: total duration of one row's media (video and audio), s.
    """

    media_roots: tuple[str, ...] = ()
    s3_prefixes: tuple[str, ...] = ()
    max_rows: int = 64
    max_media_bytes: int = 64 * 2**20
    max_media_seconds: float = 600.0

    def __post_init__(self) -> None:
        for root in self.media_roots:
            if not root or not os.path.isabs(root.removeprefix("file://")):
                raise ConfigError(
                    f"serving.media_roots ({ENV_PREFIX}MEDIA_ROOTS): {root!r} is not an "
                    "absolute path (roots are folders on the serving machine, e.g. /data/clips)"
                )
        for prefix in self.s3_prefixes:
            if not prefix.startswith("s3://") or not prefix[5:].split("/", 1)[0]:
                raise ConfigError(
                    f"serving.s3_prefixes ({ENV_PREFIX}S3_PREFIXES): {prefix!r} is not an "
                    "s3://bucket/prefix/ URI"
                )
        if self.max_rows < 1 or self.max_media_bytes < 1 or self.max_media_seconds <= 0:
            raise ConfigError(
                "serving.max_rows, serving.max_media_bytes and serving.max_media_seconds "
                f"({ENV_PREFIX}MAX_ROWS, ...) must be > 0"
            )

    @classmethod
    def configured(cls, registered: Any, environ: Mapping[str, str]) -> ServingPolicy:
        """The policy from the registered `serving.*` values (any object with these
        attributes), each overridden by `GRAM_SERVING_<KEY>` in `environ`."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = getattr(registered, f.name, getattr(cls, f.name))
            text = environ.get(ENV_PREFIX + f.name.upper())
            if text is not None:
                value = _parse_env(f.name, text, type(getattr(cls, f.name)))
            values[f.name] = tuple(value) if isinstance(value, list | tuple) else value
        return cls(**values)

    @property
    def real_roots(self) -> tuple[str, ...]:
        """The roots with every symbolic link resolved."""
        return tuple(os.path.realpath(_strip_file(r)) for r in self.media_roots)

    def folder_prefixes(self) -> tuple[str, ...]:
        """The S3 prefixes, each ending in `/`."""
        return tuple(p if p.endswith("/") else p + "/" for p in self.s3_prefixes)


def _parse_env(name: str, text: str, kind: type) -> Any:
    key = ENV_PREFIX + name.upper()
    if kind is tuple:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    try:
        return kind(text.strip())
    except ValueError:
        raise ConfigError(f"{key}={text!r}: expected {kind.__name__}") from None


def admit_rows(rows: int, policy: ServingPolicy) -> None:
    """Refuse a request of more rows than `policy.max_rows`."""
    if rows > policy.max_rows:
        raise RefusedInputError(
            f"{rows} rows in one request; this server takes at most {policy.max_rows} "
            "(serving.max_rows): split the request"
        )


def describe_cell(value: str) -> str:
    """How a cell is named in messages: inline bytes by their size, anything else shortened."""
    if value.startswith("data:"):
        return f"data: URI ({len(value)} characters)"
    return repr(value if len(value) <= 200 else value[:200] + "...")


def media_failure(reason: str) -> str:
    """What to tell a client about a media file that failed with `MediaError.reason`."""
    return _MEDIA_FAILURES.get(reason, "could not be read as media")


class RowBudget:
    """Adds up the media seconds of each row of one request (`policy.max_media_seconds`)."""

    def __init__(self, policy: ServingPolicy) -> None:
        self.limit = policy.max_media_seconds
        self.seconds: defaultdict[int, float] = defaultdict(float)

    def spend(self, row: int, seconds: float) -> None:
        """Count `seconds` of media for `row`; refuse the row past the limit."""
        self.seconds[row] += seconds
        if self.seconds[row] > self.limit:
            raise RefusedInputError(
                f"{self.seconds[row]:.1f} s of media in one row; this server takes at most "
                f"{self.limit:g} s per row (serving.max_media_seconds)"
            )


def fetch_media(value: str, policy: ServingPolicy, folder: Path, s3: Any = None) -> Path:
    """A private copy, in `folder`, of the media a cell names (see the module docstring).

    `s3`: a `pipelines.storage.S3Config` for `s3://` cells (default: the AWS chain).
    Raises RefusedInputError.
    """
    if value.startswith("data:"):
        return _inline(value, policy, folder)
    if value.startswith("s3://"):
        return _s3_object(value, policy, folder, s3)
    if value.startswith("file://") or value.startswith("/"):
        return _local_file(_strip_file(value), policy, folder)
    raise RefusedInputError(
        "a media cell is data:...;base64 bytes, an absolute path under the server's media "
        "roots, or an s3:// URI under its allowed prefixes"
    )


def _strip_file(value: str) -> str:
    return value.removeprefix("file://")


def _target(folder: Path) -> Path:
    """A new empty file in `folder`, with no extension (ffmpeg goes by content)."""
    fd, name = tempfile.mkstemp(dir=folder, prefix="media-")
    os.close(fd)
    return Path(name)


def _too_large(policy: ServingPolicy) -> RefusedInputError:
    return RefusedInputError(
        f"media larger than this server's limit of {policy.max_media_bytes} bytes "
        "(serving.max_media_bytes)"
    )


def _inline(value: str, policy: ServingPolicy, folder: Path) -> Path:
    header, sep, payload = value.partition(",")
    if not sep or not header.endswith(";base64"):
        raise RefusedInputError("inline media must be a data:[<type>];base64,<bytes> URI")
    payload = "".join(payload.split())  # MIME-style line breaks are fine
    if (len(payload) // 4) * 3 > policy.max_media_bytes + 2:
        raise _too_large(policy)
    try:
        data = base64.b64decode(payload, validate=True)
    except binascii.Error:
        raise RefusedInputError("inline media is not valid base64") from None
    if len(data) > policy.max_media_bytes:
        raise _too_large(policy)
    target = _target(folder)
    target.write_bytes(data)
    return target


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _outside_roots(policy: ServingPolicy) -> RefusedInputError:
    if not policy.media_roots:
        return RefusedInputError(
            "this server takes no file paths (serving.media_roots is empty): send the media "
            "as data:...;base64 bytes"
        )
    return RefusedInputError("refused: not a path under a media root of this server")


def _local_file(path: str, policy: ServingPolicy, folder: Path) -> Path:
    if not policy.media_roots or "\x00" in path or not os.path.isabs(path):
        raise _outside_roots(policy)
    given = tuple(os.path.normpath(_strip_file(r)) for r in policy.media_roots)
    real_roots = policy.real_roots
    if not _under(os.path.normpath(path), given + real_roots):  # checked before any lookup
        raise _outside_roots(policy)
    real = os.path.realpath(path)
    if not _under(real, real_roots):
        raise _outside_roots(policy)
    unreadable = RefusedInputError("not a readable file under the media roots")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        raise unreadable from None
    try:
        info = os.fstat(fd)
        opened = _opened_path(fd)
        if opened is not None and not _under(opened, real_roots):
            raise _outside_roots(policy)
        if not stat.S_ISREG(info.st_mode):
            raise unreadable
        if info.st_size > policy.max_media_bytes:
            raise _too_large(policy)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as src:
        return _copy(src, _target(folder), policy)


def _opened_path(fd: int) -> str | None:
    """Where an open file really is (Linux /proc; None where that is not available)."""
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/self/fd/{fd}")
    return None


def _copy(src: IO[bytes], target: Path, policy: ServingPolicy) -> Path:
    """Copy at most `policy.max_media_bytes` from `src` to `target`; refuse anything longer."""
    written = 0
    with target.open("wb") as out:
        for chunk in iter(lambda: src.read(_CHUNK), b""):
            written += len(chunk)
            if written > policy.max_media_bytes:
                raise _too_large(policy)
            out.write(chunk)
    return target


def _s3_object(uri: str, policy: ServingPolicy, folder: Path, s3: Any) -> Path:
    from pipelines import storage

    outside = RefusedInputError(
        "refused: not an s3:// URI under a prefix this server allows (serving.s3_prefixes)"
        if policy.s3_prefixes
        else "this server takes no s3:// URIs (serving.s3_prefixes is empty): send the "
        "media as data:...;base64 bytes"
    )
    try:
        _, key = storage.split_s3(uri)
    except ValueError:
        raise outside from None
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise outside
    if not any(uri.startswith(p) for p in policy.folder_prefixes()):
        raise outside
    cfg = s3 if s3 is not None else storage.S3Config().resolved()
    try:
        stream = storage.open_read(uri, s3=replace(cfg, max_attempts=min(cfg.max_attempts, 2)))
    except storage.StorageError:
        raise RefusedInputError("not a readable object under the allowed s3:// prefixes") from None
    with contextlib.closing(stream):
        return _copy(stream, _target(folder), policy)

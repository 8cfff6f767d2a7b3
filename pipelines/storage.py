"""Object storage for local paths and `s3://` URIs (AWS, MinIO or any S3-compatible endpoint).

The preprocessing job uses it for inputs, shards and its state; the training
job can use it for shards and checkpoints:

    s3 = S3Config(endpoint_url="http://minio:9000").resolved()    # creds: config or AWS chain
    for f in list_files("s3://bucket/shards/", s3=s3, suffixes=(".tar",)):
        data = read_bytes(f.uri, s3=s3)
    put_file("s3://bucket/ckpt/model.safetensors", "/tmp/model.safetensors", s3=s3)

Writes are atomic: a reader sees the old object or the new one, never a
partial one (local: write a hidden temp file in the same folder, fsync,
rename; S3: one PUT, or a multipart upload that becomes visible only when
completed). S3 calls are retried with exponential backoff on connection
errors, throttling and 5xx answers; the final error names the object.
Credentials never appear in `repr()`, logs or error messages.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import random
import re
import shutil
import time
import typing
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from gram.config import ConfigError

__all__ = [
    "FileInfo",
    "S3Config",
    "StorageError",
    "StorageNotFoundError",
    "absolute",
    "delete",
    "download",
    "exists",
    "is_s3",
    "iter_files",
    "iter_lines",
    "join",
    "list_files",
    "map_io",
    "open_read",
    "parent",
    "put_bytes",
    "put_bytes_if",
    "put_file",
    "pyarrow_filesystem",
    "read_bytes",
    "read_versioned",
    "remove_stale_temp_files",
    "split_s3",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
U = TypeVar("U")


class StorageError(OSError):
    """A storage operation failed; the message names the operation and the object."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The object or file does not exist."""


@dataclass(frozen=True)
class S3Config:
    """How to reach S3-compatible storage. Secrets are excluded from repr and config hashes.

    Empty fields fall back to the standard AWS chain (environment variables
    such as AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID, config files, instance
    roles) in the process that makes the call.
    """

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    max_attempts: int = 5
    """Attempts per S3 call (first try included) before the error is raised."""
    backoff_s: float = 0.5
    """First retry delay in seconds; doubles each attempt (with jitter), capped at 20 s."""
    forward_credentials: bool = True
    """Resolve credentials on the driver and ship them to Ray workers in the task (not in logs)."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError(f"s3.max_attempts: must be >= 1, got {self.max_attempts}")
        if self.backoff_s < 0:
            raise ConfigError(f"s3.backoff_s: must be >= 0, got {self.backoff_s}")

    def located(self) -> S3Config:
        """A copy with endpoint and region filled from this process's environment."""
        endpoint = (
            self.endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        region = self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return replace(self, endpoint_url=endpoint, region=region)

    def resolved(self) -> S3Config:
        """A copy with endpoint, region and credentials filled from this process's AWS chain."""
        located = self.located()
        if not self.forward_credentials or self.access_key_id:
            return located
        import boto3

        creds = boto3.Session().get_credentials()
        if creds is None:
            return located
        frozen = creds.get_frozen_credentials()
        return replace(
            located,
            access_key_id=frozen.access_key,
            secret_access_key=frozen.secret_key,
            session_token=frozen.token,
        )

    def public(self) -> dict[str, Any]:
        """The non-secret fields (for config hashes, index files and logs)."""
        return {
            "endpoint_url": self.endpoint_url,
            "region": self.region,
            "max_attempts": self.max_attempts,
            "backoff_s": self.backoff_s,
        }


@dataclass(frozen=True)
class FileInfo:
    """One listed file: its full URI and size in bytes."""

    uri: str
    size: int


def is_s3(uri: str) -> bool:
    """True for `s3://bucket/key` URIs."""
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> `("bucket", "a/b")`."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key


def _local(uri: str) -> Path:
    return Path(uri[len("file://") :] if uri.startswith("file://") else uri)


def absolute(uri: str) -> str:
    """`uri` as every process of a job can use it: a local path (or `file://` URI) made
    absolute (a relative path means the working directory of the process that calls this,
    the job's driver; its workers run in other folders); any other URI (`s3://`,
    `models:/`) and '' as they are."""
    if not uri or (_SCHEME.match(uri) and not uri.startswith("file:")):
        return uri
    return os.path.abspath(_local(uri))


def join(base: str, *parts: str) -> str:
    """Join URI parts with `/` (S3) or the path separator (local)."""
    if is_s3(base):
        out = base.rstrip("/")
        for p in parts:
            out = f"{out}/{p.strip('/')}"
        return out
    return str(_local(base).joinpath(*parts))


def parent(uri: str) -> str:
    """The folder/prefix that holds `uri`."""
    if is_s3(uri):
        return uri.rstrip("/").rsplit("/", 1)[0]
    return str(_local(uri).parent)


# --- S3 plumbing ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _client(cfg: S3Config) -> Any:
    import boto3
    from botocore.config import Config

    # One attempt per botocore call: retries are ours, so their count and the error are explicit.
    bcfg = Config(
        retries={"max_attempts": 1, "mode": "standard"},
        connect_timeout=10,
        read_timeout=120,
        signature_version="s3v4",
        s3={"addressing_style": "path"} if cfg.endpoint_url else {},
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=cfg.endpoint_url,
        region_name=cfg.region or "us-east-1",
        aws_access_key_id=cfg.access_key_id,
        aws_secret_access_key=cfg.secret_access_key,
        aws_session_token=cfg.session_token,
        config=bcfg,
    )


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _status(exc: BaseException) -> int:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return 0


_NOT_FOUND = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_RETRYABLE_CODES = {
    "Throttling",
    "ThrottlingException",
    "SlowDown",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeTooSkewed",
    "ConditionalRequestConflict",  # a concurrent conditional write: S3 asks to retry
}


_CONDITION_FAILED = {"PreconditionFailed", "NoSuchKey"}


def _retryable(exc: BaseException) -> bool:
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, ClientError):
        return _error_code(exc) in _RETRYABLE_CODES or _status(exc) >= 500
    # upload_file wraps the underlying error (connection lost, 5xx) in S3UploadFailedError.
    return isinstance(exc, BotoCoreError | S3UploadFailedError | ConnectionError | TimeoutError)


def _with_retries(cfg: S3Config, op: str, uri: str, fn: Callable[[], T]) -> T:
    """Run `fn`, retrying transient S3 errors with exponential backoff; errors name `uri`."""
    delay = cfg.backoff_s
    for attempt in range(1, cfg.max_attempts + 1):
        try:
            return fn()
        except StorageError:
            raise
        except Exception as exc:
            if _error_code(exc) in _NOT_FOUND or _status(exc) == 404:
                raise StorageNotFoundError(f"{op} {uri}: object not found (404)") from None
            if not _retryable(exc) or attempt == cfg.max_attempts:
                kind = type(exc).__name__
                raise StorageError(
                    f"{op} {uri} failed after {attempt} attempt(s): {kind}: {exc}"
                ) from exc
            log.warning(
                "%s %s: %s (attempt %d/%d), retrying in %.1fs",
                op,
                uri,
                type(exc).__name__,
                attempt,
                cfg.max_attempts,
                delay,
            )
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 20.0)
    raise AssertionError("unreachable")  # pragma: no cover


def _cfg(s3: S3Config | None) -> S3Config:
    """The settings a call uses: endpoint and region from this process's environment where
    the config leaves them empty, so that AWS_ENDPOINT_URL and AWS_DEFAULT_REGION mean what
    `s3.endpoint_url` and `s3.region` mean (path-style addressing, the signing region)."""
    return (s3 if s3 is not None else S3Config()).located()


# --- public operations ---------------------------------------------------------------------


def iter_files(
    prefix: str, *, s3: S3Config | None = None, suffixes: Iterable[str] | None = None
) -> Iterator[FileInfo]:
    """Every file under folder/prefix `prefix` (recursive), in URI order, as a stream.

    S3 is listed one page (1,000 keys) at a time, each page retried; a local
    folder is walked depth-first with each folder's entries sorted so that the
    order equals sorting the full paths. `suffixes` keeps only names ending
    with one of them (case-insensitive). Directory markers (S3 keys ending in
    `/`) and hidden files are skipped; symlinked folders are not followed.
    """
    ends = tuple(s.lower() for s in suffixes) if suffixes is not None else None
    files = _iter_s3_files(prefix, _cfg(s3)) if is_s3(prefix) else _iter_local_files(prefix)
    for info in files:
        if ends is None or info.uri.lower().endswith(ends):
            yield info


def _iter_s3_files(prefix: str, cfg: S3Config) -> Iterator[FileInfo]:
    bucket, key = split_s3(prefix)
    if key and not key.endswith("/"):
        key += "/"
    token: str | None = None
    while True:
        args: dict[str, Any] = {"Bucket": bucket, "Prefix": key}
        if token:
            args["ContinuationToken"] = token
        page: dict[str, Any] = _with_retries(
            cfg, "list", prefix, functools.partial(_client(cfg).list_objects_v2, **args)
        )
        for obj in page.get("Contents", []):  # S3 lists keys in UTF-8 byte order
            if not obj["Key"].endswith("/"):
                yield FileInfo(f"s3://{bucket}/{obj['Key']}", int(obj["Size"]))
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return


def _iter_local_files(prefix: str) -> Iterator[FileInfo]:
    root = _local(prefix)
    if not root.is_dir():
        raise StorageNotFoundError(f"list {prefix}: no such folder")

    def walk(folder: str) -> Iterator[FileInfo]:
        with os.scandir(folder) as it:
            entries = [(e.name + "/" if _is_real_dir(e) else e.name, e) for e in it]
        for name, entry in sorted(entries, key=lambda pair: pair[0]):
            if name.endswith("/"):
                yield from walk(entry.path)
            elif not name.startswith(".") and entry.is_file():
                yield FileInfo(entry.path, entry.stat().st_size)

    yield from walk(str(root))


def _is_real_dir(entry: os.DirEntry[str]) -> bool:
    return entry.is_dir() and not entry.is_symlink()


def list_files(
    prefix: str, *, s3: S3Config | None = None, suffixes: Iterable[str] | None = None
) -> list[FileInfo]:
    """Every file under folder/prefix `prefix` (recursive), sorted by URI (see `iter_files`)."""
    return list(iter_files(prefix, s3=s3, suffixes=suffixes))


def exists(uri: str, *, s3: S3Config | None = None) -> bool:
    """True if the file/object exists."""
    if not is_s3(uri):
        return _local(uri).is_file()
    cfg = _cfg(s3)
    bucket, key = split_s3(uri)
    try:
        _with_retries(cfg, "head", uri, lambda: _client(cfg).head_object(Bucket=bucket, Key=key))
    except StorageNotFoundError:
        return False
    return True


def read_bytes(uri: str, *, s3: S3Config | None = None) -> bytes:
    """The whole content of a file/object."""
    if not is_s3(uri):
        try:
            return _local(uri).read_bytes()
        except FileNotFoundError:
            raise StorageNotFoundError(f"read {uri}: no such file") from None
        except OSError as exc:
            raise StorageError(f"read {uri}: {exc.strerror or exc}") from None
    cfg = _cfg(s3)
    bucket, key = split_s3(uri)

    def get() -> bytes:
        body = _client(cfg).get_object(Bucket=bucket, Key=key)["Body"]
        try:
            return bytes(body.read())
        finally:
            body.close()

    return _with_retries(cfg, "read", uri, get)


def open_read(uri: str, *, s3: S3Config | None = None) -> BinaryIO:
    """A streaming binary reader (`read(n)`, close when done): e.g. for
    `tarfile.open(fileobj=open_read(uri), mode="r|")` over a shard without a local copy.
    Only opening is retried; a failure while streaming raises to the reader."""
    if not is_s3(uri):
        try:
            return _local(uri).open("rb")
        except FileNotFoundError:
            raise StorageNotFoundError(f"open {uri}: no such file") from None
    cfg = _cfg(s3)
    bucket, key = split_s3(uri)
    body = _with_retries(
        cfg, "open", uri, lambda: _client(cfg).get_object(Bucket=bucket, Key=key)["Body"]
    )
    return typing.cast(BinaryIO, body)


def download(uri: str, dest: str | Path, *, s3: S3Config | None = None) -> Path:
    """Copy `uri` to the local file `dest` (streamed, not held in memory); returns `dest`."""
    target = Path(dest)
    if not is_s3(uri):
        try:
            shutil.copyfile(_local(uri), target)
        except FileNotFoundError:
            raise StorageNotFoundError(f"download {uri}: no such file") from None
        return target
    cfg = _cfg(s3)
    bucket, key = split_s3(uri)

    def get() -> None:
        body = _client(cfg).get_object(Bucket=bucket, Key=key)["Body"]
        try:
            with target.open("wb") as fh:
                for chunk in iter(lambda: body.read(1 << 20), b""):
                    fh.write(chunk)
        finally:
            body.close()

    _with_retries(cfg, "download", uri, get)
    return target


def _local_atomic_write(target: Path, write: Callable[[Any], None]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with tmp.open("wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def put_bytes(uri: str, data: bytes, *, s3: S3Config | None = None) -> None:
    """Write `data` to `uri` atomically (replacing any previous content)."""
    if not is_s3(uri):
        _local_atomic_write(_local(uri), lambda fh: fh.write(data))
        return
    cfg = _cfg(s3)
    bucket, key = split_s3(uri)
    _with_retries(
        cfg, "put", uri, lambda: _client(cfg).put_object(Bucket=bucket, Key=key, Body=data)
    )


def put_file(uri: str, src: str | Path, *, s3: S3Config | None = None) -> None:
    """Copy local file `src` to `uri` atomically (S3: PUT or multipart, visible when complete)."""
    source = Path(src)
    if not is_s3(uri):

        def copy(fh: Any) -> None:
            with source.open("rb") as inp:
                shutil.copyfileobj(inp, fh, 1 << 20)

        _local_atomic_write(_local(uri), copy)
        return
    cfg = _cfg(s3)
    bucket, key = split_s3(uri)
    _with_retries(cfg, "upload", uri, lambda: _client(cfg).upload_file(str(source), bucket, key))


def iter_lines(
    uri: str, *, s3: S3Config | None = None, chunk_bytes: int = 8 << 20
) -> Iterator[bytes]:
    """The lines of a file/object (split at `\\n`, which each line keeps), read as a stream.

    S3 objects are read in ranges of `chunk_bytes`, each retried, so a long
    manifest survives an outage mid-read; memory holds one range at a time.
    """
    if not is_s3(uri):
        try:
            fh = _local(uri).open("rb")
        except FileNotFoundError:
            raise StorageNotFoundError(f"read {uri}: no such file") from None
        with fh:
            yield from fh
        return
    cfg = _cfg(s3)
    bucket, key = split_s3(uri)
    head = _with_retries(cfg, "head", uri, lambda: _client(cfg).head_object(Bucket=bucket, Key=key))
    size = int(head["ContentLength"])
    carry = b""
    for start in range(0, size, chunk_bytes):
        span = f"bytes={start}-{min(start + chunk_bytes, size) - 1}"

        def get(span: str = span) -> bytes:
            body = _client(cfg).get_object(Bucket=bucket, Key=key, Range=span)["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()

        lines = (carry + _with_retries(cfg, "read", uri, get)).split(b"\n")
        carry = lines.pop()
        for line in lines:
            yield line + b"\n"
    if carry:
        yield carry


def read_versioned(uri: str, *, s3: S3Config | None = None) -> tuple[bytes, str]:
    """`(content, version)`: the version is an opaque tag for `put_bytes_if` (S3: the ETag)."""
    if not is_s3(uri):
        data = read_bytes(uri)
        return data, _local_version(data)
    cfg = _cfg(s3)
    bucket, key = split_s3(uri)

    def get() -> tuple[bytes, str]:
        response = _client(cfg).get_object(Bucket=bucket, Key=key)
        try:
            return bytes(response["Body"].read()), str(response["ETag"])
        finally:
            response["Body"].close()

    return _with_retries(cfg, "read", uri, get)


def put_bytes_if(
    uri: str, data: bytes, *, version: str | None, s3: S3Config | None = None
) -> str | None:
    """Compare-and-swap: write `data` only if the object's current version is `version`
    (None: only if no object exists). Returns the new version, or None when the
    condition failed (someone else wrote or created it first).

    S3 uses conditional writes (If-None-Match / If-Match); a local file is
    compared and replaced under an exclusive `flock` on a hidden `.NAME.lock`
    beside it, which every writer through this function takes.
    """
    if version == "":  # no object has the empty version: never write unconditionally
        return None
    if not is_s3(uri):
        target = _local(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        with (target.parent / f".{target.name}.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = _local_version(target.read_bytes()) if target.is_file() else None
                if current != version:
                    return None
                _local_atomic_write(target, lambda fh: fh.write(data))
                return _local_version(data)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    cfg = _cfg(s3)
    bucket, key = split_s3(uri)
    condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}

    def put() -> str | None:
        from botocore.exceptions import ClientError

        try:
            response = _client(cfg).put_object(Bucket=bucket, Key=key, Body=data, **condition)
        except ClientError as exc:
            if _status(exc) in (404, 412) or _error_code(exc) in _CONDITION_FAILED:
                return None
            raise
        return str(response["ETag"])

    return _with_retries(cfg, "put", uri, put)


def _local_version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def map_io(
    fn: Callable[[T], U], items: Iterable[T], *, workers: int = 8, ahead: int = 32
) -> Iterator[U]:
    """`fn` over `items` on `workers` threads, results in input order, at most `ahead`
    calls under way or waiting to be consumed (for many small storage requests)."""
    window: collections.deque[Future[U]] = collections.deque()
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="gram-io") as pool:
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= max(1, ahead):
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def delete(uri: str, *, s3: S3Config | None = None) -> None:
    """Remove a file/object; a missing one is not an error."""
    if not is_s3(uri):
        with contextlib.suppress(FileNotFoundError):
            _local(uri).unlink()
        return
    cfg = _cfg(s3)
    bucket, key = split_s3(uri)
    _with_retries(cfg, "delete", uri, lambda: _client(cfg).delete_object(Bucket=bucket, Key=key))


def remove_stale_temp_files(folder: str) -> int:
    """Delete hidden temp files left in a local `folder` by a killed atomic write; returns count.

    S3 needs no cleanup: an interrupted multipart upload is never visible.
    """
    if is_s3(folder):
        return 0
    root = _local(folder)
    if not root.is_dir():
        return 0
    stale = [p for p in root.rglob(".*.tmp-*") if p.is_file()]
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return len(stale)


def pyarrow_filesystem(uri: str, *, s3: S3Config | None = None) -> tuple[Any, str]:
    """`(pyarrow.fs.FileSystem, path)` for readers that take a filesystem, e.g.
    `ray.data.read_webdataset(path, filesystem=fs)`; S3 paths come back without `s3://`."""
    import pyarrow.fs as pafs

    if not is_s3(uri):
        return pafs.LocalFileSystem(), str(_local(uri))
    cfg = _cfg(s3)
    kwargs: dict[str, Any] = {"region": cfg.region or "us-east-1"}
    if cfg.access_key_id:
        kwargs.update(
            access_key=cfg.access_key_id,
            secret_key=cfg.secret_access_key,
            session_token=cfg.session_token,
        )
    if cfg.endpoint_url:
        scheme, _, host = cfg.endpoint_url.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    return pafs.S3FileSystem(**kwargs), uri[len("s3://") :]

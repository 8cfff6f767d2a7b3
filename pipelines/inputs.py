"""Read the job's input as a checked, ordered stream of `InputItem`s, in bounded memory.

Accepted inputs (local paths or s3:// URIs):

- a manifest: `.jsonl` (one JSON object per line), `.csv` (header row) or
  `.parquet`, with a video column (`video`, `video_uri`, `path` or `uri`),
  captions (`captions`: a list, or in CSV a JSON list or one string;
  `caption`/`text`: one string), optional `id` and optional `audio`.
  Relative paths resolve against the manifest's folder.
- a folder/prefix of videos plus a captions file keyed by file stem
  (JSON object `{stem: [captions]}` or JSONL `{"id": stem, "captions": [...]}`).

Structural problems (invalid JSON, no video column, captions of the wrong
type, no rows) raise `ManifestError` naming the line. Problems with one
row's content (duplicate id, no or over-long captions, text that is not
UTF-8) become that row's failure reason; the row still gets its manifest line.

Manifests (local or S3) and S3 listings are read in chunks of rows; checks
over the whole input (duplicate ids and keys, captions keyed by stem) go
through a `DiskIndex` on local disk, so memory does not grow with the input:

    with DiskIndex(tmp) as index:
        for item in iter_inputs(uri, cfg, s3=s3, index=index, chunk_rows=10_000): ...

`read_inputs` collects the stream into a list, for small inputs.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import posixpath
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, TypeVar

from gram.schema import safe_key
from pipelines import storage
from pipelines.config import InputsConfig
from pipelines.disk_index import DiskIndex
from pipelines.storage import S3Config

__all__ = [
    "InputItem",
    "ManifestError",
    "fingerprint",
    "item_line",
    "iter_inputs",
    "read_inputs",
]

T = TypeVar("T")

_VIDEO_COLS = ("video", "video_uri", "path", "uri")
_CAPTION_LIST_COLS = ("captions",)
_CAPTION_ONE_COLS = ("caption", "text")
_MANIFEST_EXTS = (".jsonl", ".ndjson", ".csv", ".parquet")
_KNOWN_COLS = {*_VIDEO_COLS, *_CAPTION_LIST_COLS, *_CAPTION_ONE_COLS, "id", "audio"}
_MAX_EXTRA_FIELDS = 32
_MAX_EXTRA_CHARS = 1000


class ManifestError(ValueError):
    """The input manifest or listing cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class InputItem:
    """One input row, resolved and checked. `index` is its 0-based position in the input."""

    index: int
    line: int
    """1-based line (JSONL, CSV with the header as line 1) or row number (Parquet, listing)."""
    id: str
    key: str
    video: str
    audio: str | None
    captions: tuple[str, ...]
    reason: str | None = None
    """Set when the row fails before any media work (e.g. duplicate_id, no_captions)."""
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """The row's other fields (e.g. a class label), kept in the clip's metadata `extra`."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (round-trips through `from_json`)."""
        return {
            "index": self.index,
            "line": self.line,
            "id": self.id,
            "key": self.key,
            "video": self.video,
            "audio": self.audio,
            "captions": list(self.captions),
            "reason": self.reason,
            "error": self.error,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InputItem:
        """Inverse of `to_json`."""
        return cls(**{**data, "captions": tuple(data["captions"])})


@dataclass(frozen=True)
class _Raw:
    line: int
    id: str | None
    video: str
    audio: str | None
    captions: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


def _extra(row: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The row's fields beyond the known columns: short JSON scalars (or lists of them)."""
    out: dict[str, Any] = {}
    for name, value in row.items():
        if name in _KNOWN_COLS or value is None or (isinstance(value, float) and value != value):
            continue
        if hasattr(value, "tolist"):
            value = value.tolist()
        scalar = (str, int, float, bool)
        ok = isinstance(value, scalar) or (
            isinstance(value, list) and all(isinstance(v, scalar) for v in value)
        )
        if not ok or len(json.dumps(value, ensure_ascii=False)) > _MAX_EXTRA_CHARS:
            raise ManifestError(
                f"{where}: field {name!r} must be a short string, number, boolean or list "
                f"of those (at most {_MAX_EXTRA_CHARS} characters as JSON), got {value!r:.80}"
            )
        out[str(name)] = value
    if len(out) > _MAX_EXTRA_FIELDS:
        raise ManifestError(f"{where}: more than {_MAX_EXTRA_FIELDS} extra metadata fields")
    return out


def _resolve(base: str, ref: str) -> str:
    if storage.is_s3(ref) or ref.startswith("/"):
        return ref
    if ref.startswith("file://"):
        return ref[len("file://") :]
    if storage.is_s3(base):
        bucket, key = storage.split_s3(base)
        return f"s3://{bucket}/{posixpath.normpath(posixpath.join(key, ref))}"
    if not base:
        return ref
    if _plain(base) and _plain(ref):  # what PurePosixPath would give, without its parsing
        return f"{base}/{ref}"
    return str(PurePosixPath(base) / ref)


def _plain(path: str) -> bool:
    """True when PurePosixPath leaves `path` as it is (no `.` parts, no repeated or
    trailing slashes)."""
    return (
        path != "."
        and not path.startswith("./")
        and not path.endswith(("/", "/."))
        and "//" not in path
        and "/./" not in path
    )


def _pick(row: Mapping[str, Any], names: tuple[str, ...]) -> Any:
    for name in names:
        if name in row and row[name] not in (None, ""):
            return row[name]
    return None


def _captions(row: Mapping[str, Any], where: str, *, csv_text: bool) -> list[str]:
    value = _pick(row, _CAPTION_LIST_COLS)
    if value is None:
        one = _pick(row, _CAPTION_ONE_COLS)
        value = [] if one is None else [one]
    if csv_text and isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ManifestError(
                    f"{where}: captions look like a JSON list but are not ({exc})"
                ) from None
        else:
            value = [value]
    if isinstance(value, str):
        value = [value]
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, list | tuple) or not all(isinstance(c, str) for c in value):
        raise ManifestError(
            f"{where}: captions must be a string or a list of strings, got {value!r:.80}"
        )
    return list(value)


def _row(row: Any, where: str, line: int, base: str, *, csv_text: bool = False) -> _Raw:
    if not isinstance(row, Mapping):
        raise ManifestError(f"{where}: expected a JSON object, got {type(row).__name__}")
    video = _pick(row, _VIDEO_COLS)
    if not isinstance(video, str) or not video.strip():
        raise ManifestError(
            f"{where}: no video path (expected a non-empty field named one of "
            f"{', '.join(_VIDEO_COLS)})"
        )
    raw_id = row.get("id")
    if raw_id is not None and not isinstance(raw_id, str | int):
        raise ManifestError(f"{where}: id must be a string or an integer, got {raw_id!r:.80}")
    audio = row.get("audio")
    if audio is not None and not isinstance(audio, str):
        raise ManifestError(f"{where}: audio must be a path string, got {audio!r:.80}")
    return _Raw(
        line=line,
        id=None if raw_id in (None, "") else str(raw_id),
        video=_resolve(base, video.strip()),
        audio=_resolve(base, audio.strip()) if audio and audio.strip() else None,
        captions=_captions(row, where, csv_text=csv_text),
        extra=_extra(row, where),
    )


def _text(data: bytes) -> str:
    # Undecodable bytes survive as surrogates so the row, not the file, fails (reason not_utf8).
    return data.decode("utf-8", "surrogateescape")


def _text_lines(uri: str, s3: S3Config | None) -> Iterator[str]:
    """The decoded lines of a text file (first line without a byte-order mark), streamed."""
    try:
        lines = storage.iter_lines(uri, s3=s3)
        first = next(lines, None)
    except storage.StorageNotFoundError:
        raise ManifestError(f"{uri}: input manifest does not exist") from None
    if first is None:
        return
    yield _text(first).removeprefix("\ufeff")
    for line in lines:
        yield _text(line)


def _json_lines(uri: str, s3: S3Config | None) -> Iterator[tuple[int, Any]]:
    """`(line number, parsed value)` of each non-blank line of a JSONL file."""
    for n, line in enumerate(_text_lines(uri, s3), start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(
                f"{uri}:{n}: invalid JSON ({exc.msg} at column {exc.colno})"
            ) from None


def _read_jsonl(uri: str, base: str, s3: S3Config | None) -> Iterator[_Raw]:
    for n, obj in _json_lines(uri, s3):
        yield _row(obj, f"{uri}:{n}", n, base)


def _read_csv(uri: str, base: str, s3: S3Config | None) -> Iterator[_Raw]:
    reader = csv.DictReader(_text_lines(uri, s3))
    if not reader.fieldnames:
        raise ManifestError(f"{uri}:1: empty CSV (a header row with a video column is required)")
    fields = [f.strip() for f in reader.fieldnames]
    if not any(f in fields for f in _VIDEO_COLS):
        raise ManifestError(
            f"{uri}:1: CSV header {fields} has no video column ({', '.join(_VIDEO_COLS)})"
        )
    reader.fieldnames = fields
    for row in reader:
        n = reader.line_num
        if None in row:
            raise ManifestError(f"{uri}:{n}: more values than header columns")
        yield _row(row, f"{uri}:{n}", n, base, csv_text=True)


def _read_parquet(uri: str, base: str, s3: S3Config | None, batch_rows: int) -> Iterator[_Raw]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = storage.pyarrow_filesystem(uri, s3=s3)
    try:
        source = pq.ParquetFile(fs.open_input_file(path))
    except FileNotFoundError:
        raise ManifestError(f"{uri}: input manifest does not exist") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"{uri}: not a readable Parquet file ({exc})") from None
    names = source.schema_arrow.names
    if not any(c in names for c in _VIDEO_COLS):
        raise ManifestError(f"{uri}: no video column ({', '.join(_VIDEO_COLS)}) in {names}")
    n = 0
    for batch in source.iter_batches(batch_size=batch_rows):
        for row in batch.to_pylist():
            n += 1
            yield _row(row, f"{uri}: row {n}", n, base)


def _read_captions_file(uri: str, s3: S3Config | None, index: DiskIndex) -> None:
    """Captions keyed by file stem into `index` table `captions` (JSON lists as values).

    JSONL is streamed; a `.json` object is read whole (prefer JSONL for large sets)."""
    if uri.endswith(".json"):
        text = _text(storage.read_bytes(uri, s3=s3)).removeprefix("\ufeff")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{uri}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise ManifestError(f"{uri}: expected a JSON object mapping file stem -> captions")
        pairs: Iterable[tuple[str, str]] = (
            (str(k), json.dumps(_captions({"captions": v}, f"{uri}: {k!r}", csv_text=False)))
            for k, v in obj.items()
        )
        index.put("captions", pairs, replace=True)
        return

    def rows() -> Iterator[tuple[str, str]]:
        for n, obj in _json_lines(uri, s3):
            if not isinstance(obj, dict) or not isinstance(obj.get("id"), str | int):
                raise ManifestError(f"{uri}:{n}: expected an object with an `id` (the file stem)")
            yield str(obj["id"]), json.dumps(_captions(obj, f"{uri}:{n}", csv_text=False))

    for chunk in _chunks(rows(), 10_000):
        index.put("captions", chunk, replace=True)


def _list_prefix(
    uri: str, cfg: InputsConfig, s3: S3Config | None, index: DiskIndex, chunk_rows: int
) -> Iterator[_Raw]:
    root = uri.rstrip("/")
    if cfg.captions_file:
        cap_uri = _resolve(root, cfg.captions_file)
    else:
        cands = [storage.join(root, n) for n in ("captions.jsonl", "captions.json")]
        cap_uri = next((c for c in cands if storage.exists(c, s3=s3)), "")
    if cap_uri:
        _read_captions_file(cap_uri, s3, index)
    files = storage.iter_files(root, s3=s3, suffixes=cfg.video_extensions)
    line = 0
    for chunk in _chunks(files, chunk_rows):
        names = []
        for f in chunk:
            rel = f.uri[len(root) + 1 :]
            names.append((f.uri, rel.rsplit(".", 1)[0], PurePosixPath(rel).stem))
        known = index.get("captions", [k for _, stem, short in names for k in (stem, short)])
        for video, stem, short in names:
            line += 1
            found = known.get(stem, known.get(short))
            caps = json.loads(found) if found is not None else []
            yield _Raw(line=line, id=stem, video=video, audio=None, captions=caps)


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _is_utf8(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(text: str) -> str:
    return text.encode("utf-8", "replace").decode("utf-8")


def _raw_rows(
    uri: str, cfg: InputsConfig, s3: S3Config | None, index: DiskIndex, chunk_rows: int
) -> Iterator[_Raw]:
    lower = uri.lower()
    if not lower.endswith(_MANIFEST_EXTS):
        try:
            yield from _list_prefix(uri, cfg, s3, index, chunk_rows)
        except storage.StorageNotFoundError as exc:
            raise ManifestError(
                f"{uri}: input is neither a manifest ({', '.join(_MANIFEST_EXTS)}) "
                f"nor an existing folder/prefix ({exc})"
            ) from None
        return
    base = storage.parent(uri)
    if lower.endswith(".csv"):
        yield from _read_csv(uri, base, s3)
    elif lower.endswith(".parquet"):
        yield from _read_parquet(uri, base, s3, chunk_rows)
    else:
        yield from _read_jsonl(uri, base, s3)


def iter_inputs(
    uri: str,
    cfg: InputsConfig,
    *,
    s3: S3Config | None = None,
    index: DiskIndex,
    chunk_rows: int = 10_000,
) -> Iterator[InputItem]:
    """Read, resolve and check every input, `chunk_rows` rows at a time, in input order.

    Raises ManifestError (naming the file and line) for a structural problem,
    when it is reached; `index` (fresh for each input) holds the ids seen so far.
    """
    count = 0
    for chunk in _chunks(_raw_rows(uri, cfg, s3, index, chunk_rows), chunk_rows):
        yield from _check_rows(uri, chunk, count, cfg, index)
        count += len(chunk)
    if count == 0:
        raise ManifestError(f"{uri}: no inputs found")


def read_inputs(uri: str, cfg: InputsConfig, *, s3: S3Config | None = None) -> list[InputItem]:
    """Every input as a list (for small inputs; jobs stream with `iter_inputs`)."""
    with tempfile.TemporaryDirectory(prefix="gram-inputs-") as tmp, DiskIndex(tmp) as index:
        return list(iter_inputs(uri, cfg, s3=s3, index=index))


def _check_rows(
    uri: str, raws: list[_Raw], first: int, cfg: InputsConfig, index: DiskIndex
) -> list[InputItem]:
    """Check one chunk of rows; ids and keys claimed by earlier rows come from `index`
    (a row claims its id and key when it has no failure of its own)."""
    rows = []
    for raw in raws:
        rid = raw.id if raw.id is not None else raw.video.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        utf8 = all(_is_utf8(t) for t in (rid, raw.video, raw.audio or "", *raw.captions))
        rows.append((raw, rid, safe_key(_printable(rid)), utf8))
    # One table for both: "i:" + id and "k:" + key.
    claimed = index.get(
        "claims", [n for _, rid, key, ok in rows if ok for n in (f"i:{rid}", f"k:{key}")]
    )
    items: list[InputItem] = []
    claims: dict[str, str] = {}
    for offset, (raw, rid, key, utf8) in enumerate(rows):
        reason, error = None, None
        captions = [c.strip() for c in raw.captions if c.strip()]
        id_line = claimed.get(f"i:{rid}") or claims.get(f"i:{rid}")
        key_line = claimed.get(f"k:{key}") or claims.get(f"k:{key}")
        if not utf8:
            reason, error = "not_utf8", "id, path or a caption is not valid UTF-8 text"
        elif id_line:
            reason = "duplicate_id"
            error = f"id {rid!r} already used at line {id_line}; this row was not processed"
            if cfg.duplicate_ids == "error":
                raise ManifestError(f"{uri}:{raw.line}: {error} (inputs.duplicate_ids=error)")
        elif key_line:
            reason = "duplicate_id"
            error = f"id {rid!r} maps to key {key!r} already used at line {key_line}"
        elif not captions:
            reason, error = "no_captions", "no non-empty caption for this clip"
        elif (longest := max(len(c) for c in captions)) > cfg.max_caption_chars:
            reason = "caption_too_long"
            limit = cfg.max_caption_chars
            error = f"a caption has {longest} characters (inputs.max_caption_chars={limit})"
        if reason is None:
            claims[f"i:{rid}"] = claims[f"k:{key}"] = str(raw.line)
        items.append(
            InputItem(
                index=first + offset,
                line=raw.line,
                id=_printable(rid),
                key=key,
                video=_printable(raw.video),
                audio=_printable(raw.audio) if raw.audio else None,
                captions=tuple(_printable(c) for c in captions),
                reason=reason,
                error=error,
                extra=dict(raw.extra),
            )
        )
    index.put("claims", claims.items())
    return items


def item_line(item: InputItem) -> bytes:
    """The canonical JSON line of an item: what tasks read, and what the fingerprint hashes."""
    return json.dumps(item.to_json(), sort_keys=True, ensure_ascii=True).encode() + b"\n"


def fingerprint(items: Iterable[InputItem]) -> str:
    """16-hex-digit hash of the resolved inputs (ids, keys, URIs, captions, early failures)."""
    h = hashlib.sha256()
    for item in items:
        h.update(item_line(item))
    return h.hexdigest()[:16]

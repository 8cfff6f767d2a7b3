"""Shard assembly, per-shard state, and the final manifest and index.

Shard membership is fixed before any work: input `i` belongs to shard
`i // samples_per_shard`. Results arrive in any order; each is spooled to a
local file, and when a shard has every result it is written in input order
(so equal inputs and config give equal bytes), put atomically, and then its
state file `_state/{prefix}-{index:06d}.json` (manifest rows, size,
sha256) is put. That state file is the commit point: a rerun skips shards
that have one, and a shard killed before it is simply redone. Shards whose
inputs all failed have a state file but no tar.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
import typing
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pipelines import storage
from pipelines.stages import ClipResult
from pipelines.storage import S3Config
from pipelines.tar_format import END_OF_ARCHIVE, archive_padding, json_bytes, shard_name

__all__ = [
    "MANIFEST_SCHEMA_FIELDS",
    "OutputConflictError",
    "ShardAssembler",
    "ShardState",
    "Totals",
    "check_run_file",
    "finished_shards",
    "read_index",
    "read_state",
    "shard_uris",
    "state_uri",
    "write_index",
    "write_manifest",
]

STATE_DIR = "_state"
RUN_FILE = "run.json"
MANIFEST_FILE = "manifest.parquet"
INDEX_FILE = "index.json"

MANIFEST_SCHEMA_FIELDS: list[tuple[str, str]] = [
    ("index", "int64"),
    ("line", "int64"),
    ("id", "string"),
    ("key", "string"),
    ("uri", "string"),
    ("audio_uri", "string"),
    ("status", "string"),
    ("reason", "string"),
    ("error", "string"),
    ("shard", "string"),
    ("duration", "float64"),
    ("fps", "float64"),
    ("width", "int64"),
    ("height", "int64"),
    ("rotation", "int64"),
    ("has_audio", "bool"),
    ("frames", "int64"),
    ("num_captions", "int64"),
    ("sample_bytes", "int64"),
]
"""Columns of manifest.parquet, one row per input, in input order."""


class OutputConflictError(RuntimeError):
    """The output already holds a run with another config or input."""


@dataclass
class ShardState:
    """What a finished shard left behind (its `_state` file)."""

    index: int
    name: str | None
    """Tar file name, or None when no input of the shard succeeded."""
    samples: int
    bytes: int
    sha256: str | None
    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "index": self.index,
            "name": self.name,
            "samples": self.samples,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "rows": self.rows,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardState:
        """Inverse of `to_json`."""
        return cls(**data)


def state_uri(output: str, prefix: str, index: int) -> str:
    """Where shard `index`'s state file lives."""
    return storage.join(output, STATE_DIR, f"{prefix}-{index:06d}.json")


def check_run_file(output: str, run: dict[str, Any], *, s3: S3Config | None) -> bool:
    """Write `_state/run.json`, or check that an existing one matches `run`.

    Returns True when resuming an earlier run. Raises OutputConflictError
    (naming the settings that differ) when the output holds another run.
    """
    uri = storage.join(output, STATE_DIR, RUN_FILE)
    try:
        old = json.loads(storage.read_bytes(uri, s3=s3))
    except storage.StorageNotFoundError:
        storage.put_bytes(uri, json_bytes(run), s3=s3)
        return False
    if old == run:
        return True
    diffs = _diff(old, run)
    raise OutputConflictError(
        f"{output} already holds shards from a different run ({'; '.join(diffs[:6])}). "
        "Use a new output folder/prefix, or delete the old output to start over."
    )


def _diff(old: Any, new: Any, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{where}.{k}" if where else str(k))
        return out
    return [] if old == new else [f"{where}: was {old!r}, now {new!r}"]


def finished_shards(output: str, prefix: str, *, s3: S3Config | None) -> set[int]:
    """Indices of the shards committed in `output` (those with a state file)."""
    folder = storage.join(output, STATE_DIR)
    try:
        files = storage.list_files(folder, s3=s3, suffixes=(".json",))
    except storage.StorageNotFoundError:
        return set()
    done = set()
    for f in files:
        stem = f.uri.rsplit("/", 1)[-1][: -len(".json")]
        head, _, number = stem.rpartition("-")
        if head == prefix and number.isdigit():
            done.add(int(number))
    return done


def read_state(output: str, prefix: str, index: int, *, s3: S3Config | None) -> ShardState:
    """The committed state of shard `index`."""
    return ShardState.from_json(
        json.loads(storage.read_bytes(state_uri(output, prefix, index), s3=s3))
    )


class ShardAssembler:
    """Collects results per shard and writes each shard once it is complete."""

    def __init__(
        self,
        output: str,
        prefix: str,
        members: dict[int, list[int]],
        *,
        s3: S3Config | None,
        spool_dir: str | None = None,
    ) -> None:
        self.output = output
        self.prefix = prefix
        self.s3 = s3
        self._members = members  # shard index -> input indices it holds
        self._shard_of = {i: s for s, idx in members.items() for i in idx}
        self._rows: dict[int, dict[int, dict[str, Any]]] = {s: {} for s in members}
        self._spans: dict[int, dict[int, tuple[int, int]]] = {s: {} for s in members}
        self._spool_files: dict[int, BinaryIO] = {}
        self._spool = Path(tempfile.mkdtemp(prefix="gram-spool-", dir=spool_dir or None))
        self.finished: dict[int, ShardState] = {}
        self.bytes_written = 0

    def add(self, result: ClipResult) -> ShardState | None:
        """Record one result; returns the shard's state if this completed (and wrote) it."""
        shard = self._shard_of.get(result.index)
        if shard is None or shard in self.finished:
            raise RuntimeError(f"unexpected result for input {result.index} (shard {shard})")
        if result.index in self._rows[shard]:
            raise RuntimeError(f"duplicate result for input {result.index}")
        self._rows[shard][result.index] = result.row
        if result.sample:
            fh = self._spool_files.get(shard)
            if fh is None:
                fh = self._spool_files[shard] = (self._spool / f"{shard}.part").open("w+b")
            offset = fh.seek(0, io.SEEK_END)
            fh.write(result.sample)
            self._spans[shard][result.index] = (offset, len(result.sample))
        if len(self._rows[shard]) == len(self._members[shard]):
            return self._finish(shard)
        return None

    def pending(self) -> list[int]:
        """Shards still waiting for results."""
        return sorted(s for s in self._members if s not in self.finished)

    def _finish(self, shard: int) -> ShardState:
        spans = self._spans.pop(shard)
        by_index = self._rows.pop(shard)
        rows = [by_index[i] for i in sorted(self._members[shard])]
        name = shard_name(self.prefix, shard) if spans else None
        size, digest = 0, None
        if name is not None:
            fh = self._spool_files.pop(shard)
            tar_path = self._spool / f"{shard}.tar"
            size, digest = _assemble(fh, [spans[i] for i in sorted(spans)], tar_path)
            fh.close()
            (self._spool / f"{shard}.part").unlink()
            storage.put_file(storage.join(self.output, name), tar_path, s3=self.s3)
            tar_path.unlink()
            self.bytes_written += size
            for row in rows:
                if row["status"] == "ok":
                    row["shard"] = name
        state = ShardState(
            index=shard, name=name, samples=len(spans), bytes=size, sha256=digest, rows=rows
        )
        storage.put_bytes(
            state_uri(self.output, self.prefix, shard), json_bytes(state.to_json()), s3=self.s3
        )
        self.finished[shard] = ShardState(
            index=shard, name=name, samples=len(spans), bytes=size, sha256=digest
        )  # rows live in the state file
        return state

    def close(self) -> None:
        """Drop the local spool (unfinished shards are redone by the next run)."""
        for fh in self._spool_files.values():
            fh.close()
        shutil.rmtree(self._spool, ignore_errors=True)


def _assemble(spool: BinaryIO, spans: list[tuple[int, int]], dest: Path) -> tuple[int, str]:
    """Copy sample spans from `spool` into tar `dest` in order; returns (bytes, sha256)."""
    digest = hashlib.sha256()
    total = 0
    with dest.open("wb") as out:
        for offset, length in spans:
            spool.seek(offset)
            data = spool.read(length)
            out.write(data)
            digest.update(data)
            total += length
        tail = END_OF_ARCHIVE + archive_padding(total + len(END_OF_ARCHIVE))
        out.write(tail)
        digest.update(tail)
        total += len(tail)
    return total, digest.hexdigest()


@dataclass
class Totals:
    """What the committed shards hold, gathered while writing the manifest."""

    ok: int = 0
    failed: int = 0
    failed_by_reason: dict[str, int] = field(default_factory=dict)
    shards: list[dict[str, Any]] = field(default_factory=list)
    """index.json entries (name, samples, bytes, sha256) of the shards that have a tar."""


def write_manifest(
    output: str,
    prefix: str,
    shards: Iterable[int],
    *,
    s3: S3Config | None,
    spool_dir: str | None = None,
) -> tuple[str, Totals]:
    """Write `manifest.parquet` from the state files of `shards` (ascending), one shard in
    memory at a time; returns its URI and the totals."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([pa.field(n, pa.type_for_alias(t)) for n, t in MANIFEST_SCHEMA_FIELDS])
    totals = Totals()
    reasons: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix="gram-manifest-", dir=spool_dir or None) as tmp:
        local = Path(tmp) / MANIFEST_FILE
        with pq.ParquetWriter(local, schema, compression="zstd") as out:
            for index in shards:
                state = read_state(output, prefix, index, s3=s3)
                rows = [{n: r.get(n) for n, _ in MANIFEST_SCHEMA_FIELDS} for r in state.rows]
                out.write_table(pa.Table.from_pylist(rows, schema=schema))
                for row in state.rows:
                    if row["status"] == "ok":
                        totals.ok += 1
                    else:
                        reasons[row["reason"]] += 1
                if state.name:
                    totals.shards.append(
                        {
                            "name": state.name,
                            "samples": state.samples,
                            "bytes": state.bytes,
                            "sha256": state.sha256,
                        }
                    )
        uri = storage.join(output, MANIFEST_FILE)
        storage.put_file(uri, local, s3=s3)
    totals.failed = sum(reasons.values())
    totals.failed_by_reason = dict(sorted(reasons.items()))
    return uri, totals


def read_index(output: str, *, s3: S3Config | None = None) -> dict[str, Any]:
    """The `index.json` of a finished output (raises StorageNotFoundError if unfinished)."""
    return typing.cast(
        dict[str, Any], json.loads(storage.read_bytes(storage.join(output, INDEX_FILE), s3=s3))
    )


def shard_uris(output: str, *, s3: S3Config | None = None) -> list[str]:
    """Full URIs of every shard of a finished output, in order (from its index.json)."""
    return [storage.join(output, s["name"]) for s in read_index(output, s3=s3)["shards"]]


def write_index(output: str, index: dict[str, Any], *, s3: S3Config | None) -> str:
    """Write `index.json`; returns its URI."""
    uri = storage.join(output, INDEX_FILE)
    data = json.dumps(index, indent=2, sort_keys=True, ensure_ascii=False).encode() + b"\n"
    storage.put_bytes(uri, data, s3=s3)
    return uri

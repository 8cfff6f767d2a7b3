"""The output's layout: shards, their commit files, the manifest parts and index.json.

Shard membership is fixed before any work: input `i` belongs to shard
`i // samples_per_shard`. One task owns a shard (`commit_shard`): it writes
the shard's samples in input order into `{prefix}-{index:06d}.tar` (so equal
inputs and config give equal bytes), puts it atomically, puts the shard's
manifest part `manifest/{prefix}-{index:06d}.parquet`, and last its state
file `_state/{prefix}-{index:06d}.json` (counts, size, sha256). That state
file is the commit point: a rerun skips shards that have one, and a shard
killed before it is simply redone. Shards whose inputs all failed have a
state file and a manifest part but no tar. At the end the driver compacts
the parts into `manifest.parquet` and writes `index.json`, reading one
shard's files at a time.

    OUT/{prefix}-NNNNNN.tar              samples
    OUT/manifest/{prefix}-NNNNNN.parquet one manifest part per shard (a Parquet dataset)
    OUT/manifest.parquet                 every part, in input order, in one file
    OUT/index.json                       the training contract
    OUT/_state/run.json                  what run the output holds (config, input)
    OUT/_state/{prefix}-NNNNNN.json      one commit file per finished shard
    OUT/_state/lease.json                the running job's lease (gone when it ends)
    OUT/_staging/RUN/...                 a running job's checked inputs, per shard
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines import storage
from pipelines.index import INDEX_FILE
from pipelines.stages import ClipResult
from pipelines.storage import S3Config
from pipelines.tar_format import END_OF_ARCHIVE, archive_padding, json_bytes, shard_name

__all__ = [
    "LAYOUT_VERSION",
    "MANIFEST_SCHEMA_FIELDS",
    "OutputConflictError",
    "ShardState",
    "Totals",
    "check_run_file",
    "clear_staging",
    "commit_shard",
    "finished_shards",
    "lease_uri",
    "manifest_part_uri",
    "read_state",
    "run_file_uri",
    "staging_uri",
    "state_uri",
    "write_index",
    "write_manifest",
]

STATE_DIR = "_state"
RUN_FILE = "run.json"
LEASE_FILE = "lease.json"
MANIFEST_FILE = "manifest.parquet"
MANIFEST_DIR = "manifest"
STAGING_DIR = "_staging"
MANIFEST_MAX_ROW_GROUPS = 2048
"""Row groups of the compacted `manifest.parquet` at most: one per shard up to this many
shards, several whole shards per row group beyond."""
LAYOUT_VERSION = 2
"""Recorded in `_state/run.json`: an output written with another layout is not resumed."""

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
    """What a finished shard left behind (its `_state` file), and what its task returns."""

    index: int
    name: str | None
    """Tar file name, or None when no input of the shard succeeded."""
    inputs: int
    ok: int
    failed_by_reason: dict[str, int]
    samples: int
    bytes: int
    sha256: str | None

    @property
    def failed(self) -> int:
        """Inputs of the shard that failed."""
        return self.inputs - self.ok

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardState:
        """Inverse of `to_json`."""
        return cls(**data)


def state_uri(output: str, prefix: str, index: int) -> str:
    """Where shard `index`'s state file lives."""
    return storage.join(output, STATE_DIR, f"{prefix}-{index:06d}.json")


def manifest_part_uri(output: str, prefix: str, index: int) -> str:
    """Where shard `index`'s manifest part lives."""
    return storage.join(output, MANIFEST_DIR, f"{prefix}-{index:06d}.parquet")


def staging_uri(output: str, run: str, prefix: str, index: int) -> str:
    """Where run `run` (a token of the running job) puts shard `index`'s checked inputs for
    the task that owns it: a task left over from a killed run deletes only its own."""
    return storage.join(output, STAGING_DIR, run, f"{prefix}-{index:06d}.jsonl")


def run_file_uri(output: str) -> str:
    """Where the description of the run an output holds lives."""
    return storage.join(output, STATE_DIR, RUN_FILE)


def lease_uri(output: str) -> str:
    """Where the running job's lease on the output lives."""
    return storage.join(output, STATE_DIR, LEASE_FILE)


def check_run_file(output: str, run: dict[str, Any], *, s3: S3Config | None) -> bool:
    """Write `_state/run.json`, or check that an existing one matches `run`.

    Returns True when resuming an earlier run. Raises OutputConflictError
    (naming the settings that differ) when the output holds another run.
    """
    uri = run_file_uri(output)
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


def commit_shard(
    output: str,
    prefix: str,
    index: int,
    results: Iterable[ClipResult],
    *,
    s3: S3Config | None,
    spool_dir: str | None = None,
) -> ShardState:
    """Write shard `index` from its inputs' `results` (in input order): the tar, the
    manifest part, then the state file (the commit point); each put atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = shard_name(prefix, index)
    rows: list[dict[str, Any]] = []
    reasons: Counter[str] = Counter()
    digest = hashlib.sha256()
    size = samples = 0
    with tempfile.TemporaryDirectory(prefix="gram-shard-", dir=spool_dir or None) as tmp:
        tar_path = Path(tmp) / name
        with tar_path.open("wb") as tar:
            for result in results:
                if result.sample:
                    tar.write(result.sample)
                    digest.update(result.sample)
                    size += len(result.sample)
                    samples += 1
                    result.row["shard"] = name
                else:
                    reasons[result.row["reason"]] += 1
                rows.append({n: result.row.get(n) for n, _ in MANIFEST_SCHEMA_FIELDS})
            tail = END_OF_ARCHIVE + archive_padding(size + len(END_OF_ARCHIVE))
            tar.write(tail)
            digest.update(tail)
        if samples:
            storage.put_file(storage.join(output, name), tar_path, s3=s3)
        part = Path(tmp) / "manifest.parquet"
        pq.write_table(
            pa.Table.from_pylist(rows, schema=manifest_schema()), part, compression="zstd"
        )
        storage.put_file(manifest_part_uri(output, prefix, index), part, s3=s3)
    state = ShardState(
        index=index,
        name=name if samples else None,
        inputs=len(rows),
        ok=samples,
        failed_by_reason=dict(sorted(reasons.items())),
        samples=samples,
        bytes=size + len(tail) if samples else 0,
        sha256=digest.hexdigest() if samples else None,
    )
    storage.put_bytes(state_uri(output, prefix, index), json_bytes(state.to_json()), s3=s3)
    return state


def manifest_schema() -> Any:
    """The pyarrow schema of the manifest (parts and the compacted file alike)."""
    import pyarrow as pa

    return pa.schema([pa.field(n, pa.type_for_alias(t)) for n, t in MANIFEST_SCHEMA_FIELDS])


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
    shards: Sequence[int],
    *,
    s3: S3Config | None,
    spool_dir: str | None = None,
    io_threads: int = 8,
) -> tuple[str, Totals]:
    """Compact the manifest parts of `shards` (ascending) into `manifest.parquet` and
    gather the totals from the shards' state files; returns its URI and the totals.

    Parts are fetched a few ahead on `io_threads`; each shard's rows are one row group,
    up to `MANIFEST_MAX_ROW_GROUPS` shards, and beyond that each row group takes the
    same number of whole shards. The writer keeps the footer in memory until it closes
    (~25 KB per row group, measured), so memory stays bounded: at most ~50 MB of footer
    plus one row group, however many shards there are.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    def fetch(index: int) -> tuple[ShardState, bytes]:
        state = read_state(output, prefix, index, s3=s3)
        return state, storage.read_bytes(manifest_part_uri(output, prefix, index), s3=s3)

    totals = Totals()
    reasons: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix="gram-manifest-", dir=spool_dir or None) as tmp:
        local = Path(tmp) / MANIFEST_FILE
        with pq.ParquetWriter(local, manifest_schema(), compression="zstd") as out:
            per_group = -(-len(shards) // MANIFEST_MAX_ROW_GROUPS)  # shards per row group
            group: list[Any] = []
            for state, part in storage.map_io(
                fetch, shards, workers=io_threads, ahead=2 * io_threads
            ):
                group.append(pq.read_table(pa.BufferReader(part)))
                if len(group) == per_group:
                    _write_row_group(out, group)
                    group = []
                totals.ok += state.ok
                reasons.update(state.failed_by_reason)
                if state.name:
                    totals.shards.append(
                        {
                            "name": state.name,
                            "samples": state.samples,
                            "bytes": state.bytes,
                            "sha256": state.sha256,
                        }
                    )
            if group:
                _write_row_group(out, group)
        uri = storage.join(output, MANIFEST_FILE)
        storage.put_file(uri, local, s3=s3)
    totals.failed = sum(reasons.values())
    totals.failed_by_reason = dict(sorted(reasons.items()))
    return uri, totals


def _write_row_group(writer: Any, tables: list[Any]) -> None:
    import pyarrow as pa

    table = pa.concat_tables(tables)
    writer.write_table(table, row_group_size=max(1, len(table)))


def clear_staging(output: str, *, s3: S3Config | None, io_threads: int = 8) -> int:
    """Delete what a job staged in the output for its tasks (normally nothing is left:
    each task deletes its own inputs once its shard is committed); returns the count."""
    folder = storage.join(output, STAGING_DIR)
    try:
        left = storage.list_files(folder, s3=s3)
    except storage.StorageNotFoundError:
        return 0
    for _ in storage.map_io(lambda f: storage.delete(f.uri, s3=s3), left, workers=io_threads):
        pass
    if not storage.is_s3(folder):
        shutil.rmtree(folder, ignore_errors=True)  # the empty folders
    return len(left)


def write_index(output: str, index: dict[str, Any], *, s3: S3Config | None) -> str:
    """Write `index.json`; returns its URI."""
    uri = storage.join(output, INDEX_FILE)
    data = json.dumps(index, indent=2, sort_keys=True, ensure_ascii=False).encode() + b"\n"
    storage.put_bytes(uri, data, s3=s3)
    return uri

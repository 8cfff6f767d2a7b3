"""A preprocessing output read back, and its text summary: what `gram inspect` prints.

    view = read_output("s3://bucket/shards/v1", s3)
    view.index        # index.json, or None when the run stopped before writing it
    view.table        # one row per input (manifest.parquet's columns), failed ones included
    view.shards       # [ShardInfo], from the index, else from the manifest's ok rows
    print("\n".join(summary_lines(view)))

An output without a manifest (e.g. written by `pipelines.samples_to_shards`) is read from
its samples' metadata; one without an index (too many failures) from its manifest. The
summary counts inputs by status and failure reason (with an example error each), shows
duration and frame-rate histograms of the ok inputs, and counts missing modalities.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gram.config import ConfigError
from gram.schema import AUDIO_SUFFIX, CAPTIONS_SUFFIX, META_SUFFIX, is_frame_suffix
from gram.shards import ShardInfo, iter_raw_samples
from pipelines import storage
from pipelines.index import INDEX_FILE, read_index
from pipelines.storage import S3Config
from pipelines.writer import MANIFEST_FILE, MANIFEST_SCHEMA_FIELDS

__all__ = ["OutputView", "read_output", "summary_lines"]

_BAR = 30  # characters of the longest histogram bar


@dataclass
class OutputView:
    """A preprocessing output as read: its index (None if unfinished), one manifest row per
    input (an Arrow table with the manifest's columns; from the samples' metadata when there
    is no manifest), and its shards."""

    uri: str
    index: dict[str, Any] | None
    table: pa.Table
    from_manifest: bool
    shards: list[ShardInfo]


def _schema() -> pa.Schema:
    return pa.schema([pa.field(n, pa.type_for_alias(t)) for n, t in MANIFEST_SCHEMA_FIELDS])


def _read_manifest(uri: str, s3: S3Config) -> pa.Table | None:
    import pyarrow.parquet as pq

    try:
        data = storage.read_bytes(storage.join(uri, MANIFEST_FILE), s3=s3)
    except storage.StorageNotFoundError:
        return None
    # One reader thread: Arrow's dataset reader leaves threads that can abort the process
    # at exit when torch is loaded too.
    return pq.ParquetFile(io.BytesIO(data)).read(use_threads=False)


def _table_from_samples(shards: Sequence[ShardInfo], s3: S3Config) -> pa.Table:
    """Manifest rows from every sample's metadata (outputs written without a manifest)."""
    rows: list[dict[str, Any]] = []
    for shard in shards:
        stream = storage.open_read(shard.url, s3=s3)
        try:
            for raw in iter_raw_samples(stream, shard.url):
                meta = json.loads(raw[META_SUFFIX]) if META_SUFFIX in raw else {}
                captions = json.loads(raw.get(CAPTIONS_SUFFIX, b"[]"))
                rows.append(
                    {
                        "index": len(rows),
                        "id": str(meta.get("id", raw["__key__"])),
                        "key": raw["__key__"],
                        "uri": meta.get("source"),
                        "status": "ok",
                        "shard": shard.url.rsplit("/", 1)[-1],
                        "duration": meta.get("duration"),
                        "fps": meta.get("fps"),
                        "width": meta.get("width"),
                        "height": meta.get("height"),
                        "has_audio": meta.get("has_audio", AUDIO_SUFFIX in raw),
                        "frames": sum(is_frame_suffix(s) is not None for s in raw),
                        "num_captions": len(captions),
                    }
                )
        finally:
            stream.close()
    return pa.Table.from_pylist(rows, schema=_schema())


def read_output(uri: str, s3: S3Config) -> OutputView:
    """Read `index.json` and `manifest.parquet` of a preprocessing output (see the module doc)."""
    try:
        index: dict[str, Any] | None = read_index(uri, s3=s3)
    except storage.StorageNotFoundError:
        index = None
    shards = [
        ShardInfo(storage.join(uri, s["name"]), int(s["samples"]))
        for s in (index or {}).get("shards", [])
    ]
    table = _read_manifest(uri, s3)
    if table is None and index is None:
        raise ConfigError(
            f"{uri!r} has neither {INDEX_FILE} nor {MANIFEST_FILE}: point SHARDS at the "
            "--output folder of `gram preprocess`"
        )
    if table is None:
        return OutputView(uri, index, _table_from_samples(shards, s3), False, shards)
    if index is None:  # the run stopped before its index: the shards are in the manifest
        ok = table.filter(_is_ok(table))
        counts = pc.value_counts(ok.column("shard").drop_null()).to_pylist()
        shards = sorted(
            (ShardInfo(storage.join(uri, c["values"]), c["counts"]) for c in counts),
            key=lambda s: s.url,
        )
    return OutputView(uri, index, table, True, shards)


def _is_ok(table: pa.Table) -> pa.ChunkedArray:
    return pc.fill_null(pc.equal(table.column("status"), "ok"), False)


def _histogram(values: np.ndarray, unit: str, *, discrete: bool, bins: int = 8) -> list[str]:
    """Text histogram: equal-width bins, or one line per value for `discrete` values (frame
    rates) when there are at most `bins` of them (or all values are equal)."""
    if values.size == 0:
        return ["  (no values)"]
    distinct, counts = np.unique(np.round(values, 2), return_counts=True)
    if distinct.size == 1 or (discrete and distinct.size <= bins):
        labelled = [(f"{v:10.2f} {unit}", int(n)) for v, n in zip(distinct, counts, strict=True)]
    else:
        per_bin, edges = np.histogram(values, bins=bins)
        labelled = [
            (f"{edges[b]:8.2f}-{edges[b + 1]:.2f} {unit}", int(per_bin[b])) for b in range(bins)
        ]
    top = max(n for _, n in labelled)
    width = max(len(label) for label, _ in labelled)
    return [
        f"  {label:>{width}} |{'#' * round(_BAR * n / top):<{_BAR}}| {n}" for label, n in labelled
    ]


def _positive(column: pa.ChunkedArray) -> np.ndarray:
    """The finite values > 0 of a numeric column, as float64."""
    values = np.asarray(pc.cast(column.drop_null(), pa.float64()).to_numpy(), dtype=np.float64)
    return values[np.isfinite(values) & (values > 0)]


def _count(mask: Any) -> int:
    return int(pc.sum(pc.cast(mask, pa.int64())).as_py() or 0)


def summary_lines(view: OutputView) -> list[str]:
    """The text summary of an output: status and reasons, histograms, missing modalities."""
    table = view.table
    is_ok = _is_ok(table)
    ok, failed = table.filter(is_ok), table.filter(pc.invert(is_ok))
    source = MANIFEST_FILE if view.from_manifest else "the samples' metadata (no manifest)"
    lines = [f"{view.uri}: {table.num_rows} inputs, from {source}"]
    if view.index is not None:
        total = sum(int(s.get("bytes", 0)) for s in view.index.get("shards", []))
        lines.append(
            f"index: {len(view.shards)} shards, {sum(s.count for s in view.shards)} samples, "
            f"{total / 1e6:.1f} MB"
        )
    else:
        lines.append(f"index: none ({INDEX_FILE} missing: the run did not finish)")
    lines.append(f"status: ok {ok.num_rows}, failed {failed.num_rows}")
    if failed.num_rows:
        reasons = pc.fill_null(failed.column("reason"), "unknown")
        counted = sorted(
            pc.value_counts(reasons).to_pylist(), key=lambda c: (-c["counts"], c["values"])
        )
        width = max(len(c["values"]) for c in counted)
        lines.append("failed by reason:")
        for c in counted:
            example = failed.filter(pc.equal(reasons, c["values"])).slice(0, 1).to_pylist()[0]
            error = str(example.get("error") or "")[:120]
            name = example.get("id") or example.get("key")
            lines.append(f"  {c['values']:<{width}} {c['counts']:6d}   e.g. {name!r}: {error}")
    no_audio = _count(pc.equal(ok.column("has_audio"), False))
    no_frames = _count(pc.fill_null(pc.less_equal(ok.column("frames"), 0), True))
    no_text = _count(pc.fill_null(pc.less_equal(ok.column("num_captions"), 0), True))
    lines.append(
        f"missing modalities (of {ok.num_rows} ok inputs): audio {no_audio}, video {no_frames}, "
        f"text {no_text}"
    )
    durations = _positive(ok.column("duration"))
    if durations.size:
        lines.append(
            f"duration of ok inputs: min {durations.min():.2f} s, median "
            f"{float(np.median(durations)):.2f} s, max {durations.max():.2f} s"
        )
    lines += _histogram(durations, "s", discrete=False)
    lines.append("frame rate of ok inputs:")
    lines += _histogram(_positive(ok.column("fps")), "fps", discrete=True)
    return lines

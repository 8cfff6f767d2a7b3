"""Look at a preprocessing output: a text summary, or a contact sheet of sampled inputs.

    python -m jobs.inspect shards/eval                        # summary: status, reasons, histograms
    python -m jobs.inspect shards/eval --samples 16 --out sheet.png
    python -m jobs.inspect s3://bucket/shards/v1 --out s3://bucket/reports/sheet.png \\
        s3.endpoint_url=http://127.0.0.1:9000

SHARDS is a `jobs.preprocess` output folder, local or s3://: the shards, `index.json`
and `manifest.parquet` (one row per input, failed ones included). An output without a
manifest (e.g. written by `pipelines.samples_to_shards`) is summarised from its samples'
metadata; a run that stopped before its index (too many failures) from its manifest.

The summary counts inputs by status and failure reason (with an example error each),
shows duration and frame-rate histograms of the ok inputs, and counts missing
modalities. The sheet (`--out`, PNG) draws `--samples` inputs picked at random
(`--seed`) from the manifest, in input order: frames, log-mel spectrogram, caption,
status; a failed input is drawn as such, with its reason. Exit status: 0 done,
2 configuration error or no preprocessing output at SHARDS.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import random
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gram.config import ConfigError
from gram.schema import AUDIO_SUFFIX, CAPTIONS_SUFFIX, META_SUFFIX, is_frame_suffix
from gram.shards import ShardInfo, iter_raw_samples
from jobs.common.contact_sheet import (
    SheetEntry,
    entry_from_sample,
    failed_entry,
    render_sheet,
    samples_by_key,
)
from jobs.common.entry import EXIT_OK, job_main
from pipelines import storage
from pipelines.index import INDEX_FILE, read_index
from pipelines.storage import S3Config
from pipelines.writer import MANIFEST_FILE, MANIFEST_SCHEMA_FIELDS

__all__ = ["InspectConfig", "OutputView", "main", "read_output", "run", "summary_lines"]

_BAR = 30  # characters of the longest histogram bar


@dataclass
class InspectConfig:
    """`python -m jobs.inspect SHARDS [--samples N] [--out sheet.png] key=value ...`.

    shards: preprocessing output folder or s3:// prefix.
    samples: inputs drawn on the sheet. seed: which ones (random, reproducible).
    out: PNG path (local or s3://) for the contact sheet; empty = print the summary.
    """

    shards: str = ""
    samples: int = 12
    out: str = ""
    seed: int = 0
    s3: S3Config = field(default_factory=S3Config)

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ConfigError(f"samples must be >= 1, got {self.samples}")


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


def sheet_entries(view: OutputView, samples: int, seed: int, s3: S3Config) -> list[SheetEntry]:
    """`samples` inputs picked at random (seeded), in input order, ready to draw."""
    total = view.table.num_rows
    picked = sorted(random.Random(seed).sample(range(total), min(samples, total)))
    rows = view.table.take(picked).to_pylist()
    wanted = {str(r["key"]) for r in rows if r.get("status") == "ok" and r.get("key")}
    names = {str(r.get("shard")) for r in rows if str(r.get("key")) in wanted}
    shards = [s for s in view.shards if s.url.rsplit("/", 1)[-1] in names]
    raw = samples_by_key(shards, wanted, s3)
    entries = []
    for row in rows:
        sample = raw.get(str(row.get("key")))
        if row.get("status") == "ok" and sample is not None:
            entries.append(entry_from_sample(sample, row))
        elif row.get("status") == "ok":
            missing = {**row, "reason": "missing_sample", "error": "not found in its shard"}
            entries.append(failed_entry(missing))
        else:
            entries.append(failed_entry(row))
    return entries


def run(cfg: InspectConfig) -> str:
    """Print the summary, or draw the sheet to `cfg.out`; returns what was printed."""
    if not cfg.shards:
        raise ConfigError("SHARDS is required: a `gram preprocess` output folder or s3:// prefix")
    s3 = cfg.s3.resolved()
    view = read_output(cfg.shards, s3)
    if not cfg.out:
        text = "\n".join(summary_lines(view))
        print(text)
        return text
    if not view.table.num_rows:
        raise ConfigError(f"{cfg.shards!r} lists no inputs: nothing to draw")
    entries = sheet_entries(view, cfg.samples, cfg.seed, s3)
    failed = sum(e.status != "ok" for e in entries)
    title = (
        f"{cfg.shards}: {len(entries)} of {view.table.num_rows} inputs (seed {cfg.seed}), "
        f"{len(entries) - failed} ok, {failed} failed"
    )
    with tempfile.TemporaryDirectory(prefix="gram-inspect-") as tmp:
        local = Path(tmp) / "sheet.png" if storage.is_s3(cfg.out) else Path(cfg.out)
        render_sheet(entries, local, title=title)
        if storage.is_s3(cfg.out):
            storage.put_file(cfg.out, local, s3=s3)
    text = f"contact sheet of {len(entries)} inputs ({failed} failed): {cfg.out}"
    print(text)
    return text


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", metavar="SHARDS", help="preprocessing output, local or s3://")
    parser.add_argument("--samples", type=int, help="inputs on the sheet (default 12)")
    parser.add_argument("--out", help="write a contact sheet PNG here (local or s3://)")
    parser.add_argument("--seed", type=int, help="which inputs are sampled (default 0)")


def _apply(cfg: InspectConfig, args: argparse.Namespace) -> InspectConfig:
    """SHARDS, `--samples`, `--out` and `--seed` win over the config file and overrides."""
    flags = {"samples": args.samples, "out": args.out, "seed": args.seed}
    return dataclasses.replace(
        cfg, shards=args.shards, **{k: v for k, v in flags.items() if v is not None}
    )


def _run(cfg: InspectConfig) -> int:
    run(cfg)
    return EXIT_OK


def main(argv: Sequence[str] | None = None, prog: str = "python -m jobs.inspect") -> int:
    """Command-line entry point; returns the process exit code."""
    return job_main(
        argv, prog=prog, doc=__doc__, config=InspectConfig, run=_run, options=_options, apply=_apply
    )


if __name__ == "__main__":
    sys.exit(main())

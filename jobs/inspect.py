"""Look at a preprocessing output: a text summary, or a contact sheet of sampled inputs.

    python -m jobs.inspect shards/eval                        # summary: status, reasons, histograms
    python -m jobs.inspect shards/eval --samples 16 --out sheet.png
    python -m jobs.inspect s3://bucket/shards/v1 --out s3://bucket/reports/sheet.png \\
        s3.endpoint_url=http://127.0.0.1:9000

SHARDS is a `jobs.preprocess` output folder, local or s3://: the shards, `index.json`
and `manifest.parquet` (one row per input, failed ones included). An output without a
manifest (e.g. written by `pipelines.samples_to_shards`) is summarised from its samples'
metadata; a run that stopped before its index (too many failures) from its manifest.

The summary (`pipelines.output.summary_lines`) counts inputs by status and failure reason
(with an example error each), shows duration and frame-rate histograms of the ok inputs,
and counts missing modalities. The sheet (`--out`, PNG) draws `--samples` inputs picked
at random (`--seed`) from the manifest, in input order: frames, log-mel spectrogram,
caption, status; a failed input is drawn as such, with its reason. Exit status: 0 done,
2 configuration error or no preprocessing output at SHARDS.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gram.config import ConfigError
from jobs.common.contact_sheet import (
    SheetEntry,
    entry_from_sample,
    failed_entry,
    render_sheet,
    samples_by_key,
)
from jobs.common.entry import EXIT_OK, job_main
from pipelines import storage
from pipelines.output import OutputView, read_output, summary_lines
from pipelines.storage import S3Config

__all__ = ["InspectConfig", "main", "run", "sheet_entries"]


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

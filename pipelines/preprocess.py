"""The preprocessing run: read inputs, skip finished shards, process the rest, write the index.

    summary = preprocess(config, executor=ray_executor(config))   # pipelines.ray_adapter

`executor` turns a list of inputs into a stream of `ClipResult`s in any
order (Ray Data in production, `serial_executor` in-process). Everything
else here is plain Python: the plan, the resume check, shard writing,
progress lines, the failure-rate check and the summary.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from gram.schema import SCHEMA_VERSION
from pipelines import PIPELINE_VERSION, storage
from pipelines.config import PreprocessConfig
from pipelines.inputs import InputItem, fingerprint, read_inputs
from pipelines.stages import ClipResult, build_stages, process_item
from pipelines.writer import (
    ShardAssembler,
    ShardState,
    check_run_file,
    finished_shards,
    write_index,
    write_manifest,
)

__all__ = ["Executor", "FailureRateError", "Summary", "preprocess", "serial_executor"]

log = logging.getLogger("pipelines.preprocess")

Executor = Callable[[list[InputItem]], Iterator[ClipResult]]


@dataclass
class Summary:
    """What a run did. Times in seconds, sizes in bytes."""

    output: str
    inputs: int = 0
    ok: int = 0
    failed: int = 0
    failed_by_reason: dict[str, int] = field(default_factory=dict)
    processed: int = 0
    """Inputs processed by this run (the rest were in shards finished earlier)."""
    shards: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    clips_per_s: float = 0.0
    index_uri: str | None = None
    manifest_uri: str | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        out = [
            f"inputs {self.inputs}: {self.ok} ok, {self.failed} failed",
            f"processed {self.processed} clips in {self.seconds:.1f}s "
            f"({self.clips_per_s:.2f} clips/s)",
            f"shards {self.shards} ({self.shards_written} written now, {self.shards_skipped} "
            f"already done), {self.bytes_written / 1e6:.1f} MB written",
        ]
        if self.failed_by_reason:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.failed_by_reason.items()))
            out.append(f"failed by reason: {reasons}")
        out.append(f"manifest: {self.manifest_uri}")
        out.append(f"index: {self.index_uri or '(not written)'}")
        return out


class FailureRateError(RuntimeError):
    """More inputs failed than `execution.max_failure_rate` allows; carries the summary."""

    def __init__(self, message: str, summary: Summary) -> None:
        super().__init__(message)
        self.summary = summary


def serial_executor(config: PreprocessConfig) -> Executor:
    """Process inputs one by one in this process (no Ray): for tests and debugging."""
    stages = build_stages(config)

    def run(items: list[InputItem]) -> Iterator[ClipResult]:
        for item in items:
            yield process_item(stages, item, timeout_s=config.execution.clip_timeout_s)

    return run


def _run_record(config: PreprocessConfig, items: list[InputItem]) -> dict[str, Any]:
    return {
        "config_hash": config.hash(),
        "config": config.hashed(),
        "input": {"uri": config.input, "fingerprint": fingerprint(items), "count": len(items)},
        "schema_version": SCHEMA_VERSION,
    }


class _Progress:
    def __init__(self, total: int, interval_s: float) -> None:
        self.total, self.interval = total, interval_s
        self.start = self.last = time.monotonic()
        self.done = self.ok = self.shards = 0

    def update(self, result: ClipResult, shard: ShardState | None) -> None:
        self.done += 1
        self.ok += result.row["status"] == "ok"
        self.shards += shard is not None
        now = time.monotonic()
        if now - self.last >= self.interval or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            log.info(
                "%d/%d clips (%d ok, %d failed), %.2f clips/s, %d shards written",
                self.done,
                self.total,
                self.ok,
                self.done - self.ok,
                rate,
                self.shards,
            )


def preprocess(config: PreprocessConfig, executor: Executor) -> Summary:
    """Run the job described by `config`; see the module docstring.

    Raises ConfigError / ManifestError before any work for bad settings or
    input, OutputConflictError if the output holds another run, and
    FailureRateError (after writing manifest.parquet, without index.json)
    when too many inputs failed.
    """
    config.require_paths()
    started = time.monotonic()
    s3 = config.s3
    items = read_inputs(config.input, config.inputs, s3=s3)
    per = config.shards.samples_per_shard
    members: dict[int, list[int]] = {}
    for item in items:
        members.setdefault(item.index // per, []).append(item.index)
    output = config.output.rstrip("/") if storage.is_s3(config.output) else config.output
    storage.remove_stale_temp_files(output)
    resumed = check_run_file(output, _run_record(config, items), s3=s3)
    prefix = config.shards.prefix
    done = finished_shards(output, prefix, s3=s3) & set(members) if resumed else set()
    todo = {s: idx for s, idx in members.items() if s not in done}
    log.info(
        "%d inputs in %d shards: %d already done, %d to do",
        len(items),
        len(members),
        len(done),
        len(todo),
    )

    assembler = ShardAssembler(output, prefix, todo, s3=s3, spool_dir=config.execution.spool_dir)
    work: list[InputItem] = []
    progress = _Progress(sum(len(v) for v in todo.values()), config.execution.progress_interval_s)
    try:
        for shard in sorted(todo):
            for i in todo[shard]:
                if items[i].reason is None:
                    work.append(items[i])
                else:  # failed before any media work: recorded now
                    result = process_item([], items[i], timeout_s=1.0)
                    progress.update(result, assembler.add(result))
        results = executor(work)
        try:
            for result in results:
                progress.update(result, assembler.add(result))
        finally:
            close = getattr(results, "close", None)
            if close is not None:
                close()
        if assembler.pending():
            raise RuntimeError(f"executor returned no result for shards {assembler.pending()[:10]}")
    finally:
        assembler.close()

    manifest_uri, totals = write_manifest(
        output, prefix, sorted(members), s3=s3, spool_dir=config.execution.spool_dir
    )
    written = {s.name for s in assembler.finished.values() if s.name}
    summary = Summary(
        output=output,
        inputs=len(items),
        ok=totals.ok,
        failed=totals.failed,
        failed_by_reason=totals.failed_by_reason,
        processed=progress.done,
        shards=len(totals.shards),
        shards_written=len(written),
        shards_skipped=len(totals.shards) - len(written),
        bytes_written=assembler.bytes_written,
        manifest_uri=manifest_uri,
    )
    summary.seconds = time.monotonic() - started
    summary.clips_per_s = progress.done / max(summary.seconds, 1e-9)
    rate = summary.failed / max(1, summary.inputs)
    if rate > config.execution.max_failure_rate:
        top = ", ".join(f"{k} {v}" for k, v in Counter(totals.failed_by_reason).most_common(5))
        raise FailureRateError(
            f"{summary.failed} of {summary.inputs} inputs failed ({rate:.0%} > "
            f"execution.max_failure_rate {config.execution.max_failure_rate:.0%}); top reasons: "
            f"{top}. No index.json written; see {summary.manifest_uri} for each input's error.",
            summary,
        )
    summary.index_uri = write_index(output, _index(config, items, totals.shards, summary), s3=s3)
    return summary


def _index(
    config: PreprocessConfig,
    items: list[InputItem],
    shards: list[dict[str, Any]],
    summary: Summary,
) -> dict[str, Any]:
    public = config.public()
    return {
        "format": "webdataset",
        "schema_version": SCHEMA_VERSION,
        "pipeline_version": PIPELINE_VERSION,
        "config_hash": config.hash(),
        "config": {k: public[k] for k in ("frames", "audio", "shards", "inputs")},
        "input": {"uri": config.input, "fingerprint": fingerprint(items), "count": len(items)},
        "shards": shards,
        "totals": {
            "inputs": summary.inputs,
            "ok": summary.ok,
            "failed": summary.failed,
            "samples": sum(s["samples"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
        },
        "failed_by_reason": summary.failed_by_reason,
        "manifest": "manifest.parquet",
    }

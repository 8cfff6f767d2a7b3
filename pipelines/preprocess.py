"""The preprocessing run: check the inputs, hold the output, run shard tasks, write the index.

    summary = preprocess(config)                    # execution.mode picks where shards run
    summary = preprocess(config, local_executor(config))   # or say it (tests, debugging)

1. Plan: the inputs are read and checked as a stream (`inputs.iter_inputs`)
   into a local spool file, one canonical line per input, noting where each
   shard's lines start; the fingerprint is hashed on the way. Nothing is
   written to the output before the whole input proved readable.
2. Hold: the job takes a lease on the output (`_state/lease.json`); a second
   job on the same output is refused while the first runs.
3. Resume check: `_state/run.json` must describe this config and input;
   shards with a commit file are skipped.
4. Shards: each remaining shard becomes a `ShardJob` that an executor runs,
   in this process or as a Ray task that writes the shard itself; the driver
   only counts the small states that come back.
5. Finish: the manifest parts are compacted into `manifest.parquet`, the
   failure rate is checked, and `index.json` is written.

The driver's memory holds a chunk of input rows, the index's page cache and
a few numbers per shard, never anything per input.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from gram.schema import SCHEMA_VERSION
from pipelines import PIPELINE_VERSION, storage
from pipelines.config import PreprocessConfig
from pipelines.disk_index import DiskIndex
from pipelines.inputs import item_line, iter_inputs
from pipelines.lease import Lease, LeaseHeldError, LeaseTimes, StorageLeaseStore
from pipelines.shard_task import Executor, ShardJob, local_executor
from pipelines.writer import (
    LAYOUT_VERSION,
    MANIFEST_FILE,
    ShardState,
    check_run_file,
    clear_staging,
    finished_shards,
    lease_uri,
    run_file_uri,
    write_index,
    write_manifest,
)

__all__ = [
    "FailureRateError",
    "InputPlan",
    "OutputBusyError",
    "Summary",
    "choose_mode",
    "plan_inputs",
    "preprocess",
]

log = logging.getLogger("pipelines.preprocess")


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
    mode: str = ""
    """Where the shards ran: `local` (this process), `ray`, or `none` (nothing left to do)."""
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
            f"({self.clips_per_s:.2f} clips/s, {self.mode})",
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


class OutputBusyError(RuntimeError):
    """Another job holds the output (its lease has not expired)."""


@dataclass
class InputPlan:
    """The checked inputs, spooled on local disk: one `item_line` per input, in order."""

    path: Path
    count: int
    samples_per_shard: int
    fingerprint: str
    starts: array[int]
    """Byte offset in `path` where each shard's lines start, plus the end of the file."""

    @property
    def shards(self) -> int:
        """Number of shards the inputs fill."""
        return len(self.starts) - 1

    def shard_inputs(self, shard: int) -> int:
        """How many inputs shard `shard` holds."""
        return min(self.samples_per_shard, self.count - shard * self.samples_per_shard)

    def lines(self, shard: int) -> bytes:
        """Shard `shard`'s lines."""
        with self.path.open("rb") as fh:
            fh.seek(self.starts[shard])
            return fh.read(self.starts[shard + 1] - self.starts[shard])


def plan_inputs(
    config: PreprocessConfig,
    workdir: Path,
    on_many: Callable[[], None] | None = None,
    stop: threading.Event | None = None,
) -> InputPlan:
    """Read and check every input into `workdir` (a stream: see the module docstring);
    `on_many` is called once the inputs outnumber `execution.local_max_inputs`; setting
    `stop` (from another thread) ends the reading with InterruptedError.

    Raises ManifestError before anything is written to the output.
    """
    per = config.shards.samples_per_shard
    path = workdir / "inputs.jsonl"
    digest = hashlib.sha256()
    starts: array[int] = array("q")
    count = offset = 0
    started = time.monotonic()
    last = started
    execution = config.execution
    with DiskIndex(workdir, cache_mb=execution.index_cache_mb) as index, path.open("wb") as out:
        items = iter_inputs(
            config.input,
            config.inputs,
            s3=config.s3,
            index=index,
            chunk_rows=execution.read_chunk_rows,
        )
        for item in items:
            if count % per == 0:
                starts.append(offset)
            line = item_line(item)
            out.write(line)
            digest.update(line)
            offset += len(line)
            count += 1
            if count == execution.local_max_inputs + 1 and on_many is not None:
                on_many()
            if stop is not None and stop.is_set():
                raise InterruptedError("reading the input was stopped")
            if count % 10_000 == 0 and time.monotonic() - last >= execution.progress_interval_s:
                last = time.monotonic()
                rate = count / (last - started)
                log.info("read and checked %d inputs (%.0f inputs/s)", count, rate)
    starts.append(offset)
    seconds = time.monotonic() - started
    log.info(
        "read and checked %d inputs in %.1f s (%.0f inputs/s)",
        count,
        seconds,
        count / max(seconds, 1e-9),
    )
    return InputPlan(path, count, per, digest.hexdigest()[:16], starts)


def choose_mode(config: PreprocessConfig, inputs_to_do: int) -> str:
    """`local` or `ray`, by `execution.mode` (auto: local up to `local_max_inputs` inputs)."""
    mode = config.execution.mode
    if mode == "auto":
        return "local" if inputs_to_do <= config.execution.local_max_inputs else "ray"
    return mode


def _executor(config: PreprocessConfig, mode: str) -> Executor:
    if mode == "local":
        return local_executor(config)
    from pipelines.ray_adapter import ray_executor  # Ray only when it is used

    return ray_executor(config)


def _run_record(config: PreprocessConfig, plan: InputPlan) -> dict[str, Any]:
    return {
        "config_hash": config.hash(),
        "config": config.hashed(),
        "input": {"uri": config.input, "fingerprint": plan.fingerprint, "count": plan.count},
        "schema_version": SCHEMA_VERSION,
        "layout": LAYOUT_VERSION,
    }


def _lease(config: PreprocessConfig, output: str) -> Lease:
    seconds = config.execution.lease_seconds
    return Lease(
        StorageLeaseStore(lease_uri(output), s3=config.s3),
        LeaseTimes(
            lease_seconds=seconds,
            grace_seconds=seconds / 4,
            wait_seconds=0.0,
            margin_seconds=seconds / 6,
        ),
        what=f"the output {output}",
        purpose=f"preprocess {config.input}",
        how_to_clear=(
            "use another output; if that job is certainly gone, its lease expires "
            f"{seconds:.0f} s after it was last renewed (at once when it ran on this machine)"
        ),
        break_dead_holders=True,
    )


class _Progress:
    def __init__(self, shards: int, inputs: int, interval_s: float) -> None:
        self.shards, self.inputs, self.interval = shards, inputs, interval_s
        self.start = self.last = time.monotonic()
        self.done_shards = self.done = self.ok = self.written = self.bytes = 0

    def update(self, state: ShardState) -> None:
        self.done_shards += 1
        self.done += state.inputs
        self.ok += state.ok
        self.written += state.name is not None
        self.bytes += state.bytes
        now = time.monotonic()
        if now - self.last >= self.interval or self.done_shards == self.shards:
            self.last = now
            log.info(
                "%d/%d shards, %d/%d inputs (%d ok, %d failed), %.1f inputs/s",
                self.done_shards,
                self.shards,
                self.done,
                self.inputs,
                self.ok,
                self.done - self.ok,
                self.done / max(now - self.start, 1e-9),
            )


def preprocess(config: PreprocessConfig, executor: Executor | None = None) -> Summary:
    """Run the job described by `config`; see the module docstring.

    `executor` runs the shards; None picks one by `execution.mode`. Raises
    ConfigError / ManifestError before any work for bad settings or input,
    OutputBusyError when another job holds the output, OutputConflictError if
    the output holds another run, and FailureRateError (after writing
    manifest.parquet, without index.json) when too many inputs failed.
    """
    config.require_paths()
    started = time.monotonic()
    # Local paths as this process means them: the shard tasks run in other folders or nodes.
    execution = replace(config.execution, spool_dir=storage.absolute(config.execution.spool_dir))
    config = replace(
        config,
        input=storage.absolute(config.input),
        output=storage.absolute(config.output),
        execution=execution,
    )
    output = config.output.rstrip("/") if storage.is_s3(config.output) else config.output
    spool = config.execution.spool_dir or None
    with tempfile.TemporaryDirectory(prefix="gram-inputs-", dir=spool) as tmp:
        connected = False
        try:
            plan, connected = _plan(config, output, Path(tmp), early_ray=executor is None)
            lease = _lease(config, output)
            try:
                lease.acquire()
            except LeaseHeldError as exc:
                raise OutputBusyError(str(exc)) from None
            try:
                lease.keep_alive()
                return _run(config, output, plan, executor, lease, started)
            finally:
                lease.release()
        finally:
            if connected:
                from pipelines.ray_adapter import disconnect_ray

                disconnect_ray()


def _plan(
    config: PreprocessConfig, output: str, workdir: Path, *, early_ray: bool
) -> tuple[InputPlan, bool]:
    """`plan_inputs`, starting Ray meanwhile (on this thread) as soon as the run will
    surely need it: `execution.mode=ray`, or `auto` on a fresh output once the inputs
    outnumber `local_max_inputs`. Ray's start-up then overlaps the reading. Returns the
    plan and whether Ray was connected here."""
    mode = config.execution.mode
    if not early_ray or mode == "local":
        return plan_inputs(config, workdir), False
    if mode == "auto" and storage.exists(run_file_uri(output), s3=config.s3):
        return plan_inputs(config, workdir), False  # a resumed run may have little left
    wanted = threading.Event()
    settled = threading.Event()
    stop = threading.Event()

    def many() -> None:
        wanted.set()
        settled.set()

    with ThreadPoolExecutor(1, thread_name_prefix="gram-plan") as pool:
        future = pool.submit(plan_inputs, config, workdir, many, stop)
        future.add_done_callback(lambda _: settled.set())
        connected = False
        try:
            settled.wait()
            if wanted.is_set() or (mode == "ray" and future.exception() is None):
                from pipelines.ray_adapter import connect_ray

                execution = config.execution
                connected = connect_ray(execution.ray_address, num_cpus=execution.local_num_cpus)
            return future.result(), connected
        except BaseException:  # e.g. Ctrl-C: stop the reading thread, leave Ray
            stop.set()
            if connected:
                from pipelines.ray_adapter import disconnect_ray

                disconnect_ray()
            raise


def _run(
    config: PreprocessConfig,
    output: str,
    plan: InputPlan,
    executor: Executor | None,
    lease: Lease,
    started: float,
) -> Summary:
    s3 = config.s3
    prefix = config.shards.prefix
    storage.remove_stale_temp_files(output)
    resumed = check_run_file(output, _run_record(config, plan), s3=s3)
    done = finished_shards(output, prefix, s3=s3) if resumed else set()
    todo = [s for s in range(plan.shards) if s not in done]
    todo_inputs = sum(plan.shard_inputs(s) for s in todo)
    mode = choose_mode(config, todo_inputs) if todo else "none"
    log.info(
        "%d inputs in %d shards: %d already done, %d to do (%d inputs, %s)",
        plan.count,
        plan.shards,
        plan.shards - len(todo),
        len(todo),
        todo_inputs,
        mode,
    )
    progress = _Progress(len(todo), todo_inputs, config.execution.progress_interval_s)
    if todo:
        run = executor or _executor(config, mode)
        jobs: Iterator[ShardJob] = (
            ShardJob(index=s, inputs=plan.shard_inputs(s), lines=plan.lines(s)) for s in todo
        )
        for state in run(jobs, len(todo)):
            progress.update(state)
            lease.ensure()
        if progress.done_shards != len(todo):
            raise RuntimeError(
                f"the executor committed {progress.done_shards} of {len(todo)} shards"
            )
    lease.check()
    finishing = time.monotonic()
    manifest_uri, totals = write_manifest(
        output, prefix, range(plan.shards), s3=s3, spool_dir=config.execution.spool_dir
    )
    clear_staging(output, s3=s3)
    log.info("manifest of %d shards compacted in %.1f s", plan.shards, time.monotonic() - finishing)
    summary = Summary(
        output=output,
        inputs=plan.count,
        ok=totals.ok,
        failed=totals.failed,
        failed_by_reason=totals.failed_by_reason,
        processed=progress.done,
        shards=len(totals.shards),
        shards_written=progress.written,
        shards_skipped=len(totals.shards) - progress.written,
        bytes_written=progress.bytes,
        mode=mode,
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
    lease.check()
    summary.index_uri = write_index(output, _index(config, plan, totals.shards, summary), s3=s3)
    return summary


def _index(
    config: PreprocessConfig,
    plan: InputPlan,
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
        "input": {"uri": config.input, "fingerprint": plan.fingerprint, "count": plan.count},
        "shards": shards,
        "totals": {
            "inputs": summary.inputs,
            "ok": summary.ok,
            "failed": summary.failed,
            "samples": sum(s["samples"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
        },
        "failed_by_reason": summary.failed_by_reason,
        "manifest": MANIFEST_FILE,
    }

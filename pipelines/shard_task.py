"""One shard's work, the same in this process and in a Ray task: decode its inputs, write it.

    context = shard_context(config)                   # the same for every shard of a run
    state = run_shard(ShardJob(index=3, inputs=1000, lines=...), context)

A shard's inputs come as their canonical JSON lines (`inputs.item_line`),
either inline (`lines`, in this process) or staged in the output storage
(`staged`, for a task that may run on another node: read, then deleted once
the shard is committed). `run_shard` runs the stage chain on each input in
input order and hands the results to `writer.commit_shard`, which writes the
tar, the manifest part and the commit file; only the small `ShardState`
comes back. An `Executor` runs many shard jobs (`local_executor` here, one
after another; `ray_adapter.ray_executor` on a cluster).
"""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipelines import storage
from pipelines.config import PreprocessConfig
from pipelines.inputs import InputItem
from pipelines.stages import ClipResult, Stage, build_stages, process_item
from pipelines.storage import S3Config
from pipelines.writer import ShardState, commit_shard

__all__ = [
    "ClipMap",
    "Executor",
    "ShardContext",
    "ShardJob",
    "local_executor",
    "process_clips",
    "run_shard",
    "shard_context",
]


@dataclass(frozen=True)
class ShardJob:
    """One shard to make: its number and its checked inputs."""

    index: int
    inputs: int
    """How many inputs the shard holds."""
    lines: bytes = b""
    """The inputs as `item_line`s, in input order (empty when `staged`)."""
    staged: str = ""
    """URI of the same lines in the output's staging area."""


@dataclass(frozen=True)
class ShardContext:
    """What every shard task of a run needs besides its job."""

    output: str
    prefix: str
    stages: list[Stage]
    timeout_s: float
    s3: S3Config
    spool_dir: str = ""


ClipMap = Callable[[list[InputItem]], Iterator[ClipResult]]
"""Runs the stage chain over a shard's inputs, yielding results in input order."""

Executor = Callable[[Iterator[ShardJob], int], Iterator[ShardState]]
"""Runs shard jobs (pulled as it goes; the int is how many will come), yielding each
shard's state when it is committed, in any order."""


def shard_context(config: PreprocessConfig) -> ShardContext:
    """The run's shared task context (S3 credentials as given: resolve them first)."""
    output = config.output.rstrip("/") if storage.is_s3(config.output) else config.output
    return ShardContext(
        output=output,
        prefix=config.shards.prefix,
        stages=build_stages(config),
        timeout_s=config.execution.clip_timeout_s,
        s3=config.s3,
        spool_dir=config.execution.spool_dir,
    )


def process_clips(context: ShardContext, items: list[InputItem]) -> Iterator[ClipResult]:
    """The stage chain over `items`, one after another in this process (one temp folder
    for all of them, emptied after each clip)."""
    with tempfile.TemporaryDirectory(prefix="gram-clips-", dir=context.spool_dir or None) as tmp:
        for item in items:
            yield process_item(context.stages, item, timeout_s=context.timeout_s, workdir=Path(tmp))


def _items(job: ShardJob, context: ShardContext) -> list[InputItem]:
    lines = storage.read_bytes(job.staged, s3=context.s3) if job.staged else job.lines
    items = [InputItem.from_json(json.loads(line)) for line in lines.splitlines()]
    if len(items) != job.inputs:
        raise RuntimeError(
            f"shard {job.index}: expected {job.inputs} inputs, found {len(items)} "
            f"in {job.staged or 'its job'}"
        )
    return items


def run_shard(job: ShardJob, context: ShardContext, clip_map: ClipMap | None = None) -> ShardState:
    """Decode the shard's inputs and commit the shard; returns its state."""
    items = _items(job, context)
    run = clip_map or functools.partial(process_clips, context)
    state = commit_shard(
        context.output,
        context.prefix,
        job.index,
        run(items),
        s3=context.s3,
        spool_dir=context.spool_dir or None,
    )
    if job.staged:
        storage.delete(job.staged, s3=context.s3)
    return state


def local_executor(config: PreprocessConfig) -> Executor:
    """Run every shard in this process, one after another (no Ray)."""
    context = shard_context(config)

    def run(jobs: Iterator[ShardJob], total: int) -> Iterator[ShardState]:
        for job in jobs:
            yield run_shard(job, context)

    return run

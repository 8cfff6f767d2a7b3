"""The one thin Ray adapter: join or start Ray, and run shard jobs as Ray tasks.

    connect_ray(address="", num_cpus=0)                # the project's one way to reach Ray
    with ray_connection(address):                       # ... and leave it when done
    summary = preprocess(config, ray_executor(config))  # shards as Ray tasks

Each shard is one Ray task (`shard_task.run_shard`): the driver stages the
shard's checked inputs in the output storage, the task reads them, decodes
every clip, writes the shard, its manifest part and its commit file itself,
and returns a few numbers. The driver keeps at most
`execution.max_tasks_in_flight` tasks submitted; nothing per input passes
through it. When fewer shards are left than task slots (a small run), each
shard task spreads its clips over sub-tasks of `execution.clips_per_task`
clips, keeps twice as many submitted as there are slots (so no CPU idles
while it waits for an earlier one) and writes their results in input order;
a task blocked waiting for its sub-tasks gives its CPU back to Ray meanwhile.

Every job joins or starts Ray through `connect_ray` (preprocessing here, training
and evaluation in jobs/), so a job submitted with `ray job submit` or `gram submit`
keeps the runtime env it was given. Nothing else in the project imports Ray for
preprocessing; Ray itself is imported only when a run needs it (it reads its auth
settings, such as RAY_AUTH_MODE, from the environment when first imported).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import secrets
from collections.abc import Iterator, Mapping
from typing import Any

from gram.config import ConfigError
from pipelines import storage
from pipelines.config import PreprocessConfig
from pipelines.inputs import InputItem
from pipelines.shard_task import (
    Executor,
    ShardContext,
    ShardJob,
    process_clips,
    run_shard,
    shard_context,
)
from pipelines.stages import ClipResult
from pipelines.writer import ShardState, staging_uri

__all__ = [
    "connect_ray",
    "disconnect_ray",
    "job_runtime_env_vars",
    "ray_connection",
    "ray_executor",
]

log = logging.getLogger("pipelines.ray")

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by `ray job submit` for the driver: the job's config, its runtime env included."""


def job_runtime_env_vars() -> set[str]:
    """The environment variables that the job's own runtime env sets (empty outside a
    submitted job)."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return set()
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return set()
    return set((runtime_env.get("env_vars") or {}).keys())


def connect_ray(
    address: str = "",
    *,
    num_cpus: int = 0,
    env_vars: Mapping[str, str] | None = None,
    log_to_driver: bool = False,
    dashboard: bool = False,
) -> bool:
    """Join `address`, else $RAY_ADDRESS, else start a local Ray (`num_cpus` CPUs, 0 = all;
    light, without the dashboard, unless `dashboard`: Ray Train's state API needs it).
    Returns True when this call connected (the caller then calls `ray.shutdown()` when
    done), False when this process was already connected.

    `env_vars` go into the job's runtime env for every worker, except the keys the job's
    own runtime env already sets: a driver started by `ray job submit` runs inside that
    env already, and Ray refuses a `ray.init` that repeats one of its keys ("Failed to
    merge the Job's runtime env"). Never put credentials in `env_vars`: Ray's runtime-env
    agent writes them to its logs.
    """
    import ray

    if ray.is_initialized():
        return False
    target = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"log_to_driver": log_to_driver, "configure_logging": False}
    inherited = job_runtime_env_vars()
    env = {k: v for k, v in (env_vars or {}).items() if k not in inherited}
    if env:
        kwargs["runtime_env"] = {"env_vars": env}
    if target is None:
        kwargs["include_dashboard"] = dashboard
        if num_cpus:
            kwargs["num_cpus"] = num_cpus
    ray.init(address=target, **kwargs)
    log.info("Ray %s at %s", "joined" if target else "started", target or "this machine")
    return True


def disconnect_ray() -> None:
    """Leave Ray (a local Ray started by `connect_ray` stops with it)."""
    import ray

    ray.shutdown()


@contextlib.contextmanager
def ray_connection(
    address: str = "",
    *,
    num_cpus: int = 0,
    env_vars: Mapping[str, str] | None = None,
    log_to_driver: bool = False,
    dashboard: bool = False,
) -> Iterator[None]:
    """`connect_ray(...)` for the block; leaves Ray on exit if this call connected."""
    connected = connect_ray(
        address,
        num_cpus=num_cpus,
        env_vars=env_vars,
        log_to_driver=log_to_driver,
        dashboard=dashboard,
    )
    try:
        yield
    finally:
        if connected:
            disconnect_ray()


def _check_cpus(cpus_per_task: float) -> float:
    """The cluster's CPUs; ConfigError when no node can run a task of `cpus_per_task`."""
    import ray

    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    alive = [n.get("Resources", {}).get("CPU", 0.0) for n in nodes if n.get("Alive")]
    if max(alive, default=0.0) < cpus_per_task:
        raise ConfigError(
            f"execution.cpus_per_task: tasks need {cpus_per_task} CPUs, but the largest Ray node "
            f"has {max(alive, default=0.0)}; lower it so tasks can be scheduled"
        )
    return float(sum(alive))


def _clips_task(items: list[InputItem], context: ShardContext) -> list[ClipResult]:
    return list(process_clips(context, items))


def _spread_clips(
    items: list[InputItem], context_ref: Any, clips_per_task: int, window: int, cpus: float
) -> Iterator[ClipResult]:
    """The clips as sub-tasks, at most `window` at a time, results in input order."""
    import ray

    remote = ray.remote(_clips_task).options(num_cpus=cpus)
    chunks = (items[i : i + clips_per_task] for i in range(0, len(items), clips_per_task))
    refs = collections.deque(
        remote.remote(c, context_ref) for c in itertools.islice(chunks, window)
    )
    while refs:
        results: list[ClipResult] = ray.get(refs.popleft())
        refs.extend(remote.remote(c, context_ref) for c in itertools.islice(chunks, 1))
        yield from results


def _shard_task(job: ShardJob, boxed_context: list[Any], spread: tuple[int, int, float]) -> Any:
    """A Ray task: one shard. `boxed_context` holds the context's ObjectRef (boxed so Ray
    hands the reference, not the value, for the sub-tasks)."""
    import ray

    context: ShardContext = ray.get(boxed_context[0])
    clips_per_task, window, cpus = spread
    if window > 1 and job.inputs > clips_per_task:
        return run_shard(
            job,
            context,
            lambda items: _spread_clips(items, boxed_context[0], clips_per_task, window, cpus),
        )
    return run_shard(job, context)


def _stage(job: ShardJob, context: ShardContext, run: str) -> ShardJob:
    """Put the job's inputs in the output's staging area, where any node can read them."""
    uri = staging_uri(context.output, run, context.prefix, job.index)
    storage.put_bytes(uri, job.lines, s3=context.s3)
    return ShardJob(index=job.index, inputs=job.inputs, staged=uri)


def ray_executor(config: PreprocessConfig) -> Executor:
    """An executor that runs each shard as a task on the connected (or started) Ray.

    S3 credentials are resolved here, on the driver, and travel with the tasks
    (`s3.forward_credentials`), so workers need no AWS setup of their own.
    """
    context = shard_context(dataclasses.replace(config, s3=config.s3.resolved()))
    execution = config.execution
    cpus = execution.cpus_per_task or max(stage.resources.cpus for stage in context.stages)

    def run(jobs: Iterator[ShardJob], total: int) -> Iterator[ShardState]:
        import ray

        with ray_connection(execution.ray_address, num_cpus=execution.local_num_cpus):
            cluster_cpus = _check_cpus(cpus)
            slots = max(1, int(cluster_cpus // cpus))
            window = execution.max_tasks_in_flight or 2 * slots
            # Fewer shards than slots: each shard task spreads its clips over the free slots,
            # with as many sub-tasks queued again, so no CPU idles while the shard task waits
            # for an earlier sub-task's result (it takes them in input order).
            spread = (execution.clips_per_task, 2 * slots if total < slots else 1, cpus)
            log.info(
                "%d shard tasks on %.0f CPUs, %.2f CPUs each, up to %d at a time%s",
                total,
                cluster_cpus,
                cpus,
                window,
                f", clips spread over sub-tasks of {spread[0]}" if spread[1] > 1 else "",
            )
            boxed = [ray.put(context)]
            task = ray.remote(_shard_task).options(num_cpus=cpus)
            run_token = secrets.token_hex(6)
            staged = storage.map_io(lambda job: _stage(job, context, run_token), jobs, ahead=window)
            pending: list[Any] = []
            for job in staged:
                pending.append(task.remote(job, boxed, spread))
                if len(pending) >= window:
                    ready, pending = ray.wait(pending, num_returns=1)
                    yield ray.get(ready[0])
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                yield ray.get(ready[0])

    return run

"""Write ready-made samples (member suffix -> bytes) as shards + index.json, as the pipeline does.

For data that is already decoded into the shard contract, e.g. the synthetic
tri-modal set of `gram.synthetic` (tests, smoke runs, benchmarks) or samples
built from another dataset. The output is the same `{prefix}-{index:06d}.tar`
+ `index.json` layout that `jobs.preprocess` writes, so the training and
evaluation jobs read both alike. Shards are put atomically.

    write_sample_shards(SyntheticClips(256, seed=1), "shards/train", samples_per_shard=64)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from gram.schema import SCHEMA_VERSION
from pipelines import storage
from pipelines.index import INDEX_FILE
from pipelines.storage import S3Config
from pipelines.tar_format import (
    END_OF_ARCHIVE,
    archive_padding,
    json_bytes,
    sample_bytes,
    shard_name,
)

__all__ = ["write_sample_shards"]


def _members(sample: Mapping[str, Any]) -> list[tuple[str, bytes]]:
    out = []
    for suffix, value in sample.items():
        if suffix.startswith("__"):
            continue
        if isinstance(value, bytes):
            out.append((suffix, value))
        elif isinstance(value, str):
            out.append((suffix, value.encode("utf-8")))
        else:
            out.append((suffix, json_bytes(value)))
    return out


def write_sample_shards(
    samples: Iterable[Mapping[str, Any]],
    output: str,
    *,
    samples_per_shard: int = 64,
    prefix: str = "shard",
    source: str = "samples",
    s3: S3Config | None = None,
) -> dict[str, Any]:
    """Write `samples` (each with `__key__`) as shards under `output`; returns the index."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    shards: list[dict[str, Any]] = []
    keys = hashlib.sha256()
    body: list[bytes] = []

    def flush() -> None:
        data = b"".join(body) + END_OF_ARCHIVE
        data += archive_padding(len(data))
        name = shard_name(prefix, len(shards))
        storage.put_bytes(storage.join(output, name), data, s3=s3)
        digest = hashlib.sha256(data).hexdigest()
        shards.append({"name": name, "samples": len(body), "bytes": len(data), "sha256": digest})
        body.clear()

    seen: set[str] = set()
    for sample in samples:
        key = str(sample["__key__"])
        if key in seen:
            raise ValueError(f"duplicate sample key {key!r}")
        seen.add(key)
        keys.update(key.encode() + b"\n")
        body.append(sample_bytes(key, _members(sample)))
        if len(body) == samples_per_shard:
            flush()
    if body:
        flush()
    total = sum(s["samples"] for s in shards)
    index = {
        "format": "webdataset",
        "schema_version": SCHEMA_VERSION,
        "input": {"uri": source, "fingerprint": keys.hexdigest()[:16], "count": total},
        "shards": shards,
        "totals": {
            "inputs": total,
            "ok": total,
            "failed": 0,
            "samples": total,
            "bytes": sum(s["bytes"] for s in shards),
        },
    }
    storage.put_bytes(storage.join(output, INDEX_FILE), json.dumps(index, indent=2).encode(), s3=s3)
    return index

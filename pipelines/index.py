"""Reading a finished output's `index.json`: the one reader of a shard listing.

    index = read_index("s3://bucket/shards/v1", s3=s3)      # the parsed index.json
    listing = read_listing("s3://bucket/shards/v1", s3=s3, key="data.train")
    listing.shards        # [ShardInfo(url=full URI, count=samples)], in index order
    listing.fingerprint   # sha256 of the shard names, counts and checksums (16 hex digits)

`index.json` is written last by `jobs.preprocess` (and by `pipelines.samples_to_shards`), so an
output without one is unfinished. It lists every shard (`name`, `samples`, `bytes`,
`sha256`) and the input's fingerprint (`input.fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
import typing
from dataclasses import dataclass
from typing import Any

from gram.config import ConfigError
from gram.shards import ShardInfo
from pipelines import storage
from pipelines.storage import S3Config

__all__ = ["INDEX_FILE", "ShardListing", "read_index", "read_listing"]

INDEX_FILE = "index.json"


def read_index(output: str, *, s3: S3Config | None = None) -> dict[str, Any]:
    """The `index.json` of a finished output (raises StorageNotFoundError if unfinished)."""
    return typing.cast(
        dict[str, Any], json.loads(storage.read_bytes(storage.join(output, INDEX_FILE), s3=s3))
    )


@dataclass(frozen=True)
class ShardListing:
    """The shards of a finished output, as its index.json lists them.

    uri: the output folder; shards: full URIs and sample counts, in index order;
    fingerprint: of the shard names, counts and checksums (equal listings, equal data);
    input_fingerprint: of the input the output was made from ('' when not recorded).
    """

    uri: str
    shards: list[ShardInfo]
    fingerprint: str
    input_fingerprint: str


def read_listing(output: str, *, s3: S3Config | None = None, key: str = "") -> ShardListing:
    """The shard listing of a finished output (local folder or s3:// prefix).

    Raises ConfigError, naming the config `key` that points at `output`, when the output
    has no index.json (unfinished, or not a preprocessing output) or lists no shards.
    """
    where = f"{key} {output!r}" if key else repr(output)
    output = storage.absolute(output)  # the shard URLs go to workers in other folders
    try:
        index = read_index(output, s3=s3)
    except storage.StorageNotFoundError:
        raise ConfigError(
            f"{where} has no index.json: point it at a finished `python -m jobs.preprocess` "
            "output folder (or one written by pipelines.samples_to_shards)"
        ) from None
    entries = [
        {"name": s["name"], "samples": int(s["samples"]), "sha256": s.get("sha256", "")}
        for s in index["shards"]
    ]
    if not entries:
        raise ConfigError(f"{where}: index.json lists no shards")
    canon = json.dumps(entries, sort_keys=True, separators=(",", ":"))
    return ShardListing(
        uri=output,
        shards=[ShardInfo(storage.join(output, e["name"]), e["samples"]) for e in entries],
        fingerprint=hashlib.sha256(canon.encode()).hexdigest()[:16],
        input_fingerprint=str(index.get("input", {}).get("fingerprint", "")),
    )

"""Embed every clip and caption of an eval set, in this process or over Ray tasks.

    data = read_eval_set("s3://bucket/shards/eval", s3)              # index.json -> shards
    emb = embed_eval_set(weights, data.shards, ParallelConfig(), label_fields=["label"], s3=s3)
    emb.text [Nt, D], emb.items["video"] [Ni, D], emb.present [Ni, k-1], emb.text_to_item [Nt]

Each Ray task loads the model from the checkpoint bytes (put once in the object
store), reads whole shards (every sample: nothing is dropped to equalise
workers, unlike training) and embeds them with `gram.steps.embed_for_retrieval`,
the same code the training job evaluates with. Tasks take `cpus_per_task` CPUs
each and by default leave one CPU of the cluster free; they are spread over
nodes. Results are merged and put in key order, so the numbers do not depend on
how the shards were split. Samples that break the shard contract are skipped,
logged and counted (`skipped`), never silently lost.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gram.config import ConfigError
from gram.decode import DecodeConfig, SampleError, collate, decode_sample
from gram.model import GramModel
from gram.shards import RawSample, ShardInfo, ShardLoader
from gram.steps import embed_for_retrieval
from pipelines import storage
from pipelines.index import ShardListing, read_listing
from pipelines.ray_adapter import ray_connection
from pipelines.storage import S3Config

__all__ = [
    "ClipEmbeddings",
    "ParallelConfig",
    "embed_eval_set",
    "embed_shards",
    "load_model_files",
    "read_eval_set",
]

log = logging.getLogger(__name__)


@dataclass
class ParallelConfig:
    """How clips are embedded.

    local: embed in this process, without Ray (small eval sets, notebooks).
    tasks: Ray tasks, each reading whole shards; 0 = one per shard, at most the
        cluster's CPUs minus one (at least 1), so a small cluster keeps a free CPU.
    cpus_per_task: CPUs each task reserves (fractions allowed); torch threads = max(1, floor).
    batch_size: clips per forward pass.
    decode_threads: JPEG/FLAC decoding threads per task.
    """

    local: bool = False
    tasks: int = 0
    cpus_per_task: float = 1.0
    batch_size: int = 32
    decode_threads: int = 2

    def __post_init__(self) -> None:
        if self.tasks < 0:
            raise ConfigError(f"parallel.tasks must be >= 0 (0 = automatic), got {self.tasks}")
        if self.cpus_per_task <= 0:
            raise ConfigError(f"parallel.cpus_per_task must be > 0, got {self.cpus_per_task}")
        if self.batch_size < 1 or self.decode_threads < 1:
            raise ConfigError("parallel.batch_size and parallel.decode_threads must be >= 1")


def read_eval_set(uri: str, s3: S3Config) -> ShardListing:
    """The shards listed in `<uri>/index.json` (a preprocessing output, local or s3://)."""
    if not uri:
        raise ConfigError("eval.shards is required: the folder (or s3:// prefix) of eval shards")
    return read_listing(uri, s3=s3, key="eval.shards")


@dataclass
class ClipEmbeddings:
    """Embeddings of an eval set, clips in key order.

    keys [Ni]; items: data modality -> [Ni, D] unit vectors; present [Ni, k-1] bool
    (columns in `items` order); text [Nt, D] one row per caption; text_to_item [Nt]
    int64; labels: per clip, the requested metadata fields found (str values);
    skipped: samples that failed to decode; nodes: Ray node ids that did the work.
    """

    keys: list[str]
    items: dict[str, Tensor]
    present: Tensor
    text: Tensor
    text_to_item: Tensor
    labels: list[dict[str, str]]
    skipped: int = 0
    nodes: list[str] = field(default_factory=list)
    tasks: int = 0


def load_model_files(weights: Path, tokenizer: Path | None = None) -> GramModel:
    """A GramModel from a gram checkpoint, with the text tokenizer read from `tokenizer` if given.

    The tokenizer override is for models whose tokenizer.json travels with them
    (registered models), so no pretrained folder is needed where they are loaded.
    """
    from dataclasses import replace

    from gram.weights import load_checkpoint

    model, _, _ = load_checkpoint(weights)
    if tokenizer is not None:
        text = replace(model.cfg.text, tokenizer=str(tokenizer), pretrained=None)
        rebuilt = GramModel(replace(model.cfg, text=text), load_pretrained=False)
        rebuilt.load_state_dict(model.state_dict())
        model = rebuilt
    return model.eval()


def _labels(raw: RawSample, fields: Sequence[str]) -> dict[str, str]:
    """The requested label fields of a sample's metadata (top level or `extra`), as strings."""
    if not fields or "json" not in raw:
        return {}
    try:
        meta = json.loads(raw["json"])
    except (TypeError, ValueError):
        return {}
    if not isinstance(meta, dict):
        return {}
    extra = meta.get("extra") if isinstance(meta.get("extra"), dict) else {}
    out = {}
    for name in fields:
        value = meta.get(name, extra.get(name) if extra else None)
        if value is not None and str(value).strip():
            out[name] = str(value).strip()
    return out


def embed_shards(
    model: GramModel,
    shards: Sequence[ShardInfo],
    *,
    batch_size: int,
    decode_threads: int,
    label_fields: Sequence[str],
    s3: S3Config,
) -> ClipEmbeddings:
    """Embed every sample of `shards` in this process (deterministic eval decoding)."""
    decode_cfg = DecodeConfig.from_model(model.cfg)

    def decode(raw: RawSample, rng: random.Random) -> Any:
        try:
            item = decode_sample(raw, decode_cfg, train=False, rng=rng)
        except SampleError as exc:
            log.warning("evaluation skips a broken sample: %s", exc)
            return None
        return item, _labels(raw, label_fields)

    def collate_pairs(pairs: list[Any]) -> Any:
        return collate([p[0] for p in pairs]), [p[1] for p in pairs]

    loader = ShardLoader(
        shards,
        batch_size=batch_size,
        rank=0,
        world_size=1,
        seed=0,
        open_shard=lambda url: storage.open_read(url, s3=s3),
        decode=decode,
        collate=collate_pairs,
        shuffle_buffer=1,
        decode_threads=decode_threads,
    )
    keys: list[str] = []
    labels: list[dict[str, str]] = []

    def batches() -> Iterator[dict[str, Any]]:
        for batch, batch_labels in loader.epoch(0):
            keys.extend(batch["keys"])
            labels.extend(batch_labels)
            yield batch

    with loader:
        emb = embed_for_retrieval(model, batches())
    return ClipEmbeddings(
        keys, emb.items, emb.present, emb.text, emb.text_to_item, labels, skipped=loader.skipped
    )


def _to_numpy(emb: ClipEmbeddings) -> dict[str, Any]:
    return {
        "keys": emb.keys,
        "items": {n: v.numpy() for n, v in emb.items.items()},
        "present": emb.present.numpy(),
        "text": emb.text.numpy(),
        "text_to_item": emb.text_to_item.numpy(),
        "labels": emb.labels,
        "skipped": emb.skipped,
    }


def _from_numpy(part: dict[str, Any]) -> ClipEmbeddings:
    """Arrays from `ray.get` are read-only views of the object store: copy them into
    memory torch owns (`torch.from_numpy` would share the read-only buffer)."""
    return ClipEmbeddings(
        keys=list(part["keys"]),
        items={n: torch.tensor(v) for n, v in part["items"].items()},
        present=torch.tensor(part["present"]),
        text=torch.tensor(part["text"]),
        text_to_item=torch.tensor(part["text_to_item"]),
        labels=list(part["labels"]),
        skipped=int(part["skipped"]),
        nodes=[str(part["node"])] if "node" in part else [],
    )


def _embed_task(
    weights: bytes,
    tokenizer: bytes | None,
    shards: list[ShardInfo],
    parallel: ParallelConfig,
    label_fields: list[str],
    s3: S3Config,
) -> dict[str, Any]:
    """Ray task body: rebuild the model from bytes, embed `shards`, return numpy arrays."""
    import ray

    torch.set_num_threads(max(1, int(parallel.cpus_per_task)))
    with tempfile.TemporaryDirectory(prefix="gram-eval-") as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(weights)
        tok_path = None
        if tokenizer is not None:
            tok_path = Path(tmp) / "tokenizer.json"
            tok_path.write_bytes(tokenizer)
        model = load_model_files(path, tok_path)
    part = embed_shards(
        model,
        shards,
        batch_size=parallel.batch_size,
        decode_threads=parallel.decode_threads,
        label_fields=label_fields,
        s3=s3,
    )
    out = _to_numpy(part)
    out["node"] = ray.get_runtime_context().get_node_id()
    return out


def _split(shards: Sequence[ShardInfo], parts: int) -> list[list[ShardInfo]]:
    """Whole shards into `parts` groups of similar sample counts (largest first, greedy)."""
    groups: list[list[ShardInfo]] = [[] for _ in range(parts)]
    sizes = [0] * parts
    for shard in sorted(shards, key=lambda s: (-s.count, s.url)):
        i = sizes.index(min(sizes))
        groups[i].append(shard)
        sizes[i] += shard.count
    return [g for g in groups if g]


def _merge(parts: Sequence[ClipEmbeddings]) -> ClipEmbeddings:
    """Concatenate parts and put clips in key order (captions follow their clip)."""
    keys = [k for p in parts for k in p.keys]
    if len(set(keys)) != len(keys):
        raise ValueError("the eval set holds the same sample key twice: keys must be unique")
    offsets = np.cumsum([0, *[len(p.keys) for p in parts]])
    owner = torch.cat([p.text_to_item + int(o) for p, o in zip(parts, offsets, strict=False)])
    order = torch.tensor(sorted(range(len(keys)), key=keys.__getitem__), dtype=torch.int64)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(keys))
    new_owner = rank[owner]  # [Nt]
    text_order = torch.argsort(new_owner, stable=True)
    names = list(parts[0].items)
    labels = [lab for p in parts for lab in p.labels]
    return ClipEmbeddings(
        keys=[keys[i] for i in order.tolist()],
        items={n: torch.cat([p.items[n] for p in parts])[order] for n in names},
        present=torch.cat([p.present for p in parts])[order],
        text=torch.cat([p.text for p in parts])[text_order],
        text_to_item=new_owner[text_order],
        labels=[labels[i] for i in order.tolist()],
        skipped=sum(p.skipped for p in parts),
        nodes=sorted({n for p in parts for n in p.nodes}),
        tasks=len(parts),
    )


def _task_count(parallel: ParallelConfig, shards: int) -> int:
    import ray

    if parallel.tasks:
        return min(parallel.tasks, shards)
    cpus = float(ray.cluster_resources().get("CPU", 1.0))  # type: ignore[no-untyped-call]
    fit = int(max(1.0, cpus - 1.0) // parallel.cpus_per_task)
    return max(1, min(shards, fit))


def _embed_on_ray(
    weights: Path,
    tokenizer: Path | None,
    shards: Sequence[ShardInfo],
    parallel: ParallelConfig,
    label_fields: Sequence[str],
    s3: S3Config,
) -> ClipEmbeddings:
    """Ray tasks over groups of whole shards; the S3 settings travel with the tasks."""
    import ray

    groups = _split(shards, _task_count(parallel, len(shards)))
    blob = ray.put(weights.read_bytes())
    tok = ray.put(tokenizer.read_bytes() if tokenizer is not None else None)
    task = ray.remote(_embed_task).options(
        num_cpus=parallel.cpus_per_task, scheduling_strategy="SPREAD", max_retries=2
    )
    refs = [task.remote(blob, tok, g, parallel, list(label_fields), s3) for g in groups]
    return _merge([_from_numpy(p) for p in ray.get(refs)])


def embed_eval_set(
    weights: Path,
    shards: Sequence[ShardInfo],
    parallel: ParallelConfig,
    *,
    label_fields: Sequence[str],
    s3: S3Config,
    tokenizer: Path | None = None,
) -> ClipEmbeddings:
    """Embed the eval set in this process (`parallel.local`) or over Ray tasks (on the Ray
    this process is connected to, else $RAY_ADDRESS, else a local Ray started for the call)."""
    start = time.perf_counter()
    if parallel.local:
        part = embed_shards(
            load_model_files(weights, tokenizer),
            shards,
            batch_size=parallel.batch_size,
            decode_threads=parallel.decode_threads,
            label_fields=label_fields,
            s3=s3,
        )
        merged = _merge([part])
    else:
        with ray_connection():
            merged = _embed_on_ray(weights, tokenizer, shards, parallel, label_fields, s3)
    log.info(
        "embedded %d clips and %d captions in %.1f s (%s)",
        len(merged.keys),
        merged.text.shape[0],
        time.perf_counter() - start,
        "in process" if parallel.local else f"{merged.tasks} Ray task(s)",
    )
    return merged

"""Retrieval and zero-shot classification of a GRAM model on an eval set: numbers, report, pictures.

    config = EvalConfig(shards="s3://bucket/shards/eval")
    result = evaluate_files(ModelFiles(...), config, s3, out_dir)   # embeds (Ray or local), scores
    result.metrics["volume_t2i_r1"], result.report, result.pictures

Metrics (R@K in percent, ranks 1-based; "t2i" = caption -> clip, "i2t" = clip -> caption;
names as in the training job's eval metrics, `gram.steps.evaluate`):
    volume_{t2i,i2t}_{r1,r5,r10,medr,meanr,count}
        text vs every data modality (video + audio) by Gramian volume, over every clip:
        a clip missing a modality is scored on the ones it has (mask), never dropped.
    volume_<subset>_{t2i,i2t}_*   text vs each proper subset of the data modalities
        (e.g. volume_video_*, volume_audio_*) over the clips that have all of it.
    cosine_<name>_{t2i,i2t}_*     text vs one modality by cosine (the baselines), over
        the clips that have it.
    cosine_aligned_<name>_*       the same, sign-aligned: the tower's embeddings negated
        when the mean cosine of true (caption, clip) pairs is negative (`gram.sign`;
        the volume cannot see the sign, so a volume-trained tower may point away
        from its text); equal to the signed values otherwise.
    sign_positive_cosine_<name>   that mean true-pair cosine; sign_flipped_<name>: 1 if < 0.
    zeroshot_top1 / zeroshot_top5 (volume of class prompt + video + audio),
    zeroshot_cosine_<name>_top1 / _top5 (class prompt vs one modality), and
    zeroshot_cosine_aligned_<name>_top1 / _top5 (the same, sign-aligned).
    num_items, num_captions, missing_<name>, skipped_samples, zeroshot_num_items, ...

Scoring is chunked (`chunk_size` rows of the score matrix at a time). The eval
set is identified by `eval_id` = fingerprint of its index.json (shard names,
counts, checksums) + fingerprint of the protocol (classification labels and
prompts, K values), so metrics of two models are comparable exactly when their
eval ids are equal.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gram.classification import class_embeddings, zero_shot_classify
from gram.config import ConfigError, to_dict
from gram.model import GramModel
from gram.retrieval import rank_summary, retrieval_ranks, score_matrix
from gram.sign import SignCheck, check_signs
from jobs.cluster.secrets import redact, scrub
from jobs.common.contact_sheet import top_retrievals
from jobs.evaluation.embedding import (
    ClipEmbeddings,
    ParallelConfig,
    embed_eval_set,
    load_model_files,
    read_eval_set,
)
from jobs.evaluation.plots import plot_confusion, plot_recall_curves, plot_volume_distributions
from pipelines.index import ShardListing
from pipelines.storage import S3Config

__all__ = [
    "ClassificationConfig",
    "EvalConfig",
    "EvaluationResult",
    "ModelFiles",
    "eval_id",
    "evaluate_files",
    "score",
    "sign_warnings",
    "write_report",
]

log = logging.getLogger(__name__)

REPORT_FORMAT = "gram-eval-1"
_HIST_BINS = 50


@dataclass
class ClassificationConfig:
    """Zero-shot audio-video classification from class names.

    label_fields: clip metadata fields that name a clip's class (top level of the
        `json` member or its `extra`); with several, a class is their combination.
    classes: explicit class names (one label field only); empty = every value found.
    prompts: caption templates per class, averaged into one class embedding;
        `{label}` is the class name, `{<field>}` one field's value.
    """

    enabled: bool = True
    label_fields: list[str] = field(default_factory=lambda: ["label"])
    classes: list[str] = field(default_factory=list)
    prompts: list[str] = field(
        default_factory=lambda: ["a {label}", "a video of a {label}", "the sound of a {label}"]
    )

    def __post_init__(self) -> None:
        if self.enabled and (not self.label_fields or not self.prompts):
            raise ConfigError(
                "classification needs label_fields and prompts (or classification.enabled=false)"
            )
        if self.classes and len(self.label_fields) != 1:
            raise ConfigError(
                "classification.classes works with exactly one label field; with several "
                "fields leave classes empty (every combination found is a class)"
            )


@dataclass
class EvalConfig:
    """What to evaluate on and how (shared by evaluate, register and promote).

    shards: folder or s3:// prefix of a preprocessing output (index.json + shards).
    ks: the K of R@K. curve_max_k: recall@K curves go from K=1 to this.
    chunk_size: score-matrix rows/columns computed at a time (memory ~ chunk x N floats).
    """

    shards: str = ""
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    curve_max_k: int = 50
    chunk_size: int = 1024
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    classification: ClassificationConfig = field(default_factory=ClassificationConfig)

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise ConfigError(f"eval.ks must be a non-empty list of K >= 1, got {self.ks}")
        if self.curve_max_k < 1 or self.chunk_size < 1:
            raise ConfigError("eval.curve_max_k and eval.chunk_size must be >= 1")


@dataclass(frozen=True)
class ModelFiles:
    """A model to evaluate or register, as local files plus where it came from.

    weights: a gram checkpoint (`model.safetensors`: weights + config); tokenizer: a
    tokenizer.json travelling with the model (None: the config's own tokenizer).
    """

    weights: Path
    source: str
    tokenizer: Path | None = None
    training_run_id: str = ""
    registered_name: str = ""
    registered_version: str = ""


@dataclass
class EvaluationResult:
    """metrics: flat floats (MLflow); report: JSON-ready dict; pictures: PNG paths."""

    metrics: dict[str, float]
    report: dict[str, Any]
    pictures: list[Path]
    eval_id: str
    report_path: Path


def eval_id(eval_set: ShardListing, config: EvalConfig) -> str:
    """`<index fingerprint>.<protocol fingerprint>`: equal ids = comparable metrics."""
    protocol = {"ks": sorted(config.ks), "classification": to_dict(config.classification)}
    canon = json.dumps(protocol, sort_keys=True, separators=(",", ":"))
    return f"{eval_set.fingerprint}.{hashlib.sha256(canon.encode()).hexdigest()[:8]}"


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _recall_curve(ranks: Tensor, max_k: int) -> list[float]:
    """R@K in percent for K = 1..max_k over the valid (> 0) ranks of `ranks`."""
    valid = ranks[ranks > 0]
    if valid.numel() == 0:
        return []
    return [float((valid <= k).double().mean() * 100) for k in range(1, max_k + 1)]


@dataclass
class _Scored:
    metrics: dict[str, float]
    retrieval: dict[str, Any]
    curves: dict[str, list[float]]


def _restrict(emb: ClipEmbeddings, columns: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """(clip indices having every modality in `columns`, caption rows of those clips,
    their clip index in the restricted set)."""
    has = emb.present[:, list(columns)].all(dim=1)  # [Ni]
    kept = torch.nonzero(has).squeeze(1)  # [Ni']
    new_index = torch.full((has.shape[0],), -1, dtype=torch.int64)
    new_index[kept] = torch.arange(kept.numel())
    rows = torch.nonzero(has[emb.text_to_item]).squeeze(1)  # [Nt']
    return kept, rows, new_index[emb.text_to_item[rows]]


def _score_retrieval(emb: ClipEmbeddings, config: EvalConfig, signs: SignCheck) -> _Scored:
    names = list(emb.items)
    ks = sorted(config.ks)
    metrics: dict[str, float] = {}
    retrieval: dict[str, Any] = {}
    curves: dict[str, list[float]] = {}

    def record(prefix: str, modalities: list[str], score: str, masked: bool, r: Any) -> None:
        t2i, i2t = rank_summary(r.text_to_item, ks), rank_summary(r.item_to_text, ks)
        metrics.update({f"{prefix}_t2i_{k}": v for k, v in t2i.items()})
        metrics.update({f"{prefix}_i2t_{k}": v for k, v in i2t.items()})
        retrieval[prefix] = {
            "score": score,
            "modalities": modalities,
            "masked": masked,
            "t2i": {k: _finite(v) for k, v in t2i.items()},
            "i2t": {k: _finite(v) for k, v in i2t.items()},
        }
        curves[f"{prefix}_t2i"] = _recall_curve(r.text_to_item, config.curve_max_k)

    full = retrieval_ranks(
        emb.text,
        [emb.items[n] for n in names],
        emb.text_to_item,
        score="volume",
        item_mask=emb.present,
        chunk_size=config.chunk_size,
    )
    record("volume", names, "volume", True, full)
    subsets = [
        list(c)
        for size in range(1, len(names))
        for c in itertools.combinations(range(len(names)), size)
    ]
    for columns in subsets:
        kept, rows, owner = _restrict(emb, columns)
        if kept.numel() == 0:
            continue
        chosen = [names[c] for c in columns]
        items = [emb.items[n][kept] for n in chosen]
        vol = retrieval_ranks(
            emb.text[rows], items, owner, score="volume", chunk_size=config.chunk_size
        )
        record("volume_" + "_".join(chosen), chosen, "volume", False, vol)
        if len(columns) == 1:
            cos = retrieval_ranks(
                emb.text[rows], items, owner, score="cosine", chunk_size=config.chunk_size
            )
            record(f"cosine_{chosen[0]}", chosen, "cosine", False, cos)
            if chosen[0] in signs.flipped:
                flipped = retrieval_ranks(
                    emb.text[rows],
                    [-items[0]],
                    owner,
                    score="cosine",
                    chunk_size=config.chunk_size,
                )
                record(
                    f"cosine_aligned_{chosen[0]}", chosen, "cosine, sign-aligned", False, flipped
                )
            else:
                signed = {k: v for k, v in metrics.items() if k.startswith(f"cosine_{chosen[0]}_")}
                metrics.update(
                    {f"cosine_aligned_{k.removeprefix('cosine_')}": v for k, v in signed.items()}
                )
    return _Scored(metrics, retrieval, curves)


@torch.no_grad()
def _volume_distribution(emb: ClipEmbeddings, chunk_size: int) -> dict[str, Any]:
    """Histograms over [0, 1] of positive (caption, own clip) and negative volumes."""
    names = list(emb.items)
    pos_hist = torch.zeros(_HIST_BINS, dtype=torch.float64)
    neg_hist = torch.zeros(_HIST_BINS, dtype=torch.float64)
    pos_sum = neg_sum = 0.0
    for c0 in range(0, emb.text.shape[0], chunk_size):
        c1 = min(c0 + chunk_size, emb.text.shape[0])
        v = score_matrix(
            emb.text[c0:c1], [emb.items[n] for n in names], item_mask=emb.present
        ).double()  # [c, Ni]
        is_pos = torch.zeros_like(v, dtype=torch.bool)
        is_pos[torch.arange(c1 - c0), emb.text_to_item[c0:c1]] = True
        pos, neg = v[is_pos], v[~is_pos]
        pos_hist += torch.histc(pos, bins=_HIST_BINS, min=0.0, max=1.0)
        neg_hist += torch.histc(neg, bins=_HIST_BINS, min=0.0, max=1.0)
        pos_sum += float(pos.sum())
        neg_sum += float(neg.sum())
    n_pos, n_neg = float(pos_hist.sum()), float(neg_hist.sum())
    return {
        "bin_edges": [i / _HIST_BINS for i in range(_HIST_BINS + 1)],
        "positive": pos_hist.tolist(),
        "negative": neg_hist.tolist(),
        "positive_mean": pos_sum / n_pos if n_pos else None,
        "negative_mean": neg_sum / n_neg if n_neg else None,
    }


def _class_of(labels: dict[str, str], fields: Sequence[str]) -> tuple[str, ...] | None:
    values = tuple(labels.get(f, "") for f in fields)
    return values if all(values) else None


def _prompt(template: str, fields: Sequence[str], values: tuple[str, ...]) -> str:
    try:
        return template.format(label=" ".join(values), **dict(zip(fields, values, strict=True)))
    except (KeyError, IndexError) as exc:
        raise ConfigError(
            f"classification prompt {template!r} uses {exc}, which is neither {{label}} nor "
            f"one of the label fields {list(fields)}"
        ) from None


@torch.no_grad()
def _score_classification(
    model: GramModel,
    emb: ClipEmbeddings,
    config: ClassificationConfig,
    chunk_size: int,
    signs: SignCheck,
) -> tuple[dict[str, float], dict[str, Any]]:
    fields = config.label_fields
    found = [_class_of(lab, fields) for lab in emb.labels]
    classes: list[tuple[str, ...]]
    if config.classes:
        classes = [(c,) for c in config.classes]
    else:
        classes = sorted({c for c in found if c is not None})
    if not classes:
        return {}, {
            "skipped": f"no clip metadata has the label field(s) {fields} and no "
            "classification.classes were given"
        }
    index = {c: i for i, c in enumerate(classes)}
    known = {i: index[c] for i, c in enumerate(found) if c is not None and c in index}
    keep = sorted(known)
    unlabeled = sum(c is None for c in found)
    unknown = len(found) - unlabeled - len(keep)
    if not keep:
        return {}, {"skipped": f"no clip is labeled with one of the {len(classes)} classes"}
    prompts = [_prompt(t, fields, c) for c in classes for t in config.prompts]
    anchor = model.names[0]
    rows = []
    for p0 in range(0, len(prompts), 256):
        rows.append(model.encode(anchor, {anchor: prompts[p0 : p0 + 256]}).float().cpu())
    class_emb = class_embeddings(torch.cat(rows).view(len(classes), len(config.prompts), -1))
    kept = torch.tensor(keep, dtype=torch.int64)
    labels = torch.tensor([known[i] for i in keep], dtype=torch.int64)  # [N']
    names = list(emb.items)
    result = zero_shot_classify(
        class_emb,
        [emb.items[n][kept] for n in names],
        labels,
        score="volume",
        item_mask=emb.present[kept],
        chunk_size=chunk_size,
    )
    metrics = {
        "zeroshot_top1": result.top1,
        "zeroshot_top5": result.top5,
        "zeroshot_num_items": float(len(keep)),
        "zeroshot_num_classes": float(len(classes)),
        "zeroshot_unlabeled": float(unlabeled),
    }
    baselines: dict[str, Any] = {}
    for j, n in enumerate(names):
        has = emb.present[kept, j]
        if not bool(has.any()):
            continue
        cos = zero_shot_classify(
            class_emb, [emb.items[n][kept][has]], labels[has], score="cosine", chunk_size=chunk_size
        )
        aligned = cos
        if n in signs.flipped:
            flipped = [-emb.items[n][kept][has]]
            aligned = zero_shot_classify(
                class_emb, flipped, labels[has], score="cosine", chunk_size=chunk_size
            )
        metrics[f"zeroshot_cosine_{n}_top1"] = cos.top1
        metrics[f"zeroshot_cosine_{n}_top5"] = cos.top5
        metrics[f"zeroshot_cosine_aligned_{n}_top1"] = aligned.top1
        metrics[f"zeroshot_cosine_aligned_{n}_top5"] = aligned.top5
        baselines[n] = {
            "top1": cos.top1,
            "top5": cos.top5,
            "aligned_top1": aligned.top1,
            "aligned_top5": aligned.top5,
            "items": int(has.sum()),
        }
    report = {
        "score": "volume",
        "modalities": names,
        "label_fields": list(fields),
        "classes": [" ".join(c) for c in classes],
        "prompts": list(config.prompts),
        "top1": result.top1,
        "top5": result.top5,
        "items": len(keep),
        "unlabeled": unlabeled,
        "outside_classes": unknown,
        "confusion": result.confusion.tolist(),
        "per_class_top1": [_finite(float(x)) for x in result.per_class_accuracy()],
        "cosine_baselines": baselines,
    }
    return metrics, report


def score(
    model: GramModel, emb: ClipEmbeddings, config: EvalConfig
) -> tuple[dict[str, float], dict[str, Any]]:
    """All metrics (flat) and the report sections, from the embeddings of an eval set."""
    signs = check_signs(emb.text, emb.items, emb.text_to_item, emb.present)
    scored = _score_retrieval(emb, config, signs)
    metrics = dict(scored.metrics)
    for n, mean in signs.mean_positive.items():
        metrics[f"sign_positive_cosine_{n}"] = mean
        metrics[f"sign_flipped_{n}"] = float(n in signs.flipped)
    names = list(emb.items)
    counts: dict[str, Any] = {
        "clips": len(emb.keys),
        "captions": int(emb.text.shape[0]),
        "missing": {n: int((~emb.present[:, j]).sum()) for j, n in enumerate(names)},
        "skipped_samples": emb.skipped,
    }
    metrics.update(num_items=float(counts["clips"]), num_captions=float(counts["captions"]))
    metrics.update({f"missing_{n}": float(v) for n, v in counts["missing"].items()})
    metrics["skipped_samples"] = float(emb.skipped)
    report: dict[str, Any] = {
        "counts": counts,
        "retrieval": scored.retrieval,
        "recall_curves": scored.curves,
        "volume_distribution": _volume_distribution(emb, config.chunk_size),
        "signs": {
            "positive_cosine": {n: _finite(m) for n, m in signs.mean_positive.items()},
            "flipped": signs.flipped,
        },
    }
    if config.classification.enabled:
        cls_metrics, report["classification"] = _score_classification(
            model, emb, config.classification, config.chunk_size, signs
        )
        metrics.update(cls_metrics)
    else:
        report["classification"] = {"skipped": "classification.enabled is false"}
    return metrics, report


def sign_warnings(signs: dict[str, Any]) -> list[str]:
    """A warning for every data modality whose true pairs have a negative mean cosine with
    their caption (the report's `signs` section)."""
    return [
        f"the mean cosine of true (caption, {n}) pairs is {signs['positive_cosine'][n]:.3f} < 0: "
        f"the {n} embeddings point away from their text, so cosine search with them ranks "
        "true matches last (the volume cannot see the sign). The cosine_aligned_* metrics "
        f"negate the {n} tower; train with loss.cosine_weight > 0 to fix the sign"
        for n in signs["flipped"]
    ]


def _pictures(report: dict[str, Any], out_dir: Path) -> list[Path]:
    curves = report["recall_curves"]
    shown = {k: v for k, v in curves.items() if k == "volume_t2i" or k.startswith("cosine_")}
    paths = [
        plot_recall_curves(shown, out_dir / "recall_at_k.png"),
        plot_volume_distributions(report["volume_distribution"], out_dir / "volume_hist.png"),
    ]
    cls = report.get("classification", {})
    if "confusion" in cls:
        paths.append(plot_confusion(cls["confusion"], cls["classes"], out_dir / "confusion.png"))
    return paths


def write_report(report: dict[str, Any], path: Path) -> Path:
    """Write `report` as JSON (secrets scrubbed, no NaN) to `path`; returns `path`."""
    path.write_text(scrub(json.dumps(report, indent=2, sort_keys=False, allow_nan=False)) + "\n")
    return path


def evaluate_files(
    files: ModelFiles, config: EvalConfig, s3: S3Config, out_dir: Path
) -> EvaluationResult:
    """Embed the eval set with the model in `files`, score it, write report.json and pictures."""
    start = time.perf_counter()
    eval_set = read_eval_set(config.shards, s3)
    model = load_model_files(files.weights, files.tokenizer)
    fields = config.classification.label_fields if config.classification.enabled else []
    emb = embed_eval_set(
        files.weights,
        eval_set.shards,
        config.parallel,
        label_fields=fields,
        s3=s3,
        tokenizer=files.tokenizer,
    )
    metrics, sections = score(model, emb, config)
    ident = eval_id(eval_set, config)
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {
            "source": files.source,
            "registered_name": files.registered_name,
            "registered_version": files.registered_version,
            "training_run_id": files.training_run_id,
            "config": model.cfg.name,
            "modalities": model.names,
            "embed_dim": model.cfg.embed_dim,
        },
        "eval_set": {
            "uri": eval_set.uri,
            "eval_id": ident,
            "index_fingerprint": eval_set.fingerprint,
            "input_fingerprint": eval_set.input_fingerprint,
            "shards": len(eval_set.shards),
        },
        "embedding": {
            "mode": "local" if config.parallel.local else "ray",
            "tasks": emb.tasks,
            "nodes": len(emb.nodes),
        },
        **sections,
        "metrics": {k: _finite(v) for k, v in sorted(metrics.items())},
        "config": redact(to_dict(config)),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    pictures = _pictures(report, out_dir)
    pictures.append(top_retrievals(emb, eval_set.shards, s3, out_dir / "top5_retrievals.png"))
    report["pictures"] = [p.name for p in pictures]
    report["seconds"] = round(time.perf_counter() - start, 2)
    path = write_report(report, out_dir / "report.json")
    finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
    return EvaluationResult(finite, report, pictures, ident, path)

"""Evaluate a trained model on an AV-digits test set with the library's evaluation code.

    emb = embed_test_set(model, batches, labels)           # gram.steps.embed_for_retrieval
    metrics, volumes = evaluate_embeddings(emb)

Every model is scored by every rule, whatever loss trained it:

- zero-shot classification (`gram.classification`): class text embeddings are the mean
  of the class's prompt embeddings (the caption templates); a clip is assigned the class
  with the lowest volume vol(class, video, audio), or the highest cosine with one
  modality (text-video, text-audio), or the highest sum of both cosines (late fusion);
- text -> (video + audio) retrieval at class level: every prompt queries every test
  clip (by volume, or by the cosine sum); a hit at K when one of the K best clips shows
  the prompt's digit; also mean average precision over all clips of that digit;
- video <-> audio retrieval at class level (cosine between the two data modalities,
  a pair the text-anchored loss never aligns directly).

Cosine scores come twice: signed, and sign-aligned (`gram.sign`): a tower whose mean
cosine with its true class prompt is negative on the test set is negated first. The
volume cannot see the sign of an embedding, so a model trained with the volume alone
may point a tower away from its text; `sign_video` / `sign_audio` hold those means.

`volumes` holds vol(class, video, audio) for the true class (positives) and for the
nine others (negatives), for the distribution plot.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.av_digits_data import DIGIT_NAMES, TEMPLATES
from gram.classification import class_embeddings, zero_shot_classify
from gram.retrieval import score_matrix
from gram.sign import align_signs, check_signs
from gram.steps import embed_for_retrieval, to_device, unwrap

__all__ = ["ClipEmbeddings", "embed_test_set", "evaluate_embeddings"]


@dataclass(frozen=True)
class ClipEmbeddings:
    """L2-normalised embeddings of a test set.

    prompts [C, P, D] (class x template); video, audio [N, D]; present [N, 2] bool;
    labels [N] int64.
    """

    prompts: Tensor
    video: Tensor
    audio: Tensor
    present: Tensor
    labels: Tensor


@torch.no_grad()
def embed_prompts(model: nn.Module) -> Tensor:
    """Text embeddings of every caption template for every digit -> [C, P, D]."""
    inner = unwrap(model)
    anchor = inner.names[0]
    texts = [t.format(name) for name in DIGIT_NAMES for t in TEMPLATES]
    ids, attention = inner.tokenizer(texts)
    device = next(inner.parameters()).device
    was_training = inner.training
    inner.eval()
    batch = to_device({f"{anchor}_ids": ids, f"{anchor}_attention": attention}, device)
    out = inner.encode(anchor, batch).float().cpu()  # [C * P, D]
    inner.train(was_training)
    return out.reshape(len(DIGIT_NAMES), len(TEMPLATES), -1)


def embed_test_set(
    model: nn.Module, batches: Iterable[Mapping[str, Any]], labels: Tensor
) -> ClipEmbeddings:
    """Embed the clips of `batches` (in order; `labels` [N] follows the same order)."""
    emb = embed_for_retrieval(model, batches)
    if set(emb.items) != {"video", "audio"}:
        raise ValueError(f"expected a (text, video, audio) model, got items {sorted(emb.items)}")
    if emb.present.shape[0] != labels.shape[0]:
        raise ValueError(f"{emb.present.shape[0]} clips embedded but {labels.shape[0]} labels")
    return ClipEmbeddings(
        prompts=embed_prompts(model),
        video=emb.items["video"],
        audio=emb.items["audio"],
        present=emb.present,
        labels=labels.to(torch.long),
    )


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """Lower-is-better cosine score [Na, Nb] (the library's convention)."""
    return score_matrix(a, [b], score="cosine")


def _class_hits(scores: Tensor, query_labels: Tensor, item_labels: Tensor) -> dict[str, float]:
    """R@1, R@5 (a relevant item among the K best) and mAP, in percent. scores: [Nq, Ni]."""
    order = scores.argsort(dim=1, stable=True)  # [Nq, Ni] best first
    relevant = item_labels[order] == query_labels[:, None]  # [Nq, Ni]
    hits = relevant.cumsum(dim=1)  # [Nq, Ni]
    positions = torch.arange(1, scores.shape[1] + 1, dtype=torch.float64)
    precision = hits.double() / positions  # [Nq, Ni]
    n_relevant = relevant.sum(dim=1).clamp_min(1).double()
    ap = (precision * relevant).sum(dim=1) / n_relevant  # [Nq]
    return {
        "r1": 100.0 * float(relevant[:, 0].double().mean()),
        "r5": 100.0 * float((hits[:, 4] > 0).double().mean()),
        "map": 100.0 * float(ap.mean()),
    }


def _accuracy(scores: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent of lower-is-better class scores [N, C]."""
    return 100.0 * float((scores.argmin(dim=1) == labels).double().mean())


def evaluate_embeddings(emb: ClipEmbeddings) -> tuple[dict[str, float], dict[str, Tensor]]:
    """All metrics of one model on one test set, and the positive/negative class volumes."""
    classes = class_embeddings(emb.prompts)  # [C, D]
    labels = emb.labels
    items = [emb.video, emb.audio]
    metrics: dict[str, float] = {"num_clips": float(labels.shape[0])}

    volume = zero_shot_classify(classes, items, labels, score="volume", item_mask=emb.present)
    metrics["zs_volume"] = volume.top1
    metrics["zs_volume_top5"] = volume.top5
    signs = check_signs(
        classes[labels], {"video": emb.video, "audio": emb.audio}, torch.arange(len(labels))
    )
    aligned = align_signs({"video": emb.video, "audio": emb.audio}, signs)
    for suffix, video, audio in (
        ("", emb.video, emb.audio),
        ("_aligned", aligned["video"], aligned["audio"]),
    ):
        for name, tower in (("video", video), ("audio", audio)):
            zero_shot = zero_shot_classify(classes, [tower], labels, score="cosine")
            metrics[f"zs_cos_{name}{suffix}"] = zero_shot.top1
        fused = _cosine(video, classes) + _cosine(audio, classes)  # [N, C]
        metrics[f"zs_cos_sum{suffix}"] = _accuracy(fused, labels)
    metrics["sign_video"] = signs.mean_positive["video"]
    metrics["sign_audio"] = signs.mean_positive["audio"]

    prompts = emb.prompts.reshape(-1, emb.prompts.shape[-1])  # [C * P, D]
    prompt_labels = torch.arange(emb.prompts.shape[0]).repeat_interleave(emb.prompts.shape[1])
    t2va_volume = score_matrix(prompts, items, score="volume", item_mask=emb.present)
    t2va_sum = _cosine(prompts, emb.video) + _cosine(prompts, emb.audio)
    t2va_aligned = _cosine(prompts, aligned["video"]) + _cosine(prompts, aligned["audio"])
    for name, scores in (
        ("volume", t2va_volume),
        ("cos_sum", t2va_sum),
        ("cos_sum_aligned", t2va_aligned),
    ):
        for k, v in _class_hits(scores, prompt_labels, labels).items():
            metrics[f"t2va_{name}_{k}"] = v
    v2a = _cosine(emb.video, emb.audio)  # [N, N]
    for k, v in _class_hits(v2a, labels, labels).items():
        metrics[f"v2a_{k}"] = v
    for k, v in _class_hits(v2a.t(), labels, labels).items():
        metrics[f"a2v_{k}"] = v

    class_volumes = score_matrix(classes, items, score="volume", item_mask=emb.present).t()
    is_true = torch.nn.functional.one_hot(labels, classes.shape[0]).bool()  # [N, C]
    volumes = {"positive": class_volumes[is_true], "negative": class_volumes[~is_true]}
    metrics["volume_positive_mean"] = float(volumes["positive"].mean())
    metrics["volume_negative_mean"] = float(volumes["negative"].mean())
    return metrics, volumes

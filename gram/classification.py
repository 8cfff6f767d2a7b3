"""Zero-shot classification: class names -> prompt captions -> rank classes per item.

Every class is described by one or more prompts ("a {name}", "the sound of a
{name}", ...). Their text embeddings are averaged into one unit vector per
class; each item (e.g. a clip's video and audio embeddings) is then scored
against every class, by Gramian volume over (class, item modalities...) or
by cosine with one modality, lower = better, and classes are ranked.

    classes = class_embeddings(prompt_emb)                  # [C, P, d] -> [C, d]
    result = zero_shot_classify(classes, [video, audio], labels, item_mask=mask)
    result.top1, result.top5, result.confusion              # % , %, [C, C] counts
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gram.retrieval import Score, score_matrix

__all__ = ["ClassificationResult", "class_embeddings", "zero_shot_classify"]


def class_embeddings(prompts: Tensor) -> Tensor:
    """Mean of each class's L2-normalised prompt embeddings, renormalised. [C, P, d] -> [C, d]."""
    if prompts.dim() != 3:
        raise ValueError(f"prompt embeddings must be [C, P, d], got {tuple(prompts.shape)}")
    return F.normalize(F.normalize(prompts.float(), dim=-1).mean(dim=1), dim=-1)


@dataclass(frozen=True)
class ClassificationResult:
    """top-k accuracies in percent; confusion[true, predicted] counts; predictions [N]."""

    top1: float
    top5: float
    confusion: Tensor
    predictions: Tensor
    ranks: Tensor

    def per_class_accuracy(self) -> Tensor:
        """[C] top-1 accuracy per true class in percent (NaN for classes without items)."""
        totals = self.confusion.sum(1).double()
        hits = self.confusion.diagonal().double()
        return torch.where(totals > 0, 100.0 * hits / totals.clamp_min(1), float("nan"))


@torch.no_grad()
def zero_shot_classify(
    classes: Tensor,
    items: Sequence[Tensor],
    labels: Tensor,
    *,
    score: Score = "volume",
    item_mask: Tensor | None = None,
    chunk_size: int = 4096,
) -> ClassificationResult:
    """Rank the C classes for each of N items and score the predictions.

    Args:
        classes: [C, d] class text embeddings (see `class_embeddings`).
        items: item modalities, each [N, d] (one modality for cosine).
        labels: [N] int64 true class per item.
        score: "volume" (Gramian volume of class + item modalities) or "cosine".
        item_mask: [N, len(items)] bool, True where the modality is present (volume only).
        chunk_size: items scored at a time.
    """
    c, n = classes.shape[0], items[0].shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels must be [N] = [{n}], got {tuple(labels.shape)}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= c):
        raise ValueError(f"labels must lie in [0, {c})")
    ranks = torch.empty(n, dtype=torch.long)
    predictions = torch.empty(n, dtype=torch.long)
    for j0 in range(0, n, chunk_size):
        j1 = min(j0 + chunk_size, n)
        mask = None if item_mask is None else item_mask[j0:j1]
        s = score_matrix(
            classes, [it[j0:j1] for it in items], score=score, item_mask=mask
        )  # [C, n]
        s = s.t().cpu()  # [n, C]
        truth = s.gather(1, labels[j0:j1, None].cpu())  # [n, 1]
        ranks[j0:j1] = (s <= truth).sum(1)  # ties count against the true class
        predictions[j0:j1] = s.argmin(1)
    confusion = torch.zeros(c, c, dtype=torch.long)
    confusion.index_put_(
        (labels.cpu(), predictions), torch.ones(n, dtype=torch.long), accumulate=True
    )
    top1 = float((ranks <= 1).double().mean() * 100) if n else float("nan")
    top5 = float((ranks <= 5).double().mean() * 100) if n else float("nan")
    return ClassificationResult(top1, top5, confusion, predictions, ranks)

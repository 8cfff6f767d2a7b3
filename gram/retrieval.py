"""Text <-> item retrieval metrics by Gramian volume or cosine, computed in chunks.

Texts are queries for items (text-to-item) and items query texts (item-to-text).
An item has one or more captions: `text_to_item[c]` is the item of caption c.
Scores are "lower is better" throughout: volume as is, cosine negated.

Ranks are 1-based. Ties count against the ground truth (a candidate scoring
exactly as well as the right answer is ranked ahead of it), so a collapsed
model that scores everything alike gets the worst rank, not the best.
- text-to-item: rank of caption c's item among all items.
- item-to-text: rank of the best-scoring of the item's captions among all
  texts (other captions of the same item are not competitors). Items without
  captions get rank 0 and are left out of the item-to-text statistics.

Memory: at most one [Nt, chunk] or [chunk, Ni] score block at a time
(10,000 x 10,000 with chunk 1024 peaks well under 1 GiB).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from gram.volume import volume_matrix

__all__ = [
    "RetrievalRanks",
    "Score",
    "rank_summary",
    "retrieval_metrics",
    "retrieval_ranks",
    "score_matrix",
]

Score = Literal["volume", "cosine"]


def score_matrix(
    text: Tensor,
    items: Sequence[Tensor],
    *,
    score: Score = "volume",
    item_mask: Tensor | None = None,
) -> Tensor:
    """Scores of every text against every item, lower = better. -> [Nt, Ni].

    Args:
        text: [Nt, d] text embeddings.
        items: the item modalities, each [Ni, d] (e.g. video and audio).
        score: "volume" = vol(text, *item modalities); "cosine" = -cos(text, item),
            which needs exactly one item modality.
        item_mask: [Ni, len(items)] bool, True where the modality is present (volume only).
    """
    if not items:
        raise ValueError("score_matrix needs at least one item modality")
    if score == "volume":
        return volume_matrix(text, *items, mask=item_mask)
    if score == "cosine":
        if len(items) != 1:
            raise ValueError(f"cosine scores one item modality at a time, got {len(items)}")
        t = F.normalize(text.float(), dim=-1)
        v = F.normalize(items[0].float(), dim=-1)
        return -(t @ v.t())
    raise ValueError(f"unknown score {score!r}: use 'volume' or 'cosine'")


@dataclass(frozen=True)
class RetrievalRanks:
    """1-based ranks: `text_to_item` [Nt] per caption; `item_to_text` [Ni] (0: no caption)."""

    text_to_item: Tensor
    item_to_text: Tensor


@torch.no_grad()
def retrieval_ranks(
    text: Tensor,
    items: Sequence[Tensor],
    text_to_item: Tensor,
    *,
    score: Score = "volume",
    item_mask: Tensor | None = None,
    chunk_size: int = 1024,
) -> RetrievalRanks:
    """Ranks of the ground truth in both directions, computed `chunk_size` rows/columns at a time.

    Args:
        text: [Nt, d]; items: each [Ni, d]; text_to_item: [Nt] int64 item index per caption.
        item_mask: [Ni, len(items)] bool or None.
    """
    nt, ni = text.shape[0], items[0].shape[0]
    if text_to_item.shape != (nt,):
        raise ValueError(f"text_to_item must be [Nt] = [{nt}], got {tuple(text_to_item.shape)}")
    if nt and (int(text_to_item.min()) < 0 or int(text_to_item.max()) >= ni):
        raise ValueError(f"text_to_item holds item indices outside [0, {ni})")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    text_to_item = text_to_item.to(torch.long)

    t2i = torch.empty(nt, dtype=torch.long)
    for c0 in range(0, nt, chunk_size):
        c1 = min(c0 + chunk_size, nt)
        s = score_matrix(text[c0:c1], items, score=score, item_mask=item_mask)  # [c, Ni]
        gt_idx = text_to_item[c0:c1].to(s.device)
        gt = s.gather(1, gt_idx[:, None])  # [c, 1]
        ahead = (s <= gt).sum(1) - 1  # every item at least as good, minus the item itself
        t2i[c0:c1] = ahead.cpu() + 1

    i2t = torch.zeros(ni, dtype=torch.long)
    for j0 in range(0, ni, chunk_size):
        j1 = min(j0 + chunk_size, ni)
        chunk = [it[j0:j1] for it in items]
        mask = None if item_mask is None else item_mask[j0:j1]
        s = score_matrix(text, chunk, score=score, item_mask=mask)  # [Nt, cj]
        cols = torch.arange(j0, j1, device=s.device)
        is_gt = text_to_item.to(s.device)[:, None] == cols[None, :]  # [Nt, cj]
        best = s.masked_fill(~is_gt, float("inf")).amin(0)  # [cj]
        ahead = ((s <= best[None, :]) & ~is_gt).sum(0)  # [cj]
        has_caption = is_gt.any(0)
        i2t[j0:j1] = torch.where(has_caption, ahead + 1, torch.zeros_like(ahead)).cpu()
    return RetrievalRanks(text_to_item=t2i, item_to_text=i2t)


def rank_summary(ranks: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """R@K in percent, median and mean rank of 1-based `ranks` (entries <= 0 are ignored)."""
    valid = ranks[ranks > 0].to(torch.float64)
    out: dict[str, float] = {}
    if valid.numel() == 0:
        out.update({f"r{k}": float("nan") for k in ks})
        out.update(medr=float("nan"), meanr=float("nan"), count=0.0)
        return out
    for k in ks:
        out[f"r{k}"] = float((valid <= k).double().mean() * 100.0)
    out["medr"] = float(valid.median())  # lower median for even counts, as torch defines it
    out["meanr"] = float(valid.mean())
    out["count"] = float(valid.numel())
    return out


def retrieval_metrics(
    text: Tensor,
    items: Sequence[Tensor],
    text_to_item: Tensor,
    *,
    score: Score = "volume",
    item_mask: Tensor | None = None,
    chunk_size: int = 1024,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Both directions as one flat dict: `t2i_r1`, ..., `t2i_medr`, `t2i_meanr`, `i2t_r1`, ...

    R@K in percent; `t2i_count` / `i2t_count` are the numbers of queries scored.
    """
    ranks = retrieval_ranks(
        text, items, text_to_item, score=score, item_mask=item_mask, chunk_size=chunk_size
    )
    out = {f"t2i_{k}": v for k, v in rank_summary(ranks.text_to_item, ks).items()}
    out.update({f"i2t_{k}": v for k, v in rank_summary(ranks.item_to_text, ks).items()})
    return out

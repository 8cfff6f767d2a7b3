"""Which way each data tower points relative to the text: signed and sign-aligned cosine.

The Gramian volume cannot tell an embedding from its negative: vol(t, v, a) =
vol(t, -v, a), for every sample on its own. A model trained with the volume
alone may therefore learn data embeddings that point away from their text, for
a whole tower or for some samples: cosine search with them ranks true matches
last, while the volume (and |cos|) still scores them well. A cosine term in the
loss (`gram.loss.GramCosineLoss`) fixes the sign.

    check = check_signs(text, {"video": v, "audio": a}, text_to_item, present)
    check.mean_positive   # {"video": 0.41, "audio": -0.23}: mean cos of true pairs
    check.flipped         # ["audio"]: a negative mean
    aligned = align_signs({"video": v, "audio": a}, check)   # audio negated

Sign-aligned scores flip a whole tower when its mean true-pair cosine on the
evaluation set is negative. A sign broken per sample is not repaired by that:
the signed, the sign-aligned and the volume scores side by side show which case
a model is in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SignCheck", "align_signs", "check_signs"]


@dataclass(frozen=True)
class SignCheck:
    """mean_positive: per data modality, the mean cosine of true (text, item) pairs over
    the items that have it (NaN if none); flipped: the modalities whose mean is negative."""

    mean_positive: dict[str, float]
    flipped: list[str]


@torch.no_grad()
def check_signs(
    text: Tensor,
    items: Mapping[str, Tensor],
    text_to_item: Tensor,
    present: Tensor | None = None,
) -> SignCheck:
    """Mean true-pair cosine per data modality.

    Args:
        text: [Nt, d] text embeddings (one row per caption or per class prompt).
        items: data modality name -> [Ni, d] embeddings.
        text_to_item: [Nt] int64, the item each text belongs to.
        present: [Ni, len(items)] bool (columns in `items` order); None = all present.
    """
    t = F.normalize(text.float(), dim=-1)  # [Nt, d]
    means: dict[str, float] = {}
    for j, (name, emb) in enumerate(items.items()):
        pairs = F.normalize(emb.float(), dim=-1)[text_to_item]  # [Nt, d]
        cos = (t * pairs).sum(dim=-1)  # [Nt]
        if present is not None:
            cos = cos[present[text_to_item, j]]
        means[name] = float(cos.mean()) if cos.numel() else float("nan")
    return SignCheck(means, [n for n, m in means.items() if m < 0])


def align_signs(items: Mapping[str, Tensor], check: SignCheck) -> dict[str, Tensor]:
    """`items` with the embeddings of every flipped modality negated (others unchanged)."""
    return {n: -e if n in check.flipped else e for n, e in items.items()}

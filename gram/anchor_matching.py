"""Data-anchor matching (DAM): a small head that classifies (anchor, data) pairs.

The GRAM paper adds it to the contrastive loss with weight 0.1. The anchor
embedding (text) is a query that cross-attends over the data embeddings of
one sample (video, audio, ...; missing modalities masked out); a linear layer
reads match / no-match from the result. Hard negatives come from the volume
matrix: each anchor is paired with one other sample drawn from
softmax(-V[i] / t), each sample with one other anchor drawn from
softmax(-V[:, j] / t), so pairs that look alike are drawn most often.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gram.encoders import LN_EPS, Mlp, init_weights
from gram.volume import volume_matrix

__all__ = ["DamHead", "dam_loss", "sample_hard_negatives"]


class DamHead(nn.Module):
    """Cross-attention match scorer: anchor [B, D], data [B, m, D] -> logits [B].

    Args:
        dim: embedding size D.
        num_data: m, the number of data modalities (each gets a type embedding).
        heads: attention heads (must divide D).
    """

    def __init__(self, dim: int, num_data: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"DAM: embed_dim {dim} must be divisible by dam.heads {heads}")
        self.heads = heads
        self.type_embed = nn.Parameter(torch.zeros(num_data, dim))
        self.norm_q = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm_kv = nn.LayerNorm(dim, eps=LN_EPS)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, 2 * dim)
        self.norm_out = nn.LayerNorm(dim, eps=LN_EPS)
        self.out = nn.Linear(dim, 1)
        init_weights(self)
        nn.init.trunc_normal_(self.type_embed, std=0.02)

    def forward(self, anchor: Tensor, data: Tensor, present: Tensor | None = None) -> Tensor:
        """anchor [B, D]; data [B, m, D]; present [B, m] bool or None -> match logits [B]."""
        b, m, d = data.shape
        dh = d // self.heads
        x = anchor[:, None, :]  # [B, 1, D]
        q = self.q(self.norm_q(x)).view(b, 1, self.heads, dh).transpose(1, 2)  # [B, h, 1, dh]
        kv = self.kv(self.norm_kv(data + self.type_embed))  # [B, m, 2D]
        k, v = kv.view(b, m, 2, self.heads, dh).permute(2, 0, 3, 1, 4).unbind(0)  # [B, h, m, dh]
        keep = None
        if present is not None:
            # A sample with no data at all attends to everything (zeros) instead of NaN.
            keep = present | ~present.any(dim=1, keepdim=True)  # [B, m]
            keep = keep[:, None, None, :]  # [B, 1, 1, m]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # [B, h, 1, dh]
        x = x + self.proj(y.transpose(1, 2).reshape(b, 1, d))  # [B, 1, D]
        x = x + self.mlp(self.norm_mlp(x))
        logits: Tensor = self.out(self.norm_out(x)).view(b)  # [B]
        return logits


@torch.no_grad()
def sample_hard_negatives(
    volumes: Tensor, temperature: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """One hard negative per row and per column of a square volume matrix V [B, B].

    Returns (data index for each anchor [B], anchor index for each data sample [B]),
    never the diagonal; drawn from softmax(-V / temperature) without the diagonal.
    """
    b = volumes.shape[0]
    if b < 2 or volumes.shape != (b, b):
        raise ValueError(
            f"hard negatives need a square [B, B] matrix with B >= 2, got {volumes.shape}"
        )
    eye = torch.eye(b, dtype=torch.bool, device=volumes.device)
    logits = (-volumes.float() / temperature).masked_fill(eye, float("-inf"))  # [B, B]
    probs_a2d = torch.softmax(logits, dim=1)  # [B, B]
    probs_d2a = torch.softmax(logits, dim=0).t()  # [B, B]
    neg_data = torch.multinomial(probs_a2d, 1, generator=generator).squeeze(1)  # [B]
    neg_anchor = torch.multinomial(probs_d2a, 1, generator=generator).squeeze(1)  # [B]
    return neg_data, neg_anchor


def dam_loss(
    head: DamHead,
    anchor: Tensor,
    data: list[Tensor],
    present: Tensor | None,
    *,
    negative_temperature: float,
) -> Tensor:
    """Binary cross-entropy of the head over B positives and 2B hard negatives. -> scalar.

    anchor [B, D]; data m x [B, D]; present [B, m] bool (data modalities) or None.
    With B < 2 there are no negatives and the loss is 0 (still connected to the
    head's parameters, so DDP sees every parameter used).
    """
    b = anchor.shape[0]
    stacked = torch.stack(data, dim=1)  # [B, m, D]
    if b < 2:
        unused: Tensor = head(anchor, stacked, present)  # [B]
        return unused.sum() * 0.0
    with torch.no_grad():
        volumes = volume_matrix(anchor.detach(), *(x.detach() for x in data), mask=present)
    neg_data, neg_anchor = sample_hard_negatives(volumes, negative_temperature)
    idx = torch.arange(b, device=anchor.device)
    anchor_idx = torch.cat([idx, idx, neg_anchor])  # [3B]
    data_idx = torch.cat([idx, neg_data, idx])  # [3B]
    logits = head(
        anchor[anchor_idx], stacked[data_idx], None if present is None else present[data_idx]
    )  # [3B]
    labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).to(logits)  # [3B]
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())

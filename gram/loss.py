"""Contrastive losses over k modalities with global negatives across ranks.

`GramLoss` is the GRAM volume loss: text anchors pick their data by the
volume of (text, video, audio, ...) and data picks its text, both over the
global batch (all ranks, gathered with gradient). `CosineInfoNCELoss` is the
pairwise cosine baseline (anchor-to-each-modality, or all pairs) behind the
same call, so a comparison is one switch:

    loss = GramLoss(anchor="text")
    out = loss(text, video, audio, mask=mask)        # positional, anchor first
    out = loss(**model(batch))                       # named: {"text":..., "video":..., "mask":...}
    out["loss"].backward()

Every call returns a dict of named terms; `out["loss"]` is the total.

Scaling: each rank's loss is its share of the global-batch mean (sum of its
rows / global rows * world size), so once DDP averages gradients over ranks
the update equals that of one process holding the whole global batch, also
when ranks hold different numbers of rows.

A loss's own parameters (the temperature) are not inside the model's DDP
wrapper: call `gram.distributed.average_gradients(loss.parameters())` after
backward in multi-rank training.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gram.distributed import all_gather_no_grad, all_gather_with_grad, world_size
from gram.volume import volume_matrix

__all__ = ["CosineInfoNCELoss", "GramLoss", "build_loss"]

GatherFn = Callable[[Tensor], tuple[Tensor, int]]


class _Contrastive(nn.Module):
    """Temperature, input resolution and gathering shared by the losses."""

    def __init__(
        self,
        *,
        anchor: str,
        temperature: float,
        learn_temperature: bool,
        temperature_bounds: tuple[float, float],
        label_smoothing: float,
        gather_with_grad: bool,
    ) -> None:
        super().__init__()
        lo, hi = temperature_bounds
        if not 0 < lo <= temperature <= hi:
            raise ValueError(
                f"temperature {temperature} must lie in temperature_bounds [{lo}, {hi}] with lo > 0"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.anchor = anchor
        self.temperature_bounds = (float(lo), float(hi))
        self.label_smoothing = float(label_smoothing)
        self.log_temperature = nn.Parameter(
            torch.tensor(math.log(temperature)), requires_grad=learn_temperature
        )
        self._gather: GatherFn = all_gather_with_grad if gather_with_grad else all_gather_no_grad

    @property
    def temperature(self) -> Tensor:
        """Current temperature tau (scalar), clamped to `temperature_bounds`."""
        lo, hi = self.temperature_bounds
        return self.log_temperature.exp().clamp(lo, hi)

    def _resolve(
        self, embeddings: tuple[Tensor, ...], mask: Tensor | None, named: dict[str, Tensor]
    ) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """-> anchor [B, d], others k-1 x [B, d], data mask [B, k-1] bool or None."""
        if embeddings and named:
            raise TypeError("pass the embeddings either positionally or by name, not both")
        if named:
            if self.anchor not in named:
                raise KeyError(
                    f"the anchor modality {self.anchor!r} is missing; got {sorted(named)}"
                )
            names = list(named)
            order = [names.index(self.anchor)] + [
                i for i, n in enumerate(names) if n != self.anchor
            ]
            embeddings = tuple(named[names[i]] for i in order)
            if mask is not None and mask.dim() == 2 and mask.shape[1] == len(names):
                mask = mask[:, order]
        if len(embeddings) < 2:
            raise ValueError(
                f"need the anchor and at least one other modality, got {len(embeddings)}"
            )
        anchor, *others = embeddings
        k = len(embeddings)
        if mask is not None:
            if (
                mask.dim() != 2
                or mask.shape[0] != anchor.shape[0]
                or mask.shape[1] not in (k, k - 1)
            ):
                raise ValueError(
                    f"mask must be [B, k] = {(anchor.shape[0], k)} (anchor first) or "
                    f"[B, k-1] for the data side, got {tuple(mask.shape)}"
                )
            mask = mask.to(torch.bool)
            if mask.shape[1] == k:
                if not bool(mask[:, 0].all()):
                    raise ValueError("the anchor modality must be present in every sample")
                mask = mask[:, 1:]
        return anchor, others, mask

    def _gather_mask(self, mask: Tensor) -> Tensor:
        """Gather a bool mask [B, m] over ranks -> [N, m] (masks carry no gradient)."""
        gathered, _ = all_gather_no_grad(mask.to(torch.uint8))
        return gathered.to(torch.bool)

    def _ce(
        self,
        logits: Tensor,
        targets: Tensor,
        rows: Tensor | None = None,
        columns: Tensor | None = None,
    ) -> Tensor:
        """Summed cross-entropy with label smoothing over the valid candidates. -> scalar.

        logits [B, N]; targets [B]; rows [B] bool (rows to count); columns [N] bool
        (valid candidates; smoothing spreads over these only).
        """
        if columns is not None:
            logits = logits.masked_fill(~columns[None, :], float("-inf"))
        if rows is not None:
            logits = torch.where(rows[:, None], logits, torch.zeros_like(logits))
            targets = torch.where(rows, targets, torch.zeros_like(targets))
        logp = torch.log_softmax(logits, dim=1)  # [B, N]
        nll = -logp.gather(1, targets[:, None]).squeeze(1)  # [B]
        per_row = nll
        if self.label_smoothing > 0:
            if columns is None:
                uniform = -logp.mean(dim=1)
            else:
                n_cols = columns.sum().clamp_min(1)
                uniform = -logp.masked_fill(~columns[None, :], 0.0).sum(dim=1) / n_cols
            per_row = (1 - self.label_smoothing) * nll + self.label_smoothing * uniform
        if rows is not None:
            per_row = per_row * rows.to(per_row.dtype)
        return per_row.sum()


class GramLoss(_Contrastive):
    """GRAM volume contrastive loss, bidirectional, over the global batch.

    With V[i, j] = vol(t_i, v_j, a_j, ...) over the global batch:
        L_a2d = CE(-V / tau, diagonal)     each anchor picks its data
        L_d2a = CE(-V.T / tau, diagonal)   each data sample picks its anchor
        loss  = (L_a2d + L_d2a) / 2

    Args:
        anchor: name of the anchor modality when called with named embeddings.
        temperature: initial tau (learnable unless `learn_temperature=False`).
        temperature_bounds: tau is clamped to [lo, hi].
        label_smoothing: as in `F.cross_entropy` (the GRAM paper uses 0.1).
        gather_with_grad: gather other ranks' embeddings with gradient (correct);
            False keeps only the local rows differentiable (for comparison).
    """

    def __init__(
        self,
        *,
        anchor: str = "text",
        temperature: float = 0.07,
        learn_temperature: bool = True,
        temperature_bounds: tuple[float, float] = (0.01, 1.0),
        label_smoothing: float = 0.0,
        gather_with_grad: bool = True,
    ) -> None:
        super().__init__(
            anchor=anchor,
            temperature=temperature,
            learn_temperature=learn_temperature,
            temperature_bounds=temperature_bounds,
            label_smoothing=label_smoothing,
            gather_with_grad=gather_with_grad,
        )

    def forward(
        self, *embeddings: Tensor, mask: Tensor | None = None, **named: Tensor
    ) -> dict[str, Tensor]:
        """Embeddings [B, d] each (anchor first); mask [B, k] or [B, k-1] bool.

        Returns a dict: `loss`, `loss_anchor_to_data`, `loss_data_to_anchor`,
        `temperature`, `positive_volume`, `negative_volume` (the last three detached).
        """
        anchor, others, mask = self._resolve(embeddings, mask, named)
        b = anchor.shape[0]
        anchor_all, offset = self._gather(anchor)  # [N, d]
        others_all = [self._gather(o)[0] for o in others]  # (k-1) x [N, d]
        mask_all = None if mask is None else self._gather_mask(mask)  # [N, k-1]
        n = anchor_all.shape[0]
        targets = torch.arange(b, device=anchor.device) + offset  # [B]
        tau = self.temperature

        v_a2d = volume_matrix(anchor, *others_all, mask=mask_all)  # [B, N]
        if world_size() == 1:
            v_d2a = v_a2d.t()  # one process: the same matrix, read by columns
        else:
            v_d2a = volume_matrix(anchor_all, *others, mask=mask).t()  # [B, N]

        scale = world_size() / n
        loss_a2d = self._ce(-v_a2d / tau, targets) * scale
        loss_d2a = self._ce(-v_d2a / tau, targets) * scale
        with torch.no_grad():
            pos = v_a2d[torch.arange(b, device=anchor.device), targets]  # [B]
            neg_count = max(b * n - b, 1)
            neg = (v_a2d.sum() - pos.sum()) / neg_count
        return {
            "loss": (loss_a2d + loss_d2a) / 2,
            "loss_anchor_to_data": loss_a2d.detach(),
            "loss_data_to_anchor": loss_d2a.detach(),
            "temperature": tau.detach(),
            "positive_volume": pos.mean(),
            "negative_volume": neg,
        }


class CosineInfoNCELoss(_Contrastive):
    """Pairwise cosine InfoNCE (CLIP/ImageBind style), the baseline to GRAM.

    `pairs="anchor"` aligns the anchor with each other modality (text-video,
    text-audio: anchor-based models); `pairs="all"` aligns every pair. Each pair
    is a symmetric InfoNCE over the global batch; the total is their mean.
    Samples missing a modality are left out of that modality's pairs (as rows
    and as candidates), never dropped from the others.
    """

    def __init__(
        self,
        *,
        anchor: str = "text",
        pairs: Literal["anchor", "all"] = "anchor",
        temperature: float = 0.07,
        learn_temperature: bool = True,
        temperature_bounds: tuple[float, float] = (0.01, 1.0),
        label_smoothing: float = 0.0,
        gather_with_grad: bool = True,
    ) -> None:
        super().__init__(
            anchor=anchor,
            temperature=temperature,
            learn_temperature=learn_temperature,
            temperature_bounds=temperature_bounds,
            label_smoothing=label_smoothing,
            gather_with_grad=gather_with_grad,
        )
        if pairs not in ("anchor", "all"):
            raise ValueError(f"pairs must be 'anchor' or 'all', got {pairs!r}")
        self.pairs = pairs

    def forward(
        self, *embeddings: Tensor, mask: Tensor | None = None, **named: Tensor
    ) -> dict[str, Tensor]:
        """Embeddings [B, d] each (anchor first); mask [B, k] or [B, k-1] bool.

        Returns a dict: `loss`, `loss_<i>_<j>` per pair (modality positions,
        anchor = 0), `temperature`, `positive_cosine`, `negative_cosine`.
        """
        anchor, others, data_mask = self._resolve(embeddings, mask, named)
        feats = [
            F.normalize(e.float() if e.dtype != torch.float64 else e, dim=-1)
            for e in (anchor, *others)
        ]
        b = anchor.shape[0]
        present = torch.ones(b, len(feats), dtype=torch.bool, device=anchor.device)  # [B, k]
        if data_mask is not None:
            present[:, 1:] = data_mask
        gathered = [self._gather(f) for f in feats]
        offset = gathered[0][1]
        feats_all = [g[0] for g in gathered]  # k x [N, d]
        present_all = self._gather_mask(present)  # [N, k]
        targets = torch.arange(b, device=anchor.device) + offset
        tau = self.temperature
        ws = world_size()

        if self.pairs == "anchor":
            pair_list = [(0, j) for j in range(1, len(feats))]
        else:
            pair_list = list(itertools.combinations(range(len(feats)), 2))
        out: dict[str, Tensor] = {}
        total = anchor.new_zeros((), dtype=feats[0].dtype)
        pos_terms, neg_terms = [], []
        for i, j in pair_list:
            both = present[:, i] & present[:, j]  # [B]
            both_all = present_all[:, i] & present_all[:, j]  # [N]
            n_valid = max(int(both_all.sum()), 1)
            term = anchor.new_zeros((), dtype=feats[0].dtype)
            for p, q in ((i, j), (j, i)):
                logits = feats[p] @ feats_all[q].t() / tau  # [B, N]
                term = term + self._ce(logits, targets, rows=both, columns=both_all) * ws / n_valid
            term = term / 2
            out[f"loss_{i}_{j}"] = term.detach()
            total = total + term
            with torch.no_grad():
                cos = feats[i] @ feats_all[j].t()  # [B, N]
                diag = cos[torch.arange(b, device=cos.device), targets]
                pos_terms.append(diag[both].mean() if bool(both.any()) else diag.new_zeros(()))
                neg_terms.append((cos.sum() - diag.sum()) / max(cos.numel() - b, 1))
        out["loss"] = total / len(pair_list)
        out["temperature"] = tau.detach()
        out["positive_cosine"] = torch.stack(pos_terms).mean()
        out["negative_cosine"] = torch.stack(neg_terms).mean()
        return out


def build_loss(
    kind: Literal["gram", "cosine_anchor", "cosine_all"], **kwargs: float | bool | str
) -> _Contrastive:
    """The loss named `kind`: `gram`, `cosine_anchor` (text-to-each) or `cosine_all` (all pairs)."""
    if kind == "gram":
        return GramLoss(**kwargs)  # type: ignore[arg-type]
    if kind == "cosine_anchor":
        return CosineInfoNCELoss(pairs="anchor", **kwargs)  # type: ignore[arg-type]
    if kind == "cosine_all":
        return CosineInfoNCELoss(pairs="all", **kwargs)  # type: ignore[arg-type]
    raise ValueError(f"unknown loss {kind!r}: use 'gram', 'cosine_anchor' or 'cosine_all'")

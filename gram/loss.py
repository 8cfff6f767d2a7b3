"""Contrastive losses over k modalities with global negatives across ranks.

`GramLoss` is the GRAM volume loss: text anchors pick their data by the
volume of (text, video, audio, ...) and data picks its text, both over the
global batch (all ranks, gathered with gradient). `CosineInfoNCELoss` is the
pairwise cosine baseline (anchor-to-each-modality, or all pairs).
`GramCosineLoss` adds a weighted text-anchored cosine term to GRAM, and
`CurriculumLoss` trains with one loss for a number of steps, then another.
Every loss takes the model's output as it is, embeddings by modality name
(the anchor among them) and an optional mask [B, k] in the same order:

    loss = GramLoss(anchor="text")
    out = loss(**model(batch))                 # {"text": [B, d], "video": ..., "mask": [B, k]}
    out = loss(text=t, video=v, audio=a)       # the same by hand; mask=None: all present
    out["loss"].backward()

Every call returns a dict of named terms; `out["loss"]` is the total.

Scaling: each rank's loss is its share of the global-batch mean (sum of its
rows / global rows * world size), so once DDP averages gradients over ranks
the update equals that of one process holding the whole global batch, also
when ranks hold different numbers of rows.

A loss's own parameters (the temperatures) are not inside the model's DDP
wrapper: call `gram.distributed.average_gradients(loss.parameters())` after
backward in multi-rank training (`gram.steps.train_step` does).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Literal, TypedDict, Unpack

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gram.distributed import all_gather_no_grad, all_gather_with_grad, world_size
from gram.volume import volume_matrix

__all__ = [
    "ContrastiveOptions",
    "CosineInfoNCELoss",
    "CurriculumLoss",
    "GramCosineLoss",
    "GramLoss",
    "LossKind",
    "build_loss",
]

LossKind = Literal["gram", "cosine_anchor", "cosine_all"]
GatherFn = Callable[[Tensor], tuple[Tensor, int]]


class ContrastiveOptions(TypedDict, total=False):
    """What every contrastive loss takes (see `_Contrastive`)."""

    anchor: str
    temperature: float
    learn_temperature: bool
    temperature_bounds: tuple[float, float]
    label_smoothing: float
    gather_with_grad: bool


class _Contrastive(nn.Module):
    """The temperature, the inputs and the gathering every contrastive loss shares.

    Args:
        anchor: name of the anchor modality (text).
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

    def _inputs(
        self, embeddings: dict[str, Tensor], mask: Tensor | None
    ) -> tuple[list[Tensor], Tensor | None]:
        """Embeddings by name -> ([anchor, *others] each [B, d], data mask [B, k-1] bool or None).

        `mask` is [B, k] bool in the order of `embeddings` (the model's output order)."""
        if self.anchor not in embeddings:
            raise KeyError(
                f"the anchor modality {self.anchor!r} is missing; got {sorted(embeddings)}"
            )
        names = list(embeddings)
        if len(names) < 2:
            raise ValueError(f"need the anchor and at least one other modality, got {names}")
        order = [names.index(self.anchor)] + [i for i, n in enumerate(names) if n != self.anchor]
        feats = [embeddings[names[i]] for i in order]
        if mask is None:
            return feats, None
        b, k = feats[0].shape[0], len(names)
        if mask.dim() != 2 or mask.shape != (b, k):
            raise ValueError(
                f"mask must be [B, k] = {(b, k)} in the order of the embeddings "
                f"({', '.join(names)}), got {tuple(mask.shape)}"
            )
        mask = mask.to(torch.bool)[:, order]
        if not bool(mask[:, 0].all()):
            raise ValueError("the anchor modality must be present in every sample")
        return feats, mask[:, 1:]

    def _cross_entropy(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Summed cross-entropy with label smoothing. logits [B, N], targets [B] -> scalar."""
        return F.cross_entropy(
            logits, targets, label_smoothing=self.label_smoothing, reduction="sum"
        )


def _gather_mask(mask: Tensor) -> Tensor:
    """Gather a bool mask [B, m] over ranks -> [N, m] (masks carry no gradient)."""
    gathered, _ = all_gather_no_grad(mask.to(torch.uint8))
    return gathered.to(torch.bool)


def _masked_cross_entropy(
    logits: Tensor, targets: Tensor, rows: Tensor, columns: Tensor, smoothing: float
) -> Tensor:
    """Summed cross-entropy over the valid rows, against the valid candidates only. -> scalar.

    logits [B, N]; targets [B]; rows [B] bool (rows to count); columns [N] bool (valid
    candidates; label smoothing spreads over these only, so `F.cross_entropy` cannot).
    """
    logits = logits.masked_fill(~columns[None, :], float("-inf"))
    logits = torch.where(rows[:, None], logits, torch.zeros_like(logits))
    targets = torch.where(rows, targets, torch.zeros_like(targets))
    logp = torch.log_softmax(logits, dim=1)  # [B, N]
    per_row = -logp.gather(1, targets[:, None]).squeeze(1)  # [B]
    if smoothing > 0:
        uniform = -logp.masked_fill(~columns[None, :], 0.0).sum(dim=1) / columns.sum().clamp_min(1)
        per_row = (1 - smoothing) * per_row + smoothing * uniform
    return (per_row * rows.to(per_row.dtype)).sum()


class GramLoss(_Contrastive):
    """GRAM volume contrastive loss, bidirectional, over the global batch.

    With V[i, j] = vol(t_i, v_j, a_j, ...) over the global batch:
        L_a2d = CE(-V / tau, diagonal)     each anchor picks its data
        L_d2a = CE(-V.T / tau, diagonal)   each data sample picks its anchor
        loss  = (L_a2d + L_d2a) / 2

    A missing modality (mask False) is left out of that sample's volume exactly.
    Options: see `_Contrastive`.
    """

    def forward(self, mask: Tensor | None = None, **embeddings: Tensor) -> dict[str, Tensor]:
        """Embeddings [B, d] by name; mask [B, k] bool in their order.

        Returns `loss`, `loss_anchor_to_data`, `loss_data_to_anchor`, `temperature`,
        `positive_volume`, `negative_volume` (all but `loss` detached).
        """
        (anchor, *others), data_mask = self._inputs(embeddings, mask)
        b = anchor.shape[0]
        anchor_all, offset = self._gather(anchor)  # [N, d]
        others_all = [self._gather(o)[0] for o in others]  # (k-1) x [N, d]
        mask_all = None if data_mask is None else _gather_mask(data_mask)  # [N, k-1]
        targets = torch.arange(b, device=anchor.device) + offset  # [B]
        tau = self.temperature

        v_a2d = volume_matrix(anchor, *others_all, mask=mask_all)  # [B, N]
        if world_size() == 1:
            v_d2a = v_a2d.t()  # one process: the same matrix, read by columns
        else:
            v_d2a = volume_matrix(anchor_all, *others, mask=data_mask).t()  # [B, N]

        scale = world_size() / anchor_all.shape[0]
        loss_a2d = self._cross_entropy(-v_a2d / tau, targets) * scale
        loss_d2a = self._cross_entropy(-v_d2a / tau, targets) * scale
        with torch.no_grad():
            pos = v_a2d[torch.arange(b, device=anchor.device), targets]  # [B]
            neg = (v_a2d.sum() - pos.sum()) / max(v_a2d.numel() - b, 1)
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
    and as candidates), never dropped from the others. Other options: see
    `_Contrastive`.
    """

    def __init__(
        self, *, pairs: Literal["anchor", "all"] = "anchor", **options: Unpack[ContrastiveOptions]
    ) -> None:
        super().__init__(**options)
        if pairs not in ("anchor", "all"):
            raise ValueError(f"pairs must be 'anchor' or 'all', got {pairs!r}")
        self.pairs = pairs

    def _pair(self, logits: Tensor, targets: Tensor, rows: Tensor, columns: Tensor) -> Tensor:
        """One direction of one pair, summed over its valid rows. logits [B, N] -> scalar."""
        if bool(columns.all()):  # nobody misses either modality: the plain cross-entropy
            return self._cross_entropy(logits, targets)
        return _masked_cross_entropy(logits, targets, rows, columns, self.label_smoothing)

    def forward(self, mask: Tensor | None = None, **embeddings: Tensor) -> dict[str, Tensor]:
        """Embeddings [B, d] by name; mask [B, k] bool in their order.

        Returns `loss`, `loss_<i>_<j>` per pair (positions with the anchor first,
        anchor = 0), `temperature`, `positive_cosine`, `negative_cosine`.
        """
        raw, data_mask = self._inputs(embeddings, mask)
        feats = [F.normalize(e if e.dtype == torch.float64 else e.float(), dim=-1) for e in raw]
        b, k = feats[0].shape[0], len(feats)
        present = torch.ones(b, k, dtype=torch.bool, device=feats[0].device)  # [B, k]
        if data_mask is not None:
            present[:, 1:] = data_mask
        gathered = [self._gather(f) for f in feats]
        feats_all = [g[0] for g in gathered]  # k x [N, d]
        present_all = _gather_mask(present)  # [N, k]
        targets = torch.arange(b, device=feats[0].device) + gathered[0][1]  # [B]
        tau = self.temperature
        pairs = (
            [(0, j) for j in range(1, k)]
            if self.pairs == "anchor"
            else list(itertools.combinations(range(k), 2))
        )
        out: dict[str, Tensor] = {}
        total = feats[0].new_zeros(())
        positives, negatives = [], []
        for i, j in pairs:
            rows = present[:, i] & present[:, j]  # [B]
            columns = present_all[:, i] & present_all[:, j]  # [N]
            scale = world_size() / max(int(columns.sum()), 1)
            i2j = self._pair(feats[i] @ feats_all[j].t() / tau, targets, rows, columns)
            j2i = self._pair(feats[j] @ feats_all[i].t() / tau, targets, rows, columns)
            term = (i2j + j2i) * scale / 2
            out[f"loss_{i}_{j}"] = term.detach()
            total = total + term
            with torch.no_grad():
                cos = feats[i] @ feats_all[j].t()  # [B, N]
                diag = cos[torch.arange(b, device=cos.device), targets]  # [B]
                positives.append(diag[rows].mean() if bool(rows.any()) else diag.new_zeros(()))
                negatives.append((cos.sum() - diag.sum()) / max(cos.numel() - b, 1))
        out["loss"] = total / len(pairs)
        out["temperature"] = tau.detach()
        out["positive_cosine"] = torch.stack(positives).mean()
        out["negative_cosine"] = torch.stack(negatives).mean()
        return out


class GramCosineLoss(nn.Module):
    """GRAM plus `cosine_weight` x text-anchored pairwise cosine, each with its own temperature.

        loss = L_gram + cosine_weight * L_cos(t-v, t-a, ...)

    The volume cannot tell an embedding from its negative (vol(t, v, a) = vol(t, -v, a)),
    so GRAM alone leaves the sign of every data embedding free; the cosine term
    rewards cos(t, v) > 0 for true pairs and fixes it. Returns GRAM's terms as
    `GramLoss` names them (`temperature` is GRAM's), plus `loss_gram`, `loss_cosine`,
    `cosine_temperature`, `positive_cosine` and `negative_cosine`. The two terms
    gather the embeddings separately. Other options: see `_Contrastive`.
    """

    def __init__(self, *, cosine_weight: float, **options: Unpack[ContrastiveOptions]) -> None:
        super().__init__()
        if not cosine_weight > 0:
            raise ValueError(f"cosine_weight must be > 0, got {cosine_weight} (0: use GramLoss)")
        self.cosine_weight = float(cosine_weight)
        self.gram = GramLoss(**options)
        self.cosine = CosineInfoNCELoss(pairs="anchor", **options)

    @property
    def anchor(self) -> str:
        return self.gram.anchor

    def forward(self, mask: Tensor | None = None, **embeddings: Tensor) -> dict[str, Tensor]:
        """Embeddings [B, d] by name; mask [B, k] bool in their order."""
        gram = self.gram(mask=mask, **embeddings)
        cosine = self.cosine(mask=mask, **embeddings)
        return {
            **gram,
            "loss": gram["loss"] + self.cosine_weight * cosine["loss"],
            "loss_gram": gram["loss"].detach(),
            "loss_cosine": cosine["loss"].detach(),
            "cosine_temperature": cosine["temperature"],
            "positive_cosine": cosine["positive_cosine"],
            "negative_cosine": cosine["negative_cosine"],
        }


class CurriculumLoss(nn.Module):
    """`warmup` for the first `warmup_steps` optimizer steps, then `main`.

    E.g. text-anchored cosine, then GRAM: the two-stage regime of the GRAM paper
    (a cosine-trained model fine-tuned with the volume) in one run. Tell it the
    step before each optimizer step with `set_step`; the step is part of the
    state dict, so a resumed run continues in the right stage. Returns the
    active loss's terms plus `loss_stage` (0 during the warm-up, 1 after).
    """

    step: Tensor

    def __init__(self, warmup: nn.Module, main: nn.Module, *, warmup_steps: int) -> None:
        super().__init__()
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}")
        self.warmup = warmup
        self.main = main
        self.warmup_steps = warmup_steps
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def set_step(self, step: int) -> None:
        """The number of optimizer steps done so far (0 before the first)."""
        self.step.fill_(step)

    @property
    def anchor(self) -> str:
        return str(self.main.anchor)

    def forward(self, mask: Tensor | None = None, **embeddings: Tensor) -> dict[str, Tensor]:
        """Embeddings [B, d] by name; mask [B, k] bool in their order."""
        stage = int(self.step) >= self.warmup_steps
        out: dict[str, Tensor] = (self.main if stage else self.warmup)(mask=mask, **embeddings)
        return {**out, "loss_stage": torch.tensor(float(stage))}


def build_loss(
    kind: LossKind,
    *,
    cosine_weight: float = 0.0,
    warmup_kind: LossKind | None = None,
    warmup_steps: int = 0,
    **options: Unpack[ContrastiveOptions],
) -> nn.Module:
    """The loss named `kind`: `gram`, `cosine_anchor` (text-to-each) or `cosine_all` (all pairs).

    `cosine_weight > 0` adds that times the text-anchored cosine term to `gram`
    (`GramCosineLoss`); `warmup_kind` trains with that loss for the first
    `warmup_steps` steps (`CurriculumLoss`). `options` go to every part.
    """
    main: nn.Module
    if kind == "gram":
        main = (
            GramCosineLoss(cosine_weight=cosine_weight, **options)
            if cosine_weight
            else GramLoss(**options)
        )
    elif kind in ("cosine_anchor", "cosine_all"):
        if cosine_weight:
            raise ValueError(f"cosine_weight adds a cosine term to 'gram'; {kind!r} is one already")
        main = CosineInfoNCELoss(pairs="anchor" if kind == "cosine_anchor" else "all", **options)
    else:
        raise ValueError(f"unknown loss {kind!r}: use 'gram', 'cosine_anchor' or 'cosine_all'")
    if warmup_kind is None:
        return main
    return CurriculumLoss(build_loss(warmup_kind, **options), main, warmup_steps=warmup_steps)

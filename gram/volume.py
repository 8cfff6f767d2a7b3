"""The Gramian volume of k embeddings and the anchor-vs-data volume matrix.

For unit vectors v_1..v_k with Gram matrix G[i, j] = <v_i, v_j>, the volume of
the parallelotope they span is sqrt(det G): 0 when they coincide, 1 when they
are orthonormal, sin(angle) for k = 2.

`volume_matrix` scores every anchor (text) against every data sample (video,
audio, ...) without building a [Na, Nb, k, d] tensor. Writing the Gram matrix
of (anchor a_i, data o_1[j], ..., o_{k-1}[j]) in blocks

    G_ij = [[alpha_i, c_ij^T],
            [c_ij,    D_j   ]]

with alpha_i = <a_i, a_i>, c_ij[m] = <a_i, o_m[j]> and D_j the (k-1)x(k-1)
Gram block of sample j, the Schur complement in adjugate form gives

    det G_ij = alpha_i * det(D_j) - c_ij^T adj(D_j) c_ij

which holds for singular D_j too (e.g. video and audio embeddings that
coincide), so no inverse is ever taken. Only k-1 matmuls [Na, d] x [d, Nb]
touch d; everything else is elementwise on [Na, Nb] or tiny per sample.

Numerics: det is clamped to `DET_FLOOR` before the square root, so values and
gradients stay finite for coincident or collinear vectors; the determinant is
always formed in at least float32, also under bfloat16 autocast.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor

__all__ = ["DET_FLOOR", "gram_determinant", "volume", "volume_matrix"]

DET_FLOOR = 1e-8
"""Smallest determinant passed to sqrt: volumes below 1e-4 read as 1e-4, and
the gradient there is zero instead of infinite (what sqrt(abs(det)) gives)."""

_NORM_EPS = 1e-12


def _check_embeddings(embeddings: tuple[Tensor, ...], name: str, min_count: int) -> None:
    if len(embeddings) < min_count:
        raise ValueError(f"{name} needs at least {min_count} embeddings, got {len(embeddings)}")
    first = embeddings[0]
    for i, e in enumerate(embeddings):
        if e.dim() != 2:
            raise ValueError(f"{name}: embedding {i} must be [B, d], got shape {tuple(e.shape)}")
        if e.shape != first.shape:
            raise ValueError(
                f"{name}: all embeddings must have the same shape [B, d]; "
                f"embedding 0 is {tuple(first.shape)}, embedding {i} is {tuple(e.shape)}"
            )


class _UnitNormalize(torch.autograd.Function):
    """y = x / max(|x|, eps) along the last dim, with a 3-pass backward.

    grad_x = (g - y <g, y>) / |x|: the component of g tangent to the sphere.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        inv = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(_NORM_EPS).reciprocal_()
        y: Tensor = x * inv  # [B, d]
        ctx.save_for_backward(y, inv)
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        y, inv = ctx.saved_tensors
        dot = torch.linalg.vecdot(g, y, dim=-1).unsqueeze(-1)  # [B, 1]
        return torch.addcmul(g, y, dot, value=-1.0).mul_(inv)


def _normalize(x: Tensor) -> Tensor:
    """L2-normalise rows of x [B, d] in float32 (float64 stays float64)."""
    y: Tensor = _UnitNormalize.apply(x.to(_compute_dtype(x)))  # type: ignore[no-untyped-call]
    return y


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; anything narrower (bf16, fp16, fp32) is lifted to float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _apply_mask(gram: Tensor, mask: Tensor | None) -> Tensor:
    """Replace the rows/columns of missing modalities by the identity's.

    gram: [B, k, k]; mask: [B, k] bool, True = present. Returns [B, k, k].
    """
    if mask is None:
        return gram
    k = gram.shape[-1]
    if mask.shape != (*gram.shape[:1], k):
        raise ValueError(f"mask must be [B, k] = {(gram.shape[0], k)}, got {tuple(mask.shape)}")
    m = mask.to(torch.bool)
    keep = (m[:, :, None] & m[:, None, :]).to(gram.dtype)  # [B, k, k]
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    missing_diag = (~m).to(gram.dtype)[:, :, None] * eye  # [B, k, k]
    return gram * keep + missing_diag


def gram_determinant(gram: Tensor) -> Tensor:
    """det of a batch of symmetric Gram matrices [B, k, k] -> [B].

    Closed forms for k <= 3 (polynomials: finite gradient everywhere); LU for
    larger k, whose backward PyTorch handles for singular matrices too.
    """
    k = gram.shape[-1]
    if k == 1:
        return gram[:, 0, 0]
    if k == 2:
        return gram[:, 0, 0] * gram[:, 1, 1] - gram[:, 0, 1] * gram[:, 1, 0]
    if k == 3:
        g = gram
        return (
            g[:, 0, 0] * (g[:, 1, 1] * g[:, 2, 2] - g[:, 1, 2] * g[:, 2, 1])
            - g[:, 0, 1] * (g[:, 1, 0] * g[:, 2, 2] - g[:, 1, 2] * g[:, 2, 0])
            + g[:, 0, 2] * (g[:, 1, 0] * g[:, 2, 1] - g[:, 1, 1] * g[:, 2, 0])
        )
    det: Tensor = torch.linalg.det(gram)
    return det


def _adjugate(gram: Tensor) -> Tensor:
    """Adjugate of symmetric matrices [B, n, n] -> [B, n, n], finite when singular.

    adj(D)[m, n] = (-1)^(m+n) * det(D without row n and column m).
    """
    n = gram.shape[-1]
    if n == 1:
        return torch.ones_like(gram)
    if n == 2:
        a, b, c, d = gram[:, 0, 0], gram[:, 0, 1], gram[:, 1, 0], gram[:, 1, 1]
        return torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2)
    idx = list(range(n))
    rows = []
    for m in range(n):
        row = []
        for col in range(n):
            keep_r = [i for i in idx if i != col]
            keep_c = [i for i in idx if i != m]
            minor = gram[:, keep_r][:, :, keep_c]  # [B, n-1, n-1]
            row.append((-1) ** (m + col) * gram_determinant(minor))
        rows.append(torch.stack(row, -1))
    return torch.stack(rows, -2)


def volume(*embeddings: Tensor, mask: Tensor | None = None, normalize: bool = True) -> Tensor:
    """Per-sample volume of the parallelotope spanned by k >= 2 embeddings.

    Args:
        embeddings: k tensors, each [B, d] (d >= k for a non-degenerate volume).
        mask: optional [B, k] bool, True where the modality is present. A missing
            modality contributes the identity row/column, so the result is exactly
            the volume of the remaining vectors (1 when only one vector is left).
        normalize: L2-normalise each embedding first (the GRAM setting).

    Returns:
        [B] volumes in [0, 1] for unit vectors (float32, or float64 for float64 input).
    """
    _check_embeddings(embeddings, "volume", 2)
    dtype = _compute_dtype(embeddings[0])
    with torch.autocast(device_type=embeddings[0].device.type, enabled=False):
        stacked = torch.stack([e.to(dtype) for e in embeddings], dim=1)  # [B, k, d]
        if normalize:
            stacked = _normalize(stacked.flatten(0, 1)).view_as(stacked)
        gram = stacked @ stacked.transpose(1, 2)  # [B, k, k]
        gram = _apply_mask(gram, mask)
        det = gram_determinant(gram)  # [B]
        return det.clamp_min(DET_FLOOR).sqrt()


class _SchurVolume(torch.autograd.Function):
    """vol[i, j] = sqrt(max(alpha_i det_j - sum_mn C_m[i,j] A_j[m,n] C_n[i,j], floor)).

    Fused forward/backward over the [Na, Nb] planes so autograd keeps only the
    k-1 dot-product planes and the output, not every intermediate.
    """

    @staticmethod
    def forward(
        ctx: Any,
        alpha: Tensor,  # [Na]
        det_d: Tensor,  # [Nb]
        adj: Tensor,  # [Nb, n, n], n = k - 1
        *planes: Tensor,  # n x [Na, Nb]
    ) -> Tensor:
        n = len(planes)
        det = torch.outer(alpha, det_d)  # [Na, Nb]
        for m in range(n):
            det.addcmul_(planes[m] * adj[:, m, m], planes[m], value=-1.0)
        for m, q in itertools.combinations(range(n), 2):
            det.addcmul_(planes[m] * (2.0 * adj[:, m, q]), planes[q], value=-1.0)
        clamped = det < DET_FLOOR
        vol = det.clamp_min_(DET_FLOOR).sqrt_()
        ctx.save_for_backward(alpha, det_d, adj, vol, clamped, *planes)
        return vol

    @staticmethod
    def backward(ctx: Any, grad_vol: Tensor) -> tuple[Tensor | None, ...]:
        alpha, det_d, adj, vol, clamped, *planes = ctx.saved_tensors
        n = len(planes)
        # d vol / d det = 1 / (2 vol), and 0 where the floor was active.
        g = (grad_vol * 0.5 / vol).masked_fill_(clamped, 0.0)  # [Na, Nb]
        gp = [g * c for c in planes]  # n x [Na, Nb]
        grad_alpha = g @ det_d  # [Na]
        grad_det_d = alpha @ g  # [Nb]
        # The forward reads adj[m, m] and, for m < q, adj[m, q] (twice); never adj[q, m].
        grad_adj = torch.zeros_like(adj)  # [Nb, n, n]
        for m in range(n):
            grad_adj[:, m, m] = -(gp[m] * planes[m]).sum(0)
        for m, q in itertools.combinations(range(n), 2):
            grad_adj[:, m, q] = -2.0 * (gp[m] * planes[q]).sum(0)
        grad_planes = []
        for m in range(n):
            acc = torch.zeros_like(g)  # [Na, Nb]
            for q in range(n):
                coef = adj[:, min(m, q), max(m, q)]  # [Nb], the entry the forward read
                acc.addcmul_(gp[q], coef, value=-2.0)
            grad_planes.append(acc)
        return (grad_alpha, grad_det_d, grad_adj, *grad_planes)


class _UnitVolume2(torch.autograd.Function):
    """k = 2 with unit vectors: vol = sqrt(max(1 - c^2, floor)); c: [Na, Nb] cosines."""

    @staticmethod
    def forward(ctx: Any, c: Tensor) -> Tensor:
        vol = torch.mul(c, c).neg_().add_(1.0).clamp_min_(DET_FLOOR).sqrt_()  # [Na, Nb]
        ctx.save_for_backward(c, vol)
        return vol

    @staticmethod
    def backward(ctx: Any, grad_vol: Tensor) -> Tensor:
        c, vol = ctx.saved_tensors
        h = _grad_over_vol(grad_vol, vol)  # [Na, Nb], d vol/d det = h / 2
        return h.mul_(c).neg_()  # d det/d c = -2c


class _UnitVolume3(torch.autograd.Function):
    """k = 3 with unit vectors, the closed form of det G for the anchor a and data (x, y):

        det = 1 - r^2 - c1^2 - c2^2 + 2 r c1 c2,  c1 = <a, x>, c2 = <a, y>, r = <x, y>

    c1, c2: [Na, Nb]; r: [Nb]. About 20 elementwise passes over [Na, Nb] in all.
    """

    @staticmethod
    def forward(ctx: Any, c1: Tensor, c2: Tensor, r: Tensor) -> Tensor:
        det = torch.mul(c2, 2.0 * r).mul_(c1)  # [Na, Nb] 2 r c1 c2
        det.addcmul_(c1, c1, value=-1.0).addcmul_(c2, c2, value=-1.0).add_(1.0 - r * r)
        vol = det.clamp_min_(DET_FLOOR).sqrt_()
        ctx.save_for_backward(c1, c2, r, vol)
        return vol

    @staticmethod
    def backward(ctx: Any, grad_vol: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c1, c2, r, vol = ctx.saved_tensors
        h = _grad_over_vol(grad_vol, vol)  # [Na, Nb]
        # d det/d c1 = 2 (r c2 - c1), d det/d c2 = 2 (r c1 - c2), d det/d r = 2 (c1 c2 - r).
        buf = torch.mul(h, c1)  # [Na, Nb], reused below for grad_c2
        grad_r = buf.mul_(c2).sum(0) - r * h.sum(0)  # [Nb]
        h.neg_()
        grad_c1 = torch.addcmul(c1, c2, r, value=-1.0).mul_(h)  # (c1 - r c2) * -h
        grad_c2 = torch.addcmul(c2, c1, r, value=-1.0, out=buf).mul_(h)
        return grad_c1, grad_c2, grad_r


def _grad_over_vol(grad_vol: Tensor, vol: Tensor) -> Tensor:
    """grad / vol, zero where the determinant floor was active. [Na, Nb].

    Since d vol / d det = 1 / (2 vol), this is twice the gradient w.r.t. det.
    """
    h = torch.div(grad_vol, vol)
    return h.masked_fill_(vol <= _VOL_FLOOR, 0.0)


_VOL_FLOOR = DET_FLOOR**0.5


def volume_matrix(
    anchor: Tensor, *others: Tensor, mask: Tensor | None = None, normalize: bool = True
) -> Tensor:
    """Volume of (anchor_i, others_1[j], ..., others_{k-1}[j]) for every pair (i, j).

    Args:
        anchor: [Na, d], e.g. text embeddings.
        others: k-1 >= 1 tensors, each [Nb, d], e.g. video and audio of Nb samples.
        mask: optional [Nb, k-1] bool, True where that data modality is present;
            a missing one is left out of the volume exactly (identity row/column).
        normalize: L2-normalise all embeddings first (the GRAM setting).

    Returns:
        [Na, Nb] volumes (float32, or float64 for float64 inputs); lower = more aligned.
        Row i, column j equals `volume(anchor[i], *[o[j] for o in others])`.
    """
    if not others:
        raise ValueError("volume_matrix needs the anchor and at least one other modality")
    if anchor.dim() != 2:
        raise ValueError(f"volume_matrix: anchor must be [Na, d], got {tuple(anchor.shape)}")
    _check_embeddings(others, "volume_matrix (others)", 1)
    if others[0].shape[1] != anchor.shape[1]:
        raise ValueError(
            f"volume_matrix: anchor dim {anchor.shape[1]} != others dim {others[0].shape[1]}"
        )
    n = len(others)
    if mask is not None and mask.shape != (others[0].shape[0], n):
        raise ValueError(
            f"volume_matrix: mask must be [Nb, k-1] = {(others[0].shape[0], n)}, "
            f"got {tuple(mask.shape)}"
        )
    dtype = _compute_dtype(anchor)
    if normalize:
        anchor = _normalize(anchor)
        others = tuple(_normalize(o) for o in others)
    # The k-1 [Na, Nb] dot-product planes: the only O(Na * Nb * d) work. Under autocast
    # these matmuls run in the low-precision dtype; the determinant below does not.
    planes = [(anchor @ o.transpose(0, 1)).to(dtype) for o in others]  # n x [Na, Nb]
    with torch.autocast(device_type=anchor.device.type, enabled=False):
        present = None if mask is None else mask.to(dtype)  # [Nb, n]
        if present is not None:
            planes = [p * present[:, m] for m, p in enumerate(planes)]
        vol: Tensor
        if normalize and n == 1:
            vol = _UnitVolume2.apply(planes[0])  # type: ignore[no-untyped-call]
        elif normalize and n == 2:
            r = (others[0].to(dtype) * others[1].to(dtype)).sum(-1)  # [Nb]
            if present is not None:
                r = r * present[:, 0] * present[:, 1]
            vol = _UnitVolume3.apply(planes[0], planes[1], r)  # type: ignore[no-untyped-call]
        else:
            a32 = anchor.to(dtype)
            o32 = torch.stack([o.to(dtype) for o in others], dim=1)  # [Nb, n, d]
            alpha = (a32 * a32).sum(-1)  # [Na]
            data_gram = _apply_mask(o32 @ o32.transpose(1, 2), mask)  # [Nb, n, n]
            det_d = gram_determinant(data_gram)  # [Nb]
            adj = _adjugate(data_gram)  # [Nb, n, n]
            vol = _SchurVolume.apply(alpha, det_d, adj, *planes)  # type: ignore[no-untyped-call]
        return vol

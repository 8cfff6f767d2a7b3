"""Cross-rank gathers for global negatives, with and without gradient.

`all_gather_with_grad` is autograd-aware: the forward concatenates every rank's
rows, the backward sums each rank's gradient for a slice over all ranks
(reduce-scatter) and hands every rank the gradient of its own rows. With it,
an N-rank step computes the same parameter gradient as one process that sees
the whole global batch (after DDP averages gradients).

Ranks may hold different numbers of rows (e.g. the last batch of an epoch):
row counts are exchanged first and rows padded to the largest count.
All functions are no-ops when torch.distributed is not initialised.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_gather_no_grad",
    "all_gather_sizes",
    "all_gather_with_grad",
    "average_gradients",
    "is_distributed",
    "rank",
    "world_size",
]


def is_distributed() -> bool:
    """True when a torch.distributed process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of ranks (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def all_gather_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's value of `n` (e.g. its local batch size), in rank order."""
    if not is_distributed():
        return [n]
    local = torch.tensor([n], dtype=torch.int64, device=device)
    out = torch.empty(world_size(), dtype=torch.int64, device=device)
    dist.all_gather_single(out, local)
    return [int(v) for v in out.tolist()]


def _gather_padded(x: Tensor, sizes: list[int]) -> Tensor:
    """all-gather `x` [n_r, ...] from every rank -> [sum(sizes), ...] (no autograd)."""
    longest = max(sizes)
    padded = x
    if x.shape[0] < longest:
        padded = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    out = x.new_empty((len(sizes) * longest, *x.shape[1:]))
    dist.all_gather_single(out, padded.contiguous())
    if all(s == longest for s in sizes):
        return out
    return torch.cat([out[r * longest : r * longest + s] for r, s in enumerate(sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: list[int]) -> Tensor:
        ctx.sizes = sizes
        return _gather_padded(x, sizes)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        sizes: list[int] = ctx.sizes
        longest = max(sizes)
        me = dist.get_rank()
        chunks = torch.split(grad, sizes)
        padded = torch.cat(
            [
                torch.cat([c, c.new_zeros((longest - c.shape[0], *c.shape[1:]))])
                if c.shape[0] < longest
                else c
                for c in chunks
            ]
        )
        out = grad.new_empty((longest, *grad.shape[1:]))
        dist.reduce_scatter_single(out, padded.contiguous(), op=dist.ReduceOp.SUM)
        return out[: sizes[me]], None


def all_gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """Concatenate `x` [n_r, ...] over ranks, differentiably.

    Returns:
        (gathered [sum_r n_r, ...], offset): the rows of this rank start at `offset`.
    """
    if not is_distributed():
        return x, 0
    sizes = all_gather_sizes(x.shape[0], x.device)
    gathered: Tensor = _AllGatherWithGrad.apply(x, sizes)  # type: ignore[no-untyped-call]
    return gathered, sum(sizes[: dist.get_rank()])


def all_gather_no_grad(x: Tensor) -> tuple[Tensor, int]:
    """Like `all_gather_with_grad`, but other ranks' rows carry no gradient.

    The local rows are spliced back in with their autograd history, which is
    what most naive implementations do; the gradient then misses every other
    rank's loss terms (kept for evaluation and as a negative control in tests).
    """
    if not is_distributed():
        return x, 0
    sizes = all_gather_sizes(x.shape[0], x.device)
    with torch.no_grad():
        gathered = _gather_padded(x.detach(), sizes)
    offset = sum(sizes[: dist.get_rank()])
    gathered = torch.cat([gathered[:offset], x, gathered[offset + x.shape[0] :]])
    return gathered, offset


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """All-reduce-average `.grad` of parameters outside any DDP wrapper (e.g. a temperature)."""
    if not is_distributed():
        return
    n = world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(n)

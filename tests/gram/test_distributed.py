"""Global negatives across ranks: 2 gloo processes == 1 process with the whole batch.

Each case builds three projections (text, video, audio) wrapped in real DDP,
splits a fixed global batch over 2 ranks, and compares the loss and every
parameter gradient (incl. the loss temperatures) with one process holding the
whole batch. A negative control gathers without gradient and must differ.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gram import CosineInfoNCELoss, GramLoss
from gram.distributed import (
    all_gather_no_grad,
    all_gather_sizes,
    all_gather_with_grad,
    average_gradients,
)
from gram.loss import GramCosineLoss

D_IN, D_OUT, N = 12, 8, 8


@dataclass(frozen=True)
class Case:
    name: str
    loss: str  # gram | cosine_all | gram_cosine
    split: tuple[int, int]  # rows on rank 0 and rank 1
    masked: bool
    gather_with_grad: bool = True


CASES = [
    Case("gram_even", "gram", (4, 4), masked=False),
    Case("gram_uneven_masked", "gram", (3, 5), masked=True),
    Case("cosine_all_masked", "cosine_all", (4, 4), masked=True),
    Case("gram_cosine_uneven_masked", "gram_cosine", (3, 5), masked=True),
    Case("gram_gather_without_grad", "gram", (4, 4), masked=False, gather_with_grad=False),
]


class Towers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.text = nn.Linear(D_IN, D_OUT)
        self.video = nn.Linear(D_IN, D_OUT)
        self.audio = nn.Linear(D_IN, D_OUT)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "text": self.text(x[:, 0]),
            "video": self.video(x[:, 1]),
            "audio": self.audio(x[:, 2]),
        }


def _setup(case: Case):
    torch.manual_seed(1234)
    model = Towers().double()
    if case.loss == "gram":
        loss = GramLoss(label_smoothing=0.1, gather_with_grad=case.gather_with_grad)
    elif case.loss == "gram_cosine":
        loss = GramCosineLoss(cosine_weight=0.5, label_smoothing=0.1)
    else:
        loss = CosineInfoNCELoss(pairs="all", label_smoothing=0.1)
    loss.double()
    g = torch.Generator().manual_seed(99)
    x = torch.randn(N, 3, D_IN, generator=g, dtype=torch.float64)
    mask = torch.ones(N, 3, dtype=torch.bool)
    if case.masked:
        mask[1, 2] = False  # sample 1 has no audio
        mask[6, 1] = False  # sample 6 has no video
    return model, loss, x, mask


def _grads(model: nn.Module, loss: nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    out.update({f"loss.{n}": p.grad.detach().clone() for n, p in loss.named_parameters()})
    return out


def _single_process(case: Case):
    model, loss, x, mask = _setup(case)
    value = loss(**model(x), mask=mask)["loss"]
    value.backward()
    return float(value.detach()), _grads(model, loss)


def _portable(obj):
    """Tensors -> numpy-backed copies, so results survive the worker's exit."""
    if isinstance(obj, torch.Tensor):
        return _Array(obj.detach().numpy().copy())
    if isinstance(obj, dict):
        return {k: _portable(v) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(_portable(v) for v in obj)
    return obj


@dataclass(frozen=True)
class _Array:
    value: object

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.value)


def _restore(obj):
    if isinstance(obj, _Array):
        return obj.tensor()
    if isinstance(obj, dict):
        return {k: _restore(v) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(_restore(v) for v in obj)
    return obj


def _rank_results(rank: int) -> dict:
    """Every case's summed loss and gradients, and the gather helpers' outputs, on this rank."""
    results = {}
    for case in CASES:
        model, loss, x, mask = _setup(case)
        ddp = nn.parallel.DistributedDataParallel(model)
        start = 0 if rank == 0 else case.split[0]
        rows = slice(start, start + case.split[rank])
        value = loss(**ddp(x[rows]), mask=mask[rows])["loss"]
        value.backward()
        average_gradients(loss.parameters())
        total = value.detach().clone()
        dist.all_reduce(total)
        grads = {n.removeprefix("module."): g for n, g in _grads(ddp.module, loss).items()}
        results[case.name] = (float(total) / 2, grads)
    # The gather helpers themselves: sizes, order, offsets.
    local = torch.full((rank + 2, 3), float(rank), requires_grad=True)
    gathered, offset = all_gather_with_grad(local)
    (gathered * torch.arange(gathered.shape[0])[:, None]).sum().backward()
    plain, plain_offset = all_gather_no_grad(local.detach())
    results["helpers"] = (
        all_gather_sizes(rank + 2, torch.device("cpu")),
        gathered.detach(),
        offset,
        local.grad,
        plain,
        plain_offset,
    )
    return results


def _worker(rank: int, port: int, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # No DDP wrapper outlives the work, so nothing holds the process group when it is
        # torn down (a rank once aborted at exit while its wrapper still held it).
        queue.put((rank, _portable(_rank_results(rank))))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    queue.close()
    queue.join_thread()  # the results are in the pipe
    # End without interpreter finalization: tensors that gloo's threads still hold can abort
    # the process when finalization destroys them (SIGABRT after the work was done). An
    # error above still ends the process with a non-zero exit code.
    os._exit(0)


@pytest.fixture(scope="module")
def two_rank_results():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {rank: _restore(res) for rank, res in (queue.get(timeout=300) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


@pytest.mark.parametrize("case", [c for c in CASES if c.gather_with_grad], ids=lambda c: c.name)
def test_two_ranks_equal_one_process_with_the_whole_batch(two_rank_results, case):
    want_loss, want_grads = _single_process(case)
    for rank in (0, 1):
        got_loss, got_grads = two_rank_results[rank][case.name]
        assert got_loss == pytest.approx(want_loss, abs=1e-10)
        assert set(got_grads) == set(want_grads)
        for name, want in want_grads.items():
            torch.testing.assert_close(got_grads[name], want, rtol=1e-5, atol=1e-8, msg=name)


def test_gathering_without_gradient_gives_a_different_gradient(two_rank_results):
    case = next(c for c in CASES if not c.gather_with_grad)
    want_loss, want_grads = _single_process(case)
    got_loss, got_grads = two_rank_results[0][case.name]
    assert got_loss == pytest.approx(want_loss, abs=1e-10)  # same forward value ...
    worst = max(
        float((got_grads[n] - w).abs().max() / w.abs().max()) for n, w in want_grads.items()
    )
    assert worst > 0.05, "... but the gradient must miss the other rank's terms"


def test_gather_helpers_order_offsets_and_route_gradients(two_rank_results):
    for rank in (0, 1):
        sizes, gathered, offset, grad, plain, plain_offset = two_rank_results[rank]["helpers"]
        assert sizes == [2, 3]
        assert gathered[:, 0].tolist() == [0, 0, 1, 1, 1]
        assert offset == plain_offset == (0 if rank == 0 else 2)
        torch.testing.assert_close(plain, gathered)
        # d/d local of sum_r sum_i i * gathered[i]: each rank's loss sees the same gathered
        # tensor, so every row's gradient is its global index times the world size (2).
        rows = torch.arange(offset, offset + sizes[rank], dtype=torch.float32)
        torch.testing.assert_close(grad, (2 * rows)[:, None].expand(-1, 3))


def test_single_process_is_a_no_op():
    x = torch.randn(3, 4)
    assert all_gather_with_grad(x)[0] is x
    assert all_gather_no_grad(x) == (x, 0)
    assert all_gather_sizes(3, torch.device("cpu")) == [3]

"""train_step under DDP on 2 gloo processes equals one process holding the whole batch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from gram.decode import Collator, DecodeConfig, SampleDecoder
from gram.loss import GramLoss
from gram.model import gram_tiny
from gram.steps import evaluate, train_step
from gram.synthetic import SyntheticClips


def _batch(model, lo: int, hi: int):
    clips = SyntheticClips(8, seed=4, missing_audio=0.3)
    decode = SampleDecoder(DecodeConfig.from_model(model.cfg), train=False)
    return Collator(model.tokenizer)([decode(clips[i]) for i in range(lo, hi)])


def _sgd(model, loss):
    return torch.optim.SGD([*model.parameters(), *loss.parameters()], lr=0.5)


def _rank_step(rank: int, out_file: str) -> None:
    """One DDP step and an evaluation on this rank's half of the batch; rank 0 saves."""
    torch.manual_seed(0)
    model = gram_tiny()
    loss = GramLoss()
    ddp = DistributedDataParallel(model)
    stats = train_step(ddp, loss, _sgd(model, loss), _batch(model, 4 * rank, 4 * rank + 4))
    loader = [_batch(model, 4 * rank, 4 * rank + 4)]
    metrics = evaluate(ddp, loader)
    mean_loss = torch.tensor(stats["loss"])
    dist.all_reduce(mean_loss)  # each rank's loss is its rows' share: average for logging
    stats["mean_loss"] = float(mean_loss) / 2
    if rank == 0:
        torch.save(
            {
                "params": {k: v.detach() for k, v in model.state_dict().items()},
                "temperature": loss.log_temperature.detach(),
                "stats": stats,
                "metrics": metrics,
            },
            out_file,
        )


def _worker(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # No DDP wrapper outlives the work, so nothing holds the process group when it is
        # torn down (a rank once aborted at exit while its wrapper still held it).
        _rank_step(rank, out_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_rank_step_matches_single_process(tmp_path):
    out_file = tmp_path / "rank0.pt"
    mp.start_processes(
        _worker,
        args=(str(tmp_path / "pg"), str(out_file)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    ranked = torch.load(out_file, weights_only=True)

    torch.manual_seed(0)
    model = gram_tiny()
    reference = copy.deepcopy(model)
    loss = GramLoss()
    stats = train_step(model, loss, _sgd(model, loss), _batch(model, 0, 8))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ranked["params"][name], value, atol=2e-6, rtol=1e-4)
    moved = sum(
        float((a - b).abs().sum())
        for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True)
    )
    assert moved > 0
    torch.testing.assert_close(ranked["temperature"], loss.log_temperature.detach())
    assert ranked["stats"]["grad_norm"] == pytest.approx(stats["grad_norm"], rel=1e-4)
    assert ranked["stats"]["mean_loss"] == pytest.approx(stats["loss"], rel=1e-5)
    # evaluate gathers both ranks' clips: 8 items, 16 captions, as one process would see.
    single = evaluate(model, [_batch(model, 0, 8)])
    assert ranked["metrics"]["num_items"] == single["num_items"] == 8
    assert ranked["metrics"]["num_captions"] == single["num_captions"] == 16
    for key in ("volume_t2i_meanr", "volume_i2t_meanr", "cosine_audio_t2i_count"):
        assert ranked["metrics"][key] == pytest.approx(single[key], abs=0.2), key

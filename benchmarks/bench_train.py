"""Benchmark: the Ray Train job against a plain single-process loop on the same data.

    python benchmarks/bench_train.py                 # 1 and 2 workers, 300 steps each
    python benchmarks/bench_train.py --steps 100     # shorter

Same model (`tiny`), loss (GramLoss), batch, shards and decoding in both:
- baseline: one process, `gram.shards.ShardLoader` + `gram.steps.train_step`, one thread;
- job: `python -m jobs.train` on a local Ray with N workers (one thread each).
Throughput is measured after start-up (from the job's own logged samples/s, skipping
the first logging window) and printed as a ratio to the baseline, with the fraction of
step time the job spent waiting for data.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gram.decode import DecodeConfig, collate, decode_sample  # noqa: E402
from gram.loss import GramLoss  # noqa: E402
from gram.model import build_model  # noqa: E402
from gram.model_config import model_config  # noqa: E402
from gram.shards import ShardLoader  # noqa: E402
from gram.steps import OptimConfig, build_optimizer, cosine_schedule, train_step  # noqa: E402
from gram.synthetic import SyntheticClips  # noqa: E402
from pipelines.index import read_listing  # noqa: E402
from pipelines.samples_to_shards import write_sample_shards  # noqa: E402


def baseline(data: str, steps: int, batch: int) -> float:
    """Samples/s of a plain loop (after 20 warm-up steps)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = model_config("tiny")
    model = build_model(cfg)
    loss = GramLoss(label_smoothing=0.1)
    optim_cfg = OptimConfig(lr=1e-3, warmup_steps=10, total_steps=steps + 20)
    optimizer = build_optimizer(model, loss, optim_cfg)
    scheduler = cosine_schedule(optimizer, optim_cfg)
    shards = read_listing(data).shards
    decode_cfg = DecodeConfig.from_model(cfg)
    loader = ShardLoader(
        shards,
        batch_size=batch,
        rank=0,
        world_size=1,
        seed=0,
        open_shard=lambda url: open(url, "rb"),  # noqa: SIM115 (closed by the loader)
        decode=lambda raw, rng: decode_sample(raw, decode_cfg, train=True, rng=rng),
        collate=lambda items: collate(items, model.tokenizer),
        shuffle_buffer=512,
        decode_threads=2,
    )
    done, epoch, start = 0, 0, 0.0
    with loader:
        while done < steps + 20:
            for b in loader.epoch(epoch):
                train_step(model, loss, optimizer, b, scheduler=scheduler)
                done += 1
                if done == 20:
                    start = time.perf_counter()
                if done == steps + 20:
                    break
            epoch += 1
    return steps * batch / (time.perf_counter() - start)


def job(data: str, steps: int, batch: int, workers: int, work: Path) -> tuple[float, float]:
    """(samples/s after start-up, data-wait fraction) of the Ray Train job."""
    from mlflow import MlflowClient

    db = work / f"mlflow-{workers}.db"
    cmd = [
        sys.executable, "-m", "jobs.train",
        f"name=bench-{workers}", f"data.train={data}", "data.eval=", f"data.batch_size={batch}",
        f"scaling.workers={workers}", f"max_steps={steps}", "epochs=1000", "log_every_steps=20",
        "report_every_steps=1000", "checkpoint.every_steps=100000", "optim.lr=1e-3",
        "optim.warmup_steps=10", f"checkpoint.storage={work / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{db}",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stdout[-3000:] + out.stderr[-3000:])
    run_id = next(x for x in out.stdout.splitlines() if "MLflow run:" in x).split()[2]
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    rates = [m.value for m in client.get_metric_history(run_id, "samples_per_s")][1:]
    waits = [m.value for m in client.get_metric_history(run_id, "data_wait")][1:]
    return statistics.median(rates), statistics.median(waits)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32, help="per worker")
    parser.add_argument("--samples", type=int, default=1024)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    data = str(work / "shards")
    write_sample_shards(SyntheticClips(args.samples, seed=1), data, samples_per_shard=128)
    base = baseline(data, args.steps, args.batch)
    print(f"tiny model, batch {args.batch}/worker, {args.steps} steps, {os.cpu_count()} CPUs")
    print(f"plain single-process loop: {base:7.1f} samples/s ({base / args.batch:.2f} steps/s)")
    for workers in (1, 2):
        rate, wait = job(data, args.steps, args.batch, workers, work)
        print(
            f"Ray Train job, {workers} worker(s): {rate:7.1f} samples/s "
            f"({rate / (args.batch * workers):.2f} steps/s) = {rate / base:.2f}x the plain loop, "
            f"data wait {100 * wait:.1f}% of step time"
        )


if __name__ == "__main__":
    main()

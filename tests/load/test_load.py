"""Load: thousands of clips preprocessed with flat memory; 2,000 training steps without memory
growth or throughput decay. Real processes on the session Ray cluster.

Not part of `make test` (the `load` marker is deselected there): `make test-slow` runs them."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from gram.synthetic import SyntheticClips
from pipelines.samples_to_shards import write_sample_shards
from pipelines.synthetic import ClipSpec, make_clip, write_jsonl

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.load


class RssSampler:
    """Samples a process's resident memory (MiB) every `every` seconds on a thread."""

    def __init__(self, pid: int, every: float = 0.25) -> None:
        self.proc = psutil.Process(pid)
        self.every = every
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            try:
                rss = self.proc.memory_info().rss / 2**20
            except psutil.NoSuchProcess:
                return
            self.samples.append((time.monotonic() - start, rss))
            time.sleep(self.every)

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        self._thread.join()
        return self.samples


def test_thousands_of_clips_preprocess_with_flat_driver_memory(tmp_path, ray_cluster):
    clip = make_clip(
        ClipSpec(width=64, height=48, fps=10, duration=0.6, audio_channels=1, sample_rate=16_000),
        tmp_path / "clip.mp4",
    )
    count = 2000
    rows = [
        {"id": f"c{i:05d}", "video": clip.name, "captions": [f"clip {i}"]} for i in range(count)
    ]
    manifest = write_jsonl(rows, tmp_path / "manifest.jsonl")
    cmd = [
        sys.executable, "-m", "jobs.preprocess", "--input", str(manifest),
        "--output", str(tmp_path / "out"), "frames.num_segments=2", "frames.size=32",
        "audio.max_seconds=0.5", "shards.samples_per_shard=250", "execution.clips_per_task=8",
        "execution.progress_interval_s=2",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    sampler = RssSampler(proc.pid)
    out, _ = proc.communicate(timeout=1500)
    samples = sampler.stop()
    assert proc.returncode == 0, out[-4000:]
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["totals"]["ok"] == count
    duration = samples[-1][0]
    early = max(rss for t, rss in samples if t <= 0.3 * duration)
    peak = max(rss for _, rss in samples)
    print(
        f"\ndriver RSS: {early:.0f} MiB by 30% of the run, peak {peak:.0f} MiB over {count} clips"
    )
    assert peak - early < 150, f"driver memory grew {peak - early:.0f} MiB from 30% to the end"


def test_two_thousand_training_steps_without_memory_growth_or_slowdown(tmp_path, ray_cluster):
    """One worker with a small batch: the soak is about the job's own memory and throughput
    over many steps and epochs (the 2-worker path is covered in
    tests/jobs/training/test_train.py)."""
    data = tmp_path / "shards"
    write_sample_shards(SyntheticClips(256, seed=4), str(data), samples_per_shard=64)
    db = tmp_path / "mlflow.db"
    cmd = [
        sys.executable, "-m", "jobs.train", "--config", str(REPO / "jobs/configs/train.yaml"),
        "name=soak", f"data.train={data}", "data.eval=", "scaling.workers=1",
        "data.batch_size=4", "max_steps=2000",
        "epochs=1000", "log_every_steps=50", "report_every_steps=500",
        "checkpoint.every_steps=1000", f"checkpoint.storage={tmp_path / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{db}",
    ]  # fmt: skip
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run_id = next(x for x in res.stdout.splitlines() if "MLflow run:" in x).split()[2]
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    rss = [
        m.value for m in sorted(client.get_metric_history(run_id, "rss_mb"), key=lambda m: m.step)
    ]
    rate = [
        m.value
        for m in sorted(client.get_metric_history(run_id, "samples_per_s"), key=lambda m: m.step)
    ]
    assert len(rss) == len(rate) == 40
    quarter = len(rss) // 4
    first_rate, last_rate = statistics.median(rate[1:quarter]), statistics.median(rate[-quarter:])
    grown = max(rss[-quarter:]) - statistics.median(rss[quarter : 2 * quarter])
    print(f"\nrank-0 RSS {rss[quarter]:.0f} -> {rss[-1]:.0f} MiB", end="; ")
    print(f"samples/s {first_rate:.0f} -> {last_rate:.0f}")
    # Loader threads made anew every epoch grew this by ~150 MiB (glibc malloc arenas).
    assert grown < 40, f"rank-0 memory grew {grown:.0f} MiB over the last 1,500 steps"
    assert last_rate > 0.6 * first_rate, "throughput decayed over the run"

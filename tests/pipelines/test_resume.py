"""SIGKILL a real `python -m jobs.preprocess` run at random points, rerun, compare byte for byte.

The killed runs write their shards from Ray tasks; the reference and the final rerun run in
this process (`execution.mode=local`): shards of both kinds make the same output."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.preprocess import run
from pipelines.config import PreprocessConfig

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CLIPS = 12
OVERRIDES = [
    "shards.samples_per_shard=2",
    "execution.mode=ray",
    "execution.max_tasks_in_flight=2",
    "execution.progress_interval_s=1",
]


def _inputs(media_dir, folder: Path) -> Path:
    folder.mkdir(parents=True)
    names = [
        "h264_aac.mp4",
        "h264_noaudio.mp4",
        "short.mp4",
        "tall.mp4",
        "mpeg4_mp3.avi",
        "broken_text.mp4",
    ]
    rows = []
    for n in range(CLIPS):
        name = names[n % len(names)]
        shutil.copyfile(media_dir[name].path, folder / f"{n:02d}_{name}")
        rows.append({"id": f"clip.{n:02d}", "video": f"{n:02d}_{name}", "captions": [f"c{n}"]})
    path = folder / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _config(inputs: Path, out: Path) -> PreprocessConfig:
    cfg = PreprocessConfig(input=str(inputs), output=str(out))
    cfg.shards.samples_per_shard = 2
    cfg.execution.mode = "local"
    return cfg


def _start(inputs: Path, out: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jobs.preprocess",
            "--input",
            str(inputs),
            "--output",
            str(out),
            *OVERRIDES,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _states(out: Path) -> int:
    return len(list((out / "_state").glob("shard-*.json"))) if (out / "_state").is_dir() else 0


@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_at_random_points_then_rerun_equals_uninterrupted(
    ray_session, media_dir, tmp_path, seed
):
    rng = random.Random(seed)
    inputs = _inputs(media_dir, tmp_path / "in")
    reference = tmp_path / "reference"
    summary = run(_config(inputs, reference))
    assert summary.ok + summary.failed == CLIPS

    out = tmp_path / "killed"
    # First kill: after a random number of finished shards (surely mid-run).
    proc = _start(inputs, out)
    target = rng.randint(1, 3)
    deadline = time.monotonic() + 180
    while _states(out) < target and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert 1 <= _states(out) < CLIPS // 2
    # Second kill: at a random moment of the resumed run (start-up, mid-shard, or finishing).
    proc = _start(inputs, out)
    time.sleep(rng.uniform(0.5, 8.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    resumed = run(_config(inputs, out))
    assert resumed.ok + resumed.failed == CLIPS
    assert _tree(out) == _tree(reference)

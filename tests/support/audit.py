"""Reading the sample audit a training run writes under `data.audit_dir`.

`starts.jsonl` holds one line per worker start (rank, node id, pid, the step it starts at);
`rank{N}.jsonl` one line per optimizer step of rank N (its step, epoch and sample keys).
A line may be half written while the run goes on: only complete lines are read.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _lines(path: Path) -> list[dict[str, Any]]:
    text = path.read_text() if path.exists() else ""
    return [json.loads(x) for x in text.splitlines() if x.endswith("}")]


def starts(audit: Path) -> list[dict[str, Any]]:
    """Every worker start, in order (the first `workers` lines are the first attempt)."""
    return _lines(audit / "starts.jsonl")


def max_step(audit: Path, rank: int) -> int:
    """The last step rank `rank` has trained so far (0 before its first)."""
    return max((entry["step"] for entry in _lines(audit / f"rank{rank}.jsonl")), default=0)


def effective_keys(audit: Path) -> dict[int, list[str]]:
    """Keys trained per epoch, with steps redone after a restart counted once (last wins)."""
    per_step: dict[tuple[int, int], tuple[int, list[str]]] = {}
    for path in sorted(audit.glob("rank*.jsonl")):
        rank = int(path.stem.removeprefix("rank"))
        for entry in _lines(path):
            per_step[(rank, entry["step"])] = (entry["epoch"], entry["keys"])
    epochs: dict[int, list[str]] = defaultdict(list)
    for epoch, keys in per_step.values():
        epochs[epoch] += keys
    return dict(epochs)


def wait_for(
    predicate: Callable[[], bool], proc: subprocess.Popen[str], what: str, timeout: float = 300
) -> None:
    """Poll `predicate` until it holds; fail with the run's output if the run ends first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            output = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"the run ended before {what}:\n{output[-5000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)

"""The plateau check at several lengths: its table, and a tiny run on the real data."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.av_digits_plateau import table

REPO = Path(__file__).resolve().parents[2]


def test_the_table_marks_a_change_outside_the_tolerance() -> None:
    rows = [
        {"arm": "gram", "seed": 0, "steps": 8000, "train_change": 0.0201,
         "test_change": 0.0028, "zero_shot": 82.0, "seconds": 68.2},
        {"arm": "cosine_all", "seed": 0, "steps": 32000, "train_change": 0.0099,
         "test_change": 0.0178, "zero_shot": 86.4, "seconds": 467.0},
    ]  # fmt: skip
    lines = table(rows).splitlines()
    assert len(lines) == 4
    assert lines[2] == "| GRAM volume (t, v, a) | 0 | 8000 | **2.01 %** | 0.28 % | 82.0 % | 68 |"
    assert "| 32000 | 0.99 % | **1.78 %** | 86.4 % | 467 |" in lines[3]


def test_quick_runs_every_arm_at_every_length(shared_data: Path, tmp_path: Path) -> None:
    data = shared_data / "av-digits"
    if not (data / "fsdd").is_dir():
        pytest.skip(f"{data} has no fsdd/ recordings")
    proc = subprocess.run(
        [sys.executable, "benchmarks/av_digits_plateau.py", "--quick", "--arms", "gram",
         "cosine_anchor", "--steps", "20", "40", "--data", str(data), "--out", str(tmp_path)],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
        timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads((tmp_path / "plateau.json").read_text())
    assert [(r["arm"], r["steps"]) for r in rows] == [
        ("gram", 20), ("gram", 40), ("cosine_anchor", 20), ("cosine_anchor", 40)
    ]  # fmt: skip
    for r in rows:
        assert math.isfinite(r["train_change"]), r
        assert math.isfinite(r["test_change"]), r
        assert 0.0 <= r["zero_shot"] <= 100.0
    assert rows[0]["train_change"] != rows[1]["train_change"], "20 and 40 steps are two runs"
    assert proc.stdout.count("| 0 | 40 |") == 2, proc.stdout
    assert "[4/4] " in proc.stdout, "progress: a line per finished run"

"""A finished step is reused only with the settings (and extra) it ran with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.common.step_markers import StepMarkers


def test_a_finished_step_is_reused_with_its_settings_and_run_again_otherwise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    markers = StepMarkers(tmp_path, "hash-a", label="job")
    assert markers.done("train") is None

    markers.finish("train", {"checkpoint": "runs/x", "what": "runs/x"}, extra="ckpt-1")
    saved = json.loads((tmp_path / ".done" / "train.json").read_text())
    assert saved == {"checkpoint": "runs/x", "what": "runs/x", "settings": "hash-ackpt-1"}

    done = markers.done("train", extra="ckpt-1")
    assert done is not None
    assert done["checkpoint"] == "runs/x"
    assert "[job] train: already done, reusing runs/x" in capsys.readouterr().out

    assert markers.done("train") is None  # the step ran on another checkpoint
    assert markers.done("train", extra="ckpt-2") is None
    assert StepMarkers(tmp_path, "hash-b", label="job").done("train", extra="ckpt-1") is None
    assert markers.done("evaluate", extra="ckpt-1") is None

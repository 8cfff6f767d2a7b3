"""Markers of finished steps, so that re-running a multi-step job reuses what is done.

    markers = StepMarkers(root, settings=config_hash(cfg), label="demo")
    if (done := markers.done("train")) is not None:
        return done["checkpoint"]
    ...
    markers.finish("train", {"checkpoint": uri, "what": uri})

A finished step leaves `<root>/.done/<step>.json`: what it produced, plus the settings hash
it ran with (and `extra`, e.g. the checkpoint it worked on). A marker with other settings is
ignored, so the step runs again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["StepMarkers"]


class StepMarkers:
    """The `.done` markers under `root`; `settings` is the hash of the job's config."""

    def __init__(self, root: Path, settings: str, label: str) -> None:
        self.folder = root / ".done"
        self.settings = settings
        self.label = label

    def done(self, step: str, extra: str = "") -> dict[str, Any] | None:
        """What `step` produced when it finished with these settings (and `extra`), else None."""
        marker = self.folder / f"{step}.json"
        if not marker.is_file():
            return None
        data: dict[str, Any] = json.loads(marker.read_text())
        if data.get("settings") != self.settings + extra:
            return None
        print(f"[{self.label}] {step}: already done, reusing {data.get('what', '')}", flush=True)
        return data

    def finish(self, step: str, result: dict[str, Any], extra: str = "") -> None:
        """Mark `step` done with `result` (JSON; its `what` is printed when it is reused)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        data = {**result, "settings": self.settings + extra}
        (self.folder / f"{step}.json").write_text(json.dumps(data, indent=2))

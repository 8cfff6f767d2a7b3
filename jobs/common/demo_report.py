"""What the demo prints when it is done: retrieval and zero-shot results, the registry
verdict, where every output is, and the commands to open MLflow and serve the champion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["print_summary"]


def print_summary(
    root: Path,
    tracking_uri: str,
    report: dict[str, Any],
    registry: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    """Print how GRAM's volume compares with cosine and where everything is under `root`;
    returns the summary that `summary.json` holds. `report` is the evaluate step's (its
    `metrics` as `jobs.evaluate` logs them), `registry` the register-and-promote step's."""
    m = report["metrics"]
    n = int(m.get("num_items", 0))
    rows = [
        ("GRAM volume, text -> (video+audio)", "volume_t2i"),
        ("cosine, text -> video", "cosine_video_t2i"),
        ("cosine, text -> audio", "cosine_audio_t2i"),
    ]
    print(f"\n== gram-ray demo done in {seconds / 60:.1f} min ==")
    captions = int(m.get("num_captions", 0))
    print(f"Retrieval on {n} held-out clips ({captions} captions), R@1 / R@5 / R@10 in %:")
    for label, key in rows:
        values = " / ".join(f"{m.get(f'{key}_r{k}', float('nan')):5.1f}" for k in (1, 5, 10))
        print(f"  {label:<36} {values}")
    if n:
        chance = " / ".join(f"{100 * min(k, n) / n:5.1f}" for k in (1, 5, 10))
        print(f"  {'chance':<36} {chance}")
    if "zeroshot_top1" in m:
        print(
            f"Zero-shot classification, {int(m.get('zeroshot_num_classes', 0))} colour x sound "
            f"classes, top-1: volume {m['zeroshot_top1']:.1f}%, cosine video "
            f"{m.get('zeroshot_cosine_video_top1', float('nan')):.1f}%, cosine audio "
            f"{m.get('zeroshot_cosine_audio_top1', float('nan')):.1f}%"
        )
    verdict = (
        "promoted to champion"
        if registry["promoted"]
        else "NOT promoted: " + "; ".join(registry["reasons"])
    )
    print(f"Registry: models:/{registry['name']}/{registry['version']} {verdict}")
    db = tracking_uri.removeprefix("sqlite:///")
    print("Where things are:")
    for label, where in (
        ("clips", root / "clips"),
        ("shards", root / "shards"),
        ("checkpoints", root / "runs" / "demo"),
        ("report", Path(report["folder"]) / "report.json"),
        ("MLflow", tracking_uri),
    ):
        print(f"  {label:<12} {where}")
    print(f"Open the MLflow UI:  mlflow ui --backend-store-uri sqlite:///{db} --port 5000")
    print(
        f"Serve the champion:  MLFLOW_TRACKING_URI={tracking_uri} mlflow models serve "
        f"-m models:/{registry['name']}@champion --env-manager local --port 5001"
    )
    return {
        "seconds": seconds,
        "metrics": m,
        "registry": registry,
        "tracking_uri": tracking_uri,
    }

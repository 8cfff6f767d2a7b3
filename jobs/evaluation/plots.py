"""PNG pictures of an evaluation report (matplotlib's object API with the Agg canvas: no
pyplot, no global backend state, no display needed).

    plot_recall_curves({"volume_t2i": [...], "cosine_video_t2i": [...]}, out / "recall_at_k.png")
    plot_volume_distributions(report["volume_distribution"], out / "volume_hist.png")
    plot_confusion(confusion, class_names, out / "confusion.png")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_confusion", "plot_recall_curves", "plot_volume_distributions"]

_LABELS = {
    "volume_t2i": "volume: text -> all data modalities",
    "cosine_video_t2i": "cosine: text -> video",
    "cosine_audio_t2i": "cosine: text -> audio",
}


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def plot_recall_curves(curves: Mapping[str, Sequence[float]], path: Path) -> Path:
    """Recall@K (%) against K = 1..len(curve), one line per scoring (volume vs cosine)."""
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for name, values in curves.items():
        if values:
            ks = list(range(1, len(values) + 1))
            ax.plot(
                ks,
                list(values),
                marker="." if len(ks) <= 20 else None,
                label=_LABELS.get(name, name),
            )
    ax.set_xscale("log")
    ax.set_xlabel("K (log scale)")
    ax.set_ylabel("recall@K (%)")
    ax.set_ylim(0, 101)
    ax.set_title("Text-to-clip retrieval: Gramian volume vs cosine")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def plot_volume_distributions(dist: Mapping[str, Any], path: Path) -> Path:
    """Densities of positive (caption with its own clip) and negative volumes over [0, 1]."""
    edges = list(dist["bin_edges"])
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    width = edges[1] - edges[0]
    for key, colour in (("negative", "tab:red"), ("positive", "tab:green")):
        counts = list(dist[key])
        total = sum(counts) or 1.0
        density = [c / total / width for c in counts]
        mean = dist.get(f"{key}_mean")
        label = f"{key} pairs (n={int(sum(counts))}" + (f", mean {mean:.3f})" if mean else ")")
        ax.stairs(density, edges, fill=True, alpha=0.45, color=colour, label=label)
    ax.set_xlabel("volume of (text, video, audio) (lower = more aligned)")
    ax.set_ylabel("density")
    ax.set_xlim(0, 1)
    ax.set_title("Positive vs negative volumes")
    ax.legend(loc="upper left", fontsize="small")
    return _save(fig, path)


def plot_confusion(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: Path) -> Path:
    """Confusion matrix of zero-shot classification (rows: true class, columns: predicted)."""
    n = len(classes)
    side = min(14.0, max(4.5, 0.32 * n + 2.5))
    fig = Figure(figsize=(side, side * 0.9), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow([list(row) for row in confusion], cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="clips")
    if n <= 40:
        ax.set_xticks(range(n), list(classes), rotation=90, fontsize="x-small")
        ax.set_yticks(range(n), list(classes), fontsize="x-small")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Zero-shot classification by volume (class prompt, video, audio)")
    return _save(fig, path)

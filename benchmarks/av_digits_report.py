"""Aggregate AV-digits results over seeds; write the Markdown table and the PNG plots.

rows = aggregate(results)                  # one row per (split, method): mean, std, values
markdown = table(rows, header)             # the tables of docs/results/av_digits/av_digits.md
plot_accuracy(rows, "accuracy.png")        # zero-shot top-1 per method and scoring rule
plot_volumes(volumes, "volumes.png")       # positive vs negative class volumes
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor

__all__ = [
    "METHODS",
    "SPLITS",
    "Aggregate",
    "aggregate",
    "plot_accuracy",
    "plot_loss",
    "plot_volumes",
    "table",
]

METHODS = {
    "gram": "GRAM volume (t, v, a)",
    "cosine_anchor": "cosine, text-anchored (t-v, t-a)",
    "cosine_all": "cosine, all pairs (t-v, t-a, v-a)",
}
"""Training losses (the `loss.kind` of the training job) and how tables name them."""

SPLITS = {"official": "official split", "holdout": "held-out speaker"}

_ZERO_SHOT = (
    ("zs_volume", "volume (t; v, a)"),
    ("zs_cos_video", "cos (t, v)"),
    ("zs_cos_audio", "cos (t, a)"),
    ("zs_cos_sum", "cos (t, v) + cos (t, a)"),
)
_RETRIEVAL = (
    ("t2va_volume_r1", "t→(v+a) vol R@1"),
    ("t2va_volume_r5", "vol R@5"),
    ("t2va_volume_map", "vol mAP"),
    ("t2va_cos_sum_map", "cos-sum mAP"),
    ("v2a_r1", "v→a R@1"),
    ("v2a_r5", "v→a R@5"),
    ("a2v_r1", "a→v R@1"),
    ("a2v_r5", "a→v R@5"),
)


@dataclass(frozen=True)
class Aggregate:
    """One (split, method) over its seeds: per metric the mean, the sample std and the values."""

    split: str
    method: str
    seeds: tuple[int, ...]
    mean: dict[str, float]
    std: dict[str, float]
    values: dict[str, list[float]]


def aggregate(results: Sequence[Mapping[str, object]]) -> list[Aggregate]:
    """Group per-run results ({"split", "method", "seed", "metrics"}) by (split, method)."""
    groups: dict[tuple[str, str], list[Mapping[str, object]]] = {}
    for r in results:
        groups.setdefault((str(r["split"]), str(r["method"])), []).append(r)
    out = []
    for split in SPLITS:
        for method in METHODS:
            runs = sorted(groups.get((split, method), []), key=lambda r: int(str(r["seed"])))
            if not runs:
                continue
            metrics = [r["metrics"] for r in runs]
            names = sorted(set().union(*(m.keys() for m in metrics if isinstance(m, Mapping))))
            values = {n: [float(m[n]) for m in metrics if isinstance(m, Mapping)] for n in names}
            out.append(
                Aggregate(
                    split=split,
                    method=method,
                    seeds=tuple(int(str(r["seed"])) for r in runs),
                    mean={n: statistics.fmean(v) for n, v in values.items()},
                    std={n: statistics.stdev(v) if len(v) > 1 else 0.0 for n, v in values.items()},
                    values=values,
                )
            )
    return out


def _cell(row: Aggregate, metric: str, best: float) -> str:
    text = f"{row.mean[metric]:.1f} ± {row.std[metric]:.1f}"
    return f"**{text}**" if row.mean[metric] >= best - 1e-9 else text


def _block(rows: Sequence[Aggregate], columns: Sequence[tuple[str, str]]) -> list[str]:
    header = ["split", "training loss", *(label for _, label in columns)]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * len(columns)]
    for split in SPLITS:
        group = [r for r in rows if r.split == split]
        best = {m: max(r.mean[m] for r in group) for m, _ in columns} if group else {}
        for r in group:
            cells = [_cell(r, m, best[m]) for m, _ in columns]
            lines.append(f"| {SPLITS[split]} | {METHODS[r.method]} | " + " | ".join(cells) + " |")
    return lines


def table(rows: Sequence[Aggregate]) -> str:
    """Two Markdown tables (zero-shot accuracy; class-level retrieval), best mean in bold."""
    seeds = sorted({s for r in rows for s in r.seeds})
    clips = {r.split: int(r.mean["num_clips"]) for r in rows}
    counts = ", ".join(f"{SPLITS[s]}: {n} test clips" for s, n in clips.items())
    lines = [
        f"Mean ± sample std over seeds {', '.join(map(str, seeds))} ({counts}); best mean in "
        "bold. Chance is 10% for accuracy and R@1.",
        "",
        "**Zero-shot classification from prompts, top-1 %** (a clip gets the digit whose prompt "
        "embedding scores best with its embeddings):",
        "",
        *_block(rows, _ZERO_SHOT),
        "",
        "**Retrieval at class level, %** (text→(video+audio): every prompt queries every clip, "
        "a hit when a clip of the prompt's digit is among the K best; video↔audio by cosine):",
        "",
        *_block(rows, _RETRIEVAL),
    ]
    return "\n".join(lines) + "\n"


def plot_accuracy(rows: Sequence[Aggregate], path: Path) -> Path:
    """Grouped bars: zero-shot top-1 per scoring rule and training loss, one panel per split.

    Bars are means, error bars the sample std, dots the individual seeds.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = [s for s in SPLITS if any(r.split == s for r in rows)]
    fig, axes = plt.subplots(1, len(splits), figsize=(6.5 * len(splits), 4.2), squeeze=False)
    width = 0.8 / len(METHODS)
    colours = ("tab:red", "tab:blue", "tab:gray")
    for ax, split in zip(axes[0], splits, strict=True):
        x = np.arange(len(_ZERO_SHOT))
        for k, (method, colour) in enumerate(zip(METHODS, colours, strict=True)):
            row = next((r for r in rows if r.split == split and r.method == method), None)
            if row is None:
                continue
            means = [row.mean[m] for m, _ in _ZERO_SHOT]
            stds = [row.std[m] for m, _ in _ZERO_SHOT]
            pos = x - 0.4 + width * (k + 0.5)
            ax.bar(
                pos,
                means,
                width,
                yerr=stds,
                capsize=3,
                color=colour,
                alpha=0.75,
                label=METHODS[method],
            )
            for j, (m, _) in enumerate(_ZERO_SHOT):
                ax.scatter(
                    [pos[j]] * len(row.values[m]), row.values[m], s=8, color="black", zorder=3
                )
        ax.axhline(10, color="black", linestyle=":", linewidth=1)
        ax.set_xticks(x, [label for _, label in _ZERO_SHOT], fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("zero-shot top-1 accuracy (%)")
        ax.set_title(f"AV-digits, {SPLITS[split]}")
    axes[0][0].legend(fontsize=8, loc="upper right", title="training loss", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_volumes(volumes: Mapping[str, Mapping[str, Tensor]], path: Path, title: str) -> Path:
    """Histograms of vol(class prompt, video, audio): true class vs the nine others, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if m in volumes]
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.4), squeeze=False)
    bins = np.linspace(0.0, 1.0, 51)
    for ax, method in zip(axes[0], methods, strict=True):
        pos = volumes[method]["positive"].numpy()
        neg = volumes[method]["negative"].numpy()
        ax.hist(neg, bins=bins, density=True, alpha=0.6, color="tab:gray", label="other digits")
        ax.hist(pos, bins=bins, density=True, alpha=0.6, color="tab:green", label="true digit")
        ax.set_title(f"{METHODS[method]}", fontsize=9)
        ax.set_xlabel("volume of (class prompt, video, audio)")
    axes[0][0].set_ylabel("density")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_loss(
    curves: Mapping[tuple[str, str], Sequence[tuple[Sequence[int], Sequence[float]]]],
    path: Path,
    batch_size: int,
) -> Path:
    """Training loss against step per method (mean over seeds), one panel per split.

    Every loss is a mean of cross-entropies over the batch, so ln(batch) is chance for all.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = [s for s in SPLITS if any(key[0] == s for key in curves)]
    fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 3.6), squeeze=False)
    colours = dict(zip(METHODS, ("tab:red", "tab:blue", "tab:gray"), strict=True))
    for ax, split in zip(axes[0], splits, strict=True):
        for method in METHODS:
            runs = curves.get((split, method), [])
            if not runs:
                continue
            length = min(len(steps) for steps, _ in runs)
            steps = list(runs[0][0])[:length]
            mean = np.mean([list(v)[:length] for _, v in runs], axis=0)
            ax.plot(steps, mean, color=colours[method], label=METHODS[method])
        ax.axhline(float(np.log(batch_size)), color="black", linestyle=":", linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (mean over seeds)")
        ax.set_title(f"AV-digits, {SPLITS[split]}; dotted: ln(batch) = chance")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

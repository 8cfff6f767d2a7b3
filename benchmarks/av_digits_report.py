"""Aggregate AV-digits results over seeds; write the Markdown tables and the PNG plots.

rows = aggregate(results)                 # one row per (test set, arm): mean, std, values
markdown = table(rows)                    # accuracy and retrieval under every scoring rule
diffs = paired_differences(results)       # per-seed differences between paired arms
plot_accuracy(rows, "accuracy.png")       # zero-shot top-1 per arm and scoring rule
plot_curves(curves, "loss.png")           # training loss of every run, plateau windows
plot_volumes(volumes, "volumes.png")      # positive vs negative class volumes
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor

__all__ = [
    "ARMS",
    "OWN_RULE",
    "PAIRS",
    "PLATEAU_TOLERANCE",
    "RULES",
    "SPLITS",
    "Aggregate",
    "Difference",
    "aggregate",
    "convergence_table",
    "difference_table",
    "paired_differences",
    "plateau",
    "plot_accuracy",
    "plot_curves",
    "plot_volumes",
    "table",
]

ARMS = {
    "gram": "GRAM volume (t, v, a)",
    "cosine_anchor": "cosine, text-anchored (t-v, t-a)",
    "cosine_all": "cosine, all pairs (t-v, t-a, v-a)",
    "gram_cosine": "GRAM + λ × text-anchored cosine",
    "finetune_gram": "cosine pre-training → GRAM fine-tune",
    "finetune_cosine": "cosine pre-training → cosine continued",
}
"""The benchmark's arms, in table order, and how tables name them."""

OWN_RULE = {
    "gram": "zs_volume",
    "cosine_anchor": "zs_cos_sum",
    "cosine_all": "zs_cos_sum",
    "gram_cosine": "zs_volume",
    "finetune_gram": "zs_volume",
    "finetune_cosine": "zs_cos_sum",
}
"""Each arm's own scoring rule: the volume for arms whose (last) loss is GRAM's, the sum of
the two text cosines for cosine arms. `zs_own` is the zero-shot top-1 by it."""

PAIRS = (
    ("finetune_gram", "finetune_cosine"),
    ("gram_cosine", "cosine_anchor"),
)
"""(arm, baseline): the paired per-seed differences reported."""

SPLITS = {"official": "official split", "holdout": "held-out speaker"}

RULES = (
    ("zs_own", "own rule"),
    ("zs_volume", "volume (t; v, a)"),
    ("zs_cos_sum", "cos-sum"),
    ("zs_cos_sum_aligned", "cos-sum, sign-aligned"),
    ("zs_cos_video", "cos (t, v)"),
    ("zs_cos_audio", "cos (t, a)"),
    ("zs_cos_video_aligned", "cos (t, v), aligned"),
    ("zs_cos_audio_aligned", "cos (t, a), aligned"),
)
"""Zero-shot top-1 by every scoring rule: the columns of the main table."""

_ZERO_SHOT = tuple(metric for metric, _ in RULES)

_RETRIEVAL = (
    ("t2va_volume_map", "t→(v+a) vol mAP"),
    ("t2va_cos_sum_map", "cos-sum mAP"),
    ("t2va_cos_sum_aligned_map", "cos-sum aligned mAP"),
    ("v2a_r1", "v→a R@1"),
    ("a2v_r1", "a→v R@1"),
    ("sign_video", "mean cos (t, v) of true pairs"),
    ("sign_audio", "mean cos (t, a) of true pairs"),
)

PLATEAU_TOLERANCE = 0.01
"""A run has converged when the mean training loss over its last 20 % of steps is within
this fraction of the mean over the 20 % before them."""


def signed_change(losses: Sequence[float]) -> float:
    """Relative change of the mean loss from the second-to-last to the last fifth of the
    steps (negative: still falling; nan under five values). `losses`: evenly spaced."""
    fifth = len(losses) // 5
    if fifth < 1:
        return float("nan")
    last = statistics.fmean(losses[-fifth:])
    before = statistics.fmean(losses[-2 * fifth : -fifth])
    return (last - before) / abs(before)


def plateau(losses: Sequence[float]) -> tuple[float, bool]:
    """(|`signed_change`|, whether it is within `PLATEAU_TOLERANCE`)."""
    change = abs(signed_change(losses))
    return change, change <= PLATEAU_TOLERANCE


@dataclass(frozen=True)
class Aggregate:
    """One (test set, arm) over its seeds: per metric the mean, the sample std and the values."""

    split: str
    arm: str
    seeds: tuple[int, ...]
    mean: dict[str, float]
    std: dict[str, float]
    values: dict[str, list[float]]


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(results: Sequence[Mapping[str, object]]) -> list[Aggregate]:
    """Group per-run results ({"split", "arm", "seed", "metrics"}) by (split, arm)."""
    groups: dict[tuple[str, str], list[Mapping[str, object]]] = {}
    for r in results:
        groups.setdefault((str(r["split"]), str(r["arm"])), []).append(r)
    out = []
    for split in SPLITS:
        for arm in ARMS:
            runs = sorted(groups.get((split, arm), []), key=lambda r: int(str(r["seed"])))
            if not runs:
                continue
            metrics = [r["metrics"] for r in runs if isinstance(r["metrics"], Mapping)]
            names = sorted(set().union(*(m.keys() for m in metrics)))
            values = {n: [float(m[n]) for m in metrics] for n in names}
            out.append(
                Aggregate(
                    split=split,
                    arm=arm,
                    seeds=tuple(int(str(r["seed"])) for r in runs),
                    mean={n: statistics.fmean(v) for n, v in values.items()},
                    std={n: _std(v) for n, v in values.items()},
                    values=values,
                )
            )
    return out


def _cell(row: Aggregate, metric: str, best: float, digits: int = 1) -> str:
    text = f"{row.mean[metric]:.{digits}f} ± {row.std[metric]:.{digits}f}"
    return f"**{text}**" if row.mean[metric] >= best - 1e-9 else text


def _block(rows: Sequence[Aggregate], split: str, columns: Sequence[tuple[str, str]]) -> list[str]:
    header = ["arm", *(label for _, label in columns)]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * len(columns)]
    group = [r for r in rows if r.split == split]
    best = {m: max(r.mean[m] for r in group) for m, _ in columns} if group else {}
    for r in group:
        digits = {m: 2 if m.startswith("sign_") else 1 for m, _ in columns}
        cells = [_cell(r, m, best[m], digits[m]) for m, _ in columns]
        lines.append(f"| {ARMS[r.arm]} | " + " | ".join(cells) + " |")
    return lines


def table(rows: Sequence[Aggregate]) -> str:
    """Per test set: zero-shot accuracy by every rule, and class-level retrieval."""
    seeds = sorted({s for r in rows for s in r.seeds})
    lines = [
        f"Mean ± sample std over seeds {', '.join(map(str, seeds))}; best mean in bold. Chance "
        "is 10 % for accuracy and R@1. *Own rule*: the volume for arms trained last with the "
        "GRAM loss, the cos-sum for cosine arms. *Sign-aligned*: a tower whose mean cosine "
        "with its true class prompt is negative on the test set is negated before cosine "
        "scoring.",
        "",
    ]
    for split in SPLITS:
        group = [r for r in rows if r.split == split]
        if not group:
            continue
        clips = int(group[0].mean["num_clips"])
        lines += [
            f"**{SPLITS[split]}** ({clips} test clips): zero-shot classification from prompts, "
            "top-1 %",
            "",
            *_block(rows, split, RULES),
            "",
            f"**{SPLITS[split]}**: retrieval at class level, % (text→(video+audio): every "
            "prompt queries every clip; video↔audio by cosine), and the mean true-pair cosines",
            "",
            *_block(rows, split, _RETRIEVAL),
            "",
        ]
    return "\n".join(lines)


@dataclass(frozen=True)
class Difference:
    """arm − baseline on one test set and metric, paired by seed."""

    split: str
    arm: str
    baseline: str
    metric: str
    seeds: tuple[int, ...]
    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return _std(self.values)

    @property
    def verdict(self) -> str:
        """`higher` / `lower` when every seed agrees in sign, else `mixed`."""
        if all(v > 0 for v in self.values):
            return "higher in every seed"
        if all(v < 0 for v in self.values):
            return "lower in every seed"
        return "mixed"


def paired_differences(
    results: Sequence[Mapping[str, object]], metrics: Sequence[str] = _ZERO_SHOT
) -> list[Difference]:
    """For every pair in `PAIRS`, test set and metric: the per-seed differences."""
    by_key = {
        (str(r["split"]), str(r["arm"]), int(str(r["seed"]))): r["metrics"]
        for r in results
        if isinstance(r["metrics"], Mapping)
    }
    out = []
    for split in SPLITS:
        for arm, baseline in PAIRS:
            seeds = sorted(
                s
                for (sp, a, s) in by_key
                if sp == split and a == arm and (sp, baseline, s) in by_key
            )
            if not seeds:
                continue
            for metric in metrics:
                values = tuple(
                    float(by_key[split, arm, s][metric]) - float(by_key[split, baseline, s][metric])
                    for s in seeds
                )
                out.append(Difference(split, arm, baseline, metric, tuple(seeds), values))
    return out


def difference_table(diffs: Sequence[Difference]) -> str:
    """Markdown: one row per (test set, pair, rule) with the per-seed differences."""
    labels = dict(RULES)
    lines = [
        "| test set | difference | rule | mean ± std (points) | per seed | verdict |",
        "|---|---|---|---:|---|---|",
    ]
    for d in diffs:
        per_seed = ", ".join(f"{v:+.1f}" for v in d.values)
        lines.append(
            f"| {SPLITS[d.split]} | {ARMS[d.arm]} − {ARMS[d.baseline]} | {labels[d.metric]} "
            f"| {d.mean:+.1f} ± {d.std:.1f} | {per_seed} | {d.verdict} |"
        )
    return "\n".join(lines) + "\n"


def convergence_table(runs: Sequence[Mapping[str, object]]) -> str:
    """Markdown: per arm, the plateau test of every seed (relative change of the mean loss
    from the second-to-last to the last fifth of the steps)."""
    lines = [
        "| arm | steps | final loss (mean of last 20 %) | change vs the 20 % before, per seed "
        "| converged |",
        "|---|---:|---:|---|---|",
    ]
    for arm in ARMS:
        group = sorted((r for r in runs if r["arm"] == arm), key=lambda r: int(str(r["seed"])))
        if not group:
            continue
        changes = [float(str(r["plateau_change"])) for r in group]
        finals = [float(str(r["final_loss"])) for r in group]
        ok = all(bool(r["converged"]) for r in group)
        lines.append(
            f"| {ARMS[arm]} | {group[0]['steps']} | {statistics.fmean(finals):.3f} "
            f"| {', '.join(f'{100 * c:.2f} %' for c in changes)} | {'yes' if ok else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


_COLOURS = {
    "gram": "tab:red",
    "cosine_anchor": "tab:blue",
    "cosine_all": "tab:gray",
    "gram_cosine": "tab:purple",
    "finetune_gram": "tab:orange",
    "finetune_cosine": "tab:cyan",
}


def plot_accuracy(rows: Sequence[Aggregate], path: Path) -> Path:
    """Grouped bars: zero-shot top-1 per scoring rule and arm, one panel per test set.

    Bars are means, error bars the sample std, dots the individual seeds.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rules = RULES[1:4] + RULES[6:]  # volume, cos-sum, cos-sum aligned, cos (t,v)/(t,a) aligned
    splits = [s for s in SPLITS if any(r.split == s for r in rows)]
    fig, axes = plt.subplots(len(splits), 1, figsize=(11, 4.2 * len(splits)), squeeze=False)
    width = 0.8 / len(ARMS)
    for ax, split in zip(axes[:, 0], splits, strict=True):
        x = np.arange(len(rules))
        for k, arm in enumerate(ARMS):
            row = next((r for r in rows if r.split == split and r.arm == arm), None)
            if row is None:
                continue
            pos = x - 0.4 + width * (k + 0.5)
            ax.bar(
                pos,
                [row.mean[m] for m, _ in rules],
                width,
                yerr=[row.std[m] for m, _ in rules],
                capsize=2,
                color=_COLOURS[arm],
                alpha=0.8,
                label=ARMS[arm],
            )
            for j, (m, _) in enumerate(rules):
                ax.scatter([pos[j]] * len(row.values[m]), row.values[m], s=6, color="black")
        ax.axhline(10, color="black", linestyle=":", linewidth=1)
        ax.set_xticks(x, [label for _, label in rules], fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("zero-shot top-1 (%)")
        ax.set_title(f"AV-digits, {SPLITS[split]}")
    axes[0][0].legend(fontsize=7, loc="upper right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Moving average over `window` points ('valid' part only)."""
    v = np.asarray(values, dtype=np.float64)
    window = max(1, min(window, len(v)))
    out: np.ndarray = np.convolve(v, np.ones(window) / window, mode="valid")
    return out


def plot_curves(
    curves: Mapping[str, Sequence[tuple[Sequence[int], Sequence[float]]]],
    path: Path,
    label: str = "training loss",
) -> Path:
    """A loss (`label`) against step, one panel per arm, one line per seed (moving
    average), the two plateau windows shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in ARMS if curves.get(a)]
    cols = 3
    rows = -(-len(arms) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(arms) :]:
        ax.set_visible(False)
    for ax, arm in zip(axes.flat, arms, strict=False):
        for steps, values in curves[arm]:
            window = max(1, len(values) // 40)
            smooth = _smooth(values, window)
            ax.plot(list(steps)[window - 1 :], smooth, color=_COLOURS[arm], alpha=0.8)
        steps = list(curves[arm][0][0])
        if steps:
            fifth = len(steps) // 5
            if fifth:
                ax.axvspan(steps[-2 * fifth], steps[-fifth], color="0.85")
                ax.axvspan(steps[-fifth], steps[-1], color="0.7")
        ax.set_title(ARMS[arm], fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
    fig.suptitle(f"{label.capitalize()} per seed (moving average); shaded: the two plateau windows")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_volumes(volumes: Mapping[str, Mapping[str, Tensor]], path: Path, title: str) -> Path:
    """Histograms of vol(class prompt, video, audio): true class vs the nine others, per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in ARMS if a in volumes]
    cols = 3
    rows = -(-len(arms) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(arms) :]:
        ax.set_visible(False)
    bins = np.linspace(0.0, 1.0, 51)
    for ax, arm in zip(axes.flat, arms, strict=False):
        pos = volumes[arm]["positive"].numpy()
        neg = volumes[arm]["negative"].numpy()
        ax.hist(neg, bins=bins, density=True, alpha=0.6, color="tab:gray", label="other digits")
        ax.hist(pos, bins=bins, density=True, alpha=0.6, color="tab:green", label="true digit")
        ax.set_title(ARMS[arm], fontsize=9)
        ax.set_xlabel("volume of (class prompt, video, audio)")
    axes[0][0].set_ylabel("density")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

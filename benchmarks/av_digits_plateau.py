"""AV-digits on fixed features: does training longer meet the plateau rule?

    PYTHONPATH=. python benchmarks/av_digits_plateau.py          # 3 arms x 3 lengths, ~10 min
    PYTHONPATH=. python benchmarks/av_digits_plateau.py --arms gram --steps 8000 32000 --seed 1

Trains arms of `benchmarks/av_digits_features.py` from scratch with its settings (towers,
batch, optimizer, schedule, 20 corruption draws) on the first corruption of its ladder (the
one its calibration accepted), one seed at several lengths, and prints per run the change
of the mean training loss between the last two fifths (the plateau rule: within 1 %), the
same on the loss over the official test split, and the arm's own-rule zero-shot top-1 on
that split. Numbers repeat on one machine, not across CPUs. `--quick` uses the smoke run's
small feature set (two draws of two takes), for tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import multiprocessing
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.av_digits_features import (
    LADDER,
    PARENTS,
    QUICK,
    REPO,
    SHARED_DATA,
    Settings,
    _features_file,
    train_run,
)
from benchmarks.av_digits_report import ARMS, OWN_RULE, PLATEAU_TOLERANCE

FROM_SCRATCH = [a for a in ARMS if a not in PARENTS]


def _run(path: str, arm: str, seed: int, s: Settings) -> dict[str, Any]:
    """One run, reduced to what the table shows (the worker process's answer)."""
    r = train_run(path, arm, seed, s, None)
    return {
        "arm": arm,
        "seed": seed,
        "steps": s.steps,
        "train_change": r["plateau_change"],
        "test_change": r["test_loss_change"],
        "zero_shot": r["metrics"]["official"]["zs_own"],
        "own_rule": OWN_RULE[arm],
        "seconds": round(r["seconds"], 1),
    }


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The runs as a Markdown table, a change in bold when it is outside the tolerance."""

    def change(x: float) -> str:
        text = f"{100 * x:.2f} %"
        return text if x <= PLATEAU_TOLERANCE else f"**{text}**"

    lines = [
        "| arm | seed | steps | training loss, last two fifths | test loss, same | "
        "zero-shot top-1 (own rule) | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {ARMS[r['arm']]} | {r['seed']} | {r['steps']} | {change(r['train_change'])} | "
            f"{change(r['test_change'])} | {r['zero_shot']:.1f} % | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/av_digits_plateau.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--arms", nargs="+", choices=FROM_SCRATCH, default=["cosine_anchor", "cosine_all", "gram"]
    )
    parser.add_argument("--steps", nargs="+", type=int, default=[8000, 16000, 32000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="the smoke run's small features")
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "av-digits")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "results" / "av_digits_features",
        help="the features cache (shared with av_digits_features.py) and plateau.json",
    )
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (processes)")
    args = parser.parse_args(argv)
    if not (args.data / "fsdd").is_dir():
        raise SystemExit(f"{args.data}: no AV-digits sources (fsdd/, mnist_5k.csv.gz)")
    if min(args.steps) < 10:
        raise SystemExit("--steps: at least 10 steps a run (the rule compares fifths)")
    base = QUICK if args.quick else Settings()
    path = _features_file(args.data, LADDER[0], base, args.out)
    settings = [dataclasses.replace(base, steps=n) for n in args.steps]
    jobs = [(arm, s) for arm in args.arms for s in settings]
    print(f"{len(jobs)} runs on {LADDER[0].describe()} ...", flush=True)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max(1, args.parallel), mp_context=ctx) as pool:
        futures = {
            pool.submit(functools.partial(_run, path, arm, args.seed, s)): k
            for k, (arm, s) in enumerate(jobs)
        }
        done: dict[int, dict[str, Any]] = {}
        for future in as_completed(futures):
            row = done[futures[future]] = future.result()
            print(
                f"[{len(done)}/{len(jobs)}] {row['arm']}, {row['steps']} steps: training loss "
                f"{100 * row['train_change']:.2f} %, zero-shot {row['zero_shot']:.1f} % "
                f"({row['seconds']:.0f} s)",
                flush=True,
            )
    rows = [done[k] for k in range(len(jobs))]
    (args.out / "plateau.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))
    print(f"written: {args.out / 'plateau.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

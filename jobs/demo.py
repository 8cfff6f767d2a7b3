"""The whole pipeline on this machine: clips -> shards -> training -> evaluation -> registry.

    make demo                   # sets up, then runs this
    python -m jobs.demo         # the same, in an existing environment
    python -m jobs.demo output=/tmp/demo train_steps=600

1. makes 96 tri-modal clips with ffmpeg (colour x shape x motion on screen, a tone or
   noise on the soundtrack; every caption names both, so neither text->video nor
   text->audio alone can single a clip out), twice: a training and an evaluation rendering;
2. preprocesses them into WebDataset shards with Ray tasks (local Ray);
3. trains the `tiny` GRAM model with 2 Ray Train workers (global volume negatives);
4. evaluates retrieval (volume vs cosine baselines) and zero-shot classification;
5. registers the model in the local sqlite MLflow registry and promotes it if it passes.

Every step writes under `output` and is skipped when it already finished with the
same settings, so re-running the demo reuses what is done.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gram.config import ConfigError, config_hash, load_config, to_dict
from jobs.common.cli import add_config_arguments, config_help
from jobs.common.demo_steps import DemoSteps


@dataclass
class DemoConfig:
    """output: folder for everything; train_steps: optimizer steps (2 workers x batch)."""

    output: str = "demo-output"
    train_steps: int = 400
    batch_size: int = 16
    workers: int = 2
    model: str = "tiny"
    seed: int = 0
    min_volume_r1: float = 20.0

    def __post_init__(self) -> None:
        if self.train_steps < 1 or self.batch_size < 1 or self.workers < 1:
            raise ConfigError("train_steps, batch_size and workers must be >= 1")


def run(cfg: DemoConfig) -> dict[str, Any]:
    """Run every step (skipping finished ones) and return the summary."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    steps = DemoSteps(Path(cfg.output).resolve(), config_hash(cfg))
    start = time.perf_counter()
    clips = steps.make_clips()
    shards = steps.preprocess(clips)
    checkpoint = steps.train(shards, to_dict(cfg))
    report = steps.evaluate(checkpoint, shards["eval"])
    registry = steps.register_and_promote(checkpoint, shards["eval"], cfg.min_volume_r1)
    return steps.summary(report, registry, time.perf_counter() - start)


def build_parser(prog: str = "python -m jobs.demo") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=config_help(DemoConfig),
    )
    add_config_arguments(parser)
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m jobs.demo") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        cfg = load_config(DemoConfig, args.config, args.overrides)
        summary = run(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    (Path(cfg.output) / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Preprocess video + audio + captions into WebDataset shards on Ray.

    python -m jobs.preprocess --input ../shared/data/media/captions.jsonl --output /tmp/shards
    python -m jobs.preprocess --input s3://bucket/videos/ --output s3://bucket/shards/ \\
        --config jobs/configs/preprocess.yaml s3.endpoint_url=http://127.0.0.1:9000

Joins the Ray cluster at $RAY_ADDRESS when set (e.g. under `ray job submit`),
else starts a local Ray. The output holds `{prefix}-{index:06d}.tar` shards,
`index.json` and `manifest.parquet`; rerunning with the same config resumes.
Exit codes: 0 done, 1 too many inputs failed, 2 bad config/input/output.
See docs/preprocessing.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence

from gram.config import ConfigError, load_config
from jobs.common.cli import add_config_arguments, config_help
from pipelines.config import PreprocessConfig
from pipelines.inputs import ManifestError
from pipelines.preprocess import FailureRateError, Summary, preprocess
from pipelines.ray_adapter import ray_executor
from pipelines.writer import OutputConflictError

__all__ = ["PreprocessConfig", "main", "run"]


def run(config: PreprocessConfig) -> Summary:
    """Preprocess `config.input` into `config.output` on Ray; returns the run's summary.

    Joins `execution.ray_address` or $RAY_ADDRESS, else starts a local Ray,
    only once the inputs are read and checked and there is work left.
    """
    config.require_paths()
    config = dataclasses.replace(config, s3=config.s3.resolved())  # creds for the workers
    return preprocess(config, executor=ray_executor(config))


def build_parser(prog: str = "python -m jobs.preprocess") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        epilog=config_help(PreprocessConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--input", help="manifest (.jsonl/.csv/.parquet) or folder/prefix; local or s3://"
    )
    parser.add_argument("--output", help="folder or s3:// prefix for shards, index and manifest")
    add_config_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m jobs.preprocess") -> int:
    """Command-line entry point; returns the process exit code."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="[%(asctime)s %(name)s] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    try:
        config = load_config(PreprocessConfig, args.config, args.overrides)
        config = dataclasses.replace(
            config, input=args.input or config.input, output=args.output or config.output
        )
        summary = run(config)
    except (ConfigError, ManifestError, OutputConflictError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FailureRateError as exc:
        print("\n".join(exc.summary.lines()), file=sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

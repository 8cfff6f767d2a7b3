"""Preprocess video + audio + captions into WebDataset shards on Ray.

    python -m jobs.preprocess --input ../shared/data/media/captions.jsonl --output /tmp/shards
    python -m jobs.preprocess --input s3://bucket/videos/ --output s3://bucket/shards/ \\
        --config jobs/configs/preprocess.yaml s3.endpoint_url=http://127.0.0.1:9000

Small runs (up to `execution.local_max_inputs` inputs left) run in this
process; larger ones run one Ray task per shard on the cluster at
$RAY_ADDRESS (e.g. under `ray job submit`), else on a local Ray started for
the run (`execution.mode` forces either). The output holds
`{prefix}-{index:06d}.tar` shards, `index.json` and `manifest.parquet`;
rerunning with the same config resumes; a second job on the same output is
refused while the first runs. Exit codes: 0 done, 1 too many inputs failed
(or the job lost its hold on the output), 2 bad config/input, or an output
that holds another run or is in use. See docs/preprocessing.md.
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
from pipelines.lease import LeaseLostError
from pipelines.preprocess import FailureRateError, OutputBusyError, Summary, preprocess
from pipelines.writer import OutputConflictError

__all__ = ["PreprocessConfig", "main", "run"]


def run(config: PreprocessConfig) -> Summary:
    """Preprocess `config.input` into `config.output`; returns the run's summary.

    Where the shards run follows `execution.mode`; Ray is joined (`execution.ray_address`
    or $RAY_ADDRESS) or started only once the inputs are checked and there is work left.
    """
    config.require_paths()
    return preprocess(config)


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
    except (ConfigError, ManifestError, OutputConflictError, OutputBusyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except LeaseLostError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except FailureRateError as exc:
        print("\n".join(exc.summary.lines()), file=sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

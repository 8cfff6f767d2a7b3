"""Preprocess video + audio + captions into WebDataset shards on Ray.

    python -m jobs.preprocess --input manifest.jsonl --output shards/train
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
import sys
from collections.abc import Sequence

from jobs.common.entry import EXIT_FAILED, EXIT_OK, EXIT_USAGE, job_main
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


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input", help="manifest (.jsonl/.csv/.parquet) or folder/prefix; local or s3://"
    )
    parser.add_argument("--output", help="folder or s3:// prefix for shards, index and manifest")


def _apply(config: PreprocessConfig, args: argparse.Namespace) -> PreprocessConfig:
    """`--input` / `--output` win over the config file and the overrides."""
    return dataclasses.replace(
        config, input=args.input or config.input, output=args.output or config.output
    )


def _run(config: PreprocessConfig) -> int:
    try:
        summary = run(config)
    except FailureRateError as exc:
        print("\n".join(exc.summary.lines()), file=sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print("\n".join(summary.lines()))
    return EXIT_OK


def main(argv: Sequence[str] | None = None, prog: str = "python -m jobs.preprocess") -> int:
    """Command-line entry point; returns the process exit code."""
    return job_main(
        argv,
        prog=prog,
        doc=__doc__,
        config=PreprocessConfig,
        run=_run,
        options=_options,
        apply=_apply,
        errors={
            ManifestError: EXIT_USAGE,
            OutputConflictError: EXIT_USAGE,
            OutputBusyError: EXIT_USAGE,
            LeaseLostError: EXIT_FAILED,
        },
    )


if __name__ == "__main__":
    sys.exit(main())

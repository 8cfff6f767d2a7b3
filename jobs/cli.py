"""`gram`: one command for every job.

    gram demo                                   # the whole pipeline on this machine
    gram preprocess --input clips.jsonl --output shards/
    gram inspect shards/ [--samples 12 --out sheet.png]
    gram train --config jobs/configs/train.yaml data.train=shards/
    gram evaluate ... | gram register ... | gram promote ... | gram rollback ...
    gram submit train --address http://HEAD:8265 --config ... --wait
    gram bench av-digits --quick

Every job takes `--config FILE` plus `key=value` overrides checked against its
typed config (a wrong key names itself and the closest valid one);
`gram JOB --help` lists every key with its default.
"""

from __future__ import annotations

import importlib
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

from jobs.catalog import JOBS

__all__ = ["COMMANDS", "main"]


def _commands() -> dict[str, tuple[str, str]]:
    """Command -> (module, summary): every job of `jobs.catalog`, and after `promote`,
    `rollback`, which is `gram promote --rollback`."""
    out: dict[str, tuple[str, str]] = {}
    for job in JOBS:
        out[job.name] = (job.module, job.summary)
        if job.name == "promote":
            out["rollback"] = ("jobs.promote", "give 'champion' back to the previous version")
    return out


COMMANDS = _commands()
BENCHMARKS = {
    "av-digits": "av_digits.py",
    "av-digits-features": "av_digits_features.py",
    "av-digits-plateau": "av_digits_plateau.py",
    "volume": "bench_volume.py",
    "model": "bench_model.py",
    "train": "bench_train.py",
    "preprocess": "bench_preprocess.py",
    "preprocess-scale": "bench_preprocess_scale.py",
}
_REPO = Path(__file__).resolve().parents[1]


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines.append(f"  {'bench':<{width}}  run a benchmark: {', '.join(BENCHMARKS)}")
    return "usage: gram COMMAND [--help] [options] [key=value ...]\n\ncommands:\n" + "\n".join(
        lines
    )


def _bench(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        print(f"usage: gram bench {{{','.join(BENCHMARKS)}}} [options]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    script = _REPO / "benchmarks" / BENCHMARKS[argv[0]]
    if not script.is_file():
        print(f"error: {script} not found: benchmarks run from a source checkout", file=sys.stderr)
        return 2
    sys.argv = [str(script), *argv[1:]]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(__doc__.strip() + "\n\n" + _usage())
        return 0
    name, rest = args[0], args[1:]
    if name == "bench":
        return _bench(rest)
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, [*COMMANDS, "bench"], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"error: unknown command {name!r}{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    if name == "rollback":  # `gram rollback` is `gram promote --rollback`
        rest = ["--rollback", *rest]
    code: int = module.main(rest, prog=f"gram {name}")
    return code


if __name__ == "__main__":
    sys.exit(main())

"""Preprocessing orchestration at scale: driver memory and inputs/s on inputs that fail fast.

    PYTHONPATH=. python benchmarks/bench_preprocess_scale.py            # 10k, 100k, 1M inputs
    PYTHONPATH=. python benchmarks/bench_preprocess_scale.py --quick    # 2k, 10k, 50k

Each size is a JSONL manifest of distinct ids whose videos do not exist, so
every input fails at once (`not_found`) and the run measures only the
orchestration: reading and checking the input (duplicate ids on the on-disk
index), staging each shard's inputs, one Ray task per shard (1,000 inputs)
writing its manifest part and commit file, compacting `manifest.parquet`.
Each run is the real command (`python -m jobs.preprocess`, `execution.mode=ray`)
in a fresh process that starts its own local Ray, as on one machine; its
driver's resident memory is sampled every 0.2 s. Printed per size: wall
time and inputs/s over the whole command; from the job's log, the time
spent reading and checking the input, the time until the first shard task
was submitted (that plus Ray's start-up), the shard phase's rate, and the
time compacting the manifest; the driver's peak RSS and its growth from the
smallest size; its CPU time (sampled, so the last 0.2 s may be missing).
The table prints as Markdown, ready for docs/preprocessing.md, with the load
average at the start and end. Results also go to results/bench_preprocess_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def write_manifest(path: Path, count: int) -> Path:
    """`count` rows with distinct ids and videos that do not exist."""
    with path.open("w", encoding="utf-8") as fh:
        for i in range(count):
            fh.write(
                f'{{"id": "clip-{i:08d}", "video": "missing/{i:08d}.mp4", '
                f'"captions": ["clip number {i}"]}}\n'
            )
    return path


class DriverRss:
    """Peak resident memory (MiB) and CPU time (s) of one process, sampled every 0.2 s."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0.0
        self.cpu = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss / 2**20)
                times = self.proc.cpu_times()
                self.cpu = times.user + times.system
            except psutil.Error:
                return
            time.sleep(0.2)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def _clock(line: str) -> float | None:
    """Seconds of the day of a job's log line (`YYYY-MM-DD HH:MM:SS,mmm LEVEL name: ...`)."""
    match = re.match(r"\d{4}-\d\d-\d\d (\d\d):(\d\d):(\d\d)", line)
    if match is None:
        return None
    h, m, s = (int(g) for g in match.groups())
    return float(h * 3600 + m * 60 + s)


def run_one(manifest: Path, count: int, work: Path) -> dict[str, float]:
    """One `jobs.preprocess` run over `manifest`; returns its measurements."""
    out = work / f"out-{count}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["RAY_TMPDIR"] = str(work / "ray")  # this run's Ray keeps its files here
    cmd = [
        sys.executable, "-m", "jobs.preprocess", "--input", str(manifest), "--output", str(out),
        "execution.mode=ray", "execution.max_failure_rate=1", "execution.progress_interval_s=5",
        f"execution.spool_dir={work}",
    ]  # fmt: skip
    start = time.perf_counter()
    started_at = datetime.now()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rss = DriverRss(proc.pid)
    log, _ = proc.communicate()
    seconds = time.perf_counter() - start
    peak = rss.stop()
    cpu = rss.cpu
    if proc.returncode != 0:
        raise RuntimeError(f"run of {count} inputs failed:\n{log[-3000:]}")
    index = json.loads((out / "_state" / "run.json").read_text())
    if index["input"]["count"] != count:
        raise RuntimeError(f"expected {count} inputs, the run saw {index['input']['count']}")
    first_task = next((_clock(x) for x in log.splitlines() if "shard tasks on" in x), None)
    zero = started_at.hour * 3600 + started_at.minute * 60 + started_at.second
    before_tasks = (first_task - zero) % 86400 if first_task is not None else float("nan")
    plan = _seconds(log, r"read and checked \d+ inputs in ([\d.]+) s")
    finish = _seconds(log, r"manifest of \d+ shards compacted in ([\d.]+) s")
    shutil.rmtree(out, ignore_errors=True)
    return {
        "inputs": count,
        "seconds": seconds,
        "inputs_per_s": count / seconds,
        "seconds_reading_inputs": plan,
        "seconds_before_tasks": before_tasks,
        "inputs_per_s_in_tasks": count / max(seconds - before_tasks - finish, 1e-9),
        "seconds_compacting": finish,
        "peak_driver_rss_mb": peak,
        "driver_cpu_s": cpu,
    }


def _seconds(log: str, pattern: str) -> float:
    match = re.search(pattern, log)
    return float(match.group(1)) if match else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2k, 10k and 50k inputs")
    parser.add_argument("--sizes", type=int, nargs="*", help="input counts to run instead")
    parser.add_argument("--work", default="", help="scratch folder (default: a temp folder)")
    args = parser.parse_args()
    sizes = args.sizes or ([2_000, 10_000, 50_000] if args.quick else [10_000, 100_000, 1_000_000])
    work = Path(args.work or tempfile.mkdtemp(prefix="gram-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    results = []
    for count in sizes:
        manifest = write_manifest(work / f"manifest-{count}.jsonl", count)
        print(f"{count} inputs ...", flush=True)
        results.append(run_one(manifest, count, work))
        manifest.unlink()
        print(json.dumps(results[-1]), flush=True)
    load_end = os.getloadavg()
    base = results[0]["peak_driver_rss_mb"]
    lines = [
        "| inputs | wall s | inputs/s | reading the input, s | until the 1st task, s "
        "| shard phase, inputs/s | compaction, s | driver CPU, s | driver peak RSS, MB |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        growth = r["peak_driver_rss_mb"] - base
        rss = f"{r['peak_driver_rss_mb']:.0f}" + (
            f" ({growth:+.0f})" if r is not results[0] else ""
        )
        lines.append(
            f"| {r['inputs']:,} | {r['seconds']:.1f} | {r['inputs_per_s']:,.0f} "
            f"| {r['seconds_reading_inputs']:.1f} | {r['seconds_before_tasks']:.0f} "
            f"| {r['inputs_per_s_in_tasks']:,.0f} | {r['seconds_compacting']:.1f} "
            f"| {r['driver_cpu_s']:.1f} | {rss} |"
        )
    lines += [
        "",
        f"Load average at the start {', '.join(f'{x:.1f}' for x in load_start)}; "
        f"at the end {', '.join(f'{x:.1f}' for x in load_end)} ({os.cpu_count()} CPUs).",
    ]
    print("\n".join(lines))
    out = REPO / "results" / "bench_preprocess_scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "load": [load_start, load_end]}, indent=2))
    print(f"wrote {out}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

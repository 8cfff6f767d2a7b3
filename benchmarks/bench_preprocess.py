"""Preprocessing throughput and memory: the Ray Data pipeline against the bare ffmpeg bound.

    PYTHONPATH=. python benchmarks/bench_preprocess.py            # ~10 min on 2 cores
    PYTHONPATH=. python benchmarks/bench_preprocess.py --quick    # smaller, for a smoke run

1. Throughput on 200 generated clips (5 s, 640x360, 25 fps, h264 + aac
   stereo) and on the real clips of ../shared/data/media (rows repeated to
   60 inputs): the pipeline (local Ray, all CPUs, warmed up) against the
   bound = the same per-clip work (`pipelines.stages.process_item`: ffprobe,
   one ffmpeg for the frames, one for the audio, JPEG/FLAC/tar packing) in a
   plain multiprocessing.Pool with one process per CPU, no Ray, no writing.
2. Scaling: the pipeline on 1 CPU vs 2 CPUs.
3. Memory: peak RSS (driver, and the sum over the driver's whole process
   tree: Ray's GCS, raylet, workers, ffmpeg) for 500 vs 2,000 inputs.
Results print as a table and go to results/bench_preprocess.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from pipelines.config import PreprocessConfig
from pipelines.inputs import InputItem, read_inputs
from pipelines.stages import Stage, build_stages, process_item
from pipelines.synthetic import ClipSpec, make_clip, write_jsonl

REPO = Path(__file__).resolve().parents[1]
SHARED_MEDIA = Path(os.environ.get("GRAM_SHARED_DATA", REPO.parent / "shared" / "data")) / "media"
BENCH_SPEC = ClipSpec(width=640, height=360, fps=25, duration=5.0, audio_channels=2)
SMALL_SPEC = ClipSpec(width=320, height=180, fps=25, duration=2.0, audio_channels=2)

_STAGES: list[Stage] | None = None  # set in each pool worker by `_init_bound`


def _make(args: tuple[ClipSpec, str]) -> str:
    spec, path = args
    if not Path(path).exists():
        make_clip(spec, path)
    return path


def make_set(folder: Path, spec: ClipSpec, files: int, rows: int) -> Path:
    """`files` distinct clips, listed `rows` times (distinct ids) in a JSONL manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(folder / f"clip_{i:04d}.mp4") for i in range(files)]
    with mp.Pool(os.cpu_count()) as pool:
        pool.map(_make, [(spec, p) for p in paths])
    manifest = folder / f"manifest_{rows}.jsonl"
    write_jsonl(
        (
            {"id": f"row_{i:05d}", "video": Path(paths[i % files]).name, "captions": [f"clip {i}"]}
            for i in range(rows)
        ),
        manifest,
    )
    return manifest


def repeat_manifest(source: Path, times: int, dest: Path) -> Path:
    """The rows of `source` repeated `times` times with distinct ids (absolute paths)."""
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    write_jsonl(
        (
            {**r, "id": f"{r['id']}_{k}", "video": str(source.parent / r["video"])}
            for k in range(times)
            for r in rows
        ),
        dest,
    )
    return dest


def _init_bound() -> None:
    global _STAGES
    _STAGES = build_stages(PreprocessConfig())


def _bound_one(item: InputItem) -> str:
    if _STAGES is None:
        raise RuntimeError("_bound_one runs in a pool initialised by _init_bound")
    status: str = process_item(_STAGES, item, timeout_s=300).row["status"]
    return status


def bound(manifest: Path, procs: int) -> dict[str, float]:
    """The same per-clip work in a plain process pool: clips/s."""
    items = read_inputs(str(manifest), PreprocessConfig().inputs)
    start = time.perf_counter()
    with mp.Pool(procs, initializer=_init_bound) as pool:
        statuses = list(pool.imap_unordered(_bound_one, items, chunksize=1))
    seconds = time.perf_counter() - start
    return {
        "clips": len(items),
        "ok": statuses.count("ok"),
        "seconds": seconds,
        "clips_per_s": len(items) / seconds,
    }


class PeakRss:
    """Samples RSS of this process and of its whole process tree every 0.2 s."""

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.driver = self.tree = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for p in [self.me, *self.me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            self.driver = max(self.driver, self.me.memory_info().rss)
            self.tree = max(self.tree, total)
            time.sleep(0.2)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def child(args: argparse.Namespace) -> None:
    """One pipeline measurement in a fresh local Ray with `args.cpus` CPUs (prints JSON)."""
    import ray

    from pipelines.preprocess import preprocess
    from pipelines.ray_adapter import ray_executor

    os.environ.pop("RAY_ADDRESS", None)
    with PeakRss() as rss:
        ray.init(
            num_cpus=args.cpus,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
        tmp = Path(tempfile.mkdtemp(prefix="gram-bench-"))
        if args.warmup:
            cfg = PreprocessConfig(input=args.warmup, output=str(tmp / "warmup"))
            preprocess(cfg, ray_executor(cfg))
        cfg = PreprocessConfig(input=args.manifest, output=str(tmp / "out"))
        cfg.execution.progress_interval_s = 30
        start = time.perf_counter()
        summary = preprocess(cfg, ray_executor(cfg))
        seconds = time.perf_counter() - start
        ray.shutdown()
    print(
        json.dumps(
            {
                "clips": summary.inputs,
                "ok": summary.ok,
                "seconds": seconds,
                "clips_per_s": summary.inputs / seconds,
                "bytes": summary.bytes_written,
                "peak_driver_rss_mb": rss.driver / 2**20,
                "peak_tree_rss_mb": rss.tree / 2**20,
            }
        )
    )


def pipeline(manifest: Path, cpus: int, warmup: Path | None) -> dict[str, float]:
    """Run `child` in a subprocess (a fresh Ray each time) and return its JSON."""
    cmd = [sys.executable, __file__, "--child", "--manifest", str(manifest), "--cpus", str(cpus)]
    if warmup is not None:
        cmd += ["--warmup", str(warmup)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"pipeline run failed:\n{res.stderr[-3000:]}")
    out: dict[str, float] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sets (a smoke run)")
    parser.add_argument("--work", default=str(REPO / "results" / "bench-media"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", help=argparse.SUPPRESS)
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    cpus = os.cpu_count() or 1
    work = Path(args.work)
    n_main, n_small, n_large = (40, 100, 400) if args.quick else (200, 500, 2000)
    machine: dict[str, int | tuple[float, float, float]] = {
        "cpus": cpus,
        "load_avg_at_start": os.getloadavg(),
    }
    results: dict[str, dict[str, float]] = {}
    print(f"generating clips in {work} ...", flush=True)
    bench = make_set(work / "bench640", BENCH_SPEC, n_main, n_main)
    small = make_set(work / "small320", SMALL_SPEC, 50, n_large)
    small_500 = make_set(work / "small320", SMALL_SPEC, 50, n_small)
    warm = make_set(work / "small320", SMALL_SPEC, 50, 8)

    print("bound: same ffmpeg work in a multiprocessing.Pool ...", flush=True)
    results["bound_generated"] = bound(bench, cpus)
    print("pipeline on generated clips ...", flush=True)
    results["pipeline_generated"] = pipeline(bench, cpus, warm)
    results["pipeline_generated_1cpu"] = pipeline(bench, 1, warm)
    results["pipeline_generated_cold"] = pipeline(bench, cpus, None)
    if (SHARED_MEDIA / "captions.jsonl").is_file():
        real = repeat_manifest(SHARED_MEDIA / "captions.jsonl", 10, work / "real_x10.jsonl")
        print("real clips ...", flush=True)
        results["bound_real"] = bound(real, cpus)
        results["pipeline_real"] = pipeline(real, cpus, warm)
    print("memory: 500 vs 2000 inputs ...", flush=True)
    results["memory_small"] = pipeline(small_500, cpus, warm)
    results["memory_large"] = pipeline(small, cpus, warm)
    machine["load_avg_at_end"] = os.getloadavg()

    def ratio(a: str, b: str) -> float:
        return results[a]["clips_per_s"] / results[b]["clips_per_s"]

    lines = [
        f"generated {n_main} x 5 s 640x360 h264+aac: bound "
        f"{results['bound_generated']['clips_per_s']:.2f} clips/s, pipeline "
        f"{results['pipeline_generated']['clips_per_s']:.2f} clips/s "
        f"-> ratio {ratio('pipeline_generated', 'bound_generated'):.2f} "
        f"(cold, incl. Ray start: {results['pipeline_generated_cold']['clips_per_s']:.2f})",
        f"scaling: 1 CPU {results['pipeline_generated_1cpu']['clips_per_s']:.2f} clips/s, "
        f"{cpus} CPUs {results['pipeline_generated']['clips_per_s']:.2f} clips/s "
        f"-> x{ratio('pipeline_generated', 'pipeline_generated_1cpu'):.2f}",
    ]
    if "bound_real" in results:
        lines.append(
            f"real clips (6 x10 rows): bound {results['bound_real']['clips_per_s']:.2f} clips/s, "
            f"pipeline {results['pipeline_real']['clips_per_s']:.2f} clips/s -> ratio "
            f"{ratio('pipeline_real', 'bound_real'):.2f}"
        )
    for key, n in (("memory_small", n_small), ("memory_large", n_large)):
        r = results[key]
        lines.append(
            f"memory, {n} inputs: peak driver RSS {r['peak_driver_rss_mb']:.0f} MB, "
            f"peak process-tree RSS {r['peak_tree_rss_mb']:.0f} MB "
            f"({r['clips_per_s']:.1f} clips/s)"
        )
    lines.append(
        f"load average start/end: {machine['load_avg_at_start']} / {machine['load_avg_at_end']}"
    )
    print("\n".join(lines))
    out = REPO / "results" / "bench_preprocess.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, **results, "summary": lines}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

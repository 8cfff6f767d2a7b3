"""Preprocessing speed: the per-clip path against the plain ffmpeg loop, and the Ray Data pipeline.

    PYTHONPATH=. python benchmarks/bench_preprocess.py               # both parts, ~15 min, 2 cores
    PYTHONPATH=. python benchmarks/bench_preprocess.py --part speed  # per-clip speed only, ~5 min
    PYTHONPATH=. python benchmarks/bench_preprocess.py --quick       # smaller sets, a smoke run

Part `speed`, every number measured side by side in one run:
1. Start-up and probe cost in CPU ms per call: the system's ffmpeg and ffprobe
   (a distribution's dynamically linked build), the static ffmpeg of the
   imageio-ffmpeg wheel, and `media.probe` (PyAV, in process).
2. Steady state on 200 generated clips (5 s, 640x360, 25 fps, h264 + aac
   stereo). The baseline is the plain loop as a user writes it: per clip,
   ffprobe for the duration, then one ffmpeg that decodes the clip through an
   `fps` filter into 8 JPEG files and a 16 kHz mono WAV of at most 10 s, one
   clip after another (ffmpeg's default threads use every core). It runs with
   the system's ffmpeg/ffprobe, with the static ffmpeg (ffprobe stays the
   system's: the wheel has none), and with one process per CPU. Against it:
   the per-clip chain (`pipelines.stages.process_item`: probe, one ffmpeg
   run for frames and audio, JPEG/FLAC/tar packing) in a process pool with
   one process per CPU, after a warm-up, no writing; and the Ray Data
   pipeline after a warm-up run (Ray started; shards, index and manifest
   written: the steady state of a long job).
3. End to end on the same 200 clips, start-up included: `python -m
   jobs.preprocess` as a user runs it (it starts a local Ray, writes shards,
   index and manifest) against the plain loop.
4. 2-minute clips: the plain loop (it decodes the whole clip) against the
   chain (it seeks to the sampled frames and decodes 10 s of audio).

Part `pipeline`: the Ray Data pipeline against the same per-clip work in a
process pool (warm, cold, 1 vs all CPUs, the shared real clips), and peak RSS
for 500 vs 2,000 inputs. Results print as a table and go to
results/bench_preprocess.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from pipelines import media
from pipelines.config import PreprocessConfig
from pipelines.inputs import InputItem, read_inputs
from pipelines.stages import Stage, build_stages, process_item
from pipelines.synthetic import ClipSpec, make_clip, write_jsonl

REPO = Path(__file__).resolve().parents[1]
SHARED_MEDIA = Path(os.environ.get("GRAM_SHARED_DATA", REPO.parent / "shared" / "data")) / "media"
BENCH_SPEC = ClipSpec(width=640, height=360, fps=25, duration=5.0, audio_channels=2)
LONG_SPEC = ClipSpec(width=640, height=360, fps=25, duration=120.0, audio_channels=2)
SMALL_SPEC = ClipSpec(width=320, height=180, fps=25, duration=2.0, audio_channels=2)
NUM_FRAMES, FRAME_SIZE, AUDIO_RATE, AUDIO_SECONDS = 8, 224, 16_000, 10.0
"""What both sides produce per clip: the pipeline's defaults."""

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
    media.ffmpeg_exe()  # resolved once per process, as in a pipeline worker


def _bound_one(item: InputItem) -> str:
    if _STAGES is None:
        raise RuntimeError("_bound_one runs in a pool initialised by _init_bound")
    status: str = process_item(_STAGES, item, timeout_s=300).row["status"]
    return status


def bound(manifest: Path, procs: int, *, warmup: int = 0) -> dict[str, float]:
    """The per-clip chain in a plain process pool (no Ray, no writing): clips/s.

    With `warmup` > 0, that many clips per process run first and are not
    timed (steady state); else the pool's start is timed too.
    """
    items = read_inputs(str(manifest), PreprocessConfig().inputs)
    start = time.perf_counter()
    with mp.Pool(procs, initializer=_init_bound) as pool:
        if warmup:
            list(pool.imap_unordered(_bound_one, items[: warmup * procs], chunksize=1))
            start = time.perf_counter()
        statuses = list(pool.imap_unordered(_bound_one, items, chunksize=1))
    seconds = time.perf_counter() - start
    return {
        "clips": len(items),
        "ok": statuses.count("ok"),
        "seconds": seconds,
        "clips_per_s": len(items) / seconds,
    }


def plain_clip(args: tuple[str, str, str]) -> str:
    """One clip the way a user's shell loop does it: ffprobe, then one whole-clip ffmpeg."""
    ffmpeg, ffprobe, video = args
    with tempfile.TemporaryDirectory(prefix="gram-plain-") as out:
        probe = ["-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", video]
        duration = float(
            subprocess.run([ffprobe, *probe], capture_output=True, text=True, check=True).stdout
        )
        vf = (
            f"fps={NUM_FRAMES}/{duration:.6f},scale={FRAME_SIZE}:{FRAME_SIZE}:"
            f"force_original_aspect_ratio=increase,crop={FRAME_SIZE}:{FRAME_SIZE}"
        )
        frames = ["-vf", vf, "-frames:v", str(NUM_FRAMES), f"{out}/f%02d.jpg"]
        audio = [
            "-vn",
            "-ac",
            "1",
            "-ar",
            str(AUDIO_RATE),
            "-t",
            str(AUDIO_SECONDS),
            f"{out}/a.wav",
        ]
        subprocess.run(
            [ffmpeg, "-nostdin", "-v", "error", "-y", "-i", video, *frames, *audio],
            capture_output=True,
            check=True,
        )
        return "ok" if len(os.listdir(out)) == NUM_FRAMES + 1 else "failed"


def plain_loop(manifest: Path, ffmpeg: str, ffprobe: str, procs: int) -> dict[str, float]:
    """The plain loop over the manifest's clips: in this process (procs=1), else a pool."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    jobs = [(ffmpeg, ffprobe, str(manifest.parent / r["video"])) for r in rows]
    start = time.perf_counter()
    if procs == 1:
        statuses = [plain_clip(job) for job in jobs]
    else:
        with mp.Pool(procs) as pool:
            statuses = list(pool.imap_unordered(plain_clip, jobs, chunksize=1))
    seconds = time.perf_counter() - start
    return {
        "clips": len(jobs),
        "ok": statuses.count("ok"),
        "seconds": seconds,
        "clips_per_s": len(jobs) / seconds,
    }


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _cpu_ms(call: Callable[[], object], repeats: int, *, children: bool) -> float:
    """Median CPU ms of `call` (its child processes' CPU, or this process's)."""
    samples = []
    for _ in range(repeats):
        before = _children_cpu_s() if children else time.process_time()
        call()
        after = _children_cpu_s() if children else time.process_time()
        samples.append((after - before) * 1000)
    return sorted(samples)[len(samples) // 2]


def startup_and_probe(clip: str, repeats: int) -> dict[str, float]:
    """CPU ms per call: starting each ffmpeg, and each way to probe a clip."""
    system_ffmpeg, system_ffprobe = shutil.which("ffmpeg") or "", shutil.which("ffprobe") or ""
    static = media.ffmpeg_exe()

    def run(*args: str) -> Callable[[], object]:
        return lambda: subprocess.run(list(args), capture_output=True, check=False)

    media.probe(clip, timeout_s=60)  # PyAV imported and warm
    return {
        "system_ffmpeg_version": _cpu_ms(run(system_ffmpeg, "-version"), repeats, children=True),
        "static_ffmpeg_version": _cpu_ms(run(static, "-version"), repeats, children=True),
        "system_ffprobe_json": _cpu_ms(
            run(
                system_ffprobe, "-v", "error", "-show_format", "-show_streams", "-of", "json", clip
            ),
            repeats,
            children=True,
        ),
        "static_ffmpeg_dash_i": _cpu_ms(
            run(static, "-hide_banner", "-i", clip), repeats, children=True
        ),
        "pyav_probe_in_process": _cpu_ms(
            lambda: media.probe(clip, timeout_s=60), repeats, children=False
        ),
    }


def cpu_per_clip(manifest: Path, ffmpeg: str, ffprobe: str, count: int) -> dict[str, float]:
    """CPU seconds per clip (this process and its children), one clip after another:
    the work each way costs, which the machine's load does not change."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    videos = [str(manifest.parent / r["video"]) for r in rows[:count]]
    items = read_inputs(str(manifest), PreprocessConfig().inputs)[:count]
    stages = build_stages(PreprocessConfig())
    process_item(stages, items[0], timeout_s=300)  # PyAV imported, ffmpeg resolved

    def cpu() -> float:
        return time.process_time() + _children_cpu_s()

    out = {}
    for name, run in (
        ("plain_system", lambda v, _: plain_clip((ffmpeg, ffprobe, v))),
        ("plain_static", lambda v, _: plain_clip((media.ffmpeg_exe(), ffprobe, v))),
        ("chain", lambda _, item: process_item(stages, item, timeout_s=300)),
    ):
        start = cpu()
        for video, item in zip(videos, items, strict=True):
            run(video, item)
        out[name] = (cpu() - start) / len(videos)
    return out


def end_to_end(manifest: Path, work: Path) -> dict[str, float]:
    """`python -m jobs.preprocess` as a user runs it, start-up included: clips/s."""
    out = work / "e2e-out"
    shutil.rmtree(out, ignore_errors=True)
    ray_tmp = Path(tempfile.mkdtemp(prefix="gram-bench-ray-"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(ray_tmp)  # this run's own Ray folder
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "jobs.preprocess", "--input", str(manifest), "--output", str(out)]
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    seconds = time.perf_counter() - start
    shutil.rmtree(ray_tmp, ignore_errors=True)
    if res.returncode != 0:
        raise RuntimeError(f"jobs.preprocess failed:\n{res.stderr[-3000:]}")
    index = json.loads((out / "index.json").read_text())
    clips = int(index["totals"]["inputs"])
    return {
        "clips": clips,
        "ok": int(index["totals"]["ok"]),
        "seconds": seconds,
        "clips_per_s": clips / seconds,
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
        tmp = Path(tempfile.mkdtemp(prefix="gram-bench-"))
        ray.init(
            num_cpus=args.cpus,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            _temp_dir=str(tmp / "ray"),  # this run's own Ray folder
        )
        if args.warmup:
            cfg = PreprocessConfig(input=args.warmup, output=str(tmp / "warmup"))
            preprocess(cfg, ray_executor(cfg))
        cfg = PreprocessConfig(input=args.manifest, output=str(tmp / "out"))
        cfg.execution.progress_interval_s = 30
        start = time.perf_counter()
        summary = preprocess(cfg, ray_executor(cfg))
        seconds = time.perf_counter() - start
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
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


def speed_part(work: Path, quick: bool, cpus: int) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Part `speed`: the per-clip path against the plain loop (see the module docstring)."""
    n_clips, n_long = (40, 4) if quick else (200, 8)
    system = (shutil.which("ffmpeg") or "ffmpeg", shutil.which("ffprobe") or "ffprobe")
    static = media.ffmpeg_exe()
    print(f"generating {n_clips} x 5 s and {n_long} x 2 min clips in {work} ...", flush=True)
    clips = make_set(work / "bench640", BENCH_SPEC, n_clips, n_clips)
    long = make_set(work / "long640", LONG_SPEC, n_long, n_long)
    r: dict[str, dict[str, float]] = {}
    print("start-up and probe cost ...", flush=True)
    r["cpu_ms_per_call"] = startup_and_probe(str(work / "bench640" / "clip_0000.mp4"), 15)
    print("CPU per clip ...", flush=True)
    r["cpu_s_per_clip"] = cpu_per_clip(clips, *system, 20)
    r["cpu_s_per_clip_long"] = cpu_per_clip(long, *system, min(n_long, 4))
    print("5 s clips: plain loop (system, static, one per CPU), chain ...", flush=True)
    r["plain_system"] = plain_loop(clips, *system, 1)
    r["plain_static"] = plain_loop(clips, static, system[1], 1)
    r["plain_system_per_cpu"] = plain_loop(clips, *system, cpus)
    r["chain_steady"] = bound(clips, cpus, warmup=2)
    print("5 s clips: the Ray Data pipeline after a warm-up run ...", flush=True)
    warm = make_set(work / "small320", SMALL_SPEC, 8, 8)
    r["pipeline_warm"] = pipeline(clips, cpus, warm)
    print("end to end: python -m jobs.preprocess ...", flush=True)
    r["jobs_preprocess_e2e"] = end_to_end(clips, work)
    print("2-minute clips: plain loop, chain ...", flush=True)
    r["long_plain_system"] = plain_loop(long, *system, 1)
    r["long_plain_system_per_cpu"] = plain_loop(long, *system, cpus)
    r["long_chain"] = bound(long, cpus, warmup=0)

    def rate(key: str) -> float:
        return r[key]["clips_per_s"]

    ms = r["cpu_ms_per_call"]
    table = [
        ("5 s clips, plain loop, system ffprobe + ffmpeg", "plain_system", "plain_system"),
        ("5 s clips, plain loop, system ffprobe + static ffmpeg", "plain_static", "plain_system"),
        (f"5 s clips, plain loop, {cpus} processes", "plain_system_per_cpu", "plain_system"),
        (f"5 s clips, per-clip chain, {cpus} processes (steady)", "chain_steady", "plain_system"),
        ("5 s clips, Ray Data pipeline, warm (shards written)", "pipeline_warm", "plain_system"),
        ("5 s clips, jobs.preprocess end to end", "jobs_preprocess_e2e", "plain_system"),
        ("2 min clips, plain loop (whole-clip decode)", "long_plain_system", "long_plain_system"),
        (
            f"2 min clips, plain loop, {cpus} processes",
            "long_plain_system_per_cpu",
            "long_plain_system",
        ),
        (f"2 min clips, per-clip chain, {cpus} processes", "long_chain", "long_plain_system"),
    ]
    lines = [
        "CPU ms per call (median): start ffmpeg -version: system "
        f"{ms['system_ffmpeg_version']:.0f}, static {ms['static_ffmpeg_version']:.0f}; "
        "probe a clip: "
        f"system ffprobe {ms['system_ffprobe_json']:.0f}, static ffmpeg -i "
        f"{ms['static_ffmpeg_dash_i']:.0f}, PyAV in process {ms['pyav_probe_in_process']:.1f}",
        f"{'run':58s} {'clips':>5s} {'ok':>5s} {'s':>7s} {'clips/s':>8s} {'vs plain':>9s}",
    ]
    for label, key, base in table:
        x = r[key]
        lines.append(
            f"{label:58s} {x['clips']:5.0f} {x['ok']:5.0f} {x['seconds']:7.1f} "
            f"{x['clips_per_s']:8.2f} {rate(key) / rate(base):8.2f}x"
        )
    for key, label in (("cpu_s_per_clip", "5 s"), ("cpu_s_per_clip_long", "2 min")):
        c = r[key]
        lines.append(
            f"CPU s per {label} clip, one after another: plain loop {c['plain_system']:.3f} "
            f"(static ffmpeg {c['plain_static']:.3f}), chain {c['chain']:.3f} -> "
            f"{c['plain_system'] / c['chain']:.2f}x less CPU"
        )
    lines.append(
        f"chain vs plain loop with {cpus} processes: 5 s clips "
        f"{rate('chain_steady') / rate('plain_system_per_cpu'):.2f}x, 2 min clips "
        f"{rate('long_chain') / rate('long_plain_system_per_cpu'):.2f}x"
    )
    return r, lines


def pipeline_part(
    work: Path, quick: bool, cpus: int
) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Part `pipeline`: Ray Data against the same per-clip work in a pool, and memory."""
    n_main, n_small, n_large = (40, 100, 400) if quick else (200, 500, 2000)
    print(f"generating clips in {work} ...", flush=True)
    bench = make_set(work / "bench640", BENCH_SPEC, n_main, n_main)
    small = make_set(work / "small320", SMALL_SPEC, 50, n_large)
    small_500 = make_set(work / "small320", SMALL_SPEC, 50, n_small)
    warm = make_set(work / "small320", SMALL_SPEC, 50, 8)
    results: dict[str, dict[str, float]] = {}
    print("bound: same per-clip work in a multiprocessing.Pool ...", flush=True)
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
        x = results[key]
        lines.append(
            f"memory, {n} inputs: peak driver RSS {x['peak_driver_rss_mb']:.0f} MB, "
            f"peak process-tree RSS {x['peak_tree_rss_mb']:.0f} MB "
            f"({x['clips_per_s']:.1f} clips/s)"
        )
    return results, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sets (a smoke run)")
    parser.add_argument(
        "--part", choices=("all", "speed", "pipeline"), default="all", help="what to measure"
    )
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
    machine: dict[str, object] = {
        "cpus": cpus,
        "load_avg_at_start": os.getloadavg(),
        "system_ffmpeg": _version(shutil.which("ffmpeg") or "ffmpeg"),
        "static_ffmpeg": _version(media.ffmpeg_exe()),
    }
    results: dict[str, dict[str, float]] = {}
    lines: list[str] = []
    for part, run in (("speed", speed_part), ("pipeline", pipeline_part)):
        if args.part in ("all", part):
            part_results, part_lines = run(work, args.quick, cpus)
            results.update({f"{part}.{k}": v for k, v in part_results.items()})
            lines += part_lines
    machine["load_avg_at_end"] = os.getloadavg()
    lines.append(
        f"load average start/end: {machine['load_avg_at_start']} / {machine['load_avg_at_end']}"
    )
    lines.append(f"system ffmpeg: {machine['system_ffmpeg']}; static: {machine['static_ffmpeg']}")
    print("\n".join(lines))
    out = REPO / "results" / "bench_preprocess.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, **results, "summary": lines}, indent=2))
    print(f"wrote {out}")


def _version(binary: str) -> str:
    res = subprocess.run([binary, "-version"], capture_output=True, text=True, check=False)
    return (res.stdout.splitlines() or ["?"])[0]


if __name__ == "__main__":
    main()

"""Preprocessing speed: the real job against the plain two-call ffmpeg loop, side by side.

    PYTHONPATH=. python benchmarks/bench_preprocess.py               # both parts, ~25 min, 2 cores
    PYTHONPATH=. python benchmarks/bench_preprocess.py --part speed  # the speed goals, ~12 min
    PYTHONPATH=. python benchmarks/bench_preprocess.py --part e2e    # end to end only, ~4 min
    PYTHONPATH=. python benchmarks/bench_preprocess.py --quick       # smaller sets, a smoke run

The baseline, measured in the same run, is the plain loop as a user writes it:
per clip, ffprobe for the duration, then one ffmpeg that decodes the whole clip
through an `fps` filter into 8 JPEG files and a 16 kHz mono WAV of at most
10 s, one clip after another, with the system's ffmpeg and ffprobe (ffmpeg's
default threads use every core). "The job" is `pipelines.preprocess.preprocess`,
what `gram preprocess` runs: shard tasks that decode, write the shards, the
manifest and `index.json`.

Part `speed`:
1. CPU ms per call: starting the system's ffmpeg and the static ffmpeg of the
   imageio-ffmpeg wheel, and probing a clip with ffprobe, with `ffmpeg -i`
   and with `media.probe` (PyAV, in process).
2. CPU s per clip, one clip after another (what each way costs, whatever the
   load): the plain loop (system and static ffmpeg) against the per-clip chain
   (`pipelines.stages.process_item`: probe, one ffmpeg run for frames and
   audio, JPEG/FLAC/tar packing), on 5 s clips, on 2-minute clips with a
   keyframe every 10 s (x264's default of 250 frames) and every 2 s, and on
   30 s clips with a keyframe every second.
3. 200 generated 5 s clips (640x360, 25 fps, h264 + aac stereo): the plain
   loop (also with the static ffmpeg, and with one process per CPU); the chain
   in a process pool after a warm-up, no writing (the bound); the job with
   `execution.mode=ray` after a warm-up run in the same Ray (Ray up, workers
   warm: the steady state of a long job); the job with `execution.mode=local`
   after a warm-up (in process, one clip after another); `gram preprocess`
   end to end as a user runs it, start-up included (200 inputs: Ray), and
   the same with `execution.mode=local`.
4. 8 generated 2-minute clips: the plain loop (it decodes the whole clip)
   against the chain in a pool and the job (`execution.mode=ray`, warm).
5. One clip: `gram preprocess` end to end (in process: up to
   `execution.local_max_inputs` inputs run without Ray), median of 3, with
   the CPU it used.

Part `e2e` is only the end-to-end rows of `speed` (3 and 5) and their
baseline: start-up times suffer most from other work, so run it when the
machine is quiet.

Part `pipeline`, what orchestration costs: the job against the bound on the same
clips (`execution.mode=ray` warm and cold, Ray's start-up included; 1 CPU
against all; `execution.mode=local` against a 1-process bound; the real clips
of `$GRAM_SHARED_DATA/media` when present) and the driver's peak RSS at 500 and
2,000 inputs.

Each table prints as Markdown, ready for docs/preprocessing.md, under the load
average at the start and end of the run: on a shared machine the ratios in one
run are meaningful, the absolute times are not. Results also go to
results/bench_preprocess.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
LONG_GOP2_SPEC = dataclasses.replace(LONG_SPEC, keyframe_s=2.0)
MID_GOP1_SPEC = dataclasses.replace(BENCH_SPEC, duration=30.0, keyframe_s=1.0)
SMALL_SPEC = ClipSpec(width=320, height=180, fps=25, duration=2.0, audio_channels=2)
NUM_FRAMES, FRAME_SIZE, AUDIO_RATE, AUDIO_SECONDS = 8, 224, 16_000, 10.0
"""What both sides produce per clip: the job's defaults."""

Results = dict[str, dict[str, float]]

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


def _rate(clips: int, ok: int, seconds: float) -> dict[str, float]:
    return {"clips": clips, "ok": ok, "seconds": seconds, "clips_per_s": clips / seconds}


def _init_bound() -> None:
    global _STAGES
    _STAGES = build_stages(PreprocessConfig())
    media.ffmpeg_exe()  # resolved once per process, as in a shard task


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
    return _rate(len(items), statuses.count("ok"), time.perf_counter() - start)


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
        audio = ["-vn", "-ac", "1", "-ar", str(AUDIO_RATE), "-t", str(AUDIO_SECONDS)]
        subprocess.run(
            [ffmpeg, "-nostdin", "-v", "error", "-y", "-i", video, *frames, *audio, f"{out}/a.wav"],
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
    return _rate(len(jobs), statuses.count("ok"), time.perf_counter() - start)


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
    probe_json = ["-v", "error", "-show_format", "-show_streams", "-of", "json", clip]
    return {
        "system_ffmpeg_version": _cpu_ms(run(system_ffmpeg, "-version"), repeats, children=True),
        "static_ffmpeg_version": _cpu_ms(run(static, "-version"), repeats, children=True),
        "system_ffprobe_json": _cpu_ms(run(system_ffprobe, *probe_json), repeats, children=True),
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


def _subprocess_env(ray_tmp: Path | None = None) -> dict[str, str]:
    """This environment for a child run: the repository importable, no cluster to join,
    and (when given) the run's own Ray folder."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    if ray_tmp is not None:
        env["RAY_TMPDIR"] = str(ray_tmp)
    return env


def _gram() -> list[str]:
    """The `gram` command of this environment (its console script, else `python -m jobs.cli`)."""
    script = Path(sys.executable).parent / "gram"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "jobs.cli"]


def gram_preprocess(manifest: Path, work: Path, *overrides: str) -> dict[str, float]:
    """`gram preprocess` as a user runs it, start-up (and Ray's, if it starts one) included;
    `cpu_s` counts the command and the processes it waited for (not Ray's workers)."""
    out = Path(tempfile.mkdtemp(prefix="gram-bench-out-", dir=work))
    ray_tmp = Path(tempfile.mkdtemp(prefix="gram-bench-ray-"))
    cmd = [*_gram(), "preprocess", "--input", str(manifest), "--output", str(out / "shards")]
    try:
        start, cpu = time.perf_counter(), _children_cpu_s()
        res = subprocess.run(
            [*cmd, *overrides],
            capture_output=True,
            text=True,
            env=_subprocess_env(ray_tmp),
            cwd=REPO,
            check=False,
        )
        seconds, cpu = time.perf_counter() - start, _children_cpu_s() - cpu
        if res.returncode != 0:
            raise RuntimeError(f"gram preprocess failed:\n{res.stderr[-3000:]}")
        totals = json.loads((out / "shards" / "index.json").read_text())["totals"]
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return {**_rate(int(totals["inputs"]), int(totals["ok"]), seconds), "cpu_s": cpu}


def gram_preprocess_median(manifest: Path, work: Path, repeats: int) -> dict[str, float]:
    """The median of `repeats` runs of `gram_preprocess` (by wall time)."""
    runs = sorted(
        (gram_preprocess(manifest, work) for _ in range(repeats)), key=lambda r: r["seconds"]
    )
    return runs[len(runs) // 2]


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
    """One run of the job in this fresh process (prints JSON): `preprocess(config)` with
    `execution.mode=args.mode`. With `--warmup`, a first run on those clips is not timed;
    with mode `ray` both run in one local Ray of `args.cpus` CPUs, started here (as the
    job starts it: no dashboard) with its own temp folder. Without a warm-up the timing
    includes Ray's start."""
    import ray

    from pipelines.preprocess import preprocess

    os.environ.pop("RAY_ADDRESS", None)
    tmp = Path(tempfile.mkdtemp(prefix="gram-bench-"))

    def config(manifest: str, output: str) -> PreprocessConfig:
        cfg = PreprocessConfig(input=manifest, output=str(tmp / output))
        cfg.execution.mode = args.mode
        cfg.execution.local_num_cpus = args.cpus
        cfg.execution.progress_interval_s = 30
        return cfg

    with PeakRss() as rss:
        start = time.perf_counter()
        if args.mode == "ray":
            ray.init(
                num_cpus=args.cpus,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                _temp_dir=str(tmp / "ray"),
            )
        if args.warmup:
            preprocess(config(args.warmup, "warmup"))
            start = time.perf_counter()
        summary = preprocess(config(args.manifest, "out"))
        seconds = time.perf_counter() - start
        if args.mode == "ray":
            ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
    result = _rate(summary.inputs, summary.ok, seconds)
    result.update(
        bytes=summary.bytes_written,
        peak_driver_rss_mb=rss.driver / 2**20,
        peak_tree_rss_mb=rss.tree / 2**20,
    )
    print(json.dumps({**result, "mode": summary.mode}))


def job(manifest: Path, mode: str, cpus: int, warmup: Path | None) -> dict[str, float]:
    """Run `child` in a subprocess (a fresh process, and Ray, each time) and return its JSON."""
    cmd = [sys.executable, __file__, "--child", "--manifest", str(manifest)]
    cmd += ["--mode", mode, "--cpus", str(cpus)]
    if warmup is not None:
        cmd += ["--warmup", str(warmup)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_subprocess_env(), check=False)
    if res.returncode != 0:
        raise RuntimeError(f"job run failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if out.pop("mode") != mode:
        raise RuntimeError(f"the job did not run with execution.mode={mode}")
    return {k: float(v) for k, v in out.items()}


@dataclass(frozen=True)
class Row:
    """One row of a clips/s table: `key` in the results, compared with `base`."""

    label: str
    key: str
    base: str


def rate_table(results: Results, rows: Sequence[Row], title: str, against: str) -> list[str]:
    """A Markdown table of clips/s, each row against its base."""
    lines = [
        f"| {title} | clips | ok | s | clips/s | vs {against} |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        x, base = results[row.key], results[row.base]
        ratio = x["clips_per_s"] / base["clips_per_s"]
        lines.append(
            f"| {row.label} | {x['clips']:.0f} | {x['ok']:.0f} | {x['seconds']:.1f} "
            f"| {x['clips_per_s']:.2f} | {ratio:.2f}x |"
        )
    return lines


def load_line(start: Sequence[float], end: Sequence[float]) -> str:
    """The load averages (1, 5, 15 min) at the start and end of a part."""
    return (
        f"Load average at the start {', '.join(f'{x:.1f}' for x in start)}; "
        f"at the end {', '.join(f'{x:.1f}' for x in end)} ({os.cpu_count()} CPUs)."
    )


def end_to_end(r: Results, clips: Path, one: Path, work: Path) -> None:
    """`gram preprocess` end to end on `clips` (Ray, and in process) and on `one` clip,
    and the plain loop on that clip, into `r`."""
    system = (shutil.which("ffmpeg") or "ffmpeg", shutil.which("ffprobe") or "ffprobe")
    print("5 s clips: gram preprocess end to end ...", flush=True)
    r["gram_e2e"] = gram_preprocess(clips, work)
    r["gram_e2e_local"] = gram_preprocess(clips, work, "execution.mode=local")
    print("1 clip: gram preprocess end to end, plain loop ...", flush=True)
    r["one_gram_e2e"] = gram_preprocess_median(one, work, 3)
    r["one_plain_system"] = plain_loop(one, *system, 1)


E2E_ROWS = [
    Row("`gram preprocess` end to end, start-up included", "gram_e2e", "plain_system"),
    Row("`gram preprocess execution.mode=local` end to end", "gram_e2e_local", "plain_system"),
    Row("1 clip: plain loop", "one_plain_system", "one_plain_system"),
    Row("1 clip: `gram preprocess` end to end (median of 3)", "one_gram_e2e", "one_plain_system"),
]
"""The rows of `end_to_end` (the first two prefixed with the clip set)."""


def e2e_part(work: Path, quick: bool, cpus: int) -> tuple[Results, list[str]]:
    """Part `e2e`: only the end-to-end rows and their baseline, for a quiet moment."""
    n_clips = 40 if quick else 200
    system = (shutil.which("ffmpeg") or "ffmpeg", shutil.which("ffprobe") or "ffprobe")
    clips = make_set(work / "bench640", BENCH_SPEC, n_clips, n_clips)
    one = make_set(work / "bench640", BENCH_SPEC, 1, 1)
    load_start = os.getloadavg()
    r: Results = {}
    print("5 s clips: plain loop ...", flush=True)
    r["plain_system"] = plain_loop(clips, *system, 1)
    end_to_end(r, clips, one, work)
    load_end = os.getloadavg()
    n = f"{n_clips} x 5 s"
    rows = [
        Row(f"{n}: plain loop (system ffprobe + ffmpeg)", "plain_system", "plain_system"),
        *(Row(f"{n}: {row.label}", row.key, row.base) for row in E2E_ROWS[:2]),
        *E2E_ROWS[2:],
    ]
    title = f"run ({cpus} CPUs, generated 640x360 25 fps h264 + aac clips)"
    lines = rate_table(r, rows, title, "plain loop")
    lines += ["", *goal_table(r), "", load_line(load_start, load_end)]
    return r, lines


def speed_part(work: Path, quick: bool, cpus: int) -> tuple[Results, list[str]]:
    """Part `speed`: the goals, against the plain loop (see the module docstring)."""
    n_clips, n_long = (40, 4) if quick else (200, 8)
    system = (shutil.which("ffmpeg") or "ffmpeg", shutil.which("ffprobe") or "ffprobe")
    static = media.ffmpeg_exe()
    print(f"generating {n_clips} x 5 s and {n_long} x 2 min clips in {work} ...", flush=True)
    clips = make_set(work / "bench640", BENCH_SPEC, n_clips, n_clips)
    long = make_set(work / "long640", LONG_SPEC, n_long, n_long)
    one = make_set(work / "bench640", BENCH_SPEC, 1, 1)
    n_cpu = min(n_long, 4)
    long_gop2 = make_set(work / "long640_gop2", LONG_GOP2_SPEC, n_cpu, n_cpu)
    mid_gop1 = make_set(work / "mid640_gop1", MID_GOP1_SPEC, n_cpu, n_cpu)
    warm = make_set(work / "small320", SMALL_SPEC, 8, 8)
    load_start = os.getloadavg()
    r: Results = {}
    print("start-up and probe cost ...", flush=True)
    r["cpu_ms_per_call"] = startup_and_probe(str(work / "bench640" / "clip_0000.mp4"), 15)
    print("CPU per clip ...", flush=True)
    r["cpu_s_per_clip"] = cpu_per_clip(clips, *system, 20)
    r["cpu_s_per_clip_long"] = cpu_per_clip(long, *system, n_cpu)
    r["cpu_s_per_clip_long_gop2"] = cpu_per_clip(long_gop2, *system, n_cpu)
    r["cpu_s_per_clip_mid_gop1"] = cpu_per_clip(mid_gop1, *system, n_cpu)
    print("5 s clips: plain loop (system, static, one per CPU), chain ...", flush=True)
    r["plain_system"] = plain_loop(clips, *system, 1)
    r["plain_static"] = plain_loop(clips, static, system[1], 1)
    r["plain_system_per_cpu"] = plain_loop(clips, *system, cpus)
    r["chain_steady"] = bound(clips, cpus, warmup=2)
    print("5 s clips: the job, execution.mode=ray and local, warm ...", flush=True)
    r["job_ray_warm"] = job(clips, "ray", cpus, warm)
    r["job_local_warm"] = job(clips, "local", cpus, warm)
    end_to_end(r, clips, one, work)
    print("2-minute clips: plain loop, chain, the job ...", flush=True)
    r["long_plain_system"] = plain_loop(long, *system, 1)
    r["long_plain_system_per_cpu"] = plain_loop(long, *system, cpus)
    r["long_chain"] = bound(long, cpus, warmup=0)
    r["long_job_ray_warm"] = job(long, "ray", cpus, warm)
    load_end = os.getloadavg()

    n, m = f"{n_clips} x 5 s", f"{n_long} x 2 min"
    rows = [
        Row(f"{n}: plain loop (system ffprobe + ffmpeg)", "plain_system", "plain_system"),
        Row(f"{n}: plain loop, static ffmpeg (system ffprobe)", "plain_static", "plain_system"),
        Row(f"{n}: plain loop, {cpus} processes", "plain_system_per_cpu", "plain_system"),
        Row(
            f"{n}: per-clip chain, {cpus} processes, steady (bound, no writing)",
            "chain_steady",
            "plain_system",
        ),
        Row(
            f"{n}: the job, `execution.mode=ray`, warm (steady state)",
            "job_ray_warm",
            "plain_system",
        ),
        Row(f"{n}: the job, `execution.mode=local`, warm", "job_local_warm", "plain_system"),
        *(Row(f"{n}: {row.label}", row.key, row.base) for row in E2E_ROWS[:2]),
        Row(f"{m}: plain loop (whole-clip decode)", "long_plain_system", "long_plain_system"),
        Row(f"{m}: plain loop, {cpus} processes", "long_plain_system_per_cpu", "long_plain_system"),
        Row(f"{m}: per-clip chain, {cpus} processes", "long_chain", "long_plain_system"),
        Row(
            f"{m}: the job, `execution.mode=ray`, warm",
            "long_job_ray_warm",
            "long_plain_system",
        ),
        *E2E_ROWS[2:],
    ]
    title = f"run ({cpus} CPUs, generated 640x360 25 fps h264 + aac clips)"
    lines = rate_table(r, rows, title, "plain loop")
    lines += ["", *cpu_tables(r), "", *goal_table(r), "", load_line(load_start, load_end)]
    return r, lines


def cpu_tables(r: Results) -> list[str]:
    """CPU per call and per clip, as Markdown tables."""
    ms = r["cpu_ms_per_call"]
    lines = [
        "| CPU ms per call (median) | ms |",
        "| --- | ---: |",
        f"| start the system's ffmpeg (`-version`) | {ms['system_ffmpeg_version']:.0f} |",
        f"| start the static ffmpeg (`-version`) | {ms['static_ffmpeg_version']:.0f} |",
        f"| probe a clip: system ffprobe (`-show_format -show_streams`) "
        f"| {ms['system_ffprobe_json']:.0f} |",
        f"| probe a clip: static `ffmpeg -i` | {ms['static_ffmpeg_dash_i']:.0f} |",
        f"| probe a clip: `media.probe` (PyAV, in process) | {ms['pyav_probe_in_process']:.1f} |",
        "",
        "| CPU s per clip, one after another | plain loop | plain loop, static ffmpeg "
        "| per-clip chain | plain loop / chain |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for key, label in (
        ("cpu_s_per_clip", "5 s clips (one keyframe)"),
        ("cpu_s_per_clip_long", "2 min clips, a keyframe every 10 s (x264's default)"),
        ("cpu_s_per_clip_long_gop2", "2 min clips, a keyframe every 2 s"),
        ("cpu_s_per_clip_mid_gop1", "30 s clips, a keyframe every second"),
    ):
        c = r[key]
        lines.append(
            f"| {label} | {c['plain_system']:.3f} | {c['plain_static']:.3f} | {c['chain']:.3f} "
            f"| {c['plain_system'] / c['chain']:.2f}x |"
        )
    return lines


def goal_table(r: Results) -> list[str]:
    """The speed goals measured in this run, each against its baseline in the same run."""
    ratios = [
        ("5 s clips, steady state: the job (`execution.mode=ray`, warm) / plain loop",
         "job_ray_warm", "plain_system", 1.2),
        ("5 s clips, end to end: `gram preprocess` with start-up / plain loop",
         "gram_e2e", "plain_system", 1.0),
        ("2 min clips: the job (`execution.mode=ray`, warm) / whole-clip plain loop",
         "long_job_ray_warm", "long_plain_system", 3.0),
    ]  # fmt: skip
    lines = ["| goal | measured | target | met |", "| --- | ---: | ---: | --- |"]

    def add(label: str, measured: str, target: str, met: bool) -> None:
        lines.append(f"| {label} | {measured} | {target} | {'yes' if met else 'no'} |")

    for label, key, base, least in ratios:
        if key in r:
            value = r[key]["clips_per_s"] / r[base]["clips_per_s"]
            add(label, f"{value:.2f}x", f">= {least:.1f}x", value >= least)
    if "cpu_s_per_clip_long" in r:
        c = r["cpu_s_per_clip_long"]
        value = c["plain_system"] / c["chain"]
        add("2 min clips: CPU per clip, plain loop / per-clip chain", f"{value:.2f}x", ">= 3.0x",
            value >= 3.0)  # fmt: skip
    one = r["one_gram_e2e"]
    add(
        "1 clip: `gram preprocess` end to end",
        f"{one['seconds']:.1f} s ({one['cpu_s']:.1f} s of CPU)",
        "<= 10 s",
        one["seconds"] <= 10,
    )
    return lines


def pipeline_part(work: Path, quick: bool, cpus: int) -> tuple[Results, list[str]]:
    """Part `pipeline`: the job against the bound on the same clips, and its memory."""
    n_main, n_small, n_large = (40, 100, 400) if quick else (200, 500, 2000)
    print(f"generating clips in {work} ...", flush=True)
    bench = make_set(work / "bench640", BENCH_SPEC, n_main, n_main)
    small = make_set(work / "small320", SMALL_SPEC, 50, n_large)
    small_500 = make_set(work / "small320", SMALL_SPEC, 50, n_small)
    warm = make_set(work / "small320", SMALL_SPEC, 8, 8)
    load_start = os.getloadavg()
    r: Results = {}
    print("bound: the per-clip chain in a multiprocessing.Pool ...", flush=True)
    r["bound"] = bound(bench, cpus, warmup=2)
    r["bound_1"] = bound(bench, 1, warmup=2)
    print("the job on generated clips ...", flush=True)
    r["job_ray_warm"] = job(bench, "ray", cpus, warm)
    r["job_ray_cold"] = job(bench, "ray", cpus, None)
    r["job_ray_warm_1cpu"] = job(bench, "ray", 1, warm)
    r["job_local_warm"] = job(bench, "local", cpus, warm)
    rows = [
        Row(f"bound: per-clip chain, {cpus} processes, steady, no writing", "bound", "bound"),
        Row(f"the job, `execution.mode=ray`, {cpus} CPUs, warm", "job_ray_warm", "bound"),
        Row(
            f"the job, `execution.mode=ray`, {cpus} CPUs, cold (Ray's start included)",
            "job_ray_cold",
            "bound",
        ),
        Row("the job, `execution.mode=ray`, 1 CPU, warm", "job_ray_warm_1cpu", "bound_1"),
        Row("bound: per-clip chain, 1 process, steady", "bound_1", "bound_1"),
        Row("the job, `execution.mode=local` (in process), warm", "job_local_warm", "bound_1"),
    ]
    if (SHARED_MEDIA / "captions.jsonl").is_file():
        real = repeat_manifest(SHARED_MEDIA / "captions.jsonl", 10, work / "real_x10.jsonl")
        print("real clips ...", flush=True)
        r["real_bound"] = bound(real, cpus, warmup=2)
        r["real_job_ray_warm"] = job(real, "ray", cpus, warm)
        rows += [
            Row(f"real clips x10: bound, {cpus} processes", "real_bound", "real_bound"),
            Row(
                "real clips x10: the job, `execution.mode=ray`, warm",
                "real_job_ray_warm",
                "real_bound",
            ),
        ]
    print("memory: 500 vs 2000 inputs ...", flush=True)
    r["memory_small"] = job(small_500, "ray", cpus, warm)
    r["memory_large"] = job(small, "ray", cpus, warm)
    load_end = os.getloadavg()
    title = f"run ({n_main} generated 5 s clips unless said, {cpus} CPUs)"
    lines = rate_table(r, rows, title, "bound")
    scaling = r["job_ray_warm"]["clips_per_s"] / r["job_ray_warm_1cpu"]["clips_per_s"]
    lines += [
        "",
        f"Scaling of the job (`execution.mode=ray`, warm), 1 -> {cpus} CPUs: {scaling:.2f}x.",
        "",
        "| inputs (2 s 320x180 clips), `execution.mode=ray`, warm | clips/s "
        "| peak driver RSS, MB | peak process-tree RSS, MB |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for key, count in (("memory_small", n_small), ("memory_large", n_large)):
        x = r[key]
        lines.append(
            f"| {count:,} | {x['clips_per_s']:.1f} | {x['peak_driver_rss_mb']:.0f} "
            f"| {x['peak_tree_rss_mb']:.0f} |"
        )
    lines += ["", load_line(load_start, load_end)]
    return r, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sets (a smoke run)")
    parser.add_argument(
        "--part",
        choices=("all", "speed", "pipeline", "e2e"),
        default="all",
        help="what to measure (e2e: only the end-to-end rows of speed, for a quiet moment)",
    )
    parser.add_argument("--work", default=str(REPO / "results" / "bench-media"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("ray", "local"), help=argparse.SUPPRESS)
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
    results: Results = {}
    lines: list[str] = []
    parts = {"speed": speed_part, "pipeline": pipeline_part, "e2e": e2e_part}
    for part in ("speed", "pipeline") if args.part == "all" else (args.part,):
        part_results, part_lines = parts[part](work, args.quick, cpus)
        results.update({f"{part}.{k}": v for k, v in part_results.items()})
        lines += [f"Part `{part}`:", "", *part_lines, ""]
    machine["load_avg_at_end"] = os.getloadavg()
    lines.append(f"System ffmpeg: {machine['system_ffmpeg']}; static: {machine['static_ffmpeg']}.")
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

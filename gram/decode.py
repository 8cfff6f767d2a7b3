"""Decode one shard sample into model-ready tensors, and collate samples into a batch.

    decode = SampleDecoder(DecodeConfig.from_model(cfg), train=True)
    item = decode(sample)            # sample: {"__key__": ..., "f000.jpg": b"...", ...}
    batch = Collator(model.tokenizer)([item, ...])
    out = model(batch)

A sample is one WebDataset sample as a dict of member suffix -> value (see
`gram.schema`): `f000.jpg` ... frames (JPEG bytes, or already-decoded PIL
images / uint8 arrays [H, W, 3]; or one `frames.npy` / `frames` array
[N, H, W, 3] uint8), `flac` (16 kHz audio bytes, or a float array [S]),
`captions.json` (a JSON list of strings, bytes/str or already a list; `txt`
with one caption per line also works) and `json` (`ClipMeta`, bytes/str or a
dict; optional). Nothing is written to disk; every member name is checked
with `gram.schema.validate_member_name`.

Train-time augmentation: a random frame within each segment, one random crop
position for the whole clip, a random audio window, a random caption.
Evaluation is deterministic: the middle frame of each segment, the centre
crop, the centre audio window, the first caption (and all captions are kept
for retrieval).

Optional noise augmentation (`NoiseAugment`, `augment_sample`), off by default:
a grey occluding square, Gaussian pixel noise and white noise at a set SNR,
drawn afresh for every sample and epoch, so a model cannot learn the noise of
a fixed corrupted copy by heart. The same function with a fixed seed per sample
corrupts an evaluation set reproducibly.

Bad samples raise `SampleError` (a ValueError) naming the key and the reason.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
import soundfile
import torch
from PIL import Image
from torch import Tensor

from gram.config import ConfigError
from gram.model_config import ModelConfig
from gram.schema import (
    AUDIO_SUFFIX,
    CAPTIONS_SUFFIX,
    META_SUFFIX,
    SAMPLE_RATE,
    ClipMeta,
    is_frame_suffix,
    validate_key,
    validate_member_name,
)
from gram.text import Tokenizer

__all__ = [
    "Collator",
    "DecodeConfig",
    "DecodedSample",
    "NoiseAugment",
    "SampleDecoder",
    "SampleError",
    "augment_sample",
    "collate",
    "decode_sample",
    "predecode",
]

_RESERVED = ("__key__", "__url__", "__local_path__", "__shard__", "__index__")


class SampleError(ValueError):
    """A sample breaks the shard contract; the message names the key and what is wrong."""


@dataclass(frozen=True)
class DecodeConfig:
    """How samples become tensors. Build it from the model: `DecodeConfig.from_model(cfg)`.

    Attributes:
        num_frames: frames per clip T (one per segment; segments are resampled
            evenly when a clip has a different number).
        image_size: square crop side in pixels.
        resize_ratio: the short side is first resized to image_size * resize_ratio
            (256 / 224 by default), then cropped.
        audio_samples: waveform length in samples (cut or zero-padded).
        sample_rate: expected audio rate in Hz (the shards hold 16 kHz).
        max_image_pixels: frames larger than this are refused (decompression bombs).
    """

    num_frames: int = 8
    image_size: int = 224
    resize_ratio: float = 256 / 224
    audio_samples: int = 10 * SAMPLE_RATE
    sample_rate: int = SAMPLE_RATE
    max_image_pixels: int = 4096 * 4096

    @classmethod
    def from_model(cls, cfg: ModelConfig, **overrides: Any) -> DecodeConfig:
        """Frame count, image size and audio length matching the model's encoders."""
        fields: dict[str, Any] = {
            "num_frames": cfg.vision.num_frames,
            "image_size": cfg.vision.image_size,
            "audio_samples": cfg.audio.num_samples,
            "sample_rate": cfg.audio.sample_rate,
        }
        fields.update(overrides)
        return cls(**fields)


class DecodedSample(TypedDict):
    """One clip, ready to collate."""

    key: str
    video: Tensor  # [T, 3, H, W] uint8
    audio: Tensor  # [S] float32 in [-1, 1]
    audio_present: bool
    caption: str
    captions: list[str]


def _text(value: Any, key: str, member: str) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise SampleError(f"sample {key!r}: {member} is not UTF-8 text") from None
    if isinstance(value, str):
        return value
    raise SampleError(f"sample {key!r}: {member} must be bytes or str, got {type(value).__name__}")


def _json(value: Any, key: str, member: str) -> Any:
    if isinstance(value, Mapping | list):
        return value
    try:
        return json.loads(_text(value, key, member))
    except json.JSONDecodeError as exc:
        raise SampleError(f"sample {key!r}: {member} is not valid JSON ({exc})") from None


def _captions(sample: Mapping[str, Any], key: str) -> list[str]:
    if CAPTIONS_SUFFIX in sample:
        raw = _json(sample[CAPTIONS_SUFFIX], key, CAPTIONS_SUFFIX)
        if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
            raise SampleError(f"sample {key!r}: {CAPTIONS_SUFFIX} must be a JSON list of strings")
        captions = [c.strip() for c in raw]
    elif "txt" in sample:
        captions = [line.strip() for line in _text(sample["txt"], key, "txt").splitlines()]
    else:
        raise SampleError(f"sample {key!r} has no captions ({CAPTIONS_SUFFIX} or txt member)")
    captions = [c for c in captions if c]
    if not captions:
        raise SampleError(f"sample {key!r}: every caption is empty")
    return captions


def _meta(sample: Mapping[str, Any], key: str) -> ClipMeta | None:
    if META_SUFFIX not in sample:
        return None
    raw = _json(sample[META_SUFFIX], key, META_SUFFIX)
    if not isinstance(raw, Mapping):
        raise SampleError(f"sample {key!r}: {META_SUFFIX} must be a JSON object")
    try:
        return ClipMeta.from_json(dict(raw))
    except (TypeError, ValueError) as exc:
        raise SampleError(f"sample {key!r}: bad {META_SUFFIX} metadata ({exc})") from None


def _frame_members(sample: Mapping[str, Any], key: str) -> list[Any]:
    """Frames in time order: a list of per-frame values, or rows of one [N, H, W, 3] array."""
    for name in ("frames.npy", "frames"):
        if name in sample:
            value = sample[name]
            if isinstance(value, bytes | bytearray | memoryview):
                value = np.load(io.BytesIO(bytes(value)), allow_pickle=False)
            array = np.asarray(value)
            if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
                raise SampleError(
                    f"sample {key!r}: {name} must be uint8 [N, H, W, 3], got "
                    f"{array.dtype} {array.shape}"
                )
            return list(array)
    indexed = {}
    for suffix, value in sample.items():
        index = is_frame_suffix(suffix)
        if index is not None:
            indexed[index] = value
    if not indexed:
        raise SampleError(f"sample {key!r} has no frames (f000.jpg ... members)")
    if sorted(indexed) != list(range(len(indexed))):
        gaps = sorted(set(range(max(indexed) + 1)) - set(indexed))
        raise SampleError(f"sample {key!r}: frame members are not contiguous, missing {gaps[:8]}")
    return [indexed[i] for i in range(len(indexed))]


def _open_image(value: Any, key: str, max_pixels: int) -> Image.Image:
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, np.ndarray):
        if value.dtype != np.uint8 or value.ndim != 3 or value.shape[-1] != 3:
            raise SampleError(f"sample {key!r}: frame arrays must be uint8 [H, W, 3]")
        image = Image.fromarray(value, mode="RGB")
    elif isinstance(value, bytes | bytearray | memoryview):
        try:
            image = Image.open(io.BytesIO(bytes(value)))
        except (OSError, Image.DecompressionBombError) as exc:
            raise SampleError(f"sample {key!r}: a frame is not a readable image ({exc})") from None
    else:
        raise SampleError(f"sample {key!r}: unsupported frame value {type(value).__name__}")
    w, h = image.size
    if w * h > max_pixels or w < 1 or h < 1:
        raise SampleError(f"sample {key!r}: frame of {w}x{h} pixels is outside 1..{max_pixels}")
    try:
        return image.convert("RGB")
    except OSError as exc:
        raise SampleError(f"sample {key!r}: a frame could not be decoded ({exc})") from None


def _segment_frames(
    num_frames_in_sample: int, meta: ClipMeta | None, t: int, train: bool, rng: random.Random
) -> list[int]:
    """Indices of the T frames to use: one per (resampled) segment."""
    if meta is not None:
        segments, per_segment = meta.num_segments, meta.frames_per_segment
    else:
        segments, per_segment = num_frames_in_sample, 1
    if segments * per_segment != num_frames_in_sample or segments < 1:
        raise SampleError(
            f"{num_frames_in_sample} frames do not match {segments} segments x "
            f"{per_segment} frames per segment in the metadata"
        )
    chosen = [min(segments - 1, int((i + 0.5) * segments / t)) for i in range(t)]  # [T]
    offsets = [rng.randrange(per_segment) if train else per_segment // 2 for _ in chosen]
    return [s * per_segment + o for s, o in zip(chosen, offsets, strict=True)]


def _crop_box(
    width: int, height: int, cfg: DecodeConfig, train: bool, rng: random.Random
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """(resized (w, h), crop box (left, top, right, bottom)) for a short side of S * ratio."""
    short = max(cfg.image_size, round(cfg.image_size * cfg.resize_ratio))
    scale = short / min(width, height)
    size = (max(cfg.image_size, round(width * scale)), max(cfg.image_size, round(height * scale)))
    spare_x, spare_y = size[0] - cfg.image_size, size[1] - cfg.image_size
    if train:
        x0, y0 = rng.randint(0, spare_x), rng.randint(0, spare_y)
    else:
        x0, y0 = spare_x // 2, spare_y // 2
    return size, (x0, y0, x0 + cfg.image_size, y0 + cfg.image_size)


def _decode_audio(value: Any, key: str, cfg: DecodeConfig) -> np.ndarray:
    """-> mono float32 [S] at cfg.sample_rate."""
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            data, rate = soundfile.read(io.BytesIO(bytes(value)), dtype="float32", always_2d=True)
        except (RuntimeError, soundfile.LibsndfileError) as exc:
            raise SampleError(f"sample {key!r}: audio is not readable FLAC/WAV ({exc})") from None
        if rate != cfg.sample_rate:
            raise SampleError(
                f"sample {key!r}: audio is {rate} Hz, the model takes {cfg.sample_rate} Hz: "
                "re-run preprocessing (the shards store 16 kHz mono)"
            )
        wave: np.ndarray = data.mean(axis=1)
        return wave.astype(np.float32, copy=False)
    array = value.numpy() if isinstance(value, Tensor) else np.asarray(value)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.floating):
        raise SampleError(f"sample {key!r}: decoded audio must be a float array [S]")
    return array.astype(np.float32, copy=False)


def _audio_window(wave: np.ndarray, n: int, train: bool, rng: random.Random) -> np.ndarray:
    """Cut (random or centre) or zero-pad `wave` to n samples. -> [n]."""
    if wave.shape[0] >= n:
        spare = wave.shape[0] - n
        start = rng.randint(0, spare) if train else spare // 2
        return wave[start : start + n]
    return np.pad(wave, (0, n - wave.shape[0]))


def decode_sample(
    sample: Mapping[str, Any],
    cfg: DecodeConfig,
    *,
    train: bool,
    rng: random.Random | None = None,
) -> DecodedSample:
    """One sample dict -> tensors (see the module docstring).

    Args:
        sample: member suffix -> value, plus `__key__`.
        cfg: frame count, image size, audio length.
        train: random augmentation (True) or deterministic eval decoding (False).
        rng: randomness for augmentation; default a fresh one seeded from torch's
            generator (which DataLoader workers seed per worker).
    """
    key = sample.get("__key__")
    if not isinstance(key, str):
        raise SampleError(f"sample has no string __key__ (got {type(key).__name__})")
    try:
        validate_key(key)
        for suffix in sample:
            if suffix not in _RESERVED:
                validate_member_name(f"{key}.{suffix}")
    except ValueError as exc:
        raise SampleError(str(exc)) from None
    if rng is None:
        seed = int(torch.randint(0, 2**62, (1,)).item()) if train else 0
        rng = random.Random(seed)

    meta = _meta(sample, key)
    captions = _captions(sample, key)
    frames = _frame_members(sample, key)
    try:
        picked = _segment_frames(len(frames), meta, cfg.num_frames, train, rng)
    except SampleError as exc:
        raise SampleError(f"sample {key!r}: {exc}") from None

    decoded: dict[int, Image.Image] = {}
    images = []
    box = None
    for index in picked:
        if index not in decoded:
            decoded[index] = _open_image(frames[index], key, cfg.max_image_pixels)
        image = decoded[index]
        if box is None:
            box = _crop_box(image.width, image.height, cfg, train, rng)
        size, crop = box
        resized = image.resize(size, Image.Resampling.BILINEAR).crop(crop)
        images.append(np.asarray(resized, dtype=np.uint8))
    video = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # [T, 3, H, W]

    has_audio = AUDIO_SUFFIX in sample and (meta is None or meta.has_audio)
    wave = _decode_audio(sample[AUDIO_SUFFIX], key, cfg) if has_audio else None
    if wave is None or wave.shape[0] == 0:
        audio = torch.zeros(cfg.audio_samples, dtype=torch.float32)
        present = False
    else:
        window = _audio_window(wave, cfg.audio_samples, train, rng)
        audio = torch.from_numpy(np.ascontiguousarray(window, dtype=np.float32))
        present = True

    caption = rng.choice(captions) if train else captions[0]
    return DecodedSample(
        key=key,
        video=video,
        audio=audio,
        audio_present=present,
        caption=caption,
        captions=captions,
    )


@dataclass(frozen=True)
class NoiseAugment:
    """Noise drawn on decoded samples (`augment_sample`); every field at 0/None = off.

    Attributes:
        frame_occluder: side in pixels of a mid-grey square pasted at one random place
            in every frame of a clip (random erasing of a fixed size).
        frame_noise_std: std of Gaussian noise added to the pixels (scale 0-1), the same
            value on the three channels (luminance noise), then clipped and rounded.
        audio_snr_db: white Gaussian noise at this SNR in dB, relative to the mean power
            of the clip's audio window; the mix is scaled down if it would leave [-1, 1].
            Clips without audio (or silent ones) are left unchanged.
    """

    frame_occluder: int = 0
    frame_noise_std: float = 0.0
    audio_snr_db: float | None = None

    def __post_init__(self) -> None:
        if self.frame_occluder < 0 or self.frame_noise_std < 0:
            raise ConfigError(
                "augment: frame_occluder and frame_noise_std must be >= 0, got "
                f"{self.frame_occluder} and {self.frame_noise_std}"
            )

    @property
    def active(self) -> bool:
        """Whether any noise is drawn."""
        return bool(self.frame_occluder or self.frame_noise_std or self.audio_snr_db is not None)


def augment_sample(item: DecodedSample, aug: NoiseAugment, rng: random.Random) -> DecodedSample:
    """A copy of a decoded sample with `aug`'s noise drawn from `rng` (see `NoiseAugment`).

    Frames stay uint8 [T, 3, H, W], audio float32 [S]; the draws depend only on `rng`,
    so a generator seeded per sample gives the same corrupted sample every time.
    """
    if not aug.active:
        return item
    noise = np.random.default_rng(rng.getrandbits(64))
    video = item["video"]
    t, _, h, w = video.shape
    if aug.frame_occluder or aug.frame_noise_std:
        x = video.numpy().astype(np.float32) / 255.0  # [T, 3, H, W]
        side = min(aug.frame_occluder, h, w)
        if side:
            top, left = rng.randint(0, h - side), rng.randint(0, w - side)
            x[:, :, top : top + side, left : left + side] = 0.5
        if aug.frame_noise_std:
            luma = noise.normal(0.0, aug.frame_noise_std, size=(t, 1, h, w))  # [T, 1, H, W]
            x = x + luma.astype(np.float32)
        pixels = np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
        video = torch.from_numpy(pixels)
    audio = item["audio"]
    if aug.audio_snr_db is not None and item["audio_present"]:
        wave = audio.numpy().astype(np.float64)  # [S]
        power = float(np.mean(wave**2))
        if power > 0.0:
            std = (power / 10.0 ** (aug.audio_snr_db / 10.0)) ** 0.5
            mixed = wave + noise.normal(0.0, std, size=wave.shape)
            peak = float(np.max(np.abs(mixed)))
            if peak > 1.0:
                mixed = mixed / peak
            audio = torch.from_numpy(mixed.astype(np.float32))
    return DecodedSample(
        key=item["key"],
        video=video,
        audio=audio,
        audio_present=item["audio_present"],
        caption=item["caption"],
        captions=item["captions"],
    )


def predecode(sample: Mapping[str, Any], cfg: DecodeConfig) -> dict[str, Any]:
    """The costly, deterministic part of `decode_sample`, done once (for a decoded-sample cache).

    Frames become uint8 arrays [H, W, 3], the audio a float32 waveform [S], captions
    and metadata parsed; `decode_sample` takes the result as it takes the raw sample
    and returns the same tensors (augmentation still draws on every call). A sample
    that cannot be decoded is returned unchanged, so `decode_sample` reports it.
    """
    key = str(sample.get("__key__", ""))
    out = dict(sample)
    try:
        for suffix, value in sample.items():
            if is_frame_suffix(suffix) is not None:
                image = _open_image(value, key, cfg.max_image_pixels)
                out[suffix] = np.asarray(image, dtype=np.uint8)
            elif suffix == AUDIO_SUFFIX:
                out[suffix] = _decode_audio(value, key, cfg)
            elif suffix in (CAPTIONS_SUFFIX, META_SUFFIX):
                out[suffix] = _json(value, key, suffix)
    except SampleError:
        return dict(sample)
    return out


class SampleDecoder:
    """`decode_sample` with a fixed config and mode, as a picklable callable (for loaders/Ray)."""

    def __init__(self, cfg: DecodeConfig, *, train: bool) -> None:
        self.cfg = cfg
        self.train = train

    def __call__(self, sample: Mapping[str, Any]) -> DecodedSample:
        return decode_sample(sample, self.cfg, train=self.train)


def collate(samples: Sequence[DecodedSample], tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """Stack decoded samples into the batch `GramModel` takes.

    Returns:
        keys: list[str]; video [B, T, 3, H, W] uint8; audio [B, S] float32;
        audio_present [B] bool; text: list[str] (the chosen captions);
        captions: list[list[str]] (all captions, for evaluation); and, with a
        tokenizer, text_ids [B, L] int64 and text_attention [B, L] bool.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    batch: dict[str, Any] = {
        "keys": [s["key"] for s in samples],
        "video": torch.stack([s["video"] for s in samples]),
        "audio": torch.stack([s["audio"] for s in samples]),
        "audio_present": torch.tensor([s["audio_present"] for s in samples], dtype=torch.bool),
        "text": [s["caption"] for s in samples],
        "captions": [list(s["captions"]) for s in samples],
    }
    if tokenizer is not None:
        batch["text_ids"], batch["text_attention"] = tokenizer(batch["text"])
    return batch


class Collator:
    """`collate` with a tokenizer bound, as a picklable callable (DataLoader collate_fn)."""

    def __init__(self, tokenizer: Tokenizer | None = None) -> None:
        self.tokenizer = tokenizer

    def __call__(self, samples: Sequence[DecodedSample]) -> dict[str, Any]:
        return collate(samples, self.tokenizer)

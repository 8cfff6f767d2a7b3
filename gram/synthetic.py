"""A synthetic tri-modal dataset of real shard samples (JPEG frames, FLAC audio, captions).

    clips = SyntheticClips(256, seed=0)
    sample = clips[3]     # {"__key__": "syn-0-000003", "f000.jpg": b"...", "flac": b"...",
                          #  "captions.json": b"[...]", "json": b"{...}"}

Every clip has a visual attribute (the colour of a square moving over noise)
and an auditory one (the pitch of a tone, named by a sound word), and every
caption names both ("a red square and a whistle"). With C colours and
P sounds, text -> video alone cannot tell apart the P clips of one colour, nor
text -> audio the C clips of one sound: only the two together identify a
clip, which is what the volume of (text, video, audio) scores.

Clip i has colour i % C and sound (i // C) % P, so any C * P consecutive
clips hold every combination exactly once; positions, motion, phase, noise
and the missing-audio draw come from (seed, i). Samples are produced on
demand (deterministic, nothing kept in memory or on disk).
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import soundfile
from PIL import Image

from gram.schema import (
    AUDIO_SUFFIX,
    CAPTIONS_SUFFIX,
    META_SUFFIX,
    SAMPLE_RATE,
    ClipMeta,
    frame_suffix,
)

__all__ = ["COLORS", "SOUNDS", "SyntheticClip", "SyntheticClips"]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
"""Colour name -> RGB of the square."""

SOUNDS: dict[str, float] = {
    "rumble": 180.0,
    "hum": 320.0,
    "horn": 560.0,
    "beep": 1000.0,
    "whistle": 1800.0,
    "chirp": 3200.0,
}
"""Sound word -> tone frequency in Hz."""

_TEMPLATES = (
    "a {color} square and a {sound}",
    "a {sound} while a {color} square moves",
    "{color} square with {sound} sound",
)


@dataclass(frozen=True)
class SyntheticClip:
    """The ground truth of one synthetic clip."""

    key: str
    color: str
    sound: str
    has_audio: bool
    captions: list[str]


class SyntheticClips:
    """Sequence of synthetic shard samples (a map-style dataset of dicts of bytes).

    Args:
        num_clips: length.
        seed: changes every random draw (use different seeds for train and eval).
        num_colors, num_sounds: how many of COLORS / SOUNDS are used.
        missing_audio: probability that a clip has no audio track.
        image_size: frame side in pixels.
        num_segments, frames_per_segment: frame layout (schema: segments x frames).
        seconds: clip length; the audio has seconds * 16000 samples.
        captions_per_clip: 1 to 3 captions, from different templates.
    """

    def __init__(
        self,
        num_clips: int,
        *,
        seed: int = 0,
        num_colors: int = 6,
        num_sounds: int = 6,
        missing_audio: float = 0.1,
        image_size: int = 40,
        num_segments: int = 4,
        frames_per_segment: int = 2,
        seconds: float = 1.2,
        captions_per_clip: int = 2,
    ) -> None:
        if not 1 <= num_colors <= len(COLORS) or not 1 <= num_sounds <= len(SOUNDS):
            raise ValueError(
                f"num_colors must be in 1..{len(COLORS)} and num_sounds in 1..{len(SOUNDS)}"
            )
        if not 1 <= captions_per_clip <= len(_TEMPLATES):
            raise ValueError(f"captions_per_clip must be in 1..{len(_TEMPLATES)}")
        if not 0.0 <= missing_audio <= 1.0:
            raise ValueError(f"missing_audio must be a probability, got {missing_audio}")
        self.num_clips = num_clips
        self.seed = seed
        self.colors = list(COLORS)[:num_colors]
        self.sounds = list(SOUNDS)[:num_sounds]
        self.missing_audio = missing_audio
        self.image_size = image_size
        self.num_segments = num_segments
        self.frames_per_segment = frames_per_segment
        self.seconds = seconds
        self.captions_per_clip = captions_per_clip

    def __len__(self) -> int:
        return self.num_clips

    def __iter__(self) -> Iterator[dict[str, object]]:
        """The shard samples of clips 0 .. len - 1, in order."""
        return (self[i] for i in range(self.num_clips))

    def _rng(self, index: int, stream: str) -> random.Random:
        return random.Random(f"{self.seed}-{index}-{stream}")

    def clip(self, index: int) -> SyntheticClip:
        """The ground truth of clip `index` (no media is rendered)."""
        if not 0 <= index < self.num_clips:
            raise IndexError(f"clip index {index} out of range [0, {self.num_clips})")
        rng = self._rng(index, "truth")
        color = self.colors[index % len(self.colors)]
        sound = self.sounds[(index // len(self.colors)) % len(self.sounds)]
        has_audio = rng.random() >= self.missing_audio
        first = rng.randrange(len(_TEMPLATES))
        captions = [
            _TEMPLATES[(first + j) % len(_TEMPLATES)].format(color=color, sound=sound)
            for j in range(self.captions_per_clip)
        ]
        return SyntheticClip(f"syn-{self.seed}-{index:06d}", color, sound, has_audio, captions)

    def _frames(self, color: str, rng: random.Random) -> list[bytes]:
        n = self.num_segments * self.frames_per_segment
        size = self.image_size
        side = max(4, size // 3)
        x0, y0 = rng.uniform(0, size - side), rng.uniform(0, size - side)
        x1, y1 = rng.uniform(0, size - side), rng.uniform(0, size - side)
        noise = np.random.default_rng(rng.randrange(2**32))
        background = noise.integers(60, 110, size=(size, size, 3), dtype=np.uint8)
        out = []
        for f in range(n):
            a = f / max(n - 1, 1)
            x, y = round(x0 + a * (x1 - x0)), round(y0 + a * (y1 - y0))
            frame = background.copy()
            frame[y : y + side, x : x + side] = COLORS[color]
            buf = io.BytesIO()
            Image.fromarray(frame, mode="RGB").save(buf, format="JPEG", quality=90)
            out.append(buf.getvalue())
        return out

    def _audio(self, sound: str, rng: random.Random) -> bytes:
        n = round(self.seconds * SAMPLE_RATE)
        t = np.arange(n, dtype=np.float64) / SAMPLE_RATE
        freq = SOUNDS[sound] * rng.uniform(0.97, 1.03)
        rate = rng.uniform(1.0, 4.0)
        envelope = 0.6 + 0.4 * np.sin(2 * math.pi * rate * t + rng.uniform(0, 2 * math.pi))
        tone = 0.3 * envelope * np.sin(2 * math.pi * freq * t + rng.uniform(0, 2 * math.pi))
        noise = np.random.default_rng(rng.randrange(2**32)).normal(0.0, 0.02, n)
        buf = io.BytesIO()
        soundfile.write(buf, (tone + noise).astype(np.float32), SAMPLE_RATE, format="FLAC")
        return buf.getvalue()

    def __getitem__(self, index: int) -> dict[str, object]:
        """The shard sample of clip `index`: `__key__` plus member suffix -> bytes."""
        truth = self.clip(index)
        rng = self._rng(index, "media")
        frames = self._frames(truth.color, rng)
        n = len(frames)
        meta = ClipMeta(
            id=truth.key,
            source=f"synthetic://{self.seed}/{index}",
            duration=self.seconds,
            fps=n / self.seconds,
            has_audio=truth.has_audio,
            frame_times=[(i + 0.5) * self.seconds / n for i in range(n)],
            num_segments=self.num_segments,
            frames_per_segment=self.frames_per_segment,
            width=self.image_size,
            height=self.image_size,
            audio_samples=round(self.seconds * SAMPLE_RATE) if truth.has_audio else 0,
            extra={"color": truth.color, "sound": truth.sound},
        )
        sample: dict[str, object] = {"__key__": truth.key}
        for i, jpg in enumerate(frames):
            sample[frame_suffix(i)] = jpg
        if truth.has_audio:
            sample[AUDIO_SUFFIX] = self._audio(truth.sound, rng)
        sample[CAPTIONS_SUFFIX] = json.dumps(truth.captions).encode()
        sample[META_SUFFIX] = json.dumps(meta.to_json()).encode()
        return sample

"""Log-mel filterbank features of 16 kHz mono waveforms, in PyTorch.

    features = LogMel()(waveform)      # [B, S] samples in [-1, 1] -> [B, F, 64]

Conventions (the same as `librosa.feature.melspectrogram(center=True,
pad_mode="constant", htk=True, norm=None)` followed by a natural log):

- frames: 25 ms periodic Hann window (400 samples) zero-padded to a 512-point
  FFT, 10 ms hop (160 samples); the signal is zero-padded by n_fft / 2 on both
  sides so frame f is centred on sample f * hop: F = 1 + S // hop frames
  (101 per second).
- power spectrum |X|^2 -> 64 triangular mel filters (HTK mel scale,
  20 Hz .. 8 kHz, peak 1, no area normalisation).
- log(max(mel, 1e-10)), then normalised with fixed dataset statistics:
  (log_mel - mean) / (2 * std), as AST does. The defaults (-4.5, 3.8) were
  measured on real clips of film, speech, music and fire;
  digital silence reads as -2.4.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["LogMel", "hz_to_mel", "mel_filterbank", "mel_to_hz"]

LOG_FLOOR = 1e-10
"""Smallest mel power passed to log (log(1e-10) = -23.0)."""


def hz_to_mel(hz: float) -> float:
    """HTK mel scale: 2595 * log10(1 + hz / 700)."""
    return 2595.0 * math.log10(1.0 + hz / 700.0)


def mel_to_hz(mel: Tensor) -> Tensor:
    """Inverse of `hz_to_mel`, elementwise on a tensor of mels."""
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(
    *, sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float
) -> Tensor:
    """Triangular mel filters on the rFFT bins. -> [n_mels, n_fft // 2 + 1] float64.

    Filter m rises linearly (in Hz) from mel point m to m + 1 and falls to m + 2,
    where the n_mels + 2 points are equally spaced on the HTK mel scale.
    """
    if not 0.0 <= fmin < fmax <= sample_rate / 2:
        raise ValueError(
            f"mel range must satisfy 0 <= fmin < fmax <= sample_rate / 2, got "
            f"fmin={fmin}, fmax={fmax}, sample_rate={sample_rate}"
        )
    fft_hz = torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)  # [K]
    mels = torch.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2, dtype=torch.float64)
    points = mel_to_hz(mels)  # [n_mels + 2] Hz
    widths = points[1:] - points[:-1]  # [n_mels + 1]
    ramps = points[:, None] - fft_hz[None, :]  # [n_mels + 2, K]
    lower = -ramps[:-2] / widths[:-1, None]  # [n_mels, K] rising edge
    upper = ramps[2:] / widths[1:, None]  # [n_mels, K] falling edge
    return torch.clamp(torch.minimum(lower, upper), min=0.0)


class LogMel(nn.Module):
    """Waveform [B, S] (float, [-1, 1], `sample_rate` Hz) -> normalised log-mel [B, F, n_mels].

    F = 1 + S // hop. Runs in float32 even under autocast. Has no trainable
    parameters; the window and filters are non-persistent buffers.

    Args:
        sample_rate: Hz (the shards hold 16 kHz).
        n_mels: mel bins.
        window_ms, hop_ms: frame length and hop in milliseconds.
        fmin, fmax: mel range in Hz (fmax None = Nyquist).
        mean, std: normalisation statistics of the log-mel values.
    """

    filters: Tensor
    window: Tensor

    def __init__(
        self,
        *,
        sample_rate: int = 16_000,
        n_mels: int = 64,
        window_ms: float = 25.0,
        hop_ms: float = 10.0,
        fmin: float = 20.0,
        fmax: float | None = None,
        mean: float = -4.5,
        std: float = 3.8,
    ) -> None:
        super().__init__()
        if std <= 0:
            raise ValueError(f"log-mel std must be > 0, got {std}")
        self.sample_rate = sample_rate
        self.win_length = round(sample_rate * window_ms / 1000)
        self.hop_length = round(sample_rate * hop_ms / 1000)
        if self.win_length < 2 or self.hop_length < 1:
            raise ValueError(
                f"window {window_ms} ms / hop {hop_ms} ms too short at {sample_rate} Hz"
            )
        self.n_fft = 1 << math.ceil(math.log2(self.win_length))
        self.n_mels = n_mels
        self.mean = float(mean)
        self.std = float(std)
        fb = mel_filterbank(
            sample_rate=sample_rate,
            n_fft=self.n_fft,
            n_mels=n_mels,
            fmin=fmin,
            fmax=sample_rate / 2 if fmax is None else fmax,
        )
        self.register_buffer("filters", fb.to(torch.float32), persistent=False)  # [n_mels, K]
        window = torch.hann_window(self.win_length, periodic=True, dtype=torch.float32)
        self.register_buffer("window", window, persistent=False)  # [win_length]

    def num_frames(self, num_samples: int) -> int:
        """Frames produced for a waveform of `num_samples` samples."""
        return 1 + num_samples // self.hop_length

    def log_mel(self, waveform: Tensor) -> Tensor:
        """Un-normalised natural-log mel power. [B, S] -> [B, F, n_mels] float32."""
        if waveform.dim() != 2:
            raise ValueError(f"waveform must be [B, S], got shape {tuple(waveform.shape)}")
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            spec = torch.stft(
                waveform.float(),
                n_fft=self.n_fft,
                hop_length=self.hop_length,
                win_length=self.win_length,
                window=self.window,
                center=True,
                pad_mode="constant",
                return_complex=True,
            )  # [B, K, F]
            power = spec.real.square() + spec.imag.square()  # [B, K, F]
            mel = torch.matmul(self.filters, power)  # [B, n_mels, F]
            return mel.clamp_min(LOG_FLOOR).log().transpose(1, 2)  # [B, F, n_mels]

    def forward(self, waveform: Tensor) -> Tensor:
        """[B, S] -> normalised log-mel [B, F, n_mels]."""
        return (self.log_mel(waveform) - self.mean) / (2.0 * self.std)

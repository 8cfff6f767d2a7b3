"""Log-mel features against librosa (an independent implementation), on synthetic and real audio."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gram.audio import LOG_FLOOR, LogMel, mel_filterbank

librosa = pytest.importorskip("librosa", reason="librosa is the test reference (dev extra)")

SR = 16_000


def reference_log_mel(y: np.ndarray) -> np.ndarray:
    """librosa with the documented conventions -> [F, 64] natural-log mel power."""
    mel = librosa.feature.melspectrogram(
        y=y,
        sr=SR,
        n_fft=512,
        win_length=400,
        hop_length=160,
        window="hann",
        center=True,
        pad_mode="constant",
        power=2.0,
        n_mels=64,
        fmin=20.0,
        fmax=8000.0,
        htk=True,
        norm=None,
    )
    return np.log(np.maximum(mel, LOG_FLOOR)).T


def signals() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(SR) / SR
    chirp = 0.5 * np.sin(2 * np.pi * (100 + 3000 * t) * t)
    return {
        "noise": (0.1 * rng.standard_normal(SR)).astype(np.float32),
        "tones": (0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3100 * t)).astype(
            np.float32
        ),
        "chirp_odd_length": chirp[: SR - 77].astype(np.float32),
    }


def test_filterbank_matches_librosa_htk():
    ours = mel_filterbank(sample_rate=SR, n_fft=512, n_mels=64, fmin=20.0, fmax=8000.0).numpy()
    ref = librosa.filters.mel(
        sr=SR, n_fft=512, n_mels=64, fmin=20.0, fmax=8000.0, htk=True, norm=None
    )
    assert ours.shape == (64, 257)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("name", list(signals()))
def test_log_mel_matches_librosa(name):
    y = signals()[name]
    ours = LogMel().log_mel(torch.from_numpy(y)[None])[0].numpy()
    ref = reference_log_mel(y)
    assert ours.shape == ref.shape == (1 + len(y) // 160, 64)
    # Within 40 dB of the loudest bin the logs agree to 1e-3 nats; further down,
    # float32 rounding of tiny powers (FFT leakage) dominates, so compare loosely.
    loud = ref > ref.max() - 9.2
    assert loud.sum() >= 300
    np.testing.assert_allclose(ours[loud], ref[loud], atol=1e-3)
    np.testing.assert_allclose(ours, ref, atol=0.5)


def test_log_mel_matches_librosa_on_real_speech(shared_data):
    import soundfile

    path = shared_data / "av-digits" / "fsdd" / "7_jackson_0.wav"
    y8k, rate = soundfile.read(path, dtype="float32")
    y = librosa.resample(y8k, orig_sr=rate, target_sr=SR).astype(np.float32)
    ours = LogMel().log_mel(torch.from_numpy(y)[None])[0].numpy()
    ref = reference_log_mel(y)
    loud = ref > ref.max() - 9.2
    assert loud.sum() >= 300
    np.testing.assert_allclose(ours[loud], ref[loud], atol=1e-3)


def test_normalisation_and_shapes():
    lm = LogMel()
    assert (lm.win_length, lm.hop_length, lm.n_fft) == (400, 160, 512)
    wave = torch.zeros(2, 16_000)
    feats = lm(wave)
    assert feats.shape == (2, 101, 64)
    expected = (np.log(LOG_FLOOR) - lm.mean) / (2 * lm.std)
    torch.testing.assert_close(feats, torch.full_like(feats, float(expected)))
    assert lm.num_frames(16_000) == 101


def test_batch_rows_are_independent_and_float32_under_autocast():
    y = torch.from_numpy(signals()["noise"])
    lm = LogMel()
    batch = torch.stack([y, 0.5 * y])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = lm(batch)
    assert feats.dtype == torch.float32
    torch.testing.assert_close(feats[0], lm(y[None])[0])


def test_bad_settings_say_what_to_fix():
    with pytest.raises(ValueError, match="fmax"):
        LogMel(fmax=9000.0)
    with pytest.raises(ValueError, match="std"):
        LogMel(std=0.0)
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        LogMel()(torch.zeros(16_000))

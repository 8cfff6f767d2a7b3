"""Sample decoding (augmentation, eval determinism, missing audio, safety) and the synthetic set."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from gram.decode import (
    Collator,
    DecodeConfig,
    NoiseAugment,
    SampleError,
    augment_sample,
    collate,
    decode_sample,
)
from gram.schema import ClipMeta, frame_suffix
from gram.synthetic import COLORS, SOUNDS, SyntheticClips
from gram.text import HashTokenizer

CFG = DecodeConfig(num_frames=4, image_size=32, audio_samples=16_000)


def _jpeg(value: int, size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _flac(wave: np.ndarray, rate: int = 16_000) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, wave.astype(np.float32), rate, format="FLAC")
    return buf.getvalue()


def labelled_sample(segments: int = 4, per_segment: int = 3, audio: bool = True) -> dict:
    """Frame i is a flat grey of value 10 * i, so the decoded pixels tell which frame was used."""
    n = segments * per_segment
    meta = ClipMeta(
        id="clip-1",
        source="test",
        duration=2.0,
        fps=n / 2.0,
        has_audio=audio,
        frame_times=[i / n for i in range(n)],
        num_segments=segments,
        frames_per_segment=per_segment,
    )
    sample = {"__key__": "clip-1", "json": json.dumps(meta.to_json()).encode()}
    sample.update({frame_suffix(i): _jpeg(10 * i) for i in range(n)})
    sample["captions.json"] = json.dumps(["first caption", "second caption", " "]).encode()
    if audio:
        sample["flac"] = _flac(np.linspace(-0.5, 0.5, 24_000))
    return sample


def frame_ids(video: torch.Tensor) -> list[int]:
    return [round(float(f.float().mean()) / 10) for f in video]


def test_eval_decoding_is_deterministic_middle_frames_centre_crop():
    sample = labelled_sample()
    a = decode_sample(sample, CFG, train=False)
    b = decode_sample(sample, CFG, train=False)
    assert a["key"] == "clip-1"
    assert a["video"].shape == (4, 3, 32, 32)
    assert a["video"].dtype == torch.uint8
    assert frame_ids(a["video"]) == [1, 4, 7, 10]  # middle frame of each 3-frame segment
    torch.testing.assert_close(a["video"], b["video"])
    assert a["caption"] == "first caption"
    assert a["captions"] == ["first caption", "second caption"]  # blank ones dropped
    assert a["audio_present"]
    assert a["audio"].shape == (16_000,)
    # centre window of the 24,000-sample ramp: starts at sample 4,000.
    ramp = np.linspace(-0.5, 0.5, 24_000)
    np.testing.assert_allclose(a["audio"].numpy(), ramp[4_000:20_000], atol=1e-4)


def test_train_decoding_samples_frames_within_segments_and_captions():
    sample = labelled_sample()
    seen_frames, seen_captions, seen_starts = set(), set(), set()
    for seed in range(40):
        item = decode_sample(sample, CFG, train=True, rng=random.Random(seed))
        ids = frame_ids(item["video"])
        assert [i // 3 for i in ids] == [0, 1, 2, 3]  # one frame from each segment, in order
        seen_frames.update(ids)
        seen_captions.add(item["caption"])
        seen_starts.add(round(float(item["audio"][0]), 3))
    assert seen_frames == set(range(12))
    assert seen_captions == {"first caption", "second caption"}
    assert len(seen_starts) > 10


def test_random_crop_moves_and_is_shared_by_all_frames():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    sample = {"__key__": "k", "captions.json": ["c"], "frames": np.stack([image] * 4)}
    crops = [
        decode_sample(sample, CFG, train=True, rng=random.Random(s))["video"] for s in range(8)
    ]
    for v in crops:
        assert all(torch.equal(v[0], f) for f in v)
    assert len({v[0].float().sum().item() for v in crops}) > 1
    centre = decode_sample(sample, CFG, train=False)["video"]
    assert centre.shape == (4, 3, 32, 32)


def test_missing_audio_gives_zeros_and_a_false_mask():
    item = decode_sample(labelled_sample(audio=False), CFG, train=True)
    assert not item["audio_present"]
    assert torch.equal(item["audio"], torch.zeros(16_000))
    # has_audio false in the metadata wins over a stray flac member.
    sample = labelled_sample(audio=False)
    sample["flac"] = _flac(np.ones(100) * 0.1)
    assert not decode_sample(sample, CFG, train=False)["audio_present"]


def test_already_decoded_values_are_accepted():
    sample = labelled_sample()
    decoded = {
        "__key__": "clip-1",
        "json": json.loads(sample["json"]),
        "captions.json": ["first caption"],
        "flac": np.linspace(-0.5, 0.5, 24_000).astype(np.float32),
    }
    for i in range(12):
        img = Image.open(io.BytesIO(sample[frame_suffix(i)]))
        decoded[frame_suffix(i)] = img if i % 2 else np.asarray(img.convert("RGB"))
    a = decode_sample(sample, CFG, train=False)
    b = decode_sample(decoded, CFG, train=False)
    torch.testing.assert_close(a["video"], b["video"])
    torch.testing.assert_close(a["audio"], b["audio"], atol=1e-4, rtol=0)


def test_frames_npy_and_txt_captions_and_no_metadata():
    frames = np.stack([np.full((40, 40, 3), 10 * i, np.uint8) for i in range(8)])
    buf = io.BytesIO()
    np.save(buf, frames)
    sample = {"__key__": "k", "frames.npy": buf.getvalue(), "txt": b"one\ntwo\n"}
    item = decode_sample(sample, CFG, train=False)
    assert frame_ids(item["video"]) == [1, 3, 5, 7]  # 8 one-frame segments resampled to 4
    assert item["captions"] == ["one", "two"]
    assert not item["audio_present"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"__key__": "../etc"}, "invalid sample key"),
        ({"__key__": None}, "__key__"),
        ({"f001.jpg\n": b""}, "unsafe tar member"),
        ({"captions.json": b"not json"}, "not valid JSON"),
        ({"captions.json": b'{"a": 1}'}, "list of strings"),
        ({"captions.json": b'["", " "]'}, "every caption is empty"),
        ({"f005.jpg": None}, "not contiguous"),
        ({"f001.jpg": b"not a jpeg"}, "not a readable image"),
        ({"flac": b"not audio"}, "not readable"),
        ({"flac": _flac(np.zeros(100), rate=8_000)}, "8000 Hz"),
        ({"json": b'{"id": 1}'}, "bad json metadata"),
    ],
)
def test_bad_samples_raise_sample_error_naming_the_problem(change, message):
    sample = labelled_sample()
    for k, v in change.items():
        if v is None and k != "__key__":
            sample.pop(k)
        else:
            sample[k] = v
    with pytest.raises(SampleError, match=message):
        decode_sample(sample, CFG, train=False)


def test_frame_count_must_match_the_metadata():
    sample = labelled_sample()
    sample.pop(frame_suffix(11))
    with pytest.raises(SampleError, match="11 frames do not match 4 segments x 3"):
        decode_sample(sample, CFG, train=False)


def test_huge_frames_are_refused_before_decoding():
    sample = {"__key__": "k", "captions.json": ["c"], "f000.jpg": _jpeg(0, size=300)}
    with pytest.raises(SampleError, match="outside"):
        decode_sample(
            sample, DecodeConfig(num_frames=1, image_size=32, max_image_pixels=10_000), train=False
        )


def test_collate_shapes_and_tokens():
    items = [decode_sample(labelled_sample(audio=i % 2 == 0), CFG, train=False) for i in range(3)]
    batch = Collator(HashTokenizer(64, 16))(items)
    assert batch["video"].shape == (3, 4, 3, 32, 32)
    assert batch["audio"].shape == (3, 16_000)
    assert batch["audio_present"].tolist() == [True, False, True]
    assert batch["text"] == ["first caption"] * 3
    assert batch["text_ids"].shape == batch["text_attention"].shape == (3, 4)
    assert "text_ids" not in collate(items)
    with pytest.raises(ValueError, match="at least one"):
        collate([])


def test_synthetic_clips_are_real_media_and_need_both_modalities():
    clips = SyntheticClips(40, seed=5, missing_audio=0.25)
    truths = [clips.clip(i) for i in range(36)]
    assert {(t.color, t.sound) for t in truths} == {(c, s) for c in COLORS for s in SOUNDS}
    for t in truths:
        for caption in t.captions:
            assert t.color in caption
            assert t.sound in caption
    assert any(not t.has_audio for t in truths)
    assert any(t.has_audio for t in truths)

    sample = clips[0]
    assert sample["__key__"] == "syn-5-000000"
    assert Image.open(io.BytesIO(sample["f000.jpg"])).format == "JPEG"
    meta = ClipMeta.from_json(json.loads(sample["json"]))
    assert (meta.num_segments, meta.frames_per_segment) == (4, 2)
    assert sum(k.endswith(".jpg") for k in sample) == 8
    item = decode_sample(sample, CFG, train=False)
    if clips.clip(0).has_audio:
        wave, rate = soundfile.read(io.BytesIO(sample["flac"]))
        assert rate == 16_000
        assert len(wave) == 19_200
        spectrum = np.abs(np.fft.rfft(wave))
        peak_hz = np.argmax(spectrum) * 16_000 / len(wave)
        assert abs(peak_hz - SOUNDS[clips.clip(0).sound]) < 0.05 * SOUNDS[clips.clip(0).sound]
    # The square's colour dominates the frame's non-background pixels.
    rgb = item["video"][0].permute(1, 2, 0).reshape(-1, 3).float()
    bright = rgb[rgb.max(dim=1).values > 150]
    target = torch.tensor(COLORS[clips.clip(0).color], dtype=torch.float32)
    assert (bright.mean(0) - target).abs().max() < 40
    # Deterministic: the same index gives the same bytes.
    assert SyntheticClips(40, seed=5, missing_audio=0.25)[0] == sample


def test_predecoded_samples_decode_to_the_same_tensors():
    from gram.decode import predecode

    raw = labelled_sample()
    ready = predecode(raw, CFG)
    assert isinstance(ready["f000.jpg"], np.ndarray)
    assert isinstance(ready["flac"], np.ndarray)
    assert isinstance(ready["captions.json"], list)
    for train in (False, True):
        want = decode_sample(raw, CFG, train=train, rng=random.Random(4))
        got = decode_sample(ready, CFG, train=train, rng=random.Random(4))
        assert got["caption"] == want["caption"]
        assert torch.equal(got["video"], want["video"])
        assert torch.equal(got["audio"], want["audio"])
    broken = {**raw, "f001.jpg": b"not a jpeg"}
    assert predecode(broken, CFG) == broken  # left as it is: decode_sample reports it
    with pytest.raises(SampleError, match="not a readable image"):
        decode_sample(predecode(broken, CFG), CFG, train=False)


def _grey_clip(audio: np.ndarray | None) -> dict:
    """A decoded clip: 2 frames of flat grey 50, and `audio` (None: no audio track)."""
    return {
        "key": "clip-1",
        "video": torch.full((2, 3, 32, 32), 50, dtype=torch.uint8),
        "audio": torch.zeros(16_000) if audio is None else torch.from_numpy(audio),
        "audio_present": audio is not None,
        "caption": "a",
        "captions": ["a"],
    }


def test_noise_augment_off_leaves_the_sample_unchanged():
    item = _grey_clip(np.full(16_000, 0.1, np.float32))
    assert augment_sample(item, NoiseAugment(), random.Random(0)) is item
    with pytest.raises(ValueError, match="frame_noise_std"):
        NoiseAugment(frame_noise_std=-0.1)


def test_noise_augment_draws_luminance_noise_an_occluder_and_audio_at_its_snr():
    rng = np.random.default_rng(0)
    wave = (0.05 * rng.standard_normal(16_000)).astype(np.float32)  # the mix stays below 1
    aug = NoiseAugment(frame_occluder=8, frame_noise_std=0.03, audio_snr_db=-3.0)
    out = augment_sample(_grey_clip(wave), aug, random.Random(1))
    video = out["video"]
    assert video.dtype == torch.uint8
    assert video.shape == (2, 3, 32, 32)
    assert torch.equal(video[:, 0], video[:, 1])
    assert torch.equal(video[:, 0], video[:, 2])
    pixels = video[:, 0].float() / 255.0  # [T, H, W]; the clip is grey 50 / 255 = 0.196
    occluded = pixels > 0.35  # the square is 0.5 + noise: 5 noise stds from either level
    assert torch.equal(occluded[0], occluded[1])  # one place for every frame of the clip
    rows, cols = occluded[0].nonzero(as_tuple=True)
    assert int(occluded[0].sum()) == 64
    assert int(rows.max() - rows.min()) == 7
    assert int(cols.max() - cols.min()) == 7
    assert abs(float(pixels[occluded].mean()) - 0.5) < 0.01
    assert 0.025 < float(pixels[~occluded].std()) < 0.035
    noise = out["audio"].numpy().astype(np.float64) - wave
    snr = 10 * np.log10(np.mean(wave.astype(np.float64) ** 2) / np.mean(noise**2))
    assert abs(snr + 3.0) < 0.3
    again = augment_sample(_grey_clip(wave), aug, random.Random(1))
    other = augment_sample(_grey_clip(wave), aug, random.Random(2))
    assert torch.equal(again["video"], video)
    assert torch.equal(again["audio"], out["audio"])
    assert not torch.equal(other["video"], video)


def test_noise_augment_keeps_missing_and_silent_audio_and_stays_in_range():
    aug = NoiseAugment(audio_snr_db=-20.0)
    missing = augment_sample(_grey_clip(None), aug, random.Random(0))
    assert not missing["audio_present"]
    assert torch.equal(missing["audio"], torch.zeros(16_000))
    silent = augment_sample(_grey_clip(np.zeros(16_000, np.float32)), aug, random.Random(0))
    assert torch.equal(silent["audio"], torch.zeros(16_000))
    loud = augment_sample(_grey_clip(np.full(16_000, 0.9, np.float32)), aug, random.Random(0))
    assert float(loud["audio"].abs().max()) <= 1.0

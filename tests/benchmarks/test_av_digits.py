"""The AV-digits benchmark: its parts on small inputs, and `--quick` end to end on the real data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.av_digits import _shard_size, _shard_speakers, _write_view
from benchmarks.av_digits_data import (
    AUDIO_RATE,
    IMAGE_SIZE,
    TEMPLATES,
    Corruption,
    DataSettings,
    Recording,
    captions_for,
    corrupt_audio,
    corrupt_image,
    make_samples,
    mnist_pools,
)
from benchmarks.av_digits_eval import ClipEmbeddings, evaluate_embeddings
from benchmarks.av_digits_report import METHODS, aggregate, table

REPO = Path(__file__).resolve().parents[2]


def _recordings(speakers: tuple[str, ...] = ("ann", "bob"), takes: int = 10) -> list[Recording]:
    return [
        Recording(Path(f"{d}_{s}_{t}.wav"), d, s, t)
        for s in speakers
        for d in range(10)
        for t in range(takes)
    ]


def test_mnist_pools_split_every_digit_into_train_and_test() -> None:
    labels = np.repeat(np.arange(10), 500)  # sorted by label, like mnist_5k.csv.gz
    pools = mnist_pools(labels)
    for d in range(10):
        assert len(pools["train"][d]) == 400
        assert len(pools["test"][d]) == 100
        assert set(pools["train"][d]).isdisjoint(pools["test"][d])
        assert all(labels[i] == d for i in pools["train"][d] + pools["test"][d])
        assert max(pools["train"][d]) < min(pools["test"][d])  # first 400 / last 100 per digit


def test_make_samples_pairs_same_digit_uses_each_image_once_and_is_deterministic() -> None:
    labels = np.repeat(np.arange(10), 500)
    settings = DataSettings(train_takes=(2, 10), test_takes=(0, 2))
    out = make_samples(_recordings(), labels, settings)
    assert [len(out["train"]), len(out["test"])] == [160, 40]
    for split, samples in out.items():
        assert all(labels[s.image_index] == s.digit for s in samples)
        assert len({s.image_index for s in samples}) == len(samples)
        assert all((s.take >= 2) == (split == "train") for s in samples)
        speakers = [s.speaker for s in samples]
        assert speakers == sorted(speakers)  # contiguous per speaker
    assert {s.image_index for s in out["train"]}.isdisjoint(s.image_index for s in out["test"])
    assert make_samples(_recordings(), labels, settings) == out
    other = make_samples(_recordings(), labels, DataSettings(seed=1, **_takes(settings)))
    assert [s.image_index for s in other["train"]] != [s.image_index for s in out["train"]]


def _takes(settings: DataSettings) -> dict[str, tuple[int, int]]:
    return {"train_takes": settings.train_takes, "test_takes": settings.test_takes}


def test_overlapping_takes_are_refused() -> None:
    with pytest.raises(ValueError, match="disjoint"):
        DataSettings(train_takes=(0, 10), test_takes=(5, 6))


def test_corrupt_image_occludes_adds_noise_and_pads() -> None:
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[4:24, 12:16] = 255  # a "1"
    clean = corrupt_image(digit, Corruption(0.0, 0, 0.0), np.random.default_rng(0))
    assert clean.shape == (IMAGE_SIZE, IMAGE_SIZE)
    assert clean.dtype == np.uint8
    pad = (IMAGE_SIZE - 28) // 2
    assert np.array_equal(clean[pad:-pad, pad:-pad], digit)
    occluded = corrupt_image(digit, Corruption(0.0, 10, 0.0), np.random.default_rng(0))
    assert (occluded == 128).sum() == 100
    noisy = corrupt_image(digit, Corruption(0.3, 0, 0.0), np.random.default_rng(0))
    diff = noisy.astype(float) - clean
    assert 40 < diff.std() < 90  # clipped noise of std 0.3 * 255


def test_corrupt_audio_has_the_window_length_and_snr() -> None:
    rng = np.random.default_rng(0)
    speech = (0.2 * np.sin(np.arange(3000) * 0.3)).astype(np.float32)  # 0.375 s
    out = corrupt_audio(speech, Corruption(audio_snr_db=0.0), rng)
    assert out.shape == (AUDIO_RATE,)
    assert out.dtype == np.float32
    quiet = corrupt_audio(speech, Corruption(audio_snr_db=100.0), np.random.default_rng(0))
    start = int(np.flatnonzero(np.abs(quiet) > 1e-3)[0])
    noise = out.astype(np.float64) - np.pad(speech, (start, AUDIO_RATE - 3000 - start))
    snr = 10 * np.log10(np.mean(speech.astype(np.float64) ** 2) / np.mean(noise**2))
    assert abs(snr) < 0.5
    long = corrupt_audio(np.ones(3 * AUDIO_RATE, np.float32) * 0.1, Corruption(100.0), rng)
    assert long.shape == (AUDIO_RATE,)


def test_shard_size_splits_every_speaker_into_whole_shards() -> None:
    assert _shard_size([450] * 6) == 90
    assert _shard_size([50] * 6) == 50
    assert _shard_size([10, 20]) == 10
    assert _shard_size([7, 7]) == 7


def test_views_select_speaker_shards(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = tmp_path / "shards"
    source.mkdir()
    shards = [{"name": f"shard-{i:06d}.tar", "samples": 2} for i in range(3)]
    index = {"input": {"fingerprint": "abc"}, "shards": shards}
    (source / "index.json").write_text(json.dumps(index))
    ids = ["train_ann_1_05", "train_ann_2_05", "train_bob_1_05", "train_bob_2_05"]
    ids += ["train_cat_1_05", "train_cat_2_05"]
    rows = {"id": ids, "status": ["ok"] * 6, "shard": [s["name"] for s in shards for _ in (0, 1)]}
    pq.write_table(pa.table(rows), source / "manifest.parquet")
    speakers = _shard_speakers(source)
    assert speakers == {
        "shard-000000.tar": "ann",
        "shard-000001.tar": "bob",
        "shard-000002.tar": "cat",
    }
    view = _write_view(tmp_path / "view", [(source, ["shard-000001.tar"])])
    listed = json.loads((view / "index.json").read_text())
    assert [s["name"] for s in listed["shards"]] == ["../shards/shard-000001.tar"]
    assert (view / listed["shards"][0]["name"]).resolve() == source / "shard-000001.tar"
    assert listed["totals"]["samples"] == 2


def _embeddings(align: float, n: int = 200) -> ClipEmbeddings:
    """Clips whose video and audio lean towards their class direction by `align`."""
    gen = torch.Generator().manual_seed(0)
    classes = F.normalize(torch.randn(10, 32, generator=gen), dim=-1)
    labels = torch.arange(n) % 10
    prompts = classes[:, None, :].expand(10, len(TEMPLATES), 32)

    def side() -> torch.Tensor:
        return F.normalize(align * classes[labels] + torch.randn(n, 32, generator=gen), dim=-1)

    return ClipEmbeddings(prompts, side(), side(), torch.ones(n, 2, dtype=torch.bool), labels)


def test_evaluation_separates_aligned_from_random_embeddings() -> None:
    good, good_vol = evaluate_embeddings(_embeddings(align=5.0))
    bad, _ = evaluate_embeddings(_embeddings(align=0.0))
    for key in ("zs_volume", "zs_cos_video", "zs_cos_audio", "zs_cos_sum"):
        assert good[key] > 95, key
        assert bad[key] < 30, key
    for key in ("t2va_volume_r1", "t2va_cos_sum_map", "v2a_r1", "a2v_r1"):
        assert good[key] > 90, key
        assert bad[key] < 40, key
    assert good_vol["positive"].shape == (200,)
    assert good_vol["negative"].shape == (1800,)
    assert good_vol["positive"].mean() < good_vol["negative"].mean()


def test_table_reports_mean_and_spread_per_split_and_method() -> None:
    results = [
        {
            "split": split,
            "method": method,
            "seed": seed,
            "metrics": evaluate_embeddings(_embeddings(align=float(seed + 1)))[0],
        }
        for split in ("official", "holdout")
        for method in ("gram", "cosine_anchor", "cosine_all")
        for seed in (0, 1)
    ]
    rows = aggregate(results)
    assert len(rows) == 6
    assert all(r.seeds == (0, 1) for r in rows)
    text = table(rows)
    assert "seeds 0, 1" in text
    assert "±" in text
    assert text.count("| official split |") == 2 * 3
    assert text.count("| held-out speaker |") == 6


def test_captions_name_the_digit() -> None:
    assert all("seven" in c for c in captions_for(7))
    assert len(captions_for(0)) == len(TEMPLATES)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_quick_run_end_to_end(shared_data: Path, tmp_path: Path) -> None:
    """`--quick` builds the data, preprocesses, trains 3 losses x 2 splits with the training
    job, evaluates and writes the table, plots, results and MLflow run (numbers not checked)."""
    data = shared_data / "av-digits"
    if not (data / "fsdd").is_dir():
        pytest.skip(f"{data} has no fsdd/ recordings")
    out = tmp_path / "av_digits"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/av_digits.py",
            "--quick",
            "--data",
            str(data),
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = (out / "av_digits.md").read_text()
    assert "Zero-shot classification" in doc
    assert "Retrieval at class level" in doc
    for label in METHODS.values():
        assert doc.count(f"| {label} |") == 4, label  # a row per split in each of the 2 tables
    assert doc.count("| held-out speaker |") == 6
    for png in ("av_digits_accuracy.png", "av_digits_volumes.png", "av_digits_loss.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 6
    assert {r["split"] for r in results["runs"]} == {"official", "holdout"}
    assert (out / "mlflow.db").is_file()
    # Shards and runs are cached: a second run reuses both, trains nothing, gets the same numbers.
    again = subprocess.run(
        [
            sys.executable,
            "benchmarks/av_digits.py",
            "--quick",
            "--data",
            str(data),
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stderr.count("reusing finished run") == 6
    rerun = json.loads((out / "results.json").read_text())["runs"]
    for first, second in zip(results["runs"], rerun, strict=True):
        assert second["cached"]
        assert second["metrics"] == pytest.approx(first["metrics"], abs=1e-6)

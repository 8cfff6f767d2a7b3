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

from benchmarks.av_digits import _shard_size, arms
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
from benchmarks.av_digits_report import (
    ARMS,
    PAIRS,
    RULES,
    aggregate,
    convergence_table,
    difference_table,
    paired_differences,
    plateau,
    table,
)

REPO = Path(__file__).resolve().parents[2]


def _recordings(
    speakers: tuple[str, ...] = ("george", "jackson", "theo"), takes: int = 10
) -> list[Recording]:
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


def test_make_samples_leaves_the_held_out_speaker_out_of_training() -> None:
    labels = np.repeat(np.arange(10), 500)
    settings = DataSettings(train_takes=(2, 10), test_takes=(0, 2), holdout_speaker="theo")
    out = make_samples(_recordings(), labels, settings)
    assert [len(out["train"]), len(out["test"]), len(out["holdout"])] == [160, 40, 100]
    assert {s.speaker for s in out["train"]} == {s.speaker for s in out["test"]}
    assert {s.speaker for s in out["holdout"]} == {"theo"}  # its training and test takes
    assert {s.take for s in out["holdout"]} == set(range(10))
    quick = make_samples(_recordings(), labels, DataSettings(train_takes=(5, 6), test_takes=(0, 1)))
    assert {s.take for s in quick["holdout"]} == {0, 5}
    images = [s.image_index for split in out.values() for s in split]
    assert len(images) == len(set(images))  # every image once
    for split, samples in out.items():
        assert all(labels[s.image_index] == s.digit for s in samples)
        assert all(s.split == split for s in samples)
        speakers = [s.speaker for s in samples]
        assert speakers == sorted(speakers)  # contiguous per speaker
    train_pool = {i for rows in mnist_pools(labels)["train"].values() for i in rows}
    assert all(s.image_index in train_pool for s in out["train"])
    assert not any(s.image_index in train_pool for s in out["test"] + out["holdout"])
    assert make_samples(_recordings(), labels, settings) == out
    other = make_samples(_recordings(), labels, DataSettings(seed=1, **_takes(settings)))
    assert [s.image_index for s in other["train"]] != [s.image_index for s in out["train"]]
    with pytest.raises(ValueError, match="holdout_speaker must be one of"):
        DataSettings(holdout_speaker="nobody")


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


def _metrics(align: float) -> dict[str, float]:
    metrics = evaluate_embeddings(_embeddings(align=align))[0]
    return {**metrics, "zs_own": metrics["zs_volume"]}


def _results(seeds=(0, 1, 2)):
    return [
        {
            "split": split,
            "arm": arm,
            "seed": seed,
            "metrics": _metrics(align=float(seed + k)),
        }
        for split in ("official", "holdout")
        for k, arm in enumerate(ARMS)
        for seed in seeds
    ]


def test_table_reports_every_arm_under_every_rule_per_test_set() -> None:
    rows = aggregate(_results(seeds=(0, 1)))
    assert len(rows) == 2 * len(ARMS)
    assert all(r.seeds == (0, 1) for r in rows)
    text = table(rows)
    assert "seeds 0, 1" in text
    assert "±" in text
    for label in ARMS.values():
        assert text.count(f"| {label} |") == 4  # 2 test sets x (accuracy, retrieval)
    for rule in ("volume (t; v, a)", "cos-sum", "cos-sum, sign-aligned", "cos (t, a), aligned"):
        assert f"| {rule} |" in text or f" {rule} |" in text


def test_paired_differences_are_per_seed_with_their_spread() -> None:
    results = _results()
    diffs = paired_differences(results, ["zs_volume"])
    assert [(d.split, d.arm, d.baseline) for d in diffs] == [
        (split, a, b) for split in ("official", "holdout") for a, b in PAIRS
    ]
    by_key = {(r["split"], r["arm"], r["seed"]): r["metrics"] for r in results}
    for d in diffs:
        assert d.seeds == (0, 1, 2)
        want = [
            by_key[d.split, d.arm, s]["zs_volume"] - by_key[d.split, d.baseline, s]["zs_volume"]
            for s in d.seeds
        ]
        assert list(d.values) == pytest.approx(want)
        assert d.mean == pytest.approx(sum(want) / 3)
    assert "| official split |" in difference_table(diffs)


def test_plateau_and_the_convergence_table() -> None:
    falling = [4.0 - 0.001 * i for i in range(1000)]
    flat = [2.0 + 0.01 * ((i * 7) % 5 - 2) for i in range(1000)]
    change, ok = plateau(falling)
    assert not ok
    assert change == pytest.approx(0.2 / 3.3, rel=0.05)
    assert plateau(flat)[1]
    runs = [
        {"arm": arm, "seed": s, "steps": 1000, "plateau_change": plateau(flat)[0],
         "final_loss": 2.0, "converged": arm != "gram"}
        for arm in ARMS for s in (0, 1)
    ]  # fmt: skip
    text = convergence_table(runs)
    assert text.count("| yes |") == len(ARMS) - 1
    assert "| **no** |" in text


def test_every_arm_trains_with_its_loss_and_fine_tunes_start_from_cosine() -> None:
    plan = arms(cosine_weight=0.5)
    assert list(plan) == ["cosine_anchor", "gram", "cosine_all", "gram_cosine",
                          "finetune_gram", "finetune_cosine"]  # fmt: skip
    assert set(plan) == set(ARMS)
    assert plan["gram_cosine"].loss == {"kind": "gram", "cosine_weight": 0.5}
    assert plan["finetune_gram"].parent == plan["finetune_cosine"].parent == "cosine_anchor"
    assert plan["finetune_gram"].loss["kind"] == "gram"
    assert plan["finetune_cosine"].loss["kind"] == "cosine_anchor"


def test_captions_name_the_digit() -> None:
    assert all("seven" in c for c in captions_for(7))
    assert len(captions_for(0)) == len(TEMPLATES)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_quick_run_end_to_end(shared_data: Path, tmp_path: Path) -> None:
    """`--quick` builds the data, preprocesses, trains the six arms with the training job (the
    fine-tuning arms from the cosine run's checkpoint), evaluates both test sets and writes the
    tables, plots, results and MLflow run (numbers not checked)."""
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
    assert "zero-shot classification" in doc
    assert "retrieval at class level" in doc
    assert "## Convergence" in doc
    assert "Calibration check" in doc
    for label in ARMS.values():
        assert doc.count(f"| {label} |") == 5, label  # convergence + 2 test sets x 2 tables
    assert doc.count("| held-out speaker |") == len(PAIRS) * len(RULES)  # paired differences
    for png in ("av_digits_accuracy.png", "av_digits_volumes.png", "av_digits_loss.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    runs = {r["arm"]: r for r in results["runs"]}
    assert set(runs) == set(ARMS)
    assert all(set(r["metrics"]) == {"official", "holdout"} for r in runs.values())
    assert runs["finetune_gram"]["steps"] == 6
    assert runs["gram"]["steps"] == 10
    assert (out / "mlflow.db").is_file()
    lineage = json.loads((Path(runs["finetune_gram"]["checkpoint"]) / "state.json").read_text())[
        "progress"
    ]["lineage"]
    assert lineage["init_from"] == runs["cosine_anchor"]["checkpoint"]
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
        for split in ("official", "holdout"):
            assert second["metrics"][split] == pytest.approx(first["metrics"][split], abs=1e-6)

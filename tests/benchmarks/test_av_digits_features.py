"""AV-digits on fixed features: its parts on small inputs, and `--quick` on the real data."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks.av_digits_data import DIGIT_NAMES, TEMPLATES, Corruption, Sample
from benchmarks.av_digits_features import (
    LADDER,
    LOSSES,
    MISSING,
    PARENTS,
    Corrupter,
    FeatureTowers,
    Settings,
    _batch,
    _partners,
    _present,
    caption_features,
    eval_loss,
    evaluate_four,
)
from benchmarks.av_digits_report import ARMS

REPO = Path(__file__).resolve().parents[2]


def test_caption_features_differ_only_in_the_digit_word() -> None:
    bags = caption_features()  # [10, P, V]
    assert bags.shape[:2] == (len(DIGIT_NAMES), len(TEMPLATES))
    for p in range(len(TEMPLATES)):
        diff = (bags[0, p] - bags[1, p]).abs()
        assert diff.sum() == 2  # "zero" out, "one" in
    assert torch.equal(
        bags.sum(-1), torch.tensor([[len(t.split()) for t in TEMPLATES]] * 10).float()
    )


def test_towers_embed_each_modality_on_the_unit_sphere() -> None:
    towers = FeatureTowers({"text": 7, "video": 12, "audio": 20}, hidden=16, embed_dim=8)
    out = towers({"text": torch.rand(5, 7), "video": torch.rand(5, 12), "audio": torch.rand(5, 20)})
    assert set(out) == {"text", "video", "audio"}
    for emb in out.values():
        assert emb.shape == (5, 8)
        assert torch.allclose(emb.norm(dim=-1), torch.ones(5), atol=1e-5)


def _split(n: int, present: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    return {
        "digit": torch.arange(n) % 10,
        "image": torch.rand(n, 12, generator=gen),
        "audio": torch.rand(n, 20, generator=gen),
        "audio2": torch.rand(n, 20, generator=gen),
        "present": present if present is not None else torch.ones(n, 3, dtype=torch.bool),
    }


def test_batch_captions_each_clip_by_its_digit_and_masks_missing_modalities() -> None:
    present = torch.tensor([[True, False, True], [False, True, True], [True, True, False]])
    data, captions = _split(3, present), torch.rand(10, 2, 7)
    idx, template = torch.tensor([2, 0]), torch.tensor([1, 0])
    inputs, mask = _batch(data, idx, template, captions, four=False)
    assert mask is None
    assert set(inputs) == {"text", "video", "audio"}
    assert torch.equal(inputs["text"], torch.stack([captions[2, 1], captions[0, 0]]))
    inputs, mask = _batch(data, idx, template, captions, four=True)
    assert torch.equal(inputs["audio2"], data["audio2"][idx])
    assert mask is not None
    assert mask.tolist() == [[True, True, True, False], [True, True, False, True]]


def test_eval_loss_is_repeatable_and_leaves_training_untouched() -> None:
    from gram.loss import build_loss

    torch.manual_seed(0)
    dims = {"text": 7, "video": 12, "audio": 20, "audio2": 20}
    towers = FeatureTowers(dims, hidden=16, embed_dim=8)
    loss = build_loss(kind="gram")
    data, captions = _split(23), torch.rand(10, 3, 7)
    weights = {k: t.clone() for k, t in towers.state_dict().items()}
    rng = torch.get_rng_state()
    s = Settings(batch_size=5)
    first = eval_loss(towers, loss, data, captions, s, four=False)
    assert eval_loss(towers, loss, data, captions, s, four=False) == first
    assert torch.equal(torch.get_rng_state(), rng)  # the training run's draws are unchanged
    assert towers.training
    for k, t in towers.state_dict().items():
        assert torch.equal(t, weights[k])
    assert first != eval_loss(towers, loss, data, captions, Settings(batch_size=4), four=False)
    masked = _split(23, torch.rand(23, 3, generator=torch.Generator().manual_seed(1)) > 0.3)
    assert eval_loss(towers, loss, masked, captions, s, four=True) > 0


def test_every_arm_has_a_loss_and_the_ladder_gets_harsher() -> None:
    assert set(LOSSES) == set(ARMS)
    assert set(PARENTS.values()) == {"cosine_anchor"}
    for milder, harsher in itertools.pairwise(LADDER):
        assert harsher.image_noise_std > milder.image_noise_std
        assert harsher.audio_snr_db < milder.audio_snr_db


def test_quick_run_end_to_end(shared_data: Path, tmp_path: Path) -> None:
    """`--quick` computes the features, trains the six arms (the fine-tuning arms from the
    cosine run's final weights) and writes the report (numbers not checked)."""
    data = shared_data / "av-digits"
    if not (data / "fsdd").is_dir():
        pytest.skip(f"{data} has no fsdd/ recordings")
    out = tmp_path / "avf"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/av_digits_features.py",
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
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = (out / "av_digits_features.md").read_text()
    for heading in (
        "## Calibration",
        "## Convergence",
        "## Results",
        "## Paired per-seed",
        "## Four modalities, some missing",
    ):
        assert heading in doc
    for label in ARMS.values():
        # three modalities: 2 convergence tables (training and test loss) + 2 test sets x 2
        # tables; four: 2 test sets + 2 convergence tables
        assert doc.count(f"| {label} |") == 10, label
    for png in (
        "av_digits_features_loss.png",
        "av_digits_features_test_loss.png",
        "av_digits_features_accuracy.png",
        "av_digits_features_four_loss.png",
        "av_digits_features_four_test_loss.png",
    ):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    runs = {r["arm"]: r for r in results["runs"]}
    assert set(runs) == set(ARMS)
    assert runs["gram"]["steps"] == 60
    assert runs["finetune_gram"]["steps"] == 30
    # the test loss is measured test_loss_points (5 in --quick) times, evenly spaced
    assert [step for step, _ in runs["gram"]["test_curve"]] == [12, 24, 36, 48, 60]
    assert [step for step, _ in runs["finetune_gram"]["test_curve"]] == [6, 12, 18, 24, 30]
    assert all(set(r["metrics"]) == {"official", "holdout"} for r in runs.values())
    assert len(results["calibration"]) == 1
    four = {r["arm"]: r for r in results["four_runs"]}
    assert set(four) == set(ARMS)
    for r in four.values():
        assert set(r["metrics"]["official"]) >= {"zs_own", "zs_volume", "zs_cos_sum"}


def test_partners_are_other_takes_of_the_same_digit_and_speaker() -> None:
    group = [
        Sample(f"s{i}", "train", d, spk, t, Path("x.wav"), 0)
        for i, (spk, d, t) in enumerate(
            (spk, d, t) for spk in ("a", "b") for d in range(3) for t in range(4)
        )
    ]
    partner = _partners(group, seed=0)
    for i, j in enumerate(partner.tolist()):
        assert j != i
        assert (group[j].speaker, group[j].digit) == (group[i].speaker, group[i].digit)
    with pytest.raises(ValueError, match="no other take"):
        _partners(group[:1], seed=0)


def test_present_keeps_one_modality_and_drops_about_a_third() -> None:
    present = _present(30_000, torch.Generator().manual_seed(0))
    assert present.shape == (30_000, 3)
    assert bool(present.any(dim=1).all())
    missing = 1.0 - present.float().mean().item()
    assert abs(missing - MISSING) < 0.06  # 1/3 each, minus the rows given one back


def test_four_modality_scores_leave_missing_modalities_out() -> None:
    torch.manual_seed(0)
    classes = F.normalize(torch.randn(10, 16), dim=-1)
    labels = torch.arange(10).repeat(3)  # [30]
    good = classes[labels]  # each clip's true class embedding
    noise = F.normalize(torch.randn(30, 16), dim=-1)
    emb = {"video": good, "audio": noise, "audio2": noise}
    prompts = classes[:, None, :]  # [10, 1, 16]
    only_video = torch.tensor([[True, False, False]] * 30)
    scores = evaluate_four(prompts, emb, only_video, labels)
    assert scores["zs_cos_sum"] == 100.0
    assert scores["zs_volume"] == 100.0
    only_noise = torch.tensor([[False, True, True]] * 30)
    assert evaluate_four(prompts, emb, only_noise, labels)["zs_cos_sum"] < 50.0


def test_corrupter_occludes_pads_and_adds_noise_at_the_snr() -> None:
    n, s = 4, 8000
    images = torch.full((n, 28, 28), 255, dtype=torch.uint8)
    t = torch.arange(s, dtype=torch.float32) / s
    waves = 0.05 * torch.sin(2 * torch.pi * 440.0 * t).repeat(n, 1)  # [n, S], 1 s at 8 kHz
    lengths = torch.full((n,), s)
    gen = torch.Generator().manual_seed(0)
    clean = Corrupter(images, waves, lengths, Corruption(0.0, 12, 60.0))
    image, audio = clean(torch.arange(n), gen)
    assert image.shape == (n, 1024)
    grid = image.view(n, 32, 32)
    assert bool((grid[:, :2] == 0).all())  # 2 px padding
    assert bool((grid[:, :, -2:] == 0).all())
    assert ((grid - 128 / 255).abs() < 1e-6).sum(dim=(1, 2)).tolist() == [144] * n  # occluder
    assert audio.shape[0] == n
    loud = Corrupter(images, waves, lengths, Corruption(0.0, 12, -6.0))(torch.arange(n), gen)[1]
    soft = Corrupter(images, waves, lengths, Corruption(0.0, 12, 20.0))(torch.arange(n), gen)[1]
    # Mel bins 28-40 (~1.6-3.3 kHz) hold only noise: 26 dB more noise power raises their
    # log-mel by ln(10 ** 2.6) / (2 * 3.8) = 0.79 (the front end's normalisation; the
    # tone is quiet enough that no mix is scaled down for clipping).
    band = slice(28 * 25, 41 * 25)  # features are [M, F'] flattened, F' = 25
    gap = (loud[:, band].mean() - soft[:, band].mean()).item()
    assert abs(gap - 0.79) < 0.08

"""GramLoss and the cosine InfoNCE baseline against explicit formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gram import CosineInfoNCELoss, GramLoss, build_loss, volume_matrix


def _embs(b=6, d=16, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, d, generator=g, requires_grad=True) for _ in range(k)]


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_gram_loss_is_bidirectional_cross_entropy_over_negative_volume(smoothing, k):
    embs = _embs(k=k)
    out = GramLoss(label_smoothing=smoothing)(*embs)
    v = volume_matrix(embs[0], *embs[1:])
    target = torch.arange(v.shape[0])
    a2d = F.cross_entropy(-v / 0.07, target, label_smoothing=smoothing)
    d2a = F.cross_entropy(-v.t() / 0.07, target, label_smoothing=smoothing)
    torch.testing.assert_close(out["loss"], (a2d + d2a) / 2)
    torch.testing.assert_close(out["loss_anchor_to_data"], a2d.detach())
    torch.testing.assert_close(out["loss_data_to_anchor"], d2a.detach())
    torch.testing.assert_close(out["positive_volume"], v.diagonal().mean().detach())
    off = (v.sum() - v.diagonal().sum()) / (v.numel() - v.shape[0])
    torch.testing.assert_close(out["negative_volume"], off.detach())
    assert out["temperature"].item() == pytest.approx(0.07)


def test_named_call_equals_positional_and_reorders_the_mask():
    t, v, a = _embs()
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[2, 2] = False  # sample 2 has no audio
    loss = GramLoss(anchor="text")
    positional = loss(t, v, a, mask=mask)["loss"]
    named = loss(**{"text": t, "video": v, "audio": a, "mask": mask})["loss"]
    reordered = loss(audio=a, text=t, video=v, mask=mask[:, [2, 0, 1]])["loss"]
    torch.testing.assert_close(positional, named)
    torch.testing.assert_close(positional, reordered)
    unmasked = loss(t, v, a)["loss"]
    assert not torch.allclose(positional, unmasked)


def test_missing_audio_uses_the_volume_of_the_rest_never_drops_the_sample():
    t, v, a = _embs()
    mask = torch.ones(6, 2, dtype=torch.bool)
    mask[:, 1] = False  # nobody has audio: the loss must equal the (text, video) loss
    with_mask = GramLoss()(t, v, a, mask=mask)["loss"]
    two_modal = GramLoss()(t, v)["loss"]
    torch.testing.assert_close(with_mask, two_modal)


def test_temperature_learns_and_is_clamped():
    embs = _embs()
    loss = GramLoss(temperature=0.07, temperature_bounds=(0.05, 0.5))
    loss(*embs)["loss"].backward()
    assert loss.log_temperature.grad is not None
    assert loss.log_temperature.grad != 0
    with torch.no_grad():
        loss.log_temperature.fill_(math.log(1e-4))
    assert loss.temperature.item() == pytest.approx(0.05)
    fixed = GramLoss(learn_temperature=False)
    assert not fixed.log_temperature.requires_grad


def test_gram_loss_prefers_aligned_data():
    t = torch.randn(8, 16)
    aligned = GramLoss()(t, t + 0.01 * torch.randn(8, 16), t + 0.01 * torch.randn(8, 16))
    shuffled = GramLoss()(t, torch.randn(8, 16), torch.randn(8, 16))
    assert aligned["loss"] < shuffled["loss"]
    assert aligned["positive_volume"] < aligned["negative_volume"]


@pytest.mark.parametrize("pairs", ["anchor", "all"])
def test_cosine_infonce_matches_explicit_pairs(pairs):
    t, v, a = _embs()
    out = CosineInfoNCELoss(pairs=pairs, label_smoothing=0.1)(t, v, a)
    n = [F.normalize(x, dim=-1) for x in (t, v, a)]
    target = torch.arange(6)

    def sym(x, y):
        return (
            F.cross_entropy(x @ y.t() / 0.07, target, label_smoothing=0.1)
            + F.cross_entropy(y @ x.t() / 0.07, target, label_smoothing=0.1)
        ) / 2

    want_pairs = [(0, 1), (0, 2)] if pairs == "anchor" else [(0, 1), (0, 2), (1, 2)]
    want = sum(sym(n[i], n[j]) for i, j in want_pairs) / len(want_pairs)
    torch.testing.assert_close(out["loss"], want)
    assert {k for k in out if k.startswith("loss_")} == {f"loss_{i}_{j}" for i, j in want_pairs}


def test_cosine_mask_leaves_missing_modality_out_of_its_pairs_only():
    t, v, a = _embs()
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[4, 2] = False
    out = CosineInfoNCELoss(pairs="anchor", label_smoothing=0.1)(t, v, a, mask=mask)
    keep = torch.tensor([0, 1, 2, 3, 5])
    n = [F.normalize(x, dim=-1) for x in (t, v, a)]
    target_all, target_keep = torch.arange(6), torch.arange(5)

    def sym(x, y, target):
        return (
            F.cross_entropy(x @ y.t() / 0.07, target, label_smoothing=0.1)
            + F.cross_entropy(y @ x.t() / 0.07, target, label_smoothing=0.1)
        ) / 2

    tv = sym(n[0], n[1], target_all)
    ta = sym(n[0][keep], n[2][keep], target_keep)
    torch.testing.assert_close(out["loss_0_1"], tv.detach())
    torch.testing.assert_close(out["loss_0_2"], ta.detach())
    out["loss"].backward()
    assert all(torch.isfinite(x.grad).all() for x in (t, v, a))


def test_build_loss_and_input_errors():
    assert isinstance(build_loss("gram"), GramLoss)
    assert build_loss("cosine_all").pairs == "all"
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("dot")
    loss = GramLoss()
    t, v, a = _embs()
    with pytest.raises(ValueError, match="mask must be"):
        loss(t, v, a, mask=torch.ones(6, 5, dtype=torch.bool))
    with pytest.raises(KeyError, match="anchor modality 'text' is missing"):
        loss(video=v, audio=a)
    bad = torch.ones(6, 3, dtype=torch.bool)
    bad[0, 0] = False
    with pytest.raises(ValueError, match="anchor modality must be present"):
        loss(t, v, a, mask=bad)
    with pytest.raises(ValueError, match="temperature"):
        GramLoss(temperature=2.0)

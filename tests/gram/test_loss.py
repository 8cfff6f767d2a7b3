"""GramLoss and the cosine InfoNCE baseline against explicit formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gram import CosineInfoNCELoss, GramLoss, build_loss, volume_matrix
from gram.loss import CurriculumLoss, GramCosineLoss

NAMES = ("text", "video", "audio", "depth")


def _embs(b=6, d=16, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, d, generator=g, requires_grad=True) for _ in range(k)]


def _named(embs):
    """Embeddings by modality name, anchor first: the model's output convention."""
    return dict(zip(NAMES, embs, strict=False))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_gram_loss_is_bidirectional_cross_entropy_over_negative_volume(smoothing, k):
    embs = _embs(k=k)
    out = GramLoss(label_smoothing=smoothing)(**_named(embs))
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


def test_the_anchor_is_found_by_name_and_the_mask_follows_the_argument_order():
    t, v, a = _embs()
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[2, 2] = False  # sample 2 has no audio
    loss = GramLoss(anchor="text")
    named = loss(**{"text": t, "video": v, "audio": a, "mask": mask})["loss"]
    reordered = loss(audio=a, text=t, video=v, mask=mask[:, [2, 0, 1]])["loss"]
    torch.testing.assert_close(named, reordered)
    unmasked = loss(text=t, video=v, audio=a)["loss"]
    assert not torch.allclose(named, unmasked)


def test_missing_audio_uses_the_volume_of_the_rest_never_drops_the_sample():
    t, v, a = _embs()
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[:, 2] = False  # nobody has audio: the loss must equal the (text, video) loss
    with_mask = GramLoss()(text=t, video=v, audio=a, mask=mask)["loss"]
    two_modal = GramLoss()(text=t, video=v)["loss"]
    torch.testing.assert_close(with_mask, two_modal)


def test_temperature_learns_and_is_clamped():
    embs = _embs()
    loss = GramLoss(temperature=0.07, temperature_bounds=(0.05, 0.5))
    loss(**_named(embs))["loss"].backward()
    assert loss.log_temperature.grad is not None
    assert loss.log_temperature.grad != 0
    with torch.no_grad():
        loss.log_temperature.fill_(math.log(1e-4))
    assert loss.temperature.item() == pytest.approx(0.05)
    fixed = GramLoss(learn_temperature=False)
    assert not fixed.log_temperature.requires_grad


def test_gram_loss_prefers_aligned_data():
    # Video and audio each near the text, but not near each other: were they equal, every
    # negative (t_i, v_j, a_j) would be as flat as the positives, and the volume could not
    # tell aligned from shuffled data.
    g = torch.Generator().manual_seed(0)
    t = torch.randn(8, 16, generator=g)
    noise = 0.3 * torch.randn(2, 8, 16, generator=g)
    aligned = GramLoss()(text=t, video=t + noise[0], audio=t + noise[1])
    shuffled = GramLoss()(
        text=t, video=torch.randn(8, 16, generator=g), audio=torch.randn(8, 16, generator=g)
    )
    assert aligned["loss"] < shuffled["loss"]
    assert aligned["positive_volume"] < aligned["negative_volume"]


@pytest.mark.parametrize("pairs", ["anchor", "all"])
def test_cosine_infonce_matches_explicit_pairs(pairs):
    t, v, a = _embs()
    out = CosineInfoNCELoss(pairs=pairs, label_smoothing=0.1)(text=t, video=v, audio=a)
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
    out = CosineInfoNCELoss(pairs="anchor", label_smoothing=0.1)(
        text=t, video=v, audio=a, mask=mask
    )
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
        loss(text=t, video=v, audio=a, mask=torch.ones(6, 5, dtype=torch.bool))
    with pytest.raises(KeyError, match="anchor modality 'text' is missing"):
        loss(video=v, audio=a)
    bad = torch.ones(6, 3, dtype=torch.bool)
    bad[0, 0] = False
    with pytest.raises(ValueError, match="anchor modality must be present"):
        loss(text=t, video=v, audio=a, mask=bad)
    with pytest.raises(ValueError, match="temperature"):
        GramLoss(temperature=2.0)


def test_gram_plus_cosine_is_the_weighted_sum_with_its_own_temperatures_and_gradients():
    t, v, a = _embs()
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[3, 2] = False
    combined = GramCosineLoss(cosine_weight=0.5, label_smoothing=0.1, temperature=0.05)
    with torch.no_grad():
        combined.cosine.log_temperature.fill_(math.log(0.2))
    out = combined(text=t, video=v, audio=a, mask=mask)
    out["loss"].backward()
    got = [x.grad.clone() for x in (t, v, a)]
    tau_grads = (combined.gram.log_temperature.grad, combined.cosine.log_temperature.grad)

    t2, v2, a2 = _embs()
    gram = GramLoss(label_smoothing=0.1, temperature=0.05)
    cosine = CosineInfoNCELoss(pairs="anchor", label_smoothing=0.1, temperature=0.2)
    g = gram(text=t2, video=v2, audio=a2, mask=mask)
    c = cosine(text=t2, video=v2, audio=a2, mask=mask)
    (g["loss"] + 0.5 * c["loss"]).backward()
    torch.testing.assert_close(out["loss"], g["loss"] + 0.5 * c["loss"])
    for mine, want in zip(got, (t2.grad, v2.grad, a2.grad), strict=True):
        torch.testing.assert_close(mine, want)
    # Each temperature is learned from its own term only (the cosine one scaled by the weight).
    torch.testing.assert_close(tau_grads[0], gram.log_temperature.grad)
    torch.testing.assert_close(tau_grads[1], cosine.log_temperature.grad)
    assert tau_grads[0] != 0
    assert tau_grads[1] != 0
    # Both terms are reported, with both temperatures and GRAM's usual terms.
    torch.testing.assert_close(out["loss_gram"], g["loss"].detach())
    torch.testing.assert_close(out["loss_cosine"], c["loss"].detach())
    assert out["temperature"].item() == pytest.approx(0.05)
    assert out["cosine_temperature"].item() == pytest.approx(0.2)
    torch.testing.assert_close(out["positive_volume"], g["positive_volume"])
    torch.testing.assert_close(out["positive_cosine"], c["positive_cosine"])
    assert {n for n, _ in combined.named_parameters()} == {
        "gram.log_temperature",
        "cosine.log_temperature",
    }


def test_the_volume_is_blind_to_the_sign_and_the_cosine_term_is_not():
    t, v, a = (x.detach() for x in _embs(b=8))
    flip = torch.tensor([1.0, -1, 1, -1, -1, 1, 1, -1])[:, None]  # some samples' video flipped
    gram = GramLoss()
    torch.testing.assert_close(
        gram(text=t, video=v, audio=a)["loss"], gram(text=t, video=v * flip, audio=a)["loss"]
    )
    combined = GramCosineLoss(cosine_weight=1.0)
    aligned = t + 0.3 * torch.randn(8, 16)
    same = combined(text=t, video=aligned, audio=a)
    flipped = combined(text=t, video=aligned * flip, audio=a)
    torch.testing.assert_close(same["loss_gram"], flipped["loss_gram"])
    assert same["loss"] < flipped["loss"]  # only the cosine term tells v from -v
    assert same["positive_cosine"] > flipped["positive_cosine"]


def test_curriculum_switches_loss_at_the_step_and_keeps_the_step_in_its_state():
    t, v, a = _embs()
    loss = build_loss("gram", warmup_kind="cosine_anchor", warmup_steps=3, label_smoothing=0.1)
    assert isinstance(loss, CurriculumLoss)
    warm = CosineInfoNCELoss(pairs="anchor", label_smoothing=0.1)(text=t, video=v, audio=a)
    main = GramLoss(label_smoothing=0.1)(text=t, video=v, audio=a)
    for step, want, stage in ((0, warm, 0.0), (2, warm, 0.0), (3, main, 1.0), (9, main, 1.0)):
        loss.set_step(step)
        out = loss(text=t, video=v, audio=a)
        torch.testing.assert_close(out["loss"], want["loss"])
        assert out["loss_stage"].item() == stage
    state = loss.state_dict()
    assert int(state["step"]) == 9
    resumed = build_loss("gram", warmup_kind="cosine_anchor", warmup_steps=3)
    resumed.load_state_dict(state)
    assert resumed(text=t, video=v, audio=a)["loss_stage"].item() == 1.0


def test_build_loss_combines_and_refuses_what_makes_no_sense():
    combined = build_loss("gram", cosine_weight=0.1)
    assert isinstance(combined, GramCosineLoss)
    assert combined.cosine_weight == pytest.approx(0.1)
    assert combined.cosine.pairs == "anchor"
    assert isinstance(build_loss("gram", cosine_weight=0.0), GramLoss)
    with pytest.raises(ValueError, match="cosine_weight"):
        build_loss("cosine_anchor", cosine_weight=1.0)
    with pytest.raises(ValueError, match="cosine_weight must be > 0"):
        build_loss("gram", cosine_weight=-1.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        build_loss("gram", warmup_kind="cosine_anchor", warmup_steps=0)

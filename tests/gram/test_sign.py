"""Sign checks: a tower pointing away from its text is found, and sign-aligned cosine
scores recover what the signed ones lose (the volume never sees the sign)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gram.retrieval import retrieval_metrics
from gram.sign import align_signs, check_signs


def _aligned_set(n: int = 40, d: int = 16):
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    video = F.normalize(text + 0.3 * torch.randn(n, d, generator=g), dim=-1)
    audio = F.normalize(text + 0.3 * torch.randn(n, d, generator=g), dim=-1)
    return text, video, audio, torch.arange(n)


def test_a_flipped_tower_is_found_and_aligned_back():
    text, video, audio, owner = _aligned_set()
    items = {"video": -video, "audio": audio}  # the video tower points away from its text
    check = check_signs(text, items, owner)
    assert check.flipped == ["video"]
    assert check.mean_positive["video"] < 0 < check.mean_positive["audio"]
    aligned = align_signs(items, check)
    assert torch.equal(aligned["video"], video)
    assert aligned["audio"] is audio

    signed = retrieval_metrics(text, [items["video"]], owner, score="cosine")
    recovered = retrieval_metrics(text, [aligned["video"]], owner, score="cosine")
    truth = retrieval_metrics(text, [video], owner, score="cosine")
    assert signed["t2i_r1"] <= 100 / 40  # the true match is ranked last, or nearly
    assert recovered == truth
    assert truth["t2i_r1"] > 50
    volume = retrieval_metrics(text, [items["video"], audio], owner, score="volume")
    assert volume == retrieval_metrics(text, [video, audio], owner, score="volume")


def test_missing_items_are_left_out_of_the_mean():
    text, video, _, owner = _aligned_set(n=6)
    video = video.clone()
    video[2] = -text[2]  # one strongly negative pair ...
    present = torch.ones(6, 1, dtype=torch.bool)
    present[2, 0] = False  # ... that is missing: it must not count
    with_missing = check_signs(text, {"video": video}, owner, present)
    all_counted = check_signs(text, {"video": video}, owner)
    assert with_missing.mean_positive["video"] > all_counted.mean_positive["video"]
    nobody = check_signs(text, {"video": video}, owner, torch.zeros(6, 1, dtype=torch.bool))
    assert math.isnan(nobody.mean_positive["video"])
    assert nobody.flipped == []


@pytest.mark.parametrize("captions_per_item", [1, 3])
def test_several_captions_per_item(captions_per_item):
    text, video, _, _ = _aligned_set(n=10)
    owner = torch.arange(10).repeat_interleave(captions_per_item)
    check = check_signs(text[owner], {"video": -video}, owner)
    assert check.flipped == ["video"]

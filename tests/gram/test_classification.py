"""Zero-shot classification against a direct per-item computation."""

from __future__ import annotations

import pytest
import torch

from gram import volume
from gram.classification import class_embeddings, zero_shot_classify


def _setup(n=40, c=6, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    classes = torch.nn.functional.normalize(torch.randn(c, d, generator=g), dim=-1)
    labels = torch.randint(0, c, (n,), generator=g)
    video = classes[labels] + 0.9 * torch.randn(n, d, generator=g)
    audio = classes[labels] + 0.9 * torch.randn(n, d, generator=g)
    return classes, labels, video, audio


def test_predictions_ranks_and_confusion_match_a_per_item_loop():
    classes, labels, video, audio = _setup()
    mask = torch.ones(40, 2, dtype=torch.bool)
    mask[::7, 1] = False
    res = zero_shot_classify(classes, [video, audio], labels, item_mask=mask, chunk_size=9)
    for j in range(40):
        full = torch.cat([torch.ones(6, 1, dtype=torch.bool), mask[j].expand(6, 2)], 1)
        vols = volume(classes, video[j].expand(6, -1), audio[j].expand(6, -1), mask=full)
        assert int(res.predictions[j]) == int(vols.argmin())
        assert int(res.ranks[j]) == int((vols <= vols[labels[j]]).sum())
    assert int(res.confusion.sum()) == 40
    assert res.top1 == pytest.approx(100 * float((res.predictions == labels).float().mean()))
    assert res.top5 >= res.top1
    per_class = res.per_class_accuracy()
    assert per_class.shape == (6,)


def test_cosine_with_one_modality_and_informative_data_beats_chance():
    classes, labels, video, _ = _setup(n=200, seed=3)
    res = zero_shot_classify(classes, [video], labels, score="cosine")
    assert res.top1 > 100 / 6 + 20
    want = (torch.nn.functional.normalize(video, dim=-1) @ classes.t()).argmax(1)
    assert torch.equal(res.predictions, want)


def test_class_embeddings_average_prompts_and_validate():
    prompts = torch.randn(3, 4, 8)
    emb = class_embeddings(prompts)
    assert emb.shape == (3, 8)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    with pytest.raises(ValueError, match=r"\[C, P, d\]"):
        class_embeddings(torch.randn(3, 8))
    classes, labels, video, audio = _setup()
    with pytest.raises(ValueError, match="labels must lie"):
        zero_shot_classify(classes, [video, audio], labels + 10)

"""Chunked retrieval metrics against a naive full-matrix implementation."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gram import rank_summary, retrieval_metrics, retrieval_ranks, score_matrix
from gram.volume import volume


def _naive(text, items, text_to_item, score, item_mask=None):
    """Full score matrix, ranks by sorting every row/column (ties against the ground truth)."""
    nt, ni = text.shape[0], items[0].shape[0]
    s = np.zeros((nt, ni))
    for c in range(nt):
        for j in range(ni):
            if score == "volume":
                m = (
                    None
                    if item_mask is None
                    else torch.cat([torch.ones(1, 1, dtype=torch.bool), item_mask[j : j + 1]], 1)
                )
                s[c, j] = float(volume(text[c : c + 1], *[it[j : j + 1] for it in items], mask=m))
            else:
                s[c, j] = -float(torch.nn.functional.cosine_similarity(text[c], items[0][j], dim=0))
    t2i = []
    for c in range(nt):
        gt = int(text_to_item[c])
        order = sorted(range(ni), key=lambda j: (s[c, j], j != gt))  # gt after ties
        ahead = [j for j in range(ni) if j != gt and s[c, j] <= s[c, gt]]
        assert order.index(gt) <= len(ahead)
        t2i.append(len(ahead) + 1)
    i2t = []
    for j in range(ni):
        caps = [c for c in range(nt) if int(text_to_item[c]) == j]
        if not caps:
            i2t.append(0)
            continue
        best = min(s[c, j] for c in caps)
        i2t.append(1 + sum(1 for c in range(nt) if c not in caps and s[c, j] <= best))
    return np.array(t2i), np.array(i2t)


def _data(nt, ni, d=6, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = [torch.randn(ni, d, generator=g, dtype=torch.float64) for _ in range(k)]
    text_to_item = torch.randint(0, ni, (nt,), generator=g)
    text = items[0][text_to_item] + 0.8 * torch.randn(nt, d, generator=g, dtype=torch.float64)
    return text, items, text_to_item


@pytest.mark.parametrize("score", ["volume", "cosine"])
def test_ranks_match_naive_full_matrix(score):
    text, items, t2i_map = _data(nt=30, ni=12, k=2 if score == "volume" else 1)
    want_t2i, want_i2t = _naive(text, items, t2i_map, score)
    got = retrieval_ranks(text, items, t2i_map, score=score, chunk_size=5)
    np.testing.assert_array_equal(got.text_to_item.numpy(), want_t2i)
    np.testing.assert_array_equal(got.item_to_text.numpy(), want_i2t)


def test_ranks_with_missing_modalities_match_naive():
    text, items, t2i_map = _data(nt=20, ni=10, k=2, seed=3)
    mask = torch.ones(10, 2, dtype=torch.bool)
    mask[[1, 4, 7], 1] = False
    want_t2i, want_i2t = _naive(text, items, t2i_map, "volume", item_mask=mask)
    got = retrieval_ranks(text, items, t2i_map, item_mask=mask, chunk_size=3)
    np.testing.assert_array_equal(got.text_to_item.numpy(), want_t2i)
    np.testing.assert_array_equal(got.item_to_text.numpy(), want_i2t)


@settings(max_examples=25, deadline=None)
@given(
    nt=st.integers(1, 40),
    ni=st.integers(1, 15),
    chunk=st.integers(1, 50),
    seed=st.integers(0, 10_000),
)
def test_chunked_equals_unchunked(nt, ni, chunk, seed):
    text, items, t2i_map = _data(nt, ni, k=2, seed=seed)
    full = retrieval_ranks(text, items, t2i_map, chunk_size=10_000)
    part = retrieval_ranks(text, items, t2i_map, chunk_size=chunk)
    assert torch.equal(full.text_to_item, part.text_to_item)
    assert torch.equal(full.item_to_text, part.item_to_text)


def test_several_captions_per_item_and_items_without_captions():
    items = [torch.eye(4, 8, dtype=torch.float64), torch.eye(4, 8, dtype=torch.float64).roll(4, 1)]
    # Captions of item 0 (two of them), item 1 and item 2; item 3 has none.
    text = torch.stack(
        [
            items[0][0] + items[1][0],
            items[0][0] - 0.1 * items[1][0],
            items[0][1] + items[1][1],
            items[0][2] + items[1][2],
        ]
    )
    ranks = retrieval_ranks(text, items, torch.tensor([0, 0, 1, 2]))
    assert ranks.text_to_item.tolist() == [1, 1, 1, 1]
    assert ranks.item_to_text.tolist() == [1, 1, 1, 0]
    metrics = retrieval_metrics(text, items, torch.tensor([0, 0, 1, 2]))
    assert metrics["t2i_r1"] == 100.0
    assert metrics["t2i_count"] == 4
    assert metrics["i2t_count"] == 3  # the caption-less item is left out and counted


def test_collapsed_embeddings_get_the_worst_rank_not_the_best():
    text = torch.ones(5, 4)
    items = [torch.ones(5, 4), torch.ones(5, 4) * 2]
    ranks = retrieval_ranks(text, items, torch.arange(5))
    assert ranks.text_to_item.tolist() == [5] * 5
    assert retrieval_metrics(text, items, torch.arange(5))["t2i_r1"] == 0.0


def test_rank_summary_values():
    s = rank_summary(torch.tensor([1, 2, 3, 10, 20, 0]))
    assert s["r1"] == pytest.approx(20.0)
    assert s["r5"] == pytest.approx(60.0)
    assert s["r10"] == pytest.approx(80.0)
    assert s["medr"] == 3.0
    assert s["meanr"] == pytest.approx(7.2)
    assert s["count"] == 5


def test_score_matrix_errors():
    with pytest.raises(ValueError, match="one item modality"):
        score_matrix(torch.randn(2, 3), [torch.randn(2, 3), torch.randn(2, 3)], score="cosine")
    with pytest.raises(ValueError, match="outside"):
        retrieval_ranks(torch.randn(2, 3), [torch.randn(2, 3)], torch.tensor([0, 5]))


@pytest.mark.slow
def test_ten_thousand_by_ten_thousand_fits_in_bounded_memory():
    """10k texts x 10k tri-modal items in a fresh process: peak RSS growth stays under 1.5 GiB
    (the full [10k, 10k] float32 matrix and its volume temporaries alone would need ~2 GiB)."""
    code = """
import resource, torch
from gram import retrieval_metrics
torch.manual_seed(0)
n, d = 10_000, 64
items = [torch.randn(n, d), torch.randn(n, d)]
text = items[0] + items[1] + 2.0 * torch.randn(n, d)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
m = retrieval_metrics(text, items, torch.arange(n), chunk_size=1024)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(m["t2i_r1"], m["i2t_r1"], m["t2i_count"], (after - before) / 1024)
"""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
    )
    assert res.returncode == 0, res.stderr[-2000:]
    r1_t2i, r1_i2t, count, grown_mib = map(float, res.stdout.split())
    assert count == 10_000
    assert r1_t2i > 10.0
    assert r1_i2t > 10.0
    assert grown_mib < 1536, f"peak memory grew by {grown_mib:.0f} MiB"

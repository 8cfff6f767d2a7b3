"""The Gramian volume against independent computations, its gradients and its numerics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gram import volume, volume_matrix
from gram.volume import DET_FLOOR


def _numpy_volume(*vectors: np.ndarray) -> float:
    """sqrt(det G) of the normalised vectors with numpy's LU determinant, float64."""
    e = np.stack([v / np.linalg.norm(v) for v in vectors])  # [k, d]
    return math.sqrt(max(np.linalg.det(e @ e.T), 0.0))


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_volume_matches_numpy_determinant(k):
    rng = np.random.default_rng(k)
    b, d = 16, 12
    embs = [rng.standard_normal((b, d)) for _ in range(k)]
    got = volume(*[torch.from_numpy(e) for e in embs]).numpy()
    want = [_numpy_volume(*[e[i] for e in embs]) for i in range(b)]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_volume_matrix_matches_numpy_for_every_pair(k):
    rng = np.random.default_rng(10 + k)
    na, nb, d = 7, 9, 10
    anchor = rng.standard_normal((na, d))
    others = [rng.standard_normal((nb, d)) for _ in range(k - 1)]
    got = volume_matrix(torch.from_numpy(anchor), *[torch.from_numpy(o) for o in others]).numpy()
    assert got.shape == (na, nb)
    for i in range(na):
        for j in range(nb):
            want = _numpy_volume(anchor[i], *[o[j] for o in others])
            assert got[i, j] == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_two_vectors_give_sine_of_angle():
    angles = torch.linspace(0.05, math.pi - 0.05, 40, dtype=torch.float64)
    a = torch.stack([torch.ones_like(angles), torch.zeros_like(angles)], 1)
    b = torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    torch.testing.assert_close(volume(a, b), torch.sin(angles), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k", [2, 3, 4, 6])
def test_orthonormal_vectors_have_unit_volume_and_coincident_have_floor(k):
    q, _ = torch.linalg.qr(torch.randn(16, k, dtype=torch.float64))
    basis = [q[:, i].repeat(3, 1) * (i + 2.0) for i in range(k)]  # scaled: normalised inside
    torch.testing.assert_close(volume(*basis), torch.ones(3, dtype=torch.float64))
    same = [q[:, 0].repeat(3, 1)] * k
    torch.testing.assert_close(
        volume(*same), torch.full((3,), math.sqrt(DET_FLOOR), dtype=torch.float64)
    )


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(2, 5),
    b=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    perm_seed=st.integers(0, 1000),
)
def test_volume_is_symmetric_in_the_order_of_vectors(k, b, seed, perm_seed):
    g = torch.Generator().manual_seed(seed)
    embs = [torch.randn(b, k + 3, generator=g, dtype=torch.float64) for _ in range(k)]
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(perm_seed)).tolist()
    torch.testing.assert_close(volume(*embs), volume(*[embs[i] for i in perm]))


@settings(max_examples=30, deadline=None)
@given(k=st.integers(2, 5), na=st.integers(1, 5), nb=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_volume_matrix_entries_equal_per_sample_volume(k, na, nb, seed):
    g = torch.Generator().manual_seed(seed)
    d = 8
    anchor = torch.randn(na, d, generator=g, dtype=torch.float64)
    others = [torch.randn(nb, d, generator=g, dtype=torch.float64) for _ in range(k - 1)]
    mat = volume_matrix(anchor, *others)
    for i in range(na):
        row = volume(anchor[i].expand(nb, d), *others)
        torch.testing.assert_close(mat[i], row, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_volume_matrix_diagonal_equals_volume(k):
    embs = [torch.randn(12, 16) for _ in range(k)]
    diag = volume_matrix(embs[0], *embs[1:]).diagonal()
    torch.testing.assert_close(diag, volume(*embs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [2, 3, 4, 5])
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_float64(k, normalize):
    g = torch.Generator().manual_seed(k)
    anchor = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    others = [
        torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
        for _ in range(k - 1)
    ]
    mask = torch.rand(5, k - 1, generator=g) > 0.3

    def mat(a, *o):
        return volume_matrix(a, *o, normalize=normalize)

    def mat_masked(a, *o):
        return volume_matrix(a, *o, mask=mask, normalize=normalize)

    def per_sample(*e):
        return volume(*e, normalize=normalize)

    assert torch.autograd.gradcheck(mat, (anchor, *others))
    assert torch.autograd.gradcheck(mat_masked, (anchor, *others))
    assert torch.autograd.gradcheck(per_sample, (anchor, *[o[:4] for o in others]))


def _grads_of(fn, tensors):
    for t in tensors:
        t.grad = None
    fn().sum().backward()
    return [t.grad for t in tensors]


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["coincident", "collinear", "data_coincident"])
def test_finite_values_and_gradients_when_vectors_coincide(k, dtype, case):
    base = torch.randn(6, 8, dtype=dtype)
    if case == "coincident":
        embs = [base.clone().requires_grad_() for _ in range(k)]
    elif case == "collinear":
        embs = [(base * (-1.0) ** i * (i + 1)).requires_grad_() for i in range(k)]
    else:  # the data vectors coincide (video == audio) while the anchor differs
        embs = [torch.randn(6, 8, dtype=dtype).requires_grad_()] + [
            base.clone().requires_grad_() for _ in range(k - 1)
        ]
    v = volume(*embs)
    m = volume_matrix(embs[0], *embs[1:])
    assert torch.isfinite(v).all()
    assert torch.isfinite(m).all()
    for grads in (
        _grads_of(lambda: volume(*embs), embs),
        _grads_of(lambda: volume_matrix(embs[0], *embs[1:]), embs),
    ):
        for gr in grads:
            assert gr is not None
            assert torch.isfinite(gr).all()


@pytest.mark.parametrize("k", [2, 3, 4])
def test_bfloat16_autocast_is_finite_and_close_to_float32(k):
    embs = [torch.randn(32, 64, requires_grad=True) for _ in range(k)]
    embs[1].data.copy_(embs[0].data)  # include exactly coincident pairs
    ref = volume_matrix(embs[0], *embs[1:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = volume_matrix(embs[0].bfloat16(), *[e.bfloat16() for e in embs[1:]])
        per = volume(*[e.bfloat16() for e in embs])
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
    assert torch.isfinite(per).all()
    assert (got - ref).abs().max() < 0.1
    got.sum().backward()
    for e in embs:
        assert e.grad is not None
        assert torch.isfinite(e.grad).all()


@pytest.mark.parametrize("k", [3, 4, 5])
def test_masked_modality_gives_volume_of_the_rest(k):
    embs = [torch.randn(10, 9, dtype=torch.float64) for _ in range(k)]
    missing = 1 + torch.arange(10) % (k - 1)  # which data modality each sample lacks
    mask = torch.ones(10, k, dtype=torch.bool)
    mask[torch.arange(10), missing] = False
    got = volume(*embs, mask=mask)
    for i in range(10):
        rest = [e[i : i + 1] for j, e in enumerate(embs) if j != int(missing[i])]
        torch.testing.assert_close(got[i : i + 1], volume(*rest))
    mat = volume_matrix(embs[0], *embs[1:], mask=mask[:, 1:])
    for j in range(10):
        rest = [e[j].expand(10, -1) for m, e in enumerate(embs[1:], 1) if m != int(missing[j])]
        torch.testing.assert_close(mat[:, j], volume(embs[0], *rest))


def test_only_anchor_left_has_unit_volume():
    a, v, s = (torch.randn(4, 6) for _ in range(3))
    mask = torch.zeros(4, 2, dtype=torch.bool)
    torch.testing.assert_close(volume_matrix(a, v, s, mask=mask), torch.ones(4, 4))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_volume_matrix_never_materialises_pairwise_gram_tensors(k):
    """Every tensor autograd keeps, and every single allocation, is at most one [Na, Nb] plane
    (or an input-sized [N, d] tensor): never [Na, Nb, k, k], let alone [Na, Nb, k, d]."""
    na, nb, d = 128, 96, 32
    anchor = torch.randn(na, d, requires_grad=True)
    others = [torch.randn(nb, d, requires_grad=True) for _ in range(k - 1)]
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = volume_matrix(anchor, *others)
    plane = na * nb
    largest_allowed = max(plane, (na + (k - 1) * nb) * d)
    smallest_naive = na * nb * k * k
    assert largest_allowed < smallest_naive
    assert max(saved) <= largest_allowed
    assert sum(saved) <= (k + 1) * plane + 6 * (na + (k - 1) * nb) * d  # inputs saved per use
    with torch.profiler.profile(profile_memory=True) as prof:
        volume_matrix(anchor, *others).sum().backward()
    biggest = max(e.self_cpu_memory_usage for e in prof.events())
    assert 0 < biggest <= largest_allowed * 4
    assert out.shape == (na, nb)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="at least 2"):
        volume(torch.randn(3, 4))
    with pytest.raises(ValueError, match="same shape"):
        volume(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="mask must be"):
        volume_matrix(torch.randn(3, 4), torch.randn(2, 4), mask=torch.ones(3, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="anchor dim"):
        volume_matrix(torch.randn(3, 4), torch.randn(2, 5))

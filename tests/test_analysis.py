"""Analysis functions against independent references (scipy, NumPy formulas, invariances)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.spatial.distance import cdist, pdist
from scipy.spatial.distance import cosine as scipy_cosine
from scipy.stats import spearmanr

import hookscope as hs

finite = st.floats(-100, 100, allow_nan=False, width=32)


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(1, 5)), elements=finite),
       st.data())
def test_cosine_matches_scipy(a, data):
    b = data.draw(arrays(np.float64, a.shape, elements=finite))
    got = hs.cosine(a, b)
    for i in range(len(a)):
        if not a[i].any() or not b[i].any():
            assert np.isnan(got[i])  # zero vector: defined as NaN
        else:
            assert got[i] == pytest.approx(1 - scipy_cosine(a[i], b[i]), abs=1e-9)


def test_cosine_types_and_errors():
    a = torch.randn(4, 3)
    assert hs.cosine(a, a).dtype == np.float32
    assert np.allclose(hs.cosine(a, a), 1, atol=1e-6)
    assert hs.cosine_matrix(pd.DataFrame(a.numpy())).shape == (4, 4)
    with pytest.raises(ValueError, match="pair up"):
        hs.cosine(a, a[:3])
    with pytest.raises(ValueError, match="2-D"):
        hs.cosine(a[0], a[0])
    with pytest.raises(ValueError, match="NaN or infinity.*\\(1, 2\\)"):
        b = a.clone()
        b[1, 2] = float("nan")
        hs.cosine(b, a)
    with pytest.raises(ValueError, match="empty"):
        hs.cosine(np.zeros((0, 3)), np.zeros((0, 3)))


def test_cosine_matrix_matches_scipy_cdist():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 5)), rng.normal(size=(4, 5))
    assert np.allclose(hs.cosine_matrix(a, b), 1 - cdist(a, b, "cosine"))


def _reference_knn(x, q, k, metric, exclude_self):
    if metric == "cosine":
        s = 1 - cdist(q, x, "cosine")
        key = -s
    elif metric == "dot":
        s = q @ x.T
        key = -s
    else:
        s = cdist(q, x, "euclidean")
        key = s
    if exclude_self:
        np.fill_diagonal(key, np.inf)
    idx = np.array([np.lexsort((np.arange(x.shape[0]), row))[:k] for row in key])
    return idx, np.take_along_axis(s, idx, 1), s


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "dot"])
@settings(max_examples=25, deadline=None)
@given(st.integers(3, 40), st.integers(1, 8), st.integers(1, 5), st.booleans(), st.data())
def test_nearest_neighbors_exact_against_scipy(metric, n, d, k, self_search, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 10_000)))
    # Small integer values make exact ties common: the tie order must still be by index.
    x = rng.integers(-3, 4, size=(n, d)).astype(np.float64)
    if metric == "cosine":
        x[np.abs(x).sum(1) == 0, 0] = 1.0
    k = min(k, n - 1)
    q = None if self_search else x[: max(1, n // 2)] + 0.5
    block = data.draw(st.sampled_from([None, 1, 3]))
    idx, val = hs.nearest_neighbors(x, k, queries=q, metric=metric, block_size=block)
    ref_idx, ref_val, ref_scores = _reference_knn(x, x if q is None else q, k, metric,
                                                  self_search)
    assert np.allclose(val, ref_val, atol=1e-9)
    if metric == "cosine":
        # Normalisation may round tied cosines differently from scipy: our picks must score
        # exactly what scipy's top k score, and never include the query itself.
        assert np.allclose(np.take_along_axis(ref_scores, idx, 1), ref_val, atol=1e-9)
        if q is None:
            assert not (idx == np.arange(n)[:, None]).any()
    else:  # integer inputs: exact arithmetic, so ties are real and broken by lower index
        assert np.array_equal(idx, ref_idx)


def test_nearest_neighbors_deterministic_ties_and_errors():
    x = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    idx, sim = hs.nearest_neighbors(x, 2)
    assert idx.tolist() == [[1, 2], [0, 2], [0, 1], [0, 1]]
    assert np.allclose(sim[:3], 1)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 3\]"):
        hs.nearest_neighbors(x, 4)
    with pytest.raises(ValueError, match="metric"):
        hs.nearest_neighbors(x, 1, metric="manhattan")
    with pytest.raises(ValueError, match="zero vector"):
        hs.nearest_neighbors(np.vstack([x, [0, 0]]), 1)
    with pytest.raises(ValueError, match="features"):
        hs.nearest_neighbors(x, 1, queries=np.ones((1, 3)))


def test_neighborhood_overlap_and_change():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 6))
    same = hs.neighborhood_overlap(x, 2 * x, k=5)
    assert same.mean_overlap == 1.0 and same.mean_jaccard == 1.0
    other = hs.neighborhood_overlap(x, rng.normal(size=(30, 6)), k=5)
    # Independent reference: sets of neighbours from scipy.
    nx = np.argsort(np.where(np.eye(30, dtype=bool), np.inf, cdist(x, x, "cosine")), 1)[:, :5]
    y = rng.normal(size=(30, 6))
    r = hs.neighborhood_overlap(x, y, k=5)
    ny = np.argsort(np.where(np.eye(30, dtype=bool), np.inf, cdist(y, y, "cosine")), 1)[:, :5]
    expected = [len(set(a) & set(b)) / 5 for a, b in zip(nx, ny, strict=True)]
    assert np.allclose(r.overlap, expected)
    assert 0 <= other.mean_overlap < 1
    texts = [f"s{i}" for i in range(30)]
    change = hs.neighborhood_change(x, y, 5, labels=texts)
    assert list(change.columns) == ["before", "after", "entered", "left", "overlap"]
    row = change.loc["s0"]
    assert set(row.entered) == set(row.after) - set(row.before)
    assert set(row.left) == set(row.before) - set(row.after)
    assert np.allclose(change.overlap, expected)
    with pytest.raises(ValueError, match="same items"):
        hs.neighborhood_overlap(x, y[:10], 3)
    with pytest.raises(ValueError, match="labels"):
        hs.neighborhood_change(x, y, 3, labels=texts[:3])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.integers(1, 4), st.data())
def test_pooling_against_loops(batch, time, feat, data):
    lengths = data.draw(st.lists(st.integers(1, time), min_size=batch, max_size=batch))
    x = np.random.default_rng(batch * time).normal(size=(batch, time, feat))
    mean = hs.masked_pool(x, lengths, "mean")
    mx = hs.masked_pool(torch.from_numpy(x), torch.tensor(lengths), "max")
    last = hs.last_state(x, lengths)
    for i, n in enumerate(lengths):
        assert np.allclose(mean[i], x[i, :n].mean(0))
        assert np.allclose(mx[i].numpy(), x[i, :n].max(0))
        assert np.allclose(last[i], x[i, n - 1])
    assert isinstance(mean, np.ndarray) and isinstance(mx, torch.Tensor)
    # seq-first layout gives the same
    assert np.allclose(hs.masked_pool(x.transpose(1, 0, 2), lengths, "sum", batch_first=False),
                       hs.masked_pool(x, lengths, "sum"))


def test_last_state_bidirectional_matches_pytorch_rnn():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 4, bidirectional=True, batch_first=True)
    x, lengths = torch.randn(3, 5, 3), torch.tensor([5, 2, 3])
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                     enforce_sorted=False)
    out, (h, _) = lstm(packed)
    padded, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
    got = hs.last_state(padded, lengths, bidirectional=True)
    assert torch.allclose(got, torch.cat([h[0], h[1]], dim=1).detach())
    assert not torch.allclose(padded[:, -1], got)  # the story's pitfall


def test_pooling_bad_lengths():
    x = np.zeros((2, 3, 4))
    for bad, msg in (([0, 1], r"\[1, 3\]"), ([1, 4], r"\[1, 3\]"), ([1], "2 entries|batch"),
                     ([[1, 2]], "mask must have shape"), ([1.0, 2.0], "integer"),
                     ([[1, 0, 0], [0, 0, 0]], "row 1 of the mask"),
                     ([[1, 2, 0], [1, 1, 1]], "only 0/1")):
        with pytest.raises(ValueError, match=msg):
            hs.masked_pool(x, bad)
    with pytest.raises(ValueError, match="3-D"):
        hs.last_state(np.zeros((2, 3)), [1, 2])
    with pytest.raises(ValueError, match="reduce"):
        hs.masked_pool(x, [1, 1], "median")


def _numpy_cka(x, y):
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def _numpy_cka_debiased(x, y):
    n = len(x)

    def hsic(k, l_):
        k, l_ = k.copy(), l_.copy()
        np.fill_diagonal(k, 0)
        np.fill_diagonal(l_, 0)
        return (np.trace(k @ l_) + k.sum() * l_.sum() / ((n - 1) * (n - 2))
                - 2 * (k.sum(0) @ l_.sum(1)) / (n - 2)) / (n * (n - 3))

    kx, ky = x @ x.T, y @ y.T
    return hsic(kx, ky) / np.sqrt(hsic(kx, kx) * hsic(ky, ky))


def test_linear_cka_reference_and_invariances():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 10)), rng.normal(size=(40, 7))
    assert hs.linear_cka(x, x) == pytest.approx(1.0)
    assert hs.linear_cka(x, y) == pytest.approx(_numpy_cka(x, y))
    rot = np.linalg.qr(rng.normal(size=(10, 10)))[0]
    assert hs.linear_cka(x, 5.0 * x @ rot + 3.0) == pytest.approx(1.0)
    assert hs.linear_cka(x, y, debiased=True) == pytest.approx(_numpy_cka_debiased(x, y))
    assert abs(hs.linear_cka(x, y, debiased=True)) < hs.linear_cka(x, y)  # bias removed
    # A hand case: y = x with one of two equal-variance dimensions dropped -> CKA = 1/sqrt(2).
    hand = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert hs.linear_cka(hand, hand[:, :1]) == pytest.approx(1 / np.sqrt(2))
    with pytest.raises(ValueError, match="constant"):
        hs.linear_cka(np.ones((5, 2)), x[:5])


def test_rsa_matches_scipy_and_similarity_matrix():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(15, 4)), rng.normal(size=(15, 6))
    expected = spearmanr(pdist(x, "cosine"), pdist(y, "cosine"))[0]
    assert hs.rsa(x, y) == pytest.approx(expected)
    assert hs.rsa(x, y, metric="euclidean", correlation="pearson") == pytest.approx(
        np.corrcoef(pdist(x), pdist(y))[0, 1])
    m = hs.similarity_matrix({"x": x, "y": y, "x2": 2 * x})
    assert m.loc["x", "x2"] == pytest.approx(1.0) and m.loc["x", "y"] == m.loc["y", "x"]
    assert m.loc["x", "y"] == pytest.approx(_numpy_cka(x, y))
    r = hs.similarity_matrix({"x": x, "y": y}, method="rsa")
    assert r.loc["x", "y"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="method"):
        hs.similarity_matrix({"x": x}, method="svcca")

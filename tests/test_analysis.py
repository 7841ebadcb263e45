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


# -- numerics and validation (issue 10) ---------------------------------------------------------


@pytest.mark.parametrize("scale", [1e30, 1e-30, 1e38, 1e-38, 1.0])
def test_cosine_is_scale_invariant_for_any_finite_float32(scale):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 7)).astype(np.float32)
    y = rng.normal(size=(5, 7)).astype(np.float32)
    expected = 1 - cdist(x.astype(np.float64), y.astype(np.float64), "cosine")
    xs, ys = (x * np.float32(scale)).astype(np.float32), (y * np.float32(scale)).astype(np.float32)
    assert np.isfinite(xs).all()
    # float32 has ~7 digits; scaling by a power of ten rounds each element once (rel 6e-8).
    assert np.allclose(hs.cosine(xs, xs), 1, atol=1e-6)
    assert np.allclose(hs.cosine(xs, ys), np.diag(expected), atol=1e-5)
    assert np.allclose(hs.cosine_matrix(xs, ys), expected, atol=1e-5)
    assert np.allclose(hs.cosine_matrix(xs), 1 - cdist(x, x, "cosine"), atol=1e-5)
    both, both_scaled = np.vstack([x, y]), np.vstack([xs, ys])
    _, sim = hs.nearest_neighbors(both_scaled, k=2)
    ref = np.where(np.eye(10, dtype=bool), -np.inf, 1 - cdist(both, both, "cosine"))
    assert np.allclose(sim, -np.sort(-ref, 1)[:, :2], atol=1e-5)


def test_cosine_of_mixed_magnitudes_in_one_row_pair():
    x = np.array([[1e30, 1e30], [1e-30, 0.0]], dtype=np.float32)
    y = np.array([[1.0, 1.0], [3e-30, 0.0]], dtype=np.float32)
    assert np.allclose(hs.cosine(x, y), [1, 1], atol=1e-6)


CONSTANT_CALLS = {
    "cka": lambda c, x: hs.linear_cka(c, x),
    "cka_reversed": lambda c, x: hs.linear_cka(x, c),
    "cka_debiased": lambda c, x: hs.linear_cka(c, x, debiased=True),
    "cka_wide": lambda c, x: hs.linear_cka(np.tile(c, 20), x),        # Gram form
    "rsa": lambda c, x: hs.rsa(c, x),
    "rsa_euclidean_pearson": lambda c, x: hs.rsa(c, x, metric="euclidean",
                                                 correlation="pearson"),
    "rsa_kendall": lambda c, x: hs.rsa(c, x, correlation="kendall"),
    "matrix_cka": lambda c, x: hs.similarity_matrix({"c": c, "x": x}),
    "matrix_debiased": lambda c, x: hs.similarity_matrix({"c": c, "x": x},
                                                         method="cka_debiased"),
    "matrix_rsa": lambda c, x: hs.similarity_matrix({"c": c, "x": x}, method="rsa"),
}


@pytest.mark.parametrize("variant", sorted(CONSTANT_CALLS))
def test_constant_input_is_the_same_clear_error_everywhere(variant):
    x = np.random.default_rng(0).normal(size=(8, 3))
    constant = np.full((8, 3), 0.1)  # 0.1 is inexact in binary: centring is not exactly 0
    with pytest.raises(hs.InputError, match="constant"):
        CONSTANT_CALLS[variant](constant, x)


def test_rsa_zero_rows_and_equal_distances_are_errors():
    x = np.random.default_rng(0).normal(size=(6, 3))
    zero = x.copy()
    zero[2] = 0
    with pytest.raises(hs.InputError, match="row 2 of x is all zeros"):
        hs.rsa(zero, x)
    assert np.isfinite(hs.rsa(zero, x, metric="euclidean"))
    simplex = np.eye(4)  # every pair at the same distance
    with pytest.raises(hs.InputError, match="distances of x are equal"):
        hs.rsa(simplex, x[:4], metric="euclidean")


def test_rsa_correlations_against_scipy():
    from scipy.stats import kendalltau, pearsonr

    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(12, 4)), rng.normal(size=(12, 9))
    dx, dy = pdist(x, "cityblock"), pdist(y, "cityblock")
    assert hs.rsa(x, y, metric="cityblock", correlation="kendall") == pytest.approx(
        kendalltau(dx, dy)[0])
    assert hs.rsa(x, y, metric="cityblock", correlation="pearson") == pytest.approx(
        pearsonr(dx, dy)[0])
    m = hs.similarity_matrix({"x": x, "y": y}, method="rsa", metric="cityblock",
                             correlation="kendall")
    assert m.loc["x", "y"] == pytest.approx(kendalltau(dx, dy)[0])
    with pytest.raises(hs.InputError, match="correlation"):
        hs.rsa(x, y, correlation="distance")


@pytest.mark.parametrize("n, dx, dy", [(30, 200, 150), (40, 10, 7), (25, 300, 5)])
def test_cka_gram_and_feature_forms_match_numpy(n, dx, dy):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, dx)) + 5.0  # an offset: centring matters
    y = x[:, :dy] @ rng.normal(size=(dy, dy)) if dy <= dx else rng.normal(size=(n, dy))
    y = y + rng.normal(size=y.shape)
    assert hs.linear_cka(x, y) == pytest.approx(_numpy_cka(x, y), rel=1e-9)
    assert hs.linear_cka(x, y, debiased=True) == pytest.approx(_numpy_cka_debiased(x, y),
                                                               rel=1e-7)
    m = hs.similarity_matrix({"x": x, "y": y, "z": np.sin(x[:, :3])})
    assert m.loc["x", "y"] == pytest.approx(_numpy_cka(x, y), rel=1e-9)
    assert m.loc["z", "x"] == pytest.approx(_numpy_cka(np.sin(x[:, :3]), x), rel=1e-9)
    d = hs.similarity_matrix({"x": x, "y": y}, method="cka_debiased")
    assert d.loc["x", "y"] == pytest.approx(_numpy_cka_debiased(x, y), rel=1e-7)


def test_cka_of_float32_input_is_computed_in_float64():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(50, 20)) + 1e3).astype(np.float32)  # large offset
    y = x @ rng.normal(size=(20, 20)).astype(np.float32)
    assert hs.linear_cka(x, y) == pytest.approx(
        _numpy_cka(x.astype(np.float64), y.astype(np.float64)), rel=1e-9)


def test_feature_maps_are_flattened_and_3d_is_refused_with_what_to_do():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(6, 4, 3, 3))
    other = rng.normal(size=(6, 5))
    flat = maps.reshape(6, -1)
    assert np.allclose(hs.cosine(maps, maps + 1), hs.cosine(flat, flat + 1))
    assert hs.linear_cka(maps, other) == pytest.approx(_numpy_cka(flat, other))
    idx, _ = hs.nearest_neighbors(torch.from_numpy(maps), k=2)
    assert np.array_equal(idx, hs.nearest_neighbors(flat, k=2)[0])
    avgpool = rng.normal(size=(6, 8, 1, 1))  # torchvision's avgpool output
    assert np.allclose(hs.cosine_matrix(avgpool), hs.cosine_matrix(avgpool[:, :, 0, 0]))
    with pytest.raises(hs.InputError, match="masked_pool"):
        hs.cosine(np.ones((2, 3, 4)), np.ones((2, 3, 4)))


def test_parameters_are_validated_by_type_and_range():
    x = np.random.default_rng(0).normal(size=(5, 3))
    for bad in (-1, 0, 1.5, True, "2"):
        with pytest.raises(hs.InputError, match="block_size"):
            hs.nearest_neighbors(x, 1, block_size=bad)
    for bad in (0, 5, 2.0, True, None):
        with pytest.raises(hs.InputError, match="k must be an int"):
            hs.nearest_neighbors(x, bad)
    assert hs.nearest_neighbors(x, np.int64(2))[0].shape == (5, 2)
    with pytest.raises(hs.InputError, match="exclude_self"):
        hs.nearest_neighbors(x, 1, exclude_self="no")
    with pytest.raises(hs.InputError, match="no neighbours"):
        hs.nearest_neighbors(x[:1], 1)
    with pytest.raises(hs.InputError, match="debiased"):
        hs.linear_cka(x, x, debiased="yes")
    with pytest.raises(hs.InputError, match="bidirectional"):
        hs.last_state(np.ones((1, 2, 2)), [1], bidirectional=1)
    with pytest.raises(hs.InputError, match="metric"):
        hs.neighborhood_overlap(x, x, 2, metric="manhattan")
    # Options that do not apply are errors, never silently ignored.
    with pytest.raises(hs.InputError, match="method='rsa'"):
        hs.similarity_matrix({"x": x, "y": x}, metric="euclidean")
    with pytest.raises(hs.InputError, match="Recording"):
        hs.similarity_matrix({"x": x, "y": x}, reduce="mean")
    with pytest.raises(TypeError):
        hs.similarity_matrix({"x": x, "y": x}, rsa_method="pearson")
    with pytest.raises(hs.InputError, match="same items"):
        hs.similarity_matrix({"x": x, "y": x[:4]})


def test_euclidean_overflow_is_an_error_not_inf():
    x = np.array([[3e38, 0.0], [-3e38, 0.0], [0.0, 1.0]], dtype=np.float32)
    idx, dist = hs.nearest_neighbors(x, 1, metric="euclidean")  # each nearest is 3e38 away:
    assert idx[:, 0].tolist() == [2, 2, 0]  # representable, though its square is not
    np.testing.assert_allclose(dist[:, 0], [3e38, 3e38, 3e38], rtol=1e-6)
    with pytest.raises(hs.InputError, match="overflow"):  # 6e38: no float32 holds it
        hs.nearest_neighbors(x[:2], 1, metric="euclidean")


def test_one_nan_policy_for_pooling():
    x = np.zeros((2, 3, 2))
    x[1, 2, 0] = np.nan  # padding for row 1 (length 2): never used
    for reduce in ("mean", "max", "sum"):
        assert np.isfinite(hs.masked_pool(x, [3, 2], reduce)).all()
    assert np.isfinite(hs.last_state(x, [3, 2])).all()
    x[0, 1, 1] = np.inf  # a real position
    for reduce in ("mean", "max", "sum"):
        with pytest.raises(hs.InputError, match=r"real position \(first at index \(0, 1, 1\)"):
            hs.masked_pool(x, [3, 2], reduce)
    x[0, 2, 0] = np.nan
    with pytest.raises(hs.InputError, match="NaN or infinity"):
        hs.last_state(x, [3, 2])
    with pytest.raises(hs.InputError, match="NaN or infinity"):
        hs.masked_pool(np.full((2, 3, 2, 2), np.nan), reduce="max")


def _random_mask(rng, batch, time, side):
    lengths = rng.integers(1, time + 1, size=batch)
    mask = np.arange(time)[None, :] < lengths[:, None]
    return mask[:, ::-1].copy() if side == "left" else mask, lengths


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.integers(1, 3), st.sampled_from(
    ["left", "right", "holes"]), st.booleans(), st.data())
def test_masks_any_side_against_loops(batch, time, half, side, as_int, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 10_000)))
    x = rng.normal(size=(batch, time, 2 * half))
    if side == "holes":  # arbitrary masks with at least one real position per row
        mask = rng.random((batch, time)) < 0.6
        mask[np.arange(batch), rng.integers(0, time, size=batch)] = True
    else:
        mask, _ = _random_mask(rng, batch, time, side)
    given_mask = mask.astype(np.int64) if as_int else torch.from_numpy(mask)
    mean = hs.masked_pool(x, given_mask, "mean")
    mx = hs.masked_pool(x, given_mask, reduce="max")
    last = hs.last_state(x, given_mask)
    bi = hs.last_state(torch.from_numpy(x), given_mask, bidirectional=True)
    for i in range(batch):
        real = np.flatnonzero(mask[i])
        assert np.allclose(mean[i], x[i, real].mean(0))
        assert np.allclose(mx[i], x[i, real].max(0))
        assert np.array_equal(last[i], x[i, real[-1]])
        assert np.array_equal(bi[i].numpy(), np.concatenate([x[i, real[-1], :half],
                                                             x[i, real[0], half:]]))


def test_feature_map_pooling_against_torch():
    x = torch.randn(3, 4, 5, 6)
    assert torch.allclose(hs.masked_pool(x, reduce="mean"), x.mean((2, 3)))
    assert torch.equal(hs.masked_pool(x, reduce="max"), x.amax((2, 3)))
    assert np.allclose(hs.masked_pool(x.numpy(), reduce="sum"), x.sum((2, 3)).numpy())
    with pytest.raises(hs.InputError, match="feature map"):
        hs.masked_pool(x, [1, 1, 1])
    with pytest.raises(hs.InputError, match="3-D"):
        hs.last_state(x, [1, 1, 1])


def test_error_hierarchy():
    import hookscope.dataset
    import hookscope.io

    assert issubclass(hs.InputError, hs.HookscopeError) and issubclass(hs.InputError, ValueError)
    assert hookscope.io.RecordingFileError is hs.RecordingFileError is hs.errors.RecordingFileError
    assert hookscope.dataset.DatasetError is hs.DatasetError is hs.errors.DatasetError
    for cls in (hs.RecordingFileError, hs.DatasetError):
        assert issubclass(cls, hs.HookscopeError) and issubclass(cls, ValueError)
    # Every public exception class of hookscope derives from HookscopeError.
    public = [getattr(hs.errors, n) for n in hs.errors.__all__]
    assert all(issubclass(c, hs.HookscopeError) for c in public)
    assert set(hs.errors.__all__) <= set(hs.__all__)


def test_cka_form_is_chosen_by_shape_and_memory():
    from hookscope.analysis import _use_gram

    assert _use_gram(500, [16_384, 16_384])                # wide layers: n x n kernels
    assert _use_gram(2_000, [4_096] * 6)
    assert not _use_gram(10_000, [600, 600])              # tall: d x d products
    assert not _use_gram(100_000, [50_000, 50_000])       # Gram matrices would not fit


def test_analysis_frame_pooling_imports_go_one_way():
    import ast
    from pathlib import Path

    order = ["errors", "structure", "_arrays", "pooling", "frame", "analysis"]
    root = Path(hs.__file__).parent
    for i, name in enumerate(order):
        tree = ast.parse((root / f"{name}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
        assert imported <= set(order[:i]), (name, imported)  # incl. imports inside functions


def test_half_precision_means_accumulate_wide():
    """A float16 mean that fits float16 must not fail because its sum (80,000) does not."""
    t = torch.full((2, 4000, 3), 20.0, dtype=torch.float16)
    out = hs.masked_pool(t, torch.tensor([4000, 7]), "mean")
    assert out.dtype == torch.float16 and torch.equal(out, torch.full((2, 3), 20.0).half())
    with pytest.raises(hs.errors.InputError, match="overflow torch.float16"):
        hs.masked_pool(t, None, "sum")  # the sum itself does not fit: a clear error


def test_similarity_matrix_axes_carry_the_names_not_a_and_b():
    import torch

    import hookscope as hs

    x = np.random.default_rng(0).normal(size=(10, 4))
    table = hs.similarity_matrix({"first": x, "second": x ** 2})
    assert table.index.name is None and list(table.columns) == ["first", "second"]
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())
    with hs.record(model, ["0", "1"]) as rec:
        model(torch.randn(10, 4))
    table = hs.similarity_matrix(rec)
    assert table.index.name == table.columns.name == "module"
    assert list(table.index) == ["0", "1"]


@pytest.mark.parametrize("padding", [0.0, 1e30, np.inf, -np.inf, np.nan])
def test_masked_pool_equals_per_example_slices(padding):
    # The fast masked reduction (add 0/-inf, multiply by 1/0) against each example's real
    # positions sliced out by hand, whatever the padding holds (NaN/inf there must not leak).
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 7, 5)).astype(np.float32)
    mask = _random_mask(rng, 6, 7, "left")[0] if padding == 1e30 else None
    lengths = rng.integers(1, 8, size=6)
    keep = mask if mask is not None else np.arange(7)[None] < lengths[:, None]
    x[~keep] = padding
    given = mask if mask is not None else lengths
    for reduce, ref in (("max", np.max), ("sum", np.sum), ("mean", np.mean)):
        out = hs.masked_pool(torch.from_numpy(x), torch.as_tensor(given), reduce)
        expected = np.stack([ref(x[i][keep[i]], axis=0) for i in range(6)])
        if reduce == "max":
            assert np.array_equal(out.numpy(), expected)
        else:
            np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_pool_sequences_without_checks_equals_masked_pool():
    # The form used on a GPU (nothing read back): exact masking, padding never read.
    from hookscope.pooling import pool_sequences

    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.standard_normal((4, 6, 3)).astype(np.float32))
    keep = torch.arange(6)[None] < torch.tensor([6, 3, 1, 4])[:, None]
    x[~keep] = float("nan")
    for reduce in ("max", "mean", "sum"):
        out, finite = pool_sequences(x, keep, reduce, check=False)
        assert finite  # (unchecked: the caller checks the values later)
        assert torch.equal(out, hs.masked_pool(x, keep, reduce))


def _brute_neighbors(x: np.ndarray, k: int, exclude_self: bool) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean neighbours by scipy in float64, ties by the lower index (the reference)."""
    d = cdist(x.astype(np.float64), x.astype(np.float64))
    if exclude_self:
        np.fill_diagonal(d, np.inf)
    idx = np.stack([np.lexsort((np.arange(len(row)), row))[:k] for row in d])
    return idx, np.take_along_axis(d, idx, 1)


@pytest.mark.parametrize("offset, scale", [(50.0, 0.05), (0.0, 1e-25), (128.0, 60.0)])
def test_euclidean_neighbors_are_exact_where_the_expanded_form_cancels_or_underflows(
        offset, scale):
    """||q||^2 - 2 q.x + ||x||^2 in float32 lost every digit for rows sharing a large offset
    (wrong neighbours, an item 0.7 from itself) and underflowed to 0 for tiny values."""
    rng = np.random.default_rng(0)
    x = (offset + scale * rng.normal(size=(120, 256))).astype(np.float32)
    for exclude_self in (True, False):
        idx, dist = hs.nearest_neighbors(x, 5, metric="euclidean", exclude_self=exclude_self)
        ref_idx, ref_dist = _brute_neighbors(x, 5, exclude_self)
        assert (idx == ref_idx).mean() > 0.99  # (float32 inputs: a rare swap of near ties)
        np.testing.assert_allclose(dist, ref_dist, rtol=1e-4)
    assert (idx[:, 0] == np.arange(len(x))).all() and (dist[:, 0] == 0).all()


def test_linear_cka_is_the_same_at_any_scale_of_float64_inputs():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 6)), rng.normal(size=(40, 5))
    y[:, 0] += x[:, 0]
    for debiased in (False, True):
        ref = hs.linear_cka(x, y, debiased=debiased)
        for s in (1e-120, 1e-80, 1e80, 1e160):  # (fourth powers overflowed or vanished)
            assert hs.linear_cka(s * x, y, debiased=debiased) == pytest.approx(ref, rel=1e-9)
    matrix = hs.similarity_matrix({"a": 1e160 * x, "b": y})
    assert np.asarray(matrix)[0, 1] == pytest.approx(hs.linear_cka(x, y), rel=1e-9)


def test_arrays_torch_cannot_share_are_copied_and_unknown_metrics_are_input_errors():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4))
    for odd in (x[::-1], np.flip(x, 1), x.astype(">f8"), x.astype(np.longdouble)):
        np.testing.assert_allclose(hs.cosine(odd, np.ascontiguousarray(odd, np.float64)), 1)
    np.testing.assert_allclose(hs.masked_pool(np.stack([x, x])[::-1], np.array([4, 6])[::-1],
                                              "mean")[0], x[:6].mean(0))
    frame = pd.DataFrame(x).astype("Float64")  # pandas' nullable dtype, no missing value
    np.testing.assert_allclose(hs.cosine(frame, x), 1)
    frame.iloc[0, 0] = pd.NA
    with pytest.raises(hs.InputError, match="missing values"):
        hs.cosine(frame, x)
    with pytest.raises(hs.InputError, match="metric='nope'"):
        hs.rsa(x, x, metric="nope")


@pytest.mark.parametrize("exclude_self", [True, False])
def test_euclidean_neighbors_of_every_other_item(exclude_self):
    """k as large as it can be (no candidate beyond the k): a crash in a first version."""
    x = np.random.default_rng(0).normal(size=(4, 3))
    k = 3 if exclude_self else 4
    idx, dist = hs.nearest_neighbors(x, k, metric="euclidean", exclude_self=exclude_self)
    ref_idx, ref_dist = _brute_neighbors(x, k, exclude_self)
    assert np.array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-12)


@pytest.mark.parametrize("metric", ["cosine", "correlation", "euclidean", "cityblock"])
def test_rsa_of_finite_data_at_extreme_scales(metric):
    """Finite float64 data near 1e300 (or 1e-300) made scipy's distances inf or NaN: 'not all
    finite', blaming data that was.  A power-of-two scale changes no correlation."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((9, 5)), rng.standard_normal((9, 4))
    expected = spearmanr(pdist(x, metric), pdist(y, metric)).statistic
    for sx, sy in [(1e300, 1.0), (1e-300, 1e300), (1e-310, 1e-300)]:
        assert hs.rsa(x * sx, y * sy, metric=metric) == pytest.approx(expected, abs=1e-12)


def test_sparse_inputs_are_read_as_their_dense_values():
    """torch COO/CSR and scipy.sparse inputs raised raw torch errors (aten::amax ...)."""
    import scipy.sparse

    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 4)) * (rng.random((6, 4)) > 0.5)
    y = rng.standard_normal((6, 3))
    expected = hs.linear_cka(x, y)
    t = torch.from_numpy(x)
    for sparse in (t.to_sparse(), scipy.sparse.csr_matrix(x), scipy.sparse.coo_array(x)):
        assert hs.linear_cka(sparse, y) == pytest.approx(expected, abs=1e-12)
        assert np.allclose(hs.cosine(sparse, x), hs.cosine(x, x), atol=1e-12)
    with pytest.raises(hs.InputError, match="nested"):
        hs.cosine(torch.nested.nested_tensor([torch.ones(2, 3), torch.ones(1, 3)]), x)

"""Analysis of representations: similarity, neighbours, representational similarity.

Plain functions on torch tensors, NumPy arrays or pandas DataFrames; nothing here knows about
hooks (``similarity_matrix`` accepts a recording through :func:`hookscope.recording_vectors`).
Imports go one way: ``_arrays`` <- ``pooling`` <- ``frame`` <- ``analysis``.

Conventions
-----------
- Inputs are ``(items, features)``.  Feature maps ``(items, channels, *spatial)`` (4-D or
  more) are flattened to ``(items, channels * positions)``; a 3-D input is refused (a padded
  sequence must be pooled over its real positions first, see :mod:`hookscope.pooling`).
- Tensors are detached and moved to the CPU, integer inputs become float64, floating inputs
  keep their precision (float16/bfloat16 are computed in float32); CKA and RSA are computed in
  float64.
- Two-argument functions name their inputs ``x, y`` and check them the same way.
- Similarities, neighbour scores and summaries come back as NumPy arrays (or floats).
- NaN or infinity in an input, a constant representation where CKA/RSA is undefined, and a
  parameter of the wrong type or out of range are each an :class:`~hookscope.errors.InputError`
  (a ``ValueError``) that says where.  A zero vector has no direction: its cosine with
  anything is NaN, by definition.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ._arrays import ArrayLike, as_matrix, check_bool, check_choice, check_int, paired
from .errors import InputError, InputTypeError
from .frame import Reduce, recording_vectors

__all__ = [
    "NeighborhoodOverlap",
    "cosine",
    "cosine_matrix",
    "linear_cka",
    "nearest_neighbors",
    "neighborhood_change",
    "neighborhood_overlap",
    "rsa",
    "similarity_matrix",
]

# Scores of one query block against all items are kept under this many elements (32 MiB of
# float32): memory stays bounded whatever the number of items.
_BLOCK_ELEMENTS = 1 << 23

# similarity_matrix keeps every representation's n x n Gram matrix only under this many bytes.
_GRAM_BYTES = 2 << 30


def _exact_distances(qb: Tensor, items: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """The euclidean distances of each query to its candidates measured directly on the
    inputs, ``||q - x||`` in float64 (the expanded form found them, but loses digits where
    they are close; a difference of close values is exact), and the candidates reordered by
    them, ties by the lower index."""
    k, d = idx.shape[1], items.shape[1]
    rows = max(1, _BLOCK_ELEMENTS // max(k * d, 1))  # (queries x k x features at a time)
    dist = torch.empty(idx.shape, dtype=items.dtype)
    for r in range(0, idx.shape[0], rows):
        diff = qb[r : r + rows, None, :] - items[idx[r : r + rows]]
        # In float64, whose range holds the squares of any float32 difference; a float64
        # difference whose squares leave that range is scaled by a power of two first.
        out = torch.linalg.vector_norm(diff, dim=2, dtype=torch.float64)
        if diff.dtype == torch.float64 and not bool(
                (torch.isfinite(out) & ((out > 0) | (diff == 0).all(2))).all()):
            _, e = torch.frexp(diff.abs().amax(2, keepdim=True))
            out = torch.ldexp(torch.linalg.vector_norm(torch.ldexp(diff, -e), dim=2),
                              e.squeeze(2))
        dist[r : r + rows] = out
    order = torch.argsort(idx, dim=1)  # (ties: a stable sort by distance of index order)
    idx, dist = idx.gather(1, order), dist.gather(1, order)
    order = torch.sort(dist, dim=1, stable=True).indices
    return idx.gather(1, order), dist.gather(1, order)


def _safe_rows(x: Tensor) -> Tensor:
    """``x`` with each row divided by its largest absolute value where the row's magnitude
    could overflow or underflow a dot product in ``x``'s dtype (cosines are unchanged by
    scaling a row; rows in the safe range are left untouched and not copied)."""
    info = torch.finfo(x.dtype)
    peak = x.abs().amax(1, keepdim=True)
    high = (info.max / (4 * x.shape[1])) ** 0.5
    low = info.tiny ** 0.5 / info.eps
    if not bool(((peak > 0) & ((peak < low) | (peak > high))).any()):
        return x
    return x / torch.where(peak == 0, 1, peak)


def _unit_rows(x: Tensor) -> Tensor:
    """Rows scaled to unit length, for any finite input; zero rows become NaN (their direction
    is undefined)."""
    x = _safe_rows(x)
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x / torch.where(norms == 0, torch.nan, norms)


def cosine(x: ArrayLike, y: ArrayLike) -> np.ndarray:
    """Paired cosine similarity: one value per row, ``cos(x[i], y[i])``.

    The vectorised form of the story's ``1 - scipy.spatial.distance.cosine(P[i], H[i])``.
    Scale-invariant for any finite input (rows of 1e30 or 1e-30 in float32 included).

    Parameters
    ----------
    x, y : (n, d) arrays or tensors
        Rows are paired; both must have the same shape.

    Returns
    -------
    numpy.ndarray
        Shape ``(n,)``, float32 for float32 inputs (float64 for float64 or integer inputs).
        NaN where either row is all zeros.

    Examples
    --------
    >>> cosine([[1.0, 0.0], [1.0, 1.0]], [[0.0, 2.0], [2.0, 2.0]]).round(6).tolist()
    [0.0, 1.0]
    """
    a, b = paired(x, y, same="shape")
    return (_unit_rows(a) * _unit_rows(b)).sum(1).clamp(-1, 1).numpy()


def cosine_matrix(x: ArrayLike, y: ArrayLike | None = None) -> np.ndarray:
    """All-pairs cosine similarity: ``out[i, j] = cos(x[i], y[j])`` (``y`` defaults to ``x``).

    Returns an ``(n, m)`` NumPy array (dtype as in :func:`cosine`); rows or columns of zero
    vectors are NaN.

    >>> cosine_matrix([[1.0, 0.0], [0.0, 3.0]]).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    if y is None:
        ua = _unit_rows(as_matrix(x, "x"))
        return (ua @ ua.T).clamp(-1, 1).numpy()
    a, b = paired(x, y, same="features")
    return (_unit_rows(a) @ _unit_rows(b).T).clamp(-1, 1).numpy()


def _topk_stable(scores: Tensor, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """Top-k of each row with ties broken by the lower column index (deterministic)."""
    vals, idx = torch.topk(scores, k, dim=1, largest=largest, sorted=True)
    kth = vals[:, -1:]
    # Rows where a tie at the k-th value extends beyond the k picked: pick the lowest indices.
    n_tied = (scores == kth).sum(1)
    n_tied_in = (vals == kth).sum(1)
    for r in torch.nonzero(n_tied > n_tied_in).flatten().tolist():
        row = scores[r]
        better = torch.nonzero(row > kth[r] if largest else row < kth[r]).flatten()
        tied = torch.nonzero(row == kth[r]).flatten()[: k - len(better)]
        cols = torch.cat([better, tied])
        idx[r], vals[r] = cols, row[cols]
    # Order each row by score, then index: a stable sort by score of index-sorted columns.
    order = torch.argsort(idx, dim=1)
    idx, vals = idx.gather(1, order), vals.gather(1, order)
    order = torch.sort(vals, dim=1, descending=largest, stable=True).indices
    return idx.gather(1, order), vals.gather(1, order)


def nearest_neighbors(
    x: ArrayLike,
    k: int,
    *,
    queries: ArrayLike | None = None,
    metric: str = "cosine",
    exclude_self: bool = True,
    block_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours, computed in blocks of queries (bounded memory).

    Parameters
    ----------
    x : (n, d)
        The items to search.
    k : int
        Neighbours per query, ``1 <= k <= n`` (``n - 1`` when ``exclude_self``).
    queries : (q, d), optional
        Search for these; by default every item of ``x`` is a query.
    metric : {"cosine", "euclidean", "dot"}
        Scores are cosine similarity (higher is nearer), euclidean distance (lower is nearer)
        or dot product (higher is nearer).  Euclidean candidates are found with the expanded
        form ``||q||^2 - 2 q.x + ||x||^2`` on centred (where the items share an offset larger
        than their spread) and, where squares would overflow or vanish, power-of-two-scaled
        values; where its rounding could matter (distances within 1e4 times it, or
        candidates it cannot tell apart), ``k + 8`` candidates are measured directly,
        ``||q - x||`` in float64: exact distances (an item is 0 from itself) for data far
        from the origin or of any magnitude.
    exclude_self : bool
        When ``queries`` is not given, leave each item out of its own neighbours.
    block_size : int, optional
        Queries per block (``>= 1``); by default as many as keep one block of scores under
        32 MiB of float32.

    Returns
    -------
    indices : numpy.ndarray of int64, shape (q, k)
        Nearest first; ties broken by the lower item index, so results are deterministic.
    scores : numpy.ndarray, shape (q, k)
        The score of each neighbour (float32 for float32 inputs), nearest first: the cosine
        or dot product (descending) for those metrics, the positive euclidean distance
        (ascending) for ``"euclidean"``.

    Examples
    --------
    >>> idx, sim = nearest_neighbors([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], k=1)
    >>> idx.ravel().tolist()
    [1, 0, 1]
    """
    metric = check_choice(metric, "metric", ("cosine", "euclidean", "dot"))
    exclude_self = check_bool(exclude_self, "exclude_self")
    if block_size is not None:
        block_size = check_int(block_size, "block_size", 1)
    self_search = queries is None
    if self_search:
        items = q = as_matrix(x, "x")
    else:
        items, q = paired(x, queries, ("x", "queries"), same="features")
    n = items.shape[0]
    skip_self = self_search and exclude_self
    limit = n - 1 if skip_self else n
    why = " (each item is excluded from its own neighbours)" if skip_self else ""
    if limit < 1:
        raise InputError(f"x has {n} item(s): no neighbours to find{why}.")
    k = check_int(k, "k", 1, limit, why=f" for {n} items{why}")
    inv_norms = None
    if metric == "cosine":
        # Scale the scores instead of copying the items into unit length: no second copy of
        # a large x (rows whose magnitude could overflow a dot product are rescaled first).
        items = _safe_rows(items)
        q = items if self_search else _safe_rows(q)
        norms = torch.linalg.vector_norm(items, dim=1)
        q_norms = norms if self_search else torch.linalg.vector_norm(q, dim=1)
        if bool((norms == 0).any()) or bool((q_norms == 0).any()):
            raise InputError("cosine neighbours of a zero vector are undefined: drop all-zero "
                             "rows or use metric='euclidean'.")
        inv_norms, q_inv = 1 / norms, 1 / q_norms
    largest = metric != "euclidean"
    picks, sq_items = k, None
    if metric == "euclidean":
        # Distances do not change by a shift, and change by a power of two exactly: where the
        # items share an offset larger than their spread, items and queries are centred on
        # the items' mean (against cancellation in ||q||^2 - 2 q.x + ||x||^2), and all are
        # scaled into [-1, 1] (against underflow and overflow), to find candidates.  Where
        # the expanded form's rounding could matter (distances of interest within 1e4 times
        # it, or two candidates' scores within it), a few more than k are measured directly
        # on the inputs (_exact_distances), so that rounding neither orders nor picks them.
        raw_items, raw_q = items, q
        scale = 0
        picks = min(limit, k + 8)
        mean = items.mean(0, dtype=torch.float64)
        sq_items = (items * items).sum(1)
        if 2 * float(mean @ mean) > float(sq_items.sum(dtype=torch.float64)) / n:  # (||mean||^2
            # exceeds the spread, E ||x - mean||^2 = E ||x||^2 - ||mean||^2)
            shift = mean.to(items.dtype)
            items = items - shift
            q = items if self_search else q - shift
        peak = max(float(t.max()) if i % 2 else -float(t.min())
                   for i, t in enumerate((items, items, q, q)))
        info = torch.finfo(items.dtype)
        if peak > 0 and not (info.tiny ** 0.5 / info.eps < peak
                             < (info.max / (4 * items.shape[1])) ** 0.5):
            scale = math.frexp(peak)[1]  # (squares would overflow or lose their digits)
            items = torch.ldexp(items, torch.tensor(-scale))
            q = items if self_search else torch.ldexp(q, torch.tensor(-scale))
        if scale or items is not raw_items:
            sq_items = (items * items).sum(1)
    noise_at = (8 * torch.finfo(items.dtype).eps, float(sq_items.max())) if sq_items is not None \
        else None
    block = block_size or max(1, _BLOCK_ELEMENTS // max(n, 1))
    out_idx = torch.empty((q.shape[0], k), dtype=torch.int64)
    out_val = torch.empty((q.shape[0], k), dtype=items.dtype)
    for start in range(0, q.shape[0], block):
        qb = q[start : start + block]
        scores = qb @ items.T
        if inv_norms is not None:
            scores.mul_(inv_norms).mul_(q_inv[start : start + block, None]).clamp_(-1, 1)
        if metric == "euclidean":
            # ||q - x||^2 = ||q||^2 - 2 q.x + ||x||^2, clamped at 0 against rounding.
            q_sq = (qb * qb).sum(1, keepdim=True)
            scores.mul_(-2).add_(sq_items).add_(q_sq).clamp_(min=0)
        if skip_self:
            rows = torch.arange(qb.shape[0])
            scores[rows, rows + start] = torch.inf if not largest else -torch.inf
        idx, val = _topk_stable(scores, picks, largest)
        if noise_at is not None:  # euclidean: squared distances, scaled by 2**-2scale
            noise = noise_at[0] * (q_sq + noise_at[1])  # (about the most rounding can err)
            m = min(k + 1, picks)  # (the k in order, and the k-th against the next one)
            unsure = ((val[:, :k] < 1e4 * noise).any(1)
                      | (val[:, 1:m] - val[:, :m - 1] <= 2 * noise).any(1)).nonzero().flatten()
            val = torch.ldexp(val.sqrt(), torch.tensor(scale))
            if len(unsure):
                val = val.clone()
                idx[unsure], val[unsure] = _exact_distances(
                    raw_q[start : start + block][unsure], raw_items, idx[unsure])
            idx, val = idx[:, :k], val[:, :k]
        out_idx[start : start + block] = idx
        out_val[start : start + block] = val
    if not bool(torch.isfinite(out_val).all()):
        raise InputError(f"{metric} scores of x overflow {items.dtype}: compute in float64 "
                         "(x.double()) or rescale x.")
    return out_idx.numpy(), out_val.numpy()


class NeighborhoodOverlap(NamedTuple):
    """Per-item neighbourhood agreement between two spaces (see :func:`neighborhood_overlap`)."""

    overlap: np.ndarray   # |N_x(i) & N_y(i)| / k, per item
    jaccard: np.ndarray   # |N_x(i) & N_y(i)| / |N_x(i) | N_y(i)|, per item
    mean_overlap: float
    mean_jaccard: float


def _shared_counts(nx: np.ndarray, ny: np.ndarray) -> np.ndarray:
    """Per row, how many entries of ``ny`` also appear in ``nx`` (rows hold unique ids)."""
    both = np.concatenate([nx, ny], axis=1)
    both.sort(axis=1)
    return (both[:, 1:] == both[:, :-1]).sum(1)


def neighborhood_overlap(x: ArrayLike, y: ArrayLike, k: int, *,
                         metric: str = "cosine") -> NeighborhoodOverlap:
    """How much the k-neighbourhood of each item agrees between two representations of the
    same items (before vs after pooling, layer 3 vs layer 6).

    Returns a :class:`NeighborhoodOverlap` with per-item ``overlap`` (shared neighbours / k)
    and ``jaccard``, and their means.

    >>> r = neighborhood_overlap([[0.0], [1.0], [5.0], [6.0]], [[0.0], [1.0], [5.0], [6.0]],
    ...                          k=1, metric="euclidean")
    >>> r.mean_overlap
    1.0
    """
    xs, ys = paired(x, y)
    nx, _ = nearest_neighbors(xs, k, metric=metric)
    ny, _ = nearest_neighbors(ys, k, metric=metric)
    shared = _shared_counts(nx, ny)
    overlap = shared / k
    jaccard = shared / (2 * k - shared)
    return NeighborhoodOverlap(overlap, jaccard, float(overlap.mean()), float(jaccard.mean()))


def neighborhood_change(x: ArrayLike, y: ArrayLike, k: int, labels: Sequence[Any] | None = None,
                        *, metric: str = "cosine") -> pd.DataFrame:
    """Per item: its neighbours in space ``x`` ("before") and in space ``y`` ("after"), who
    entered and who left the neighbourhood, and the overlap.

    Parameters
    ----------
    x, y : arrays of shape (n, d_x) and (n, d_y)
        Two representations of the same n items.
    k : int
        Neighbourhood size.
    labels : sequence of n, optional
        Shown instead of indices (sentence texts, ids).

    Returns
    -------
    pandas.DataFrame
        Indexed by item (its label), columns ``before``, ``after``, ``entered``, ``left``
        (lists, nearest first) and ``overlap`` (float).
    """
    xs, ys = paired(x, y)
    n = xs.shape[0]
    if labels is not None and len(labels) != n:
        raise InputError(f"labels has {len(labels)} entries for {n} items.")
    names = np.asarray(labels, dtype=object) if labels is not None else np.arange(n)
    nx, _ = nearest_neighbors(xs, k, metric=metric)
    ny, _ = nearest_neighbors(ys, k, metric=metric)
    rows = []
    for i in range(n):
        before, after = nx[i].tolist(), ny[i].tolist()
        sb, sa = set(before), set(after)
        rows.append((names[before].tolist(), names[after].tolist(),
                     names[[j for j in after if j not in sb]].tolist(),
                     names[[j for j in before if j not in sa]].tolist(),
                     len(sb & sa) / k))
    return pd.DataFrame(rows, columns=["before", "after", "entered", "left", "overlap"],
                        index=pd.Index(names, name="item"))


# -- CKA and RSA ---------------------------------------------------------------------------------


def _check_varies(t: Tensor, name: str) -> None:
    """The one error for a constant representation, shared by every CKA and RSA variant."""
    # Rows 0 and 1 differ for almost every input: O(d) instead of a full n x d comparison.
    if (t.shape[0] < 2 or bool((t[1] == t[0]).all())) and bool((t == t[0]).all()):
        raise InputError(f"{name} is constant (all {t.shape[0]} rows equal): CKA and RSA are "
                         "undefined for a representation that does not vary across items.")


class _CkaRep:
    """One representation prepared for linear CKA: centred in float64, and its statistics
    (its n x n Gram matrix in the Gram form) computed once, whatever the number of pairs."""

    def __init__(self, t: Tensor, name: str, gram: bool) -> None:
        _check_varies(t, name)
        self.name = name
        x = t.double().numpy()
        xc = x - x.mean(0)
        peak = float(np.abs(xc).max())
        if peak > 0:  # scaled by a power of two into [0.5, 1): CKA does not change, and the
            xc = np.ldexp(xc, -np.frexp(peak)[1])  # fourth powers neither overflow nor vanish
        self.xc = xc
        self.n = xc.shape[0]
        if gram:
            self.gram: np.ndarray | None = xc @ xc.T    # NumPy uses syrk for A @ A.T
            self.self_term = float(np.vdot(self.gram, self.gram))
        else:
            self.gram = None
            cov = xc.T @ xc
            self.self_term = float(np.vdot(cov, cov))
        if self.self_term == 0:  # not constant, but centring cancelled it in float64
            raise InputError(f"{name} is constant up to rounding: CKA is undefined for it.")

    @functools.cached_property
    def sq(self) -> np.ndarray:
        """The diagonal of the Gram matrix (debiased CKA only)."""
        return np.einsum("ij,ij->i", self.xc, self.xc)

    @functools.cached_property
    def total(self) -> np.ndarray:
        """Column sums of the centred data, ~0, kept for exact debiasing terms."""
        return self.xc.sum(0)

    def trace_with(self, other: _CkaRep) -> float:
        """``tr(K L)`` of the centred linear kernels, in whichever form was prepared."""
        if self.gram is not None and other.gram is not None:
            return float(np.vdot(self.gram, other.gram))
        cross = other.xc.T @ self.xc
        return float(np.vdot(cross, cross))

    def hsic_unbiased(self, other: _CkaRep, trace: float) -> float:
        """Unbiased HSIC (Song et al. 2012) from ``tr(K L)`` and O(n d) terms: with zeroed
        diagonals ``K~``, ``tr(K~ L~) = tr(K L) - sum_i k_ii l_ii``, ``1' K~ 1 =
        ||sum_i x_i||^2 - sum_i k_ii`` and ``K~ 1 = X sum_i x_i - diag(K)``."""
        n = self.n
        kr = self.xc @ self.total - self.sq
        lr = other.xc @ other.total - other.sq
        ks = float(self.total @ self.total - self.sq.sum())
        ls = float(other.total @ other.total - other.sq.sum())
        tr = trace - float(self.sq @ other.sq)
        return (tr + ks * ls / ((n - 1) * (n - 2)) - 2 * float(kr @ lr) / (n - 2)) / (n * (n - 3))


def _use_gram(n: int, dims: Sequence[int]) -> bool:
    """Gram form (n x n kernels) when it costs fewer multiply-adds than the feature form
    (d x d' cross-covariances) for all pairs of these representations, unless keeping the
    Gram matrices would take more memory than ``_GRAM_BYTES`` and than the feature form."""
    pairs = [(a, b) for i, a in enumerate(dims) for b in dims[i + 1:]]
    gram = sum(n * n * d for d in dims) + len(pairs) * n * n
    feature = sum(n * d * d for d in dims) + sum(n * a * b for a, b in pairs)
    gram_bytes = len(dims) * n * n * 8                  # every Gram matrix kept
    feature_bytes = max(a * b for a in dims for b in dims) * 8  # one product at a time
    if gram_bytes > _GRAM_BYTES and feature_bytes < gram_bytes:
        return False
    return gram < feature


def _cka(a: _CkaRep, b: _CkaRep, debiased: bool) -> float:
    trace = a.trace_with(b)
    if not debiased:
        return trace / float(np.sqrt(a.self_term * b.self_term))
    haa, hbb = a.hsic_unbiased(a, a.self_term), b.hsic_unbiased(b, b.self_term)
    for h, rep in ((haa, a), (hbb, b)):
        if h <= 0:
            raise InputError(f"the debiased HSIC of {rep.name} with itself is not positive "
                             f"({h:.3g}): too few items for debiased CKA; use debiased=False or "
                             "more items.")
    return a.hsic_unbiased(b, trace) / float(np.sqrt(haa * hbb))


def linear_cka(x: ArrayLike, y: ArrayLike, *, debiased: bool = False) -> float:
    """Linear centred kernel alignment between two representations of the same items.

    ``CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred ``Xc, Yc``
    (Kornblith et al. 2019): 1 for representations equal up to rotation and isotropic scaling,
    near 0 for unrelated ones.  ``debiased=True`` uses the unbiased HSIC estimator, which
    corrects the upward bias for few items (needs at least 4).

    Computed in float64, in the cheaper of two equal forms: the feature form above when the
    features are fewer than the items, else the Gram form ``<Kc, Lc>_F / (||Kc|| ||Lc||)``
    with ``Kc = Xc Xc^T`` (n x n), which is much faster for wide layers (flattened feature
    maps, transformer MLPs).

    Parameters
    ----------
    x, y : arrays of shape (n, d_x) and (n, d_y)
        The same n items in two spaces (feature maps are flattened).
    debiased : bool

    Returns
    -------
    float

    Raises
    ------
    InputError
        Different numbers of items, a constant representation, fewer than 4 items with
        ``debiased=True``, NaN or infinity.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(50, 8))
    >>> rotation = np.linalg.qr(np.random.default_rng(1).normal(size=(8, 8)))[0]
    >>> round(linear_cka(x, 3 * x @ rotation), 6)
    1.0
    """
    debiased = check_bool(debiased, "debiased")
    xs, ys = paired(x, y)
    if debiased and xs.shape[0] < 4:
        raise InputError(f"debiased CKA needs at least 4 items, got {xs.shape[0]}.")
    gram = _use_gram(xs.shape[0], [xs.shape[1], ys.shape[1]])
    return _cka(_CkaRep(xs, "x", gram), _CkaRep(ys, "y", gram), debiased)


_CORRELATIONS = ("spearman", "pearson", "kendall")


#: pdist metrics that a positive factor on the data multiplies by one factor (or leaves alone).
_SCALE_FREE = frozenset({"cosine", "correlation", "euclidean", "sqeuclidean", "cityblock",
                         "chebyshev", "minkowski", "braycurtis", "canberra"})


def _rdm(t: Tensor, name: str, metric: str | Callable, correlation: str) -> np.ndarray:
    """The condensed distance matrix of one representation, checked, and ranked for
    ``correlation="spearman"`` (so that each pair of representations is one Pearson
    correlation)."""
    from scipy.spatial.distance import pdist
    from scipy.stats import rankdata

    _check_varies(t, name)
    if t.shape[0] < 3:
        raise InputError(f"rsa needs at least 3 items (2 pairwise distances to correlate), "
                         f"{name} has {t.shape[0]}.")
    arr = t.double().numpy()
    peak = float(np.abs(arr).max())
    if isinstance(metric, str) and metric in _SCALE_FREE and peak > 0:
        # A power of two times the whole matrix scales each distance alike (or not at all),
        # which no correlation of them sees; it keeps 1e300 or 1e-300 from overflowing or
        # vanishing in scipy's sums of squares.
        arr = np.ldexp(arr, -np.frexp(peak)[1])
    try:
        d = pdist(arr, metric)
    except ValueError as exc:  # an unknown metric name, or one scipy refuses for this input
        raise InputError(f"rsa: metric={metric!r} is not a distance scipy's pdist computes "
                         f"here ({exc}); e.g. 'cosine', 'euclidean', 'correlation' or a "
                         "callable (u, v) -> float.") from None
    if not np.isfinite(d).all():
        zero = np.flatnonzero(~t.double().numpy().any(1))
        why = (f"row {int(zero[0])} of {name} is all zeros, which has no {metric} distance; "
               "drop it or use metric='euclidean'" if len(zero) else
               f"the {metric} distances of {name} are not all finite")
        raise InputError(f"rsa: {why}.")
    if np.ptp(d) == 0:
        raise InputError(f"all pairwise {metric} distances of {name} are equal: their "
                         "correlation with anything is undefined.")
    if correlation == "spearman":
        d = rankdata(d)
    if correlation != "kendall":
        d = d - d.mean()
        d /= np.linalg.norm(d)
    return d


def _correlate(dx: np.ndarray, dy: np.ndarray, correlation: str) -> float:
    if correlation == "kendall":
        from scipy.stats import kendalltau

        return float(kendalltau(dx, dy)[0])
    return float(np.clip(dx @ dy, -1, 1))


def rsa(x: ArrayLike, y: ArrayLike, *, metric: str | Callable = "cosine",
        correlation: str = "spearman") -> float:
    """Representational similarity analysis: the rank (or linear) correlation between the
    condensed pairwise distance matrices of two representations of the same items.

    Parameters
    ----------
    x, y : arrays of shape (n, d_x) and (n, d_y)
        The same n >= 3 items in two spaces (feature maps are flattened).
    metric : str or callable
        Any ``scipy.spatial.distance.pdist`` metric.
    correlation : {"spearman", "pearson", "kendall"}

    Raises
    ------
    InputError
        A constant representation, all distances equal, a zero row with a metric that needs a
        direction (``"cosine"``, ``"correlation"``), fewer than 3 items, NaN or infinity.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(20, 5))
    >>> round(rsa(x, 2 * x), 6)
    1.0
    """
    correlation = check_choice(correlation, "correlation", _CORRELATIONS)
    xs, ys = paired(x, y)
    return _correlate(_rdm(xs, "x", metric, correlation), _rdm(ys, "y", metric, correlation),
                      correlation)


_METHODS = ("cka", "cka_debiased", "rsa")


def similarity_matrix(
    reps: Mapping[str, ArrayLike] | Any,
    method: str = "cka",
    *,
    reduce: Reduce = None,
    lengths: ArrayLike | Sequence[ArrayLike] | None = None,
    bidirectional: bool | None = None,
    metric: str | Callable | None = None,
    correlation: str | None = None,
) -> pd.DataFrame:
    """Pairwise representational similarity of several representations of the same items.

    Each representation is prepared once (centred Gram matrix or covariance for CKA, ranked
    distance matrix for RSA) and reused for all its pairs.

    Parameters
    ----------
    reps : mapping of name -> (n, d) array, or a Recording
        Feature maps are flattened.  A recording becomes
        ``recording_vectors(reps, reduce=reduce, lengths=lengths, bidirectional=bidirectional)``.
    method : {"cka", "cka_debiased", "rsa"}
        Linear CKA (see :func:`linear_cka`), debiased linear CKA, or RSA (see :func:`rsa`).
    reduce : callable or str, optional
        Recordings only: as in :func:`hookscope.recording_vectors`.
    lengths : lengths or mask, optional
        Recordings only: as in :func:`hookscope.recording_vectors`.
    bidirectional : bool, optional
        Recordings only: as in :func:`hookscope.recording_vectors`.
    metric : str or callable, optional
        ``method="rsa"`` only: as in :func:`rsa` (default ``"cosine"``).
    correlation : str, optional
        ``method="rsa"`` only: as in :func:`rsa` (default ``"spearman"``).

    Returns
    -------
    pandas.DataFrame
        Symmetric, the representations' names on both axes (for a recording, the axes are
        named ``"module"``), 1 on the diagonal.

    Raises
    ------
    InputError
        An unknown method, an option that does not apply to it, or any error of
        :func:`linear_cka` / :func:`rsa` (naming the representation).
    """
    method = check_choice(method, "method", _METHODS)
    if method != "rsa" and (metric is not None or correlation is not None):
        raise InputError(f"metric= and correlation= apply to method='rsa', not {method!r}.")
    if isinstance(reps, Mapping):
        if reduce is not None or lengths is not None or bidirectional is not None:
            raise InputError("reduce=, lengths= and bidirectional= apply when reps is a "
                             "Recording; pool mapping values yourself (hs.masked_pool).")
        axis = None
    elif callable(getattr(reps, "captures", None)):  # a Recording (not imported: layering)
        reps = recording_vectors(reps, reduce, lengths=lengths, bidirectional=bidirectional)
        axis = "module"
    else:
        raise InputTypeError(
            f"similarity_matrix compares several representations: give a Recording or a "
            f"mapping of name -> (items, units) matrix, got {type(reps).__name__}. For one "
            "matrix's item-by-item similarities use hs.cosine(x, x).")
    names = list(reps)
    if not names:
        raise InputError("similarity_matrix needs at least one representation.")
    mats = {n: as_matrix(reps[n], f"reps[{n!r}]") for n in names}
    rows = {n: m.shape[0] for n, m in mats.items()}
    if len(set(rows.values())) > 1:
        raise InputError(f"all representations must hold the same items; rows: {rows}.")
    n = rows[names[0]]
    if method == "rsa":
        correlation = check_choice(correlation or "spearman", "correlation", _CORRELATIONS)
        prepared = {k: _rdm(m, f"reps[{k!r}]", metric or "cosine", correlation)
                    for k, m in mats.items()}

        def pair(a: str, b: str) -> float:
            return _correlate(prepared[a], prepared[b], correlation)
    else:
        debiased = method == "cka_debiased"
        if debiased and n < 4:
            raise InputError(f"debiased CKA needs at least 4 items, got {n}.")
        gram = _use_gram(n, [m.shape[1] for m in mats.values()])
        reps_ = {k: _CkaRep(m, f"reps[{k!r}]", gram) for k, m in mats.items()}

        def pair(a: str, b: str) -> float:
            return _cka(reps_[a], reps_[b], debiased)
    out = np.eye(len(names))
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            out[i, j] = out[j, i] = pair(a, names[j])
    return pd.DataFrame(out, index=pd.Index(names, name=axis),
                        columns=pd.Index(names, name=axis))

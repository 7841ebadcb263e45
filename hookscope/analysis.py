"""Analysis of representations: similarity, neighbours, pooling, representational similarity.

Plain functions on torch tensors, NumPy arrays or pandas DataFrames; nothing here knows about
hooks or recordings (``similarity_matrix`` accepts a recording only through its public API).

Conventions
-----------
- Inputs are ``(items, features)`` unless said otherwise; tensors are detached and moved to the
  CPU, integer inputs become float64, floating inputs keep their precision (float16/bfloat16
  are computed in float32).
- Similarities, neighbour scores and summaries come back as NumPy arrays (or floats).
  Length-aware pooling (``last_state``, ``masked_pool``) lives in :mod:`hookscope.pooling`.
- NaN or infinity in an input is a ``ValueError`` that says where (no function propagates them
  silently).  A zero vector has no direction: its cosine with anything is NaN, by definition.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor

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

ArrayLike = Tensor | np.ndarray | pd.DataFrame | Sequence

# Scores of one query block against all items are kept under this many elements (32 MiB of
# float32): memory stays bounded whatever the number of items.
_BLOCK_ELEMENTS = 1 << 23


def _from_numpy(arr: np.ndarray) -> Tensor:
    """Zero-copy tensor of an array; read-only arrays (pandas, hookscope frames) are fine
    because nothing here writes into its inputs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def _as_matrix(x: ArrayLike, name: str, ndim: int = 2) -> Tensor:
    """A CPU float tensor view of ``x`` (no copy where possible), validated."""
    if isinstance(x, pd.DataFrame | pd.Series):
        x = x.to_numpy()
    if isinstance(x, Tensor):
        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()
    else:
        arr = np.asarray(x)
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"{name} must be a numeric array, got dtype {arr.dtype}.")
        t = _from_numpy(arr)
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    elif not t.dtype.is_floating_point:
        if t.dtype.is_complex:
            raise ValueError(f"{name} must be real-valued, got {t.dtype}.")
        t = t.double()
    if t.ndim != ndim:
        layout = "items x features" if ndim == 2 else "batch x time x features"
        hint = " Use x.reshape(1, -1) for one item." if t.ndim == 1 and ndim == 2 else ""
        raise ValueError(f"{name} must be {ndim}-D ({layout}), got shape {tuple(t.shape)}.{hint}")
    if t.shape[0] == 0 or t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}).")
    # A finite sum proves every element finite without a full-size mask; only a NaN, an
    # infinity or an overflowing sum leads to the exact (allocating) check.
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        where = torch.nonzero(~torch.isfinite(t))[0].tolist()
        raise ValueError(f"{name} holds NaN or infinity (first at index {tuple(where)}); clean "
                         "or drop those items first.")
    return t


def _common_dtype(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def _unit_rows(x: Tensor) -> Tensor:
    """Rows scaled to unit length; zero rows become NaN (their direction is undefined)."""
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x / torch.where(norms == 0, torch.nan, norms)


def cosine(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Paired cosine similarity: one value per row, ``cos(a[i], b[i])``.

    The vectorised form of the story's ``1 - scipy.spatial.distance.cosine(P[i], H[i])``.

    Parameters
    ----------
    a, b : (n, d) arrays or tensors
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
    a, b = _common_dtype(_as_matrix(a, "a"), _as_matrix(b, "b"))
    if a.shape != b.shape:
        raise ValueError(f"a and b must pair up row by row: shapes {tuple(a.shape)} and "
                         f"{tuple(b.shape)} differ (cosine_matrix compares all pairs).")
    return (_unit_rows(a) * _unit_rows(b)).sum(1).clamp(-1, 1).numpy()


def cosine_matrix(a: ArrayLike, b: ArrayLike | None = None) -> np.ndarray:
    """All-pairs cosine similarity: ``out[i, j] = cos(a[i], b[j])`` (``b`` defaults to ``a``).

    Returns an ``(n, m)`` NumPy array (dtype as in :func:`cosine`); rows or columns of zero
    vectors are NaN.

    >>> cosine_matrix([[1.0, 0.0], [0.0, 3.0]]).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    a = _as_matrix(a, "a")
    b = a if b is None else _as_matrix(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b need the same number of features: {a.shape[1]} != "
                         f"{b.shape[1]}.")
    a, b = _common_dtype(a, b)
    ua = _unit_rows(a)
    ub = ua if b is a else _unit_rows(b)
    return (ua @ ub.T).clamp(-1, 1).numpy()


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
        or dot product (higher is nearer).
    exclude_self : bool
        When ``queries`` is not given, leave each item out of its own neighbours.
    block_size : int, optional
        Queries per block; by default as many as keep one block of scores under 64 MiB.

    Returns
    -------
    indices : numpy.ndarray of int64, shape (q, k)
        Nearest first; ties broken by the lower item index, so results are deterministic.
    scores : numpy.ndarray, shape (q, k)
        The score of each neighbour (float32 for float32 inputs).

    Examples
    --------
    >>> idx, sim = nearest_neighbors([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], k=1)
    >>> idx.ravel().tolist()
    [1, 0, 1]
    """
    if metric not in ("cosine", "euclidean", "dot"):
        raise ValueError(f"metric must be 'cosine', 'euclidean' or 'dot', got {metric!r}.")
    items = _as_matrix(x, "x")
    self_search = queries is None
    q = items if self_search else _as_matrix(queries, "queries")
    if q.shape[1] != items.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} features but x has {items.shape[1]}.")
    items, q = _common_dtype(items, q)
    n = items.shape[0]
    skip_self = self_search and exclude_self
    limit = n - 1 if skip_self else n
    if not isinstance(k, int | np.integer) or not 1 <= k <= limit:
        why = " (each item is excluded from its own neighbours)" if skip_self else ""
        raise ValueError(f"k must be an int in [1, {limit}] for {n} items{why}, got {k!r}.")
    inv_norms = None
    if metric == "cosine":
        # Scale the scores instead of copying the items into unit length: no second copy of
        # a large x.
        norms = torch.linalg.vector_norm(items, dim=1)
        q_norms = norms if self_search else torch.linalg.vector_norm(q, dim=1)
        if bool((norms == 0).any()) or bool((q_norms == 0).any()):
            raise ValueError("cosine neighbours of a zero vector are undefined: drop all-zero "
                             "rows or use metric='euclidean'.")
        inv_norms, q_inv = 1 / norms, 1 / q_norms
    largest = metric != "euclidean"
    sq_items = (items * items).sum(1) if metric == "euclidean" else None
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
            scores.mul_(-2).add_(sq_items).add_((qb * qb).sum(1, keepdim=True)).clamp_(min=0)
        if skip_self:
            rows = torch.arange(qb.shape[0])
            scores[rows, rows + start] = torch.inf if not largest else -torch.inf
        idx, val = _topk_stable(scores, k, largest)
        out_idx[start : start + block] = idx
        out_val[start : start + block] = val
    if metric == "euclidean":
        out_val.sqrt_()
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
    xs, ys = _as_matrix(x, "x"), _as_matrix(y, "y")
    if xs.shape[0] != ys.shape[0]:
        raise ValueError(f"x and y must hold the same items: {xs.shape[0]} rows != "
                         f"{ys.shape[0]} rows.")
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
    x, y : (n, d_x), (n, d_y)
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
    xs, ys = _as_matrix(x, "x"), _as_matrix(y, "y")
    if xs.shape[0] != ys.shape[0]:
        raise ValueError(f"x and y must hold the same items: {xs.shape[0]} rows != "
                         f"{ys.shape[0]} rows.")
    n = xs.shape[0]
    if labels is not None and len(labels) != n:
        raise ValueError(f"labels has {len(labels)} entries for {n} items.")
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


def _centered(x: Tensor) -> Tensor:
    return x - x.mean(0, keepdim=True)


def _hsic_unbiased(k: Tensor, l_: Tensor) -> Tensor:
    """Unbiased HSIC estimator (Song et al. 2012) on Gram matrices with zeroed diagonals."""
    n = k.shape[0]
    k = k.clone().fill_diagonal_(0)
    l_ = l_.clone().fill_diagonal_(0)
    ones = torch.ones(n, 1, dtype=k.dtype)
    kl = k @ l_
    trace = torch.trace(kl)
    middle = (ones.T @ k @ ones) * (ones.T @ l_ @ ones) / ((n - 1) * (n - 2))
    last = 2 * (ones.T @ kl @ ones) / (n - 2)
    return (trace + middle.squeeze() - last.squeeze()) / (n * (n - 3))


def linear_cka(x: ArrayLike, y: ArrayLike, *, debiased: bool = False) -> float:
    """Linear centred kernel alignment between two representations of the same items.

    ``CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred ``Xc, Yc``
    (Kornblith et al. 2019): 1 for representations equal up to rotation and isotropic scaling,
    near 0 for unrelated ones.  ``debiased=True`` uses the unbiased HSIC estimator, which
    corrects the upward bias for few items (needs at least 4).

    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(50, 8))
    >>> rotation = np.linalg.qr(np.random.default_rng(1).normal(size=(8, 8)))[0]
    >>> round(linear_cka(x, 3 * x @ rotation), 6)
    1.0
    """
    xs, ys = _as_matrix(x, "x"), _as_matrix(y, "y")
    if xs.shape[0] != ys.shape[0]:
        raise ValueError(f"x and y must hold the same items: {xs.shape[0]} rows != "
                         f"{ys.shape[0]} rows.")
    xs, ys = xs.double(), ys.double()
    if debiased:
        if xs.shape[0] < 4:
            raise ValueError("debiased CKA needs at least 4 items.")
        kx, ky = xs @ xs.T, ys @ ys.T
        hxy, hxx, hyy = _hsic_unbiased(kx, ky), _hsic_unbiased(kx, kx), _hsic_unbiased(ky, ky)
        return float(hxy / torch.sqrt(hxx * hyy))
    xc, yc = _centered(xs), _centered(ys)
    num = torch.linalg.matrix_norm(yc.T @ xc) ** 2
    den = torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc)
    if float(den) == 0:
        raise ValueError("CKA is undefined for a constant representation (all rows equal).")
    return float(num / den)


def rsa(x: ArrayLike, y: ArrayLike, *, metric: str = "cosine", method: str = "spearman") -> float:
    """Representational similarity analysis: the rank (or linear) correlation between the
    condensed pairwise distance matrices of two representations of the same items.

    ``metric`` is any ``scipy.spatial.distance.pdist`` metric; ``method`` is ``"spearman"``,
    ``"pearson"`` or ``"kendall"``.

    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(20, 5))
    >>> round(rsa(x, 2 * x), 6)
    1.0
    """
    from scipy.spatial.distance import pdist
    from scipy.stats import kendalltau, pearsonr, spearmanr

    tests = {"spearman": spearmanr, "pearson": pearsonr, "kendall": kendalltau}
    if method not in tests:
        raise ValueError(f"method must be one of {sorted(tests)}, got {method!r}.")
    xs, ys = _as_matrix(x, "x"), _as_matrix(y, "y")
    if xs.shape[0] != ys.shape[0]:
        raise ValueError(f"x and y must hold the same items: {xs.shape[0]} rows != "
                         f"{ys.shape[0]} rows.")
    if xs.shape[0] < 3:
        raise ValueError("rsa needs at least 3 items (2 pairwise distances to correlate).")
    dx, dy = pdist(xs.double().numpy(), metric), pdist(ys.double().numpy(), metric)
    return float(tests[method](dx, dy)[0])


def similarity_matrix(reps: Mapping[str, ArrayLike] | Any, method: str = "cka",
                      **kwargs: Any) -> pd.DataFrame:
    """Pairwise representational similarity of several representations of the same items.

    Parameters
    ----------
    reps : mapping of name -> (n, d) array, or a Recording
        For a recording, every capture must be per-example vectors (2-D); use
        ``hookscope.frame.recording_vectors(rec, reduce=...)`` for sequence outputs.
    method : {"cka", "cka_debiased", "rsa"}
        ``kwargs`` go to :func:`rsa` (``metric``, ``method``... as ``rsa_method``).

    Returns
    -------
    pandas.DataFrame
        Symmetric, names on both axes.
    """
    if not isinstance(reps, Mapping):
        from .frame import recording_vectors

        reps = recording_vectors(reps)
    if method not in ("cka", "cka_debiased", "rsa"):
        raise ValueError(f"method must be 'cka', 'cka_debiased' or 'rsa', got {method!r}.")
    if "rsa_method" in kwargs:
        kwargs["method"] = kwargs.pop("rsa_method")
    names = list(reps)
    mats = {n: _as_matrix(reps[n], f"reps[{n!r}]") for n in names}
    out = np.eye(len(names))
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            b = names[j]
            if method == "rsa":
                v = rsa(mats[a], mats[b], **kwargs)
            else:
                v = linear_cka(mats[a], mats[b], debiased=method == "cka_debiased")
            out[i, j] = out[j, i] = v
    return pd.DataFrame(out, index=pd.Index(names, name="a"), columns=pd.Index(names, name="b"))

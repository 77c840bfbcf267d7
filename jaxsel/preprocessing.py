"""Preprocessing recipes used by the papers jaxsel reimplements.

Numpy / scipy.sparse in and out; no JAX. The MarkerMap recipe (Gregory et al.
2024, and the ``markermap`` package's data loaders) is

1. keep genes detected in at least ``min_fraction`` of the cells of at least
   one cell type (:func:`filter_genes_by_group_presence`);
2. scale every cell to 1e4 total counts (:func:`normalize_total`, scanpy's
   ``normalize_per_cell(counts_per_cell_after=1e4)``);
3. ``log1p`` (:func:`log1p`);
4. standardise every gene and clip at 10 (:func:`scale`, scanpy's
   ``scale(max_value=10)``).

:func:`markermap_recipe` chains them. Data splits for training and evaluation
(:func:`split_indices`, :func:`kfold_indices`) are here too, as plain index
arrays.

No function modifies its input.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from jaxsel._validation import (
    _DEFAULT_MAX_DENSE_BYTES,
    check_cast_range,
    check_indices,
    check_labels,
    check_matrix,
    check_random_state,
    to_dense,
)

__all__ = [
    "filter_genes_by_group_presence",
    "filter_general_genes",
    "normalize_total",
    "log1p",
    "scale",
    "markermap_recipe",
    "sbnn_recipe",
    "log_normalize",
    "stai_recipe",
    "pretraining_clusters",
    "spatial_knn_graph",
    "split_indices",
    "kfold_indices",
]


# --------------------------------------------------------------------------- helpers


def _check_fraction(value, name: str, *, low: float = 0.0, high: float = 1.0) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [{low}, {high}], got {value!r}.")
    value = float(value)
    if not (low <= value <= high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}.")
    return value


def _check_nonnegative(x, name: str) -> None:
    values = x.data if sp.issparse(x) else x
    if values.size and values.min() < 0:
        raise ValueError(
            f"{name} must be non-negative (counts or normalised counts), found minimum "
            f"{values.min()}; was it already log-transformed or scaled?"
        )


def _group_detection(x, labels):
    """Per-group count of cells with x > 0, and group sizes.

    Returns
    -------
    detected : numpy.ndarray of int64, shape [n_groups, n_genes]
    sizes : numpy.ndarray of int64, shape [n_groups]
    """
    x = check_matrix(x, name="x", dtype=None)
    codes, classes = check_labels(labels, x.shape[0], name="labels", min_classes=1)
    if sp.issparse(x):
        x = x.tocsr()
    detected = np.zeros((classes.shape[0], x.shape[1]), dtype=np.int64)
    for g in range(classes.shape[0]):
        rows = np.flatnonzero(codes == g)
        block = x[rows]
        detected[g] = np.asarray((block > 0).sum(axis=0)).reshape(-1)
    sizes = np.bincount(codes, minlength=classes.shape[0]).astype(np.int64)
    return detected, sizes


# --------------------------------------------------------------------------- gene filters


def filter_genes_by_group_presence(x, labels, min_fraction: float = 0.3) -> np.ndarray:
    """Keep genes detected in a minimum fraction of the cells of some group.

    A gene is kept if, in at least one label group, the number of cells with
    ``x > 0`` is ``>= min_fraction * group_size``. This is the per-cell-type
    filter of the MarkerMap package (``remove_features_pct``, which calls
    ``scanpy.pp.filter_genes(min_cells=pct * n_group)`` per group).

    Parameters
    ----------
    x : array-like or sparse, shape [n_cells, n_genes]
        Expression (counts or any non-negative values).
    labels : array-like, shape [n_cells]
        Group (cell-type) labels.
    min_fraction : float, default 0.3
        Fraction of a group's cells, in ``[0, 1]``.

    Returns
    -------
    numpy.ndarray of bool, shape [n_genes]
        True for genes to keep.
    """
    min_fraction = _check_fraction(min_fraction, "min_fraction")
    detected, sizes = _group_detection(x, labels)
    return np.any(detected >= min_fraction * sizes[:, None], axis=0)


def filter_general_genes(
    x, labels, detected_fraction: float = 0.9, max_group_fraction: float = 0.5
) -> np.ndarray:
    """Drop genes expressed almost everywhere (house-keeping-like genes).

    A gene counts as *general* in a group when it is detected (``x > 0``) in
    ``>= detected_fraction`` of that group's cells; it is dropped when it is
    general in ``>= max_group_fraction`` of the groups. This is the MarkerMap
    package's ``remove_features_pct_2groups``.

    Parameters
    ----------
    x : array-like or sparse, shape [n_cells, n_genes]
    labels : array-like, shape [n_cells]
    detected_fraction : float, default 0.9
        In ``[0, 1]``.
    max_group_fraction : float, default 0.5
        In ``[0, 1]``.

    Returns
    -------
    numpy.ndarray of bool, shape [n_genes]
        True for genes to keep.
    """
    detected_fraction = _check_fraction(detected_fraction, "detected_fraction")
    max_group_fraction = _check_fraction(max_group_fraction, "max_group_fraction")
    detected, sizes = _group_detection(x, labels)
    general_in = detected >= detected_fraction * sizes[:, None]
    return general_in.mean(axis=0) < max_group_fraction


# --------------------------------------------------------------------------- transforms


def _scale_rows(x, factors: np.ndarray):
    """Multiply row i of x by factors[i]; sparse stays sparse (CSR or CSC)."""
    factors = factors.astype(np.float32)
    if sp.issparse(x):
        out = x.astype(np.float32, copy=True)
        out.sum_duplicates()
        if out.format == "csr":
            out.data *= np.repeat(factors, np.diff(out.indptr))
        else:  # csc (check_matrix converts every other format to csr)
            out.data *= factors[out.indices]
        return out
    return (x * factors[:, None]).astype(np.float32, copy=False)


def normalize_total(x, target_sum: float | None = 1e4):
    """Scale every cell to the same total count.

    Equivalent to scanpy's ``normalize_total(target_sum=...)`` and, for the
    MarkerMap recipe, ``normalize_per_cell(counts_per_cell_after=1e4)``.
    Unlike ``normalize_per_cell``, cells with zero total are kept (as rows of
    zeros, never NaN) so that the output rows match the input rows.

    Parameters
    ----------
    x : array-like or sparse, shape [n_cells, n_genes]
        Non-negative counts.
    target_sum : float or None, default 1e4
        Total of every cell after scaling. ``None`` uses the median of the
        non-zero cell totals (as scanpy does).

    Returns
    -------
    numpy.ndarray or sparse, shape [n_cells, n_genes], float32
        Same sparse format as the input for sparse input, dense otherwise.
    """
    fmt = x.format if sp.issparse(x) else None
    x = check_matrix(x, name="x", dtype=None)
    _check_nonnegative(x, "x")
    out = _scale_rows(x, _total_factors(_row_totals(x), target_sum))
    return out.asformat(fmt) if fmt is not None else out


def _row_totals(x) -> np.ndarray:
    """Every row's sum, float64 ``[n_rows]`` (what :func:`normalize_total` divides by)."""
    return np.asarray(x.sum(axis=1, dtype=np.float64)).reshape(-1)


def _total_factors(totals: np.ndarray, target_sum) -> np.ndarray:
    """Per-row factors scaling rows with these ``totals`` to ``target_sum`` (``None``:
    the median non-zero total); rows with zero total get 0."""
    if target_sum is None:
        nonzero = totals[totals > 0]
        target = float(np.median(nonzero)) if nonzero.size else 1.0
    else:
        if isinstance(target_sum, (bool, np.bool_)) or not isinstance(target_sum, numbers.Real):
            raise TypeError(f"target_sum must be a positive float or None, got {target_sum!r}.")
        target = float(target_sum)
        if not (target > 0 and np.isfinite(target)):
            raise ValueError(f"target_sum must be a positive finite float, got {target_sum}.")
    factors = np.zeros_like(totals)
    np.divide(target, totals, out=factors, where=totals > 0)
    return factors


def log1p(x, base: float | None = None):
    """Natural ``log(1 + x)``, or ``log_base(1 + x)`` when ``base`` is given.

    Parameters
    ----------
    x : array-like or sparse, shape [n_cells, n_genes]
        Non-negative values (typically normalised counts).
    base : float, optional
        Logarithm base; the sBNN paper uses ``base=2``.

    Returns
    -------
    numpy.ndarray or sparse, float32
        Same sparse format as the input for sparse input, dense otherwise.
    """
    fmt = x.format if sp.issparse(x) else None
    x = check_matrix(x, name="x", dtype=None)
    _check_nonnegative(x, "x")
    if base is not None:
        if isinstance(base, (bool, np.bool_)) or not isinstance(base, numbers.Real):
            raise TypeError(f"base must be a positive float other than 1, or None; got {base!r}.")
        if not (base > 0 and base != 1 and np.isfinite(base)):
            raise ValueError(f"base must be a positive finite float other than 1, got {base}.")
    divisor = 1.0 if base is None else np.log(float(base))
    if sp.issparse(x):
        out = x.astype(np.float32, copy=True)
        out.data = (np.log1p(x.data.astype(np.float64)) / divisor).astype(np.float32)
        return out.asformat(fmt)
    return (np.log1p(x.astype(np.float64)) / divisor).astype(np.float32)


def scale(
    x,
    max_value: float | None = 10.0,
    zero_center: bool = True,
    *,
    mean=None,
    std=None,
    max_dense_bytes: int = _DEFAULT_MAX_DENSE_BYTES,
):
    """Standardise every gene to zero mean and unit variance, then clip.

    Follows scanpy's ``pp.scale``: the standard deviation is the unbiased one
    (``ddof=1``), a zero standard deviation is replaced by 1, and values are
    clipped to ``[-max_value, max_value]``.

    Parameters
    ----------
    x : array-like or sparse, shape [n_cells, n_genes]
    max_value : float or None, default 10.0
        Clip bound; ``None`` disables clipping.
    zero_center : bool, default True
        Subtract the mean. If False only divide by the standard deviation.
    mean, std : array-like, shape [n_genes], optional
        Statistics to apply instead of computing them from ``x`` (for
        example the training set's, to scale held-out cells without
        leakage). Give both or neither.
    max_dense_bytes : int, default 2**31
        Size guard for densifying sparse input.

    Returns
    -------
    x_scaled : numpy.ndarray of float32, shape [n_cells, n_genes]
        Always dense.
    mean : numpy.ndarray of float32, shape [n_genes]
    std : numpy.ndarray of float32, shape [n_genes]
        After replacing zeros by 1.
    """
    x = check_matrix(x, name="x", dtype=None)
    if max_value is not None:
        if isinstance(max_value, (bool, np.bool_)) or not isinstance(max_value, numbers.Real):
            raise TypeError(f"max_value must be a positive float or None, got {max_value!r}.")
        if not max_value > 0:
            raise ValueError(f"max_value must be positive, got {max_value}.")
    n_cells, n_genes = x.shape
    if (mean is None) != (std is None):
        raise ValueError("mean and std must be given together (or neither).")
    if mean is None:
        if n_cells < 2:
            raise ValueError(
                f"x needs at least 2 cells to estimate a standard deviation, got {n_cells}; "
                f"pass mean and std computed on more cells."
            )
        if sp.issparse(x):
            # two-pass, as the dense path: E[x^2] - E[x]^2 leaves rounding noise on
            # constant genes, which the division would blow up
            mean64, ss = sparse_mean_ss(x)
            var64 = ss / (n_cells - 1)
        else:
            mean64 = np.mean(x, axis=0, dtype=np.float64)
            var64 = np.var(x, axis=0, ddof=1, dtype=np.float64)
        std64 = np.sqrt(var64)
        std64[std64 == 0] = 1.0
    else:
        try:
            mean64 = np.asarray(mean, dtype=np.float64).reshape(-1)
            std64 = np.asarray(std, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as err:
            raise TypeError(f"mean and std must be numeric vectors of shape [n_genes] ({err}).") from err
        for arr, nm in ((mean64, "mean"), (std64, "std")):
            if arr.shape != (n_genes,):
                raise ValueError(f"{nm} must have shape [n_genes]=({n_genes},), got {arr.shape}.")
            if not np.isfinite(arr).all():
                raise ValueError(f"{nm} contains NaN or infinite values.")
        if (std64 <= 0).any():
            raise ValueError("std must be strictly positive (replace zeros by 1).")
    dense = to_dense(x, max_dense_bytes=max_dense_bytes, name="x")
    if zero_center:
        out = (dense - mean64) / std64
    else:
        out = dense / std64
    if max_value is not None:
        np.clip(out, -float(max_value), float(max_value), out=out)
    return out.astype(np.float32), mean64.astype(np.float32), std64.astype(np.float32)


def markermap_recipe(
    x,
    labels=None,
    *,
    min_fraction: float | None = None,
    target_sum: float | None = 1e4,
    max_value: float | None = 10.0,
    max_dense_bytes: int = _DEFAULT_MAX_DENSE_BYTES,
):
    """The MarkerMap paper's preprocessing: filter, normalise, log1p, scale.

    Parameters
    ----------
    x : array-like or sparse, shape [n_cells, n_genes]
        Raw counts.
    labels : array-like, shape [n_cells], optional
        Cell types, needed for the gene filter.
    min_fraction : float, optional
        If given (with ``labels``), first keep only genes detected in at least
        this fraction of the cells of some cell type
        (:func:`filter_genes_by_group_presence`; the paper uses 0.3).
    target_sum : float or None, default 1e4
        See :func:`normalize_total`.
    max_value : float or None, default 10.0
        See :func:`scale`.
    max_dense_bytes : int, default 2**31
        Size guard for the dense output.

    Returns
    -------
    x_processed : numpy.ndarray of float32, shape [n_cells, n_kept_genes]
    gene_mask : numpy.ndarray of bool, shape [n_genes]
        Genes kept by the filter (all True without a filter).
    """
    x = check_matrix(x, name="x", dtype=None)
    if min_fraction is not None:
        if labels is None:
            raise ValueError("min_fraction needs labels (one cell type per cell); got labels=None.")
        gene_mask = filter_genes_by_group_presence(x, labels, min_fraction=min_fraction)
        if not gene_mask.any():
            raise ValueError(
                f"No gene passes the group-presence filter with min_fraction={min_fraction}."
            )
        x = x[:, np.flatnonzero(gene_mask)]
    else:
        if labels is not None:
            check_labels(labels, x.shape[0], name="labels", min_classes=1)
        gene_mask = np.ones(x.shape[1], dtype=bool)
    x = normalize_total(x, target_sum=target_sum)
    x = log1p(x)
    x, _, _ = scale(x, max_value=max_value, max_dense_bytes=max_dense_bytes)
    return x, gene_mask


def sbnn_recipe(x, y=None, *, max_dense_bytes: int = _DEFAULT_MAX_DENSE_BYTES):
    """The sparse bottleneck paper's preprocessing of paired data ``X -> Y``.

    Counts are scaled to the median cell total (``x / sum * median(sum)``), then
    ``log2(x + 1)``, then every gene is standardised to zero mean and unit SD over all
    cells (population SD, ``np.std``, as the authors' code; :func:`scale` uses ddof 1); every column of ``y`` is standardised the same way (Bernaerts et al. 2022;
    Kobak et al. 2021). Constant genes are left at zero instead of dividing by zero.

    Parameters
    ----------
    x : array-like or sparse, shape [n_cells, n_genes]; raw counts.
    y : array-like, shape [n_cells, n_features], optional; the paired modality
        (must be finite).

    Returns
    -------
    x_processed : numpy.ndarray float32 [n_cells, n_genes]
    y_processed : numpy.ndarray float32 [n_cells, n_features] (only when ``y`` is given)
    """
    x = check_matrix(x, name="x", dtype=None)
    x = log1p(normalize_total(x, target_sum=None), base=2)
    x = to_dense(x, max_dense_bytes, name="x", dtype=np.float64)
    x = _standardise(x)
    if y is None:
        return x
    y = check_matrix(y, name="y", dtype=np.float64, allow_sparse=False)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"x and y must have the same number of cells, got {x.shape[0]} and {y.shape[0]}.")
    if not np.all(np.isfinite(y)):
        raise ValueError("y contains NaN or infinite values; impute or drop those cells first.")
    return x, _standardise(y)


def log_normalize(x, *, counts: bool = True, target_sum: float = 1e4, name: str = "x",
                  max_dense_bytes: int = _DEFAULT_MAX_DENSE_BYTES, columns=None, totals=None):
    """``log1p(normalize_total(x, target_sum))`` as a dense float32 array when ``counts``
    (non-negative values required), else ``x`` as given (already log-normalised: only
    finiteness is checked). The stAI recipe's per-dataset step.

    ``columns`` (integer indices): only these columns of the result, computed without
    densifying the others; equal, bit for bit, to ``log_normalize(x)[:, columns]``.
    ``totals`` (float64 ``[n_rows]``, e.g. from a pass over a file on disk,
    :func:`jaxsel.streaming.read_columns`): the cells' totals over *all* their genes,
    when ``x`` holds only some of them; default: ``x``'s row sums.
    """
    x = check_matrix(x, name=name, dtype=None)
    if totals is not None:
        totals = np.asarray(totals)
        if totals.shape != (x.shape[0],):
            raise ValueError(f"totals must have one value per row of {name} ({x.shape[0]}), got shape "
                             f"{totals.shape}.")
        valid = totals.dtype.kind in "iuf" and np.isfinite(totals).all() and (totals >= 0).all()
        if not valid:
            raise ValueError("totals must hold finite, non-negative row sums.")
        totals = totals.astype(np.float64)
    if columns is not None:
        columns = check_indices(columns, x.shape[1], "columns", what="column")
    if counts:
        _check_nonnegative(x, name)
        factors = _total_factors(_row_totals(x) if totals is None else totals, target_sum)
        x = log1p(_scale_rows(x if columns is None else x[:, columns], factors))
    elif columns is not None:
        x = x[:, columns]
    check_cast_range(x, np.float32, name)
    return to_dense(x, max_dense_bytes, name=name, dtype=np.float32)


def stai_recipe(x_spatial, ref_log, *, counts: bool = True, target_sum: float = 1e4, max_value: float = 10.0,
                max_dense_bytes: int = _DEFAULT_MAX_DENSE_BYTES):
    """stAI's inputs on the genes the model sees: ``(x1, x2)``, both float32.

    ``x_spatial`` [n_spatial, G] holds the spatial cells' raw values of those genes; it is
    normalised to ``target_sum`` per cell over *these* genes and ``log1p``'d (when
    ``counts``; else taken as log-normalised). ``ref_log`` [n_ref, G] is the reference's
    log-normalised expression of the same genes, normalised over *all* its genes as the
    released code does (``log_normalize(x_ref)[:, genes]``). Each dataset's genes are then
    standardised and clipped at ``max_value`` (:func:`scale`, scanpy's
    ``scale(max_value=10)``).
    """
    x1 = log_normalize(x_spatial, counts=counts, target_sum=target_sum, name="x_spatial",
                       max_dense_bytes=max_dense_bytes)
    ref_log = check_matrix(ref_log, name="ref_log", dtype=np.float32, allow_sparse=False)
    if x1.shape[1] != ref_log.shape[1]:
        raise ValueError(
            f"x_spatial and ref_log must have the same genes (columns), got {x1.shape[1]} and {ref_log.shape[1]}."
        )
    return scale(x1, max_value=max_value)[0], scale(ref_log, max_value=max_value)[0]


def sparse_mean_ss(x):
    """Per-gene mean and sum of squared deviations of a sparse ``[n_cells, n_genes]``
    matrix in float64, two-pass over the stored values (the zeros counted apart):
    stable, unlike ``E[x^2] - E[x]^2``, which leaves rounding noise on constant genes."""
    x64 = x.tocsr().astype(np.float64, copy=True)
    x64.sum_duplicates()
    n, g = x64.shape
    mean = np.bincount(x64.indices, weights=x64.data, minlength=g) / n
    dev = x64.data - mean[x64.indices]
    n_zero = n - np.bincount(x64.indices, minlength=g)
    return mean, np.bincount(x64.indices, weights=dev * dev, minlength=g) + n_zero * mean**2


def _standardise(a):
    """Zero mean, unit population SD (``np.std``, ddof 0, as the papers' code) per column;
    constant columns become zero. float64 in, float32 out."""
    sd = a.std(axis=0)
    return ((a - a.mean(axis=0)) / np.where(sd > 0, sd, 1.0)).astype(np.float32)


def pretraining_clusters(
    y,
    train_sets,
    *,
    n_clusters: int = 20,
    min_cluster_size: int = 10,
    val_fraction: float = 0.4,
    n_init: int = 10,
    random_state=0,
):
    """Per-fold k-means labels of ``Y`` and the pre-training train / held-out cells.

    The sparse bottleneck paper pre-trains its network as a classifier of k-means
    clusters of ``Y``. For each fold, k-means (scikit-learn, ``n_init`` restarts) runs
    on that fold's training cells only; cells in clusters with fewer than
    ``min_cluster_size`` training cells are left out of pre-training; the remaining
    training cells are shuffled and ``val_fraction`` of them held out for early
    stopping (the paper's 60/40 split).

    Parameters
    ----------
    y : array-like [n_cells, n_features]
    train_sets : list of int index arrays, one per fold (the regression training cells).

    Returns
    -------
    clusters : int32 [n_folds, n_cells] (label -1 for cells outside a fold's training set)
    pre_train, pre_val : lists of int64 index arrays (one per fold)
    """
    from sklearn.cluster import KMeans

    y = check_matrix(y, name="y", dtype=np.float64, allow_sparse=False)
    if isinstance(n_clusters, (bool, np.bool_)) or not isinstance(n_clusters, numbers.Integral) or n_clusters < 2:
        raise ValueError(f"n_clusters must be an integer >= 2, got {n_clusters!r}.")
    val_fraction = _check_fraction(val_fraction, "val_fraction")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    for pname, value in (("min_cluster_size", min_cluster_size), ("n_init", n_init)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{pname} must be a positive int, got {value!r}.")
        if value < 1:
            raise ValueError(f"{pname} must be a positive int, got {value}.")
    train_sets = [check_indices(t, y.shape[0], f"train_sets[{i}]") for i, t in enumerate(train_sets)]
    seed = check_random_state(random_state)
    rng = np.random.default_rng(seed)
    clusters = np.full((len(train_sets), y.shape[0]), -1, dtype=np.int32)
    pre_train, pre_val = [], []
    fitted = {}  # restarts share their training cells: one k-means per distinct set
    for i, train in enumerate(train_sets):
        if train.shape[0] < n_clusters:
            raise ValueError(
                f"fold {i} has {train.shape[0]} training cells, fewer than n_clusters={n_clusters}."
            )
        key = train.tobytes()
        if key not in fitted:
            km = KMeans(n_clusters=int(n_clusters), n_init=n_init, random_state=seed).fit(y[train])
            fitted[key] = km.labels_.astype(np.int32)
        labels = fitted[key]
        clusters[i, train] = labels
        sizes = np.bincount(labels, minlength=n_clusters)
        keep = train[sizes[labels] >= min_cluster_size]
        if keep.shape[0] < 2:
            raise ValueError(
                f"fold {i}: no k-means cluster has min_cluster_size={min_cluster_size} cells; "
                "lower min_cluster_size or n_clusters."
            )
        keep = keep[rng.permutation(keep.shape[0])]
        n_tr = int(round(keep.shape[0] * (1.0 - val_fraction)))
        n_tr = min(max(n_tr, 1), keep.shape[0] - 1)
        pre_train.append(np.sort(keep[:n_tr]))
        pre_val.append(np.sort(keep[n_tr:]))
    return clusters, pre_train, pre_val


def spatial_knn_graph(coords, k: int = 10):
    """The spatial kNN graph as a dense neighbour table, ``int32 [n_cells, k + 1]``.

    Row ``i`` holds cell ``i`` itself (column 0) and then its ``k`` nearest other cells by
    Euclidean distance of ``coords`` [n_cells, 2 or 3], nearest first (ties by index).
    This is the form :class:`jaxsel.nn.gat.GATConv` reads (self-loops included, as
    PyTorch Geometric adds them). Duplicate coordinates are allowed.
    """
    from sklearn.neighbors import NearestNeighbors

    coords = check_matrix(coords, name="coords", dtype=np.float64, allow_sparse=False)
    if not np.all(np.isfinite(coords)):
        raise ValueError("coords contains NaN or infinite values.")
    n = coords.shape[0]
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    if k >= n:
        raise ValueError(f"k ({k}) must be smaller than the number of cells ({n}).")
    nn_ = NearestNeighbors(n_neighbors=int(k) + 1).fit(coords)
    _, idx = nn_.kneighbors(coords)
    out = idx.astype(np.int32)
    # Rows where the query cell is not listed first (duplicate coordinates): put it first,
    # followed by its k nearest other cells.
    for i in np.flatnonzero(out[:, 0] != np.arange(n)):
        _, j = nn_.kneighbors(coords[i : i + 1], n_neighbors=min(n, k + 2))
        others = [b for b in j[0] if b != i][:k]
        out[i] = [i, *others]
    return out


# --------------------------------------------------------------------------- splits


def _n_and_labels(n_or_labels, *, need_labels: bool):
    """Return (n, codes or None) from an int or a label vector."""
    if isinstance(n_or_labels, numbers.Integral) and not isinstance(n_or_labels, (bool, np.bool_)):
        n = int(n_or_labels)
        if n < 1:
            raise ValueError(f"n_or_labels as a number of cells must be >= 1, got {n}.")
        if need_labels:
            raise ValueError(
                "stratify=True needs labels: pass the label vector as n_or_labels, not an int."
            )
        return n, None
    if isinstance(n_or_labels, (bool, np.bool_, numbers.Real)):
        raise TypeError(
            f"n_or_labels must be an int (number of cells) or a label vector, got {n_or_labels!r}."
        )
    codes, _ = check_labels(n_or_labels, None, name="n_or_labels", min_classes=1)
    if codes.shape[0] == 0:
        raise ValueError("n_or_labels must not be empty.")
    return codes.shape[0], codes


def _check_fractions(fractions) -> np.ndarray:
    if isinstance(fractions, (str, bytes)) or not isinstance(fractions, (Sequence, np.ndarray)):
        raise TypeError(f"fractions must be a sequence of floats, got {fractions!r}.")
    fr = np.asarray(fractions, dtype=np.float64).reshape(-1)
    if fr.size < 1:
        raise ValueError("fractions must contain at least one value.")
    if not np.isfinite(fr).all() or (fr < 0).any():
        raise ValueError(f"fractions must be non-negative finite floats, got {list(fractions)}.")
    if abs(fr.sum() - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {list(fractions)} (sum {fr.sum():.6g}).")
    return fr


def _split_sizes(n: int, fr: np.ndarray) -> np.ndarray:
    sizes = np.array([int(f * n) for f in fr[:-1]] + [0], dtype=np.int64)
    sizes[-1] = n - sizes[:-1].sum()
    if sizes[-1] < 0:  # float rounding can only push this to -0; guard anyway
        raise ValueError(f"fractions {fr.tolist()} do not fit {n} cells.")
    return sizes


def _stratified_allocation(class_sizes: np.ndarray, split_sizes: np.ndarray) -> np.ndarray:
    """Integer [n_classes, n_splits] table with the given row and column sums.

    Rounds the proportional table ``class_sizes * split_sizes / n`` by largest
    remainders, then moves cells so that every class has at least one cell in
    split 0 (train) where the train split is large enough.
    """
    n = class_sizes.sum()
    target = class_sizes[:, None] * split_sizes[None, :] / n
    alloc = np.floor(target).astype(np.int64)
    row_need = class_sizes - alloc.sum(axis=1)
    col_need = split_sizes - alloc.sum(axis=0)
    order = np.argsort(-(target - alloc).reshape(-1), kind="stable")
    n_splits = split_sizes.shape[0]
    while row_need.sum() > 0:
        for flat in order:
            c, s = divmod(int(flat), n_splits)
            if row_need[c] > 0 and col_need[s] > 0:
                alloc[c, s] += 1
                row_need[c] -= 1
                col_need[s] -= 1
    # Every class at least once in train, when the train split allows it.
    for c in np.flatnonzero((alloc[:, 0] == 0) & (class_sizes > 0)):
        donors = np.flatnonzero(alloc[:, 0] >= 2)
        if donors.size == 0:
            break
        donor = donors[np.argmax(alloc[donors, 0])]
        s = int(np.argmax(alloc[c, 1:])) + 1
        alloc[c, 0] += 1
        alloc[c, s] -= 1
        alloc[donor, 0] -= 1
        alloc[donor, s] += 1
    return alloc


def _stratified_split(codes: np.ndarray, sizes: np.ndarray, rng: np.random.Generator):
    n_classes = int(codes.max()) + 1
    class_sizes = np.bincount(codes, minlength=n_classes)
    alloc = _stratified_allocation(class_sizes, sizes)
    parts = [[] for _ in sizes]
    for c in range(n_classes):
        members = rng.permutation(np.flatnonzero(codes == c))
        bounds = np.concatenate([[0], np.cumsum(alloc[c])])
        for s in range(sizes.shape[0]):
            parts[s].append(members[bounds[s] : bounds[s + 1]])
    return [np.concatenate(p) for p in parts]


def split_indices(
    n_or_labels,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    random_state=0,
    stratify: bool = False,
):
    """Random disjoint train / validation / test index sets.

    Parameters
    ----------
    n_or_labels : int or array-like, shape [n_cells]
        The number of cells, or their labels (needed for ``stratify``).
    fractions : sequence of float, default (0.7, 0.1, 0.2)
        Fraction of cells per split; must sum to 1. Every split but the last
        gets ``int(fraction * n_cells)`` cells and the last gets the rest, as
        in the MarkerMap package's ``split_data``. Any number of splits is
        allowed.
    random_state : int, numpy Generator or None, default 0
        Seed of the shuffle.
    stratify : bool, default False
        Keep class proportions in every split (largest-remainder rounding),
        and put at least one cell of every class into the first (train)
        split whenever it has room for one cell per class.

    Returns
    -------
    tuple of numpy.ndarray of int64
        One sorted index array per fraction; together they are a partition
        of ``range(n_cells)``.
    """
    n, codes = _n_and_labels(n_or_labels, need_labels=stratify)
    fr = _check_fractions(fractions)
    rng = np.random.default_rng(check_random_state(random_state))
    sizes = _split_sizes(n, fr)
    if stratify:
        parts = _stratified_split(codes, sizes, rng)
    else:
        perm = rng.permutation(n)
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        parts = [perm[bounds[i] : bounds[i + 1]] for i in range(sizes.shape[0])]
    return tuple(np.sort(p).astype(np.int64) for p in parts)


def kfold_indices(
    n_or_labels,
    n_folds: int,
    random_state=0,
    stratify: bool = False,
    validation_fraction: float = 0.0,
):
    """Cross-validation folds as (train, val, test) index arrays.

    The cells are shuffled and dealt into ``n_folds`` test folds whose sizes
    differ by at most one. With ``stratify`` the cells of every class are
    dealt round-robin, so each fold holds each class in (almost) the same
    proportion. For fold ``i`` the test set is fold ``i``; the other cells
    are the training set, from which a validation set is
    carved out as a validation set: the training set keeps
    ``int((1 - validation_fraction) * n_rest)`` of them and the validation set
    the rest (stratified when ``stratify``).

    Parameters
    ----------
    n_or_labels : int or array-like, shape [n_cells]
    n_folds : int
        At least 2 and at most ``n_cells``.
    random_state : int, numpy Generator or None, default 0
    stratify : bool, default False
    validation_fraction : float, default 0.0
        In ``[0, 1)``, a fraction of the non-test cells.

    Returns
    -------
    list of tuple (train, val, test) of numpy.ndarray of int64
        ``n_folds`` entries; sorted indices; ``val`` is empty when
        ``validation_fraction == 0``. The test folds partition
        ``range(n_cells)``.
    """
    n, codes = _n_and_labels(n_or_labels, need_labels=stratify)
    if isinstance(n_folds, (bool, np.bool_)) or not isinstance(n_folds, numbers.Integral):
        raise TypeError(f"n_folds must be an int >= 2, got {n_folds!r}.")
    n_folds = int(n_folds)
    if not 2 <= n_folds <= n:
        raise ValueError(f"n_folds must be in [2, n_cells={n}], got {n_folds}.")
    validation_fraction = _check_fraction(validation_fraction, "validation_fraction")
    if validation_fraction >= 1.0:
        raise ValueError(f"validation_fraction must be < 1, got {validation_fraction}.")
    rng = np.random.default_rng(check_random_state(random_state))
    perm = rng.permutation(n)
    if stratify:
        # Group the shuffled cells by class (stable), then deal them round-robin.
        perm = perm[np.argsort(codes[perm], kind="stable")]
    fold_of = np.empty(n, dtype=np.int64)
    fold_of[perm] = np.arange(n) % n_folds
    folds = []
    for i in range(n_folds):
        test = np.flatnonzero(fold_of == i)
        rest = np.flatnonzero(fold_of != i)
        if validation_fraction > 0:
            sub_seed = int(rng.integers(0, 2**32 - 1))
            frac = (1.0 - validation_fraction, validation_fraction)
            if stratify:
                tr, va = split_indices(codes[rest], frac, random_state=sub_seed, stratify=True)
            else:
                tr, va = split_indices(rest.shape[0], frac, random_state=sub_seed)
            train, val = rest[tr], rest[va]
        else:
            train, val = rest, np.zeros(0, dtype=np.int64)
        folds.append((train.astype(np.int64), val.astype(np.int64), test.astype(np.int64)))
    return folds

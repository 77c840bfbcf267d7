"""Evaluation of selected markers, as in the MarkerMap paper.

Numpy and scikit-learn only. Markers are judged by how well a simple model
that sees only the marker columns

* classifies held-out cells (:func:`classification_scores`: a k-nearest-
  neighbour or random-forest classifier; accuracy, the paper's average
  misclassification rate, F1), and
* reconstructs the whole transcriptome of held-out cells
  (:func:`reconstruction_scores`: a linear regression from the markers to all
  genes; L1/L2 error and agreement of the highly variable genes).

:func:`evaluate_markers` runs both.

Spatial imputation and data integration are scored as in the gimVI paper
(Lopez et al. 2019): :func:`imputation_scores` (per-gene correlations and
errors of imputed genes), :func:`entropy_batch_mixing` (mixing of datasets in
a joint latent space, generalised to unbalanced datasets) and
:func:`knn_purity` (how well a joint latent space keeps each dataset's own
neighbourhoods).
"""

from __future__ import annotations

import numbers

import numpy as np
import scipy.sparse as sp
import scipy.stats
from sklearn.base import clone
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LinearRegression
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

from jaxsel._validation import (
    _DEFAULT_MAX_DENSE_BYTES,
    _is_missing,
    check_labels,
    check_matrix,
    check_random_state,
    to_dense,
)

__all__ = [
    "classification_scores",
    "reconstruction_scores",
    "evaluate_markers",
    "r2_score",
    "imputation_scores",
    "annotation_scores",
    "entropy_batch_mixing",
    "knn_purity",
]


def _check_pair(x_train, x_test):
    x_train = check_matrix(x_train, name="x_train", dtype=None)
    x_test = check_matrix(x_test, name="x_test", dtype=None)
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(
            f"x_train and x_test must have the same genes (columns), got "
            f"{x_train.shape[1]} and {x_test.shape[1]}."
        )
    # one sparse, one dense: make both sparse (CSR), which every consumer here accepts
    if sp.issparse(x_train) and not sp.issparse(x_test):
        x_test = sp.csr_matrix(x_test)
    elif sp.issparse(x_test) and not sp.issparse(x_train):
        x_train = sp.csr_matrix(x_train)
    return x_train, x_test


def _check_markers(markers, n_genes: int, *, allow_none: bool) -> np.ndarray | None:
    """Validate marker gene indices (or a boolean mask) into ``range(n_genes)``."""
    if markers is None:
        if allow_none:
            return None
        raise ValueError("markers must be an index array of gene columns, got None.")
    idx = np.asarray(markers)
    if idx.ndim != 1:
        raise ValueError(f"markers must be a 1-D array of gene indices, got shape {idx.shape}.")
    if idx.dtype == bool:
        if idx.shape[0] != n_genes:
            raise ValueError(
                f"markers given as a boolean mask must have length n_genes={n_genes}, "
                f"got {idx.shape[0]}."
            )
        idx = np.flatnonzero(idx)
    elif idx.size and idx.dtype.kind not in "iu":
        raise TypeError(f"markers must hold integer gene indices, got dtype {idx.dtype}.")
    if idx.size == 0:
        raise ValueError("markers must select at least one gene.")
    if idx.min() < 0 or idx.max() >= n_genes:
        raise ValueError(
            f"markers must be indices in [0, n_genes={n_genes}), got values from "
            f"{idx.min()} to {idx.max()}."
        )
    return idx.astype(np.int64)


def _make_classifier(classifier, random_state: int, n_neighbors: int, n_train: int):
    if isinstance(classifier, str):
        if classifier == "knn":
            return KNeighborsClassifier(n_neighbors=min(n_neighbors, n_train))
        if classifier == "rf":
            return RandomForestClassifier(random_state=random_state)
        raise ValueError(
            f"classifier must be 'knn', 'rf' or a scikit-learn classifier instance, "
            f"got {classifier!r}."
        )
    if not (hasattr(classifier, "fit") and hasattr(classifier, "predict")):
        raise TypeError(
            f"classifier must be 'knn', 'rf' or a scikit-learn classifier instance with "
            f"fit and predict, got {type(classifier).__name__}."
        )
    return clone(classifier)


def named_classifiers(classifiers) -> dict:
    """``classifiers`` of :func:`evaluate_markers` as ``{result key: classifier}``, each
    checked (a name it knows or an object with ``fit``/``predict``), so that a caller
    can refuse a bad one before training anything."""
    if isinstance(classifiers, dict):
        named = dict(classifiers)
    else:
        if isinstance(classifiers, str) or hasattr(classifiers, "fit"):
            classifiers = (classifiers,)
        if not hasattr(classifiers, "__iter__"):
            raise TypeError(
                f"classifiers must be a name ('knn', 'rf'), a scikit-learn classifier, or a "
                f"sequence or dict of them, got {classifiers!r}."
            )
        named = {}
        for clf in classifiers:
            key = clf if isinstance(clf, str) else type(clf).__name__
            if key in named:
                raise ValueError(f"classifiers contains {key!r} twice; pass a dict to name them.")
            named[key] = clf
    for clf in named.values():
        _make_classifier(clf, 0, 1, 1)
    return named


def classification_scores(
    x_train,
    y_train,
    x_test,
    y_test,
    markers=None,
    classifier="knn",
    random_state=0,
    n_neighbors: int = 5,
) -> dict:
    """Train a classifier on the marker columns and score it on held-out cells.

    Parameters
    ----------
    x_train : array-like or sparse, shape [n_train, n_genes]
    y_train : array-like, shape [n_train]
    x_test : array-like or sparse, shape [n_test, n_genes]
    y_test : array-like, shape [n_test]
        Labels of any sortable type; test labels unseen in training are
        allowed (they are always misclassified).
    markers : array-like of int or bool mask, optional
        Gene columns the classifier sees; ``None`` means all genes.
    classifier : {"knn", "rf"} or scikit-learn classifier, default "knn"
        ``"knn"``: ``KNeighborsClassifier(n_neighbors)`` (``n_neighbors`` is
        capped at ``n_train``); ``"rf"``:
        ``RandomForestClassifier(random_state=random_state)``, the MarkerMap
        package's evaluation model. An instance is cloned, never fitted in
        place.
    random_state : int or None, default 0
        Seed of the random forest.
    n_neighbors : int, default 5
        Neighbours of the kNN classifier.

    Returns
    -------
    dict
        ``accuracy``; ``misclassification_rate`` (``1 - accuracy``);
        ``average_misclassification_rate`` (MarkerMap paper eq. 5: the mean
        over the classes present in ``y_test`` of the fraction of that class's
        test cells that are misclassified, i.e. ``1 - balanced accuracy``);
        ``f1_macro`` and ``f1_weighted`` (scikit-learn ``f1_score``, over the
        labels present in ``y_test`` or predicted); ``confusion_matrix``
        (int64 array [n_labels, n_labels], rows true and columns predicted);
        ``labels`` (the sorted union of the train and test label values that
        index the confusion matrix).
    """
    x_train, x_test = _check_pair(x_train, x_test)
    n_train, n_test = x_train.shape[0], x_test.shape[0]
    idx = _check_markers(markers, x_train.shape[1], allow_none=True)
    if isinstance(n_neighbors, (bool, np.bool_)) or not isinstance(n_neighbors, numbers.Integral):
        raise TypeError(f"n_neighbors must be a positive int, got {n_neighbors!r}.")
    if n_neighbors < 1:
        raise ValueError(f"n_neighbors must be >= 1, got {n_neighbors}.")
    seed = check_random_state(random_state)
    check_labels(y_train, n_train, name="y_train", min_classes=1)
    check_labels(y_test, n_test, name="y_test", min_classes=1)
    y_all = np.concatenate([_as_label_array(y_train), _as_label_array(y_test)])
    codes, labels = check_labels(y_all, n_train + n_test, name="y_train/y_test", min_classes=1)
    c_train, c_test = codes[:n_train], codes[n_train:]

    if idx is not None:
        x_train, x_test = x_train[:, idx], x_test[:, idx]
    model = _make_classifier(classifier, seed, int(n_neighbors), n_train)
    model.fit(x_train, c_train)
    pred = np.asarray(model.predict(x_test)).astype(np.int64)

    n_labels = labels.shape[0]
    cm = confusion_matrix(c_test, pred, labels=np.arange(n_labels)).astype(np.int64)
    accuracy = float(np.trace(cm) / n_test)
    row_totals = cm.sum(axis=1)
    present = row_totals > 0
    per_class_error = 1.0 - np.diag(cm)[present] / row_totals[present]
    return {
        "accuracy": accuracy,
        "misclassification_rate": 1.0 - accuracy,
        "average_misclassification_rate": float(per_class_error.mean()),
        "f1_macro": float(f1_score(c_test, pred, average="macro", zero_division=0)),
        "f1_weighted": float(f1_score(c_test, pred, average="weighted", zero_division=0)),
        "confusion_matrix": cm,
        "labels": labels,
    }


def _as_label_array(y) -> np.ndarray:
    values = y.to_numpy() if hasattr(y, "to_numpy") else np.asarray(y)
    return values.reshape(-1) if values.ndim == 2 and values.shape[1] == 1 else values


def reconstruction_scores(
    x_train,
    x_test,
    markers,
    top_fraction: float = 0.2,
    *,
    max_dense_bytes: int = _DEFAULT_MAX_DENSE_BYTES,
) -> dict:
    """Reconstruct all genes from the markers with a linear regression.

    A ``LinearRegression`` (with intercept) from the marker columns of
    ``x_train`` to all columns of ``x_train`` is fitted, then applied to the
    marker columns of ``x_test``. This is the MarkerMap package's
    ``recon_model_metrics`` plus the paper's highly-variable-gene comparison.

    Parameters
    ----------
    x_train : array-like or sparse, shape [n_train, n_genes]
    x_test : array-like or sparse, shape [n_test, n_genes]
    markers : array-like of int or bool mask
        Marker gene columns.
    top_fraction : float, default 0.2
        Fraction of genes, by variance, compared by ``variance_jaccard``
        (at least one gene).
    max_dense_bytes : int, default 2**31
        Size guard for densifying sparse input.

    Returns
    -------
    dict
        ``l2``: mean squared error over test cells and genes (the mean over
        cells of the per-cell squared-error sum divided by ``n_genes``);
        ``l1``: mean absolute error; ``variance_jaccard``: Jaccard index
        between the top ``top_fraction`` genes by variance in ``x_test`` and
        in the reconstruction; ``variance_spearman``: Spearman correlation of
        the per-gene variances of ``x_test`` and of the reconstruction (NaN
        when either is constant).
    """
    x_train, x_test = _check_pair(x_train, x_test)
    n_genes = x_train.shape[1]
    idx = _check_markers(markers, n_genes, allow_none=False)
    if isinstance(top_fraction, (bool, np.bool_)) or not isinstance(top_fraction, numbers.Real):
        raise TypeError(f"top_fraction must be a float in (0, 1], got {top_fraction!r}.")
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}.")
    xtr = to_dense(x_train, max_dense_bytes, name="x_train").astype(np.float64)
    xte = to_dense(x_test, max_dense_bytes, name="x_test").astype(np.float64)

    reg = LinearRegression().fit(xtr[:, idx], xtr)
    recon = reg.predict(xte[:, idx])
    err = xte - recon
    l2 = float(np.mean(np.sum(err**2, axis=1) / n_genes))
    l1 = float(np.mean(np.abs(err)))

    var_true = xte.var(axis=0)
    var_recon = recon.var(axis=0)
    k = max(1, int(top_fraction * n_genes))
    top_true = set(np.argsort(-var_true, kind="stable")[:k].tolist())
    top_recon = set(np.argsort(-var_recon, kind="stable")[:k].tolist())
    jaccard = len(top_true & top_recon) / len(top_true | top_recon)
    if np.ptp(var_true) == 0 or np.ptp(var_recon) == 0:
        spearman = float("nan")
    else:
        spearman = float(scipy.stats.spearmanr(var_true, var_recon).statistic)
    return {
        "l2": l2,
        "l1": l1,
        "variance_jaccard": float(jaccard),
        "variance_spearman": spearman,
    }


def evaluate_markers(
    x_train,
    y_train,
    x_test,
    y_test,
    markers,
    classifiers=("knn", "rf"),
    reconstruction: bool = True,
    random_state=0,
) -> dict:
    """Classification and reconstruction scores of one marker set.

    Parameters
    ----------
    x_train, y_train, x_test, y_test
        See :func:`classification_scores`.
    markers : array-like of int or bool mask
        Marker gene columns.
    classifiers : str, sequence or dict, default ("knn", "rf")
        Classifiers to run: names ("knn", "rf"), scikit-learn instances
        (keyed by their class name), or a dict mapping result keys to either.
    reconstruction : bool, default True
        Also compute :func:`reconstruction_scores`.
    random_state : int or None, default 0

    Returns
    -------
    dict
        ``{"n_markers": int, "classification": {name: scores},
        "reconstruction": scores}``; ``"reconstruction"`` only when asked.
    """
    x_train, x_test = _check_pair(x_train, x_test)
    idx = _check_markers(markers, x_train.shape[1], allow_none=False)
    named = named_classifiers(classifiers)
    out = {"n_markers": int(idx.shape[0]), "classification": {}}
    for key, clf in named.items():
        out["classification"][key] = classification_scores(
            x_train, y_train, x_test, y_test, markers=idx, classifier=clf,
            random_state=random_state,
        )
    if reconstruction:
        out["reconstruction"] = reconstruction_scores(x_train, x_test, idx)
    return out



def r2_score(y_true, y_pred, *, center=None, per_feature: bool = False):
    """Coefficient of determination as the sparse bottleneck / sRRR papers define it.

    ``R^2 = 1 - sum((y - y_hat)^2) / sum((y - c)^2)``, summed over cells *and* features
    (one multivariate number), where ``c`` is the *training-set* mean of ``Y``
    (``center``). The papers centre train and test ``Y`` with the training mean before
    fitting, so the default ``center=None`` means ``c = 0``: pass already-centred data,
    or pass the training mean here. This differs from scikit-learn's ``r2_score``, which
    centres each test feature with its own test mean and averages the per-feature values.

    ``per_feature=True`` returns the ``[n_features]`` vector of the same ratio per column.
    Where the denominator is zero (``y_true`` equal to ``c`` everywhere) R^2 is undefined
    and returned as NaN.
    """
    y_true = check_matrix(y_true, name="y_true", dtype=np.float64, allow_sparse=False)
    y_pred = check_matrix(y_pred, name="y_pred", dtype=np.float64, allow_sparse=False)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred must have the same shape, got {y_true.shape} and {y_pred.shape}")
    if center is None:
        c = np.zeros(y_true.shape[1])
    else:
        try:
            c = np.asarray(center, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as err:
            raise TypeError(f"center must be a numeric vector [n_features], got {center!r}") from err
    if c.shape != (y_true.shape[1],):
        raise ValueError(f"center must have one value per feature ({y_true.shape[1]}), got shape {c.shape}")
    if not np.isfinite(c).all():
        raise ValueError("center contains NaN or infinite values.")
    axis = 0 if per_feature else None
    ss_res = np.sum((y_true - y_pred) ** 2, axis=axis)
    ss_tot = np.sum((y_true - c) ** 2, axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(ss_tot > 0, 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0), np.nan)
    return r2 if per_feature else float(r2)


def imputation_scores(truth, imputed):
    """Per-gene agreement of imputed with measured expression (the spatial-imputation
    benchmarks' metrics, as in stAI's and Li et al. 2022's evaluations).

    Parameters
    ----------
    truth, imputed : array-like [n_cells, n_genes]
        Measured and imputed expression of the held-out genes on the same (log-normalised)
        scale. ``imputed`` may be on another scale: PCC and the normalised RMSE are
        scale-free, and JSD compares distributions over cells.

    Returns
    -------
    dict of float64 arrays [n_genes]:
        ``pcc``: Pearson correlation over cells (NaN for a constant gene);
        ``spearman``: Spearman rank correlation over cells, the Pearson correlation of
        the two genes' ranks with ties given their average rank (as
        ``scipy.stats.spearmanr``; NaN for a gene constant in either input);
        ``rmse``: root mean squared error of the two after z-scoring each gene over
        cells (population SD; a constant gene z-scores to zeros);
        ``jsd``: Jensen-Shannon divergence (base 2, in [0, 1]) between the two genes'
        expression normalised to sum to one over cells (negative values clipped to 0;
        an all-zero gene is treated as uniform).
    """
    t = check_matrix(truth, name="truth", dtype=np.float64, allow_sparse=False)
    p = check_matrix(imputed, name="imputed", dtype=np.float64, allow_sparse=False)
    if t.shape != p.shape:
        raise ValueError(f"truth and imputed must have the same shape, got {t.shape} and {p.shape}.")
    if t.shape[0] < 2:
        raise ValueError(f"need at least 2 cells, got {t.shape[0]}.")
    tc, pc = t - t.mean(0), p - p.mean(0)
    st, spd = np.sqrt(np.mean(tc * tc, 0)), np.sqrt(np.mean(pc * pc, 0))
    with np.errstate(divide="ignore", invalid="ignore"):
        pcc = np.mean(tc * pc, 0) / (st * spd)
    tz = np.divide(tc, st, out=np.zeros_like(tc), where=st > 0)
    pz = np.divide(pc, spd, out=np.zeros_like(pc), where=spd > 0)
    rmse = np.sqrt(np.mean((tz - pz) ** 2, 0))

    def dist(a):
        a = np.clip(a, 0.0, None)
        tot = a.sum(0)
        return np.where(tot > 0, a / np.where(tot > 0, tot, 1.0), 1.0 / a.shape[0])

    P, Q = dist(t), dist(p)
    M = 0.5 * (P + Q)

    def kl(a, b):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.sum(np.where(a > 0, a * np.log2(a / b), 0.0), 0)

    jsd = 0.5 * kl(P, M) + 0.5 * kl(Q, M)
    return {
        "pcc": pcc,
        "spearman": _spearman_columns(t, p),
        "rmse": rmse,
        "jsd": np.clip(jsd, 0.0, 1.0),
    }


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of each column of a 2-D array, ties given their average rank
    (``scipy.stats.rankdata(method="average")`` per column), as float64."""
    n = x.shape[0]
    order = np.argsort(x, axis=0, kind="stable")
    xs = np.take_along_axis(x, order, axis=0)
    pos = np.broadcast_to(np.arange(n)[:, None], x.shape)
    differs = xs[1:] != xs[:-1]
    edge = np.ones((1, x.shape[1]), dtype=bool)
    first = np.concatenate([edge, differs], axis=0)  # a tie group starts here
    last = np.concatenate([differs, edge], axis=0)  # a tie group ends here
    start = np.maximum.accumulate(np.where(first, pos, 0), axis=0)
    end = np.minimum.accumulate(np.where(last, pos, n)[::-1], axis=0)[::-1]
    ranks = np.empty(x.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, 0.5 * (start + end) + 1.0, axis=0)
    return ranks


def _spearman_columns(t: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Per-column Spearman correlation of two same-shape float arrays."""
    rt, rp = _average_ranks(t), _average_ranks(p)
    rt -= rt.mean(0)
    rp -= rp.mean(0)
    st, spd = np.sqrt(np.mean(rt * rt, 0)), np.sqrt(np.mean(rp * rp, 0))
    constant = (np.ptp(t, axis=0) == 0) | (np.ptp(p, axis=0) == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.mean(rt * rp, 0) / (st * spd)
    rho = np.clip(rho, -1.0, 1.0)
    rho[constant] = np.nan
    return rho


def _check_n_neighbors(n_neighbors, n_cells: int) -> tuple[list[int], bool]:
    """Validate an int or a sequence of ints in ``[1, n_cells)``.

    Returns the list of values and whether a single int was given.
    """
    scalar = isinstance(n_neighbors, numbers.Integral) and not isinstance(
        n_neighbors, (bool, np.bool_)
    )
    if scalar:
        ks = [n_neighbors]
    elif isinstance(n_neighbors, (str, bytes)) or not hasattr(n_neighbors, "__iter__"):
        raise TypeError(
            f"n_neighbors must be a positive int or a sequence of positive ints, got "
            f"{n_neighbors!r}."
        )
    else:
        ks = list(np.asarray(n_neighbors, dtype=object).reshape(-1))
        if not ks:
            raise ValueError("n_neighbors must not be an empty sequence.")
        for k in ks:
            if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral):
                raise TypeError(
                    f"n_neighbors must hold positive ints, got {k!r} in {n_neighbors!r}."
                )
    ks = [int(k) for k in ks]
    for k in ks:
        if not 1 <= k < n_cells:
            raise ValueError(
                f"n_neighbors must be >= 1 and smaller than the number of cells "
                f"({n_cells}), got {k}."
            )
    return ks, scalar


def _neighbor_indices(latent: np.ndarray, k: int) -> np.ndarray:
    """Indices [n_cells, k] of each row's k nearest other rows (Euclidean), nearest
    first; a cell is never its own neighbour, even when it has exact duplicates."""
    nn = NearestNeighbors(n_neighbors=k).fit(latent)
    return nn.kneighbors(return_distance=False)


def entropy_batch_mixing(latent, batch, n_neighbors=50):
    """Entropy of batch mixing generalised to unbalanced datasets (gimVI paper).

    For each cell, the proportions ``p_i(b)`` of each batch (dataset) label ``b``
    among its ``n_neighbors`` nearest neighbours in ``latent`` (Euclidean, the cell
    itself excluded) are compared with the proportions ``q(b)`` of the labels over
    all cells; the cell's score is the negative Kullback-Leibler divergence
    ``-sum_b p_i(b) log(p_i(b) / q(b))`` (natural log, ``0 log 0 = 0``). Unlike the
    plain entropy of the local proportions, this is 0 for perfectly mixed data
    whatever the batch sizes.

    Parameters
    ----------
    latent : array-like [n_cells, n_dims]
        Joint latent representation of all cells (finite values).
    batch : array-like [n_cells]
        Batch or dataset label of each cell (any sortable type, at least two
        distinct labels).
    n_neighbors : int or sequence of int, default 50
        Neighbourhood size(s), each in ``[1, n_cells)``.

    Returns
    -------
    float or dict
        The mean score over cells: 0 is perfect mixing, more negative is worse
        (fully separated batches score ``sum_b q(b) log q(b)``; the lower bound,
        every neighbourhood made of the rarest batch only, is ``min_b log q(b)``). For
        a sequence ``n_neighbors``, a dict ``{k: score}`` in the given order.
    """
    x = check_matrix(latent, name="latent", dtype=np.float64, allow_sparse=False)
    n = x.shape[0]
    codes, classes = check_labels(batch, n, name="batch", min_classes=2)
    ks, scalar = _check_n_neighbors(n_neighbors, n)
    codes = codes.astype(np.int64)
    n_batches = classes.shape[0]
    q = np.bincount(codes, minlength=n_batches) / n
    nbrs = codes[_neighbor_indices(x, max(ks))]
    rows = np.arange(n)[:, None] * n_batches
    out = {}
    for k in ks:
        counts = np.bincount((rows + nbrs[:, :k]).ravel(), minlength=n * n_batches)
        prop = counts.reshape(n, n_batches) / k
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.sum(np.where(prop > 0, prop * np.log(prop / q), 0.0), axis=1)
        out[k] = float(-np.mean(kl))
    return out[ks[0]] if scalar else out


def knn_purity(latent_joint, latent_alone, n_neighbors=50):
    """kNN purity of a joint latent space (gimVI paper).

    For each cell, the Jaccard index between its ``n_neighbors`` nearest
    neighbours (Euclidean, the cell itself excluded) in ``latent_joint`` and in
    ``latent_alone``, averaged over cells. It measures how much of a dataset's own
    neighbourhood structure a joint embedding keeps. Independent embeddings score
    about ``k / (n_cells - 1)`` (less, since the union grows).

    Parameters
    ----------
    latent_joint : array-like [n_cells, n_dims_joint]
        Latent representation of the cells from the joint model.
    latent_alone : array-like [n_cells, n_dims_alone]
        Latent representation of the same cells (rows aligned) from a model of
        their dataset alone; the dimensions may differ.
    n_neighbors : int or sequence of int, default 50
        Neighbourhood size(s), each in ``[1, n_cells)``.

    Returns
    -------
    float or dict
        Mean Jaccard index in [0, 1] (1: identical neighbourhoods). For a sequence
        ``n_neighbors``, a dict ``{k: score}`` in the given order.
    """
    a = check_matrix(latent_joint, name="latent_joint", dtype=np.float64, allow_sparse=False)
    b = check_matrix(latent_alone, name="latent_alone", dtype=np.float64, allow_sparse=False)
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"latent_joint and latent_alone must hold the same cells (rows), got "
            f"{a.shape[0]} and {b.shape[0]}."
        )
    n = a.shape[0]
    ks, scalar = _check_n_neighbors(n_neighbors, n)
    kmax = max(ks)
    ia, ib = _neighbor_indices(a, kmax), _neighbor_indices(b, kmax)
    out = {}
    for k in ks:
        # each row's two index sets hold distinct cells, so a repeat after sorting
        # their union is exactly one shared neighbour
        both = np.sort(np.concatenate([ia[:, :k], ib[:, :k]], axis=1), axis=1)
        shared = np.count_nonzero(both[:, 1:] == both[:, :-1], axis=1)
        out[k] = float(np.mean(shared / (2 * k - shared)))
    return out[ks[0]] if scalar else out


def annotation_scores(y_true, y_pred):
    """Cell-type annotation scores of a spatial part: ``accuracy``, ``macro_f1`` and
    ``weighted_f1`` (scikit-learn's definitions, zero division counted as 0), as floats.
    Labels are compared as given (strings or codes); lengths must match and missing labels
    (NaN/None) are an error."""
    t = np.asarray(y_true).reshape(-1)
    p = np.asarray(y_pred).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {t.size} and {p.size}.")
    if t.size == 0:
        raise ValueError("y_true is empty.")
    for name, v in (("y_true", t), ("y_pred", p)):
        if _is_missing(v).any():
            raise ValueError(f"{name} contains {int(_is_missing(v).sum())} missing label(s) (NaN/None).")
    t, p = t.astype(str), p.astype(str)
    return {
        "accuracy": float(accuracy_score(t, p)),
        "macro_f1": float(f1_score(t, p, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(t, p, average="weighted", zero_division=0)),
    }

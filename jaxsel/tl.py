"""scanpy-style marker selection and spatial imputation on AnnData objects.

:func:`stai` and :func:`gimvi` return a new object (the imputed genes as an AnnData)
instead of writing selections; see their docstrings for what they write.

Every function reads the expression matrix from ``adata.X`` (or
``adata.layers[layer]``) and, where needed, cell labels from
``adata.obs[labels_key]``, fits the matching estimator of
:mod:`jaxsel.estimators`, and writes only

- ``adata.var[key_added]``: bool, the selected genes;
- ``adata.var[f"{key_added}_score"]``: float, the estimator's per-gene ``scores_``;
- ``adata.uns[key_added]``: a dict with ``params`` (the estimator's parameters),
  ``markers`` (gene names, best first) and, for the neural selectors, ``history``
  (per-epoch curves as lists), ``n_epochs`` and ``learning_rate``.

Existing entries under those keys are overwritten; nothing else (``X``, layers,
``obs``, ``obsm``, other ``var`` columns or ``uns`` entries) is touched. With
``copy=True`` the input is left unchanged and a modified copy is returned;
otherwise the functions return ``None``. Nothing is written when fitting fails.
The markers are reported by gene name, so duplicate ``var_names`` are an error (call
``adata.var_names_make_unique()``), as are missing labels in ``obs[labels_key]``.

The matrix is used as it is: the neural selectors expect preprocessed
(normalised, log1p, scaled) expression, :func:`hvg_markers` log1p-normalised
expression, :func:`de_markers` usually log1p-normalised expression.
"""

from __future__ import annotations

import numbers

import numpy as np

from . import estimators, imputers
from ._validation import check_bool, check_labels

__all__ = [
    "markermap",
    "concrete_vae",
    "global_gumbel_vae",
    "de_markers",
    "hvg_markers",
    "random_markers",
    "sparse_bottleneck",
    "stai",
    "gimvi",
]


# --------------------------------------------------------------------------- helpers


def _check_adata(adata):
    if not (hasattr(adata, "X") and hasattr(adata, "obs") and hasattr(adata, "var")):
        raise TypeError(
            f"adata must be an anndata.AnnData object, got {type(adata).__name__}; for "
            f"matrices use the estimators (jaxsel.MarkerMap, ...)."
        )


def _check_key(value, name: str):
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty string, got {value!r}.")


def _get_x(adata, layer):
    if layer is None:
        if adata.X is None:
            raise ValueError("adata.X is None; pass layer= to read a layer instead.")
        return adata.X
    _check_key(layer, "layer")
    if layer not in adata.layers:
        raise KeyError(
            f"layer={layer!r} is not in adata.layers (available: {sorted(adata.layers.keys())})."
        )
    return adata.layers[layer]


def _get_labels(adata, labels_key, *, required: bool, why: str = ""):
    if labels_key is None:
        if required:
            raise ValueError(f"labels_key is required: {why}")
        return None
    _check_key(labels_key, "labels_key")
    if labels_key not in adata.obs.columns:
        raise KeyError(
            f"labels_key={labels_key!r} is not a column of adata.obs (available: "
            f"{list(adata.obs.columns)})."
        )
    labels = adata.obs[labels_key]
    # missing labels are named by their column here, not as the estimator's ``y``
    check_labels(labels, None, name=f"adata.obs[{labels_key!r}]", min_classes=1)
    return labels


def _check_var_names(adata):
    """Markers are written by gene name: duplicate ``var_names`` would make them ambiguous."""
    names = adata.var_names
    if not names.is_unique:
        dup = names[names.duplicated()].unique()[:5].tolist()
        raise ValueError(
            f"adata.var_names has duplicate gene names, e.g. {dup}; the selected markers are "
            f"reported by name. Call adata.var_names_make_unique() first."
        )


def _plain(value):
    """A parameter value h5ad can store: None, bool, int, float, str; else its repr."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return repr(value)


def _write(adata, key_added: str, est, extra: dict):
    genes = np.asarray(adata.var_names)
    adata.var[key_added] = est.get_support()
    adata.var[f"{key_added}_score"] = np.asarray(est.scores_, dtype=np.float64)
    uns = {
        "params": {k: _plain(v) for k, v in est.get_params(deep=False).items()},
        "markers": [str(g) for g in genes[est.markers_]],
    }
    uns.update(extra)
    adata.uns[key_added] = uns


def _neural_extra(est) -> dict:
    return {
        "history": {k: np.asarray(v, dtype=np.float64).tolist() for k, v in est.history_.items()},
        "n_epochs": int(est.n_epochs_),
        "learning_rate": float(est.learning_rate_),
    }


def _check_copy(adata, copy):
    if copy and getattr(adata, "isbacked", False):
        raise ValueError(
            "copy=True needs an in-memory AnnData (copying a backed one means writing a new file); with a "
            "backed adata the results go into adata.var / adata.uns (in memory; adata.write() saves them), "
            "or pass adata.to_memory().")


def _run(adata, est, *, layer, labels, key_added, copy, neural):
    _check_key(key_added, "key_added")
    _check_var_names(adata)
    _check_copy(adata, copy)
    x = _get_x(adata, layer)
    est.fit(x, labels)
    if copy:
        adata = adata.copy()
    _write(adata, key_added, est, _neural_extra(est) if neural else {})
    return adata if copy else None


def _neural(cls, adata, n_markers, labels_key, objective, default_objective, layer, key_added,
            copy, kwargs):
    _check_adata(adata)
    if objective is None:
        objective = default_objective(labels_key)
    est = cls(n_markers=n_markers, objective=objective, **kwargs)
    needs_labels = est._needs_labels()
    labels = _get_labels(
        adata, labels_key, required=needs_labels,
        why=f"{cls.__name__} with objective={objective!r} (alpha={est.alpha}) trains a "
        f"classifier on cell labels; pass labels_key (a column of adata.obs) or "
        f"objective='unsupervised'.",
    )
    return _run(adata, est, layer=layer, labels=labels, key_added=key_added, copy=copy, neural=True)


_NEURAL_DOC = """
    Parameters
    ----------
    adata : anndata.AnnData
        Cells x genes; ``adata.X`` (or ``layer``) holds preprocessed expression
        (dense or sparse; never modified).
    n_markers : int, default 50
    labels_key : str, optional
        Column of ``adata.obs`` with cell labels. Needed by the supervised and joint
        objectives; for the unsupervised one it only stratifies the validation split.
    objective : {{"supervised", "unsupervised", "joint"}}, optional
        {objective_doc}
    layer : str, optional
        Read ``adata.layers[layer]`` instead of ``adata.X``.
    key_added : str, default "{key}"
        Where the results go: ``adata.var[key_added]``,
        ``adata.var[key_added + "_score"]``, ``adata.uns[key_added]``.
    copy : bool, default False
        Work on (and return) a copy, leaving ``adata`` unchanged.
    **kwargs
        Further parameters of :class:`jaxsel.{cls}` (``alpha``, ``hidden_size``,
        ``max_epochs``, ``learning_rate``, ``random_state``, ...).

    Returns
    -------
    anndata.AnnData or None
        The modified copy when ``copy=True``, else None (``adata`` is updated).

    Raises
    ------
    KeyError
        If ``labels_key`` or ``layer`` does not exist.
    ValueError
        If the objective needs labels and ``labels_key`` is None, or on invalid data.
"""


# ----------------------------------------------------------------- neural selectors


def markermap(
    adata,
    n_markers: int = 50,
    labels_key: str | None = None,
    *,
    objective: str | None = None,
    layer: str | None = None,
    key_added: str = "markermap",
    copy: bool = False,
    **kwargs,
):
    """Select marker genes with :class:`jaxsel.MarkerMap`."""
    return _neural(
        estimators.MarkerMap, adata, n_markers, labels_key, objective,
        lambda key: "supervised" if key is not None else "unsupervised",
        layer, key_added, copy, kwargs,
    )


def concrete_vae(
    adata,
    n_markers: int = 50,
    labels_key: str | None = None,
    *,
    objective: str | None = None,
    layer: str | None = None,
    key_added: str = "concrete_vae",
    copy: bool = False,
    **kwargs,
):
    """Select marker genes with :class:`jaxsel.ConcreteVAE`."""
    return _neural(
        estimators.ConcreteVAE, adata, n_markers, labels_key, objective,
        lambda key: "unsupervised", layer, key_added, copy, kwargs,
    )


def global_gumbel_vae(
    adata,
    n_markers: int = 50,
    labels_key: str | None = None,
    *,
    objective: str | None = None,
    layer: str | None = None,
    key_added: str = "global_gumbel_vae",
    copy: bool = False,
    **kwargs,
):
    """Select marker genes with :class:`jaxsel.GlobalGumbelVAE`."""
    return _neural(
        estimators.GlobalGumbelVAE, adata, n_markers, labels_key, objective,
        lambda key: "unsupervised", layer, key_added, copy, kwargs,
    )


markermap.__doc__ += _NEURAL_DOC.format(
    key="markermap", cls="MarkerMap",
    objective_doc='Default: "supervised" when ``labels_key`` is given, else "unsupervised".',
) + """
    Examples
    --------
    >>> import jaxsel
    >>> jaxsel.tl.markermap(adata, n_markers=50, labels_key="cell_type")  # doctest: +SKIP
    >>> adata.var_names[adata.var["markermap"]]                          # doctest: +SKIP
"""
concrete_vae.__doc__ += _NEURAL_DOC.format(
    key="concrete_vae", cls="ConcreteVAE", objective_doc='Default: "unsupervised".'
)
global_gumbel_vae.__doc__ += _NEURAL_DOC.format(
    key="global_gumbel_vae", cls="GlobalGumbelVAE", objective_doc='Default: "unsupervised".'
)


# ------------------------------------------------------------------------ baselines


def de_markers(
    adata,
    n_markers: int = 50,
    labels_key: str | None = None,
    *,
    method: str = "t-test",
    layer: str | None = None,
    key_added: str = "de_markers",
    copy: bool = False,
):
    """One-vs-rest differential-expression markers, round robin over cell types.

    Fits :class:`jaxsel.DEMarkers`; ``adata.var[key_added + "_score"]`` is each
    gene's best score over the cell types. Same conventions as :func:`markermap`.

    Parameters
    ----------
    adata : anndata.AnnData
        ``adata.X`` (or ``layer``): usually log1p-normalised expression.
    n_markers : int, default 50
    labels_key : str
        Column of ``adata.obs`` with cell labels (required).
    method : {"t-test", "t-test_overestim_var", "wilcoxon"}, default "t-test"
    layer, key_added, copy
        As in :func:`markermap`; ``key_added`` defaults to ``"de_markers"``.

    Returns
    -------
    anndata.AnnData or None
    """
    _check_adata(adata)
    labels = _get_labels(
        adata, labels_key, required=True,
        why="differential expression compares cell types; pass a column of adata.obs.",
    )
    est = estimators.DEMarkers(n_markers=n_markers, method=method)
    return _run(adata, est, layer=layer, labels=labels, key_added=key_added, copy=copy, neural=False)


def hvg_markers(
    adata,
    n_markers: int = 50,
    *,
    n_bins: int = 20,
    layer: str | None = None,
    key_added: str = "hvg_markers",
    copy: bool = False,
):
    """Seurat-flavour highly variable genes (:class:`jaxsel.HVGMarkers`).

    Parameters
    ----------
    adata : anndata.AnnData
        ``adata.X`` (or ``layer``) must be log1p-normalised expression (>= 0).
    n_markers : int, default 50
    n_bins : int, default 20
    layer, key_added, copy
        As in :func:`markermap`; ``key_added`` defaults to ``"hvg_markers"``.

    Returns
    -------
    anndata.AnnData or None
    """
    _check_adata(adata)
    est = estimators.HVGMarkers(n_markers=n_markers, n_bins=n_bins)
    return _run(adata, est, layer=layer, labels=None, key_added=key_added, copy=copy, neural=False)


def random_markers(
    adata,
    n_markers: int = 50,
    *,
    random_state=None,
    key_added: str = "random_markers",
    copy: bool = False,
):
    """``n_markers`` genes drawn at random (:class:`jaxsel.RandomMarkers`).

    Parameters
    ----------
    adata : anndata.AnnData
    n_markers : int, default 50
    random_state : int, numpy Generator or None, default None
    key_added, copy
        As in :func:`markermap`; ``key_added`` defaults to ``"random_markers"``.

    Returns
    -------
    anndata.AnnData or None
    """
    _check_adata(adata)
    est = estimators.RandomMarkers(n_markers=n_markers, random_state=random_state)
    return _run(adata, est, layer=None, labels=None, key_added=key_added, copy=copy, neural=False)


def sparse_bottleneck(
    adata,
    y_key: str = "Y",
    n_genes: int = 25,
    *,
    layer: str | None = None,
    key_added: str = "sparse_bottleneck",
    copy: bool = False,
    **kwargs,
):
    """Select genes that predict a paired modality with :class:`jaxsel.SparseBottleneck`.

    Reads ``X`` from ``adata.X`` (or ``layer``) and the paired modality ``Y`` from
    ``adata.obsm[y_key]`` (an array or DataFrame [n_cells, n_features]; the paper
    standardises both, see :func:`jaxsel.preprocessing.sbnn_recipe`). Writes, besides
    the common keys of this module (``var[key_added]``, ``var[key_added + "_score"]``:
    first-layer row norms, ``uns[key_added]`` with ``params``, ``markers`` and
    ``history``), the 2-D embedding to ``adata.obsm["X_" + key_added]``. A backed
    AnnData's ``X`` is streamed from disk (:meth:`jaxsel.SparseBottleneck.fit`).
    Extra keyword arguments go to :class:`jaxsel.SparseBottleneck`.
    """
    _check_adata(adata)
    _check_copy(adata, copy)
    _check_key(y_key, "y_key")
    _check_key(key_added, "key_added")
    if y_key not in adata.obsm:
        raise KeyError(f"y_key={y_key!r} is not in adata.obsm (available: {sorted(adata.obsm.keys())}).")
    _check_var_names(adata)
    y = adata.obsm[y_key]
    y = y.to_numpy() if hasattr(y, "to_numpy") else y
    x = _get_x(adata, layer)
    est = estimators.SparseBottleneck(n_genes, **kwargs).fit(x, y)
    emb = est.latent(x)
    if copy:
        adata = adata.copy()
    _write(adata, key_added, est, {
        "history": {k: np.asarray(v, dtype=np.float64).tolist() for k, v in est.history_.items()},
    })
    adata.obsm[f"X_{key_added}"] = emb
    return adata if copy else None


def stai(
    adata_spatial,
    adata_ref,
    labels_key: str | None = None,
    genes=None,
    *,
    spatial_key: str = "spatial",
    layer: str | None = None,
    ref_layer: str | None = None,
    annotate: bool = False,
    key_added: str = "stai",
    return_estimator: bool = False,
    **kwargs,
):
    """Impute genes of spatial cells from a reference with :class:`jaxsel.imputers.StAI`.

    Genes are matched by ``var_names``; ``adata_spatial.obsm[spatial_key]`` holds the
    coordinates and ``adata_ref.obs[labels_key]`` the reference cell types (needed for
    ``annotate`` and for the classifier term; without it the term is dropped). The
    matrices are counts unless ``counts=False`` is passed. Either AnnData may be opened in
    backed mode (``anndata.read_h5ad(path, backed="r")``): only the genes the model uses
    are read from its file (see :class:`~jaxsel.imputers.StAI`); pass ``genes`` to keep
    that small for a reference with many genes. Extra keyword arguments go to
    :class:`~jaxsel.imputers.StAI` (``n_calibration_folds``, ``epochs``, ``task``,
    ``unlabeled_category`` for reference cells without a type, ...).

    Returns a new AnnData (cells of ``adata_spatial`` x ``genes``, default: every
    reference gene the spatial data lacks) with the imputed log-normalised expression in
    ``X`` (mean over the calibration submodels), their standard deviation in
    ``layers["std"]`` and the fit's settings and loss history in ``uns["stai"]``. The
    inputs are not modified, except that with ``annotate=True`` the predicted types are
    written to ``adata_spatial.obs[key_added]`` and their probabilities to
    ``adata_spatial.obsm[key_added + "_proba"]``. ``return_estimator=True`` returns
    ``(imputed, estimator)``.
    """
    import anndata
    import pandas as pd

    _check_adata(adata_spatial)
    _check_adata(adata_ref)
    _check_key(spatial_key, "spatial_key")
    _check_key(key_added, "key_added")
    if spatial_key not in adata_spatial.obsm:
        raise KeyError(f"spatial_key={spatial_key!r} is not in adata_spatial.obsm (available: "
                       f"{sorted(adata_spatial.obsm.keys())}); the coordinates are required.")
    check_bool(annotate, "annotate")
    labels = _get_labels(adata_ref, labels_key, required=bool(annotate), why="annotate=True needs reference labels.")
    coords = adata_spatial.obsm[spatial_key]
    coords = coords.to_numpy() if hasattr(coords, "to_numpy") else coords
    est = imputers.StAI(**kwargs)
    est.fit(_get_x(adata_spatial, layer), _get_x(adata_ref, ref_layer),
            None if labels is None else np.asarray(labels), coords=coords,
            spatial_genes=adata_spatial.var_names, ref_genes=adata_ref.var_names, genes=genes)
    mean, sd = est.impute(return_std=True)
    out = anndata.AnnData(X=mean, obs=pd.DataFrame(index=adata_spatial.obs_names.copy()),
                          var=pd.DataFrame(index=[str(g) for g in est.imputable_genes_]))
    out.layers["std"] = sd
    out.uns["stai"] = {
        "params": {k: _plain(v) for k, v in est.get_params(deep=False).items()},
        "shared_genes": [str(g) for g in est.shared_genes_],
        "history": {k: np.asarray(v, dtype=np.float64).tolist() for k, v in est.history_.items()},
    }
    if annotate:
        pred, prob = est.annotate(return_proba=True)
        adata_spatial.obs[key_added] = pd.Categorical(pred, categories=[str(c) for c in est.classes_])
        adata_spatial.obsm[f"{key_added}_proba"] = prob
    return (out, est) if return_estimator else out


def gimvi(
    adata_ref,
    adata_spatial,
    genes=None,
    *,
    layer: str | None = None,
    ref_layer: str | None = None,
    n_samples: int = 50,
    normalized: bool = False,
    key_added: str = "gimvi",
    return_estimator: bool = False,
    **kwargs,
):
    """Impute genes of spatial cells from a scRNA-seq reference with
    :class:`jaxsel.imputers.GimVI` (Lopez et al. 2019).

    Both matrices (``X`` or the given layers) must hold raw counts; genes are matched by
    ``var_names`` and every spatial gene must be a reference gene. Extra keyword arguments
    go to :class:`~jaxsel.imputers.GimVI` (``max_epochs``, ``kappa``,
    ``spatial_likelihood``, ...).

    Returns a new AnnData (cells of ``adata_spatial`` x ``genes``, default: every
    reference gene the spatial data lacks) with

    - ``X``: the posterior mean of the imputed expression over ``n_samples`` draws, as
      expected counts on the spatial assay's scale (``normalized=True``: the
      frequencies over the reference genes);
    - ``layers["variance"]``: the variance over the draws (the uncertainty);
    - ``obsm[f"X_{key_added}"]``: the spatial cells' latent (posterior means);
    - ``uns[key_added]``: the estimator's parameters, the genes and the loss history.

    The inputs are not modified. ``return_estimator=True`` returns ``(imputed, estimator)``
    (its :meth:`~jaxsel.imputers.GimVI.latent` gives the reference cells' latent too).
    """
    import anndata
    import pandas as pd

    _check_adata(adata_ref)
    _check_adata(adata_spatial)
    _check_key(key_added, "key_added")
    est = imputers.GimVI(**kwargs)
    est.fit(_get_x(adata_ref, ref_layer), _get_x(adata_spatial, layer), ref_genes=adata_ref.var_names,
            spatial_genes=adata_spatial.var_names)
    names = est.imputable_genes_ if genes is None else ([genes] if isinstance(genes, str) else list(genes))
    mean, var = est.impute(genes, n_samples=n_samples, normalized=normalized)
    out = anndata.AnnData(X=mean, obs=pd.DataFrame(index=adata_spatial.obs_names.copy()),
                          var=pd.DataFrame(index=[str(g) for g in names]))
    out.layers["variance"] = var
    out.obsm[f"X_{key_added}"] = est.latent()
    out.uns[key_added] = {
        "params": {k: _plain(v) for k, v in est.get_params(deep=False).items()},
        "spatial_genes": [str(g) for g in est.spatial_genes_],
        "n_samples": int(n_samples),
        "normalized": bool(normalized),
        "history": {k: np.asarray(v, dtype=np.float64).tolist() for k, v in est.history_.items()},
    }
    return (out, est) if return_estimator else out

"""Estimators for imputing genes a spatial assay did not measure.

Numpy (or scipy.sparse, or pandas) in, numpy out; genes are matched *by name*. This
module validates, converts and bookkeeps; the models live in :mod:`jaxsel.methods`.

- :class:`StAI` (Zou et al., NAR 2025): a graph-attention encoder of the spatial cells and
  an MLP encoder of the reference, aligned by MMD; spatial cells impute from their
  nearest reference cells in the latent space; ``k`` calibration submodels, each trained
  to impute one fold of the measured genes from the others, run as one vmapped program
  and are averaged. The spread across the submodels is returned as a per-value
  uncertainty (not in the paper).
- :class:`GimVI` (Lopez et al. 2019; as scvi-tools' ``GIMVI``): a joint VAE of scRNA-seq
  and spatial counts (ZINB/NB and Poisson/NB likelihoods, a shared latent space aligned
  by an adversarial dataset classifier); spatial cells are decoded through the
  scRNA-seq branch to impute the genes they lack, with the variance over posterior draws
  as the uncertainty. Held-out gene folds and random restarts run as one program.
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from . import datasets, engine, metrics, preprocessing, streaming
from ._persist import PersistMixin
from ._validation import (
    _is_missing,
    check_bool,
    check_int,
    check_labels,
    check_matrix,
    check_random_state,
    check_real,
    check_values,
    fit_settings,
    fold_batch_size,
    progress_label,
    to_dense,
)
from .methods import gimvi as gv
from .methods import stai as st

__all__ = ["StAI", "GimVI", "GeneCVResult"]

_TASKS = ("impute", "annotate")
_LAMBDAS = ("recon", "mmd", "cos", "impute", "clf", "gene")
_COUNTS_HINT = " (counts=True); pass counts=False for log-normalised data"


def _check_gene_names(names, n: int, name: str) -> np.ndarray:
    if names is None:
        raise TypeError(f"{name} is required: genes are matched between the datasets by name.")
    if isinstance(names, (str, bytes)) or not hasattr(names, "__iter__"):
        raise TypeError(f"{name} must be a sequence of gene names (one per column), got {names!r}.")
    arr = np.asarray(list(names), dtype=object)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must hold one name per column ({n}), got {arr.shape[0] if arr.ndim else 0}.")
    missing = _is_missing(arr) | np.array([isinstance(g, str) and not g.strip() for g in arr], dtype=bool)
    if missing.any():
        raise ValueError(f"{name} has {int(missing.sum())} missing or empty gene name(s) (None, NaN or ''), "
                         f"at columns {np.flatnonzero(missing)[:10].tolist()}; name every gene.")
    arr = arr.astype(str)
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1][:5].tolist()
        raise ValueError(f"{name} has duplicate gene names, e.g. {dup}; make them unique first.")
    return arr


def _check_coords(coords, n: int) -> np.ndarray:
    if coords is None:
        raise ValueError("coords are required: the spatial cells' coordinates [n_spatial, 2 or 3].")
    c = check_matrix(coords, name="coords", dtype=np.float64, allow_sparse=False)
    if c.shape[0] != n:
        raise ValueError(f"coords must have one row per spatial cell ({n}), got {c.shape[0]}.")
    if c.shape[1] not in (2, 3):
        raise ValueError(f"coords must have 2 or 3 columns, got {c.shape[1]}.")
    return c


def _gene_masks(n_genes: int, folds, allowed=None):
    """``(fit, cal)`` float32 [k, n_genes] masks from a list of calibration index arrays
    over the positions ``allowed`` (default all)."""
    allowed = np.arange(n_genes) if allowed is None else np.asarray(allowed)
    fit = np.zeros((len(folds), n_genes), np.float32)
    cal = np.zeros_like(fit)
    for j, f in enumerate(folds):
        fit[j, allowed] = 1.0
        fit[j, allowed[f]] = 0.0
        cal[j, allowed[f]] = 1.0
    return fit, cal


def _held_out_folds(gene_folds, shared, seed: int):
    """Held-out gene index folds over ``shared``: ``None`` (leave-one-out), an int, or a
    list of gene-name lists; folds must be non-empty and disjoint."""
    G = shared.size
    if gene_folds is None:
        return datasets.gene_folds(G, None, random_state=seed)
    if isinstance(gene_folds, numbers.Integral) and not isinstance(gene_folds, (bool, np.bool_)):
        if not 2 <= gene_folds <= G:
            raise ValueError(f"gene_folds must be between 2 and the {G} shared genes, got {gene_folds}.")
        return datasets.gene_folds(G, int(gene_folds), random_state=seed)
    if isinstance(gene_folds, (str, bytes, bool, np.bool_)) or not hasattr(gene_folds, "__iter__"):
        raise TypeError(f"gene_folds must be None, an int or a list of gene-name lists, got {gene_folds!r}.")
    pos = {g: i for i, g in enumerate(shared)}
    held = []
    for f in gene_folds:
        f = [f] if isinstance(f, str) else [str(g) for g in f]
        bad = [g for g in f if g not in pos]
        if bad:
            raise ValueError(f"gene_folds names genes that are not shared: {bad[:10]}.")
        held.append(np.unique(np.array([pos[g] for g in f], dtype=np.int64)))
    if not held or any(h.size == 0 for h in held):
        raise ValueError("gene_folds must be a non-empty list of non-empty gene lists.")
    counts = np.bincount(np.concatenate(held), minlength=G)
    if (counts > 1).any():
        raise ValueError(f"gene_folds must be disjoint; held out more than once: {shared[counts > 1][:10].tolist()}.")
    return held


_SCORES = ("pcc", "spearman", "rmse", "jsd")


@dataclasses.dataclass
class GeneCVResult:
    """Held-out gene cross-validation of :meth:`StAI.cross_validate_genes`.

    ``genes`` [G] the shared genes; ``imputed`` / ``std`` / ``truth`` [n_spatial, G]: each
    gene imputed by the models that never saw it (mean and spread over the calibration
    submodels) and its measured log-normalised expression; ``pcc``, ``spearman``, ``rmse``,
    ``jsd`` [G] per gene (:func:`jaxsel.metrics.imputation_scores`); ``fold_of_gene`` [G] (``-1``,
    and NaN imputations and scores, for genes no fold held out);
    ``history`` per-epoch loss terms, arrays [n_folds, k, epochs]; ``latent`` (gimVI)
    per fold the ``(reference, spatial)`` posterior means of the model that held it out;
    ``stream_info`` (gimVI with the reference on disk) per fold the streamed loop's
    timing (:func:`jaxsel.engine.fit_stream`).
    """

    genes: np.ndarray
    imputed: np.ndarray
    std: np.ndarray
    truth: np.ndarray
    pcc: np.ndarray
    spearman: np.ndarray
    rmse: np.ndarray
    jsd: np.ndarray
    fold_of_gene: np.ndarray
    history: dict
    latent: list | None = None
    stream_info: list | None = None

    def medians(self) -> dict:
        """Median PCC, Spearman, RMSE and JSD over the held-out genes (NaN correlations of
        constant genes ignored)."""
        return {m: float(np.nanmedian(getattr(self, m))) for m in _SCORES}


class StAI(PersistMixin, BaseEstimator):
    """stAI: impute unmeasured genes of spatial cells from a reference, and annotate them.

    Parameters
    ----------
    n_calibration_folds : int, default 5
        ``k``: the measured genes are split into ``k`` folds; submodel ``j`` learns to
        impute fold ``j`` from the others, and the final imputation averages the ``k``.
    task : {"impute", "annotate"}, default "impute"
        Loss-weight and epoch preset: the authors' ``osmFISH_impute.yaml`` (500 epochs;
        recon 1, MMD 0.1, cos 1, impute 1, clf 0.1, gene 0) or ``osmFISH_annotate.yaml``
        (300 epochs; clf 10, impute 2, gene 1, cross-entropy weighted ``1 / count^2``).
    epochs : int, optional
        Full-batch Adam steps per submodel (default from ``task``).
    hidden, latent : int, default 64, 16
    n_neighbors : int, default 10
        Spatial kNN graph of the GAT encoder (the cell itself is added).
    top_k : int, default 50
        Reference cells each spatial cell imputes from (``attention="euclidean"``).
    attention : {"euclidean", "dot"}, default "euclidean"
        Softmax over negative latent distances, or learnable scaled dot-product.
    gene_loss : {"cosine", "frobenius"}, default "cosine"
        Form of the gene-consistence term (the released code's / the paper's).
    loss_weights : dict, optional
        Overrides of the preset's weights, keys among ``recon, mmd, cos, impute, clf,
        gene``.
    learning_rate : float, default 0.002
    class_weight_power : float, optional
        Cross-entropy class weights ``1 / count^p`` (default 2 for ``"annotate"``, the
        authors' configuration, else 0). On osmFISH's 12 unbalanced types, 2 favours
        rare types (accuracy 0.50, macro F1 0.42) where 1 gives accuracy 0.72 and
        macro F1 0.47 (``benchmarks/bench_stai.py --class-weight-powers``).
    unlabeled_category : optional
        The label value of reference cells with no cell type (scvi-tools' name for it;
        STARmap's ``"NA"``, say). Those cells take part in every term but the
        classifier's cross-entropy, and it is not a class: it is not in ``classes_`` and
        never predicted. ``None`` (default): every label is a class. A value no label
        has changes nothing.
    counts : bool, default True
        Inputs are counts (non-negative): each dataset is normalised to 1e4 per cell and
        ``log1p``-transformed (the spatial data over its shared genes, the reference over
        all its genes). With ``False`` they are taken as already log-normalised.
    min_shared_genes : int, default 10
        Fewer shared genes than this is an error.
    chunk : int, default 1024
        Spatial cells per inference chunk (bounds the ``chunk x n_ref`` similarities).
    batch_size : int, None or "auto", default "auto"
        Models trained at once per device (``lax.map`` over the rest, still one compiled
        program); ``None`` vmaps all of them. ``"auto"`` is 1 on CPU, where one model's
        full-batch step already fills the cores (osmFISH split, 5 submodels: 0.091 s per
        submodel-epoch one at a time against 0.127 s vmapped), and ``None`` on GPU/TPU.
    random_state : int, default 0
    verbose : bool, default False
        Print a progress line (epoch, training loss over the models, time) from inside the
        compiled fit, at most once a second (:mod:`jaxsel.engine.progress`).

    Notes
    -----
    The submodels (and, in :meth:`cross_validate_genes`, the held-out gene folds) are a
    leading axis of one compiled program, sharded over all visible devices with
    ``jax.shard_map``. On a multi-core CPU, exposing the cores as devices
    (``JAX_NUM_CPU_DEVICES=2`` before JAX starts) lets one device's single-threaded steps
    (the top-k neighbour search) overlap the other's work; results do not depend on the
    device count (bit for bit, ``tests/test_multidevice.py``). Known problem: on 2 CPU devices the process's
    resident memory grows with the number of epochs (osmFISH protocol, 55 models: +2 GB
    after 20 epochs, 24 GB after about 35 minutes at 500 epochs), while on one device it
    stays flat (+0.7 GB at 20 and at 60 epochs); keep long CPU runs on one device. The
    growth is XLA:CPU's: ``benchmarks/bench_multidevice_rss.py`` reproduces it without
    jaxsel (the gradient of a ``lax.scan``, like the MMD's tiles, in a loop sharded over
    two CPU devices).

    Data on disk: ``X_spatial`` and ``X_ref`` may each be an ``.h5ad`` / ``.zarr`` path, a
    backed AnnData, an h5py/zarr array or a :class:`jaxsel.streaming.RowSource` of the
    stored values. Training is full batch on every cell, as in the paper, so the inputs
    are held in memory, but only the genes the model uses: one pass over each file, in
    blocks (:func:`jaxsel.streaming.read_columns`), keeps the shared genes and the
    ``genes`` to impute, and every cell's total over *all* its genes for the
    normalisation. A large scRNA-seq atlas against a small spatial panel therefore costs
    ``n_ref x (G + len(genes))`` floats, not ``n_ref x n_ref_genes``; pass ``genes`` (the
    default keeps every reference gene the panel lacks). The result equals the in-memory
    fit bit for bit.

    Attributes
    ----------
    shared_genes_ : [G] gene names the model sees (spatial order).
    imputable_genes_ : reference genes :meth:`impute` can return.
    calibration_genes_ : list of ``k`` arrays of gene names.
    classes_ : reference cell types (when labels were given).
    params_ : per-submodel parameters (leading [k] axis); ``history_``: per-epoch loss
        terms, numpy [k, epochs].
    """

    def __init__(
        self,
        n_calibration_folds=5,
        *,
        task="impute",
        epochs=None,
        hidden=64,
        latent=16,
        n_neighbors=10,
        top_k=50,
        attention="euclidean",
        gene_loss="cosine",
        loss_weights=None,
        learning_rate=0.002,
        class_weight_power=None,
        unlabeled_category=None,
        counts=True,
        min_shared_genes=10,
        chunk=1024,
        batch_size="auto",
        random_state=0,
        verbose=False,
    ):
        self.n_calibration_folds = n_calibration_folds
        self.task = task
        self.epochs = epochs
        self.hidden = hidden
        self.latent = latent
        self.n_neighbors = n_neighbors
        self.top_k = top_k
        self.attention = attention
        self.gene_loss = gene_loss
        self.loss_weights = loss_weights
        self.learning_rate = learning_rate
        self.class_weight_power = class_weight_power
        self.unlabeled_category = unlabeled_category
        self.counts = counts
        self.min_shared_genes = min_shared_genes
        self.chunk = chunk
        self.batch_size = batch_size
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ configuration

    def _config(self, n_genes: int, n_classes: int, has_labels: bool, n_inputs: int | None = None) -> st.StAIConfig:
        if self.task not in _TASKS:
            raise ValueError(f"task must be one of {_TASKS}, got {self.task!r}.")
        for name in ("hidden", "latent", "top_k"):
            check_int(getattr(self, name), name, 1)
        check_real(self.learning_rate, "learning_rate", low=0.0, low_open=True)
        kw = dict(hidden=int(self.hidden), latent=int(self.latent), top_k=int(self.top_k),
                  attention=self.attention, gene_loss=self.gene_loss, learning_rate=float(self.learning_rate),
                  n_inputs=(n_inputs or n_genes) - (n_inputs or n_genes) // int(self.n_calibration_folds))
        if self.epochs is not None:
            kw["epochs"] = check_int(self.epochs, "epochs", 1)
        kw["progress"] = progress_label(self)
        if self.loss_weights is not None and not isinstance(self.loss_weights, dict):
            raise TypeError(f"loss_weights must be a dict, got {type(self.loss_weights).__name__}.")
        weights = dict(self.loss_weights or {})
        for k, v in weights.items():
            if k not in _LAMBDAS:
                raise ValueError(f"loss_weights keys must be among {_LAMBDAS}, got {k!r}.")
            kw[f"lam_{k}"] = check_real(v, f"loss_weights[{k!r}]", low=0.0)
        if not has_labels:
            if self.task == "annotate":
                raise ValueError("labels are required for task='annotate'.")
            kw["lam_clf"] = 0.0  # no classifier term without reference labels
        try:
            if self.task == "annotate":
                return st.StAIConfig.annotation(n_genes, n_classes, **kw)
            return st.StAIConfig(n_genes, n_classes, **kw)
        except ValueError as err:
            raise ValueError(str(err)) from None

    def _class_power(self) -> float:
        if self.class_weight_power is None:
            return 2.0 if self.task == "annotate" else 0.0
        return check_real(self.class_weight_power, "class_weight_power", low=0.0)

    # ------------------------------------------------------------------ inputs

    def _inputs(self, X_spatial, X_ref, labels, coords, spatial_genes, ref_genes, genes):
        """Validated, preprocessed arrays (host side); nothing of the caller's is modified."""
        k = check_int(self.n_calibration_folds, "n_calibration_folds", 2)
        check_int(self.n_neighbors, "n_neighbors", 1)
        check_bool(self.counts, "counts")
        with contextlib.ExitStack() as stack:
            xs, xr = (stack.enter_context(streaming.open_source(x, name)) if streaming.is_source(x)
                      else self._in_memory(x, name) for x, name in ((X_spatial, "X_spatial"), (X_ref, "X_ref")))
            return self._checked_inputs(k, xs, xr, labels, coords, spatial_genes, ref_genes, genes)

    def _in_memory(self, x, name):
        x = check_matrix(x, name=name, dtype=None)
        if self.counts:  # normalised per cell: counts must be non-negative
            check_values(x.data if sp.issparse(x) else x, name, nonnegative=True, hint=_COUNTS_HINT)
        return x

    def _read_columns(self, src, columns, name, fn=None):
        """One pass over ``src`` on disk (:func:`jaxsel.streaming.read_columns`): ``(the
        values of these columns, raw or ``fn(values, totals)`` block by block, every
        cell's total over all its genes)``."""
        rows = streaming.budget_rows(streaming.DEFAULT_MEMORY_BUDGET, 4 * src.n_vars, cap=streaming.DEFAULT_CHUNK_SIZE)
        return streaming.read_columns(src, columns, block_rows=rows, name=name, nonnegative=bool(self.counts),
                                      hint=_COUNTS_HINT, fn=fn)

    def _checked_inputs(self, k, xs, xr, labels, coords, spatial_genes, ref_genes, genes):
        sp_names = _check_gene_names(spatial_genes, xs.shape[1], "spatial_genes")
        ref_names = _check_gene_names(ref_genes, xr.shape[1], "ref_genes")
        ref_pos = {g: i for i, g in enumerate(ref_names)}
        sp_shared = np.array([i for i, g in enumerate(sp_names) if g in ref_pos], dtype=np.int64)
        n_shared = sp_shared.size
        min_shared = check_int(self.min_shared_genes, "min_shared_genes", 1)
        if n_shared < max(min_shared, k + 1):
            raise ValueError(
                f"only {n_shared} of the {sp_names.size} spatial genes are in the reference (by name); "
                f"need at least {max(min_shared, k + 1)} (min_shared_genes={min_shared}, "
                f"n_calibration_folds={k}). Check that both use the same gene naming (symbols vs ids, case)."
            )
        shared = sp_names[sp_shared]
        ref_shared = np.array([ref_pos[g] for g in shared], dtype=np.int64)
        if genes is None:
            in_spatial = set(shared.tolist())
            extra = np.array([i for i, g in enumerate(ref_names) if g not in in_spatial], dtype=np.int64)
        else:
            req = np.asarray([genes] if isinstance(genes, str) else list(genes)).astype(str)
            missing = [g for g in req if g not in ref_pos]
            if missing:
                raise ValueError(f"genes not in the reference: {missing[:10]}{' ...' if len(missing) > 10 else ''}.")
            extra = np.array([ref_pos[g] for g in req], dtype=np.int64)
        c = _check_coords(coords, xs.shape[0])
        if self.n_neighbors >= xs.shape[0]:
            raise ValueError(f"n_neighbors ({self.n_neighbors}) must be smaller than the number of spatial cells "
                             f"({xs.shape[0]}).")
        if xr.shape[0] < 2 or xs.shape[0] < 2:
            raise ValueError("X_spatial and X_ref need at least 2 cells each.")
        if labels is not None:
            codes, classes = self._label_codes(labels, xr.shape[0])
        else:
            codes, classes = np.zeros(xr.shape[0], np.int64), None
        # only the columns the model uses are read (from disk) and log-normalised, each cell
        # over all its genes as the released code does: log_normalize(X_ref)[:, columns]
        if isinstance(xs, streaming.RowSource):
            x_sp = self._read_columns(xs, sp_shared, "X_spatial")[0]
        else:
            x_sp = xs[:, sp_shared]
        cols = np.concatenate([ref_shared, extra])
        if isinstance(xr, streaming.RowSource):  # normalised block by block into one array
            ref_log = self._read_columns(xr, cols, "X_ref", lambda v, t: preprocessing.log_normalize(
                v, counts=self.counts, name="X_ref", totals=t))[0]
        else:
            ref_log = preprocessing.log_normalize(xr, counts=self.counts, name="X_ref", columns=cols)
        return dict(k=k, shared=shared, x_sp=x_sp, ref_shared_log=ref_log[:, :n_shared],
                    ref_extra_log=ref_log[:, n_shared:], ref_names=ref_names, extra=extra, coords=c,
                    codes=codes, classes=classes)

    def _label_codes(self, labels, n_ref):
        """``(codes, classes)`` of the reference labels; cells of ``unlabeled_category``
        get the code ``len(classes)`` (no class)."""
        codes, classes = check_labels(labels, n_ref, name="labels", min_classes=1, hint=(
            " Reference cells without a cell type: give them one label value (e.g. 'unknown') and pass it as "
            "unlabeled_category."))
        u = self.unlabeled_category
        if u is not None and (np.ndim(u) != 0 or isinstance(u, (dict, set))):
            raise TypeError(f"unlabeled_category must be one label value (a str or number), got {type(u).__name__}.")
        if isinstance(u, float) and np.isnan(u):
            raise ValueError("unlabeled_category cannot be NaN: labels may not be missing; give the cells without "
                             "a type one label value (e.g. 'unknown') and pass that.")
        hit = np.array([], np.int64) if u is None else np.flatnonzero(classes == u)
        if hit.size:
            j = int(hit[0])
            classes = np.delete(classes, j)
            codes = np.where(codes == j, classes.size, codes - (codes > j)).astype(codes.dtype)
        if classes.size < 2:
            raise ValueError(f"labels must contain at least 2 distinct classes"
                             f"{' besides unlabeled_category' if hit.size else ''}, found {classes.size} "
                             f"({classes[:5].tolist()}).")
        return codes, classes

    def _data(self, x1, x2, codes, n_classes, neighbours):
        cw = st.class_weights(jnp.asarray(codes), n_classes, self._class_power(),
                              unlabeled=bool(np.any(np.asarray(codes) == n_classes)))
        return st.StAIData(jnp.asarray(x1), jnp.asarray(neighbours, jnp.int32), jnp.asarray(x2),
                           jnp.asarray(codes, jnp.int32), cw)

    def _batch_size(self):
        return fold_batch_size(self.batch_size)

    def _fit_models(self, cfg, data, fit_masks, cal_masks, x1_index, seed, checkpoint=None, every=None):
        keys = jax.random.split(jax.random.key(seed), fit_masks.shape[0])
        idx = None if x1_index is None else jnp.asarray(x1_index, jnp.int32)
        fm, cm = jnp.asarray(fit_masks), jnp.asarray(cal_masks)
        kw = dict(batch_size=self._batch_size(), mesh=engine.fold_mesh())
        if checkpoint is None:
            params, hist = st.fit(cfg, keys, data, fm, cm, idx, **kw)
        else:
            digest = engine.fingerprint("StAI", fit_settings(self), seed, data, fm, cm, idx)

            def segment(state, stop_after):  # (result, checkpoint): here both the state
                state = st.resume(cfg, data, fm, cm, state, stop_after, idx, **kw)
                return state, state

            state = engine.run_checkpointed(lambda: st.start(cfg, keys, data, idx, **kw), segment, checkpoint, every,
                                            digest, max_epochs=cfg.epochs)
            params, hist = state.params, state.history
        engine.check_history(jax.device_get(hist), model="StAI", stopped=False, hint="Lower learning_rate, or check "
                             "that the inputs are expression on the scale the `counts` setting says.")
        return params, hist

    # ------------------------------------------------------------------ fit

    def fit(self, X_spatial, X_ref, labels=None, *, coords, spatial_genes, ref_genes, genes=None, checkpoint=None,
            checkpoint_every=50):
        """Fit the ``k`` calibration submodels (one compiled program).

        Parameters
        ----------
        X_spatial : [n_spatial, n_spatial_genes] spatial expression (counts unless
            ``counts=False``); dense, sparse or DataFrame, or on disk (an ``.h5ad`` /
            ``.zarr`` path, a backed AnnData, ...: only the genes the model uses are
            read; see the class Notes).
        X_ref : [n_ref, n_ref_genes] reference expression, in memory or on disk.
        labels : [n_ref] reference cell types, optional (required for ``annotate``).
        coords : [n_spatial, 2 or 3] spatial coordinates.
        spatial_genes, ref_genes : gene names of the columns; the model uses the spatial
            genes found in the reference.
        genes : reference genes :meth:`impute` will be asked for (default: every
            reference gene the spatial data lacks); only these are kept after ``fit``.
        checkpoint : path, optional
            Train in segments of ``checkpoint_every`` epochs, writing every submodel's
            state (parameters, Adam state, loss history, next epoch) to this ``.npz``
            after each; called again with the same path, settings and data, ``fit``
            continues from the file, and the result equals an uninterrupted fit bit for
            bit. A file written for other settings or data is a ``ValueError``.
        checkpoint_every : int, default 50
            Epochs per segment (one compiled program serves all of them).
        """
        seed = check_random_state(self.random_state)
        d = self._inputs(X_spatial, X_ref, labels, coords, spatial_genes, ref_genes, genes)
        n_classes = 1 if d["classes"] is None else len(d["classes"])
        G, k = d["shared"].size, d["k"]
        cfg = self._config(G, n_classes, d["classes"] is not None)
        x1, x2 = preprocessing.stai_recipe(d["x_sp"], d["ref_shared_log"], counts=self.counts)
        neighbours = preprocessing.spatial_knn_graph(d["coords"], k=int(self.n_neighbors))
        folds = datasets.gene_folds(G, k, random_state=seed)
        fit_masks, cal_masks = _gene_masks(G, folds)
        data = self._data(x1, x2, d["codes"], n_classes, neighbours)
        params, hist = self._fit_models(cfg, data, fit_masks, cal_masks, None, seed, checkpoint, checkpoint_every)
        self.cfg_ = cfg
        self.params_ = params
        self.history_ = {name: np.asarray(v) for name, v in hist.items()}
        self.shared_genes_ = d["shared"]
        self.calibration_genes_ = [d["shared"][f] for f in folds]
        self.imputable_genes_ = d["ref_names"][d["extra"]]
        self.classes_ = d["classes"]
        self.n_spatial_ = x1.shape[0]
        self._data_ = data
        self._masks = jnp.asarray(fit_masks)
        self._values = jnp.asarray(d["ref_extra_log"])
        self._value_index = {g: i for i, g in enumerate(self.imputable_genes_)}
        return self

    # ------------------------------------------------------------------ inference

    def _check_chunk(self) -> int:
        return check_int(self.chunk, "chunk", 1)

    def impute_submodels(self, genes=None):
        """Every submodel's imputation, ``[k, n_spatial, n_genes]`` (log-normalised scale)."""
        check_is_fitted(self, "params_")
        if genes is None:
            cols = np.arange(len(self.imputable_genes_))
        else:
            req = [genes] if isinstance(genes, str) else list(genes)
            missing = [g for g in req if str(g) not in self._value_index]
            if missing:
                raise ValueError(f"genes were not kept at fit time: {missing[:10]}; pass them as fit(..., genes=).")
            cols = np.array([self._value_index[str(g)] for g in req], dtype=np.int64)
            if cols.size == 0:
                raise ValueError("genes must name at least one gene.")
        if cols.size == 0:
            raise ValueError("no genes to impute: the reference has no genes beyond the shared ones.")
        # pad the gene count to a power of two: a few compiled programs serve every request
        width = 1 << int(np.ceil(np.log2(cols.size)))
        vals = self._values[:, np.concatenate([cols, np.full(width - cols.size, cols[0])])]
        out = st.impute(self.cfg_, self.params_, self._data_, self._masks, vals, chunk=self._check_chunk(),
                        batch_size=self._batch_size())
        return np.asarray(out)[..., : cols.size]

    def impute(self, genes=None, *, return_std=False):
        """Imputed expression of ``genes`` for the spatial cells, ``[n_spatial, n_genes]``:
        the mean over the ``k`` submodels, on the reference's log-normalised scale. With
        ``return_std`` also the standard deviation across submodels (an uncertainty per
        value; not in the paper)."""
        sub = self.impute_submodels(genes)
        mean = sub.mean(0)
        return (mean, sub.std(0)) if return_std else mean

    def predict_proba(self):
        """Cell-type probabilities of the spatial cells, ``[n_spatial, n_classes]`` (mean
        over submodels; classifier trained on the reference latent)."""
        check_is_fitted(self, "params_")
        if self.classes_ is None:
            raise ValueError("annotation needs reference labels: fit(..., labels=...).")
        prob = st.annotate(self.cfg_, self.params_, self._data_, self._masks, batch_size=self._batch_size())
        return np.asarray(prob).mean(0)

    def annotate(self, *, return_proba=False):
        """Predicted cell type of every spatial cell (reference label names)."""
        prob = self.predict_proba()
        labels = np.asarray(self.classes_)[prob.argmax(1)]
        return (labels, prob) if return_proba else labels

    def embed(self):
        """Per-submodel latent representations ``(z_spatial [k, n_spatial, latent],
        z_ref [k, n_ref, latent])``."""
        check_is_fitted(self, "params_")
        z1, z2 = st.embed(self.cfg_, self.params_, self._data_, self._masks, batch_size=self._batch_size())
        return np.asarray(z1), np.asarray(z2)

    def score_annotation(self, y_true, *, unknown="error"):
        """Accuracy and macro / weighted F1 of :meth:`annotate` against the spatial cells'
        true types. Types absent from the reference are an error (``unknown="error"``) or
        their cells are left out (``"ignore"``; e.g. STARmap's unassigned ``NA``). Cells
        labelled ``unlabeled_category`` have no type to score and are always left out."""
        check_is_fitted(self, "params_")
        y = np.asarray(y_true).reshape(-1)
        if y.size != self.n_spatial_:
            raise ValueError(f"y_true must have one label per spatial cell ({self.n_spatial_}), got {y.size}.")
        if unknown not in ("error", "ignore"):
            raise ValueError(f"unknown must be 'error' or 'ignore', got {unknown!r}.")
        # labels compared as strings, as with classes_ below
        keep = np.ones(y.size, bool) if self.unlabeled_category is None else y.astype(str) != str(
            self.unlabeled_category)
        if not keep.any():
            raise ValueError("every cell of y_true is unlabeled_category; nothing to score.")
        y = y[keep]
        known = np.isin(y.astype(str), np.asarray(self.classes_).astype(str))
        if not known.all() and unknown == "error":
            bad = sorted(set(y[~known].astype(str).tolist()))
            raise ValueError(f"y_true has cell types absent from the reference labels: {bad[:10]}; pass "
                             f"unknown='ignore' to leave those cells out.")
        if not known.any():
            raise ValueError("none of the cell types in y_true are reference labels; nothing to score.")
        pred = self.annotate()[keep]
        return metrics.annotation_scores(y[known], pred[known])

    # ------------------------------------------------------------------ protocol

    def cross_validate_genes(self, X_spatial, X_ref, labels=None, *, coords, spatial_genes, ref_genes,
                             gene_folds=None, checkpoint=None, checkpoint_every=50):
        """Held-out gene evaluation: every shared gene imputed by models that never saw it.

        ``gene_folds``: ``None`` for leave-one-gene-out, an int ``n`` for ``n`` shuffled
        gene folds (:func:`jaxsel.datasets.gene_folds`), or a list of gene-name lists. For
        each held-out fold, the spatial data is normalised over its remaining genes and
        ``k`` calibration submodels are trained on them; all ``n_folds x k`` models are one
        compiled program (``batch_size`` at a time). The estimator itself is not refitted.
        ``checkpoint`` / ``checkpoint_every``: as in :meth:`fit`, for all the models at
        once. Returns a :class:`GeneCVResult`.
        """
        seed = check_random_state(self.random_state)
        d = self._inputs(X_spatial, X_ref, labels, coords, spatial_genes, ref_genes, genes=[])
        shared, G, k = d["shared"], d["shared"].size, d["k"]
        held = _held_out_folds(gene_folds, shared, seed)
        if any(G - h.size < k + 1 for h in held):
            raise ValueError(f"a held-out fold leaves fewer than n_calibration_folds + 1 = {k + 1} input genes.")
        n_classes = 1 if d["classes"] is None else len(d["classes"])
        ref_shared = d["ref_shared_log"]
        x2 = preprocessing.scale(ref_shared)[0]
        # the spatial input of each held-out fold is normalised over its remaining genes
        x1 = np.zeros((len(held), d["x_sp"].shape[0], G), np.float32)
        fit_masks, cal_masks, x1_index = [], [], []
        for f, h in enumerate(held):
            keep = np.setdiff1d(np.arange(G), h)
            x1[f][:, keep] = preprocessing.stai_recipe(d["x_sp"][:, keep], ref_shared[:, keep], counts=self.counts)[0]
            fm, cm = _gene_masks(G, datasets.gene_folds(keep.size, k, random_state=seed + f), allowed=keep)
            fit_masks.append(fm)
            cal_masks.append(cm)
            x1_index += [f] * k
        cfg = self._config(G, n_classes, d["classes"] is not None, n_inputs=int(np.median([G - h.size for h in held])))
        neighbours = preprocessing.spatial_knn_graph(d["coords"], k=int(self.n_neighbors))
        data = self._data(x1, x2, d["codes"], n_classes, neighbours)
        fm_all, cm_all = np.concatenate(fit_masks), np.concatenate(cal_masks)
        params, hist = self._fit_models(cfg, data, fm_all, cm_all, np.asarray(x1_index), seed, checkpoint,
                                        checkpoint_every)
        values = jnp.asarray(ref_shared)
        sub = np.asarray(st.impute(cfg, params, data, jnp.asarray(fm_all), values, jnp.asarray(x1_index, jnp.int32),
                                   chunk=self._check_chunk(), batch_size=self._batch_size()))
        sub = sub.reshape(len(held), k, *sub.shape[1:])
        imputed = np.full((d["x_sp"].shape[0], G), np.nan, np.float32)
        std = np.full_like(imputed, np.nan)
        fold_of_gene = np.full(G, -1, np.int64)
        for f, h in enumerate(held):
            imputed[:, h] = sub[f].mean(0)[:, h]
            std[:, h] = sub[f].std(0)[:, h]
            fold_of_gene[h] = f
        truth = preprocessing.log_normalize(d["x_sp"], counts=self.counts, name="X_spatial")
        done = np.flatnonzero(fold_of_gene >= 0)
        scores = {m: np.full(G, np.nan) for m in _SCORES}
        for m, v in metrics.imputation_scores(truth[:, done], imputed[:, done]).items():
            scores[m][done] = v
        history = {name: np.asarray(v).reshape(len(held), k, -1) for name, v in hist.items()}
        return GeneCVResult(genes=shared, imputed=imputed, std=std, truth=np.asarray(truth), **scores,
                            fold_of_gene=fold_of_gene, history=history)


# ============================================================================= gimVI


_GIMVI_STRUCT = ("n_latent", "hidden", "n_layers_individual", "n_layers_shared", "decoder_layers", "dropout",
                 "seq_likelihood", "spatial_likelihood", "dispersion", "adversarial")


def _counts_matrix(x, name: str) -> np.ndarray:
    """Dense float32 raw counts (non-negative integers; NaN, inf and fractions rejected).
    Data on disk (:func:`jaxsel.streaming.is_source`) is read whole, in blocks: the
    caller holds it in memory (gimVI's spatial cells, every one in every step)."""
    if streaming.is_source(x):
        with streaming.open_source(x, name) as src:
            x = streaming.read_columns(src, None, name=name)[0]
    return to_dense(check_matrix(x, name=name, dtype=np.float32, require_counts=True), name=name, dtype=np.float32)


def _zero_library(x, name: str, what: str = "") -> None:
    lib = x.sum(1)
    bad = np.flatnonzero(lib <= 0)
    if bad.size:
        raise ValueError(
            f"{name} has {bad.size} cell(s) with no counts{what} (rows {bad[:10].tolist()}"
            f"{' ...' if bad.size > 10 else ''}); gimVI's likelihood needs a positive library size: "
            "filter them out first."
        )


def _gimvi_genes(ref_genes, spatial_genes, n_ref_genes: int, n_sp_genes: int):
    """Checked gene names of both datasets and each reference gene's column:
    ``(ref_names, sp_names, {name: column})``; every spatial gene must be a reference gene."""
    ref_names = _check_gene_names(ref_genes, n_ref_genes, "ref_genes")
    sp_names = _check_gene_names(spatial_genes, n_sp_genes, "spatial_genes")
    pos = {g: i for i, g in enumerate(ref_names)}
    missing = [g for g in sp_names if g not in pos]
    if missing:
        raise ValueError(
            f"{len(missing)} of the {sp_names.size} spatial genes are not in the reference (by name), e.g. "
            f"{missing[:10]}; gimVI models the spatial genes as a subset of the reference's. Subset "
            "X_spatial to the shared genes, and check both use the same naming (symbols vs ids, case)."
        )
    return ref_names, sp_names, pos


def _train_val(n: int, train_size: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """scvi-tools' split: ``ceil(train_size * n)`` training cells, the rest validation; with
    ``train_size=1`` the validation ELBO is taken on the training cells."""
    perm = rng.permutation(n)
    n_train = min(n, int(np.ceil(train_size * n)))
    if n_train == n:
        return perm, perm
    return perm[:n_train], perm[n_train:]


class GimVI(PersistMixin, BaseEstimator):
    """gimVI: a joint VAE of scRNA-seq and spatial counts that imputes genes the spatial
    assay did not measure, with a posterior uncertainty (Lopez et al. 2019).

    Parameters (defaults from scvi-tools' ``GIMVI``, ``JVAE`` and ``GIMVI.train``, except
    ``spatial_likelihood``; see :mod:`jaxsel.methods.gimvi` for the model)
    ----------
    n_latent : int, default 10
    hidden : int, default 64
        Width of the encoder layers.
    n_layers_individual, n_layers_shared : int, default 1, 1
        Encoder layers per dataset (at least 1: they bring both datasets' genes to
        ``hidden``), then shared (0 or more).
    decoder_layers : int, default 0
        Hidden decoder layers conditioned on the dataset (scvi-tools: 0; the paper's
        decoder is conditioned: 1).
    dropout : float, default 0.2
    seq_likelihood : {"zinb", "nb"}, default "zinb"
    spatial_likelihood : {"poisson", "nb"}, default "poisson"
        The paper's choice for smFISH-like data (scvi-tools defaults to NB).
    dispersion : {"gene-batch", "gene"}, default "gene-batch"
    adversarial : bool, default True
        Train the dataset classifier on ``z`` and fool it with weight ``kappa``.
    kappa : float, default 5.0
    max_epochs : int, default 200
    batch_size : int, default 128
        Cells per step from each dataset.
    learning_rate, weight_decay : float, default 1e-3, 1e-6
    n_epochs_kl_warmup : float, default 400
        KL weight ``min(1, epoch / n_epochs_kl_warmup)``.
    train_size : float, default 0.9
        Fraction of each dataset's cells trained on; the rest give the validation ELBO in
        ``history_["val_loss"]``.
    model_batch_size : int, None or "auto", default "auto"
        Models trained at once in :meth:`cross_validate_genes` (``lax.map`` over the
        rest, one program); ``"auto"``: one at a time on CPU (measured faster than
        vmapped there), all vmapped on accelerators.
    chunk : int, default 512
        Spatial cells per inference chunk.
    random_state : int, default 0
    chunk_size : int, default 16384
        Reference cells per chunk when ``X_ref`` is streamed from disk (see Notes); also
        the largest reference validation set of a streamed fit.
    memory_budget : int or None, default 2**28 (256 MiB)
        Bytes of the largest decoded intermediate of :meth:`impute` and :meth:`latent`:
        the spatial cells are decoded in chunks of at most ``chunk`` cells that fit it,
        and only the requested genes of each chunk are kept, so the decoded ``[cells,
        genes]`` matrices never exceed it (the returned ``[cells, requested genes]``
        arrays are the output). ``None``: one pass over all cells.
    verbose : bool, default False
        Print a progress line (epoch, training and validation loss, time) to stderr
        from inside the compiled fit, at most once a second.

    Notes
    -----
    A reference larger than memory: ``fit`` accepts for ``X_ref`` an ``.h5ad`` /
    ``.zarr`` path, a backed AnnData, an h5py/zarr array or a
    :class:`jaxsel.streaming.RowSource` of raw counts, and streams it
    (:func:`jaxsel.methods.gimvi.fit_stream`): one pass checks the counts and computes
    the library-size prior, then every epoch reads the reference in chunks of
    ``chunk_size`` cells in a background thread while the device trains on the previous
    chunk (minibatches shuffled within a chunk); the spatial cells stay in memory. The
    fitted model keeps no reference cells (pass ``X`` to ``latent(modality="reference")``,
    which streams an on-disk ``X`` too). :meth:`cross_validate_genes` streams an on-disk
    reference the same way. ``X_spatial`` may be on disk too: it is read into memory in
    blocks, since every step trains on all spatial cells.

    Attributes
    ----------
    genes_ : [G] reference genes (the model's output genes).
    spatial_genes_ : [G'] spatial genes (a subset of ``genes_``).
    imputable_genes_ : reference genes the spatial data lacks.
    history_ : per-epoch ``train_loss`` (ELBO + ``kappa`` x fooling loss), ``train_rec``,
        ``train_kl``, ``train_fool``, ``train_adversary``, ``val_loss`` (negative ELBO
        per cell), ``val_rec``, ``val_kl``.
    params_, state_ : fitted parameters and BatchNorm statistics.

    Examples
    --------
    >>> model = jaxsel.GimVI(max_epochs=200).fit(X_ref, X_spatial, ref_genes=ref_names,
    ...                                           spatial_genes=spatial_names)
    >>> mean, var = model.impute(["Gad2", "Plp1"], n_samples=50)
    """

    # save() leaves out the reference counts kept for latent(modality="reference")
    _persist_skip = {"_x_ref": None}

    def __init__(
        self,
        n_latent=10,
        *,
        hidden=64,
        n_layers_individual=1,
        n_layers_shared=1,
        decoder_layers=0,
        dropout=0.2,
        seq_likelihood="zinb",
        spatial_likelihood="poisson",
        dispersion="gene-batch",
        adversarial=True,
        kappa=5.0,
        max_epochs=200,
        batch_size=128,
        learning_rate=1e-3,
        weight_decay=1e-6,
        n_epochs_kl_warmup=400,
        train_size=0.9,
        model_batch_size="auto",
        chunk=512,
        random_state=0,
        chunk_size=streaming.DEFAULT_CHUNK_SIZE,
        memory_budget=streaming.DEFAULT_MEMORY_BUDGET,
        verbose=False,
    ):
        self.n_latent = n_latent
        self.hidden = hidden
        self.n_layers_individual = n_layers_individual
        self.n_layers_shared = n_layers_shared
        self.decoder_layers = decoder_layers
        self.dropout = dropout
        self.seq_likelihood = seq_likelihood
        self.spatial_likelihood = spatial_likelihood
        self.dispersion = dispersion
        self.adversarial = adversarial
        self.kappa = kappa
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.n_epochs_kl_warmup = n_epochs_kl_warmup
        self.train_size = train_size
        self.model_batch_size = model_batch_size
        self.chunk = chunk
        self.random_state = random_state
        self.chunk_size = chunk_size
        self.memory_budget = memory_budget
        self.verbose = verbose

    # ------------------------------------------------------------------ configuration

    def _config(self, n_genes: int, n_spatial: int) -> gv.GimVIConfig:
        for name in ("n_latent", "hidden"):
            check_int(getattr(self, name), name, 1)
        check_int(self.n_layers_individual, "n_layers_individual", 1)  # the heads map G and G' genes to `hidden`
        for name in ("n_layers_shared", "decoder_layers"):
            check_int(getattr(self, name), name, 0)
        check_real(self.dropout, "dropout", low=0.0, high=1.0, high_open=True)
        check_bool(self.adversarial, "adversarial")
        kw = dict(n_latent=int(self.n_latent), hidden=int(self.hidden),
                  n_layers_individual=int(self.n_layers_individual), n_layers_shared=int(self.n_layers_shared),
                  decoder_layers=int(self.decoder_layers), dropout=float(self.dropout),
                  seq_likelihood=self.seq_likelihood, spatial_likelihood=self.spatial_likelihood,
                  dispersion=self.dispersion, adversarial=bool(self.adversarial),
                  kappa=check_real(self.kappa, "kappa", low=0.0),
                  learning_rate=check_real(self.learning_rate, "learning_rate", low=0.0, low_open=True),
                  weight_decay=check_real(self.weight_decay, "weight_decay", low=0.0),
                  n_epochs_kl_warmup=check_real(self.n_epochs_kl_warmup, "n_epochs_kl_warmup", low=0.0,
                                                low_open=True))
        try:
            return gv.GimVIConfig(n_genes, n_spatial, **kw)
        except ValueError as err:
            raise ValueError(str(err)) from None

    def _loop(self) -> engine.LoopConfig:
        return engine.LoopConfig(max_epochs=check_int(self.max_epochs, "max_epochs", 1),
                                 batch_size=check_int(self.batch_size, "batch_size", 1), min_epochs=0, patience=None,
                                 progress=progress_label(self))

    def _model_batch_size(self):
        return fold_batch_size(self.model_batch_size, "model_batch_size")

    # ------------------------------------------------------------------ inputs

    def _inputs(self, X_ref, X_spatial, ref_genes, spatial_genes):
        """Validated dense counts with the spatial genes located among the reference's."""
        xr = _counts_matrix(X_ref, "X_ref")
        xs = _counts_matrix(X_spatial, "X_spatial")
        ref_names, sp_names, pos = _gimvi_genes(ref_genes, spatial_genes, xr.shape[1], xs.shape[1])
        if xr.shape[0] < 2 or xs.shape[0] < 2:
            raise ValueError("X_ref and X_spatial need at least 2 cells each.")
        _zero_library(xr, "X_ref")
        _zero_library(xs, "X_spatial", " in the spatial genes")
        train = check_real(self.train_size, "train_size", low=0.0, high=1.0, low_open=True)
        return dict(xr=xr, xs=xs, ref_names=ref_names, sp_names=sp_names,
                    sp_index=np.array([pos[g] for g in sp_names], np.int64), train_size=train)

    def _splits(self, n_ref: int, n_sp: int, train_size: float, seeds):
        tr0, va0, tr1, va1 = [], [], [], []
        for s in seeds:
            rng = np.random.default_rng(s)
            a, b = _train_val(n_ref, train_size, rng)
            c, d = _train_val(n_sp, train_size, rng)
            tr0.append(a), va0.append(b), tr1.append(c), va1.append(d)
        return engine.make_splits(tr0, va0), engine.make_splits(tr1, va1)

    def _program(self, d, masks, seeds):
        """Everything :func:`jaxsel.methods.gimvi.fit` takes for one model per row of
        ``masks`` ([M, G'] observed spatial genes), with split and PRNG seed ``seeds[m]``:
        ``(cfg, models, loop, keys, data, splits)``."""
        cfg = self._config(d["ref_names"].size, d["sp_names"].size)
        log_lib = np.log(d["xr"].sum(1, dtype=np.float64))
        models = gv.make_models(cfg, masks, d["sp_index"], log_lib.mean(), log_lib.var())
        keys = jnp.stack([jax.random.key(int(s)) for s in seeds])
        splits = self._splits(d["xr"].shape[0], d["xs"].shape[0], d["train_size"], seeds)
        return cfg, models, self._loop(), keys, gv.make_data(d["xr"], d["xs"]), splits

    def _fit_models(self, d, masks, seeds, mesh, checkpoint=None, every=10):
        """Fit the models of :meth:`_program` in one compiled program (in checkpointed
        segments when ``checkpoint`` is a path)."""
        cfg, models, loop, keys, data, splits = self._program(d, masks, seeds)
        kw = dict(batch_size=self._model_batch_size(), mesh=mesh)
        if checkpoint is None:
            res = gv.fit(models, loop, keys, data, splits, **kw)
        else:
            digest = engine.fingerprint("GimVI.cross_validate_genes", fit_settings(self), seeds, data, masks, splits)
            res = engine.fit_folds_checkpointed(models, loop, keys, data, splits, path=checkpoint, every=every,
                                                fingerprint=digest, method_batched=True, **kw)
        _check_diverged(res)
        return cfg, models, data, res

    # ------------------------------------------------------------------ fit

    def fit(self, X_ref, X_spatial, *, ref_genes, spatial_genes, checkpoint=None, checkpoint_every=10):
        """Fit gimVI on a scRNA-seq reference and spatial data (raw counts both).

        Parameters
        ----------
        X_ref : [n_ref, G] reference counts (dense, sparse or DataFrame).
        X_spatial : [n_spatial, G'] spatial counts (on disk: read into memory in blocks).
        ref_genes, spatial_genes : gene names of the columns; every spatial gene must be
            a reference gene.
        checkpoint : path, optional
            Train in segments of ``checkpoint_every`` epochs, writing the training state
            to this ``.npz`` file after each, and go on from the file when it exists (an
            interrupted fit); the result equals an uninterrupted fit's bit for bit. A
            file written for other settings or data is a ``ValueError``. With ``X_ref``
            on disk the streamed loop writes it (:func:`jaxsel.engine.fit_stream`), also
            resumed bit for bit; the reference is then identified by its shape, the
            training and validation rows and the validation cells' counts.
        checkpoint_every : int
            Epochs per segment (one compiled program serves all of them).
        """
        seed = check_random_state(self.random_state)
        check_int(self.chunk, "chunk", 1)
        if streaming.is_source(X_ref):
            if checkpoint is not None:  # before the pass over the reference
                checkpoint_every = engine.check_checkpoint_args(checkpoint, checkpoint_every)
            return self._fit_stream(X_ref, X_spatial, ref_genes, spatial_genes, seed, checkpoint, checkpoint_every)
        d = self._inputs(X_ref, X_spatial, ref_genes, spatial_genes)
        masks = np.ones((1, d["sp_names"].size), np.float32)
        first = lambda t: jax.tree.map(lambda a: a[0], t)  # noqa: E731  (the one model of the leading axis)
        if checkpoint is None:
            cfg, models, data, res = self._fit_models(d, masks, [seed], None)
            model, res = first(models), first(res)
        else:
            cfg, models, loop, keys, data, splits = self._program(d, masks, [seed])
            model = first(models)
            digest = engine.fingerprint("GimVI", fit_settings(self), seed, d["xr"], d["xs"], d["ref_names"].tolist(),
                                        d["sp_names"].tolist(), splits)
            res = engine.fit_checkpointed(model, loop, keys[0], data, first(splits), path=checkpoint,
                                          every=checkpoint_every, fingerprint=digest)
            _check_diverged(res)
        self.seed_ = seed
        self._set_fitted(cfg, model, res.params, res.model_state, {k: np.asarray(v) for k, v in res.history.items()},
                         d["ref_names"], d["sp_names"], d["xs"], d["xr"])
        if hasattr(self, "stream_info_"):
            del self.stream_info_
        return self

    def _fit_stream(self, X_ref, X_spatial, ref_genes, spatial_genes, seed, checkpoint=None, checkpoint_every=10):
        """:meth:`fit` with the reference streamed from disk (:mod:`jaxsel.streaming`)."""
        with streaming.open_source(X_ref, "X_ref") as src:
            s = self._stream_setup(src, X_spatial, ref_genes, spatial_genes)
            digest = "" if checkpoint is None else engine.fingerprint(
                "GimVI", fit_settings(self), seed, src.identity(), s["ref_names"].tolist(), s["sp_names"].tolist())
            model, out = self._stream_model(s, src, np.ones(s["sp_names"].size, np.float32), seed, checkpoint,
                                            checkpoint_every, digest)
        res = out.result
        self.seed_ = seed
        self._set_fitted(s["cfg"], model, res.params, res.model_state,
                         {k: np.asarray(v) for k, v in res.history.items()}, s["ref_names"], s["sp_names"], s["xs"],
                         None)
        self.stream_info_ = out.info
        return self

    def _stream_setup(self, src, X_spatial, ref_genes, spatial_genes) -> dict:
        """What every model streamed from the on-disk reference ``src`` shares: checked
        settings and spatial counts, the gene matching, and one pass over the reference
        (its counts checked, the library-size prior)."""
        loop = self._loop()
        chunk = streaming.check_chunk_size(self.chunk_size, loop.batch_size)
        xs = _counts_matrix(X_spatial, "X_spatial")
        ref_names, sp_names, pos = _gimvi_genes(ref_genes, spatial_genes, src.n_vars, xs.shape[1])
        if src.n_obs < 2 or xs.shape[0] < 2:
            raise ValueError("X_ref and X_spatial need at least 2 cells each.")
        _zero_library(xs, "X_spatial", " in the spatial genes")
        train_size = check_real(self.train_size, "train_size", low=0.0, high=1.0, low_open=True)
        stats = streaming.count_stats(src, name="X_ref")
        return dict(chunk=chunk, loop=loop, xs=xs, spatial=gv.stream_prepare({"x": jnp.asarray(xs)}),
                    ref_names=ref_names, sp_names=sp_names,
                    sp_index=np.asarray([pos[g] for g in sp_names], np.int64), train_size=train_size,
                    cfg=self._config(ref_names.size, sp_names.size), log_lib=(stats["log_library_mean"],
                                                                              stats["log_library_var"]))

    def _stream_model(self, s, src, mask, seed, checkpoint, every, digest):
        """One model (observed spatial genes ``mask``, seed ``seed``: its key and the
        splits :meth:`_splits` draws) fitted with the reference streamed from ``src``;
        ``(model, StreamFit)``."""
        chunk = s["chunk"]
        rng = np.random.default_rng(seed)
        tr0, va0 = _train_val(src.n_obs, s["train_size"], rng)
        tr1, va1 = _train_val(s["xs"].shape[0], s["train_size"], rng)
        if va0 is tr0:  # train_size=1: validate on (at most chunk_size of) the training cells
            va0 = np.sort(rng.choice(tr0, min(chunk, tr0.size), replace=False))
            tr0 = np.sort(tr0)
        else:
            tr0, va0 = streaming.cap_validation(tr0, va0, chunk, seed)
        model = gv.GimVIModel(s["cfg"], jnp.asarray(mask, jnp.float32), jnp.asarray(s["sp_index"], jnp.int32),
                              jnp.float32(s["log_lib"][0]), jnp.float32(s["log_lib"][1]))
        sp_split = engine.make_splits([tr1], [va1]).fold(0)

        def read(rows):
            return {"x": src.read_rows(rows)}

        out = gv.fit_stream(model, s["loop"], jax.random.key(seed), read, tr0, va0, s["spatial"], sp_split,
                            chunk_size=chunk, checkpoint=checkpoint, checkpoint_every=every, fingerprint=digest)
        _check_diverged(out.result)
        return model, out

    def _set_fitted(self, cfg, model, params, state, history, ref_names, sp_names, xs, xr=None):
        self.cfg_ = cfg
        self.model_ = model
        self.params_ = params
        self.state_ = state
        self.history_ = history
        self.genes_ = np.asarray(ref_names)
        self.spatial_genes_ = np.asarray(sp_names)
        in_sp = set(self.spatial_genes_.tolist())
        self.imputable_genes_ = np.array([g for g in self.genes_ if g not in in_sp])
        self._gene_index = {g: i for i, g in enumerate(self.genes_)}
        self._x_spatial = jnp.asarray(xs)
        self._x_ref = None if xr is None else jnp.asarray(xr)

    # ------------------------------------------------------------------ inference

    def _gene_columns(self, genes):
        if genes is None:
            if self.imputable_genes_.size == 0:
                raise ValueError("every reference gene is measured in the spatial data; pass genes= explicitly.")
            return np.array([self._gene_index[g] for g in self.imputable_genes_])
        req = [genes] if isinstance(genes, str) else [str(g) for g in genes]
        missing = [g for g in req if g not in self._gene_index]
        if missing:
            raise ValueError(f"genes not in the reference: {missing[:10]}{' ...' if len(missing) > 10 else ''}.")
        if not req:
            raise ValueError("genes must name at least one gene.")
        return np.array([self._gene_index[g] for g in req])

    def _budget(self):
        return None if self.memory_budget is None else check_int(self.memory_budget, "memory_budget", 1)

    def _impute_rows(self, n: int):
        """``(inner, block)``: cells per compiled inference chunk and per call. The
        decoding of one chunk holds about 24 ``[cells, G]`` float32 arrays (centre, draw,
        running sums, their offsets) and a call returns 6, so ``inner`` and ``block`` are
        sized for those to fit ``memory_budget``."""
        chunk = check_int(self.chunk, "chunk", 1)
        budget = self._budget()
        if budget is None:
            return chunk, max(n, 1)
        per_gene = 4 * self.cfg_.n_genes
        inner = min(chunk, streaming.budget_rows(budget, 24 * per_gene))
        return inner, inner * max(1, streaming.budget_rows(budget, 6 * per_gene) // inner)

    def _posterior(self, X_spatial, n_samples, seed, cols, normalized):
        """Posterior mean and variance of the genes ``cols`` (numpy), decoded block by
        block (:meth:`_impute_rows`) with the draws of one pass over all cells."""
        check_is_fitted(self, "params_")
        n_samples = check_int(n_samples, "n_samples", 0)
        if X_spatial is None:
            xs = self._x_spatial
        else:
            x = _counts_matrix(X_spatial, "X_spatial")
            if x.shape[1] != self.spatial_genes_.size:
                raise ValueError(f"X_spatial must have the {self.spatial_genes_.size} spatial genes of fit as "
                                 f"columns, got {x.shape[1]}.")
            _zero_library(x, "X_spatial", " in the spatial genes")
            xs = x
        key = jax.random.key(check_random_state(self.random_state if seed is None else seed))
        n = xs.shape[0]
        inner, block = self._impute_rows(n)
        cols = jnp.asarray(cols)

        def decode(part, start):
            post = gv.impute(self.cfg_, self.params_, self.state_, self.model_, jnp.asarray(part), key,
                             n_samples=n_samples, chunk=inner, row_offset=start)
            mean, var = (post.normalized, post.normalized_var) if normalized else (post.counts, post.counts_var)
            return mean[:, cols], var[:, cols]

        # padding rows get one count per gene (a positive library)
        return streaming.map_row_blocks(decode, lambda a, b: xs[a:b], n, block, fill=1.0)

    def impute(self, genes=None, *, n_samples=50, normalized=False, X_spatial=None, return_var=True,
               random_state=None):
        """Imputed expression of reference ``genes`` in the spatial cells: their latent
        decoded through the scRNA-seq branch.

        Parameters
        ----------
        genes : gene names (default: every reference gene the spatial data lacks).
        n_samples : posterior draws of ``z`` (the paper uses 50); 0 decodes the posterior
            mean (variance 0).
        normalized : return the frequencies ``rho`` (scVI's ``normalized=True``) instead
            of expected counts on the spatial assay's scale.
        X_spatial : spatial counts to impute for (default: the cells of ``fit``).
        return_var : also return the variance over the draws, the uncertainty.
        random_state : seed of the draws (default: the estimator's).

        Returns
        -------
        mean [n_spatial, n_genes] (and variance, same shape), numpy float32.
        """
        check_is_fitted(self, "params_")
        check_bool(normalized, "normalized")
        cols = self._gene_columns(genes)
        mean, var = self._posterior(X_spatial, n_samples, random_state, cols, bool(normalized))
        return (mean, var) if return_var else mean

    def latent(self, X=None, *, modality="spatial"):
        """Posterior means of ``z`` [n_cells, n_latent] for ``modality`` ``"spatial"`` or
        ``"reference"`` cells (default: those of ``fit``, or counts ``X`` with the columns
        of that modality's genes; an on-disk ``X`` (path, backed AnnData, ...) is read in
        chunks). Cells are encoded in chunks that fit ``memory_budget``."""
        check_is_fitted(self, "params_")
        if modality not in ("spatial", "reference"):
            raise ValueError(f"modality must be 'spatial' or 'reference', got {modality!r}.")
        mode = 1 if modality == "spatial" else 0
        name = "X_spatial" if mode else "X_ref"
        want = self.spatial_genes_.size if mode else self.genes_.size
        if X is not None and streaming.is_source(X):
            with streaming.open_source(X, name) as src:
                if src.n_vars != want:
                    raise ValueError(f"{name} must have {want} columns (the genes of fit), got {src.n_vars}.")
                return self._latent_blocks(src.read, src.n_obs, want, mode)
        if X is None:
            x = self._x_spatial if mode else self._x_ref
            if x is None:
                raise ValueError("this model keeps no reference cells (loaded from a file, or fitted on a streamed "
                                 "reference); pass X.")
        else:
            x = _counts_matrix(X, name)
            if x.shape[1] != want:
                raise ValueError(f"{name} must have {want} columns (the genes of fit), got {x.shape[1]}.")
        return self._latent_blocks(lambda a, b: x[a:b], x.shape[0], want, mode)

    def _latent_blocks(self, read, n: int, width: int, mode: int):
        """:func:`jaxsel.methods.gimvi.latent` over blocks of cells that fit
        ``memory_budget`` (the last block padded, so on-disk and in-memory inputs run the
        same programs)."""
        budget = self._budget()
        rows = n if budget is None else streaming.budget_rows(budget, 3 * 4 * max(width, self.cfg_.hidden), cap=n)
        return streaming.map_row_blocks(
            lambda part, _: gv.latent(self.cfg_, self.params_, self.state_, self.model_, jnp.asarray(part), mode,
                                      chunk=min(rows, 4096)),
            read, n, rows)

    # ------------------------------------------------------------------ evaluation protocol

    def cross_validate_genes(self, X_ref, X_spatial, *, ref_genes, spatial_genes, gene_folds=None, n_seeds=1,
                             n_samples=0, checkpoint=None, checkpoint_every=10):
        """Hold out spatial genes, impute them, compare with their measurements.

        Every (held-out gene fold, seed) pair is one model, and all of them are one
        compiled program (a leading model axis; ``model_batch_size`` at a time, sharded
        over all visible devices). Each held-out gene is imputed from the spatial cells'
        other genes and compared on the log-normalised scale (the measured counts of the
        spatial panel normalised to 1e4 per cell, ``log1p``; the imputation as
        :class:`jaxsel.methods.gimvi.Posterior` ``lognorm``).

        Parameters
        ----------
        gene_folds : None (leave one gene out), an int (that many random folds) or a list
            of gene-name lists.
        n_seeds : random restarts (seeds ``random_state + s``: initialisation, splits,
            minibatches).
        n_samples : posterior draws for ``std``, the spread of each imputed value (0:
            ``std`` zeros). ``imputed`` is always the decoded posterior mean of ``z``, as
            scvi-tools' ``get_imputed_values(deterministic=True)``.
        checkpoint, checkpoint_every : as in :meth:`fit`, for all the models at once
            (:func:`jaxsel.engine.fit_folds_checkpointed`); a resumed run equals an
            uninterrupted one bit for bit.

        Notes
        -----
        ``X_ref`` on disk (as in :meth:`fit`): the same models run one after the other,
        each a streamed fit of the reference (:func:`jaxsel.methods.gimvi.fit_stream`;
        ``n_models`` passes over the file per epoch), with ``checkpoint`` one file per
        model (``cv.npz`` gives ``cv.model0.npz``, ...; a rerun reads finished models
        back and goes on in the interrupted one, bit for bit); the reference latents in
        ``latent`` are computed block by block; per-fold timing in each result's
        ``stream_info``. An on-disk ``X_spatial`` is read into memory (every model
        trains on all spatial cells).

        Returns
        -------
        list of :class:`GeneCVResult`, one per seed (``genes`` are the spatial genes;
        ``history`` arrays [n_folds, epochs]).
        """
        seed = check_random_state(self.random_state)
        n_seeds = check_int(n_seeds, "n_seeds", 1)
        if seed + n_seeds > 2**32:
            raise ValueError(f"random_state + n_seeds must stay below 2**32 (the PRNG seed range), got "
                             f"{seed} + {n_seeds}.")
        n_samples = check_int(n_samples, "n_samples", 0)
        chunk = check_int(self.chunk, "chunk", 1)
        if streaming.is_source(X_ref):
            with streaming.open_source(X_ref, "X_ref") as src:
                return self._cross_validate_stream(src, X_spatial, ref_genes, spatial_genes, gene_folds, seed,
                                                   n_seeds, n_samples, chunk, checkpoint, checkpoint_every)
        d = self._inputs(X_ref, X_spatial, ref_genes, spatial_genes)
        held, masks, seeds = _gene_cv_models(d["xs"], d["sp_names"], gene_folds, seed, n_seeds)
        cfg, models, data, res = self._fit_models(d, masks, seeds, engine.fold_mesh(), checkpoint,
                                                  checkpoint_every)

        def model(m):
            pick = lambda t: jax.tree.map(lambda a: a[m], t)  # noqa: E731
            return pick(res.params), pick(res.model_state), pick(models)

        ref_latent = lambda p, st_, mod: np.asarray(gv.latent(cfg, p, st_, mod, data[0]["x"], 0))  # noqa: E731
        return _gene_cv_results(cfg, d["xs"], d["sp_names"], d["sp_index"], held, seeds, n_samples, chunk,
                                model, ref_latent, res.history)

    def _cross_validate_stream(self, src, X_spatial, ref_genes, spatial_genes, gene_folds, seed, n_seeds,
                               n_samples, chunk, checkpoint, every):
        """:meth:`cross_validate_genes` with the reference on disk: the same models one
        after the other, each a streamed fit (checkpointed to its own file), and the
        reference latents read block by block."""
        if checkpoint is not None:
            every = engine.check_checkpoint_args(checkpoint, every)
        s = self._stream_setup(src, X_spatial, ref_genes, spatial_genes)
        held, masks, seeds = _gene_cv_models(s["xs"], s["sp_names"], gene_folds, seed, n_seeds)
        fitted, histories, infos = [], [], []
        for m, (mask, sd) in enumerate(zip(masks, seeds)):
            path, digest = None, ""
            if checkpoint is not None:
                path = engine.tagged_path(checkpoint, f"model{m}")
                digest = engine.fingerprint("GimVI.cross_validate_genes", fit_settings(self), sd, mask,
                                            src.identity(), s["ref_names"].tolist(), s["sp_names"].tolist())
            model, out = self._stream_model(s, src, mask, sd, path, every, digest)
            res = jax.device_get(out.result)
            fitted.append((res.params, res.model_state, model))
            histories.append(res.history)
            infos.append(out.info)
        cfg = s["cfg"]

        def ref_latent(p, st_, mod):  # blocks of one shape (the last padded): one compiled program
            return streaming.map_row_blocks(lambda block, _: gv.latent(cfg, p, st_, mod, block, 0), src.read,
                                            src.n_obs, s["chunk"])

        return _gene_cv_results(cfg, s["xs"], s["sp_names"], s["sp_index"], held, seeds, n_samples, chunk,
                                fitted.__getitem__, ref_latent,
                                {k: np.stack([np.asarray(h[k]) for h in histories]) for k in histories[0]}, infos)


def _gene_cv_models(xs, sp_names, gene_folds, seed: int, n_seeds: int):
    """The models of a held-out-gene CV: ``(held, masks, seeds)``, the held-out spatial
    gene columns of each fold, and per model (seed-major) its observed-gene mask [G']
    and PRNG seed. A fold that holds out every gene, or leaves a cell without counts, is
    a ``ValueError``."""
    G = sp_names.size
    held = _held_out_folds(gene_folds, sp_names, seed)
    if any(h.size == G for h in held):
        raise ValueError("a gene fold holds out every spatial gene; the model needs some to encode the cells.")
    masks = np.ones((len(held), G), np.float32)
    for f, h in enumerate(held):
        masks[f, h] = 0.0
        lib = xs @ masks[f]
        if (lib <= 0).any():
            raise ValueError(f"with the genes of fold {f} held out ({sp_names[h][:5].tolist()}), "
                             f"{int((lib <= 0).sum())} spatial cell(s) have no counts left.")
    seeds = [seed + s for s in range(n_seeds) for _ in held]
    return held, np.tile(masks, (n_seeds, 1)), seeds


def _gene_cv_results(cfg, xs, sp_names, sp_index, held, seeds, n_samples: int, chunk: int, model, ref_latent,
                     history, stream_info=None) -> list:
    """One :class:`GeneCVResult` per seed from the fitted models (``model(m)`` gives model
    ``m``'s ``(params, state, GimVIModel)``; ``ref_latent(params, state, model)`` the
    reference cells' posterior means; ``history`` arrays [n_models, epochs];
    ``stream_info`` per model, for streamed fits)."""
    G = sp_names.size
    x_sp = jnp.asarray(xs)
    truth = preprocessing.log_normalize(xs, name="X_spatial")
    results = []
    for s in range(len(seeds) // len(held)):
        imputed = np.full(truth.shape, np.nan, np.float32)
        std = np.zeros_like(imputed)
        fold_of_gene = np.full(G, -1, np.int64)
        latents = []
        for f, h in enumerate(held):
            m = s * len(held) + f
            p, st_, mod = model(m)
            key = jax.random.key(seeds[m])
            cols = sp_index[h]
            post = gv.impute(cfg, p, st_, mod, x_sp, key, n_samples=0, chunk=chunk)
            imputed[:, h] = np.asarray(post.lognorm)[:, cols]
            if n_samples:
                draws = gv.impute(cfg, p, st_, mod, x_sp, key, n_samples=n_samples, chunk=chunk)
                std[:, h] = np.sqrt(np.asarray(draws.lognorm_var)[:, cols])
            fold_of_gene[h] = f
            latents.append((ref_latent(p, st_, mod), np.asarray(gv.latent(cfg, p, st_, mod, x_sp, 1))))
        done = np.flatnonzero(fold_of_gene >= 0)
        scores = {m_: np.full(G, np.nan) for m_ in _SCORES}
        for name, v in metrics.imputation_scores(truth[:, done], imputed[:, done]).items():
            scores[name][done] = v
        hist = {k: np.asarray(v)[s * len(held):(s + 1) * len(held)] for k, v in history.items()}
        info = None if stream_info is None else stream_info[s * len(held):(s + 1) * len(held)]
        results.append(GeneCVResult(genes=sp_names, imputed=imputed, std=std, truth=truth, **scores,
                                    fold_of_gene=fold_of_gene, history=hist, latent=latents, stream_info=info))
    return results


def _check_diverged(res) -> None:
    """:func:`jaxsel.engine.check_history` of a gimVI fit (one model or a model axis)."""
    engine.check_history(jax.device_get(res.history), jax.device_get(res.n_epochs), model="GimVI",
                         hint="Lower learning_rate, or check that both inputs are raw counts.")

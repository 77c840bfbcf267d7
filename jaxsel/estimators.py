"""scikit-learn estimators for marker-gene selection.

Numpy (or scipy.sparse, or pandas) in, numpy out. Every estimator here is a
:class:`~sklearn.feature_selection.SelectorMixin`: after ``fit`` it exposes
``markers_`` (selected gene indices, best first) and ``scores_`` (one score
per gene), and inherits ``get_support``, ``transform``, ``inverse_transform``
and ``get_feature_names_out``. This module only validates and converts; the
models live in :mod:`jaxsel.methods`.

Neural selectors (one compiled JAX program per fit, see
:mod:`jaxsel.methods.markermap`):

- :class:`MarkerMap` (Gregory et al. 2024), default ``objective="supervised"``;
- :class:`GlobalGumbelVAE`, the global Gumbel-gate VAE baseline of the paper;
- :class:`ConcreteVAE`, the concrete autoencoder of Abid et al. (2019).

Plain baselines of the paper: :class:`RandomMarkers`, :class:`HVGMarkers`
(Seurat highly variable genes) and :class:`DEMarkers` (one-vs-rest
differential expression, round robin over cell types).

Note that ``transform`` keeps the input's column order (the scikit-learn
``SelectorMixin`` convention, ``X[:, get_support()]``), whereas ``markers_``
is in rank order; ``X[:, np.sort(markers_)]`` equals ``transform(X)``.
"""

from __future__ import annotations

import re
import time

import jax
import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator
from sklearn.feature_selection import SelectorMixin
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted, validate_data

from . import engine, metrics, preprocessing, streaming
from ._persist import PersistMixin
from ._validation import (
    _DEFAULT_MAX_DENSE_BYTES,
    check_bool,
    check_cast_range,
    check_int,
    check_labels,
    check_n_markers,
    check_real,
    fit_settings,
    fold_batch_size,
    progress_label,
    check_random_state,
    refuse_on_disk,
    to_dense,
)
from .methods import baselines
from .methods import markermap as mm

__all__ = [
    "MarkerMap",
    "GlobalGumbelVAE",
    "ConcreteVAE",
    "RandomMarkers",
    "HVGMarkers",
    "DEMarkers",
    "SparseBottleneck",
    "SparseRRR",
    "MAX_DENSE_BYTES",
]

#: Largest dense float32 matrix (in bytes) that a sparse ``X`` is densified into.
#: The neural selectors and the HVG/DE baselines compute on dense arrays; past this
#: size ``fit`` raises a ``ValueError`` instead of allocating. Raise it (for example
#: ``jaxsel.estimators.MAX_DENSE_BYTES = 2**34``) when the memory is there.
MAX_DENSE_BYTES = _DEFAULT_MAX_DENSE_BYTES


# ------------------------------------------------------------------------ validation


def _reraise_named(err: Exception, name: str):
    """Re-raise ``err`` as a plain ``TypeError``/``ValueError`` (not a third-party
    subclass such as narwhals' ``DuplicateError``) naming the argument."""
    msg = str(err)
    cls = TypeError if isinstance(err, TypeError) else ValueError
    if type(err) is cls and re.search(rf"\b{re.escape(name)}\b", msg):
        raise err
    if not re.search(rf"\b{re.escape(name)}\b", msg):
        msg = f"Invalid {name}: {msg}"
    raise cls(msg) from err


def _fitted_from_disk(est, n_genes: int):
    """What :func:`_check_X` with ``reset`` records, for data read from disk: the gene
    count (gene names are checked by the source, not as ``feature_names_in_``)."""
    est.n_features_in_ = n_genes
    if hasattr(est, "feature_names_in_"):
        del est.feature_names_in_


def _map_blocks(est, fn, read, n: int, rows: int):
    """``fn(est.cfg_, est.result_, block, chunk=rows)`` over the ``n`` cells that
    ``read(start, stop)`` gives, in blocks of ``rows`` (:func:`jaxsel.streaming.map_row_blocks`)."""
    return streaming.map_row_blocks(lambda block, _: fn(est.cfg_, est.result_, block, chunk=rows), read, n, rows)


def _map_on_disk(est, X, block_fn, rows: int):
    """``block_fn(block)`` over an on-disk ``X`` in blocks of ``rows`` cells
    (:func:`jaxsel.streaming.map_row_blocks`), after checking its gene count against the
    fitted one."""
    with streaming.open_source(X) as src:
        if src.n_vars != est.n_features_in_:
            raise ValueError(f"X has {src.n_vars} features, but {type(est).__name__} is expecting "
                             f"{est.n_features_in_} features as input.")
        return streaming.map_row_blocks(lambda block, _: block_fn(block), src.read, src.n_obs, rows)


def _check_X(est, X, *, reset: bool, dense: bool = True):
    """Validate ``X`` [n_cells, n_genes]; returns float32 (dense unless ``dense=False``).

    Sets ``n_features_in_`` / ``feature_names_in_`` when ``reset``, checks them
    otherwise. Never modifies ``X``; may return it when no conversion is needed.
    """
    if isinstance(X, (str, bytes)) or X is None:
        raise TypeError(f"X must be a matrix of shape [n_cells, n_genes], got {X!r}.")
    refuse_on_disk(X, "X", type(est).__name__ if type(est) is not BaseEstimator else None)
    if hasattr(X, "obs") and hasattr(X, "var"):
        raise TypeError(
            "X must be a matrix of shape [n_cells, n_genes], got an AnnData object; pass "
            "adata.X (or a layer), or use the functions in jaxsel.tl."
        )
    try:
        X = validate_data(
            est,
            X,
            reset=reset,
            accept_sparse=("csr", "csc"),
            dtype=(np.float32, np.float64),
            ensure_all_finite=True,
        )
    except (ValueError, TypeError) as err:
        _reraise_named(err, "X")
    check_cast_range(X, np.float32, "X")  # float64 beyond the float32 range would become inf
    if dense:
        X = to_dense(X, MAX_DENSE_BYTES, name="X", dtype=np.float32)
    elif X.dtype != np.float32:
        X = X.astype(np.float32)
    return X


def _check_y(y, n_cells: int, *, est_name: str, need_classes: int):
    """Integer codes and sorted classes of ``y``; ``need_classes`` is 1 or 2."""
    codes, classes = check_labels(y, n_cells, name="y", min_classes=1)
    if need_classes >= 2 and classes.shape[0] < 2:
        raise ValueError(
            f"y has only one class ({classes[0]!r}); {est_name} needs labels with at least "
            f"2 classes."
        )
    return codes, classes


def _require_y(y, est_name: str, why: str):
    if y is None:
        raise ValueError(
            f"{est_name} requires y to be passed, but the target y is None; {why}"
        )


def _n_markers(n_markers, n_genes: int, name: str = "n_markers") -> int:
    """:func:`check_n_markers` with the feature count of ``X`` in the message; ``name``
    is the estimator's parameter (``n_genes`` for the paired selectors)."""
    try:
        return check_n_markers(n_markers, n_genes)
    except TypeError as err:
        raise TypeError(str(err).replace("n_markers", name, 1)) from err
    except ValueError as err:
        raise ValueError(f"{str(err).replace('n_markers', name, 1)} (X has {n_genes} feature(s))") from err


def _support_mask(est):
    check_is_fitted(est, "markers_")
    mask = np.zeros(est.n_features_in_, dtype=bool)
    mask[est.markers_] = True
    return mask


_DIVERGED_HINT = ("X must be preprocessed expression (jaxsel.preprocessing.markermap_recipe); for such X, lower "
                  "learning_rate or max_lr.")


def _check_finite_fit(est_name: str, arrays: dict, hint: str):
    """A fit whose results are NaN or infinite (training diverged, usually on unscaled
    input) is a ``ValueError`` naming the input, not a silently useless model."""
    bad = [k for k, v in arrays.items() if not np.all(np.isfinite(np.asarray(v)))]
    if bad:
        raise ValueError(
            f"{est_name} fit diverged or overflowed: its {', '.join(bad)} are not finite. {hint}"
        )


def _rank_scores(markers, n_genes: int):
    """Scores that encode a rank order: ``n_markers - i`` for the i-th marker, else 0."""
    scores = np.zeros(n_genes, dtype=np.float32)
    scores[markers] = np.arange(markers.shape[0], 0, -1, dtype=np.float32)
    return scores


# ----------------------------------------------------------------- neural selectors


class _NeuralSelector(PersistMixin, SelectorMixin, BaseEstimator):
    """Shared implementation of the MarkerMap-family estimators (not public).

    Subclasses set ``_selector`` (one of :data:`jaxsel.methods.markermap.SELECTORS`)
    and ``_default_objective`` (used when ``objective=None``); they share this
    ``__init__``, so scikit-learn sees one signature.
    """

    _selector = "markermap"
    _default_objective = "supervised"

    def __init__(
        self,
        n_markers=50,
        *,
        objective=None,
        alpha=None,
        hidden_size=None,
        latent_size=16,
        batch_size=64,
        max_epochs=100,
        min_epochs=25,
        patience=3,
        learning_rate=None,
        validation_fraction=0.1,
        random_state=None,
        temperature=3.0,
        temperature_decay=0.95,
        kl_beta=0.1,
        encoder_layers=2,
        max_lr=None,
        chunk_size=streaming.DEFAULT_CHUNK_SIZE,
        memory_budget=streaming.DEFAULT_MEMORY_BUDGET,
        verbose=False,
    ):
        self.n_markers = n_markers
        self.objective = objective
        self.alpha = alpha
        self.hidden_size = hidden_size
        self.latent_size = latent_size
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.min_epochs = min_epochs
        self.patience = patience
        self.learning_rate = learning_rate
        self.validation_fraction = validation_fraction
        self.random_state = random_state
        self.temperature = temperature
        self.temperature_decay = temperature_decay
        self.kl_beta = kl_beta
        self.encoder_layers = encoder_layers
        self.max_lr = max_lr
        self.chunk_size = chunk_size
        self.memory_budget = memory_budget
        self.verbose = verbose

    # -- parameters ---------------------------------------------------------------

    def _alpha(self) -> float:
        """The loss trade-off: ``alpha`` when given, else the objective's."""
        if self.alpha is not None:
            return check_real(self.alpha, "alpha", low=0.0, high=1.0)
        objective = self._objective()
        if not isinstance(objective, str) or objective not in mm.OBJECTIVES:
            raise ValueError(
                f"objective must be one of {sorted(mm.OBJECTIVES)} (or pass alpha), got "
                f"{objective!r}."
            )
        return mm.OBJECTIVES[objective]

    def _objective(self):
        return self._default_objective if self.objective is None else self.objective

    def _objective_name(self, alpha: float) -> str:
        if self.alpha is None:
            return f"objective={self._objective()!r}"
        return f"alpha={alpha}"

    def _default_max_lr(self, alpha: float) -> float:
        """The reference package's benchmark ``max_lr`` for this selector and objective."""
        if self._selector == "global_gumbel":
            return 1e-5
        if self._selector == "markermap" and alpha == 0.0:
            return 1e-3
        return 1e-4

    def _needs_labels(self) -> bool:
        try:
            return self._alpha() < 1.0
        except (TypeError, ValueError):
            return False

    def _has_classifier(self) -> bool:
        cfg = getattr(self, "cfg_", None)
        if cfg is not None:
            return bool(cfg.use_clf)
        try:
            return self._alpha() < 1.0
        except (TypeError, ValueError):
            return True

    def _has_decoder(self) -> bool:
        cfg = getattr(self, "cfg_", None)
        if cfg is not None:
            return bool(cfg.use_recon)
        try:
            return self._alpha() > 0.0
        except (TypeError, ValueError):
            return True

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        tags.target_tags.required = self._needs_labels()
        return tags

    def _setup(self, n_cells: int, n_genes: int, y):
        """Validate parameters and labels.

        Returns ``(cfg, loop, codes, classes, seed, validation_fraction)``; ``codes``
        are the label codes when ``y`` is given (they stratify the split), ``classes``
        only when the model has a classifier.
        """
        n_markers = _n_markers(self.n_markers, n_genes)
        alpha = self._alpha()
        name = type(self).__name__
        vf = check_real(
            self.validation_fraction, "validation_fraction", low=0.0, high=1.0,
            low_open=True, high_open=True,
        )
        lr = check_real(self.learning_rate, "learning_rate", low=0.0, low_open=True, allow_none=True)
        max_lr = check_real(self.max_lr, "max_lr", low=1e-8, low_open=True, allow_none=True)
        check_real(self.kl_beta, "kl_beta", low=0.0)
        check_real(self.temperature, "temperature", low=0.0, low_open=True)
        check_real(self.temperature_decay, "temperature_decay", low=0.0, high=1.0, low_open=True)
        if self.hidden_size is not None:
            check_int(self.hidden_size, "hidden_size", 1)
        for pname in ("latent_size", "encoder_layers", "batch_size", "max_epochs"):
            check_int(getattr(self, pname), pname, 1)
        check_int(self.min_epochs, "min_epochs", 0)
        if self.patience is not None:
            check_int(self.patience, "patience", 1)
        seed = check_random_state(self.random_state)

        codes = classes = None
        if alpha < 1.0:
            _require_y(
                y, name,
                f"{self._objective_name(alpha)} trains a classifier on cell labels; pass y "
                f"or use objective='unsupervised'.",
            )
            codes, classes = _check_y(y, n_cells, est_name=f"{name} ({self._objective_name(alpha)})",
                                      need_classes=2)
        elif y is not None:  # labels only stratify the validation split
            codes, _ = _check_y(y, n_cells, est_name=name, need_classes=1)

        n_val = n_cells - int((1.0 - vf) * n_cells)
        n_train = n_cells - n_val
        if n_val < 1:
            raise ValueError(
                f"validation_fraction={vf} leaves no validation cell out of {n_cells}; raise it."
            )
        if n_train < self.batch_size:
            raise ValueError(
                f"batch_size={self.batch_size} is larger than the {n_train} training cells "
                f"(n_cells={n_cells}, validation_fraction={vf}); lower batch_size."
            )

        kw = dict(
            selector=self._selector,
            hidden_size=None if self.hidden_size is None else int(self.hidden_size),
            latent_size=int(self.latent_size),
            encoder_layers=int(self.encoder_layers),
            temperature=float(self.temperature),
            temperature_decay=float(self.temperature_decay),
            kl_beta=float(self.kl_beta),
        )
        if lr is not None:
            kw["learning_rate"] = lr
        cfg = mm.MarkerMapConfig.create(
            n_genes,
            n_markers,
            alpha=alpha,
            n_classes=0 if classes is None or alpha >= 1.0 else int(classes.shape[0]),
            **kw,
        )
        finder = None
        if lr is None:
            finder = engine.LRFinder(
                max_lr=max_lr if max_lr is not None else self._default_max_lr(alpha), mode="linear", n_steps=500
            )
        loop = engine.LoopConfig(
            max_epochs=int(self.max_epochs),
            batch_size=int(self.batch_size),
            min_epochs=int(self.min_epochs),
            patience=None if self.patience is None else int(self.patience),
            lr_finder=finder,
            progress=progress_label(self),
        )
        return cfg, loop, codes, classes, seed, vf

    # -- fitting ------------------------------------------------------------------

    def fit(self, X, y=None, *, checkpoint=None, checkpoint_every=10):
        """Select ``n_markers`` genes.

        Parameters
        ----------
        X : array-like, scipy.sparse matrix or pandas DataFrame, shape [n_cells, n_genes]
            Preprocessed expression (the paper: normalised, log1p, scaled per gene;
            :func:`jaxsel.preprocessing.markermap_recipe`). Sparse input is densified
            under the :data:`MAX_DENSE_BYTES` guard. Never modified. Data larger than
            memory: a path to an ``.h5ad`` file or ``.zarr`` store, a backed AnnData,
            an h5py/zarr array or a :class:`jaxsel.streaming.RowSource` (for raw counts:
            :func:`jaxsel.streaming.markermap_recipe`) is streamed from disk in chunks of
            ``chunk_size`` cells (:meth:`fit` then trains chunk by chunk, see Notes).
        y : array-like, shape [n_cells], optional
            Cell labels of any sortable type. Required unless the objective is
            unsupervised (``alpha == 1``); when given, the validation split is stratified.
            With an on-disk ``X``, also the name of an ``obs`` column.
        checkpoint : path, optional
            Train in segments of ``checkpoint_every`` epochs and write the training
            state to this ``.npz`` file after each; when the file exists (a fit that was
            interrupted), go on from it. The result equals an uninterrupted fit's bit for
            bit. A file written for other settings or data is a ``ValueError``. For an
            on-disk ``X`` the state is written after every ``checkpoint_every`` epochs of
            the streamed loop (:func:`jaxsel.engine.fit_stream`), which resumes bit for bit
            as well; the data is then identified by its shape, the training and validation
            rows, the labels and the validation cells' values, not by every value on disk.
        checkpoint_every : int
            Epochs per segment (one compiled program serves all of them).

        Returns
        -------
        self
        """
        if streaming.is_source(X):
            return self._fit_stream(X, y, checkpoint, checkpoint_every)
        x = _check_X(self, X, reset=True)
        n_cells, n_genes = x.shape
        cfg, loop, codes, classes, seed, vf = self._setup(n_cells, n_genes, y)
        tr, va = preprocessing.split_indices(
            n_cells if codes is None else codes,
            (1.0 - vf, vf),
            random_state=seed,
            stratify=codes is not None,
        )
        split = engine.make_splits([tr], [va]).fold(0)
        labels = codes if cfg.use_clf else None
        if checkpoint is None:
            result = mm.fit(cfg, loop, jax.random.key(seed), x, labels, split)
        else:
            digest = engine.fingerprint(type(self).__name__, fit_settings(self), seed, x, labels, tr, va)
            result = mm.fit_checkpointed(cfg, loop, jax.random.key(seed), x, labels, split, path=checkpoint,
                                         every=checkpoint_every, fingerprint=digest)
        self._store_fit(cfg, jax.device_get(result), classes)
        if hasattr(self, "stream_info_"):
            del self.stream_info_
        return self

    def _store_fit(self, cfg, result, classes):
        n_epochs = int(result.n_epochs)
        # the history (every loss term, epoch by epoch) first, then what fit returns
        engine.check_history(result.history, n_epochs, model=type(self).__name__, hint=_DIVERGED_HINT)
        _check_finite_fit(type(self).__name__, {"scores": result.scores}, _DIVERGED_HINT)
        self.cfg_ = cfg
        self.result_ = result
        self.markers_ = np.asarray(result.markers).astype(np.intp)
        self.scores_ = np.asarray(result.scores, dtype=np.float32)
        self.history_ = {k: np.asarray(v)[:n_epochs] for k, v in result.history.items()}
        self.n_epochs_ = n_epochs
        self.best_epoch_ = int(result.best_epoch)
        self.learning_rate_ = float(result.learning_rate)
        if classes is not None:
            self.classes_ = classes
        elif hasattr(self, "classes_"):
            del self.classes_

    def _fit_stream(self, X, y, checkpoint=None, checkpoint_every=10):
        """:meth:`fit` on a matrix streamed from disk (:mod:`jaxsel.streaming`)."""
        with streaming.open_source(X) as src:
            n_cells, n_genes = src.shape
            if isinstance(y, str):
                y = src.obs_column(y)
            cfg, loop, codes, classes, seed, vf = self._setup(n_cells, n_genes, y)
            tr, va = preprocessing.split_indices(
                n_cells if codes is None else codes, (1.0 - vf, vf), random_state=seed, stratify=codes is not None,
            )
            result, info = self._stream_one(src, cfg, loop, codes, seed, jax.random.key(seed), tr, va, checkpoint,
                                            checkpoint_every)
        self._store_fit(cfg, jax.device_get(result), classes)
        _fitted_from_disk(self, n_genes)
        self.stream_info_ = info
        return self

    def _stream_one(self, src, cfg, loop, codes, seed, key, tr, va, checkpoint, every, tag=(), extra=()):
        """One streamed fit (:func:`jaxsel.methods.markermap.fit_stream`) of the on-disk
        ``src`` on the rows ``tr``, validated on ``va`` (at most ``chunk_size`` of them,
        the others join ``tr``); ``tag``/``extra`` go into the checkpoint's fingerprint
        before/after the settings and data. ``(MarkerMapResult, info)``."""
        chunk = streaming.check_chunk_size(self.chunk_size, loop.batch_size)
        labels = codes.astype(np.int32) if cfg.use_clf else np.zeros(src.n_obs, np.int32)

        def read(rows):
            return {"x": src.read_rows(rows), "y": labels[rows]}

        tr, va = streaming.cap_validation(tr, va, chunk, seed)
        digest = "" if checkpoint is None else engine.fingerprint(
            type(self).__name__, *tag, fit_settings(self), seed, src.identity(), labels, *extra)
        return mm.fit_stream(cfg, loop, key, read, tr, va, chunk_size=chunk, checkpoint=checkpoint,
                             checkpoint_every=every, fingerprint=digest)

    def _get_support_mask(self):
        return _support_mask(self)

    def _fitted_x(self, X):
        check_is_fitted(self, "markers_")
        return _check_X(self, X, reset=False)

    def _infer(self, fn, X, width: int = 1):
        """``fn(cfg, result, block, chunk=rows)`` over blocks of ``rows`` cells
        (:func:`jaxsel.streaming.map_row_blocks`), ``rows`` chosen so that ``width``
        float32 values per gene and cell fit ``memory_budget``."""
        check_is_fitted(self, "markers_")
        n_genes = self.n_features_in_
        rows = streaming.budget_rows(self.memory_budget, 4 * n_genes * width)

        if streaming.is_source(X):
            return _map_on_disk(self, X, lambda b: fn(self.cfg_, self.result_, b, chunk=rows), rows)
        if sp.issparse(X):  # read it by rows too instead of densifying all of it
            x = _check_X(self, X, reset=False, dense=False)
            return _map_blocks(self, fn, streaming.RowSource(x.tocsr()).read, x.shape[0], rows)
        x = self._fitted_x(X)
        return _map_blocks(self, fn, lambda a, b: x[a:b], x.shape[0], rows)

    def transform(self, X):
        """``X`` restricted to the selected genes, [n_cells, n_markers] (columns in input
        order). An on-disk ``X`` is read in chunks and the result returned dense."""
        if streaming.is_source(X):
            mask = self.get_support()
            return self._infer(lambda cfg, result, block, chunk: block[:, mask], X)
        return super().transform(X)

    @available_if(_has_classifier)
    def decision_function(self, X):
        """Class logits from the markers only, [n_cells, n_classes] (order of ``classes_``)."""
        return self._infer(mm.predict_logits, X)

    @available_if(_has_classifier)
    def predict_proba(self, X):
        """Class probabilities from the markers only, [n_cells, n_classes]."""
        return np.asarray(jax.nn.softmax(self.decision_function(X), axis=-1))

    @available_if(_has_classifier)
    def predict(self, X):
        """Cell labels (values of the ``y`` given to ``fit``) from the markers only."""
        logits = self.decision_function(X)
        return self.classes_[np.argmax(logits, axis=1)]

    @available_if(_has_decoder)
    def reconstruct(self, X):
        """Decoder mean of all genes from the markers only, [n_cells, n_genes]."""
        return self._infer(mm.reconstruct, X, width=3)

    def embed(self, X):
        """Latent means of the encoder from the markers only, [n_cells, latent_size]."""
        return self._infer(mm.embed, X)

    # -- cross-validation -----------------------------------------------------------

    def cross_validate(self, X, y=None, n_folds=5, classifiers=("knn", "rf"), batch_size="auto", *,
                       checkpoint=None, checkpoint_every=10):
        """K-fold marker selection and evaluation, all folds in one compiled program.

        The cells are dealt into ``n_folds`` test folds (stratified when ``y`` is given,
        :func:`jaxsel.preprocessing.kfold_indices`); from each fold's training part a
        ``validation_fraction`` is carved out for early stopping. All folds are fitted
        together by :func:`jaxsel.methods.markermap.fit_folds`. Each fold's markers are
        then judged on its test cells by :func:`jaxsel.metrics.classification_scores`,
        a classifier trained on the fold's training cells (without its validation part)
        and restricted to the markers. The estimator itself is not fitted or changed.

        Parameters
        ----------
        X : array-like or sparse, shape [n_cells, n_genes]
        y : array-like, shape [n_cells], optional
            Needed by supervised/joint objectives, and for the classification scores
            (without ``y`` only markers and training curves are returned).
        n_folds : int, default 5
        classifiers : str, sequence or dict, default ("knn", "rf")
            As in :func:`jaxsel.metrics.evaluate_markers`.
        batch_size : int, None or "auto", default "auto"
            Folds fitted at a time per device (``lax.map`` over the rest, still one
            compiled program); ``None`` fits all together (``vmap``). ``"auto"`` is 1
            on CPU, where it was measured faster than vmapped and each fold equals the
            same fold fitted alone bit for bit, and ``None`` on accelerators.
        checkpoint : path, optional
            Fit the folds in segments of ``checkpoint_every`` epochs, every fold's
            training state written to this ``.npz`` file after each; run again with
            the same path, settings and data and the folds go on where they stopped,
            with the result of an uninterrupted run bit for bit (as :meth:`fit`).
        checkpoint_every : int, default 10

        Notes
        -----
        An ``X`` on disk (a path, a backed AnnData, an h5py/zarr array or a
        :class:`jaxsel.streaming.RowSource`, as in :meth:`fit`) is cross-validated
        fold after fold, each fold a streamed fit (:func:`jaxsel.engine.fit_stream`)
        on the same folds and per-fold keys as in memory: ``n_folds`` passes over
        the data per epoch, host memory bounded by ``chunk_size``, and a fold's
        validation part capped at ``chunk_size`` cells. With ``checkpoint``, each fold
        writes its own file (``cv.npz`` gives ``cv.fold0.npz``, ``cv.fold1.npz``,
        ...), and a run killed in fold ``i`` goes on there, finished folds read back.
        The classifiers then read only the selected genes' columns (of every cell,
        ``n_cells`` x the union of the folds' markers in memory). ``batch_size`` does
        not apply (one fold at a time).

        Returns
        -------
        dict
            ``markers`` int [n_folds, n_markers] (best first); ``scores`` float32
            [n_folds, n_genes]; ``n_epochs``, ``best_epoch`` int [n_folds];
            ``learning_rate`` float32 [n_folds]; ``history`` dict of
            [n_folds, max_epochs] arrays (NaN after a fold stopped);
            ``test_indices`` list of int arrays; and, when ``y`` is given,
            ``classification``: ``{classifier: {"accuracy", "misclassification_rate",
            "average_misclassification_rate", "f1_macro", "f1_weighted"}}`` of float
            arrays [n_folds]; for ``X`` on disk, ``stream_info``: per fold the
            streamed loop's timing (:func:`jaxsel.engine.fit_stream`).
        """
        batch_size = fold_batch_size(batch_size)  # checked also where it does not apply (X on disk)
        if y is not None:  # a bad classifier before any training, not after
            metrics.named_classifiers(classifiers)
        if streaming.is_source(X):
            with streaming.open_source(X) as src:
                return self._cross_validate_stream(src, y, n_folds, classifiers, checkpoint, checkpoint_every)
        x = _check_X(BaseEstimator(), X, reset=True)  # leaves self untouched
        n_cells, n_genes = x.shape
        cfg, loop, codes, seed, folds = self._cv_setup(n_cells, n_genes, y, n_folds)
        splits = engine.make_splits([f[0] for f in folds], [f[1] for f in folds])
        keys = engine.fold_keys(jax.random.key(seed), n_folds)
        labels = codes if cfg.use_clf else None
        if checkpoint is None:
            res = mm.fit_folds(cfg, loop, keys, x, labels, splits, batch_size=batch_size)
        else:
            digest = engine.fingerprint(type(self).__name__, "cross_validate", fit_settings(self), seed, x, labels,
                                        n_folds, batch_size, [f[0] for f in folds], [f[1] for f in folds])
            res = mm.fit_folds_checkpointed(cfg, loop, keys, x, labels, splits, path=checkpoint,
                                            every=checkpoint_every, fingerprint=digest, batch_size=batch_size)
        return self._cv_output(jax.device_get(res), folds, codes, classifiers, seed, lambda markers: (x, markers))

    def _cv_setup(self, n_cells: int, n_genes: int, y, n_folds):
        """Checked settings and the folds of :meth:`cross_validate`: ``(cfg, loop, codes,
        seed, folds)`` with ``folds`` as :func:`jaxsel.preprocessing.kfold_indices`."""
        n_folds = check_int(n_folds, "n_folds", 2)
        if n_folds > n_cells:
            raise ValueError(f"n_folds must be in [2, n_cells={n_cells}], got {n_folds}.")
        cfg, loop, codes, _, seed, vf = self._setup(n_cells, n_genes, y)
        folds = preprocessing.kfold_indices(
            n_cells if codes is None else codes,
            n_folds,
            random_state=seed,
            stratify=codes is not None,
            validation_fraction=vf,
        )
        min_train = min(tr.shape[0] for tr, _, _ in folds)
        if min_train < loop.batch_size:
            raise ValueError(
                f"batch_size={loop.batch_size} is larger than the smallest fold's {min_train} "
                f"training cells; lower batch_size (the estimator's) or n_folds."
            )
        return cfg, loop, codes, seed, folds

    def _cross_validate_stream(self, src, y, n_folds, classifiers, checkpoint, checkpoint_every):
        """:meth:`cross_validate` of an on-disk ``X``: one streamed fit per fold."""
        if checkpoint is not None:
            checkpoint_every = engine.check_checkpoint_args(checkpoint, checkpoint_every)
        n_cells, n_genes = src.shape
        if isinstance(y, str):
            y = src.obs_column(y)
        cfg, loop, codes, seed, folds = self._cv_setup(n_cells, n_genes, y, n_folds)
        chunk = streaming.check_chunk_size(self.chunk_size, loop.batch_size)
        keys = engine.fold_keys(jax.random.key(seed), len(folds))
        results, infos = [], []
        for i, (tr, va, _) in enumerate(folds):
            path = None if checkpoint is None else engine.tagged_path(checkpoint, f"fold{i}")
            res, info = self._stream_one(src, cfg, loop, codes, seed, keys[i], tr, va, path, checkpoint_every,
                                         tag=("cross_validate",), extra=(len(folds), i))
            results.append(jax.device_get(res))
            infos.append(info)
        res = jax.tree.map(lambda *a: np.stack([np.asarray(v) for v in a]), *results)

        def marker_columns(markers):
            # every cell's values of the genes some fold selected, read in blocks
            cols = np.unique(markers)
            xs = np.concatenate([b[:, cols] for _, _, b in src.iter_blocks(chunk)])
            return xs, np.searchsorted(cols, markers)

        out = self._cv_output(res, folds, codes, classifiers, seed, marker_columns)
        out["stream_info"] = infos
        return out

    def _cv_output(self, res, folds, codes, classifiers, seed, columns):
        """:meth:`cross_validate`'s dict from the folds' stacked result (host arrays);
        ``columns(markers)`` gives the cells' values of the markers' genes and the
        markers as indices into them."""
        engine.check_history(res.history, res.n_epochs, model=type(self).__name__, hint=_DIVERGED_HINT)
        markers = np.asarray(res.markers).astype(np.intp)
        out = {
            "markers": markers,
            "scores": np.asarray(res.scores, dtype=np.float32),
            "n_epochs": np.asarray(res.n_epochs).astype(np.int64),
            "best_epoch": np.asarray(res.best_epoch).astype(np.int64),
            "learning_rate": np.asarray(res.learning_rate, dtype=np.float32),
            "history": {k: np.asarray(v) for k, v in res.history.items()},
            "test_indices": [f[2] for f in folds],
        }
        if codes is not None:
            keys_kept = (
                "accuracy",
                "misclassification_rate",
                "average_misclassification_rate",
                "f1_macro",
                "f1_weighted",
            )
            x, cols = columns(markers)
            per_fold = []
            for i, (tr, _, te) in enumerate(folds):
                ev = metrics.evaluate_markers(
                    x[tr], codes[tr], x[te], codes[te], cols[i],
                    classifiers=classifiers, reconstruction=False, random_state=seed,
                )
                per_fold.append(ev["classification"])
            out["classification"] = {
                name: {k: np.array([pf[name][k] for pf in per_fold]) for k in keys_kept}
                for name in per_fold[0]
            }
        return out


_NEURAL_PARAMS_DOC = """
    Parameters
    ----------
    n_markers : int, default 50
        Genes to select (``1 <= n_markers <= n_genes``).
    objective : {{"supervised", "unsupervised", "joint"}} or None, default None
        ``None`` means "{objective}" for this class. Loss: cross-entropy of a classifier on the latent mean (``alpha = 0``), VAE
        reconstruction of all genes (``alpha = 1``), or their even mix (``alpha = 0.5``).
    alpha : float in [0, 1], optional
        Overrides ``objective``: ``alpha * VAE + (1 - alpha) * cross-entropy``.
    hidden_size : int, optional
        Hidden width; ``None`` means about ``n_genes / 10`` (at least 16), the
        paper's rule (the package's benchmark script uses 256).
    latent_size : int, default 16
        Latent dimension (paper and package).
    batch_size : int, default 64
        Cells per optimiser step (package benchmark). The last incomplete batch of
        an epoch is dropped.
    max_epochs, min_epochs : int, default 100, 25
        Epoch budget and the minimum before early stopping (package benchmark).
    patience : int or None, default 3
        Epochs without a validation improvement before stopping (the package's
        benchmark uses 4 for unsupervised MarkerMap and 10 for the global gate);
        ``None`` disables early stopping. The best-validation parameters are kept.
    learning_rate : float, optional
        Adam step size. ``None`` (default) runs the paper's learning-rate range test
        (:class:`jaxsel.engine.LRFinder` with the paper benchmark's settings: a
        linear schedule over 500 steps from 1e-8 to ``max_lr``, Lightning's
        suggestion rule, inside the same compiled program as the fit); a number
        skips it.
    validation_fraction : float in (0, 1), default 0.1
        Cells of ``X`` held out for early stopping (stratified when ``y`` is given).
    random_state : int, numpy Generator or None, default None
        Seeds the validation split and the JAX PRNG key (``None`` means 0: no hidden
        global RNG state, results are reproducible).
    temperature, temperature_decay : float, default 3.0, 0.95
        Gumbel temperature at epoch 0 (the package's benchmark value) and its
        per-epoch decay (the benchmark's global-gate value), floored at 1e-4.
    kl_beta : float, default 0.1
        KL weight of the VAE loss (package).
    encoder_layers : int, default 2
        Hidden encoder blocks: the paper's 2 (the package builds 3).
    max_lr : float, optional
        Upper end of the range test. ``None`` uses the reference package's benchmark
        settings: {max_lr_doc}. Ignored when ``learning_rate`` is given.
    chunk_size : int, default 16384
        Cells per chunk when ``X`` is streamed from disk (see Notes); also the largest
        validation set of a streamed fit (a random subset of the
        ``validation_fraction``).
    memory_budget : int, default 2**28 (256 MiB)
        Bytes of the largest per-chunk array of inference (``decision_function``,
        ``predict``, ``embed``, ``reconstruct``, ``transform`` of an on-disk ``X``): the
        cells are processed in chunks that fit it.
    verbose : bool, default False
        Print a progress line (epoch, training and validation loss, time) to stderr
        from inside the compiled fit, at most once a second.

    Attributes
    ----------
    markers_ : ndarray of int, shape [n_markers]
        Selected gene indices, best first.
    scores_ : ndarray of float32, shape [n_genes]
        The selector's gene scores (the top ``n_markers`` are ``markers_``).
    history_ : dict of ndarray, shape [n_epochs_]
        Per-epoch training/validation losses and metrics.
    n_epochs_, best_epoch_ : int
        Epochs run; the (0-based) epoch whose parameters were kept.
    learning_rate_ : float
        The Adam step size used (found by the range test or given).
    classes_ : ndarray
        Sorted labels of ``y`` (only when the model has a classifier).
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        When ``X`` was a DataFrame with string column names.
    cfg_ : :class:`jaxsel.methods.markermap.MarkerMapConfig`
    result_ : :class:`jaxsel.methods.markermap.MarkerMapResult`
    stream_info_ : dict
        After a streamed fit only: per-epoch wall, input-wait and read seconds, steps and
        cells (:class:`jaxsel.engine.StreamFit`).

    Notes
    -----
    Data larger than memory: ``fit`` accepts an ``.h5ad`` / ``.zarr`` path, a backed
    AnnData, an h5py/zarr array or a :class:`jaxsel.streaming.RowSource`, and streams it
    (:mod:`jaxsel.engine.stream`): a background thread reads chunks of ``chunk_size``
    cells (8 random blocks of consecutive rows each) while the device trains on the
    previous one, so host memory holds a few chunks whatever the number of cells. The
    chunk program compiles once; minibatches are shuffled within a chunk, not across
    the whole data, so a streamed fit differs from the in-memory one by the order of
    the cells. The learning-rate range test runs on the first chunk. Validation uses at
    most ``chunk_size`` cells, kept in memory. ``markers_`` index the columns
    (``var_names``) of the source.
"""


class MarkerMap(_NeuralSelector):
    """MarkerMap (Gregory et al., npj Syst Biol Appl 2024): k genes by a learned,
    instance-wise Gumbel top-k selector.

    A network maps each cell to gene logits, a running average of them across
    minibatches is perturbed with Gumbel noise and relaxed to a k-hot mask
    (continuous top-k), and the masked input feeds a classifier (supervised), a VAE
    (unsupervised) or both (joint). At the end the markers are the top-k of the
    averaged logits. See :mod:`jaxsel.methods.markermap` for the model and where it
    follows the paper or the authors' package.

    Defaults follow the paper where it is explicit (learning rate by a range test,
    two encoder layers, hidden width about ``n_genes / 10``) and the authors'
    package (``markermap`` 1.0.3) and its benchmark script elsewhere (batch 64,
    100/25 epochs, latent 16, temperature 3.0, ``kl_beta`` 0.1, ``max_lr``).
    """

    _selector = "markermap"



class GlobalGumbelVAE(_NeuralSelector):
    """Global Gumbel-gate VAE: one learned logit per gene with Gumbel top-k
    (the paper's "global gate" baseline).

    Same body, loss and training as :class:`MarkerMap`, but the selection logits are
    a single parameter vector instead of a network of the cells.
    """

    _selector = "global_gumbel"
    _default_objective = "unsupervised"



class ConcreteVAE(_NeuralSelector):
    """Concrete autoencoder (Abid et al. 2019) as a VAE: ``n_markers`` Gumbel-softmax
    rows over the genes, each picking one gene.

    Markers are ranked by the noiseless column sums of the selection matrix, which
    gives exactly ``n_markers`` distinct genes (the package ranks a noisy sample).
    """

    _selector = "concrete"
    _default_objective = "unsupervised"



MarkerMap.__doc__ += _NEURAL_PARAMS_DOC.format(
    objective="supervised",
    max_lr_doc="1e-3 for supervised MarkerMap, 1e-4 for joint/unsupervised",
) + """
    Examples
    --------
    >>> import jaxsel
    >>> sel = jaxsel.MarkerMap(n_markers=50, random_state=0).fit(X, y)  # doctest: +SKIP
    >>> sel.get_support(indices=True); sel.transform(X)                 # doctest: +SKIP
"""
GlobalGumbelVAE.__doc__ += _NEURAL_PARAMS_DOC.format(
    objective="unsupervised", max_lr_doc="1e-5 for the global gate"
)
ConcreteVAE.__doc__ += _NEURAL_PARAMS_DOC.format(
    objective="unsupervised", max_lr_doc="1e-4 for the Concrete VAE"
)


# ------------------------------------------------------------------------ baselines


class _BaselineSelector(PersistMixin, SelectorMixin, BaseEstimator):
    """Shared parts of the plain baselines (not public)."""

    def _get_support_mask(self):
        return _support_mask(self)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags


class RandomMarkers(_BaselineSelector):
    """``n_markers`` genes drawn uniformly at random (the paper's random baseline).

    Parameters
    ----------
    n_markers : int, default 50
    random_state : int, numpy Generator or None, default None
        Seeds the draw (``None`` means 0).

    Attributes
    ----------
    markers_ : ndarray of int, shape [n_markers]
        Drawn genes, in draw order.
    scores_ : ndarray of float32, shape [n_genes]
        ``n_markers - i`` for the i-th drawn gene, 0 for the others (the draw order
        as a score, so that the top ``n_markers`` are ``markers_``).
    n_features_in_, feature_names_in_
    """

    def __init__(self, n_markers=50, *, random_state=None):
        self.n_markers = n_markers
        self.random_state = random_state

    def fit(self, X, y=None):
        """Draw the markers; ``X`` only gives the number of genes (it may be on disk: a
        path, a backed AnnData, an h5py/zarr array), ``y`` is ignored."""
        if streaming.is_source(X):
            with streaming.open_source(X) as src:
                n_genes = src.shape[1]
            _fitted_from_disk(self, n_genes)
        else:
            n_genes = _check_X(self, X, reset=True, dense=False).shape[1]
        n_markers = _n_markers(self.n_markers, n_genes)
        seed = check_random_state(self.random_state)
        markers = baselines.random_markers(jax.random.key(seed), n_genes, n_markers)
        self.markers_ = np.asarray(markers).astype(np.intp)
        self.scores_ = _rank_scores(self.markers_, n_genes)
        return self


def _negative_hvg_input(minimum, where: str = ""):
    raise ValueError(
        f"Negative values in data passed to HVGMarkers: X must be log1p-normalised "
        f"expression (>= 0), found minimum {minimum:.4g}{where}; pass data before scaling."
    )


class HVGMarkers(_BaselineSelector):
    """Seurat-flavour highly variable genes (scanpy's ``flavor="seurat"``).

    Parameters
    ----------
    n_markers : int, default 50
    n_bins : int, default 20
        Equal-width mean bins for the dispersion z-scores (scanpy's default).
    random_state : None
        Accepted for a uniform interface with the other selectors; unused (the
        selection is deterministic).
    chunk_size : int, default 16384
        Cells read per block when ``X`` is on disk.

    Notes
    -----
    ``X`` must be log1p-normalised expression (non-negative; e.g.
    :func:`jaxsel.preprocessing.normalize_total` then :func:`~jaxsel.preprocessing.log1p`),
    not scaled data.

    ``X`` on disk (a path to an ``.h5ad`` file or ``.zarr`` store, a backed AnnData, an
    h5py/zarr array or a :class:`jaxsel.streaming.RowSource`) is read once: every gene's
    mean and variance of ``expm1(X)`` accumulate in float64
    (:func:`jaxsel.streaming.group_moments`), then
    :func:`jaxsel.methods.baselines.highly_variable_genes_from_moments` bins them as in
    memory. The dispersions equal the in-memory ones to float32 rounding (the in-memory
    moments are float32), so the markers are the same unless two genes are that close.

    Attributes
    ----------
    markers_ : ndarray of int, shape [n_markers]
        Highest normalised dispersion first.
    scores_ : ndarray of float32, shape [n_genes]
        Normalised dispersions (NaN where undefined, e.g. all-zero genes).
    n_features_in_, feature_names_in_
    """

    def __init__(self, n_markers=50, *, n_bins=20, random_state=None, chunk_size=streaming.DEFAULT_CHUNK_SIZE):
        self.n_markers = n_markers
        self.n_bins = n_bins
        self.random_state = random_state
        self.chunk_size = chunk_size

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True
        return tags

    def fit(self, X, y=None):
        """Rank genes by normalised dispersion; ``y`` is ignored. ``X`` may be on disk
        (see Notes)."""
        if streaming.is_source(X):
            with streaming.open_source(X) as src:
                n_markers = _n_markers(self.n_markers, src.n_vars)
                n_bins = check_int(self.n_bins, "n_bins", 1)
                check_random_state(self.random_state)
                chunk = check_int(self.chunk_size, "chunk_size", 1)
                if src.n_obs < 2:
                    raise ValueError(f"HVGMarkers needs at least 2 cells for a variance, got {src.n_obs}.")

                def non_negative(block, a, b):
                    if block.size and block.min() < 0:
                        _negative_hvg_input(block.min(), f" (rows {a}..{b - 1})")

                mom = streaming.group_moments(src, block_rows=chunk, fn=np.expm1, check=non_negative)
            var = mom["within_ss"][0] / (mom["n"][0] - 1)
            markers, disp = baselines.highly_variable_genes_from_moments(mom["mean"][0], var, n_markers, n_bins)
            _fitted_from_disk(self, src.n_vars)
            self.markers_ = np.asarray(markers).astype(np.intp)
            self.scores_ = np.asarray(disp, dtype=np.float32)
            return self
        x = _check_X(self, X, reset=True)
        n_genes = x.shape[1]
        n_markers = _n_markers(self.n_markers, n_genes)
        n_bins = check_int(self.n_bins, "n_bins", 1)
        check_random_state(self.random_state)
        if x.min() < 0:
            _negative_hvg_input(x.min())
        markers, disp = baselines.highly_variable_genes(x, n_markers, n_bins)
        self.markers_ = np.asarray(markers).astype(np.intp)
        self.scores_ = np.asarray(disp, dtype=np.float32)
        return self


class DEMarkers(_BaselineSelector):
    """One-vs-rest differential-expression markers, picked round robin over cell types.

    The MarkerMap paper's scanpy ``rank_genes_groups`` baseline: every gene gets a
    score per cell type (:func:`jaxsel.methods.baselines.de_scores`), then the types
    take turns, each taking its best gene not yet chosen.

    Parameters
    ----------
    n_markers : int, default 50
    method : {"t-test", "t-test_overestim_var", "wilcoxon"}, default "t-test"
        scanpy's score (``wilcoxon`` with tie correction).
    random_state : None
        Accepted for a uniform interface; unused (deterministic).
    chunk_size : int, default 16384
        Cells read per block when ``X`` is on disk.
    memory_budget : int, default 2**28
        Bytes of the genes held at once by a Wilcoxon test of ``X`` on disk.

    Notes
    -----
    ``X`` on disk (a path to an ``.h5ad`` file or ``.zarr`` store, a backed AnnData, an
    h5py/zarr array or a :class:`jaxsel.streaming.RowSource`; ``y`` an array or, with
    a path or backed AnnData, an ``obs`` column name): the t-tests read it once, the
    per-type sums and within-type sums of squares of every gene accumulating in float64
    (:func:`jaxsel.streaming.group_moments`,
    :func:`jaxsel.methods.baselines.de_scores_from_moments`; the scores equal the
    in-memory ones to float32 rounding). The Wilcoxon test ranks every cell of a gene, so
    it reads ``X`` once per block of genes (as many genes as ``memory_budget`` holds for
    all cells; each block scored by :func:`jaxsel.methods.baselines.de_scores` as in
    memory, so the scores are the in-memory ones).

    Attributes
    ----------
    markers_ : ndarray of int, shape [n_markers]
        In round-robin selection order.
    class_scores_ : ndarray of float32, shape [n_classes, n_genes]
        Per-type scores (order of ``classes_``).
    scores_ : ndarray of float32, shape [n_genes]
        Each gene's best score over the types. Note that the round-robin markers are
        not simply the top of ``scores_``.
    classes_ : ndarray
    n_features_in_, feature_names_in_
    """

    def __init__(self, n_markers=50, *, method="t-test", random_state=None,
                 chunk_size=streaming.DEFAULT_CHUNK_SIZE, memory_budget=streaming.DEFAULT_MEMORY_BUDGET):
        self.n_markers = n_markers
        self.method = method
        self.random_state = random_state
        self.chunk_size = chunk_size
        self.memory_budget = memory_budget

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        return tags

    def fit(self, X, y=None):
        """Score genes against the labels ``y`` and pick markers round robin. ``X`` may
        be on disk (see Notes)."""
        if streaming.is_source(X):
            with streaming.open_source(X) as src:
                if isinstance(y, str):
                    y = src.obs_column(y)
                codes, classes, n_markers = self._check_fit(src.n_obs, src.n_vars, y)
                scores = self._scores_on_disk(src, codes, int(classes.shape[0]))
            _fitted_from_disk(self, src.n_vars)
        else:
            x = _check_X(self, X, reset=True)
            codes, classes, n_markers = self._check_fit(*x.shape, y)
            scores = baselines.de_scores(x, codes, int(classes.shape[0]), self.method)
        markers = baselines.round_robin_markers(scores, n_markers)
        self.class_scores_ = np.asarray(scores, dtype=np.float32)
        self.scores_ = self.class_scores_.max(axis=0)
        self.markers_ = np.asarray(markers).astype(np.intp)
        self.classes_ = classes
        return self

    def _check_fit(self, n_cells: int, n_genes: int, y):
        n_markers = _n_markers(self.n_markers, n_genes)
        if not isinstance(self.method, str) or self.method not in baselines.DE_METHODS:
            raise ValueError(f"method must be one of {baselines.DE_METHODS}, got {self.method!r}.")
        check_random_state(self.random_state)
        _require_y(y, "DEMarkers", "pass cell labels y for differential expression.")
        codes, classes = _check_y(y, n_cells, est_name="DEMarkers", need_classes=2)
        return codes, classes, n_markers

    def _scores_on_disk(self, src, codes, n_classes: int):
        """:meth:`fit`'s scores of an on-disk ``src`` (see the class Notes)."""
        chunk = check_int(self.chunk_size, "chunk_size", 1)
        if self.method != "wilcoxon":
            mom = streaming.group_moments(src, codes, block_rows=chunk)  # every class has cells
            return np.asarray(baselines.de_scores_from_moments(mom["n"], mom["sums"], mom["within_ss"], self.method))
        width = streaming.budget_rows(self.memory_budget, 4 * src.n_obs, cap=src.n_vars)
        if width > baselines.DE_GENE_BATCH:  # whole batches of de_scores' gene loop, as in memory
            width -= width % baselines.DE_GENE_BATCH
        out = []
        for g0 in range(0, src.n_vars, width):
            cols = np.arange(g0, min(src.n_vars, g0 + width))
            block = np.empty((src.n_obs, cols.size), np.float32)
            for a, b, rows in src.iter_blocks(chunk):
                if not np.isfinite(rows).all():
                    raise ValueError(f"X contains NaN or infinite values (in rows {a}..{b - 1}).")
                block[a:b] = rows[:, cols]
            out.append(np.asarray(baselines.de_scores(block, codes, n_classes, "wilcoxon")))
        return np.concatenate(out, axis=1)


# ------------------------------------------------------ paired-modality selectors


def _check_Y(Y, n_cells: int):
    """``Y`` [n_cells, n_features] float32 (a 1-D ``Y`` is one feature), finite."""
    if Y is None:
        raise ValueError("Y is required: the paired modality [n_cells, n_features] to predict.")
    if hasattr(Y, "obs") and hasattr(Y, "var"):
        raise TypeError("Y must be a matrix [n_cells, n_features], got an AnnData object.")
    try:
        arr = np.asarray(Y.toarray() if hasattr(Y, "toarray") else Y)
    except Exception as err:  # noqa: BLE001 - ragged lists and the like
        raise TypeError(f"Y must be a numeric matrix [n_cells, n_features]: {err}") from err
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"Y must be 2-D [n_cells, n_features], got shape {arr.shape}.")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) or arr.dtype.kind == "c":
        raise TypeError(f"Y must hold real numbers, got dtype {arr.dtype}.")
    if arr.shape[0] != n_cells:
        raise ValueError(f"X and Y must have the same number of cells, got {n_cells} and {arr.shape[0]}.")
    if arr.shape[1] < 1:
        raise ValueError("Y has no features (columns).")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ValueError("Y contains NaN or infinite values; impute or drop those cells first.")
    check_cast_range(arr, np.float32, "Y")
    arr = arr.astype(np.float32)
    return arr


def _check_hidden(hidden) -> tuple:
    """``hidden`` as a tuple (the config checks its entries); a clear error for a scalar."""
    if isinstance(hidden, (str, bytes)) or not hasattr(hidden, "__iter__"):
        raise TypeError(f"hidden must be a non-empty tuple of positive integers, got {hidden!r}.")
    return tuple(hidden)


def _paired_folds(n_cells: int, n_folds, seed: int):
    n_folds = check_int(n_folds, "n_folds", 2)
    if n_folds > n_cells:
        raise ValueError(f"n_folds must be in [2, n_cells={n_cells}], got {n_folds}.")
    return preprocessing.kfold_indices(n_cells, n_folds, random_state=seed)


def _selection_stability(genes, n_genes: int):
    """Per-gene selection frequency and mean pairwise overlap of selected sets."""
    genes = np.asarray(genes)
    n = genes.shape[0]
    counts = np.zeros(n_genes, dtype=np.int64)
    for g in genes:
        counts[g] += 1
    sets = [set(g.tolist()) for g in genes]
    overlaps = [len(sets[i] & sets[j]) for i in range(n) for j in range(i + 1, n)]
    return {
        "genes": genes,
        "frequency": counts / n,
        "counts": counts,
        "mean_pairwise_overlap": float(np.mean(overlaps)) if overlaps else float("nan"),
        "always_selected": np.flatnonzero(counts == n),
    }


class _PairedSelector(PersistMixin, SelectorMixin, BaseEstimator):
    """Shared surface of the paired-modality selectors (``X -> Y`` with ``n_genes``).

    Subclasses set ``genes_``/``markers_``, ``scores_``, ``y_mean_`` (the training mean
    of ``Y`` that R^2 is centred with) and ``n_outputs_`` through :meth:`_set_fit`.
    """

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        return tags

    def _set_fit(self, genes, scores, y_mean, n_outputs: int):
        _check_finite_fit(
            type(self).__name__, {"gene scores": scores},
            "X and Y must be preprocessed and standardised (jaxsel.preprocessing.sbnn_recipe).",
        )
        self.genes_ = np.asarray(genes).astype(np.intp)
        self.markers_ = self.genes_  # the selectors' common attribute name
        self.scores_ = np.asarray(scores, dtype=np.float32)
        self.y_mean_ = np.asarray(y_mean, dtype=np.float32)
        self.n_outputs_ = int(n_outputs)

    def _get_support_mask(self):
        return _support_mask(self)

    def _fitted_x(self, X):
        check_is_fitted(self, "genes_")
        return _check_X(self, X, reset=False)

    def score(self, X, Y):
        """R^2 as the papers define it: multivariate, centred with the training mean of
        ``Y``. An on-disk ``X`` is read in blocks (as :meth:`predict`)."""
        if streaming.is_source(X):
            check_is_fitted(self, "genes_")
            with streaming.open_source(X) as src:
                y = _check_Y(Y, src.n_obs)
                pred = self.predict(src)
            return metrics.r2_score(y, pred, center=self.y_mean_)
        x = self._fitted_x(X)
        y = _check_Y(Y, x.shape[0])
        return metrics.r2_score(y, self.predict(x), center=self.y_mean_)

    @classmethod
    def _cv_inputs(cls, X, Y, batch_size):
        """Validated ``(x, y, batch_size)`` for a cross-validation that leaves the
        estimator untouched (``batch_size`` resolved by :func:`fold_batch_size`)."""
        refuse_on_disk(X, "X", f"{cls.__name__}'s cross-validation")
        x = _check_X(BaseEstimator(), X, reset=True)
        y = _check_Y(Y, x.shape[0])
        return x, y, fold_batch_size(batch_size)


class SparseBottleneck(_PairedSelector):
    """Sparse bottleneck neural network (Bernaerts, Berens & Kobak 2022).

    Predicts a paired modality ``Y`` from genes ``X`` through a 2-D bottleneck, selects
    ``n_genes`` genes with a group lasso on the first layer, prunes to exactly those and
    fine-tunes. The whole schedule (pre-training on k-means clusters of ``Y``, frozen /
    unfrozen regression, pruning, fine-tuning, autoencoder head) is one compiled program;
    :meth:`cross_validate` runs all folds of it in one program. See
    :mod:`jaxsel.methods.sbnn` for the model and where it differs from the authors' code.

    Parameters
    ----------
    n_genes : int, default 25
        Genes kept by pruning.
    schedule : {"pretrain_freeze", "straight", "pretrain_straight"}, default "pretrain_freeze"
        The paper's procedure, the variant without pre-training, or pre-training
        followed by training all layers.
    lasso : float, default 0.1
        Group-lasso weight on the first layer.
    hidden : tuple of int, default (512, 128)
    latent_size : int, default 2
    learning_rate : float, default 1e-4
        Later stages use half of it.
    batch_size : int, default 32
    epochs : dict, optional
        Stage lengths overriding the schedule's, keys ``pretrain``, ``frozen``,
        ``unfrozen``, ``finetune``, ``ae`` (e.g. ``{"ae": 0}`` skips the autoencoder).
    n_clusters : int, default 20
        k-means clusters of ``Y`` for pre-training.
    random_state : int, optional
    verbose : bool, default False
        Print a progress line (stage, epoch, losses, time) from inside the compiled fit,
        at most once a second (:mod:`jaxsel.engine.progress`).
    chunk_size : int, default 16384
        Cells per chunk when ``X`` is on disk (:meth:`fit` streams it; ``predict``,
        ``latent`` and ``reconstruct_genes`` read it in blocks of this many cells).

    Attributes
    ----------
    genes_ : int [n_genes], selected genes (largest first-layer weight norm first);
        ``markers_`` is the same array (the name the other selectors use).
    scores_ : float32 [n_features_in_], first-layer row norms at pruning.
    history_ : dict of per-epoch arrays (``train_r2``, ``test_r2`` (here: on the
        training cells, as no cells are held out), ...).
    """

    def __init__(
        self,
        n_genes=25,
        *,
        schedule="pretrain_freeze",
        lasso=0.1,
        hidden=(512, 128),
        latent_size=2,
        learning_rate=1e-4,
        batch_size=32,
        epochs=None,
        n_clusters=20,
        random_state=None,
        verbose=False,
        chunk_size=streaming.DEFAULT_CHUNK_SIZE,
    ):
        self.n_genes = n_genes
        self.schedule = schedule
        self.lasso = lasso
        self.hidden = hidden
        self.latent_size = latent_size
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.epochs = epochs
        self.n_clusters = n_clusters
        self.random_state = random_state
        self.verbose = verbose
        self.chunk_size = chunk_size

    def _config(self, n_genes_in: int, n_outputs: int):
        from .methods import sbnn

        n_sel = _n_markers(self.n_genes, n_genes_in, "n_genes")
        kw = dict(
            n_selected=n_sel,
            lasso=check_real(self.lasso, "lasso", low=0.0),
            hidden=_check_hidden(self.hidden),
            latent_size=check_int(self.latent_size, "latent_size", 1),
            learning_rate=check_real(self.learning_rate, "learning_rate", low=0.0, low_open=True),
            batch_size=check_int(self.batch_size, "batch_size", 1),
            n_clusters=check_int(self.n_clusters, "n_clusters", 2),
        )
        names = {"pretrain", "frozen", "unfrozen", "finetune", "ae"}
        if self.epochs is not None and not isinstance(self.epochs, dict):
            raise TypeError(f"epochs must be a dict of stage lengths or None, got {self.epochs!r}.")
        for k, v in (self.epochs or {}).items():
            if k not in names:
                raise ValueError(f"epochs keys must be among {sorted(names)}, got {k!r}.")
            kw[f"{k}_epochs"] = check_int(v, f"epochs[{k!r}]", 0)
        return sbnn.SparseBottleneckConfig.create(n_genes_in, n_outputs, schedule=self.schedule, **kw)

    def _pretraining(self, cfg, y, train_sets, seed):
        if not cfg.pretrain_epochs:
            return None, None
        clusters, pre_tr, pre_va = preprocessing.pretraining_clusters(
            y, train_sets, n_clusters=cfg.n_clusters, random_state=seed
        )
        return clusters, engine.make_splits(pre_tr, pre_va)

    def fit(self, X, Y, *, checkpoint=None, checkpoint_every=10):
        """Fit the whole schedule on all cells.

        Parameters
        ----------
        X : array-like [n_cells, n_genes]; preprocessed expression (the paper:
            :func:`jaxsel.preprocessing.sbnn_recipe`). Never modified. Data larger than
            memory: a path to an ``.h5ad`` file or ``.zarr`` store, a backed AnnData, an
            h5py/zarr array or a :class:`jaxsel.streaming.RowSource` (already
            preprocessed, or with a row transform) is streamed in chunks of
            ``chunk_size`` cells: every stage trains through
            :func:`jaxsel.engine.fit_stream` (see Notes).
        Y : array-like [n_cells, n_features]; the paired modality (standardised), in
            memory also when ``X`` is on disk.
        checkpoint : path, optional
            Train in segments of at most ``checkpoint_every`` epochs (a segment ends
            with its stage) and write the training state to this ``.npz`` file after
            each; run again with the same path, settings and data and the fit goes on
            where it stopped, with the result of an uninterrupted fit, bit for bit. A
            file from other settings, other data or another jaxsel version is an error.
            ``X`` on disk: every stage writes its own file every ``checkpoint_every``
            epochs, named after the stage (``fit.npz`` gives ``fit.pretrain.npz``,
            ``fit.frozen.npz``, ...; :func:`jaxsel.engine.tagged_path`);
            run again, finished stages are read back without another pass over ``X``
            (only the gene means' pass and the validation cells are read again) and the
            interrupted one goes on, with the uninterrupted streamed fit's result bit
            for bit. The data on disk is identified by its shape, gene means,
            validation cells' values and ``Y``, not by every value.
        checkpoint_every : int
            Epochs per segment (default 10).

        Notes
        -----
        A fit from disk computes the gene means in one pass, runs k-means on ``Y`` as
        in memory, and trains every stage chunk by chunk with the stage's keys; an
        epoch is one pass over the cells, minibatches are shuffled within a chunk, and
        R^2 is tracked on a random ``chunk_size`` of the cells (at most), so it fits
        the same model as the in-memory fit, not the same numbers. Pre-training holds
        out at most ``chunk_size`` cells for its early stopping (the others train).
        """
        from .methods import sbnn

        if streaming.is_source(X):
            return self._fit_stream(X, Y, checkpoint, checkpoint_every)
        x = _check_X(self, X, reset=True)
        y = _check_Y(Y, x.shape[0])
        cfg = self._config(x.shape[1], y.shape[1])
        seed = check_random_state(self.random_state)
        everyone = np.arange(x.shape[0])
        split = engine.make_splits([everyone], [everyone])
        clusters, pre = self._pretraining(cfg, y, [everyone], seed)
        data = sbnn.make_data(x, y, None if clusters is None else clusters[0])
        args = (cfg, jax.random.key(seed), data, split.fold(0), None if pre is None else pre.fold(0))
        if checkpoint is None:
            res = sbnn.fit(*args, progress=progress_label(self))
        else:
            digest = engine.fingerprint(type(self).__name__, fit_settings(self), seed, x, y)
            res = sbnn.fit_checkpointed(*args, path=checkpoint, every=checkpoint_every, fingerprint=digest,
                                        progress=progress_label(self))
        self._store(cfg, res, y.shape[1])
        if hasattr(self, "stream_info_"):
            del self.stream_info_
        return self

    def _store(self, cfg, res, n_outputs: int):
        res = jax.device_get(res)
        self.cfg_ = cfg
        self.result_ = res
        self._set_fit(res.genes, res.gene_norms, res.y_mean, n_outputs)
        self.history_ = {k: np.asarray(v) for k, v in res.history.items()}

    def _fit_stream(self, X, Y, checkpoint=None, checkpoint_every=10):
        """:meth:`fit` with ``X`` streamed from disk (:func:`jaxsel.methods.sbnn.fit_stream`)."""
        cfg, y, fits, _ = self._folds_stream(X, Y, lambda n, seed: ([np.arange(n)], None), "fit", checkpoint,
                                             checkpoint_every)
        (res, info), = fits
        self._store(cfg, res, y.shape[1])
        _fitted_from_disk(self, res.x_mean.shape[0])
        self.stream_info_ = info
        return self

    def _stream_fits(self, src, y, cfg, seed, keys, train_sets, val_sets, x_means, checkpoint, every, tag=(),
                     part="fold"):
        """Streamed fits (:func:`jaxsel.methods.sbnn.fit_stream`) of the on-disk ``src``
        one after another: fit ``i`` trains on ``train_sets[i]`` with ``keys[i]``,
        centres with ``x_means[i]`` and the training rows' mean of ``y``, pre-trains on
        k-means clusters of its training ``Y`` (as in memory), and tracks R^2 on
        ``val_sets[i]`` (``None``: a random ``chunk_size`` of the cells; more than that
        many: a random ``chunk_size`` of them). With ``checkpoint``, fit ``i`` of
        several writes its stages' files under ``tagged_path(checkpoint, f"{part}{i}")``;
        ``tag`` goes into the fingerprint. A list of ``(host result, info)``."""
        from .methods import sbnn

        n_cells = src.n_obs
        chunk = streaming.check_chunk_size(self.chunk_size, cfg.batch_size)
        c = np.zeros((len(train_sets), n_cells), np.int32)
        pre = [None] * len(train_sets)
        if cfg.pretrain_epochs:
            clusters, pre_tr, pre_va = preprocessing.pretraining_clusters(
                y, train_sets, n_clusters=cfg.n_clusters, random_state=seed)
            c = np.maximum(clusters, 0).astype(np.int32)
            pre = [streaming.cap_validation(t, v, chunk, seed) for t, v in zip(pre_tr, pre_va)]
        rng = np.random.default_rng(seed)
        out = []
        for i, rows in enumerate(train_sets):
            val = np.arange(n_cells) if val_sets[i] is None else np.asarray(val_sets[i])
            if len(val) > chunk:
                val = np.sort(rng.choice(val, chunk, replace=False))

            def read(r, ci=c[i]):
                return {"x": src.read_rows(r), "y": y[r], "c": ci[r]}

            path, digest = checkpoint, ""
            if checkpoint is not None:
                if len(train_sets) > 1:
                    path = engine.tagged_path(checkpoint, f"{part}{i}")
                digest = engine.fingerprint(type(self).__name__, *tag, fit_settings(self), seed, src.identity(),
                                            y, len(train_sets), i)
            res, info = sbnn.fit_stream(cfg, keys[i], read, np.asarray(rows), val, x_means[i],
                                        y[rows].mean(axis=0, dtype=np.float64), pre_rows=pre[i], chunk_size=chunk,
                                        progress=progress_label(self), checkpoint=path, checkpoint_every=every,
                                        fingerprint=digest)
            out.append((jax.device_get(res), info))
        return out

    def _folds_stream(self, X, Y, sets, what, checkpoint, every):
        """:meth:`fit`, :meth:`cross_validate` or :meth:`selection_stability` of an
        on-disk ``X``: one pass for the gene means (each fold's training means), then one
        streamed fit per fold or restart. ``sets(n_cells, seed)`` gives the training sets
        and the test folds (``None`` for :meth:`fit` and restarts); one fit has the key
        ``key(seed)``, several the per-fold keys. ``(cfg, y, [(host result, info)],
        preds)`` with ``preds[i]`` fold ``i``'s prediction of ``Y`` on all its test
        cells, read in blocks (``None`` without test folds)."""
        from .methods import sbnn

        if checkpoint is not None:  # before any pass over X
            every = engine.check_checkpoint_args(checkpoint, every)
        with streaming.open_source(X) as src:
            n_cells, n_genes = src.shape
            y = _check_Y(Y, n_cells)
            cfg = self._config(n_genes, y.shape[1])
            chunk = streaming.check_chunk_size(self.chunk_size, cfg.batch_size)
            seed = check_random_state(self.random_state)
            train_sets, test_sets = sets(n_cells, seed)
            if test_sets is None:
                x_means = np.repeat(streaming.column_means(src, block_rows=chunk, name="X")[None], len(train_sets), 0)
            else:
                fold_of = np.full(n_cells, -1, np.int64)
                for i, te in enumerate(test_sets):
                    fold_of[te] = i
                x_means = streaming.column_means(src, block_rows=chunk, name="X", exclude=fold_of)
            keys = ([jax.random.key(seed)] if len(train_sets) == 1
                    else engine.fold_keys(jax.random.key(seed), len(train_sets)))
            vals = [None] * len(train_sets) if test_sets is None else test_sets
            fits = self._stream_fits(src, y, cfg, seed, keys, train_sets, vals, x_means, checkpoint, every,
                                     tag=(what,), part="fold" if test_sets is not None else "restart")
            preds = None
            if test_sets is not None:  # every test fold predicted in full (R^2 was tracked on at most a chunk)
                preds = [streaming.map_row_blocks(  # the fold's parameters moved to the device once
                    lambda block, _, r=jax.device_put(r): sbnn.predict(cfg, r, block, chunk=chunk),
                    lambda a, b, te=te: src.read_rows(te[a:b]), len(te), chunk) for (r, _), te in zip(fits, test_sets)]
        return cfg, y, fits, preds

    def _infer(self, fn, X):
        """``fn(cfg, result, x)`` over ``X`` in memory, or over an on-disk ``X`` read in
        blocks of ``chunk_size`` cells (:func:`jaxsel.streaming.map_row_blocks`)."""
        if not streaming.is_source(X):
            return np.asarray(fn(self.cfg_, self.result_, self._fitted_x(X)))
        check_is_fitted(self, "genes_")
        rows = check_int(self.chunk_size, "chunk_size", 1)
        return _map_on_disk(self, X, lambda b: fn(self.cfg_, self.result_, b, chunk=rows), rows)

    def predict(self, X):
        """Predicted ``Y`` from the selected genes, [n_cells, n_features]. An on-disk
        ``X`` is read in blocks of ``chunk_size`` cells."""
        from .methods import sbnn

        return self._infer(sbnn.predict, X)

    def latent(self, X):
        """The bottleneck embedding, [n_cells, latent_size] (an on-disk ``X``: as :meth:`predict`)."""
        from .methods import sbnn

        return self._infer(sbnn.latent, X)

    def reconstruct_genes(self, X):
        """The autoencoder head's prediction of the selected genes (columns in
        ``genes_`` order), [n_cells, n_genes] (an on-disk ``X``: as :meth:`predict`)."""
        from .methods import sbnn

        if not self.cfg_.ae_epochs:
            raise ValueError("the autoencoder head was not trained (epochs={'ae': 0})")
        return self._infer(sbnn.reconstruct_genes, X)

    def cross_validate(self, X, Y, n_folds=10, batch_size="auto", *, checkpoint=None, checkpoint_every=10):
        """K-fold CV of the whole schedule, all folds in one compiled program.

        Each fold centres ``X`` and ``Y`` with its training means, pre-trains on k-means
        clusters of its training ``Y``, and tracks train and test R^2 every epoch. The
        estimator itself is not fitted or changed. ``batch_size``: folds fitted at a time
        per device, as in :meth:`MarkerMap.cross_validate` (``"auto"``: one at a time on
        CPU, bit for bit each fold's own fit; all vmapped on accelerators).
        ``checkpoint`` / ``checkpoint_every``: as in :meth:`fit`, for every fold at once
        (a stage ends when every fold has ended it); a resumed run equals an
        uninterrupted checkpointed one bit for bit, and the plain CV in genes and
        training histories (test-fold metrics to the last bit:
        :func:`jaxsel.methods.sbnn.fit_folds_checkpointed`).

        Notes
        -----
        An ``X`` on disk (as in :meth:`fit`; ``Y`` stays in memory) is cross-validated
        fold after fold on the same folds and per-fold keys as in memory: one pass
        gives every fold's training gene means, then each fold is a streamed fit
        (:meth:`fit`'s Notes), so ``n_folds`` passes over the data per epoch with host
        memory bounded by ``chunk_size``. The history's test R^2 is tracked on at most
        ``chunk_size`` of a fold's test cells (a random subset when the fold is
        larger); ``test_r2`` and ``test_r2_per_feature`` are computed on all of them
        after training, reading them in blocks. With ``checkpoint``, every fold's
        stages write their own files (``cv.npz`` gives ``cv.fold0.pretrain.npz``,
        ``cv.fold0.frozen.npz``, ..., ``cv.fold1.pretrain.npz``, ...) and a run killed
        in fold ``i`` goes on there, finished folds read back. ``batch_size`` does not
        apply (one fold at a time).

        Returns
        -------
        dict
            ``test_r2`` / ``train_r2`` float [n_folds] (final parameters),
            ``test_r2_per_feature`` [n_folds, n_features], ``history`` dict of
            [n_folds, n_epochs(, ...)] arrays, ``genes`` int [n_folds, n_genes],
            ``test_indices`` list of arrays; for ``X`` on disk, ``stream_info``: per
            fold the streamed loop's timing per stage.
        """
        if streaming.is_source(X):
            return self._cross_validate_stream(X, Y, n_folds, batch_size, checkpoint, checkpoint_every)
        x, y, batch_size = self._cv_inputs(X, Y, batch_size)
        cfg = self._config(x.shape[1], y.shape[1])
        seed = check_random_state(self.random_state)
        folds = _paired_folds(x.shape[0], n_folds, seed)
        train_sets = [f[0] for f in folds]
        splits = engine.make_splits(train_sets, [f[2] for f in folds])
        clusters, pre = self._pretraining(cfg, y, train_sets, seed)
        keys = engine.fold_keys(jax.random.key(seed), len(folds))
        res = self._fit_folds(cfg, keys, x, y, splits, clusters, pre, batch_size, checkpoint, checkpoint_every,
                              "cross_validate", seed)
        res = jax.device_get(res)
        hist = {k: np.asarray(v) for k, v in res.history.items()}
        return {
            "test_r2": hist["test_r2"][:, -1],
            "train_r2": hist["train_r2"][:, -1],
            "test_r2_per_feature": hist["test_r2_per_feature"][:, -1],
            "history": hist,
            "genes": np.asarray(res.genes).astype(np.intp),
            "test_indices": [f[2] for f in folds],
        }

    def selection_stability(self, X, Y, n_restarts=10, batch_size="auto", *, checkpoint=None,
                            checkpoint_every=10):
        """Fit ``n_restarts`` random restarts on all cells in one program and report how
        often each gene is selected (``batch_size``, ``checkpoint`` and
        ``checkpoint_every`` as in :meth:`cross_validate`).

        Returns
        -------
        dict
            ``genes`` [n_restarts, n_genes]; ``frequency`` [n_features] (fraction of
            restarts selecting each gene); ``counts``; ``mean_pairwise_overlap`` (genes
            shared by two restarts, averaged over pairs); ``always_selected``.

        An ``X`` on disk is streamed as in :meth:`cross_validate`: one restart after
        another, each a streamed fit on all cells (checkpoint files ``restart0``,
        ``restart1``, ...).
        """
        n_restarts = check_int(n_restarts, "n_restarts", 2)
        if streaming.is_source(X):
            fold_batch_size(batch_size)  # checked also where it does not apply
            _, _, fits, _ = self._folds_stream(X, Y, lambda n, seed: ([np.arange(n)] * n_restarts, None),
                                               "selection_stability", checkpoint, checkpoint_every)
            return _selection_stability(np.stack([r.genes for r, _ in fits]), fits[0][0].x_mean.shape[0])
        x, y, batch_size = self._cv_inputs(X, Y, batch_size)
        cfg = self._config(x.shape[1], y.shape[1])
        seed = check_random_state(self.random_state)
        everyone = np.arange(x.shape[0])
        sets = [everyone] * n_restarts
        splits = engine.make_splits(sets, sets)
        clusters, pre = self._pretraining(cfg, y, sets, seed)
        keys = engine.fold_keys(jax.random.key(seed), n_restarts)
        res = self._fit_folds(cfg, keys, x, y, splits, clusters, pre, batch_size, checkpoint, checkpoint_every,
                              "selection_stability", seed)
        return _selection_stability(np.asarray(res.genes), x.shape[1])

    def _cross_validate_stream(self, X, Y, n_folds, batch_size, checkpoint, every):
        """:meth:`cross_validate` of an on-disk ``X`` (see its Notes)."""
        fold_batch_size(batch_size)  # checked also where it does not apply
        folds = []

        def sets(n_cells, seed):
            folds.extend(_paired_folds(n_cells, n_folds, seed))
            return [f[0] for f in folds], [f[2] for f in folds]

        _, y, fits, preds = self._folds_stream(X, Y, sets, "cross_validate", checkpoint, every)
        res = jax.tree.map(lambda *a: np.stack([np.asarray(v) for v in a]), *[r for r, _ in fits])
        infos = [info for _, info in fits]
        hist = {k: np.asarray(v) for k, v in res.history.items()}
        tests = [f[2] for f in folds]
        per_feature = np.stack([metrics.r2_score(y[te], p, center=c, per_feature=True)
                                for te, p, c in zip(tests, preds, res.y_mean)])
        return {
            "test_r2": np.array([metrics.r2_score(y[te], p, center=c) for te, p, c in zip(tests, preds, res.y_mean)]),
            "train_r2": hist["train_r2"][:, -1],
            "test_r2_per_feature": per_feature,
            "history": hist,
            "genes": np.asarray(res.genes).astype(np.intp),
            "test_indices": tests,
            "stream_info": infos,
        }

    def _fit_folds(self, cfg, keys, x, y, splits, clusters, pre, batch_size, checkpoint, every, what, seed):
        """The fold-parallel program, checkpointed when ``checkpoint`` is a path."""
        from .methods import sbnn

        args = (cfg, keys, sbnn.make_data(x, y), splits, clusters, pre)
        if checkpoint is None:
            return sbnn.fit_folds(*args, batch_size=batch_size, progress=progress_label(self))
        digest = engine.fingerprint(type(self).__name__, what, fit_settings(self), seed, x, y, batch_size,
                                    np.asarray(splits.train_idx), np.asarray(splits.val_idx))
        return sbnn.fit_folds_checkpointed(*args, path=checkpoint, every=every, fingerprint=digest,
                                           batch_size=batch_size, progress=progress_label(self))


def _training_rows(mom, keep, p: int):
    """Of the groups where ``keep`` is True: their mean row, their scatter about it and
    the ``p + q`` float32 rows with that scatter (:func:`jaxsel.streaming.square_root_rows`)
    that sRRR is fitted on."""
    mean = mom.mean(keep)
    scatter = mom.scatter_about(keep, mean)
    return mean, scatter, streaming.square_root_rows(scatter, p)


def _no_pass_to_resume(checkpoint):
    """``SparseRRR``'s ``checkpoint`` resumes its pass over an ``X`` on disk: with ``X``
    in memory there is none, and silently ignoring the file would mislead."""
    if checkpoint is not None:
        raise ValueError("checkpoint resumes the pass over an X on disk (a path, a backed AnnData, an h5py/zarr "
                         "array or a RowSource); with X in memory there is no pass to resume (the fit is one "
                         "solve): pass checkpoint=None.")


class SparseRRR(_PairedSelector):
    """Sparse reduced-rank regression (Kobak et al. 2021), the sBNN paper's linear baseline.

    ``Y ~ X W V^T`` with rank ``rank``, ``V`` orthonormal, and a group lasso (plus ridge
    when ``alpha < 1``) on the rows of ``W``: whole genes are switched off. The penalty is
    chosen by bisection so that exactly ``n_genes`` genes are selected; ``relaxed=True``
    (default) refits those genes without the lasso (ridge with the same penalty), the
    paper's relaxed sRRR. ``X`` and ``Y`` are centred with their training means inside
    ``fit``. See :mod:`jaxsel.methods.srrr`.

    Parameters
    ----------
    rank : int, default 2
    n_genes : int, default 25
    alpha : float in (0, 1], default 1.0
        Lasso share of the elastic-net penalty (1 = pure group lasso).
    relaxed : bool, default True
    chunk_size : int, default 16384
        Cells read per block when ``X`` is on disk (see :meth:`fit`).

    Attributes
    ----------
    genes_ (= ``markers_``) : int [n_genes], selected genes, largest row norm first.
    scores_ : float32 [n_features_in_], row norms of ``W`` (zero outside the selection).
    coef_w_ [n_features_in_, rank], coef_v_ [n_outputs, rank], lambda_ : the fit.
    stream_info_ : dict, after a fit of ``X`` on disk: ``n_cells``, ``chunk_size``,
        ``rows`` (``p + q``), ``moments_seconds`` (the pass over the file) and
        ``solve_seconds``.
    """

    def __init__(self, rank=2, n_genes=25, *, alpha=1.0, relaxed=True, chunk_size=streaming.DEFAULT_CHUNK_SIZE):
        self.rank = rank
        self.n_genes = n_genes
        self.alpha = alpha
        self.relaxed = relaxed
        self.chunk_size = chunk_size

    def _check(self, p: int, q: int):
        rank = check_int(self.rank, "rank", 1)
        if rank > min(p, q):
            raise ValueError(f"rank must be in [1, min(n_genes, n_outputs) = {min(p, q)}], got {rank}.")
        n = _n_markers(self.n_genes, p, "n_genes")
        alpha = check_real(self.alpha, "alpha", low=0.0, high=1.0, low_open=True)
        check_bool(self.relaxed, "relaxed")
        return rank, n, alpha, bool(self.relaxed)

    def fit(self, X, Y, *, checkpoint=None, checkpoint_every=8):
        """Fit on all cells (centred with their means). ``X`` is never modified.

        ``X`` larger than memory (a path to an ``.h5ad`` file or ``.zarr`` store, a backed
        AnnData, an h5py/zarr array or a :class:`jaxsel.streaming.RowSource`) is read once
        in blocks of ``chunk_size`` cells (``Y`` stays in memory): sRRR depends on the
        data only through the means and the scatter matrix of ``[X, Y]``, accumulated in
        float64 (:func:`jaxsel.streaming.paired_moments`, ``(p + q)^2`` values), and is
        fitted on ``p + q`` rows with the same scatter
        (:func:`jaxsel.streaming.square_root_rows`): the same problem, solved from
        float32 grams rounded differently, so the same genes and coefficients to float32
        precision, not the same bits.

        ``checkpoint`` (a file path; ``X`` on disk only, the pass being what takes time):
        the pass's running sums are written there after every ``checkpoint_every``
        blocks of ``chunk_size`` cells and at its end. A fit run again with the same
        path, data, ``Y`` and ``chunk_size`` goes on from the last block written, to the
        same moments bit for bit (so the same fit), and once the pass has finished reads
        no cells at all: a refit with another ``n_genes``, ``rank`` or ``alpha`` reuses
        the file. The file (about ``(p + q)^2`` float64) is left in place.
        """
        from .methods import srrr

        if streaming.is_source(X):
            mom, y, (rank, n, alpha, relaxed), _, info = self._moments_on_disk(
                X, Y, checkpoint=checkpoint, checkpoint_every=checkpoint_every)
            t1 = time.perf_counter()
            p = mom.sums.shape[1] - y.shape[1]  # genes
            mean, _, (xr, yr) = _training_rows(mom, [True], p)
            res = srrr.fit_n_genes(xr, yr, n, rank, alpha=alpha, relaxed=relaxed, n_cells=int(mom.n[0]))
            _fitted_from_disk(self, p)
            self.x_mean_ = mean[:p].astype(np.float32)
            self.y_mean_ = mean[p:].astype(np.float32)
            self._store_result(res, y.shape[1])
            self.stream_info_ = {**info, "rows": int(xr.shape[0]), "solve_seconds": time.perf_counter() - t1}
            return self
        _no_pass_to_resume(checkpoint)
        x = _check_X(self, X, reset=True)
        y = _check_Y(Y, x.shape[0])
        rank, n, alpha, relaxed = self._check(x.shape[1], y.shape[1])
        self.x_mean_ = x.mean(axis=0)
        self.y_mean_ = y.mean(axis=0)
        res = srrr.fit_n_genes(x - self.x_mean_, y - self.y_mean_, n, rank, alpha=alpha, relaxed=relaxed)
        if hasattr(self, "stream_info_"):  # of an earlier fit from disk
            del self.stream_info_
        return self._store_result(res, y.shape[1])

    def _store_result(self, res, n_outputs: int):
        res = jax.device_get(res)
        self.result_ = res
        self.coef_w_ = np.asarray(res.w)
        self.coef_v_ = np.asarray(res.v)
        self.lambda_ = float(res.lam)
        self._set_fit(res.genes, np.sqrt(np.sum(self.coef_w_**2, axis=1)), self.y_mean_, n_outputs)
        return self

    def latent(self, X):
        """The ``rank``-dimensional projection ``(X - mean) W``, [n_cells, rank]. An
        on-disk ``X`` is read in blocks of ``chunk_size`` cells."""
        if streaming.is_source(X):
            check_is_fitted(self, "genes_")
            return _map_on_disk(self, X, lambda b: (b - self.x_mean_) @ self.coef_w_,
                                check_int(self.chunk_size, "chunk_size", 1))
        return (self._fitted_x(X) - self.x_mean_) @ self.coef_w_

    def predict(self, X):
        """Predicted ``Y``, [n_cells, n_outputs] (an on-disk ``X``: as :meth:`latent`)."""
        return self.latent(X) @ self.coef_v_.T + self.y_mean_

    def cross_validate(self, X, Y, n_folds=10, random_state=0, batch_size="auto", *, checkpoint=None,
                       checkpoint_every=8):
        """K-fold CV, every fold (centring, lambda search, relaxed refit) in one program.

        ``batch_size`` folds are solved at a time per device (``None``: all, vmapped;
        ``"auto"``: 1 on CPU, ``None`` on accelerators). One at a time loops over folds
        inside the program: the solver's while loops then stop per fold, and each fold's
        result is bit for bit the same on any number of devices (vmapped folds agree to
        float32 rounding only; see :func:`jaxsel.methods.srrr.cross_validate`).

        ``X`` on disk (as in :meth:`fit`): one pass reads every test fold's moments
        (:func:`jaxsel.streaming.paired_moments` with the folds as groups; memory
        ``n_folds (p + q)^2`` float64), each fold's training scatter is the sum of the
        other folds', centred with their mean, and all folds are fitted on their
        :func:`jaxsel.streaming.square_root_rows` in one program
        (:func:`jaxsel.methods.srrr.fit_n_genes_folds`). R^2 comes from each test fold's
        scatter about its training mean (:func:`jaxsel.streaming.linear_r2`), in float64,
        without reading the cells again. The same folds as in memory. ``checkpoint``,
        ``checkpoint_every``: the pass resumes as in :meth:`fit` (its file holds every
        fold's moments, ``n_folds (p + q)^2`` float64).

        Returns
        -------
        dict
            ``test_r2``, ``train_r2`` [n_folds]; ``test_r2_per_feature``
            [n_folds, n_outputs]; ``genes`` [n_folds, n_genes]; ``lambda`` [n_folds];
            ``test_indices``; on disk also ``stream_info`` (``moments_seconds``,
            ``solve_seconds``; with a checkpoint ``checkpoint_seconds``, the part of
            the pass spent writing it, and ``first_row``, the row it went on from).
        """
        from .methods import srrr

        if streaming.is_source(X):
            return self._cross_validate_stream(X, Y, n_folds, random_state, fold_batch_size(batch_size), checkpoint,
                                               checkpoint_every)
        _no_pass_to_resume(checkpoint)
        x, y, batch_size = self._cv_inputs(X, Y, batch_size)
        rank, n, alpha, relaxed = self._check(x.shape[1], y.shape[1])
        folds = _paired_folds(x.shape[0], n_folds, check_random_state(random_state))
        splits = engine.make_splits([f[0] for f in folds], [f[2] for f in folds])
        res = jax.device_get(srrr.cross_validate(
            x, y, splits, rank=rank, n_genes=n, alpha=alpha, relaxed=relaxed, batch_size=batch_size
        ))
        return {
            "test_r2": np.asarray(res.r2_test),
            "train_r2": np.asarray(res.r2_train),
            "test_r2_per_feature": np.asarray(res.r2_test_per_feature),
            "genes": np.asarray(res.result.genes).astype(np.intp),
            "lambda": np.asarray(res.result.lam),
            "test_indices": [f[2] for f in folds],
        }

    def _moments_on_disk(self, X, Y, n_folds=None, random_state=None, *, checkpoint=None, checkpoint_every=8):
        """The one pass of :meth:`fit` (one group) or :meth:`cross_validate` (the test
        folds as groups) over an on-disk ``X``, every argument checked first, resumable
        from ``checkpoint``: ``(moments, y, checked settings, folds or None, {"n_cells",
        "chunk_size", "moments_seconds"})``."""
        t0 = time.perf_counter()
        with streaming.open_source(X) as src:
            y = _check_Y(Y, src.n_obs)
            settings = self._check(src.n_vars, y.shape[1])
            chunk = check_int(self.chunk_size, "chunk_size", 1)
            folds, fold_of = None, None
            if n_folds is not None:
                folds = _paired_folds(src.n_obs, n_folds, check_random_state(random_state))
                fold_of = np.full(src.n_obs, -1, np.int64)
                for i, (_, _, te) in enumerate(folds):
                    fold_of[te] = i
            mom = streaming.paired_moments(src, y, groups=fold_of, block_rows=chunk, name="X", checkpoint=checkpoint,
                                           checkpoint_every=checkpoint_every, checkpoint_key=type(self).__name__)
        info = {"n_cells": int(mom.n.sum()), "chunk_size": chunk, "moments_seconds": time.perf_counter() - t0}
        if checkpoint is not None:
            info["checkpoint_seconds"] = mom.checkpoint_seconds  # of moments_seconds, writing the file
            info["first_row"] = mom.first_row  # where the pass went on (n_cells: it had finished)
        return mom, y, settings, folds, info

    def _cross_validate_stream(self, X, Y, n_folds, random_state, batch_size, checkpoint=None, checkpoint_every=8):
        """:meth:`cross_validate` of an on-disk ``X``: one pass for every fold's moments
        (:func:`jaxsel.streaming.paired_moments` with the test folds as groups), every
        fold fitted on its training rows' :func:`jaxsel.streaming.square_root_rows` in
        one program, R^2 from each fold's scatter about its training mean."""
        from .methods import srrr

        mom, y, (rank, n, alpha, relaxed), folds, info = self._moments_on_disk(
            X, Y, n_folds, random_state, checkpoint=checkpoint, checkpoint_every=checkpoint_every)
        t1 = time.perf_counter()
        p = mom.sums.shape[1] - y.shape[1]  # genes
        fits = [_training_rows(mom, np.arange(len(folds)) != i, p) for i in range(len(folds))]
        res = jax.device_get(srrr.fit_n_genes_folds(
            np.stack([r[0] for _, _, r in fits]), np.stack([r[1] for _, _, r in fits]),
            np.array([mom.n.sum() - mom.n[i] for i in range(len(folds))], np.float32), n, rank, alpha=alpha,
            relaxed=relaxed, batch_size=batch_size))
        r2 = {"test_r2": [], "train_r2": [], "test_r2_per_feature": []}
        for i, ((m, s_train, _), w, v) in enumerate(zip(fits, res.w, res.v)):
            b = np.asarray(w, np.float64) @ np.asarray(v, np.float64).T
            s_test = mom.scatter_about(np.arange(len(folds)) == i, m)
            r2["test_r2"].append(streaming.linear_r2(s_test, b, p))
            r2["test_r2_per_feature"].append(streaming.linear_r2(s_test, b, p, per_feature=True))
            r2["train_r2"].append(streaming.linear_r2(s_train, b, p))
        return {
            **{k: np.asarray(v, np.float32) for k, v in r2.items()},
            "genes": np.asarray(res.genes).astype(np.intp),
            "lambda": np.asarray(res.lam),
            "test_indices": [f[2] for f in folds],
            "stream_info": {**info, "solve_seconds": time.perf_counter() - t1},
        }

"""Input validation shared by the numpy-facing layers of jaxsel.

Every public function that takes user data runs it through these helpers, so
that bad input fails early with a message naming the argument and what was
expected, instead of deep inside a jitted program. None of the helpers modify
their inputs; they return new (or, where no conversion was needed, the same)
objects.
"""

from __future__ import annotations

import numbers
import os

import numpy as np
import scipy.sparse as sp

__all__ = [
    "check_matrix",
    "check_labels",
    "check_n_markers",
    "check_random_state",
    "to_dense",
]

_DEFAULT_MAX_DENSE_BYTES = 2**31


def _describe(x) -> str:
    """Short human description of an object's type for error messages."""
    return type(x).__module__ + "." + type(x).__qualname__


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def refuse_on_disk(x, name: str = "X", who: str | None = None):
    """A clear ``TypeError`` for data on disk (a path, a backed AnnData, an h5py/zarr
    array: :func:`jaxsel.streaming.is_source`) where a method needs it in memory."""
    from . import streaming

    if streaming.is_source(x):
        raise TypeError(
            f"{who or 'this method'} needs {name} in memory, got data on disk ({type(x).__name__}); load it "
            "(adata.to_memory(), or adata.X[:] for a backed AnnData). MarkerMap, ConcreteVAE, GlobalGumbelVAE "
            "(fit, cross_validate and inference), SparseBottleneck (fit, cross_validate, selection_stability and "
            "inference), SparseRRR (fit, cross_validate and inference), HVGMarkers, DEMarkers, RandomMarkers and "
            "GimVI (its reference) stream from disk; StAI reads from disk only the genes it uses, and GimVI "
            "reads its spatial data into memory.")


def check_matrix(
    x,
    *,
    name: str = "x",
    allow_sparse: bool = True,
    max_dense_bytes: int = _DEFAULT_MAX_DENSE_BYTES,
    require_counts: bool = False,
    dtype=np.float32,
):
    """Validate a cells x genes matrix.

    Parameters
    ----------
    x : array-like or scipy.sparse matrix, shape [n_cells, n_genes]
        The matrix to check. Lists, numpy arrays, pandas DataFrames and scipy
        sparse matrices or arrays are accepted. An AnnData object is rejected
        with a hint to pass ``adata.X``.
    name : str, default "x"
        Argument name used in error messages.
    allow_sparse : bool, default True
        If True, sparse input is returned sparse (CSR or CSC; other formats
        are converted to CSR). If False, sparse input is densified through
        :func:`to_dense`, subject to ``max_dense_bytes``.
    max_dense_bytes : int, default 2**31
        Size guard used when a sparse input has to be densified.
    require_counts : bool, default False
        If True, every entry must be a non-negative integer value.
    dtype : numpy dtype or None, default numpy.float32
        Output dtype. ``None`` keeps a floating dtype as it is and casts
        integer or boolean input to float32.

    Returns
    -------
    x : numpy.ndarray or scipy.sparse matrix, shape [n_cells, n_genes]
        The validated matrix. It may be the input object itself when no
        conversion was needed; callers must not modify it in place.

    Raises
    ------
    TypeError
        If ``x`` is not numeric (strings, objects, complex numbers) or is an
        AnnData object.
    ValueError
        If ``x`` is not two-dimensional, is empty, contains NaN or infinite
        values or values beyond the range of ``dtype`` (float64 data past the
        float32 range would become infinite), or (with ``require_counts``)
        contains negative or non-integer values, or if densifying would exceed
        ``max_dense_bytes``.
    """
    refuse_on_disk(x, name)
    if isinstance(x, (str, bytes, os.PathLike)):
        raise TypeError(f"{name} must be a matrix of shape [n_cells, n_genes], got {x!r}; files are read from "
                        ".h5ad and .zarr paths only, where data on disk is accepted.")
    if hasattr(x, "obs") and hasattr(x, "var") and hasattr(x, "X"):
        raise TypeError(
            f"{name} must be a matrix of shape [n_cells, n_genes], got an AnnData "
            f"object; pass adata.X (or a layer) instead."
        )
    if sp.issparse(x):
        if x.ndim != 2:
            raise ValueError(f"{name} must be 2-D [n_cells, n_genes], got ndim={x.ndim}.")
        if x.format not in ("csr", "csc"):
            x = x.tocsr()
        kind = x.dtype.kind
    else:
        try:
            x = np.asarray(x)
        except Exception as err:  # ragged nested lists and the like
            raise TypeError(
                f"{name} must be a numeric array-like of shape [n_cells, n_genes]; "
                f"could not convert {_describe(x)} to an array ({err})."
            ) from err
        if x.ndim != 2:
            raise ValueError(
                f"{name} must be 2-D [n_cells, n_genes], got an array with shape {x.shape}."
            )
        kind = x.dtype.kind
    if kind not in "biuf":
        raise TypeError(
            f"{name} must hold real numbers (bool, int or float), got dtype {x.dtype}."
        )
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}.")

    if dtype is None:
        out_dtype = x.dtype if kind == "f" else np.dtype(np.float32)
    else:
        out_dtype = np.dtype(dtype)

    values = x.data if sp.issparse(x) else x
    check_values(values, name, require_counts=require_counts)
    check_cast_range(values, out_dtype, name)

    if sp.issparse(x):
        if x.dtype != out_dtype:
            x = x.astype(out_dtype)
        if not allow_sparse:
            x = to_dense(x, max_dense_bytes=max_dense_bytes, name=name)
        return x
    if x.dtype != out_dtype:
        x = x.astype(out_dtype)
    return x


def check_values(values, name: str, *, require_counts: bool = False, nonnegative: bool = False, where: str = "",
                 hint: str = "") -> None:
    """``ValueError`` for NaN or infinite entries of the numeric array ``values``; with
    ``require_counts``, for negative or non-integer ones; with ``nonnegative``, for
    negative ones. ``where`` (e.g. ``" in rows 0..99"``) says which part of ``name`` a
    block of it is; ``hint`` ends the negative-value message."""
    values = np.asarray(values)
    kind = values.dtype.kind
    if not values.size:
        return
    if kind == "f" and not np.isfinite(values).all():
        n_bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
        raise ValueError(f"{name} contains {n_bad} NaN or infinite value(s){where}.")
    if (require_counts or nonnegative) and kind in "iuf" and values.min() < 0:
        raise ValueError(f"{name} must be non-negative counts, found minimum {values.min()}{where}{hint}.")
    if require_counts and kind == "f" and not np.array_equal(values, np.round(values)):
        raise ValueError(
            f"{name} must hold integer-valued counts (raw counts, not normalised or "
            f"log-transformed data); found non-integer values{where}."
        )


def check_indices(idx, n: int, name: str, *, what: str = "cell") -> np.ndarray:
    """A 1-D array of integer ``what`` indices in ``[0, n)``, as int64; ``ValueError`` or
    ``TypeError`` naming ``name`` otherwise."""
    arr = np.asarray(idx)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of {what} indices, got shape {arr.shape}.")
    if arr.size and arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer {what} indices, got dtype {arr.dtype}.")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise ValueError(f"{name} must hold {what} indices in [0, {n}), got values from {arr.min()} to {arr.max()}.")
    return arr


def check_cast_range(values, dtype, name: str = "x") -> None:
    """Raise ``ValueError`` when finite float ``values`` would overflow to infinity once
    cast to the narrower float ``dtype`` (float64 data beyond the float32 range)."""
    values = values.data if sp.issparse(values) else np.asarray(values)
    dtype = np.dtype(dtype)
    if values.dtype.kind != "f" or dtype.kind != "f" or dtype.itemsize >= values.dtype.itemsize:
        return
    if values.size:
        top = float(np.max(np.abs(values)))
        limit = float(np.finfo(dtype).max)
        if top > limit:
            raise ValueError(
                f"{name} holds values up to {top:.3g} in magnitude, beyond the {dtype} range "
                f"(+-{limit:.3g}) it is computed in; rescale or preprocess it first."
            )


def to_dense(x, max_dense_bytes: int = _DEFAULT_MAX_DENSE_BYTES, *, name: str = "x", dtype=None):
    """Return a dense numpy array, refusing to allocate more than a size guard.

    Parameters
    ----------
    x : array-like or scipy.sparse matrix
        Input matrix. Dense input is returned through :func:`numpy.asarray`
        (no copy when possible), since it is already allocated.
    max_dense_bytes : int, default 2**31
        Largest dense result, in bytes, that may be allocated from sparse
        input. ``None`` disables the guard.
    name : str, default "x"
        Argument name used in error messages.
    dtype : numpy dtype, optional
        Output dtype; defaults to the input's.

    Returns
    -------
    numpy.ndarray

    Raises
    ------
    ValueError
        If ``x`` is sparse and its dense form would exceed ``max_dense_bytes``.
    """
    if sp.issparse(x):
        out_dtype = np.dtype(dtype) if dtype is not None else x.dtype
        n_bytes = int(np.prod(x.shape, dtype=np.int64)) * out_dtype.itemsize
        if max_dense_bytes is not None and n_bytes > max_dense_bytes:
            raise ValueError(
                f"{name} is sparse with shape {tuple(x.shape)}; its dense {out_dtype} form "
                f"would need {_format_bytes(n_bytes)}, more than max_dense_bytes="
                f"{_format_bytes(max_dense_bytes)}. Subset genes or cells first, or raise "
                f"max_dense_bytes if the memory is available."
            )
        out = x.toarray()
        return out.astype(out_dtype, copy=False)
    out = np.asarray(x)
    if dtype is not None:
        out = out.astype(dtype, copy=False)
    return out


def _is_missing(values: np.ndarray) -> np.ndarray:
    """Boolean mask of missing entries (NaN, None, pandas NA) in a 1-D array."""
    if values.dtype.kind == "f":
        return np.isnan(values)
    if values.dtype.kind == "O":
        import pandas as pd  # anndata dependency, always present

        return np.asarray(pd.isna(values), dtype=bool)
    return np.zeros(values.shape, dtype=bool)


def check_labels(y, n_cells: int | None, *, name: str = "y", min_classes: int = 2, hint: str = ""):
    """Validate a vector of cell labels and encode it as integer codes.

    Parameters
    ----------
    y : array-like, shape [n_cells]
        Labels of any sortable type (ints, strings, a pandas Categorical or
        Series). A column vector of shape [n_cells, 1] is accepted.
    n_cells : int or None
        Expected length (the number of rows of the matching ``x``); ``None``
        skips the length check.
    name : str, default "y"
        Argument name used in error messages.
    min_classes : int, default 2
        Smallest number of distinct labels accepted.
    hint : str, default ""
        Appended to the missing-label message (what else the caller accepts).

    Returns
    -------
    codes : numpy.ndarray of int32, shape [n_cells]
        ``classes[codes] == y``.
    classes : numpy.ndarray, shape [n_classes]
        Sorted distinct labels.

    Raises
    ------
    ValueError
        On a length mismatch, missing values (NaN, None), a non-1-D shape or
        fewer than ``min_classes`` distinct labels.
    TypeError
        If the labels cannot be sorted (for example mixed strings and numbers).
    """
    if y is None:
        raise ValueError(f"{name} must be a vector of labels, got None.")
    if hasattr(y, "to_numpy"):  # pandas Series / Categorical-backed objects
        values = y.to_numpy()
    else:
        values = np.asarray(y)
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1:
        raise ValueError(
            f"{name} must be a 1-D vector of labels with one entry per cell, got shape "
            f"{values.shape}."
        )
    if n_cells is not None and values.shape[0] != n_cells:
        raise ValueError(
            f"{name} has {values.shape[0]} labels but x has {n_cells} cells; they must match."
        )
    if values.dtype.kind == "c":
        raise TypeError(f"{name} must not be complex, got dtype {values.dtype}.")
    missing = _is_missing(values)
    if missing.any():
        raise ValueError(
            f"{name} contains {int(missing.sum())} missing label(s) (NaN/None); drop or "
            f"label those cells first.{hint}"
        )
    try:
        classes, codes = np.unique(values, return_inverse=True)
    except TypeError as err:
        raise TypeError(
            f"{name} must hold labels of one sortable type (all strings or all numbers); "
            f"{err}"
        ) from err
    if classes.shape[0] < min_classes:
        raise ValueError(
            f"{name} must contain at least {min_classes} distinct classes, found "
            f"{classes.shape[0]} ({classes[:5].tolist()})."
        )
    return codes.reshape(-1).astype(np.int32), classes


def check_real(value, name: str, *, low=None, high=None, low_open=False, high_open=False,
                allow_none=False):
    """A finite real number within ``[low, high]`` (open ends on request), as a float.

    Raises ``TypeError`` for non-numbers (``bool`` included) and ``ValueError`` outside
    the range, both naming ``name``.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}.")
    value = float(value)
    ok = np.isfinite(value)
    if low is not None:
        ok &= value > low if low_open else value >= low
    if high is not None:
        ok &= value < high if high_open else value <= high
    if not ok:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        br = ("(" if low_open or low is None else "[", ")" if high_open or high is None else "]")
        raise ValueError(f"{name} must be in {br[0]}{lo}, {hi}{br[1]}, got {value}.")
    return value


def check_bool(value, name: str) -> bool:
    """``value`` as a bool; a ``TypeError`` naming ``name`` for anything but a bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}.")
    return bool(value)


def progress_label(est):
    """The progress-line label of an estimator: its class name when ``est.verbose`` is
    True, ``None`` when False; a ``TypeError`` for a non-bool ``verbose``."""
    return type(est).__name__ if check_bool(est.verbose, "verbose") else None


# constructor parameters that change neither training nor its result: a checkpoint stays
# valid when only these differ (resume a quiet fit with ``verbose=True``, say)
_NOT_TRAINING = ("verbose", "chunk", "memory_budget")


def fit_settings(est) -> dict:
    """``est.get_params()`` without the parameters that only affect printing or inference
    (what a checkpoint's fingerprint must match)."""
    return {k: v for k, v in est.get_params().items() if k not in _NOT_TRAINING}


def fold_batch_size(value, name: str = "batch_size"):
    """Resolve how many folds (models) a fold-parallel program fits at once per device:
    an int ``>= 1`` (``lax.map`` over the rest, still one compiled program), ``None``
    (all together, ``vmap``) or ``"auto"``: 1 on CPU and ``None`` on accelerators.

    On CPU one fold's step already fills the cores: one at a time was measured faster
    than vmapped for every method on the 2-core development machine, and each fold then
    equals the same fold fitted alone bit for bit (XLA:CPU rounds some reductions
    differently with a batch axis; ``benchmarks/bench_batch_invariance.py``)."""
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"{name} must be a positive int, None or 'auto', got {value!r}.")
        import jax

        return 1 if jax.default_backend() == "cpu" else None
    if value is None:
        return None
    return check_int(value, name, 1)


def check_int(value, name: str, low: int):
    """An integer ``>= low`` (``bool`` rejected), as an int; errors name ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {low}, got {value!r}.")
    value = int(value)
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}.")
    return value


def check_n_markers(n_markers, n_genes: int) -> int:
    """Validate a number of markers to select.

    Parameters
    ----------
    n_markers : int
        Requested number of markers. Python and numpy integers are accepted;
        ``bool`` and floats are rejected.
    n_genes : int
        Number of genes available.

    Returns
    -------
    int

    Raises
    ------
    TypeError
        If ``n_markers`` is not an integer.
    ValueError
        If ``n_markers`` is not in ``[1, n_genes]``.
    """
    if isinstance(n_markers, (bool, np.bool_)) or not isinstance(n_markers, numbers.Integral):
        raise TypeError(
            f"n_markers must be an int in [1, n_genes={n_genes}], got "
            f"{n_markers!r} of type {type(n_markers).__name__}."
        )
    n_markers = int(n_markers)
    if not 1 <= n_markers <= n_genes:
        raise ValueError(f"n_markers must be in [1, n_genes={n_genes}], got {n_markers}.")
    return n_markers


def check_random_state(random_state) -> int:
    """Turn a user ``random_state`` into a non-negative integer seed.

    Parameters
    ----------
    random_state : None, int, numpy.random.Generator or numpy.random.RandomState
        ``None`` means seed 0 (jaxsel keeps no hidden global RNG state, so
        results are reproducible by default). An int in ``[0, 2**32 - 1]`` is
        returned as is. A numpy generator is asked for one integer, as
        scikit-learn does with such objects.

    Returns
    -------
    int

    Raises
    ------
    TypeError
        For any other type (including ``bool`` and floats).
    ValueError
        For an integer outside ``[0, 2**32 - 1]``.
    """
    if random_state is None:
        return 0
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(0, 2**32 - 1))
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(0, 2**32 - 1, dtype=np.int64))
    if isinstance(random_state, (bool, np.bool_)) or not isinstance(
        random_state, numbers.Integral
    ):
        raise TypeError(
            f"random_state must be None, an int or a numpy Generator/RandomState, got "
            f"{random_state!r} of type {type(random_state).__name__}."
        )
    random_state = int(random_state)
    if not 0 <= random_state <= 2**32 - 1:
        raise ValueError(f"random_state must be in [0, 2**32 - 1], got {random_state}.")
    return random_state

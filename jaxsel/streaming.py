"""Cells x genes matrices that stay on disk: row sources for streaming fits and inference.

:class:`RowSource` reads rows of a matrix that need not fit in memory, as dense float32
blocks: an ``.h5ad`` file or a ``.zarr`` store (AnnData's on-disk formats, ``X`` sparse
CSR or dense), an AnnData opened in backed mode (``anndata.read_h5ad(path,
backed="r")``), an h5py or zarr 2-D array, or an AnnData sparse dataset
(``anndata.io.sparse_dataset``). Numpy arrays and scipy sparse matrices are accepted too
(they are already in memory, but stream the same way).

The estimators take any of these where they take a matrix: ``jaxsel.MarkerMap().fit(
"cells.h5ad", "cell_type")`` streams the file chunk by chunk through one compiled
program (:mod:`jaxsel.engine.stream`), and inference (``transform``, ``predict``,
``embed``, gimVI's ``latent``) reads it in chunks sized by the estimator's
``memory_budget``.

Row reads are contiguous: a block of rows is one read of the CSR ``data``/``indices``
slices (or of a dense hyperslab), so a chunk of a few random blocks costs a few reads.
CSC matrices are refused (a row of CSC is a scan of the whole matrix): rewrite them as
CSR (``adata.X = adata.X.tocsr()`` before ``write_h5ad``).

:func:`markermap_recipe` is the MarkerMap paper's preprocessing (normalise to 1e4,
``log1p``, scale every gene, clip at 10) as a row source over raw counts: one streaming
pass computes the gene means and standard deviations, and the rows are transformed as
they are read, so the preprocessed matrix never exists.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ._validation import check_indices, check_int, check_real, check_values

__all__ = [
    "RowSource",
    "open_source",
    "is_source",
    "markermap_recipe",
    "count_stats",
    "budget_rows",
    "map_row_blocks",
    "cap_validation",
    "column_means",
    "read_columns",
    "Moments",
    "paired_moments",
    "group_moments",
    "square_root_rows",
    "linear_r2",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MEMORY_BUDGET",
]

#: Cells per chunk of a streaming fit (about 130 MB of float32 at 2000 genes).
DEFAULT_CHUNK_SIZE = 16384
#: Bytes of the largest per-chunk intermediate of chunked inference (256 MiB).
DEFAULT_MEMORY_BUDGET = 2**28


def budget_rows(memory_budget, bytes_per_row: int, *, cap: int | None = None) -> int:
    """Rows of a chunk whose largest intermediate, ``bytes_per_row`` per row, fits in
    ``memory_budget`` bytes (at least 1; at most ``cap``)."""

    budget = check_int(memory_budget, "memory_budget", 1)
    rows = max(1, budget // max(1, int(bytes_per_row)))
    return min(rows, cap) if cap is not None else rows


def map_row_blocks(fn, read, n: int, rows: int, *, fill: float = 0.0):
    """``fn(block, start)`` over the blocks of ``rows`` rows that ``read(start, stop)``
    returns (as float32 numpy), outputs (a pytree of arrays with a leading row axis)
    trimmed to the real rows and concatenated, as numpy. With several blocks the last is
    padded to ``rows`` with ``fill``: every block has one shape (one compiled program),
    and a matrix on disk and the same matrix in memory run the same programs on the same
    blocks, so they give identical results."""
    import jax

    parts = []
    for a in range(0, n, rows):
        block = np.asarray(read(a, min(n, a + rows)), dtype=np.float32)
        m = block.shape[0]
        if n > rows and m < rows:
            block = np.concatenate([block, np.full((rows - m, *block.shape[1:]), fill, np.float32)])
        parts.append(jax.tree.map(lambda o, m=m: np.asarray(o)[:m], fn(block, a)))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


def check_chunk_size(chunk_size, batch_size: int) -> int:
    """``chunk_size`` as an int, checked to hold at least one minibatch of ``batch_size``."""

    chunk = check_int(chunk_size, "chunk_size", 1)
    if chunk < batch_size:
        raise ValueError(f"chunk_size={chunk} must be at least batch_size={batch_size}.")
    return chunk


def cap_validation(train, val, cap: int, seed: int):
    """At most ``cap`` validation rows (a random subset; the others join the training
    rows), both returned sorted: a streaming fit keeps its validation cells in memory."""
    train, val = np.asarray(train, dtype=np.int64), np.asarray(val, dtype=np.int64)
    if val.shape[0] > cap:
        keep = np.zeros(val.shape[0], dtype=bool)
        keep[np.random.default_rng(seed).choice(val.shape[0], cap, replace=False)] = True
        train = np.concatenate([train, val[~keep]])
        val = val[keep]
    return np.sort(train), np.sort(val)


def _is_backed_anndata(x) -> bool:
    return hasattr(x, "obs") and hasattr(x, "var") and getattr(x, "isbacked", False)


def _sparse_dataset_types():
    try:
        from anndata.abc import CSCDataset, CSRDataset

        return CSRDataset, CSCDataset
    except ImportError:  # pragma: no cover - older anndata
        from anndata._core.sparse_dataset import BaseCompressedSparseDataset

        return BaseCompressedSparseDataset, ()


def _is_array_store(x) -> bool:
    """An h5py or zarr 2-D array, or an anndata sparse dataset."""
    mod = type(x).__module__
    if mod.startswith("h5py") and hasattr(x, "shape") and hasattr(x, "dtype"):
        return True
    if mod.startswith("zarr") and hasattr(x, "shape") and hasattr(x, "dtype"):
        return True
    csr, csc = _sparse_dataset_types()
    return isinstance(x, (csr, csc) if csc else csr)


def _is_group(x) -> bool:
    mod = type(x).__module__
    return (mod.startswith("h5py") or mod.startswith("zarr")) and hasattr(x, "keys") and hasattr(x, "attrs")


def is_source(x) -> bool:
    """Whether ``x`` is something to stream rather than a matrix in memory: a path to an
    ``.h5ad`` file or ``.zarr`` store, a backed AnnData, an h5py/zarr array or group, an
    AnnData sparse dataset, or a :class:`RowSource`."""
    if isinstance(x, RowSource):
        return True
    if isinstance(x, (str, os.PathLike)):
        return str(x).rstrip("/").lower().endswith((".h5ad", ".zarr", ".h5"))
    return _is_backed_anndata(x) or _is_array_store(x) or _is_group(x)


def _open_path(path):
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file or store: {str(path)!r}")
    name = str(p).rstrip("/").lower()
    if name.endswith(".zarr"):
        import zarr

        return zarr.open_group(str(p), mode="r"), None
    import h5py

    try:
        f = h5py.File(str(p), "r")
    except OSError as err:
        raise ValueError(f"{str(path)!r} is not a readable HDF5 (.h5ad) file: {err}") from err
    return f, f


def _x_element(group, layer=None):
    """The matrix element of an AnnData group (``X`` or ``layers/<layer>``)."""
    key = "X" if layer is None else f"layers/{layer}"
    try:
        elem = group[key]
    except KeyError:
        raise ValueError(f"the store has no {key!r} element (keys: {sorted(group.keys())})") from None
    return elem


def _wrap_element(elem):
    """An anndata sparse dataset for a CSR/CSC group, the array itself otherwise."""
    if _is_group(elem):
        enc = elem.attrs.get("encoding-type", "")
        if enc in ("csr_matrix", "csc_matrix"):
            from anndata.io import sparse_dataset

            return sparse_dataset(elem)
        raise ValueError(f"cannot stream a store element of encoding {enc!r}; need a dense array or a CSR matrix")
    return elem


class RowSource:
    """Rows of a cells x genes matrix, read block by block as dense float32.

    Parameters
    ----------
    source : path (``.h5ad`` / ``.zarr``), backed AnnData, h5py/zarr array or AnnData
        group, AnnData sparse dataset, numpy array or scipy sparse matrix.
    layer : read ``layers[layer]`` instead of ``X`` (paths and AnnData only).
    transform : optional host function applied to every block read, ``transform(block)
        -> float32 [n_rows, n_vars]``, where ``block`` is a scipy CSR matrix (sparse
        stores) or a numpy array (dense ones); default: densify.

    Attributes
    ----------
    shape, n_obs, n_vars
    var_names : gene names when the source carries them (AnnData, h5ad, zarr), else None.
    """

    def __init__(self, source, *, layer=None, transform=None):
        self._file = None
        self._group = None
        self._adata = None
        self.transform = transform
        self.description = type(source).__name__
        if isinstance(source, RowSource):
            raise TypeError("use RowSource.with_transform to derive a source from another")
        if isinstance(source, (str, os.PathLike)):
            if not is_source(source):
                raise ValueError(
                    f"{str(source)!r}: a path to stream must be an .h5ad file or a .zarr store")
            self._group, self._file = _open_path(source)
            x = _wrap_element(_x_element(self._group, layer))
            self.description = str(source)
        elif hasattr(source, "obs") and hasattr(source, "var") and hasattr(source, "X"):
            if not getattr(source, "isbacked", False):
                raise TypeError(
                    "an in-memory AnnData is not a stream source; pass adata.X (or a layer), or open "
                    "the file with anndata.read_h5ad(path, backed='r')")
            if getattr(source, "is_view", False):
                raise ValueError("cannot stream a view of a backed AnnData; write the subset to its own file first")
            self._adata = source
            x = source.X if layer is None else source.layers[layer]
            self.description = f"backed AnnData {getattr(source, 'filename', '')}"
        elif _is_group(source):
            enc = source.attrs.get("encoding-type", "")
            if enc == "anndata":
                self._group = source
                x = _wrap_element(_x_element(source, layer))
            else:
                x = _wrap_element(source)
        elif sp.issparse(source) or isinstance(source, np.ndarray) or _is_array_store(source):
            x = source
        else:
            raise TypeError(
                f"cannot stream a {type(source).__name__}: pass a path to an .h5ad file or .zarr store, a "
                "backed AnnData, an h5py/zarr array, an AnnData sparse dataset, or an array")
        if layer is not None and self._group is None and self._adata is None:
            raise ValueError("layer= needs a path or an AnnData")
        csr, csc = _sparse_dataset_types()
        fmt = getattr(x, "format", None)
        if (csc and isinstance(x, csc)) or (sp.issparse(x) and fmt == "csc") or fmt == "csc":
            raise ValueError(
                f"{self.description}: X is CSC; reading rows of a CSC matrix scans all of it. Store it as CSR "
                "(adata.X = adata.X.tocsr() before writing) to stream it")
        if sp.issparse(x) and fmt != "csr":
            x = sp.csr_matrix(x)
        shape = tuple(int(s) for s in x.shape)
        if len(shape) != 2:
            raise ValueError(f"{self.description}: expected a 2-D matrix [n_cells, n_genes], got shape {shape}")
        if shape[0] < 1 or shape[1] < 1:
            raise ValueError(f"{self.description}: the matrix is empty, shape {shape}")
        dtype = np.dtype(getattr(x, "dtype", np.float32))
        if dtype.kind not in "biuf":
            raise TypeError(f"{self.description}: X must hold real numbers, got dtype {dtype}")
        self._x = x
        self.shape = shape
        self.sparse = sp.issparse(x) or isinstance(x, csr)

    # -- metadata -------------------------------------------------------------------

    @property
    def n_obs(self) -> int:
        return self.shape[0]

    @property
    def n_vars(self) -> int:
        return self.shape[1]

    @property
    def var_names(self):
        if self._adata is not None:
            return np.asarray(self._adata.var_names).astype(str)
        if self._group is not None and "var" in self._group:
            from anndata.io import read_elem

            var = self._group["var"]
            index = var.attrs.get("_index", "_index")
            return np.array([str(v) for v in read_elem(var[index])])
        return None

    def identity(self) -> list:
        """What a checkpoint's key holds of this source: its shape, its variable names
        (when it has them) and its row transform (module, name and, for an object, its
        attributes, e.g. the recipe's gene statistics). The cells themselves are not
        hashed: that would be a pass over them."""
        names = self.var_names
        return [list(self.shape), [] if names is None else names.tolist(), _transform_key(self.transform)]

    def obs_column(self, key: str) -> np.ndarray:
        """One ``obs`` column (e.g. the cell types) as a numpy array, read alone."""
        if self._adata is not None:
            if key not in self._adata.obs:
                raise KeyError(f"obs has no column {key!r} (columns: {list(self._adata.obs.columns)})")
            return np.asarray(self._adata.obs[key])
        if self._group is None or "obs" not in self._group:
            raise ValueError(f"{self.description} carries no obs table; pass the labels as an array")
        obs = self._group["obs"]
        if key not in obs:
            cols = [k for k in obs.keys() if k != obs.attrs.get("_index", "_index")]
            raise KeyError(f"obs has no column {key!r} (columns: {cols})")
        from anndata.io import read_elem

        return np.asarray(read_elem(obs[key]))

    def with_transform(self, transform) -> "RowSource":
        """The same rows with another host ``transform`` (shares the open file)."""
        out = object.__new__(RowSource)
        out.__dict__.update(self.__dict__)
        out._file = None  # the original keeps ownership of the file handle
        out.transform = transform
        return out

    # -- reading --------------------------------------------------------------------

    def _raw(self, start: int, stop: int):
        block = self._x[start:stop]
        if sp.issparse(block) and block.format != "csr":
            block = block.tocsr()
        return block

    def _finish(self, block) -> np.ndarray:
        if self.transform is not None:
            out = self.transform(block)
        elif sp.issparse(block):
            out = block.toarray()
        else:
            out = np.asarray(block)
        out = np.asarray(out, dtype=np.float32)
        return out

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as dense float32 ``[stop - start, n_vars]``."""
        start, stop = max(0, int(start)), min(self.n_obs, int(stop))
        return self._finish(self._raw(start, stop))

    def read_raw_rows(self, rows, max_gap: int = 64):
        """Rows ``rows`` (sorted) before ``transform``: scipy CSR for sparse stores, numpy
        otherwise. Runs of rows closer than ``max_gap`` are read as one contiguous range."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise ValueError("rows must be a 1-D array of row numbers")
        if rows.size == 0:
            return sp.csr_matrix((0, self.n_vars), dtype=np.float32) if self.sparse else np.zeros(
                (0, self.n_vars), np.float32)
        if rows[0] < 0 or rows[-1] >= self.n_obs:
            raise IndexError(f"row numbers must be in [0, {self.n_obs}), got {rows[0]}..{rows[-1]}")
        if np.any(np.diff(rows) < 0):
            raise ValueError("rows must be sorted")
        cuts = np.flatnonzero(np.diff(rows) > max_gap) + 1
        parts = []
        for run in np.split(rows, cuts):
            a, b = int(run[0]), int(run[-1]) + 1
            block = self._raw(a, b)
            if b - a != run.size:
                block = block[run - a]
            parts.append(block)
        if len(parts) == 1:
            return parts[0]
        return sp.vstack(parts, format="csr") if sp.issparse(parts[0]) else np.concatenate(parts)

    def read_rows(self, rows, max_gap: int = 64) -> np.ndarray:
        """Rows ``rows`` (sorted) as dense float32 ``[len(rows), n_vars]``."""
        return self._finish(self.read_raw_rows(rows, max_gap))

    def iter_blocks(self, block_rows: int, *, raw: bool = False, start: int = 0):
        """``(start, stop, block)`` over the rows in order, ``block_rows`` at a time,
        from row ``start`` on."""
        block_rows = check_int(block_rows, "block_rows", 1)
        for a in range(int(start), self.n_obs, block_rows):
            b = min(self.n_obs, a + block_rows)
            blk = self._raw(a, b)
            yield a, b, (blk if raw else self._finish(blk))

    # -- lifetime -------------------------------------------------------------------

    def close(self):
        """Close the file this source opened (a path); sources over objects the caller
        opened leave them open."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        kind = "sparse" if self.sparse else "dense"
        extra = ", transformed" if self.transform is not None else ""
        return f"RowSource({self.description}, {self.n_obs} x {self.n_vars}, {kind}{extra})"


@contextlib.contextmanager
def open_source(x, name: str = "X"):
    """``with open_source(x) as src``: a :class:`RowSource` over ``x`` (returned as is
    when it already is one), closed on exit when it was opened here."""
    if isinstance(x, RowSource):
        yield x
        return
    try:
        src = RowSource(x)
    except (TypeError, ValueError, FileNotFoundError, KeyError) as err:
        raise type(err)(f"{name}: {err}") from err
    try:
        yield src
    finally:
        src.close()


# ----------------------------------------------------------------------------- streamed statistics


def count_stats(source: RowSource, *, block_rows: int = 16384, name: str = "X") -> dict:
    """One pass over raw counts: checks every entry is a non-negative integer and every
    cell has counts, and returns ``{"library": float64 [n_obs] totals, "log_library_mean",
    "log_library_var"}`` (population variance, as gimVI's prior)."""

    total = np.empty(source.n_obs, np.float64)
    for a, b, blk in source.iter_blocks(block_rows, raw=True):
        check_values(blk.data if sp.issparse(blk) else blk, name, require_counts=True, where=f" in rows {a}..{b - 1}")
        total[a:b] = np.asarray(blk.sum(axis=1, dtype=np.float64)).reshape(-1)
    empty = np.flatnonzero(total <= 0)
    if empty.size:
        raise ValueError(
            f"{name} has {empty.size} cell(s) with no counts (rows {empty[:10].tolist()}"
            f"{' ...' if empty.size > 10 else ''}); filter them out first.")
    log_lib = np.log(total)
    return {"library": total, "log_library_mean": float(log_lib.mean()), "log_library_var": float(log_lib.var())}


def _check_groups(groups, n_obs: int, name: str) -> np.ndarray:
    """Integer group labels, one per row, ``-1`` for rows in no group, as int64."""
    groups = np.asarray(groups)
    if groups.ndim != 1 or groups.shape[0] != n_obs:
        raise ValueError(f"{name} must have one label per row ({n_obs}), got shape {groups.shape}.")
    if groups.dtype.kind not in "iu" or (groups.size and groups.min() < -1):
        raise ValueError(f"{name} must hold integer group labels >= -1, got dtype {groups.dtype}"
                         f"{'' if groups.dtype.kind not in 'iu' else f' and {groups.min()}'}.")
    return groups.astype(np.int64)


def column_means(source: RowSource, *, block_rows: int = 16384, name: str = "X", exclude=None) -> np.ndarray:
    """One pass over the (transformed) rows: every column's mean (float64 sums, returned
    as float32 [n_vars]); a NaN or infinite value is a ``ValueError`` naming its rows.

    ``exclude``: int array [n_obs] of group labels (``-1``: in no group). The result is
    then [n_groups, n_vars]: row ``g`` is the mean over the rows *not* in group ``g``
    (each cross-validation fold's training mean, the test folds being the groups), all
    groups from the same single pass."""
    groups = None if exclude is None else _check_groups(exclude, source.n_obs, "exclude")
    n_groups = 0 if groups is None else int(groups.max(initial=-1)) + 1
    total = np.zeros(source.n_vars, np.float64)
    per_group = np.zeros((n_groups, source.n_vars), np.float64)
    for a, b, blk in source.iter_blocks(block_rows):
        blk = np.asarray(blk)
        if not np.isfinite(blk).all():
            raise ValueError(f"{name} contains NaN or infinite values (in rows {a}..{b - 1}).")
        total += blk.sum(axis=0, dtype=np.float64)
        if n_groups:
            g = groups[a:b]
            for k in np.unique(g[g >= 0]):
                per_group[k] += blk[g == k].sum(axis=0, dtype=np.float64)
    if groups is None:
        return (total / max(source.n_obs, 1)).astype(np.float32)
    counts = source.n_obs - np.bincount(groups[groups >= 0], minlength=n_groups)
    return ((total - per_group) / np.maximum(counts, 1)[:, None]).astype(np.float32)


def read_columns(source: RowSource, columns, *, block_rows: int = 16384, name: str = "X",
                 nonnegative: bool = False, hint: str = "", fn=None) -> tuple:
    """One pass over the raw rows: ``(x[:, columns], totals)``, the values of a few
    columns in memory and every row's sum over *all* columns (float64 ``[n_obs]``);
    ``columns=None``: all of them.

    The columns come back as the store holds them, in its dtype: scipy CSR for a sparse
    store, numpy otherwise; with ``fn``, as ``fn(values, totals)`` of every block (its
    columns and its rows' totals), a dense float32 ``[rows, len(columns)]`` written into
    one preallocated array (e.g. the log-normalisation, so that the raw values never
    exist whole). Host memory holds the result and one block of ``block_rows`` rows,
    never the whole matrix. A NaN or infinite entry anywhere in a row, or with
    ``nonnegative`` a negative one, is a ``ValueError`` naming ``name`` and the rows
    (``hint`` is appended to the negative-value message); so is a ``source`` with a
    ``transform`` (its stored values are not what its rows give). For stAI's inputs: a
    scRNA-seq reference on disk with tens of thousands of genes, of which the model uses
    the few hundred it shares with the spatial panel (see
    :func:`jaxsel.preprocessing.log_normalize`'s ``columns`` and ``totals``)."""
    from .preprocessing import _row_totals

    if source.transform is not None:  # the caller expects what the transform gives, not the stored values
        raise ValueError(f"{name}: read_columns reads the stored values, and this RowSource applies a transform "
                         "to its rows; pass the file, or a RowSource without a transform.")
    cols = None if columns is None else check_indices(columns, source.n_vars, "columns", what="column")
    totals = np.empty(source.n_obs, np.float64)
    parts = []
    out = None if fn is None else np.empty((source.n_obs, source.n_vars if cols is None else cols.size), np.float32)
    for a, b, blk in source.iter_blocks(block_rows, raw=True):
        vals = blk.data if sp.issparse(blk) else np.asarray(blk)
        where = f" in rows {a}..{b - 1}"
        check_values(vals, name, nonnegative=nonnegative, where=where, hint=hint)
        totals[a:b] = _row_totals(blk)  # as normalize_total sums a matrix in memory
        part = blk if cols is None else blk[:, cols]
        if fn is None:
            parts.append(part)
        else:
            out[a:b] = fn(part, totals[a:b])
    if out is not None:
        return out, totals
    if sp.issparse(parts[0]):
        return sp.vstack(parts, format="csr"), totals
    return np.concatenate(parts), totals


def _labels(groups, n_obs: int):
    """``(labels [n_obs] int64, n_groups)``: checked ``groups``, or every row in group 0."""
    g = np.zeros(n_obs, np.int64) if groups is None else _check_groups(groups, n_obs, "groups")
    return g, int(g.max(initial=-1)) + 1


def _shifted_blocks(source: RowSource, labels, *, block_rows: int, name: str, fn=None, check=None, y=None,
                    start: int = 0, shift=None):
    """``(z - shift, labels of its rows, shift, stop)`` per block of ``block_rows`` rows
    (the last ending at row ``stop``), in float64: ``z`` the block (``check(block, start,
    stop)`` run on it first, then ``fn`` applied, then ``y``'s rows appended as columns),
    ``shift`` the first block's mean over the labelled rows (so that centring later does
    not cancel digits). A pass resumed at row ``start`` passes the ``shift`` it had. A NaN
    or infinite value is a ``ValueError`` naming its rows."""
    for a, b, blk in source.iter_blocks(block_rows, start=start):
        blk = np.asarray(blk)
        if not np.isfinite(blk).all():
            raise ValueError(f"{name} contains NaN or infinite values (in rows {a}..{b - 1}).")
        if check is not None:
            check(blk, a, b)
        z = blk.astype(np.float64)
        if fn is not None:
            z = fn(z)
        if y is not None:
            z = np.concatenate([z, y[a:b]], axis=1)
        g = labels[a:b]
        if shift is None:
            inside = z[g >= 0]
            shift = inside.mean(axis=0) if inside.shape[0] else np.zeros(z.shape[1])
        z -= shift
        yield z, g, shift, b


def group_moments(source: RowSource, groups=None, *, block_rows: int = 16384, name: str = "X", fn=None,
                  check=None) -> dict:
    """One pass over the (transformed) rows: every column's moments per group of rows
    (``groups`` [n_obs] integer labels, ``-1`` for rows left out; default one group), in
    float64 about a per-column shift (the first block's mean, so that nothing cancels):
    ``{"n": [n_groups], "sums": [n_groups, n_vars] of (x - shift), "within_ss": [n_groups,
    n_vars] sums of squared deviations from the group means, "mean": [n_groups,
    n_vars], "shift": [n_vars]}``. ``fn`` maps each block first (e.g. ``np.expm1``);
    ``check(block, start, stop)`` may raise on a block's values (before ``fn``). A NaN or
    infinite value is a ``ValueError`` naming its rows. Memory: a few ``[n_groups,
    n_vars]`` float64."""
    labels, n_groups = _labels(groups, source.n_obs)
    n = np.zeros(n_groups, np.int64)
    sums = np.zeros((n_groups, source.n_vars))
    sq = np.zeros((n_groups, source.n_vars))
    shift = np.zeros(source.n_vars)
    for z, g, shift, _ in _shifted_blocks(source, labels, block_rows=block_rows, name=name, fn=fn, check=check):
        onehot = np.zeros((z.shape[0], n_groups))
        rows = np.flatnonzero(g >= 0)
        onehot[rows, g[rows]] = 1.0
        n += np.bincount(g[rows], minlength=n_groups)
        sums += onehot.T @ z
        sq += onehot.T @ np.square(z)
    safe = np.maximum(n, 1)[:, None]
    within = np.maximum(sq - np.square(sums) / safe, 0.0)
    return {"n": n, "sums": sums, "within_ss": within, "mean": shift + sums / safe, "shift": shift}


class Moments:
    """First and second moments of the rows ``z = [x, y]`` of a paired data set, per
    group of rows, in float64: ``n`` [n_groups] rows, ``sums`` [n_groups, d] of ``z -
    shift`` and ``scatter`` [n_groups, d, d] of ``(z - shift)(z - shift)^T``, ``shift``
    [d] a rough mean (the first block's), so that centring does not cancel digits.
    From :func:`paired_moments`."""

    def __init__(self, n, sums, scatter, shift, checkpoint_seconds: float = 0.0, first_row: int = 0):
        self.n, self.sums, self.scatter, self.shift = n, sums, scatter, shift
        self.checkpoint_seconds = checkpoint_seconds  # time the pass spent writing its checkpoint
        self.first_row = first_row  # the row this pass started at (> 0: resumed from a checkpoint)

    def select(self, keep) -> tuple:
        """``(n, sums, scatter)`` summed over the groups where ``keep`` [n_groups] is True."""
        keep = np.asarray(keep, dtype=bool)
        return self.n[keep].sum(), self.sums[keep].sum(axis=0), self.scatter[keep].sum(axis=0)

    def mean(self, keep) -> np.ndarray:
        """The mean row of the groups where ``keep`` is True, float64 [d]."""
        n, s, _ = self.select(keep)
        return self.shift + s / n

    def scatter_about(self, keep, centre) -> np.ndarray:
        """``sum (z - centre)(z - centre)^T`` over the rows of the groups where ``keep``
        is True, float64 [d, d] (``centre`` [d], e.g. the training rows' mean)."""
        n, s, sz = self.select(keep)
        c = np.asarray(centre, np.float64) - self.shift
        out = sz - np.outer(s, c) - np.outer(c, s) + n * np.outer(c, c)
        return 0.5 * (out + out.T)


def _transform_key(transform):
    """What identifies a source's row transform in a checkpoint's key: its module and
    name, and an object's attributes (the recipe's gene statistics, say)."""
    if transform is None:
        return None
    name = getattr(transform, "__qualname__", type(transform).__qualname__)
    attrs = {} if inspect.isfunction(transform) else dict(getattr(transform, "__dict__", {}))
    return [getattr(transform, "__module__", type(transform).__module__), name, attrs]


def paired_moments(source: RowSource, y, *, groups=None, block_rows: int = 16384, name: str = "X",
                   checkpoint=None, checkpoint_every: int = 8, checkpoint_key: str = "") -> Moments:
    """One pass over the (transformed) rows of ``source`` beside ``y`` [n_obs, q] in
    memory: the :class:`Moments` of ``z = [x, y]`` per group of rows (``groups`` [n_obs]
    integer labels, ``-1`` for rows left out; default: one group of every row). A NaN or
    infinite value is a ``ValueError`` naming its rows.

    Everything a linear model fitted by least squares needs, for every cross-validation
    fold at once: the training scatter of fold ``f`` is that of the groups other than
    ``f``, and the test residuals' sums of squares come from group ``f``'s scatter about
    the training mean. Memory: ``n_groups (p + q)^2`` float64 (10 groups of 2000 genes:
    320 MB); time: ``2 n (p + q)^2`` float64 flops.

    ``checkpoint`` (a file path): the sums so far and the next row are written there
    (atomically, ``.npz``) after every ``checkpoint_every`` blocks and at the end. A pass
    run again with the same path, source (:meth:`RowSource.identity`: shape, variable
    names, transform), ``y``, groups and ``block_rows`` (and ``checkpoint_key``, the
    caller's own context) reads the file and goes on from its next row: the moments are
    bit for bit those of a pass that never stopped (the same float64 sums in the same
    order). A finished file is read without reading ``source`` at all. The cells
    themselves are not hashed: a file written for other data of the same shape, names
    and transform would be taken for this one. A file written for other inputs, or by
    another jaxsel version, is a ``ValueError``."""
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 2 or y.shape[0] != source.n_obs:
        raise ValueError(f"y must be [n_obs={source.n_obs}, n_outputs], got shape {y.shape}.")
    labels, n_groups = _labels(groups, source.n_obs)
    d = source.n_vars + y.shape[1]
    state = {"n": np.zeros(n_groups, np.int64), "sums": np.zeros((n_groups, d)), "scatter": np.zeros((n_groups, d, d)),
             "shift": np.zeros(d), "next_row": np.array(0, np.int64)}
    key = ""
    if checkpoint is not None:
        from .engine.checkpoint import check_checkpoint_args, fingerprint, read_checkpoint, write_checkpoint

        checkpoint_every = check_checkpoint_args(checkpoint, checkpoint_every)
        key = fingerprint("paired_moments/1", checkpoint_key, source.identity(), int(block_rows), y, labels)
        got = read_checkpoint(checkpoint, state, key)
        if got is not None:
            state = {k: np.array(v) for k, v in got.items()}  # writable copies of the file's arrays
    n, sums, scatter = state["n"], state["sums"], state["scatter"]
    first, writing = int(state["next_row"]), 0.0
    blocks = _shifted_blocks(source, labels, block_rows=block_rows, name=name, y=y, start=first,
                             shift=state["shift"] if first else None)
    for i, (z, g, shift, stop) in enumerate(blocks):
        ks = np.unique(g[g >= 0])
        for k in ks:
            zk = z if ks.size == 1 and g.min() >= 0 else z[g == k]  # one group: no copy of the block
            n[k] += zk.shape[0]
            sums[k] += zk.sum(axis=0)
            scatter[k] += zk.T @ zk
        state["shift"], state["next_row"] = shift, np.array(stop, np.int64)
        if checkpoint is not None and ((i + 1) % checkpoint_every == 0 or stop == source.n_obs):
            t0 = time.perf_counter()
            write_checkpoint(checkpoint, state, key)
            writing += time.perf_counter() - t0
    return Moments(n, sums, scatter, state["shift"], writing, first)


def square_root_rows(scatter, p: int):
    """Rows ``(x [d, p], y [d, q])`` float32 (``d = p + q``) whose grams are the
    blocks of the float64 ``scatter`` [d, d]: ``x^T x``, ``x^T y`` and ``y^T y`` as
    ``sum x x^T``, ``sum x y^T``, ``sum y y^T`` over the cells it summarises. Any least
    squares fit of ``y`` on ``x`` (residuals included) is then the same on these ``d`` rows
    as on the cells. From the eigendecomposition ``scatter = Q D Q^T``: the rows are
    ``D^{1/2} Q^T`` (rounding's negative eigenvalues set to zero)."""
    evals, evecs = np.linalg.eigh(np.asarray(scatter, np.float64))
    rows = np.sqrt(np.maximum(evals, 0.0))[:, None] * evecs.T
    return rows[:, :p].astype(np.float32), rows[:, p:].astype(np.float32)


def linear_r2(scatter, coef, p: int, per_feature: bool = False):
    """R^2 ``1 - sum (y - x B)^2 / sum y^2`` of the linear prediction ``x @ coef``
    (``coef`` [p, q]) from the rows' ``scatter`` of ``[x, y]`` [p + q, p + q] about the
    centre ``y`` is measured from (:meth:`Moments.scatter_about`), without the rows:
    ``sum (y - x B)^2 = diag(M^T S M)`` with ``M = [-B; I]``. Per output with
    ``per_feature``."""
    coef = np.asarray(coef, np.float64)
    m = np.concatenate([-coef, np.eye(coef.shape[1])], axis=0)
    ss_res = np.einsum("iq,ij,jq->q", m, scatter, m)
    ss_tot = np.diag(scatter)[p:]
    if per_feature:  # undefined (NaN) where y equals the centre on every row, as metrics.r2_score
        return np.where(ss_tot > 0, 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0), np.nan)
    return float(1.0 - ss_res.sum() / ss_tot.sum()) if ss_tot.sum() > 0 else float("nan")


def _normalize_log1p(block, target_sum: float):
    """``log1p`` of counts scaled to ``target_sum`` per cell (zero cells stay zero);
    sparse in, sparse out."""
    from . import preprocessing

    return preprocessing.log1p(preprocessing.normalize_total(block, target_sum=target_sum))


class _Recipe:
    """Picklable row transform of :func:`markermap_recipe`."""

    def __init__(self, target_sum, mean, std, max_value):
        self.target_sum, self.mean, self.inv_std, self.max_value = target_sum, mean, 1.0 / std, max_value

    def __call__(self, block):
        x = _normalize_log1p(block, self.target_sum)
        x = x.toarray() if sp.issparse(x) else np.asarray(x, np.float32)
        x = x.astype(np.float32, copy=False)
        x -= self.mean
        x *= self.inv_std
        if self.max_value is not None:
            np.clip(x, -self.max_value, self.max_value, out=x)
        return x


def markermap_recipe(source, *, target_sum: float = 1e4, max_value: float | None = 10.0,
                     block_rows: int = 16384) -> RowSource:
    """The MarkerMap paper's preprocessing (:func:`jaxsel.preprocessing.markermap_recipe`
    without its optional gene filter) as a :class:`RowSource` over raw counts.

    One streaming pass computes every gene's mean and standard deviation (``ddof=1``,
    zeros replaced by 1, as :func:`jaxsel.preprocessing.scale`) of ``log1p`` of the
    counts normalised to ``target_sum``; the returned source applies ``normalise ->
    log1p -> (x - mean) / std -> clip(max_value)`` to every block as it is read. Its
    rows equal the in-memory recipe's up to float32 rounding.

    ``source`` is anything :class:`RowSource` accepts; a path is opened here and stays
    open as long as the returned source (close it, or use it in a ``with`` block).
    """
    from . import preprocessing

    target_sum = check_real(target_sum, "target_sum", low=0.0, low_open=True)
    if max_value is not None:
        max_value = check_real(max_value, "max_value", low=0.0, low_open=True)
    src = source if isinstance(source, RowSource) else RowSource(source)
    n, g = src.shape
    if n < 2:
        raise ValueError("markermap_recipe needs at least 2 cells to estimate a standard deviation")
    # per-block mean and sum of squared deviations (two passes within the block), merged
    # across blocks by Chan et al.'s update: stable, unlike E[x^2] - E[x]^2
    count, mean, m2 = 0, np.zeros(g, np.float64), np.zeros(g, np.float64)
    for _, _, blk in src.iter_blocks(block_rows, raw=True):
        x = _normalize_log1p(blk, target_sum)
        nb = x.shape[0]
        if sp.issparse(x):  # the stored values only; the zeros by count
            mb, m2b = preprocessing.sparse_mean_ss(x)
        else:
            x = np.asarray(x, np.float64)
            mb = x.mean(axis=0)
            m2b = ((x - mb) ** 2).sum(axis=0)
        delta = mb - mean
        total = count + nb
        mean = mean + delta * (nb / total)
        m2 = m2 + m2b + delta**2 * (count * nb / total)
        count = total
    var = m2 / (n - 1)
    std = np.sqrt(var)
    std[std == 0] = 1.0
    out = src.with_transform(_Recipe(target_sum, mean.astype(np.float32), std.astype(np.float32), max_value))
    if src is not source:  # we opened it: the derived source owns the file
        out._file, src._file = src._file, None
    out.gene_mean, out.gene_std = mean.astype(np.float32), std.astype(np.float32)
    return out

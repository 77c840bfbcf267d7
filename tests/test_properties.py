"""Property-based tests (hypothesis) of every public entry point on bad and edge-case input.

The catalogue: random shapes, NaN/inf, negative or non-integer counts where counts are
needed, constant genes, zero-library cells, duplicate or missing gene names, one cell per
class, classes absent from training, ``n_markers`` out of range, mismatched X/Y lengths,
empty arrays, and sparse input in every scipy format (csr, csc, coo, bsr, lil, dok, dia,
as ``*_matrix`` and ``*_array``). Each case must end in a clear error (a plain
``ValueError``/``TypeError`` or jaxsel's own subclass of one, or a documented ``KeyError``;
never a JAX/Flax or third-party exception; the message names the argument) or in a
documented, correct result (finite, right shape), and never modify its inputs (deep copies
compared before/after, sparse internals and AnnData included).

Cost: validation failures happen before anything is compiled, so their shapes are drawn
freely. The cases that must fit use one FIXED shape and tiny settings per model, so that
every example after the first reuses the compiled program; only values, sparse formats,
constant genes, zero-library cells and labels vary. ``derandomize=True`` keeps CI
deterministic.

A deeper search than CI's: ``JAXSEL_HYPOTHESIS_EXAMPLES=N`` multiplies both budgets by
``N / 20`` (at least 1 example) and draws fresh random examples instead of CI's fixed
ones, e.g. ``JAXSEL_HYPOTHESIS_EXAMPLES=200 pytest tests/test_properties.py``.
"""

from __future__ import annotations

import copy
import os
import re
import sys
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxsel
from jaxsel import metrics, tl
from jaxsel import preprocessing as pp
from jaxsel._validation import check_labels, check_matrix, check_n_markers, to_dense

sys.path.insert(0, str(Path(__file__).parent))
from test_baselines import _hvg_frame  # noqa: E402  (the Seurat recipe's pandas transcription)

_HC = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
_DEEP = os.environ.get("JAXSEL_HYPOTHESIS_EXAMPLES")  # a deeper, random search (module docstring)
_SCALE = int(_DEEP) / 20 if _DEEP else 1.0


def _budget(n: int) -> settings:
    return settings(max_examples=max(1, round(n * _SCALE)), deadline=None, derandomize=not _DEEP,
                    suppress_health_check=_HC)


#: cheap cases (validation, numpy-only functions)
CHEAP = _budget(20)
#: cases that run a compiled model: one fixed shape, a handful of examples
FIT = _budget(4)

FORMATS = ("csr", "csc", "coo", "bsr", "lil", "dok", "dia")
ALL_FORMATS = ("dense",) + FORMATS + tuple(f + "_array" for f in FORMATS)
JAX_MODULES = ("jax", "jaxlib", "flax", "optax")

pytestmark = pytest.mark.filterwarnings("ignore")


# ============================================================================ helpers


def as_format(x: np.ndarray, fmt: str):
    """``x`` as a dense array or a scipy sparse matrix / array of format ``fmt``."""
    if fmt == "dense":
        return x
    if fmt.endswith("_array"):
        return getattr(sp, fmt)(sp.csr_array(x).asformat(fmt[: -len("_array")]))
    return sp.csr_matrix(x).asformat(fmt)


def _sparse_parts(m):
    fmt = m.format
    if fmt in ("csr", "csc", "bsr"):
        return [m.data, m.indices, m.indptr]
    if fmt == "coo":
        return [m.data, *m.coords]
    if fmt == "dia":
        return [m.data, m.offsets]
    if fmt == "lil":
        return [np.array([list(r) for r in m.rows], dtype=object), np.array([list(d) for d in m.data], dtype=object)]
    if fmt == "dok":
        return [sorted(m.items())]
    raise AssertionError(fmt)


def assert_same(a, b, where="input"):
    """Deep equality of a snapshot ``a`` and the object ``b`` (NaN equals NaN)."""
    if isinstance(a, anndata.AnnData):
        assert isinstance(b, anndata.AnnData), where
        assert a.shape == b.shape, where
        assert_same(a.X, b.X, where + ".X")
        pd.testing.assert_frame_equal(a.obs, b.obs)
        pd.testing.assert_frame_equal(a.var, b.var)
        assert set(a.obsm.keys()) == set(b.obsm.keys()), where + ".obsm"
        for k in a.obsm.keys():
            assert_same(a.obsm[k], b.obsm[k], f"{where}.obsm[{k!r}]")
        assert set(a.layers.keys()) == set(b.layers.keys()), where + ".layers"
        for k in a.layers.keys():
            assert_same(a.layers[k], b.layers[k], f"{where}.layers[{k!r}]")
        assert_same(dict(a.uns), dict(b.uns), where + ".uns")
        return
    if sp.issparse(a):
        assert type(a) is type(b) and a.format == b.format, f"{where}: {type(a)} became {type(b)}"
        assert a.dtype == b.dtype and a.shape == b.shape, where
        for pa, pb in zip(_sparse_parts(a), _sparse_parts(b)):
            assert_same(pa, pb, where)
        return
    if isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b)
        return
    if isinstance(a, pd.Series):
        pd.testing.assert_series_equal(a, b)
        return
    if isinstance(a, pd.Index):
        pd.testing.assert_index_equal(a, b)
        return
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, where
        if a.dtype.kind in "fc":
            assert np.array_equal(a, b, equal_nan=True), where
        elif a.dtype.kind == "O":
            assert all(x is y or x == y or (_isnan(x) and _isnan(y)) for x, y in zip(a.ravel(), b.ravel())), where
        else:
            assert np.array_equal(a, b), where
        return
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a.keys()) == list(b.keys()), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
        return
    if isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
        return
    assert a is b or a == b or (_isnan(a) and _isnan(b)), f"{where}: {a!r} != {b!r}"


def _isnan(v) -> bool:
    try:
        return bool(np.isnan(v))
    except (TypeError, ValueError):
        return False


class Unchanged:
    """``with Unchanged(x, y, ...):`` asserts that the objects are deep-equal afterwards,
    whether the block raised or not."""

    def __init__(self, *objs):
        self.objs = objs
        self.before = copy.deepcopy(objs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for i, (a, b) in enumerate(zip(self.before, self.objs)):
            assert_same(a, b, f"argument {i}")
        return False


def expect_error(fn, exc, *names):
    """``fn()`` raises ``exc`` itself or one of jaxsel's own subclasses of it (such as
    :class:`jaxsel.engine.DivergenceError`), never a third-party subclass nor anything
    from JAX, and the message names one of ``names``."""
    with pytest.raises(Exception) as info:
        fn()
    err = info.value
    module = type(err).__module__
    kind = f"{module}.{type(err).__qualname__}"
    assert module.split(".")[0] not in JAX_MODULES, f"JAX error escaped: {kind}: {err}"
    ours = module.split(".")[0] == "jaxsel" and isinstance(err, exc)
    assert type(err) is exc or ours, f"expected {exc.__name__}, got {kind}: {err}"
    msg = str(err)
    named = [re.search(rf"\b{n}\b", msg) if re.fullmatch(r"\w+", n) else n in msg for n in names]
    assert any(named), f"the message does not name {names}: {msg}"
    return err


def finite(*arrays):
    for a in arrays:
        a = np.asarray(a)
        assert np.isfinite(a).all(), f"non-finite values in an output of shape {a.shape}"


def check_markers(markers, n_genes, k):
    m = np.asarray(markers)
    assert m.shape == (k,) and np.issubdtype(m.dtype, np.integer)
    assert len(set(m.tolist())) == k and m.min() >= 0 and m.max() < n_genes


# ---------------------------------------------------------------------- strategies

shapes = st.tuples(st.integers(1, 9), st.integers(1, 9))
bad_values = st.sampled_from([np.nan, np.inf, -np.inf])
formats = st.sampled_from(ALL_FORMATS)
sparse_formats = st.sampled_from(ALL_FORMATS[1:])
seeds = st.integers(0, 2**32 - 1)


@st.composite
def matrix_with_bad_value(draw, min_rows=1, min_cols=1, max_rows=9, max_cols=9, nonneg=False):
    """``(x, fmt)``: a finite float matrix in a random format with one NaN/inf entry."""
    n = draw(st.integers(min_rows, max_rows))
    g = draw(st.integers(min_cols, max_cols))
    rng = np.random.default_rng(draw(seeds))
    x = rng.poisson(2.0, size=(n, g)).astype(np.float64) if nonneg else rng.normal(size=(n, g))
    x[draw(st.integers(0, n - 1)), draw(st.integers(0, g - 1))] = draw(bad_values)
    fmt = draw(formats)
    return as_format(x, fmt), fmt


@st.composite
def edge_matrix(draw, n, g, *, kind="normal", min_const=0, max_const=None):
    """A FIXED-shape matrix with edge-case values: some constant genes (0 or another
    value), the rest ``kind`` ("normal", "counts", "lognorm"). Returns ``(x, const_cols)``."""
    rng = np.random.default_rng(draw(seeds))
    if kind == "normal":
        x = rng.normal(size=(n, g)) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
    elif kind == "counts":
        x = rng.poisson(draw(st.sampled_from([0.5, 3.0, 40.0])), size=(n, g)).astype(np.float64)
    else:
        x = np.log1p(rng.poisson(3.0, size=(n, g)).astype(np.float64))
    n_const = draw(st.integers(min_const, g - 1 if max_const is None else max_const))
    cols = rng.choice(g, n_const, replace=False)
    value = draw(st.sampled_from([0.0, 1.0, 7.0] if kind != "normal" else [0.0, 1.0, -2.5]))
    x[:, cols] = value
    return x.astype(np.float32), np.sort(cols)


def labels_for(n, n_classes, one_cell: bool, as_str: bool, rng):
    """``n`` labels of ``n_classes`` classes (class ``n_classes - 1`` a single cell when
    ``one_cell``), shuffled; strings or ints."""
    if one_cell:
        rest = (n - 1) // (n_classes - 1)
        sizes = [n - 1 - rest * (n_classes - 2)] + [rest] * (n_classes - 2) + [1]
    else:
        sizes = [n // n_classes + (i < n % n_classes) for i in range(n_classes)]
    y = rng.permutation(np.repeat(np.arange(n_classes), sizes))
    return np.array(["type_" + "abcdefgh"[c] for c in y]) if as_str else y


# ============================================================================ _validation


@CHEAP
@given(shape=shapes, density=st.floats(0.0, 1.0), fmt=sparse_formats,
       dtype=st.sampled_from([np.float32, np.float64, np.int64]), seed=seeds)
def test_check_matrix_every_sparse_format(shape, density, fmt, dtype, seed):
    rng = np.random.default_rng(seed)
    dense = (rng.normal(size=shape) * 5).astype(dtype) * (rng.random(shape) < density)
    x = as_format(dense, fmt)
    with Unchanged(x):
        out = check_matrix(x, name="counts")
        assert sp.issparse(out) and out.format in ("csr", "csc") and out.dtype == np.float32
        np.testing.assert_array_equal(out.toarray(), dense.astype(np.float32))
        d = check_matrix(x, name="counts", allow_sparse=False)
        assert isinstance(d, np.ndarray) and d.shape == shape
        np.testing.assert_array_equal(to_dense(x), dense)


@CHEAP
@given(case=matrix_with_bad_value())
def test_check_matrix_rejects_nan_and_inf(case):
    x, _ = case
    with Unchanged(x):
        expect_error(lambda: check_matrix(x, name="counts"), ValueError, "counts")


@CHEAP
@given(shape=st.one_of(
    st.tuples(st.just(0), st.integers(0, 5)), st.tuples(st.integers(0, 5), st.just(0)),
    st.tuples(st.integers(1, 5)), st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)), st.just(())))
def test_check_matrix_rejects_empty_and_wrong_ndim(shape):
    expect_error(lambda: check_matrix(np.zeros(shape), name="counts"), ValueError, "counts")


@CHEAP
@given(shape=shapes, fmt=formats, big=st.floats(1e39, 1e300))
def test_check_matrix_rejects_float64_beyond_float32(shape, fmt, big):
    x = np.ones(shape)
    x.flat[0] = big
    x = as_format(x, fmt)
    with Unchanged(x):
        expect_error(lambda: check_matrix(x, name="counts"), ValueError, "counts")
        assert check_matrix(x, name="counts", dtype=None).dtype == np.float64  # no cast, no overflow


@CHEAP
@given(shape=shapes, fmt=formats, seed=seeds, flaw=st.sampled_from(["negative", "fraction", None]))
def test_check_matrix_require_counts(shape, fmt, seed, flaw):
    rng = np.random.default_rng(seed)
    x = rng.poisson(3.0, size=shape).astype(np.float64)
    if flaw == "negative":
        x.flat[rng.integers(x.size)] = -1.0
    elif flaw == "fraction":
        x.flat[rng.integers(x.size)] = 2.5
    x = as_format(x, fmt)
    with Unchanged(x):
        if flaw is None:
            check_matrix(x, name="counts", require_counts=True)
        else:
            expect_error(lambda: check_matrix(x, name="counts", require_counts=True), ValueError, "counts")


@CHEAP
@given(labels=st.lists(st.one_of(st.sampled_from(["a", "b", "T cell"]), st.none()), min_size=1, max_size=12),
       extra=st.integers(-2, 2))
def test_check_labels(labels, extra):
    y = np.array(labels, dtype=object)
    n = len(labels) + extra
    with Unchanged(y):
        if extra != 0:
            expect_error(lambda: check_labels(y, n, name="cell_type"), ValueError, "cell_type")
        elif any(v is None for v in labels):
            expect_error(lambda: check_labels(y, n, name="cell_type"), ValueError, "cell_type")
        elif len(set(labels)) < 2:
            expect_error(lambda: check_labels(y, n, name="cell_type"), ValueError, "cell_type")
        else:
            codes, classes = check_labels(y, n, name="cell_type")
            assert codes.shape == (n,) and list(classes[codes]) == labels


@CHEAP
@given(n_genes=st.integers(1, 50), bad=st.one_of(st.integers(-5, 0), st.integers(51, 100)),
       wrong=st.sampled_from([2.0, True, "3", None, np.float32(1)]))
def test_check_n_markers_out_of_range(n_genes, bad, wrong):
    assert check_n_markers(np.int64(n_genes), n_genes) == n_genes
    expect_error(lambda: check_n_markers(bad if bad < 1 else n_genes + bad, n_genes), ValueError, "n_markers")
    expect_error(lambda: check_n_markers(wrong, n_genes), TypeError, "n_markers")


# ============================================================================ selectors

# fixed fit shape of the neural selectors: every example reuses one compiled program each
N, G, K, N_CLASSES = 40, 12, 3, 3
NEURAL_KW = dict(n_markers=K, hidden_size=8, latent_size=4, max_epochs=2, min_epochs=1, batch_size=8,
                 learning_rate=1e-3, random_state=0)
SELECTORS = {
    "MarkerMap": (jaxsel.MarkerMap, NEURAL_KW, True),
    "GlobalGumbelVAE": (jaxsel.GlobalGumbelVAE, NEURAL_KW, False),
    "ConcreteVAE": (jaxsel.ConcreteVAE, NEURAL_KW, False),
    "RandomMarkers": (jaxsel.RandomMarkers, dict(n_markers=K), False),
    "HVGMarkers": (jaxsel.HVGMarkers, dict(n_markers=K), False),
    "DEMarkers": (jaxsel.DEMarkers, dict(n_markers=K), True),
}


def _selector(name, **over):
    cls, kw, needs_y = SELECTORS[name]
    return cls(**{**kw, **over}), needs_y


def _y(n, seed=0):
    return labels_for(n, 2 if n < 3 else 3, False, True, np.random.default_rng(seed))


@pytest.mark.parametrize("name", SELECTORS)
@CHEAP
@given(case=matrix_with_bad_value(min_rows=3, min_cols=3, max_rows=30, max_cols=15, nonneg=True))
def test_selectors_reject_nan_and_inf(name, case):
    x, _ = case
    est, needs_y = _selector(name)
    y = _y(x.shape[0]) if needs_y else None
    with Unchanged(x, y):
        expect_error(lambda: est.fit(x, y), ValueError, "X")


@pytest.mark.parametrize("name", SELECTORS)
@CHEAP
@given(bad=st.sampled_from(["no_cells", "no_genes", "1d", "3d", "none", "str", "anndata", "complex", "float64_overflow",
                            "duplicate_names", "missing_names"]),
       n=st.integers(3, 20), g=st.integers(3, 10))
def test_selectors_reject_malformed_X(name, bad, n, g):
    est, needs_y = _selector(name)
    x = np.abs(np.random.default_rng(n * g).normal(size=(n, g)))
    exc = ValueError
    if bad == "no_cells":
        x = x[:0]
    elif bad == "no_genes":
        x = x[:, :0]
    elif bad == "1d":
        x = x[:, 0]
    elif bad == "3d":
        x = x[:, :, None]
    elif bad == "none":
        x, exc = None, TypeError
    elif bad == "str":
        x, exc = "counts.h5ad.missing", TypeError
    elif bad == "anndata":
        x, exc = anndata.AnnData(x.astype(np.float32)), TypeError
    elif bad == "complex":
        x = x.astype(complex)
    elif bad == "float64_overflow":
        x[0, 0] = 1e300
    elif bad == "duplicate_names":
        x = pd.DataFrame(x, columns=["g"] * g)
    elif bad == "missing_names":
        x, exc = pd.DataFrame(x, columns=[None] + [f"g{i}" for i in range(1, g)]), TypeError
    y = _y(n) if needs_y else None
    with Unchanged(x, y):
        expect_error(lambda: est.fit(x, y), exc, "X")


@pytest.mark.parametrize("name", SELECTORS)
@CHEAP
@given(g=st.integers(1, 12), offset=st.one_of(st.integers(-5, 0), st.integers(1, 5)),
       wrong=st.sampled_from([2.0, True, "3", None, [2]]))
def test_selectors_n_markers_out_of_range(name, g, offset, wrong):
    x = np.abs(np.random.default_rng(g).normal(size=(20, g)))
    _, needs_y = _selector(name)
    y = _y(20) if needs_y else None
    bad = offset if offset < 1 else g + offset
    with Unchanged(x, y):
        expect_error(lambda: _selector(name, n_markers=bad)[0].fit(x, y), ValueError, "n_markers")
        expect_error(lambda: _selector(name, n_markers=wrong)[0].fit(x, y), TypeError, "n_markers")


@pytest.mark.parametrize("name", ["MarkerMap", "GlobalGumbelVAE", "ConcreteVAE", "DEMarkers"])  # the others ignore y
@CHEAP
@given(n=st.integers(4, 30), delta=st.integers(-3, 3).filter(bool), missing=st.sampled_from([None, np.nan, pd.NA]),
       as_series=st.booleans())
def test_selectors_reject_mismatched_or_missing_labels(name, n, delta, missing, as_series):
    est, _ = _selector(name)
    x = np.abs(np.random.default_rng(n).normal(size=(n, 6)))
    short = _y(n + delta)
    holey = _y(n).astype(object)
    holey[n // 2] = missing
    if as_series:
        short, holey = pd.Series(short), pd.Series(holey)
    with Unchanged(x, short, holey):
        expect_error(lambda: est.fit(x, short), ValueError, "y")
        expect_error(lambda: est.fit(x, holey), ValueError, "y")


@CHEAP
@given(n_folds=st.one_of(st.integers(-2, 1), st.integers(N + 1, N + 10)), bad_batch=st.integers(-3, 0))
def test_neural_cross_validate_rejects_bad_folds_before_compiling(n_folds, bad_batch):
    x = np.random.default_rng(0).normal(size=(N, G)).astype(np.float32)
    y = labels_for(N, N_CLASSES, True, True, np.random.default_rng(0))
    est = jaxsel.MarkerMap(**NEURAL_KW)
    with Unchanged(x, y):
        expect_error(lambda: est.cross_validate(x, y, n_folds=n_folds), ValueError, "n_folds")
        expect_error(lambda: est.cross_validate(x, y, n_folds=2, batch_size=bad_batch), ValueError, "batch_size")
        expect_error(lambda: est.cross_validate(x, y[:-1], n_folds=2), ValueError, "y")
    assert not hasattr(est, "markers_")


# ---------------------------------------------------------------------- baselines fit

BN, BG = 24, 8  # baseline fit shape (jitted per shape: keep it fixed)


def _hvg_degenerate(x_log, n_bins: int = 20, tol: float = 1e-6) -> set:
    """Genes whose Seurat normalised dispersion is 0/0 up to float32 resolution: alone in
    their mean bin with a log dispersion within ``tol`` of 0, or in a bin whose log
    dispersions all lie within ``tol`` of each other (float64, the recipe's pandas
    transcription in ``test_baselines``)."""
    df = _hvg_frame(x_log, n_bins)
    out = set()
    for _, d in df.dropna(subset=["dispersions"]).groupby("mean_bin", observed=True)["dispersions"]:
        if (d.size == 1 and abs(d.iloc[0]) < tol) or (d.size > 1 and np.ptp(d.to_numpy()) < tol):
            out |= set(d.index.tolist())
    return out


@CHEAP
@given(data=edge_matrix(BN, BG, kind="lognorm"), fmt=formats, one_cell=st.booleans(), as_str=st.booleans(),
       seed=seeds, method=st.sampled_from(["t-test", "t-test_overestim_var", "wilcoxon"]))
def test_baseline_selectors_fit_edge_cases(data, fmt, one_cell, as_str, seed, method):
    dense, const = data
    x = as_format(dense, fmt)
    y = labels_for(BN, N_CLASSES, one_cell, as_str, np.random.default_rng(seed))
    with Unchanged(x, y):
        rnd = jaxsel.RandomMarkers(n_markers=K, random_state=seed).fit(x)
        hvg = jaxsel.HVGMarkers(n_markers=K).fit(x)
        de = jaxsel.DEMarkers(n_markers=K, method=method).fit(x, y)
        for est in (rnd, hvg, de):
            check_markers(est.markers_, BG, K)
            assert est.scores_.shape == (BG,)
            out = est.transform(x)
            assert out.shape == (BN, K)
            np.testing.assert_array_equal(to_dense(out), dense[:, est.get_support()])
        finite(rnd.scores_, de.scores_, de.class_scores_)
        assert sorted(de.classes_.tolist()) == sorted(set(y.tolist()))
        # documented: HVG dispersions are NaN only where undefined: constant genes, a gene
        # alone in its mean bin whose float32 log dispersion is exactly 0, and the genes of
        # a bin whose float32 dispersions are all equal (0/0, as scanpy gives). float32 does
        # not resolve log dispersions closer than ~1e-7, so here: within 1e-6 in float64.
        # Found by a deep random run (JAXSEL_HYPOTHESIS_EXAMPLES=1000, 24 x 8 matrices).
        nan = np.isnan(hvg.scores_)
        assert set(np.flatnonzero(nan)) <= set(const.tolist()) | _hvg_degenerate(dense)
        finite(hvg.scores_[~nan])


# ---------------------------------------------------------------------- neural fit


@settings(FIT, max_examples=5)
@given(data=edge_matrix(N, G), fmt=formats, one_cell=st.booleans(), as_str=st.booleans(), seed=seeds)
def test_markermap_fit_edge_cases(data, fmt, one_cell, as_str, seed):
    """Constant genes, a class with one cell, any sparse format: a valid fit whose
    predictions are finite probabilities over the original labels."""
    dense, _ = data
    x = as_format(dense, fmt)
    y = labels_for(N, N_CLASSES, one_cell, as_str, np.random.default_rng(seed))
    with Unchanged(x, y):
        est = jaxsel.MarkerMap(**NEURAL_KW).fit(x, y)
        check_markers(est.markers_, G, K)
        finite(est.scores_, *est.history_.values())
        proba = est.predict_proba(x)
        assert proba.shape == (N, N_CLASSES)
        finite(proba)
        np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
        pred = est.predict(x)
        assert pred.shape == (N,) and set(pred.tolist()) <= set(y.tolist())
        np.testing.assert_array_equal(to_dense(est.transform(x)), dense[:, est.get_support()])
        expect_error(lambda: est.predict(dense[:, :-1]), ValueError, "X")


@pytest.mark.parametrize("cls", [jaxsel.GlobalGumbelVAE, jaxsel.ConcreteVAE])
@settings(FIT, max_examples=3)
@given(data=edge_matrix(N, G), fmt=formats, with_y=st.booleans())
def test_unsupervised_selectors_fit_edge_cases(cls, data, fmt, with_y):
    dense, _ = data
    x = as_format(dense, fmt)
    y = labels_for(N, N_CLASSES, True, True, np.random.default_rng(0)) if with_y else None
    with Unchanged(x, y):
        est = cls(**NEURAL_KW).fit(x, y)
        check_markers(est.markers_, G, K)
        finite(est.scores_, *est.history_.values())
        rec, emb = est.reconstruct(x), est.embed(x)
        assert rec.shape == (N, G) and emb.shape == (N, NEURAL_KW["latent_size"])
        finite(rec, emb)


@pytest.mark.parametrize("cls", [jaxsel.MarkerMap, jaxsel.GlobalGumbelVAE, jaxsel.ConcreteVAE])
def test_neural_fit_on_unscaled_input_is_an_error_not_nan(cls):
    """Raw values around 1e20 overflow float32 inside training: a clear error, never NaN
    scores (the same shapes and settings as above: no new compilation)."""
    x = np.random.default_rng(0).normal(size=(N, G)).astype(np.float32) * 1e20
    y = labels_for(N, N_CLASSES, True, True, np.random.default_rng(0))
    with Unchanged(x, y):
        expect_error(lambda: cls(**NEURAL_KW).fit(x, y), ValueError, "X")


# ============================================================================ paired X -> Y

PN, PG, PQ = 40, 12, 3
SB_KW = dict(n_genes=K, schedule="straight", hidden=(8, 4), epochs={"unfrozen": 2, "finetune": 1, "ae": 0},
             batch_size=8, random_state=0)
PAIRED = {"SparseRRR": lambda **kw: jaxsel.SparseRRR(**{"rank": 2, "n_genes": K, **kw}),
          "SparseBottleneck": lambda **kw: jaxsel.SparseBottleneck(**{**SB_KW, **kw})}


@pytest.mark.parametrize("name", PAIRED)
@CHEAP
@given(n=st.integers(3, 30), g=st.integers(3, 12), q=st.integers(2, 4),
       bad=st.sampled_from(["y_nan", "y_inf", "y_complex", "y_short", "y_long", "y_no_cols", "y_3d", "y_str", "y_none",
                            "y_overflow", "x_nan", "x_empty", "n_genes_big", "n_genes_zero", "n_genes_float"]))
def test_paired_selectors_reject_bad_input(name, n, g, q, bad):
    rng = np.random.default_rng(n * g * q)
    x, y = rng.normal(size=(n, g)), rng.normal(size=(n, q))
    est = PAIRED[name]()
    exc, arg = ValueError, "Y"
    if bad == "y_nan":
        y[0, 0] = np.nan
    elif bad == "y_inf":
        y[-1, -1] = -np.inf
    elif bad == "y_complex":
        y, exc = y.astype(complex), TypeError
    elif bad == "y_short":
        y = y[:-1]
    elif bad == "y_long":
        y = np.vstack([y, y[:1]])
    elif bad == "y_no_cols":
        y = y[:, :0]
    elif bad == "y_3d":
        y = y[:, :, None]
    elif bad == "y_str":
        y, exc = y.astype(str), TypeError
    elif bad == "y_none":
        y = None
    elif bad == "y_overflow":
        y[0, 0] = 1e300
    elif bad == "x_nan":
        x[0, 0], arg = np.nan, "X"
    elif bad == "x_empty":
        x, y, arg = x[:0], y[:0], "X"
    elif bad == "n_genes_big":
        est, arg = PAIRED[name](n_genes=g + 1), "n_genes must"
    elif bad == "n_genes_zero":
        est, arg = PAIRED[name](n_genes=0), "n_genes must"
    elif bad == "n_genes_float":
        est, exc, arg = PAIRED[name](n_genes=2.0), TypeError, "n_genes must"
    with Unchanged(x, y):
        expect_error(lambda: est.fit(x, y), exc, arg)
        if bad.startswith("y_") and y is not None:
            expect_error(lambda: est.cross_validate(x, y, n_folds=2), exc, arg)


@CHEAP
@given(rank=st.one_of(st.integers(-2, 0), st.integers(4, 9)), hidden=st.sampled_from([8, "ab", (0, 4), ()]))
def test_paired_selectors_reject_bad_parameters(rank, hidden):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(PN, PG)), rng.normal(size=(PN, PQ))
    with Unchanged(x, y):
        expect_error(lambda: jaxsel.SparseRRR(rank=rank, n_genes=K).fit(x, y), ValueError, "rank")
        exc = TypeError if isinstance(hidden, (int, str)) else ValueError
        expect_error(lambda: jaxsel.SparseBottleneck(**{**SB_KW, "hidden": hidden}).fit(x, y), exc, "hidden")
        expect_error(lambda: jaxsel.SparseRRR(n_genes=K).cross_validate(x, y, n_folds=PN + 1), ValueError, "n_folds")


@st.composite
def paired_data(draw):
    x, _ = draw(edge_matrix(PN, PG))
    rng = np.random.default_rng(draw(seeds))
    y = rng.normal(size=(PN, PQ)).astype(np.float32) + x[:, :PQ]
    n_const = draw(st.integers(0, PQ - 1))  # at least one varying feature
    y[:, rng.choice(PQ, n_const, replace=False)] = draw(st.sampled_from([0.0, 3.0]))
    return x, y


@FIT
@given(data=paired_data(), fmt=formats, y_fmt=st.sampled_from(["dense", "coo", "dok_array"]))
def test_sparse_rrr_fit_edge_cases(data, fmt, y_fmt):
    dense, ydense = data
    x, y = as_format(dense, fmt), as_format(ydense, y_fmt)
    with Unchanged(x, y):
        est = jaxsel.SparseRRR(rank=2, n_genes=K).fit(x, y)
        check_markers(est.genes_, PG, K)
        finite(est.scores_, est.coef_w_, est.coef_v_)
        pred, lat = est.predict(x), est.latent(x)
        assert pred.shape == (PN, PQ) and lat.shape == (PN, 2)
        finite(pred, lat)
        assert np.isfinite(est.score(x, y))
        cv = est.cross_validate(x, y, n_folds=2)
        assert cv["genes"].shape == (2, K) and cv["test_r2"].shape == (2,)
        finite(cv["test_r2"], cv["train_r2"])


@settings(FIT, max_examples=3)
@given(data=paired_data(), fmt=formats)
def test_sparse_bottleneck_fit_edge_cases(data, fmt):
    dense, y = data
    x = as_format(dense, fmt)
    with Unchanged(x, y):
        est = jaxsel.SparseBottleneck(**SB_KW).fit(x, y)
        check_markers(est.genes_, PG, K)
        finite(est.scores_)
        pred, lat = est.predict(x), est.latent(x)
        assert pred.shape == (PN, PQ) and lat.shape == (PN, 2)
        finite(pred, lat)
        expect_error(lambda: est.predict(to_dense(x)[:, :-1]), ValueError, "X")


@pytest.mark.parametrize("name", PAIRED)
def test_paired_fit_on_unscaled_input_is_an_error_not_nan(name):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(PN, PG)).astype(np.float32) * 1e20, rng.normal(size=(PN, PQ)).astype(np.float32)
    with Unchanged(x, y):
        expect_error(lambda: PAIRED[name]().fit(x, y), ValueError, "X")


# ============================================================================ imputers

# fixed shapes: spatial cells x spatial genes, reference cells x reference genes
SN, SG, RN, RG = 24, 6, 30, 10
GENES = [f"g{i}" for i in range(64)]  # names for up to 64 columns (the drawn shapes stay below)
STAI_KW = dict(n_calibration_folds=2, epochs=2, hidden=8, latent=4, n_neighbors=3, top_k=5, min_shared_genes=3,
               random_state=0)
# no adversary, no dropout: they only change the loss and the noise, and cost compile time
GIMVI_KW = dict(n_latent=2, hidden=8, max_epochs=2, batch_size=8, adversarial=False, dropout=0.0, random_state=0)
N_SAMPLES = 2


def _counts(rng, n, g):
    x = rng.poisson(3.0, size=(n, g)).astype(np.float32)
    x[:, 0] += 1  # every cell has counts
    return x


def _stai_fit(est, xs, xr, labels, **kw):
    args = dict(coords=np.random.default_rng(1).normal(size=(xs.shape[0], 2)), spatial_genes=GENES[:np.shape(xs)[-1]],
                ref_genes=GENES[:np.shape(xr)[-1]])
    args.update(kw)
    return est.fit(xs, xr, labels, **args)


def _gimvi_fit(est, xr, xs, **kw):
    args = dict(ref_genes=GENES[:np.shape(xr)[-1]], spatial_genes=GENES[:np.shape(xs)[-1]])
    args.update(kw)
    return est.fit(xr, xs, **args)


NAME_FLAWS = ["none", "scalar", "short", "duplicate", "missing_none", "missing_nan", "empty_string"]


def _flawed_names(flaw, names):
    names = list(names)
    if flaw == "none":
        return None, TypeError
    if flaw == "scalar":
        return 5, TypeError
    if flaw == "short":
        return names[:-1], ValueError
    if flaw == "duplicate":
        return names[:-1] + names[:1], ValueError
    if flaw == "missing_none":
        return [None] + names[1:], ValueError
    if flaw == "missing_nan":
        return [np.nan] + names[1:], ValueError
    return [""] + names[1:], ValueError


@CHEAP
@given(flaw=st.sampled_from(NAME_FLAWS), which=st.sampled_from(["ref_genes", "spatial_genes"]),
       model=st.sampled_from(["StAI", "GimVI"]))
def test_imputers_reject_duplicate_or_missing_gene_names(flaw, which, model):
    rng = np.random.default_rng(0)
    xs, xr = _counts(rng, SN, SG), _counts(rng, RN, RG)
    names, exc = _flawed_names(flaw, GENES[:RG] if which == "ref_genes" else GENES[:SG])
    with Unchanged(xs, xr, names):
        if model == "StAI":
            expect_error(lambda: _stai_fit(jaxsel.StAI(**STAI_KW), xs, xr, None, **{which: names}), exc, which)
        else:
            expect_error(lambda: _gimvi_fit(jaxsel.GimVI(**GIMVI_KW), xr, xs, **{which: names}), exc, which)


@CHEAP
@given(n_sp=st.integers(4, 20), n_ref=st.integers(4, 20), g_sp=st.integers(4, 8), g_extra=st.integers(0, 4),
       which=st.sampled_from(["X_spatial", "X_ref"]),
       flaw=st.sampled_from(["nan", "inf", "negative", "fraction", "zero_library", "empty_cells", "1d"]),
       fmt=formats, model=st.sampled_from(["StAI", "GimVI"]))
def test_imputers_reject_bad_counts(n_sp, n_ref, g_sp, g_extra, which, flaw, fmt, model):
    rng = np.random.default_rng(n_sp * n_ref)
    mats = {"X_spatial": _counts(rng, n_sp, g_sp).astype(np.float64), "X_ref": _counts(rng, n_ref, g_sp + g_extra)}
    m = mats[which]
    if flaw == "nan":
        m[-1, -1] = np.nan
    elif flaw == "inf":
        m[0, -1] = np.inf
    elif flaw == "negative":
        m[1, 1] = -2
    elif flaw == "fraction":
        m[1, 1] = 0.5
    elif flaw == "zero_library":
        m[2] = 0
    elif flaw == "empty_cells":
        mats[which] = m[:0]
    elif flaw == "1d":
        mats[which] = m[0]
    if flaw != "1d":
        mats[which] = as_format(mats[which], fmt)
    xs, xr = mats["X_spatial"], mats["X_ref"]
    kw = dict(STAI_KW, n_neighbors=2, min_shared_genes=3)
    with Unchanged(xs, xr):
        if model == "StAI":
            call = lambda: _stai_fit(jaxsel.StAI(**kw), xs, xr, None)  # noqa: E731
            if flaw in ("fraction", "zero_library"):  # documented: counts only need to be non-negative
                return
        else:
            call = lambda: _gimvi_fit(jaxsel.GimVI(**GIMVI_KW), xr, xs)  # noqa: E731
        expect_error(call, ValueError, which)


@CHEAP
@given(bad=st.sampled_from(["coords_nan", "coords_rows", "coords_cols", "coords_none", "labels_short", "labels_missing",
                            "labels_one_class", "loss_weights_list", "loss_weights_str", "k_float", "k_big",
                            "n_neighbors_big", "genes_unknown", "unlabeled_list", "one_class_besides_unlabeled"]))
def test_stai_rejects_bad_arguments(bad):
    rng = np.random.default_rng(0)
    xs, xr = _counts(rng, SN, SG), _counts(rng, RN, RG)
    labels = labels_for(RN, N_CLASSES, False, True, rng).astype(object)
    coords = rng.normal(size=(SN, 2))
    est, kw, exc = jaxsel.StAI(**STAI_KW), {}, ValueError
    if bad == "coords_nan":
        coords[3, 1] = np.nan
        kw, arg = {"coords": coords}, "coords"
    elif bad == "coords_rows":
        kw, arg = {"coords": coords[:-1]}, "coords"
    elif bad == "coords_cols":
        kw, arg = {"coords": np.c_[coords, coords]}, "coords"
    elif bad == "coords_none":
        kw, arg = {"coords": None}, "coords"
    elif bad == "labels_short":
        labels, arg = labels[:-1], "labels"
    elif bad == "labels_missing":
        labels[4], arg = None, "labels"
    elif bad == "labels_one_class":
        labels, arg = np.repeat("a", RN), "labels"
    elif bad == "loss_weights_list":
        est, exc, arg = jaxsel.StAI(**{**STAI_KW, "loss_weights": [1.0]}), TypeError, "loss_weights"
    elif bad == "loss_weights_str":
        est, exc, arg = jaxsel.StAI(**{**STAI_KW, "loss_weights": "recon"}), TypeError, "loss_weights"
    elif bad == "k_float":
        est, exc, arg = jaxsel.StAI(**{**STAI_KW, "n_calibration_folds": 2.0}), TypeError, "n_calibration_folds"
    elif bad == "k_big":
        est, arg = jaxsel.StAI(**{**STAI_KW, "n_calibration_folds": SG}), "n_calibration_folds"
    elif bad == "n_neighbors_big":
        est, arg = jaxsel.StAI(**{**STAI_KW, "n_neighbors": SN}), "n_neighbors"
    elif bad == "unlabeled_list":
        est, exc, arg = jaxsel.StAI(**{**STAI_KW, "unlabeled_category": ["NA"]}), TypeError, "unlabeled_category"
    elif bad == "one_class_besides_unlabeled":
        labels = np.where(np.arange(RN) % 3 == 0, "a", "NA").astype(object)
        est, arg = jaxsel.StAI(**{**STAI_KW, "unlabeled_category": "NA"}), "unlabeled_category"
    else:
        kw, arg = {"genes": ["nope"]}, "genes"
    with Unchanged(xs, xr, labels, coords):
        expect_error(lambda: _stai_fit(est, xs, xr, labels, **kw), exc, arg)


@CHEAP
@given(bad=st.sampled_from(["n_layers_individual", "n_latent", "dropout", "train_size", "batch_size",
                            "spatial_not_in_ref", "adversarial"]))
def test_gimvi_rejects_bad_arguments(bad):
    rng = np.random.default_rng(0)
    xr, xs = _counts(rng, RN, RG), _counts(rng, SN, SG)
    est, kw, exc, arg = jaxsel.GimVI(**GIMVI_KW), {}, ValueError, bad
    if bad == "n_layers_individual":
        est = jaxsel.GimVI(**GIMVI_KW, n_layers_individual=0)
    elif bad == "n_latent":
        est = jaxsel.GimVI(**{**GIMVI_KW, "n_latent": 0})
    elif bad == "dropout":
        est = jaxsel.GimVI(**{**GIMVI_KW, "dropout": 1.0})
    elif bad == "train_size":
        est = jaxsel.GimVI(**GIMVI_KW, train_size=0.0)
    elif bad == "batch_size":
        est = jaxsel.GimVI(**{**GIMVI_KW, "batch_size": 64})
    elif bad == "adversarial":
        est, exc = jaxsel.GimVI(**{**GIMVI_KW, "adversarial": "yes"}), TypeError
    else:
        kw, arg = {"spatial_genes": ["zz"] + GENES[1:SG]}, "reference"
    with Unchanged(xr, xs):
        expect_error(lambda: _gimvi_fit(est, xr, xs, **kw), exc, arg)


@CHEAP
@given(folds=st.one_of(st.integers(-3, 1), st.integers(SG + 1, 20), st.just(True), st.just("g1"),
                       st.just([["g1"], ["g1", "g2"]]), st.just([["nope"]]), st.just([[]])),
       model=st.sampled_from(["StAI", "GimVI"]))
def test_cross_validate_genes_rejects_bad_folds_before_fitting(folds, model):
    rng = np.random.default_rng(0)
    xs, xr = _counts(rng, SN, SG), _counts(rng, RN, RG)
    exc = TypeError if folds is True or folds == "g1" else ValueError
    arg = "gene_folds"
    with Unchanged(xs, xr, folds):
        if model == "StAI":
            est = jaxsel.StAI(**STAI_KW)
            call = lambda: est.cross_validate_genes(  # noqa: E731
                xs, xr, None, coords=rng.normal(size=(SN, 2)), spatial_genes=GENES[:SG], ref_genes=GENES[:RG],
                gene_folds=folds)
        else:
            est = jaxsel.GimVI(**GIMVI_KW)
            call = lambda: est.cross_validate_genes(  # noqa: E731
                xr, xs, ref_genes=GENES[:RG], spatial_genes=GENES[:SG], gene_folds=folds)
        expect_error(call, exc, arg)
    assert not hasattr(est, "params_")


@st.composite
def imputer_data(draw, *, zero_library: bool):
    """FIXED-shape spatial and reference counts with constant / all-zero genes, optional
    zero-library cells and non-integer values, in random formats."""
    xs, _ = draw(edge_matrix(SN, SG, kind="counts", max_const=SG - 2))
    xr, _ = draw(edge_matrix(RN, RG, kind="counts", max_const=RG - 2))
    xs[:, 0] += 1  # a measured gene that every cell expresses ...
    xr[:, 0] += 1
    if zero_library and draw(st.booleans()):  # ... except zero-library cells (stAI allows them)
        xs[draw(st.integers(0, SN - 1))] = 0
        xr[draw(st.integers(0, RN - 1))] = 0
    return as_format(xs, draw(formats)), as_format(xr, draw(formats))


@pytest.fixture(scope="module")
def stai_fitted():
    rng = np.random.default_rng(0)
    labels = labels_for(RN, N_CLASSES, True, True, rng)
    return _stai_fit(jaxsel.StAI(**STAI_KW), _counts(rng, SN, SG), _counts(rng, RN, RG), labels)


@settings(FIT, max_examples=3)
@given(data=imputer_data(zero_library=True), one_cell=st.booleans(), fraction=st.booleans(), seed=seeds)
def test_stai_fit_edge_cases(data, one_cell, fraction, seed):
    """Constant and all-zero genes, zero-library cells, non-integer counts, a reference
    class with one cell, any sparse format: finite imputations and annotations."""
    xs, xr = data
    if fraction:
        xs = to_dense(xs) * 0.5  # stAI needs non-negative values only (normalised, log1p)
    labels = labels_for(RN, N_CLASSES, one_cell, True, np.random.default_rng(seed))
    coords = np.random.default_rng(seed).normal(size=(SN, 2)).round(1)  # duplicates allowed
    names_sp, names_ref = list(GENES[:SG]), np.array(GENES[:RG])
    with Unchanged(xs, xr, labels, coords, names_sp, names_ref):
        est = jaxsel.StAI(**STAI_KW).fit(xs, xr, labels, coords=coords, spatial_genes=names_sp, ref_genes=names_ref)
        mean, sd = est.impute(return_std=True)
        assert mean.shape == sd.shape == (SN, RG - SG)
        finite(mean, sd)
        assert (sd >= 0).all()
        pred, prob = est.annotate(return_proba=True)
        assert pred.shape == (SN,) and set(pred.tolist()) <= set(labels.tolist())
        finite(prob)
        np.testing.assert_allclose(prob.sum(1), 1.0, rtol=1e-5)
        expect_error(lambda: est.impute([]), ValueError, "genes")
        expect_error(lambda: est.impute(["g1"]), ValueError, "genes")  # a measured gene: not kept


def test_stai_score_annotation_with_types_absent_from_reference(stai_fitted):
    """Documented: unseen types are an error, or their cells are left out."""
    est = stai_fitted
    y = np.array(["type_a", "type_b", "unseen"] * (SN // 3), dtype=object)
    with Unchanged(y):
        expect_error(lambda: est.score_annotation(y), ValueError, "y_true")
        s = est.score_annotation(y, unknown="ignore")
        assert set(s) == {"accuracy", "macro_f1", "weighted_f1"} and all(0 <= v <= 1 for v in s.values())
        expect_error(lambda: est.score_annotation(np.repeat("unseen", SN), unknown="ignore"), ValueError, "y_true")
        expect_error(lambda: est.score_annotation(y[:-1]), ValueError, "y_true")
        expect_error(lambda: est.score_annotation(y, unknown="drop"), ValueError, "unknown")


@settings(FIT, max_examples=3)
@given(data=imputer_data(zero_library=False), names_as=st.sampled_from(["list", "array", "index"]))
def test_gimvi_fit_edge_cases(data, names_as):
    """Constant and all-zero genes, any sparse format: finite imputation (mean and
    variance) and latent for both modalities."""
    xs, xr = data
    wrap = {"list": list, "array": np.array, "index": pd.Index}[names_as]
    names_ref, names_sp = wrap(GENES[:RG]), wrap(GENES[:SG])
    with Unchanged(xs, xr, names_ref, names_sp):
        est = jaxsel.GimVI(**GIMVI_KW).fit(xr, xs, ref_genes=names_ref, spatial_genes=names_sp)
        mean, var = est.impute(n_samples=N_SAMPLES)
        assert mean.shape == var.shape == (SN, RG - SG)
        finite(mean, var)
        assert (mean >= 0).all() and (var >= 0).all()
        z_sp, z_ref = est.latent(), est.latent(modality="reference")
        assert z_sp.shape == (SN, 2) and z_ref.shape == (RN, 2)
        finite(z_sp, z_ref, *est.history_.values())
        finite(est.latent(xs))
        expect_error(lambda: est.impute(X_spatial=to_dense(xs)[:, :-1]), ValueError, "X_spatial")
        expect_error(lambda: est.impute(n_samples=-1), ValueError, "n_samples")
        expect_error(lambda: est.impute(genes=["g0", "nope"]), ValueError, "genes")
        zero = to_dense(xs).copy()
        zero[0] = 0
        expect_error(lambda: est.impute(X_spatial=zero), ValueError, "X_spatial")


# ============================================================================ tl


def _adata(x, labels, fmt="dense", var_names=None):
    a = anndata.AnnData(as_format(np.asarray(x, np.float32), fmt))
    a.var_names = var_names if var_names is not None else [f"g{i}" for i in range(a.n_vars)]
    a.obs_names = [f"c{i}" for i in range(a.n_obs)]
    a.obs["cell_type"] = pd.Categorical(labels)
    a.layers["counts"] = np.asarray(x, np.float32).copy()
    a.uns["keep"] = {"me": 1}
    return a


def _written(before, after, key, extra_obsm=()):
    """Only ``var[key]``, ``var[key + '_score']``, ``uns[key]`` (and ``extra_obsm``) are new;
    everything else equals the snapshot."""
    assert_same(before.X, after.X, "X")
    pd.testing.assert_frame_equal(before.obs, after.obs)
    assert list(after.var.columns) == list(before.var.columns) + [key, f"{key}_score"]
    pd.testing.assert_frame_equal(before.var, after.var[list(before.var.columns)])
    assert set(after.uns.keys()) == set(before.uns.keys()) | {key}
    assert set(after.obsm.keys()) == set(before.obsm.keys()) | set(extra_obsm)
    assert_same(before.layers["counts"], after.layers["counts"])


@CHEAP
@given(data=edge_matrix(BN, BG, kind="lognorm"), fmt=st.sampled_from(["dense", "csr", "csc", "csr_array", "csc_array"]),
       one_cell=st.booleans(), fn=st.sampled_from(["random_markers", "hvg_markers", "de_markers"]), copy_=st.booleans())
def test_tl_baselines_write_only_documented_keys(data, fmt, one_cell, fn, copy_):
    x, _ = data
    a = _adata(x, labels_for(BN, N_CLASSES, one_cell, True, np.random.default_rng(0)), fmt)
    before = a.copy()
    kw = {"labels_key": "cell_type"} if fn == "de_markers" else {}
    out = getattr(tl, fn)(a, K, copy=copy_, **kw)
    if copy_:
        assert_same(before, a, "adata")
        a = out
    else:
        assert out is None
    _written(before, a, fn)
    assert a.var[fn].sum() == K and len(a.uns[fn]["markers"]) == K


@CHEAP
@given(bad=st.sampled_from(["duplicate_var_names", "missing_labels", "labels_key_missing", "labels_key_none",
                            "layer_missing", "n_markers_big", "n_markers_zero", "not_anndata", "key_added"]),
       fn=st.sampled_from(["markermap", "de_markers", "random_markers", "hvg_markers", "concrete_vae",
                           "global_gumbel_vae"]),
       fmt=st.sampled_from(["dense", "csr", "csc_array"]))
def test_tl_errors_leave_adata_untouched(bad, fn, fmt):
    x = np.log1p(np.random.default_rng(0).poisson(3.0, size=(BN, BG)))
    labels = labels_for(BN, N_CLASSES, False, True, np.random.default_rng(0)).astype(object)
    names = None
    if bad == "duplicate_var_names":
        names = ["g"] + [f"g{i}" for i in range(1, BG - 1)] + ["g"]
    if bad == "missing_labels":
        labels[3] = np.nan
    a = _adata(x, labels, fmt, names)
    before = a.copy()
    kw = dict(NEURAL_KW) if fn in ("markermap", "concrete_vae", "global_gumbel_vae") else {}
    kw.pop("n_markers", None)
    if fn in ("markermap", "de_markers") or (bad in ("missing_labels", "labels_key_missing") and "vae" in fn):
        kw["labels_key"] = "cell_type"
    n_markers = K
    exc, arg = ValueError, None
    if bad == "duplicate_var_names":
        arg = "var_names"
    elif bad == "missing_labels":
        arg = "cell_type"
        if fn in ("random_markers", "hvg_markers"):
            return  # labels unused
    elif bad == "labels_key_missing":
        if fn in ("random_markers", "hvg_markers"):
            return
        kw["labels_key"], exc, arg = "nope", KeyError, "labels_key"
    elif bad == "labels_key_none":
        if fn not in ("markermap", "de_markers"):
            return
        kw["labels_key"], arg = None, "labels_key"
        if fn == "markermap":
            kw["objective"] = "supervised"
    elif bad == "layer_missing":
        if fn == "random_markers":
            return
        kw["layer"], exc, arg = "nope", KeyError, "layer"
    elif bad == "n_markers_big":
        n_markers, arg = BG + 1, "n_markers"
    elif bad == "n_markers_zero":
        n_markers, arg = 0, "n_markers"
    elif bad == "not_anndata":
        a, exc, arg = a.X, TypeError, "adata"
        before = copy.deepcopy(a)
    else:
        kw["key_added"], exc, arg = "", TypeError, "key_added"
    with Unchanged(a):
        expect_error(lambda: getattr(tl, fn)(a, n_markers, **kw), exc, arg)
    assert_same(before, a, "adata")


def test_tl_markermap_and_sparse_bottleneck_on_sparse_adata():
    """The neural tl functions with the shapes and settings above (no new compilation)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, G)).astype(np.float32)
    a = _adata(x, labels_for(N, N_CLASSES, True, True, rng), "csr")
    before = a.copy()
    kw = {k: v for k, v in NEURAL_KW.items() if k != "n_markers"}
    out = tl.markermap(a, K, "cell_type", copy=True, **kw)
    assert_same(before, a, "adata")
    _written(before, out, "markermap")
    assert out.var["markermap"].sum() == K
    finite(out.var["markermap_score"])
    a.obsm["Y"] = rng.normal(size=(PN, PQ)).astype(np.float32)
    before = a.copy()
    out = tl.sparse_bottleneck(a, "Y", **{**SB_KW, "n_genes": K}, copy=True)
    assert_same(before, a, "adata")
    _written(before, out, "sparse_bottleneck", extra_obsm=["X_sparse_bottleneck"])
    finite(out.obsm["X_sparse_bottleneck"])


def test_tl_imputers_leave_inputs_untouched():
    rng = np.random.default_rng(3)
    sp_ad = anndata.AnnData(sp.csr_matrix(_counts(rng, SN, SG)))
    sp_ad.var_names = GENES[:SG]
    sp_ad.obsm["spatial"] = rng.normal(size=(SN, 2))
    ref = anndata.AnnData(_counts(rng, RN, RG))
    ref.var_names = GENES[:RG]
    ref.obs["cell_type"] = labels_for(RN, N_CLASSES, True, True, rng)
    before = (sp_ad.copy(), ref.copy())
    out = tl.stai(sp_ad, ref, "cell_type", **STAI_KW)
    assert out.shape == (SN, RG - SG)
    finite(out.X, out.layers["std"])
    out = tl.gimvi(ref, sp_ad, n_samples=N_SAMPLES, **GIMVI_KW)
    assert out.shape == (SN, RG - SG)
    finite(out.X, out.layers["variance"], out.obsm["X_gimvi"])
    assert_same(before[0], sp_ad, "adata_spatial")
    assert_same(before[1], ref, "adata_ref")
    dup = ref.copy()
    dup.var_names = GENES[:RG - 1] + ["g0"]
    expect_error(lambda: tl.gimvi(dup, sp_ad, **GIMVI_KW), ValueError, "ref_genes")
    expect_error(lambda: tl.stai(sp_ad, dup, "cell_type", **STAI_KW), ValueError, "ref_genes")
    assert_same(before[0], sp_ad, "adata_spatial")


# ============================================================================ preprocessing


@CHEAP
@given(data=st.data(), shape=st.tuples(st.integers(2, 9), st.integers(1, 9)), fmt=formats, seed=seeds,
       target=st.sampled_from([1e4, 1.0, None]))
def test_normalize_and_log1p_any_format_zero_library_constant_genes(data, shape, fmt, seed, target):
    rng = np.random.default_rng(seed)
    dense = rng.poisson(2.0, size=shape).astype(np.float64)
    zero_rows = data.draw(st.lists(st.integers(0, shape[0] - 1), max_size=shape[0]))
    dense[zero_rows] = 0  # zero-library cells
    dense[:, data.draw(st.integers(0, shape[1] - 1))] = data.draw(st.sampled_from([0.0, 4.0]))  # a constant gene
    x = as_format(dense, fmt)
    with Unchanged(x):
        norm = pp.normalize_total(x, target_sum=target)
        logged = pp.log1p(x, base=data.draw(st.sampled_from([None, 2])))
        for out in (norm, logged):
            assert type(out) is (np.ndarray if fmt == "dense" else type(x)), (type(out), type(x))
            assert out.shape == shape
            finite(to_dense(out))
        nd = to_dense(norm)
        totals = dense.sum(1)
        assert (nd[totals == 0] == 0).all()  # documented: zero-library cells stay zero
        if target is not None:
            np.testing.assert_allclose(nd[totals > 0].sum(1), target, rtol=1e-4)
        xs, mean, sd = pp.scale(logged)
        assert xs.shape == shape and mean.shape == sd.shape == (shape[1],)
        finite(xs, mean, sd)
        const = np.ptp(dense, axis=0) == 0
        assert (xs[:, const] == 0).all()  # constant genes scale to 0, not NaN


@CHEAP
@given(case=matrix_with_bad_value(min_rows=2, nonneg=True),
       fn=st.sampled_from(["normalize_total", "log1p", "scale", "markermap_recipe", "sbnn_recipe", "log_normalize"]))
def test_preprocessing_rejects_nan_and_inf(case, fn):
    x, _ = case
    with Unchanged(x):
        expect_error(lambda: getattr(pp, fn)(x), ValueError, "x contains")


@CHEAP
@given(shape=st.tuples(st.integers(2, 9), st.integers(1, 9)), fmt=formats, seed=seeds,
       fn=st.sampled_from(["normalize_total", "log1p", "markermap_recipe", "sbnn_recipe", "log_normalize"]))
def test_preprocessing_rejects_negative_counts(shape, fmt, seed, fn):
    rng = np.random.default_rng(seed)
    dense = rng.poisson(2.0, size=shape).astype(np.float64)
    dense.flat[rng.integers(dense.size)] = -1.0
    x = as_format(dense, fmt)
    with Unchanged(x):
        expect_error(lambda: getattr(pp, fn)(x), ValueError, "x must be non-negative")


@CHEAP
@given(data=st.data(), n=st.integers(3, 20), g=st.integers(1, 8), fmt=formats, seed=seeds)
def test_recipes_zero_library_and_constant_genes(data, n, g, fmt, seed):
    rng = np.random.default_rng(seed)
    dense = rng.poisson(3.0, size=(n, g)).astype(np.float64)
    dense[data.draw(st.integers(0, n - 1))] = 0
    dense[:, data.draw(st.integers(0, g - 1))] = data.draw(st.sampled_from([0.0, 2.0]))
    x = as_format(dense, fmt)
    labels = labels_for(n, 2, data.draw(st.booleans()), True, rng)
    y = rng.normal(size=(n, 2))
    y[:, 0] = 1.0  # a constant feature
    with Unchanged(x, labels, y):
        mm_x, mask = pp.markermap_recipe(x, labels)
        assert mm_x.shape == (n, g) and mask.all()
        xs, ys = pp.sbnn_recipe(x, y)
        assert xs.shape == (n, g) and ys.shape == (n, 2) and (ys[:, 0] == 0).all()
        ln = pp.log_normalize(x)
        x1, x2 = pp.stai_recipe(x, ln)
        finite(mm_x, xs, ys, ln, x1, x2)
        keep = pp.filter_genes_by_group_presence(x, labels, min_fraction=0.3)
        general = pp.filter_general_genes(x, labels)
        assert keep.shape == general.shape == (g,) and keep.dtype == bool
        expect_error(lambda: pp.markermap_recipe(x, labels[:-1]), ValueError, "labels")
        expect_error(lambda: pp.filter_general_genes(x, labels[1:]), ValueError, "labels")
        expect_error(lambda: pp.sbnn_recipe(x, y[:-1]), ValueError, "y")
        expect_error(lambda: pp.markermap_recipe(x, labels, min_fraction=1.5), ValueError, "min_fraction")
        expect_error(lambda: pp.stai_recipe(x, ln[:, :-1] if g > 1 else ln[:, :0]), ValueError, "ref_log")
        huge = to_dense(x).astype(np.float64) + 1e300  # log-normalised input past the float32 range
        expect_error(lambda: pp.log_normalize(huge, counts=False, name="X_ref"), ValueError, "X_ref")


@CHEAP
@given(data=st.data(), n=st.integers(1, 25), g=st.integers(1, 9), fmt=formats, seed=seeds,
       counts=st.booleans(), dtype=st.sampled_from([np.float32, np.float64, np.int32]))
def test_log_normalize_of_some_columns_is_those_columns_of_all(data, n, g, fmt, seed, counts, dtype):
    """stAI's path for a reference on disk (``streaming.read_columns`` in blocks, then
    ``log_normalize(totals=)``) and in memory (``log_normalize(columns=)``) give the
    columns of the whole matrix's ``log_normalize``, bit for bit, for every format and
    dtype, with cells of zero total and repeated columns; inputs unchanged."""
    from jaxsel import streaming

    rng = np.random.default_rng(seed)
    dense = rng.poisson(2.0, size=(n, g)).astype(dtype)
    dense[rng.random(n) < 0.2] = 0  # cells with no counts stay rows of zeros
    x = as_format(dense, fmt)
    cols = np.asarray(data.draw(st.lists(st.integers(0, g - 1), min_size=1, max_size=2 * g)), np.int64)
    block = data.draw(st.integers(1, n + 2))
    with Unchanged(x):
        want = pp.log_normalize(x, counts=counts)[:, cols]
        assert_same(pp.log_normalize(x, counts=counts, columns=cols), want)
        if fmt in ("dense", "csr"):  # what RowSource streams (other formats are converted to CSR)
            src = streaming.RowSource(x)
            sub, totals = streaming.read_columns(src, cols, block_rows=block, nonnegative=counts)
            np.testing.assert_array_equal(totals, dense.sum(1, dtype=np.float64))
            assert_same(pp.log_normalize(sub, counts=counts, totals=totals), want)
            got, _ = streaming.read_columns(src, cols, block_rows=block,
                                            fn=lambda v, t: pp.log_normalize(v, counts=counts, totals=t))
            assert_same(got, want)


@CHEAP
@given(n=st.integers(2, 30), dim=st.sampled_from([2, 3]), k=st.integers(1, 6), seed=seeds, dup=st.booleans(),
       fmt=st.sampled_from(["dense", "csr", "dok_array"]))
def test_spatial_knn_graph(n, dim, k, seed, dup, fmt):
    rng = np.random.default_rng(seed)
    coords = rng.integers(0, 3 if dup else 1000, size=(n, dim)).astype(np.float64)  # dup: many identical points
    c = as_format(coords, fmt)
    with Unchanged(c):
        if k >= n:
            expect_error(lambda: pp.spatial_knn_graph(c, k=k), ValueError, "k")
            return
        nb = pp.spatial_knn_graph(c, k=k)
        assert nb.shape == (n, k + 1) and nb.dtype == np.int32
        np.testing.assert_array_equal(nb[:, 0], np.arange(n))
        for i, row in enumerate(nb):
            assert len(set(row.tolist())) == k + 1 and i not in row[1:]
        bad = coords.copy()
        bad[0, 0] = np.nan
        expect_error(lambda: pp.spatial_knn_graph(bad, k=k), ValueError, "coords")
        expect_error(lambda: pp.spatial_knn_graph(coords, k=0), ValueError, "k")


@CHEAP
@given(n_classes=st.integers(1, 5), per_class=st.lists(st.integers(1, 6), min_size=5, max_size=5), seed=seeds,
       fractions=st.sampled_from([(0.7, 0.1, 0.2), (0.5, 0.5), (1.0,), (0.9, 0.1, 0.0)]), stratify=st.booleans(),
       n_folds=st.integers(-1, 12), vf=st.sampled_from([0.0, 0.2, 0.5]))
def test_split_and_kfold_partition(n_classes, per_class, seed, fractions, stratify, n_folds, vf):
    """One cell per class allowed; every split a partition; n_folds out of range a
    clear error."""
    labels = np.repeat(np.arange(n_classes), per_class[:n_classes])  # sizes 1..6, so one-cell classes occur
    n = labels.size
    with Unchanged(labels):
        parts = pp.split_indices(labels, fractions, random_state=seed, stratify=stratify)
        assert len(parts) == len(fractions)
        np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))
        if not 2 <= n_folds <= n:
            expect_error(lambda: pp.kfold_indices(labels, n_folds, stratify=stratify), ValueError, "n_folds")
            return
        folds = pp.kfold_indices(labels, n_folds, random_state=seed, stratify=stratify, validation_fraction=vf)
        assert len(folds) == n_folds
        np.testing.assert_array_equal(np.sort(np.concatenate([f[2] for f in folds])), np.arange(n))
        for tr, va, te in folds:
            np.testing.assert_array_equal(np.sort(np.concatenate([tr, va, te])), np.arange(n))
    expect_error(lambda: pp.split_indices(labels, (0.5, 0.6)), ValueError, "fractions")
    expect_error(lambda: pp.split_indices(n + 0.5), TypeError, "n_or_labels")
    expect_error(lambda: pp.split_indices(np.array([1.0, np.nan])), ValueError, "n_or_labels")


@CHEAP
@given(n=st.integers(20, 40), bad=st.sampled_from(["out_of_range", "negative", "float", "2d", "min_cluster_size",
                                                    "n_init", "n_clusters", "y_nan"]))
def test_pretraining_clusters_rejects_bad_arguments(n, bad):
    rng = np.random.default_rng(n)
    y = rng.normal(size=(n, 2))
    train, kw = [np.arange(n)], dict(n_clusters=2, min_cluster_size=2)
    exc, arg = ValueError, "train_sets"
    if bad == "out_of_range":
        train = [np.arange(n + 3)]
    elif bad == "negative":
        train = [np.arange(-1, n - 1)]
    elif bad == "float":
        train, exc = [np.arange(n) + 0.5], TypeError
    elif bad == "2d":
        train = [np.arange(n // 2 * 2).reshape(2, -1)]
    elif bad == "min_cluster_size":
        kw["min_cluster_size"], exc, arg = "3", TypeError, "min_cluster_size"
    elif bad == "n_init":
        kw["n_init"], arg = 0, "n_init"
    elif bad == "n_clusters":
        kw["n_clusters"], arg = 1, "n_clusters"
    else:
        y = y.copy()
        y[0, 0], arg = np.nan, "y"
    with Unchanged(y, train):
        expect_error(lambda: pp.pretraining_clusters(y, train, **kw), exc, arg)


def test_pretraining_clusters_constant_y_and_one_cell_clusters():
    """Constant ``Y`` (one distinct point) and clusters below ``min_cluster_size``."""
    y = np.ones((30, 2))
    y[-1] = 5.0  # a one-cell cluster, left out of pre-training
    with Unchanged(y):
        clusters, pre_tr, pre_va = pp.pretraining_clusters(y, [np.arange(30), np.arange(1, 30)], n_clusters=2,
                                                           min_cluster_size=2, n_init=1)
    assert clusters.shape == (2, 30) and clusters[1, 0] == -1
    for tr, va in zip(pre_tr, pre_va):
        assert 29 not in tr and 29 not in va and tr.size and va.size


# ============================================================================ metrics


@CHEAP
@given(n_train=st.integers(1, 15), n_test=st.integers(1, 15), g=st.integers(1, 6), seed=seeds,
       train_fmt=st.sampled_from(["dense", "csr", "coo_array", "dia"]),
       test_fmt=st.sampled_from(["dense", "csc", "lil"]),
       classifier=st.sampled_from(["knn", "rf"]))
def test_classification_scores_unseen_classes_and_formats(n_train, n_test, g, seed, train_fmt, test_fmt, classifier):
    """Documented: test labels absent from training are always misclassified; one cell
    per class and mixed sparse/dense inputs work."""
    rng = np.random.default_rng(seed)
    xtr, xte = rng.normal(size=(n_train, g)), rng.normal(size=(n_test, g))
    ytr = rng.choice(["a", "b"], n_train)
    yte = rng.choice(["a", "b", "unseen"], n_test)
    a, b = as_format(xtr, train_fmt), as_format(xte, test_fmt)
    with Unchanged(a, b, ytr, yte):
        s = metrics.classification_scores(a, ytr, b, yte, classifier=classifier, n_neighbors=3)
        assert s["confusion_matrix"].sum() == n_test
        assert s["accuracy"] <= np.mean(yte != "unseen") + 1e-12
        for k in ("accuracy", "average_misclassification_rate", "f1_macro", "f1_weighted"):
            assert 0.0 <= s[k] <= 1.0
        expect_error(lambda: metrics.classification_scores(a, ytr[:-1] if n_train > 1 else ytr[:0], b, yte),
                     ValueError, "y_train")
        expect_error(lambda: metrics.classification_scores(a, ytr, b, yte, markers=[g]), ValueError, "markers")
        expect_error(lambda: metrics.classification_scores(a, ytr, b, yte, markers=[0.5]), TypeError, "markers")
        expect_error(lambda: metrics.classification_scores(a, ytr, b, yte, markers=[]), ValueError, "markers")


@CHEAP
@given(n=st.integers(2, 15), g=st.integers(2, 8), seed=seeds, n_const=st.integers(0, 8), fmt=formats)
def test_reconstruction_and_evaluate_markers_constant_genes(n, g, seed, n_const, fmt):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, g))
    x[:, : min(n_const, g)] = 1.5
    y = labels_for(n, 2, False, True, rng)
    a = as_format(x, fmt)
    with Unchanged(a, y):
        r = metrics.reconstruction_scores(a, a, [0, g - 1])
        finite(r["l1"], r["l2"])
        assert 0.0 <= r["variance_jaccard"] <= 1.0
        assert np.isnan(r["variance_spearman"]) or -1.0 <= r["variance_spearman"] <= 1.0
        ev = metrics.evaluate_markers(a, y, a, y, [0], classifiers="knn")
        assert set(ev) == {"n_markers", "classification", "reconstruction"}
        expect_error(lambda: metrics.evaluate_markers(a, y, a, y, [0], classifiers=3), TypeError, "classifiers")
        expect_error(lambda: metrics.reconstruction_scores(a, a, [0], top_fraction=0.0), ValueError, "top_fraction")


@CHEAP
@given(n=st.integers(1, 12), q=st.integers(1, 4), seed=seeds, n_const=st.integers(0, 4), per_feature=st.booleans())
def test_r2_score_is_nan_only_where_undefined(n, q, seed, n_const, per_feature):
    rng = np.random.default_rng(seed)
    yt, yp = rng.normal(size=(n, q)), rng.normal(size=(n, q))
    center = rng.normal(size=q)
    const = np.arange(q) < n_const
    yt[:, const] = center[const]  # zero total sum of squares around the centre
    with Unchanged(yt, yp, center):
        r = np.asarray(metrics.r2_score(yt, yp, center=center, per_feature=per_feature))
        assert not np.isinf(r).any()
        if per_feature:
            assert (np.isnan(r) == const).all()
        else:
            assert np.isnan(r) == const.all()
        bad = center.copy()
        bad[0] = np.nan
        expect_error(lambda: metrics.r2_score(yt, yp, center=bad), ValueError, "center")
        expect_error(lambda: metrics.r2_score(yt, yp[:, :-1] if q > 1 else yp[:-1]), ValueError, "y_pred")


@CHEAP
@given(n=st.integers(2, 20), g=st.integers(1, 6), seed=seeds, const=st.lists(st.booleans(), min_size=6, max_size=6),
       scale=st.sampled_from([1e-6, 1.0, 1e6]))
def test_imputation_scores_constant_genes(n, g, seed, const, scale):
    rng = np.random.default_rng(seed)
    t, p = rng.normal(size=(n, g)) * scale, rng.normal(size=(n, g))
    c = np.array(const[:g])
    t[:, c] = 2.0
    with Unchanged(t, p):
        s = metrics.imputation_scores(t, p)
        for k in ("pcc", "spearman", "rmse", "jsd"):
            assert s[k].shape == (g,)
        # documented: correlations NaN exactly for constant genes; errors always finite
        assert (np.isnan(s["pcc"]) == c).all() and (np.isnan(s["spearman"]) == c).all()
        finite(s["rmse"], s["jsd"])
        assert (s["jsd"] >= 0).all() and (s["jsd"] <= 1).all()
        expect_error(lambda: metrics.imputation_scores(t, p[:, :0] if g == 1 else p[:, 1:]), ValueError, "imputed")


@CHEAP
@given(labels=st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=10),
       missing=st.sampled_from([None, np.nan]))
def test_annotation_scores(labels, missing):
    t = np.array(labels, dtype=object)
    s = metrics.annotation_scores(t, t[::-1])
    assert all(0.0 <= v <= 1.0 for v in s.values())
    holey = t.copy()
    holey[0] = missing
    expect_error(lambda: metrics.annotation_scores(holey, t), ValueError, "y_true")
    expect_error(lambda: metrics.annotation_scores(t, t[:-1]), ValueError, "y_pred")


@CHEAP
@given(n=st.integers(3, 25), d=st.integers(1, 4), seed=seeds, dup=st.booleans(), k=st.integers(-1, 30))
def test_batch_mixing_and_knn_purity(n, d, seed, dup, k):
    rng = np.random.default_rng(seed)
    z = rng.integers(0, 2, size=(n, d)).astype(float) if dup else rng.normal(size=(n, d))
    batch = labels_for(n, 2, False, True, rng)
    other = rng.normal(size=(n, d + 1))
    with Unchanged(z, batch, other):
        if not 1 <= k < n:
            expect_error(lambda: metrics.entropy_batch_mixing(z, batch, k), ValueError, "n_neighbors")
            expect_error(lambda: metrics.knn_purity(z, other, k), ValueError, "n_neighbors")
            return
        q = np.unique(batch, return_counts=True)[1] / n
        e = metrics.entropy_batch_mixing(z, batch, k)
        assert np.log(q.min()) - 1e-9 <= e <= 1e-9  # documented bounds
        p = metrics.knn_purity(z, other, k)
        assert 0.0 <= p <= 1.0
        expect_error(lambda: metrics.entropy_batch_mixing(z, np.repeat("a", n), k), ValueError, "batch")
        expect_error(lambda: metrics.knn_purity(z, other[:-1], 1), ValueError, "latent_alone")
        expect_error(lambda: metrics.entropy_batch_mixing(z, batch, float(k)), TypeError, "n_neighbors")


def test_public_api_is_covered():
    """Every public entry point named in ``__all__`` appears in this file."""
    import inspect
    import pathlib

    src = pathlib.Path(__file__).read_text()
    for mod, names in ((jaxsel, ["MarkerMap", "ConcreteVAE", "GlobalGumbelVAE", "RandomMarkers", "HVGMarkers",
                                 "DEMarkers", "SparseBottleneck", "SparseRRR", "StAI", "GimVI"]),
                       (tl, tl.__all__), (pp, pp.__all__), (metrics, metrics.__all__)):
        for name in names:
            assert inspect.getattr_static(mod, name) is not None
            assert name in src, f"{mod.__name__}.{name} is not exercised here"

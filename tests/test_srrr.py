"""Tests of jaxsel.methods.srrr (sparse reduced-rank regression).

Shapes are tiny and the compiled functions are shared through module-scoped fixtures, so
the whole file compiles a handful of programs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import MultiTaskElasticNet

from jaxsel import engine, metrics
from jaxsel.methods import srrr
from jaxsel.metrics import r2_score

# A working set smaller than p, so the planted / CV tests run the working-set W-step
# (p = 40 there); the default (128 >= p) runs FISTA on all genes.
WS = srrr.SolverConfig(working_set=8)
PLANTED = np.array([3, 11, 17, 29])


# ---------------------------------------------------------------------------------------
# float64 numpy references
# ---------------------------------------------------------------------------------------


def _fix_signs_np(w, v):
    pos = np.argmax(np.abs(v), axis=0)
    s = np.sign(v[pos, np.arange(v.shape[1])])
    return w * s, v * s


def ridge_rrr_np(x, y, lam, rank):
    """Reference closed form: B = (X^T X + n lam I)^{-1} X^T Y, V = top right singular
    vectors of X B, W = B V (float64)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    n, p = x.shape
    b = np.linalg.solve(x.T @ x + n * lam * np.eye(p), x.T @ y)
    _, _, vt = np.linalg.svd(x @ b, full_matrices=False)
    v = vt[:rank].T
    return _fix_signs_np(b @ v, v)


def objective_np(x, y, w, v, lam, alpha):
    x, y, w, v = (np.asarray(a, np.float64) for a in (x, y, w, v))
    data = 0.5 * np.sum((y - x @ w @ v.T) ** 2) / x.shape[0]
    pen = lam * (alpha * np.sum(np.linalg.norm(w, axis=1)) + 0.5 * (1 - alpha) * np.sum(w**2))
    return data + pen


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    """n=80, p=30, q=5 with a few informative genes; centred."""
    rng = np.random.default_rng(0)
    n, p, q = 80, 30, 5
    x = rng.standard_normal((n, p))
    b = np.zeros((p, q))
    b[:6] = rng.standard_normal((6, q))
    y = x @ b + rng.standard_normal((n, q))
    x -= x.mean(0)
    y -= y.mean(0)
    return x.astype(np.float32), y.astype(np.float32)


def _planted(n, seed):
    """Y from 4 planted genes (of 40) through a rank-2 map, plus noise; X standardised."""
    rng = np.random.default_rng(seed)
    p, q = 40, 6
    x = rng.standard_normal((n, p))
    x = (x - x.mean(0)) / x.std(0)
    a = rng.standard_normal((len(PLANTED), 2)) + np.sign(rng.standard_normal((len(PLANTED), 2)))
    z = x[:, PLANTED] @ a
    y = z @ rng.standard_normal((2, q)) + 0.5 * rng.standard_normal((n, q))
    return x.astype(np.float32), y.astype(np.float32)


@pytest.fixture(scope="module")
def planted():
    x, y = _planted(200, seed=1)
    return x - x.mean(0), y - y.mean(0)


@pytest.fixture(scope="module")
def planted_fits(planted):
    x, y = planted
    return {
        relaxed: srrr.fit_n_genes(x, y, n_genes=4, rank=2, relaxed=relaxed, config=WS)
        for relaxed in (True, False)
    }


# ---------------------------------------------------------------------------------------
# solver pieces
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("working_set", [None, 8])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_w_step_matches_multitask_elastic_net(small, alpha, working_set):
    x, y = small
    r = 2
    v = np.linalg.svd(x.T @ y, full_matrices=False)[2][:r].T
    lam = 0.4 * np.max(np.linalg.norm(x.T @ y @ v / len(x), axis=1)) / alpha
    cfg = srrr.SolverConfig(w_tol=1e-7, w_max_iter=20000, working_set=working_set)
    w, _ = srrr.solve_w(x, y, v, lam, alpha, config=cfg)
    w = np.asarray(w)
    ref = MultiTaskElasticNet(alpha=lam, l1_ratio=alpha, fit_intercept=False, tol=1e-10, max_iter=100000)
    w_ref = ref.fit(x.astype(np.float64), (y @ v).astype(np.float64)).coef_.T
    nz, nz_ref = np.any(w != 0, axis=1), np.any(w_ref != 0, axis=1)
    assert 0 < nz_ref.sum() < x.shape[1]  # a real sparse problem
    np.testing.assert_array_equal(nz, nz_ref)
    assert np.max(np.abs(w - w_ref)) <= 1e-4 * np.max(np.abs(w_ref))


def test_ridge_closed_form_matches_numpy(small):
    x, y = small
    lam = 0.3
    res = srrr.fit(x, y, rank=2, lam=lam, alpha=0.0)
    w_ref, v_ref = ridge_rrr_np(x, y, lam, 2)
    np.testing.assert_allclose(np.asarray(res.v), v_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(res.w), w_ref, rtol=1e-4, atol=1e-5)
    assert int(res.n_nonzero) == x.shape[1] and int(res.n_iter) == 0


def test_objective_is_monotone_and_matches_trace(small):
    x, y = small
    lam = 0.2
    res, trace = srrr.fit(x, y, rank=2, lam=lam, return_trace=True)
    k = int(res.n_iter)
    trace = np.asarray(trace, np.float64)
    assert 3 <= k < len(trace)
    assert np.all(np.isfinite(trace[:k])) and np.all(np.isnan(trace[k:]))
    assert np.all(np.diff(trace[:k]) <= 1e-6 * np.abs(trace[1:k]))
    assert trace[0] > trace[k - 1]  # the alternation did something
    # the trace is the penalised objective of the returned (non-relaxed) fit
    np.testing.assert_allclose(trace[k - 1], objective_np(x, y, res.w, res.v, lam, 1.0), rtol=1e-5)
    np.testing.assert_allclose(
        float(srrr.objective(x, y, res.w, res.v, lam)), objective_np(x, y, res.w, res.v, lam, 1.0), rtol=1e-5
    )
    assert 0 < int(res.n_nonzero) < x.shape[1]


def test_lam_above_lam_max_gives_all_zero(planted):
    x, y = planted
    res = srrr.fit(x, y, rank=2, lam=1e3)
    assert int(res.n_nonzero) == 0
    assert not np.any(np.asarray(res.w)) and not np.any(np.asarray(res.v))


def test_fit_is_vmappable_over_lam(planted):
    x, y = planted
    lams = jnp.asarray([0.05, 0.2])
    batched = jax.vmap(lambda lam: srrr.fit(x, y, rank=2, lam=lam))(lams)
    for i, lam in enumerate([0.05, 0.2]):
        one = srrr.fit(x, y, rank=2, lam=lam)
        np.testing.assert_allclose(np.asarray(batched.w[i]), np.asarray(one.w), rtol=1e-5, atol=1e-6)
        assert int(batched.n_nonzero[i]) == int(one.n_nonzero)


# ---------------------------------------------------------------------------------------
# selecting exactly n_genes
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("relaxed", [True, False])
def test_fit_n_genes_recovers_planted_genes(planted_fits, relaxed):
    res = planted_fits[relaxed]
    genes = np.asarray(res.genes)
    assert genes.shape == (4,) and genes.dtype == np.int32
    assert set(genes.tolist()) == set(PLANTED.tolist())
    w, v = np.asarray(res.w), np.asarray(res.v)
    # rows outside the selection are exactly zero, selected rows by decreasing norm
    outside = np.setdiff1d(np.arange(w.shape[0]), genes)
    assert not np.any(w[outside])
    norms = np.linalg.norm(w[genes], axis=1)
    assert np.all(norms > 0) and np.all(np.diff(norms) <= 0)
    np.testing.assert_allclose(v.T @ v, np.eye(2), atol=1e-5)
    assert int(res.n_nonzero) >= 4 and float(res.lam) > 0


def test_relaxed_refit_matches_numpy_ridge_rrr(planted, planted_fits):
    x, y = planted
    res = planted_fits[True]
    genes = np.asarray(res.genes)
    w_ref, v_ref = ridge_rrr_np(x[:, genes], y, float(res.lam), 2)
    np.testing.assert_allclose(np.asarray(res.w)[genes], w_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(res.v), v_ref, rtol=1e-4, atol=1e-5)
    # same search, so the sparse variant selected the same genes at the same lam
    sparse = planted_fits[False]
    np.testing.assert_array_equal(np.asarray(sparse.genes), genes)
    assert float(sparse.lam) == float(res.lam)


def test_relaxed_fit_at_given_lam_matches_numpy(planted):
    x, y = planted
    lam = 0.2
    res = srrr.fit(x, y, rank=2, lam=lam, relaxed=True)
    nz = np.flatnonzero(np.any(np.asarray(res.w) != 0, axis=1))
    assert 2 <= len(nz) == int(res.n_nonzero) < x.shape[1]
    np.testing.assert_array_equal(np.sort(np.asarray(res.genes)[: len(nz)]), nz)
    w_ref, v_ref = ridge_rrr_np(x[:, nz], y, lam, 2)
    np.testing.assert_allclose(np.asarray(res.w)[nz], w_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(res.v), v_ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# cross-validation
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cv_case():
    x, y = _planted(120, seed=2)
    x = x + 3.0  # uncentred: the folds must centre with their training means
    y = y - 1.0
    perm = np.random.default_rng(0).permutation(len(x))
    val = [perm[:40], perm[40:79], perm[79:]]  # 40, 39, 41 cells: padded tables
    train = [np.setdiff1d(perm, v) for v in val]
    splits = engine.make_splits(train, val)
    kw = dict(rank=2, n_genes=4, config=WS)
    return x, y, splits, kw, srrr.cross_validate(x, y, splits, **kw)


def _one_fold(splits, i):
    return engine.Splits(*(a[i : i + 1] for a in splits))


def _assert_same(a: srrr.CVResult, b: srrr.CVResult, rtol=1e-5, atol=1e-6):
    np.testing.assert_array_equal(np.asarray(a.result.genes), np.asarray(b.result.genes))
    for name in ("w", "v", "lam"):
        np.testing.assert_allclose(np.asarray(getattr(a.result, name)), np.asarray(getattr(b.result, name)), rtol=rtol, atol=atol)
    for name in ("r2_train", "r2_test", "r2_test_per_feature", "x_mean", "y_mean"):
        np.testing.assert_allclose(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)), rtol=rtol, atol=atol)


def test_cross_validate_looped_folds_equal_each_fold_alone_bitwise_and_vmap_close(cv_case):
    x, y, splits, kw, cv = cv_case  # default batch_size=1: folds looped in one program
    assert cv.result.w.shape == (3, 40, 2) and cv.result.genes.shape == (3, 4)
    for i in range(3):
        alone = srrr.cross_validate(x, y, _one_fold(splits, i), **kw)
        _assert_same(jax.tree.map(lambda a: a[i : i + 1], cv), alone, rtol=0, atol=0)
    vmapped = srrr.cross_validate(x, y, splits, batch_size=None, **kw)
    _assert_same(cv, vmapped)


def test_cross_validate_fold_equals_fit_on_centred_training_cells(cv_case):
    x, y, splits, kw, cv = cv_case
    i = 1
    idx = np.asarray(splits.train_idx[i, : int(splits.n_train[i])])
    xt, yt = x[idx], y[idx]
    np.testing.assert_allclose(np.asarray(cv.x_mean[i]), xt.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(cv.y_mean[i]), yt.mean(0), rtol=1e-5, atol=1e-5)
    res = srrr.fit_n_genes(xt - xt.mean(0), yt - yt.mean(0), 4, 2, config=WS)
    np.testing.assert_array_equal(np.asarray(cv.result.genes[i]), np.asarray(res.genes))
    np.testing.assert_allclose(np.asarray(cv.result.w[i]), np.asarray(res.w), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(np.asarray(cv.result.lam[i]), float(res.lam), rtol=1e-4)


def test_cross_validate_r2_matches_metrics(cv_case):
    x, y, splits, kw, cv = cv_case
    for i in range(3):
        w, v = np.asarray(cv.result.w[i], np.float64), np.asarray(cv.result.v[i], np.float64)
        xm, ym = np.asarray(cv.x_mean[i], np.float64), np.asarray(cv.y_mean[i], np.float64)
        for idx_tab, n_tab, got in (
            (splits.val_idx, splits.n_val, cv.r2_test),
            (splits.train_idx, splits.n_train, cv.r2_train),
        ):
            idx = np.asarray(idx_tab[i, : int(n_tab[i])])
            pred = (x[idx] - xm) @ w @ v.T + ym
            np.testing.assert_allclose(float(got[i]), r2_score(y[idx], pred, center=ym), rtol=1e-4, atol=1e-5)
        idx = np.asarray(splits.val_idx[i, : int(splits.n_val[i])])
        pred = (x[idx] - xm) @ w @ v.T + ym
        np.testing.assert_allclose(
            np.asarray(cv.r2_test_per_feature[i]), r2_score(y[idx], pred, center=ym, per_feature=True), rtol=1e-4, atol=1e-5
        )
    # the planted signal is found out of sample
    assert np.all(np.asarray(cv.r2_test) > 0.3)
    assert all(set(np.asarray(g).tolist()) == set(PLANTED.tolist()) for g in cv.result.genes)


# ---------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_genes", [0, -1, 41, 2.0])
def test_bad_n_genes_raise(planted, cv_case, n_genes):
    x, y = planted
    with pytest.raises(ValueError, match="n_genes"):
        srrr.fit_n_genes(x, y, n_genes, 2)
    cx, cy, splits, _, _ = cv_case
    with pytest.raises(ValueError, match="n_genes"):
        srrr.cross_validate(cx, cy, splits, rank=2, n_genes=n_genes)


def test_other_bad_arguments_raise(planted):
    x, y = planted
    with pytest.raises(ValueError, match=r"n_genes must lie in \[1, 40\]"):
        srrr.fit_n_genes(x, y, 41, 2)
    with pytest.raises(ValueError, match="rank"):
        srrr.fit_n_genes(x, y, 4, 7)  # q = 6
    with pytest.raises(ValueError, match="alpha > 0"):
        srrr.fit_n_genes(x, y, 4, 2, alpha=0.0)
    with pytest.raises(ValueError, match="alpha"):
        srrr.fit(x, y, 2, 0.1, alpha=1.5)
    with pytest.raises(ValueError, match="same number of cells"):
        srrr.fit(x, y[:-1], 2, 0.1)
    with pytest.raises(ValueError, match="working_set"):
        srrr.SolverConfig(working_set=0)


# ----------------------------------------------------------------- estimator layer


def test_sparse_rrr_estimator_fit_predict_cv():
    import jaxsel
    from jaxsel import datasets

    x, y, info = datasets.make_paired(n_cells=300, n_genes=40, n_outputs=5, n_informative=4, random_state=3)
    x0 = x.copy()
    est = jaxsel.SparseRRR(rank=2, n_genes=4).fit(x, y)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(np.sort(est.genes_), info["informative_genes"])
    assert est.get_support().sum() == 4
    np.testing.assert_array_equal(est.transform(x), x[:, np.sort(est.genes_)])
    # rows outside the selection are exactly zero; V is orthonormal
    outside = np.setdiff1d(np.arange(40), est.genes_)
    assert np.all(est.coef_w_[outside] == 0)
    np.testing.assert_allclose(est.coef_v_.T @ est.coef_v_, np.eye(2), atol=1e-5)
    pred = (x - x.mean(0)) @ est.coef_w_ @ est.coef_v_.T + y.mean(0)
    np.testing.assert_allclose(est.predict(x), pred, rtol=1e-4, atol=1e-5)
    assert est.latent(x).shape == (300, 2)
    assert est.score(x, y) == pytest.approx(metrics.r2_score(y, est.predict(x), center=y.mean(0)), abs=1e-6)
    cv = est.cross_validate(x, y, n_folds=3)
    assert cv["genes"].shape == (3, 4) and cv["test_r2"].shape == (3,)
    assert np.all(cv["test_r2"] > 0.2)
    with pytest.raises(ValueError, match="rank"):
        jaxsel.SparseRRR(rank=6, n_genes=4).fit(x, y)
    with pytest.raises(ValueError, match="alpha"):
        jaxsel.SparseRRR(alpha=0.0, n_genes=4).fit(x, y)
    with pytest.raises(ValueError, match="same number of cells"):
        jaxsel.SparseRRR(n_genes=4).fit(x, y[:10])

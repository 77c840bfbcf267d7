"""gimVI: planted-structure recovery, posterior identities, fold-parallel fits equal fits
alone, held-out genes never leak, no retracing, save/load, input validation, history,
held-out gene cross-validation.

A gimVI fit compiles for 15-30 s on CPU whatever its length (the epochs are cheap: 300
cells, two steps of 128 per epoch), so the fast suite is built around two compiled fit
programs, shared through module-scoped fixtures and direct calls with the estimator's
exact static settings:

- ``A``: one default-config model (``GimVI.fit``, and :func:`gimvi.fit` with ``M = 1``);
- ``B``: two models looped (``cross_validate_genes`` with two models on CPU, and
  :func:`gimvi.fit` with ``M = 2, batch_size = 1``).

The slow suite (``-m slow``) adds the programs of two vmapped models
(``batch_size = None``) and of each structural variant (likelihoods, dispersion, decoder,
adversary); the fast suite only traces the variants.

The likelihoods themselves are tested against scipy in ``tests/test_losses.py``.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sps
from scipy.stats import spearmanr

import jaxsel
from jaxsel import engine, preprocessing
from jaxsel.engine import folds as engine_folds
from jaxsel.methods import gimvi

N_REF, N_SP, G, GS, D = 300, 300, 30, 15, 3
EPOCHS = 200  # the cost is the compilation; 200 epochs of 2 steps run in ~1 s
SPATIAL_LIB = 200
CFG = gimvi.GimVIConfig(G, GS)  # the estimator's default config for these shapes


# ----------------------------------------------------------------------------- data


def planted(seed: int = 0):
    """Counts driven by a 3-d latent: ``rho = softmax(z W)``; reference counts
    ``Poisson(rho * library)`` over all ``G`` genes, spatial counts of ``GS`` of them
    ``Poisson(rho_sub / sum(rho_sub) * 200)``. Returns the counts, names and true rates."""
    rng = np.random.default_rng(seed)
    w = 1.5 * rng.normal(size=(D, G))

    def draw(n):
        z = rng.normal(size=(n, D))
        logits = z @ w
        rho = np.exp(logits - logits.max(1, keepdims=True))
        return z, rho / rho.sum(1, keepdims=True)

    _, rho_ref = draw(N_REF)
    lib = rng.lognormal(np.log(2000.0), 0.3, size=(N_REF, 1))
    xr = rng.poisson(rho_ref * lib)
    z_sp, rho_sp = draw(N_SP)
    sp_index = np.sort(rng.choice(G, GS, replace=False))
    sub = rho_sp[:, sp_index] / rho_sp[:, sp_index].sum(1, keepdims=True)
    xs = rng.poisson(sub * SPATIAL_LIB)
    assert (xr.sum(1) > 0).all() and (xs.sum(1) > 0).all()
    genes = np.array([f"g{i}" for i in range(G)])
    return dict(xr=xr, xs=xs, genes=genes, sp_index=sp_index, sp_genes=genes[sp_index], rho_sp=rho_sp, z_sp=z_sp)


def _kw(p):
    return dict(ref_genes=p["genes"], spatial_genes=p["sp_genes"])


@pytest.fixture(scope="module")
def data():
    return planted(0)


@pytest.fixture(scope="module")
def fitted(data):
    """Program A: the default estimator on the planted data."""
    return jaxsel.GimVI(max_epochs=EPOCHS, random_state=0).fit(data["xr"], data["xs"], **_kw(data))


# ----------------------------------------------------------------------------- functional core


def _splits(seed, n_ref=N_REF, n_sp=N_SP, n_train=270):
    rng = np.random.default_rng(seed)
    a, b = rng.permutation(n_ref), rng.permutation(n_sp)
    return (a[:n_train], a[n_train:]), (b[:n_train], b[n_train:])


def direct_fit(p, masks, seeds, *, batch_size, xs=None):
    """:func:`gimvi.fit` with the estimator's static settings (config, loop, shapes,
    dtypes), so that it shares the estimator's compiled programs."""
    xr = np.asarray(p["xr"], np.float32)
    xs = np.asarray(p["xs"] if xs is None else xs, np.float32)
    cfg = CFG
    log_lib = np.log(xr.sum(1, dtype=np.float64))
    models = gimvi.make_models(cfg, np.asarray(masks, np.float32), p["sp_index"], log_lib.mean(), log_lib.var())
    sp = [_splits(s) for s in seeds]
    splits = (engine.make_splits([s[0][0] for s in sp], [s[0][1] for s in sp]),
              engine.make_splits([s[1][0] for s in sp], [s[1][1] for s in sp]))
    keys = jnp.stack([jax.random.key(int(s)) for s in seeds])
    loop = engine.LoopConfig(max_epochs=EPOCHS, batch_size=128, min_epochs=0, patience=None)
    res = gimvi.fit(models, loop, keys, gimvi.make_data(xr, xs), splits, batch_size=batch_size, mesh=None)
    return cfg, models, res


def _row(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree.leaves(tree)]


def _max_abs_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(_leaves(a), _leaves(b)))


# spatial genes held out by the two models of the fold-parallel and cross-validation tests
FOLD_POS = [np.array([0, 1]), np.array([5, 8, 11])]


def _fold_masks():
    masks = np.ones((2, GS), np.float32)
    for f, h in enumerate(FOLD_POS):
        masks[f, h] = 0.0
    return masks


@pytest.fixture(scope="module")
def parallel(data):
    """Two models (different masks and seeds) fitted together, looped (program B), and
    each alone (program A)."""
    masks, seeds = _fold_masks(), [0, 1]
    _, models, looped = direct_fit(data, masks, seeds, batch_size=1)
    alone = [direct_fit(data, masks[i:i + 1], seeds[i:i + 1], batch_size=1)[2] for i in range(2)]
    return dict(models=models, looped=looped, alone=alone)


@pytest.fixture(scope="module")
def vmapped(data):
    """The two models of ``parallel`` vmapped (its own program, ~30 s to compile)."""
    return direct_fit(data, _fold_masks(), [0, 1], batch_size=None)[2]


# ----------------------------------------------------------------------------- planted structure


def _per_gene_spearman(a, b):
    return np.array([spearmanr(a[:, j], b[:, j])[0] for j in range(a.shape[1])])


def test_imputation_recovers_planted_rates(fitted, data):
    """Unmeasured genes' imputed counts follow their true rates (medians over 5 seeds at
    200 epochs: 0.63-0.79; shuffled cells: |median| < 0.07)."""
    mean = fitted.impute(n_samples=0, return_var=False)
    assert mean.shape == (N_SP, G - GS)
    cols = [int(g[1:]) for g in fitted.imputable_genes_]
    assert sorted(cols) == sorted(set(range(G)) - set(data["sp_index"].tolist()))
    rates = data["rho_sp"][:, cols]
    rho = _per_gene_spearman(mean, rates)
    shuffled = _per_gene_spearman(mean[np.random.default_rng(0).permutation(N_SP)], rates)
    assert np.median(rho) > 0.5
    assert abs(np.median(shuffled)) < 0.15
    assert np.median(rho) - np.median(shuffled) > 0.4


def test_latent_carries_planted_latent(fitted, data):
    """A linear read-out of the spatial cells' latent recovers the true 3-d ``z`` (R^2 per
    dimension over 5 seeds: 0.80-0.94)."""
    z = fitted.latent()
    assert z.shape == (N_SP, 10) and np.isfinite(z).all()
    design = np.column_stack([z, np.ones(N_SP)])
    coef, *_ = np.linalg.lstsq(design, data["z_sp"], rcond=None)
    resid = data["z_sp"] - design @ coef
    r2 = 1 - resid.var(0) / data["z_sp"].var(0)
    assert np.min(r2) > 0.6, r2
    zr = fitted.latent(modality="reference")
    assert zr.shape == (N_REF, 10) and np.isfinite(zr).all()
    np.testing.assert_array_equal(fitted.latent(data["xr"], modality="reference"), zr)


# ----------------------------------------------------------------------------- posterior


def test_posterior_mean_has_zero_variance(fitted):
    mean, var = fitted.impute(n_samples=0)
    assert np.isfinite(mean).all() and (mean > 0).all()
    assert (var == 0).all()
    assert fitted.impute(n_samples=0, return_var=False).shape == mean.shape


def test_sampled_posterior_has_positive_variance_and_mean_near_posterior_mean(fitted):
    m0 = fitted.impute(n_samples=0, return_var=False)
    m, v = fitted.impute(n_samples=50)
    assert np.isfinite(m).all() and np.isfinite(v).all()
    assert (v > 0).all()
    # sampling noise and Jensen's gap only: each gene's cell profile is kept (over 5 seeds:
    # correlations >= 0.995, median relative difference 0.023-0.032)
    r = np.array([np.corrcoef(m[:, j], m0[:, j])[0, 1] for j in range(m.shape[1])])
    assert np.min(r) > 0.95, r
    assert np.median(np.abs(m - m0) / m0) < 0.1
    # the draws are reproducible and depend on the seed
    m2, v2 = fitted.impute(n_samples=50)
    np.testing.assert_array_equal(m2, m)
    np.testing.assert_array_equal(v2, v)
    m3 = fitted.impute(n_samples=50, random_state=123, return_var=False)
    assert not np.array_equal(m3, m)


@pytest.mark.parametrize("n_samples", [0, 50])
def test_normalized_rows_sum_to_one_and_measured_counts_sum_to_library(fitted, data, n_samples):
    rho = fitted.impute(fitted.genes_, n_samples=n_samples, normalized=True, return_var=False)
    assert rho.shape == (N_SP, G) and (rho > 0).all()
    np.testing.assert_allclose(rho.sum(1), 1.0, rtol=1e-5)
    counts = fitted.impute(list(fitted.spatial_genes_), n_samples=n_samples, return_var=False)
    np.testing.assert_allclose(counts.sum(1), data["xs"].sum(1), rtol=1e-5)
    # counts of every gene are rho rescaled by the same per-cell factor L / sum_{G'} rho
    allc = fitted.impute(fitted.genes_, n_samples=0, return_var=False)
    rho0 = fitted.impute(fitted.genes_, n_samples=0, normalized=True, return_var=False)
    ratio = allc / rho0
    np.testing.assert_allclose(ratio, ratio[:, :1] * np.ones((1, G)), rtol=1e-5)


def _explicit_draws(m, x, seed, n_samples):
    """``(rho, counts)`` [n_samples, n, G] in float64 from the draws ``impute`` documents:
    ``z = mean + sd * eps``, ``eps`` drawn with the key folded with the cell's row, then
    with the draw's index; counts ``rho / sum_{G'} rho * library``."""
    cfg, net = m.cfg_, m.cfg_.net
    key = jax.random.key(seed)

    @jax.jit
    def draws(x):
        _, mu, lv = gimvi._eval(cfg, m.params_, m.state_, x, 1, m.model_)
        rows = jnp.arange(x.shape[0])

        def one(d):
            eps = jax.vmap(lambda r: jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, r), d),
                                                       (cfg.n_latent,)))(rows)
            (log_rho, _, _), _ = gimvi._apply(net, m.params_["vae"], m.state_["vae"], net.decode,
                                              mu + jnp.exp(0.5 * lv) * eps, 0, train=False)
            return log_rho

        return jax.vmap(one)(jnp.arange(n_samples))

    rho = np.exp(np.asarray(draws(jnp.asarray(x, jnp.float32)), np.float64))
    lib = np.asarray(x, np.float64).sum(1, keepdims=True)
    return rho, rho / rho[:, :, np.asarray(m.model_.sp_index)].sum(-1, keepdims=True) * lib


def test_posterior_moments_are_those_of_the_documented_draws(fitted, data):
    rho, cnt = _explicit_draws(fitted, data["xs"], 0, 50)
    mean, var = fitted.impute(fitted.genes_, n_samples=50)
    np.testing.assert_allclose(mean, cnt.mean(0), rtol=1e-5)
    # float32 E[x^2] - E[x]^2 (measured: 2e-3 relative at most here)
    np.testing.assert_allclose(var, cnt.var(0), rtol=2e-2)
    assert np.median(np.abs(var - cnt.var(0)) / cnt.var(0)) < 1e-4
    mean, var = fitted.impute(fitted.genes_, n_samples=50, normalized=True)
    np.testing.assert_allclose(mean, rho.mean(0), rtol=1e-5)
    np.testing.assert_allclose(var, rho.var(0), rtol=2e-2)


def test_lognorm_is_log_normalised_counts(fitted, data):
    post = gimvi.impute(fitted.cfg_, fitted.params_, fitted.state_, fitted.model_,
                        jnp.asarray(data["xs"], jnp.float32), jax.random.key(0), n_samples=0)
    c = np.asarray(post.counts, np.float64)
    lib = data["xs"].sum(1, keepdims=True)
    np.testing.assert_allclose(np.asarray(post.lognorm), np.log1p(1e4 * c / (lib + c)), rtol=1e-5, atol=1e-6)
    assert (np.asarray(post.lognorm_var) == 0).all()


def test_imputation_does_not_depend_on_chunk(fitted):
    """Per-cell keys: the draws of a cell do not depend on how cells are chunked."""
    small = copy.copy(fitted).set_params(chunk=7)  # 300 cells: 43 chunks, the last padded
    a_mean, a_var = small.impute(n_samples=50)
    b_mean, b_var = fitted.impute(n_samples=50)  # chunk=512: one chunk
    assert fitted.chunk == 512
    np.testing.assert_allclose(a_mean, b_mean, rtol=1e-5, atol=1e-6)
    # the variance is E[x^2] - E[x]^2 in float32: its rounding (differing between chunk
    # shapes) is amplified by 1 / CV^2 (measured: up to 7e-4 relative here)
    np.testing.assert_allclose(a_var, b_var, rtol=5e-3, atol=1e-6)
    assert np.median(np.abs(a_var - b_var) / b_var) < 1e-4


def test_impute_on_given_spatial_cells(fitted, data):
    xs = data["xs"].copy()
    np.testing.assert_array_equal(fitted.impute(X_spatial=xs, n_samples=0, return_var=False),
                                  fitted.impute(n_samples=0, return_var=False))
    np.testing.assert_array_equal(xs, data["xs"])
    # cells are independent: permuted cells give permuted rows (posterior mean)
    perm = np.random.default_rng(1).permutation(N_SP)
    np.testing.assert_allclose(fitted.impute(X_spatial=xs[perm], n_samples=0, return_var=False),
                               fitted.impute(n_samples=0, return_var=False)[perm], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="X_spatial"):
        fitted.impute(X_spatial=xs[:, :-1])
    bad = xs.copy()
    bad[3] = 0
    with pytest.raises(ValueError, match="X_spatial"):
        fitted.impute(X_spatial=bad)
    bad = xs.astype(np.float64)
    bad[3, 3] = 0.5
    with pytest.raises(ValueError, match="X_spatial"):
        fitted.impute(X_spatial=bad)


# ----------------------------------------------------------------------------- fold-parallel


def test_looped_models_equal_models_alone_bit_for_bit(parallel):
    """``lax.map`` over the model axis runs each model's program as it runs alone."""
    for i in range(2):
        alone = parallel["alone"][i]
        for a, b in zip(_leaves(_row(parallel["looped"], i)[:3]), _leaves(_row(alone, 0)[:3])):
            np.testing.assert_array_equal(a, b)


def _rel_norm(a, b):
    return max(float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-12)) for x, y in zip(_leaves(a), _leaves(b)))


@pytest.mark.slow
def test_vmapped_models_match_models_alone(parallel, vmapped, data):
    """``vmap`` over the model axis: the same computation up to float32 rounding (batched
    matmuls and reductions round differently: not bit-for-bit). The first epoch agrees to
    rounding; over 400 Adam steps the differences grow but stay small (measured: losses
    within 3e-3 relative, VAE parameters within 5e-3 per array (relative norm), the
    adversary's small BatchNorm biases within 6%, imputed counts within 1.3%, median
    1.2e-3)."""
    vm = vmapped
    xs = jnp.asarray(data["xs"], jnp.float32)
    for i in range(2):
        alone = _row(parallel["alone"][i], 0)
        one = _row(vm, i)
        for k, v in alone.history.items():
            np.testing.assert_allclose(np.asarray(one.history[k])[0], np.asarray(v)[0], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(np.asarray(one.history[k]), np.asarray(v), rtol=1e-2, atol=1e-3)
        assert _rel_norm(one.params["vae"], alone.params["vae"]) < 2e-2
        assert _rel_norm(one.params["adv"], alone.params["adv"]) < 0.25
        assert _rel_norm(one.model_state["vae"], alone.model_state["vae"]) < 2e-2
        model = _row(parallel["models"], i)
        a = np.asarray(gimvi.impute(CFG, one.params, one.model_state, model, xs, jax.random.key(0), n_samples=0).counts)
        b = np.asarray(gimvi.impute(CFG, alone.params, alone.model_state, model, xs, jax.random.key(0),
                                    n_samples=0).counts)
        rel = np.abs(a - b) / b
        assert np.median(rel) < 1e-2 and np.max(rel) < 0.1


def test_the_two_parallel_models_differ(parallel):
    """The fold axis is real: different masks and seeds give different models."""
    res = parallel["looped"]
    assert _max_abs_diff(_row(res.params, 0), _row(res.params, 1)) > 1e-2
    assert res.history["train_loss"].shape == (2, EPOCHS)


# ----------------------------------------------------------------------------- held-out genes never leak


def test_masked_gene_values_never_reach_the_fit(data, parallel, fitted):
    """A model whose mask hides spatial genes fits and imputes identically whatever those
    columns hold; the same change with the genes observed does change the fit."""
    masks = _fold_masks()[1:]
    hidden = FOLD_POS[1]
    xs2 = data["xs"].copy()
    rng = np.random.default_rng(5)
    xs2[:, hidden] = rng.poisson(50.0, size=(N_SP, hidden.size))  # also changes the full library
    cfg, models, res = direct_fit(data, masks, [1], batch_size=1, xs=xs2)
    ref = parallel["alone"][1]
    for a, b in zip(_leaves(res.params), _leaves(ref.params)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_leaves(res.model_state), _leaves(ref.model_state)):
        np.testing.assert_array_equal(a, b)
    for k in ref.history:
        np.testing.assert_array_equal(np.asarray(res.history[k]), np.asarray(ref.history[k]))
    model = _row(models, 0)
    p1, s1 = _row(res.params, 0), _row(res.model_state, 0)
    post_a = gimvi.impute(cfg, p1, s1, model, jnp.asarray(data["xs"], jnp.float32), jax.random.key(0), n_samples=50)
    post_b = gimvi.impute(cfg, p1, s1, model, jnp.asarray(xs2, jnp.float32), jax.random.key(0), n_samples=50)
    for a, b in zip(post_a, post_b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    za = gimvi.latent(cfg, p1, s1, model, jnp.asarray(data["xs"], jnp.float32), 1)
    zb = gimvi.latent(cfg, p1, s1, model, jnp.asarray(xs2, jnp.float32), 1)
    np.testing.assert_array_equal(np.asarray(za), np.asarray(zb))
    # control: with every gene observed the same change moves the fit (seed 0 with every
    # gene observed is the estimator's fit, see test_estimator_fit_is_the_functional_fit)
    _, _, moved = direct_fit(data, np.ones((1, GS), np.float32), [0], batch_size=1, xs=xs2)
    assert _max_abs_diff(_row(moved.params, 0), fitted.params_) > 1e-3


def test_estimator_fit_is_the_functional_fit(fitted, data):
    """``GimVI.fit`` is :func:`gimvi.fit` of one model observing every spatial gene, with
    the split ``default_rng(seed)`` draws and the key ``jax.random.key(seed)``."""
    _, models, res = direct_fit(data, np.ones((1, GS), np.float32), [0], batch_size=1)
    for a, b in zip(_leaves(_row((res.params, res.model_state), 0)), _leaves((fitted.params_, fitted.state_))):
        np.testing.assert_array_equal(a, b)
    for k, v in fitted.history_.items():
        np.testing.assert_array_equal(np.asarray(res.history[k])[0], v)
    for a, b in zip(_leaves(_row(models, 0)), _leaves(fitted.model_)):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- compilation


def test_second_fit_with_same_shapes_does_not_recompile(fitted, data):
    """Other data values, seed and continuous hyperparameters (leaves of the config):
    the same compiled fit and imputation programs."""
    other = planted(1)
    xr, xs = other["xr"].astype(np.float32), other["xs"].astype(np.float32)
    xr_before, xs_before = xr.copy(), xs.copy()
    fitted.impute(X_spatial=data["xs"], n_samples=0)  # compile these first when run alone
    fitted.latent(data["xr"], modality="reference")
    fit_before = engine_folds._fit_folds_jit._cache_size()
    imp_before, lat_before = gimvi.impute._cache_size(), gimvi.latent._cache_size()
    m = jaxsel.GimVI(max_epochs=EPOCHS, random_state=3, kappa=2.0, learning_rate=2e-3, weight_decay=0.0,
                     n_epochs_kl_warmup=100).fit(xr, xs, **_kw(other))
    m.impute(X_spatial=xs, n_samples=0)
    m.latent(xr, modality="reference")
    assert engine_folds._fit_folds_jit._cache_size() == fit_before
    assert gimvi.impute._cache_size() == imp_before
    assert gimvi.latent._cache_size() == lat_before
    # the caller's arrays are left as they were
    np.testing.assert_array_equal(xr, xr_before)
    np.testing.assert_array_equal(xs, xs_before)
    assert not np.allclose(m.history_["train_loss"], fitted.history_["train_loss"])
    assert np.isfinite(m.history_["val_loss"]).all()


# ----------------------------------------------------------------------------- save / load


def test_save_load_round_trip(fitted, data, tmp_path):
    path = tmp_path / "model"  # the suffix is added
    fitted.save(path)
    loaded = jaxsel.GimVI.load(str(path) + ".npz")
    assert loaded.get_params() == fitted.get_params()
    assert loaded.cfg_ == fitted.cfg_
    np.testing.assert_array_equal(loaded.genes_, fitted.genes_)
    np.testing.assert_array_equal(loaded.spatial_genes_, fitted.spatial_genes_)
    np.testing.assert_array_equal(loaded.imputable_genes_, fitted.imputable_genes_)
    assert jax.tree.structure(loaded.params_) == jax.tree.structure(fitted.params_)
    assert jax.tree.structure(loaded.state_) == jax.tree.structure(fitted.state_)
    for a, b in zip(_leaves((loaded.params_, loaded.state_)), _leaves((fitted.params_, fitted.state_))):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_leaves(loaded.model_), _leaves(fitted.model_)):
        np.testing.assert_array_equal(np.asarray(a, b.dtype), b)
    assert set(loaded.history_) == set(fitted.history_)
    for k in fitted.history_:
        np.testing.assert_array_equal(loaded.history_[k], fitted.history_[k])
    for kw in (dict(n_samples=50), dict(n_samples=50, normalized=True)):
        for a, b in zip(loaded.impute(**kw), fitted.impute(**kw)):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.latent(), fitted.latent())
    with pytest.raises(ValueError, match="reference"):
        loaded.latent(modality="reference")  # reference cells are not stored


def test_load_rejects_other_classes(fitted, tmp_path):
    """Versions, headers and damaged files: tests/test_persist.py (one mechanism for all)."""
    path = fitted.save(tmp_path / "m")
    with pytest.raises(ValueError, match="holds a GimVI, not a jaxsel StAI"):
        jaxsel.StAI.load(path)
    assert isinstance(jaxsel.load(path), jaxsel.GimVI)


def test_model_fitted_with_a_generator_seed_saves_or_is_rejected_up_front(data, tmp_path):
    est = jaxsel.GimVI(max_epochs=EPOCHS, random_state=np.random.default_rng(0))
    try:
        est.fit(data["xr"], data["xs"], **_kw(data))
    except (TypeError, ValueError) as err:  # rejecting it at fit is a fix too
        assert "random_state" in str(err)
        return
    est.save(tmp_path / "gen.npz")
    loaded = jaxsel.GimVI.load(tmp_path / "gen.npz")
    for a, b in zip(_leaves(loaded.params_), _leaves(est.params_)):
        np.testing.assert_array_equal(a, b)


def test_unfitted_estimator_refuses_inference(tmp_path):
    from sklearn.exceptions import NotFittedError

    m = jaxsel.GimVI()
    for call in (lambda: m.impute(), lambda: m.latent(), lambda: m.save(tmp_path / "x")):
        with pytest.raises(NotFittedError):
            call()


# ----------------------------------------------------------------------------- input validation


def _small():
    rng = np.random.default_rng(0)
    xr = rng.poisson(3.0, size=(20, 6)) + 1
    xs = rng.poisson(3.0, size=(15, 3)) + 1
    return xr, xs, [f"g{i}" for i in range(6)], ["g1", "g3", "g4"]


def _bad_inputs(case):
    xr, xs, rg, sg = _small()
    xr, xs = xr.astype(np.float64), xs.astype(np.float64)
    est = {}
    if case == "fraction":
        xr[0, 0] = 0.5
    elif case == "negative":
        xs[1, 1] = -1
    elif case == "nan":
        xr[2, 2] = np.nan
    elif case == "inf":
        xs[2, 2] = np.inf
    elif case == "missing_gene":
        sg = ["g1", "g3", "nope"]
    elif case == "dup_ref":
        rg = ["g0", "g1", "g2", "g3", "g4", "g1"]
    elif case == "dup_spatial":
        sg = ["g1", "g3", "g1"]
    elif case == "zero_ref_cell":
        xr[4] = 0
    elif case == "zero_spatial_cell":
        xs[7] = 0
    elif case == "ref_genes_none":
        rg = None
    elif case == "wrong_name_count":
        rg = rg[:-1]
    elif case == "seq_likelihood":
        est = dict(seq_likelihood="poisson")
    elif case == "spatial_likelihood":
        est = dict(spatial_likelihood="zinb")
    elif case == "dispersion":
        est = dict(dispersion="gene-cell")
    elif case == "train_size":
        est = dict(train_size=1.5)
    elif case == "max_epochs":
        est = dict(max_epochs=0)
    elif case == "adversarial":
        est = dict(adversarial="yes")
    elif case == "batch_size":  # valid inputs, but fewer training cells than a batch
        est = dict(batch_size=128)
    return jaxsel.GimVI(**est), xr, xs, rg, sg


@pytest.mark.parametrize("case, exc, match", [
    ("fraction", ValueError, "X_ref"),
    ("negative", ValueError, "X_spatial"),
    ("nan", ValueError, "X_ref"),
    ("inf", ValueError, "X_spatial"),
    ("missing_gene", ValueError, "spatial genes are not in the reference"),
    ("dup_ref", ValueError, "ref_genes"),
    ("dup_spatial", ValueError, "spatial_genes"),
    ("zero_ref_cell", ValueError, "X_ref"),
    ("zero_spatial_cell", ValueError, "X_spatial"),
    ("ref_genes_none", TypeError, "ref_genes"),
    ("wrong_name_count", ValueError, "ref_genes"),
    ("seq_likelihood", ValueError, "seq_likelihood"),
    ("spatial_likelihood", ValueError, "spatial_likelihood"),
    ("dispersion", ValueError, "dispersion"),
    ("train_size", ValueError, "train_size"),
    ("max_epochs", ValueError, "max_epochs"),
    ("adversarial", TypeError, "adversarial"),
    ("batch_size", ValueError, "batch_size"),
])
def test_fit_rejects_bad_input(case, exc, match):
    est, xr, xs, rg, sg = _bad_inputs(case)
    before = (xr.copy(), xs.copy())
    with pytest.raises(exc, match=match):
        est.fit(xr, xs, ref_genes=rg, spatial_genes=sg)
    np.testing.assert_array_equal(xr, before[0])
    np.testing.assert_array_equal(xs, before[1])


def test_inference_rejects_bad_arguments(fitted):
    with pytest.raises(ValueError, match="genes"):
        fitted.impute(genes=["unknown"])
    with pytest.raises(ValueError, match="genes"):
        fitted.impute(genes=[])
    with pytest.raises(ValueError, match="n_samples"):
        fitted.impute(n_samples=-1)
    with pytest.raises(ValueError, match="modality"):
        fitted.latent(modality="x")
    with pytest.raises(ValueError, match="X_ref"):
        fitted.latent(np.ones((4, 3)), modality="reference")
    # a single gene name is one gene
    assert fitted.impute(fitted.imputable_genes_[0], n_samples=0, return_var=False).shape == (N_SP, 1)


def test_sparse_input_fits_as_dense_and_inputs_are_untouched(fitted, data):
    xr, xs = sps.csr_matrix(data["xr"]), sps.csr_matrix(data["xs"])
    xr_before, xs_before = xr.copy(), xs.copy()
    genes, sp_genes = data["genes"].copy(), data["sp_genes"].copy()
    m = jaxsel.GimVI(max_epochs=EPOCHS, random_state=0).fit(xr, xs, ref_genes=genes, spatial_genes=sp_genes)
    for a, b in zip(_leaves((m.params_, m.state_)), _leaves((fitted.params_, fitted.state_))):
        np.testing.assert_array_equal(a, b)
    for k in fitted.history_:
        np.testing.assert_array_equal(m.history_[k], fitted.history_[k])
    assert (xr != xr_before).nnz == 0 and (xs != xs_before).nnz == 0
    np.testing.assert_array_equal(genes, data["genes"])
    np.testing.assert_array_equal(sp_genes, data["sp_genes"])
    # the spatial gene order is the caller's, and the model's columns follow it
    np.testing.assert_array_equal(m.spatial_genes_, data["sp_genes"])


# ----------------------------------------------------------------------------- history


def test_history_is_finite_and_training_loss_decreases(fitted):
    h = fitted.history_
    want = {"train_loss", "train_rec", "train_kl", "train_fool", "train_adversary", "val_loss", "val_rec", "val_kl"}
    assert want <= set(h)
    for k, v in h.items():
        assert v.shape == (EPOCHS,), k
        assert np.isfinite(v).all(), k
    loss, val = h["train_loss"], h["val_loss"]
    # over 5 seeds: the last 10 epochs average 2-4% of the first 3 epochs' loss
    assert loss[-10:].mean() < 0.1 * loss[:3].mean()
    assert val[-10:].mean() < 0.1 * val[:3].mean()
    assert np.all(np.diff(loss[:20]) < 0)  # steadily down at first
    # the validation loss is the negative ELBO: rec + kl
    np.testing.assert_allclose(h["val_rec"] + h["val_kl"], val, rtol=1e-5)
    # the adversary is a two-class classifier; the encoder keeps fooling it, so its loss
    # stays near log 2 = 0.69 (over 5 seeds, median of the last 50 epochs: 0.37-0.62)
    assert 0.25 < np.median(h["train_adversary"][-50:]) < 1.0


# Each structural setting is its own compiled program (~25 s on CPU). The fast suite
# traces every variant's whole fit (shapes, no compilation); the slow suite (``-m slow``)
# fits them, each alone and all at once.
VARIANTS = [
    dict(spatial_likelihood="nb"),
    dict(seq_likelihood="nb"),
    dict(dispersion="gene"),
    dict(decoder_layers=1),
    dict(adversarial=False),
    dict(seq_likelihood="nb", spatial_likelihood="nb", dispersion="gene", decoder_layers=1, adversarial=False),
]


# every non-default setting in three traces (~1.5 s each)
VARIANTS_TRACE = [
    dict(spatial_likelihood="nb", dispersion="gene"),
    dict(seq_likelihood="nb", decoder_layers=1),
    dict(adversarial=False),
]


def _variant_id(kw):
    return ",".join(f"{k}={v}" for k, v in kw.items())


@pytest.mark.parametrize("kw", VARIANTS_TRACE, ids=_variant_id)
def test_variants_trace_to_the_right_shapes(data, kw):
    """The whole fit of every structural variant traces (``eval_shape``: no compilation)
    and returns the parameters and history it should."""
    cfg = gimvi.GimVIConfig(G, GS, **kw)
    xr, xs = np.asarray(data["xr"], np.float32), np.asarray(data["xs"], np.float32)
    log_lib = np.log(xr.sum(1))
    model = _row(gimvi.make_models(cfg, np.ones((1, GS)), data["sp_index"], log_lib.mean(), log_lib.var()), 0)
    (tr0, va0), (tr1, va1) = _splits(0)
    splits = (_row(engine.make_splits([tr0], [va0]), 0), _row(engine.make_splits([tr1], [va1]), 0))
    loop = engine.LoopConfig(max_epochs=7, batch_size=128, min_epochs=0, patience=None)
    out = jax.eval_shape(lambda k, d, s: engine.fit_one(model, loop, k, d, s), jax.random.key(0),
                         gimvi.make_data(xr, xs), splits)
    adversarial = kw.get("adversarial", True)
    assert ("adv" in out.params) and set(out.params) == {"vae", "adv"}
    keys = {"train_loss", "train_rec", "train_kl", "val_loss", "val_rec", "val_kl"}
    keys |= {"train_fool", "train_adversary"} if adversarial else set()
    assert set(out.history) == keys
    assert all(v.shape == (7,) for v in out.history.values())
    theta = out.params["vae"]["log_theta"]
    assert theta.shape == (G, 1 if kw.get("dispersion") == "gene" else 2)
    if kw.get("decoder_layers", 0):  # the decoder's hidden layer sees z and the dataset one-hot
        assert out.params["vae"]["dec_body"]["TorchDense_0"]["kernel"].shape == (cfg.n_latent + 2, cfg.decoder_hidden)
    else:
        assert "dec_body" not in out.params["vae"] or not out.params["vae"]["dec_body"]
    assert out.params["vae"]["rho_head"]["kernel"].shape[1] == G


def _check_variant(data, kw):
    m = jaxsel.GimVI(max_epochs=20, random_state=0, **kw).fit(data["xr"], data["xs"], **_kw(data))
    for k, v in m.history_.items():
        assert v.shape == (20,) and np.isfinite(v).all(), k
    assert m.history_["train_loss"][-3:].mean() < m.history_["train_loss"][:3].mean()
    assert ("train_adversary" in m.history_) == kw.get("adversarial", True)
    assert ("train_fool" in m.history_) == kw.get("adversarial", True)
    if kw.get("decoder_layers", 0):  # the decoder's hidden layer sees z and the dataset one-hot
        kernel = m.params_["vae"]["dec_body"]["TorchDense_0"]["kernel"]
        assert kernel.shape[0] == m.cfg_.n_latent + 2
    theta = np.asarray(m.params_["vae"]["log_theta"])
    assert theta.shape == (G, 1 if kw.get("dispersion") == "gene" else 2)
    mean, var = m.impute(n_samples=0)
    assert np.isfinite(mean).all() and (var == 0).all()
    assert np.isfinite(m.latent()).all()
    rho = m.impute(m.genes_, normalized=True, n_samples=0, return_var=False)
    np.testing.assert_allclose(rho.sum(1), 1.0, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kw", VARIANTS, ids=_variant_id)
def test_variants_train_without_nan(data, kw):
    _check_variant(data, kw)


# ----------------------------------------------------------------------------- cross-validation


def _fold_names(data):
    return [data["sp_genes"][h].tolist() for h in FOLD_POS]


@pytest.fixture(scope="module")
def cv(data):
    """Two held-out folds, one seed: two models looped (program B)."""
    est = jaxsel.GimVI(max_epochs=EPOCHS, random_state=0)
    return est.cross_validate_genes(data["xr"], data["xs"], gene_folds=_fold_names(data), **_kw(data))


def test_cross_validation_scores_exactly_the_held_out_genes(cv, data):
    assert isinstance(cv, list) and len(cv) == 1
    r = cv[0]
    assert isinstance(r, jaxsel.imputers.GeneCVResult)
    np.testing.assert_array_equal(r.genes, data["sp_genes"])
    want = np.full(GS, -1)
    for f, h in enumerate(FOLD_POS):
        want[h] = f
    np.testing.assert_array_equal(r.fold_of_gene, want)
    held = want >= 0
    for name in ("pcc", "spearman", "rmse", "jsd"):
        s = getattr(r, name)
        assert s.shape == (GS,)
        assert np.isfinite(s[held]).all(), name
        assert np.isnan(s[~held]).all(), name
    assert np.isfinite(r.imputed[:, held]).all() and np.isnan(r.imputed[:, ~held]).all()
    assert (r.std[:, held] == 0).all()  # n_samples=0
    np.testing.assert_allclose(r.truth, preprocessing.log_normalize(data["xs"]), rtol=1e-6)
    assert set(r.history) >= {"train_loss", "val_loss"}
    assert all(v.shape == (2, EPOCHS) for v in r.history.values())
    # the held-out genes are imputed from the others: they follow their measurements
    # (median Spearman over 3 data seeds: 0.66-0.81)
    assert np.median(r.spearman[held]) > 0.4, r.spearman[held]
    m = r.medians()
    assert m["spearman"] == pytest.approx(np.median(r.spearman[held]))


def test_cross_validation_models_are_the_direct_fits(cv, data):
    """Fold 1's history and imputation are those of a model fitted alone with its mask
    and the estimator's seed (the bookkeeping of models, masks, seeds and columns)."""
    r = cv[0]
    h = FOLD_POS[1]  # the second model of the program
    mask = np.ones((1, GS), np.float32)
    mask[0, h] = 0.0
    est = jaxsel.GimVI(max_epochs=EPOCHS, random_state=0)
    d = est._inputs(data["xr"], data["xs"], **_kw(data))
    cfg, models, _, res = est._fit_models(d, mask, [0], None)
    for k, v in res.history.items():
        np.testing.assert_array_equal(np.asarray(v)[0], r.history[k][1])
    post = gimvi.impute(cfg, _row(res.params, 0), _row(res.model_state, 0), _row(models, 0),
                        jnp.asarray(data["xs"], jnp.float32), jax.random.key(0), n_samples=0)
    np.testing.assert_allclose(r.imputed[:, h], np.asarray(post.lognorm)[:, data["sp_index"][h]], rtol=1e-6)


def test_cross_validation_seeds(data):
    """One fold, two seeds: two results (two models looped, program B)."""
    est = jaxsel.GimVI(max_epochs=EPOCHS, random_state=0)
    names = [data["sp_genes"][[2, 3]].tolist()]
    res = est.cross_validate_genes(data["xr"], data["xs"], gene_folds=names, n_seeds=2, **_kw(data))
    assert len(res) == 2
    for r in res:
        np.testing.assert_array_equal(np.flatnonzero(r.fold_of_gene >= 0), [2, 3])
        assert np.isfinite(r.spearman[[2, 3]]).all() and np.isnan(np.delete(r.spearman, [2, 3])).all()
        assert all(v.shape == (1, EPOCHS) for v in r.history.values())
    assert not np.array_equal(res[0].imputed[:, 2], res[1].imputed[:, 2])
    assert not np.array_equal(res[0].history["train_loss"], res[1].history["train_loss"])


def test_cross_validation_rejects_bad_folds(data):
    est = jaxsel.GimVI(max_epochs=EPOCHS)
    xr, xs, kw = data["xr"], data["xs"], _kw(data)
    with pytest.raises(ValueError, match="every spatial gene"):
        est.cross_validate_genes(xr, xs, gene_folds=[data["sp_genes"].tolist()], **kw)
    with pytest.raises(ValueError, match="not shared"):
        est.cross_validate_genes(xr, xs, gene_folds=[["g0_missing"]], **kw)
    with pytest.raises(ValueError, match="disjoint"):
        est.cross_validate_genes(xr, xs, gene_folds=[[data["sp_genes"][0]], [data["sp_genes"][0]]], **kw)
    with pytest.raises(ValueError, match="n_seeds"):
        est.cross_validate_genes(xr, xs, gene_folds=2, n_seeds=0, **kw)
    # holding out a cell's only expressed genes leaves it with no counts
    xs = xs.copy()
    xs[0] = 0
    xs[0, 0] = 4
    with pytest.raises(ValueError, match="no counts left"):
        est.cross_validate_genes(xr, xs, gene_folds=[[data["sp_genes"][0]]], **kw)


@pytest.mark.parametrize("est_kw, call_kw, match", [
    ({}, {"n_samples": -1}, "n_samples"),
    ({"chunk": 0}, {}, "chunk"),
])
def test_cross_validation_checks_its_arguments_before_fitting(data, monkeypatch, est_kw, call_kw, match):
    def no_fit(*args, **kwargs):
        raise AssertionError("the models were fitted before the arguments were checked")

    monkeypatch.setattr(gimvi, "fit", no_fit)
    est = jaxsel.GimVI(max_epochs=EPOCHS, **est_kw)
    with pytest.raises(ValueError, match=match):
        est.cross_validate_genes(data["xr"], data["xs"], gene_folds=_fold_names(data), **call_kw, **_kw(data))

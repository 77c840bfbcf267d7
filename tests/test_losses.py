"""Pure losses against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsel import losses


def _np_group_lasso(w):
    return float(np.sum(np.sqrt(np.sum(np.asarray(w, np.float64) ** 2, axis=1))))


def test_group_lasso_matches_numpy_and_sums_row_norms():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(30, 7)).astype(np.float32)
    w[[3, 11]] = 0.0
    assert float(losses.group_lasso(jnp.asarray(w), axis=1)) == pytest.approx(_np_group_lasso(w), rel=1e-6)
    # axis selects which slices are groups: axis=0 groups the columns
    assert float(losses.group_lasso(jnp.asarray(w), axis=0)) == pytest.approx(_np_group_lasso(w.T), rel=1e-6)
    assert float(losses.group_lasso(jnp.asarray([[3.0, 4.0]]), axis=1)) == 5.0


def test_group_lasso_gradient_is_unit_rows_and_zero_at_zero_rows():
    w = jnp.asarray([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    g = np.asarray(jax.grad(lambda a: losses.group_lasso(a, axis=1))(w))
    np.testing.assert_allclose(g, [[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]], rtol=1e-6)
    assert np.all(np.isfinite(g))


def test_prox_group_lasso_is_group_soft_thresholding():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(50, 4))
    t = 1.5
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    want = np.maximum(0.0, 1.0 - t / norms) * w
    got = np.asarray(losses.prox_group_lasso(jnp.asarray(w, jnp.float32), t, axis=1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(got[norms[:, 0] <= t] == 0.0)  # small rows become exactly zero
    # the prox minimises t * group_lasso(u) + ||u - w||^2 / 2: no random perturbation does better
    obj = lambda u: t * _np_group_lasso(u) + 0.5 * np.sum((u - w) ** 2)  # noqa: E731
    best = obj(got.astype(np.float64))
    for _ in range(20):
        assert obj(got + 1e-3 * rng.normal(size=w.shape)) >= best - 1e-9


def test_r2_score_definition_against_numpy():
    from jaxsel import metrics

    rng = np.random.default_rng(2)
    y = rng.normal(size=(40, 3)) + 2.0
    pred = y + rng.normal(scale=0.5, size=y.shape)
    c = rng.normal(size=3)
    want = 1 - np.sum((y - pred) ** 2) / np.sum((y - c) ** 2)
    assert metrics.r2_score(y, pred, center=c) == pytest.approx(want)
    per = metrics.r2_score(y, pred, center=c, per_feature=True)
    np.testing.assert_allclose(per, 1 - np.sum((y - pred) ** 2, 0) / np.sum((y - c) ** 2, 0))
    # centre None means already-centred data: the denominator is sum(y^2)
    assert metrics.r2_score(y, pred) == pytest.approx(1 - np.sum((y - pred) ** 2) / np.sum(y**2))
    with pytest.raises(ValueError, match="same shape"):
        metrics.r2_score(y, pred[:, :2])
    with pytest.raises(ValueError, match="center"):
        metrics.r2_score(y, pred, center=[0.0, 1.0])


def _np_mmd(x, y, n_kernels=5, mul=2.0):
    z = np.concatenate([x, y]).astype(np.float64)
    d2 = ((z[:, None] - z[None]) ** 2).sum(-1)
    n = len(z)
    bw = d2.sum() / (n * n - n)
    k = sum(np.exp(-d2 / (bw * mul ** (m - n_kernels // 2))) for m in range(n_kernels))
    nx = len(x)
    return k[:nx, :nx].mean() - 2 * k[:nx, nx:].mean() + k[nx:, nx:].mean()


def test_mmd_matches_numpy_and_separates_shifted_sets():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 4))
    y = rng.normal(size=(25, 4)) + 1.0
    got = float(losses.mmd_rbf(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)))
    assert got == pytest.approx(_np_mmd(x, y), rel=1e-4)
    same = float(losses.mmd_rbf(jnp.asarray(x, jnp.float32), jnp.asarray(x, jnp.float32)))
    assert abs(same) < 1e-5 and got > 10 * abs(same)
    g = jax.grad(lambda a: losses.mmd_rbf(a, jnp.asarray(y, jnp.float32)))(jnp.asarray(x, jnp.float32))
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("n_kernels,mul", [(5, 2.0), (3, 2.0), (4, 3.0)])
def test_mmd_kernel_mixtures_match_numpy(n_kernels, mul):
    """The repeated-squaring path (multiplier 2) and the general path agree with numpy."""
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(40, 3)), 0.5 * rng.normal(size=(20, 3)) + 0.3
    got = float(losses.mmd_rbf(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), n_kernels, mul))
    assert got == pytest.approx(_np_mmd(x, y, n_kernels, mul), rel=2e-4)


def test_pearson_loss_matches_numpy_corrcoef():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(50, 6))
    b = 0.5 * a + rng.normal(size=(50, 6))
    r = np.mean([np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(6)])
    got = float(losses.pearson_loss(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
    assert got == pytest.approx(1 - r, abs=1e-5)
    # a perfect positive linear relation gives 0, a perfect negative one 2
    assert float(losses.pearson_loss(jnp.asarray(a), jnp.asarray(3 * a + 1))) == pytest.approx(0.0, abs=1e-5)
    assert float(losses.pearson_loss(jnp.asarray(a), jnp.asarray(-a))) == pytest.approx(2.0, abs=1e-5)


def test_cosine_consistence_matches_numpy():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(7, 5))
    b = rng.normal(size=(7, 5))
    want = 1 - (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    got = np.asarray(losses.cosine_consistence(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert float(losses.cosine_consistence(jnp.asarray(a[:1]), jnp.asarray(2 * a[:1]))[0]) == pytest.approx(0.0, abs=1e-6)
    zero = losses.cosine_consistence(jnp.zeros((1, 5)), jnp.asarray(a[:1]))
    assert np.all(np.isfinite(np.asarray(zero)))


# ----------------------------------------------------------------------------- count likelihoods


def _count_grid():
    """Counts x means x inverse dispersions covering zeros, large counts, tiny theta."""
    x = np.array([0, 1, 2, 5, 17, 300, 5000], np.float64)
    mu = np.array([1e-6, 0.05, 1.0, 7.5, 250.0, 4000.0], np.float64)
    theta = np.array([1e-4, 0.01, 0.5, 3.0, 100.0, 1e4], np.float64)
    X, M, T = np.meshgrid(x, mu, theta, indexing="ij")
    return X.ravel(), M.ravel(), T.ravel()


def test_poisson_log_prob_matches_scipy():
    from scipy import stats

    x, mu, _ = _count_grid()
    got = losses.poisson_log_prob(jnp.asarray(x, jnp.float32), jnp.asarray(mu, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), stats.poisson(mu).logpmf(x), rtol=2e-5, atol=5e-3)
    # mu = 0: log p(0) = 0 exactly, and the gradient is finite
    assert float(losses.poisson_log_prob(0.0, 0.0)) == 0.0
    assert np.isfinite(float(jax.grad(lambda m: losses.poisson_log_prob(0.0, m))(0.0)))


def test_nb_log_prob_matches_scipy_nbinom():
    from scipy import stats

    x, mu, theta = _count_grid()
    want = stats.nbinom(n=theta, p=theta / (theta + mu)).logpmf(x)
    got = losses.nb_log_prob(*(jnp.asarray(a, jnp.float32) for a in (x, mu, theta)))
    np.testing.assert_allclose(np.asarray(got), want, rtol=5e-5, atol=5e-3)
    # the mean and variance of the parameterisation: mu and mu + mu^2 / theta
    ks = np.arange(0, 400, dtype=np.float32)
    p = np.exp(np.asarray(losses.nb_log_prob(jnp.asarray(ks), 12.0, 4.0), np.float64))
    assert p.sum() == pytest.approx(1.0, abs=1e-4)
    assert (p * ks).sum() == pytest.approx(12.0, rel=1e-3)
    assert (p * (ks - 12.0) ** 2).sum() == pytest.approx(12.0 + 144.0 / 4.0, rel=1e-3)


def test_zinb_log_prob_matches_scipy_mixture():
    from scipy import stats

    x, mu, theta = _count_grid()
    for logit in (-6.0, -0.3, 0.0, 2.5, 12.0):
        pi = 1.0 / (1.0 + np.exp(-logit))
        nb = stats.nbinom(n=theta, p=theta / (theta + mu))
        want = np.where(x == 0, np.log(pi + (1 - pi) * nb.pmf(0)), np.log1p(-pi) + nb.logpmf(x))
        got = losses.zinb_log_prob(*(jnp.asarray(a, jnp.float32) for a in (x, mu, theta)), jnp.float32(logit))
        np.testing.assert_allclose(np.asarray(got), want, rtol=5e-5, atol=5e-3)


def test_log_binom_coef_value_and_slope_match_scipy():
    """Every count up to 40 (the rising-factorial path below 9 and Stirling's above meet
    there), huge counts, and inverse dispersions from 1e-6 to 1e8 (both sides of the
    series' switch at 10): the value and its derivative in theta (the digamma difference
    a training step uses) agree with float64 scipy; exactly 0 at x = 0, -inf for a count
    that is not an integer."""
    from scipy import special, stats

    x = np.concatenate([np.arange(0, 41), [100, 1000, 5000, 1e5]])
    theta = np.float32([1e-6, 1e-3, 0.3, 1.0, 2.5, 9.99, 10.0, 37.0, 1e3, 1e6, 1e8]).astype(np.float64)
    X, T = np.meshgrid(x, theta, indexing="ij")
    want = special.gammaln(X + T) - special.gammaln(T) - special.gammaln(X + 1)
    slope = special.digamma(X + T) - special.digamma(T)

    def total(t):
        return jnp.sum(losses.log_binom_coef(jnp.asarray(X, jnp.float32), t))

    t32 = jnp.asarray(T, jnp.float32)
    got = np.asarray(losses.log_binom_coef(jnp.asarray(X, jnp.float32), t32), np.float64)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(np.asarray(jax.grad(total)(t32), np.float64), slope, rtol=2e-6, atol=2e-6)
    assert np.all(got[0] == 0.0) and np.all(np.asarray(jax.grad(total)(t32))[0] == 0.0)
    # a count that is not an integer has probability 0, as in scipy (not a finite value)
    frac = np.array([0.5, 2.5, 7.25, 30.5])
    assert np.all(np.isneginf(stats.nbinom(n=3.0, p=0.5).logpmf(frac)))
    assert np.all(np.isneginf(np.asarray(losses.log_binom_coef(jnp.asarray(frac, jnp.float32), 3.0))))
    assert np.all(np.isneginf(np.asarray(losses.nb_log_prob(jnp.asarray(frac, jnp.float32), 3.0, 3.0))))
    # per-gene theta broadcast against a cells x genes count matrix: the same entries
    per_gene = losses.log_binom_coef(jnp.asarray(X, jnp.float32), jnp.asarray(theta, jnp.float32))
    np.testing.assert_allclose(np.asarray(per_gene), got, rtol=1e-6, atol=1e-6)


def test_count_likelihoods_finite_values_and_gradients_at_edges():
    """Zero means, zero counts, tiny dispersions, very negative/positive dropout logits:
    no NaN in values or gradients (what a training step sees)."""
    x = jnp.asarray([0.0, 0.0, 3.0, 1000.0])
    mu = jnp.asarray([0.0, 1e-30, 2.0, 1e-3])
    theta = jnp.asarray([1e-8, 5.0, 1e-8, 1e8])
    logits = jnp.asarray([-80.0, 80.0, 0.0, 30.0])

    def total(mu, theta, logits):
        return (
            jnp.sum(losses.zinb_log_prob(x, mu, theta, logits))
            + jnp.sum(losses.nb_log_prob(x, mu, theta))
            + jnp.sum(losses.poisson_log_prob(x, mu))
        )

    value = total(mu, theta, logits)
    grads = jax.grad(total, argnums=(0, 1, 2))(mu, theta, logits)
    assert np.isfinite(float(value))
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    # a zero mean with a zero count is certain under every likelihood
    assert float(losses.nb_log_prob(0.0, 0.0, 2.0)) == 0.0
    assert float(losses.zinb_log_prob(0.0, 0.0, 2.0, -3.0)) == pytest.approx(0.0, abs=1e-6)

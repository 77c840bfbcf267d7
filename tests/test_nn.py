"""nn building blocks and losses against numpy / scipy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxsel import losses
from jaxsel.nn import (
    Block,
    MaskedDense,
    TorchDense,
    concrete_weights,
    continuous_topk,
    gumbel_noise,
    hard_topk,
    khot,
    masked_matmul,
)


def _topk_reference(w, k, t, eps=np.finfo(np.float32).tiny):
    """Xie & Ermon's loop, written plainly in float64."""
    w = np.asarray(w, np.float64)
    onehot = np.zeros_like(w)
    total = np.zeros_like(w)
    for _ in range(k):
        w = w + np.log(np.maximum(1.0 - onehot, eps))
        z = np.exp((w - w.max()) / t)
        onehot = z / z.sum()
        total += onehot
    return total


@pytest.mark.parametrize("t", [3.0, 0.5, 0.05])
def test_continuous_topk_matches_reference_loop(t):
    w = np.random.default_rng(0).normal(size=30).astype(np.float32)
    got = np.asarray(continuous_topk(jnp.asarray(w), 5, t))
    np.testing.assert_allclose(got, _topk_reference(w, 5, t), rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(got.sum(), 5.0, rtol=1e-5)
    assert got.min() >= 0 and got.max() <= 1 + 1e-6


def test_continuous_topk_becomes_hard_topk_at_low_temperature():
    w = jnp.asarray(np.random.default_rng(1).permutation(50).astype(np.float32))
    relaxed = np.asarray(continuous_topk(w, 7, 1e-3))
    hard = np.asarray(khot(hard_topk(w, 7), 50))
    np.testing.assert_allclose(relaxed, hard, atol=1e-5)
    np.testing.assert_array_equal(np.sort(np.asarray(hard_topk(w, 7))), np.sort(np.argsort(-np.asarray(w))[:7]))


def test_continuous_topk_is_differentiable_and_batched():
    w = jnp.asarray(np.random.default_rng(2).normal(size=(3, 20)), jnp.float32)
    out = continuous_topk(w, 4, 0.7)
    np.testing.assert_allclose(np.asarray(out.sum(-1)), 4.0, rtol=1e-5)
    g = jax.grad(lambda w: jnp.sum(continuous_topk(w, 4, 0.7)[:, 0]))(w)
    assert np.all(np.isfinite(np.asarray(g))) and np.abs(np.asarray(g)).sum() > 0


def test_gumbel_noise_distribution():
    g = np.asarray(gumbel_noise(jax.random.key(0), (200_000,)))
    assert np.all(np.isfinite(g))
    # Gumbel(0, 1): mean = Euler-Mascheroni, variance pi^2 / 6.
    np.testing.assert_allclose(g.mean(), np.euler_gamma, atol=0.01)
    np.testing.assert_allclose(g.var(), np.pi**2 / 6, rtol=0.02)
    assert stats.kstest(g[:5000], stats.gumbel_r.cdf).pvalue > 1e-3


def test_concrete_weights_rows_on_simplex():
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(4, 9)), jnp.float32)
    w = np.asarray(concrete_weights(logits, 0.5, jax.random.key(0)))
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    cold = np.asarray(concrete_weights(logits, 1e-4))
    np.testing.assert_array_equal(cold.argmax(-1), np.asarray(logits).argmax(-1))


def test_masked_matmul_gradients_equal_naive_autodiff():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(16, 12)), jnp.float32)
    m = jnp.asarray(rng.uniform(size=12), jnp.float32)
    k = jnp.asarray(rng.normal(size=(12, 5)), jnp.float32)
    c = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
    f_fast = lambda x, m, k: jnp.sum(jnp.tanh(masked_matmul(x, m, k)) * c)  # noqa: E731
    f_naive = lambda x, m, k: jnp.sum(jnp.tanh((x * m) @ k) * c)  # noqa: E731
    np.testing.assert_allclose(f_fast(x, m, k), f_naive(x, m, k), rtol=1e-6)
    for a, b in zip(jax.grad(f_fast, (0, 1, 2))(x, m, k), jax.grad(f_naive, (0, 1, 2))(x, m, k)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_masked_dense_index_path_equals_hard_mask_path():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(8, 20)), jnp.float32)
    layer = MaskedDense(6)
    params = layer.init(jax.random.key(0), x)
    idx = jnp.asarray([3, 7, 11, 19])
    via_idx = layer.apply(params, x, idx=idx)
    via_mask = layer.apply(params, x, mask=khot(idx, 20))
    np.testing.assert_allclose(np.asarray(via_idx), np.asarray(via_mask), rtol=1e-5, atol=1e-6)


def test_torch_parity_initialisation_bounds():
    params = TorchDense(300).init(jax.random.key(0), jnp.ones((1, 400)))["params"]
    bound = 1 / np.sqrt(400)
    for name in ("kernel", "bias"):
        v = np.asarray(params[name])
        assert np.abs(v).max() <= bound and np.abs(v).max() > 0.95 * bound
        np.testing.assert_allclose(v.std(), bound / np.sqrt(3), rtol=0.05)  # uniform(-b, b)


def test_block_batch_norm_train_vs_eval():
    x = jnp.asarray(np.random.default_rng(6).normal(3.0, 2.0, size=(64, 10)), jnp.float32)
    block = Block(7)
    v = block.init(jax.random.key(0), x, False)
    assert "bias" not in v["params"]["TorchDense_0"]  # cancelled by batch norm
    y, upd = block.apply(v, x, True, mutable=["batch_stats"])
    pre = np.asarray(x @ v["params"]["TorchDense_0"]["kernel"])
    np.testing.assert_allclose(np.asarray(upd["batch_stats"]["BatchNorm_0"]["mean"]), 0.1 * pre.mean(0), rtol=1e-4, atol=1e-6)
    assert np.asarray(y).shape == (64, 7)


def test_gaussian_nll_and_kl_against_scipy():
    rng = np.random.default_rng(7)
    x, mu, logvar = (rng.normal(size=(5, 4)).astype(np.float32) for _ in range(3))
    ref = -stats.norm.logpdf(x, mu, np.exp(0.5 * logvar)).sum(-1)
    np.testing.assert_allclose(np.asarray(losses.gaussian_nll(x, mu, logvar)), ref, rtol=1e-5)
    # KL(N(mu, s^2) || N(0, 1)) = 0.5 * (s^2 + mu^2 - 1 - log s^2), summed.
    s2 = np.exp(logvar)
    np.testing.assert_allclose(
        np.asarray(losses.kl_standard_normal(mu, logvar)), (0.5 * (s2 + mu**2 - 1 - logvar)).sum(-1), rtol=1e-5
    )


def test_cross_entropy_and_weighted_mean():
    logits = jnp.asarray([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    labels = jnp.asarray([0, 2])
    p0 = np.exp(2) / (np.exp(2) + 1 + np.exp(-1))
    np.testing.assert_allclose(np.asarray(losses.cross_entropy(logits, labels)), [-np.log(p0), np.log(3)], rtol=1e-6)
    v = jnp.asarray([1.0, 2.0, 100.0])
    assert float(losses.weighted_mean(v, jnp.asarray([1.0, 1.0, 0.0]))) == 1.5
    assert float(losses.weighted_mean(v)) == pytest.approx(103 / 3)

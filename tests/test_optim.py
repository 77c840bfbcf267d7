"""engine.adam and nn.softmax: optax / jax.nn equivalents written to round the same in
every program (see jaxsel.engine.optim)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsel import engine
from jaxsel.nn import softmax


def _quadratic_run(tx, steps=60):
    target = {"w": jnp.linspace(-2.0, 3.0, 12).reshape(3, 4), "b": jnp.array([0.5, -1.5])}
    params = jax.tree.map(jnp.zeros_like, target)
    loss = lambda p: sum(jnp.sum(jnp.square(p[k] - target[k]) * (1.0 + jnp.arange(p[k].size).reshape(p[k].shape)))  # noqa: E731
                         for k in p)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        g = jax.grad(loss)(params)
        upd, state = tx.update(g, state, params)
        return optax.apply_updates(params, upd), state

    path = []
    for _ in range(steps):
        params, state = step(params, state)
        path.append(params)
    return path, float(loss(params))


@pytest.mark.parametrize("lr", [1e-2, optax.exponential_decay(5e-2, 10, 0.7)])
def test_adam_matches_optax(lr):
    ours, l1 = _quadratic_run(engine.adam(lr))
    ref, l2 = _quadratic_run(optax.adam(lr))
    for a, b in zip(ours, ref):
        for k in a:
            np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=2e-5, atol=2e-6)
    assert l1 < 0.9 * _quadratic_run(engine.adam(lr), steps=1)[1]  # it optimises


def test_adam_state_counts_and_custom_betas():
    tx = engine.adam(0.1, b1=0.5, b2=0.9, eps=1e-6)
    p = {"a": jnp.ones(3)}
    s = tx.init(p)
    assert int(s.count) == 0 and float(jnp.sum(s.mu["a"])) == 0.0
    g = {"a": jnp.array([1.0, -2.0, 0.0])}
    upd, s = tx.update(g, s)
    # first step: bias-corrected m = g, v = g^2, so the step is -lr * g / (|g| + eps)
    np.testing.assert_allclose(np.asarray(upd["a"]), [-0.1 / (1 + 1e-6), 0.2 / (2 + 1e-6), 0.0], rtol=1e-6)
    assert int(s.count) == 1


def test_softmax_matches_jax_with_mask_and_gradient():
    x = jax.random.normal(jax.random.key(0), (6, 9)) * 4.0
    mask = jax.random.bernoulli(jax.random.key(1), 0.7, (6, 9)).at[:, 0].set(True)
    np.testing.assert_allclose(np.asarray(softmax(x, axis=1)), np.asarray(jax.nn.softmax(x, axis=1)), rtol=1e-6)
    got = softmax(x, axis=1, where=mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.nn.softmax(x, axis=1, where=mask)), rtol=1e-6, atol=1e-7)
    assert np.all(np.asarray(got)[~np.asarray(mask)] == 0.0)
    np.testing.assert_allclose(np.asarray(got).sum(1), 1.0, rtol=1e-6)
    w = jnp.arange(9.0)
    g1 = jax.grad(lambda x: jnp.sum(softmax(x, axis=1, where=mask) * w))(x)
    g2 = jax.grad(lambda x: jnp.sum(jnp.where(mask, jax.nn.softmax(x, axis=1, where=mask), 0.0) * w))(x)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-5, atol=1e-6)
    # large logits stay finite (the max is subtracted)
    assert np.all(np.isfinite(np.asarray(softmax(jnp.array([[1e4, 0.0, -1e4]]), axis=1))))

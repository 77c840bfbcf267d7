"""Pure loss functions, per cell (reduce with :func:`weighted_mean`).

Every function returns one value per cell so that padded cells (a validation set padded
to a common length across folds) can be masked out by weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "gaussian_nll",
    "kl_standard_normal",
    "cross_entropy",
    "weighted_mean",
]

_LOG_2PI = float(jnp.log(2.0 * jnp.pi))


def gaussian_nll(x, mean, logvar):
    """Negative log-likelihood of ``x`` under N(mean, exp(logvar)), summed over genes.

    ``[n_cells, n_genes] -> [n_cells]``.
    """
    return 0.5 * jnp.sum(_LOG_2PI + logvar + (x - mean) ** 2 * jnp.exp(-logvar), axis=-1)


def kl_standard_normal(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over latent dimensions, ``[n_cells]``."""
    return -0.5 * jnp.sum(1.0 + logvar - mean**2 - jnp.exp(logvar), axis=-1)


def cross_entropy(logits, labels):
    """Softmax cross-entropy with integer labels, ``[n_cells]``."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def weighted_mean(values, weights=None):
    """Mean of ``values`` over cells, with optional 0/1 (or real) cell weights."""
    if weights is None:
        return jnp.mean(values)
    weights = weights.astype(values.dtype)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)

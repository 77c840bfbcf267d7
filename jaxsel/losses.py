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
    "group_lasso",
    "prox_group_lasso",
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


def group_lasso(w, axis: int = -1):
    """Sum over groups of the l2 norm of each group: ``sum_g ||w_g||_2``.

    A group is a slice along every axis except ``axis``'s complement: with the default
    ``axis=-1`` each *row* of a ``[n_genes, n_units]`` kernel is a group (one gene's
    outgoing weights), the penalty of the sparse bottleneck network's first layer and of
    sparse reduced-rank regression. The gradient at a zero row is taken as zero (the
    norm is computed as ``sqrt(max(s, tiny))`` times an indicator), so subgradient
    training never produces NaN.
    """
    sq = jnp.sum(jnp.square(w), axis=axis)
    safe = jnp.sqrt(jnp.where(sq > 0, sq, 1.0))
    return jnp.sum(jnp.where(sq > 0, safe, 0.0))


def prox_group_lasso(w, threshold, axis: int = -1):
    """Proximal operator of ``threshold * group_lasso(w, axis)``: group soft-thresholding.

    Each group ``w_g`` becomes ``max(0, 1 - threshold / ||w_g||) * w_g``; groups with
    norm at most ``threshold`` become exactly zero.
    """
    sq = jnp.sum(jnp.square(w), axis=axis, keepdims=True)
    norm = jnp.sqrt(jnp.where(sq > 0, sq, 1.0))
    scale = jnp.where(sq > 0, jnp.maximum(0.0, 1.0 - threshold / norm), 0.0)
    return w * scale

"""Differentiable gene selectors: Gumbel noise, continuous top-k, concrete selection.

The continuous top-k relaxation is the one of Xie & Ermon (2019), "Reparameterizable
subset sampling via continuous relaxations", which MarkerMap uses: ``k`` successive
softmaxes, each after down-weighting (in log space) the mass already taken, summed into a
relaxed k-hot vector. At zero temperature it becomes the hard top-k indicator.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "gumbel_noise",
    "continuous_topk",
    "hard_topk",
    "khot",
    "concrete_weights",
]

# Smallest positive normal float32. The reference uses 1e-40, a float32 denormal that
# XLA may flush to zero (log(0) = -inf); the normal minimum keeps the same intent.
_TINY = float(jnp.finfo(jnp.float32).tiny)


def gumbel_noise(key, shape, dtype=jnp.float32, eps: float = _TINY):
    """Standard Gumbel samples ``-log(-log(u))`` with ``u`` uniform in ``[eps, 1)``."""
    u = jax.random.uniform(key, shape, dtype, minval=eps, maxval=1.0)
    return -jnp.log(-jnp.log(u))


def continuous_topk(logits, k: int, temperature):
    """Relaxed k-hot vector of Xie & Ermon (2019), eq. 3-5.

    Parameters
    ----------
    logits : [..., n] scores (Gumbel-perturbed log-probabilities in sampling mode).
    k : number of elements in the subset (static).
    temperature : positive scalar; smaller is closer to the hard top-k.

    Returns
    -------
    [..., n] array with entries in [0, 1] summing to ``k`` along the last axis.
    """

    def body(carry, _):
        w, onehot, total = carry
        # khot mask 1 - onehot in log space, floored at the smallest normal float. The
        # floor is applied before the log: flooring after it (max(log1p(-p), c)) gives
        # 0 * inf = NaN gradients once a softmax saturates at p == 1 (low temperature).
        # Below 1, float32 spacing makes 1 - p either 0 or >= 6e-8, so the floor only
        # acts at exact saturation and the gradient 1/(1 - p) stays below ~1.7e7.
        w = w + jnp.log(jnp.maximum(1.0 - onehot, _TINY))
        onehot = jax.nn.softmax(w / temperature, axis=-1)
        return (w, onehot, total + onehot), None

    zeros = jnp.zeros_like(logits)
    (_, _, relaxed), _ = lax.scan(body, (logits, zeros, zeros), None, length=k)
    return relaxed


def hard_topk(scores, k: int):
    """Indices of the ``k`` largest scores (ties: lowest index first), sorted by score."""
    return lax.top_k(scores, k)[1]


def khot(idx, n: int, dtype=jnp.float32):
    """[n] indicator vector of the indices ``idx``."""
    return jnp.zeros((n,), dtype).at[idx].set(1.0)


def concrete_weights(logits, temperature, key=None):
    """Concrete (Gumbel-softmax) selection matrix of Abid et al. (2019).

    Parameters
    ----------
    logits : [k, n_genes] one row of selection logits per selected feature.
    temperature : positive scalar.
    key : PRNG key for Gumbel noise, or None for the noiseless softmax.

    Returns
    -------
    [k, n_genes] rows on the simplex; ``x @ w.T`` is the relaxed selection.
    """
    if key is not None:
        logits = logits + gumbel_noise(key, logits.shape, logits.dtype)
    return jax.nn.softmax(logits / temperature, axis=-1)

"""Graph attention over a fixed-width neighbour table (the stAI spatial encoder).

Spatial kNN graphs have the same number of neighbours per cell, so the graph is held as a
dense ``[n_cells, n_neighbours]`` int table (``jaxsel.preprocessing.spatial_knn_graph``;
column 0 is the cell itself) instead of an edge list: attention is then a gather, a
``[n, k]`` softmax and a weighted sum, with static shapes and no scatter. Padded entries
(fewer neighbours than the table width) are masked with ``-1`` indices.

:class:`GATConv` is the graph attention layer of Velickovic et al. (2018) in the form of
PyTorch Geometric's ``GATConv(d, d, heads=h, concat=False)``, which the stAI authors use:

    h_j = W x_j;   e_ij = LeakyReLU_0.2(a_dst . h_i + a_src . h_j);
    alpha_ij = softmax_j(e_ij) over the neighbours j of i (the cell itself included);
    out_i = mean over heads of sum_j alpha_ij h_j, plus a bias.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .layers import softmax

__all__ = ["GATConv", "gat_attention"]


def gat_attention(h, neighbours, a_src, a_dst, negative_slope: float = 0.2):
    """Attention weights of one head, ``[n, k]``, rows summing to one over valid neighbours.

    ``h`` [n, d] transformed features; ``neighbours`` int [n, k] (``-1`` = padding);
    ``a_src``, ``a_dst`` [d].
    """
    valid = neighbours >= 0
    idx = jnp.where(valid, neighbours, 0)
    s_src = h @ a_src  # [n]
    s_dst = h @ a_dst  # [n]
    e = jax.nn.leaky_relu(s_dst[:, None] + jnp.take(s_src, idx), negative_slope)
    e = jnp.where(valid, e, -jnp.inf)
    return softmax(e, axis=1, where=valid)


class GATConv(nn.Module):
    """One graph attention layer with ``heads`` heads averaged (``concat=False``).

    ``__call__(x [n, d_in], neighbours int [n, k]) -> [n, features]``. Glorot-uniform
    weights and attention vectors, zero bias, as PyTorch Geometric initialises them.
    """

    features: int
    heads: int = 1
    negative_slope: float = 0.2

    @nn.compact
    def __call__(self, x, neighbours):
        glorot = nn.initializers.glorot_uniform()
        w = self.param("kernel", glorot, (x.shape[-1], self.heads * self.features))
        a_src = self.param("att_src", glorot, (self.heads, self.features))
        a_dst = self.param("att_dst", glorot, (self.heads, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        h = (x @ w).reshape(x.shape[0], self.heads, self.features)
        idx = jnp.where(neighbours >= 0, neighbours, 0)

        def one_head(hh, src, dst):
            alpha = gat_attention(hh, neighbours, src, dst, self.negative_slope)
            return jnp.einsum("nk,nkd->nd", alpha, jnp.take(hh, idx, axis=0))

        out = jax.vmap(one_head, in_axes=(1, 0, 0), out_axes=1)(h, a_src, a_dst)
        return jnp.mean(out, axis=1) + bias

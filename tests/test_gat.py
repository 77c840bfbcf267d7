"""Graph attention layer and spatial neighbour table against plain numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsel import preprocessing as pp
from jaxsel.nn.gat import GATConv, gat_attention


def _np_gat(x, nbrs, w, a_src, a_dst, bias, slope=0.2):
    """Velickovic et al. GAT, heads averaged, written as loops over cells and edges."""
    n, heads, f = x.shape[0], a_src.shape[0], a_src.shape[1]
    h = (x.astype(np.float64) @ w).reshape(n, heads, f)
    out = np.zeros((n, f))
    for i in range(n):
        for hd in range(heads):
            js = [j for j in nbrs[i] if j >= 0]
            e = np.array([h[i, hd] @ a_dst[hd] + h[j, hd] @ a_src[hd] for j in js])
            e = np.where(e > 0, e, slope * e)
            alpha = np.exp(e - e.max())
            alpha /= alpha.sum()
            out[i] += sum(a * h[j, hd] for a, j in zip(alpha, js)) / heads
    return out + bias


@pytest.mark.parametrize("heads", [1, 3])
def test_gatconv_matches_numpy_loops(heads):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 5)).astype(np.float32)
    nbrs = pp.spatial_knn_graph(rng.uniform(size=(12, 2)), k=3)
    nbrs[2, 3] = -1  # a padded slot is ignored
    layer = GATConv(features=4, heads=heads)
    params = layer.init(jax.random.key(0), x, nbrs)["params"]
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(1), a.shape), params)  # non-zero bias
    got = np.asarray(layer.apply({"params": params}, x, jnp.asarray(nbrs)))
    p = jax.tree.map(np.asarray, params)
    want = _np_gat(x, nbrs, p["kernel"], p["att_src"], p["att_dst"], p["bias"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_attention_rows_sum_to_one_and_padding_gets_zero():
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    nbrs = jnp.asarray([[0, 1, 2], [1, 0, -1], [2, 3, 4], [3, 2, 5], [4, 5, -1], [5, 4, 3]])
    alpha = np.asarray(gat_attention(h, nbrs, jnp.ones(3), -jnp.ones(3)))
    np.testing.assert_allclose(alpha.sum(1), 1.0, rtol=1e-6)
    assert alpha[1, 2] == 0.0 and alpha[4, 2] == 0.0
    assert np.all(np.isfinite(alpha))


def test_spatial_knn_graph_matches_brute_force():
    rng = np.random.default_rng(2)
    coords = rng.uniform(size=(40, 2))
    coords0 = coords.copy()
    table = pp.spatial_knn_graph(coords, k=5)
    d = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    want = np.argsort(d, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(table[:, 0], np.arange(40))
    np.testing.assert_array_equal(table[:, 1:], want)
    assert table.dtype == np.int32
    np.testing.assert_array_equal(coords, coords0)


def test_spatial_knn_graph_duplicates_and_errors():
    coords = np.zeros((6, 2))
    coords[3:] = 1.0
    table = pp.spatial_knn_graph(coords, k=2)
    np.testing.assert_array_equal(table[:, 0], np.arange(6))
    for i, row in enumerate(table):
        assert i not in row[1:] and len(set(row)) == 3
    with pytest.raises(ValueError, match="k"):
        pp.spatial_knn_graph(coords, k=6)
    with pytest.raises(ValueError, match="NaN"):
        pp.spatial_knn_graph(np.array([[0.0, np.nan], [1.0, 1.0], [2.0, 2.0]]), k=1)

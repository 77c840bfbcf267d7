"""stAI core (work in progress): imputation weights, calibration submodels, recovery."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsel import datasets
from jaxsel import preprocessing as pp
from jaxsel.methods import stai

K = 3


@pytest.fixture(scope="module")
def problem():
    x, y, info = datasets.make_markers(n_cells=400, n_genes=30, n_types=3, n_markers_per_type=4, n_xor_genes=0,
                                       random_state=0)
    xl = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    xs = (xl - xl.mean(0)) / xl.std(0)
    rng = np.random.default_rng(0)
    sp = np.arange(400) % 2 == 0
    coords = rng.normal(size=(400, 2)) + 4 * np.stack([np.cos(y), np.sin(y)], 1)
    held = info["marker_genes"][0]
    shared = np.setdiff1d(np.arange(30), [held])
    data = stai.StAIData(
        jnp.asarray(xs[sp][:, shared], jnp.float32),
        jnp.asarray(pp.spatial_knn_graph(coords[sp], k=10)),
        jnp.asarray(xs[~sp][:, shared], jnp.float32),
        jnp.asarray(xl[~sp][:, shared], jnp.float32),
        jnp.asarray(y[~sp], jnp.int32),
    )
    fold = np.arange(len(shared)) % K
    rng.shuffle(fold)
    cal = np.stack([(fold == j).astype(np.float32) for j in range(K)])
    cfg = stai.StAIConfig(n_genes=len(shared), n_classes=3, epochs=120)
    keys = jax.random.split(jax.random.key(0), K)
    params, hist = stai.fit_submodels(cfg, keys, data, jnp.asarray(1 - cal), jnp.asarray(cal))
    return dict(cfg=cfg, data=data, cal=cal, keys=keys, params=params, hist=hist, xl=xl, sp=sp, held=held, y=y)


def test_attention_weights_rows_sum_to_one_over_top_k():
    rng = np.random.default_rng(1)
    zq = jnp.asarray(rng.normal(size=(7, 4)), jnp.float32)
    zr = jnp.asarray(rng.normal(size=(60, 4)), jnp.float32)
    w = np.asarray(stai.attention_weights(zq, zr, 10))
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-6)
    assert np.all((w > 0).sum(1) == 10)
    d = np.linalg.norm(np.asarray(zq)[:, None] - np.asarray(zr)[None], axis=-1)
    for i in range(7):
        near = np.argsort(d[i])[:10]
        e = np.exp(-d[i, near] + d[i, near].min())
        np.testing.assert_allclose(w[i, near], e / e.sum(), rtol=1e-4)


def test_submodels_impute_a_held_out_marker_and_annotate(problem):
    p = problem
    vals = jnp.asarray(p["xl"][~p["sp"]][:, [p["held"]]], jnp.float32)
    imps = []
    for j in range(K):
        pj = jax.tree.map(lambda a: a[j], p["params"])
        full = np.asarray(stai.impute(p["cfg"], pj, p["data"], jnp.asarray(1 - p["cal"][j]), vals))
        chunked = np.asarray(stai.impute(p["cfg"], pj, p["data"], jnp.asarray(1 - p["cal"][j]), vals, chunk=37))
        np.testing.assert_allclose(chunked, full, rtol=1e-5, atol=1e-6)
        imps.append(full)
    imp = np.mean(imps, 0)[:, 0]
    assert np.corrcoef(imp, p["xl"][p["sp"]][:, p["held"]])[0, 1] > 0.6
    # the training loss fell and the calibration-gene Pearson loss improved in every submodel
    h = {k: np.asarray(v) for k, v in p["hist"].items()}
    assert np.all(h["loss"][:, -1] < 0.5 * h["loss"][:, 0])
    assert np.all(h["impute"][:, -1] < h["impute"][:, 0])
    prob = np.asarray(stai.annotate(p["cfg"], jax.tree.map(lambda a: a[0], p["params"]), p["data"],
                                    jnp.asarray(1 - p["cal"][0])))
    np.testing.assert_allclose(prob.sum(1), 1.0, rtol=1e-5)
    assert (prob.argmax(1) == p["y"][p["sp"]]).mean() > 0.8


def test_vmapped_submodels_equal_looped(problem):
    # Equal up to float rounding: XLA:CPU rounds the batched program's reductions
    # differently and the top-k neighbour choice amplifies that over 120 Adam steps, so
    # the check is on the first epochs exactly-ish and on the final imputation closely.
    p = problem
    one = jax.jit(stai._fit_one)
    vals = jnp.asarray(p["xl"][~p["sp"]][:, [p["held"]]], jnp.float32)
    for j in range(K):
        fit = jnp.asarray(1 - p["cal"][j])
        params, hist = one(p["cfg"], p["keys"][j], p["data"], fit, jnp.asarray(p["cal"][j]))
        loss_loop, loss_vm = np.asarray(hist["loss"]), np.asarray(p["hist"]["loss"])[j]
        np.testing.assert_allclose(loss_loop[:20], loss_vm[:20], rtol=1e-5)
        np.testing.assert_allclose(loss_loop, loss_vm, rtol=5e-3)
        a = np.asarray(stai.impute(p["cfg"], params, p["data"], fit, vals))[:, 0]
        b = np.asarray(stai.impute(p["cfg"], jax.tree.map(lambda t: t[j], p["params"]), p["data"], fit, vals))[:, 0]
        assert np.corrcoef(a, b)[0, 1] > 0.999

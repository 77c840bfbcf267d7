"""stAI: imputation weights, losses against numpy, submodels as one program, estimator."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp
from scipy.spatial.distance import jensenshannon

import jaxsel
from jaxsel import datasets, metrics
from jaxsel import preprocessing as pp
from jaxsel.methods import baselines, stai

K = 3


@pytest.fixture(scope="module")
def problem():
    x, y, info = datasets.make_markers(n_cells=400, n_genes=30, n_types=3, n_markers_per_type=4, n_xor_genes=0,
                                       random_state=0)
    xl = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    xs = (xl - xl.mean(0)) / xl.std(0)
    rng = np.random.default_rng(0)
    sp_ = np.arange(400) % 2 == 0
    coords = rng.normal(size=(400, 2)) + 4 * np.stack([np.cos(y), np.sin(y)], 1)
    held = info["marker_genes"][0]
    shared = np.setdiff1d(np.arange(30), [held])
    data = stai.StAIData(
        jnp.asarray(xs[sp_][:, shared], jnp.float32),
        jnp.asarray(pp.spatial_knn_graph(coords[sp_], k=10)),
        jnp.asarray(xs[~sp_][:, shared], jnp.float32),
        jnp.asarray(y[~sp_], jnp.int32),
        jnp.ones(3, jnp.float32),
    )
    fold = np.arange(len(shared)) % K
    rng.shuffle(fold)
    cal = np.stack([(fold == j).astype(np.float32) for j in range(K)])
    cfg = stai.StAIConfig(n_genes=len(shared), n_classes=3, epochs=120)
    keys = jax.random.split(jax.random.key(0), K)
    params, hist = stai.fit(cfg, keys, data, jnp.asarray(1 - cal), jnp.asarray(cal))
    vals = jnp.asarray(xl[~sp_][:, [held]], jnp.float32)
    return dict(cfg=cfg, data=data, cal=cal, keys=keys, params=params, hist=hist, xl=xl, sp=sp_, held=held, y=y,
                vals=vals)


# ------------------------------------------------------------------ imputation weights


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


def test_topk_gradient_equals_dense_masked_softmax_gradient():
    """The gathered top-k form has the gradient of a dense softmax restricted to the same
    neighbours (the released code's scatter form)."""
    rng = np.random.default_rng(2)
    zq = jnp.asarray(rng.normal(size=(9, 3)), jnp.float32)
    zr = jnp.asarray(rng.normal(size=(40, 3)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(40, 2)), jnp.float32)
    net = stai.StAIConfig(n_genes=3, n_classes=2).net
    _, idx = stai.topk_attention(zq, zr, 8)
    mask = jnp.zeros((9, 40), bool).at[jnp.arange(9)[:, None], idx].set(True)

    def dense(a, b):
        d = jnp.sqrt(jnp.sum((a[:, None] - b[None]) ** 2, -1))
        w = jax.nn.softmax(jnp.where(mask, -d, -jnp.inf), axis=1)
        return jnp.sum(jnp.sin(w @ v))

    def gathered(a, b):
        return jnp.sum(jnp.sin(stai._weighted_values(net, None, a, b, v, 8)))

    assert float(gathered(zq, zr)) == pytest.approx(float(dense(zq, zr)), rel=1e-5)
    for ga, gb in zip(jax.grad(gathered, (0, 1))(zq, zr), jax.grad(dense, (0, 1))(zq, zr)):
        np.testing.assert_allclose(np.asarray(ga), np.asarray(gb), rtol=1e-4, atol=1e-6)


def test_dot_attention_rows_sum_to_one_and_chunking_is_exact():
    rng = np.random.default_rng(3)
    cfg = stai.StAIConfig(n_genes=6, n_classes=2, attention="dot", epochs=2)
    x1 = jnp.asarray(rng.normal(size=(30, 6)), jnp.float32)
    data = stai.StAIData(x1, jnp.asarray(pp.spatial_knn_graph(rng.normal(size=(30, 2)), 4)),
                         jnp.asarray(rng.normal(size=(25, 6)), jnp.float32), jnp.zeros(25, jnp.int32), jnp.ones(2))
    params = stai.init_params(cfg, jax.random.key(0), data)
    assert "query" in params and "key" in params
    ones = jnp.ones((25, 1))
    stacked = jax.tree.map(lambda a: a[None], params)
    out = np.asarray(stai.impute(cfg, stacked, data, jnp.ones((1, 6)), ones))
    np.testing.assert_allclose(out, 1.0, rtol=1e-5)  # weights sum to one per spatial cell
    vals = jnp.asarray(rng.normal(size=(25, 3)), jnp.float32)
    full = np.asarray(stai.impute(cfg, stacked, data, jnp.ones((1, 6)), vals))
    chunked = np.asarray(stai.impute(cfg, stacked, data, jnp.ones((1, 6)), vals, chunk=7))
    np.testing.assert_allclose(chunked, full, rtol=1e-5, atol=1e-6)


def test_config_rejects_unknown_choices():
    with pytest.raises(ValueError, match="attention"):
        stai.StAIConfig(n_genes=3, n_classes=2, attention="cosine")
    with pytest.raises(ValueError, match="gene_loss"):
        stai.StAIConfig(n_genes=3, n_classes=2, gene_loss="l1")
    ann = stai.StAIConfig.annotation(5, 3)
    assert (ann.epochs, ann.lam_clf, ann.lam_impute, ann.lam_gene) == (300, 10.0, 2.0, 1.0)


# ------------------------------------------------------------------ losses against numpy


def _np_corr(a, b):
    ac, bc = a - a.mean(0), b - b.mean(0)
    return (ac.T @ bc) / np.sqrt((ac * ac).sum(0)[:, None] * (bc * bc).sum(0)[None, :])


@pytest.mark.parametrize("kind", ["cosine", "frobenius"])
def test_gene_consistence_matches_numpy(kind):
    rng = np.random.default_rng(4)
    x1, p1, x2 = rng.normal(size=(50, 8)), rng.normal(size=(50, 8)), rng.normal(size=(60, 8))
    x1[:, 5:] += 0.5 * p1[:, 5:]
    fit = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
    cal = 1 - fit
    fi, ci = np.flatnonzero(fit), np.flatnonzero(cal)
    c1 = _np_corr(x1[:, fi], p1[:, ci])
    c2 = _np_corr(x2[:, fi], x2[:, ci])
    if kind == "cosine":
        want = 1 - np.mean((c1 * c2).sum(0) / np.sqrt((c1**2).sum(0) * (c2**2).sum(0)))
    else:
        want = np.mean((c1 - c2) ** 2)
    got = stai.gene_consistence(*(jnp.asarray(a, jnp.float32) for a in (x1 * fit, p1, x2)),
                                jnp.asarray(fit), jnp.asarray(cal), kind)
    assert float(got) == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_class_weights_follow_inverse_count_power():
    w = np.asarray(stai.class_weights(jnp.array([0, 0, 0, 1, 2, 2]), 4, power=2.0))
    raw = np.array([1 / 9, 1.0, 1 / 4])
    np.testing.assert_allclose(w[:3], raw / raw.mean(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(stai.class_weights(jnp.array([0, 1, 1]), 2)), 1.0)
    # label 4 = unlabeled: not counted, one more weight, 0
    u = np.asarray(stai.class_weights(jnp.array([0, 0, 0, 1, 2, 2, 4, 4]), 4, power=2.0, unlabeled=True))
    assert u.shape == (5,) and u[4] == 0.0
    np.testing.assert_array_equal(u[:4], w)


def test_imputation_scores_match_scipy():
    rng = np.random.default_rng(5)
    t = rng.gamma(2.0, size=(80, 4))
    p = t + rng.normal(scale=0.5, size=t.shape)
    s = metrics.imputation_scores(t, p)
    for j in range(4):
        assert s["pcc"][j] == pytest.approx(np.corrcoef(t[:, j], p[:, j])[0, 1], rel=1e-10)
        pc = np.clip(p[:, j], 0, None)
        assert s["jsd"][j] == pytest.approx(jensenshannon(t[:, j] / t[:, j].sum(), pc / pc.sum(), base=2) ** 2,
                                            rel=1e-8)
        z = lambda a: (a - a.mean()) / a.std()  # noqa: E731
        assert s["rmse"][j] == pytest.approx(np.sqrt(np.mean((z(t[:, j]) - z(p[:, j])) ** 2)), rel=1e-10)
    same = metrics.imputation_scores(t, 3 * t + 1)
    np.testing.assert_allclose(same["pcc"], 1.0)
    np.testing.assert_allclose(same["rmse"], 0.0, atol=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        metrics.imputation_scores(t, p[:, :2])


def test_annotation_scores_match_sklearn():
    from sklearn.metrics import f1_score

    t = np.array(["a", "a", "b", "c", "c", "c"])
    p = np.array(["a", "b", "b", "c", "a", "c"])
    s = metrics.annotation_scores(t, p)
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["macro_f1"] == pytest.approx(f1_score(t, p, average="macro"))
    assert s["weighted_f1"] == pytest.approx(f1_score(t, p, average="weighted"))


def test_knn_pca_baseline_matches_sklearn():
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(6)
    x1, x2 = rng.normal(size=(40, 12)), rng.normal(size=(70, 12))
    vals = rng.normal(size=(70, 3))
    pca = PCA(5, svd_solver="full").fit(np.concatenate([x1, x2]))
    _, idx = NearestNeighbors(n_neighbors=6).fit(pca.transform(x2)).kneighbors(pca.transform(x1))
    want = vals[idx].mean(1)
    got = np.asarray(baselines.knn_pca_impute(x1, x2, vals, n_components=5, n_neighbors=6, chunk=16))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ submodels


def test_submodels_impute_a_held_out_marker_and_annotate(problem):
    p = problem
    fm = jnp.asarray(1 - p["cal"])
    sub = np.asarray(stai.impute(p["cfg"], p["params"], p["data"], fm, p["vals"]))
    chunked = np.asarray(stai.impute(p["cfg"], p["params"], p["data"], fm, p["vals"], chunk=37, batch_size=1))
    np.testing.assert_allclose(chunked, sub, rtol=1e-5, atol=1e-6)
    imp = sub.mean(0)[:, 0]
    assert np.corrcoef(imp, p["xl"][p["sp"]][:, p["held"]])[0, 1] > 0.6
    # the training loss fell and the calibration-gene Pearson loss improved in every submodel
    h = {k: np.asarray(v) for k, v in p["hist"].items()}
    assert np.all(h["loss"][:, -1] < 0.5 * h["loss"][:, 0])
    assert np.all(h["impute"][:, -1] < h["impute"][:, 0])
    prob = np.asarray(stai.annotate(p["cfg"], p["params"], p["data"], fm))
    np.testing.assert_allclose(prob.sum(-1), 1.0, rtol=1e-5)
    assert (prob.mean(0).argmax(1) == p["y"][p["sp"]]).mean() > 0.8


def test_vmapped_submodels_equal_looped(problem):
    # Equal up to float rounding: XLA:CPU rounds the batched program's reductions
    # differently and the top-k neighbour choice amplifies that over 120 Adam steps, so
    # the check is on the first epochs closely and on the final imputation.
    p = problem
    one = jax.jit(stai._fit_one)
    for j in range(K):
        fit = jnp.asarray(1 - p["cal"][j])
        params, hist = one(p["cfg"], p["keys"][j], p["data"], fit, jnp.asarray(p["cal"][j]))
        loss_loop, loss_vm = np.asarray(hist["loss"]), np.asarray(p["hist"]["loss"])[j]
        np.testing.assert_allclose(loss_loop[:20], loss_vm[:20], rtol=1e-5)
        np.testing.assert_allclose(loss_loop, loss_vm, rtol=5e-3)
        a = np.asarray(stai.impute(p["cfg"], jax.tree.map(lambda t: t[None], params), p["data"], fit[None],
                                   p["vals"]))[0, :, 0]
        b = np.asarray(stai.impute(p["cfg"], jax.tree.map(lambda t: t[j : j + 1], p["params"]), p["data"],
                                   fit[None], p["vals"]))[0, :, 0]
        assert np.corrcoef(a, b)[0, 1] > 0.999


def test_held_out_folds_select_their_spatial_input(problem):
    """A model given a stack of spatial inputs and an index trains on that input: the
    same as fitting it on that input alone."""
    p = problem
    cfg = dataclasses.replace(p["cfg"], epochs=5)
    d = p["data"]
    other = d.x1[::-1] * 0.5
    stacked = d._replace(x1=jnp.stack([other, d.x1]))
    fm, cm = jnp.asarray(1 - p["cal"][:2]), jnp.asarray(p["cal"][:2])
    _, h_idx = stai.fit(cfg, p["keys"][:2], stacked, fm, cm, jnp.array([1, 0], jnp.int32))
    _, h_a = stai.fit(cfg, p["keys"][:1], d, fm[:1], cm[:1])
    _, h_b = stai.fit(cfg, p["keys"][1:2], d._replace(x1=other), fm[1:2], cm[1:2])
    np.testing.assert_allclose(np.asarray(h_idx["loss"][0]), np.asarray(h_a["loss"][0]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(h_idx["loss"][1]), np.asarray(h_b["loss"][0]), rtol=1e-5)


# ------------------------------------------------------------------ estimator


@pytest.fixture(scope="module")
def pair():
    return datasets.make_spatial_pair(n_spatial=300, n_ref=300, n_genes=36, n_measured=18, n_types=4, random_state=1)


def _fit_kwargs(a, b):
    return dict(coords=a.obsm["spatial"], spatial_genes=a.var_names, ref_genes=b.var_names)


@pytest.fixture(scope="module")
def fitted(pair):
    a, b, t = pair
    x_sp, x_ref = a.X.copy(), b.X.copy()
    est = jaxsel.StAI(n_calibration_folds=3, epochs=150, random_state=0)
    est.fit(x_sp, x_ref, np.asarray(b.obs["cell_type"]), **_fit_kwargs(a, b))
    assert np.array_equal(x_sp, a.X) and np.array_equal(x_ref, b.X)  # inputs untouched
    return est


def test_estimator_imputes_unmeasured_genes_better_than_knn(pair, fitted):
    a, b, t = pair
    est = fitted
    assert list(est.imputable_genes_) == list(t.var_names)
    assert sorted(np.concatenate(est.calibration_genes_)) == sorted(est.shared_genes_)
    mean, sd = est.impute(return_std=True)
    sub = est.impute_submodels()
    np.testing.assert_allclose(mean, sub.mean(0), rtol=1e-6)
    assert sd.shape == mean.shape and np.all(sd >= 0) and sd.mean() > 0
    truth = np.log1p(t.X / a.X.sum(1, keepdims=True) * 1e4)
    pcc = np.median(metrics.imputation_scores(truth, mean)["pcc"])
    x1 = pp.scale(pp.log_normalize(a.X))[0]
    reflog = pp.log_normalize(b.X)
    shared_idx = [list(b.var_names).index(g) for g in est.shared_genes_]
    knn = np.asarray(baselines.knn_pca_impute(x1, pp.scale(reflog[:, shared_idx])[0],
                                              reflog[:, [list(b.var_names).index(g) for g in t.var_names]]))
    knn_pcc = np.median(metrics.imputation_scores(truth, knn)["pcc"])
    assert pcc > 0.25 and pcc > knn_pcc - 0.02
    one = est.impute([t.var_names[3]])
    np.testing.assert_allclose(one[:, 0], mean[:, 3], rtol=1e-5, atol=1e-6)


def test_estimator_annotates_spatial_cells(pair, fitted):
    a, _, _ = pair
    labels, prob = fitted.annotate(return_proba=True)
    assert set(labels) <= set(fitted.classes_)
    np.testing.assert_allclose(prob.sum(1), 1.0, rtol=1e-5)
    s = fitted.score_annotation(np.asarray(a.obs["cell_type"]))
    assert s["accuracy"] > 0.7 and s["macro_f1"] > 0.6
    y = np.asarray(a.obs["cell_type"]).astype(object)
    y[:5] = "NA"
    with pytest.raises(ValueError, match="absent from the reference"):
        fitted.score_annotation(y)
    assert fitted.score_annotation(y, unknown="ignore")["accuracy"] > 0.7
    z1, z2 = fitted.embed()
    assert z1.shape == (3, 300, 16) and z2.shape == (3, 300, 16)


def test_classification_term_ignores_unlabeled_reference_cells(problem):
    """Label ``n_classes`` with class weight 0 (an unlabeled cell): the cross-entropy term
    equals numpy's weighted mean over the labelled cells alone; the other terms do not
    change."""
    cfg, data = problem["cfg"], problem["data"]
    p = jax.tree.map(lambda v: v[0], problem["params"])
    fm, cm = jnp.asarray(1 - problem["cal"][0]), jnp.asarray(problem["cal"][0])
    labels = np.asarray(data.labels).copy()
    unl = np.arange(labels.size) % 4 == 0
    labels[unl] = 3
    w = np.array([0.5, 1.0, 2.0, 0.0], np.float32)
    d2 = data._replace(labels=jnp.asarray(labels, jnp.int32), class_weights=jnp.asarray(w))
    _, terms = stai.loss_fn(cfg, p, d2, fm, cm)
    _, ref_terms = stai.loss_fn(cfg, p, data, fm, cm)
    out = cfg.net.apply({"params": p}, data.x1 * fm, data.neighbours, data.x2 * fm)
    logits = np.asarray(out["logits2"], np.float64)[~unl]
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    y = labels[~unl]
    ce = -logp[np.arange(y.size), y]
    np.testing.assert_allclose(float(terms["clf"]), np.sum(ce * w[y]) / np.sum(w[y]), rtol=1e-5)
    for k in ("recon", "mmd", "cos", "impute", "gene"):
        assert float(terms[k]) == float(ref_terms[k])
    g = jax.grad(lambda q: stai.loss_fn(cfg, q, d2, fm, cm)[0])(p)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(g))


def test_unlabeled_category_is_not_a_class(pair):
    a, b, _ = pair
    y = np.asarray(b.obs["cell_type"]).astype(object)
    y[np.random.default_rng(0).random(y.size) < 0.3] = "NA"
    y_before = y.copy()
    kw = _fit_kwargs(a, b)
    est = jaxsel.StAI(n_calibration_folds=3, epochs=150, random_state=0, unlabeled_category="NA")
    est.fit(a.X, b.X, y, **kw)
    assert np.array_equal(y, y_before)
    types = sorted(set(np.asarray(b.obs["cell_type"]).tolist()))
    assert list(est.classes_) == types and "NA" not in est.annotate()
    assert est.predict_proba().shape == (300, len(types))
    truth = np.asarray(a.obs["cell_type"]).astype(object)
    s = est.score_annotation(truth)
    assert s["accuracy"] > 0.7 and s["macro_f1"] > 0.6
    truth[:7] = "NA"  # no type to score: left out, not an error
    pred = est.annotate()
    assert est.score_annotation(truth) == metrics.annotation_scores(truth[7:], pred[7:])
    # without it, "NA" is one more class
    plain = jaxsel.StAI(n_calibration_folds=3, epochs=2).fit(a.X, b.X, y, **kw)
    assert "NA" in list(plain.classes_)
    # a value no label has changes nothing, bit for bit
    absent = jaxsel.StAI(n_calibration_folds=3, epochs=2, unlabeled_category="Unknown").fit(a.X, b.X, y, **kw)
    assert all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(plain.params_), jax.tree.leaves(absent.params_)))
    with pytest.raises(TypeError, match="unlabeled_category"):
        jaxsel.StAI(epochs=2, unlabeled_category=["NA"]).fit(a.X, b.X, y, **kw)
    with pytest.raises(ValueError, match="unlabeled_category cannot be NaN"):
        jaxsel.StAI(epochs=2, unlabeled_category=float("nan")).fit(a.X, b.X, y, **kw)
    missing = y.copy()
    missing[3] = None
    with pytest.raises(ValueError, match="missing label.*unlabeled_category"):
        jaxsel.StAI(epochs=2).fit(a.X, b.X, missing, **kw)
    one = np.where(np.asarray(b.obs["cell_type"]) == types[0], types[0], "NA")
    with pytest.raises(ValueError, match="besides unlabeled_category"):
        jaxsel.StAI(epochs=2, unlabeled_category="NA").fit(a.X, b.X, one, **kw)


def test_cross_validate_genes_holds_out_every_gene_once(pair):
    a, b, _ = pair
    est = jaxsel.StAI(n_calibration_folds=3, epochs=40, random_state=0)
    r = est.cross_validate_genes(a.X, b.X, np.asarray(b.obs["cell_type"]), gene_folds=3, **_fit_kwargs(a, b))
    assert sorted(np.bincount(r.fold_of_gene).tolist()) == [6, 6, 6]
    assert r.imputed.shape == r.truth.shape == (300, 18)
    assert r.history["loss"].shape == (3, 3, 40)
    assert np.all(np.isfinite(r.history["loss"]))
    m = r.medians()
    assert m["pcc"] > 0.2 and 0 <= m["jsd"] <= 1
    assert not hasattr(est, "params_")  # the estimator itself is not fitted
    named = est.cross_validate_genes(a.X, b.X, None, gene_folds=[list(a.var_names[:2])], **_fit_kwargs(a, b))
    assert set(np.flatnonzero(named.fold_of_gene == 0)) >= {0, 1}


def test_estimator_input_errors(pair):
    a, b, _ = pair
    kw = _fit_kwargs(a, b)
    est = jaxsel.StAI(n_calibration_folds=3, epochs=2)
    y = np.asarray(b.obs["cell_type"])
    with pytest.raises(TypeError, match="spatial_genes is required"):
        est.fit(a.X, b.X, y, coords=kw["coords"], spatial_genes=None, ref_genes=kw["ref_genes"])
    with pytest.raises(ValueError, match="duplicate"):
        est.fit(a.X, b.X, y, coords=kw["coords"], spatial_genes=["g"] * a.n_vars, ref_genes=kw["ref_genes"])
    with pytest.raises(ValueError, match="one name per column"):
        est.fit(a.X, b.X, y, coords=kw["coords"], spatial_genes=a.var_names[:-1], ref_genes=kw["ref_genes"])
    with pytest.raises(ValueError, match=r"only 0 of the 18 spatial genes"):
        est.fit(a.X, b.X, y, coords=kw["coords"], spatial_genes=[g.upper() for g in a.var_names],
                ref_genes=kw["ref_genes"])
    with pytest.raises(ValueError, match="coords are required"):
        est.fit(a.X, b.X, y, coords=None, spatial_genes=kw["spatial_genes"], ref_genes=kw["ref_genes"])
    with pytest.raises(ValueError, match="one row per spatial cell"):
        est.fit(a.X, b.X, y, **{**kw, "coords": kw["coords"][:-1]})
    bad = kw["coords"].copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="coords"):
        est.fit(a.X, b.X, y, **{**kw, "coords": bad})
    nan_x = a.X.copy()
    nan_x[0, 0] = np.nan
    with pytest.raises(ValueError, match="X_spatial"):
        est.fit(nan_x, b.X, y, **kw)
    neg = b.X.copy()
    neg[0, 0] = -1
    with pytest.raises(ValueError, match="X_ref must be non-negative"):
        est.fit(a.X, neg, y, **kw)
    with pytest.raises(ValueError, match="labels"):
        est.fit(a.X, b.X, y[:-1], **kw)
    with pytest.raises(ValueError, match="labels are required"):
        jaxsel.StAI(task="annotate", epochs=2).fit(a.X, b.X, None, **kw)
    with pytest.raises(ValueError, match="genes not in the reference"):
        est.fit(a.X, b.X, y, genes=["nope"], **kw)
    with pytest.raises(ValueError, match="task"):
        jaxsel.StAI(task="impute_all").fit(a.X, b.X, y, **kw)
    with pytest.raises(ValueError, match="loss_weights keys"):
        jaxsel.StAI(loss_weights={"kl": 1.0}).fit(a.X, b.X, y, **kw)
    with pytest.raises(ValueError, match="batch_size"):
        jaxsel.StAI(batch_size="fast", epochs=2).fit(a.X, b.X, y, **kw)
    with pytest.raises(ValueError, match="batch_size"):
        jaxsel.StAI(batch_size=0, epochs=2).fit(a.X, b.X, y, **kw)


def test_estimator_accepts_sparse_input_and_keeps_requested_genes(pair):
    a, b, t = pair
    est = jaxsel.StAI(n_calibration_folds=3, epochs=3)
    genes = list(t.var_names[:2])
    est.fit(sp.csr_matrix(a.X), sp.csc_matrix(b.X), None, genes=genes, **_fit_kwargs(a, b))
    assert est.impute().shape == (300, 2)
    assert est.history_["clf"].max() == 0 or est.cfg_.lam_clf == 0.0
    with pytest.raises(ValueError, match="not kept at fit time"):
        est.impute([t.var_names[5]])
    with pytest.raises(ValueError, match="reference labels"):
        est.annotate()


def test_tl_stai_returns_imputed_anndata_and_writes_only_when_asked(pair):
    a, b, t = pair
    a2 = a.copy()
    out = jaxsel.tl.stai(a2, b, "cell_type", genes=list(t.var_names[:4]), n_calibration_folds=3, epochs=3)
    assert out.shape == (300, 4) and list(out.var_names) == list(t.var_names[:4])
    assert list(out.obs_names) == list(a.obs_names) and "std" in out.layers
    assert list(a2.obs.columns) == list(a.obs.columns)  # nothing written without annotate
    jaxsel.tl.stai(a2, b, "cell_type", genes=list(t.var_names[:4]), n_calibration_folds=3, epochs=3,
                   annotate=True)
    assert "stai" in a2.obs and a2.obsm["stai_proba"].shape == (300, 4)
    with pytest.raises(KeyError, match="spatial_key"):
        jaxsel.tl.stai(a2, b, "cell_type", spatial_key="xy")
    with pytest.raises(ValueError, match="labels_key is required"):
        jaxsel.tl.stai(a2, b, None, annotate=True)


def test_cross_validate_genes_rejects_bad_folds(pair):
    a, b, _ = pair
    est = jaxsel.StAI(n_calibration_folds=3, epochs=2)
    kw = _fit_kwargs(a, b)
    g = list(a.var_names)
    with pytest.raises(ValueError, match="disjoint"):
        est.cross_validate_genes(a.X, b.X, None, gene_folds=[g[:2], g[1:3]], **kw)
    with pytest.raises(ValueError, match="between 2 and"):
        est.cross_validate_genes(a.X, b.X, None, gene_folds=1, **kw)
    with pytest.raises(TypeError, match="gene_folds"):
        est.cross_validate_genes(a.X, b.X, None, gene_folds=True, **kw)
    with pytest.raises(ValueError, match="not shared"):
        est.cross_validate_genes(a.X, b.X, None, gene_folds=[["nope"]], **kw)


def test_stai_recipe_normalises_spatial_over_its_genes_and_scales_both(pair):
    a, b, _ = pair
    ref_log = pp.log_normalize(b.X)[:, :5]
    x1, x2 = pp.stai_recipe(a.X[:, :5], ref_log)
    want1 = np.log1p(a.X[:, :5] / a.X[:, :5].sum(1, keepdims=True) * 1e4)
    want1 = (want1 - want1.mean(0)) / want1.std(0, ddof=1)
    np.testing.assert_allclose(x1, np.clip(want1, -10, 10), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(x2.mean(0), 0.0, atol=1e-5)
    with pytest.raises(ValueError, match="same genes"):
        pp.stai_recipe(a.X[:, :5], ref_log[:, :4])

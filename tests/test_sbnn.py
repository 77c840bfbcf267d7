"""Sparse bottleneck network: planted-gene recovery, pruning, freezing, R^2, folds."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsel
from jaxsel import datasets, engine, metrics, preprocessing
from jaxsel.methods import sbnn

N_CELLS, N_GENES, N_OUT, N_INF = 400, 60, 6, 5


@pytest.fixture(scope="module")
def paired():
    x, y, info = datasets.make_paired(
        n_cells=N_CELLS, n_genes=N_GENES, n_outputs=N_OUT, n_informative=N_INF, random_state=1
    )
    return x, y, info


def small_cfg(**kw):
    base = dict(
        n_selected=N_INF,
        hidden=(32, 16),
        learning_rate=3e-3,
        lasso=0.03,
        n_clusters=5,
        pretrain_epochs=5,
        frozen_epochs=5,
        unfrozen_epochs=40,
        finetune_epochs=10,
        ae_epochs=5,
    )
    base.update(kw)
    return sbnn.SparseBottleneckConfig.create(N_GENES, N_OUT, **base)


@pytest.fixture(scope="module")
def cv_setup(paired):
    x, y, _ = paired
    folds = preprocessing.kfold_indices(N_CELLS, 3, random_state=0)
    train_sets = [f[0] for f in folds]
    splits = engine.make_splits(train_sets, [f[2] for f in folds])
    clusters, pre_tr, pre_va = preprocessing.pretraining_clusters(y, train_sets, n_clusters=5, random_state=0)
    pre = engine.make_splits(pre_tr, pre_va)
    keys = engine.fold_keys(jax.random.key(3), 3)
    return folds, splits, np.maximum(clusters, 0), pre, keys


@pytest.fixture(scope="module")
def folded(paired, cv_setup):
    x, y, _ = paired
    _, splits, clusters, pre, keys = cv_setup
    cfg = small_cfg()
    res = sbnn.fit_folds(cfg, keys, sbnn.make_data(x, y), splits, clusters, pre, mesh=None)
    return cfg, jax.device_get(res)


def test_folds_recover_planted_genes_and_prune_to_exactly_n(paired, folded):
    _, _, info = paired
    cfg, res = folded
    genes = np.asarray(res.genes)
    assert genes.shape == (3, N_INF)
    for g in genes:
        assert len(set(g.tolist())) == N_INF  # exactly n_selected distinct genes
        np.testing.assert_array_equal(np.sort(g), info["informative_genes"])
    # the pruned first layer has exactly n_selected input rows
    assert res.params["enc_0"]["kernel"].shape == (3, N_INF, 32)
    # the selected genes are the largest row norms at pruning
    for g, norms in zip(genes, np.asarray(res.gene_norms)):
        np.testing.assert_array_equal(g, np.argsort(-norms, kind="stable")[:N_INF])
    test_r2 = np.asarray(res.history["test_r2"])[:, -1]
    assert np.all(test_r2 > 0.5), test_r2


def test_vmapped_folds_equal_folds_fitted_alone(paired, cv_setup, folded):
    x, y, _ = paired
    _, splits, clusters, pre, keys = cv_setup
    cfg, res = folded
    for i in range(3):
        data = sbnn.make_data(x, y, clusters[i])
        alone = jax.device_get(sbnn.fit(cfg, keys[i], data, splits.fold(i), pre.fold(i)))
        np.testing.assert_array_equal(np.asarray(alone.genes), np.asarray(res.genes)[i])
        for k in ("test_r2", "train_r2", "pretrain_val_loss"):
            np.testing.assert_allclose(
                np.asarray(alone.history[k]), np.asarray(res.history[k])[i], rtol=2e-4, atol=2e-5
            )
        np.testing.assert_allclose(
            np.asarray(alone.params["regr"]["kernel"]), np.asarray(res.params["regr"]["kernel"])[i],
            rtol=1e-3, atol=1e-5,
        )


def test_lax_map_folds_equal_vmapped(paired, cv_setup, folded):
    x, y, _ = paired
    _, splits, clusters, pre, keys = cv_setup
    cfg, res = folded
    seq = jax.device_get(sbnn.fit_folds(cfg, keys, sbnn.make_data(x, y), splits, clusters, pre, batch_size=1, mesh=None))
    np.testing.assert_array_equal(np.asarray(seq.genes), np.asarray(res.genes))
    np.testing.assert_allclose(np.asarray(seq.history["test_r2"]), np.asarray(res.history["test_r2"]), rtol=2e-4, atol=2e-5)


def test_history_r2_matches_numpy_definition(paired, cv_setup, folded):
    x, y, _ = paired
    folds, *_ = cv_setup
    cfg, res = folded
    for i, (tr, _, te) in enumerate(folds):
        r = jax.tree.map(lambda a: a[i], res)
        pred = np.asarray(sbnn.predict(cfg, r, x[te]))
        y_mean = y[tr].mean(0)
        np.testing.assert_allclose(np.asarray(r.y_mean), y_mean, atol=1e-5)
        want = 1 - np.sum((y[te] - pred) ** 2) / np.sum((y[te] - y_mean) ** 2)
        assert np.asarray(r.history["test_r2"])[-1] == pytest.approx(want, abs=2e-5)
        assert metrics.r2_score(y[te], pred, center=y_mean) == pytest.approx(want, abs=1e-6)
        per = 1 - np.sum((y[te] - pred) ** 2, 0) / np.sum((y[te] - y_mean) ** 2, 0)
        np.testing.assert_allclose(np.asarray(r.history["test_r2_per_feature"])[-1], per, atol=2e-5)


def test_history_layout(folded):
    cfg, res = folded
    h = res.history
    assert h["test_r2"].shape == (3, cfg.n_epochs)
    assert h["test_r2_per_feature"].shape == (3, cfg.n_epochs, N_OUT)
    assert h["pretrain_val_loss"].shape == (3, cfg.pretrain_epochs)
    assert h["ae_test_r2"].shape == (3, cfg.ae_epochs)
    assert np.all(np.isfinite(h["test_r2"]))
    # the pre-training classifier learns the clusters better than chance
    assert np.all(np.nanmax(h["pretrain_val_accuracy"], 1) > 1.5 / cfg.n_clusters)
    # the autoencoder head reconstructs the selected genes
    assert np.all(h["ae_train_r2"][:, -1] > 0.3)


def test_frozen_stage_leaves_bottom_layers_untouched(paired):
    x, y, _ = paired
    cfg = small_cfg(pretrain_epochs=0, frozen_epochs=3, unfrozen_epochs=0, finetune_epochs=0, ae_epochs=0)
    key = jax.random.key(5)
    split = engine.make_splits([np.arange(300)], [np.arange(300, N_CELLS)]).fold(0)
    res = sbnn.fit(cfg, key, sbnn.make_data(x, y), split)
    init = sbnn.init_params(cfg, sbnn._stage_keys(key)[0])
    genes = np.asarray(res.genes)
    np.testing.assert_array_equal(res.params["enc_0"]["kernel"], np.asarray(init["enc_0"]["kernel"])[genes])
    np.testing.assert_array_equal(res.params["enc_1"]["kernel"], init["enc_1"]["kernel"])
    np.testing.assert_array_equal(res.params["enc_0"]["bias"], init["enc_0"]["bias"])
    assert not np.allclose(res.params["bottleneck"]["kernel"], init["bottleneck"]["kernel"])
    assert not np.allclose(res.params["regr"]["kernel"], init["regr"]["kernel"])
    # the classifier and autoencoder heads are not trained by a regression stage
    np.testing.assert_array_equal(res.params["clf"]["kernel"], init["clf"]["kernel"])
    np.testing.assert_array_equal(res.params["ae_out"]["kernel"], init["ae_out"]["kernel"])


def test_config_validation():
    with pytest.raises(ValueError, match="schedule"):
        sbnn.SparseBottleneckConfig.create(10, 2, schedule="nope")
    with pytest.raises(ValueError, match="n_selected"):
        sbnn.SparseBottleneckConfig.create(10, 2, n_selected=11)
    with pytest.raises(ValueError, match="frozen_epochs"):
        sbnn.SparseBottleneckConfig.create(10, 2, n_selected=5, frozen_epochs=0, unfrozen_epochs=0)
    with pytest.raises(ValueError, match="lasso"):
        sbnn.SparseBottleneckConfig.create(10, 2, n_selected=5, lasso=-1.0)
    straight = sbnn.SparseBottleneckConfig.create(10, 2, n_selected=5, schedule="straight")
    assert (straight.pretrain_epochs, straight.frozen_epochs, straight.unfrozen_epochs) == (0, 0, 100)
    assert straight.unfrozen_learning_rate == straight.learning_rate
    assert straight.finetune_learning_rate == pytest.approx(straight.learning_rate / 2)
    paper = sbnn.SparseBottleneckConfig.create(10, 2, n_selected=5)
    assert (paper.pretrain_epochs, paper.frozen_epochs, paper.unfrozen_epochs, paper.finetune_epochs) == (50, 50, 50, 100)
    assert paper.unfrozen_learning_rate == pytest.approx(5e-5)


def test_fit_requires_pre_split_when_pretraining(paired):
    x, y, _ = paired
    split = engine.make_splits([np.arange(300)], [np.arange(300, N_CELLS)]).fold(0)
    with pytest.raises(ValueError, match="pre_split"):
        sbnn.fit(small_cfg(), jax.random.key(0), sbnn.make_data(x, y), split)


# ----------------------------------------------------------------- estimator layer


def test_estimator_errors_name_the_argument(paired):
    x, y, _ = paired
    est = jaxsel.SparseBottleneck(n_genes=5)
    with pytest.raises(ValueError, match="same number of cells"):
        est.fit(x, y[:-1])
    y_nan = y.copy()
    y_nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        est.fit(x, y_nan)
    with pytest.raises(ValueError, match="n_markers|n_genes"):
        jaxsel.SparseBottleneck(n_genes=N_GENES + 1).fit(x, y)
    with pytest.raises(ValueError, match="epochs"):
        jaxsel.SparseBottleneck(epochs={"warmup": 3}).fit(x, y)
    with pytest.raises(ValueError, match="schedule"):
        jaxsel.SparseBottleneck(schedule="fast").fit(x, y)
    with pytest.raises(ValueError, match="Y is required"):
        est.fit(x, None)


def test_estimator_fit_predict_transform(paired):
    x, y, info = paired
    x0, y0 = x.copy(), y.copy()
    est = jaxsel.SparseBottleneck(
        n_genes=N_INF, schedule="straight", hidden=(32, 16), learning_rate=2e-3, lasso=0.03,
        epochs={"unfrozen": 25, "finetune": 10, "ae": 5}, random_state=0,
    ).fit(x, y)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(np.sort(est.genes_), info["informative_genes"])
    assert est.get_support().sum() == N_INF
    np.testing.assert_array_equal(est.transform(x), x[:, np.sort(est.genes_)])
    assert est.latent(x).shape == (N_CELLS, 2)
    assert est.predict(x).shape == (N_CELLS, N_OUT)
    assert est.reconstruct_genes(x).shape == (N_CELLS, N_INF)
    assert est.score(x, y) > 0.5
    assert est.score(x, y) == pytest.approx(metrics.r2_score(y, est.predict(x), center=y.mean(0)), abs=1e-6)


def test_selection_frequency_helper():
    from jaxsel.estimators import _selection_stability

    out = _selection_stability(np.array([[0, 1, 2], [0, 1, 3], [0, 4, 5]]), 6)
    np.testing.assert_allclose(out["frequency"], [1, 2 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3])
    assert out["mean_pairwise_overlap"] == pytest.approx((2 + 1 + 1) / 3)
    np.testing.assert_array_equal(out["always_selected"], [0])


def test_stage_dataclass_is_a_pytree():
    cfg = small_cfg()
    leaves = jax.tree.leaves(cfg)
    assert len(leaves) == 6  # lasso, l2 and four learning rates
    swept = dataclasses.replace(cfg, lasso=jnp.array([0.01, 0.1]))
    assert jax.tree.leaves(swept)[0].shape == (2,)


# sharded over four CPU devices == one device: tests/test_multidevice.py

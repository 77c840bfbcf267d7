"""MarkerMap family: planted-marker recovery (incl. the XOR toy), restarts in one program."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxsel import datasets, engine
from jaxsel import preprocessing as pp
from jaxsel.methods import markermap as mm


@pytest.fixture(scope="module")
def xor_data():
    x, y, info = datasets.make_markers(
        n_cells=1500, n_genes=50, n_types=3, n_markers_per_type=2, n_xor_genes=2, xor_fraction=0.5, random_state=0
    )
    xp, _ = pp.markermap_recipe(x)
    tr, va, _ = pp.split_indices(len(y), (0.7, 0.1, 0.2), random_state=0)
    return xp, y, info, tr, va


def test_supervised_markermap_recovers_planted_and_xor_genes(xor_data):
    """Two random restarts fitted in one program both find the two XOR genes, which are
    informative only jointly, and at least one planted marker of every cell type."""
    xp, y, info, tr, va = xor_data
    xor = set(info["xor_genes"].tolist())
    cfg = mm.MarkerMapConfig.create(
        xp.shape[1], 12, alpha=0.0, n_classes=int(y.max()) + 1, hidden_size=64, learning_rate=3e-3
    )
    loop = engine.LoopConfig(max_epochs=100, min_epochs=25, patience=10, batch_size=64)
    splits = engine.make_splits([tr, tr], [va, va])
    res = mm.fit_folds(cfg, loop, engine.fold_keys(jax.random.key(0), 2), xp, y, splits, mesh=None)
    for r in range(2):
        found = set(np.asarray(res.markers[r]).tolist())
        assert len(found) == cfg.n_markers
        assert xor <= found, (r, sorted(xor - found))
        for t, genes in info["markers_by_type"].items():
            assert found & set(np.asarray(genes).tolist()), (r, t)
        assert np.nanmax(np.asarray(res.history["val_accuracy"][r])) > 0.95
    # A t-test ranks genes one at a time and cannot see the XOR pair.
    from jaxsel.methods.baselines import de_markers

    de = set(np.asarray(de_markers(xp, y, int(y.max()) + 1, 12, "t-test")).tolist())
    assert not xor <= de


@pytest.mark.parametrize("selector", mm.SELECTORS)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_every_selector_and_objective_returns_k_distinct_markers(xor_data, selector, alpha):
    xp, y, _, tr, va = xor_data
    cfg = mm.MarkerMapConfig.create(xp.shape[1], 9, alpha=alpha, n_classes=int(y.max()) + 1, hidden_size=16, selector=selector)
    loop = engine.LoopConfig(max_epochs=3, min_epochs=0, patience=None, batch_size=128)
    res = mm.fit(cfg, loop, jax.random.key(0), xp, y, engine.make_splits([tr], [va]).fold(0))
    m = np.asarray(res.markers)
    assert m.shape == (9,) and len(set(m.tolist())) == 9
    assert np.all(np.isfinite(np.asarray(res.history["train_loss"])))
    # markers are the top scores
    np.testing.assert_array_equal(np.sort(m), np.sort(np.argsort(-np.asarray(res.scores))[:9]))
    if cfg.use_clf:
        assert mm.predict_logits(cfg, res, xp[:10]).shape == (10, int(y.max()) + 1)
    else:
        with pytest.raises(ValueError, match="classifier"):
            mm.predict_logits(cfg, res, xp[:10])
    if selector == "markermap" and alpha == 0.0:
        # Chunked inference pads the last chunk: same values, and inputs of other lengths
        # reuse the chunk-size program instead of compiling one per remainder.
        whole = np.asarray(mm.embed(cfg, res, xp[:37]))
        before = mm._apply_eval._cache_size()
        np.testing.assert_allclose(np.asarray(mm.embed(cfg, res, xp[:37], chunk=8)), whole, rtol=1e-5, atol=1e-6)
        mm.embed(cfg, res, xp[:29], chunk=8)
        mm.embed(cfg, res, xp[:19], chunk=8)
        assert mm._apply_eval._cache_size() == before + 1
    if cfg.use_recon:
        assert mm.reconstruct(cfg, res, xp[:10]).shape == (10, xp.shape[1])
    assert mm.embed(cfg, res, xp[:10]).shape == (10, cfg.latent_size)


def test_config_validation():
    with pytest.raises(ValueError, match="n_markers"):
        mm.MarkerMapConfig.create(10, 11, alpha=1.0)
    with pytest.raises(ValueError, match="n_markers"):
        mm.MarkerMapConfig.create(10, 0, alpha=1.0)
    with pytest.raises(ValueError, match="alpha"):
        mm.MarkerMapConfig.create(10, 3, alpha=1.5)
    with pytest.raises(ValueError, match="n_classes"):
        mm.MarkerMapConfig.create(10, 3, alpha=0.5, n_classes=1)
    with pytest.raises(ValueError, match="selector"):
        mm.MarkerMapConfig.create(10, 3, alpha=1.0, selector="lasso")
    cfg = mm.MarkerMapConfig.create(3451, 50, alpha=1.0)
    assert cfg.hidden_size == 345 and not cfg.use_clf and cfg.use_recon


def test_temperature_schedule():
    cfg = mm.MarkerMapConfig.create(10, 3, alpha=1.0, temperature=3.0, temperature_decay=0.5, min_temperature=0.1)
    t = [float(cfg.epoch_context(jax.numpy.int32(e))["temperature"]) for e in range(7)]
    np.testing.assert_allclose(t, [3.0, 1.5, 0.75, 0.375, 0.1875, 0.1, 0.1], rtol=1e-6)


def test_folds_one_at_a_time_equal_each_fold_fitted_alone_bit_for_bit():
    """The CPU default of every fold-parallel estimator (``batch_size="auto"`` -> 1): the
    folds loop inside one compiled program, and each fold (markers, scores, parameters,
    history, stopping epoch) is bit for bit the fold fitted alone, with the joint
    objective and folds that stop early at different epochs."""
    x, y, _ = datasets.make_markers(n_cells=600, n_genes=120, n_types=4, random_state=3)
    xp, _ = pp.markermap_recipe(x)
    folds = pp.kfold_indices(y, 3, random_state=0, stratify=True, validation_fraction=0.2)
    splits = engine.make_splits([f[0] for f in folds], [f[1] for f in folds])
    cfg = mm.MarkerMapConfig.create(xp.shape[1], 6, alpha=0.5, n_classes=int(y.max()) + 1, hidden_size=24,
                                    learning_rate=3e-3)
    loop = engine.LoopConfig(max_epochs=12, min_epochs=2, patience=2, batch_size=32,
                             steps_per_epoch=int(np.min(splits.n_train)) // 32)
    keys = engine.fold_keys(jax.random.key(0), 3)
    together = jax.device_get(mm.fit_folds(cfg, loop, keys, xp, y, splits, batch_size=1, mesh=None))
    n_epochs = np.asarray(together.n_epochs)
    assert len(set(n_epochs.tolist())) > 1, n_epochs  # the folds stop at different epochs
    for i, n in enumerate(n_epochs):
        assert np.all(np.isfinite(np.asarray(together.history["val_loss"])[i, :n]))
    for i in range(3):
        alone = jax.device_get(mm.fit(cfg, loop, keys[i], xp, y, splits.fold(i)))
        for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(together)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[i])

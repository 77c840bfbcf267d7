"""Diverging fits stop at the first non-finite epoch and raise an error naming the epoch,
the loss terms and the fold."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

import jaxsel
from jaxsel import datasets, engine, preprocessing
from test_engine import _folds, _Linear, _regression  # tests/ is on sys.path under pytest


def test_first_divergence_names_fold_epoch_and_terms():
    nan = np.nan
    hist = {
        "train_loss": np.array([[1.0, 0.5, nan, nan], [1.0, nan, nan, nan]]),
        "train_kl": np.array([[0.1, 0.1, np.inf, nan], [0.1, 0.2, nan, nan]]),
        "train_rec": np.array([[0.9, 0.4, 0.3, nan], [0.9, nan, nan, nan]]),
        "val_loss": np.array([[nan, nan, nan, nan], [nan, nan, nan, nan]]),  # not a training metric
    }
    fold, epoch, terms = engine.first_divergence(hist, n_epochs=np.array([3, 2]))
    assert (fold, epoch, terms) == ((1,), 1, ["train_rec", "train_loss"])
    # epochs past n_epochs (the NaN padding of a fit that stopped early) are not divergence
    assert engine.first_divergence({"train_loss": np.array([1.0, 0.5, nan])}, n_epochs=2) is None
    assert engine.first_divergence({k: v[0] for k, v in hist.items()}) == (None, 2, ["train_kl", "train_loss"])
    with pytest.raises(engine.DivergenceError, match=r"epoch 1 \(fold/model 1\): train_rec, train_loss"):
        engine.check_history(hist, np.array([3, 2]), model="M")
    assert issubclass(engine.DivergenceError, FloatingPointError) and issubclass(engine.DivergenceError, ValueError)


def test_engine_stops_at_the_first_non_finite_epoch():
    data, _ = _regression()
    data = {"x": data["x"] * 1e3, "y": data["y"]}  # SGD at this learning rate blows up
    loop = engine.LoopConfig(max_epochs=40, batch_size=16, min_epochs=0, patience=None)
    res = jax.device_get(engine.fit(_Linear(5, learning_rate=0.5), loop, jax.random.key(0), data, _folds(240, 4).fold(0)))
    n = int(res.n_epochs)
    loss = np.asarray(res.history["train_loss"])
    assert n < 40 and not np.isfinite(loss[n - 1]) and np.isfinite(loss[: n - 1]).all()
    assert np.isnan(loss[n:]).all()  # epochs never run
    with pytest.raises(engine.DivergenceError, match=f"diverged at epoch {n - 1}: .*train_loss"):
        engine.check_history(res.history, n, model="_Linear")
    healthy = jax.device_get(engine.fit(_Linear(5), loop, jax.random.key(0), _regression()[0], _folds(240, 4).fold(0)))
    assert int(healthy.n_epochs) == 40
    engine.check_history(healthy.history, healthy.n_epochs)  # no error


def test_estimators_report_divergence():
    counts, y, _ = datasets.make_markers(n_cells=200, n_genes=30, n_types=3, n_markers_per_type=2,
                                         n_xor_genes=0, random_state=0)
    x, _ = preprocessing.markermap_recipe(counts)
    huge = x * np.float32(1e37)  # finite input whose first layer overflows
    before = huge.copy()
    est = jaxsel.MarkerMap(n_markers=4, hidden_size=8, max_epochs=5, min_epochs=1, batch_size=32, random_state=0)
    with pytest.raises(engine.DivergenceError, match="MarkerMap diverged at epoch 0"):
        est.fit(huge, y)
    np.testing.assert_array_equal(huge, before)
    a, b, _ = datasets.make_spatial_pair(n_spatial=120, n_ref=120, n_genes=20, n_measured=10, n_types=3,
                                         random_state=1)
    st = jaxsel.StAI(n_calibration_folds=2, epochs=6, learning_rate=1e30, random_state=0)
    with pytest.raises(engine.DivergenceError, match=r"StAI diverged at epoch \d \(fold/model \d\)"):
        st.fit(a.X, b.X, coords=a.obsm["spatial"], spatial_genes=a.var_names, ref_genes=b.var_names)


def test_progress_lines_come_from_inside_the_compiled_loop(capsys):
    from jaxsel.engine import progress

    data, _ = _regression()
    loop = engine.LoopConfig(max_epochs=6, batch_size=16, min_epochs=0, patience=None, progress="lin")
    old, progress.interval = progress.interval, 0.0  # every epoch
    try:
        res = engine.fit_folds(_Linear(5), loop, engine.fold_keys(jax.random.key(0), 3), data, _folds(240, 3),
                               mesh=None)
        jax.block_until_ready(res)
        jax.effects_barrier()
    finally:
        progress.interval = old
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("lin")]
    assert len(lines) == 3 * 6, lines  # once per fold and epoch
    assert all(ln.startswith("lin: epoch 1/6  train ") for ln in lines[:3]), lines
    assert all(ln.startswith("lin: epoch 6/6") for ln in lines[-3:]), lines
    quiet = engine.fit_folds(_Linear(5), dataclasses.replace(loop, progress=None), engine.fold_keys(jax.random.key(0), 3),
                             data, _folds(240, 3), mesh=None)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), res, quiet)


def test_stai_progress_lines_and_identical_results(capsys):
    from jaxsel.engine import progress

    a, b, _ = datasets.make_spatial_pair(n_spatial=80, n_ref=80, n_genes=20, n_measured=12, n_types=3, random_state=2)
    kw = dict(coords=a.obsm["spatial"], spatial_genes=a.var_names, ref_genes=b.var_names)
    est = dict(n_calibration_folds=2, epochs=4, random_state=0, batch_size=1)
    old, progress.interval = progress.interval, 0.0
    try:
        loud = jaxsel.StAI(**est, verbose=True).fit(a.X, b.X, **kw)
        jax.effects_barrier()
    finally:
        progress.interval = old
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("StAI")]
    assert len(lines) == 2 * 4, lines  # once per submodel and epoch (looped submodels)
    assert lines[0].startswith("StAI: epoch 1/4  train ") and " val " not in lines[0], lines
    assert lines[-1].startswith("StAI: epoch 4/4"), lines
    quiet = jaxsel.StAI(**est).fit(a.X, b.X, **kw)
    jax.tree.map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)), loud.history_, quiet.history_)
    np.testing.assert_array_equal(loud.impute(), quiet.impute())
    with pytest.raises(TypeError, match="verbose must be a bool"):
        jaxsel.StAI(verbose="yes").fit(a.X, b.X, **kw)


def test_sparse_bottleneck_progress_names_its_stages(capsys):
    from jaxsel.engine import progress

    x, y, _ = datasets.make_paired(n_cells=120, n_genes=20, n_outputs=3, n_informative=3, random_state=0)
    est = dict(n_genes=3, hidden=(8, 4), schedule="straight", batch_size=16,
               epochs={"unfrozen": 2, "finetune": 2, "ae": 1}, random_state=0)
    old, progress.interval = progress.interval, 0.0
    try:
        loud = jaxsel.SparseBottleneck(**est, verbose=True).fit(x, y)
        jax.effects_barrier()
    finally:
        progress.interval = old
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("SparseBottleneck")]
    stages = [ln.split(":")[0].split()[1] for ln in lines]
    assert stages == ["unfrozen"] * 2 + ["finetune"] * 2 + ["ae"], lines
    quiet = jaxsel.SparseBottleneck(**est).fit(x, y)
    np.testing.assert_array_equal(loud.genes_, quiet.genes_)
    jax.tree.map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)), loud.history_, quiet.history_)
    with pytest.raises(TypeError, match="verbose must be a bool"):
        jaxsel.SparseBottleneck(**{**est, "verbose": 2}).fit(x, y)

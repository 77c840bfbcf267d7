"""Every fold-parallel entry point on a four-device mesh equals the same call on one device.

``JAX_NUM_CPU_DEVICES`` must be set before JAX starts, so the default test run (one CPU
device) runs this file again in a subprocess with four CPU devices
(:func:`test_multidevice_suite_on_four_cpu_devices`); there the ``sharded`` tests run and
the launcher skips. Run it directly with::

    JAX_NUM_CPU_DEVICES=4 JAX_PLATFORMS=cpu python -m pytest -q tests/test_multidevice.py

Each ``sharded`` test fits with the default mesh (all four devices; five folds or models
are padded to eight) and again inside ``engine.use_devices(jax.devices()[:1])``. Every
result is identical bit for bit, floats included, except sRRR's vmapped folds
(``batch_size=None``): there the genes are identical and the floats agree to float32
rounding, because XLA:CPU rounds sRRR's small batched matmuls differently for a batch
of five folds (one device) and of two (a device's slice); its looped folds
(``batch_size=1``, the default) are identical.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxsel
from jaxsel import datasets, engine, preprocessing, streaming

N_DEV = jax.device_count()
sharded = pytest.mark.skipif(N_DEV < 2, reason="needs several devices (JAX_NUM_CPU_DEVICES=4)")


def test_multidevice_suite_on_four_cpu_devices():
    if N_DEV > 1:
        pytest.skip("already running on several devices")
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="4", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", __file__]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tail = (out.stdout + out.stderr)[-4000:]
    assert out.returncode == 0, tail
    n_passed = int(out.stdout.splitlines()[-1].split(" passed")[0].split()[-1])
    assert n_passed >= 7, tail


def _one_device():
    return engine.use_devices(jax.devices()[:1])


def _assert_identical(a, b, exact=True):
    """Equal leaves. ``exact=False``: integer, boolean and string leaves (selected genes,
    ranks, epochs) still equal; float leaves to float32 rounding."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype
        if exact or not np.issubdtype(x.dtype, np.floating):
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6)


@sharded
def test_device_context_chooses_the_mesh():
    assert N_DEV == 4
    assert engine.fold_mesh().devices.size == 4
    with _one_device():
        assert engine.fold_mesh() is None
        with engine.use_devices(jax.devices()[:2]):
            assert engine.fold_mesh().devices.size == 2
        assert engine.fold_mesh() is None
    assert engine.fold_mesh().devices.size == 4
    with pytest.raises(TypeError, match="devices"):
        with engine.use_devices([]):
            pass


# ---------------------------------------------------------------- engine: folds and grids


from test_engine import _Linear, _folds, _regression  # noqa: E402  (tests/ is on sys.path under pytest)


@sharded
def test_engine_folds_and_hyperparameter_grid():
    (data, _), splits = _regression(n=250), _folds(250, 5)  # 5 folds on 4 devices: padded to 8
    loop = engine.LoopConfig(max_epochs=6, batch_size=16, min_epochs=1, patience=2)
    keys = engine.fold_keys(jax.random.key(3), 5)
    for batch_size in (None, 1):
        out = engine.fit_folds(_Linear(5), loop, keys, data, splits, batch_size=batch_size)
        with _one_device():
            ref = engine.fit_folds(_Linear(5), loop, keys, data, splits, batch_size=batch_size)
        _assert_identical(out, ref)
    grid = engine.stack_trees([_Linear(5, lr) for lr in (0.01, 0.02, 0.05, 0.1, 0.2)])
    out = engine.fit_folds(grid, loop, keys, data, splits, method_batched=True)
    with _one_device():
        ref = engine.fit_folds(grid, loop, keys, data, splits, method_batched=True)
    _assert_identical(out, ref)


# ---------------------------------------------------------------- estimators


@sharded
def test_markermap_cross_validation_folds():
    counts, y, _ = datasets.make_markers(n_cells=300, n_genes=40, n_types=3, n_markers_per_type=2,
                                         n_xor_genes=0, random_state=0)
    x, _ = preprocessing.markermap_recipe(counts)
    # one epoch: the first float difference (a rounding of a mean) would be amplified by
    # further Gumbel-sampled training like any perturbation
    est = jaxsel.MarkerMap(n_markers=6, hidden_size=16, max_epochs=1, min_epochs=1, patience=2,
                           learning_rate=3e-3, batch_size=32, random_state=0)
    out = est.cross_validate(x, y, n_folds=5, classifiers=("knn",))
    with _one_device():
        ref = est.cross_validate(x, y, n_folds=5, classifiers=("knn",))
    # the per-epoch validation accuracy is left out: it is scored with the hard top-k of
    # logits that one epoch leaves nearly tied, so a rounding flips whole cells
    out.pop("history"), ref.pop("history")
    _assert_identical(out, ref, exact=True)


def _paired():
    return datasets.make_paired(n_cells=200, n_genes=30, n_outputs=3, n_informative=3, random_state=0)


@sharded
def test_sparse_bottleneck_folds_and_restarts():
    x, y, _ = _paired()
    est = jaxsel.SparseBottleneck(n_genes=3, hidden=(16, 8), schedule="straight", batch_size=16,
                                  epochs={"unfrozen": 3, "finetune": 2, "ae": 2}, random_state=0)
    out = est.selection_stability(x, y, n_restarts=5)  # restarts; cross_validate runs the same program
    with _one_device():
        ref = est.selection_stability(x, y, n_restarts=5)
    _assert_identical(out, ref, exact=True)


@sharded
def test_sparse_rrr_folds():
    x, y, _ = _paired()
    est = jaxsel.SparseRRR(rank=2, n_genes=4)
    for batch_size in (1, None):
        out = est.cross_validate(x, y, n_folds=5, batch_size=batch_size)
        with _one_device():
            ref = est.cross_validate(x, y, n_folds=5, batch_size=batch_size)
        # vmapped: batched matmuls of 5 vs 2 folds round differently (module docstring)
        _assert_identical(out, ref, exact=batch_size == 1)
    # X on disk: every fold's moments from one pass, the folds fitted in one sharded program
    out = est.cross_validate(streaming.RowSource(x), y, n_folds=5)
    with _one_device():
        ref = est.cross_validate(streaming.RowSource(x), y, n_folds=5)
    out.pop("stream_info"), ref.pop("stream_info")  # its wall times
    _assert_identical(out, ref)


def _stai_kw(a, b):
    return dict(coords=a.obsm["spatial"], spatial_genes=a.var_names, ref_genes=b.var_names)


@sharded
def test_stai_calibration_submodels():
    a, b, _ = datasets.make_spatial_pair(n_spatial=200, n_ref=200, n_genes=30, n_measured=15, n_types=3,
                                         random_state=1)
    labels = np.asarray(b.obs["cell_type"])
    est = jaxsel.StAI(n_calibration_folds=5, epochs=3, random_state=0)
    out = est.fit(a.X, b.X, labels, **_stai_kw(a, b))
    got = (out.params_, out.history_, out.impute(), out.annotate())
    with _one_device():
        ref = jaxsel.StAI(**est.get_params()).fit(a.X, b.X, labels, **_stai_kw(a, b))
        want = (ref.params_, ref.history_, ref.impute(), ref.annotate())
    _assert_identical(got, want, exact=True)


@sharded
def test_gimvi_held_out_genes_and_seeds():
    rng = np.random.default_rng(0)
    rho = rng.dirichlet(np.ones(24), size=160)
    xr = rng.poisson(rho * 800)
    xs = rng.poisson(rho[:, :10] / rho[:, :10].sum(1, keepdims=True) * 100)
    genes = np.array([f"g{i}" for i in range(24)])
    kw = dict(ref_genes=genes, spatial_genes=genes[:10])
    est = jaxsel.GimVI(max_epochs=2, batch_size=32, random_state=0)
    folds = [list(genes[i:min(i + 4, 10)]) for i in range(0, 10, 4)]
    out = est.cross_validate_genes(xr, xs, gene_folds=folds, n_seeds=2, **kw)  # 6 models on 4 devices
    with _one_device():
        ref = est.cross_validate_genes(xr, xs, gene_folds=folds, n_seeds=2, **kw)
    for o, r in zip(out, ref):
        _assert_identical((o.imputed, o.spearman, o.history), (r.imputed, r.spearman, r.history))

"""Every estimator round-trips through save/load bit for bit; bad files are clear errors."""

from __future__ import annotations

import contextlib
import json

import jax
import numpy as np
import pytest

import jaxsel
from jaxsel import datasets, preprocessing


def _equal_trees(a, b, where="root"):
    """Same containers, same types and the same bytes in every array."""
    assert type(a) is type(b) or (isinstance(a, jax.Array) and isinstance(b, jax.Array)), (where, type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _equal_trees(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _equal_trees(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dataclass_fields__"):
        for f in a.__dataclass_fields__:
            _equal_trees(getattr(a, f), getattr(b, f), f"{where}.{f}")
    elif isinstance(a, (np.ndarray, jax.Array)):
        x, y = np.asarray(a), np.asarray(b)
        assert x.dtype == y.dtype and x.shape == y.shape, where
        if x.dtype == object:
            assert x.tolist() == y.tolist(), where
        else:
            assert x.tobytes() == y.tobytes(), where
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), where
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def marker_data():
    counts, y, _ = datasets.make_markers(n_cells=200, n_genes=30, n_types=3, n_markers_per_type=2,
                                         n_xor_genes=0, random_state=0)
    x, _ = preprocessing.markermap_recipe(counts)
    return counts, x, y


@pytest.fixture(scope="module")
def paired():
    return datasets.make_paired(n_cells=200, n_genes=30, n_outputs=3, n_informative=3, random_state=0)


@pytest.fixture(scope="module")
def spatial():
    return datasets.make_spatial_pair(n_spatial=120, n_ref=120, n_genes=20, n_measured=10, n_types=3,
                                      random_state=1)


_SMALL = dict(n_markers=4, hidden_size=8, max_epochs=2, min_epochs=1, batch_size=32, random_state=0)


def _fitted(name, marker_data, paired, spatial):
    counts, x, y = marker_data
    xp, yp, _ = paired
    a, b, _ = spatial
    if name == "MarkerMap":
        return jaxsel.MarkerMap(objective="joint", **_SMALL).fit(x, y), lambda e: (e.transform(x), e.predict(x),
                                                                                   e.reconstruct(x), e.embed(x))
    if name == "ConcreteVAE":
        return jaxsel.ConcreteVAE(**_SMALL).fit(x), lambda e: (e.transform(x), e.reconstruct(x))
    if name == "GlobalGumbelVAE":
        return jaxsel.GlobalGumbelVAE(**_SMALL).fit(x), lambda e: (e.transform(x),)
    if name == "RandomMarkers":
        return jaxsel.RandomMarkers(4, random_state=0).fit(x), lambda e: (e.transform(x),)
    if name == "HVGMarkers":
        return jaxsel.HVGMarkers(4).fit(counts), lambda e: (e.transform(counts),)
    if name == "DEMarkers":
        return jaxsel.DEMarkers(4).fit(x, y), lambda e: (e.transform(x),)
    if name == "SparseBottleneck":
        est = jaxsel.SparseBottleneck(n_genes=3, hidden=(8, 4), schedule="straight", random_state=0,
                                      epochs={"unfrozen": 2, "finetune": 1, "ae": 1}).fit(xp, yp)
        return est, lambda e: (e.predict(xp), e.latent(xp), e.transform(xp))
    if name == "SparseRRR":
        return jaxsel.SparseRRR(rank=2, n_genes=4).fit(xp, yp), lambda e: (e.predict(xp), e.latent(xp))
    if name == "StAI":
        est = jaxsel.StAI(n_calibration_folds=2, epochs=2, random_state=0).fit(
            a.X, b.X, np.asarray(b.obs["cell_type"]), coords=a.obsm["spatial"], spatial_genes=a.var_names,
            ref_genes=b.var_names)
        return est, lambda e: (e.impute(return_std=True), e.annotate(return_proba=True), e.embed())
    raise KeyError(name)


ESTIMATORS = ["MarkerMap", "ConcreteVAE", "GlobalGumbelVAE", "RandomMarkers", "HVGMarkers", "DEMarkers",
              "SparseBottleneck", "SparseRRR", "StAI"]  # GimVI: tests/test_gimvi.py


@pytest.mark.parametrize("name", ESTIMATORS)
def test_round_trip_is_exact_and_repeat_fits_are_identical(name, marker_data, paired, spatial, tmp_path):
    est, outputs = _fitted(name, marker_data, paired, spatial)
    again, _ = _fitted(name, marker_data, paired, spatial)  # same random_state, same compiled programs
    _equal_trees(vars(again), vars(est))
    _equal_trees(outputs(again), outputs(est))
    path = est.save(tmp_path / "model")
    assert path.endswith(".npz")
    cls = type(est)
    for loaded in (cls.load(path), jaxsel.load(path)):
        assert type(loaded) is cls
        assert loaded.get_params() == est.get_params()
        _equal_trees({k: v for k, v in vars(loaded).items()}, {k: v for k, v in vars(est).items()})
        _equal_trees(outputs(loaded), outputs(est))


def test_load_refuses_other_classes_versions_and_damaged_files(marker_data, tmp_path):
    counts, x, y = marker_data
    est = jaxsel.DEMarkers(4).fit(x, y)
    good = est.save(tmp_path / "de.npz")
    with np.load(good) as f:
        arrays = {k: f[k] for k in f.files}
    header = json.loads(str(arrays["__header__"]))

    def rewrite(name, **changes):
        h = {**header, **changes}
        np.savez(tmp_path / name, **{**arrays, "__header__": np.array(json.dumps(h))})
        return tmp_path / name

    with pytest.raises(ValueError, match="holds a DEMarkers, not a jaxsel MarkerMap"):
        jaxsel.MarkerMap.load(good)
    with pytest.raises(ValueError, match=r"written by jaxsel 9\.9\.0"):
        jaxsel.load(rewrite("v.npz", jaxsel_version="9.9.0"))
    with pytest.raises(ValueError, match="only jaxsel classes"):
        jaxsel.load(rewrite("c.npz", **{"class": "os:system"}))
    with pytest.raises(ValueError, match="not a jaxsel"):
        jaxsel.load(rewrite("f.npz", format="something/1"))
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a jaxsel DEMarkers file"):
        jaxsel.DEMarkers.load(tmp_path / "other.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="not a jaxsel estimator file"):
        jaxsel.load(tmp_path / "text.npz")
    key = next(k for k in arrays if k != "__header__")
    np.savez(tmp_path / "shape.npz", **{**arrays, key: np.zeros((1,), np.float32)})
    with pytest.raises(ValueError, match="wrong shape"):
        jaxsel.load(tmp_path / "shape.npz")
    with pytest.raises(Exception, match="not fitted"):
        jaxsel.DEMarkers(4).save(tmp_path / "unfitted")


@contextlib.contextmanager
def _killed_after_checkpoints(monkeypatch, n: int):
    """The job is killed (``KeyboardInterrupt``) right after writing its ``n``-th checkpoint."""
    from jaxsel.engine import checkpoint as ck_mod

    real, calls = ck_mod.write_checkpoint, {"n": 0}

    def write_then_die(*args, **kwargs):
        real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt

    monkeypatch.setattr(ck_mod, "write_checkpoint", write_then_die)
    try:
        yield
    finally:
        monkeypatch.setattr(ck_mod, "write_checkpoint", real)


def test_interrupted_fit_resumes_from_its_checkpoint(marker_data, tmp_path, monkeypatch):
    counts, x, y = marker_data
    kw = dict(n_markers=4, hidden_size=8, max_epochs=7, min_epochs=7, batch_size=32, random_state=0)
    whole = jaxsel.MarkerMap(**kw).fit(x, y)
    path = tmp_path / "run.ckpt.npz"
    with _killed_after_checkpoints(monkeypatch, 2), pytest.raises(KeyboardInterrupt):
        jaxsel.MarkerMap(**kw).fit(x, y, checkpoint=path, checkpoint_every=3)
    assert path.exists()
    resumed = jaxsel.MarkerMap(**kw).fit(x, y, checkpoint=path, checkpoint_every=3)  # epochs 6 and 7 only
    _equal_trees(vars(resumed), vars(whole))
    with pytest.raises(ValueError, match="other settings or other data"):
        jaxsel.MarkerMap(**{**kw, "hidden_size": 8, "random_state": 1}).fit(x, y, checkpoint=path)
    with pytest.raises(ValueError, match="other settings or other data"):
        jaxsel.MarkerMap(**kw).fit(x[::-1].copy(), y[::-1].copy(), checkpoint=path)
    with pytest.raises(ValueError, match="checkpoint_every"):
        jaxsel.MarkerMap(**kw).fit(x, y, checkpoint=tmp_path / "b.npz", checkpoint_every=0)
    with pytest.raises(TypeError, match="checkpoint_every must be an int"):
        jaxsel.MarkerMap(**kw).fit(x, y, checkpoint=tmp_path / "b.npz", checkpoint_every=2.5)


def test_interrupted_cross_validation_resumes_every_fold(marker_data, tmp_path, monkeypatch):
    """The fold-parallel program checkpointed: killed after two segments, resumed, every
    fold's markers, scores, history and scores equal the plain run's bit for bit."""
    counts, x, y = marker_data
    kw = dict(n_markers=4, hidden_size=8, max_epochs=7, min_epochs=2, patience=2, batch_size=32, random_state=0)
    cv = dict(n_folds=3, classifiers=("knn",))
    plain = jaxsel.MarkerMap(**kw).cross_validate(x, y, **cv)
    path = tmp_path / "cv.npz"
    with _killed_after_checkpoints(monkeypatch, 2), pytest.raises(KeyboardInterrupt):
        jaxsel.MarkerMap(**kw).cross_validate(x, y, **cv, checkpoint=path, checkpoint_every=2)
    from jaxsel.engine import checkpoint as ck_mod

    writes, real = [], ck_mod.write_checkpoint
    monkeypatch.setattr(ck_mod, "write_checkpoint",
                        lambda p, ck, key: (writes.append(int(np.max(ck.epoch))), real(p, ck, key)))
    resumed = jaxsel.MarkerMap(**kw).cross_validate(x, y, **cv, checkpoint=path, checkpoint_every=2)
    monkeypatch.setattr(ck_mod, "write_checkpoint", real)
    assert writes and writes[0] >= 4  # went on from epoch 4, did not start again
    _equal_trees({k: v for k, v in resumed.items() if k != "test_indices"},
                 {k: v for k, v in plain.items() if k != "test_indices"})
    with pytest.raises(ValueError, match="other settings or other data"):
        jaxsel.MarkerMap(**kw).cross_validate(x, y, n_folds=4, checkpoint=path)
    with pytest.raises(ValueError, match="other settings or other data"):  # a fit's file is not a CV's
        jaxsel.MarkerMap(**kw).fit(x, y, checkpoint=path)


def test_gimvi_checkpointed_fit_equals_the_plain_fit(tmp_path):
    rng = np.random.default_rng(0)
    rho = rng.dirichlet(np.ones(16), size=120)
    xr, xs = rng.poisson(rho * 600), rng.poisson(rho[:, :8] / rho[:, :8].sum(1, keepdims=True) * 80)
    genes = np.array([f"g{i}" for i in range(16)])
    kw = dict(ref_genes=genes, spatial_genes=genes[:8])
    est = dict(max_epochs=5, batch_size=32, hidden=16, random_state=0)
    plain = jaxsel.GimVI(**est).fit(xr, xs, **kw)
    path = tmp_path / "g.npz"
    first = jaxsel.GimVI(**{**est, "max_epochs": 5}).fit(xr, xs, checkpoint=path, checkpoint_every=2, **kw)
    again = jaxsel.GimVI(**est).fit(xr, xs, checkpoint=path, **kw)  # the file holds a finished fit
    for m in (first, again):
        _equal_trees((m.params_, m.state_, m.history_), (plain.params_, plain.state_, plain.history_))


def test_stai_interrupted_fit_resumes_and_equals_the_plain_fit(tmp_path, monkeypatch):
    a, b, _ = datasets.make_spatial_pair(n_spatial=80, n_ref=80, n_genes=20, n_measured=12, n_types=3, random_state=3)
    labels = np.asarray(b.obs["cell_type"])
    kw = dict(coords=a.obsm["spatial"], spatial_genes=a.var_names, ref_genes=b.var_names)
    est = dict(n_calibration_folds=2, epochs=7, random_state=0)
    plain = jaxsel.StAI(**est).fit(a.X, b.X, labels, **kw)
    path = tmp_path / "stai.npz"
    with _killed_after_checkpoints(monkeypatch, 2), pytest.raises(KeyboardInterrupt):  # after epoch 6
        jaxsel.StAI(**est).fit(a.X, b.X, labels, checkpoint=path, checkpoint_every=3, **kw)
    # printing is no training setting: a quiet fit's checkpoint resumes with verbose=True
    resumed = jaxsel.StAI(**est, verbose=True).fit(a.X, b.X, labels, checkpoint=path, checkpoint_every=3, **kw)
    _equal_trees((resumed.params_, resumed.history_), (plain.params_, plain.history_))
    np.testing.assert_array_equal(resumed.impute(), plain.impute())
    assert np.all(np.isfinite(resumed.history_["loss"]))
    with pytest.raises(ValueError, match="other settings or other data"):
        jaxsel.StAI(**{**est, "learning_rate": 0.01}).fit(a.X, b.X, labels, checkpoint=path, **kw)
    with pytest.raises(ValueError, match="checkpoint_every"):
        jaxsel.StAI(**est).fit(a.X, b.X, labels, checkpoint=tmp_path / "c.npz", checkpoint_every=0, **kw)


def test_sparse_bottleneck_interrupted_fit_resumes_and_equals_the_plain_fit(paired, tmp_path, monkeypatch):
    """Five stages, segments of 2 epochs that end with their stage: killed in the middle
    of the frozen stage, resumed (with printing on), the result is the plain fit's."""
    xp, yp, _ = paired
    est = dict(n_genes=3, hidden=(8, 4), n_clusters=4, batch_size=16, random_state=0,
               epochs={"pretrain": 4, "frozen": 3, "unfrozen": 3, "finetune": 2, "ae": 2})
    plain = jaxsel.SparseBottleneck(**est).fit(xp, yp)
    path = tmp_path / "sbnn.npz"
    with _killed_after_checkpoints(monkeypatch, 3), pytest.raises(KeyboardInterrupt):  # pretrain 2, 2; frozen 2
        jaxsel.SparseBottleneck(**est).fit(xp, yp, checkpoint=path, checkpoint_every=2)
    from jaxsel.engine import checkpoint as ck_mod

    writes = []
    real = ck_mod.write_checkpoint
    monkeypatch.setattr(ck_mod, "write_checkpoint", lambda p, ck, key: (writes.append(int(ck.epoch)), real(p, ck, key)))
    resumed = jaxsel.SparseBottleneck(**est, verbose=True).fit(xp, yp, checkpoint=path, checkpoint_every=2)
    monkeypatch.setattr(ck_mod, "write_checkpoint", real)
    assert writes == [7, 9, 10, 12, 14]  # the rest of frozen, unfrozen, finetune, ae: nothing run twice
    _equal_trees((resumed.result_, resumed.history_), (plain.result_, plain.history_))
    again = jaxsel.SparseBottleneck(**est).fit(xp, yp, checkpoint=path)  # the file holds a finished fit
    _equal_trees(again.result_, plain.result_)
    np.testing.assert_array_equal(again.predict(xp), plain.predict(xp))
    with pytest.raises(ValueError, match="other settings or other data"):
        jaxsel.SparseBottleneck(**{**est, "lasso": 0.2}).fit(xp, yp, checkpoint=path)
    with pytest.raises(ValueError, match="checkpoint_every"):
        jaxsel.SparseBottleneck(**est).fit(xp, yp, checkpoint=tmp_path / "c.npz", checkpoint_every=0)


def test_gene_cross_validations_checkpointed_equal_the_plain_ones(tmp_path, monkeypatch):
    """stAI's and gimVI's held-out-gene protocols (all models one program) in checkpointed
    segments, killed after the first and resumed: the same result, bit for bit."""
    rng = np.random.default_rng(0)
    rho = rng.dirichlet(np.ones(16), size=120)
    xr, xs = rng.poisson(rho * 600), rng.poisson(rho[:, :8] / rho[:, :8].sum(1, keepdims=True) * 80)
    genes = np.array([f"g{i}" for i in range(16)])
    gkw = dict(ref_genes=genes, spatial_genes=genes[:8], gene_folds=2, n_seeds=2)
    est = dict(max_epochs=5, batch_size=32, hidden=16, random_state=0)
    plain = jaxsel.GimVI(**est).cross_validate_genes(xr, xs, **gkw)
    path = tmp_path / "gcv.npz"
    with _killed_after_checkpoints(monkeypatch, 1), pytest.raises(KeyboardInterrupt):
        jaxsel.GimVI(**est).cross_validate_genes(xr, xs, **gkw, checkpoint=path, checkpoint_every=2)
    resumed = jaxsel.GimVI(**est).cross_validate_genes(xr, xs, **gkw, checkpoint=path, checkpoint_every=2)
    _equal_trees(resumed, plain)
    with pytest.raises(ValueError, match="other settings or other data"):
        jaxsel.GimVI(**{**est, "hidden": 8}).cross_validate_genes(xr, xs, **gkw, checkpoint=path)

    a, b, _ = datasets.make_spatial_pair(n_spatial=80, n_ref=80, n_genes=20, n_measured=12, n_types=3, random_state=3)
    skw = dict(coords=a.obsm["spatial"], spatial_genes=a.var_names, ref_genes=b.var_names, gene_folds=2)
    sest = dict(n_calibration_folds=2, epochs=5, random_state=0)
    labels = np.asarray(b.obs["cell_type"])
    splain = jaxsel.StAI(**sest).cross_validate_genes(a.X, b.X, labels, **skw)
    spath = tmp_path / "scv.npz"
    with _killed_after_checkpoints(monkeypatch, 1), pytest.raises(KeyboardInterrupt):
        jaxsel.StAI(**sest).cross_validate_genes(a.X, b.X, labels, **skw, checkpoint=spath, checkpoint_every=2)
    sres = jaxsel.StAI(**sest).cross_validate_genes(a.X, b.X, labels, **skw, checkpoint=spath, checkpoint_every=2)
    _equal_trees(sres, splain)


def test_sparse_bottleneck_cross_validation_resumes_every_fold(paired, tmp_path, monkeypatch):
    """The fold-parallel schedule checkpointed (a stage ends when every fold has ended it):
    killed after three segments and resumed, it equals the uninterrupted checkpointed run
    bit for bit; against the one-program CV, genes, parameters' outcomes and training
    histories are equal bit for bit and the test-fold metrics to float32 rounding (XLA
    rounds that evaluation differently in the stage programs)."""
    xp, yp, _ = paired
    est = dict(n_genes=3, hidden=(8, 4), n_clusters=4, batch_size=16, random_state=0,
               epochs={"pretrain": 3, "frozen": 2, "unfrozen": 2, "finetune": 2, "ae": 1})
    plain = jaxsel.SparseBottleneck(**est).cross_validate(xp, yp, n_folds=3)
    whole = jaxsel.SparseBottleneck(**est).cross_validate(xp, yp, n_folds=3, checkpoint=tmp_path / "w.npz",
                                                          checkpoint_every=2)
    path = tmp_path / "sbcv.npz"
    with _killed_after_checkpoints(monkeypatch, 3), pytest.raises(KeyboardInterrupt):
        jaxsel.SparseBottleneck(**est).cross_validate(xp, yp, n_folds=3, checkpoint=path, checkpoint_every=2)
    resumed = jaxsel.SparseBottleneck(**est).cross_validate(xp, yp, n_folds=3, checkpoint=path, checkpoint_every=2)
    _equal_trees({k: v for k, v in resumed.items() if k != "test_indices"},
                 {k: v for k, v in whole.items() if k != "test_indices"})
    np.testing.assert_array_equal(resumed["genes"], plain["genes"])
    for k, v in plain["history"].items():
        if k.startswith("test"):
            np.testing.assert_allclose(resumed["history"][k], v, rtol=0, atol=1e-6)
        else:
            np.testing.assert_array_equal(resumed["history"][k], v)
    with pytest.raises(ValueError, match="other settings or other data"):
        jaxsel.SparseBottleneck(**est).selection_stability(xp, yp, n_restarts=3, checkpoint=path)


def test_paths_and_flags_are_checked(marker_data, tmp_path):
    counts, x, y = marker_data
    with pytest.raises(FileNotFoundError, match="no jaxsel estimator file"):
        jaxsel.load(tmp_path / "absent.npz")
    with pytest.raises(TypeError, match="path must be a file path"):
        jaxsel.load(3)
    est = jaxsel.MarkerMap(**_SMALL)
    with pytest.raises(TypeError, match="checkpoint must be a file path"):
        est.fit(x, y, checkpoint=7)
    with pytest.raises(TypeError, match="verbose must be a bool"):
        jaxsel.MarkerMap(**{**_SMALL, "verbose": "yes"}).fit(x, y)
    with pytest.raises(TypeError, match="verbose must be a bool"):
        jaxsel.GimVI(verbose=1).fit(counts[:, :10] + 1, counts[:, :5] + 1, ref_genes=[f"g{i}" for i in range(10)],
                                    spatial_genes=[f"g{i}" for i in range(5)])

"""Tests for jaxsel.tl: scanpy-style functions on AnnData.

The neural fits use the data shape and settings of tests/test_estimators.py, so a
session running both files compiles each program once.
"""

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import jaxsel
from jaxsel import datasets, preprocessing, tl
from jaxsel.estimators import DEMarkers, GlobalGumbelVAE, MarkerMap, RandomMarkers

N_MARKERS = 8
FIT = dict(hidden_size=16, max_epochs=15, min_epochs=3, patience=3, learning_rate=3e-3,
           batch_size=64, random_state=0)


@pytest.fixture
def adata():
    """Preprocessed X (MarkerMap recipe); raw and log-normalised counts as layers."""
    ad = datasets.make_markers(
        n_cells=400, n_genes=60, n_types=4, n_markers_per_type=2, n_xor_genes=0,
        random_state=0, return_anndata=True,
    )
    counts = ad.X.copy()
    ad.X, _ = preprocessing.markermap_recipe(counts)
    ad.layers["counts"] = counts
    ad.layers["log"] = preprocessing.log1p(preprocessing.normalize_total(counts))
    ad.uns["something"] = {"keep": 1}
    return ad


def _snapshot(ad):
    return {
        "X": ad.X.copy(),
        "obs": ad.obs.copy(),
        "var": ad.var.copy(),
        "obsm": {k: np.array(v) for k, v in ad.obsm.items()},
        "layers": {k: np.array(v) for k, v in ad.layers.items()},
        "uns_keys": set(ad.uns.keys()),
        "shape": ad.shape,
    }


def _assert_untouched_except(ad, snap, key=None):
    """Everything equals the snapshot, except the documented entries under ``key``."""
    assert ad.shape == snap["shape"]
    np.testing.assert_array_equal(ad.X, snap["X"])
    pd.testing.assert_frame_equal(ad.obs, snap["obs"])
    assert set(ad.obsm.keys()) == set(snap["obsm"])
    for k, v in snap["obsm"].items():
        np.testing.assert_array_equal(ad.obsm[k], v)
    assert set(ad.layers.keys()) == set(snap["layers"])
    for k, v in snap["layers"].items():
        np.testing.assert_array_equal(ad.layers[k], v)
    new_var = [] if key is None else [key, f"{key}_score"]
    assert list(ad.var.columns) == list(snap["var"].columns) + new_var
    pd.testing.assert_frame_equal(ad.var[list(snap["var"].columns)], snap["var"])
    assert set(ad.uns.keys()) == snap["uns_keys"] | ({key} if key else set())


def test_markermap_writes_only_documented_keys(adata):
    snap = _snapshot(adata)
    out = tl.markermap(adata, n_markers=N_MARKERS, labels_key="cell_type", **FIT)
    assert out is None
    _assert_untouched_except(adata, snap, "markermap")
    sel = adata.var["markermap"]
    assert sel.dtype == bool and sel.sum() == N_MARKERS
    assert adata.var["markermap_score"].dtype == np.float64
    uns = adata.uns["markermap"]
    assert set(uns) == {"params", "markers", "history", "n_epochs", "learning_rate"}
    assert len(uns["markers"]) == N_MARKERS and set(uns["markers"]) == set(adata.var_names[sel])
    assert uns["params"]["objective"] == "supervised" and uns["params"]["n_markers"] == N_MARKERS
    assert uns["learning_rate"] == pytest.approx(3e-3)
    assert all(isinstance(v, list) and len(v) == uns["n_epochs"] for v in uns["history"].values())
    # Same as the estimator on the same matrix and labels.
    est = MarkerMap(n_markers=N_MARKERS, **FIT).fit(adata.X, adata.obs["cell_type"])
    assert uns["markers"] == adata.var_names[est.markers_].tolist()
    np.testing.assert_allclose(adata.var["markermap_score"], est.scores_)
    planted = set(adata.var_names[adata.var["planted_marker"]])
    assert len(set(uns["markers"]) & planted) >= 6


def test_copy_leaves_input_untouched(adata):
    snap = _snapshot(adata)
    out = tl.markermap(adata, N_MARKERS, "cell_type", key_added="mm", copy=True, **FIT)
    _assert_untouched_except(adata, snap)
    assert isinstance(out, anndata.AnnData)
    assert out.var["mm"].sum() == N_MARKERS and "mm_score" in out.var and "mm" in out.uns
    _assert_untouched_except(out, snap, "mm")


def test_sparse_x_same_result(adata):
    dense = tl.markermap(adata, N_MARKERS, "cell_type", copy=True, **FIT)
    adata.X = sp.csr_matrix(adata.X)
    sparse = tl.markermap(adata, N_MARKERS, "cell_type", copy=True, **FIT)
    assert sparse.uns["markermap"]["markers"] == dense.uns["markermap"]["markers"]
    assert sp.issparse(adata.X)


def test_global_gumbel_unsupervised_and_h5ad_round_trip(adata, tmp_path):
    snap = _snapshot(adata)
    tl.global_gumbel_vae(adata, N_MARKERS, **FIT)
    _assert_untouched_except(adata, snap, "global_gumbel_vae")
    uns = adata.uns["global_gumbel_vae"]
    assert uns["params"]["objective"] == "unsupervised"
    est = GlobalGumbelVAE(n_markers=N_MARKERS, **FIT).fit(adata.X)
    assert uns["markers"] == adata.var_names[est.markers_].tolist()
    path = tmp_path / "a.h5ad"
    adata.write_h5ad(path)
    back = anndata.read_h5ad(path)
    assert list(back.uns["global_gumbel_vae"]["markers"]) == uns["markers"]
    assert back.var["global_gumbel_vae"].sum() == N_MARKERS


def test_objective_defaults_and_label_errors(adata):
    snap = _snapshot(adata)
    with pytest.raises(KeyError, match="labels_key='nope' is not a column of adata.obs"):
        tl.markermap(adata, N_MARKERS, "nope", **FIT)
    with pytest.raises(ValueError, match="labels_key is required"):
        tl.markermap(adata, N_MARKERS, objective="supervised", **FIT)
    with pytest.raises(ValueError, match="labels_key is required"):
        tl.concrete_vae(adata, N_MARKERS, objective="joint", **FIT)
    with pytest.raises(KeyError, match="layer='nope' is not in adata.layers"):
        tl.markermap(adata, N_MARKERS, "cell_type", layer="nope", **FIT)
    with pytest.raises(ValueError, match="n_markers"):
        tl.markermap(adata, 0, "cell_type", **FIT)
    with pytest.raises(TypeError, match="adata must be an anndata.AnnData"):
        tl.markermap(adata.X, N_MARKERS)
    with pytest.raises(ValueError, match="labels_key is required"):
        tl.de_markers(adata, N_MARKERS)
    with pytest.raises(ValueError, match="Negative values"):
        tl.hvg_markers(adata, N_MARKERS)  # X is scaled; HVG needs log-normalised data
    _assert_untouched_except(adata, snap)  # nothing written on failure


def test_de_markers_from_layer(adata):
    snap = _snapshot(adata)
    tl.de_markers(adata, N_MARKERS, "cell_type", method="wilcoxon", layer="log")
    _assert_untouched_except(adata, snap, "de_markers")
    uns = adata.uns["de_markers"]
    assert set(uns) == {"params", "markers"} and uns["params"]["method"] == "wilcoxon"
    est = DEMarkers(n_markers=N_MARKERS, method="wilcoxon").fit(
        adata.layers["log"], adata.obs["cell_type"]
    )
    assert uns["markers"] == adata.var_names[est.markers_].tolist()
    assert set(uns["markers"]) == set(adata.var_names[adata.var["planted_marker"]])


def test_hvg_and_random_markers(adata):
    snap = _snapshot(adata)
    tl.hvg_markers(adata, N_MARKERS, layer="log", key_added="hvg")
    tl.random_markers(adata, N_MARKERS, random_state=3)
    assert list(adata.var.columns) == list(snap["var"].columns) + [
        "hvg", "hvg_score", "random_markers", "random_markers_score"
    ]
    assert adata.var["hvg"].sum() == N_MARKERS
    assert adata.uns["hvg"]["params"]["n_bins"] == 20
    rnd = RandomMarkers(n_markers=N_MARKERS, random_state=3).fit(adata.X)
    assert adata.uns["random_markers"]["markers"] == adata.var_names[rnd.markers_].tolist()
    assert adata.uns["random_markers"]["params"]["random_state"] == 3


def test_public_namespace():
    assert jaxsel.tl is tl and jaxsel.__version__ == "0.1.0"
    for name in ("MarkerMap", "ConcreteVAE", "GlobalGumbelVAE", "RandomMarkers", "HVGMarkers",
                 "DEMarkers", "datasets", "metrics", "preprocessing", "engine"):
        assert hasattr(jaxsel, name)


def test_sparse_bottleneck_writes_only_documented_keys():
    import anndata

    from jaxsel import datasets

    x, y, info = datasets.make_paired(n_cells=300, n_genes=40, n_outputs=4, n_informative=4, random_state=2)
    ad = anndata.AnnData(X=x.copy())
    ad.obsm["Y"] = y.copy()
    before_obs = set(ad.obs.columns)
    out = jaxsel.tl.sparse_bottleneck(
        ad, "Y", 4, schedule="straight", hidden=(16, 8), learning_rate=3e-3, lasso=0.03,
        epochs={"unfrozen": 20, "finetune": 5, "ae": 0}, random_state=0, copy=True,
    )
    assert "sparse_bottleneck" not in ad.var and "X_sparse_bottleneck" not in ad.obsm  # copy=True
    np.testing.assert_array_equal(ad.X, x)
    assert set(out.var.columns) == {"sparse_bottleneck", "sparse_bottleneck_score"}
    assert out.var["sparse_bottleneck"].sum() == 4
    assert out.obsm["X_sparse_bottleneck"].shape == (300, 2)
    assert set(out.obsm.keys()) == {"Y", "X_sparse_bottleneck"}
    assert set(out.obs.columns) == before_obs
    assert len(out.uns["sparse_bottleneck"]["markers"]) == 4
    assert "test_r2" in out.uns["sparse_bottleneck"]["history"]
    with pytest.raises(KeyError, match="y_key"):
        jaxsel.tl.sparse_bottleneck(ad, "ephys")


def _gimvi_pair():
    import anndata

    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 3))
    rho = np.exp(z @ rng.normal(size=(3, 30)))
    rho /= rho.sum(1, keepdims=True)
    ref = rng.poisson(rho[:200] * 500).astype(np.float32)
    sp = rng.poisson(rho[200:, :12] / rho[200:, :12].sum(1, keepdims=True) * 100).astype(np.float32)
    genes = [f"g{i}" for i in range(30)]
    a_ref = anndata.AnnData(ref, var=dict(gene=genes))
    a_ref.var_names = genes
    a_sp = anndata.AnnData(sp)
    a_sp.var_names = genes[:12]
    return a_ref, a_sp


def test_tl_gimvi_returns_imputed_anndata_and_leaves_inputs_alone():
    a_ref, a_sp = _gimvi_pair()
    before = (a_ref.copy(), a_sp.copy())
    out, est = jaxsel.tl.gimvi(a_ref, a_sp, n_samples=4, max_epochs=3, batch_size=32, return_estimator=True)
    assert out.shape == (a_sp.n_obs, 18)
    assert list(out.var_names) == [f"g{i}" for i in range(12, 30)]
    assert list(out.obs_names) == list(a_sp.obs_names)
    assert out.layers["variance"].shape == out.shape and (out.layers["variance"] >= 0).all()
    assert out.obsm["X_gimvi"].shape == (a_sp.n_obs, 10)
    assert out.uns["gimvi"]["spatial_genes"] == [f"g{i}" for i in range(12)]
    assert len(out.uns["gimvi"]["history"]["val_loss"]) == 3
    mean, _ = est.impute(n_samples=4)
    np.testing.assert_array_equal(out.X, mean)  # the same draws: one seed
    for a, b in zip(before, (a_ref, a_sp)):  # inputs untouched
        np.testing.assert_array_equal(a.X, b.X)
        assert list(a.obs.columns) == list(b.obs.columns) and list(a.obsm.keys()) == list(b.obsm.keys())
    named = jaxsel.tl.gimvi(a_ref, a_sp, genes=["g20", "g3"], n_samples=0, normalized=True, max_epochs=3,
                            batch_size=32)
    assert list(named.var_names) == ["g20", "g3"] and (named.layers["variance"] == 0).all()
    a_bad = a_sp.copy()
    a_bad.var_names = ["zz"] + [f"g{i}" for i in range(1, 12)]
    with pytest.raises(ValueError, match="not in the reference"):
        jaxsel.tl.gimvi(a_ref, a_bad, max_epochs=1, batch_size=32)

import numpy as np
import pytest

from jaxsel import datasets
from jaxsel.datasets import load_shared, make_markers, paper_dataset, shared_data_dir
from jaxsel.preprocessing import log1p, normalize_total


def _lognorm(x):
    return np.asarray(log1p(normalize_total(x)))


def _welch_t(xl, in_group):
    a, b = xl[in_group], xl[~in_group]
    se = np.sqrt(a.var(0, ddof=1) / len(a) + b.var(0, ddof=1) / len(b)) + 1e-12
    return (a.mean(0) - b.mean(0)) / se


@pytest.fixture(scope="module")
def toy():
    return make_markers(n_cells=600, n_genes=120, random_state=0)


def test_make_markers_shapes_and_counts(toy):
    x, y, info = toy
    assert x.shape == (600, 120) and x.dtype == np.float32
    assert y.shape == (600,) and y.dtype.kind == "i"
    assert np.all(x >= 0) and np.array_equal(x, np.round(x))
    np.testing.assert_array_equal(
        info["type_names"], ["type_0", "type_1", "type_2", "type_3", "type_4", "xor_0", "xor_1"]
    )
    # 30% XOR cells, the rest spread evenly over the 5 types
    counts = np.bincount(y, minlength=7)
    assert counts[5:].sum() == 180 and counts[:5].tolist() == [84] * 5
    assert info["marker_genes"].shape == (15,) and info["xor_genes"].shape == (2,)
    planted = np.concatenate([info["marker_genes"], info["xor_genes"]])
    assert len(np.unique(planted)) == 17 and planted.max() < 120
    assert info["gene_names"][0] == "gene_000" and len(info["gene_names"]) == 120
    for t in range(5):
        np.testing.assert_array_equal(
            info["markers_by_type"][f"type_{t}"], info["marker_genes"][3 * t : 3 * t + 3]
        )
    # library sizes around the default 2000
    assert 1500 < x.sum(1).mean() < 2500


def test_make_markers_is_deterministic():
    a = make_markers(n_cells=100, n_genes=40, random_state=5)
    b = make_markers(n_cells=100, n_genes=40, random_state=5)
    c = make_markers(n_cells=100, n_genes=40, random_state=6)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[2]["marker_genes"], b[2]["marker_genes"])
    assert not np.array_equal(a[0], c[0])


def test_planted_markers_are_top_genes_by_t_statistic(toy):
    x, y, info = toy
    xl = _lognorm(x)
    for t in range(5):
        tstat = _welch_t(xl, y == t)
        top = np.sort(np.argsort(-tstat)[:3])
        np.testing.assert_array_equal(top, info["markers_by_type"][f"type_{t}"])
        # and by a wide margin over every non-marker gene
        others = np.setdiff1d(np.arange(x.shape[1]), top)
        assert tstat[top].min() > 3 * tstat[others].max()


def test_xor_genes_are_only_jointly_informative(toy):
    x, y, info = toy
    xl = _lognorm(x)
    g, states = info["xor_genes"], info["xor_states"]
    xor0, xor1 = y == 5, y == 6
    for j, gene in enumerate(g):
        gap = xl[states[:, j] == 1, gene].mean() - xl[states[:, j] == 0, gene].mean()
        assert gap > 2.0  # each gene has a clear high / low state ...
        diff = xl[xor0, gene].mean() - xl[xor1, gene].mean()
        assert abs(diff) < 0.1 * gap  # ... that says nothing about xor_0 vs xor_1 alone
        # balanced states: exactly half of each subtype is high
        assert states[xor0, j].mean() == pytest.approx(0.5, abs=0.02)
        assert states[xor1, j].mean() == pytest.approx(0.5, abs=0.02)
    # jointly, the parity of the states is the subtype, exactly
    xor = xor0 | xor1
    np.testing.assert_array_equal(states[xor].sum(1) % 2, y[xor] - 5)
    # and it can be read off the expression of the XOR genes
    high = xl[:, g] > np.array([
        0.5 * (xl[states[:, j] == 1, gene].mean() + xl[states[:, j] == 0, gene].mean())
        for j, gene in enumerate(g)
    ])
    assert np.mean(high[xor].sum(1) % 2 == y[xor] - 5) > 0.95
    # the XOR genes do not separate the ordinary types
    for t in range(5):
        assert np.abs(_welch_t(xl, y == t)[g]).max() < 4


def test_make_markers_more_xor_genes_and_few_cells():
    x, y, info = make_markers(n_cells=60, n_genes=50, n_types=2, n_xor_genes=5, xor_fraction=0.2)
    xor = y >= 2
    assert set(np.unique(y[xor])) == {2, 3}  # both parities present with 12 cells < 2**5
    np.testing.assert_array_equal(info["xor_states"][xor].sum(1) % 2, y[xor] - 2)


def test_make_markers_without_xor():
    x, y, info = make_markers(n_cells=50, n_genes=30, n_types=3, n_xor_genes=0)
    assert info["type_names"].tolist() == ["type_0", "type_1", "type_2"]
    assert set(np.unique(y)) == {0, 1, 2} and info["xor_genes"].shape == (0,)
    assert info["xor_states"].shape == (50, 0)
    # Poisson counts when noise=0
    x0, _, _ = make_markers(n_cells=50, n_genes=30, noise=0.0)
    assert np.array_equal(x0, np.round(x0))


def test_make_markers_anndata(tmp_path):
    adata = make_markers(n_cells=80, n_genes=40, random_state=1, return_anndata=True)
    x, y, info = make_markers(n_cells=80, n_genes=40, random_state=1)
    np.testing.assert_array_equal(adata.X, x)
    assert adata.obs["cell_type"].dtype.name == "category"
    np.testing.assert_array_equal(adata.obs["cell_type"].to_numpy(), info["type_names"][y])
    assert adata.var_names[0] == "gene_000"
    np.testing.assert_array_equal(np.flatnonzero(adata.var["planted_marker"]),
                                  np.sort(info["marker_genes"]))
    np.testing.assert_array_equal(np.flatnonzero(adata.var["xor_gene"]), info["xor_genes"])
    assert adata.var["marker_of"].iloc[info["marker_genes"][0]] == "type_0"
    np.testing.assert_array_equal(adata.uns["planted"]["xor_genes"], info["xor_genes"])
    path = tmp_path / "toy.h5ad"
    adata.write_h5ad(path)
    back = load_shared("toy", data_dir=tmp_path)
    np.testing.assert_array_equal(back.X, x)
    np.testing.assert_array_equal(back.uns["planted"]["marker_genes"], info["marker_genes"])


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(n_genes=10), ValueError, "too small for the planted genes"),
        (dict(n_xor_genes=1), ValueError, "n_xor_genes"),
        (dict(xor_fraction=1.0), ValueError, "xor_fraction"),
        (dict(n_cells=True), TypeError, "n_cells"),
        (dict(noise=-1.0), ValueError, "noise"),
        (dict(library_size=0), ValueError, "library_size"),
        (dict(n_cells=10, xor_fraction=0.8), ValueError, "n_types"),
        (dict(n_types=1, n_xor_genes=0), ValueError, "at least 2 cell types"),
        (dict(n_cells=10, xor_fraction=0.12), ValueError, "at least 2"),
    ],
)
def test_make_markers_validates(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        make_markers(**kwargs)


# ----------------------------------------------------------------------------- shared data


def test_shared_data_dir_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSEL_DATA_DIR", str(tmp_path))
    assert shared_data_dir() == tmp_path.resolve()
    with pytest.raises(FileNotFoundError, match="paul15"):
        load_shared("paul15")
    monkeypatch.setenv("JAXSEL_DATA_DIR", str(tmp_path / "missing"))
    assert shared_data_dir() is None
    with pytest.raises(FileNotFoundError, match="JAXSEL_DATA_DIR"):
        load_shared("paul15")


def test_shared_data_dir_searches_upward_from_cwd(tmp_path, monkeypatch):
    data = tmp_path / "shared" / "data"
    data.mkdir(parents=True)
    make_markers(n_cells=20, n_genes=20, n_types=2, n_markers_per_type=2,
                 return_anndata=True).write_h5ad(data / "tiny.h5ad")
    repo = tmp_path / "main" / "sub"
    repo.mkdir(parents=True)
    monkeypatch.delenv("JAXSEL_DATA_DIR", raising=False)
    monkeypatch.chdir(repo)
    assert shared_data_dir() == data.resolve()
    assert load_shared("tiny").shape == (20, 20)


def test_load_shared_bad_name_or_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_shared("paul15", data_dir=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="Known names"):
        load_shared("no_such_dataset", data_dir=tmp_path)
    with pytest.raises(ValueError, match="paper_dataset"):
        paper_dataset("osmfish")
    with pytest.raises(TypeError, match="name"):
        load_shared(3)


def _real_data_dir():
    folder = shared_data_dir()
    if folder is None or not (folder / datasets.SHARED_FILES["paul15"]).is_file():
        pytest.skip("shared/data with the real datasets is not available")
    return folder


@pytest.mark.data
def test_load_shared_real_files():
    folder = _real_data_dir()
    for name, filename in datasets.SHARED_FILES.items():
        assert (folder / filename).is_file(), name
    osm = load_shared("osmfish")
    assert osm.shape == (4839, 33) and "spatial" in osm.obsm


@pytest.mark.data
def test_paper_dataset_paul15():
    _real_data_dir()
    x, y, genes = paper_dataset("paul15")
    assert x.shape == (2730, 3451) and x.dtype == np.float32 and isinstance(x, np.ndarray)
    assert np.array_equal(x, np.round(x)) and x.min() == 0
    assert y.shape == (2730,) and y.dtype.kind == "U"
    labels, counts = np.unique(y, return_counts=True)
    assert dict(zip(labels, counts))["Ery"] == 1095 and len(labels) == 10
    assert genes.shape == (3451,)


def test_reference_spatial_split_by_sections_and_stratified():
    from jaxsel import datasets as ds

    sections = np.array(["0", "1", "2", "2", "0", "1", "2"])
    ref, sp = ds.reference_spatial_split(sections=sections, reference_sections=[0, 1])
    np.testing.assert_array_equal(ref, [0, 1, 4, 5])
    np.testing.assert_array_equal(sp, [2, 3, 6])
    with pytest.raises(ValueError, match="reference_sections"):
        ds.reference_spatial_split(sections=sections, reference_sections=["7"])
    labels = np.repeat(["a", "b", "c"], [40, 20, 10])
    ref, sp = ds.reference_spatial_split(labels, spatial_fraction=0.5, random_state=3)
    assert np.intersect1d(ref, sp).size == 0 and ref.size + sp.size == 70
    for lab, n in (("a", 40), ("b", 20), ("c", 10)):
        assert (labels[sp] == lab).sum() == n // 2
    ref2, sp2 = ds.reference_spatial_split(labels, spatial_fraction=0.5, random_state=3)
    np.testing.assert_array_equal(sp, sp2)


def test_gene_folds_partition_and_capture_distortion():
    from jaxsel import datasets as ds

    loo = ds.gene_folds(5)
    assert [f.tolist() for f in loo] == [[0], [1], [2], [3], [4]]
    folds = ds.gene_folds(23, 10, random_state=1)
    allg = np.sort(np.concatenate(folds))
    np.testing.assert_array_equal(allg, np.arange(23))
    assert {len(f) for f in folds} == {2, 3}
    with pytest.raises(ValueError, match="n_folds"):
        ds.gene_folds(5, 6)
    x = np.ones((4, 3))
    x0 = x.copy()
    out, f = ds.capture_distortion(x, sd=0.5, random_state=0)
    np.testing.assert_allclose(out, np.ones((4, 1)) * f[None, :])
    np.testing.assert_array_equal(x, x0)
    assert np.all(f > 0) and not np.allclose(f, 1)


def test_capture_distortion_of_counts_thins_each_gene_binomially():
    import scipy.sparse as sp

    from jaxsel import datasets as ds

    rng = np.random.default_rng(0)
    x = rng.poisson(rng.uniform(0.5, 300.0, size=12), size=(400, 12)).astype(np.float32)
    x[:5] = 0
    x0 = x.copy()
    _, f = ds.capture_distortion(x, sd=0.5, random_state=4)
    out, p = ds.capture_distortion(x, sd=0.5, random_state=4, counts=True)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_allclose(p, f / f.max())  # the same efficiencies, as keep probabilities
    assert out.dtype == x.dtype and np.array_equal(out, np.round(out)) and (out >= 0).all() and (out <= x).all()
    top = int(np.argmax(p))
    np.testing.assert_array_equal(out[:, top], x[:, top])  # p = 1 keeps every molecule
    assert (out[:5] == 0).all()
    # binomial thinning: kept counts per gene ~ Binomial(total, p_g), within 5 sd
    tot, kept = x.sum(0).astype(np.float64), out.sum(0).astype(np.float64)
    assert np.all(np.abs(kept - tot * p) <= 5 * np.sqrt(tot * p * (1 - p)) + 1e-9)
    # sparse stays sparse CSR integer counts with the same per-gene expectation
    xs = sp.csc_matrix(x)
    outs, ps = ds.capture_distortion(xs, sd=0.5, random_state=4, counts=True)
    assert sp.isspmatrix_csr(outs) and (abs(xs - sp.csc_matrix(x0)).sum() == 0)
    np.testing.assert_array_equal(ps, p)
    d = outs.toarray()
    assert np.array_equal(d, np.round(d)) and (d <= x).all()
    np.testing.assert_array_equal(d[:, top], x[:, top])
    assert np.all(np.abs(d.sum(0) - tot * p) <= 5 * np.sqrt(tot * p * (1 - p)) + 1e-9)
    # no shift: sd = 0 keeps the counts
    np.testing.assert_array_equal(ds.capture_distortion(x, sd=0.0, counts=True)[0], x)
    with pytest.raises(ValueError, match="integer-valued"):
        ds.capture_distortion(x + 0.5, counts=True)
    with pytest.raises(ValueError, match="non-negative"):
        ds.capture_distortion(-x, counts=True)
    with pytest.raises(TypeError, match="counts must be a bool"):
        ds.capture_distortion(x, counts="yes")
    with pytest.raises(ValueError, match="2-D"):
        ds.capture_distortion(x[0], counts=True)

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsel import preprocessing as pp


@pytest.fixture
def counts():
    rng = np.random.default_rng(0)
    x = rng.poisson(rng.gamma(1.0, 2.0, size=(60, 25))).astype(np.float32)
    x[5] = 0.0  # an empty cell
    return x


# ----------------------------------------------------------------------------- gene filters


def _toy_presence():
    # 3 cells in group "a", 4 in group "b"; columns count detections.
    x = np.zeros((7, 5), dtype=np.float32)
    a, b = slice(0, 3), slice(3, 7)
    x[0, 0] = 5.0  # gene 0: 1/3 of a, 0/4 of b
    x[3:5, 1] = 1.0  # gene 1: 0/3 of a, 2/4 of b
    x[3, 2] = 1.0  # gene 2: 1/4 of b only
    x[a, 3] = 2.0
    x[b, 3] = 2.0  # gene 3: everywhere
    # gene 4: nowhere
    labels = np.array(["a"] * 3 + ["b"] * 4)
    return x, labels


def test_filter_genes_by_group_presence_known_values():
    x, labels = _toy_presence()
    keep = pp.filter_genes_by_group_presence(x, labels, min_fraction=0.3)
    # 1/3 >= 0.3 (gene 0); 2/4 >= 0.3 (gene 1); 1/4 < 0.3 (gene 2)
    np.testing.assert_array_equal(keep, [True, True, False, True, False])
    keep = pp.filter_genes_by_group_presence(x, labels, min_fraction=0.5)
    np.testing.assert_array_equal(keep, [False, True, False, True, False])
    keep = pp.filter_genes_by_group_presence(x, labels, min_fraction=0.0)
    assert keep.all()


def test_filter_general_genes_known_values():
    x, labels = _toy_presence()
    # gene 3 is detected in 100% of both groups -> general -> dropped.
    keep = pp.filter_general_genes(x, labels, detected_fraction=0.9, max_group_fraction=0.5)
    np.testing.assert_array_equal(keep, [True, True, True, False, True])
    # gene 1 is in 50% of b: general in 1 of 2 groups (= 0.5 >= 0.5) at detected_fraction 0.5
    keep = pp.filter_general_genes(x, labels, detected_fraction=0.5, max_group_fraction=0.5)
    np.testing.assert_array_equal(keep, [True, False, True, False, True])
    keep = pp.filter_general_genes(x, labels, detected_fraction=0.5, max_group_fraction=0.6)
    np.testing.assert_array_equal(keep, [True, True, True, False, True])


def test_filters_agree_on_sparse_and_dense(counts):
    labels = np.arange(counts.shape[0]) % 3
    for fn in (pp.filter_genes_by_group_presence, pp.filter_general_genes):
        dense = fn(counts, labels)
        for fmt in ("csr", "csc"):
            np.testing.assert_array_equal(fn(sp.csr_matrix(counts).asformat(fmt), labels), dense)


def test_filters_validate_arguments(counts):
    labels = np.arange(counts.shape[0]) % 3
    with pytest.raises(ValueError, match="min_fraction"):
        pp.filter_genes_by_group_presence(counts, labels, min_fraction=1.5)
    with pytest.raises(ValueError, match="labels"):
        pp.filter_genes_by_group_presence(counts, labels[:-1])
    with pytest.raises(ValueError, match="max_group_fraction"):
        pp.filter_general_genes(counts, labels, max_group_fraction=-0.1)


# ----------------------------------------------------------------------------- normalize / log1p


def test_normalize_total_sums_and_zero_cells(counts):
    before = counts.copy()
    out = pp.normalize_total(counts, target_sum=1e4)
    assert out.dtype == np.float32 and isinstance(out, np.ndarray)
    sums = out.sum(axis=1)
    nonzero = counts.sum(axis=1) > 0
    np.testing.assert_allclose(sums[nonzero], 1e4, rtol=1e-5)
    assert np.all(out[~nonzero] == 0) and np.isfinite(out).all()
    # proportions within a cell are kept
    i = 0
    np.testing.assert_allclose(out[i], counts[i] / counts[i].sum() * 1e4, rtol=1e-5)
    np.testing.assert_array_equal(counts, before)  # input untouched


def test_normalize_total_median_target(counts):
    totals = counts.sum(axis=1)
    out = pp.normalize_total(counts, target_sum=None)
    expected = np.median(totals[totals > 0])
    np.testing.assert_allclose(out.sum(axis=1)[totals > 0], expected, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo"])
def test_normalize_total_and_log1p_keep_sparse_format(counts, fmt):
    xs = sp.csr_matrix(counts).asformat(fmt)
    data_before = xs.copy()
    out = pp.normalize_total(xs)
    assert sp.issparse(out) and out.format == fmt and out.dtype == np.float32
    np.testing.assert_allclose(out.toarray(), pp.normalize_total(counts), rtol=1e-6)
    lg = pp.log1p(out)
    assert sp.issparse(lg) and lg.format == fmt
    np.testing.assert_allclose(lg.toarray(), np.log1p(out.toarray()), rtol=1e-6)
    np.testing.assert_array_equal(xs.toarray(), data_before.toarray())


def test_log1p_values_and_base(counts):
    np.testing.assert_allclose(pp.log1p(counts), np.log1p(counts), rtol=1e-6)
    np.testing.assert_allclose(pp.log1p(counts, base=2), np.log2(1 + counts), rtol=1e-6)
    np.testing.assert_allclose(pp.log1p(np.array([[1.0, 3.0, 7.0]]), base=2), [[1, 2, 3]])


def test_transforms_reject_bad_input(counts):
    with pytest.raises(ValueError, match="non-negative"):
        pp.normalize_total(-counts - 1)
    with pytest.raises(ValueError, match="non-negative"):
        pp.log1p(np.array([[-2.0, 1.0]]))
    with pytest.raises(ValueError, match="target_sum"):
        pp.normalize_total(counts, target_sum=0)
    with pytest.raises(ValueError, match="base"):
        pp.log1p(counts, base=1)
    with pytest.raises(TypeError, match="base"):
        pp.log1p(counts, base="e")
    with pytest.raises(ValueError, match="2-D"):
        pp.log1p(np.ones(3))


# ----------------------------------------------------------------------------- scale


def test_scale_matches_numpy_reference(counts):
    x = np.log1p(counts)
    x[:, 3] = 2.0  # a constant gene
    out, mean, std = pp.scale(x, max_value=None)
    ref_std = x.std(axis=0, ddof=1)
    ref_std[ref_std == 0] = 1
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, ref_std, rtol=1e-5)
    np.testing.assert_allclose(out, (x - x.mean(0)) / ref_std, rtol=1e-4, atol=1e-5)
    assert std[3] == 1.0 and np.all(out[:, 3] == 0)
    assert out.dtype == np.float32 and mean.dtype == np.float32
    np.testing.assert_allclose(out.std(axis=0, ddof=1)[np.arange(25) != 3], 1.0, rtol=1e-4)


def test_scale_clips_both_sides():
    x = np.zeros((101, 1), dtype=np.float32)
    x[0] = 100.0  # one outlier: z = (100 - ~1) / ~10 ~ 9.9, others ~ -0.1
    x2 = np.concatenate([x, -x], axis=1)
    out, _, _ = pp.scale(x2, max_value=1.0)
    assert out.max() == 1.0 and out.min() == -1.0
    out, _, _ = pp.scale(x2, max_value=None)
    assert out.max() > 9 and out.min() < -9


def test_scale_sparse_equals_dense_and_no_center(counts):
    dense = pp.scale(counts)
    sparse = pp.scale(sp.csr_matrix(counts))
    for a, b in zip(dense, sparse):
        assert isinstance(b, np.ndarray)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    out, _, std = pp.scale(counts, zero_center=False, max_value=None)
    np.testing.assert_allclose(out, counts / std, rtol=1e-5)


def test_scale_applies_given_statistics(counts):
    train, test = counts[:40], counts[40:]
    _, mean, std = pp.scale(train, max_value=None)
    out, m2, s2 = pp.scale(test, max_value=None, mean=mean, std=std)
    np.testing.assert_allclose(out, (test - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(m2, mean)
    with pytest.raises(ValueError, match="together"):
        pp.scale(test, mean=mean)
    with pytest.raises(ValueError, match="shape"):
        pp.scale(test, mean=mean[:3], std=std[:3])
    with pytest.raises(ValueError, match="at least 2 cells"):
        pp.scale(test[:1])
    with pytest.raises(ValueError, match="max_value"):
        pp.scale(test, max_value=0)


# ----------------------------------------------------------------------------- recipe


def test_markermap_recipe_equals_manual_chain(counts):
    labels = np.arange(counts.shape[0]) % 4
    out, mask = pp.markermap_recipe(counts, labels, min_fraction=0.3)
    keep = pp.filter_genes_by_group_presence(counts, labels, 0.3)
    np.testing.assert_array_equal(mask, keep)
    manual = pp.scale(pp.log1p(pp.normalize_total(counts[:, keep], 1e4)), max_value=10)[0]
    np.testing.assert_allclose(out, manual, rtol=1e-5, atol=1e-5)
    assert out.shape == (counts.shape[0], keep.sum()) and np.abs(out).max() <= 10

    out2, mask2 = pp.markermap_recipe(sp.csr_matrix(counts))
    assert mask2.all() and out2.shape == counts.shape
    with pytest.raises(ValueError, match="labels"):
        pp.markermap_recipe(counts, min_fraction=0.3)


# ----------------------------------------------------------------------------- splits


def _assert_partition(parts, n):
    allidx = np.concatenate(parts)
    assert allidx.shape[0] == n
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))


def test_split_indices_sizes_and_determinism():
    train, val, test = pp.split_indices(101, (0.7, 0.1, 0.2), random_state=3)
    assert (len(train), len(val), len(test)) == (70, 10, 21)
    _assert_partition((train, val, test), 101)
    again = pp.split_indices(101, (0.7, 0.1, 0.2), random_state=3)
    for a, b in zip((train, val, test), again):
        np.testing.assert_array_equal(a, b)
    other = pp.split_indices(101, (0.7, 0.1, 0.2), random_state=4)
    assert not np.array_equal(other[0], train)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 300),
    a=st.floats(0.0, 1.0),
    b=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_indices_always_partitions(n, a, b, seed):
    f1 = a
    f2 = (1 - a) * b
    parts = pp.split_indices(n, (f1, f2, max(0.0, 1 - f1 - f2)), random_state=seed)
    _assert_partition(parts, n)
    assert len(parts[0]) == int(f1 * n) and len(parts[1]) == int(f2 * n)


def test_split_indices_stratified_keeps_proportions_and_rare_classes():
    labels = np.repeat(["big", "mid", "rare"], [500, 100, 2])
    train, val, test = pp.split_indices(labels, (0.7, 0.1, 0.2), random_state=0, stratify=True)
    _assert_partition((train, val, test), labels.shape[0])
    assert (len(train), len(val)) == (int(0.7 * 602), int(0.1 * 602))
    for part, frac in ((train, 0.7), (val, 0.1), (test, 0.2)):
        counts = {c: np.sum(labels[part] == c) for c in ("big", "mid")}
        assert abs(counts["big"] - frac * 500) <= 2
        assert abs(counts["mid"] - frac * 100) <= 2
    # a singleton class lands in train
    labels = np.array([0] * 30 + [1] * 30 + [2])
    for seed in range(5):
        train, _, _ = pp.split_indices(labels, random_state=seed, stratify=True)
        assert set(labels[train]) == {0, 1, 2}


def test_split_indices_errors():
    with pytest.raises(ValueError, match="sum to 1"):
        pp.split_indices(10, (0.7, 0.1))
    with pytest.raises(ValueError, match="non-negative"):
        pp.split_indices(10, (1.2, -0.2))
    with pytest.raises(ValueError, match="needs labels"):
        pp.split_indices(10, stratify=True)
    with pytest.raises(TypeError, match="n_or_labels"):
        pp.split_indices(10.0)
    with pytest.raises(ValueError, match=">= 1"):
        pp.split_indices(0)


def test_kfold_indices_partitions_and_validation():
    folds = pp.kfold_indices(53, 5, random_state=1, validation_fraction=0.2)
    assert len(folds) == 5
    tests = [f[2] for f in folds]
    _assert_partition(tests, 53)
    assert sorted(len(t) for t in tests) == [10, 10, 11, 11, 11]
    for train, val, test in folds:
        _assert_partition((train, val, test), 53)
        n_rest = 53 - len(test)
        assert len(train) == int(0.8 * n_rest)
    folds0 = pp.kfold_indices(53, 5, random_state=1)
    for train, val, test in folds0:
        assert val.shape == (0,)
        _assert_partition((train, test), 53)


def test_kfold_indices_stratified():
    labels = np.repeat([0, 1, 2], [40, 20, 10])
    folds = pp.kfold_indices(labels, 5, random_state=0, stratify=True, validation_fraction=0.25)
    _assert_partition([f[2] for f in folds], 70)
    for train, val, test in folds:
        np.testing.assert_array_equal(np.bincount(labels[test], minlength=3), [8, 4, 2])
        assert set(labels[val]) == {0, 1, 2}
        _assert_partition((train, val, test), 70)


def test_kfold_indices_errors():
    with pytest.raises(ValueError, match="n_folds"):
        pp.kfold_indices(10, 1)
    with pytest.raises(ValueError, match="n_folds"):
        pp.kfold_indices(3, 4)
    with pytest.raises(TypeError, match="n_folds"):
        pp.kfold_indices(10, 2.0)
    with pytest.raises(ValueError, match="validation_fraction"):
        pp.kfold_indices(10, 2, validation_fraction=1.0)


def test_sbnn_recipe_matches_the_papers_numpy_steps():
    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, size=(50, 20)).astype(np.float64)
    counts[:, 5] = 2.0  # a constant gene stays finite (zero)
    y = rng.normal(size=(50, 3)) * [1.0, 5.0, 0.1] + 7.0
    c0, y0 = counts.copy(), y.copy()
    xp, yp = pp.sbnn_recipe(counts, y)
    tot = counts.sum(1, keepdims=True)
    want = np.log2(counts / tot * np.median(tot) + 1)
    sd = want.std(0)
    want = (want - want.mean(0)) / np.where(sd > 0, sd, 1)
    np.testing.assert_allclose(xp, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(yp, (y - y.mean(0)) / y.std(0), rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(xp[:, 5]))
    np.testing.assert_array_equal(counts, c0)
    np.testing.assert_array_equal(y, y0)
    with pytest.raises(ValueError, match="same number of cells"):
        pp.sbnn_recipe(counts, y[:10])
    y_nan = y.copy()
    y_nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pp.sbnn_recipe(counts, y_nan)


def test_pretraining_clusters_use_training_cells_only():
    rng = np.random.default_rng(1)
    centres = rng.normal(scale=10, size=(4, 2))
    y = np.concatenate([c + rng.normal(size=(30, 2)) for c in centres] + [[[100.0, 100.0]] * 3])
    train_sets = [np.arange(0, 123, 1)[np.arange(123) % 3 != k] for k in range(3)]
    clusters, pre_tr, pre_va = pp.pretraining_clusters(y, train_sets, n_clusters=5, min_cluster_size=10,
                                                       val_fraction=0.4, random_state=0)
    assert clusters.shape == (3, 123)
    for k, train in enumerate(train_sets):
        outside = np.setdiff1d(np.arange(123), train)
        assert np.all(clusters[k, outside] == -1)
        assert np.all(clusters[k, train] >= 0)
        used = np.concatenate([pre_tr[k], pre_va[k]])
        assert np.intersect1d(pre_tr[k], pre_va[k]).size == 0
        assert np.all(np.isin(used, train))
        # the 3 outlier cells form a cluster under 10 cells and are left out
        assert not np.any(np.isin([120, 121, 122], used))
        assert abs(len(pre_va[k]) / len(used) - 0.4) < 0.02
    with pytest.raises(ValueError, match="n_clusters"):
        pp.pretraining_clusters(y, train_sets, n_clusters=1)

"""Tests for jaxsel.methods.baselines: random, Seurat HVG and one-vs-rest DE markers."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import scipy.stats

from jaxsel.methods import baselines as bl

# --------------------------------------------------------------------------------------
# data and numpy references
# --------------------------------------------------------------------------------------


def _count_data(seed=0, n_cells=90, n_genes=24, n_classes=3):
    """log1p Poisson counts with many zeros (ties), plus a constant and an all-zero gene."""
    rng = np.random.default_rng(seed)
    rates = rng.uniform(0.1, 3.0, size=n_genes)
    x = np.log1p(rng.poisson(rates, size=(n_cells, n_genes))).astype(np.float32)
    x[:, 0] = 0.0
    x[:, 1] = 2.5
    y = np.repeat(np.arange(n_classes), n_cells // n_classes)
    y = rng.permutation(y)
    return x, y


def _gaussian_data(seed=1, n_cells=70, n_genes=20, n_classes=4):
    """Continuous data with negative values, a large offset and unequal group sizes."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_cells, n_genes)) * rng.uniform(0.5, 3.0, size=n_genes)
    x[:, :5] += 40.0  # large offset: float32 moments must not cancel
    y = rng.choice(n_classes, size=n_cells, p=[0.1, 0.2, 0.3, 0.4])
    x[y == 2, 7] += 2.0
    return x.astype(np.float32), y


def _nan_to_zero(a):
    return np.where(np.isnan(a), 0.0, a)


@np.errstate(invalid="ignore", divide="ignore")
def _ttest_reference(x, y, n_classes, overestim_var=False):
    x = x.astype(np.float64)
    out = []
    for c in range(n_classes):
        g, r = x[y == c], x[y != c]
        if overestim_var:
            den = np.sqrt(g.var(0, ddof=1) / len(g) + r.var(0, ddof=1) / len(g))
            t = (g.mean(0) - r.mean(0)) / den
        else:
            with warnings.catch_warnings():  # constant genes: scipy warns, then gives NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                t = scipy.stats.ttest_ind(g, r, equal_var=False, axis=0).statistic
        out.append(_nan_to_zero(t))
    return np.stack(out)


def _wilcoxon_reference(x, y, n_classes):
    """Tie-corrected rank-sum z by hand from scipy.stats.rankdata / tiecorrect."""
    n = len(y)
    out = np.zeros((n_classes, x.shape[1]))
    for j in range(x.shape[1]):
        ranks = scipy.stats.rankdata(x[:, j].astype(np.float64))
        tie = scipy.stats.tiecorrect(ranks)
        for c in range(n_classes):
            n_g = np.sum(y == c)
            n_r = n - n_g
            num = ranks[y == c].sum() - n_g * (n + 1) / 2.0
            den = np.sqrt(tie * n_g * n_r * (n + 1) / 12.0)
            out[c, j] = num / den if den > 0 else 0.0
    return out


def _hvg_frame(x_log, n_bins):
    """Every gene's log1p mean, log dispersion and mean bin, in float64 (pandas, as the
    Seurat-flavour recipe computes them)."""
    counts = np.expm1(np.asarray(x_log, np.float64))
    mean = counts.mean(0)
    var = counts.var(0, ddof=1)
    mean[mean == 0] = 1e-12
    disp = var / mean
    disp[disp == 0] = np.nan
    df = pd.DataFrame({"means": np.log1p(mean), "dispersions": np.log(disp)})
    df["mean_bin"] = pd.cut(df["means"], bins=n_bins)
    return df


def _hvg_reference(x_log, n_bins):
    """Straight pandas transcription of the Seurat-flavour recipe."""
    df = _hvg_frame(x_log, n_bins)
    grouped = df.groupby("mean_bin", observed=True)["dispersions"]
    avg, dev = grouped.mean(), grouped.std(ddof=1)
    one_gene = dev.isnull()
    dev[one_gene] = avg[one_gene]
    avg[one_gene] = 0.0
    bins = df["mean_bin"]
    norm = (df["dispersions"].to_numpy() - avg.loc[bins].to_numpy()) / dev.loc[bins].to_numpy()
    order = np.argsort(-norm, kind="stable")  # NaN last, ties lowest index first
    return order, norm


def _planted_de_data(seed=0):
    """4 cell types x 40 cells, 50 genes; type t up-regulates planted[2t], planted[2t+1]."""
    rng = np.random.default_rng(seed)
    n_types, n_per, n_genes = 4, 40, 50
    planted = np.array([3, 17, 8, 41, 22, 30, 11, 47])
    y = np.repeat(np.arange(n_types), n_per)
    rates = np.full((n_types * n_per, n_genes), 2.0)
    for t in range(n_types):
        rates[np.ix_(y == t, planted[2 * t : 2 * t + 2])] = 30.0
    x = np.log1p(rng.poisson(rates)).astype(np.float32)
    perm = rng.permutation(len(y))
    return x[perm], y[perm], planted


def _assert_valid_markers(markers, n_markers, n_genes):
    assert isinstance(markers, jax.Array)
    assert markers.dtype == jnp.int32
    assert markers.shape == (n_markers,)
    m = np.asarray(markers)
    assert len(np.unique(m)) == n_markers
    assert m.min() >= 0 and m.max() < n_genes


# --------------------------------------------------------------------------------------
# random
# --------------------------------------------------------------------------------------


def test_random_markers_deterministic_per_key_and_differs_across_keys():
    a = bl.random_markers(jax.random.key(0), 1000, 10)
    b = bl.random_markers(jax.random.key(0), 1000, 10)
    c = bl.random_markers(jax.random.key(1), 1000, 10)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    _assert_valid_markers(a, 10, 1000)


def test_random_markers_all_genes_is_a_permutation():
    m = bl.random_markers(jax.random.key(3), 30, 30)
    np.testing.assert_array_equal(np.sort(np.asarray(m)), np.arange(30))


@pytest.mark.parametrize("n_markers", [0, 31])
def test_random_markers_rejects_bad_n_markers(n_markers):
    with pytest.raises(ValueError, match="n_markers"):
        bl.random_markers(jax.random.key(0), 30, n_markers)


# --------------------------------------------------------------------------------------
# exactly n_markers distinct genes, every baseline
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_markers", [1, "all"])
@pytest.mark.parametrize(
    "baseline", ["random", "hvg", "t-test", "t-test_overestim_var", "wilcoxon"]
)
def test_every_baseline_returns_n_distinct_markers(baseline, n_markers):
    x, y = _count_data()
    n_genes = x.shape[1]
    n_markers = n_genes if n_markers == "all" else n_markers
    if baseline == "random":
        markers = bl.random_markers(jax.random.key(0), n_genes, n_markers)
    elif baseline == "hvg":
        markers, _ = bl.highly_variable_genes(x, n_markers)
    else:
        markers = bl.de_markers(x, y, 3, n_markers, method=baseline)
    _assert_valid_markers(markers, n_markers, n_genes)


# --------------------------------------------------------------------------------------
# highly variable genes
# --------------------------------------------------------------------------------------


def _hvg_data(seed=2, n_cells=120, n_genes=80):
    rng = np.random.default_rng(seed)
    rates = np.exp(rng.uniform(np.log(0.05), np.log(15.0), size=n_genes))
    shape = rng.uniform(0.3, 5.0, size=n_genes)  # gamma-Poisson: varied dispersions
    lam = rng.gamma(shape, rates / shape, size=(n_cells, n_genes))
    counts = rng.poisson(lam).astype(np.float64)
    counts[:, 5] = 0.0  # zero mean -> NaN dispersion
    counts[:, 9] = 3.0  # zero variance -> NaN dispersion
    counts[:, 12] = rng.poisson(400.0, size=n_cells)  # alone in the top mean bin
    return np.log1p(counts).astype(np.float32)


@pytest.mark.parametrize("n_bins", [20, 7])
def test_hvg_matches_pandas_reference(n_bins):
    x = _hvg_data()
    x_before = x.copy()
    order, norm_ref = _hvg_reference(x, n_bins)
    markers, norm = bl.highly_variable_genes(x, 15, n_bins=n_bins)
    np.testing.assert_array_equal(x, x_before)
    assert isinstance(norm, jax.Array) and norm.dtype == jnp.float32
    norm = np.asarray(norm)
    np.testing.assert_array_equal(np.isnan(norm), np.isnan(norm_ref))
    ok = ~np.isnan(norm_ref)
    np.testing.assert_allclose(norm[ok], norm_ref[ok], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(markers, order[:15])


def test_hvg_scanpy_special_cases():
    x = _hvg_data()
    markers, norm = bl.highly_variable_genes(x, x.shape[1])
    norm = np.asarray(norm)
    assert np.isnan(norm[5]) and np.isnan(norm[9])  # zero mean / zero variance
    assert norm[12] == pytest.approx(1.0)  # the only gene in its bin
    # NaN dispersions are ranked last
    assert set(np.asarray(markers)[-2:]) == {5, 9}


def test_hvg_recovers_planted_overdispersed_genes():
    rng = np.random.default_rng(4)
    n_cells, n_genes = 200, 300  # ~15 genes per mean bin
    rates = np.exp(np.linspace(np.log(0.2), np.log(20.0), n_genes))
    counts = rng.poisson(rates, size=(n_cells, n_genes)).astype(np.float64)
    planted = np.array([10, 95, 180, 265])
    for j in planted:  # same mean, far larger variance (gamma-Poisson, shape 0.2)
        counts[:, j] = rng.poisson(rng.gamma(0.2, rates[j] / 0.2, size=n_cells))
    x = np.log1p(counts).astype(np.float32)
    markers, _ = bl.highly_variable_genes(x, 4)
    assert set(np.asarray(markers)) == set(planted)


def test_hvg_rejects_bad_n_markers():
    with pytest.raises(ValueError, match="n_markers"):
        bl.highly_variable_genes(np.zeros((5, 3), np.float32), 4)


# --------------------------------------------------------------------------------------
# DE scores: parity with scipy
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [_count_data, _gaussian_data])
def test_ttest_matches_scipy_welch(data):
    x, y = data()
    n_classes = int(y.max()) + 1
    scores = bl.de_scores(x, y, n_classes, "t-test")
    assert isinstance(scores, jax.Array) and scores.dtype == jnp.float32
    assert scores.shape == (n_classes, x.shape[1])
    ref = _ttest_reference(x, y, n_classes)
    np.testing.assert_allclose(scores, ref, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("data", [_count_data, _gaussian_data])
def test_ttest_overestim_var_matches_formula(data):
    x, y = data()
    n_classes = int(y.max()) + 1
    scores = bl.de_scores(x, y, n_classes, "t-test_overestim_var")
    ref = _ttest_reference(x, y, n_classes, overestim_var=True)
    np.testing.assert_allclose(scores, ref, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("data", [_count_data, _gaussian_data])
def test_wilcoxon_matches_rankdata_reference(data):
    x, y = data()
    n_classes = int(y.max()) + 1
    scores = bl.de_scores(x, y, n_classes, "wilcoxon")
    ref = _wilcoxon_reference(x, y, n_classes)
    np.testing.assert_allclose(scores, ref, rtol=1e-4, atol=1e-4)


def test_wilcoxon_matches_mannwhitneyu_pvalue():
    x, y = _count_data(seed=5)
    scores = np.asarray(bl.de_scores(x, y, 3, "wilcoxon"))
    for j in range(2, 8):
        res = scipy.stats.mannwhitneyu(
            x[y == 1, j], x[y != 1, j], use_continuity=False, method="asymptotic"
        )
        np.testing.assert_allclose(
            2 * scipy.stats.norm.sf(abs(scores[1, j])), res.pvalue, rtol=1e-3, atol=1e-6
        )


def test_wilcoxon_ranks_negative_and_signed_zero_values():
    rng = np.random.default_rng(6)
    x, y = _count_data()  # same shapes as other tests: no extra compilation
    x = rng.choice(np.array([-2.5, -1e-3, -0.0, 0.0, 1e-3, 7.0], np.float32), x.shape)
    np.testing.assert_allclose(
        bl.de_scores(x, y, 3, "wilcoxon"), _wilcoxon_reference(x, y, 3), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("method", bl.DE_METHODS)
def test_de_scores_constant_genes_score_zero(method):
    x, y = _count_data()
    scores = np.asarray(bl.de_scores(x, y, 3, method))
    assert np.all(np.isfinite(scores))
    np.testing.assert_array_equal(scores[:, :2], 0.0)  # all-zero and constant genes


def test_de_scores_degenerate_groups_are_not_nan():
    x, _ = _count_data()
    y = np.zeros(len(x), np.int64)
    y[0] = 1  # a one-cell group, and class 2 is empty
    for method in bl.DE_METHODS:
        scores = np.asarray(bl.de_scores(x, y, 3, method))
        assert not np.any(np.isnan(scores))
        np.testing.assert_array_equal(scores[2], 0.0)
        if method != "wilcoxon":
            np.testing.assert_array_equal(scores[1], 0.0)  # ddof=1 variance undefined


def test_perfect_separation_is_inf_for_ttest_finite_for_wilcoxon():
    x, y = _count_data()
    x[:, 4] = np.where(y == 0, 2.0, 1.0)  # constant within type 0 and within the rest
    t = np.asarray(bl.de_scores(x, y, 3, "t-test"))
    assert t[0, 4] == np.inf
    assert np.all(np.isfinite(t[1:, 4])) and np.all(t[1:, 4] < 0)
    w = np.asarray(bl.de_scores(x, y, 3, "wilcoxon"))
    np.testing.assert_allclose(w, _wilcoxon_reference(x, y, 3), rtol=1e-4, atol=1e-4)
    assert w[0, 4] == w[0].max() > 0


@pytest.mark.parametrize("method", bl.DE_METHODS)
def test_gene_batch_size_does_not_change_scores(method):
    x, y = _gaussian_data()
    ref = np.asarray(bl.de_scores(x, y, 4, method))
    # 20 genes in batches of 7: two full batches and a remainder of 6
    np.testing.assert_allclose(
        bl.de_scores(x, y, 4, method, gene_batch_size=7), ref, rtol=1e-6, atol=1e-6
    )


def test_de_inputs_not_modified_and_accept_jax_arrays():
    x, y = _gaussian_data()
    x0, y0 = x.copy(), y.copy()
    a = bl.de_scores(x, y, 4, "wilcoxon")
    b = bl.de_scores(jnp.asarray(x), jnp.asarray(y), 4, "wilcoxon")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(y, y0)


def test_de_rejects_unknown_method_and_too_many_markers():
    x, y = _count_data()
    with pytest.raises(ValueError, match="method"):
        bl.de_scores(x, y, 3, "logreg")
    with pytest.raises(ValueError, match="n_markers"):
        bl.de_markers(x, y, 3, x.shape[1] + 1)


# --------------------------------------------------------------------------------------
# DE markers: round robin and planted recovery
# --------------------------------------------------------------------------------------


def test_round_robin_order_skips_duplicates_and_breaks_ties_low():
    scores = np.array(
        [
            [5.0, 4.0, 0.0, 0.0, 0.0, 0.0],
            [5.0, 0.0, 3.0, 0.0, 0.0, 1.0],  # best gene 0 already taken by class 0
            [0.0, 4.0, 0.0, 2.0, 2.0, 0.0],  # genes 3 and 4 tie
        ],
        np.float32,
    )
    # step: 0 -> class 0 takes 0; 1 -> class 1 takes 2; 2 -> class 2 takes 1;
    # 3 -> class 0, all left tie at 0, takes 3; 4 -> class 1 takes 5; 5 -> class 2 takes 4
    np.testing.assert_array_equal(bl.round_robin_markers(scores, 6), [0, 2, 1, 3, 5, 4])
    np.testing.assert_array_equal(bl.round_robin_markers(scores, 1), [0])
    # class 2 alone: tie between 3 and 4 goes to the lower index
    np.testing.assert_array_equal(bl.round_robin_markers(scores[2:], 3), [1, 3, 4])


def test_round_robin_handles_infinite_and_nan_scores():
    scores = np.array([[np.nan, -np.inf, 1.0, np.inf], [np.nan, -np.inf, -np.inf, np.inf]])
    # class 0: +inf gene 3; class 1: gene 3 taken, best left is -inf -> gene 1 (lowest)
    # class 0: gene 2; class 1: only NaN left -> gene 0
    np.testing.assert_array_equal(bl.round_robin_markers(scores, 4), [3, 1, 2, 0])


@pytest.mark.parametrize("method", bl.DE_METHODS)
def test_de_markers_recover_planted_markers(method):
    x, y, planted = _planted_de_data()
    markers = np.asarray(bl.de_markers(x, y, 4, 8, method=method))
    _assert_valid_markers(bl.de_markers(x, y, 4, 8, method=method), 8, x.shape[1])
    assert set(markers) == set(planted)
    for step, gene in enumerate(markers):  # round robin: step i serves type i % 4
        t = step % 4
        assert gene in planted[2 * t : 2 * t + 2]


def test_de_markers_under_outer_jit():
    x, y, planted = _planted_de_data()
    f = jax.jit(lambda a, b: bl.de_markers(a, b, 4, 4, method="wilcoxon"))
    np.testing.assert_array_equal(f(x, y), bl.de_markers(x, y, 4, 4, method="wilcoxon"))

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, f1_score
from sklearn.neighbors import KNeighborsClassifier

from jaxsel import metrics


def _hand_case():
    # 1-D, 1-nearest-neighbour: predictions are the nearest training point's label.
    x_train = np.array([[0.0], [10.0], [20.0]])
    y_train = np.array(["a", "b", "c"])
    x_test = np.array([[0.1], [9.9], [10.2], [19.0], [1.0]])
    y_test = np.array(["a", "a", "b", "c", "c"])
    # predictions:        a     b     b      c     a
    return x_train, y_train, x_test, y_test


def test_classification_scores_hand_counted():
    res = metrics.classification_scores(*_hand_case(), n_neighbors=1)
    np.testing.assert_array_equal(res["labels"], ["a", "b", "c"])
    np.testing.assert_array_equal(
        res["confusion_matrix"],
        [[1, 1, 0],
         [0, 1, 0],
         [1, 0, 1]],
    )
    assert res["accuracy"] == pytest.approx(3 / 5)
    assert res["misclassification_rate"] == pytest.approx(2 / 5)
    # per-class error: a 1/2, b 0, c 1/2
    assert res["average_misclassification_rate"] == pytest.approx(1 / 3)
    pred = np.array(["a", "b", "b", "c", "a"])
    assert res["f1_macro"] == pytest.approx(f1_score(_hand_case()[3], pred, average="macro"))
    assert res["f1_weighted"] == pytest.approx(
        f1_score(_hand_case()[3], pred, average="weighted")
    )


def test_n_neighbors_is_capped_at_training_size():
    res = metrics.classification_scores(*_hand_case(), n_neighbors=50)
    assert res["confusion_matrix"].sum() == 5


def test_unseen_test_label_counts_as_error():
    x_train, y_train, x_test, y_test = _hand_case()
    y_test = np.array(["a", "a", "b", "c", "d"])  # 'd' never seen in training
    res = metrics.classification_scores(x_train, y_train, x_test, y_test, n_neighbors=1)
    np.testing.assert_array_equal(res["labels"], ["a", "b", "c", "d"])
    assert res["confusion_matrix"].shape == (4, 4)
    assert res["confusion_matrix"][3].tolist() == [1, 0, 0, 0]
    # a 1/2, b 0, c 0, d 1
    assert res["average_misclassification_rate"] == pytest.approx(0.375)


def test_average_misclassification_matches_balanced_accuracy():
    rng = np.random.default_rng(0)
    n_classes = 4
    centers = rng.normal(0, 1.5, size=(n_classes, 6))
    y = rng.choice(n_classes, size=400, p=[0.5, 0.3, 0.15, 0.05])
    x = centers[y] + rng.normal(size=(400, 6))
    res = metrics.classification_scores(x[:250], y[:250], x[250:], y[250:])
    ref = KNeighborsClassifier(n_neighbors=5).fit(x[:250], y[:250]).predict(x[250:])
    assert 0.05 < res["accuracy"] < 0.99  # a non-trivial case
    assert res["accuracy"] == pytest.approx(np.mean(ref == y[250:]))
    assert res["average_misclassification_rate"] == pytest.approx(
        1 - balanced_accuracy_score(y[250:], ref)
    )
    assert res["f1_macro"] == pytest.approx(f1_score(y[250:], ref, average="macro"))


def _separable(n=300, n_genes=30, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    x = rng.normal(size=(n, n_genes)).astype(np.float32)
    markers = np.array([4, 17, 25])
    x[np.arange(n), markers[y]] += 8.0  # each class lights up its own gene
    return x, y, markers


@pytest.mark.parametrize("classifier", ["knn", "rf"])
def test_perfect_markers_classify_perfectly(classifier):
    x, y, markers = _separable()
    res = metrics.classification_scores(
        x[:200], y[:200], x[200:], y[200:], markers=markers, classifier=classifier
    )
    assert res["accuracy"] == 1.0
    assert res["average_misclassification_rate"] == 0.0
    noise = np.setdiff1d(np.arange(30), markers)[:3]
    bad = metrics.classification_scores(
        x[:200], y[:200], x[200:], y[200:], markers=noise, classifier=classifier
    )
    assert bad["accuracy"] < 0.7


def test_markers_as_bool_mask_and_sparse_input_agree():
    x, y, markers = _separable()
    mask = np.zeros(30, dtype=bool)
    mask[markers] = True
    a = metrics.classification_scores(x[:200], y[:200], x[200:], y[200:], markers=markers)
    b = metrics.classification_scores(
        sp.csr_matrix(x[:200]), y[:200], sp.csr_matrix(x[200:]), y[200:], markers=mask
    )
    np.testing.assert_array_equal(a["confusion_matrix"], b["confusion_matrix"])


def test_classifier_instance_is_cloned_not_fitted():
    x, y, markers = _separable()
    clf = LogisticRegression(max_iter=200)
    res = metrics.classification_scores(
        x[:200], y[:200], x[200:], y[200:], markers=markers, classifier=clf
    )
    assert res["accuracy"] == 1.0
    assert not hasattr(clf, "coef_")


def test_rf_is_deterministic_under_random_state():
    x, y, _ = _separable(seed=1)
    args = (x[:200], y[:200], x[200:], y[200:])
    r1 = metrics.classification_scores(*args, markers=np.arange(10), classifier="rf")
    r2 = metrics.classification_scores(*args, markers=np.arange(10), classifier="rf")
    np.testing.assert_array_equal(r1["confusion_matrix"], r2["confusion_matrix"])


def test_classification_errors():
    x, y, markers = _separable()
    args = (x[:200], y[:200], x[200:], y[200:])
    with pytest.raises(ValueError, match="classifier"):
        metrics.classification_scores(*args, classifier="svm")
    with pytest.raises(TypeError, match="classifier"):
        metrics.classification_scores(*args, classifier=object())
    with pytest.raises(ValueError, match="markers"):
        metrics.classification_scores(*args, markers=[0, 30])
    with pytest.raises(ValueError, match="markers"):
        metrics.classification_scores(*args, markers=[])
    with pytest.raises(TypeError, match="markers"):
        metrics.classification_scores(*args, markers=[0.5, 1.0])
    with pytest.raises(ValueError, match="same genes"):
        metrics.classification_scores(x[:200], y[:200], x[200:, :5], y[200:])
    with pytest.raises(ValueError, match="y_test"):
        metrics.classification_scores(x[:200], y[:200], x[200:], y[201:])
    with pytest.raises(ValueError, match="n_neighbors"):
        metrics.classification_scores(*args, n_neighbors=0)


# ----------------------------------------------------------------------------- reconstruction


def test_reconstruction_exact_for_linear_genes():
    rng = np.random.default_rng(0)
    n, k, n_genes = 200, 4, 40
    z = rng.normal(size=(n, k))
    weights = rng.normal(size=(k, n_genes)) * rng.uniform(0.2, 3.0, size=n_genes)
    x = z @ weights + rng.normal(size=n_genes)
    markers = np.array([3, 11, 20, 33])
    x[:, markers] = z
    res = metrics.reconstruction_scores(x[:150], x[150:], markers)
    assert res["l2"] < 1e-10 and res["l1"] < 1e-5
    assert res["variance_jaccard"] == 1.0
    assert res["variance_spearman"] == pytest.approx(1.0)


def test_reconstruction_matches_lstsq_reference():
    rng = np.random.default_rng(1)
    x = rng.gamma(2.0, 1.0, size=(120, 15))
    markers = [0, 5, 9]
    train, test = x[:80], x[80:]
    design = np.c_[np.ones(80), train[:, markers]]
    coef, *_ = np.linalg.lstsq(design, train, rcond=None)
    recon = np.c_[np.ones(40), test[:, markers]] @ coef
    res = metrics.reconstruction_scores(train.astype(np.float32), test.astype(np.float32), markers)
    assert res["l2"] == pytest.approx(np.mean((test - recon) ** 2), rel=1e-4)
    assert res["l1"] == pytest.approx(np.mean(np.abs(test - recon)), rel=1e-4)
    import scipy.stats

    rho = scipy.stats.spearmanr(test.var(0), recon.var(0)).statistic
    assert res["variance_spearman"] == pytest.approx(rho, abs=1e-6)
    top = lambda v: set(np.argsort(-v)[:3])  # noqa: E731  (20% of 15 genes)
    a, b = top(test.var(0)), top(recon.var(0))
    assert res["variance_jaccard"] == pytest.approx(len(a & b) / len(a | b))
    assert 0 < res["l2"] and res["variance_jaccard"] <= 1


def test_reconstruction_errors():
    x = np.ones((10, 5))
    with pytest.raises(ValueError, match="markers"):
        metrics.reconstruction_scores(x, x, None)
    with pytest.raises(ValueError, match="top_fraction"):
        metrics.reconstruction_scores(x, x, [0], top_fraction=0)
    with pytest.raises(ValueError, match="max_dense_bytes"):
        metrics.reconstruction_scores(sp.csr_matrix(x), x, [0], max_dense_bytes=16)


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_markers_nests_results():
    x, y, markers = _separable()
    out = metrics.evaluate_markers(x[:200], y[:200], x[200:], y[200:], markers)
    assert out["n_markers"] == 3
    assert set(out["classification"]) == {"knn", "rf"}
    assert out["classification"]["knn"]["accuracy"] == 1.0
    assert set(out["reconstruction"]) == {"l2", "l1", "variance_jaccard", "variance_spearman"}
    only = metrics.evaluate_markers(
        x[:200], y[:200], x[200:], y[200:], markers,
        classifiers={"logreg": LogisticRegression(max_iter=200)}, reconstruction=False,
    )
    assert list(only["classification"]) == ["logreg"] and "reconstruction" not in only
    single = metrics.evaluate_markers(
        x[:200], y[:200], x[200:], y[200:], markers, classifiers="knn", reconstruction=False
    )
    assert list(single["classification"]) == ["knn"]


# ----------------------------------------------------------------------------- gimVI metrics


def test_imputation_spearman_matches_scipy_with_ties():
    import scipy.stats

    rng = np.random.default_rng(3)
    t = rng.integers(0, 5, size=(40, 6)).astype(float)  # many ties
    p = t + rng.integers(0, 3, size=t.shape)
    p[:, 2] = rng.normal(size=40)  # no ties in one input
    t[:, 4] = 2.5  # constant truth
    p[:, 5] = 0.0  # constant imputation
    t0, p0 = t.copy(), p.copy()
    s = metrics.imputation_scores(t, p)
    np.testing.assert_array_equal(t, t0)
    np.testing.assert_array_equal(p, p0)
    assert s["spearman"].shape == (6,) and s["spearman"].dtype == np.float64
    for j in (0, 1, 2, 3):
        ref = scipy.stats.spearmanr(t[:, j], p[:, j]).statistic
        assert s["spearman"][j] == pytest.approx(ref, rel=1e-12, abs=1e-12)
    assert np.isnan(s["spearman"][4]) and np.isnan(s["spearman"][5])
    assert set(s) == {"pcc", "spearman", "rmse", "jsd"}
    mono = metrics.imputation_scores(t[:, :4], np.exp(t[:, :4]))  # monotone map
    np.testing.assert_allclose(mono["spearman"], 1.0)
    anti = metrics.imputation_scores(t[:, :4], -t[:, :4] ** 3)
    np.testing.assert_allclose(anti["spearman"], -1.0)


def test_average_ranks_match_scipy_rankdata():
    import scipy.stats

    rng = np.random.default_rng(4)
    x = rng.integers(0, 4, size=(25, 7)).astype(float)
    np.testing.assert_array_equal(
        metrics._average_ranks(x), scipy.stats.rankdata(x, method="average", axis=0)
    )


def _ebm_reference(latent, batch, k):
    n = latent.shape[0]
    labels = np.unique(batch)
    q = np.array([np.mean(batch == b) for b in labels])
    d = ((latent[:, None, :] - latent[None, :, :]) ** 2).sum(-1)
    total = 0.0
    for i in range(n):
        di = d[i].copy()
        di[i] = np.inf
        nbrs = np.argsort(di, kind="stable")[:k]
        score = 0.0
        for b, qb in zip(labels, q):
            pb = np.mean(batch[nbrs] == b)
            if pb > 0:
                score -= pb * np.log(pb / qb)
        total += score
    return total / n


def test_entropy_batch_mixing_matches_loop_reference():
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(90, 3))
    latent[:30] += 1.0  # partly separated
    batch = np.array(["a"] * 30 + ["b"] * 45 + ["c"] * 15)
    latent0 = latent.copy()
    for k in (1, 5, 12):
        got = metrics.entropy_batch_mixing(latent, batch, n_neighbors=k)
        assert isinstance(got, float)
        assert got == pytest.approx(_ebm_reference(latent, batch, k), rel=1e-12, abs=1e-12)
    np.testing.assert_array_equal(latent, latent0)
    many = metrics.entropy_batch_mixing(latent, batch, n_neighbors=[5, 1, 12])
    assert list(many) == [5, 1, 12]
    for k, v in many.items():
        assert v == pytest.approx(metrics.entropy_batch_mixing(latent, batch, n_neighbors=k))


def test_entropy_batch_mixing_mixed_vs_separated():
    rng = np.random.default_rng(1)
    n = 1000
    batch = np.repeat([0, 1], n // 2)
    mixed = rng.normal(size=(n, 2))
    separated = mixed + 20.0 * batch[:, None]
    s_mixed = metrics.entropy_batch_mixing(mixed, batch, n_neighbors=30)
    s_sep = metrics.entropy_batch_mixing(separated, batch, n_neighbors=30)
    assert -0.05 < s_mixed <= 0.0
    assert s_sep == pytest.approx(np.log(0.5), abs=1e-12)  # sum_b q log q: the minimum
    assert s_sep < s_mixed


def test_entropy_batch_mixing_unbalanced_mixed_is_near_zero():
    rng = np.random.default_rng(2)
    n = 1000
    batch = np.where(rng.random(n) < 0.8, "big", "small")
    latent = rng.normal(size=(n, 2))
    score = metrics.entropy_batch_mixing(latent, batch, n_neighbors=50)
    assert -0.05 < score <= 0.0
    # the plain (balanced) entropy would call this badly mixed; fully separated scores
    # the minimum sum_b q(b) log q(b)
    q = np.array([np.mean(batch == "big"), np.mean(batch == "small")])
    sep = latent + 30.0 * (batch == "small")[:, None]
    assert metrics.entropy_batch_mixing(sep, batch, n_neighbors=50) == pytest.approx(
        np.sum(q * np.log(q)), abs=1e-12
    )


def test_entropy_batch_mixing_errors():
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(20, 3))
    batch = np.repeat([0, 1], 10)
    with pytest.raises(ValueError, match="latent"):
        metrics.entropy_batch_mixing(latent[:, 0], batch)
    bad = latent.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="latent"):
        metrics.entropy_batch_mixing(bad, batch, n_neighbors=5)
    with pytest.raises(ValueError, match="batch"):
        metrics.entropy_batch_mixing(latent, batch[:-1], n_neighbors=5)
    with pytest.raises(ValueError, match="batch"):
        metrics.entropy_batch_mixing(latent, np.zeros(20), n_neighbors=5)
    for k in (0, 20, [5, 20]):
        with pytest.raises(ValueError, match="n_neighbors"):
            metrics.entropy_batch_mixing(latent, batch, n_neighbors=k)
    with pytest.raises(ValueError, match="n_neighbors"):
        metrics.entropy_batch_mixing(latent, batch, n_neighbors=[])
    for k in (2.5, True, "5", [5, 1.5]):
        with pytest.raises(TypeError, match="n_neighbors"):
            metrics.entropy_batch_mixing(latent, batch, n_neighbors=k)
    # the default k=50 needs more than 50 cells
    with pytest.raises(ValueError, match="n_neighbors"):
        metrics.entropy_batch_mixing(latent, batch)


def _purity_reference(a, b, k):
    def nbrs(x, i):
        d = ((x - x[i]) ** 2).sum(1)
        d[i] = np.inf
        return set(np.argsort(d, kind="stable")[:k].tolist())

    n = a.shape[0]
    return np.mean([len(nbrs(a, i) & nbrs(b, i)) / len(nbrs(a, i) | nbrs(b, i)) for i in range(n)])


def test_knn_purity_matches_loop_reference():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(70, 4))
    b = a[:, :2] + 0.5 * rng.normal(size=(70, 2))  # related, other dimension
    a0, b0 = a.copy(), b.copy()
    for k in (1, 4, 10):
        got = metrics.knn_purity(a, b, n_neighbors=k)
        assert isinstance(got, float) and 0.0 < got < 1.0
        assert got == pytest.approx(_purity_reference(a, b, k), rel=1e-12)
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(b, b0)
    many = metrics.knn_purity(a, b, n_neighbors=(10, 4))
    assert list(many) == [10, 4]
    assert many[4] == pytest.approx(metrics.knn_purity(a, b, n_neighbors=4))


def test_knn_purity_identical_rotated_and_independent():
    rng = np.random.default_rng(1)
    n = 400
    a = rng.normal(size=(n, 3))
    assert metrics.knn_purity(a, a, n_neighbors=15) == 1.0
    rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    assert metrics.knn_purity(a, 3.0 * a @ rot + 7.0, n_neighbors=15) == pytest.approx(1.0)
    k = 20
    chance = k / (n - 1)
    indep = metrics.knn_purity(a, rng.normal(size=(n, 5)), n_neighbors=k)
    # two independent random k-sets share m ~ k * chance cells: Jaccard ~ m / (2k - m)
    assert indep == pytest.approx(chance / (2 - chance), rel=0.3)


def test_knn_purity_errors():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 3))
    with pytest.raises(ValueError, match="same cells"):
        metrics.knn_purity(a, a[:-1], n_neighbors=5)
    with pytest.raises(ValueError, match="latent_alone"):
        metrics.knn_purity(a, a[:, 0], n_neighbors=5)
    bad = a.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="latent_joint"):
        metrics.knn_purity(bad, a, n_neighbors=5)
    with pytest.raises(TypeError, match="latent_joint"):
        metrics.knn_purity(np.full((20, 3), "x"), a, n_neighbors=5)
    for k in (0, 20):
        with pytest.raises(ValueError, match="n_neighbors"):
            metrics.knn_purity(a, a, n_neighbors=k)
    with pytest.raises(TypeError, match="n_neighbors"):
        metrics.knn_purity(a, a, n_neighbors=3.0)
    with pytest.raises(ValueError, match="n_neighbors"):
        metrics.knn_purity(a, a)  # default 50 >= 20 cells

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

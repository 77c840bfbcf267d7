"""Tests for jaxsel.estimators: the scikit-learn selectors.

Compiling a neural fit takes ~10 s on a laptop CPU, so every neural test here uses
the same data shape and settings (``KW``) to hit one cached program; the few
exceptions (range test, cross-validation, an unsupervised selector, the scikit-learn
checks on tiny data) compile once each.
"""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.exceptions import NotFittedError
from sklearn.utils import estimator_checks as ec
from sklearn.utils.estimator_checks import parametrize_with_checks

from jaxsel import datasets, estimators, metrics, preprocessing
from jaxsel.estimators import (
    ConcreteVAE,
    DEMarkers,
    GlobalGumbelVAE,
    HVGMarkers,
    MarkerMap,
    RandomMarkers,
)
from jaxsel.methods import baselines

N_CELLS, N_GENES, N_MARKERS = 400, 60, 8
KW = dict(
    n_markers=N_MARKERS,
    hidden_size=16,
    max_epochs=15,
    min_epochs=3,
    patience=3,
    learning_rate=3e-3,
    batch_size=64,
    random_state=0,
)


@pytest.fixture(scope="module")
def data():
    """Easy planted-marker data: 4 types, 2 markers each, no XOR cells."""
    counts, y, info = datasets.make_markers(
        n_cells=N_CELLS, n_genes=N_GENES, n_types=4, n_markers_per_type=2, n_xor_genes=0,
        random_state=0,
    )
    x, _ = preprocessing.markermap_recipe(counts)
    x_log = preprocessing.log1p(preprocessing.normalize_total(counts))
    return {"x": x, "y": y, "counts": counts, "x_log": x_log, "info": info}


@pytest.fixture(scope="module")
def fitted(data):
    return MarkerMap(**KW).fit(data["x"], data["y"])


# ------------------------------------------------------------------ neural: behaviour


def test_supervised_markermap_recovers_planted_markers(fitted, data):
    m = fitted.markers_
    assert m.shape == (N_MARKERS,) and np.issubdtype(m.dtype, np.integer)
    assert len(set(m.tolist())) == N_MARKERS
    assert len(set(m.tolist()) & set(data["info"]["marker_genes"].tolist())) >= 6
    assert fitted.scores_.shape == (N_GENES,) and fitted.scores_.dtype == np.float32
    assert set(np.argsort(-fitted.scores_)[:N_MARKERS].tolist()) == set(m.tolist())
    assert fitted.n_features_in_ == N_GENES
    np.testing.assert_array_equal(fitted.classes_, np.arange(4))
    assert 1 <= fitted.n_epochs_ <= KW["max_epochs"]
    assert 0 <= fitted.best_epoch_ < fitted.n_epochs_
    assert fitted.learning_rate_ == pytest.approx(KW["learning_rate"])
    assert {"train_loss", "val_loss", "val_accuracy"} <= set(fitted.history_)
    for v in fitted.history_.values():
        assert v.shape == (fitted.n_epochs_,) and np.isfinite(v).all()
    assert fitted.cfg_.selector == "markermap" and fitted.result_ is not None
    assert not hasattr(fitted, "feature_names_in_")


def test_markermap_beats_random_in_knn_accuracy(fitted, data):
    x, y = data["x"], data["y"]
    tr, te = preprocessing.split_indices(y, (0.7, 0.3), random_state=1, stratify=True)
    rnd = RandomMarkers(n_markers=N_MARKERS, random_state=0).fit(x)
    acc = {
        name: metrics.classification_scores(x[tr], y[tr], x[te], y[te], markers=m)["accuracy"]
        for name, m in (("mm", fitted.markers_), ("random", rnd.markers_))
    }
    assert acc["mm"] > 0.9
    assert acc["mm"] > acc["random"] + 0.1


def test_support_transform_inverse_transform(fitted, data):
    x = data["x"]
    mask = fitted.get_support()
    assert mask.dtype == bool and mask.sum() == N_MARKERS
    np.testing.assert_array_equal(fitted.get_support(indices=True), np.sort(fitted.markers_))
    xt = fitted.transform(x)
    assert xt.shape == (N_CELLS, N_MARKERS)
    # SelectorMixin keeps the input's column order; markers_ is in rank order.
    np.testing.assert_array_equal(xt, x[:, np.sort(fitted.markers_)])
    np.testing.assert_array_equal(np.sort(xt, axis=1), np.sort(x[:, fitted.markers_], axis=1))
    back = fitted.inverse_transform(xt)
    assert back.shape == x.shape
    np.testing.assert_array_equal(back[:, mask], xt)
    assert not back[:, ~mask].any()


def test_same_random_state_gives_identical_markers(fitted, data):
    again = MarkerMap(**KW).fit(data["x"], data["y"])
    np.testing.assert_array_equal(again.markers_, fitted.markers_)
    np.testing.assert_array_equal(again.scores_, fitted.scores_)
    assert again.n_epochs_ == fitted.n_epochs_


def test_fit_never_modifies_inputs(data):
    x = data["x"].copy()
    y = pd.Series(data["y"]).astype(str)
    x0, y0 = x.copy(), y.copy()
    sel = MarkerMap(**KW).fit(x, y)
    sel.predict(x)
    sel.transform(x)
    np.testing.assert_array_equal(x, x0)
    pd.testing.assert_series_equal(y, y0)
    xs = sp.csr_matrix(x)
    xs0 = xs.copy()
    MarkerMap(**KW).fit(xs, y)
    np.testing.assert_array_equal(xs.toarray(), xs0.toarray())
    assert xs.dtype == xs0.dtype


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_sparse_input_matches_dense(fitted, data, fmt):
    xs = sp.csr_matrix(data["x"]).asformat(fmt)
    sel = MarkerMap(**KW).fit(xs, data["y"])
    np.testing.assert_array_equal(sel.markers_, fitted.markers_)
    np.testing.assert_array_equal(sel.scores_, fitted.scores_)
    xt = sel.transform(xs)
    assert sp.issparse(xt)
    np.testing.assert_array_equal(xt.toarray(), fitted.transform(data["x"]))


def test_sparse_densify_guard(data, monkeypatch):
    monkeypatch.setattr(estimators, "MAX_DENSE_BYTES", 1000)
    with pytest.raises(ValueError, match=r"X is sparse.*max_dense_bytes"):
        MarkerMap(**KW).fit(sp.csr_matrix(data["x"]), data["y"])


def test_dataframe_feature_names(fitted, data):
    names = np.array([f"g{i}" for i in range(N_GENES)], dtype=object)
    df = pd.DataFrame(data["x"], columns=names)
    sel = MarkerMap(**KW).fit(df, data["y"])
    np.testing.assert_array_equal(sel.feature_names_in_, names)
    np.testing.assert_array_equal(sel.markers_, fitted.markers_)
    np.testing.assert_array_equal(sel.get_feature_names_out(), names[np.sort(sel.markers_)])


def test_predict_returns_original_labels(data):
    names = np.array(["B cell", "T cell", "monocyte", "NK"])
    y = names[data["y"]]
    sel = MarkerMap(**KW).fit(data["x"], y)
    np.testing.assert_array_equal(sel.classes_, np.sort(names))
    pred = sel.predict(data["x"])
    assert pred.shape == (N_CELLS,) and set(pred.tolist()) <= set(names.tolist())
    assert np.mean(pred == y) > 0.9
    proba = sel.predict_proba(data["x"][:7])
    assert proba.shape == (7, 4)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(sel.classes_[proba.argmax(1)], pred[:7])
    assert sel.decision_function(data["x"][:7]).shape == (7, 4)
    assert sel.embed(data["x"][:7]).shape == (7, 16)
    assert not hasattr(sel, "reconstruct")  # supervised: no decoder


def test_unsupervised_global_gumbel_vae(data):
    # the same settings as tests/test_tl.py: one compiled program for both files
    sel = GlobalGumbelVAE(**KW).fit(data["x"])
    assert len(set(sel.markers_.tolist())) == N_MARKERS
    assert sel.cfg_.selector == "global_gumbel" and sel.cfg_.alpha == 1.0
    for method in ("predict", "predict_proba", "decision_function"):
        assert not hasattr(sel, method)
    assert not hasattr(sel, "classes_")
    assert sel.reconstruct(data["x"][:5]).shape == (5, N_GENES)
    assert sel.embed(data["x"][:5]).shape == (5, 16)
    assert {"val_recon", "train_recon", "val_loss"} <= set(sel.history_)


def test_default_max_lr_follows_reference_benchmark():
    assert MarkerMap()._default_max_lr(0.0) == 1e-3
    assert MarkerMap()._default_max_lr(0.5) == 1e-4
    assert MarkerMap()._default_max_lr(1.0) == 1e-4
    assert ConcreteVAE()._default_max_lr(1.0) == 1e-4
    assert GlobalGumbelVAE()._default_max_lr(1.0) == 1e-5


def test_objective_and_alpha_resolution():
    assert MarkerMap()._alpha() == 0.0
    assert MarkerMap(objective="joint")._alpha() == 0.5
    assert GlobalGumbelVAE()._alpha() == 1.0 and ConcreteVAE()._alpha() == 1.0
    assert MarkerMap(objective="unsupervised", alpha=0.25)._alpha() == 0.25
    assert hasattr(MarkerMap(), "predict") and not hasattr(MarkerMap(), "reconstruct")
    assert hasattr(MarkerMap(objective="joint"), "reconstruct")


def test_cross_validate_all_folds_in_one_program(data):
    sel = MarkerMap(**KW)
    out = sel.cross_validate(data["x"], data["y"], n_folds=3)
    assert out["markers"].shape == (3, N_MARKERS)
    for row in out["markers"]:
        assert len(set(row.tolist())) == N_MARKERS
    assert out["scores"].shape == (3, N_GENES)
    assert out["n_epochs"].shape == (3,) and (out["n_epochs"] >= KW["min_epochs"]).all()
    assert out["history"]["val_loss"].shape == (3, KW["max_epochs"])
    np.testing.assert_array_equal(
        np.sort(np.concatenate(out["test_indices"])), np.arange(N_CELLS)
    )
    assert set(out["classification"]) == {"knn", "rf"}
    for clf in ("knn", "rf"):
        res = out["classification"][clf]
        for key in ("accuracy", "f1_weighted", "f1_macro", "average_misclassification_rate"):
            assert res[key].shape == (3,)
        assert res["accuracy"].mean() > 0.85
    assert not hasattr(sel, "markers_")  # cross_validate does not fit the estimator


# ---------------------------------------------------------------------- neural: errors


def _bad_fit(est, x, y, err, match):
    with pytest.raises(err, match=match):
        est.fit(x, y)


@pytest.mark.parametrize(
    "mutate, err, match",
    [
        (lambda x, y: (np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x), y), ValueError, r"X.*NaN"),
        (lambda x, y: (np.where(np.arange(x.size).reshape(x.shape) == 5, np.inf, x), y), ValueError, r"X.*infinity"),
        (lambda x, y: (x[:, 0], y), ValueError, r"X.*2D"),
        (lambda x, y: (x[None], y), ValueError, r"X.*dim"),
        (lambda x, y: (x[:0], y[:0]), ValueError, r"X.*0 sample"),
        (lambda x, y: (x[:, :0], y), ValueError, r"X.*0 feature"),
        (lambda x, y: (x.astype(np.complex64), y), ValueError, r"Complex data"),
        (lambda x, y: (x, y[:-1]), ValueError, r"y has 399 labels"),
        (lambda x, y: (x, np.zeros_like(y)), ValueError, r"y has only one class"),
        (lambda x, y: (x, None), ValueError, r"requires y to be passed.*objective='supervised'"),
        (lambda x, y: (x, np.where(np.arange(y.size) == 3, np.nan, y)), ValueError, r"y contains 1 missing"),
    ],
)
def test_fit_rejects_bad_data(data, mutate, err, match):
    x, y = mutate(data["x"], data["y"])
    _bad_fit(MarkerMap(**KW), x, y, err, match)


def test_fit_rejects_anndata(data):
    adata = datasets.make_markers(n_cells=20, n_genes=10, n_types=2, n_xor_genes=0,
                                  return_anndata=True)
    with pytest.raises(TypeError, match="AnnData"):
        MarkerMap(**KW).fit(adata)


@pytest.mark.parametrize(
    "params, err, match",
    [
        ({"n_markers": 0}, ValueError, r"n_markers must be in \[1, n_genes=60\]"),
        ({"n_markers": 61}, ValueError, r"n_markers"),
        ({"n_markers": 2.5}, TypeError, r"n_markers"),
        ({"n_markers": True}, TypeError, r"n_markers"),
        ({"objective": "semi"}, ValueError, r"objective must be one of"),
        ({"alpha": 1.5}, ValueError, r"alpha must be in \[0.0, 1.0\]"),
        ({"alpha": "half"}, TypeError, r"alpha"),
        ({"validation_fraction": 0.0}, ValueError, r"validation_fraction"),
        ({"validation_fraction": 1.0}, ValueError, r"validation_fraction"),
        ({"batch_size": 1000}, ValueError, r"batch_size=1000 is larger"),
        ({"batch_size": 0}, ValueError, r"batch_size"),
        ({"learning_rate": -1.0}, ValueError, r"learning_rate"),
        ({"learning_rate": None, "max_lr": 0.0}, ValueError, r"max_lr"),
        ({"hidden_size": 0}, ValueError, r"hidden_size"),
        ({"latent_size": 1.5}, TypeError, r"latent_size"),
        ({"max_epochs": 0}, ValueError, r"max_epochs"),
        ({"min_epochs": 20}, ValueError, r"min_epochs \(20\) must not exceed max_epochs"),
        ({"patience": 0}, ValueError, r"patience"),
        ({"temperature": 0.0}, ValueError, r"temperature"),
        ({"temperature_decay": 1.5}, ValueError, r"temperature_decay"),
        ({"kl_beta": -0.1}, ValueError, r"kl_beta"),
        ({"encoder_layers": 0}, ValueError, r"encoder_layers"),
        ({"random_state": -1}, ValueError, r"random_state"),
        ({"random_state": 1.5}, TypeError, r"random_state"),
    ],
)
def test_fit_rejects_bad_params(data, params, err, match):
    _bad_fit(MarkerMap(**{**KW, **params}), data["x"], data["y"], err, match)


def test_unfitted_and_wrong_n_features(fitted, data):
    sel = MarkerMap(**KW)
    for method in ("predict", "predict_proba", "decision_function", "embed", "transform",
                   "get_support"):
        with pytest.raises(NotFittedError):
            getattr(sel, method)(data["x"]) if method != "get_support" else sel.get_support()
    with pytest.raises(NotFittedError):
        MarkerMap(**{**KW, "objective": "joint"}).reconstruct(data["x"])
    for method in ("predict", "predict_proba", "decision_function", "embed", "transform"):
        with pytest.raises(ValueError, match="X has 59 features, but MarkerMap is expecting 60"):
            getattr(fitted, method)(data["x"][:, :-1])


def test_unsupervised_y_only_stratifies(data):
    with pytest.raises(ValueError, match="y has 399 labels"):
        GlobalGumbelVAE(**KW).fit(data["x"], data["y"][:-1])
    with pytest.raises(ValueError, match="n_markers"):
        ConcreteVAE(**{**KW, "n_markers": 100}).fit(data["x"])


# ------------------------------------------------------------------------- baselines


def test_random_markers(data):
    a = RandomMarkers(n_markers=N_MARKERS, random_state=3).fit(data["x"])
    b = RandomMarkers(n_markers=N_MARKERS, random_state=3).fit(sp.csr_matrix(data["x"]))
    np.testing.assert_array_equal(a.markers_, b.markers_)
    assert len(set(a.markers_.tolist())) == N_MARKERS
    np.testing.assert_array_equal(np.argsort(-a.scores_)[:N_MARKERS], a.markers_)
    np.testing.assert_array_equal(a.transform(data["x"]), data["x"][:, a.get_support()])


def test_hvg_markers_on_log_normalised(data):
    x_log = data["x_log"]
    sel = HVGMarkers(n_markers=N_MARKERS).fit(x_log)
    ref_markers, ref_disp = baselines.highly_variable_genes(x_log, N_MARKERS)
    np.testing.assert_array_equal(sel.markers_, np.asarray(ref_markers))
    np.testing.assert_array_equal(sel.scores_, np.asarray(ref_disp))
    with pytest.raises(ValueError, match="Negative values in data passed to HVGMarkers"):
        HVGMarkers(n_markers=N_MARKERS).fit(data["x"])  # scaled data


@pytest.mark.parametrize("method", ["t-test", "t-test_overestim_var", "wilcoxon"])
def test_de_markers_recover_planted(data, method):
    names = np.array(["a", "b", "c", "d"])
    sel = DEMarkers(n_markers=N_MARKERS, method=method).fit(data["x_log"], names[data["y"]])
    assert set(sel.markers_.tolist()) == set(data["info"]["marker_genes"].tolist())
    np.testing.assert_array_equal(sel.classes_, names)
    assert sel.class_scores_.shape == (4, N_GENES)
    np.testing.assert_array_equal(sel.scores_, sel.class_scores_.max(axis=0))


def test_de_markers_errors(data):
    with pytest.raises(ValueError, match="requires y to be passed"):
        DEMarkers(n_markers=4).fit(data["x_log"])
    with pytest.raises(ValueError, match="method must be one of"):
        DEMarkers(n_markers=4, method="logreg").fit(data["x_log"], data["y"])
    with pytest.raises(ValueError, match="only one class"):
        DEMarkers(n_markers=4).fit(data["x_log"], np.ones(N_CELLS))


# --------------------------------------------------------------- scikit-learn checks

# All of scikit-learn's estimator checks apply to the plain baselines and pass; none
# is expected to fail (HVGMarkers declares ``positive_only`` input, DEMarkers a
# required target, both via ``__sklearn_tags__``). n_markers=2 because the checks
# use data with few features.
@parametrize_with_checks(
    [RandomMarkers(n_markers=2), HVGMarkers(n_markers=2), DEMarkers(n_markers=2)]
)
def test_sklearn_compatible_baselines(estimator, check):
    check(estimator)


# learning_rate=None: the fitting checks below and the range-test test share one
# compiled program (same 15 x 4 data shape as scikit-learn's checks).
_TINY = dict(n_markers=2, hidden_size=16, batch_size=8, max_epochs=2, min_epochs=1,
             learning_rate=None, random_state=0)
_NO_FIT_CHECKS = [
    "check_get_params_invariance",
    "check_no_attributes_set_in_init",
    "check_parameters_default_constructible",
    "check_estimators_unfitted",
    "check_set_params",
    "check_estimator_repr",
    "check_estimator_cloneable",
]


@pytest.mark.parametrize("cls", [MarkerMap, GlobalGumbelVAE, ConcreteVAE])
@pytest.mark.parametrize("check", _NO_FIT_CHECKS)
def test_sklearn_checks_neural_no_fit(cls, check):
    # Checks that fit nothing (a neural fit compiles for ~10 s per data shape).
    getattr(ec, check)(cls.__name__, cls(**_TINY))


@pytest.mark.parametrize("check", ["check_n_features_in_after_fitting", "check_requires_y_none"])
def test_sklearn_checks_neural_fit(check):
    getattr(ec, check)("MarkerMap", MarkerMap(**_TINY))


def test_learning_rate_none_runs_range_test():
    rng = np.random.RandomState(0)
    x = rng.normal(size=(15, 4))
    y = rng.permutation(np.repeat(np.arange(3), 5))
    sel = MarkerMap(**_TINY).fit(x, y)  # max_lr defaults to 1e-3 (supervised MarkerMap)
    assert 1e-8 <= sel.learning_rate_ <= 1e-3
    assert len(set(sel.markers_.tolist())) == 2

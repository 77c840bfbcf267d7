import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.contour import ContourSet  # noqa: E402

from jaxsel import plotting  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _blobs(n_per=40, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.array([[0.0, 0.0], [6.0, 0.0], [3.0, 5.0]])
    latent = np.concatenate([c + rng.normal(scale=0.7, size=(n_per, 2)) for c in centers])
    labels = np.repeat(np.array(["Sst", "Pvalb", "Vip"]), n_per)
    return latent, labels


def _two_clusters(seed=0):
    """Two uniform 1x1 squares at x in [0, 1] and x in [9, 10]: a gap of width 8."""
    rng = np.random.default_rng(seed)
    left = rng.uniform(0, 1, size=(60, 2))
    right = rng.uniform(0, 1, size=(60, 2)) + [9.0, 0.0]
    latent = np.concatenate([left, right])
    values = np.concatenate([np.zeros(60), np.full(60, 10.0)]) + latent[:, 1]
    return latent, values


def _contour_sets(ax):
    return [c for c in ax.collections if isinstance(c, ContourSet)]


def _curves(seed=0):
    rng = np.random.default_rng(seed)
    test = rng.uniform(0.1, 0.4, size=(3, 20))
    test[1, 15:] = np.nan  # one fold stopped early
    train = test + 0.2
    return {
        "pre-training + freeze/unfreeze": {"test": test, "train": train},
        "no pre-training": {"test": test[:, ::-1] * 0.9},
    }


# --------------------------------------------------------------------------- #
# plot_latent
# --------------------------------------------------------------------------- #
def test_plot_latent_one_collection_per_label_with_given_colors():
    latent, labels = _blobs()
    colors = {"Vip": "#ff0000", "Pvalb": "#00ff00", "Sst": "#0000ff"}
    latent0, labels0 = latent.copy(), labels.copy()
    fig = plotting.plot_latent(latent, labels, colors=colors, title="latent")
    ax = fig.axes[0]
    assert len(ax.collections) == 3
    # drawn in the order of the colours dict, each with its own colour and its cells
    for coll, lab in zip(ax.collections, colors):
        np.testing.assert_allclose(coll.get_facecolor()[0], to_rgba(colors[lab]))
        np.testing.assert_allclose(coll.get_offsets(), latent[labels == lab])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(colors)
    assert ax.get_title() == "latent"
    np.testing.assert_array_equal(latent, latent0)
    np.testing.assert_array_equal(labels, labels0)


def test_plot_latent_default_palette_sorted_tab20():
    latent, labels = _blobs()
    fig = plotting.plot_latent(latent, labels)
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts == ["Pvalb", "Sst", "Vip"]
    tab20 = matplotlib.colormaps["tab20"]
    for i, coll in enumerate(ax.collections):
        np.testing.assert_allclose(coll.get_facecolor()[0], tab20(i))


def test_plot_latent_int_labels_into_given_ax_no_legend():
    latent, _ = _blobs()
    labels = np.repeat([3, 1, 2], 40)
    fig, ax = plt.subplots()
    out = plotting.plot_latent(latent, labels, ax=ax, legend=False)
    assert out is fig
    assert len(ax.collections) == 3
    assert ax.get_legend() is None
    assert [c.get_label() for c in ax.collections] == ["1", "2", "3"]


def test_plot_latent_without_labels_single_collection():
    latent, _ = _blobs()
    fig = plotting.plot_latent(latent)
    ax = fig.axes[0]
    assert len(ax.collections) == 1
    assert ax.collections[0].get_offsets().shape == (120, 2)


@pytest.mark.parametrize(
    "latent, match",
    [
        (np.zeros((10, 3)), "latent"),
        (np.zeros(10), "latent"),
        (np.where(np.eye(10, 2) > 0, np.nan, 0.0), "latent.*NaN"),
    ],
)
def test_plot_latent_bad_latent(latent, match):
    with pytest.raises(ValueError, match=match):
        plotting.plot_latent(latent)


def test_plot_latent_bad_labels_and_colors():
    latent, labels = _blobs()
    with pytest.raises(ValueError, match="labels"):
        plotting.plot_latent(latent, labels[:-1])
    with pytest.raises(ValueError, match="colors.*Vip"):
        plotting.plot_latent(latent, labels, colors={"Sst": "r", "Pvalb": "g"})
    with pytest.raises(ValueError, match="colors"):
        plotting.plot_latent(latent, labels, colors={"Sst": "r", "Pvalb": "g", "Vip": "notacolor"})
    with pytest.raises(TypeError, match="latent"):
        plotting.plot_latent(np.full((5, 2), "a"))
    with pytest.raises(TypeError, match="ax"):
        plotting.plot_latent(latent, ax="not an axes")


# --------------------------------------------------------------------------- #
# plot_latent_overlay and the masked triangulation
# --------------------------------------------------------------------------- #
def test_overlay_levels_span_value_range():
    latent, _ = _blobs()
    values = latent[:, 0] ** 2 - latent[:, 1]
    values0 = values.copy()
    latent0 = latent.copy()
    fig = plotting.plot_latent_overlay(latent, values, levels=6, title="Pvalb", colorbar=True)
    ax = fig.axes[0]
    sets = _contour_sets(ax)
    filled = [c for c in sets if c.filled]
    lines = [c for c in sets if not c.filled]
    assert len(filled) == 1 and len(lines) == 1
    lev = filled[0].levels
    assert lev[0] <= values.min() and lev[-1] >= values.max()
    assert 3 <= len(lev) <= 12
    assert np.all(np.diff(lev) > 0)
    # line contours are drawn only at interior levels
    assert np.all((lines[0].levels > values.min()) & (lines[0].levels < values.max()))
    assert ax.get_title() == "Pvalb"
    assert len(fig.axes) == 2  # colour bar
    # the cells are drawn as dots on top
    dots = [c for c in ax.collections if not isinstance(c, ContourSet)]
    assert len(dots) == 1 and dots[0].get_offsets().shape == (120, 2)
    np.testing.assert_array_equal(values, values0)
    np.testing.assert_array_equal(latent, latent0)


def test_overlay_explicit_levels_used_as_given():
    latent, _ = _blobs()
    values = latent[:, 1]
    lev = np.linspace(values.min() - 1, values.max() + 1, 5)
    fig = plotting.plot_latent_overlay(latent, values, levels=lev, point_color=None)
    filled = [c for c in _contour_sets(fig.axes[0]) if c.filled][0]
    np.testing.assert_allclose(filled.levels, lev)
    assert all(isinstance(c, ContourSet) for c in fig.axes[0].collections)


def test_overlay_constant_values_do_not_fail():
    latent, _ = _blobs()
    fig = plotting.plot_latent_overlay(latent, np.full(len(latent), 2.5))
    filled = [c for c in _contour_sets(fig.axes[0]) if c.filled][0]
    assert filled.levels[0] <= 2.5 <= filled.levels[-1]


def _spans_gap(tri):
    x = tri.x[tri.get_masked_triangles()]
    return np.any((x.min(axis=1) < 1.0) & (x.max(axis=1) > 9.0))


def test_triangle_mask_removes_gap_spanning_triangles():
    latent, _ = _two_clusters()
    unmasked = plotting._masked_triangulation(latent, None)
    assert _spans_gap(unmasked)  # the planted configuration does have bridging triangles
    tri = plotting._masked_triangulation(latent, 0.95)
    assert tri.mask is not None and tri.mask.any()
    assert not _spans_gap(tri)
    # within-cluster triangles survive: only a small fraction is masked
    assert tri.mask.mean() < 0.2


def _vertices_in_gap(ax):
    filled = [c for c in _contour_sets(ax) if c.filled][0]
    verts = np.concatenate([p.vertices for p in filled.get_paths() if len(p.vertices)])
    return np.sum((verts[:, 0] > 1.5) & (verts[:, 0] < 8.5))


def test_overlay_draws_nothing_in_the_gap():
    latent, values = _two_clusters()
    fig = plotting.plot_latent_overlay(latent, values, max_edge_quantile=0.95)
    assert _vertices_in_gap(fig.axes[0]) == 0
    fig = plotting.plot_latent_overlay(latent, values, max_edge_quantile=None)
    assert _vertices_in_gap(fig.axes[0]) > 0


@pytest.mark.parametrize(
    "latent, values, exc, match",
    [
        (np.zeros((10, 3)), np.zeros(10), ValueError, "latent"),
        (np.random.default_rng(0).normal(size=(10, 2)), np.zeros(9), ValueError, "values"),
        (np.random.default_rng(0).normal(size=(10, 2)), np.zeros((10, 1)), ValueError, "values"),
        (np.vstack([[np.nan, 0.0], np.ones((9, 2))]), np.zeros(10), ValueError, "latent.*NaN"),
        (np.random.default_rng(0).normal(size=(10, 2)), np.r_[np.nan, np.zeros(9)], ValueError,
         "values"),
        (np.random.default_rng(0).normal(size=(2, 2)), np.zeros(2), ValueError, "latent"),
        (np.c_[np.arange(10.0), np.arange(10.0)], np.zeros(10), ValueError, "latent"),
    ],
)
def test_overlay_bad_inputs(latent, values, exc, match):
    with pytest.raises(exc, match=match):
        plotting.plot_latent_overlay(latent, values)


def test_overlay_bad_options():
    latent, _ = _blobs()
    v = latent[:, 0]
    with pytest.raises(ValueError, match="max_edge_quantile"):
        plotting.plot_latent_overlay(latent, v, max_edge_quantile=1.5)
    with pytest.raises(ValueError, match="levels"):
        plotting.plot_latent_overlay(latent, v, levels=[1.0, 0.5, 2.0])
    with pytest.raises(ValueError, match="levels"):
        plotting.plot_latent_overlay(latent, v, levels=0)


# --------------------------------------------------------------------------- #
# plot_r2_curves
# --------------------------------------------------------------------------- #
def test_r2_curves_mean_lines_baselines_and_boundaries():
    curves = _curves()
    copies = {k: {kk: vv.copy() for kk, vv in v.items()} for k, v in curves.items()}
    baselines = {"sRRR rank 2": 0.21, "sRRR rank 16": (0.33, 0.02)}
    fig = plotting.plot_r2_curves(curves, baselines=baselines, stage_boundaries=[5, 10])
    ax = fig.axes[0]
    # 3 mean lines (test+train, test) + 2 baselines + 2 stage boundaries
    assert len(ax.lines) == 7
    by_label = {ln.get_label(): ln for ln in ax.lines}
    for name, entry in curves.items():
        for kind in entry:
            label = name if kind == "test" else f"{name} (train)"
            line = by_label[label]
            np.testing.assert_allclose(line.get_xdata(), np.arange(1, 21))
            np.testing.assert_allclose(line.get_ydata(), np.nanmean(entry[kind], axis=0))
            assert line.get_linestyle() == ("-" if kind == "test" else "--")
    name = "pre-training + freeze/unfreeze"
    assert by_label[name].get_color() == by_label[f"{name} (train)"].get_color()
    for bname, val in baselines.items():
        y = np.asarray(by_label[bname].get_ydata(), dtype=float)
        np.testing.assert_allclose(y, np.atleast_1d(val)[0])
    vlines = [ln for ln in ax.lines if ln.get_label().startswith("_stage")]
    assert sorted(np.asarray(ln.get_xdata(), dtype=float)[0] for ln in vlines) == [5, 10]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert set(curves) | set(baselines) | {"train", "test"} == set(legend)
    # shaded SD bands: one for each of the three multi-fold mean lines ...
    assert len(ax.collections) == 3
    # ... and one span for the baseline given with an SD
    assert len(ax.patches) == 1
    for name, entry in curves.items():
        for kind, arr in entry.items():
            np.testing.assert_array_equal(arr, copies[name][kind])


def test_r2_curves_fold_lines_and_no_train():
    curves = _curves()
    fig = plotting.plot_r2_curves(curves, show_train=False, band="folds")
    ax = fig.axes[0]
    # 2 test mean lines + 3 folds each
    assert len(ax.lines) == 2 + 2 * 3
    folds = [ln for ln in ax.lines if "fold" in ln.get_label()]
    test = curves["no pre-training"]["test"]
    fold_y = [ln.get_ydata() for ln in folds if ln.get_label().startswith("_no pre-training")]
    np.testing.assert_allclose(np.array(fold_y), test)
    assert not any("(train)" in ln.get_label() for ln in ax.lines)
    assert len(ax.collections) == 0


def test_r2_curves_single_run_and_given_ax():
    fig, ax = plt.subplots()
    y = np.linspace(0, 0.5, 30)
    out = plotting.plot_r2_curves({"run": {"test": y}}, ax=ax)
    assert out is fig
    assert len(ax.lines) == 1
    np.testing.assert_allclose(ax.lines[0].get_ydata(), y)


def test_r2_curves_all_nan_epoch_gives_gap_without_warning(recwarn):
    test = np.full((2, 5), 0.3)
    test[:, 3] = np.nan
    fig = plotting.plot_r2_curves({"x": {"test": test}})
    y = fig.axes[0].lines[0].get_ydata()
    assert np.isnan(y[3]) and np.allclose(np.delete(y, 3), 0.3)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_r2_curves_bad_inputs():
    good = np.zeros((3, 10))
    with pytest.raises(ValueError, match="train"):
        plotting.plot_r2_curves({"a": {"test": good, "train": np.zeros((3, 9))}})
    with pytest.raises(ValueError, match="test"):
        plotting.plot_r2_curves({"a": {"train": good}})
    with pytest.raises(ValueError, match="val"):
        plotting.plot_r2_curves({"a": {"test": good, "val": good}})
    with pytest.raises(ValueError, match="test"):
        plotting.plot_r2_curves({"a": {"test": np.zeros((2, 3, 4))}})
    with pytest.raises(ValueError, match="band"):
        plotting.plot_r2_curves({"a": {"test": good}}, band="iqr")
    with pytest.raises(ValueError, match="baselines"):
        plotting.plot_r2_curves({"a": {"test": good}}, baselines={"b": np.nan})
    with pytest.raises(TypeError, match="curves"):
        plotting.plot_r2_curves([good])


# --------------------------------------------------------------------------- #
# sbnn_figure
# --------------------------------------------------------------------------- #
def test_sbnn_figure_writes_png_and_has_expected_axes(tmp_path):
    latent, labels = _blobs()
    genes = {g: latent[:, 0] * (i + 1) for i, g in enumerate(["Pvalb", "Sst", "Vip", "Lamp5",
                                                              "Gad1", "Slc17a7", "Npy"])}
    ys = {"AP width": latent[:, 1], "Rheobase": latent.sum(1)}
    path = tmp_path / "sbnn.png"
    fig = plotting.sbnn_figure(
        latent, labels, gene_predictions=genes, y_predictions=ys, curves=_curves(),
        baselines={"sRRR rank 2": 0.2}, stage_boundaries={"unfreeze": 5}, path=path, dpi=50,
        max_panels=6,
    )
    assert path.exists()
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a + 6 (capped) genes + 2 features + d
    assert len(fig.axes) == 1 + 6 + 2 + 1
    axlabels = [ax.get_label() for ax in fig.axes]
    assert axlabels[0] == "latent" and "r2" in axlabels
    assert [a for a in axlabels if a.startswith("gene:")] == [f"gene:{g}" for g in list(genes)[:6]]
    assert [a for a in axlabels if a.startswith("y:")] == ["y:AP width", "y:Rheobase"]
    titles = {ax.get_label(): ax.get_title() for ax in fig.axes}
    assert titles["y:Rheobase"] == "Rheobase"


def test_sbnn_figure_minimal_and_size_scales(tmp_path):
    latent, labels = _blobs()
    fig1 = plotting.sbnn_figure(latent, labels)
    assert len(fig1.axes) == 1
    genes = {f"g{i}": latent[:, 0] + i for i in range(8)}
    fig2 = plotting.sbnn_figure(latent, labels, gene_predictions=genes, max_panels=8)
    assert len(fig2.axes) == 9
    assert fig2.get_figheight() > fig1.get_figheight()


def test_sbnn_figure_bad_inputs_leave_no_open_figure():
    latent, labels = _blobs()
    n_open = len(plt.get_fignums())
    with pytest.raises(ValueError, match=r"gene_predictions\['Sst'\]"):
        plotting.sbnn_figure(latent, labels, gene_predictions={"Sst": np.zeros(5)})
    with pytest.raises(ValueError, match="latent"):
        plotting.sbnn_figure(np.zeros((10, 3)), labels[:10])
    with pytest.raises(ValueError, match="curves"):
        plotting.sbnn_figure(latent, labels, baselines={"b": 0.1})
    assert len(plt.get_fignums()) == n_open


def test_spatial_imputation_figure_writes_png_with_shared_type_colours(tmp_path):
    rng = np.random.default_rng(0)
    xy = rng.uniform(size=(80, 2))
    m = {"g1": xy[:, 0], "g2": xy[:, 1]}
    p = {"g1": xy[:, 0] + 0.1 * rng.normal(size=80), "g2": rng.normal(size=80)}
    true = np.where(xy[:, 0] > 0.5, "a", "b")
    pred = np.full(80, "b")
    path = tmp_path / "maps.png"
    fig = plotting.spatial_imputation_figure(xy, m, p, true_types=true, predicted_types=pred, path=path)
    assert path.exists() and path.stat().st_size > 1000
    axes = [ax for ax in fig.axes if ax.get_title()]
    titles = [ax.get_title() for ax in axes]
    assert titles[:4] == ["g1 measured", titles[1], "g2 measured", titles[3]] and "PCC" in titles[1]
    # "b" has the same colour in the true and the predicted panel
    true_ax, pred_ax = axes[-2], axes[-1]
    colour = lambda ax, lab: [c.get_facecolor()[0] for c in ax.collections if c.get_label() == lab][0]  # noqa: E731
    np.testing.assert_allclose(colour(true_ax, "b"), colour(pred_ax, "b"))
    plt.close(fig)
    with pytest.raises(ValueError, match="same genes"):
        plotting.spatial_imputation_figure(xy, m, {"g1": p["g1"]})
    with pytest.raises(ValueError, match="length"):
        plotting.spatial_imputation_figure(xy, {"g1": xy[:10, 0]}, {"g1": xy[:10, 0]})

"""Figures for sparse bottleneck neural networks (SBNN) and spatial imputation.

Plotting helpers that reproduce the kind of figure used to present a sparse
bottleneck network with a two-dimensional latent layer (Bernaerts, Berens &
Kobak, "Sparse bottleneck neural networks for exploratory non-linear
visualization of Patch-seq data"):

* :func:`plot_latent` -- the 2-D latent embedding coloured by cell type;
* :func:`plot_latent_overlay` -- one predicted quantity (a selected gene
  decoded by an autoencoder head, or an electrophysiological feature) drawn as
  a contour map over the triangulated latent coordinates;
* :func:`plot_r2_curves` -- train/test :math:`R^2` across epochs for several
  training schedules, with reduced-rank regression baselines;
* :func:`sbnn_figure` -- all of the above composed into one figure;
* :func:`plot_spatial_values` -- one gene's expression over the tissue coordinates;
* :func:`spatial_imputation_figure` -- measured vs imputed maps of a few genes and
  true vs predicted cell types (stAI / gimVI on a spatial dataset).

The module works on plain numpy arrays and depends only on numpy and
matplotlib (install with ``pip install 'jaxsel[plot]'``); matplotlib is
imported only when a function is called. Inputs are validated and never
modified. Every function draws into a caller-supplied ``ax`` when given (or
creates a new figure) and returns the :class:`matplotlib.figure.Figure`, so
panels can be composed freely.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping

import numpy as np

__all__ = [
    "plot_latent",
    "plot_latent_overlay",
    "plot_r2_curves",
    "sbnn_figure",
    "plot_spatial_values",
    "spatial_imputation_figure",
]

_MPL_MESSAGE = "jaxsel.plotting needs matplotlib: pip install 'jaxsel[plot]'"


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _mpl():
    """Import matplotlib lazily; return ``(matplotlib, pyplot)``."""
    try:
        import matplotlib
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - exercised only without matplotlib
        raise ImportError(_MPL_MESSAGE) from exc
    return matplotlib, plt


def _check_ax(ax, name="ax"):
    """Return ``ax`` if it is a matplotlib Axes (or None); raise TypeError otherwise."""
    if ax is None:
        return None
    from matplotlib.axes import Axes

    if not isinstance(ax, Axes):
        raise TypeError(
            f"{name} must be a matplotlib Axes or None, got {type(ax).__module__}."
            f"{type(ax).__qualname__}"
        )
    return ax


def _get_ax(ax, figsize):
    """Return ``(fig, ax)``: the given Axes and its figure, or a new pair."""
    _, plt = _mpl()
    ax = _check_ax(ax)
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def _as_float_array(x, name):
    """Convert ``x`` to a new float64 ndarray, raising TypeError if not numeric."""
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{name} must be a numeric array, got a string")
    if isinstance(x, Mapping):
        raise TypeError(f"{name} must be a numeric array, got a mapping")
    arr = np.asarray(x)
    if arr.dtype.kind in "iuf":
        return np.array(arr, dtype=np.float64, copy=True)
    if arr.dtype.kind == "b":
        raise TypeError(f"{name} must be a numeric array, got a boolean array")
    if arr.dtype.kind == "O":
        try:
            return np.array(arr, dtype=np.float64)
        except (TypeError, ValueError):
            pass
    raise TypeError(f"{name} must be a numeric array, got dtype {arr.dtype}")


def _check_latent(latent, name="latent", min_cells=1):
    """Validate a latent embedding: finite numeric array of shape [n_cells, 2]."""
    arr = _as_float_array(latent, name)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(
            f"{name} must be a 2-D array of shape [n_cells, 2], got shape {arr.shape}"
        )
    if arr.shape[0] < min_cells:
        raise ValueError(
            f"{name} must have at least {min_cells} row(s), got {arr.shape[0]}"
        )
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise ValueError(
            f"{name} contains NaN or infinite coordinates in {int(bad.sum())} of "
            f"{arr.shape[0]} rows (first at row {int(np.flatnonzero(bad)[0])})"
        )
    return arr


def _check_per_cell_shape(arr, n_cells, name):
    if arr.ndim != 1:
        raise ValueError(
            f"{name} must be a 1-D array of shape [n_cells] = [{n_cells}], "
            f"got shape {arr.shape}"
        )
    if arr.shape[0] != n_cells:
        raise ValueError(
            f"{name} has length {arr.shape[0]} but latent has {n_cells} rows; "
            "they must match"
        )


def _check_values(values, n_cells, name="values"):
    """Validate per-cell values: finite numeric array of shape [n_cells]."""
    arr = _as_float_array(values, name)
    _check_per_cell_shape(arr, n_cells, name)
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(
            f"{name} contains {int(bad.sum())} NaN or infinite value(s) "
            f"(first at index {int(np.flatnonzero(bad)[0])})"
        )
    return arr


def _is_missing(x):
    return x is None or (isinstance(x, float) and math.isnan(x))


def _check_labels(labels, n_cells, name="labels"):
    """Validate per-cell labels; return ``(labels_array, unique_labels)``.

    ``unique_labels`` are python scalars, sorted when they are mutually
    comparable and in order of first appearance otherwise.
    """
    if isinstance(labels, (str, bytes)):
        raise TypeError(f"{name} must be an array of per-cell labels, got a string")
    arr = np.asarray(labels)
    _check_per_cell_shape(arr, n_cells, name)
    as_list = arr.tolist()
    if arr.dtype.kind in "fcO" and any(_is_missing(v) for v in as_list):
        raise ValueError(f"{name} contains missing values (None or NaN)")
    uniq = list(dict.fromkeys(as_list))
    try:
        uniq = sorted(uniq)
    except TypeError:
        pass  # mixed, non-comparable types: keep order of first appearance
    return arr, uniq


def _label_mask(arr, label):
    if arr.dtype.kind == "O":
        return np.fromiter((v == label for v in arr.tolist()), dtype=bool, count=arr.size)
    return arr == label


def _check_number(x, name, *, allow_none=False):
    if x is None and allow_none:
        return None
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return x


def _longest_edges(x, y, triangles):
    """Longest edge length of each triangle, shape [n_triangles]."""
    px = x[triangles]
    py = y[triangles]
    dx = px - np.roll(px, -1, axis=1)
    dy = py - np.roll(py, -1, axis=1)
    return np.sqrt(dx * dx + dy * dy).max(axis=1)


def _masked_triangulation(latent, max_edge_quantile=0.95, max_edge_factor=2.0):
    """Delaunay triangulation of ``latent`` with long-edge triangles masked.

    A triangle is masked when its longest edge exceeds ``max_edge_factor``
    times the ``max_edge_quantile`` quantile of the longest edges of all
    triangles. ``max_edge_quantile=None`` disables masking.

    Returns
    -------
    matplotlib.tri.Triangulation
    """
    _mpl()
    import matplotlib.tri as mtri

    if latent.shape[0] < 3:
        raise ValueError(
            f"latent needs at least 3 cells to triangulate, got {latent.shape[0]}"
        )
    try:
        tri = mtri.Triangulation(latent[:, 0], latent[:, 1])
    except (RuntimeError, ValueError) as exc:
        raise ValueError(
            "latent could not be triangulated (are all points collinear or "
            f"identical?): {exc}"
        ) from exc
    if max_edge_quantile is None:
        return tri
    edges = _longest_edges(tri.x, tri.y, tri.triangles)
    threshold = max_edge_factor * np.quantile(edges, max_edge_quantile)
    mask = edges > threshold
    if mask.any():
        tri.set_mask(mask)
    return tri


def _auto_levels(vmin, vmax, n):
    """About ``n`` contour intervals with round boundaries covering [vmin, vmax]."""
    from matplotlib.ticker import MaxNLocator

    if vmax - vmin <= 1e-12 * max(1.0, abs(vmin), abs(vmax)):
        half = 0.5 * max(abs(vmin), 1.0) * 1e-3
        return np.array([vmin - half, vmax + half])
    lev = MaxNLocator(n + 1).tick_values(vmin, vmax)
    # keep the tightest run of levels that still covers [vmin, vmax]
    below = np.flatnonzero(lev <= vmin)
    above = np.flatnonzero(lev >= vmax)
    i0 = below[-1] if below.size else 0
    i1 = above[0] + 1 if above.size else lev.size
    lev = lev[i0:i1]
    if lev[0] > vmin:
        lev = np.concatenate([[vmin], lev])
    if lev[-1] < vmax:
        lev = np.concatenate([lev, [vmax]])
    return lev


def _check_levels(levels):
    if isinstance(levels, bool):
        raise TypeError("levels must be a positive int or an increasing sequence of numbers")
    if isinstance(levels, numbers.Integral):
        if levels < 1:
            raise ValueError(f"levels must be >= 1 when given as an int, got {levels}")
        return int(levels)
    arr = _as_float_array(levels, "levels")
    if arr.ndim != 1 or arr.size < 2:
        raise ValueError(
            f"levels must be an int or a 1-D sequence of at least 2 numbers, got shape {arr.shape}"
        )
    if not np.isfinite(arr).all():
        raise ValueError("levels must be finite")
    if np.any(np.diff(arr) <= 0):
        raise ValueError("levels must be strictly increasing")
    return arr


def _style_latent_ax(ax):
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal", adjustable="datalim")


# --------------------------------------------------------------------------- #
# public API
# --------------------------------------------------------------------------- #
def plot_latent(latent, labels=None, *, colors=None, ax=None, s=6, legend=True, title=None):
    """Scatter plot of a 2-D latent embedding, coloured by cell type.

    Parameters
    ----------
    latent : array-like, shape [n_cells, 2]
        Latent (bottleneck) coordinates of every cell. Must be finite.
    labels : array-like, shape [n_cells], optional
        Cell-type label of each cell (strings or ints). One scatter collection
        is drawn per distinct label. ``None`` draws all cells in one colour
        without a legend. Missing values (``None``/NaN) are rejected.
    colors : dict, optional
        Mapping label -> matplotlib colour. Must cover every label present;
        labels are then drawn (and listed in the legend) in the order of the
        dict's keys. By default labels are sorted and coloured by cycling
        through the ``tab20`` palette.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into; a new figure is created when omitted.
    s : float, default 6
        Marker size in points^2.
    legend : bool, default True
        Draw a legend (outside the axes, to the right) with the label names.
    title : str, optional
        Axes title.

    Returns
    -------
    matplotlib.figure.Figure
        The figure containing ``ax``.

    Raises
    ------
    ValueError
        If ``latent`` is not [n_cells, 2] or has non-finite entries, if
        ``labels`` has the wrong length or missing values, or if ``colors``
        lacks a label or holds an invalid colour.
    TypeError
        If ``latent`` is not numeric or ``colors``/``ax`` have the wrong type.
    """
    matplotlib, _ = _mpl()
    from matplotlib.colors import is_color_like

    latent = _check_latent(latent)
    s = _check_number(s, "s")
    if s <= 0:
        raise ValueError(f"s must be positive, got {s}")
    fig, ax = _get_ax(ax, figsize=(5.0, 4.0))

    if labels is None:
        ax.scatter(latent[:, 0], latent[:, 1], s=s, c="C0", linewidths=0)
    else:
        arr, uniq = _check_labels(labels, latent.shape[0])
        if colors is None:
            cmap = matplotlib.colormaps["tab20"]
            order = uniq
            palette = {lab: cmap(i % 20) for i, lab in enumerate(uniq)}
        else:
            if not isinstance(colors, Mapping):
                raise TypeError(
                    f"colors must be a dict mapping label -> colour, got {type(colors).__name__}"
                )
            present = set(uniq)
            missing = [lab for lab in uniq if lab not in colors]
            if missing:
                raise ValueError(
                    f"colors has no entry for label(s) {missing[:10]!r}"
                    + (" ..." if len(missing) > 10 else "")
                )
            order = [lab for lab in colors if lab in present]
            palette = {}
            for lab in order:
                col = colors[lab]
                if not is_color_like(col):
                    raise ValueError(f"colors[{lab!r}] is not a valid colour: {col!r}")
                palette[lab] = col
        for lab in order:
            m = _label_mask(arr, lab)
            ax.scatter(
                latent[m, 0],
                latent[m, 1],
                s=s,
                color=palette[lab],
                linewidths=0,
                label=str(lab),
            )
        if legend:
            ax.legend(
                loc="upper left",
                bbox_to_anchor=(1.01, 1.0),
                frameon=False,
                fontsize="small",
                markerscale=max(1.0, math.sqrt(25.0 / s)),
                handletextpad=0.2,
                ncol=1 if len(order) <= 16 else 2,
            )
    _style_latent_ax(ax)
    if title is not None:
        ax.set_title(title)
    return fig


def plot_latent_overlay(
    latent,
    values,
    *,
    ax=None,
    levels=8,
    cmap="viridis",
    max_edge_quantile=0.95,
    max_edge_factor=2.0,
    title=None,
    point_color="0.75",
    s=None,
    colorbar=False,
):
    """Contour map of a per-cell prediction over the 2-D latent embedding.

    The latent coordinates are Delaunay-triangulated and ``values`` are drawn
    as filled contours (``tricontourf``) with thin contour lines
    (``tricontour``) on top, plus the cells as small dots. Triangles that
    bridge empty regions of the embedding are masked so that the map is only
    drawn where there are cells.

    Parameters
    ----------
    latent : array-like, shape [n_cells, 2]
        Latent coordinates (at least 3 cells, not all collinear).
    values : array-like, shape [n_cells]
        Value to map at each cell, typically the network's prediction (a gene
        decoded from the latent, or an electrophysiological feature).
        Must be finite.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into; a new figure is created when omitted.
    levels : int or array-like, default 8
        Either the approximate number of contour intervals (boundaries are
        round numbers whose first is <= ``min(values)`` and last is
        >= ``max(values)``) or explicit, strictly increasing boundaries.
    cmap : str or matplotlib.colors.Colormap, default "viridis"
        Colormap of the filled contours.
    max_edge_quantile : float in (0, 1] or None, default 0.95
        Triangles whose longest edge exceeds ``max_edge_factor`` times this
        quantile of the longest edges of all triangles are masked
        (``Triangulation.set_mask``). ``None`` keeps all triangles.
    max_edge_factor : float, default 2.0
        Multiplier of the quantile above; must be >= 1.
    title : str, optional
        Axes title (e.g. the gene or feature name).
    point_color : colour, default "0.75"
        Colour of the cell dots; ``None`` hides them.
    s : float, optional
        Dot size in points^2; default ``min(2, 4000 / n_cells)``, so that the dots of
        large data sets do not hide the contours.
    colorbar : bool, default False
        Add a colorbar next to ``ax``.

    Returns
    -------
    matplotlib.figure.Figure
        The figure containing ``ax``.

    Raises
    ------
    ValueError
        On a malformed ``latent`` (shape, non-finite, fewer than 3 cells,
        collinear), ``values`` of the wrong shape/length or non-finite, or
        out-of-range ``levels``/``max_edge_quantile``/``max_edge_factor``.
    TypeError
        On non-numeric inputs or an ``ax`` that is not an Axes.
    """
    _mpl()
    from matplotlib.colors import is_color_like

    latent = _check_latent(latent, min_cells=3)
    values = _check_values(values, latent.shape[0])
    levels = _check_levels(levels)
    if max_edge_quantile is not None:
        max_edge_quantile = _check_number(max_edge_quantile, "max_edge_quantile")
        if not 0.0 < max_edge_quantile <= 1.0:
            raise ValueError(
                f"max_edge_quantile must be in (0, 1] or None, got {max_edge_quantile}"
            )
    max_edge_factor = _check_number(max_edge_factor, "max_edge_factor")
    if max_edge_factor < 1.0:
        raise ValueError(f"max_edge_factor must be >= 1, got {max_edge_factor}")
    if s is not None:
        s = _check_number(s, "s")
    if s is not None and s <= 0:
        raise ValueError(f"s must be positive, got {s}")
    if point_color is not None and not is_color_like(point_color):
        raise ValueError(f"point_color is not a valid colour: {point_color!r}")

    tri = _masked_triangulation(latent, max_edge_quantile, max_edge_factor)
    fig, ax = _get_ax(ax, figsize=(3.0, 3.0))

    vmin, vmax = float(values.min()), float(values.max())
    if isinstance(levels, int):
        lev = _auto_levels(vmin, vmax, levels)
    else:
        lev = levels
    extend = "neither" if (lev[0] <= vmin and lev[-1] >= vmax) else "both"
    filled = ax.tricontourf(tri, values, levels=lev, cmap=cmap, extend=extend, zorder=1)
    interior = lev[1:-1]
    inside = interior[(interior > vmin) & (interior < vmax)]
    if inside.size:
        ax.tricontour(
            tri, values, levels=inside, colors="0.15", linewidths=0.4, alpha=0.6, zorder=2
        )
    if point_color is not None:
        size = min(2.0, 4000.0 / latent.shape[0]) if s is None else s
        ax.scatter(
            latent[:, 0], latent[:, 1], s=size, color=point_color, linewidths=0, zorder=3
        )
    _style_latent_ax(ax)
    if title is not None:
        ax.set_title(title)
    if colorbar:
        fig.colorbar(filled, ax=ax, shrink=0.8)
    return fig


def _nan_mean_sd(arr):
    """Column mean and sample SD ignoring NaN, without empty-slice warnings."""
    ok = np.isfinite(arr)
    count = ok.sum(axis=0)
    total = np.where(ok, arr, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        dev = np.where(ok, arr - mean, 0.0)
        var = (dev * dev).sum(axis=0) / np.maximum(count - 1, 1)
    sd = np.where(count > 1, np.sqrt(var), np.nan)
    return mean, sd


def _check_curve(x, name):
    arr = _as_float_array(x, name)
    if arr.ndim == 1:
        arr = arr[None, :]
    elif arr.ndim != 2:
        raise ValueError(
            f"{name} must have shape [n_folds, n_epochs] or [n_epochs], got shape {arr.shape}"
        )
    if arr.shape[1] == 0 or arr.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if np.isinf(arr).any():
        raise ValueError(f"{name} contains infinite values; use NaN for epochs not run")
    if not np.isfinite(arr).any():
        raise ValueError(f"{name} has no finite values")
    return arr


def _check_curves(curves):
    if not isinstance(curves, Mapping):
        raise TypeError(
            "curves must be a dict name -> {'test': array, 'train': array}, "
            f"got {type(curves).__name__}"
        )
    if len(curves) == 0:
        raise ValueError("curves must contain at least one entry")
    out = {}
    for key, entry in curves.items():
        where = f"curves[{key!r}]"
        if not isinstance(entry, Mapping):
            raise TypeError(
                f"{where} must be a dict with key 'test' (and optionally 'train'), "
                f"got {type(entry).__name__}"
            )
        extra = set(entry) - {"test", "train"}
        if extra:
            raise ValueError(f"{where} has unknown key(s) {sorted(map(str, extra))}; "
                             "expected 'test' and optionally 'train'")
        if "test" not in entry:
            raise ValueError(f"{where} must have a 'test' entry")
        test = _check_curve(entry["test"], f"{where}['test']")
        train = None
        if entry.get("train") is not None:
            train = _check_curve(entry["train"], f"{where}['train']")
            if train.shape != test.shape:
                raise ValueError(
                    f"{where}['train'] has shape {train.shape} but {where}['test'] "
                    f"has shape {test.shape}; they must match"
                )
        out[key] = (test, train)
    return out


def _check_baselines(baselines):
    if baselines is None:
        return {}
    if not isinstance(baselines, Mapping):
        raise TypeError(
            f"baselines must be a dict name -> float or (mean, sd), got {type(baselines).__name__}"
        )
    out = {}
    for key, val in baselines.items():
        where = f"baselines[{key!r}]"
        if isinstance(val, (tuple, list, np.ndarray)):
            if len(val) != 2:
                raise ValueError(f"{where} must be a number or a (mean, sd) pair, got {val!r}")
            mean = _check_number(_scalar(val[0]), f"{where} mean")
            sd = _check_number(_scalar(val[1]), f"{where} sd")
            if sd < 0:
                raise ValueError(f"{where} sd must be >= 0, got {sd}")
        else:
            mean, sd = _check_number(_scalar(val), where), None
        out[key] = (mean, sd)
    return out


def _scalar(x):
    if isinstance(x, np.generic):
        return x.item()
    return x


def _check_boundaries(stage_boundaries):
    """Return a list of (label or None, epoch)."""
    if stage_boundaries is None:
        return []
    if isinstance(stage_boundaries, Mapping):
        items = list(stage_boundaries.items())
    else:
        if isinstance(stage_boundaries, (str, bytes)) or not np.iterable(stage_boundaries):
            raise TypeError(
                "stage_boundaries must be a sequence of epochs or a dict label -> epoch"
            )
        items = [(None, v) for v in stage_boundaries]
    return [
        (lab, _check_number(_scalar(v), f"stage_boundaries[{i}]"))
        for i, (lab, v) in enumerate(items)
    ]


def plot_r2_curves(curves, *, baselines=None, ax=None, stage_boundaries=None, show_train=True,
                   band="sd"):
    """Train and test :math:`R^2` across training epochs for several schedules.

    For each schedule the mean over cross-validation folds is drawn, test as a
    solid line and train as a dashed line in the same colour, with either a
    shaded +-1 SD band or thin per-fold lines. Epochs are numbered from 1 on
    the x axis.

    Parameters
    ----------
    curves : dict
        ``name -> {"test": array, "train": array}``. Each array has shape
        [n_folds, n_epochs] (or [n_epochs] for a single run); ``"train"`` is
        optional and must have the shape of ``"test"``. NaN marks epochs that
        were not run (e.g. after early stopping) and is ignored when
        averaging; an epoch with no finite value leaves a gap.
    baselines : dict, optional
        ``name -> value`` or ``name -> (mean, sd)``, e.g. the test
        :math:`R^2` of sparse reduced-rank regression. Each is drawn as a
        horizontal dash-dotted line (with a faint +-SD band when an SD is
        given).
    ax : matplotlib.axes.Axes, optional
        Axes to draw into; a new figure is created when omitted.
    stage_boundaries : sequence of float or dict, optional
        Epochs at which a vertical dotted line is drawn (e.g. ``[50, 100]``
        for the end of the frozen stage and pruning). A dict
        ``label -> epoch`` also writes the label next to the line.
    show_train : bool, default True
        Draw the training curves (dashed).
    band : {"sd", "folds", None}, default "sd"
        ``"sd"``: shaded mean +- sample standard deviation (ddof=1) across
        folds; ``"folds"``: one thin line per fold; ``None``: mean only.
        Ignored for single-run curves.

    Returns
    -------
    matplotlib.figure.Figure
        The figure containing ``ax``.

    Notes
    -----
    Lines are labelled so that they can be found again: the test mean line
    of schedule ``name`` has label ``name``, its train mean line
    ``f"{name} (train)"``, baselines carry their name, and per-fold lines and
    stage boundaries have labels starting with ``"_"``.

    Raises
    ------
    ValueError
        On malformed shapes, mismatched train/test shapes, infinite values,
        curves without any finite value, unknown keys or an unknown ``band``.
    TypeError
        If ``curves``/``baselines`` are not dicts or values are not numeric.
    """
    _mpl()
    from matplotlib.lines import Line2D

    data = _check_curves(curves)
    base = _check_baselines(baselines)
    bounds = _check_boundaries(stage_boundaries)
    if band not in ("sd", "folds", None):
        raise ValueError(f"band must be 'sd', 'folds' or None, got {band!r}")
    fig, ax = _get_ax(ax, figsize=(5.0, 3.5))

    handles = []
    any_train = False
    max_epochs = 1
    for i, (name, (test, train)) in enumerate(data.items()):
        color = f"C{i % 10}"
        epochs = np.arange(1, test.shape[1] + 1)
        max_epochs = max(max_epochs, test.shape[1])
        series = [("test", test, "-")]
        if show_train and train is not None:
            series.append(("train", train, "--"))
            any_train = True
        for kind, arr, ls in series:
            mean, sd = _nan_mean_sd(arr)
            label = str(name) if kind == "test" else f"{name} (train)"
            (line,) = ax.plot(epochs, mean, color=color, linestyle=ls, linewidth=1.5,
                              label=label, zorder=3)
            if kind == "test":
                handles.append(line)
            if arr.shape[0] > 1 and band == "sd":
                ok = np.isfinite(sd)
                ax.fill_between(epochs, mean - np.where(ok, sd, 0), mean + np.where(ok, sd, 0),
                                where=ok, color=color, alpha=0.15 if kind == "test" else 0.08,
                                linewidth=0, zorder=1)
            elif arr.shape[0] > 1 and band == "folds":
                for f in range(arr.shape[0]):
                    ax.plot(epochs, arr[f], color=color, linestyle=ls, linewidth=0.5,
                            alpha=0.35, label=f"_{name} {kind} fold {f}", zorder=2)

    for j, (name, (mean, sd)) in enumerate(base.items()):
        color = f"C{(len(data) + j) % 10}"
        line = ax.axhline(mean, color=color, linestyle="-.", linewidth=1.2, label=str(name),
                          zorder=2)
        handles.append(line)
        if sd is not None and sd > 0:
            ax.axhspan(mean - sd, mean + sd, color=color, alpha=0.1, linewidth=0, zorder=0)

    for k, (lab, epoch) in enumerate(bounds):
        ax.axvline(epoch, color="0.4", linestyle=":", linewidth=1.0, zorder=0,
                   label=f"_stage boundary {k}")
        if lab is not None:
            ax.text(epoch, 1.0, f" {lab}", transform=ax.get_xaxis_transform(),
                    rotation=90, va="top", ha="left", fontsize="x-small", color="0.3")

    if any_train:
        handles.append(Line2D([], [], color="0.3", linestyle="-", label="test"))
        handles.append(Line2D([], [], color="0.3", linestyle="--", label="train"))
    ax.set_xlim(1, max(max_epochs, 2))
    ax.set_xlabel("Epoch")
    ax.set_ylabel("$R^2$")
    ax.legend(handles=handles, fontsize="x-small", frameon=False, loc="best")
    return fig


def _panels_per_row(n):
    if n <= 4:
        return max(n, 1)
    return math.ceil(n / math.ceil(n / 4))


def _panel_letter(ax, letter):
    ax.text(-0.08, 1.04, letter, transform=ax.transAxes, fontweight="bold",
            fontsize="large", ha="right", va="bottom")


def _check_prediction_dict(preds, n_cells, name, max_panels):
    if preds is None:
        return []
    if not isinstance(preds, Mapping):
        raise TypeError(f"{name} must be a dict name -> array of shape [n_cells], "
                        f"got {type(preds).__name__}")
    items = list(preds.items())[:max_panels]
    return [(key, _check_values(v, n_cells, name=f"{name}[{key!r}]")) for key, v in items]


def sbnn_figure(latent, labels, *, gene_predictions=None, y_predictions=None, curves=None,
                baselines=None, colors=None, stage_boundaries=None, path=None, dpi=150,
                max_panels=6):
    """Compose the sparse-bottleneck-network overview figure.

    Panels, each present only when its input is given:

    * **a** -- latent embedding coloured by cell type (:func:`plot_latent`);
    * **b** -- one :func:`plot_latent_overlay` per predicted gene;
    * **c** -- one :func:`plot_latent_overlay` per predicted Y feature
      (e.g. electrophysiology);
    * **d** -- train/test :math:`R^2` curves (:func:`plot_r2_curves`).

    Panels a and d share the top row; the small multiples of b and c follow
    in rows of up to four panels. The figure size grows with the number of
    panels.

    Parameters
    ----------
    latent : array-like, shape [n_cells, 2]
        Latent coordinates of the cells.
    labels : array-like, shape [n_cells] or None
        Cell-type labels for panel a.
    gene_predictions : dict, optional
        ``gene name -> predicted expression, shape [n_cells]``. The first
        ``max_panels`` entries (in dict order) are shown.
    y_predictions : dict, optional
        ``feature name -> predicted value, shape [n_cells]``; the first
        ``max_panels`` entries are shown.
    curves, baselines, stage_boundaries
        Passed to :func:`plot_r2_curves`; panel d is drawn only when
        ``curves`` is given (``baselines``/``stage_boundaries`` without
        ``curves`` raise ValueError).
    colors : dict, optional
        Label -> colour for panel a (see :func:`plot_latent`).
    path : str or os.PathLike, optional
        If given, the figure is saved there (format from the file extension,
        PNG when there is none; PNG is intended).
    dpi : float, default 150
        Resolution used when saving.
    max_panels : int, default 6
        Maximum number of panels in each of b and c.

    Returns
    -------
    matplotlib.figure.Figure
        The figure; it stays open (close it with ``plt.close(fig)``). Each
        axes has a label (``ax.get_label()``): ``"latent"``, ``"gene:NAME"``,
        ``"y:NAME"`` or ``"r2"``.

    Raises
    ------
    ValueError, TypeError
        On invalid inputs, as described for the individual functions.
    """
    _, plt = _mpl()

    if isinstance(max_panels, bool) or not isinstance(max_panels, numbers.Integral):
        raise TypeError(f"max_panels must be an int, got {type(max_panels).__name__}")
    if max_panels < 1:
        raise ValueError(f"max_panels must be >= 1, got {max_panels}")
    dpi = _check_number(dpi, "dpi")
    if dpi <= 0:
        raise ValueError(f"dpi must be positive, got {dpi}")
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")

    latent = _check_latent(latent)
    if labels is not None:
        _check_labels(labels, latent.shape[0])
    genes = _check_prediction_dict(gene_predictions, latent.shape[0], "gene_predictions",
                                   max_panels)
    feats = _check_prediction_dict(y_predictions, latent.shape[0], "y_predictions", max_panels)
    if curves is None and (baselines is not None or stage_boundaries is not None):
        raise ValueError("baselines and stage_boundaries need curves (panel d)")
    if curves is not None:
        # validate before any figure exists so bad input leaves no open figure
        _check_curves(curves)
        _check_baselines(baselines)
        _check_boundaries(stage_boundaries)
    if (genes or feats) and latent.shape[0] < 3:
        raise ValueError(f"latent needs at least 3 cells for contour panels, got {latent.shape[0]}")

    k = _panels_per_row(max(len(genes), len(feats)))
    rows_b = math.ceil(len(genes) / k) if genes else 0
    rows_c = math.ceil(len(feats) / k) if feats else 0
    small = 2.3
    width = max(10.0, small * k + 0.5)
    height = 3.8 + small * (rows_b + rows_c) + 0.2 * ((rows_b > 0) + (rows_c > 0))
    fig = plt.figure(figsize=(width, height), layout="constrained")
    try:
        sections = [("top", 1.6)]
        if rows_b:
            sections.append(("b", float(rows_b)))
        if rows_c:
            sections.append(("c", float(rows_c)))
        outer = fig.add_gridspec(len(sections), 1, height_ratios=[h for _, h in sections])

        top = outer[0].subgridspec(1, 2, width_ratios=[1.0, 1.15])
        ax_a = fig.add_subplot(top[0, 0], label="latent")
        plot_latent(latent, labels, colors=colors, ax=ax_a)
        _panel_letter(ax_a, "a")

        for si, (sec, _) in enumerate(sections[1:], start=1):
            items, rows, prefix = (genes, rows_b, "gene") if sec == "b" else (feats, rows_c, "y")
            sub = outer[si].subgridspec(rows, k)
            for idx, (name, vals) in enumerate(items):
                ax = fig.add_subplot(sub[idx // k, idx % k], label=f"{prefix}:{name}")
                plot_latent_overlay(latent, vals, ax=ax, title=str(name))
                if idx == 0:
                    _panel_letter(ax, sec)

        if curves is not None:
            ax_d = fig.add_subplot(top[0, 1], label="r2")
            plot_r2_curves(curves, baselines=baselines, ax=ax_d,
                           stage_boundaries=stage_boundaries)
            _panel_letter(ax_d, "d")

        if path is not None:
            fig.savefig(path, dpi=dpi, format=None if os.path.splitext(os.fspath(path))[1]
                        else "png")
    except Exception:
        plt.close(fig)
        raise
    return fig


# --------------------------------------------------------------------------- #
# spatial maps
# --------------------------------------------------------------------------- #
def plot_spatial_values(coords, values, *, ax=None, s=4, cmap="viridis", vmin=None, vmax=None, title=None,
                        colorbar=True):
    """Scatter of the cells at ``coords`` [n_cells, 2] coloured by ``values`` [n_cells].

    The colour range defaults to the 1st-99th percentiles of ``values`` (robust to a few
    extreme cells). Returns the figure.
    """
    xy = _check_latent(coords, "coords")
    v = _check_values(values, xy.shape[0])
    fig, ax = _get_ax(ax, (4, 4))
    lo, hi = np.percentile(v, [1, 99]) if v.size else (0.0, 1.0)
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=v, s=s, cmap=cmap, vmin=lo if vmin is None else vmin,
                    vmax=hi if vmax is None else vmax, linewidths=0, rasterized=True)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    if colorbar:
        fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
    return fig


def spatial_imputation_figure(coords, measured, imputed, *, true_types=None, predicted_types=None, s=3,
                              path=None, dpi=150):
    """Measured vs imputed expression maps, one row per gene, and (optionally) a last row
    of true vs predicted cell types.

    ``measured`` and ``imputed`` map gene names to per-cell values (same keys). Each map
    gets its own 1st-99th percentile colour range: imputed values are on the reference's
    scale, so the maps compare spatial patterns, as PCC does. True and predicted types
    share one colour per type. ``path`` saves a PNG. Returns the figure.
    """
    _, plt = _mpl()
    xy = _check_latent(coords, "coords")
    if not isinstance(measured, Mapping) or not isinstance(imputed, Mapping):
        raise TypeError("measured and imputed must be mappings gene -> per-cell values")
    if list(measured) != list(imputed):
        raise ValueError(f"measured and imputed must have the same genes, got {list(measured)} and {list(imputed)}")
    if not measured:
        raise ValueError("measured is empty: give at least one gene")
    types = true_types is not None or predicted_types is not None
    names = []
    rows = len(measured) + int(types)
    aspect = float(np.ptp(xy[:, 1]) / max(np.ptp(xy[:, 0]), 1e-12))
    fig, axes = plt.subplots(rows, 2, figsize=(7.0, max(2.2, 2.6 * min(aspect, 2.0)) * rows), squeeze=False)
    for i, gene in enumerate(measured):
        m, p = _check_values(measured[gene], xy.shape[0], f"measured[{gene!r}]"), _check_values(
            imputed[gene], xy.shape[0], f"imputed[{gene!r}]")
        r = float(np.corrcoef(m, p)[0, 1]) if m.std() > 0 and p.std() > 0 else float("nan")
        plot_spatial_values(xy, m, ax=axes[i, 0], s=s, title=f"{gene} measured")
        plot_spatial_values(xy, p, ax=axes[i, 1], s=s, title=f"{gene} imputed (PCC {r:.2f})")
    if types:
        present = [v for lab in (true_types, predicted_types) if lab is not None for v in np.asarray(lab).tolist()]
        names = sorted(set(map(str, present)))
        palette = plt.get_cmap("tab20")
        colors = {n: palette(i % 20) for i, n in enumerate(names)}
        for j, (lab, name) in enumerate(((true_types, "true cell types"), (predicted_types, "predicted cell types"))):
            ax = axes[-1, j]
            if lab is None:
                ax.axis("off")
                continue
            plot_latent(xy, np.asarray(lab).astype(str), colors=colors, ax=ax, s=s, legend=False, title=name)
            ax.set_aspect("equal")
        handles = [plt.Line2D([], [], ls="", marker="o", color=colors[n], label=n) for n in names]
        fig.legend(handles=handles, loc="lower center", ncol=min(4, len(names)), fontsize=7, frameon=False)
    n_leg_rows = -(-len(names) // 4) if types else 0
    fig.tight_layout(rect=(0, 0.02 * n_leg_rows, 1, 1))
    if path is not None:
        fig.savefig(os.fspath(path), dpi=dpi)
    return fig

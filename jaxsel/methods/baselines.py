"""Plain marker-selection baselines of the MarkerMap paper, in pure JAX.

The MarkerMap paper (Gregory et al., npj Syst Biol Appl 2024) compares its selector
with three families of simple baselines, all reimplemented here:

* :func:`random_markers` -- ``n_markers`` genes drawn uniformly without replacement;
* :func:`highly_variable_genes` -- Seurat-flavour highly variable genes, as scanpy's
  ``sc.pp.highly_variable_genes(adata, flavor="seurat", n_top_genes=n_markers)`` computes
  them on log1p data;
* :func:`de_markers` -- one-vs-rest differential expression (:func:`de_scores`: scanpy's
  ``t-test``, ``t-test_overestim_var`` and ``wilcoxon`` scores) followed by the paper's
  round-robin rule (:func:`round_robin_markers`): cell types take turns, each taking its
  best-scoring gene that has not been chosen yet.

The spatial-imputation benchmarks' simple baseline is here too: :func:`knn_pca_impute`
averages the reference expression of each spatial cell's nearest reference cells in a
PCA of the shared genes fitted on both datasets (SpaGE-like, without its domain
alignment).

Every function takes JAX or numpy arrays, returns JAX arrays, works in float32, is
jit-compiled with its structural arguments static, and never modifies its inputs.
Marker indices are int32 arrays of shape ``[n_markers]`` holding distinct gene indices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ..engine import chunk_map, linalg

__all__ = [
    "DE_METHODS",
    "random_markers",
    "highly_variable_genes",
    "highly_variable_genes_from_moments",
    "de_scores",
    "de_scores_from_moments",
    "de_markers",
    "round_robin_markers",
    "knn_pca_impute",
    "nearest_indices",
]

DE_METHODS = ("t-test", "t-test_overestim_var", "wilcoxon")
"""Differential-expression scores understood by :func:`de_scores` and :func:`de_markers`."""

DE_GENE_BATCH = 128
"""Genes per step of :func:`de_scores`' gene loop (its default ``gene_batch_size``)."""


def _check_n_markers(n_markers: int, n_genes: int) -> None:
    """Raise ``ValueError`` unless ``1 <= n_markers <= n_genes`` (trace-time check)."""
    if not 1 <= n_markers <= n_genes:
        raise ValueError(
            f"n_markers must lie in [1, n_genes={n_genes}], got n_markers={n_markers}"
        )


def _descending_order(scores: jax.Array) -> jax.Array:
    """Indices sorting ``scores`` along the last axis from best to worst.

    The sort is stable, so equal scores (``+0.0`` and ``-0.0`` included) keep the lowest
    index first; NaN scores come last.
    """
    return jnp.argsort(-scores, axis=-1, stable=True)


# ---------------------------------------------------------------------------------------
# random
# ---------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("n_genes", "n_markers"))
def random_markers(key: jax.Array, n_genes: int, n_markers: int) -> jax.Array:
    """Draw ``n_markers`` distinct genes uniformly at random.

    Parameters
    ----------
    key
        Typed PRNG key (``jax.random.key``).
    n_genes
        Number of genes to draw from (static).
    n_markers
        Number of markers to draw, ``1 <= n_markers <= n_genes`` (static).

    Returns
    -------
    markers
        ``[n_markers]`` int32 distinct gene indices, in draw order.

    Raises
    ------
    ValueError
        If ``n_markers`` is not in ``[1, n_genes]``.
    """
    _check_n_markers(n_markers, n_genes)
    return jax.random.choice(key, n_genes, (n_markers,), replace=False).astype(jnp.int32)


# ---------------------------------------------------------------------------------------
# highly variable genes (Seurat flavour)
# ---------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("n_markers", "n_bins"))
def highly_variable_genes(
    x_log: jax.Array, n_markers: int, n_bins: int = 20
) -> tuple[jax.Array, jax.Array]:
    """Seurat-flavour highly variable genes, as scanpy's ``flavor="seurat"``.

    On ``expm1(x_log)`` each gene gets its mean and its variance (``ddof=1``); a zero mean
    is replaced by ``1e-12``, the dispersion is ``var / mean``, a zero dispersion becomes
    NaN, and the dispersion is log-transformed while the mean is ``log1p``-transformed.
    Genes are then binned by log mean into ``n_bins`` equal-width bins spanning
    ``[min, max]`` (right-closed intervals, as ``pandas.cut``), and each gene's log
    dispersion is z-scored within its bin using the bin's mean and ``ddof=1`` standard
    deviation over the non-NaN dispersions.

    Bins where that standard deviation is undefined (fewer than two non-NaN dispersions,
    e.g. a bin holding a single gene) are handled exactly as scanpy does: the bin's
    "standard deviation" is set to its mean dispersion and its mean to 0, so the one
    finite gene there gets a normalised dispersion of 1 (NaN in the degenerate case of a
    log dispersion of exactly 0). Genes with NaN dispersion (e.g. all-zero genes) keep a
    NaN normalised dispersion, as do genes in a bin whose dispersions are all equal.
    The arithmetic is float32 (scanpy's is float64): log dispersions closer than float32
    resolution (~1e-7) count as equal here, so these NaN cases also arise where scanpy
    would return a finite value from differences in the 8th digit.

    Parameters
    ----------
    x_log
        ``[n_cells, n_genes]`` log1p-normalised expression (natural log).
    n_markers
        Number of genes to select, ``1 <= n_markers <= n_genes`` (static).
    n_bins
        Number of equal-width mean bins (static). scanpy's default, 20.

    Returns
    -------
    markers
        ``[n_markers]`` int32 indices of the genes with the highest normalised dispersion,
        best first. NaN dispersions sort last; ties keep the lowest index first. Exactly
        ``n_markers`` genes are returned (scanpy's threshold rule may return more on ties).
    dispersions_norm
        ``[n_genes]`` float32 normalised dispersions (NaN where undefined).

    Raises
    ------
    ValueError
        If ``n_markers`` is not in ``[1, n_genes]`` or ``n_bins < 1``.
    """
    x_log = jnp.asarray(x_log, jnp.float32)
    n_cells, n_genes = x_log.shape
    _check_n_markers(n_markers, n_genes)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")

    # Two-pass mean / variance on the de-logged data, shifted by the first cell so that a
    # constant gene has exactly zero variance; XLA fuses expm1 into the reductions.
    counts = jnp.expm1(x_log)
    shifted = counts - counts[0]
    shifted_mean = jnp.mean(shifted, axis=0)
    var = jnp.sum(jnp.square(shifted - shifted_mean), axis=0) / (n_cells - 1)
    mean = counts[0] + shifted_mean
    return _normalised_dispersion(mean, var, n_markers, n_bins)


@functools.partial(jax.jit, static_argnames=("n_markers", "n_bins"))
def highly_variable_genes_from_moments(mean, var, n_markers: int, n_bins: int = 20):
    """:func:`highly_variable_genes` from every gene's ``mean`` and ``var`` (``ddof=1``)
    of ``expm1(x_log)`` [n_genes], e.g. accumulated in one pass over data on disk
    (:func:`jaxsel.streaming.group_moments`). Same outputs."""
    mean = jnp.asarray(mean, jnp.float32)
    _check_n_markers(n_markers, mean.shape[0])
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    return _normalised_dispersion(mean, jnp.asarray(var, jnp.float32), n_markers, n_bins)


def _normalised_dispersion(mean, var, n_markers: int, n_bins: int):
    """Seurat's binned dispersion z-scores from each gene's mean and variance (see
    :func:`highly_variable_genes`); ``(markers, dispersions_norm)``."""
    mean = jnp.where(mean == 0, 1e-12, mean)
    dispersion = var / mean
    dispersion = jnp.where(dispersion == 0, jnp.nan, dispersion)
    log_disp = jnp.log(dispersion)
    log_mean = jnp.log1p(mean)

    # Equal-width bins over [min, max], intervals (e_i, e_{i+1}] as pandas.cut.
    lo, hi = jnp.min(log_mean), jnp.max(log_mean)
    inner_edges = lo + (hi - lo) * jnp.arange(1, n_bins, dtype=jnp.float32) / n_bins
    bins = jnp.sum(log_mean[:, None] > inner_edges[None, :], axis=1)  # [n_genes]

    # Per-bin mean and ddof=1 std over the non-NaN dispersions (pandas groupby skips NaN).
    finite = ~jnp.isnan(log_disp)
    d0 = jnp.where(finite, log_disp, 0.0)
    count = jax.ops.segment_sum(finite.astype(jnp.float32), bins, num_segments=n_bins)
    bin_mean = jax.ops.segment_sum(d0, bins, num_segments=n_bins) / count
    dev = jnp.where(finite, log_disp - bin_mean[bins], 0.0)
    bin_ss = jax.ops.segment_sum(jnp.square(dev), bins, num_segments=n_bins)
    bin_std = jnp.where(count > 1, jnp.sqrt(bin_ss / (count - 1)), jnp.nan)

    # scanpy: where the std is NaN, std <- mean and mean <- 0.
    undefined = jnp.isnan(bin_std)
    bin_std, bin_mean = (
        jnp.where(undefined, bin_mean, bin_std),
        jnp.where(undefined, 0.0, bin_mean),
    )
    dispersions_norm = (log_disp - bin_mean[bins]) / bin_std[bins]

    markers = _descending_order(dispersions_norm)[:n_markers].astype(jnp.int32)
    return markers, dispersions_norm


# ---------------------------------------------------------------------------------------
# one-vs-rest differential expression scores
# ---------------------------------------------------------------------------------------


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """Full-float32 matrix product (no TF32/bf16 passes on accelerators)."""
    return jnp.matmul(a, b, precision=lax.Precision.HIGHEST)


def _t_scores(v: jax.Array, onehot: jax.Array, n_g: jax.Array, overestim_var: bool):
    """Welch t statistics of each group vs the rest for one gene.

    The gene is shifted by its first value (t is shift-invariant), group means and
    within-group sums of squares are two-pass, and the rest's sum of squares
    uses the exact ANOVA decomposition (within-group sums plus between-group terms), so no
    float32 cancellation of large raw second moments occurs.

    Parameters
    ----------
    v
        ``[n_cells]`` expression of one gene.
    onehot
        ``[n_cells, n_classes]`` float32 one-hot labels.
    n_g
        ``[n_classes]`` float32 group sizes.
    overestim_var
        Divide the rest variance by the group size instead of the rest size.

    Returns
    -------
    scores
        ``[n_classes]`` t statistics, NaN replaced by 0.
    """
    n = jnp.float32(v.shape[0])
    v = v - v[0]  # t is shift-invariant; shifting keeps float32 moments accurate
    s_g = _dot(v, onehot)
    m_g = jnp.where(n_g > 0, s_g / jnp.maximum(n_g, 1.0), 0.0)
    w_g = _dot(jnp.square(v - _dot(onehot, m_g)), onehot)  # within-group sums of squares
    return _welch_t(n, n_g, s_g, m_g, w_g, overestim_var)


def _welch_t(n, n_g, s_g, m_g, w_g, overestim_var: bool):
    """Welch t of each group vs the rest for one gene from the group sizes ``n_g``, sums
    ``s_g`` and means ``m_g`` of the (shifted) gene and within-group sums of squares
    ``w_g`` [n_classes] (``n`` cells in all), NaN replaced by 0."""
    n_r = n - n_g
    not_self = 1.0 - jnp.eye(n_g.shape[0], dtype=jnp.float32)  # [g, h]: h != g
    m_r = jnp.sum(not_self * s_g[None, :], axis=1) / n_r  # rest means  [n_classes]
    # SS_rest(g) = sum_{h != g} [W_h + n_h (m_h - m_r(g))^2]: a sum of non-negative terms
    between = n_g[None, :] * jnp.square(m_g[None, :] - m_r[:, None])  # [g, h]
    ss_r = jnp.sum(not_self * (w_g[None, :] + between), axis=1)
    var_g = w_g / (n_g - 1.0)
    var_r = ss_r / (n_r - 1.0)
    rest_n = n_g if overestim_var else n_r
    t = (m_g - m_r) / jnp.sqrt(var_g / n_g + var_r / rest_n)
    return jnp.where(jnp.isnan(t), 0.0, t)


def _sortable_int32(v: jax.Array) -> jax.Array:
    """Map float32 values to int32 keys with the same order and the same ties.

    ``-0.0`` is folded onto ``+0.0`` first; the bits of negative floats are then flipped
    (sign bit kept) so that integer order matches float order. Sorting int32 keys is
    several times faster than sorting float32 on CPU. NaN inputs are not supported.
    """
    bits = lax.bitcast_convert_type(jnp.where(v == 0, 0.0, v), jnp.int32)
    return bits ^ ((bits >> 31) & jnp.int32(0x7FFFFFFF))


def _wilcoxon_scores(v: jax.Array, onehot: jax.Array, n_g: jax.Array) -> jax.Array:
    """Tie-corrected Wilcoxon rank-sum z-scores of each group vs the rest for one gene.

    Average ranks come from one sort and two ``searchsorted`` calls (on order-preserving
    int32 keys, see :func:`_sortable_int32`): a value's ties span
    positions ``[left, right)`` of the sorted vector, so its average 1-based rank is
    ``(left + right + 1) / 2`` and its tie-group size is ``right - left``. Ranks are
    centred on ``(n + 1) / 2`` before summing so that group rank sums stay small and exact
    in float32. The tie sum ``sum_t (t^3 - t)`` equals ``sum_i (c_i^2 - 1)`` over cells,
    ``c_i`` being the size of cell ``i``'s tie group.

    Parameters
    ----------
    v
        ``[n_cells]`` expression of one gene.
    onehot
        ``[n_cells, n_classes]`` float32 one-hot labels.
    n_g
        ``[n_classes]`` float32 group sizes.

    Returns
    -------
    scores
        ``[n_classes]`` z-scores; 0 where the variance vanishes (constant gene, empty group).
    """
    n = v.shape[0]
    nf = jnp.float32(n)
    key = _sortable_int32(v)
    s = jnp.sort(key)
    left = jnp.searchsorted(s, key, side="left")
    right = jnp.searchsorted(s, key, side="right")
    centred_rank = (left + right - n).astype(jnp.float32) / 2.0  # rank - (n + 1) / 2
    ties = (right - left).astype(jnp.float32)
    if n > 1:
        tie_factor = 1.0 - jnp.mean((jnp.square(ties) - 1.0) / (nf * nf - 1.0))
    else:
        tie_factor = jnp.float32(0.0)
    tie_factor = jnp.maximum(tie_factor, 0.0)
    numerator = _dot(centred_rank, onehot)  # R_g - n_g (n + 1) / 2
    variance = tie_factor * n_g * (nf - n_g) * (nf + 1.0) / 12.0
    safe = variance > 0
    return jnp.where(safe, numerator / jnp.sqrt(jnp.where(safe, variance, 1.0)), 0.0)


@functools.partial(jax.jit, static_argnames=("n_classes", "method", "gene_batch_size"))
def de_scores(
    x: jax.Array,
    y: jax.Array,
    n_classes: int,
    method: str = "t-test",
    gene_batch_size: int = DE_GENE_BATCH,
) -> jax.Array:
    """One-vs-rest differential-expression scores of every gene for every cell type.

    The scores follow scanpy's ``rank_genes_groups(..., reference="rest")``:

    * ``"t-test"``: Welch's t, ``(mean_g - mean_rest) / sqrt(var_g / n_g + var_rest /
      n_rest)`` with ``ddof=1`` variances (``scipy.stats.ttest_ind(equal_var=False)``);
    * ``"t-test_overestim_var"``: the same with the rest's variance divided by ``n_g``
      instead of ``n_rest``;
    * ``"wilcoxon"``: the rank-sum z-score ``(R_g - n_g (n + 1) / 2) / sqrt(n_g n_rest
      (n + 1) / 12 * tie_factor)`` with average ranks over all cells and
      ``tie_factor = 1 - sum_t (t^3 - t) / (n^3 - n)`` (scanpy's ``tie_correct=True``).

    As in scanpy, undefined (NaN) scores are set to 0: constant genes, groups of fewer
    than two cells for the t-tests, empty groups. A gene whose values are constant within
    the group and within the rest but differ between them gets a t statistic of ``+inf``
    or ``-inf`` (perfect separation), as in scanpy; Wilcoxon scores are always finite.

    Genes are processed ``gene_batch_size`` at a time (``lax.map``), so memory stays at a
    few ``[n_cells, gene_batch_size]`` buffers beyond ``x`` itself.

    Parameters
    ----------
    x
        ``[n_cells, n_genes]`` finite expression (usually log1p-normalised), cast to
        float32.
    y
        ``[n_cells]`` integer cell-type labels in ``[0, n_classes)``.
    n_classes
        Number of cell types (static).
    method
        One of :data:`DE_METHODS` (static).
    gene_batch_size
        Genes scored per step (static).

    Returns
    -------
    scores
        ``[n_classes, n_genes]`` float32 scores; larger means more up-regulated in the type.

    Raises
    ------
    ValueError
        If ``method`` is unknown, or ``x`` and ``y`` disagree on the number of cells.
    """
    if method not in DE_METHODS:
        raise ValueError(f"method must be one of {DE_METHODS}, got {method!r}")
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y)
    n_cells, n_genes = x.shape
    if y.shape != (n_cells,):
        raise ValueError(f"y must have shape ({n_cells},), got {y.shape}")
    onehot = jax.nn.one_hot(y, n_classes, dtype=jnp.float32)  # [n_cells, n_classes]
    n_g = jnp.sum(onehot, axis=0)

    if method == "wilcoxon":
        score_one = functools.partial(_wilcoxon_scores, onehot=onehot, n_g=n_g)
    else:
        score_one = functools.partial(
            _t_scores,
            onehot=onehot,
            n_g=n_g,
            overestim_var=method == "t-test_overestim_var",
        )
    batch = max(1, min(gene_batch_size, n_genes))
    per_gene = lax.map(lambda j: score_one(x[:, j]), jnp.arange(n_genes), batch_size=batch)
    return per_gene.T  # [n_classes, n_genes]


@functools.partial(jax.jit, static_argnames=("method",))
def de_scores_from_moments(n_g, sums, within_ss, method: str = "t-test"):
    """:func:`de_scores` of the t-tests from per-class moments of every gene: ``n_g``
    [n_classes] cells, ``sums`` [n_classes, n_genes] of the gene (about any per-gene
    shift: t is shift-invariant) and ``within_ss`` [n_classes, n_genes], the sums of
    squared deviations from the class means; e.g. accumulated in one pass over data on
    disk (:func:`jaxsel.streaming.group_moments`). Wilcoxon needs every cell's rank and
    has no moment form. Returns ``[n_classes, n_genes]``."""
    if method not in DE_METHODS or method == "wilcoxon":
        raise ValueError(f"method must be 't-test' or 't-test_overestim_var' (moments), got {method!r}")
    n_g = jnp.asarray(n_g, jnp.float32)
    s = jnp.asarray(sums, jnp.float32).T  # [n_genes, n_classes]
    w = jnp.asarray(within_ss, jnp.float32).T
    m = jnp.where(n_g > 0, s / jnp.maximum(n_g, 1.0), 0.0)
    one = functools.partial(_welch_t, jnp.sum(n_g), n_g, overestim_var=method == "t-test_overestim_var")
    return jax.vmap(one)(s, m, w).T


@functools.partial(jax.jit, static_argnames=("n_markers",))
def round_robin_markers(scores: jax.Array, n_markers: int) -> jax.Array:
    """The MarkerMap paper's round-robin pick on a per-class score matrix.

    At step ``i`` class ``i % n_classes`` takes its best-scoring gene among those not yet
    taken. Among equal scores the lowest gene index wins; NaN scores rank last.

    Parameters
    ----------
    scores
        ``[n_classes, n_genes]`` scores, larger is better.
    n_markers
        Number of markers, ``1 <= n_markers <= n_genes`` (static).

    Returns
    -------
    markers
        ``[n_markers]`` int32 distinct gene indices in selection order.

    Raises
    ------
    ValueError
        If ``n_markers`` is not in ``[1, n_genes]``.
    """
    scores = jnp.asarray(scores, jnp.float32)
    n_classes, n_genes = scores.shape
    _check_n_markers(n_markers, n_genes)
    order = _descending_order(scores)  # [n_classes, n_genes], best first

    def step(i, carry):
        taken, markers = carry
        ranked = order[i % n_classes]
        gene = ranked[jnp.argmax(~taken[ranked])]  # first not-taken gene in that order
        return taken.at[gene].set(True), markers.at[i].set(gene)

    init = (jnp.zeros(n_genes, bool), jnp.zeros(n_markers, jnp.int32))
    _, markers = lax.fori_loop(0, n_markers, step, init)
    return markers


@functools.partial(
    jax.jit, static_argnames=("n_classes", "n_markers", "method", "gene_batch_size")
)
def de_markers(
    x: jax.Array,
    y: jax.Array,
    n_classes: int,
    n_markers: int,
    method: str = "t-test",
    gene_batch_size: int = DE_GENE_BATCH,
) -> jax.Array:
    """Differential-expression markers picked round robin over cell types.

    The MarkerMap paper's rule: cell types take turns (type ``i % n_classes`` at step
    ``i``), each taking its best-scoring gene by :func:`de_scores` among the genes not yet
    chosen, until ``n_markers`` genes are chosen.

    Ties are broken deterministically: among equal scores the lowest gene index wins;
    NaN scores (which :func:`de_scores` never produces) would rank last.

    Parameters
    ----------
    x
        ``[n_cells, n_genes]`` expression (usually log1p-normalised).
    y
        ``[n_cells]`` integer cell-type labels in ``[0, n_classes)``.
    n_classes
        Number of cell types (static).
    n_markers
        Number of markers, ``1 <= n_markers <= n_genes`` (static).
    method
        One of :data:`DE_METHODS` (static).
    gene_batch_size
        Genes scored per step by :func:`de_scores` (static).

    Returns
    -------
    markers
        ``[n_markers]`` int32 distinct gene indices in selection order.

    Raises
    ------
    ValueError
        If ``n_markers`` is not in ``[1, n_genes]`` or ``method`` is unknown.
    """
    _check_n_markers(n_markers, jnp.shape(x)[1])
    scores = de_scores(x, y, n_classes, method, gene_batch_size)
    return round_robin_markers(scores, n_markers)


def nearest_indices(query, ref, k: int):
    """Indices ``[n_query, min(k, n_ref)]`` of the nearest rows of ``ref`` to each row of
    ``query`` (Euclidean), nearest first: one ``[n_query, n_ref]`` product and a top-k
    (the query norms are constant per row and left out)."""
    scores = 2.0 * query @ ref.T - jnp.sum(ref * ref, 1)[None, :]
    return lax.top_k(scores, min(k, ref.shape[0]))[1]


@functools.partial(jax.jit, static_argnames=("n_components", "n_neighbors", "chunk"))
def knn_pca_impute(x_spatial, x_ref, values, n_components: int = 30, n_neighbors: int = 10, chunk: int = 1024):
    """kNN-in-shared-PCA imputation (the SpaGE-like baseline of the stAI benchmark).

    ``x_spatial`` [n1, G] and ``x_ref`` [n2, G] are the scaled shared genes; a PCA with
    ``min(n_components, G)`` components is fitted on both stacked (centred by the pooled
    mean, SVD), each spatial cell's ``n_neighbors`` nearest reference cells in that space
    are found (Euclidean; chunked over spatial cells so at most ``chunk x n2`` distances
    exist) and their ``values`` [n2, m] are averaged with equal weights. Returns
    ``[n1, m]``.
    """
    x_spatial, x_ref = jnp.asarray(x_spatial, jnp.float32), jnp.asarray(x_ref, jnp.float32)
    values = jnp.asarray(values, jnp.float32)
    z = jnp.concatenate([x_spatial, x_ref])
    mu = jnp.mean(z, 0)
    _, _, vt = linalg.svd(z - mu, full_matrices=False)
    basis = vt[: min(n_components, vt.shape[0])].T
    p1, p2 = (x_spatial - mu) @ basis, (x_ref - mu) @ basis
    def rows(pc):
        return jnp.mean(jnp.take(values, nearest_indices(pc, p2, n_neighbors), axis=0), axis=1)

    return chunk_map(rows, p1, chunk)

"""Synthetic data with planted structure, and loaders for the shared real data.

* :func:`make_markers` simulates single-cell counts with planted marker genes
  per cell type and an XOR-like pair of cell types that only a *combination*
  of genes can tell apart (the MarkerMap paper's argument for learned, joint
  selection over one-gene-at-a-time rankings). It needs no files and is the
  default data of the quick start, the tests and the examples.
* :func:`make_paired` plants a 2-D bottleneck between a few genes and a paired
  modality (sparse bottleneck networks); :func:`make_spatial_pair` simulates a
  spatial assay measuring a gene panel and a reference measuring all genes
  (stAI, gimVI), with the unmeasured genes' truth.
* :func:`load_shared` reads one of the real public datasets in
  ``<repo>/../shared/data`` (never copied into the repository), and
  :func:`paper_dataset` returns the three MarkerMap benchmark sets as dense
  counts and string labels.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jaxsel._validation import check_bool, check_int, check_random_state, check_real, check_values, to_dense

__all__ = ["make_markers", "make_paired", "make_spatial_pair", "reference_spatial_split", "gene_folds", "capture_distortion", "write_synthetic_counts", "load_shared", "paper_dataset", "shared_data_dir", "SHARED_FILES"]


# --------------------------------------------------------------------------- synthetic


def make_markers(
    n_cells: int = 1000,
    n_genes: int = 200,
    n_types: int = 5,
    n_markers_per_type: int = 3,
    n_xor_genes: int = 2,
    xor_fraction: float = 0.3,
    library_size: float = 2000.0,
    noise: float = 0.3,
    random_state=0,
    return_anndata: bool = False,
):
    """Simulate counts with planted marker genes and an XOR-type pair.

    Counts are negative binomial (Poisson-gamma, variance ``mu + phi mu^2``).
    Noise genes have log-normally spread base levels and overdispersions
    ``phi = noise * LogNormal(0, 0.5)`` (varied means and dispersions);
    planted genes have ``phi = noise / 2``. A cell's expected counts are its
    gene levels rescaled to a library size drawn around ``library_size``.

    * ``n_types`` ordinary cell types ``type_0``, ... each raise their own
      ``n_markers_per_type`` marker genes about 12-fold, which makes them
      clearly separable after normalisation and ``log1p``.
    * A fraction ``xor_fraction`` of the cells forms two more types,
      ``xor_0`` and ``xor_1``, that raise no marker. Every cell (of any type)
      carries a random binary state per XOR gene (gene high, 16 times the
      low level, or low, each with probability 1/2); for the XOR cells the
      label is the parity of these states. Each XOR gene alone then has the
      same distribution in ``xor_0`` and ``xor_1``; only all XOR genes
      together determine the subtype. When there are at least
      ``2**n_xor_genes`` XOR cells, the combinations of states are balanced
      exactly among them (so are the marginals).

    Genes are placed at random positions. The cells are in random order.

    Parameters
    ----------
    n_cells : int, default 1000
    n_genes : int, default 200
        At least ``n_types * n_markers_per_type + n_xor_genes``.
    n_types : int, default 5
        Ordinary cell types, at least 1 (at least 2 without XOR cells).
    n_markers_per_type : int, default 3
    n_xor_genes : int, default 2
        0 (no XOR toy) or between 2 and 30.
    xor_fraction : float, default 0.3
        Fraction of cells in ``xor_0``/``xor_1``, in ``[0, 1)``; ignored when
        ``n_xor_genes == 0``.
    library_size : float, default 2000
        Mean total counts per cell (each cell's is drawn log-normally around it).
    noise : float, default 0.3
        Scale of the negative-binomial overdispersion; 0 gives Poisson counts.
    random_state : int or None, default 0
    return_anndata : bool, default False
        Return an AnnData object instead of a tuple.

    Returns
    -------
    x : numpy.ndarray of float32, shape [n_cells, n_genes]
        Integer-valued counts.
    y : numpy.ndarray of int64, shape [n_cells]
        Codes into ``info["type_names"]`` (``type_0 .. type_{n_types-1}``,
        then ``xor_0``, ``xor_1`` when there are XOR cells).
    info : dict
        ``marker_genes`` (int64 [n_types * n_markers_per_type], grouped by
        type), ``xor_genes`` (int64 [n_xor_genes]; column ``j`` of
        ``xor_states`` refers to ``xor_genes[j]``), ``gene_names``,
        ``type_names``, ``markers_by_type`` (dict: type name -> int64 array),
        ``xor_states`` (int8 [n_cells, n_xor_genes], 1 = high).

    If ``return_anndata``, an :class:`anndata.AnnData` with ``X`` the counts,
    ``obs["cell_type"]`` (categorical type names), ``var["planted_marker"]``,
    ``var["xor_gene"]`` (bool), ``var["marker_of"]`` (type name or ``""``),
    ``obsm["xor_states"]`` (when ``n_xor_genes > 0``) and ``uns["planted"]``
    (``marker_genes``, ``xor_genes``, ``type_names``, ``markers_by_type``).
    Gene names are ``gene_000``, ..., cell names ``cell_0000``, ...
    """
    n_cells = check_int(n_cells, "n_cells", 2)
    n_genes = check_int(n_genes, "n_genes", 1)
    n_types = check_int(n_types, "n_types", 1)
    n_markers_per_type = check_int(n_markers_per_type, "n_markers_per_type", 1)
    n_xor_genes = check_int(n_xor_genes, "n_xor_genes", 0)
    if n_xor_genes == 1 or n_xor_genes > 30:
        raise ValueError(
            f"n_xor_genes must be 0 (no XOR toy) or between 2 and 30, got {n_xor_genes} "
            f"(one gene alone would be informative on its own)."
        )
    xor_fraction = check_real(xor_fraction, "xor_fraction", low=0.0, high=1.0)
    if xor_fraction >= 1.0:
        raise ValueError(f"xor_fraction must be < 1, got {xor_fraction}.")
    library_size = check_real(library_size, "library_size", low=0.0, low_open=True)
    noise = check_real(noise, "noise", low=0.0)
    seed = check_random_state(random_state)

    n_planted = n_types * n_markers_per_type + n_xor_genes
    if n_genes < n_planted:
        raise ValueError(
            f"n_genes={n_genes} is too small for the planted genes: n_types * "
            f"n_markers_per_type + n_xor_genes = {n_types} * {n_markers_per_type} + "
            f"{n_xor_genes} = {n_planted}."
        )
    n_xor_cells = int(round(xor_fraction * n_cells)) if n_xor_genes > 0 else 0
    if 0 < n_xor_cells < 2:
        raise ValueError(
            f"xor_fraction={xor_fraction} gives {n_xor_cells} XOR cell(s) out of {n_cells}; "
            f"need at least 2 (one per XOR subtype) or 0."
        )
    n_main = n_cells - n_xor_cells
    if n_main < n_types:
        raise ValueError(
            f"{n_main} non-XOR cells cannot cover n_types={n_types} types; lower "
            f"xor_fraction or raise n_cells."
        )
    if n_types + (2 if n_xor_cells else 0) < 2:
        raise ValueError(
            "make_markers needs at least 2 cell types: raise n_types or add XOR cells."
        )

    rng = np.random.default_rng(seed)
    type_names = [f"type_{t}" for t in range(n_types)]
    if n_xor_cells:
        type_names += ["xor_0", "xor_1"]
    width = max(3, len(str(n_genes - 1)))
    gene_names = np.array([f"gene_{g:0{width}d}" for g in range(n_genes)])

    # Planted gene positions.
    positions = rng.permutation(n_genes)[:n_planted]
    marker_blocks = [
        np.sort(positions[t * n_markers_per_type : (t + 1) * n_markers_per_type])
        for t in range(n_types)
    ]
    xor_genes = np.sort(positions[n_types * n_markers_per_type :]).astype(np.int64)
    marker_genes = np.concatenate(marker_blocks).astype(np.int64)

    # Labels and XOR states (before shuffling the cells).
    y = np.concatenate([np.arange(n_main) % n_types, np.zeros(n_xor_cells, dtype=np.int64)])
    states = rng.integers(0, 2, size=(n_cells, n_xor_genes)).astype(np.int8)
    if n_xor_cells:
        n_combos = 2**n_xor_genes
        if n_xor_cells >= n_combos:
            combos = np.arange(n_xor_cells) % n_combos
            bits = (combos[:, None] >> np.arange(n_xor_genes)[None, :]) & 1
            states[n_main:] = bits.astype(np.int8)
        else:
            # Too few cells to balance every combination; make sure both parities occur.
            parity = states[n_main:].sum(axis=1) % 2
            if parity.min() == parity.max():
                states[n_main, 0] ^= 1
        y[n_main:] = n_types + states[n_main:].sum(axis=1) % 2
    order = rng.permutation(n_cells)
    y, states = y[order].astype(np.int64), states[order]

    # Expression levels (expected counts per gene at an average composition).
    level = np.exp(rng.normal(np.log(2.0), 1.0, size=n_genes))
    level[marker_genes] = np.exp(rng.normal(0.0, 0.3, size=marker_genes.shape[0]))
    level[xor_genes] = 1.0
    fold = np.exp(rng.normal(np.log(12.0), 0.2, size=marker_genes.shape[0]))
    w = np.broadcast_to(level, (n_cells, n_genes)).copy()
    for t, block in enumerate(marker_blocks):
        cells = y == t
        w[np.ix_(cells, block)] *= fold[t * n_markers_per_type : (t + 1) * n_markers_per_type]
    if n_xor_genes:
        w[:, xor_genes] = np.where(states == 1, 16.0, 1.0)
    library = library_size * np.exp(rng.normal(0.0, 0.2, size=n_cells))
    mean = w * (library / w.sum(axis=1))[:, None]
    if noise > 0:
        phi = noise * np.exp(rng.normal(0.0, 0.5, size=n_genes))
        phi[marker_genes] = 0.5 * noise
        phi[xor_genes] = 0.5 * noise
        shape = 1.0 / phi
        mean = mean * rng.gamma(shape, 1.0 / shape, size=mean.shape)
    x = rng.poisson(mean).astype(np.float32)

    markers_by_type = {type_names[t]: marker_blocks[t].astype(np.int64) for t in range(n_types)}
    info = {
        "marker_genes": marker_genes,
        "xor_genes": xor_genes,
        "gene_names": gene_names,
        "type_names": np.array(type_names),
        "markers_by_type": markers_by_type,
        "xor_states": states,
    }
    if not return_anndata:
        return x, y, info
    return _to_anndata(x, y, info)


def _to_anndata(x, y, info):
    import anndata
    import pandas as pd

    n_cells, n_genes = x.shape
    type_names = [str(t) for t in info["type_names"]]
    cell_width = max(4, len(str(n_cells - 1)))
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical.from_codes(y, categories=type_names)},
        index=[f"cell_{i:0{cell_width}d}" for i in range(n_cells)],
    )
    marker_of = np.full(n_genes, "", dtype=object)
    for name, genes in info["markers_by_type"].items():
        marker_of[genes] = name
    planted = np.zeros(n_genes, dtype=bool)
    planted[info["marker_genes"]] = True
    xor = np.zeros(n_genes, dtype=bool)
    xor[info["xor_genes"]] = True
    var = pd.DataFrame(
        {"planted_marker": planted, "xor_gene": xor, "marker_of": marker_of.astype(str)},
        index=list(info["gene_names"]),
    )
    adata = anndata.AnnData(X=x, obs=obs, var=var)
    if info["xor_genes"].shape[0]:
        adata.obsm["xor_states"] = info["xor_states"]
    adata.uns["planted"] = {
        "marker_genes": info["marker_genes"],
        "xor_genes": info["xor_genes"],
        "type_names": np.array(type_names),
        "markers_by_type": dict(info["markers_by_type"]),
    }
    return adata


def make_paired(
    n_cells: int = 600,
    n_genes: int = 100,
    n_outputs: int = 8,
    n_informative: int = 6,
    n_types: int = 4,
    noise: float = 0.3,
    random_state=0,
):
    """Paired data ``X -> Y`` whose ``Y`` depends non-linearly on a few planted genes.

    A 2-D latent state ``z`` per cell is drawn around one of ``n_types`` cluster centres
    (the cell type). The ``n_informative`` planted genes are noisy linear read-outs of
    ``z`` (each gene loads on both coordinates); all other genes are independent noise
    with varied scales. ``Y`` is a smooth non-linear function of ``z`` (sines and
    products of random projections) plus Gaussian noise of SD ``noise``. So only the
    planted genes carry information about ``Y``, through a 2-D bottleneck: the structure
    a sparse bottleneck network should recover.

    Both matrices are standardised (zero mean, unit SD per column), as the sBNN paper
    preprocesses X and Y.

    Returns
    -------
    x : float32 [n_cells, n_genes]; y : float32 [n_cells, n_outputs];
    info : dict with ``informative_genes`` (sorted int indices), ``latent`` [n, 2],
        ``cell_type`` [n] int labels.
    """
    for name, v in (("n_cells", n_cells), ("n_genes", n_genes), ("n_outputs", n_outputs),
                    ("n_informative", n_informative), ("n_types", n_types)):
        check_int(v, name, 1)
    if n_informative > n_genes:
        raise ValueError(f"n_informative ({n_informative}) must not exceed n_genes ({n_genes})")
    check_real(noise, "noise", low=0.0)
    rng = np.random.default_rng(check_random_state(random_state))
    centres = rng.normal(0.0, 2.0, size=(n_types, 2))
    cell_type = rng.integers(0, n_types, size=n_cells)
    z = centres[cell_type] + rng.normal(0.0, 0.6, size=(n_cells, 2))
    informative = np.sort(rng.choice(n_genes, size=n_informative, replace=False))
    x = rng.normal(0.0, 1.0, size=(n_cells, n_genes)) * rng.lognormal(0.0, 0.3, size=n_genes)
    load = rng.normal(0.0, 1.0, size=(2, n_informative))
    x[:, informative] = z @ load + 0.3 * rng.normal(0.0, 1.0, size=(n_cells, n_informative))
    proj = rng.normal(0.0, 1.0, size=(2, n_outputs))
    phase = rng.uniform(0, 2 * np.pi, size=n_outputs)
    u = z @ proj / 2.0
    y = np.sin(u + phase) + 0.3 * u * np.roll(u, 1, axis=1) + noise * rng.normal(size=(n_cells, n_outputs))
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean(0)) / y.std(0)
    info = {"informative_genes": informative, "latent": z, "cell_type": cell_type}
    return x.astype(np.float32), y.astype(np.float32), info


def make_spatial_pair(
    n_spatial: int = 600,
    n_ref: int = 600,
    n_genes: int = 60,
    n_measured: int = 30,
    n_types: int = 5,
    capture_sd: float = 0.3,
    random_state=0,
):
    """A spatial assay and a dissociated reference of the same tissue, as AnnData.

    Cell types occupy horizontal layers of a 10 x 10 tissue (10% of spatial cells are
    displaced into a random layer), so spatial neighbours mostly share a type. Every
    gene's mean is ``exp(base_g + 1.5 * marker_{g, type} + slope_g * s)`` where ``s`` is
    a continuous state (in the spatial data the horizontal position, in the reference
    uniform), so imputation needs more than the cell type. Counts are negative binomial
    (gamma-Poisson, shape 5) times a log-normal library size. The spatial data measures
    ``n_measured`` genes; the reference measures all ``n_genes``, each gene scaled by a
    log-normal capture efficiency (``capture_sd``, a technology shift).

    Returns
    -------
    adata_spatial : AnnData [n_spatial, n_measured] counts, ``obs["cell_type"]``,
        ``obsm["spatial"]`` coordinates.
    adata_ref : AnnData [n_ref, n_genes] counts, ``obs["cell_type"]``.
    truth : AnnData [n_spatial, n_genes - n_measured]: the spatial cells' counts of the
        genes the spatial assay did not measure (for evaluating imputation).
    """
    import anndata
    import pandas as pd

    for name, v in (("n_spatial", n_spatial), ("n_ref", n_ref), ("n_genes", n_genes), ("n_types", n_types)):
        check_int(v, name, 2)
    check_int(n_measured, "n_measured", 1)
    if n_measured >= n_genes:
        raise ValueError(f"n_measured ({n_measured}) must be smaller than n_genes ({n_genes}).")
    check_real(capture_sd, "capture_sd", low=0.0)
    rng = np.random.default_rng(check_random_state(random_state))
    base = rng.normal(0.5, 0.7, size=n_genes)
    marker = np.zeros((n_genes, n_types))
    for g in range(n_genes):  # every gene marks one or two types (up or down)
        marker[g, rng.choice(n_types, size=rng.integers(1, 3), replace=False)] = rng.choice([-1.0, 1.0], p=[0.3, 0.7])
    slope = rng.normal(0.0, 0.8, size=n_genes) * (rng.random(n_genes) < 0.5)

    def counts(types, state, n, capture):
        mu = np.exp(base[None, :] + 1.5 * marker[:, types].T + slope[None, :] * state[:, None])
        mu = mu * rng.lognormal(0.0, 0.3, size=(n, 1)) * capture[None, :]
        return rng.poisson(rng.gamma(5.0, mu / 5.0)).astype(np.float32)

    coords = rng.uniform(0.0, 10.0, size=(n_spatial, 2))
    sp_types = np.minimum((coords[:, 1] / 10.0 * n_types).astype(int), n_types - 1)
    moved = rng.random(n_spatial) < 0.1
    sp_types[moved] = rng.integers(0, n_types, size=int(moved.sum()))
    ref_types = rng.integers(0, n_types, size=n_ref)
    x_sp = counts(sp_types, coords[:, 0] / 10.0, n_spatial, np.ones(n_genes))
    x_ref = counts(ref_types, rng.uniform(0.0, 1.0, n_ref), n_ref, np.exp(rng.normal(0.0, capture_sd, n_genes)))
    genes = np.array([f"gene_{g:03d}" for g in range(n_genes)])
    measured = np.sort(rng.choice(n_genes, size=n_measured, replace=False))
    unmeasured = np.setdiff1d(np.arange(n_genes), measured)
    names = [f"type_{t}" for t in range(n_types)]

    def obs(types, prefix):
        return pd.DataFrame({"cell_type": pd.Categorical.from_codes(types, categories=names)},
                            index=[f"{prefix}_{i:05d}" for i in range(len(types))])

    sp_obs = obs(sp_types, "spatial")
    adata_spatial = anndata.AnnData(X=x_sp[:, measured], obs=sp_obs, var=pd.DataFrame(index=genes[measured]))
    adata_spatial.obsm["spatial"] = coords.astype(np.float32)
    adata_ref = anndata.AnnData(X=x_ref, obs=obs(ref_types, "ref"), var=pd.DataFrame(index=genes))
    truth = anndata.AnnData(X=x_sp[:, unmeasured], obs=sp_obs.copy(), var=pd.DataFrame(index=genes[unmeasured]))
    return adata_spatial, adata_ref, truth


# ------------------------------------------------------------ spatial imputation protocol


def reference_spatial_split(labels=None, *, sections=None, reference_sections=None, spatial_fraction=0.5,
                            random_state=0):
    """Split one spatial dataset's cells into a *reference* part and a *spatial* part.

    The stAI / gimVI evaluation protocol when no gene-matched scRNA-seq reference exists:
    the reference part plays the dissociated scRNA-seq (its coordinates are not used).

    - With ``sections`` (a per-cell section / batch label) and ``reference_sections``, the
      cells of those sections are the reference and all others the spatial part (STARmap
      mPFC: reference sections 0 and 1, spatial section 2).
    - Otherwise a seeded split stratified by ``labels`` puts ``spatial_fraction`` of every
      cell type in the spatial part (osmFISH, MERFISH).

    Returns ``(reference_idx, spatial_idx)``, sorted int64 arrays that partition the cells.
    """
    if sections is not None:
        sections = np.asarray(sections)
        if reference_sections is None:
            raise ValueError("reference_sections is required with sections.")
        ref = np.isin(sections.astype(str), np.asarray(list(reference_sections)).astype(str))
        if ref.all() or not ref.any():
            raise ValueError(
                f"reference_sections={list(reference_sections)!r} must select some but not all cells; "
                f"sections present: {sorted(set(sections.astype(str).tolist()))}."
            )
        return np.flatnonzero(ref).astype(np.int64), np.flatnonzero(~ref).astype(np.int64)
    if labels is None:
        raise ValueError("labels (for a stratified split) or sections is required.")
    from jaxsel.preprocessing import split_indices

    check_real(spatial_fraction, "spatial_fraction", low=0.0, high=1.0, low_open=True, high_open=True)
    ref, sp = split_indices(np.asarray(labels), (1.0 - spatial_fraction, spatial_fraction),
                            random_state=random_state, stratify=True)
    return np.sort(ref).astype(np.int64), np.sort(sp).astype(np.int64)


def gene_folds(n_genes: int, n_folds=None, random_state=0):
    """Held-out gene sets for imputation benchmarks: leave-one-gene-out (``n_folds=None``,
    the paper's protocol for osmFISH's 33 genes) or ``n_folds`` shuffled folds of sizes
    differing by at most one (10-fold for STARmap and MERFISH). Returns a list of sorted
    int64 index arrays that partition ``range(n_genes)``."""
    check_int(n_genes, "n_genes", 2)
    if n_folds is None:
        return [np.array([g], dtype=np.int64) for g in range(n_genes)]
    check_int(n_folds, "n_folds", 2)
    if n_folds > n_genes:
        raise ValueError(f"n_folds ({n_folds}) must not exceed n_genes ({n_genes}).")
    rng = np.random.default_rng(check_random_state(random_state))
    perm = rng.permutation(n_genes)
    return [np.sort(perm[i::n_folds]).astype(np.int64) for i in range(n_folds)]


def capture_distortion(x, sd: float = 0.5, random_state=0, *, counts: bool = False):
    """Emulate a technology shift: give every gene (column) of ``x`` its own log-normal
    capture efficiency ``f_g = exp(N(0, sd^2))``. Returns a new array and the factors;
    ``x`` is not modified (sparse input stays sparse, as CSR).

    With ``counts=False`` every column is multiplied by ``f_g`` (a float array). With
    ``counts=True``, ``x`` must hold non-negative integer counts and stays counts: each
    molecule of gene ``g`` is kept with probability ``p_g = f_g / max(f)`` (binomial
    thinning, the way a less efficient assay loses molecules), so the gene with the
    highest efficiency keeps all its counts; the returned factors are the ``p_g``.
    Count models such as gimVI need the second form.
    """
    import scipy.sparse as sp

    check_real(sd, "sd", low=0.0)
    counts = check_bool(counts, "counts")
    if not sp.issparse(x):
        x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be a 2-D cells x genes matrix, got shape {x.shape}.")
    rng = np.random.default_rng(check_random_state(random_state))
    factors = np.exp(rng.normal(0.0, sd, size=x.shape[1]))
    if not counts:
        if sp.issparse(x):
            return sp.csr_matrix(x.multiply(factors[None, :])), factors
        return x.astype(np.float64) * factors, factors
    p = factors / factors.max()
    if sp.issparse(x):
        out = sp.csr_matrix(x, copy=True)
        out.sum_duplicates()
        check_values(out.data, "x", require_counts=True)
        out.data = rng.binomial(out.data.astype(np.int64), p[out.indices]).astype(out.dtype)
        out.eliminate_zeros()
        return out, p
    check_values(x, "x", require_counts=True)
    return rng.binomial(x.astype(np.int64), p[None, :]).astype(x.dtype if x.dtype.kind in "iuf" else np.int64), p


# ------------------------------------------------------------------ large data on disk


def _planted_frequencies(rng, n_genes: int, n_types: int, n_markers_per_type: int, marker_fold: float):
    """Per-type expression frequencies [n_types, n_genes] with planted marker blocks."""
    level = np.exp(rng.normal(0.0, 1.5, size=n_genes))
    markers = rng.permutation(n_genes)[: n_types * n_markers_per_type].reshape(n_types, n_markers_per_type)
    freq = np.broadcast_to(level, (n_types, n_genes)).copy()
    for t in range(n_types):
        freq[t, markers[t]] *= marker_fold
    return freq / freq.sum(axis=1, keepdims=True), np.sort(markers, axis=1)


def _counts_to_csr(x):
    """A non-negative integer array as a float32 CSR matrix (faster than scipy's
    generic conversion for this case)."""
    import scipy.sparse as sp

    n, g = x.shape
    flat = x.reshape(-1)
    nz = np.flatnonzero(flat)
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.count_nonzero(x, axis=1), out=indptr[1:])
    return sp.csr_matrix((flat[nz].astype(np.float32), (nz % g).astype(np.int32), indptr), shape=(n, g))


def write_synthetic_counts(
    path,
    n_cells: int,
    n_genes: int = 2000,
    *,
    n_types: int = 10,
    n_markers_per_type: int = 5,
    marker_fold: float = 8.0,
    library_size: float = 1000.0,
    chunk_cells: int = 10000,
    overwrite: bool = False,
    random_state=0,
) -> dict:
    """Write planted cell-type counts to an AnnData file on disk, chunk by chunk.

    For data sets larger than memory (streaming fits, the scale benchmark): the counts
    are generated and appended ``chunk_cells`` cells at a time, so memory stays at one
    chunk whatever ``n_cells`` is. The file is an ordinary AnnData store
    (``anndata.read_h5ad(path, backed="r")`` or ``anndata.read_zarr`` read it) with

    - ``X``: sparse CSR float32 counts ``Poisson(L_c * f_{type(c), g})``, with ``L_c`` a
      log-normal library size around ``library_size`` and ``f_t`` the frequencies of
      type ``t``: log-normal gene levels (SD 1.5 on the log scale), each type raising
      its own ``n_markers_per_type`` marker genes ``marker_fold``-fold;
    - ``obs["cell_type"]``: categorical ``type_0`` ... (uniform at random);
    - ``var`` index ``gene_0000`` ..., ``var["planted_marker"]`` (bool),
      ``var["marker_of"]`` (type name or ``""``).

    The format follows the suffix: ``.h5ad`` (HDF5, uncompressed, 1M-entry chunks) or
    ``.zarr`` (zarr v2 directory store, anndata's default compressor). The data are
    written to ``<path>.partial`` and renamed when complete, so an interrupted run never
    leaves a file that looks finished. Output depends on ``random_state`` and
    ``chunk_cells`` only.

    Returns
    -------
    dict with ``path``, ``n_cells``, ``n_genes``, ``nnz``, ``density``,
    ``marker_genes`` (int64 [n_types, n_markers_per_type]), ``type_names``, ``seconds``.
    """
    import shutil
    import time

    import anndata
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem

    n_cells = check_int(n_cells, "n_cells", 2)
    n_genes = check_int(n_genes, "n_genes", 2)
    n_types = check_int(n_types, "n_types", 2)
    n_markers_per_type = check_int(n_markers_per_type, "n_markers_per_type", 1)
    chunk_cells = check_int(chunk_cells, "chunk_cells", 1)
    marker_fold = check_real(marker_fold, "marker_fold", low=0.0, low_open=True)
    library_size = check_real(library_size, "library_size", low=0.0, low_open=True)
    if n_types * n_markers_per_type > n_genes:
        raise ValueError(f"n_types * n_markers_per_type ({n_types * n_markers_per_type}) exceeds n_genes ({n_genes}).")
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".h5ad"):
        fmt = "h5ad"
    elif name.endswith(".zarr"):
        fmt = "zarr"
    else:
        raise ValueError(f"path must end in .h5ad or .zarr, got {str(path)!r}.")
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{str(path)!r} exists; pass overwrite=True to replace it.")
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    partial = path.with_name(path.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial) if partial.is_dir() else partial.unlink()
    seed = check_random_state(random_state)
    t0 = time.perf_counter()
    rng = np.random.default_rng([seed, 0])
    freq, markers = _planted_frequencies(rng, n_genes, n_types, n_markers_per_type, marker_fold)
    types = rng.integers(0, n_types, size=n_cells).astype(np.int16)
    if fmt == "h5ad":
        import h5py

        store = h5py.File(partial, "w")
    else:
        import zarr

        store = zarr.open_group(str(partial), mode="w", zarr_format=2)
    nnz = 0
    try:
        store.attrs["encoding-type"] = "anndata"
        store.attrs["encoding-version"] = "0.1.0"
        X = None
        for i, start in enumerate(range(0, n_cells, chunk_cells)):
            stop = min(n_cells, start + chunk_cells)
            crng = np.random.default_rng([seed, 1, i])
            lib = library_size * np.exp(crng.normal(0.0, 0.3, size=stop - start))
            block = _counts_to_csr(crng.poisson(lib[:, None] * freq[types[start:stop]]))
            nnz += block.nnz
            if X is None:
                write_elem(store, "X", block, dataset_kwargs={"chunks": (min(1 << 20, max(1, block.nnz)),)})
                X = sparse_dataset(store["X"])
            else:
                X.append(block)
        type_names = [f"type_{t}" for t in range(n_types)]
        width = max(4, len(str(n_cells - 1)))
        obs = pd.DataFrame({"cell_type": pd.Categorical.from_codes(types, categories=type_names)},
                           index=pd.Index([f"cell_{i:0{width}d}" for i in range(n_cells)]))
        write_elem(store, "obs", obs)
        del obs
        marker_of = np.full(n_genes, "", dtype=object)
        for t in range(n_types):
            marker_of[markers[t]] = type_names[t]
        gwidth = max(4, len(str(n_genes - 1)))
        var = pd.DataFrame({"planted_marker": marker_of != "", "marker_of": marker_of.astype(str)},
                           index=pd.Index([f"gene_{g:0{gwidth}d}" for g in range(n_genes)]))
        write_elem(store, "var", var)
        for key in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(store, key, {})
        write_elem(store, "uns", {"planted": {"marker_genes": markers.astype(np.int64),
                                              "type_names": np.array(type_names)}})
    finally:
        if fmt == "h5ad":
            store.close()
    os.replace(partial, path)
    del anndata  # imported to fail early when missing
    return {"path": str(path), "n_cells": n_cells, "n_genes": n_genes, "nnz": int(nnz),
            "density": nnz / (n_cells * n_genes), "marker_genes": markers.astype(np.int64),
            "type_names": np.array(type_names), "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- shared data

#: Short names of the files in ``shared/data`` (see its README).
SHARED_FILES = {
    "paul15": "paul15.h5ad",
    "zeisel2015": "zeisel2015.h5ad",
    "cbmc_citeseq": "cbmc_citeseq_stoeckius2017.h5ad",
    "cd8_citeseq": "cd8_citeseq_stoeckius2017.h5ad",
    "osmfish": "osmfish_codeluppi2018.h5ad",
    "starmap_mpfc": "starmap_mpfc_wang2018.h5ad",
    "merfish_hypothalamus": "merfish_hypothalamus_moffitt2018.h5ad",
    "m1_patchseq_sbnn": "m1_patchseq_scala2021_sbnn.h5ad",
    "m1_patchseq_phystemp": "m1_patchseq_phystemp_scala2021.h5ad",
    "fuzik2016": "fuzik2016_patchseq.h5ad",
}

_PAPER_LABELS = {"paul15": "cell_type", "zeisel2015": "level1class", "cbmc_citeseq": "cell_type"}

_ENV_VAR = "JAXSEL_DATA_DIR"


def _looks_like_data_dir(path: Path) -> bool:
    try:
        return path.is_dir() and any(path.glob("*.h5ad"))
    except OSError:  # pragma: no cover - unreadable directory
        return False


def shared_data_dir() -> Path | None:
    """Locate the shared real-data folder.

    Order: the ``JAXSEL_DATA_DIR`` environment variable if set (returned only
    if it is a directory); otherwise the first ``shared/data`` folder holding
    ``.h5ad`` files found by walking up from the current working directory,
    then from this package's location. For a checkout at ``<repo>`` this
    finds ``<repo>/../shared/data``.

    Returns
    -------
    pathlib.Path or None
        None when no folder was found.
    """
    env = os.environ.get(_ENV_VAR)
    if env:
        path = Path(env).expanduser()
        return path.resolve() if path.is_dir() else None
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for folder in (start, *start.parents):
            candidate = folder / "shared" / "data"
            if _looks_like_data_dir(candidate):
                return candidate.resolve()
    return None


def _resolve_file(name: str, data_dir) -> Path:
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a dataset name such as 'paul15', got {name!r}.")
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"data_dir={str(data_dir)!r} is not a directory.")
    else:
        folder = shared_data_dir()
        if folder is None:
            where = (
                f"{_ENV_VAR}={os.environ[_ENV_VAR]!r} is not a directory"
                if os.environ.get(_ENV_VAR)
                else f"no shared/data folder was found above {Path.cwd()} or the jaxsel "
                f"package, and {_ENV_VAR} is not set"
            )
            raise FileNotFoundError(
                f"Cannot load dataset {name!r}: {where}. Set {_ENV_VAR} or pass data_dir."
            )
    filename = SHARED_FILES.get(name, name if name.endswith(".h5ad") else f"{name}.h5ad")
    path = folder / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"Dataset {name!r} not found: {path} does not exist. Known names: "
            f"{', '.join(sorted(SHARED_FILES))} (or a file stem in {folder})."
        )
    return path


def load_shared(name: str, data_dir=None):
    """Read one of the shared real datasets as AnnData.

    Parameters
    ----------
    name : str
        A short name from :data:`SHARED_FILES` (``"paul15"``,
        ``"zeisel2015"``, ``"cbmc_citeseq"``, ``"cd8_citeseq"``,
        ``"osmfish"``, ``"starmap_mpfc"``, ``"merfish_hypothalamus"``,
        ``"m1_patchseq_sbnn"``, ``"m1_patchseq_phystemp"``, ``"fuzik2016"``),
        or the stem of any ``.h5ad`` file in the folder.
    data_dir : str or os.PathLike, optional
        Folder to read from; by default :func:`shared_data_dir`.

    Returns
    -------
    anndata.AnnData
        Read fully into memory (the file itself is never modified or copied).

    Raises
    ------
    FileNotFoundError
        If the folder or the file does not exist.
    """
    import anndata

    return anndata.read_h5ad(_resolve_file(name, data_dir))


def paper_dataset(name: str, data_dir=None, *, max_dense_bytes: int = 2**31):
    """One of the MarkerMap paper's benchmark datasets as dense counts.

    Parameters
    ----------
    name : {"paul15", "zeisel2015", "cbmc_citeseq"}
        Labels used: ``obs["cell_type"]`` (Paul15, 10 types),
        ``obs["level1class"]`` (Zeisel, 7 classes), ``obs["cell_type"]``
        (CBMC CITE-seq, 13 types).
    data_dir : str or os.PathLike, optional
        See :func:`load_shared`.
    max_dense_bytes : int, default 2**31
        Size guard for densifying a sparse matrix.

    Returns
    -------
    x_counts : numpy.ndarray of float32, shape [n_cells, n_genes]
    y_labels : numpy.ndarray of str, shape [n_cells]
    gene_names : numpy.ndarray of str, shape [n_genes]
    """
    if name not in _PAPER_LABELS:
        raise ValueError(
            f"name must be one of {sorted(_PAPER_LABELS)} for paper_dataset, got {name!r}; "
            f"use load_shared for the other datasets."
        )
    adata = load_shared(name, data_dir=data_dir)
    x = to_dense(adata.X, max_dense_bytes, name=f"{name}.X", dtype=np.float32)
    y = adata.obs[_PAPER_LABELS[name]].astype(str).to_numpy().astype(str)
    genes = np.asarray(adata.var_names, dtype=str)
    return x, y, genes

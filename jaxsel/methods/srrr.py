"""Sparse reduced-rank regression (sRRR) of Kobak et al., in pure JAX.

Kobak, Bernaerts, Weis, Scala, Tolias & Berens, "Sparse reduced-rank regression for
exploratory visualisation of paired multivariate data", JRSS C (2021). Used as the linear
baseline of the sparse bottleneck network paper (Patch-seq: genes -> electrophysiology).

Model
-----
Data ``X`` [n, p] (genes) and ``Y`` [n, q] (e.g. electrophysiological features), both
centred (there is no intercept). With ``W`` [p, r] and ``V`` [q, r], ``V^T V = I``::

    min  1/(2n) ||Y - X W V^T||_F^2 + lam * ( alpha * sum_j ||W_j||_2 + (1-alpha)/2 ||W||_F^2 )

the glmnet "mgaussian" scaling (identical to scikit-learn's ``MultiTaskElasticNet`` with
``fit_intercept=False``). The row-wise group lasso switches whole genes off. The fit
alternates two exact steps, each of which cannot increase the objective:

- W-step: with ``V`` fixed, ``||Y - X W V^T||^2 = ||Y V - X W||^2 + const``, an elastic-net
  regression of ``Y V`` on ``X`` with row groups. Solved by FISTA with adaptive restart on
  the gram matrices ``G = X^T X / n`` and ``C = X^T Y / n`` (gradient ``G W - C V + lam
  (1-alpha) W``, step ``1 / (lambda_max(G) + lam (1-alpha))``, prox = group
  soft-thresholding), warm-started from the previous ``W``.
- V-step: with ``W`` fixed, the orthonormal ``V`` maximising ``tr(V^T Y^T X W)`` (orthogonal
  Procrustes): ``V = U_a Vt_a`` from the SVD of ``A = C^T W`` (``= Y^T X W / n``).

``V`` starts at the top-``r`` right singular vectors of ``X^T Y`` (the PLS directions).
The pure-ridge case ``alpha = 0`` has a closed form: ``B = (X^T X + n lam I)^{-1} X^T Y``,
``V`` = top-``r`` right singular vectors of ``X B``, ``W = B V``. The *relaxed* variant
refits the selected genes with that closed form (same ``lam``) and puts the rows back.

:func:`fit_n_genes` selects exactly ``n_genes`` genes: it walks down from ``lam_max`` (the
smallest ``lam`` that zeros every row) by a constant factor until a fit has at least
``n_genes`` nonzero rows, then bisects ``log(lam)`` in that bracket, each fit warm-started
from the previous one; the sparsest fit with ``>= n_genes`` rows is truncated to its top
``n_genes`` rows. :func:`cross_validate` runs it for all folds in one compiled program
(:func:`jaxsel.engine.map_folds`).

Cost. The grams are formed once per fit (``O(n p^2)``). A W-step touches the ``p x p`` gram
only a few times: FISTA runs on a working set of ``K`` genes (the current nonzero rows,
then the largest KKT violations), and a KKT check over all genes decides whether the set
must grow. With 10 folds vmapped the ten ``1000 x 1000`` grams do not fit in cache, and
the working set made 10-fold cross-validation on 1000 genes about 7x faster.

Where we differ from the reference (``berenslab/patch-seq-rrr``, ``sparseRRR.py``)
------------------------------------------------------------------------------------
- The W-step is FISTA on the grams in float32 instead of glmnet's coordinate descent in
  float64; both solve the same convex problem, to tolerance (:class:`SolverConfig`).
- Convergence of the alternation is a relative change of the *penalised* objective
  (``tol``), the reference uses the absolute change of ``||Y - X W V^T||^2 / ||Y||^2``.
- Sign convention as the reference (largest-magnitude entry of every column of ``V``
  positive), applied after every V-step and to the ridge closed form.
- The reference picks ``lam`` from a user grid and reports the nonzero count it gets;
  :func:`fit_n_genes` searches ``lam`` and truncates to exactly ``n_genes`` genes (the fit
  with the fewest nonzero rows ``>= n_genes`` found, its top rows by l2 norm). The relaxed
  refit then uses exactly those genes. If no ``lam`` down to ``lam_max * lam_min_ratio``
  gives ``n_genes`` rows, the densest fit is used and its zero rows are ranked by their
  KKT score ``||(C V - G W)_j||`` (the genes closest to entering).
- When fewer than ``rank`` genes are selected, the ridge refit keeps only as many
  components as there are nonzero singular values (the other columns of ``W`` and ``V``
  are zero), which generalises the reference's special case.
- The ridge closed form is computed from an eigendecomposition of the gram matrix (the
  singular vectors of ``X B`` come from ``D^{1/2} Q^T B``, so singular values are never
  squared), not from an SVD of ``X``; ``lam = 0`` gives the pseudo-inverse.

:func:`fit` and :func:`fit_n_genes` do not centre: pass centred data (the reference does
the same). :func:`cross_validate` centres every fold with its training means.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .. import engine
from ..engine import linalg
from ..losses import group_lasso, prox_group_lasso

__all__ = [
    "SolverConfig",
    "SRRRResult",
    "CVResult",
    "objective",
    "solve_w",
    "fit",
    "fit_n_genes",
    "fit_n_genes_folds",
    "predict",
    "latent",
    "cv_fold",
    "cross_validate",
]


# ---------------------------------------------------------------------------------------
# configuration and results
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """Static solver settings (hashable; changing one recompiles).

    Parameters
    ----------
    max_iter : alternations (W-step + V-step) per fit, as the reference.
    tol : stop alternating when the penalised objective changes by less than
        ``tol`` relative to its previous value.
    w_max_iter : FISTA iterations per (working-set) solve.
    w_tol : stop FISTA when ``||W_new - W_old||_F <= w_tol * ||W_new||_F``.
    working_set : size ``K`` of the W-step's working set (see :func:`_w_step`);
        :func:`fit_n_genes` uses ``max(K, 2 * n_genes)``. ``None``, or ``K >= p``,
        runs FISTA on all genes.
    ws_rounds : working-set rebuilds per W-step before falling back to all genes.
    kkt_tol : relative slack of the KKT check for rows outside the working set.
    path_factor : :func:`fit_n_genes` first walks down from ``lam_max`` by this factor
        until a fit has at least ``n_genes`` nonzero rows...
    n_bisect : ...then bisects ``log(lam)`` in that bracket at most this many times (it
        stops earlier at a fit with exactly ``n_genes`` nonzero rows).
    lam_min_ratio : the walk down stops at ``lam_max * lam_min_ratio``.
    """

    max_iter: int = 100
    tol: float = 1e-6
    w_max_iter: int = 2000
    w_tol: float = 1e-5
    working_set: int | None = 128
    ws_rounds: int = 10
    kkt_tol: float = 1e-4
    path_factor: float = 0.8
    n_bisect: int = 20
    lam_min_ratio: float = 1e-3

    def __post_init__(self):
        if self.working_set is not None and (
            not isinstance(self.working_set, int) or isinstance(self.working_set, bool) or self.working_set < 1
        ):
            raise ValueError(f"working_set must be a positive integer or None, got {self.working_set!r}")
        for name in ("max_iter", "w_max_iter", "n_bisect", "ws_rounds"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("tol", "w_tol", "kkt_tol"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)!r}")
        if not 0 < self.path_factor < 1:
            raise ValueError(f"path_factor must lie in (0, 1), got {self.path_factor!r}")
        if not 0 < self.lam_min_ratio < 1:
            raise ValueError(f"lam_min_ratio must lie in (0, 1), got {self.lam_min_ratio!r}")


class SRRRResult(NamedTuple):
    """A fitted sRRR model (leading fold axis when returned by :func:`cross_validate`).

    ``w`` [p, r] (zero outside the selected genes), ``v`` [q, r] (orthonormal columns,
    or zero when no gene survives). ``genes`` int32: the selected genes by decreasing row
    norm, [n_genes] from :func:`fit_n_genes`; from :func:`fit` all [p] genes ranked, of
    which the first ``n_nonzero`` are selected. ``lam`` is the penalty of the sparse fit,
    ``n_nonzero`` its number of nonzero rows (before truncation to ``n_genes``), ``n_iter``
    its number of alternations (0 for the ridge closed form).
    """

    w: jax.Array
    v: jax.Array
    genes: jax.Array
    lam: jax.Array
    n_nonzero: jax.Array
    n_iter: jax.Array


class CVResult(NamedTuple):
    """Per-fold output of :func:`cross_validate`; every leaf has a leading [n_folds] axis.

    ``result`` : :class:`SRRRResult` fitted on the centred training cells.
    ``r2_train``, ``r2_test`` : ``1 - sum((y - y_hat)^2) / sum(y^2)`` over cells and
    features, ``y`` centred with the training mean. ``r2_test_per_feature`` [n_folds, q].
    ``x_mean`` [n_folds, p], ``y_mean`` [n_folds, q] : the training means used to centre;
    predict new cells with ``predict(result, x - x_mean) + y_mean``.
    """

    result: SRRRResult
    r2_train: jax.Array
    r2_test: jax.Array
    r2_test_per_feature: jax.Array
    x_mean: jax.Array
    y_mean: jax.Array


# ---------------------------------------------------------------------------------------
# solver pieces (traceable; they work on the grams)
# ---------------------------------------------------------------------------------------

_TINY = 1e-30


class _Problem(NamedTuple):
    """One fit: the centred data ``x`` [n, p], ``y`` [n, q] (padded rows zero), the true
    cell count ``n``, the grams ``g = X^T X / n`` [p, p] and ``c = X^T Y / n`` [p, q], and
    ``lmax``, the largest eigenvalue of ``g``.

    The solver works on the grams; the objective is evaluated from the residual
    ``Y - X W V^T`` because the gram form ``|Y|^2 - 2 <C V, W> + <W, G W>`` cancels and
    is only good to about 1e-5 relative in float32, the size of the changes the
    convergence test must see.
    """

    x: jax.Array
    y: jax.Array
    n: jax.Array
    g: jax.Array
    c: jax.Array
    lmax: jax.Array


def _problem(x, y, n=None) -> _Problem:
    """Grams of (already centred) data; ``n`` overrides the row count (padded rows must
    then be zero)."""
    n = x.shape[0] if n is None else n
    n = jnp.asarray(n, x.dtype)
    # times 1/n, not divided by n: XLA rewrites ``a / broadcast(n)`` into a reciprocal
    # multiply in some programs and not others (one device vs a device's slice of the
    # folds), which changed the last bit of fold results across device counts
    inv_n = 1.0 / n
    g = (x.T @ x) * inv_n
    g = 0.5 * (g + g.T)  # exactly symmetric for eigvalsh
    c = (x.T @ y) * inv_n
    lmax = jnp.maximum(linalg.eigvalsh(g)[-1], 0.0)
    return _Problem(x, y, n, g, c, lmax)


def _pls_directions(c, rank: int):
    """Top-``rank`` right singular vectors of ``C`` (the PLS directions), [q, rank]."""
    _, _, vt = linalg.svd(c, full_matrices=False)
    return vt[:rank].T


def _fix_signs(w, v):
    """Make the largest-magnitude entry of every column of ``v`` positive (flip ``w``'s
    columns with it), as the reference does."""
    pos = jnp.argmax(jnp.abs(v), axis=0)
    s = jnp.sign(v[pos, jnp.arange(v.shape[1])])
    s = jnp.where(s == 0, 1.0, s)
    return w * s, v * s


def _objective(prob: _Problem, w, v, lam, alpha):
    """Penalised objective, the data term from the residual (see :class:`_Problem`)."""
    data = 0.5 * jnp.sum(jnp.square(prob.y - (prob.x @ w) @ v.T)) / prob.n
    pen = lam * (alpha * group_lasso(w) + 0.5 * (1.0 - alpha) * jnp.sum(jnp.square(w)))
    return data + pen


def _fista(g, target, w0, step, thr, l2, cfg: SolverConfig, active=True):
    """FISTA with adaptive (gradient-scheme) restart for
    ``min_W 1/2 tr(W^T g W) - <target, W> + l2/2 ||W||^2 + thr/step * sum_j ||W_j||``.

    Stops when ``||W_new - W_old||_F <= w_tol ||W_new||_F`` or after ``w_max_iter``
    iterations; runs no iteration when ``active`` is False. Returns ``(w, iterations)``.
    """

    def body(s):
        w, z, t, k, _ = s
        grad = g @ z - target + l2 * z
        w_new = prox_group_lasso(z - step * grad, thr)
        dw = w_new - w
        # restart the momentum when it points against the proximal-gradient step
        restart = jnp.sum((z - w_new) * dw) > 0
        t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
        mom = jnp.where(restart, 0.0, (t - 1.0) / t_new)
        t_new = jnp.where(restart, 1.0, t_new)
        z_new = w_new + mom * dw
        rel = jnp.sqrt(jnp.sum(dw * dw)) / jnp.maximum(jnp.sqrt(jnp.sum(w_new * w_new)), _TINY)
        return w_new, z_new, t_new, k + 1, rel

    def cond(s):
        return active & (s[3] < cfg.w_max_iter) & (s[4] > cfg.w_tol)

    one = jnp.ones((), w0.dtype)
    w, _, _, k, _ = lax.while_loop(cond, body, (w0, w0, one, jnp.int32(0), jnp.asarray(jnp.inf, w0.dtype)))
    return w, k


def _row_norms(a):
    return jnp.sqrt(jnp.sum(jnp.square(a), axis=1))


def _w_step(prob: _Problem, v, w0, lam, alpha, cfg: SolverConfig, working_set: int | None = None):
    """W-step: elastic-net group-lasso regression of ``Y V`` on ``X``, warm-started at
    ``w0``. Returns ``(w, n_fista_iterations)``.

    With a ``working_set`` size ``K < p`` (static), FISTA runs on the ``K x K`` gram of a
    working set (nonzero rows of the current ``W`` first, then the rows with the largest
    KKT violation ``||(C V - G W)_j||``); rows outside it must satisfy the KKT condition
    ``||(C V - G W)_j|| <= lam * alpha * (1 + kkt_tol)`` or the set is rebuilt (at most
    ``ws_rounds`` times), after which FISTA on all ``p`` rows finishes the job. The
    result solves the full problem either way; the working set only saves the ``p x p``
    products (the gram does not fit in cache for many folds at once). The fallback is a
    ``while_loop`` entered only when needed, so under ``vmap`` it costs nothing unless
    some fold needs it.
    """
    p = prob.g.shape[0]
    target = prob.c @ v  # X^T Y V / n
    l2 = lam * (1.0 - alpha)
    step = 1.0 / jnp.maximum(prob.lmax + l2, _TINY)
    thr = step * lam * alpha
    if working_set is None or working_set >= p:
        return _fista(prob.g, target, w0, step, thr, l2, cfg)

    bound = lam * alpha * (1.0 + cfg.kkt_tol)

    def kkt(w):
        score = _row_norms(target - prob.g @ w)
        bad = jnp.any(jnp.all(w == 0, axis=1) & (score > bound))
        return score, bad

    def body(s):
        w, score, _, _, rounds, its = s
        nonzero = jnp.any(w != 0, axis=1)
        # nonzero rows first (their scores are finite), then by KKT score
        _, ws = lax.top_k(jnp.where(nonzero, jnp.inf, score), working_set)
        in_ws = jnp.zeros((p,), bool).at[ws].set(True)
        overflow = jnp.any(nonzero & ~in_ws)  # more nonzero rows than the set holds
        w_ws, k = _fista(prob.g[ws][:, ws], target[ws], w[ws], step, thr, l2, cfg)
        w = w.at[ws].set(w_ws)
        score, bad = kkt(w)
        return w, score, bad, overflow, rounds + 1, its + k

    def cond(s):
        return s[2] & ~s[3] & (s[4] < cfg.ws_rounds)

    score0, _ = kkt(w0)
    init = (w0, score0, jnp.asarray(True), jnp.asarray(False), jnp.int32(0), jnp.int32(0))
    w, _, bad, overflow, _, its = lax.while_loop(cond, body, init)
    w, k = _fista(prob.g, target, w, step, thr, l2, cfg, active=bad | overflow)
    return w, its + k


def _v_step(prob: _Problem, w):
    """Orthogonal Procrustes ``V`` for fixed ``W``, with the reference's sign convention."""
    u, _, vt = linalg.svd(prob.c.T @ w, full_matrices=False)
    return _fix_signs(w, u @ vt)


def _alternate(prob: _Problem, v0, w0, lam, alpha, cfg: SolverConfig, working_set: int | None):
    """Alternating W/V steps from ``V = v0``, ``W`` warm-started at ``w0``.

    Returns ``(w, v, n_iter, trace)``; ``trace`` [max_iter] holds the penalised objective
    after each alternation (NaN after stopping). If every row of ``W`` is zero the fit
    stops with ``W = 0, V = 0`` (as the reference).
    """
    nan_trace = jnp.full((cfg.max_iter,), jnp.nan, w0.dtype)

    def body(s):
        w, v, k, prev, _, trace = s
        w, _ = _w_step(prob, v, w, lam, alpha, cfg, working_set)
        zero = jnp.all(w == 0)
        w, v_new = _v_step(prob, w)
        v_new = jnp.where(zero, 0.0, v_new)
        obj = _objective(prob, w, v_new, lam, alpha)
        converged = (k > 0) & (jnp.abs(obj - prev) <= cfg.tol * jnp.abs(prev))
        return w, v_new, k + 1, obj, zero | converged, trace.at[k].set(obj)

    def cond(s):
        return (s[2] < cfg.max_iter) & ~s[4]

    init = (w0, v0, jnp.int32(0), jnp.asarray(jnp.inf, w0.dtype), jnp.asarray(False), nan_trace)
    w, v, k, _, _, trace = lax.while_loop(cond, body, init)
    return w, v, k, trace


def _ridge_rrr(g, c, lam, rank: int):
    """Closed-form ridge RRR (``alpha = 0``) from the grams ``g`` [k, k], ``c`` [k, q].

    ``B = (G + lam I)^+ C``; with ``G = Q D Q^T`` the right singular vectors of ``X B`` are
    those of ``D^{1/2} (D + lam)^{-1} Q^T C``. Components with a zero singular value (fewer
    than ``rank`` genes, or no signal) get zero columns in ``W`` and ``V``.
    """
    k, q = c.shape
    d, qm = linalg.eigh(0.5 * (g + g.T))
    d = jnp.maximum(d, 0.0)
    qc = qm.T @ c
    den = d + lam
    inv = jnp.where(den > _TINY, 1.0 / jnp.where(den > _TINY, den, 1.0), 0.0)
    b = qm @ (inv[:, None] * qc)
    _, s, vt = linalg.svd((jnp.sqrt(d) * inv)[:, None] * qc, full_matrices=False)
    m = min(k, q, rank)
    v = vt[:m].T
    s = s[:m]
    keep = s > (max(k, q) * jnp.finfo(c.dtype).eps) * s[0]
    v = v * keep
    if m < rank:  # fewer genes than components: pad with zero components (static)
        v = jnp.concatenate([v, jnp.zeros((q, rank - m), v.dtype)], axis=1)
    w, v = _fix_signs(b @ v, v)
    return w, v


def _kkt_scores(prob: _Problem, w, v):
    """``||(C V - G W)_j||`` per gene: at a zero row, how far it is from entering."""
    return _row_norms(prob.c @ v - prob.g @ w)


def _rank_genes(w, kkt):
    """Genes ordered best first: nonzero rows by decreasing l2 norm, then zero rows by
    decreasing KKT score (:func:`_kkt_scores`, the next to enter as ``lam`` decreases);
    ties keep the lower index (stable sort)."""
    norm = _row_norms(w)
    nonzero = norm > 0
    key = jnp.where(nonzero, norm, kkt)
    # lexicographic: nonzero rows first, then by key; argsort is stable
    order = jnp.argsort(-key, stable=True)
    order = order[jnp.argsort(~nonzero[order], stable=True)]
    return order.astype(jnp.int32)


# ---------------------------------------------------------------------------------------
# fits on a problem (traceable cores)
# ---------------------------------------------------------------------------------------


def _fit_lam(prob: _Problem, rank: int, lam, alpha: float, relaxed: bool, cfg: SolverConfig):
    """Fit at a given ``lam``; returns ``(SRRRResult, trace)``."""
    p = prob.g.shape[0]
    lam = jnp.asarray(lam, prob.g.dtype)
    if alpha == 0:
        w, v = _ridge_rrr(prob.g, prob.c, lam, rank)
        trace = jnp.full((cfg.max_iter,), jnp.nan, w.dtype)
        n_iter = jnp.int32(0)
    else:
        v0 = _pls_directions(prob.c, rank)
        w0 = jnp.zeros((p, rank), prob.g.dtype)
        w, v, n_iter, trace = _alternate(prob, v0, w0, lam, alpha, cfg, cfg.working_set)
    genes = _rank_genes(w, _kkt_scores(prob, w, v))
    mask = jnp.any(w != 0, axis=1)
    n_nonzero = jnp.sum(mask).astype(jnp.int32)
    if relaxed and alpha != 0:
        m = mask.astype(w.dtype)
        wr, vr = _ridge_rrr(prob.g * m[:, None] * m[None, :], prob.c * m[:, None], lam, rank)
        w = jnp.where(n_nonzero > 0, wr * m[:, None], w)
        v = jnp.where(n_nonzero > 0, vr, v)
    return SRRRResult(w, v, genes, lam, n_nonzero, n_iter), trace


class _Best(NamedTuple):
    w: jax.Array
    v: jax.Array
    lam: jax.Array
    nnz: jax.Array
    n_iter: jax.Array
    # _kkt_scores of this fit, to rank its zero rows. Computed inside the search loop: a
    # version that read the grams again after the loop hung (XLA:CPU of jax 0.10, YNNPACK
    # dot fusions, folds vmapped on 2 cores; never with XLA_FLAGS=
    # --xla_cpu_experimental_ynn_fusion_type=). This layout has not hung in our runs.
    kkt: jax.Array


class _Search(NamedTuple):
    lo: jax.Array  # log lam of a fit with >= n_genes rows (once bracketed)
    hi: jax.Array  # log lam of a fit with < n_genes rows
    bracketed: jax.Array  # phase 1 (bisection)
    w_warm: jax.Array
    above: _Best  # fewest nonzero rows >= n_genes so far
    below: _Best  # most nonzero rows < n_genes so far
    n_bisect: jax.Array
    done: jax.Array


def _fit_n_genes(prob: _Problem, n_genes: int, rank: int, alpha: float, relaxed: bool, cfg: SolverConfig):
    """Search ``lam`` for a fit with ``n_genes`` nonzero rows; see :func:`fit_n_genes`.

    Phase 0 walks down from ``lam_max`` by ``path_factor`` (sparse fits are cheap and
    warm-start each other) until a fit has ``>= n_genes`` nonzero rows; phase 1 bisects
    ``log(lam)`` in the bracket found. One ``while_loop``, so it runs under ``vmap``.
    """
    p = prob.g.shape[0]
    dt = prob.g.dtype
    working_set = None if cfg.working_set is None else max(cfg.working_set, 2 * n_genes)
    v0 = _pls_directions(prob.c, rank)
    # KKT at W = 0, V = v0: row j stays zero iff ||(C v0)_j|| <= lam * alpha
    lam_max = jnp.max(jnp.sqrt(jnp.sum(jnp.square(prob.c @ v0), axis=1))) / alpha * (1.0 + 1e-4)
    log_max = jnp.log(jnp.maximum(lam_max, _TINY))
    log_min = log_max + jnp.log(jnp.asarray(cfg.lam_min_ratio, dt))
    log_factor = jnp.log(jnp.asarray(cfg.path_factor, dt))
    zero_w = jnp.zeros((p, rank), dt)
    empty = _Best(
        zero_w, jnp.zeros((prob.c.shape[1], rank), dt), jnp.exp(log_max), jnp.int32(0), jnp.int32(0), jnp.zeros((p,), dt)
    )

    def body(s: _Search):
        log_lam = jnp.where(s.bracketed, 0.5 * (s.lo + s.hi), s.hi + log_factor)
        lam = jnp.exp(log_lam)
        w, v, n_iter, _ = _alternate(prob, v0, s.w_warm, lam, alpha, cfg, working_set)
        nnz = jnp.sum(jnp.any(w != 0, axis=1)).astype(jnp.int32)
        new = _Best(w, v, lam, nnz, n_iter, _kkt_scores(prob, w, v))
        is_above = nnz >= n_genes
        pick = lambda flag, a, b: jax.tree.map(lambda x, y: jnp.where(flag, x, y), a, b)  # noqa: E731
        n_bisect = s.n_bisect + s.bracketed.astype(jnp.int32)
        done = (nnz == n_genes) | (n_bisect >= cfg.n_bisect) | (~is_above & (log_lam <= log_min))
        return _Search(
            lo=jnp.where(is_above, log_lam, s.lo),
            hi=jnp.where(is_above, s.hi, log_lam),
            bracketed=s.bracketed | is_above,
            w_warm=w,
            above=pick(is_above & (nnz <= s.above.nnz), new, s.above),
            below=pick(~is_above & (nnz > s.below.nnz), new, s.below),
            n_bisect=n_bisect,
            done=done,
        )

    init = _Search(
        lo=log_min,
        hi=log_max,
        bracketed=jnp.asarray(False),
        w_warm=zero_w,
        above=empty._replace(nnz=jnp.int32(p + 1)),
        below=empty._replace(nnz=jnp.int32(-1)),
        n_bisect=jnp.int32(0),
        done=jnp.asarray(False),
    )
    s = lax.while_loop(lambda s: ~s.done, body, init)
    above, below = s.above, s.below
    # Fallback when even the smallest lam tried gave too few genes: the densest fit.
    found = above.nnz <= p
    best = jax.tree.map(lambda a, b: jnp.where(found, a, b), above, below)

    genes = _rank_genes(best.w, best.kkt)[:n_genes]
    if relaxed:
        g_sub = prob.g[genes][:, genes]
        wr, vr = _ridge_rrr(g_sub, prob.c[genes], best.lam, rank)
        w = jnp.zeros_like(best.w).at[genes].set(wr)
        v = vr
    else:
        keep = jnp.zeros((p,), dt).at[genes].set(1.0)
        w, v = best.w * keep[:, None], best.v
    return SRRRResult(w, v, genes, best.lam, best.nnz, best.n_iter)


# ---------------------------------------------------------------------------------------
# public fits (host-side argument checks on shapes and Python values only, so they also
# work under an outer jit / vmap)
# ---------------------------------------------------------------------------------------


def _as_xy(x, y):
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"x and y must be 2-D, got shapes {x.shape} and {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of cells, got {x.shape[0]} and {y.shape[0]}")
    return x, y


def _check_int(name, value, lo, hi):
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got {name}={value}")


def _check_common(p, q, rank, alpha, config):
    _check_int("rank", rank, 1, min(p, q))
    if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a Python number in [0, 1], got {alpha!r}")
    if not isinstance(config, SolverConfig):
        raise ValueError(f"config must be a SolverConfig, got {type(config).__name__}")


def _check_n_genes(n_genes, p, alpha):
    _check_int("n_genes", n_genes, 1, p)
    if alpha == 0:
        raise ValueError("gene selection needs alpha > 0 (alpha = 0 is ridge, which selects every gene)")


def objective(x, y, w, v, lam, alpha: float = 1.0):
    """The penalised sRRR objective ``1/(2n)||Y - X W V^T||^2 + lam * penalty(W)``
    (computed directly, for any ``v``)."""
    n = x.shape[0]
    resid = y - x @ w @ v.T
    pen = lam * (alpha * group_lasso(w) + 0.5 * (1.0 - alpha) * jnp.sum(jnp.square(w)))
    return 0.5 * jnp.sum(jnp.square(resid)) / n + pen


@functools.partial(jax.jit, static_argnames=("alpha", "config"))
def _solve_w_jit(x, y, v, w0, lam, alpha, config):
    prob = _problem(x, y)
    return _w_step(prob, v, w0, jnp.asarray(lam, x.dtype), alpha, config, config.working_set)


def solve_w(x, y, v, lam, alpha: float = 1.0, *, w0=None, config: SolverConfig = SolverConfig()):
    """The W-step alone: argmin over ``W`` of the objective for fixed ``v`` [q, r].

    This is the multi-task elastic net of ``Y V`` on ``X`` (scikit-learn's
    ``MultiTaskElasticNet(alpha=lam, l1_ratio=alpha, fit_intercept=False)``). Returns
    ``(w [p, r], n_fista_iterations)``.
    """
    x, y = _as_xy(x, y)
    v = jnp.asarray(v, jnp.float32)
    _check_common(x.shape[1], y.shape[1], v.shape[1], alpha, config)
    w0 = jnp.zeros((x.shape[1], v.shape[1]), jnp.float32) if w0 is None else jnp.asarray(w0, jnp.float32)
    return _solve_w_jit(x, y, v, w0, lam, float(alpha), config)


@functools.partial(jax.jit, static_argnames=("rank", "alpha", "relaxed", "config"))
def _fit_jit(x, y, lam, rank, alpha, relaxed, config):
    return _fit_lam(_problem(x, y), rank, lam, alpha, relaxed, config)


def fit(
    x,
    y,
    rank: int,
    lam,
    alpha: float = 1.0,
    relaxed: bool = False,
    *,
    config: SolverConfig = SolverConfig(),
    return_trace: bool = False,
):
    """Fit sRRR at a given penalty ``lam`` (the reference's ``elastic_rrr``, or with
    ``relaxed=True`` its ``relaxed_elastic_rrr``).

    ``x`` [n, p] and ``y`` [n, q] must be centred. ``rank``, ``alpha`` and ``relaxed`` are
    static; ``lam`` may be traced. ``alpha = 0`` uses the ridge closed form. The relaxed
    refit uses every nonzero row of the sparse fit.

    Returns an :class:`SRRRResult` (``genes`` ranks all ``p`` genes, the first
    ``n_nonzero`` are selected); with ``return_trace=True`` also the [max_iter]
    penalised objective after each alternation of the sparse fit (NaN after stopping).
    """
    x, y = _as_xy(x, y)
    _check_common(x.shape[1], y.shape[1], rank, alpha, config)
    res, trace = _fit_jit(x, y, lam, rank, float(alpha), bool(relaxed), config)
    return (res, trace) if return_trace else res


@functools.partial(jax.jit, static_argnames=("n_genes", "rank", "alpha", "relaxed", "config"))
def _fit_n_genes_jit(x, y, n, n_genes, rank, alpha, relaxed, config):
    return _fit_n_genes(_problem(x, y, n), n_genes, rank, alpha, relaxed, config)


def fit_n_genes(
    x,
    y,
    n_genes: int,
    rank: int,
    alpha: float = 1.0,
    relaxed: bool = True,
    *,
    config: SolverConfig = SolverConfig(),
    n_cells=None,
) -> SRRRResult:
    """Fit sRRR with exactly ``n_genes`` selected genes.

    Bisects ``log(lam)`` in ``[lam_max * lam_min_ratio, lam_max]`` (``lam_max``: the
    smallest ``lam`` zeroing every row at the PLS initialisation), each fit warm-started
    from the previous one, and stops early at a fit with exactly ``n_genes`` nonzero rows.
    The fit with the fewest nonzero rows ``>= n_genes`` is kept (if none, the densest
    one); its top ``n_genes`` rows by l2 norm are the genes. ``relaxed=True`` refits them
    with the ridge closed form at the same ``lam``; ``relaxed=False`` keeps the sparse
    ``W`` restricted to them (and its ``V``).

    ``x`` [n, p], ``y`` [n, q] must be centred; ``n_genes``, ``rank``, ``alpha`` (> 0)
    and ``relaxed`` are static.

    ``n_cells``: the number of cells the rows stand for, when they are not the cells
    themselves but rows with the same grams ``x^T x``, ``x^T y`` and ``y^T y`` (e.g.
    :func:`jaxsel.streaming.square_root_rows` of data on disk, ``p + q`` rows for any
    number of cells): the objective's ``1/n`` is ``1/n_cells``, and the fit is that of
    the cells. Default: the number of rows.
    """
    x, y = _as_xy(x, y)
    _check_common(x.shape[1], y.shape[1], rank, alpha, config)
    _check_n_genes(n_genes, x.shape[1], alpha)
    if n_cells is not None:
        if not isinstance(n_cells, numbers.Real) or isinstance(n_cells, bool) or not n_cells >= 1:
            raise ValueError(f"n_cells must be a number >= 1, got {n_cells!r}")
        n_cells = jnp.asarray(n_cells, jnp.float32)
    return _fit_n_genes_jit(x, y, n_cells, n_genes, rank, float(alpha), bool(relaxed), config)


def _fold_mesh(batch_size, mesh):
    """Check ``batch_size`` (folds at a time per device, or ``None``) and resolve
    ``mesh="auto"`` to :func:`jaxsel.engine.fold_mesh`."""
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    return engine.fold_mesh() if mesh == "auto" else mesh


@functools.partial(
    jax.jit, static_argnames=("n_genes", "rank", "alpha", "relaxed", "config", "batch_size", "mesh")
)
def _fit_n_genes_folds_jit(xs, ys, ns, n_genes, rank, alpha, relaxed, config, batch_size, mesh):
    def one(per_fold, _):
        return _fit_n_genes(_problem(*per_fold), n_genes, rank, alpha, relaxed, config)

    return engine.map_folds(one, (xs, ys, ns), None, batch_size=batch_size, mesh=mesh)


def fit_n_genes_folds(
    xs,
    ys,
    n_cells,
    n_genes: int,
    rank: int,
    alpha: float = 1.0,
    relaxed: bool = True,
    *,
    config: SolverConfig = SolverConfig(),
    batch_size: int | None = 1,
    mesh="auto",
) -> SRRRResult:
    """:func:`fit_n_genes` of every fold's (centred) rows ``xs`` [n_folds, m, p], ``ys``
    [n_folds, m, q] standing for ``n_cells`` [n_folds] cells each, in one compiled
    program (:func:`jaxsel.engine.map_folds`; ``batch_size`` and ``mesh`` as in
    :func:`cross_validate`). The rows are typically each fold's
    :func:`jaxsel.streaming.square_root_rows` (``m = p + q``): cross-validation of data
    on disk from one pass of moments. Leaves of the result have a leading fold axis."""
    xs = jnp.asarray(xs, jnp.float32)
    ys = jnp.asarray(ys, jnp.float32)
    ns = jnp.asarray(n_cells, jnp.float32)
    if xs.ndim != 3 or ys.ndim != 3 or xs.shape[:2] != ys.shape[:2] or ns.shape != xs.shape[:1]:
        raise ValueError(f"xs [n_folds, m, p], ys [n_folds, m, q] and n_cells [n_folds] must agree, got shapes "
                         f"{xs.shape}, {ys.shape} and {ns.shape}")
    _check_common(xs.shape[2], ys.shape[2], rank, alpha, config)
    _check_n_genes(n_genes, xs.shape[2], alpha)
    mesh = _fold_mesh(batch_size, mesh)
    return _fit_n_genes_folds_jit(xs, ys, ns, n_genes, rank, float(alpha), bool(relaxed), config, batch_size, mesh)


def predict(result: SRRRResult, x):
    """``x @ w @ v.T``: predicted (centred) ``y`` for centred ``x``."""
    return latent(result, x) @ result.v.T


def latent(result: SRRRResult, x):
    """``x @ w``, the [n, r] latent representation of the cells."""
    return x @ result.w


# ---------------------------------------------------------------------------------------
# cross-validation: all folds in one program
# ---------------------------------------------------------------------------------------


def _r2(y, y_hat, axis=None):
    ss_res = jnp.sum(jnp.square(y - y_hat), axis=axis)
    ss_tot = jnp.sum(jnp.square(y), axis=axis)
    return 1.0 - ss_res / ss_tot


def cv_fold(split: engine.Splits, data, *, rank: int, n_genes: int, alpha: float, relaxed: bool,
            config: SolverConfig = SolverConfig()) -> CVResult:
    """One fold of :func:`cross_validate` (traceable; ``split`` without fold axis,
    ``data = (x, y)`` uncentred). Fields of the result have no fold axis."""
    x, y = data
    mt = (jnp.arange(split.train_idx.shape[0]) < split.n_train).astype(x.dtype)
    mv = (jnp.arange(split.val_idx.shape[0]) < split.n_val).astype(x.dtype)
    nt = split.n_train.astype(x.dtype)
    xt, yt = jnp.take(x, split.train_idx, axis=0), jnp.take(y, split.train_idx, axis=0)
    x_mean, y_mean = engine.valid_mean(xt, split.n_train), engine.valid_mean(yt, split.n_train)
    # centre with the training means and zero the padded rows (they add nothing to grams)
    xt = (xt - x_mean) * mt[:, None]
    yt = (yt - y_mean) * mt[:, None]
    xv = (jnp.take(x, split.val_idx, axis=0) - x_mean) * mv[:, None]
    yv = (jnp.take(y, split.val_idx, axis=0) - y_mean) * mv[:, None]

    res = _fit_n_genes(_problem(xt, yt, nt), n_genes, rank, alpha, relaxed, config)
    return CVResult(
        result=res,
        r2_train=_r2(yt, predict(res, xt)),
        r2_test=_r2(yv, predict(res, xv)),
        r2_test_per_feature=_r2(yv, predict(res, xv), axis=0),
        x_mean=x_mean,
        y_mean=y_mean,
    )


@functools.partial(
    jax.jit, static_argnames=("rank", "n_genes", "alpha", "relaxed", "config", "batch_size", "mesh")
)
def _cross_validate_jit(x, y, splits, rank, n_genes, alpha, relaxed, config, batch_size, mesh):
    fn = functools.partial(cv_fold, rank=rank, n_genes=n_genes, alpha=alpha, relaxed=relaxed, config=config)
    return engine.map_folds(fn, splits, (x, y), batch_size=batch_size, mesh=mesh)


def cross_validate(
    x,
    y,
    splits: engine.Splits,
    *,
    rank: int,
    n_genes: int,
    alpha: float = 1.0,
    relaxed: bool = True,
    config: SolverConfig = SolverConfig(),
    batch_size: int | None = 1,
    mesh="auto",
    lower: bool = False,
) -> CVResult:
    """Cross-validated :func:`fit_n_genes`, every fold in one compiled program.

    For each fold (the leading axis of ``splits``, see :func:`jaxsel.engine.make_splits`)
    ``x`` and ``y`` are centred with the training cells' means, the sRRR is fitted on the
    training cells (true ``n_train`` in the ``1/n``) and scored on the validation cells.
    ``batch_size`` and ``mesh`` are passed to :func:`jaxsel.engine.map_folds` (``None``:
    vmap over folds; an int: ``lax.map`` that many folds at a time; ``mesh="auto"``
    shards the folds over :func:`jaxsel.engine.fold_mesh`, ``None`` keeps one device).
    The default ``batch_size=1`` gives every fold the same bits on any number of
    devices; vmapped folds run each while loop until the slowest fold converges and
    XLA:CPU rounds their small batched matmuls differently for different numbers of
    folds per device (float32 rounding). On CBMC (8617 x 500, rank 13, 25 genes, 10 folds,
    2-core CPU) both take under 2 s: 1.81 s looped, 1.67 s vmapped. ``lower=True``
    returns the lowered program (``.compile()`` it, then call it with
    ``(x, y, splits)``).
    """
    x, y = _as_xy(x, y)
    _check_common(x.shape[1], y.shape[1], rank, alpha, config)
    _check_n_genes(n_genes, x.shape[1], alpha)
    if not isinstance(splits, engine.Splits) or splits.train_idx.ndim != 2:
        raise ValueError("splits must be an engine.Splits with a leading fold axis (engine.make_splits)")
    mesh = _fold_mesh(batch_size, mesh)
    kw = dict(rank=rank, n_genes=n_genes, alpha=float(alpha), relaxed=bool(relaxed), config=config,
              batch_size=batch_size, mesh=mesh)
    if lower:
        return _cross_validate_jit.lower(x, y, splits, **kw)
    return _cross_validate_jit(x, y, splits, **kw)

"""Pure loss functions, per cell (reduce with :func:`weighted_mean`).

Every function returns one value per cell so that padded cells (a validation set padded
to a common length across folds) can be masked out by weights.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = [
    "gaussian_nll",
    "kl_standard_normal",
    "cross_entropy",
    "weighted_mean",
    "group_lasso",
    "prox_group_lasso",
    "mmd_rbf",
    "pearson_loss",
    "cosine_consistence",
    "poisson_log_prob",
    "poisson_log_prob_logits",
    "nb_log_prob",
    "nb_log_prob_logits",
    "zinb_log_prob",
    "zinb_log_prob_logits",
    "log_binom_coef",
]

_LOG_2PI = float(jnp.log(2.0 * jnp.pi))


def gaussian_nll(x, mean, logvar):
    """Negative log-likelihood of ``x`` under N(mean, exp(logvar)), summed over genes.

    ``[n_cells, n_genes] -> [n_cells]``.
    """
    return 0.5 * jnp.sum(_LOG_2PI + logvar + (x - mean) ** 2 * jnp.exp(-logvar), axis=-1)


def kl_standard_normal(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over latent dimensions, ``[n_cells]``."""
    return -0.5 * jnp.sum(1.0 + logvar - mean**2 - jnp.exp(logvar), axis=-1)


def cross_entropy(logits, labels):
    """Softmax cross-entropy with integer labels, ``[n_cells]``."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def weighted_mean(values, weights=None):
    """Mean of ``values`` over cells, with optional 0/1 (or real) cell weights."""
    if weights is None:
        return jnp.mean(values)
    weights = weights.astype(values.dtype)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def group_lasso(w, axis: int = -1):
    """Sum over groups of the l2 norm of each group: ``sum_g ||w_g||_2``.

    A group is a slice along every axis except ``axis``'s complement: with the default
    ``axis=-1`` each *row* of a ``[n_genes, n_units]`` kernel is a group (one gene's
    outgoing weights), the penalty of the sparse bottleneck network's first layer and of
    sparse reduced-rank regression. The gradient at a zero row is taken as zero (the
    norm is computed as ``sqrt(max(s, tiny))`` times an indicator), so subgradient
    training never produces NaN.
    """
    sq = jnp.sum(jnp.square(w), axis=axis)
    safe = jnp.sqrt(jnp.where(sq > 0, sq, 1.0))
    return jnp.sum(jnp.where(sq > 0, safe, 0.0))


def prox_group_lasso(w, threshold, axis: int = -1):
    """Proximal operator of ``threshold * group_lasso(w, axis)``: group soft-thresholding.

    Each group ``w_g`` becomes ``max(0, 1 - threshold / ||w_g||) * w_g``; groups with
    norm at most ``threshold`` become exactly zero.
    """
    sq = jnp.sum(jnp.square(w), axis=axis, keepdims=True)
    norm = jnp.sqrt(jnp.where(sq > 0, sq, 1.0))
    scale = jnp.where(sq > 0, jnp.maximum(0.0, 1.0 - threshold / norm), 0.0)
    return w * scale


def _kernel_and_slope(d2, inv, squaring: bool):
    """``K(d2) = sum_m exp(-d2 * inv_m)`` and ``dK/dd2``; ``inv`` ascending (widest kernel
    first). With ``squaring`` (multipliers of 2) each kernel is the square of the previous:
    one exp per pair instead of one per kernel.

    XLA's simplifier rewrites ``exp(a) * exp(a)`` back into ``exp(2a)`` (five exps per
    pair, measured 10x the transcendental work); multiplying by ``max(e, 0)`` (``= e``)
    hides the pattern so the chain stays multiplications."""
    if not squaring:
        es = [jnp.exp(-d2 * inv[m]) for m in range(inv.shape[0])]
        return sum(es), -sum(inv[m] * e for m, e in enumerate(es))
    e = jnp.exp(-d2 * inv[0])
    k, slope = e, inv[0] * e
    e = e * jnp.maximum(e, 0.0)
    for m in range(1, inv.shape[0]):
        if m > 1:
            e = e * e
        k, slope = k + e, slope + inv[m] * e
    return k, -slope


def _kernel_block(a, b, inv, squaring: bool, chunk: int, grads: bool, symmetric: bool = False):
    """``sum_ij K(||a_i - b_j||^2)`` over row chunks of ``a`` (one ``[chunk, n_b]`` tile
    live at a time) and, with ``grads``, its gradients with respect to ``a`` and ``b``.
    ``symmetric`` (``b`` is ``a``): the two gradients are equal, so only one is
    accumulated (half the backward products)."""
    n, d = a.shape
    size = max(1, min(chunk, n))
    pad = (-n) % size
    ap = jnp.concatenate([a, jnp.zeros((pad, d), a.dtype)]).reshape(-1, size, d)
    valid = (jnp.arange(n + pad) < n).astype(a.dtype).reshape(-1, size)
    bb = jnp.sum(b * b, 1)

    def body(carry, xs):
        total, gb = carry
        ac, vc = xs
        d2 = jnp.maximum(jnp.sum(ac * ac, 1)[:, None] + bb[None, :] - 2.0 * (ac @ b.T), 0.0)
        k, slope = _kernel_and_slope(d2, inv, squaring)
        total = total + jnp.sum(jnp.sum(k, 1) * vc)
        if not grads:
            return (total, gb), None
        slope = slope * vc[:, None]
        ga = 2.0 * (jnp.sum(slope, 1)[:, None] * ac - slope @ b)
        if not symmetric:
            gb = gb + 2.0 * (jnp.sum(slope, 0)[:, None] * b - slope.T @ ac)
        return (total, gb), ga

    (total, gb), ga = jax.lax.scan(body, (jnp.zeros((), a.dtype), jnp.zeros_like(b)), (ap, valid))
    if not grads:
        return total
    ga = ga.reshape(-1, d)[:n]
    return total, ga, (ga if symmetric else gb)


def _mmd_parts(x, y, inv, squaring, chunk, grads):
    nx, ny = x.shape[0], y.shape[0]
    blocks = [_kernel_block(a, b, inv, squaring, chunk, grads, sym) for a, b, sym in ((x, x, True), (x, y, False),
                                                                                       (y, y, True))]
    if not grads:
        sxx, sxy, syy = blocks
        return sxx / nx**2 - 2.0 * sxy / (nx * ny) + syy / ny**2
    (sxx, gxx_a, gxx_b), (sxy, gxy_x, gxy_y), (syy, gyy_a, gyy_b) = blocks
    val = sxx / nx**2 - 2.0 * sxy / (nx * ny) + syy / ny**2
    gx = (gxx_a + gxx_b) / nx**2 - 2.0 * gxy_x / (nx * ny)
    gy = (gyy_a + gyy_b) / ny**2 - 2.0 * gxy_y / (nx * ny)
    return val, (gx, gy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _mmd(x, y, inv, squaring, chunk):
    return _mmd_parts(x, y, inv, squaring, chunk, grads=False)


def _mmd_fwd(x, y, inv, squaring, chunk):
    val, (gx, gy) = _mmd_parts(x, y, inv, squaring, chunk, grads=True)
    return val, (gx, gy, inv)


def _mmd_bwd(squaring, chunk, res, g):
    gx, gy, inv = res
    return g * gx, g * gy, jnp.zeros_like(inv)


_mmd.defvjp(_mmd_fwd, _mmd_bwd)


def mmd_rbf(x, y, n_kernels: int = 5, mul_factor: float = 2.0, bandwidth=None, chunk: int = 128):
    """Squared maximum mean discrepancy between two sets with a mixture of RBF kernels.

    ``k(a, b) = sum_m exp(-||a - b||^2 / (bw * mul_factor^(m - n_kernels // 2)))``,
    multipliers ``2^-2 .. 2^2`` by default, ``bw`` the mean squared pairwise distance
    over all distinct pairs of the pooled set (as stAI's released code; treated as a
    constant, no gradient flows through it). Returns the biased estimate
    ``mean K_xx - 2 mean K_xy + mean K_yy``, a scalar.

    Memory and speed: the bandwidth comes from the identity
    ``sum_ij ||z_i - z_j||^2 = 2 n sum_i ||z_i||^2 - 2 ||sum_i z_i||^2``, and each kernel
    block is a scan over ``chunk`` rows of the first set, so at most a
    ``[chunk, n]`` tile exists (no pooled ``(n_x + n_y)^2`` matrix). The gradient is
    computed analytically in the same pass (``custom_vjp``: ``dK/dd2`` times
    ``2 (a_i - b_j)``), so the backward pass neither stores nor recomputes the pairwise
    matrices. With ``mul_factor == 2`` the kernels are successive squares of the widest
    one: one exp per pair.
    """
    if bandwidth is None:
        z = jnp.concatenate([x, y], axis=0)
        n = z.shape[0]
        total = 2.0 * n * jnp.sum(z * z) - 2.0 * jnp.sum(jnp.square(jnp.sum(z, axis=0)))
        bandwidth = jnp.maximum(total, 0.0) / (n * n - n)
    bandwidth = jax.lax.stop_gradient(jnp.asarray(bandwidth, x.dtype))
    powers = jnp.arange(n_kernels - 1, -1, -1) - n_kernels // 2  # widest kernel first
    inv = 1.0 / (bandwidth * jnp.asarray(mul_factor, x.dtype) ** powers)
    return _mmd(x, y, inv, bool(mul_factor == 2.0), int(chunk))


def pearson_loss(pred, target, weights=None, eps: float = 1e-6):
    """``1 - mean over columns of Pearson's r(pred[:, j], target[:, j])``.

    The stAI imputation loss over the calibration genes; ``weights`` [n_columns] (0/1 or
    real) restricts or weights the mean over columns, so a gene subset can be a mask of
    static shape. Population moments throughout, so a perfect linear fit gives exactly 0
    (the released code divides a population covariance by sample standard deviations,
    which scales r by ``(n - 1) / n``).
    """
    pc = pred - jnp.mean(pred, axis=0)
    tc = target - jnp.mean(target, axis=0)
    cov = jnp.mean(pc * tc, axis=0)
    # max() keeps the gradient finite for a constant column (masked genes are zeros)
    sd = jnp.sqrt(jnp.maximum(jnp.mean(pc * pc, axis=0) * jnp.mean(tc * tc, axis=0), 1e-30))
    return 1.0 - weighted_mean(cov / (sd + eps), weights)


def cosine_consistence(a, b, eps: float = 1e-12):
    """``1 - cosine(a_i, b_i)`` per cell (rows), ``[n_cells]``: stAI's consistence loss
    between a cell's input and its reconstruction through the other dataset's decoder."""
    na = jnp.sqrt(jnp.maximum(jnp.sum(a * a, axis=-1), eps))
    nb = jnp.sqrt(jnp.maximum(jnp.sum(b * b, axis=-1), eps))
    return 1.0 - jnp.sum(a * b, axis=-1) / (na * nb)


# ----------------------------------------------------------------------------- count likelihoods
#
# Element-wise log-probabilities of counts (sum over genes in the caller, so that genes
# can be masked). Each comes in two parameterisations sharing one implementation: by the
# mean (``mu >= 0``, ``theta > 0``) and by its logarithm (``*_logits``: ``log_mu``,
# ``log_theta``), which a decoder with a log-softmax output provides without an extra
# ``log(exp(.))`` round trip. In log space ``log(mu / (theta + mu))`` and
# ``log(theta / (theta + mu))`` are both softplus of ``d = log mu - log theta``, with no
# cancellation for large counts or tiny dispersions; a count of zero contributes
# ``0 * log(mu) = 0`` even where ``mu = 0``, with finite gradients.


def _logaddexp(a, b):
    """``log(e^a + e^b)`` for finite ``a`` or ``b`` (one may be ``-inf``), without
    ``jnp.logaddexp``'s infinity handling, which doubles its cost in the likelihood."""
    return jnp.maximum(a, b) + jnp.log1p(jnp.exp(-jnp.abs(a - b)))


def _softplus(a):
    """``log(1 + e^a)``; ``a`` may be ``-inf``."""
    return _logaddexp(a, 0.0)


def _log_mean(mu):
    """``log(mu)``, ``-inf`` at ``mu = 0``, with a finite (zero) gradient there."""
    pos = mu > 0
    return jnp.where(pos, jnp.log(jnp.where(pos, mu, 1.0)), -jnp.inf)


def _log_factorial(x):
    # lgamma(1) is not exactly 0 in float32; log 0! = 0 is exact here
    return jnp.where(x > 0, jax.lax.lgamma(jnp.where(x > 0, x, 1.0) + 1.0), 0.0)


def poisson_log_prob_logits(x, log_mu):
    """``log Poisson(x; exp(log_mu))`` element-wise."""
    pos = x > 0
    return jnp.where(pos, x * jnp.where(pos, log_mu, 0.0), 0.0) - jnp.exp(log_mu) - _log_factorial(x)


def poisson_log_prob(x, mu):
    """``log Poisson(x; mu)`` element-wise (``mu >= 0``; ``mu = 0`` gives 0 at ``x = 0``)."""
    return poisson_log_prob_logits(x, _log_mean(mu))


def _stirling_remainder(t):
    # log Gamma(t) - [(t - 1/2) log t - t + log(2 pi) / 2], error below 1e-10 for t >= 9
    r = 1.0 / t
    r2 = r * r
    return r * (1.0 / 12.0 - r2 * (1.0 / 360.0 - r2 / 1260.0))


def _digamma_tail(t):
    # log t - digamma(t), error below 1e-10 for t >= 9
    r = 1.0 / t
    r2 = r * r
    return r * (0.5 + r * (1.0 / 12.0 - r2 * (1.0 / 120.0 - r2 / 252.0)))


_HALF_LOG_2PI = 0.5 * float(jnp.log(2.0 * jnp.pi))
_SMALL_COUNT = 9  # counts below this take the exact rising-factorial path


def _gamma_parts(a):
    """``(R, Phi)`` of the inverse dispersion: ``R = lgamma(a) - [(a - 1/2) log a - a +
    log(2 pi)/2]`` and ``Phi = digamma(a) - log a``, by the series for ``a >= 10`` and
    from ``lgamma``/``digamma`` below (once per gene when ``a`` is per gene)."""
    big = a >= 10.0
    a_s, a_l = jnp.where(big, 1.0, a), jnp.where(big, a, 10.0)
    log_s = jnp.log(a_s)
    r_small = jax.lax.lgamma(a_s) - ((a_s - 0.5) * log_s - a_s + _HALF_LOG_2PI)
    phi_small = jax.lax.digamma(a_s) - log_s
    return (jnp.where(big, _stirling_remainder(a_l), r_small),
            jnp.where(big, -_digamma_tail(a_l), phi_small))


def _log_binom_coef_and_slope(x, a):
    """``(log Gamma(x + a) - log Gamma(a) - log x!, digamma(x + a) - digamma(a))``.

    Counts below 9 (most entries of scRNA-seq data): the rising factorial ``prod_{i < x}
    (a + i) / (i + 1)``, scaled by ``c = max(a, 1)`` so that it neither overflows nor
    underflows, and its log-derivative ``sum 1/(a + i)`` from the product rule (one
    division). Counts from 9 on: Stirling's series for ``Gamma(x + a)`` and ``x!``,
    grouped so that nothing cancels, with ``a``'s own remainder exact
    (:func:`_gamma_parts`). Everything besides one ``log1p``, one ``log`` and a few
    divisions per entry is a multiply-add, several times cheaper than three ``lgamma``.
    """
    r_a, phi_a = _gamma_parts(a)
    c = jnp.maximum(a, 1.0)
    inv_c = 1.0 / c
    small = x < _SMALL_COUNT
    # rising factorial over i < x (x an integer count)
    xs = jnp.where(small, x, 0.0)
    q = jnp.ones(jnp.broadcast_shapes(jnp.shape(x), jnp.shape(a)), jnp.result_type(x, a))
    dq = jnp.zeros_like(q)
    for i in range(_SMALL_COUNT - 1):
        k = inv_c / (i + 1.0)
        f = (a + i) * k
        on = i < xs
        q, dq = jnp.where(on, q * f, q), jnp.where(on, dq * f + q * k, dq)
    v_small = xs * jnp.log(c) + jnp.log(q)
    d_small = dq / q
    # Stirling with b = x + 1 >= 10 and t = x + a: lgamma(t) - lgamma(a) - lgamma(b)
    # = (a - 1/2) log1p(x / a) + x log1p((a - 1) / b) - log(b) / 2 + 1 - log(2 pi) / 2
    #   + r(t) - R(a) - r(b)
    xl = jnp.where(small, _SMALL_COUNT, x)
    b = xl + 1.0
    t = xl + a
    l1 = jnp.log1p(xl / a)  # log(t / a)
    v_large = ((a - 0.5) * l1 + xl * jnp.log1p((a - 1.0) / b) - 0.5 * jnp.log(b) + (1.0 - _HALF_LOG_2PI)
               + _stirling_remainder(t) - r_a - _stirling_remainder(b))
    d_large = l1 - _digamma_tail(t) - phi_a  # digamma(t) - digamma(a)
    # a count that is not an integer has probability 0 (scipy's logpmf: -inf); the
    # rising factorial would otherwise give it a wrong finite value
    whole = x == jnp.floor(x)
    return (jnp.where(whole, jnp.where(small, v_small, v_large), -jnp.inf),
            jnp.where(whole, jnp.where(small, d_small, d_large), 0.0))


@jax.custom_jvp
def log_binom_coef(x, theta):
    """``log Gamma(x + theta) - log Gamma(theta) - log x!`` (the NB coefficient) for
    counts ``x`` (non-negative integers, in a float array) and ``theta > 0``, accurate in
    float32 everywhere and exactly 0 at ``x = 0``. A non-integer ``x`` gives ``-inf``
    (probability 0, as ``scipy.stats.nbinom.logpmf``), never a wrong finite value.

    Counts below 9 use the exact rising factorial, larger ones Stirling's series grouped
    without cancellation (:func:`_log_binom_coef_and_slope`). The plain three-lgamma form
    loses ~0.01 nats to cancellation in float32 for large counts or large ``theta`` and
    made the gimVI training step ~2x slower. The derivative in ``theta`` is the digamma
    difference, from the same products and logs.
    """
    return _log_binom_coef_and_slope(x, theta)[0]


def _log_binom_coef_jvp(primals, tangents):
    x, theta = primals
    x_dot, theta_dot = tangents
    value, slope = _log_binom_coef_and_slope(x, theta)
    out = jnp.zeros(jnp.broadcast_shapes(jnp.shape(x), jnp.shape(theta)), value.dtype)
    # counts are data: with symbolic zeros their derivative is not computed at every step
    if not isinstance(theta_dot, jax.custom_derivatives.SymbolicZero):
        out = out + slope * theta_dot
    if not isinstance(x_dot, jax.custom_derivatives.SymbolicZero):
        out = out + (jax.lax.digamma(x + theta) - jax.lax.digamma(x + 1.0)) * x_dot
    return value, out


log_binom_coef.defjvp(_log_binom_coef_jvp, symbolic_zeros=True)


def _nb_parts(x, log_mu, log_theta):
    """``(log NB(x), log NB(0))`` for log mean and log inverse dispersion."""
    d = log_mu - log_theta
    sp = _softplus(d)  # log1p(mu / theta)
    theta = jnp.exp(log_theta)
    nb0 = -theta * sp  # theta * log(theta / (theta + mu))
    pos = x > 0
    # x * log(mu / (theta + mu)) = -x * softplus(-d) = -x * (softplus(d) - d)
    count = jnp.where(pos, x * jnp.where(pos, d - sp, 0.0), 0.0)
    return nb0 + count + log_binom_coef(x, theta), nb0


def nb_log_prob_logits(x, log_mu, log_theta):
    """:func:`nb_log_prob` from ``log mu`` and ``log theta``."""
    return _nb_parts(x, log_mu, log_theta)[0]


def nb_log_prob(x, mu, theta):
    """``log NB(x; mean mu, inverse dispersion theta)`` element-wise.

    The parameterisation of scVI: variance ``mu + mu^2 / theta``; equal to
    ``scipy.stats.nbinom(n=theta, p=theta / (theta + mu)).logpmf(x)``. The coefficient
    is :func:`log_binom_coef`; the other terms are softplus of ``log mu - log theta``.
    """
    return nb_log_prob_logits(x, _log_mean(mu), jnp.log(theta))


def zinb_log_prob_logits(x, log_mu, log_theta, zi_logits):
    """:func:`zinb_log_prob` from ``log mu`` and ``log theta``."""
    # log(1 - pi) = -softplus(l); at x = 0, log(pi + (1 - pi) NB(0)) = logaddexp(l, log NB(0)) - softplus(l)
    nb, nb0 = _nb_parts(x, log_mu, log_theta)
    return jnp.where(x > 0, nb, _logaddexp(zi_logits, nb0)) - _softplus(zi_logits)


def zinb_log_prob(x, mu, theta, zi_logits):
    """Zero-inflated NB: with probability ``pi = sigmoid(zi_logits)`` a structural zero,
    otherwise ``NB(mu, theta)``; element-wise log-probability, computed in log space
    (``log pi = l - softplus(l)``, ``log(1 - pi) = -softplus(l)``)."""
    return zinb_log_prob_logits(x, _log_mean(mu), jnp.log(theta), zi_logits)

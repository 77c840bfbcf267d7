"""Dense building blocks shared by the methods.

All layers default to PyTorch's initialisation (``nn.Linear``: weights and biases
uniform in ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``) so that a jaxsel model starts from the
same distribution as the authors' PyTorch code. Batch norm follows PyTorch's defaults
(momentum 0.1, i.e. Flax ``momentum=0.9``; ``epsilon=1e-5``); Flax tracks the biased
batch variance in its running statistics where PyTorch tracks the unbiased one, a
difference of a factor ``n/(n-1)`` in the running variance only.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "torch_kernel_init",
    "torch_bias_init",
    "TorchDense",
    "Block",
    "masked_matmul",
    "MaskedDense",
    "hash_uniform",
    "hash_dropout",
    "seed_from_key",
]


def torch_kernel_init(key, shape, dtype=jnp.float32):
    """PyTorch ``nn.Linear`` weight init (Kaiming uniform, ``a=sqrt(5)``) for a [fan_in, fan_out] kernel."""
    bound = 1.0 / jnp.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_bias_init(fan_in: int) -> Callable:
    """PyTorch ``nn.Linear`` bias init: uniform in ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``."""

    def init(key, shape, dtype=jnp.float32):
        bound = 1.0 / jnp.sqrt(fan_in)
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class TorchDense(nn.Module):
    """``nn.Dense`` with PyTorch-parity initialisation."""

    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        kernel = self.param("kernel", torch_kernel_init, (fan_in, self.features))
        y = x @ kernel
        if self.use_bias:
            y = y + self.param("bias", torch_bias_init(fan_in), (self.features,))
        return y


class Block(nn.Module):
    """Linear -> (BatchNorm) -> LeakyReLU(0.01), the MarkerMap hidden block."""

    features: int
    batch_norm: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        # A bias right before batch norm is cancelled by the normalisation (its gradient
        # is exactly zero in exact arithmetic); leaving it out is the same function class
        # and stops Adam from amplifying rounding noise in that zero gradient.
        x = TorchDense(self.features, use_bias=not self.batch_norm)(x)
        if self.batch_norm:
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
        return nn.leaky_relu(x, 0.01)


@jax.custom_vjp
def masked_matmul(x, mask, kernel):
    """``(x * mask) @ kernel`` with a backward pass that shares one matmul.

    Parameters
    ----------
    x : [n_cells, n_genes] data (treated as a constant: its cotangent is returned but
        is dead code under ``jit`` when ``x`` is not differentiated).
    mask : [n_genes] soft or hard gene mask.
    kernel : [n_genes, n_hidden].

    Notes
    -----
    The naive backward needs ``x^T g`` for the kernel gradient and ``g kernel^T`` for the
    mask gradient, two matmuls of ``n_cells x n_genes x n_hidden``. Both follow from
    ``G = x^T g`` alone: ``d kernel = mask[:, None] * G`` and
    ``d mask_j = sum_c kernel_jc G_jc``. This is an exact algebraic rewrite.
    """
    return (x * mask) @ kernel


def _masked_matmul_fwd(x, mask, kernel):
    return (x * mask) @ kernel, (x, mask, kernel)


def _masked_matmul_bwd(res, g):
    x, mask, kernel = res
    gram = x.T @ g  # [n_genes, n_hidden]
    d_kernel = mask[:, None] * gram
    d_mask = jnp.sum(kernel * gram, axis=1)
    d_x = (g @ kernel.T) * mask
    return d_x, d_mask, d_kernel


masked_matmul.defvjp(_masked_matmul_fwd, _masked_matmul_bwd)


class MaskedDense(nn.Module):
    """First layer of a selector network: a dense layer on a gene-masked input.

    Called with a soft mask (training, ``[n_genes]``) it computes ``(x * mask) W + b``
    with :func:`masked_matmul`; called with marker indices (inference) it computes
    ``x[:, idx] W[idx] + b``, touching only the selected rows of ``W``. Both give the
    same value for a hard k-hot mask.
    """

    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x, mask=None, idx=None):
        n_genes = x.shape[-1]
        kernel = self.param("kernel", torch_kernel_init, (n_genes, self.features))
        bias = self.param("bias", torch_bias_init(n_genes), (self.features,)) if self.use_bias else 0.0
        if idx is not None:
            return jnp.take(x, idx, axis=1) @ jnp.take(kernel, idx, axis=0) + bias
        if mask is None:
            return x @ kernel + bias
        return masked_matmul(x, mask, kernel) + bias


# ----------------------------------------------------------------------------- counter-hash dropout
#
# ``jax.random`` on CPU hashes with threefry in a rolled loop: each call is a small XLA
# while loop, and a dropout mask costs ~6 ns per entry plus a ``fold_in`` for its key.
# In a minibatch step with a dozen small layers (gimVI: encoders, library encoder,
# adversary, each run twice) that was measured at a third of the step. Dropout masks only
# need independent-looking bits, so they are drawn from a stateless counter hash of a
# 32-bit seed instead (one fused elementwise pass); the seed itself comes from the step's
# typed key, so runs are as reproducible as with ``jax.random``.


def _mix32(x):
    # "lowbias32" integer finaliser (Wellons): full avalanche on 32-bit words
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def hash_uniform(seed, shape, salt: int = 0):
    """Uniform [0, 1) float32 array of ``shape`` from a uint32 ``seed`` and a static
    ``salt`` (distinct salts give independent streams for the same seed): the 24 top
    bits of a double hash of the element counter."""
    n = 1
    for d in shape:
        n *= int(d)
    counter = jax.lax.iota(jnp.uint32, n).reshape(shape)
    s = _mix32(jnp.asarray(seed, jnp.uint32) ^ jnp.uint32((salt * 0x9E3779B9) & 0xFFFFFFFF))
    bits = _mix32(_mix32(counter * jnp.uint32(0x9E3779B9) + s) ^ s)
    return (bits >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


def seed_from_key(key):
    """A uint32 seed for :func:`hash_uniform` drawn from a typed PRNG key."""
    return jax.random.bits(key, (), jnp.uint32)


def hash_dropout(x, rate: float, seed, salt: int = 0):
    """Inverted dropout of ``x`` with a :func:`hash_uniform` mask (``rate`` static)."""
    if rate <= 0.0:
        return x
    keep = hash_uniform(seed, x.shape, salt) >= rate
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def softmax(x, axis: int = -1, where=None):
    """``jax.nn.softmax`` normalised by a multiply with ``1 / sum`` instead of a divide.

    ``exp(x - max) / sum`` divides by a broadcast, which XLA rewrites into a reciprocal
    multiply in some programs and not others (a one-device fold program vs a device's
    slice of a sharded one); this form rounds the same everywhere, so a fold's result
    does not depend on the device count (see :mod:`jaxsel.engine.optim`). ``where``
    masks entries out (they get 0), as in ``jax.nn.softmax``.
    """
    m = jnp.max(x, axis=axis, keepdims=True, where=where, initial=-jnp.inf)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    u = jnp.exp(x - m)
    if where is not None:
        u = jnp.where(where, u, 0.0)
    return u * (1.0 / jnp.sum(u, axis=axis, keepdims=True))

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

"""Flax Linen building blocks and differentiable selectors."""

from .layers import (Block, MaskedDense, TorchDense, hash_dropout, hash_uniform, masked_matmul, seed_from_key,
                     softmax, torch_bias_init, torch_kernel_init)
from .selectors import concrete_weights, continuous_topk, gumbel_noise, hard_topk, khot

__all__ = [
    "Block",
    "MaskedDense",
    "TorchDense",
    "concrete_weights",
    "continuous_topk",
    "gumbel_noise",
    "hash_dropout",
    "hash_uniform",
    "hard_topk",
    "khot",
    "masked_matmul",
    "seed_from_key",
    "softmax",
    "torch_bias_init",
    "torch_kernel_init",
]

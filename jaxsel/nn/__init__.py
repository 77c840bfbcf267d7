"""Flax Linen building blocks and differentiable selectors."""

from .layers import Block, MaskedDense, TorchDense, masked_matmul, torch_bias_init, torch_kernel_init
from .selectors import concrete_weights, continuous_topk, gumbel_noise, hard_topk, khot

__all__ = [
    "Block",
    "MaskedDense",
    "TorchDense",
    "concrete_weights",
    "continuous_topk",
    "gumbel_noise",
    "hard_topk",
    "khot",
    "masked_matmul",
    "torch_bias_init",
    "torch_kernel_init",
]

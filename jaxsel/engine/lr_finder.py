"""Learning-rate range test (Smith 2017), as the MarkerMap paper uses it.

The paper picks each model's learning rate with PyTorch Lightning's ``LearningRateFinder``:
``n_steps`` optimiser steps from the initial parameters with a learning rate growing
exponentially from ``min_lr`` to ``max_lr``, an exponentially smoothed loss curve
(``beta = 0.98`` with bias correction), and the suggestion at the steepest descent of
that curve, skipping the first 10 and the last point. The parameters are then reset to
their initial values, and training starts with the suggested rate.

Here the whole test is traced: it runs inside the same compiled program as the fit that
follows, and is vmapped over folds like everything else.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax
from jax import lax

from .loop import gather, masked_permutation, steps_per_epoch

__all__ = ["LRFinder", "lr_range_test", "suggest_lr"]


@dataclasses.dataclass(frozen=True)
class LRFinder:
    """Static settings of the range test.

    Defaults are Lightning's (``mode="exponential"``, 100 steps). The MarkerMap paper's
    benchmark script runs ``mode="linear"`` over 500 steps; the estimators use that.
    """

    max_lr: float = 1e-3
    min_lr: float = 1e-8
    n_steps: int = 100
    mode: str = "exponential"
    smoothing: float = 0.98
    skip_begin: int = 10
    skip_end: int = 1

    def __post_init__(self):
        if self.mode not in ("exponential", "linear"):
            raise ValueError(f"mode must be 'exponential' or 'linear', got {self.mode!r}")
        if not (0 < self.min_lr < self.max_lr):
            raise ValueError(f"need 0 < min_lr < max_lr, got min_lr={self.min_lr}, max_lr={self.max_lr}")
        if self.n_steps <= self.skip_begin + self.skip_end + 2:
            raise ValueError(
                f"n_steps ({self.n_steps}) must exceed skip_begin + skip_end + 2 "
                f"({self.skip_begin + self.skip_end + 2})"
            )

    def rates(self):
        """[n_steps] learning rates tried, as Lightning's schedulers step them: step 0 at
        ``min_lr``, step ``i >= 1`` at ``r = (i + 1) / n_steps`` of the way to ``max_lr``,
        ``min_lr * (max_lr/min_lr) ** r`` (exponential) or
        ``min_lr + r * (max_lr - min_lr)`` (linear)."""
        i = jnp.arange(self.n_steps, dtype=jnp.float32)
        r = jnp.where(i > 0, i + 1.0, 0.0) / self.n_steps
        if self.mode == "linear":
            return self.min_lr + r * (self.max_lr - self.min_lr)
        return self.min_lr * (self.max_lr / self.min_lr) ** r


def suggest_lr(finder: LRFinder, lrs, losses):
    """Lightning's suggestion: steepest descent of the smoothed loss w.r.t. the rate.

    Two details of Lightning 2.x are reproduced because they decide the suggestion:
    the bias correction of step ``i`` (0-based) divides by ``1 - beta ** (i + 2)``
    (Lightning reads the global step *after* the optimiser step), which halves the first
    smoothed values so the curve starts low and rises; and the gradient is taken with
    respect to the learning rates (``torch.gradient(losses, spacing=[lrs])``).
    Without the first, noise in the first few losses often makes the steepest descent
    fall right after the skipped points. Non-finite points are never chosen.
    """
    beta = finder.smoothing

    def smooth(avg, xs):
        loss, i = xs
        avg = beta * avg + (1.0 - beta) * loss
        return avg, avg / (1.0 - beta ** (i + 2.0))

    _, smoothed = lax.scan(smooth, jnp.float32(0.0), (losses, jnp.arange(losses.shape[0], dtype=jnp.float32)))
    sl = slice(finder.skip_begin, finder.n_steps - finder.skip_end)
    curve, rates = smoothed[sl], lrs[sl]
    grad = jnp.gradient(curve, rates)
    grad = jnp.where(jnp.isfinite(grad), grad, jnp.inf)
    return rates[jnp.argmin(grad)], smoothed


def lr_range_test(method, loop, finder: LRFinder, key, data, split, params, model_state):
    """Run the range test from ``(params, model_state)``; returns ``(lr, lrs, smoothed_losses)``.

    Minibatches follow the same per-epoch permutation scheme as the fit, crossing epoch
    boundaries as Lightning's finder does; the schedule context is the first epoch's.
    """
    lrs = finder.rates()
    tx = method.optimizer(lambda count: lrs[jnp.minimum(count, finder.n_steps - 1)])
    n_steps = steps_per_epoch(loop, split.train_idx.shape[0])
    bs = loop.batch_size
    n_epochs = math.ceil(finder.n_steps / n_steps)
    k_perm, k_steps = jax.random.split(key)
    perms = jax.vmap(lambda k: masked_permutation(k, split.train_idx, split.n_train))(
        jax.random.split(k_perm, n_epochs)
    )
    batches = perms[:, : n_steps * bs].reshape(n_epochs * n_steps, bs)[: finder.n_steps]
    ctx = method.epoch_context(jnp.int32(0))
    grad_fn = jax.value_and_grad(method.train_loss, has_aux=True)

    def step(carry, xs):
        p, ms, os = carry
        idx, k = xs
        (loss, (ms, _)), grads = grad_fn(p, ms, gather(data, idx), k, ctx)
        updates, os = tx.update(grads, os, p)
        return (optax.apply_updates(p, updates), ms, os), loss

    _, losses = lax.scan(
        step,
        (params, model_state, tx.init(params)),
        (batches, jax.random.split(k_steps, finder.n_steps)),
    )
    lr, smoothed = suggest_lr(finder, lrs, losses)
    return lr, lrs, smoothed

"""Adam whose result does not depend on how XLA compiles the surrounding program.

``optax.adam`` divides each moment by its bias correction, ``m / (1 - b1**t)``: an array
divided by a broadcast scalar. XLA's simplifier turns some of those divides into a
multiply by the reciprocal and leaves others alone depending on the rest of the program;
the one-device fold program and a device's slice of a sharded one came out different,
so the same fold's parameters differed in the last bit across device counts (found in
the optimised HLO of MarkerMap's cross-validation: 22 divides at optax's line, present
in the sharded program, multiplies in the single-device one). Here the corrections are
the scalars ``1 / (1 - b**t)`` and the moments are multiplied by them, which XLA leaves
as it is: the same arithmetic in every program. Otherwise this is ``optax.adam``
(Kingma & Ba 2015; ``eps`` outside the square root, no ``eps_root``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["AdamState", "adam"]


class AdamState(NamedTuple):
    count: jax.Array  # steps taken, int32
    mu: Any  # first moments, like the parameters
    nu: Any  # second moments


def adam(
    learning_rate: float | Callable[[jax.Array], jax.Array],
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """Adam as ``optax.adam(learning_rate, b1, b2, eps)`` (a constant rate or a schedule
    of the step count), with the bias corrections applied as multiplications; see the
    module docstring for why."""

    def init(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
        return AdamState(jnp.zeros([], jnp.int32), zeros(), zeros())

    def update(grads, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: (1.0 - b1) * g + b1 * m, state.mu, grads)
        nu = jax.tree.map(lambda v, g: (1.0 - b2) * jnp.square(g) + b2 * v, state.nu, grads)
        count = state.count + 1
        t = count.astype(jnp.float32)
        c1 = 1.0 / (1.0 - b1**t)
        c2 = 1.0 / (1.0 - b2**t)
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        step = jax.tree.map(lambda m, v: (-lr) * ((m * c1.astype(m.dtype)) / (jnp.sqrt(v * c2.astype(v.dtype)) + eps)),
                            mu, nu)
        return step, AdamState(count, mu, nu)

    return optax.GradientTransformation(init, update)

"""Dense decompositions that are safe inside fold-parallel (vmapped) programs on CPU.

``jnp.linalg.eigh``/``svd`` on a *batch* of matrices lower, on CPU, to one LAPACK
custom call over the whole batch. In jaxlib 0.10.0 to 0.11.x that kernel splits the
batch over XLA's intra-op thread pool and then blocks a pool thread until the pieces are
done (``ParallelBatchMap`` in ``jaxlib/cpu/lapack_kernels.cc``). When the program runs
as many such calls at once as the pool has threads (two independent batched
decompositions on a 2-core machine is enough, e.g. the sRRR grams of a vmapped
cross-validation), every thread waits for work that no thread is free to run: the
process deadlocks at 0 % CPU. Later jaxlib releases compile that path out of open-source
builds; the newest jaxlib our package index serves is 0.10.2.

The functions here compute one matrix per LAPACK call: unbatched they are the
``jnp.linalg`` functions; under ``vmap`` on CPU the batch runs through ``lax.map``, so
every call sees a batch of one and LAPACK runs inline on the calling thread. On other
platforms (cuSOLVER and friends batch without a host thread pool) the batched call is
kept. A side effect worth having: on CPU a vmapped fold uses the very same kernel call
as the fold fitted alone, so the two agree bit for bit.

These functions do not support reverse-mode differentiation; use them for the
closed-form, non-differentiated parts of a method (sRRR's solver, the PCA baseline).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["eigh", "eigvalsh", "svd"]


def _one_at_a_time(fn):
    """``fn`` (arrays -> pytree of arrays, one matrix each); under ``vmap`` on CPU the
    batch is mapped sequentially, elsewhere batched as usual."""

    @jax.custom_batching.custom_vmap
    def wrapped(*args):
        return fn(*args)

    @wrapped.def_vmap
    def rule(axis_size, in_batched, *args):
        args = tuple(
            a if b else jnp.broadcast_to(a, (axis_size,) + jnp.shape(a)) for a, b in zip(args, in_batched)
        )
        # ``wrapped`` again, not ``fn``: an enclosing vmap then reaches this rule too
        one = lambda xs: wrapped(*xs)  # noqa: E731
        out = lax.platform_dependent(
            args, cpu=lambda xs: lax.map(one, xs), default=lambda xs: jax.vmap(fn)(*xs)
        )
        return out, jax.tree.map(lambda _: True, out)

    return wrapped


@functools.cache
def _eigh():
    return _one_at_a_time(lambda a: tuple(jnp.linalg.eigh(a)))


@functools.cache
def _eigvalsh():
    return _one_at_a_time(jnp.linalg.eigvalsh)


@functools.cache
def _svd(full_matrices: bool, compute_uv: bool):
    if compute_uv:
        return _one_at_a_time(lambda a: tuple(jnp.linalg.svd(a, full_matrices=full_matrices)))
    return _one_at_a_time(lambda a: jnp.linalg.svd(a, compute_uv=False))


def _check_matrix(a, name: str):
    if jnp.ndim(a) != 2:
        raise ValueError(f"{name} expects one matrix (2-D) per call, got shape {jnp.shape(a)}; vmap over batches")


def eigh(a):
    """``jnp.linalg.eigh`` of one symmetric matrix (lower triangle): ``(w, v)``,
    eigenvalues ascending. Safe under ``vmap`` on CPU (see the module docstring)."""
    _check_matrix(a, "eigh")
    return _eigh()(a)


def eigvalsh(a):
    """``jnp.linalg.eigvalsh`` of one symmetric matrix, ascending. Safe under ``vmap``."""
    _check_matrix(a, "eigvalsh")
    return _eigvalsh()(a)


def svd(a, full_matrices: bool = True, compute_uv: bool = True):
    """``jnp.linalg.svd`` of one matrix: ``(u, s, vt)``, or ``s`` with
    ``compute_uv=False``. Safe under ``vmap`` on CPU (see the module docstring)."""
    _check_matrix(a, "svd")
    return _svd(bool(full_matrices), bool(compute_uv))(a)

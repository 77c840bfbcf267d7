"""Fold-parallel execution: a leading fold axis over any per-fit function.

Folds, random restarts and hyperparameter settings are all the same thing to the engine:
a leading axis on the per-fit arguments. :func:`map_folds` runs ``fn`` over that axis

- ``vmap`` (default): all folds in one batched program;
- ``lax.map(..., batch_size=b)``: ``b`` folds at a time, the memory knob
  (``batch_size=1`` is a sequential loop inside one compiled program);
- ``jax.shard_map`` over a one-dimensional ``("folds",)`` mesh when more than one device
  is available: the fold axis is padded to a multiple of the device count (the padding
  repeats the last fold and is dropped from the output), each device runs its slice with
  the chosen inner mode, and shared arguments are replicated.

Per-fold PRNG keys are split on the host before this call, so results do not depend on
the number of devices. Results are returned as global (fully addressable on one
process) arrays; under a multi-process runtime they stay sharded along ``"folds"``.

Every fold-parallel entry point of the package (cross-validation folds, calibration
submodels, held-out gene folds, random restarts) resolves its mesh with
:func:`fold_mesh`, so :func:`use_devices` restricts or chooses the devices of all of
them at once (``with engine.use_devices(jax.devices()[:1]): ...`` runs on one device).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from .loop import FitResult, LoopConfig, Method, Splits, fit_one, is_multi, start

__all__ = ["map_folds", "fit_folds", "fold_mesh", "stack_trees", "fold_keys", "prepare_folds", "run_folds",
           "use_devices"]

_DEVICES: contextvars.ContextVar = contextvars.ContextVar("jaxsel_fold_devices", default=None)


@contextlib.contextmanager
def use_devices(devices):
    """Run the fold-parallel programs started inside this block on ``devices`` (a
    sequence of :class:`jax.Device`; one device means no mesh). Under a multi-process
    runtime (``jax.distributed.initialize``) pass the global device list
    (``jax.devices()``, the default), not ``jax.local_devices()``."""
    devices = list(devices)
    if not devices or not all(isinstance(d, jax.Device) for d in devices):
        raise TypeError(f"devices must be a non-empty sequence of jax.Device, got {devices!r}")
    token = _DEVICES.set(tuple(devices))
    try:
        yield
    finally:
        _DEVICES.reset(token)


def fold_mesh(devices: Sequence | None = None) -> Mesh | None:
    """A ``("folds",)`` mesh over ``devices`` (default: those of the enclosing
    :func:`use_devices` block, else all of ``jax.devices()``), or None for one device."""
    if devices is None:
        devices = _DEVICES.get() or jax.devices()
    devices = list(devices)
    if len(devices) <= 1:
        return None
    return Mesh(np.asarray(devices), ("folds",))


def fold_keys(key, n_folds: int):
    """Per-fold keys, split once so they do not depend on the device count."""
    return jax.random.split(key, n_folds)


def stack_trees(trees):
    """Stack a list of identically-structured pytrees along a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


def _leading(tree) -> int:
    sizes = {int(np.shape(a)[0]) for a in jax.tree.leaves(tree)}
    if len(sizes) != 1:
        raise ValueError(f"per-fold arguments disagree on the number of folds: {sorted(sizes)}")
    return sizes.pop()


def _inner(fn, shared, batch_size):
    def run(per_fold):
        one = lambda pf: fn(pf, shared)  # noqa: E731
        if batch_size is None:
            return jax.vmap(one)(per_fold)
        if batch_size == 1:
            # a plain loop: lax.map(batch_size=1) vmaps over batches of one, and the
            # leading axis of size 1 it adds sends XLA:CPU's column reductions (the
            # gradient of a per-gene parameter broadcast over cells) to a path measured
            # 30x slower
            return lax.map(one, per_fold)
        return lax.map(one, per_fold, batch_size=batch_size)

    return run


def map_folds(
    fn: Callable[[Any, Any], Any],
    per_fold,
    shared,
    *,
    batch_size: int | None = None,
    mesh: Mesh | None = None,
):
    """Apply ``fn(per_fold_slice, shared)`` over the leading axis of ``per_fold``.

    Traceable: call it inside ``jit``. See the module docstring for the modes.
    """
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    run = _inner(fn, shared, batch_size)
    if mesh is None:
        return run(per_fold)
    n = _leading(per_fold)
    n_dev = mesh.devices.size
    padded = -(-n // n_dev) * n_dev
    if padded != n:
        per_fold = jax.tree.map(
            lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], padded - n, axis=0)]), per_fold
        )
    sharded = jax.shard_map(
        lambda pf, sh: _inner(fn, sh, batch_size)(pf),
        mesh=mesh,
        in_specs=(P("folds"), P()),
        out_specs=P("folds"),
        check_vma=False,
    )
    out = sharded(per_fold, shared)
    return jax.tree.map(lambda a: a[:n], out)


def _fit_fold(per_fold, shared, *, loop: LoopConfig, method_batched: bool, mode: str = "fit"):
    """One fold: ``mode`` "fit" (a whole fit), "start" (its checkpoint before epoch 0)
    or "segment" (on from the fold's checkpoint, the last per-fold argument, up to the
    epoch in the last shared argument)."""
    if method_batched:
        key, split, method, *resume = per_fold
        data, *stop = shared
    else:
        key, split, *resume = per_fold
        method, data, *stop = shared
    if mode == "start":
        return start(method, loop, key, data, split)
    if mode == "segment":
        return fit_one(method, loop, key, data, split, resume=resume[0], stop_after=stop[0])
    return fit_one(method, loop, key, data, split)


def run_folds(method, loop, keys, data, splits, *, method_batched=False, batch_size=None, mesh=None, resume=None,
              stop_after=None, start_only=False):
    """Traceable body of :func:`fit_folds` (call inside ``jit`` with ``loop`` resolved by
    :func:`prepare_folds`); methods wrap it to post-process results in the same program.

    ``start_only`` returns the folds' :class:`~jaxsel.engine.Checkpoint` before epoch 0;
    ``resume`` (such per-fold checkpoints) with ``stop_after`` runs every fold on to that
    epoch and returns the :class:`FitResult` with its ``checkpoint`` (segments of a
    checkpointed fold-parallel fit, :func:`jaxsel.engine.fit_folds_checkpointed`)."""
    mode = "start" if start_only else ("segment" if resume is not None else "fit")
    fn = functools.partial(_fit_fold, loop=loop, method_batched=method_batched, mode=mode)
    per_fold = (keys, splits, method) if method_batched else (keys, splits)
    shared = (data,) if method_batched else (method, data)
    if mode == "segment":
        per_fold, shared = (*per_fold, resume), (*shared, stop_after)
    return map_folds(fn, per_fold, shared, batch_size=batch_size, mesh=mesh)


_fit_folds_jit = jax.jit(run_folds, static_argnames=("loop", "batch_size", "mesh", "method_batched"))


def prepare_folds(loop: LoopConfig, keys, splits: Splits, mesh="auto"):
    """Host-side checks and static settings for a fold-parallel fit: ``(loop, mesh)``.

    Sets ``loop.steps_per_epoch`` from the smallest fold when unset (every fold then runs
    the same steps), resolves ``mesh="auto"`` and checks one key per fold.
    """
    if mesh == "auto":
        mesh = fold_mesh()
    per_dataset = tuple(splits) if is_multi(splits) else (splits,)
    if loop.steps_per_epoch is None:
        min_train = [int(np.min(np.asarray(sp.n_train))) for sp in per_dataset]
        if min(min_train) < loop.batch_size:
            raise ValueError(
                f"batch_size ({loop.batch_size}) is larger than the smallest fold's training set "
                f"({min(min_train)} cells); lower batch_size"
            )
        # several datasets: the epoch is defined by the largest, the others cycle
        loop = dataclasses.replace(loop, steps_per_epoch=max(min_train) // loop.batch_size)
    n = per_dataset[0].n_folds
    if any(sp.n_folds != n for sp in per_dataset):
        raise ValueError(f"every dataset's splits need the same number of folds, got {[sp.n_folds for sp in per_dataset]}")
    if jax.random.key_data(keys).shape[0] != n:
        raise ValueError(f"keys must have one key per fold ({n}), got shape {keys.shape}")
    return loop, mesh


def fit_folds(
    method: Method,
    loop: LoopConfig,
    keys,
    data,
    splits: Splits,
    *,
    method_batched: bool = False,
    batch_size: int | None = None,
    mesh: Mesh | None | str = "auto",
    lower: bool = False,
) -> FitResult:
    """Fit every fold of ``splits`` in one compiled program.

    Parameters
    ----------
    method : a Method pytree shared by all folds, or (``method_batched=True``) one whose
        leaves carry a leading fold axis (hyperparameter grids; see :func:`stack_trees`).
    loop : static loop settings. ``steps_per_epoch`` defaults to the smallest fold's
        ``n_train // batch_size`` so every fold runs the same number of steps.
    keys : [n_folds] typed PRNG keys (:func:`fold_keys`).
    data : pytree of device arrays with a leading cell axis (shared, replicated).
    splits : :class:`Splits` with a leading fold axis.
    batch_size : ``None`` vmaps all folds; an int runs ``lax.map`` with that many folds
        at a time (less memory).
    mesh : ``"auto"`` shards over all devices when there are several, ``None`` forces one
        device, or an explicit ``("folds",)`` :class:`~jax.sharding.Mesh`.
    lower : return the lowered program (``jax.stages.Lowered``: ``.compile()`` it to time
        compilation separately, then call the result with ``(method, keys, data,
        splits)``) instead of running it.

    Returns
    -------
    :class:`FitResult` whose leaves have a leading [n_folds] axis.
    """
    loop, mesh = prepare_folds(loop, keys, splits, mesh)
    args = (method, loop, keys, data, splits)
    kw = dict(method_batched=method_batched, batch_size=batch_size, mesh=mesh)
    return _fit_folds_jit.lower(*args, **kw) if lower else _fit_folds_jit(*args, **kw)

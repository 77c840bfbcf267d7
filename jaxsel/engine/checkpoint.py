"""Checkpoint files: a long fit that stops (a crash, a time limit) goes on where it was.

:func:`run_checkpointed` runs a fit in segments of ``every`` epochs, one compiled
program for all of them (:func:`jaxsel.engine.fit_one` with ``resume`` and
``stop_after``), and writes the :class:`~jaxsel.engine.Checkpoint` after each segment
to one ``.npz`` file (atomically: a crash while writing leaves the previous one). Run
again with the same path, settings and data, it reads the file and continues; the
result is bit for bit the one an uninterrupted fit gives. A file written for other
settings or data, or by another jaxsel version, is an error rather than a silent restart.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import jax
import numpy as np

from .folds import prepare_folds, run_folds
from .loop import Checkpoint, LoopConfig, checkpoint_done, fit_one, start

__all__ = ["check_checkpoint_args", "fingerprint", "fit_checkpointed", "fit_folds_checkpointed", "read_checkpoint", "run_checkpointed",
           "write_checkpoint"]

_FORMAT = "jaxsel.checkpoint/1"


def fingerprint(*items) -> str:
    """A digest of JSON-able settings and arrays (their bytes, dtypes and shapes): what a
    checkpoint must match to be resumed."""
    h = hashlib.sha256()

    def feed(item):
        if isinstance(item, (np.ndarray, jax.Array)):
            a = np.ascontiguousarray(np.asarray(item))
            h.update(f"{a.dtype.str}{a.shape}".encode())
            if a.dtype == object:  # by its elements: the bytes of an object array are addresses
                for v in a.ravel():
                    feed(v)
            else:
                h.update(a.tobytes())
        else:
            h.update(json.dumps(item, sort_keys=True, default=str).encode())

    for item in jax.tree.leaves(items):
        feed(item)
    return h.hexdigest()


def write_checkpoint(path, checkpoint: Checkpoint, key: str) -> None:
    """Write ``checkpoint`` (its leaves, in order) and the ``key`` it is valid for."""
    path = Path(path)
    leaves = jax.tree.leaves(jax.device_get(checkpoint))
    arrays = {f"leaf{i}": np.asarray(a) for i, a in enumerate(leaves)}
    from .._persist import _version

    meta = {"format": _FORMAT, "jaxsel_version": _version(), "key": key, "n_leaves": len(leaves)}
    arrays["__header__"] = np.array(json.dumps(meta))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)


def read_checkpoint(path, template, key: str) -> Checkpoint | None:
    """The checkpoint at ``path`` (``None`` when there is no file), checked against
    ``template`` (``jax.eval_shape`` of :func:`jaxsel.engine.start`) and ``key``."""
    path = Path(path)
    if not path.exists():
        return None
    from .._persist import read_npz

    meta, arrays = read_npz(path, _FORMAT, "checkpoint", "finish the fit with the version that started it, or "
                            "delete the file to start again.")
    if meta.get("key") != key:
        raise ValueError(f"checkpoint {path} belongs to a fit with other settings or other data; delete it to "
                         "start again, or pass another checkpoint path.")
    leaves, treedef = jax.tree.flatten(template)
    if meta.get("n_leaves") != len(leaves):
        raise ValueError(f"checkpoint {path} does not match this model's structure.")
    out = []
    for i, t in enumerate(leaves):
        a = arrays.get(f"leaf{i}")
        if a is None or a.shape != t.shape or a.dtype != t.dtype:
            raise ValueError(f"checkpoint {path}: entry {i} is missing or has the wrong shape or dtype.")
        out.append(a)
    return jax.tree.unflatten(treedef, out)


def check_checkpoint_args(path, every) -> int:
    """``every`` as an int, after a ``TypeError`` for a ``path`` that is not a file path,
    a ``ValueError`` for a folder and a ``FileNotFoundError`` for a file in a folder that
    does not exist (before any work, not at the first write), and the usual checks of
    ``checkpoint_every`` (an int, at least 1)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a file path (str or os.PathLike), got {path!r}.")
    if Path(path).is_dir():
        raise ValueError(f"checkpoint must be a file path, got the folder {str(path)!r}; pass e.g. "
                         f"{str(Path(path) / 'fit.npz')!r}.")
    if not Path(path).absolute().parent.is_dir():
        raise FileNotFoundError(f"checkpoint {str(path)!r}: the folder {str(Path(path).absolute().parent)!r} does "
                                "not exist; create it first.")
    from .._validation import check_int

    return check_int(every, "checkpoint_every", 1)


def tagged_path(path, tag: str) -> Path:
    """The file of one part of a fit checkpointed part by part (a stage, a fold): ``tag``
    before the suffix of ``path`` (``fit.npz`` -> ``fit.fold0.npz``)."""
    p = Path(path)
    return p.with_name(f"{p.stem}.{tag}{p.suffix}")


def run_checkpointed(start_fn, segment_fn, path, every: int, key: str, *, max_epochs: int, done=None):
    """Run a fit in segments of ``every`` epochs, checkpointing to ``path`` after each.

    ``start_fn()`` returns the initial checkpoint (a pytree with the next epoch in
    ``.epoch``, a scalar or one per model); ``segment_fn(checkpoint, stop_after)`` runs
    up to epoch ``stop_after`` and returns ``(result, checkpoint)``. ``done(checkpoint)``
    says whether the fit has ended (default: every model reached ``max_epochs``; the
    engine's loop also ends at early stopping, :func:`checkpoint_done`). Returns the last
    segment's result.
    """
    every = check_checkpoint_args(path, every)

    def epoch_of(ck) -> int:
        return int(np.max(np.asarray(ck.epoch)))

    done = done or (lambda ck: epoch_of(ck) >= max_epochs)
    template = jax.eval_shape(start_fn)
    ck = read_checkpoint(path, template, key)
    if ck is None:
        ck = start_fn()
    res = None
    while res is None or not done(ck):
        res, ck = segment_fn(ck, np.int32(min(epoch_of(ck) + every, max_epochs)))
        write_checkpoint(path, ck, key)
    return res


_start = jax.jit(start, static_argnames=("loop",))


@functools.partial(jax.jit, static_argnames=("loop",))
def _segment(method, loop, key, data, split, checkpoint, stop_after):
    fr = fit_one(method, loop, key, data, split, resume=checkpoint, stop_after=stop_after)
    return fr._replace(checkpoint=None), fr.checkpoint


def fit_checkpointed(method, loop: LoopConfig, key, data, split, *, path, every: int, fingerprint: str):
    """:func:`jaxsel.engine.fit` in segments of ``every`` epochs, checkpointed to
    ``path`` (see :func:`run_checkpointed`). Returns the :class:`FitResult`."""
    return run_checkpointed(
        lambda: _start(method, loop, key, data, split),
        lambda ck, stop_after: _segment(method, loop, key, data, split, ck, stop_after),
        path, every, fingerprint, max_epochs=loop.max_epochs, done=lambda ck: bool(checkpoint_done(loop, ck)),
    )


_STATIC = ("loop", "batch_size", "mesh", "method_batched")
_start_folds = jax.jit(functools.partial(run_folds, start_only=True), static_argnames=_STATIC)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _segment_folds(method, loop, keys, data, splits, checkpoint, stop_after, *, method_batched, batch_size, mesh):
    fr = run_folds(method, loop, keys, data, splits, method_batched=method_batched, batch_size=batch_size,
                   mesh=mesh, resume=checkpoint, stop_after=stop_after)
    return fr._replace(checkpoint=None), fr.checkpoint


def fit_folds_checkpointed(method, loop: LoopConfig, keys, data, splits, *, path, every: int, fingerprint: str,
                           method_batched: bool = False, batch_size: int | None = None, mesh="auto"):
    """:func:`jaxsel.engine.fit_folds` in segments of ``every`` epochs, every fold's
    :class:`~jaxsel.engine.Checkpoint` (a leading fold axis) written to ``path`` after
    each (see :func:`run_checkpointed`). A fold that stopped early stays stopped; the
    fit ends when every fold has. Per-fold results are those of
    :func:`~jaxsel.engine.fit_folds` with the same ``batch_size`` and ``mesh``."""
    loop, mesh = prepare_folds(loop, keys, splits, mesh)
    kw = dict(method_batched=method_batched, batch_size=batch_size, mesh=mesh)
    return run_checkpointed(
        lambda: _start_folds(method, loop, keys, data, splits, **kw),
        lambda ck, stop_after: _segment_folds(method, loop, keys, data, splits, ck, stop_after, **kw),
        path, every, fingerprint, max_epochs=loop.max_epochs,
        done=lambda ck: bool(np.all(np.asarray(checkpoint_done(loop, ck)))),
    )

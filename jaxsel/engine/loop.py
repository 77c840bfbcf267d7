"""One whole fit, epochs x minibatches, as a single traced program.

A *method* is a frozen dataclass registered as a pytree (structural fields static,
continuous hyperparameters as leaves) that implements the :class:`Method` protocol. The
engine knows nothing else about it. :func:`fit_one` runs

- an outer loop over epochs; each epoch draws a fresh permutation of the training
  cells, gathers minibatches by index from device-resident data, runs an inner
  ``lax.scan`` of optimiser steps, then evaluates the validation cells;
- masked early stopping inside the loop (minimum epochs, patience, best-validation
  parameters kept with ``jnp.where``);
- per-epoch metrics written into a ``[max_epochs]`` history (NaN after stopping).

The outer loop is a ``lax.while_loop`` that ends when the fit has stopped: a scan with
an early exit. A scan with ``lax.cond`` skips stopped epochs only for a fit run alone;
under ``vmap`` the cond becomes a select and every fold would compute all
``max_epochs`` epochs (measured: 10 folds took 4x the time of 10 looped fits). The
batched while loop runs until the *last* fold stops, and a stopped fold's state is
frozen by the loop's per-fold select.

Fits of different folds have different numbers of training and validation cells; the
index tables are padded to a common length and the true lengths passed alongside, so
that all folds share one shape and one compiled program (see :class:`Splits`).

A method trained on several datasets at once (gimVI: scRNA-seq and spatial cells) passes
a tuple of datasets as ``data`` and a tuple of :class:`Splits`, one per dataset. Each
step then takes one minibatch of ``batch_size`` cells from every dataset (a tuple, as is
the validation batch); an epoch is as many steps as the largest dataset fills, and the
smaller datasets cycle through their epoch permutation (as scvi-tools' ``TrainDL``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

__all__ = [
    "LoopConfig",
    "Method",
    "Splits",
    "FitResult",
    "make_splits",
    "fit_one",
    "masked_permutation",
    "gather",
    "is_multi",
    "valid_mean",
    "chunked",
    "fit",
]

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Static settings of the training loop (hashable; changing one recompiles).

    Parameters
    ----------
    max_epochs : number of epochs the scan runs (the history length).
    batch_size : cells per optimiser step. The last incomplete batch of an epoch is
        dropped; a fresh permutation each epoch means every cell is still seen.
    min_epochs : early stopping cannot stop before this many epochs, and the returned
        best-validation parameters are chosen among epochs ``>= min_epochs - 1`` (the
        epochs at which the fit may end). Patience itself counts from epoch 0, as in
        Lightning.
    patience : epochs without a strict improvement of the validation loss before
        stopping; ``None`` disables early stopping (all ``max_epochs`` run, the final
        parameters are returned).
    steps_per_epoch : optimiser steps per epoch; ``None`` means
        ``n_train // batch_size`` of the padded index table. Fold-parallel fits set it
        from the smallest fold so every fold takes the same number of steps.
    progress : a label to print a progress line under (epoch, losses, time) from inside
        the compiled loop (:mod:`jaxsel.engine.progress`); ``None`` prints nothing.
    """

    max_epochs: int = 100
    batch_size: int = 64
    min_epochs: int = 25
    patience: int | None = 3
    steps_per_epoch: int | None = None
    lr_finder: "LRFinder | None" = None
    progress: str | None = None

    def __post_init__(self):
        for name in ("max_epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.min_epochs, (int, np.integer)) or self.min_epochs < 0:
            raise ValueError(f"min_epochs must be a non-negative integer, got {self.min_epochs!r}")
        if self.min_epochs > self.max_epochs:
            raise ValueError(
                f"min_epochs ({self.min_epochs}) must not exceed max_epochs ({self.max_epochs})"
            )
        if self.patience is not None and (not isinstance(self.patience, (int, np.integer)) or self.patience < 1):
            raise ValueError(f"patience must be a positive integer or None, got {self.patience!r}")


class Method(Protocol):
    """What a method supplies to the engine (all pure functions of arrays)."""

    learning_rate: Any

    def init(self, key, data) -> tuple[PyTree, PyTree]:
        """Initial ``(params, model_state)``; ``model_state`` holds e.g. BatchNorm stats."""

    def optimizer(self, learning_rate) -> optax.GradientTransformation:
        """Optimiser for a scalar or a schedule (a function of the step count)."""

    def epoch_context(self, epoch) -> PyTree:
        """Per-epoch schedule values (a dict), e.g. the Gumbel temperature. The key
        ``"lr_scale"``, when present, multiplies that epoch's optimiser updates (a
        per-epoch learning-rate schedule on top of the optimiser's own)."""

    def train_loss(self, params, model_state, batch, key, ctx):
        """``loss, (new_model_state, metrics)`` on one minibatch in training mode."""

    def eval_loss(self, params, model_state, batch, weights, ctx):
        """``loss, metrics`` on weighted cells in inference mode."""

    # Optional: a method whose minibatch update is more than one gradient step (the
    # alternating adversarial update of gimVI) defines
    #     train_step(params, model_state, opt_state, tx, batch, key, ctx)
    #         -> (params, model_state, opt_state, loss, metrics)
    # and the engine calls it instead of one ``value_and_grad`` of ``train_loss`` +
    # ``tx.update`` (such a method needs no ``train_loss``); it then applies
    # ``ctx["lr_scale"]`` itself when it uses one.


class Splits(NamedTuple):
    """Padded cell-index tables for one or many folds.

    ``train_idx`` : int32 [n_folds, n_train_max] (or [n_train_max] for one fit),
    ``n_train`` : int32 [n_folds], the true lengths; entries past them are padding.
    ``val_idx``, ``n_val`` : the same for the validation cells.
    """

    train_idx: jax.Array
    n_train: jax.Array
    val_idx: jax.Array
    n_val: jax.Array

    @property
    def n_folds(self) -> int:
        return int(self.train_idx.shape[0])

    def fold(self, i: int) -> "Splits":
        """The ``i``-th fold as a single-fit split (same padded shapes)."""
        return Splits(*(a[i] for a in self))


class FitResult(NamedTuple):
    """Output of a fit: best-validation (or final) parameters and the epoch history.

    ``history`` maps metric names to [max_epochs] arrays (leading fold axis when
    fold-parallel); epochs after stopping hold NaN. ``n_epochs`` is the number of epochs
    actually run, ``best_epoch`` the (0-based) epoch whose parameters are returned,
    ``learning_rate`` the rate used (found by the range test when one was asked for).
    """

    params: PyTree
    model_state: PyTree
    history: dict
    best_epoch: jax.Array
    n_epochs: jax.Array
    best_val: jax.Array
    learning_rate: jax.Array
    checkpoint: Any = None


def _pad(rows, fill=0):
    width = max(1, max(len(r) for r in rows))
    out = np.full((len(rows), width), fill, dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = np.asarray(r, dtype=np.int32)
    return out


def make_splits(train_sets, val_sets) -> Splits:
    """Build padded :class:`Splits` from lists of per-fold index arrays (host side)."""
    if len(train_sets) != len(val_sets) or len(train_sets) == 0:
        raise ValueError("train_sets and val_sets must be non-empty lists of equal length")
    if any(len(t) == 0 for t in train_sets):
        raise ValueError("every fold needs at least one training cell")
    if any(len(v) == 0 for v in val_sets):
        raise ValueError("every fold needs at least one validation cell")
    return Splits(
        jnp.asarray(_pad(train_sets)),
        jnp.asarray([len(t) for t in train_sets], jnp.int32),
        jnp.asarray(_pad(val_sets)),
        jnp.asarray([len(v) for v in val_sets], jnp.int32),
    )


def masked_permutation(key, idx, n_valid):
    """Random permutation of the first ``n_valid`` entries of ``idx``; padding last."""
    u = jax.random.uniform(key, idx.shape)
    u = jnp.where(jnp.arange(idx.shape[0]) < n_valid, u, 2.0)
    return idx[jnp.argsort(u)]


def gather(data, idx):
    """Rows ``idx`` of every array in the data pytree."""
    return jax.tree.map(lambda a: jnp.take(a, idx, axis=0), data)


def is_multi(split) -> bool:
    """Whether ``split`` is a tuple of :class:`Splits`, one per dataset."""
    return isinstance(split, (tuple, list)) and not isinstance(split, Splits)


def _gather(data, idx, multi: bool):
    if multi:
        return tuple(gather(d, i) for d, i in zip(data, idx))
    return gather(data, idx)


def _val_weights(split: Splits):
    return (jnp.arange(split.val_idx.shape[0]) < split.n_val).astype(jnp.float32)


def _epoch_batches(key, split, n_steps: int, bs: int, multi: bool):
    """``[n_steps, bs]`` index table(s) of one epoch: a fresh permutation of the training
    cells (per dataset; a dataset with fewer cells than the epoch needs cycles)."""
    if not multi:
        perm = masked_permutation(key, split.train_idx, split.n_train)
        return perm[: n_steps * bs].reshape(n_steps, bs)
    out = []
    for k, sp in zip(jax.random.split(key, len(split)), split):
        perm = masked_permutation(k, sp.train_idx, sp.n_train)
        pos = jnp.arange(n_steps * bs) % jnp.maximum(sp.n_train, 1)
        out.append(perm[pos].reshape(n_steps, bs))
    return tuple(out)


def valid_mean(rows, n_valid):
    """Mean over the first ``n_valid`` rows of ``rows`` (rows gathered with a padded
    index table of :class:`Splits`; the padding rows are ignored)."""
    w = (jnp.arange(rows.shape[0]) < n_valid).astype(rows.dtype)
    # times the reciprocal rather than divided: see ``srrr._problem`` (XLA's rewrite of
    # ``a / broadcast(b)`` is program-dependent, a multiply is left alone)
    return jnp.tensordot(w, rows, axes=1) * (1.0 / jnp.maximum(n_valid, 1).astype(rows.dtype))


def chunked(fn, x, chunk: int):
    """``fn`` over row chunks of ``x`` of one fixed size (the last one padded), so that
    inputs of any length reuse one compiled program per chunk size instead of one per
    length. Host-side loop for inference; ``fn`` maps [chunk, ...] to a pytree of
    [chunk, ...] arrays."""
    n = x.shape[0]
    if n == 0:
        raise ValueError("x has no cells")
    size = min(chunk, n)
    outs = []
    for i in range(0, n, size):
        part = x[i : i + size]
        rows = part.shape[0]
        if rows < size:
            part = jnp.concatenate([part, jnp.zeros((size - rows, *part.shape[1:]), part.dtype)])
        outs.append(jax.tree.map(lambda a: a[:rows], fn(part)))
    return jax.tree.map(lambda *a: jnp.concatenate(a), *outs)


def chunk_map(fn, x, chunk: int):
    """Traceable counterpart of :func:`chunked`: ``fn`` over row chunks of ``x`` with
    ``lax.map`` (the last chunk zero-padded), so inside a compiled program only one
    chunk's intermediates are live at a time. ``fn`` maps [chunk, ...] to a pytree of
    [chunk, ...] arrays."""
    n = x.shape[0]
    size = max(1, min(int(chunk), n))
    pad = (-n) % size
    xp = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
    out = jax.lax.map(fn, xp.reshape(-1, size, *x.shape[1:]))
    return jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:])[:n], out)


class _State(NamedTuple):
    params: PyTree
    model_state: PyTree
    opt_state: PyTree
    best_params: PyTree
    best_model_state: PyTree
    best_val: jax.Array
    best_epoch: jax.Array
    patience_val: jax.Array
    bad_epochs: jax.Array
    stopped: jax.Array
    n_epochs: jax.Array


def steps_per_epoch(loop: LoopConfig, n_train_max: int) -> int:
    steps = loop.steps_per_epoch or n_train_max // loop.batch_size
    if steps < 1:
        raise ValueError(
            f"batch_size ({loop.batch_size}) is larger than the number of training cells "
            f"({n_train_max}); lower batch_size"
        )
    return steps


class Checkpoint(NamedTuple):
    """Everything a fit needs to go on exactly where it stopped: the loop state
    (parameters, BatchNorm statistics, optimiser state, best-so-far and patience), the
    history so far, the next epoch to run and the learning rate. Per-epoch randomness is
    ``fold_in(key, epoch)``, so a fit resumed from a checkpoint with the same key runs
    the same epochs, bit for bit, as one that never stopped."""

    state: Any
    history: dict
    epoch: jax.Array
    learning_rate: jax.Array


def _epoch_fn(method: Method, loop: LoopConfig, k_loop, data, split, tx):
    """``run_epoch(state, epoch) -> (state, metrics)`` of one in-memory fit."""
    multi = is_multi(split)
    splits = tuple(split) if multi else (split,)
    n_steps = steps_per_epoch(loop, max(sp.train_idx.shape[0] for sp in splits))
    bs = loop.batch_size
    if multi:
        val_batch = tuple(gather(d, sp.val_idx) for d, sp in zip(data, splits))
        val_w = tuple(_val_weights(sp) for sp in splits)
    else:
        val_batch, val_w = gather(data, split.val_idx), _val_weights(split)
    train_step = make_train_step(method, tx)

    def run_epoch(state: _State, epoch):
        k_epoch = jax.random.fold_in(k_loop, epoch)
        k_perm, k_steps = jax.random.split(k_epoch)
        batches = _epoch_batches(k_perm, split, n_steps, bs, multi)
        ctx = method.epoch_context(epoch)

        def step(carry, xs):
            p, ms, os = carry
            idx, k = xs
            batch = _gather(data, idx, multi)
            p, ms, os, loss, aux = train_step(p, ms, os, batch, k, ctx)
            return (p, ms, os), (loss, aux)

        (p, ms, os), (losses, aux) = lax.scan(
            step,
            (state.params, state.model_state, state.opt_state),
            (batches, jax.random.split(k_steps, n_steps)),
        )
        val, val_metrics = method.eval_loss(p, ms, val_batch, val_w, ctx)
        metrics = {"train_loss": jnp.mean(losses), "val_loss": val}
        metrics.update({f"train_{k}": jnp.mean(v) for k, v in aux.items()})
        new = epoch_update(loop, state, p, ms, os, val, epoch, finite=train_finite(metrics))
        metrics.update({f"val_{k}": v for k, v in val_metrics.items()})
        return new, metrics

    return run_epoch


def start(method: Method, loop: LoopConfig, key, data, split: Splits, params=None) -> Checkpoint:
    """The :class:`Checkpoint` before epoch 0: initial parameters (``method.init``, or
    ``params = (params, model_state)``), the learning rate (after the range test when
    ``loop.lr_finder`` asks for one) and an empty history. Traceable."""
    k_init, k_loop, k_lr = jax.random.split(key, 3)
    if params is None:
        params, model_state = method.init(k_init, data)
    else:
        params, model_state = params
    learning_rate = jnp.asarray(method.learning_rate, jnp.float32)
    if loop.lr_finder is not None:
        if is_multi(split):
            raise ValueError("the learning-rate range test supports single-dataset fits only")
        from .lr_finder import lr_range_test

        learning_rate, _, _ = lr_range_test(method, loop, loop.lr_finder, k_lr, data, split, params, model_state)
    tx = method.optimizer(learning_rate)
    init = init_state(params, model_state, tx)
    _, shapes = jax.eval_shape(_epoch_fn(method, loop, k_loop, data, split, tx), init, jnp.int32(0))
    history = jax.tree.map(lambda m: jnp.full((loop.max_epochs, *m.shape), jnp.nan, m.dtype), shapes)
    return Checkpoint(init, history, jnp.int32(0), learning_rate)


def checkpoint_done(loop: LoopConfig, checkpoint: Checkpoint):
    """Whether the fit of ``checkpoint`` has ended (all epochs run, or stopped early)."""
    return (checkpoint.epoch >= loop.max_epochs) | checkpoint.state.stopped


def fit_one(method: Method, loop: LoopConfig, key, data, split: Splits, params=None, *, resume=None,
            stop_after=None) -> FitResult:
    """Fit one model; traceable (wrap in ``jit``, ``vmap`` over folds).

    Parameters
    ----------
    method : a :class:`Method` pytree.
    loop : static :class:`LoopConfig`.
    key : typed PRNG key for this fit (initialisation, permutations, noise).
    data : pytree of arrays with a leading cell axis, shared by all folds (or a tuple of
        such pytrees, one per dataset, with ``split`` a matching tuple).
    split : single-fit :class:`Splits` (no fold axis), or a tuple of them.
    params : optional ``(params, model_state)`` to start from instead of ``method.init``.
    resume : a :class:`Checkpoint` to go on from (:func:`start`, or the ``checkpoint`` of
        an earlier result) instead of starting afresh; ``key`` must be the same.
    stop_after : run no further than this epoch count (an int or int32 array: one
        compiled program serves every segment) and return the :class:`Checkpoint` in the
        result's ``checkpoint`` field (also returned when ``resume`` is given).
    """
    k_loop = jax.random.split(key, 3)[1]
    with_checkpoint = resume is not None or stop_after is not None
    if resume is None:
        resume = start(method, loop, key, data, split, params)
    learning_rate = resume.learning_rate
    tx = method.optimizer(learning_rate)
    run_epoch = _epoch_fn(method, loop, k_loop, data, split, tx)
    end = loop.max_epochs if stop_after is None else jnp.minimum(loop.max_epochs, stop_after)

    def epoch_body(carry):
        state, history, epoch = carry
        state, metrics = run_epoch(state, epoch)
        history = jax.tree.map(lambda h, m: h.at[epoch].set(m), history, metrics)
        if loop.progress is not None:
            from .progress import report

            jax.debug.callback(functools.partial(report, loop.progress, loop.max_epochs), epoch,
                               metrics["train_loss"], metrics["val_loss"])
        return state, history, epoch + 1

    def keep_going(carry):
        state, _, epoch = carry
        return (epoch < end) & ~state.stopped

    final, history, epoch = lax.while_loop(keep_going, epoch_body, (resume.state, resume.history, resume.epoch))
    out = finish(loop, final, history, learning_rate)
    if with_checkpoint:
        out = out._replace(checkpoint=Checkpoint(final, history, epoch, learning_rate))
    return out


# The pieces of an epoch that the in-memory loop above and the streaming loop
# (:mod:`jaxsel.engine.stream`) share, so both train and stop by the same rules.


def make_train_step(method: Method, tx):
    """One optimiser step on a gathered minibatch:
    ``step(params, model_state, opt_state, batch, key, ctx) -> (params, model_state,
    opt_state, loss, metrics)``; the method's own ``train_step`` when it has one, else one
    ``value_and_grad`` of ``train_loss`` and ``tx.update`` (scaled by ``ctx["lr_scale"]``
    when the method's epoch context has one)."""
    custom_step = getattr(method, "train_step", None)
    if custom_step is not None:
        return lambda p, ms, os, batch, k, ctx: custom_step(p, ms, os, tx, batch, k, ctx)  # noqa: E731
    grad_fn = jax.value_and_grad(method.train_loss, has_aux=True)

    def step(p, ms, os, batch, k, ctx):
        (loss, (ms, aux)), grads = grad_fn(p, ms, batch, k, ctx)
        updates, os = tx.update(grads, os, p)
        if "lr_scale" in ctx:  # per-epoch learning-rate schedule from the method
            updates = jax.tree.map(lambda u: u * ctx["lr_scale"], updates)
        return optax.apply_updates(p, updates), ms, os, loss, aux

    return step


def init_state(params, model_state, tx) -> _State:
    """The loop state before epoch 0."""
    return _State(
        params=params,
        model_state=model_state,
        opt_state=tx.init(params),
        best_params=params,
        best_model_state=model_state,
        best_val=jnp.asarray(jnp.inf, jnp.float32),
        patience_val=jnp.asarray(jnp.inf, jnp.float32),
        best_epoch=jnp.asarray(-1, jnp.int32),
        bad_epochs=jnp.asarray(0, jnp.int32),
        stopped=jnp.asarray(False),
        n_epochs=jnp.asarray(0, jnp.int32),
    )


def train_finite(metrics: dict):
    """Whether an epoch's training loss and every term of it are finite."""
    ok = jnp.asarray(True)
    for k, v in metrics.items():
        if k.startswith("train"):
            ok = ok & jnp.all(jnp.isfinite(v))
    return ok


def epoch_update(loop: LoopConfig, state: _State, p, ms, os, val, epoch, finite=True) -> _State:
    """The state after ``epoch`` ended with parameters ``(p, ms, os)`` and validation
    loss ``val``: best parameters, patience and the stop flag (masked early stopping).
    ``finite=False`` (the epoch's training loss diverged, :func:`train_finite`) stops the
    fit; :func:`jaxsel.engine.check_history` reports it."""
    # Patience follows Lightning: a strict improvement on the best loss so far resets it.
    improved = val < state.patience_val
    bad = jnp.where(improved, 0, state.bad_epochs + 1)
    # The returned parameters are the best among epochs that may end the fit
    # (epoch + 1 >= min_epochs): min_epochs is a floor for the parameters too, so a
    # loss that rises while the Gumbel temperature is still high (the VAE variants
    # at the paper's settings) cannot send back a barely-trained model.
    eligible = epoch + 1 >= loop.min_epochs
    better = eligible & (val < state.best_val)
    pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(better, a, b), new, old)  # noqa: E731
    stop = jnp.asarray(False)
    if loop.patience is not None:
        stop = (epoch + 1 >= loop.min_epochs) & (bad >= loop.patience)
    stop = stop | ~jnp.asarray(finite)
    return _State(
        params=p,
        model_state=ms,
        opt_state=os,
        best_params=pick(p, state.best_params),
        best_model_state=pick(ms, state.best_model_state),
        best_val=jnp.where(better, val, state.best_val),
        best_epoch=jnp.where(better, epoch, state.best_epoch),
        patience_val=jnp.where(improved, val, state.patience_val),
        bad_epochs=bad,
        stopped=stop,
        n_epochs=state.n_epochs + 1,
    )


def finish(loop: LoopConfig, final: _State, history, learning_rate) -> FitResult:
    """The :class:`FitResult` of a finished loop: best-validation parameters (or the final
    ones without early stopping, or when validation never improved)."""
    if loop.patience is None:
        out_p, out_ms = final.params, final.model_state
        best_epoch = final.n_epochs - 1
    else:
        # If validation never improved (non-finite loss), fall back to the final params.
        ok = final.best_epoch >= 0
        out_p = jax.tree.map(lambda a, b: jnp.where(ok, a, b), final.best_params, final.params)
        out_ms = jax.tree.map(lambda a, b: jnp.where(ok, a, b), final.best_model_state, final.model_state)
        best_epoch = final.best_epoch
    return FitResult(out_p, out_ms, history, best_epoch, final.n_epochs, final.best_val, learning_rate)


fit = jax.jit(fit_one, static_argnames=("loop",))
fit.__doc__ = """Jitted :func:`fit_one` (one compiled program per method structure and shapes)."""


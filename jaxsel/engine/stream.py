"""Streaming fits: training data larger than memory, fed to the device chunk by chunk.

:func:`fit_stream` trains the same :class:`~jaxsel.engine.Method` as :func:`fit_one`, with
the same optimiser step (:func:`~jaxsel.engine.loop.make_train_step`) and the same
early-stopping rule (:func:`~jaxsel.engine.loop.epoch_update`), but the cells of the
*streamed* dataset never sit in memory all at once:

- The training rows are cut into *blocks* of consecutive rows (``block_size``); a *chunk*
  is ``chunk_size // block_size`` blocks. Every epoch draws a fresh order of the blocks
  and reads them chunk by chunk through the caller's ``read(rows)`` (rows sorted, so a
  reader can serve each block with one contiguous read from disk).
- A background thread reads, pads and ``device_put``\\ s the next chunks (``prefetch``
  of them) while the device runs the current one, so host memory holds a bounded number
  of chunks whatever the number of cells.
- On the device, one compiled program runs a chunk: a fresh permutation of its rows, then
  a ``lax.scan`` of optimiser steps over its minibatches. Every chunk has the same padded
  shape, so the program compiles **once**; the steps of a short chunk past its last full
  minibatch are skipped (``lax.cond``), and that chunk's remainder rows (fewer than
  ``batch_size``) sit the epoch out, as the in-memory loop drops its last partial batch.
- Validation runs after every epoch on a held-out sample of rows that is read once and
  kept on the device (the caller bounds its size), in pieces of at most ``chunk_size``
  rows; the loss is the weighted mean over all validation cells, so methods whose
  ``eval_loss`` is a weighted mean over cells (all of jaxsel's) get the same loss as one
  call on the whole set, up to float rounding.
- Early stopping (and stopping on a diverged, non-finite training loss) is decided by the
  same masked update as in the compiled loop; the host only reads the stop flag once per
  epoch, and prints the progress line of ``LoopConfig(progress=...)`` itself.
- With ``checkpoint=path`` the loop state (an engine :class:`~jaxsel.engine.Checkpoint`)
  is written to one ``.npz`` file every ``checkpoint_every`` epochs and when the fit ends
  (:func:`~jaxsel.engine.write_checkpoint`, atomically); run again with the same path,
  settings and data, the fit reads it and goes on with the next epoch. Every epoch's
  block order and chunk keys are ``fold_in``\\ s of the key and the epoch, so a resumed
  fit runs the same compiled programs on the same chunks as an uninterrupted one and
  ends with the same result, bit for bit. The file is tied (:func:`fingerprint`) to the
  method, the loop settings, the chunking, the training and validation rows, the
  validation cells' values and the resident data: a file from another fit is an error.

Shuffling is *chunk-local*: a minibatch mixes the cells of one chunk (``chunk_size //
block_size`` blocks drawn from anywhere in the data), not of the whole dataset, the usual
trade-off of streaming loaders (scvi-tools' and anndata's on-disk loaders make the same
one). With several blocks per chunk a file sorted by cell type still gives mixed
minibatches. Results therefore differ from the in-memory fit by the order of the cells,
not in distribution.

Methods trained on several datasets (gimVI) stream the *first* dataset and keep the
others on the device (``resident``): each step takes one minibatch of every dataset, the
resident ones cycling through their own per-epoch permutation, and an epoch is one pass
over the streamed dataset.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .checkpoint import fingerprint as _fingerprint
from .checkpoint import check_checkpoint_args, read_checkpoint, write_checkpoint
from .loop import (
    Checkpoint,
    FitResult,
    LoopConfig,
    Method,
    Splits,
    epoch_update,
    finish,
    gather,
    init_state,
    make_train_step,
    masked_permutation,
    train_finite,
)

__all__ = ["StreamFit", "fit_stream", "plan_blocks", "epoch_chunks"]

PyTree = Any


class StreamFit(NamedTuple):
    """Output of :func:`fit_stream`: the engine's :class:`FitResult` and a dict ``info``
    of host-side figures (``n_train``, ``n_val``, ``chunk_size``, ``block_size``,
    ``chunks_per_epoch``, ``first_epoch`` (the epoch this call started at: 0, or where a
    checkpoint left off), and per epoch run ``epoch_started`` (``time.perf_counter()`` at its
    start), ``epoch_seconds`` (wall), ``input_wait_seconds``
    (the device loop waiting for data), ``read_seconds`` (reader thread: read, pad,
    transfer), ``steps`` and ``cells`` trained)."""

    result: FitResult
    info: dict


def plan_blocks(train_rows, block_size: int) -> list:
    """``train_rows`` (sorted) cut into blocks of ``block_size`` consecutive entries."""
    rows = np.asarray(train_rows, dtype=np.int64)
    return [rows[i : i + block_size] for i in range(0, rows.shape[0], block_size)]


def epoch_chunks(order, blocks, blocks_per_chunk: int) -> list:
    """The chunks of one epoch: blocks taken in ``order``, ``blocks_per_chunk`` at a
    time, each chunk's rows sorted (disk order)."""
    out = []
    for i in range(0, len(order), blocks_per_chunk):
        out.append(np.sort(np.concatenate([blocks[j] for j in order[i : i + blocks_per_chunk]])))
    return out


def _identity(data):
    return data


# ----------------------------------------------------------------------------- compiled parts


# Initialisation runs once: compiled without XLA's backend optimisations, which take most
# of its compile time (one threefry kernel per parameter; 3x faster to compile on CPU).
@functools.partial(jax.jit, static_argnames=("prepare",),
                   compiler_options={"xla_backend_optimization_level": 0})
def _init_program(method, prepare, key, chunk, resident):
    data = prepare(chunk)
    return method.init(key, data if resident is None else (data, *resident))


@functools.partial(jax.jit, static_argnames=("loop", "prepare"))
def _lr_program(method, loop, prepare, key, chunk, n_rows, params, model_state):
    from .lr_finder import lr_range_test

    size = jax.tree.leaves(chunk)[0].shape[0]
    split = Splits(jnp.arange(size, dtype=jnp.int32), n_rows, jnp.zeros((1,), jnp.int32), jnp.int32(1))
    lr, _, _ = lr_range_test(method, loop, loop.lr_finder, key, prepare(chunk), split, params, model_state)
    return lr


@functools.partial(jax.jit, static_argnames=("loop", "prepare"))
def _step_shapes(method, loop, prepare, chunk, state, key, learning_rate, resident):
    """One step's ``(loss, metrics)``, for their shapes (used under ``eval_shape``; a jitted
    function, so a second fit of the same shapes does not trace the method again)."""
    bs = loop.batch_size
    batch = gather(prepare(chunk), jnp.arange(bs))
    if resident is not None:
        batch = (batch, *(gather(d, jnp.arange(bs) % jax.tree.leaves(d)[0].shape[0]) for d in resident))
    step = make_train_step(method, method.optimizer(learning_rate))
    out = step(state.params, state.model_state, state.opt_state, batch, key, method.epoch_context(jnp.int32(0)))
    return out[3], out[4]


@jax.jit
def _resident_perms(key, splits):
    keys = jax.random.split(key, len(splits))
    return tuple(masked_permutation(k, sp.train_idx, sp.n_train) for k, sp in zip(keys, splits))


@functools.partial(jax.jit, static_argnames=("loop", "prepare"), donate_argnames=("carry",))
def _chunk_program(method, loop, prepare, carry, chunk, n_rows, key, epoch, learning_rate, resident, perms,
                   n_res, offset):
    """Train on one chunk: ``carry = (state, sums, n_steps)`` in and out (donated); also
    returns a token to wait on (the number of steps run) for back-pressure."""
    state, sums, n_done = carry
    tx = method.optimizer(learning_rate)
    train_step = make_train_step(method, tx)
    ctx = method.epoch_context(epoch)
    data = prepare(chunk)
    size = jax.tree.leaves(chunk)[0].shape[0]
    bs = loop.batch_size
    n_steps = size // bs
    k_perm, k_steps = jax.random.split(key)
    perm = masked_permutation(k_perm, jnp.arange(size, dtype=jnp.int32), n_rows)
    idx = perm[: n_steps * bs].reshape(n_steps, bs)
    n_active = n_rows // bs
    if resident is not None:
        pos = offset * bs + jnp.arange(n_steps * bs)
        res_idx = tuple(p[pos % jnp.maximum(n, 1)].reshape(n_steps, bs) for p, n in zip(perms, n_res))
    else:
        res_idx = ()

    def step(c, xs):
        i, ix, rix, k = xs

        def run(c):
            p, ms, os, acc = c
            batch = gather(data, ix)
            if resident is not None:
                batch = (batch, *(gather(d, j) for d, j in zip(resident, rix)))
            p, ms, os, loss, aux = train_step(p, ms, os, batch, k, ctx)
            acc = jax.tree.map(jnp.add, acc, (loss, aux))
            return p, ms, os, acc

        return lax.cond(i < n_active, run, lambda c: c, c), None

    c0 = (state.params, state.model_state, state.opt_state, sums)
    (p, ms, os, sums), _ = lax.scan(
        step, c0, (jnp.arange(n_steps), idx, res_idx, jax.random.split(k_steps, n_steps))
    )
    state = state._replace(params=p, model_state=ms, opt_state=os)
    return (state, sums, n_done + n_active), n_active


def _weight_total(w):
    return sum(jnp.sum(a) for a in jax.tree.leaves(w))


@functools.partial(jax.jit, static_argnames=("loop",), donate_argnames=("carry",))
def _end_epoch(method, loop, carry, val_data, val_w, epoch):
    """Validation (weighted over pieces), the early-stopping update and the epoch's
    metrics; resets the training sums for the next epoch."""
    state, sums, n_done = carry
    ctx = method.epoch_context(epoch)
    p, ms = state.params, state.model_state

    def piece(args):
        batch, w = args
        loss, metrics = method.eval_loss(p, ms, batch, w, ctx)
        tot = _weight_total(w)
        scale = lambda v: jnp.where(tot > 0, v * tot, 0.0)  # noqa: E731
        return scale(loss), jax.tree.map(scale, metrics), tot

    losses, metrics, tots = lax.map(piece, (val_data, val_w))
    total = jnp.maximum(jnp.sum(tots), 1.0)
    val = jnp.sum(losses) / total
    val_metrics = jax.tree.map(lambda v: jnp.sum(v, axis=0) / total, metrics)
    n = jnp.maximum(n_done, 1).astype(jnp.float32)
    loss_sum, aux_sum = sums
    out = {"train_loss": loss_sum / n, "val_loss": val}
    out.update({f"train_{k}": v / n for k, v in aux_sum.items()})
    new = epoch_update(loop, state, p, ms, state.opt_state, val, epoch, finite=train_finite(out))
    out.update({f"val_{k}": v for k, v in val_metrics.items()})
    zero = jax.tree.map(jnp.zeros_like, sums)
    return (new, zero, jnp.zeros_like(n_done)), out


@functools.partial(jax.jit, static_argnames=("loop",))
def _finish_program(loop, state, history, learning_rate):
    return finish(loop, state, history, learning_rate)


# ----------------------------------------------------------------------------- host side


def _pad_rows(tree, size: int):
    def pad(a):
        a = np.asarray(a)
        if a.shape[0] == size:
            return a
        out = np.zeros((size, *a.shape[1:]), a.dtype)
        out[: a.shape[0]] = a
        return out

    return jax.tree.map(pad, tree)


class _Reader:
    """Background thread: reads the chunks of successive epochs in order, pads them to
    the chunk size and puts them on the device; at most ``depth`` chunks wait in the
    queue (host memory is bounded by ``depth + 2`` chunks)."""

    _DONE = object()

    def __init__(self, read, plans, size: int, depth: int):
        self._read, self._plans, self._size = read, plans, size
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.read_seconds = 0.0
        self._t = threading.Thread(target=self._run, name="jaxsel-stream-reader", daemon=True)
        self._t.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self):
        try:
            for epoch_plan in self._plans:
                for rows in epoch_plan:
                    t0 = time.perf_counter()
                    data = self._read(rows)
                    n = int(np.shape(jax.tree.leaves(data)[0])[0])
                    if n != rows.shape[0]:
                        raise ValueError(f"read(rows) returned {n} rows for {rows.shape[0]} requested")
                    dev = jax.device_put(_pad_rows(data, self._size))
                    self.read_seconds += time.perf_counter() - t0
                    if not self._put((dev, n)):
                        return
                if not self._put(None):  # end of an epoch
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self._put(err)
        self._put(self._DONE)

    def get(self):
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self._stop.set()
        while True:  # unblock a waiting put
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        self._t.join(timeout=30)


def _val_pieces(tree, n: int, pieces: int, size: int):
    """Rows ``[:n]`` of a device pytree padded to ``pieces * size`` rows and reshaped to
    ``[pieces, size, ...]``, with 0/1 weights ``[pieces, size]``."""
    total = pieces * size

    def pad(a):
        a = a[:n]
        if total > n:
            a = jnp.concatenate([a, jnp.zeros((total - n, *a.shape[1:]), a.dtype)])
        return a.reshape(pieces, size, *a.shape[1:])

    w = (jnp.arange(total) < n).astype(jnp.float32).reshape(pieces, size)
    return jax.tree.map(pad, tree), w


def fit_stream(
    method: Method,
    loop: LoopConfig,
    key,
    read: Callable[[np.ndarray], PyTree],
    train_rows,
    val_rows,
    *,
    chunk_size: int,
    block_size: int | None = None,
    resident=None,
    resident_splits=None,
    prepare: Callable | None = None,
    prefetch: int = 2,
    params=None,
    callback: Callable[[int, dict], Any] | None = None,
    checkpoint=None,
    checkpoint_every: int = 10,
    fingerprint: str = "",
) -> StreamFit:
    """Fit one model on data streamed from the host; see the module docstring.

    Parameters
    ----------
    method, loop : as for :func:`~jaxsel.engine.fit_one` (``loop.steps_per_epoch`` is
        ignored: an epoch is one pass over the streamed training rows).
    key : typed PRNG key (initialisation, block order, permutations, noise).
    read : host function ``read(rows) -> pytree of numpy arrays [len(rows), ...]`` giving
        the streamed dataset's rows ``rows`` (sorted int64); called from a background
        thread (the validation rows once, from the calling thread).
    train_rows, val_rows : row numbers of the streamed dataset to train on and to
        validate on (``val_rows`` are read once and kept on the device; keep them few).
    chunk_size : cells per device chunk (rounded down to a multiple of ``batch_size``).
    block_size : consecutive rows per block (default ``chunk_size // 8``, at least
        ``batch_size``); a chunk is ``chunk_size // block_size`` random blocks.
    resident : tuple of device pytrees, the other datasets of a multi-dataset method
        (its data is then ``(streamed, *resident)``), with ``resident_splits`` a tuple of
        single-fit :class:`Splits` of them.
    prepare : traceable function applied on the device to every chunk (and to the
        validation rows) before training, e.g. ``log1p`` features; a module-level
        function, so that later fits reuse the compiled programs.
    prefetch : chunks read ahead of the device.
    params : optional ``(params, model_state)`` to start from.
    callback : ``callback(epoch, metrics)`` after every epoch (scalar metrics as floats,
        per-feature ones as numpy arrays).
    checkpoint : path of a ``.npz`` file, optional: write the loop state every
        ``checkpoint_every`` epochs and at the end, and go on from it when it exists
        (see the module docstring); ``fingerprint`` is the caller's digest of what else
        the file must match (settings the method does not hold, e.g. the seed).
        ``info`` then covers the epochs run by this call only.

    Returns
    -------
    :class:`StreamFit`
    """
    prepare = _identity if prepare is None else prepare
    bs = loop.batch_size
    size = (int(chunk_size) // bs) * bs
    if size < bs:
        raise ValueError(f"chunk_size ({chunk_size}) must be at least batch_size ({bs})")
    block = int(block_size) if block_size is not None else max(bs, size // 8)
    block = min(max(1, block), size)
    per_chunk = max(1, size // block)
    size = max(size, per_chunk * block)  # a chunk of whole blocks fits
    if prefetch < 1:
        raise ValueError(f"prefetch must be at least 1, got {prefetch}")
    train_rows = np.sort(np.asarray(train_rows, dtype=np.int64))
    val_rows = np.sort(np.asarray(val_rows, dtype=np.int64))
    if train_rows.shape[0] < bs:
        raise ValueError(f"batch_size ({bs}) is larger than the {train_rows.shape[0]} training cells")
    if val_rows.shape[0] < 1:
        raise ValueError("fit_stream needs at least one validation row")
    multi = resident is not None
    if multi:
        resident = tuple(resident)
        resident_splits = tuple(resident_splits)
        if len(resident_splits) != len(resident):
            raise ValueError("resident and resident_splits must have the same length")
        if loop.lr_finder is not None:
            raise ValueError("the learning-rate range test supports single-dataset fits only")
    if checkpoint is not None:
        checkpoint_every = check_checkpoint_args(checkpoint, checkpoint_every)
    blocks = plan_blocks(train_rows, block)
    k_init, k_loop, k_lr = jax.random.split(key, 3)

    def order(epoch):
        k = jax.random.fold_in(jax.random.fold_in(k_loop, epoch), 0)
        return np.asarray(jax.random.permutation(k, len(blocks)))

    # validation rows, read once, in pieces of at most `size` rows
    val_host = read(val_rows)
    n_val = val_rows.shape[0]
    if checkpoint is not None:
        ck_key = _fingerprint(fingerprint, str(jax.tree.structure(method)), method, repr(loop), size, block,
                              train_rows, val_rows, val_host, resident, resident_splits)
        # a chunk's shapes, for the checkpoint's template (the validation rows have them)
        chunk_shape = jax.tree.map(lambda a: jax.ShapeDtypeStruct((size, *np.shape(a)[1:]), np.asarray(a).dtype),
                                   val_host)
    val_dev = prepare(jax.device_put(val_host))
    del val_host
    sizes = [n_val] + ([int(sp.n_val) for sp in resident_splits] if multi else [])
    pieces = -(-max(sizes) // size)
    if multi:
        parts = [_val_pieces(val_dev, n_val, pieces, -(-n_val // pieces))]
        for d, sp in zip(resident, resident_splits):
            nv = int(sp.n_val)
            parts.append(_val_pieces(gather(d, sp.val_idx), nv, pieces, -(-nv // pieces)))
        val_data, val_w = tuple(p[0] for p in parts), tuple(p[1] for p in parts)
    else:
        val_data, val_w = _val_pieces(val_dev, n_val, pieces, -(-n_val // pieces))
    del val_dev

    ck = None
    if checkpoint is not None:
        template = _checkpoint_template(method, loop, prepare, k_init, chunk_shape, resident, val_data, val_w, params)
        ck = read_checkpoint(checkpoint, template, ck_key)
    start = 0 if ck is None else int(ck.epoch)
    ended = ck is not None and (start >= loop.max_epochs or bool(ck.state.stopped))

    def plans():
        for epoch in range(start, loop.max_epochs):
            yield epoch_chunks(order(epoch), blocks, per_chunk)

    info = dict(n_train=int(train_rows.shape[0]), n_val=int(n_val), chunk_size=size, block_size=block,
                chunks_per_epoch=-(-len(blocks) // per_chunk), epoch_started=[], epoch_seconds=[],
                input_wait_seconds=[], read_seconds=[], steps=[], cells=[], first_epoch=start)
    if ended:  # a finished fit's file: its result, without reading the data again
        hist = {k: jnp.asarray(v) for k, v in ck.history.items()}
        return StreamFit(_finish_program(loop, jax.tree.map(jnp.asarray, ck.state), hist,
                                         jnp.asarray(ck.learning_rate)), info)
    reader = _Reader(read, plans(), size, prefetch)
    try:
        first, n_first = reader.get()
        if ck is not None:
            # fresh device buffers per leaf: the live parameters are donated, the best copies not
            state = jax.tree.map(jnp.asarray, ck.state)
            learning_rate = jnp.asarray(ck.learning_rate)
            history = {k: list(np.asarray(v)[:start]) for k, v in ck.history.items()}
        else:
            if params is None:
                params, model_state = _init_program(method, prepare, k_init, first, resident)
            else:  # own buffers: the live parameters are donated, and given leaves may alias each other
                params, model_state = jax.tree.map(jnp.copy, params)
            learning_rate = jnp.asarray(method.learning_rate, jnp.float32)
            if loop.lr_finder is not None:
                lr_loop = dataclasses.replace(loop, steps_per_epoch=max(1, n_first // bs))
                learning_rate = _lr_program(method, lr_loop, prepare, k_lr, first, jnp.int32(n_first), params,
                                            model_state)
            tx = method.optimizer(learning_rate)
            state = init_state(params, model_state, tx)
            # the best-so-far copies must not share buffers with the donated live parameters
            state = state._replace(best_params=jax.tree.map(jnp.copy, state.best_params),
                                   best_model_state=jax.tree.map(jnp.copy, state.best_model_state))
            history = {}
        shapes = jax.eval_shape(_step_shapes, method, loop, prepare, first, state, k_init, learning_rate, resident)
        sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        carry = (state, sums, jnp.int32(0))
        pending = [(first, n_first)]
        epoch = start
        while epoch < loop.max_epochs:
            t0 = time.perf_counter()
            wait = 0.0
            r0 = reader.read_seconds
            k_epoch = jax.random.fold_in(k_loop, epoch)
            perms = _resident_perms(jax.random.fold_in(k_epoch, 1), resident_splits) if multi else None
            n_res = tuple(sp.n_train for sp in resident_splits) if multi else None
            k_chunks = jax.random.fold_in(k_epoch, 2)
            offset, j, token, steps, cells = 0, 0, None, 0, 0
            while True:
                if pending:
                    item = pending.pop()
                else:
                    tw = time.perf_counter()
                    item = reader.get()
                    wait += time.perf_counter() - tw
                if item is None:  # end of the epoch
                    break
                chunk, n = item
                carry, new_token = _chunk_program(method, loop, prepare, carry, chunk, jnp.int32(n),
                                                  jax.random.fold_in(k_chunks, j), jnp.int32(epoch),
                                                  learning_rate, resident, perms, n_res, jnp.int32(offset))
                if token is not None:  # at most two chunk programs in flight
                    token.block_until_ready()
                token = new_token
                offset += n // bs
                steps += n // bs
                cells += (n // bs) * bs
                j += 1
                del chunk
            carry, metrics = _end_epoch(method, loop, carry, val_data, val_w, jnp.int32(epoch))
            metrics = {k: float(v) if np.ndim(v) == 0 else np.asarray(v)
                       for k, v in jax.device_get(metrics).items()}
            for k, v in metrics.items():
                history.setdefault(k, []).append(v)
            info["epoch_started"].append(t0)
            info["epoch_seconds"].append(time.perf_counter() - t0)
            info["input_wait_seconds"].append(wait)
            info["read_seconds"].append(reader.read_seconds - r0)
            info["steps"].append(steps)
            info["cells"].append(cells)
            if loop.progress is not None:
                from .progress import report

                report(loop.progress, loop.max_epochs, epoch, metrics["train_loss"], metrics["val_loss"])
            if callback is not None:
                callback(epoch, metrics)
            epoch += 1
            stopped = bool(carry[0].stopped)
            due = stopped or epoch == loop.max_epochs or (epoch - start) % checkpoint_every == 0
            if checkpoint is not None and due:
                write_checkpoint(checkpoint, Checkpoint(carry[0], _padded(history, loop.max_epochs),
                                                        np.int32(epoch), learning_rate), ck_key)
            if stopped:
                break
    finally:
        reader.close()
    hist = {k: jnp.asarray(v) for k, v in _padded(history, loop.max_epochs).items()}
    result = _finish_program(loop, carry[0], hist, learning_rate)
    return StreamFit(result, info)


def _padded(history: dict, max_epochs: int) -> dict:
    """Per-epoch metric lists as float32 ``[max_epochs, ...]`` arrays, NaN past the last epoch."""
    out = {}
    for k, v in history.items():
        a = np.asarray(v, np.float32)
        out[k] = np.concatenate([a, np.full((max_epochs - a.shape[0], *a.shape[1:]), np.nan, np.float32)])
    return out


def _checkpoint_template(method, loop, prepare, key, chunk, resident, val_data, val_w, params=None):
    """Shapes and dtypes of a streamed fit's :class:`~jaxsel.engine.Checkpoint` (nothing
    is computed): the loop state from the given ``(params, model_state)`` or after
    :func:`_init_program` on a chunk of shape ``chunk``, and the history keys
    :func:`_end_epoch` gives on the validation pieces."""
    if params is None:
        params = jax.eval_shape(_init_program, method, prepare, key, chunk, resident)
    params, model_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), params)
    state = jax.eval_shape(lambda p, m: init_state(p, m, method.optimizer(jnp.float32(method.learning_rate))),
                           params, model_state)
    sums = jax.eval_shape(_step_shapes, method, loop, prepare, chunk, state, key, jnp.float32(0), resident)
    _, metrics = jax.eval_shape(_end_epoch, method, loop, (state, sums, jnp.int32(0)), val_data, val_w, jnp.int32(0))
    hist = {k: jax.ShapeDtypeStruct((loop.max_epochs, *v.shape), jnp.float32) for k, v in metrics.items()}
    return Checkpoint(state, hist, jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.float32))

"""Numerical faults of a finished fit, reported on the host.

The compiled loop stops at the end of the first epoch whose training loss or any of its
terms is not finite (:func:`jaxsel.engine.fit_one`; every fold independently), so a
diverged fit costs at most one wasted epoch. :func:`check_history` then turns the
recorded history into an error that names the epoch, the loss terms and (for
fold-parallel fits) the fold.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DivergenceError", "check_history", "first_divergence"]


class DivergenceError(FloatingPointError, ValueError):
    """Training produced a non-finite loss. A ``FloatingPointError`` (a numerical fault)
    and, like every other error of a fit that cannot be used, a ``ValueError``."""


def first_divergence(history: dict, n_epochs=None):
    """``(fold, epoch, terms)`` of the first non-finite training metric, or ``None``.

    ``history`` maps metric names to arrays ``[..., n_epochs_max]`` (leading fold axes
    allowed, epochs last); entries past ``n_epochs`` (the epochs run, broadcastable to the
    fold axes) are ignored. Only the training metrics (``train_*``, or every metric when
    none is so named) are examined; ``terms`` lists the loss terms that were not finite
    in that epoch, the total last.
    """
    names = [k for k in history if k.startswith("train")] or list(history)
    if not names:
        return None
    arrays = {k: np.asarray(history[k], dtype=np.float64) for k in names}
    shape = next(iter(arrays.values())).shape
    if not shape:
        return None
    epochs = np.arange(shape[-1])
    run = np.ones(shape, bool) if n_epochs is None else epochs < np.asarray(n_epochs)[..., None]
    bad = {k: ~np.isfinite(v) & run for k, v in arrays.items()}
    any_bad = np.logical_or.reduce(list(bad.values()))
    if not any_bad.any():
        return None
    first = np.where(any_bad.any(-1), any_bad.argmax(-1), shape[-1])  # per fold
    fold = np.unravel_index(int(np.argmin(first)), first.shape) if first.ndim else ()
    epoch = int(first[fold])
    terms = [k for k in names if bad[k][fold + (epoch,)]]
    terms.sort(key=lambda k: k in ("train_loss", "loss"))  # the total after its terms
    return (fold if fold else None), epoch, terms


def check_history(history: dict, n_epochs=None, *, model: str = "the model", hint: str = "",
                  stopped: bool = True) -> None:
    """Raise :class:`DivergenceError` if the fit diverged (see :func:`first_divergence`).
    ``stopped=False`` for loops without an early exit (they ran on to the last epoch)."""
    found = first_divergence(history, n_epochs)
    if found is None:
        return
    fold, epoch, terms = found
    where = "" if fold is None else f" (fold/model {fold[0] if len(fold) == 1 else fold})"
    raise DivergenceError(
        f"Training of {model} diverged at epoch {epoch}{where}: {', '.join(terms)} became non-finite "
        f"(NaN or inf){', and the fit stopped there' if stopped else ''}. {hint}".rstrip()
    )

"""A progress line for long fits, printed from inside the compiled loop.

With ``LoopConfig(progress="label")`` the loop calls :func:`report` once per epoch
through ``jax.debug.callback`` (an unordered host callback: the device does not wait
for the print); fold-parallel fits call it once per fold and epoch. Lines go to
``sys.stderr`` at most every ``interval`` seconds, plus the first and the last epoch. The overhead is one host call per epoch and fold
(measured in ``benchmarks/bench_progress.py``).
"""

from __future__ import annotations

import sys
import time

import numpy as np

__all__ = ["report", "interval"]

interval = 1.0  # seconds between lines
_last: dict = {}


def _fmt(v) -> str:
    v = np.asarray(v, dtype=np.float64).ravel()
    if v.size == 1 or np.nanmin(v) == np.nanmax(v):
        return f"{v[0]:.4g}"
    return f"{np.nanmin(v):.4g}..{np.nanmax(v):.4g}"


def report(label: str, max_epochs: int, epoch, train_loss, val_loss=None) -> None:
    """Print ``label: epoch e/max  train ..  val ..  t s`` (host side; no ``val`` part
    when ``val_loss`` is not given, as for full-batch methods without a validation set)."""
    e = int(np.max(np.asarray(epoch)))
    now = time.perf_counter()
    start, last = _last.get(label, (now, -np.inf))
    if e == 0:
        start = now
    if e == 0 or e + 1 >= max_epochs or now - last >= interval:
        val = "" if val_loss is None else f"  val {_fmt(val_loss)}"
        print(f"{label}: epoch {e + 1}/{max_epochs}  train {_fmt(train_loss)}{val}  {now - start:.1f} s",
              file=sys.stderr, flush=True)
        last = now
    _last[label] = (start, last)

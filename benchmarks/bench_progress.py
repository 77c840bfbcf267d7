"""Overhead of the progress line (``verbose=True``) on a compiled fit.

The progress line is a ``jax.debug.callback`` once per epoch (and fold) inside the
compiled loop (:mod:`jaxsel.engine.progress`). This times the same MarkerMap fit, and
the same 5-fold cross-validation, with and without it: after a warm-up fit that
compiles both programs, each is timed ``--repeats`` times alternately and the fastest
of each is compared.

    python benchmarks/bench_progress.py            # writes benchmarks/results/bench_progress.{json,md}
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

import jax

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import jaxsel  # noqa: E402
from bench_markermap import machine_info, write_results  # noqa: E402
from jaxsel import datasets, preprocessing  # noqa: E402


def _time(fn) -> float:
    t = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        out = fn()
        jax.effects_barrier()
    jax.block_until_ready(jax.tree.leaves(out))
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=5000)
    ap.add_argument("--genes", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(HERE / "results" / "bench_progress.json"))
    args = ap.parse_args()
    counts, y, _ = datasets.make_markers(n_cells=args.cells, n_genes=args.genes, random_state=0)
    x, _ = preprocessing.markermap_recipe(counts)
    kw = dict(n_markers=20, max_epochs=args.epochs, min_epochs=args.epochs, learning_rate=1e-3, random_state=0)
    cases = {
        "fit": lambda verbose: jaxsel.MarkerMap(verbose=verbose, **kw).fit(x, y).scores_,
        "cross_validate_5_folds": lambda verbose: jaxsel.MarkerMap(verbose=verbose, **kw).cross_validate(
            x, y, n_folds=5, classifiers=())["scores"],
    }
    rows = []
    for name, run in cases.items():
        for verbose in (False, True):
            _time(lambda: run(verbose))  # compile
        times = {False: [], True: []}
        for _ in range(args.repeats):
            for verbose in (False, True):
                times[verbose].append(_time(lambda: run(verbose)))
        off, on = min(times[False]), min(times[True])
        rows.append(dict(case=name, epochs=args.epochs, quiet_s=off, verbose_s=on, overhead=on / off - 1,
                         quiet_all=times[False], verbose_all=times[True]))
        print(f"{name}: quiet {off:.3f} s, verbose {on:.3f} s, overhead {100 * (on / off - 1):+.1f}%", flush=True)
    res = dict(machine=machine_info(), settings=vars(args), rows=rows)

    def render(r):
        m = r["machine"]
        lines = [
            "# Progress-line overhead (MarkerMap, verbose=True vs False)",
            "",
            f"{m['cpu']}, {m['cores']} cores; jax {m['versions']['jax']}; {m['date']}. "
            f"{r['settings']['cells']} cells x {r['settings']['genes']} genes, {r['settings']['epochs']} epochs, "
            f"fastest of {r['settings']['repeats']} alternating runs after a compiling run.",
            "",
            "| case | quiet (s) | verbose (s) | overhead |",
            "|---|---|---|---|",
        ]
        lines += [f"| {x['case']} | {x['quiet_s']:.3f} | {x['verbose_s']:.3f} | {100 * x['overhead']:+.1f}% |"
                  for x in r["rows"]]
        return "\n".join(lines) + "\n"

    write_results(res, args.out, render)


if __name__ == "__main__":
    main()

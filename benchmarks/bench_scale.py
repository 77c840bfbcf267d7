"""Scale: MarkerMap and gimVI epochs and the one-pass fits (sRRR, HVG, DE) streaming from disk, 10k to 1M cells.

    python benchmarks/bench_scale.py                                   # write data once, run all sizes
    python benchmarks/bench_scale.py --sizes 10000 100000 --methods markermap
    python benchmarks/bench_scale.py --report benchmarks/results/bench_scale.json  # re-render

Data: synthetic planted cell-type counts, ``n`` cells x 2000 genes, sparse CSR in an
``.h5ad`` file (:func:`jaxsel.datasets.write_synthetic_counts`; about 26% non-zero, 4.2 GB
at 1M cells). Written once to ``--data-dir`` (default ``/work/scale_data``, never inside
the repository) and reused.

Every (method, size) runs in a fresh process, so that its peak resident memory
(``getrusage`` ``ru_maxrss``) is its own. Each run fits ``--epochs`` epochs (default 2)
streaming from the file, in chunks of ``--chunk-size`` cells (default 16384) prefetched
by a background thread:

- MarkerMap (supervised, 50 markers, the estimator's defaults except a fixed learning
  rate of 1e-3 instead of the range test, and no early stopping) on the paper's
  preprocessing applied as rows are read (:func:`jaxsel.streaming.markermap_recipe`:
  normalise, log1p, scale with gene statistics from one setup pass);
- gimVI (scvi-tools' defaults: batch 128, hidden 64, latent 10, ZINB/Poisson,
  adversarial) with the file as the scRNA-seq reference, streamed, and 10,000 spatial cells
  x 200 genes in memory (the first cells of the same file, a random 200-gene panel);
  the setup pass checks the counts and computes the library-size prior.

- the one-pass fits, no epochs: sRRR (``srrr``; rank 2, 25 genes) of the same recipe's
  rows against the standardised one-hot cell types (``Y``, in memory): the moments of
  ``[X, Y]`` (float64 scatter, 2 n (p+q)^2 flops) and a solve on p + q rows
  (:meth:`jaxsel.SparseRRR.fit` on disk); HVG (``hvg``, 50 genes) of the normalised
  log1p rows (:class:`jaxsel.HVGMarkers` on disk: every gene's mean and variance); the
  DE t-test (``de``, 50 markers) of the recipe's rows against the cell types
  (:class:`jaxsel.DEMarkers` on disk: per-type moments). Reported in a table of their
  own: the recipe's setup pass, the pass, the solve (sRRR), cells per second of the
  pass and the peak RSS; and the slope of the pass against cells. stAI's inputs
  (``stai``): no training (stAI trains full batch on every cell), only the pass that
  reads the file as the reference and keeps the 200 panel genes and 50 genes to impute,
  log-normalised over all genes (:func:`jaxsel.streaming.read_columns`), with the spatial
  panel above in memory; reported with the MB kept against a dense log-normalised copy of
  all genes.

Reported per run: the setup pass, the first epoch's wall time and the XLA compilation
inside it (``jax.monitoring``'s backend-compile events), the *steady* epoch (the last one,
nothing compiled), cells per second of the steady epoch, the time the device loop waited
for data, and the peak RSS (and RSS after imports, the baseline). The cost curve is the
steady epoch time against the number of cells; its log-log slope is reported (1 = linear).

Results: ``benchmarks/results/bench_scale.json``, ``.md`` and ``bench_scale.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
N_GENES = 2000
N_SPATIAL, N_PANEL = 10_000, 200
N_IMPUTE = 50
ONE_PASS = ("srrr", "hvg", "de", "stai")  # fits that read the file once (no epochs)
METHODS = ("markermap", "gimvi", *ONE_PASS)


def int_at_least(low: int):
    """An argparse type: an integer of at least ``low`` (argparse's error names the flag)."""
    def parse(text: str) -> int:
        n = int(text)
        if n < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text}")
        return n
    return parse


cell_count = int_at_least(2)  # --sizes / report.py's --scale-sizes: a number of cells


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def data_path(data_dir: Path, n: int) -> Path:
    return data_dir / f"scale_{n}x{N_GENES}.h5ad"


def ensure_data(data_dir: Path, sizes) -> dict:
    """Write the datasets that are missing; returns ``{n: write info or None}``."""
    from jaxsel import datasets

    data_dir = data_dir.resolve()
    if REPO in data_dir.parents or data_dir == REPO:
        raise SystemExit(f"--data-dir {data_dir} is inside the repository; choose a folder outside it")
    data_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for n in sizes:
        path = data_path(data_dir, n)
        if path.exists():
            out[n] = None
            continue
        print(f"writing {path} ...", flush=True)
        info = datasets.write_synthetic_counts(path, n, N_GENES, random_state=0)
        out[n] = {"seconds": info["seconds"], "nnz": info["nnz"], "density": info["density"],
                  "bytes": path.stat().st_size}
        print(f"  {info['seconds']:.0f} s, density {info['density']:.3f}, {path.stat().st_size / 2**30:.2f} GiB",
              flush=True)
    return out


# ----------------------------------------------------------------------------- one run (child process)


def worker(method: str, path: str, epochs: int, chunk_size: int, checkpoint=None, checkpoint_every=8) -> dict:
    base_rss = _rss_mb()
    import jax  # noqa: F401
    import numpy as np
    from jax import monitoring

    import jaxsel
    from jaxsel import streaming

    compiles = []  # (time at the end of the compilation, seconds)
    monitoring.register_event_duration_secs_listener(
        lambda ev, d, **kw: compiles.append((time.perf_counter(), d))
        if ev == "/jax/core/compile/backend_compile_duration" else None)
    import_rss = _rss_mb()
    load_before = os.getloadavg()

    t0 = time.perf_counter()
    if method == "srrr":
        src = streaming.markermap_recipe(path)  # the setup pass: gene statistics
        t_setup = time.perf_counter() - t0
        types = np.unique(src.obs_column("cell_type"), return_inverse=True)[1]
        y = np.eye(types.max() + 1, dtype=np.float32)[types]
        y = (y - y.mean(0)) / y.std(0)
        est = jaxsel.SparseRRR(rank=2, n_genes=25, chunk_size=chunk_size).fit(src, y, checkpoint=checkpoint,
                                                                             checkpoint_every=checkpoint_every)
        src.close()
        info = est.stream_info_
        from jaxsel import engine

        return {"method": method, "n_cells": info["n_cells"], "chunk_size": chunk_size, "setup_s": t_setup,
                "fit_digest": engine.fingerprint(est.genes_, est.coef_w_, est.coef_v_, est.lambda_),
                "moments_s": info["moments_seconds"], "solve_s": info["solve_seconds"],
                "checkpoint_s": info.get("checkpoint_seconds", 0.0), "first_row": info.get("first_row", 0),
                "cells_per_s": info["n_cells"] / info["moments_seconds"], "total_s": time.perf_counter() - t0,
                "compile_s": sum(d for _, d in compiles), "n_outputs": int(y.shape[1]),
                "start_rss_mb": base_rss, "import_rss_mb": import_rss, "peak_rss_mb": _maxrss_mb(),
                "end_rss_mb": _rss_mb(), "loadavg_before": load_before[0], "loadavg_after": os.getloadavg()[0]}
    if method in ("hvg", "de"):
        if method == "hvg":
            src = streaming.RowSource(path, transform=lambda b: streaming._normalize_log1p(b, 1e4).toarray())
            est = jaxsel.HVGMarkers(n_markers=50, chunk_size=chunk_size)
            t_setup, y = 0.0, None
        else:
            src = streaming.markermap_recipe(path)  # the setup pass: gene statistics
            t_setup = time.perf_counter() - t0
            y = src.obs_column("cell_type")
            est = jaxsel.DEMarkers(n_markers=50, chunk_size=chunk_size)
        t1 = time.perf_counter()
        est.fit(src, y)
        t_pass = time.perf_counter() - t1
        n = src.n_obs
        src.close()
        return {"method": method, "n_cells": n, "chunk_size": chunk_size, "setup_s": t_setup, "moments_s": t_pass,
                "solve_s": 0.0, "cells_per_s": n / t_pass, "total_s": time.perf_counter() - t0,
                "compile_s": sum(d for _, d in compiles), "start_rss_mb": base_rss, "import_rss_mb": import_rss,
                "peak_rss_mb": _maxrss_mb(), "end_rss_mb": _rss_mb(), "loadavg_before": load_before[0],
                "loadavg_after": os.getloadavg()[0]}
    if method == "stai":
        # stAI's inputs with the file as the reference: the one pass that keeps the panel's
        # genes and the genes to impute (log-normalised over every gene); no training
        xs, panel, genes = _panel(path)
        impute = np.setdiff1d(np.arange(genes.size), panel)[:: (genes.size - panel.size) // N_IMPUTE][:N_IMPUTE]
        coords = np.random.default_rng(0).uniform(size=(xs.shape[0], 2))
        t1 = time.perf_counter()
        d = jaxsel.StAI()._inputs(xs, path, None, coords, genes[panel], genes, genes[impute])
        t_pass = time.perf_counter() - t1
        kept = d["ref_shared_log"].nbytes + d["ref_extra_log"].nbytes
        n = d["ref_shared_log"].shape[0]
        return {"method": method, "n_cells": n, "chunk_size": chunk_size, "setup_s": 0.0, "moments_s": t_pass,
                "solve_s": 0.0, "cells_per_s": n / t_pass, "total_s": time.perf_counter() - t0,
                "kept_mb": kept / 2**20, "all_genes_mb": 4 * n * genes.size / 2**20,
                "columns_kept": int(panel.size + impute.size),
                "compile_s": sum(d for _, d in compiles), "start_rss_mb": base_rss, "import_rss_mb": import_rss,
                "peak_rss_mb": _maxrss_mb(), "end_rss_mb": _rss_mb(), "loadavg_before": load_before[0],
                "loadavg_after": os.getloadavg()[0]}
    if method == "markermap":
        src = streaming.markermap_recipe(path)  # the setup pass: gene statistics
        est = jaxsel.MarkerMap(n_markers=50, learning_rate=1e-3, max_epochs=epochs, min_epochs=0, patience=None,
                               chunk_size=chunk_size, random_state=0)
        est.fit(src, "cell_type")
        src.close()
        batch = 64
    else:
        import anndata

        backed = anndata.read_h5ad(path, backed="r")
        xs, panel, genes = _panel(path)
        est = jaxsel.GimVI(max_epochs=epochs, chunk_size=chunk_size, random_state=0)
        est.fit(backed, xs, ref_genes=genes, spatial_genes=genes[panel])  # setup pass: counts, library prior
        batch = 128
    t_end = time.perf_counter()
    info = est.stream_info_
    starts, ep = info["epoch_started"], info["epoch_seconds"]

    def compiled(a, b):
        return sum(d for t, d in compiles if a <= t <= b)

    steady = ep[-1]
    cells = info["cells"][-1]
    return {
        "method": method, "n_cells": int(info["n_train"] + info["n_val"]), "epochs": epochs,
        "chunk_size": info["chunk_size"], "block_size": info["block_size"], "batch_size": batch,
        "n_train": info["n_train"], "n_val": info["n_val"], "chunks_per_epoch": info["chunks_per_epoch"],
        # from the start of fit to the first epoch: setup pass, validation rows, initialisation
        "setup_s": starts[0] - t0, "compile_setup_s": compiled(t0, starts[0]),
        "first_epoch_s": ep[0], "compile_first_epoch_s": compiled(starts[0], starts[0] + ep[0]),
        "steady_epoch_s": steady, "compile_steady_epoch_s": compiled(starts[-1], starts[-1] + steady),
        "steps": info["steps"][-1], "cells_trained": cells, "cells_per_s": cells / steady,
        "ms_per_step": 1e3 * steady / info["steps"][-1], "input_wait_s": info["input_wait_seconds"][-1],
        "reader_busy_s": info["read_seconds"][-1], "epoch_seconds": ep, "total_s": t_end - t0,
        "start_rss_mb": base_rss, "import_rss_mb": import_rss, "peak_rss_mb": _maxrss_mb(), "end_rss_mb": _rss_mb(),
        # other processes on the machine: the 1-minute load average before and after the run
        "loadavg_before": load_before[0], "loadavg_after": os.getloadavg()[0],
    }


def _panel(path):
    """The spatial stand-in of gimVI and stAI: the file's first ``N_SPATIAL`` cells (those
    with counts) in a random ``N_PANEL``-gene panel; ``(counts, panel columns, genes)``."""
    import numpy as np

    from jaxsel import streaming

    with streaming.open_source(path) as s:
        genes = np.asarray(s.var_names)
        panel = np.sort(np.random.default_rng(0).choice(genes.size, N_PANEL, replace=False))
        xs = s.read(0, N_SPATIAL)[:, panel]
    return xs[xs.sum(1) > 0], panel, genes


# ----------------------------------------------------------------------------- driver


def _worker_cmd(method, path, epochs, chunk_size, checkpoint=None, every=8):
    return [sys.executable, __file__, "--worker", method, "--path", str(path), "--epochs", str(epochs),
            "--chunk-size", str(chunk_size)] + ([] if checkpoint is None else
                                                ["--checkpoint", str(checkpoint), "--checkpoint-every", str(every)])


def run_one(method, path, epochs, chunk_size, timeout, checkpoint=None, every=8) -> dict:
    cmd = _worker_cmd(method, path, epochs, chunk_size, checkpoint, every)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} on {path} failed:\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    res["process_s"] = time.perf_counter() - t0
    return res


def resume_check(plain: dict, path, chunk_size, timeout, workdir: Path, every: int) -> dict:
    """sRRR's pass with a checkpoint every ``every`` blocks, against ``plain`` (the same
    fit without one): an uninterrupted checkpointed run (the cost of writing the file),
    then a run killed (SIGKILL) once it has written half of its checkpoints, and the run
    that resumes it.
    Every run's fit is compared with the plain one's by a digest of its genes,
    coefficients and lambda."""
    ck = workdir / f"srrr_resume_{plain['n_cells']}.npz"
    ck.unlink(missing_ok=True)
    full = run_one("srrr", path, 2, chunk_size, timeout, checkpoint=ck, every=every)
    size_mb = ck.stat().st_size / 2**20
    ck.unlink()
    # killed once it has written half of its checkpoints (each write replaces the file)
    n_blocks = -(-plain["n_cells"] // chunk_size)
    target = max(1, n_blocks // every // 2)
    t0 = time.perf_counter()
    proc = subprocess.Popen(_worker_cmd("srrr", path, 2, chunk_size, ck, every), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    seen, last = 0, None
    while seen < target and proc.poll() is None:
        time.sleep(0.02)
        stamp = ck.stat().st_mtime_ns if ck.exists() else None
        if stamp is not None and stamp != last:
            seen, last = seen + 1, stamp
    proc.kill()
    proc.wait()
    killed_s = time.perf_counter() - t0
    if not ck.exists():
        raise RuntimeError(f"the killed run wrote no checkpoint in {killed_s:.0f} s")
    resumed = run_one("srrr", path, 2, chunk_size, timeout, checkpoint=ck, every=every)
    ck.unlink()
    return {"n_cells": plain["n_cells"], "checkpoint_every": every, "plain_pass_s": plain["moments_s"],
            "checkpointed_pass_s": full["moments_s"], "writing_s": full["checkpoint_s"], "checkpoint_mb": size_mb,
            "checkpointed_equal": full["fit_digest"] == plain["fit_digest"], "killed_after_s": killed_s,
            "rows_in_checkpoint": resumed["first_row"], "resumed_pass_s": resumed["moments_s"],
            "resumed_equal": resumed["fit_digest"] == plain["fit_digest"],
            "resumed_peak_rss_mb": resumed["peak_rss_mb"]}


def slope(xs, ys) -> float:
    import numpy as np

    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def render(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# Scale: streaming one epoch from disk",
        "",
        f"{m['cpu']} ({m['cores']} cores), {m['devices']}; jax {m['versions'].get('jax')}, "
        f"jaxsel {m['versions'].get('jaxsel')}; {res['date']}.",
        f"Data: synthetic counts x {N_GENES} genes, sparse CSR .h5ad; chunks of {res['chunk_size']} cells, "
        f"{res['epochs']} epochs per run (steady = the last, nothing compiled). Setup: the pass over the file "
        "before training (MarkerMap: gene statistics of the recipe; gimVI: count checks and library prior), the "
        "validation rows and initialisation. Compile: XLA compilation in the setup and the first epoch (the first "
        "epoch's wall time includes its part). Load avg: the machine's 1-minute load before the run (2 cores; "
        "other processes share them).",
    ]
    epochs = [r for r in res["runs"] if r["method"] not in ONE_PASS]
    if epochs:
        lines += ["", "| method | cells | setup s | compile s | first epoch s | steady epoch s | cells/s | us/cell "
                  "| ms/step | input wait s | peak RSS MB | RSS after imports MB | load avg |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in epochs:
        lines.append(
            f"| {r['method']} | {r['n_cells']:,} | {r['setup_s']:.1f} | "
            f"{r['compile_first_epoch_s'] + r['compile_setup_s']:.1f} | {r['first_epoch_s']:.1f} | "
            f"{r['steady_epoch_s']:.1f} | {r['cells_per_s']:,.0f} | "
            f"{1e6 * r['steady_epoch_s'] / r['cells_trained']:.0f} | "
            f"{r['ms_per_step']:.2f} | {r['input_wait_s']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {r['import_rss_mb']:.0f} | {r.get('loadavg_before', float('nan')):.1f} |")
    one_pass = [r for r in res["runs"] if r["method"] in ONE_PASS]
    if one_pass:
        lines += ["", "One-pass fits of the same file: sRRR (rank 2, 25 genes; the moments of [X, Y] of the recipe's "
                  "rows, then a solve on p + q rows), HVG (50 genes; gene means and variances of the normalised "
                  "log1p rows), DE t-test (50 markers; per-type moments of the recipe's rows), stAI's inputs (no "
                  "training: the file as the reference, read once keeping the panel's 200 genes and 50 genes to "
                  "impute, log-normalised over every gene).", "",
                  "| method | cells | recipe setup s | pass s | cells/s | solve s (compile s) | peak RSS MB "
                  "| RSS after imports MB | load avg |", "|---|---|---|---|---|---|---|---|---|"]
        for r in one_pass:
            lines.append(f"| {r['method']} | {r['n_cells']:,} | {r['setup_s']:.1f} | {r['moments_s']:.1f} | "
                         f"{r['cells_per_s']:,.0f} | "
                         f"{r['solve_s']:.1f} ({r['compile_s']:.1f}) | {r['peak_rss_mb']:.0f} | "
                         f"{r['import_rss_mb']:.0f} | {r['loadavg_before']:.1f} |")
        kept = [r for r in one_pass if r["method"] == "stai"]
        lines += [""] if kept else []
        for r in kept:
            lines.append(f"- stai, {r['n_cells']:,} cells: kept {r['columns_kept']} of {res['genes']} genes "
                         f"log-normalised, {r['kept_mb']:,.0f} MB (all genes would be {r['all_genes_mb']:,.0f} "
                         "MB dense).")
    if res.get("srrr_resume"):
        lines += ["", "sRRR's pass with a checkpoint (`--srrr-resume`): written every `--checkpoint-every` blocks "
                  f"({next(iter(res['srrr_resume'].values())).get('checkpoint_every', 8)} here) and at the end; a run "
                  "killed (SIGKILL) once it had written half of its checkpoints, then run again. Same fit: the "
                  "digest of genes, coefficients and lambda equals the run without a checkpoint's.", "",
                  "| cells | pass s, no checkpoint | pass s, checkpointed (writing s) | file MB | same fit "
                  "| killed after s | rows in the file | resumed pass s | same fit |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in res["srrr_resume"].values():
            lines.append(f"| {c['n_cells']:,} | {c['plain_pass_s']:.1f} | {c['checkpointed_pass_s']:.1f} "
                         f"({c.get('writing_s', float('nan')):.1f}) | "
                         f"{c['checkpoint_mb']:.0f} | {c['checkpointed_equal']} | {c['killed_after_s']:.0f} | "
                         f"{c['rows_in_checkpoint']:,} | {c['resumed_pass_s']:.1f} | {c['resumed_equal']} |")
    lines.append("")
    for method, s in res.get("slopes", {}).items():
        what = "the pass" if method in ONE_PASS else "the steady epoch time"
        lines.append(f"- {method}: log-log slope of {what} against cells = {s:.3f} (1 = linear).")
    if res.get("writes"):
        lines.append("")
        for n, w in res["writes"].items():
            if w:
                lines.append(f"- wrote {int(n):,} cells in {w['seconds']:.0f} s ({w['bytes'] / 2**30:.2f} GiB, "
                             f"density {w['density']:.3f}).")
    return "\n".join(lines) + "\n"


def figure(res: dict, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for method, marker in (("markermap", "o"), ("gimvi", "s"), ("srrr", "^"), ("hvg", "v"), ("de", "D"),
                           ("stai", "x")):
        rs = sorted([r for r in res["runs"] if r["method"] == method], key=lambda r: r["n_cells"])
        if not rs:
            continue
        n = np.array([r["n_cells"] for r in rs], float)
        t = np.array([r["moments_s" if method in ONE_PASS else "steady_epoch_s"] for r in rs])
        a1.loglog(n, t, marker=marker, label=f"{method} (slope {res['slopes'].get(method, float('nan')):.2f})")
        a1.loglog(n, t[-1] * n / n[-1], ls=":", color="grey")
        a2.semilogx(n, [r["peak_rss_mb"] / 1024 for r in rs], marker=marker, label=method)
    a1.set_xlabel("cells")
    a1.set_ylabel("seconds per epoch (steady; one-pass fits: the pass)")
    a1.set_title("one epoch streaming from disk (dotted: linear through 1M)")
    a1.legend()
    a2.set_xlabel("cells")
    a2.set_ylabel("peak RSS (GiB)")
    a2.set_ylim(bottom=0)
    a2.set_title("peak resident memory")
    a2.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=Path("/work/scale_data"))
    ap.add_argument("--sizes", type=cell_count, nargs="+", default=list(DEFAULT_SIZES))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=16384)
    ap.add_argument("--timeout", type=float, default=4 * 3600)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench_scale.json")
    ap.add_argument("--report", type=Path, help="re-render the markdown and figure of a results JSON")
    ap.add_argument("--srrr-resume", action="store_true",
                    help="also run sRRR with a checkpoint: uninterrupted, then killed at half of its checkpoints "
                         "and resumed")
    ap.add_argument("--checkpoint-every", type=int, default=2, help="blocks between checkpoints (--srrr-resume)")
    ap.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        res = worker(args.worker, args.path, args.epochs, args.chunk_size, args.checkpoint, args.checkpoint_every)
        print("RESULT " + json.dumps(res), flush=True)
        return
    from bench_markermap import machine_info, write_results

    if args.report:
        res = json.loads(args.report.read_text())
        write_results(res, args.report, render)
        figure(res, args.report.with_suffix(".png"))
        return
    if args.epochs < 2:
        raise SystemExit("--epochs must be at least 2 (the last epoch is the steady one)")
    res = {"machine": machine_info(), "date": time.strftime("%Y-%m-%d"), "chunk_size": args.chunk_size,
           "epochs": args.epochs, "genes": N_GENES, "runs": [], "slopes": {}}
    if args.out.exists():  # keep runs of other sizes / methods
        old = json.loads(args.out.read_text())
        res["runs"] = [r for r in old.get("runs", [])
                       if not (r["method"] in args.methods and r["n_cells"] in args.sizes)]
        res["writes"] = old.get("writes", {})
        res["srrr_resume"] = {k: v for k, v in old.get("srrr_resume", {}).items()
                              if not (args.srrr_resume and int(k) in args.sizes)}
    res.setdefault("writes", {}).update({str(k): v for k, v in ensure_data(args.data_dir, args.sizes).items() if v})
    for n in sorted(args.sizes):
        for method in args.methods:
            print(f"{method}, {n:,} cells ...", flush=True)
            r = run_one(method, data_path(args.data_dir, n), args.epochs, args.chunk_size, args.timeout)
            if method in ONE_PASS:
                print(f"  pass {r['moments_s']:.1f} s ({r['cells_per_s']:,.0f} cells/s), solve "
                      f"{r['solve_s']:.1f} s, recipe setup {r['setup_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB",
                      flush=True)
                res["runs"].append(r)
                if method == "srrr" and args.srrr_resume:
                    c = resume_check(r, data_path(args.data_dir, n), args.chunk_size, args.timeout, args.data_dir,
                                     args.checkpoint_every)
                    print(f"  checkpointed pass {c['checkpointed_pass_s']:.1f} s ({c['writing_s']:.1f} s writing "
                          f"{c['checkpoint_mb']:.0f} MB files), "
                          f"same fit: {c['checkpointed_equal']}; killed after {c['killed_after_s']:.0f} s with "
                          f"{c['rows_in_checkpoint']:,} rows done, resumed pass {c['resumed_pass_s']:.1f} s, "
                          f"same fit: {c['resumed_equal']}", flush=True)
                    res.setdefault("srrr_resume", {})[str(n)] = c
                _finish(res, args.out)
                continue
            print(f"  steady epoch {r['steady_epoch_s']:.1f} s ({r['cells_per_s']:,.0f} cells/s), first "
                  f"{r['first_epoch_s']:.1f} s ({r['compile_first_epoch_s']:.1f} s compiling), setup "
                  f"{r['setup_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
            res["runs"].append(r)
            _finish(res, args.out)
    _finish(res, args.out)


def _finish(res, out: Path):
    from bench_markermap import write_results

    res["runs"].sort(key=lambda r: (r["method"], r["n_cells"]))
    for method in METHODS:
        rs = [r for r in res["runs"] if r["method"] == method]
        if len(rs) >= 2:
            res["slopes"][method] = slope([r["n_cells"] for r in rs],
                                          [r["moments_s" if method in ONE_PASS else "steady_epoch_s"] for r in rs])
    write_results(res, out, render)
    figure(res, out.with_suffix(".png"))


if __name__ == "__main__":
    main()

"""gimVI: jaxsel against scvi-tools' GIMVI, side by side, on speed and on the imputation protocol.

    python benchmarks/bench_gimvi.py --ref-python /path/to/venv-with-scvi-tools/bin/python   # everything
    python benchmarks/bench_gimvi.py --only speed --ref-python ...
    python benchmarks/bench_gimvi.py --only quality --datasets osmfish --gene-folds 11 --seeds 3 --ref-python ...
    python benchmarks/bench_gimvi.py --report benchmarks/results/bench_gimvi.json          # re-render

Data (``../shared/data``; skipped when absent).

``speed``: the paper's shapes. Spatial: osmFISH, all 4839 cells, 26 of its genes (the
most expressed). Reference: Zeisel et al. 2015, 3005 cells, the 1000 most expressed genes
of the shared file. The shared Zeisel file names only 2 of the osmFISH genes, so the 26
spatial columns are *assigned* the names of 26 reference genes. This is a timing setup
only: the counts are real, the gene correspondence is not. Both implementations get the
same arrays, ZINB for the reference, Poisson for the spatial data, and scvi-tools'
architecture and training defaults (batch 128 from each dataset, Adam 1e-3, kappa 5).

- scvi-tools runs ``--speed-epochs[1]`` epochs through ``reference_gimvi.py`` (its public
  API, unmodified); per epoch is the median over the epochs after the first.
- jaxsel runs in a fresh process at both epoch counts. Per epoch is the difference
  (fixed costs cancel); compilation is timed apart.

``quality``: the stAI protocol's splits. osmFISH is split 50/50 into reference and
spatial parts, stratified by cell type (seed 0). STARmap mPFC uses sections 0 and 1 as the
reference and section 2 as spatial. Raw counts both, every gene shared. The spatial genes
are split into ``--gene-folds`` held-out folds. For every fold and seed (``--seeds``), a
model is fitted without that fold's genes in the spatial data, for ``--epochs`` epochs.

- jaxsel: all folds x seeds are one compiled program
  (:meth:`jaxsel.GimVI.cross_validate_genes`).
- scvi-tools: one run per fold and seed, cached in ``results/gimvi_ref_cache`` (each file
  named by a digest of its inputs and settings, so other inputs never reuse it).

Each held-out gene is imputed from the posterior mean of ``z``, decoded through the
scRNA-seq branch. Both are converted by :func:`jaxsel.methods.gimvi.spatial_scale` to
``log1p(1e4 c / (L + c))``, with ``c`` the expected count on the spatial scale and ``L``
the cell's observed library. They are scored per gene against the measured log-normalised
counts (``metrics.imputation_scores``: Spearman, as in the paper, and PCC); the report
gives median over genes, then mean and SD over seeds.

Integration metrics on each model's latent:

- the entropy of batch mixing generalised to unbalanced data
  (``metrics.entropy_batch_mixing``);
- kNN purity against a latent fitted on each dataset alone (``metrics.knn_purity``). The
  "alone" latent is the first 10 principal components of that dataset's log-normalised
  counts, where the paper fits a single-dataset VAE. It is the same reference for both
  implementations.

Both are computed at k = 10, 50, 100. Uncertainty: the Spearman correlation across
held-out genes between jaxsel's mean posterior SD (50 draws) and the gene's imputation
error, 1 - Spearman (paper, Fig. 3).

Results: ``benchmarks/results/bench_gimvi.json`` (after every phase) and ``bench_gimvi.md``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench_markermap import PeakRSS, machine_info, write_results  # noqa: E402
from jaxsel import GimVI, datasets, engine, metrics  # noqa: E402
from jaxsel import preprocessing as pp  # noqa: E402
from jaxsel._validation import to_dense  # noqa: E402
from jaxsel.methods import gimvi as gv  # noqa: E402

OUT = HERE / "results"
KS = (10, 50, 100)


# ----------------------------------------------------------------------------- data


def _dense(x):
    return to_dense(x, dtype=np.float32)


def speed_data():
    """The paper-sized timing setup (see the module docstring), or None without data."""
    if datasets.shared_data_dir() is None:
        return None
    osm = datasets.load_shared("osmfish")
    zei = datasets.load_shared("zeisel2015")
    xs = _dense(osm.X)
    xs = xs[:, np.argsort(-xs.sum(0), kind="stable")[:26]]
    xr = _dense(zei.X)
    xr = xr[:, np.argsort(-xr.sum(0), kind="stable")[:1000]]
    keep_sp = xs.sum(1) > 0
    keep_ref = xr.sum(1) > 0
    genes = np.array([f"ref_gene_{i}" for i in range(1000)])
    return dict(x_ref=xr[keep_ref], x_sp=xs[keep_sp], genes_ref=genes, genes_sp=genes[:26])


def protocol_data(name: str):
    """``(x_ref, x_sp, genes)`` raw counts of the stAI protocol's split, or None."""
    if datasets.shared_data_dir() is None:
        return None
    if name == "osmfish":
        ad = datasets.load_shared("osmfish")
        labels = np.asarray(ad.obs["celltype"]).astype(str)
        ref, spi = datasets.reference_spatial_split(labels, spatial_fraction=0.5, random_state=0)
    elif name == "starmap":
        ad = datasets.load_shared("starmap_mpfc")
        ref, spi = datasets.reference_spatial_split(sections=np.asarray(ad.obs["batch"]), reference_sections=["0", "1"])
    else:
        raise ValueError(name)
    x = _dense(ad.X)
    xr, xs = x[ref], x[spi]
    # gimVI needs positive libraries; drop the (few) empty cells of either part
    xr, xs = xr[xr.sum(1) > 0], xs[xs.sum(1) > 0]
    return dict(x_ref=xr, x_sp=xs, genes=np.asarray(ad.var_names).astype(str))


def modelled_spatial_cells(x_sp, folds) -> np.ndarray:
    """Boolean [n_spatial]: the cells gimVI can model in every held-out fold (some counts
    left in the genes the fold keeps; a cell with an empty library has no likelihood)."""
    G = x_sp.shape[1]
    return np.all([x_sp[:, np.setdiff1d(np.arange(G), f)].sum(1) > 0 for f in folds], axis=0)


# ----------------------------------------------------------------------------- reference runs


# scvi-tools' GIMVI settings of every reference run (part of its cache files' digest)
REFERENCE_SETTINGS = ("--batch-size", "128", "--seq-likelihood", "zinb", "--spatial-likelihood", "poisson")


def run_reference(args, arrays: dict, epochs: int, seed: int, cache: Path | None = None, threads: int = 2) -> dict:
    """scvi-tools' GIMVI on ``arrays`` in its own interpreter; JSON results plus arrays."""
    if cache is not None and cache.with_suffix(".json").exists() and cache.with_suffix(".npz").exists():
        res = json.loads(cache.with_suffix(".json").read_text())
        res["arrays"] = dict(np.load(cache.with_suffix(".npz")))
        res["cached"] = True
        return res
    base = cache if cache is not None else Path(os.environ.get("TMPDIR", "/tmp")) / f"gimvi_ref_{os.getpid()}_{seed}"
    base.parent.mkdir(parents=True, exist_ok=True)
    inputs = base.with_name(base.name + "_inputs.npz")
    np.savez(inputs, **arrays)
    cmd = [args.ref_python, str(HERE / "reference_gimvi.py"), "--inputs", str(inputs), "--out",
           str(base.with_suffix(".json")), "--epochs", str(epochs), "--seed", str(seed), *REFERENCE_SETTINGS,
           "--threads", str(threads)]
    try:
        subprocess.run(cmd, check=True, capture_output=not args.verbose)
    finally:
        inputs.unlink(missing_ok=True)
    res = json.loads(base.with_suffix(".json").read_text())
    res["arrays"] = dict(np.load(base.with_suffix(".npz")))
    if cache is None:
        base.with_suffix(".json").unlink(missing_ok=True)
        base.with_suffix(".npz").unlink(missing_ok=True)
    return res


# ----------------------------------------------------------------------------- speed


def jaxsel_speed(epochs: int) -> dict:
    """One gimVI fit of the speed setup in this process (the estimator's own program,
    one model, seed 0): compile and run timed apart."""
    d = speed_data()
    est = GimVI(max_epochs=epochs)
    inp = est._inputs(d["x_ref"], d["x_sp"], d["genes_ref"], d["genes_sp"])
    _, models, loop, keys, data, splits = est._program(inp, np.ones((1, inp["sp_names"].size), np.float32), [0])
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        comp = gv.fit(models, loop, keys, data, splits, batch_size=1, mesh=None, lower=True).compile()
        t_compile = time.perf_counter() - t0
        runs = []
        for _ in range(5):  # the 2-core machine's timings vary by +-20% from run to run
            t0 = time.perf_counter()
            jax.block_until_ready(comp(models, keys, data, splits).params)
            runs.append(time.perf_counter() - t0)
    n_train = [int(s.n_train[0]) for s in splits]
    return dict(compile_s=t_compile, run_s=min(runs), runs_s=runs, peak_rss_mb=mem.peak_mb,
                steps_per_epoch=max(n_train) // 128, n_train=n_train)


def speed(args) -> dict:
    d = speed_data()
    e1, e2 = args.speed_epochs
    out = {"n_ref": int(d["x_ref"].shape[0]), "n_genes_ref": 1000, "n_spatial": int(d["x_sp"].shape[0]),
           "n_genes_spatial": 26, "epochs": [e1, e2]}
    runs = []
    for e in (e1, e2):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_jaxsel-speed", str(e)]
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    per = (runs[1]["run_s"] - runs[0]["run_s"]) / (e2 - e1)
    fixed = max(runs[0]["run_s"] - per * e1, 0.0)
    out["jaxsel"] = dict(runs=runs, per_epoch_s=per, fixed_s=fixed, compile_s=runs[1]["compile_s"],
                         peak_rss_mb=max(r["peak_rss_mb"] for r in runs),
                         steps_per_epoch=runs[0]["steps_per_epoch"],
                         total_200_s=runs[1]["compile_s"] + fixed + 200 * per)
    print(f"jaxsel: {per:.4f} s per epoch ({runs[0]['steps_per_epoch']} steps), compile {runs[1]['compile_s']:.1f} s",
          flush=True)
    if args.ref_python:
        arrays = dict(x_seq=d["x_ref"], x_sp=d["x_sp"], genes_seq=d["genes_ref"], genes_sp=d["genes_sp"],
                      impute=d["genes_ref"][26:31])
        r = run_reference(args, arrays, e2, 0)
        r.pop("arrays")
        out["reference"] = dict(per_epoch_s=r["per_epoch_s"], min_epoch_s=r.get("min_epoch_s"), fit_s=r["fit_s"],
                                setup_s=r.get("setup_s"), epoch_s=r["epoch_s"], peak_rss_mb=r["peak_rss_mb"],
                                steps_per_epoch=r.get("steps_per_epoch"), versions=r.get("versions"),
                                total_200_s=(r.get("setup_s") or 0.0) + 200 * r["per_epoch_s"])
        out["speedup_per_epoch"] = r["per_epoch_s"] / per
        out["speedup_per_epoch_best"] = (r.get("min_epoch_s") or r["per_epoch_s"]) / per
        out["speedup_per_step"] = (r["per_epoch_s"] / r["steps_per_epoch"]) / (per / runs[0]["steps_per_epoch"])
        out["speedup_200_epochs_with_compile"] = out["reference"]["total_200_s"] / out["jaxsel"]["total_200_s"]
        print(f"scvi-tools: {r['per_epoch_s']:.3f} s per epoch ({r['steps_per_epoch']} steps); "
              f"speed-up {out['speedup_per_epoch']:.1f}x per epoch", flush=True)
    return out


# ----------------------------------------------------------------------------- quality


def _alone_latents(x_ref, x_sp):
    """The paper's single-dataset latents, here PCA(10) of each dataset's log-normalised counts."""
    from sklearn.decomposition import PCA

    return [PCA(10, random_state=0).fit_transform(pp.log_normalize(x)) for x in (x_ref, x_sp)]


def _integration(latents, alone) -> dict:
    """Mixing entropy and kNN purity averaged over a seed's fold models."""
    ent, pur = {k: [] for k in KS}, {k: [] for k in KS}
    for z_ref, z_sp in latents:
        z = np.concatenate([z_ref, z_sp])
        batch = np.r_[np.zeros(len(z_ref)), np.ones(len(z_sp))]
        for k, v in metrics.entropy_batch_mixing(z, batch, n_neighbors=list(KS)).items():
            ent[k].append(v)
        p_ref = metrics.knn_purity(z_ref, alone[0], n_neighbors=list(KS))
        p_sp = metrics.knn_purity(z_sp, alone[1], n_neighbors=list(KS))
        for k in KS:
            pur[k].append(0.5 * (p_ref[k] + p_sp[k]))
    return {"mixing_entropy": {k: float(np.mean(v)) for k, v in ent.items()},
            "knn_purity": {k: float(np.mean(v)) for k, v in pur.items()}}


def _summary(per_seed: list[dict]) -> dict:
    out = {}
    for key in per_seed[0]:
        vals = [s[key] for s in per_seed]
        if isinstance(vals[0], dict):
            out[key] = {k: [float(np.mean([v[k] for v in vals])), float(np.std([v[k] for v in vals]))]
                        for k in vals[0]}
        elif isinstance(vals[0], (int, float)):
            out[key] = [float(np.mean(vals)), float(np.std(vals))]
    return out


def quality(args, name: str, d: dict) -> dict:
    G = d["genes"].size
    n_folds = args.gene_folds or (11 if name == "osmfish" else 10)
    folds = datasets.gene_folds(G, n_folds, random_state=0)
    fold_names = [d["genes"][f].tolist() for f in folds]
    ok = modelled_spatial_cells(d["x_sp"], folds)
    d = dict(d, x_sp=d["x_sp"][ok])
    truth = pp.log_normalize(d["x_sp"])
    alone = _alone_latents(d["x_ref"], d["x_sp"])
    out = {"gene_folds": n_folds, "seeds": args.seeds, "epochs": args.epochs, "n_ref": int(d["x_ref"].shape[0]),
           "spatial_cells_dropped": int((~ok).sum()),
           "n_spatial": int(d["x_sp"].shape[0]), "n_genes": int(G), "models": n_folds * args.seeds}

    est = GimVI(max_epochs=args.epochs, random_state=0)
    t0 = time.perf_counter()
    res = est.cross_validate_genes(d["x_ref"], d["x_sp"], ref_genes=d["genes"], spatial_genes=d["genes"],
                                   gene_folds=fold_names, n_seeds=args.seeds, n_samples=50)
    wall = time.perf_counter() - t0
    per_seed = []
    for r in res:
        err = 1.0 - r.spearman
        sd = np.nanmean(r.std, axis=0)
        ok = np.isfinite(err) & np.isfinite(sd)
        from scipy.stats import spearmanr

        unc = float(spearmanr(sd[ok], err[ok]).statistic)
        per_seed.append({"spearman": float(np.nanmedian(r.spearman)), "pcc": float(np.nanmedian(r.pcc)),
                         "sd_vs_error_spearman": unc, **_integration(r.latent, alone)})
    out["jaxsel"] = {"per_seed": per_seed, "summary": _summary(per_seed), "wall_s": wall,
                     "per_gene_spearman": [r.spearman.tolist() for r in res]}
    s = out["jaxsel"]["summary"]
    print(f"{name} jaxsel: Spearman {s['spearman'][0]:.3f} +- {s['spearman'][1]:.3f}, PCC {s['pcc'][0]:.3f}, "
          f"mixing(50) {s['mixing_entropy'][50][0]:.3f}, {wall:.0f} s for {out['models']} models", flush=True)

    if args.ref_python:
        cache_dir = OUT / "gimvi_ref_cache"
        jobs = []
        for seed in range(args.seeds):
            for f, held in enumerate(folds):
                keep = np.setdiff1d(np.arange(G), held)
                arrays = dict(x_seq=d["x_ref"], x_sp=d["x_sp"][:, keep], genes_seq=d["genes"],
                              genes_sp=d["genes"][keep], impute=d["genes"])
                # the inputs' digest in the name: a run on other inputs never reads this one
                digest = engine.fingerprint(arrays, REFERENCE_SETTINGS)[:12]
                cache = cache_dir / f"{name}_e{args.epochs}_f{n_folds}_{f}_s{seed}_{digest}"
                jobs.append((seed, f, held, keep, arrays, cache))
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.ref_workers) as pool:
            runs = list(pool.map(lambda j: run_reference(args, j[4], args.epochs, j[0], j[5],
                                                         threads=max(1, 2 // args.ref_workers)), jobs))
        ref_wall = time.perf_counter() - t0
        per_seed = []
        for seed in range(args.seeds):
            imputed = np.full(truth.shape, np.nan, np.float32)
            latents = []
            fit_s = 0.0
            for (sd_, f, held, keep, _, _), r in zip(jobs, runs):
                if sd_ != seed:
                    continue
                mask = np.zeros(G, np.float32)
                mask[keep] = 1.0
                rho = r["arrays"]["scale_decode0"]  # softmax over all G genes
                _, lognorm = gv.spatial_scale(jnp.asarray(rho), jnp.asarray(d["x_sp"]), jnp.asarray(mask),
                                              jnp.arange(G))
                imputed[:, held] = np.asarray(lognorm)[:, held]
                latents.append((r["arrays"]["latent_seq"], r["arrays"]["latent_sp"]))
                fit_s += r["fit_s"]
            sc = metrics.imputation_scores(truth, imputed)
            per_seed.append({"spearman": float(np.nanmedian(sc["spearman"])), "pcc": float(np.nanmedian(sc["pcc"])),
                             "fit_s": fit_s, **_integration(latents, alone)})
        cached = int(sum(bool(r.get("cached")) for r in runs))
        # a cached run was timed when it ran: its fit time is kept, the wall time of this call is not its cost
        out["scvi"] = {"per_seed": per_seed, "summary": _summary(per_seed), "wall_s": None if cached else ref_wall,
                       "fit_s_sum": float(sum(r["fit_s"] for r in runs)),
                       "workers": args.ref_workers, "cached_runs": cached,
                       "versions": runs[0].get("versions")}
        s = out["scvi"]["summary"]
        print(f"{name} scvi-tools: Spearman {s['spearman'][0]:.3f} +- {s['spearman'][1]:.3f}, PCC {s['pcc'][0]:.3f}, "
              f"mixing(50) {s['mixing_entropy'][50][0]:.3f}", flush=True)
    return out


# ----------------------------------------------------------------------------- report


def _pm(v, fmt=".3f"):
    return f"{v[0]:{fmt}} ± {v[1]:{fmt}}"


def render(res: dict) -> str:
    m = res.get("machine", {})
    lines = ["# gimVI benchmark: jaxsel vs scvi-tools GIMVI", "",
             f"Machine: {m.get('cpu')} ({m.get('cores')} cores), {m.get('platform')}; versions {m.get('versions')}; "
             f"{m.get('date')}", "", f"Command: `{res.get('command')}`", ""]
    s = res.get("speed")
    if s:
        j = s["jaxsel"]
        lines += [f"## Speed: reference {s['n_ref']} cells x {s['n_genes_ref']} genes (Zeisel), spatial "
                  f"{s['n_spatial']} cells x {s['n_genes_spatial']} genes (osmFISH); ZINB + Poisson, batch 128", "",
                  "| implementation | s per epoch | steps per epoch | compile s | peak RSS MB | 200 epochs (s) |",
                  "|---|---|---|---|---|---|",
                  f"| jaxsel | {j['per_epoch_s']:.3f} | {j['steps_per_epoch']} | {j['compile_s']:.1f} | "
                  f"{j['peak_rss_mb']:.0f} | {j['total_200_s']:.0f} |"]
        if "reference" in s:
            r = s["reference"]
            lines += [f"| scvi-tools GIMVI (median epoch; fastest {r.get('min_epoch_s') or float('nan'):.3f}) | {r['per_epoch_s']:.3f} | {r['steps_per_epoch']} | - | "
                      f"{r['peak_rss_mb']:.0f} | {r['total_200_s']:.0f} |", "",
                      f"Speed-up: {s['speedup_per_epoch']:.1f}x per epoch (scvi-tools' median epoch; "
                      f"{s.get('speedup_per_epoch_best', float('nan')):.1f}x against its fastest epoch; jaxsel's "
                      f"epoch from the fastest of 5 runs at each length), {s['speedup_per_step']:.1f}x per step "
                      f"(scvi-tools also trains on the last incomplete batch), "
                      f"{s['speedup_200_epochs_with_compile']:.1f}x for 200 epochs including compilation."]
        lines.append("")
    for name, q in res.get("quality", {}).items():
        lines += [f"## Imputation, {name}: {q['gene_folds']} held-out gene folds x {q['seeds']} seeds "
                  f"({q['models']} models), {q['epochs']} epochs; reference {q['n_ref']} x {q['n_genes']}, "
                  f"spatial {q['n_spatial']}", "",
                  "Medians over held-out genes, mean ± SD over seeds.", "",
                  "| implementation | Spearman | PCC | mixing entropy k=10 / 50 / 100 | kNN purity k=10 / 50 / 100 | "
                  "wall s |", "|---|---|---|---|---|---|"]
        for impl, label in (("jaxsel", "jaxsel (one program)"), ("scvi", "scvi-tools GIMVI")):
            if impl not in q:
                continue
            s_ = q[impl]["summary"]
            ent = " / ".join(f"{s_['mixing_entropy'][str(k) if str(k) in s_['mixing_entropy'] else k][0]:.3f}"
                             for k in KS)
            pur = " / ".join(f"{s_['knn_purity'][str(k) if str(k) in s_['knn_purity'] else k][0]:.3f}" for k in KS)
            wall = q[impl].get("wall_s")
            wall = f"{wall:.0f}" if wall is not None else f"cached runs (fits {q[impl].get('fit_s_sum', float('nan')):.0f} s)"
            lines.append(f"| {label} | {_pm(s_['spearman'])} | {_pm(s_['pcc'])} | {ent} | {pur} | {wall} |")
        if "jaxsel" in q:
            u = q["jaxsel"]["summary"]["sd_vs_error_spearman"]
            lines += ["", f"Uncertainty: Spearman correlation across held-out genes between jaxsel's mean posterior "
                          f"SD (50 draws) and the imputation error 1 - Spearman: {_pm(u, '.2f')}."]
        lines.append("")
    return "\n".join(lines)


def save(res, out: Path):
    write_results(res, out, render)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref-python", default=None, help="interpreter with scvi-tools (and torch)")
    ap.add_argument("--only", default=None, help="comma list of phases: speed,quality")
    ap.add_argument("--datasets", default="osmfish,starmap")
    ap.add_argument("--speed-epochs", type=int, nargs=2, default=[2, 12])
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--gene-folds", type=int, default=None, help="default: 11 for osmFISH, 10 for STARmap")
    ap.add_argument("--ref-workers", type=int, default=2, help="scvi-tools runs in parallel (threads split)")
    ap.add_argument("--out", default=str(OUT / "bench_gimvi.json"))
    ap.add_argument("--report", default=None)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--_jaxsel-speed", dest="jaxsel_speed", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.jaxsel_speed is not None:  # one timing in a fresh process
        print(json.dumps(jaxsel_speed(args.jaxsel_speed)))
        return
    if args.report:
        print(render(json.loads(Path(args.report).read_text())))
        return
    if datasets.shared_data_dir() is None:
        print("shared data not found: skipping (set JAXSEL_DATA_DIR)")
        return
    phases = set((args.only or "speed,quality").split(","))
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.exists() else {}
    res.update({"machine": machine_info(), "command": " ".join(["python", *sys.argv])})
    res.setdefault("quality", {})
    if "speed" in phases:
        res["speed"] = speed(args)
        save(res, out)
    if "quality" in phases:
        for n in args.datasets.split(","):
            res["quality"][n] = quality(args, n, protocol_data(n))
            save(res, out)
    print(render(res))


if __name__ == "__main__":
    main()
